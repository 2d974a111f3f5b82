"""The one factory for the process's Redis clients (standalone, Sentinel, Redis Cluster, TLS).

A server process shares **one** client (one connection pool, or one pool per cluster node) among
the subsystems that talk to the adapter's Redis: the adapter, history and idempotency stores,
cache channels. The RQ queues (webhooks, push) and the state their workers share use the
**queue** client: ``QUEUE_REDIS_URL`` when set, else the same client as everything else (one
Redis, as before); with ``adapter.driver = "redis-cluster"`` it is the standalone or Sentinel
Redis, because RQ cannot run on a cluster. The per-request rate-limit check gets a pool of its
own, with short socket timeouts, so that a hung Redis cannot hold an HTTP request (it falls back
to per-process counting instead).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from sockudo.config import Config
from sockudo.config.coerce import node_address
from sockudo.config.loader import queue_redis_configured

#: The driver whose shared client is a ``RedisCluster``.
CLUSTER_DRIVER = "redis-cluster"

#: Socket timeouts of the rate-limit client (seconds).
FAST_TIMEOUT_S = 0.5


def make_client(config: Config, url: str | None = None, **options: Any) -> redis.Redis:
    """A redis-py client for ``url``, else ``REDIS_URL`` (``redis://``, ``rediss://`` for TLS) or
    Sentinel."""
    options.setdefault("socket_connect_timeout", 2.0)
    options.setdefault("socket_timeout", 5.0)
    options.setdefault("socket_keepalive", True)
    if url is None and config.redis_sentinels:
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
    url = url or config.redis_url
    assert url is not None
    # A burst of subscribes must wait for a pooled connection, not fail with "Too many
    # connections" (redis-py's default pool refuses the 101st) and mark Redis unreachable.
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=200, timeout=5, **options)
    return redis.Redis(connection_pool=pool)


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a Redis Cluster client: the stores then put a hash tag in their keys so
    that every script and multi-key command touches one slot (one Redis or Sentinel: keys unchanged)."""
    return isinstance(client, RedisCluster)


def make_cluster_client(config: Config, **options: Any) -> RedisCluster:
    """A ``RedisCluster`` client seeded with ``REDIS_CLUSTER_NODES``; it learns the slot map from
    them and follows MOVED/ASK redirections and failovers itself."""
    options.setdefault("socket_connect_timeout", 2.0)
    options.setdefault("socket_timeout", 5.0)
    options.setdefault("socket_keepalive", True)
    nodes = []
    tls = config.redis_tls
    for entry in config.redis_cluster_nodes:
        host, port, node_tls = node_address("database.redis.cluster_nodes", entry)
        nodes.append(ClusterNode(host, port))
        tls = tls or node_tls
    if config.redis_password:
        options["password"] = config.redis_password
    if tls:
        options["ssl"] = True
    # One pool per node. A gevent burst (many greenlets publishing at once) must not hit redis-py's
    # "Too many connections": the cap is high, and idle connections are reused.
    # redis-py retries a command 3 times (backoff with jitter) across MOVED, ASK and a failover.
    return RedisCluster(startup_nodes=nodes, max_connections=1000, require_full_coverage=True, **options)


class RedisClients:
    """The process's clients, each built on first use and then shared."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._shared: redis.Redis | RedisCluster | None = None
        self._fast: redis.Redis | RedisCluster | None = None
        self._queue: redis.Redis | None = None

    @property
    def cluster(self) -> bool:
        return self.config.adapter_driver == CLUSTER_DRIVER

    @property
    def shared(self) -> Any:
        """The client of the adapter and the stores (one pool): a ``RedisCluster`` with
        ``adapter.driver = "redis-cluster"``, else a ``redis.Redis``. (Typed ``Any``: the two
        clients have the same command methods but no common base class.)"""
        if self._shared is None:
            self._shared = make_cluster_client(self.config) if self.cluster else make_client(self.config)
        return self._shared

    @property
    def fast(self) -> Any:
        """Short timeouts, for checks that must not hold a request (per-IP rate limits)."""
        if self._fast is None:
            timeouts: dict[str, Any] = {"socket_timeout": FAST_TIMEOUT_S, "socket_connect_timeout": FAST_TIMEOUT_S}
            self._fast = (make_cluster_client(self.config, **timeouts) if self.cluster
                          else make_client(self.config, **timeouts))
        return self._fast

    @property
    def queue(self) -> redis.Redis:
        """The Redis of the RQ queues and the state webhook and push workers share with the server:
        ``QUEUE_REDIS_URL``, else the shared client (one Redis), or on a cluster the standalone or
        Sentinel Redis. Check :func:`queue_configured` first."""
        if self._queue is None:
            if self.config.queue_redis_url:
                self._queue = make_client(self.config, url=self.config.queue_redis_url)
            elif not self.cluster:
                self._queue = self.shared
            elif queue_configured(self.config):
                self._queue = make_client(self.config)
            else:
                raise RuntimeError("no Redis for the queues: set QUEUE_REDIS_URL (database.redis.queue_url)")
        return self._queue


def queue_configured(config: Config) -> bool:
    """Whether the RQ queues have a Redis (``QUEUE_REDIS_URL``, ``REDIS_URL`` or sentinels)."""
    return queue_redis_configured(config)
