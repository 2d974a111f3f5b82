"""Key-value cache with TTL, for cache-channel payloads. In memory on one node."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import redis

from sockudo.core.keys import tag
from sockudo.redis import is_cluster


class Cache(Protocol):
    def get(self, key: str) -> tuple[str, float] | None:
        """``(value, seconds_left)`` or None."""

    def set(self, key: str, value: str, ttl_seconds: float) -> None: ...

    def readiness_probe(self) -> Callable[[], object] | None:
        """What ``/up`` checks (raises when the store is unreachable); None for one in memory."""


class MemoryCache:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._items: dict[str, tuple[str, float]] = {}

    def get(self, key: str) -> tuple[str, float] | None:
        item = self._items.get(key)
        if item is None:
            return None
        value, expires = item
        left = expires - self._clock()
        if left <= 0:
            del self._items[key]
            return None
        return value, left

    def set(self, key: str, value: str, ttl_seconds: float) -> None:
        self._items[key] = (value, self._clock() + ttl_seconds)
        if len(self._items) > 1024 and len(self._items) % 1024 == 0:
            self.sweep()

    def sweep(self) -> None:
        now = self._clock()
        for key in [k for k, (_, exp) in self._items.items() if exp <= now]:
            del self._items[key]

    def readiness_probe(self) -> None:
        return None


class RedisCache:
    """Cache-channel payloads shared by every node. On a Redis Cluster a key starts with a hash tag
    of the whole key (one key per channel: its slot is the channel's own); on one Redis or Sentinel
    the keys are as before."""

    def __init__(self, client: Any, prefix: str = "sockudo:") -> None:
        self.client = client
        self.prefix = prefix
        self.cluster = is_cluster(client)

    def _key(self, key: str) -> str:
        return self.prefix + tag("", key) + key if self.cluster else self.prefix + key

    def readiness_probe(self) -> Callable[[], bool]:
        return lambda: bool(self.client.ping())

    def get(self, key: str) -> tuple[str, float] | None:
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self._key(key))
            pipe.pttl(self._key(key))
            value, pttl = pipe.execute()
        except redis.RedisError:  # a cache miss is the safe answer when Redis is away
            return None
        if value is None:
            return None
        return (value.decode() if isinstance(value, bytes) else value), max(0.0, pttl / 1000)

    def set(self, key: str, value: str, ttl_seconds: float) -> None:
        try:
            self.client.set(self._key(key), value, px=int(ttl_seconds * 1000))
        except redis.RedisError:
            pass  # best effort: a later publish stores it again


def cache_channel_key(app_id: str, channel: str) -> str:
    return f"app:{app_id}:channel:{channel}:cache_miss"
