"""The Redis Cluster harness itself: a real cluster whose slots are all served, where a
``RedisCluster`` client reaches every shard and sharded pub/sub round-trips."""

from __future__ import annotations

import pytest

from tests.support.procs import wait_until
from tests.support.rediscluster import RedisClusterServer


def test_keys_land_on_every_master(flushed_cluster: RedisClusterServer) -> None:
    client = flushed_cluster.client()
    owners = set()
    for i in range(60):
        key = f"harness:{i}"
        client.set(key, str(i))
        owners.add(flushed_cluster.master_for_key(key).port)
    assert len(owners) == 3
    assert [client.get(f"harness:{i}") for i in range(60)] == [str(i).encode() for i in range(60)]
    client.close()


def test_sharded_pubsub_round_trip(redis_cluster: RedisClusterServer) -> None:
    client = redis_cluster.client()
    pubsub = client.pubsub()
    pubsub.ssubscribe("harness-shard-channel")
    try:
        confirm = wait_until(lambda: pubsub.get_sharded_message(timeout=0.2), timeout=5,
                             message="the SSUBSCRIBE confirmation")
        assert confirm["type"] == "ssubscribe"
        assert client.spublish("harness-shard-channel", "hello") == 1
        message = wait_until(lambda: pubsub.get_sharded_message(timeout=0.2), timeout=5, message="the message")
        assert (message["type"], message["data"]) == ("smessage", b"hello")
    finally:
        pubsub.close()
        client.close()


@pytest.mark.slow
def test_failover_promotes_a_replica(redis_cluster_ha: RedisClusterServer) -> None:
    cluster = redis_cluster_ha
    client = cluster.client()
    client.set("failover-key", "kept")
    client.wait(1, 2000)  # the replica has it before its master dies
    old = cluster.kill_master(key="failover-key")
    new = cluster.wait_failover(old)
    assert new is not old and new.role() == "master"
    assert cluster.master_for_key("failover-key") is new
    assert wait_until(lambda: client.get("failover-key"), timeout=10) == b"kept"
    client.close()


@pytest.mark.slow
def test_paused_master_is_replaced(redis_cluster_ha: RedisClusterServer) -> None:
    cluster = redis_cluster_ha
    old = cluster.pause_master()
    new = cluster.wait_failover(old)
    assert new.role() == "master"
    old.resume()
    cluster.wait_ok()
