"""Channel and member lifecycle events, in Pusher's webhook event shape.

The handler reports them here. When an app has webhooks the composition root plugs in
``webhook_sink.WebhookSink``; otherwise the null sink drops nothing anyone asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from sockudo.config import AppConfig


class LifecycleSink(Protocol):
    def emit(self, app: AppConfig, event: dict[str, Any]) -> None:
        """``event`` is one webhook event, e.g. ``{"name": "channel_occupied", "channel": "x"}``."""

    def start(self) -> None:
        """Start background work (the server calls it once it listens)."""

    def stop(self, timeout: float | None = None) -> None:
        """Hand over what is pending, within ``timeout`` seconds (graceful shutdown)."""

    def readiness_probe(self) -> Callable[[], object] | None:
        """What ``/up`` checks (not critical: webhooks wait in their queue); None when nothing."""


class NullSink:
    def emit(self, app: AppConfig, event: dict[str, Any]) -> None:
        return None

    def start(self) -> None:
        return None

    def stop(self, timeout: float | None = None) -> None:
        return None

    def readiness_probe(self) -> None:
        return None


class RecordingSink(NullSink):
    """Keeps events in memory; for tests of the pure core."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, app: AppConfig, event: dict[str, Any]) -> None:
        self.events.append((app.id, event))
