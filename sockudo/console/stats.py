"""Per-app samples for the console's charts: connections, channels and messages per second.

The sampler (in the server) adds one sample per app every second while a console is open, so
the history is bounded (``seconds`` samples per app) and costs nothing while nobody watches.
"""

from __future__ import annotations

from collections import deque
from typing import Any

DEFAULT_SECONDS = 300


class StatsHistory:
    def __init__(self, seconds: int = DEFAULT_SECONDS) -> None:
        self.seconds = max(1, seconds)
        self._series: dict[str, deque[dict[str, Any]]] = {}

    def add(self, app_id: str, t_ms: int, connections: int, channels: int, messages: int) -> dict[str, Any]:
        sample = {"t": t_ms, "connections": connections, "channels": channels, "messages": messages}
        series = self._series.get(app_id)
        if series is None:
            series = self._series[app_id] = deque(maxlen=self.seconds)
        series.append(sample)
        return sample

    def series(self, app_id: str) -> list[dict[str, Any]]:
        return list(self._series.get(app_id, ()))

    def latest(self, app_id: str) -> dict[str, Any] | None:
        series = self._series.get(app_id)
        return series[-1] if series else None

    def forget(self, keep: set[str]) -> None:
        """Drop the series of apps no longer configured."""
        for app_id in [a for a in self._series if a not in keep]:
            del self._series[app_id]
