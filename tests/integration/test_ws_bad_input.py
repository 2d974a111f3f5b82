"""Bad input on the WebSocket side of a real server, sent as raw frames.

Each test asserts the exact Pusher code and that another
client, connected before the bad input, still receives a publish afterwards. One
multi-app server is shared by most tests; limits that would disturb other tests
(payload size, activity timeout) get a server of their own.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pusher
import pytest
import websocket
from websocket import ABNF

from tests.support.procs import ServerProcess, wait_until
from tests.support.sdk import APP, WATCH, sdk_for
from tests.support.wsraw import Closed, RawClient, TcpWebSocket

OFF: dict[str, Any] = {"id": "200", "key": "ws-off", "secret": "ws-off-secret", "enabled": False}
ONE: dict[str, Any] = {"id": "300", "key": "ws-one", "secret": "ws-one-secret", "max_connections": 1}
ORIGIN: dict[str, Any] = {"id": "400", "key": "ws-origin", "secret": "ws-origin-secret",
                          "allowed_origins": ["https://good.example"]}
NO_CLIENT: dict[str, Any] = {"id": "500", "key": "ws-noclient", "secret": "ws-noclient-secret",
                             "enable_client_messages": False}
LIMITS: dict[str, Any] = {"id": "600", "key": "ws-limits", "secret": "ws-limits-secret", "enable_client_messages": True,
                          "max_client_events_per_second": 2, "max_presence_members_per_channel": 2}

_counter = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess([APP, OFF, ONE, ORIGIN, NO_CLIENT, LIMITS]).start()
    yield proc
    proc.stop()


@pytest.fixture
def clients() -> Iterator[list[RawClient]]:
    opened: list[RawClient] = []
    yield opened
    for c in opened:
        c.close()


def connect(server: ServerProcess, opened: list[RawClient], app: dict[str, Any] = APP, **kw: Any) -> RawClient:
    client = RawClient.connect(server, app["key"], **kw)
    opened.append(client)
    return client


def open_raw(server: ServerProcess, opened: list[RawClient], key: str, **kw: Any) -> RawClient:
    client = RawClient.open(server, key, **kw)
    opened.append(client)
    return client


def assert_others_unaffected(sdk: pusher.Pusher, watcher: RawClient, channel: str = WATCH) -> None:
    marker = f"alive-{next(_counter)}"
    sdk.trigger(channel, "still-alive", marker)
    frame = watcher.expect(lambda f: f.get("event") == "still-alive" and f.get("data") == marker)
    assert frame == {"event": "still-alive", "channel": channel, "data": marker}


def assert_error(client: RawClient, code: int) -> dict[str, Any]:
    """A non-fatal ``pusher:error``: the frame, and the socket keeps working."""
    frame = client.expect("pusher:error")
    assert frame["data"]["code"] == code, frame
    assert isinstance(frame["data"]["message"], str) and frame["data"]["message"]
    client.ping_pong()
    return frame


# -- refused at connect ----------------------------------------------------------


def test_unknown_app_key_gets_4001_then_close(server, sdk, watcher, clients):
    refused = open_raw(server, clients, "no-such-key")
    refused.expect_error_then_close(4001)
    assert_others_unaffected(sdk, watcher)


def test_disabled_app_gets_4003_then_close(server, sdk, watcher, clients):
    refused = open_raw(server, clients, OFF["key"])
    refused.expect_error_then_close(4003)
    assert_others_unaffected(sdk, watcher)


def test_app_over_max_connections_gets_4004(server, sdk, watcher, clients):
    first = connect(server, clients, ONE)
    second = open_raw(server, clients, ONE["key"])
    second.expect_error_then_close(4004)
    first.ping_pong()  # the socket holding the quota is untouched
    assert_others_unaffected(sdk, watcher)

    # Closing the first frees its slot.
    first.close()

    def reconnects() -> bool:
        client = RawClient.open(server, ONE["key"])
        clients.append(client)
        return client.recv()["event"] == "pusher:connection_established"

    wait_until(reconnects, timeout=5, message="the freed slot to accept a new socket")


@pytest.mark.parametrize("origin", ["https://evil.example", "http://good.example", "https://good.example.evil"])
def test_origin_not_allowed_gets_4009(server, sdk, watcher, clients, origin):
    refused = open_raw(server, clients, ORIGIN["key"], origin=origin)
    refused.expect_error_then_close(4009)
    assert_others_unaffected(sdk, watcher)


def test_missing_origin_is_refused_when_origins_are_restricted(server, sdk, watcher, clients):
    client = open_raw(server, clients, ORIGIN["key"], suppress_origin=True)
    client.expect_error_then_close(4009)
    assert_others_unaffected(sdk, watcher)


@pytest.mark.parametrize("origin", ["https://good.example", "HTTPS://GOOD.EXAMPLE"])
def test_allowed_origin_is_accepted(server, clients, origin):
    client = connect(server, clients, ORIGIN, origin=origin)
    assert client.socket_id
    client.ping_pong()


def test_non_numeric_protocol_is_http_400(server, sdk, watcher):
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(f"{server.ws_url}/app/{APP['key']}?protocol=abc", timeout=5)
    assert info.value.status_code == 400
    assert_others_unaffected(sdk, watcher)


@pytest.mark.parametrize("version", ["0", "1", "3", "4"])
def test_protocol_below_5_gets_4007(server, sdk, watcher, version):
    client = RawClient.open(server, APP["key"], query=f"protocol={version}&client=raw&version=1.0")
    try:
        client.expect_error_then_close(4007)
    finally:
        client.close()
    assert_others_unaffected(sdk, watcher)


@pytest.mark.parametrize("version", ["5", "6", "7", "8"])
def test_protocols_5_to_7_and_newer_are_served_as_pusher_7(server, sdk, version):
    """Pysher and older pusher-js speak protocols 5 and 6, and ping with ``"data": ""``."""
    client = RawClient.connect(server, APP["key"], query=f"protocol={version}&client=raw&version=1.0")
    try:
        client.send_json({"event": "pusher:ping", "data": ""})
        assert client.expect("pusher:pong")["event"] == "pusher:pong"
        client.subscribe(f"proto-{version}")
        sdk.trigger(f"proto-{version}", "hello", {"v": version})
        frame = client.expect("hello")
        assert set(frame) == {"event", "channel", "data"}  # a plain Pusher frame: no serial or message_id
    finally:
        client.close()


# -- malformed frames on an open socket --------------------------------------


@pytest.mark.parametrize("text", [
    "{not json", '{"event": "pusher:ping"', "", "[1, 2]", '"pusher:ping"', "42", "null",
    '{"data": {}}', '{"event": ""}', '{"event": 7}', '{"event": "pusher:subscribe", "channel": 5}',
    '{"event": "pusher:subscribe", "data": 5}', '{"event": "pusher:subscribe", "data": "{not json"}',
    '{"event": "pusher:subscribe", "data": ["ws-x"]}',
], ids=["garbage", "truncated", "empty", "array", "string", "number", "null", "no-event", "empty-event",
        "numeric-event", "numeric-channel", "numeric-data", "data-string-not-json", "data-array"])
def test_malformed_frame_gets_4000_and_socket_survives(server, sdk, watcher, clients, text):
    client = connect(server, clients)
    client.send_text(text)
    assert_error(client, 4000)
    assert_others_unaffected(sdk, watcher)


def test_deeply_nested_json_is_a_client_error_not_a_crash(server, sdk, watcher, clients):
    """JSON nested past Python's recursion limit is bad input: answered with the usual code,
    never an "Internal server error" with a traceback in the log."""
    deep = "[" * 50000
    client = connect(server, clients)

    client.send_text(deep)
    frame = assert_error(client, 4000)
    assert frame["data"]["message"] != "Internal server error", frame

    client.send_json({"event": "pusher:subscribe", "data": deep})
    frame = assert_error(client, 4000)
    assert frame["data"]["message"] != "Internal server error", frame

    client.send_json({"event": "pusher:signin", "data": {"auth": f"{APP['key']}:00", "user_data": deep}})
    frame = assert_error(client, 4009)

    assert "RecursionError" not in server.log()
    assert_others_unaffected(sdk, watcher)


def test_ping_with_string_data_is_answered(server, clients):
    client = connect(server, clients)
    client.send_text('{"event": "pusher:ping", "data": ""}')  # Pysher's form
    assert client.recv()["event"] == "pusher:pong"


def test_unknown_events_are_ignored(server, clients):
    client = connect(server, clients)
    client.send_json({"event": "pusher:whatever", "data": {}})
    client.send_json({"event": "something-else", "data": {}})
    # The next frame answers the ping: nothing was sent for the unknown events.
    client.send_json({"event": "pusher:ping", "data": {}})
    assert client.recv()["event"] == "pusher:pong"


def test_binary_frame_gets_4000_and_socket_survives(server, sdk, watcher, clients):
    client = connect(server, clients)
    client.send_binary(b'{"event":"pusher:ping","data":{}}')
    assert_error(client, 4000)
    assert_others_unaffected(sdk, watcher)


def test_invalid_utf8_text_frame_closes_1007(server, sdk, watcher, clients):
    client = connect(server, clients)
    client.send_text(b'{"event":"pusher:ping","data":"\xff\xfe"}')
    closed = client.expect_close()
    assert closed.code == 1007
    assert_others_unaffected(sdk, watcher)


def test_unmasked_frame_closes_1002(server, sdk, watcher):
    raw = TcpWebSocket(server, f"/app/{APP['key']}?protocol=7")
    try:
        assert raw.status_line.startswith("HTTP/1.1 101"), raw.status_line
        opcode, payload = raw.read_frame()
        assert opcode == ABNF.OPCODE_TEXT and json.loads(payload)["event"] == "pusher:connection_established"
        raw.send_frame(ABNF.OPCODE_TEXT, b'{"event":"pusher:ping","data":{}}', masked=False)
        code, _frames = raw.read_until_close()
        assert code == 1002
    finally:
        raw.close()
    assert_others_unaffected(sdk, watcher)


@pytest.mark.parametrize(("opcode", "payload", "kw"), [
    (ABNF.OPCODE_TEXT, b'{"event":"pusher:ping"}', {"rsv": 0x40}),
    (0x3, b"x", {}),
    (ABNF.OPCODE_CONT, b"x", {}),
    (ABNF.OPCODE_PING, b"p" * 126, {}),
    (ABNF.OPCODE_PING, b"p", {"fin": False}),
], ids=["rsv-bit", "reserved-opcode", "continuation-first", "long-control-frame", "fragmented-control-frame"])
def test_rfc6455_violations_close_1002(server, sdk, watcher, opcode, payload, kw):
    raw = TcpWebSocket(server, f"/app/{APP['key']}")
    try:
        assert raw.read_frame()[0] == ABNF.OPCODE_TEXT  # connection_established
        raw.send_frame(opcode, payload, **kw)
        code, _frames = raw.read_until_close()
        assert code == 1002
    finally:
        raw.close()
    assert_others_unaffected(sdk, watcher)


# -- subscriptions and client events over the limits ------------------------------


def test_presence_channel_over_max_members_gets_subscription_error_and_4100(server, sdk, watcher, clients):
    limits_sdk = sdk_for(server, LIMITS)
    channel = "presence-ws-full"
    members = []
    for user in ("m1", "m2"):
        c = connect(server, clients, LIMITS)
        c.subscribe(channel, limits_sdk.authenticate(channel, c.socket_id, {"user_id": user}))
        members.append(c)

    third = connect(server, clients, LIMITS)
    third.send_json({"event": "pusher:subscribe", "data": {
        "channel": channel, **limits_sdk.authenticate(channel, third.socket_id, {"user_id": "m3"})}})
    error = third.recv()
    assert error["event"] == "pusher:subscription_error" and error["channel"] == channel, error
    assert error["data"]["status"] in (400, 403) and error["data"]["type"], error
    frame = third.recv()
    assert frame["event"] == "pusher:error" and frame["data"]["code"] == 4100, frame
    third.ping_pong()  # non-fatal

    # A second socket of a user who is already a member still fits.
    again = connect(server, clients, LIMITS)
    ack = again.subscribe(channel, limits_sdk.authenticate(channel, again.socket_id, {"user_id": "m1"}))
    assert json.loads(ack["data"])["presence"]["count"] == 2
    assert sorted(u["id"] for u in limits_sdk.users_info(channel)["users"]) == ["m1", "m2"]
    assert_others_unaffected(sdk, watcher)


def test_bad_channel_auth_gets_subscription_error_and_4009(server, sdk, watcher, clients):
    client = connect(server, clients)
    other = connect(server, clients)

    def rejected(data: dict[str, Any], code: int, status: int) -> None:
        client.send_json({"event": "pusher:subscribe", "data": data})
        error = client.recv()
        assert error["event"] == "pusher:subscription_error" and error["channel"] == data["channel"], error
        assert error["data"]["status"] == status, error
        frame = client.recv()
        assert frame["event"] == "pusher:error" and frame["data"]["code"] == code, frame

    rejected({"channel": "private-ws-auth"}, 4009, 401)
    rejected({"channel": "private-ws-auth", "auth": f"{APP['key']}:{'0' * 64}"}, 4009, 401)
    # A signature for another socket does not transfer.
    rejected({"channel": "private-ws-auth", **sdk.authenticate("private-ws-auth", other.socket_id)}, 4009, 401)
    # Presence signs the raw channel_data string: a re-serialised copy fails, the SDK's own succeeds.
    auth = sdk.authenticate("presence-ws-auth", client.socket_id, {"user_id": "a1", "user_info": {"name": "A"}})
    compact = json.dumps(json.loads(auth["channel_data"]), separators=(",", ":"))
    assert compact != auth["channel_data"]
    rejected({"channel": "presence-ws-auth", "auth": auth["auth"], "channel_data": compact}, 4009, 401)
    ack = client.subscribe("presence-ws-auth", auth)
    assert json.loads(ack["data"])["presence"] == {"ids": ["a1"], "hash": {"a1": {"name": "A"}}, "count": 1}
    client.subscribe("private-ws-auth", sdk.authenticate("private-ws-auth", client.socket_id))
    assert_others_unaffected(sdk, watcher)


@pytest.mark.parametrize("channel", ["x" * 201, "bad channel", "ws/slash"], ids=["too-long", "space", "slash"])
def test_invalid_channel_name_on_subscribe_gets_4300(server, sdk, watcher, clients, channel):
    client = connect(server, clients)
    client.send_json({"event": "pusher:subscribe", "data": {"channel": channel}})
    frame = client.expect("pusher:error")
    assert frame["data"]["code"] == 4300, frame
    client.ping_pong()
    assert_others_unaffected(sdk, watcher)


def test_client_events_disabled_get_4301(server, sdk, watcher, clients):
    app_sdk = sdk_for(server, NO_CLIENT)
    sender, receiver = connect(server, clients, NO_CLIENT), connect(server, clients, NO_CLIENT)
    for c in (sender, receiver):
        c.subscribe("private-ws-noclient", app_sdk.authenticate("private-ws-noclient", c.socket_id))

    sender.send_json({"event": "client-typing", "channel": "private-ws-noclient", "data": {"who": "A"}})

    assert_error(sender, 4301)
    app_sdk.trigger("private-ws-noclient", "marker", "m")
    assert receiver.recv()["event"] == "marker"  # the client event was not relayed
    assert_others_unaffected(sdk, watcher)


def test_client_events_over_rate_limit_get_4301(server, sdk, watcher, clients):
    app_sdk = sdk_for(server, LIMITS)
    channel = "private-ws-rate"
    sender, receiver = connect(server, clients, LIMITS), connect(server, clients, LIMITS)
    for c in (sender, receiver):
        c.subscribe(channel, app_sdk.authenticate(channel, c.socket_id))

    for i in range(3):  # limit is 2 per second; these go out within milliseconds
        sender.send_json({"event": "client-burst", "channel": channel, "data": {"i": i}})

    frame = sender.expect("pusher:error")
    assert frame["data"]["code"] == 4301, frame
    sender.ping_pong()
    app_sdk.trigger(channel, "marker", "m")
    got = [receiver.recv() for _ in range(3)]
    assert [(f["event"], f.get("data")) for f in got] == [
        ("client-burst", {"i": 0}), ("client-burst", {"i": 1}), ("marker", "m")]
    assert_others_unaffected(sdk, watcher)


# -- a server with a 1 KB inbound message limit -----------------------------------


@pytest.fixture(scope="module")
def small_server() -> Iterator[ServerProcess]:
    proc = ServerProcess([APP], websocket_max_payload_kb=1).start()
    yield proc
    proc.stop()


def _ping_of_size(size: int) -> str:
    head = '{"event":"pusher:ping","data":{"pad":"'
    tail = '"}}'
    return head + "x" * (size - len(head) - len(tail)) + tail


def test_message_over_max_payload_gets_4000_and_socket_survives(small_server, clients):
    sdk = sdk_for(small_server)
    other = connect(small_server, clients)
    other.subscribe(WATCH)
    client = connect(small_server, clients)

    at_limit = _ping_of_size(1024)
    assert len(at_limit.encode()) == 1024
    client.send_text(at_limit)
    assert client.recv()["event"] == "pusher:pong"

    client.send_text(_ping_of_size(2048))
    assert_error(client, 4000)

    # The same, split across fragments that are each under the limit.
    big = _ping_of_size(1536).encode()
    client.ws.send_frame(ABNF.create_frame(big[:700], ABNF.OPCODE_TEXT, fin=0))
    client.ws.send_frame(ABNF.create_frame(big[700:], ABNF.OPCODE_CONT, fin=1))
    assert_error(client, 4000)

    assert_others_unaffected(sdk, other)


# -- activity timeout, on a server with 1 s timeouts ---------------------------------


def test_activity_timeout_pings_then_closes_silent_client_only(server_factory, clients):
    fast = server_factory([APP], activity_timeout=1, pong_timeout=1)
    sdk = sdk_for(fast)
    # Order matters: the WS-ping client's last Pusher frame comes first, so if WebSocket
    # pings did not count as activity it would be pinged (and closed) before the silent one.
    ws_pinger = connect(fast, clients)
    ws_pinger.subscribe("ws-timeout")
    responder = connect(fast, clients)
    responder.subscribe("ws-timeout")
    silent = connect(fast, clients)
    assert silent.activity_timeout == 1

    silent_frames: list[dict[str, Any]] = []
    pinger_frames: list[dict[str, Any]] = []
    responder_pings = 0
    next_ws_ping = 0.0
    deadline = time.monotonic() + 10
    closed: Closed | None = None
    started = time.monotonic()
    while closed is None:
        assert time.monotonic() < deadline, f"silent client not closed in time; got {silent_frames}"
        if time.monotonic() >= next_ws_ping:
            ws_pinger.ws.ping(b"keepalive")
            next_ws_ping = time.monotonic() + 0.2
        try:
            pinger_frames.append(ws_pinger.recv(0.02))
        except TimeoutError:
            pass
        try:
            frame = responder.recv(0.02)
            if frame["event"] == "pusher:ping":
                responder_pings += 1
                responder.send_json({"event": "pusher:pong", "data": {}})
        except TimeoutError:
            pass
        try:
            silent_frames.append(silent.recv(0.02))
        except TimeoutError:
            pass
        except Closed as exc:
            closed = exc
    elapsed = time.monotonic() - started

    assert [f["event"] for f in silent_frames] == ["pusher:ping", "pusher:error"], silent_frames
    assert silent_frames[1]["data"]["code"] == 4201, silent_frames
    assert closed.code == 4201
    assert 1.5 <= elapsed <= 6, elapsed

    # The client answering pusher:ping with pusher:pong was pinged and stays connected.
    assert responder_pings >= 1
    responder.ping_pong()
    # The client sending only WebSocket pings got pongs and was never pinged nor closed.
    assert ws_pinger.last_control is not None and ws_pinger.last_control[0] == ABNF.OPCODE_PONG
    assert pinger_frames == [], pinger_frames
    marker = "after-timeout"
    sdk.trigger("ws-timeout", "still-alive", marker)
    for c in (ws_pinger, responder):
        assert c.expect("still-alive")["data"] == marker
