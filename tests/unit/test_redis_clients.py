"""sockudo/redis.py: which Redis each client of the process talks to (the adapter's Redis or
cluster, the queue Redis, the fast rate-limit pool), against real servers."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster

from sockudo.config import load_config
from sockudo.redis import RedisClients, queue_configured
from tests.support.procs import RedisServer
from tests.support.rediscluster import RedisClusterServer


def test_one_redis_serves_everything_as_before(redis_server: RedisServer) -> None:
    clients = RedisClients(load_config(None, env={"REDIS_URL": f"{redis_server.url}"}))
    assert isinstance(clients.shared, redis.Redis)
    assert clients.queue is clients.shared  # one pool, as before QUEUE_REDIS_URL existed
    assert clients.fast is not clients.shared and clients.fast.ping()


def test_the_queue_redis_url_is_its_own_redis(redis_server: RedisServer) -> None:
    other = RedisServer().start()
    try:
        env = {"REDIS_URL": redis_server.url, "QUEUE_REDIS_URL": other.url}
        clients = RedisClients(load_config(None, env=env))
        clients.queue.set("which", "queue")
        assert other.port == clients.queue.connection_pool.connection_kwargs["port"]
        assert redis.Redis(port=other.port).get("which") == b"queue"
        assert redis.Redis(port=redis_server.port).get("which") is None
    finally:
        other.stop()


def test_the_cluster_driver_shares_a_cluster_client(redis_cluster: RedisClusterServer,
                                                    redis_server: RedisServer) -> None:
    env = {"REDIS_CLUSTER_NODES": redis_cluster.nodes_env, "REDIS_URL": redis_server.url}
    config = load_config(None, env=env)
    assert config.adapter_driver == "redis-cluster"
    clients = RedisClients(config)
    assert isinstance(clients.shared, RedisCluster) and isinstance(clients.fast, RedisCluster)
    assert {n.port for n in clients.shared.get_primaries()} == {n.port for n in redis_cluster.masters()}
    # RQ cannot run on the cluster: the queues use the standalone Redis of REDIS_URL
    assert isinstance(clients.queue, redis.Redis)
    assert clients.queue.connection_pool.connection_kwargs["port"] == redis_server.port


def test_on_the_cluster_alone_the_queues_have_no_redis(redis_cluster: RedisClusterServer) -> None:
    config = load_config(None, env={"REDIS_CLUSTER_NODES": redis_cluster.nodes_env})
    assert not queue_configured(config)
    with pytest.raises(RuntimeError, match="QUEUE_REDIS_URL"):
        RedisClients(config).queue  # noqa: B018 (the property raises)
    # one seed node is enough: the client learns the others
    one = load_config(None, env={"REDIS_CLUSTER_NODES": redis_cluster.nodes[0].address})
    assert len(RedisClients(one).shared.get_primaries()) == 3


def test_push_uses_the_queue_redis(redis_server: RedisServer) -> None:
    """Push state and jobs are shared with the push workers: they follow QUEUE_REDIS_URL."""
    from sockudo.push.service import build_push

    other = RedisServer().start()
    try:
        config = load_config(None, env={"REDIS_URL": redis_server.url, "QUEUE_REDIS_URL": other.url})
        service = build_push(config)
        assert service is not None
        assert service.store.r.connection_pool.connection_kwargs["port"] == other.port
        assert service.queue.client.connection_pool.connection_kwargs["port"] == other.port
    finally:
        other.stop()
