"""One event to several channels is published to all of them or to none (nothing
half-written, across channels): every channel is numbered and stored in one store call before
anything is delivered — with the in-memory store and with a real Redis that refuses writes. On a
Redis Cluster that holds per hash slot: one script per slot, in slot order."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from sockudo import rest
from sockudo.config import HistoryConfig, RecoveryConfig
from sockudo.core.errors import ApiError
from sockudo.core.keys import tag
from sockudo.history.store import MemorySequencer, RedisSequencer, SequencerUnavailable
from tests.support.fakes import World, make_app
from tests.support.procs import RedisServer
from tests.support.rediscluster import RedisClusterServer

ON = {"connection_recovery": RecoveryConfig(enabled=True), "history": HistoryConfig(enabled=True)}


def test_a_store_failure_on_any_channel_delivers_to_none() -> None:
    class FailsOnB(MemorySequencer):
        def next(self, app: Any, channel: str, *args: Any) -> Any:
            if channel == "b":
                raise SequencerUnavailable("out of memory")
            return super().next(app, channel, *args)

    w = World(make_app(**ON))
    store = FailsOnB(w.clock)
    w.services.sequencer = w.services.publisher.sequencer = w.services.recovery.sequencer = store
    listeners = {}
    for channel in ("a", "b", "c"):
        listeners[channel] = w.connect()
        listeners[channel].subscribe(channel)
        listeners[channel].take()
    with pytest.raises(ApiError) as info:
        rest.trigger(w.services, w.app, {"name": "ev", "channels": ["a", "b", "c"], "data": "x"})
    assert info.value.status == 503
    for channel, client in listeners.items():
        assert client.take() == [], channel  # not even "a", numbered before "b" failed


def test_redis_numbers_and_stores_every_channel_in_one_call(store_redis: Any) -> None:
    seq = RedisSequencer(store_redis, prefix="atomic-ok:")
    app = make_app(**ON)
    out = seq.next_many(app, [("a", "m1", "ev", {"n": 1}, None), ("b", "m1", "ev", {"n": 1}, "u7")])
    assert [serial for _, serial, _ in out] == [1, 1]
    assert out[0][0] != out[1][0]  # each channel its own stream
    assert [m.message_id for m in seq.read(app, "a", None, None, False, 10)] == ["m1"]
    assert [m.user_id for m in seq.read(app, "b", None, None, False, 10)] == ["u7"]
    assert seq.next(app, "b", "m2", "ev", {}, None)[1] == 2  # next() is next_many of one


def test_redis_out_of_memory_writes_no_channel() -> None:
    full = RedisServer(extra_args=["--maxmemory-policy", "noeviction"]).start()
    try:
        client = redis.Redis(port=full.port)
        seq = RedisSequencer(client, prefix="atomic-oom:")
        app = make_app(**ON)
        seq.next_many(app, [("a", "m0", "ev", "warm", None)])
        # Far below what it uses: every write is refused (a limit just at the edge would let
        # writes through whenever a freed buffer brings usage back under it).
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) // 2)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("ballast", "x")
        with pytest.raises(SequencerUnavailable):
            seq.next_many(app, [("a", "m1", "ev", "x", None), ("b", "m1", "ev", "x", None)])
        assert client.hget(f"atomic-oom:app:{app.id}:stream:a", "serial") == b"1"  # "a" untouched
        assert not client.exists(f"atomic-oom:app:{app.id}:stream:b")
        assert client.xlen(f"atomic-oom:app:{app.id}:history:a") == 1
    finally:
        full.stop()


def test_one_redis_keeps_the_key_layout_of_before_the_cluster(store_redis: Any) -> None:
    """Upgrading keeps history: on one Redis the keys are byte for byte as before; on a cluster both
    keys of a channel start with its hash tag, so they share a slot."""
    app = make_app(**ON)
    RedisSequencer(store_redis, prefix="sockudo:").next(app, "news", "m1", "ev", {}, None)
    if isinstance(store_redis, RedisCluster):
        found = store_redis.keys("*", target_nodes=RedisCluster.PRIMARIES)
        keys = sorted(k.decode() if isinstance(k, bytes) else k for k in found)
        t = tag(app.id, "news")
        assert keys == [f"sockudo:{t}app:{app.id}:history:news", f"sockudo:{t}app:{app.id}:stream:news"]
        assert len({key_slot(k.encode()) for k in keys}) == 1
    else:
        keys = sorted(k.decode() for k in store_redis.keys("*"))
        assert keys == [f"sockudo:app:{app.id}:history:news", f"sockudo:app:{app.id}:stream:news"]


def test_a_cluster_numbers_channels_of_every_slot(flushed_cluster: RedisClusterServer) -> None:
    """Channels whose keys live on all three masters: one script per slot, each channel numbered
    and stored, the answers in the order of the request."""
    client = flushed_cluster.client()
    seq = RedisSequencer(client)
    app = make_app(**ON)
    channels = [f"ch-{i}" for i in range(12)]
    masters = {flushed_cluster.master_for_key(seq._keys(app.id, c)[0]).port for c in channels}
    assert len(masters) == 3  # the event really spans the shards
    out = seq.next_many(app, [(c, "m1", "ev", {"c": c}, None) for c in channels])
    assert [serial for _, serial, _ in out] == [1] * 12
    out = seq.next_many(app, [(c, "m2", "ev", {"c": c}, None) for c in reversed(channels)])
    assert [serial for _, serial, _ in out] == [2] * 12
    for c in channels:
        assert [m.data for m in seq.read(app, c, None, None, False, 10)] == [{"c": c}, {"c": c}]


def test_a_cluster_publish_is_all_or_none_per_slot(flushed_cluster: RedisClusterServer) -> None:
    """A slot that refuses the write fails the publish; the slots before it (in slot order) are
    numbered, the slots after it are not touched."""
    client = flushed_cluster.client()
    seq = RedisSequencer(client)
    app = make_app(**ON)
    by_slot = sorted((key_slot(seq._keys(app.id, c)[0].encode()), c) for c in (f"s-{i}" for i in range(40)))
    masters = [flushed_cluster.master_for_key(seq._keys(app.id, c)[0]) for _, c in by_slot]
    first, victim = masters[0], next(m for m in masters if m is not masters[0])
    before = [c for (_, c), m in zip(by_slot, masters, strict=True) if m is first][:2]
    failing = [c for (_, c), m in zip(by_slot, masters, strict=True) if m is victim][:2]
    seq.next_many(app, [(c, "m0", "ev", {}, None) for c in failing + before])  # streams exist: serial 1
    with victim.client() as direct:
        direct.config_set("maxmemory-policy", "noeviction")
        direct.config_set("maxmemory", 1)  # every write on this master is refused
        try:
            with pytest.raises(SequencerUnavailable):
                seq.next_many(app, [(c, "m1", "ev", {}, None) for c in failing + before])
        finally:
            direct.config_set("maxmemory", 0)
    assert [seq.position(app.id, c)[1] for c in before] == [2, 2]  # type: ignore[index]  # earlier slots
    assert [seq.position(app.id, c)[1] for c in failing] == [1, 1]  # type: ignore[index]  # refused whole
