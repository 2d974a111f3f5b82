"""The main listener's protections, pure: ``[rate_limiter]`` and ``[ssl]`` settings, the per-IP
rate limiter and connection counter (spec §1.1, §1.2, §5.1; docs/security.md).

No I/O and no gevent: ``sockudo/server/guard.py`` applies these to the WSGI server. Counters
live in this process (``driver = "memory"``): with several nodes behind a balancer, one IP may
use each node's allowance.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)

#: Distinct client IPs tracked per limiter; the least recently seen are forgotten beyond it, so
#: an attacker rotating addresses costs bounded memory (and at worst resets its own counters).
MAX_TRACKED_IPS = 100_000


@dataclass(frozen=True)
class RateLimiterConfig:
    """``[rate_limiter]``, off by default as in Sockudo's shipped config. Key names follow Sockudo
    (``api_rate_limit`` / ``websocket_rate_limit`` tables; ``RATE_LIMITER_*`` variables)."""

    enabled: bool = False
    driver: str = "memory"
    max_connections_per_ip: int = 0  # open WebSockets per client IP; 0 = unlimited (not in Sockudo)
    api_max_requests: int = 100  # signed REST calls per IP per window (429 beyond)
    api_window_seconds: int = 60
    api_trust_hops: int = 0  # X-Forwarded-For entries added by proxies we trust
    websocket_max_requests: int = 20  # WebSocket upgrades per IP per window (429 beyond)
    websocket_window_seconds: int = 60
    websocket_trust_hops: int = 0


@dataclass(frozen=True)
class SslConfig:
    """``[ssl]``: TLS on the main listener, for deployments without a terminating proxy."""

    enabled: bool = False
    cert_path: str = ""  # PEM certificate (chain)
    key_path: str = ""  # PEM private key
    passphrase: str = ""  # of an encrypted key; never logged


_RATE_TABLES = {"api_rate_limit": "api_", "websocket_rate_limit": "websocket_"}


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config: {key} must be true or false, got {value!r}")
    if kind is int:
        try:
            number = int(str(value).strip()) if not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or number < 0:
            raise ConfigError(f"config: {key} must be a whole number >= 0, got {value!r}")
        return number
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"config: {key} must be a string, got {value!r}")
    return str(value)


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    known = {f.name: f.type for f in fields(cls)}
    kinds = {"bool": bool, "int": int, "str": str}
    out = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"config: unknown key {where}{name}")
        out[name] = _coerce(f"{where}{name}", value, kinds[str(known[name])])
    return cls(**out)


def parse_rate_limiter(raw: Mapping[str, Any], env: Mapping[str, str]) -> RateLimiterConfig:
    """The ``[rate_limiter]`` table (with Sockudo's nested rate tables), then ``RATE_LIMITER_*``."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _RATE_TABLES:
            if not isinstance(value, Mapping):
                raise ConfigError(f"config: [rate_limiter.{key}] must be a table")
            for sub, sub_value in value.items():
                if sub == "identifier":
                    continue  # Sockudo's label for logs; accepted, unused
                if sub not in ("max_requests", "window_seconds", "trust_hops"):
                    raise ConfigError(f"config: unknown key rate_limiter.{key}.{sub}")
                flat[_RATE_TABLES[key] + sub] = sub_value
        else:
            flat[key] = value
    for f in fields(RateLimiterConfig):
        var = "RATE_LIMITER_" + f.name.upper()
        if env.get(var, "") != "":
            flat[f.name] = env[var]
    config: RateLimiterConfig = _build(RateLimiterConfig, flat, "rate_limiter.")
    if config.driver not in ("memory", "redis"):
        raise ConfigError(f"config: rate_limiter.driver must be \"memory\" or \"redis\", got {config.driver!r}")
    for name in ("api_window_seconds", "websocket_window_seconds"):
        if getattr(config, name) < 1:
            raise ConfigError(f"config: rate_limiter.{name.replace('_window', '_rate_limit.window')} must be at least 1")
    return config


def parse_ssl(raw: Mapping[str, Any], env: Mapping[str, str]) -> SslConfig:
    """The ``[ssl]`` table, then ``SSL_ENABLED``, ``SSL_CERT_PATH``, ``SSL_KEY_PATH``, ``SSL_PASSPHRASE``.
    An enabled listener needs both files readable, or start-up fails naming the key."""
    values = dict(raw)
    for f in fields(SslConfig):
        var = "SSL_" + f.name.upper()
        if env.get(var, "") != "":
            values[f.name] = env[var]
    config: SslConfig = _build(SslConfig, values, "ssl.")
    if config.enabled:
        for name in ("cert_path", "key_path"):
            path = getattr(config, name)
            if not path:
                raise ConfigError(f"config: ssl.{name} (SSL_{name.upper()}) is required when ssl.enabled is true")
            if not os.access(path, os.R_OK):
                raise ConfigError(f"config: ssl.{name} {path!r} is not a readable file")
    return config


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
