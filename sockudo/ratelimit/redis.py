"""Per-IP rate limits shared by every node: ``[rate_limiter] driver = "redis"`` (as Sockudo).

The same sliding-window approximation as :class:`sockudo.listener.RateLimiter` (this window's
count plus the previous window's, weighted by how much of it still overlaps), with the counts in
Redis so N nodes behind a balancer allow an address ``max_requests`` in all, not N times that.
One Lua script reads both windows and counts the request atomically, so two nodes racing for
the last slot cannot both get it.

Window boundaries come from each node's wall clock (``time.time``); nodes kept in step by NTP
agree to well under a second, which only shifts a boundary a little.

If Redis does not answer, a limit must neither take the API down nor vanish: the node falls
back to its own per-process limiter (the ``memory`` driver's behaviour) for
``RETRY_AFTER_FAILURE_S`` and then tries Redis again. The fallback is logged, not silent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from sockudo.core.keys import tag
from sockudo.ratelimit.memory import RateLimiter
from sockudo.redis import is_cluster

logger = logging.getLogger(__name__)

RETRY_AFTER_FAILURE_S = 5.0

# KEYS[1]: this window's counter, KEYS[2]: the previous window's.
# ARGV[1]: max requests, ARGV[2]: elapsed fraction of this window, ARGV[3]: counter TTL (ms).
# Returns {allowed (0/1), used before this request (string: Lua numbers lose the fraction)}.
_HIT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
local used = previous * (1 - tonumber(ARGV[2])) + current
if used + 1 > tonumber(ARGV[1]) then
  return {0, tostring(used)}
end
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, tostring(used)}
"""


class RedisRateLimiter:
    """``hit(key)`` like :class:`RateLimiter`, counted in Redis under ``{prefix}{name}:``."""

    def __init__(self, client: Any, prefix: str, name: str, max_requests: int, window: float,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.max_requests = max_requests
        self.window = float(window)
        self.clock = clock
        self.monotonic = monotonic
        self.key_prefix = f"{prefix}rate_limit:{name}:"
        self.fallback = RateLimiter(max_requests, window, monotonic)
        self._script = client.register_script(_HIT)
        # On a Redis Cluster both windows of one address must share a slot: their keys start with
        # a hash tag of the limiter and the address (one Redis or Sentinel: keys as before).
        self.cluster = is_cluster(client)
        self._down_until = 0.0
        # Two windows of life: a counter is read as "the previous window" for one more window.
        self._ttl_ms = int(self.window * 2000) + 1000

    def hit(self, key: str) -> tuple[bool, int, float]:
        """``(allowed, remaining, reset_in_seconds)``; a refused request is not counted."""
        if self.monotonic() < self._down_until:
            return self.fallback.hit(key)
        now = self.clock()
        index = int(now // self.window)
        elapsed = (now % self.window) / self.window
        reset = self.window - (now % self.window)
        try:
            head = f"{self.key_prefix}{tag(self.key_prefix, key)}" if self.cluster else self.key_prefix
            allowed, used_text = self._script(
                keys=[f"{head}{key}:{index}", f"{head}{key}:{index - 1}"],
                args=[self.max_requests, repr(elapsed), self._ttl_ms])
        except RedisError as exc:
            self._down_until = self.monotonic() + RETRY_AFTER_FAILURE_S
            logger.warning("rate limiter: redis unavailable (%s); counting per process for %.0f s",
                           type(exc).__name__, RETRY_AFTER_FAILURE_S)
            return self.fallback.hit(key)
        used = float(used_text)
        if not allowed:
            return False, 0, reset
        return True, max(0, int(self.max_requests - used - 1)), reset
