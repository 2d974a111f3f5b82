"""The one factory for the process's Redis clients (standalone, Sentinel, TLS).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.sentinel import Sentinel

from sockudo.config import Config


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
        return sentinel.master_for(config.redis_sentinel_master, max_connections=1000, **master)
    assert config.redis_url is not None
    # A burst of subscribes must wait for a pooled connection, not fail with "Too many
    # connections" (redis-py's default pool refuses the 101st) and mark Redis unreachable.
    pool = redis.BlockingConnectionPool.from_url(config.redis_url, max_connections=200, timeout=5, **options)
    return redis.Redis(connection_pool=pool)

