"""Idempotent HTTP publish: a repeat inside the TTL gets the first response and
delivers nothing; a concurrent repeat waits briefly, then gets 503 with ``Retry-After``.

Keys live in Redis when it is configured (so a repeat sent to another node is suppressed too),
else in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import redis

from sockudo.core.errors import ApiError
from sockudo.core.keys import tag
from sockudo.redis import is_cluster

PROCESSING = "__processing__"
POLLS = 6
POLL_SECONDS = 0.05


class IdempotencyUnavailable(Exception):
    """The store could not be read or written (Redis down, out of memory, timed out)."""


class IdempotencyStore(Protocol):
    """Raises ``IdempotencyUnavailable`` when the store fails; anything else is a bug."""

    def claim(self, key: str, ttl_seconds: int) -> str | None:
        """Claim ``key``; None when claimed now, else the stored value (``PROCESSING`` or a response)."""

    def get(self, key: str) -> str | None: ...
    def store(self, key: str, response: str, ttl_seconds: int) -> None: ...
    def release(self, key: str) -> None: ...


class MemoryIdempotency:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.items: dict[str, tuple[str, float]] = {}

    def get(self, key: str) -> str | None:
        item = self.items.get(key)
        if item is None:
            return None
        if item[1] <= self.clock():
            del self.items[key]
            return None
        return item[0]

    def claim(self, key: str, ttl_seconds: int) -> str | None:
        existing = self.get(key)
        if existing is not None:
            return existing
        if len(self.items) > 10000:
            now = self.clock()
            for k in [k for k, (_, exp) in self.items.items() if exp <= now]:
                del self.items[k]
        self.items[key] = (PROCESSING, self.clock() + ttl_seconds)
        return None

    def store(self, key: str, response: str, ttl_seconds: int) -> None:
        self.items[key] = (response, self.clock() + ttl_seconds)

    def release(self, key: str) -> None:
        self.items.pop(key, None)


class RedisIdempotency:
    """Idempotency keys shared by every node. Each is one Redis key, used alone; on a Redis Cluster
    it starts with a hash tag of the whole key, so that braces in a client's idempotency key cannot
    pick its slot (on one Redis or Sentinel the keys are as before)."""

    def __init__(self, client: Any, prefix: str = "sockudo:") -> None:
        self.client = client
        self.prefix = prefix
        self.cluster = is_cluster(client)

    def _key(self, key: str) -> str:
        return self.prefix + tag("", key) + key if self.cluster else self.prefix + key

    def get(self, key: str) -> str | None:
        try:
            value = self.client.get(self._key(key))
        except redis.RedisError as exc:
            raise IdempotencyUnavailable(str(exc)) from exc
        return value.decode() if isinstance(value, bytes) else value

    def claim(self, key: str, ttl_seconds: int) -> str | None:
        try:
            claimed = self.client.set(self._key(key), PROCESSING, nx=True, ex=ttl_seconds)
        except redis.RedisError as exc:
            raise IdempotencyUnavailable(str(exc)) from exc
        return None if claimed else self.get(key) or PROCESSING

    def store(self, key: str, response: str, ttl_seconds: int) -> None:
        try:
            self.client.set(self._key(key), response, ex=ttl_seconds)
        except redis.RedisError as exc:
            raise IdempotencyUnavailable(str(exc)) from exc

    def release(self, key: str) -> None:
        try:
            self.client.delete(self._key(key))
        except redis.RedisError as exc:
            raise IdempotencyUnavailable(str(exc)) from exc


def validate_key(key: Any, max_length: int) -> str:
    if not isinstance(key, str) or not key:
        raise ApiError(400, "invalid_input", "idempotency key must be a non-empty string")
    if len(key) > max_length:
        raise ApiError(400, "invalid_input", f"idempotency key is longer than {max_length} characters")
    return key


def begin(store: IdempotencyStore, key: str, ttl_seconds: int, sleep: Callable[[float], None]) -> str | None:
    """Claim ``key``. Returns a stored response to replay, or None when the caller must publish.

    A repeat that arrives while the first is still publishing polls briefly, then gets 503.
    A store failure (``IdempotencyUnavailable``) is a 503 too: never publish without the claim.
    """
    try:
        existing = store.claim(key, ttl_seconds)
        polls = 0
        while existing == PROCESSING and polls < POLLS:
            sleep(POLL_SECONDS)
            polls += 1
            existing = store.get(key)
            if existing is None:
                existing = store.claim(key, ttl_seconds)
                if existing is None:
                    return None
    except IdempotencyUnavailable as exc:
        raise ApiError(503, "service_unavailable", "Idempotency store unavailable") from exc
    if existing == PROCESSING:
        raise ApiError(503, "backpressure", "A publish with this idempotency key is in progress",
                       headers={"Retry-After": "1"})
    return existing
