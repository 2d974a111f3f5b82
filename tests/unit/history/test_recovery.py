"""The replay buffer (hot tier) and resume decisions, cold tier included.

Messages go through the real single publish path (``Publisher``) of a ``World``; resumes are
decided by its ``RecoveryService``. A fake clock drives TTLs; no sockets, no greenlets.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from sockudo.config import AppConfig, HistoryConfig, RecoveryConfig
from sockudo.history.recovery import (
    CONTINUITY_UNVERIFIABLE,
    PERSISTENCE_UNAVAILABLE,
    POSITION_EXPIRED,
    STREAM_RESET,
    BufferedMessage,
    ReplayBuffers,
    ResumeOutcome,
)
from sockudo.history.store import MemorySequencer, RedisSequencer, SequencerUnavailable
from tests.support.fakes import START, World, make_app
from tests.support.rediscluster import STORE_BACKENDS, store_client

CH = "orders"


def recovery_app(*, buffer: int = 100, ttl: int = 120, history: bool = False, keep: int = 1000,
                 retention: int = 86400, **kw: Any) -> AppConfig:
    return make_app(
        connection_recovery=RecoveryConfig(enabled=True, max_buffer_size=buffer, buffer_ttl_seconds=ttl),
        history=HistoryConfig(enabled=history, max_messages_per_channel=keep, retention_window_seconds=retention),
        **kw,
    )


def publish(w: World, n: int, channel: str = CH, start: int = 1) -> None:
    for i in range(start, start + n):
        w.services.publisher.publish(w.app, channel, "tick", json.dumps({"i": i}))


def position(w: World, channel: str = CH) -> tuple[str, int]:
    pos = w.services.sequencer.position(w.app.id, channel)  # type: ignore[union-attr]
    assert pos is not None
    return pos


def resume(w: World, stream_id: Any, serial: Any, *, channel: str = CH, legacy: bool = False,
           subscribed: bool = True) -> ResumeOutcome:
    return w.services.recovery.resume(w.app, channel, stream_id, serial, legacy, subscribed)


def serials(outcome: ResumeOutcome) -> list[int]:
    return [json.loads(text)["serial"] for text in outcome.frames]


def failures(w: World, code: str) -> float:
    return w.sample("sockudo_history_recovery_failures_total", code=code)


def use_sequencer(w: World, sequencer: Any) -> None:
    """Swap the store behind the publisher and the recovery service."""
    w.services.sequencer = sequencer
    w.services.publisher.sequencer = sequencer
    w.services.recovery.sequencer = sequencer


class BrokenSequencer(MemorySequencer):
    """A store that fails the way Redis does when it is down, on the calls listed."""

    def __init__(self, clock: Any, failing: set[str]) -> None:
        super().__init__(clock)
        self.failing = failing

    def position(self, app_id: str, channel: str) -> tuple[str, int] | None:
        if "position" in self.failing:
            raise SequencerUnavailable("connection refused")
        return super().position(app_id, channel)

    def read(self, *args: Any, **kw: Any) -> Any:
        if "read" in self.failing:
            raise SequencerUnavailable("connection refused")
        return super().read(*args, **kw)


# -- ReplayBuffers ------------------------------------------------------------------------------


def _msg(serial: int, ms: int = 1000) -> BufferedMessage:
    return BufferedMessage(serial, ms, f'{{"serial":{serial}}}', f"m{serial}")


def _serials(buffers: ReplayBuffers, app_id: str = "a", channel: str = CH) -> list[int]:
    return [m.serial for m in buffers.channels[(app_id, channel)].entries]


def test_buffer_appends_in_order_and_evicts_by_size() -> None:
    cfg = RecoveryConfig(enabled=True, max_buffer_size=3)
    buffers = ReplayBuffers()
    for serial in range(1, 6):
        buffers.append("a", CH, _msg(serial), "s1", cfg, 1000)
    assert _serials(buffers) == [3, 4, 5]
    assert buffers.position("a", CH) == ("s1", 5)
    assert buffers.size() == 3
    assert buffers.pressure["a"].full_evictions == 2


def test_only_full_buffers_count_as_pressure() -> None:
    cfg = RecoveryConfig(enabled=True, max_buffer_size=4, buffer_ttl_seconds=10)
    buffers = ReplayBuffers()
    buffers.append("a", CH, _msg(1, ms=0), "s1", cfg, 0)
    buffers.append("a", CH, _msg(2, ms=0), "s1", cfg, 0)
    buffers.append("a", CH, _msg(3, ms=11_000), "s1", cfg, 11_000)  # 1 and 2 age out
    buffers.append("a", CH, _msg(5, ms=11_000), "s1", cfg, 11_000)  # a gap restarts the buffer
    buffers.append("a", CH, _msg(1, ms=11_000), "s2", cfg, 11_000)  # a new stream replaces it
    assert buffers.pressure["a"].full_evictions == 0
    buffers.sweep({"a": cfg}, 11_000)
    assert buffers.pressure["a"].max_fill_ratio == 0.25


def test_pressure_is_exported_per_app_through_the_publish_path() -> None:
    busy = recovery_app(buffer=10)
    calm = recovery_app(buffer=10, id="app-2", key="key-2")
    w = World(busy, calm)
    publish(w, 25)  # 15 dropped from a full buffer
    publish(w, 3, channel="quiet")
    w.services.publisher.publish(calm, CH, "tick", "{}")
    assert w.sample("sockudo_replay_buffer_full_evictions_total") == 15
    assert w.sample("sockudo_replay_buffer_full_evictions_total", app_id="app-2") == 0
    cfgs = {a.id: a.connection_recovery for a in (busy, calm)}
    w.services.buffers.sweep(cfgs, int(w.clock() * 1000))
    assert w.sample("sockudo_replay_buffer_max_fill_ratio") == 1.0  # the fullest of the app's buffers
    assert w.sample("sockudo_replay_buffer_max_fill_ratio", app_id="app-2") == 0.1
    # A gone app stops being exported (bounded series).
    w.services.buffers.sweep({busy.id: busy.connection_recovery}, int(w.clock() * 1000))
    assert w.registry.get_sample_value("sockudo_replay_buffer_max_fill_ratio",
                                       {"app_id": "app-2", "port": "9601"}) is None


def test_buffer_evicts_by_ttl_on_append_and_on_sweep() -> None:
    cfg = RecoveryConfig(enabled=True, max_buffer_size=100, buffer_ttl_seconds=10)
    buffers = ReplayBuffers()
    buffers.append("a", CH, _msg(1, ms=0), "s1", cfg, 0)
    buffers.append("a", CH, _msg(2, ms=5_000), "s1", cfg, 5_000)
    buffers.append("a", CH, _msg(3, ms=10_500), "s1", cfg, 10_500)  # serial 1 is now 10.5 s old
    assert _serials(buffers) == [2, 3]
    buffers.sweep({"a": cfg}, 20_600)  # everything older than 10.6 s goes, and the empty buffer with it
    assert buffers.channels == {}


def test_sweep_drops_buffers_of_apps_that_are_gone() -> None:
    cfg = RecoveryConfig(enabled=True)
    buffers = ReplayBuffers()
    buffers.append("gone", CH, _msg(1), "s1", cfg, 1000)
    buffers.append("a", CH, _msg(1), "s1", cfg, 1000)
    buffers.sweep({"a": cfg}, 1000)
    assert list(buffers.channels) == [("a", CH)]


def test_buffer_ignores_a_repeated_serial_and_restarts_on_a_gap_or_new_stream() -> None:
    cfg = RecoveryConfig(enabled=True)
    buffers = ReplayBuffers()
    for serial in (1, 2, 3):
        buffers.append("a", CH, _msg(serial), "s1", cfg, 1000)
    buffers.append("a", CH, _msg(2), "s1", cfg, 1000)  # our own publish echoed back
    assert _serials(buffers) == [1, 2, 3]
    buffers.append("a", CH, _msg(5), "s1", cfg, 1000)  # serial 4 never arrived: continuity restarts
    assert _serials(buffers) == [5]
    buffers.append("a", CH, _msg(1), "s2", cfg, 1000)  # a reset stream replaces the buffer
    assert buffers.position("a", CH) == ("s2", 1)


# -- hot tier -----------------------------------------------------------------------------------


def test_hot_tier_replays_exactly_the_missed_frames() -> None:
    w = World(recovery_app())
    publish(w, 5)
    stream_id, newest = position(w)
    assert newest == 5
    outcome = resume(w, stream_id, 2)
    assert outcome.failure is None
    assert serials(outcome) == [3, 4, 5]
    assert [json.loads(t)["data"] for t in outcome.frames] == [json.dumps({"i": i}) for i in (3, 4, 5)]
    last = json.loads(outcome.frames[-1])
    assert outcome.recovered == {
        "channel": CH, "source": "hot", "replayed": 3,
        "position": {"stream_id": stream_id, "serial": 5, "last_message_id": last["message_id"]},
    }
    assert w.sample("sockudo_history_recovery_success_total", source="hot") == 1
    assert w.sample("sockudo_recovery_replayed_messages_total", source="hot") == 3


def test_up_to_date_position_is_recovered_with_nothing_to_replay() -> None:
    w = World(recovery_app())
    publish(w, 3)
    stream_id, _ = position(w)
    outcome = resume(w, stream_id, 3)
    assert outcome.failure is None and outcome.frames == []
    assert outcome.recovered["replayed"] == 0
    assert outcome.recovered["position"]["serial"] == 3


def test_idle_channel_position_from_the_subscribe_ack_is_recovered() -> None:
    w = World(recovery_app())
    stream_id, serial = w.services.sequencer.ensure(w.app, CH)  # type: ignore[union-attr]
    assert serial == 0
    publish(w, 2)
    outcome = resume(w, stream_id, 0)
    assert serials(outcome) == [1, 2]


def test_legacy_serial_uses_the_hot_tier() -> None:
    w = World(recovery_app())
    publish(w, 4)
    outcome = resume(w, None, 1, legacy=True)
    assert outcome.failure is None
    assert serials(outcome) == [2, 3, 4]


# -- failures -------------------------------------------------------------------------------


def test_other_stream_id_is_stream_reset() -> None:
    w = World(recovery_app())
    publish(w, 3)
    stream_id, _ = position(w)
    outcome = resume(w, "not-" + stream_id, 1)
    assert outcome.frames == []
    assert outcome.failure is not None
    assert outcome.failure["code"] == STREAM_RESET
    assert outcome.failure["expected_stream_id"] == "not-" + stream_id
    assert outcome.failure["current_stream_id"] == stream_id
    assert failures(w, STREAM_RESET) == 1


def test_reset_channel_is_stream_reset() -> None:
    w = World(recovery_app(history=True))
    publish(w, 3)
    old_stream, _ = position(w)
    w.services.sequencer.reset(w.app, CH)  # type: ignore[union-attr]
    w.services.buffers.channels.pop((w.app.id, CH), None)
    publish(w, 1)
    outcome = resume(w, old_stream, 3)
    assert outcome.failure is not None and outcome.failure["code"] == STREAM_RESET


def test_gap_larger_than_the_buffer_without_history_is_position_expired() -> None:
    w = World(recovery_app(buffer=5))
    publish(w, 12)
    stream_id, _ = position(w)
    outcome = resume(w, stream_id, 3)
    assert outcome.failure is not None
    assert outcome.failure["code"] == POSITION_EXPIRED
    assert (outcome.failure["oldest_available_serial"], outcome.failure["newest_available_serial"]) == (8, 12)
    assert failures(w, POSITION_EXPIRED) == 1
    # The buffer could not serve it: a miss, although there is no history to try next.
    assert w.sample("sockudo_recovery_buffer_misses_total") == 1


def test_frames_older_than_the_ttl_are_position_expired() -> None:
    w = World(recovery_app(ttl=30))
    publish(w, 3)
    stream_id, _ = position(w)
    w.clock.advance(31)
    outcome = resume(w, stream_id, 1)
    assert outcome.failure is not None and outcome.failure["code"] == POSITION_EXPIRED
    assert w.sample("sockudo_recovery_buffer_misses_total") == 1


def test_only_positions_the_buffer_cannot_serve_count_as_misses() -> None:
    w = World(recovery_app(buffer=5))
    publish(w, 8)
    stream_id, _ = position(w)
    assert resume(w, stream_id, 6).failure is None  # served by the buffer
    assert resume(w, stream_id, 8).failure is None  # up to date
    assert resume(w, "other", 6).failure["code"] == STREAM_RESET  # type: ignore[index]
    assert resume(w, stream_id, 99).failure["code"] == CONTINUITY_UNVERIFIABLE  # type: ignore[index]
    assert w.sample("sockudo_recovery_buffer_misses_total") == 0
    assert resume(w, None, 1, legacy=True).failure["code"] == CONTINUITY_UNVERIFIABLE  # type: ignore[index]
    assert w.sample("sockudo_recovery_buffer_misses_total") == 1  # a legacy serial the buffer lost


def test_a_buffer_left_from_a_lost_stream_reports_no_range() -> None:
    """The store lost the channel (Redis key gone) and started a new stream: this node's
    buffer still holds the old stream's frames, which say nothing about the new one."""
    w = World(recovery_app(buffer=5))
    publish(w, 12)
    old_stream, _ = position(w)
    sequencer = w.services.sequencer
    assert sequencer is not None
    sequencer.reset(w.app, CH)  # the buffer is kept
    new_stream, _ = sequencer.ensure(w.app, CH)
    outcome = resume(w, old_stream, 3)
    assert outcome.failure is not None and outcome.failure["code"] == STREAM_RESET
    assert outcome.failure["current_stream_id"] == new_stream
    assert (outcome.failure["oldest_available_serial"], outcome.failure["newest_available_serial"]) == (None, 0)


def test_client_ahead_of_the_channel_is_continuity_unverifiable() -> None:
    w = World(recovery_app())
    publish(w, 3)
    stream_id, _ = position(w)
    outcome = resume(w, stream_id, 9)
    assert outcome.failure is not None
    assert outcome.failure["code"] == CONTINUITY_UNVERIFIABLE
    assert outcome.failure["newest_available_serial"] == 3


def test_legacy_serial_for_an_unknown_channel_is_continuity_unverifiable() -> None:
    w = World(recovery_app())
    outcome = resume(w, None, 4, legacy=True)
    assert outcome.failure is not None and outcome.failure["code"] == CONTINUITY_UNVERIFIABLE


def test_legacy_serial_outside_the_buffer_is_continuity_unverifiable_even_with_history() -> None:
    """A position without a stream id cannot be verified against history."""
    w = World(recovery_app(buffer=3, history=True))
    publish(w, 10)
    outcome = resume(w, None, 2, legacy=True)
    assert outcome.failure is not None and outcome.failure["code"] == CONTINUITY_UNVERIFIABLE
    assert outcome.failure["expected_stream_id"] is None  # the client named none
    assert outcome.frames == []


def test_unsubscribed_channel_is_continuity_unverifiable() -> None:
    w = World(recovery_app())
    publish(w, 3)
    stream_id, _ = position(w)
    outcome = resume(w, stream_id, 1, subscribed=False)
    assert outcome.failure is not None and outcome.failure["code"] == CONTINUITY_UNVERIFIABLE
    assert outcome.frames == []


@pytest.mark.parametrize("serial", [-1, "3", 2.5, True, None])
def test_serial_that_is_not_a_whole_number_is_continuity_unverifiable(serial: Any) -> None:
    w = World(recovery_app())
    publish(w, 3)
    stream_id, _ = position(w)
    outcome = resume(w, stream_id, serial)
    assert outcome.failure is not None and outcome.failure["code"] == CONTINUITY_UNVERIFIABLE


def test_store_down_is_persistence_unavailable() -> None:
    w = World(recovery_app())
    publish(w, 3)
    stream_id, _ = position(w)
    broken = BrokenSequencer(w.clock, {"position"})
    broken.channels = w.services.sequencer.channels  # type: ignore[union-attr]
    use_sequencer(w, broken)
    outcome = resume(w, stream_id, 1)
    assert outcome.failure is not None and outcome.failure["code"] == PERSISTENCE_UNAVAILABLE
    assert failures(w, PERSISTENCE_UNAVAILABLE) == 1


def test_history_down_during_the_cold_tier_is_persistence_unavailable() -> None:
    w = World(recovery_app(buffer=3, history=True))
    broken = BrokenSequencer(w.clock, set())
    use_sequencer(w, broken)
    publish(w, 10)
    stream_id, _ = position(w)
    broken.failing.add("read")
    outcome = resume(w, stream_id, 2)
    assert outcome.failure is not None and outcome.failure["code"] == PERSISTENCE_UNAVAILABLE


# -- cold tier ----------------------------------------------------------------------------------


@pytest.fixture(params=["memory", *STORE_BACKENDS])
def stored(request: pytest.FixtureRequest) -> Any:
    """Puts the world's history in memory, then in a real Redis and a real Redis Cluster."""
    def into(w: World) -> World:
        if request.param != "memory":
            use_sequencer(w, RedisSequencer(store_client(request, request.param)))
        return w
    return into


def test_gap_larger_than_the_buffer_but_inside_history_is_recovered_cold(stored: Any) -> None:
    w = stored(World(recovery_app(buffer=5, history=True)))
    live = w.connect(protocol=2)
    live.subscribe(CH)
    live.take()
    publish(w, 20)
    live_frames = live.transport.sent[-20:]
    stream_id, _ = position(w)
    outcome = resume(w, stream_id, 3)
    assert outcome.failure is None
    assert outcome.recovered["source"] == "cold"
    assert serials(outcome) == list(range(4, 21))
    # The replayed frames are the very frames live protocol-2 subscribers got.
    assert outcome.frames == live_frames[3:]
    assert outcome.recovered["position"]["serial"] == 20
    assert outcome.recovered["position"]["last_message_id"] == json.loads(live_frames[-1])["message_id"]
    assert w.sample("sockudo_history_recovery_success_total", source="cold") == 1
    assert w.sample("sockudo_recovery_replayed_messages_total", source="cold") == 17
    assert w.sample("sockudo_recovery_buffer_misses_total") == 1


def test_cold_tier_covers_frames_the_buffer_ttl_dropped() -> None:
    w = World(recovery_app(ttl=10, history=True))
    publish(w, 4)
    w.clock.advance(11)
    publish(w, 2, start=5)
    stream_id, _ = position(w)
    outcome = resume(w, stream_id, 1)
    assert outcome.failure is None and outcome.recovered["source"] == "cold"
    assert serials(outcome) == [2, 3, 4, 5, 6]


def test_gap_beyond_history_is_position_expired_with_the_available_range(stored: Any) -> None:
    w = stored(World(recovery_app(buffer=5, history=True, keep=10)))
    publish(w, 30)
    stream_id, _ = position(w)
    outcome = resume(w, stream_id, 3)
    assert outcome.failure is not None
    assert outcome.failure["code"] == POSITION_EXPIRED
    # History still holds 21..30: that is what the client can backfill.
    assert outcome.failure["oldest_available_serial"] == 21
    assert outcome.failure["newest_available_serial"] == 30
    assert outcome.failure["current_stream_id"] == stream_id


def test_buffer_clock_is_the_publish_time() -> None:
    """Buffered entries carry the publish time from the injected clock."""
    w = World(recovery_app())
    publish(w, 1)
    entry = w.services.buffers.channels[(w.app.id, CH)].entries[0]
    assert entry.published_ms == int(START * 1000)
