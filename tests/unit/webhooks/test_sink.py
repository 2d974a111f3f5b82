"""The server's sink: debounce, batching, only what endpoints ask for, queue outages."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry

from sockudo.config import AppConfig
from sockudo.webhooks.markers import MemoryMarkers
from sockudo.webhooks.metrics import WebhookMetrics
from sockudo.webhooks.model import (
    Delivery,
    WebhookSettings,
)
from sockudo.webhooks.sink import WebhookSink
from tests.support.fakes import FakeClock, FakeRuntime
from tests.unit.webhooks.helpers import (
    ALL_TYPES,
    Occupancy,
    RecordingQueue,
    make_app,
    run,
)


def test_leave_and_rejoin_inside_the_window_sends_nothing(sink_parts: Any) -> None:
    sink, queue, clock, occupancy, registry = sink_parts
    app = make_app({"url": "http://h/x", "event_types": ALL_TYPES})
    for event in ({"name": "channel_vacated", "channel": "room"},
                  {"name": "member_removed", "channel": "presence-r", "user_id": "u1"}):
        sink.emit(app, event)
    run(sink, clock, 0.5)
    sink.emit(app, {"name": "channel_occupied", "channel": "room"})
    sink.emit(app, {"name": "member_added", "channel": "presence-r", "user_id": "u1"})
    run(sink, clock, 2.0)
    assert queue.events() == []
    assert registry.get_sample_value("sockudo_webhooks_debounce_cancelled_total",
                                     {"app_id": "1", "event_type": "channel_vacated"}) == 1


def test_leave_sent_after_the_window_when_still_gone(sink_parts: Any) -> None:
    sink, queue, clock, occupancy, registry = sink_parts
    app = make_app({"url": "http://h/x", "event_types": ["channel_vacated", "member_removed"]})
    sink.emit(app, {"name": "channel_vacated", "channel": "room"})
    sink.emit(app, {"name": "member_removed", "channel": "presence-r", "user_id": "u1"})
    run(sink, clock, 0.9)
    assert queue.events() == []
    run(sink, clock, 0.2)  # window closed → into the batch
    run(sink, clock, 0.1)  # batch window closed → queued
    assert queue.events() == [{"name": "channel_vacated", "channel": "room"},
                              {"name": "member_removed", "channel": "presence-r", "user_id": "u1"}]
    # The join is only watched (to cancel a pending leave), never sent to this endpoint.
    sink.emit(app, {"name": "channel_occupied", "channel": "room"})
    run(sink, clock, 1.0)
    assert len(queue.events()) == 2


def test_leave_dropped_when_the_cluster_still_has_the_channel(sink_parts: Any) -> None:
    sink, queue, clock, occupancy, _ = sink_parts
    app = make_app({"url": "http://h/x", "event_types": ["channel_vacated", "member_removed"]})
    occupancy.counts["room"] = 1
    occupancy.members["presence-r"] = {"u1": {}}
    sink.emit(app, {"name": "channel_vacated", "channel": "room"})
    sink.emit(app, {"name": "member_removed", "channel": "presence-r", "user_id": "u1"})
    run(sink, clock, 2.0)
    run(sink, clock, 1.0)
    assert queue.events() == []


def test_a_newer_leave_owns_the_marker(sink_parts: Any) -> None:
    sink, queue, clock, _, _ = sink_parts
    app = make_app({"url": "http://h/x", "event_types": ["channel_vacated", "channel_occupied"]})
    sink.emit(app, {"name": "channel_vacated", "channel": "room"})
    run(sink, clock, 0.5)
    sink.emit(app, {"name": "channel_vacated", "channel": "room"})  # e.g. reported by another node
    run(sink, clock, 0.6)  # first timer: not its token any more → nothing
    run(sink, clock, 0.1)
    assert queue.events() == []
    run(sink, clock, 0.5)
    run(sink, clock, 0.1)
    assert queue.events() == [{"name": "channel_vacated", "channel": "room"}]


def test_batches_per_app_and_only_listed_types(sink_parts: Any) -> None:
    sink, queue, clock, _, registry = sink_parts
    app = make_app({"url": "http://h/x", "event_types": ["client_event", "cache_miss"]})
    other = make_app({"url": "http://h/y", "event_types": ["channel_occupied"]}, app_id="2")
    sink.emit(app, {"name": "client_event", "channel": "presence-a", "event": "client-e", "data": "{}",
                    "socket_id": "1.1", "user_id": "u"})
    sink.emit(app, {"name": "cache_miss", "channel": "cache-x"})
    sink.emit(app, {"name": "subscription_count", "channel": "x", "subscription_count": 1})  # not listed
    sink.emit(other, {"name": "channel_occupied", "channel": "z"})
    run(sink, clock, 0.06)
    assert len(queue.deliveries) == 2
    by_app = {d.app_id: json.loads(d.body)["events"] for d in queue.deliveries}
    assert [e["name"] for e in by_app["1"]] == ["client_event", "cache_miss"]
    assert by_app["1"][0]["user_id"] == "u" and by_app["1"][1]["data"] == "{}"
    assert registry.get_sample_value("sockudo_webhooks_queued_total",
                                     {"app_id": "1", "endpoint": queue.deliveries[0].endpoint,
                                      "event_type": "cache_miss"}) == 1
    assert queue.deliveries[0].endpoint.startswith("0-")


def test_stop_sends_pending_leaves_and_open_batches(sink_parts: Any) -> None:
    sink, queue, clock, _, _ = sink_parts
    app = make_app({"url": "http://h/x", "event_types": ["channel_vacated", "client_event"]})
    sink.emit(app, {"name": "channel_vacated", "channel": "room"})
    sink.emit(app, {"name": "client_event", "channel": "private-a", "event": "client-e", "data": "1",
                    "socket_id": "1.1"})
    sink.stop(timeout=0)
    assert [e["name"] for e in queue.events()] == ["client_event", "channel_vacated"]


def test_apps_without_webhooks_cost_a_lookup(sink_parts: Any) -> None:
    sink, queue, clock, _, _ = sink_parts
    sink.emit(AppConfig(id="9", key="k9", secret="s9"), {"name": "channel_occupied", "channel": "a"})
    assert not sink._inbox


def test_queue_outage_keeps_deliveries_until_it_is_back() -> None:
    clock = FakeClock(1000.0)

    class FlakyQueue(RecordingQueue):
        down = True

        def enqueue(self, deliveries: list[Delivery]) -> None:
            if self.down:
                raise ConnectionError("redis down")
            super().enqueue(deliveries)

    queue, registry = FlakyQueue(), CollectorRegistry()
    sink = WebhookSink(WebhookSettings(debounce_ms=0), queue, WebhookMetrics(registry), FakeRuntime(threads=False),
                       Occupancy(), MemoryMarkers(), "p:", clock=clock)
    app = make_app({"url": "http://h/x", "event_types": ["channel_occupied"]})
    sink.emit(app, {"name": "channel_occupied", "channel": "a"})
    run(sink, clock, 0.1)
    sink.emit(app, {"name": "channel_occupied", "channel": "b"})
    run(sink, clock, 0.1)
    assert queue.deliveries == [] and len(sink._outbox) == 2
    queue.down = False
    run(sink, clock, 1.0)
    assert [e["channel"] for e in queue.events()] == ["a", "b"]
    assert (registry.get_sample_value("sockudo_webhooks_enqueue_failures_total") or 0) >= 1


def test_redis_down_at_the_leave_still_sends_it_after_the_window() -> None:
    class DownThenUp(MemoryMarkers):
        down = True

        def mark(self, key: str, token: str, ttl_ms: int) -> None:
            if self.down:
                raise ConnectionError("redis down")
            super().mark(key, token, ttl_ms)

    clock, queue, markers = FakeClock(1000.0), RecordingQueue(), DownThenUp()
    sink = WebhookSink(WebhookSettings(debounce_ms=1000), queue, WebhookMetrics(CollectorRegistry()),
                       FakeRuntime(threads=False), Occupancy(), markers, "p:", clock=clock)
    app = make_app({"url": "http://h/x", "event_types": ["channel_vacated"]})
    sink.emit(app, {"name": "channel_vacated", "channel": "room"})
    run(sink, clock, 0.5)
    markers.down = False  # back before the window closes: the leave was never marked, send it anyway
    run(sink, clock, 0.6)
    run(sink, clock, 0.1)
    assert queue.events() == [{"name": "channel_vacated", "channel": "room"}]
