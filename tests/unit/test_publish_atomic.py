"""One event to several channels is published to all of them or to none (nothing
half-written, across channels): every channel is numbered and stored in one store call before
anything is delivered — with the in-memory store and with a real Redis that refuses writes."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from sockudo import rest
from sockudo.config import HistoryConfig, RecoveryConfig
from sockudo.core.errors import ApiError
from sockudo.history.store import MemorySequencer, RedisSequencer, SequencerUnavailable
from tests.support.fakes import World, make_app
from tests.support.procs import RedisServer

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


def test_redis_numbers_and_stores_every_channel_in_one_call(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    seq = RedisSequencer(client, prefix="atomic-ok:")
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
