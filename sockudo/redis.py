"""The one factory for the process's Redis clients (standalone, Sentinel, TLS).

A server process shares **one** client (one connection pool) among every subsystem that talks
to Redis: the adapter, history and idempotency stores, cache channels, the webhook queue and
push. Only the per-request rate-limit check gets a second pool, with short socket timeouts, so
that a hung Redis cannot hold an HTTP request (it falls back to per-process counting instead).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.sentinel import Sentinel

from sockudo.config import Config

#: Socket timeouts of the rate-limit client (seconds).
FAST_TIMEOUT_S = 0.5


def make_client(config: Config, **options: Any) -> redis.Redis:
    """A redis-py client for ``REDIS_URL`` (``redis://``, ``rediss://`` for TLS) or Sentinel."""
    options.setdefault("socket_connect_timeout", 2.0)
    options.setdefault("socket_timeout", 5.0)
    options.setdefault("socket_keepalive", True)
    if config.redis_sentinels:
        addresses = []
        for entry in config.redis_sentinels:
            host, _, port = entry.rpartition(":")
            addresses.append((host, int(port)))
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
        if config.redis_sentinel_password:
            sentinel_kwargs["password"] = config.redis_sentinel_password
        master = dict(options, db=config.redis_db)
        if config.redis_password:
            master["password"] = config.redis_password
        if config.redis_tls:
            master["ssl"] = True
        sentinel = Sentinel(addresses, sentinel_kwargs=sentinel_kwargs, **master)
        client: redis.Redis = sentinel.master_for(config.redis_sentinel_master, max_connections=1000, **master)
        return client
    assert config.redis_url is not None
    # A burst of subscribes must wait for a pooled connection, not fail with "Too many
    # connections" (redis-py's default pool refuses the 101st) and mark Redis unreachable.
    pool = redis.BlockingConnectionPool.from_url(config.redis_url, max_connections=200, timeout=5, **options)
    return redis.Redis(connection_pool=pool)


def redis_configured(config: Config) -> bool:
    return bool(config.redis_url or config.redis_sentinels)


class RedisClients:
    """The process's clients, each built on first use and then shared."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._shared: redis.Redis | None = None
        self._fast: redis.Redis | None = None

    @property
    def shared(self) -> redis.Redis:
        """The client every subsystem uses (one pool)."""
        if self._shared is None:
            self._shared = make_client(self.config)
        return self._shared

    @property
    def fast(self) -> redis.Redis:
        """Short timeouts, for checks that must not hold a request (per-IP rate limits)."""
        if self._fast is None:
            self._fast = make_client(self.config, socket_timeout=FAST_TIMEOUT_S,
                                     socket_connect_timeout=FAST_TIMEOUT_S)
        return self._fast
