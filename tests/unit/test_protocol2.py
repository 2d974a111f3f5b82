"""Protocol 2 through the handler: ``sockudo:`` prefixes and message
metadata for ``?protocol=2`` sockets only, ``sockudo:resume`` and ``sockudo:channel_history``.

A protocol-2 fake socket records each frame's protocol-2 form, as the server's transport does.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from sockudo import rest
from sockudo.config import AppConfig, HistoryConfig, RecoveryConfig
from sockudo.history.store import MemorySequencer, empty_stream_id
from tests.support.fakes import Client, World, data_of, make_app

CH = "orders"
UUID_LEN = 36


def recovery_app(*, history: bool = False, buffer: int = 100, **kw: Any) -> AppConfig:
    return make_app(connection_recovery=RecoveryConfig(enabled=True, max_buffer_size=buffer),
                    history=HistoryConfig(enabled=history), enable_client_messages=True, **kw)


def publish(w: World, *datas: str, channel: str = CH) -> None:
    for data in datas:
        rest.trigger(w.services, w.app, {"name": "update", "channels": [channel], "data": data})


def v2_client(w: World, *channels: str) -> Client:
    c = w.connect(protocol=2)
    for channel in channels:
        c.send({"event": "sockudo:subscribe", "data": {"channel": channel}})
    return c


def ack_of(frames: list[dict[str, Any]], channel: str = CH) -> dict[str, Any]:
    (ack,) = [f for f in frames if f["event"] == "sockudo_internal:subscription_succeeded"
              and f["channel"] == channel]
    return ack


def events(frames: list[dict[str, Any]]) -> list[str]:
    return [f["event"] for f in frames]


def resume_request(positions: dict[str, Any]) -> dict[str, Any]:
    return {"event": "sockudo:resume", "data": {"channel_positions": positions}}


# -- prefixes and metadata --------------------------------------------------------------------------


def test_protocol2_socket_gets_sockudo_prefixes_and_a_message_id() -> None:
    w = World(make_app())
    c = w.connect(protocol=2)
    assert c.established is not None
    assert c.established["event"] == "sockudo:connection_established"
    assert len(c.established["message_id"]) == UUID_LEN
    c.send({"event": "sockudo:ping", "data": {}})
    assert c.take() == [{"event": "sockudo:pong", "data": "{}"}]  # pongs carry no message_id
    c.send({"event": "pusher:subscribe", "data": {"channel": CH}})  # either prefix is accepted
    (ack,) = c.take()
    assert ack["event"] == "sockudo_internal:subscription_succeeded" and ack["channel"] == CH
    c.send({"event": "client-x", "channel": CH, "data": {}})
    (error,) = c.take()
    assert error["event"] == "sockudo:error" and "message_id" in error


def test_without_recovery_or_history_messages_get_a_message_id_but_no_serial() -> None:
    w = World(make_app())
    v2, v7 = v2_client(w, CH), w.connect()
    v7.subscribe(CH)
    v2.take(), v7.take()
    publish(w, "hello")
    (frame2,) = v2.take()
    assert frame2["event"] == "update" and frame2["data"] == "hello" and len(frame2["message_id"]) == UUID_LEN
    assert "serial" not in frame2 and "stream_id" not in frame2
    assert v7.take() == [{"event": "update", "channel": CH, "data": "hello"}]


def test_protocol7_frames_are_unchanged_on_a_recovery_channel() -> None:
    w = World(recovery_app(history=True))
    v2 = v2_client(w, CH)
    v7 = w.connect()
    v7.subscribe(CH)
    v7_ack = v7.take()
    assert v7_ack == [{"event": "pusher_internal:subscription_succeeded", "channel": CH, "data": "{}"}]
    v2.take()
    publish(w, "a", "b")
    assert v7.take() == [{"event": "update", "channel": CH, "data": "a"},
                         {"event": "update", "channel": CH, "data": "b"}]
    frames = v2.take()
    assert [f["serial"] for f in frames] == [1, 2]
    assert len({f["stream_id"] for f in frames}) == 1
    assert len({f["message_id"] for f in frames}) == 2
    assert frames[0] == {"event": "update", "channel": CH, "data": "a", "message_id": frames[0]["message_id"],
                         "stream_id": frames[0]["stream_id"], "serial": 1}


def test_protocol7_presence_and_system_frames_are_unchanged_next_to_a_protocol2_socket() -> None:
    w = World(recovery_app())
    v7 = w.connect()
    v7.subscribe("presence-room", user_id="u7")
    v7.take()
    v2 = w.connect(protocol=2)
    v2.subscribe("presence-room", user_id="u2")
    (added,) = v7.take()
    assert added == {"event": "pusher_internal:member_added", "channel": "presence-room",
                     "data": '{"user_id":"u2","user_info":{}}'}
    v7.close()
    frames = v2.take()
    assert events(frames)[-1] == "sockudo_internal:member_removed"


def test_client_events_reach_protocol2_sockets_with_a_serial_and_protocol7_unchanged() -> None:
    w = World(recovery_app())
    v2 = w.connect(protocol=2)
    v2.subscribe("private-chat")
    v7 = w.connect()
    v7.subscribe("private-chat")
    v2.take(), v7.take()
    v7.send({"event": "client-typing", "channel": "private-chat", "data": {"who": "me"}})
    (frame,) = v2.take()
    assert frame["event"] == "client-typing" and frame["serial"] == 1 and frame["data"] == {"who": "me"}
    v2.send({"event": "client-typing", "channel": "private-chat", "data": {"who": "you"}})
    assert v7.take() == [{"event": "client-typing", "channel": "private-chat", "data": {"who": "you"}}]


def test_subscribe_ack_carries_the_position_and_the_attach_serial() -> None:
    w = World(recovery_app(history=True))
    c = v2_client(w, CH)
    ack = ack_of(c.take())
    # No message yet: the channel's empty position, and no state kept for it.
    assert ack["serial"] == 0 and ack["stream_id"] == empty_stream_id(c.app.id, CH)
    assert data_of(ack) == {"attach_serial": 0}
    assert w.services.sequencer.position(c.app.id, CH) is None  # type: ignore[union-attr]
    publish(w, "a", "b", "c")
    stream_id = c.take()[-1]["stream_id"]
    assert len(stream_id) == UUID_LEN and stream_id != ack["stream_id"]
    late = v2_client(w, CH)
    ack2 = ack_of(late.take())
    assert (ack2["stream_id"], ack2["serial"]) == (stream_id, 3)
    assert data_of(ack2) == {"attach_serial": 3}


def test_subscribing_to_channels_nobody_publishes_to_leaves_no_state() -> None:
    """Unique names subscribed and left: nothing per name in the store or on the socket."""
    w = World(recovery_app(history=True))
    c = v2_client(w, CH)
    for i in range(50):
        c.send({"event": "sockudo:subscribe", "data": {"channel": f"idle-{i}"}})
        c.send({"event": "sockudo:unsubscribe", "data": {"channel": f"idle-{i}"}})
    assert len(events(c.take())) == 51  # the first ack, then one per name
    assert w.services.sequencer.channels == {}  # type: ignore[union-attr]
    assert list(c.conn.attach_serials or {}) == [CH]


def test_a_position_from_before_the_first_message_resumes_the_whole_stream() -> None:
    w = World(recovery_app())
    c = v2_client(w, CH)
    ack = ack_of(c.take())
    publish(w, "1", "2")
    c.take()
    c.send(resume_request({CH: {"stream_id": ack["stream_id"], "serial": 0}}))
    frames = c.take()
    assert [(f["serial"], f["data"]) for f in frames if f["event"] == "update"] == [(1, "1"), (2, "2")]
    assert data_of(frames[-1])["failed"] == []
    # The empty position with a serial was never given out: it cannot be verified.
    c.send(resume_request({CH: {"stream_id": ack["stream_id"], "serial": 1}}))
    assert data_of(c.take()[0])["code"] == "continuity_unverifiable"


def test_recovery_without_history_has_no_attach_serial_in_the_ack() -> None:
    w = World(recovery_app())
    ack = ack_of(v2_client(w, CH).take())
    assert ack["serial"] == 0 and data_of(ack) == {}


# -- resume -----------------------------------------------------------------------------------------


def last_position(frames: list[dict[str, Any]]) -> dict[str, Any]:
    last = [f for f in frames if "serial" in f][-1]
    return {"stream_id": last["stream_id"], "serial": last["serial"]}


def test_resume_replays_exactly_the_missed_frames_then_resume_success() -> None:
    w = World(recovery_app())
    watcher = v2_client(w, CH)  # stays connected and sees every frame live
    watcher.take()
    old = v2_client(w, CH)
    old.take()
    publish(w, "1", "2", "3")
    pos = last_position(old.take())
    old.close()
    publish(w, "4", "5", "6", "7")
    missed = watcher.transport.sent[-4:]

    new = v2_client(w, CH)
    new.take()
    new.send(resume_request({CH: pos}))
    sent = new.transport.sent[-5:]
    assert sent[:4] == missed  # byte for byte the frames live subscribers got
    done = json.loads(sent[4])
    assert done["event"] == "sockudo:resume_success" and "channel" not in done
    body = data_of(done)
    assert body["failed"] == []
    (recovered,) = body["recovered"]
    assert recovered["channel"] == CH and recovered["source"] == "hot" and recovered["replayed"] == 4
    assert recovered["position"]["serial"] == 7
    assert recovered["position"]["last_message_id"] == json.loads(missed[-1])["message_id"]
    new.take()
    publish(w, "8")
    assert [f["data"] for f in new.take()] == ["8"]


def test_resume_of_several_channels_reports_failures_first() -> None:
    w = World(recovery_app())
    c = v2_client(w, CH, "other")
    frames_of_ack = c.take()
    ack = ack_of(frames_of_ack)
    publish(w, "x")
    c.take()
    c.send(resume_request({CH: {"stream_id": ack["stream_id"], "serial": 0},
                           "other": {"stream_id": "gone", "serial": 3}}))
    frames = c.take()
    assert events(frames) == ["sockudo:resume_failed", "update", "sockudo:resume_success"]
    failed = frames[0]
    assert failed["channel"] == "other"
    info = data_of(failed)
    assert set(info) >= {"code", "reason", "expected_stream_id", "current_stream_id", "oldest_available_serial",
                         "newest_available_serial"}
    assert info["code"] == "stream_reset"  # the ack gave "other" a stream; "gone" is not it
    assert info["expected_stream_id"] == "gone"
    assert info["current_stream_id"] == ack_of(frames_of_ack, "other")["stream_id"]
    body = data_of(frames[2])
    assert [r["channel"] for r in body["recovered"]] == [CH]
    assert [f["channel"] for f in body["failed"]] == ["other"]


def test_resume_before_subscribing_fails_the_channel() -> None:
    w = World(recovery_app())
    c = v2_client(w, CH)
    ack = ack_of(c.take())
    c.send(resume_request({"elsewhere": {"stream_id": ack["stream_id"], "serial": 0}}))
    frames = c.take()
    assert events(frames) == ["sockudo:resume_failed", "sockudo:resume_success"]
    assert data_of(frames[0])["code"] == "continuity_unverifiable"


def test_resume_with_recovery_disabled_is_error_4301() -> None:
    w = World(make_app())
    c = v2_client(w, CH)
    c.take()
    c.send(resume_request({CH: {"stream_id": "s", "serial": 1}}))
    (error,) = c.take()
    assert error["event"] == "sockudo:error" and error["data"]["code"] == 4301
    assert c.closed_with is None


@pytest.mark.parametrize("data", [{}, {"channel_positions": {}}, {"channel_serials": {}}, {"channel_positions": []}])
def test_resume_without_positions_is_error_4302(data: dict[str, Any]) -> None:
    w = World(recovery_app())
    c = v2_client(w, CH)
    c.take()
    c.send({"event": "sockudo:resume", "data": data})
    (error,) = c.take()
    assert error["event"] == "sockudo:error" and error["data"]["code"] == 4302


def test_a_resume_replays_no_more_than_the_socket_may_hold() -> None:
    """Up to 100 channels x 1,000 messages could be replayed by one request: past the socket's
    ``websocket.max_buffer_bytes`` a channel fails as position_expired (read history instead)."""
    w = World(recovery_app(history=True), websocket_max_buffer_bytes=8000)
    c = v2_client(w, "a", "b")
    c.take()
    publish(w, *("x" * 1000 for _ in range(5)), channel="a")
    publish(w, *("y" * 1000 for _ in range(5)), channel="b")
    frames = c.take()
    positions = {ch: {"stream_id": f["stream_id"], "serial": 0}
                 for ch in ("a", "b") for f in frames if f["channel"] == ch}
    c.send(resume_request(positions))
    frames = c.take()
    assert [f["event"] for f in frames] == ["sockudo:resume_failed"] + ["update"] * 5 + ["sockudo:resume_success"]
    failure = data_of(frames[0])
    assert (frames[0]["channel"], failure["code"]) == ("b", "position_expired")
    assert "history" in failure["reason"] and failure["newest_available_serial"] == 5
    assert {f["channel"] for f in frames[1:6]} == {"a"}


def test_legacy_channel_serials_resume_from_the_buffer() -> None:
    w = World(recovery_app())
    c = v2_client(w, CH)
    c.take()
    publish(w, "1", "2", "3")
    c.take()
    c.send({"event": "sockudo:resume", "data": {"channel_serials": {CH: 1}}})
    frames = c.take()
    assert [f.get("serial") for f in frames[:-1]] == [2, 3]
    assert frames[-1]["event"] == "sockudo:resume_success"


class PublishingDuringResume(MemorySequencer):
    """A store that lets another publish happen while a resume waits on it, as a Redis round
    trip does under gevent: ``before`` publishes before the position is read, else after."""

    def __init__(self, world: World, before: bool) -> None:
        super().__init__(world.clock)
        self.world = world
        self.before = before
        self.armed = False

    def position(self, app_id: str, channel: str) -> tuple[str, int] | None:
        if not self.armed:
            return super().position(app_id, channel)
        self.armed = False
        if self.before:
            publish(self.world, "live")
            return super().position(app_id, channel)
        position = super().position(app_id, channel)
        publish(self.world, "live")
        return position


@pytest.mark.parametrize("before", [True, False], ids=["published-before-position", "published-after-position"])
@pytest.mark.parametrize("history", [False, True], ids=["buffer-only", "with-history"])
def test_live_frames_during_a_resume_are_held_until_after_it_and_not_duplicated(before: bool, history: bool) -> None:
    w = World(recovery_app(history=history))
    store = PublishingDuringResume(w, before)
    w.services.sequencer = w.services.publisher.sequencer = w.services.recovery.sequencer = store
    c = v2_client(w, CH)
    c.take()
    publish(w, "1", "2", "3")
    stream_id = c.take()[0]["stream_id"]
    store.armed = True
    c.send(resume_request({CH: {"stream_id": stream_id, "serial": 1}}))
    frames = c.take()
    assert "sockudo:resume_failed" not in events(frames)
    done = events(frames).index("sockudo:resume_success")
    assert data_of(frames[done])["failed"] == []
    # Every missed message exactly once, the live one included, in serial order; after
    # resume_success only the held live frame (if it was not part of the replay).
    assert [(f["serial"], f["data"]) for f in frames if f["event"] == "update"] == [(2, "2"), (3, "3"), (4, "live")]
    assert all(f["event"] == "update" for f in frames[done + 1:])


def test_live_frames_on_other_channels_are_held_during_a_resume_too() -> None:
    w = World(recovery_app())
    store = PublishingDuringResume(w, before=True)
    w.services.sequencer = w.services.publisher.sequencer = w.services.recovery.sequencer = store
    c = v2_client(w, CH)
    ack = ack_of(c.take())
    store.armed = True
    c.send(resume_request({CH: {"stream_id": ack["stream_id"], "serial": 0}}))
    frames = c.take()
    # The live message was published mid-resume; it is replayed once and never sent again.
    assert [(f["event"], f.get("serial")) for f in frames] == [("update", 1), ("sockudo:resume_success", None)]


def test_a_resume_on_a_protocol7_socket_is_not_sent_protocol2_frames_it_did_not_ask_for() -> None:
    """A Pusher client never sends sockudo:resume; if one does, it still only gets answers."""
    w = World(recovery_app())
    c = w.connect()
    c.subscribe(CH)
    c.take()
    c.send(resume_request({CH: {"stream_id": "s", "serial": 0}}))
    assert events(c.take())[-1] == "sockudo:resume_success"


# -- history over the WebSocket --------------------------------------------------------------------


def test_channel_history_until_attach_returns_only_messages_up_to_the_attach_serial() -> None:
    w = World(recovery_app(history=True))
    publish(w, "1", "2", "3", "4")
    c = v2_client(w, CH)
    ack = ack_of(c.take())
    assert data_of(ack)["attach_serial"] == 4
    publish(w, "5", "6")  # live, after the attach
    c.take()
    c.send({"event": "sockudo:channel_history",
            "data": {"channel": CH, "until_attach": True, "direction": "oldest_first"}})
    (reply,) = c.take()
    assert reply["event"] == "sockudo:channel_history" and reply["channel"] == CH
    page = data_of(reply)
    assert [i["serial"] for i in page["items"]] == [1, 2, 3, 4]
    assert page["bounds"]["attach_serial"] == 4 and page["bounds"]["until_attach"] is True


def test_channel_history_default_and_maximum_limit() -> None:
    w = World(make_app(history=HistoryConfig(enabled=True, max_page_size=1000, max_messages_per_channel=2000)))
    c = v2_client(w, CH)
    c.take()
    for i in range(150):
        publish(w, str(i))
    c.take()
    c.send({"event": "sockudo:channel_history", "data": {"channel": CH}})
    page = data_of(c.take()[0])
    assert page["limit"] == 100 and len(page["items"]) == 100 and page["has_more"]
    c.send({"event": "sockudo:channel_history", "data": {"channel": CH, "limit": 5000}})
    page = data_of(c.take()[0])
    assert page["limit"] == 1000 and len(page["items"]) == 150


def test_channel_history_for_a_socket_that_is_behind_is_429() -> None:
    """A socket with unsent bytes queued gets no further page: it would only wait in memory."""
    w = World(recovery_app(history=True))
    publish(w, "1")
    c = v2_client(w, CH)
    c.take()
    c.transport.backlog = 4096
    c.send({"event": "sockudo:channel_history", "data": {"channel": CH}})
    (reply,) = c.take()
    assert reply["event"] == "sockudo:channel_history"
    assert data_of(reply)["status"] == 429 and "items" not in data_of(reply)
    assert w.services.metrics.registry.get_sample_value(
        "sockudo_rate_limit_triggered_total", {"app_id": c.app.id, "port": str(w.services.metrics.port),
                                               "limiter_type": "channel_history",
                                               "request_context": "websocket"}) == 1
    c.transport.backlog = 0
    c.send({"event": "sockudo:channel_history", "data": {"channel": CH}})
    assert [i["serial"] for i in data_of(c.take()[0])["items"]] == [1]


def test_channel_history_errors_are_answered_in_the_same_event() -> None:
    w = World(recovery_app(history=True))
    c = v2_client(w, CH)
    c.take()
    c.send({"event": "sockudo:channel_history", "data": {"channel": CH, "cursor": "forged.cursor"}})
    (reply,) = c.take()
    assert reply["event"] == "sockudo:channel_history"
    assert data_of(reply)["status"] == 400 and data_of(reply)["code"] == "invalid_cursor"
    c.send({"event": "sockudo:channel_history", "data": {"channel": "not-subscribed"}})
    (error,) = c.take()
    assert error["event"] == "sockudo:error" and error["data"]["code"] == 4300
