"""Channel and member lifecycle events, in Pusher's webhook event shape (spec §6).

The handler reports them here. When an app has webhooks the composition root plugs in
``webhook_sink.WebhookSink``; otherwise the null sink drops nothing anyone asked for.
"""

from __future__ import annotations

from typing import Any, Protocol

from sockudo.config import AppConfig


class LifecycleSink(Protocol):
    def emit(self, app: AppConfig, event: dict[str, Any]) -> None:
        """``event`` is one webhook event, e.g. ``{"name": "channel_occupied", "channel": "x"}``."""


class NullSink:
    def emit(self, app: AppConfig, event: dict[str, Any]) -> None:
        return None


class RecordingSink:
    """Keeps events in memory; for tests of the pure core."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, app: AppConfig, event: dict[str, Any]) -> None:
        self.events.append((app.id, event))
