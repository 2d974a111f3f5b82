"""Pending-leave markers: the interface, the in-process driver and the Redis driver.

A leave (``channel_vacated`` / ``member_removed``) leaves a marker for the debounce window; a
join inside it cancels the marker. With Redis, nodes cancel each other's markers.
"""

from __future__ import annotations

from typing import Any, Protocol

from sockudo.webhooks.model import (
    MEMBER_REMOVED,
)


class Markers(Protocol):
    def mark(self, key: str, token: str, ttl_ms: int) -> None: ...
    def cancel(self, key: str) -> bool: ...
    def release(self, key: str, token: str) -> bool: ...


class MemoryMarkers:
    """Pending-leave markers for one process (no Redis)."""

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}

    def mark(self, key: str, token: str, ttl_ms: int) -> None:
        self._tokens[key] = token

    def cancel(self, key: str) -> bool:
        return self._tokens.pop(key, None) is not None

    def release(self, key: str, token: str) -> bool:
        if self._tokens.get(key) == token:
            del self._tokens[key]
            return True
        return False


def marker_key(app_id: str, event: dict[str, Any]) -> str:
    """One key per channel (occupancy) or per channel member (presence); lengths keep it unambiguous."""
    channel = str(event.get("channel", ""))
    if event.get("name") in (MEMBER_REMOVED, "member_added"):
        user = str(event.get("user_id", ""))
        return f"m:{app_id}:{len(channel)}:{channel}:{user}"
    return f"c:{app_id}:{len(channel)}:{channel}"



_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisMarkers:
    """Pending-leave markers shared by every node: a leave on node A and a rejoin on node B
    inside the window cancel each other.

    ``mark`` writes this leave's token (``SET PX``; a newer leave replaces an older one, whose
    timer then finds someone else's token and sends nothing). ``cancel`` is the rejoin:
    ``DEL`` answering 1 means a leave was pending. ``release`` is the timer: compare-and-delete
    of its own token, 1 = still pending, send it."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = f"{prefix}pending:"
        self._release = client.register_script(_RELEASE_LUA)

    def mark(self, key: str, token: str, ttl_ms: int) -> None:
        self.client.set(self.prefix + key, token, px=ttl_ms)

    def cancel(self, key: str) -> bool:
        return bool(self.client.delete(self.prefix + key))

    def release(self, key: str, token: str) -> bool:
        return bool(self._release(keys=[self.prefix + key], args=[token]))

