"""The main listener's protections, pure: ``[rate_limiter]`` and ``[ssl]`` settings, the per-IP
rate limiter and connection counter (docs/security.md).

No I/O and no gevent: ``sockudo/server/guard.py`` applies these to the WSGI server. Counters
live in this process (``driver = "memory"``): with several nodes behind a balancer, one IP may
use each node's allowance.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: Distinct client IPs tracked per limiter; the least recently seen are forgotten beyond it, so
#: an attacker rotating addresses costs bounded memory (and at worst resets its own counters).
MAX_TRACKED_IPS = 100_000
















# -- the limiters --------------------------------------------------------------------------------


class RateLimiter:
    """A sliding-window counter per key (the weighted two-window approximation): at most about
    ``max_requests`` in any ``window`` seconds. ``hit`` counts one request and says whether it
    is allowed; memory is bounded by ``MAX_TRACKED_IPS``."""

    def __init__(self, max_requests: int, window: float, clock: Callable[[], float],
                 max_keys: int = MAX_TRACKED_IPS) -> None:
        self.max_requests = max_requests
        self.window = float(window)
        self.clock = clock
        self.max_keys = max_keys
        # key -> [window index, count in it, count in the previous window]
        self._counts: OrderedDict[str, list[float]] = OrderedDict()

    def _estimate(self, entry: list[float], now: float) -> float:
        index = now // self.window
        if entry[0] != index:
            entry[2] = entry[1] if entry[0] == index - 1 else 0
            entry[1] = 0
            entry[0] = index
        elapsed = (now % self.window) / self.window
        return entry[2] * (1 - elapsed) + entry[1]

    def hit(self, key: str) -> tuple[bool, int, float]:
        """``(allowed, remaining, reset_in_seconds)``; a refused request is not counted."""
        now = self.clock()
        entry = self._counts.get(key)
        if entry is None:
            entry = self._counts[key] = [now // self.window, 0, 0]
            while len(self._counts) > self.max_keys:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(key)
        used = self._estimate(entry, now)
        reset = self.window - (now % self.window)
        if used + 1 > self.max_requests:
            return False, 0, reset
        entry[1] += 1
        return True, max(0, int(self.max_requests - used - 1)), reset


class ConnectionCounter:
    """Open WebSockets per key; ``acquire`` refuses beyond ``limit`` (0 = unlimited)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        count = self.open.get(key, 0)
        if self.limit and count >= self.limit:
            return False
        self.open[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self.open.get(key, 0) - 1
        if count > 0:
            self.open[key] = count
        else:
            self.open.pop(key, None)


def client_ip(remote_addr: str, forwarded_for: str | None, trust_hops: int) -> str:
    """The client's address: the peer itself, or with ``trust_hops`` proxies in front, the entry
    of ``X-Forwarded-For`` that the outermost trusted proxy added (never a client-chosen one)."""
    if trust_hops <= 0 or not forwarded_for:
        return remote_addr
    hops = [part.strip() for part in forwarded_for.split(",") if part.strip()]
    if len(hops) < trust_hops:
        return hops[0] if hops else remote_addr
    return hops[-trust_hops]
