"""Fixtures of the webhook unit tests: the sink and its parts, a local receiver, a real Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from sockudo.webhooks.markers import MemoryMarkers
from sockudo.webhooks.metrics import WebhookMetrics
from sockudo.webhooks.model import (
    WebhookSettings,
)
from sockudo.webhooks.sink import WebhookSink
from tests.support.fakes import FakeClock, FakeRuntime
from tests.unit.webhooks.helpers import (
    Occupancy,
    RecordingQueue,
)


@pytest.fixture
def sink_parts() -> Iterator[tuple[WebhookSink, RecordingQueue, FakeClock, Occupancy, CollectorRegistry]]:
    clock, queue, occupancy, registry = FakeClock(1000.0), RecordingQueue(), Occupancy(), CollectorRegistry()
    settings = WebhookSettings(debounce_ms=1000, batching_duration_ms=50, batching_size=100)
    sink = WebhookSink(settings, queue, WebhookMetrics(registry), FakeRuntime(threads=False), occupancy,
                       MemoryMarkers(), "p:", clock=clock)
    yield sink, queue, clock, occupancy, registry




