"""Hostile input fed to the pure ``Handler``, property-based with hypothesis.

Random and mutated JSON frames, wrong types in every field of every event, huge and deeply
nested payloads, JSON escapes that decode to invalid Unicode (lone surrogates), ``NaN`` and
``Infinity`` literals. For every example:

- ``Handler.message`` never raises (the WebSocket edge would turn an exception into
  "Internal server error", which is a bug, not an answer);
- every frame the server writes is JSON that encodes to valid UTF-8 (the writer greenlet
  encodes it; an invalid frame would kill the writer or break the client's ``JSON.parse``),
  and every ``pusher:error`` and close code is one the protocol documents;
- other connections — one of the same app, one of another app subscribed to the *same*
  channel names — receive nothing and keep their state;
- once the hostile socket closes, the node's bookkeeping holds the bystanders and nothing else.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockudo.config import HistoryConfig, RecoveryConfig
from tests.support.fakes import World, channel_auth, make_app, user_auth

#: Every code the server may put in ``pusher:error`` or a close frame.
DOCUMENTED_CODES = {4000, 4001, 4003, 4004, 4009, 4100, 4200, 4201, 4300, 4301, 4302, 4303}
SERVER_EVENTS_PREFIXES = ("pusher:", "pusher_internal:", "sockudo:", "sockudo_internal:", "client-")

FEATURES = dict(
    enable_client_messages=True,
    enable_user_authentication=True,
    enable_watchlist_events=True,
    enable_subscription_count=True,
    max_client_events_per_second=0,  # the rate limit is tested elsewhere; here it would mask paths
    connection_recovery=RecoveryConfig(enabled=True),
    history=HistoryConfig(enabled=True),
)
APP = make_app(**FEATURES)
OTHER = make_app(id="app-2", key="key-2", secret="secret-2", **FEATURES)

SHARED_CHANNELS = ["room", "private-room", "presence-room", "cache-room", "private-encrypted-room"]
BYSTANDER_PRESENCE = "presence-bystander-only"
PLACEHOLDER = "__number_json_does_not_have__"

# -- strategies --------------------------------------------------------------------------------

SURROGATE = st.sampled_from(["\\ud800", "\\udfff", "\\udc80x", "\\ud83d"])  # JSON escapes of lone surrogates
weird_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", "\x00", "\u2028", "\ufeff", "é", "😀", "a" * 300, "#server-to-user-", "client-"]),
)
channel_names = st.one_of(
    st.just("HOME"),  # the channel this socket joined first: client events there pass the checks
    st.just("HOME"),
    st.sampled_from(SHARED_CHANNELS),
    # Never the bystander's own channels: the fuzzer signs whatever it asks for (as an app's auth
    # endpoint would for its own users), so joining them would be legitimate.
    st.sampled_from(SHARED_CHANNELS + ["#server-to-user-u1", "#server-to-user-",
                                       "presence-cache-room", "private-cache-room", "x" * 201, "bad channel",
                                       "ümlaut", "a/b", ""]),
    st.from_regex(r"\A(private-|presence-|cache-|private-encrypted-)?[a-z0-9\-_=@,.;:#]{1,12}\Z"),
    weird_text,
)
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), weird_text, channel_names,
)
json_values = st.recursive(
    json_leaf,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(weird_text, children, max_size=4)),
    max_leaves=12,
)
event_names = st.one_of(
    st.sampled_from([
        "pusher:subscribe", "pusher:unsubscribe", "pusher:signin", "pusher:ping", "pusher:pong",
        "pusher:resume", "pusher:channel_history", "sockudo:subscribe", "sockudo:unsubscribe",
        "sockudo:signin", "sockudo:resume", "sockudo:channel_history", "sockudo:ping", "pusher:auth",
        "pusher:presence_update", "pusher:enable_delta_compression", "client-typing", "client-",
        "client-" + "x" * 250, "pusher_internal:member_added", "something", "pusher:",
    ]),
    weird_text,
)

FIELDS = {
    "ping": ["data"],
    "subscribe": ["channel", "auth", "channel_data"],
    "unsubscribe": ["channel"],
    "signin": ["auth", "user_data"],
    "resume": ["channel_positions", "channel_serials"],
    "channel_history": ["channel", "limit", "direction", "cursor", "start_serial", "end_serial", "until_attach",
                        "start", "end"],
}


@st.composite
def recipes(draw: st.DrawFn) -> dict[str, Any]:
    """A frame to build once the socket id is known (valid signatures need it). Only the fields
    a kind uses are drawn (drawing every field for every frame made generation the bottleneck)."""
    kind = draw(st.sampled_from(["subscribe", "subscribe", "unsubscribe", "signin", "resume", "channel_history",
                                 "client", "client", "ping", "random_json", "random_text", "mutated"]))
    base = draw(st.sampled_from([*FIELDS, "client", "ping"])) if kind == "mutated" else kind
    uses = {base, kind}
    recipe: dict[str, Any] = {
        "kind": kind, "base": base, "prefix": draw(st.sampled_from(["pusher:", "sockudo:"])),
        "channel": "room", "user_id": "u1", "user_info": None, "sign": "valid", "value": None, "override": None,
        "drop": None, "event": "typing", "text": "", "history": {}, "positions": {},
        "data_as_string": draw(st.booleans()),
        "escape": draw(st.one_of(st.none(), st.none(), SURROGATE,
                                 st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999"]))),
        "nesting": draw(st.sampled_from([0, 0, 0, 10, 900, 5000, 100_000])),
        "big": draw(st.sampled_from([0, 0, 0, 0, 70_000, 1_100_000])),
    }
    if uses & {"subscribe", "unsubscribe", "channel_history", "client"}:
        recipe["channel"] = draw(channel_names)
    if uses & {"subscribe", "signin"}:
        recipe["user_id"] = draw(st.one_of(st.sampled_from(["u1", "u2", "bystander"]), json_leaf))
        recipe["user_info"] = draw(json_values)
        recipe["sign"] = draw(st.sampled_from(["valid", "valid", "wrong", "missing", "random", "other_socket"]))
    if uses & {"client", "ping", "random_json"} or recipe["sign"] == "random":
        recipe["value"] = draw(json_values)
    if kind == "mutated":
        recipe["override"] = draw(st.one_of(st.none(), st.tuples(st.sampled_from(sum(FIELDS.values(), [])),
                                                                 json_values)))
        recipe["drop"] = draw(st.one_of(st.none(), st.sampled_from(sum(FIELDS.values(), []) + ["event", "data"])))
    if uses & {"client", "mutated"}:
        recipe["event"] = draw(event_names)
    if kind == "random_text":
        # Invalid UTF-8 as a lenient caller would hand it over (surrogateescape), and as latin-1.
        recipe["text"] = draw(st.one_of(
            st.text(max_size=60), st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
            st.binary(max_size=40).map(
                lambda b: '{"event":"pusher:ping","data":"' + b.decode("utf-8", "surrogateescape") + '"}')))
    if "channel_history" in uses:
        recipe["history"] = draw(st.dictionaries(st.sampled_from(FIELDS["channel_history"]), json_values, max_size=4))
    if "resume" in uses:
        recipe["positions"] = draw(json_values | st.dictionaries(channel_names, json_values | st.fixed_dictionaries(
            {"stream_id": json_leaf, "serial": json_leaf}), max_size=3))
    return recipe


def _auth(recipe: dict[str, Any], socket_id: str, channel: Any, channel_data: str | None, app: Any = APP) -> Any:
    sign = recipe["sign"]
    if sign == "missing":
        return None
    if sign == "random":
        return recipe["value"]
    if not isinstance(channel, str):
        return f"{app.key}:{'0' * 64}"
    sid = socket_id if sign != "other_socket" else "1.2"
    auth = channel_auth(app, sid, channel, channel_data)
    return auth if sign != "wrong" else auth[:-1] + ("0" if auth[-1] != "0" else "1")


def build(recipe: dict[str, Any], socket_id: str, home: str = "private-room", app: Any = APP) -> str:
    """Materialise a recipe as the frame text the client sends (signed for ``app``)."""
    kind, prefix = recipe["kind"], recipe["prefix"]
    if kind == "random_text":
        return recipe["text"]
    if kind == "random_json":
        return json.dumps(recipe["value"])
    data: dict[str, Any]
    frame: dict[str, Any]
    channel = home if recipe["channel"] == "HOME" else recipe["channel"]
    if kind == "subscribe":
        data = {"channel": channel}
        channel_data = None
        if isinstance(channel, str) and channel.startswith("presence-"):
            channel_data = json.dumps({"user_id": recipe["user_id"], "user_info": recipe["user_info"]})
            data["channel_data"] = channel_data
        auth = _auth(recipe, socket_id, channel, channel_data, app)
        if auth is not None:
            data["auth"] = auth
        frame = {"event": prefix + "subscribe", "data": data}
    elif kind == "unsubscribe":
        frame = {"event": prefix + "unsubscribe", "data": {"channel": channel}}
    elif kind == "signin":
        user = {"id": recipe["user_id"], "user_info": recipe["user_info"], "watchlist": [recipe["user_id"], "u2"]}
        user_data = json.dumps(user)
        auth = user_auth(app, socket_id if recipe["sign"] != "other_socket" else "1.2", user_data)
        if recipe["sign"] == "wrong":
            auth = auth[:-1] + ("0" if auth[-1] != "0" else "1")
        data = {"user_data": user_data}
        if recipe["sign"] != "missing":
            data["auth"] = auth if recipe["sign"] != "random" else recipe["value"]
        frame = {"event": prefix + "signin", "data": data}
    elif kind == "resume":
        frame = {"event": prefix + "resume", "data": {"channel_positions": recipe["positions"]}}
    elif kind == "channel_history":
        frame = {"event": prefix + "channel_history", "data": {"channel": channel, **recipe["history"]}}
    elif kind == "client":
        frame = {"event": "client-" + str(recipe["event"])[:40], "channel": channel, "data": recipe["value"]}
    elif kind == "ping":
        frame = {"event": prefix + "ping", "data": recipe["value"]}
    else:  # mutated: a well-formed frame of a random kind, then one field replaced or dropped
        base = dict(recipe, kind=recipe["base"], escape=None, nesting=0, big=0, data_as_string=False)
        frame = json.loads(build(base, socket_id, home, app))
        if recipe["override"] is not None:
            key, value = recipe["override"]
            inner = frame.get("data")
            target: dict[str, Any] = inner if isinstance(inner, dict) else frame
            target[key] = value
        if recipe["drop"] is not None:
            frame.pop(recipe["drop"], None)
            if isinstance(frame.get("data"), dict):
                frame["data"].pop(recipe["drop"], None)
        if recipe["drop"] == "event":
            frame["event"] = recipe["event"]
    if recipe["big"] and isinstance(frame.get("data"), dict):
        frame["data"]["pad"] = "x" * recipe["big"]
    constant = recipe["escape"] is not None and not recipe["escape"].startswith("\\u")
    if constant:  # NaN, Infinity, 1e400: a number JSON does not have, where the data is
        if isinstance(frame.get("data"), dict):
            frame["data"]["n"] = PLACEHOLDER
        elif kind == "client":
            frame["data"] = {"n": PLACEHOLDER, "v": frame.get("data")}
        else:
            frame["n"] = PLACEHOLDER
    text_data = recipe["data_as_string"] and isinstance(frame.get("data"), dict)
    if text_data:
        frame["data"] = json.dumps(frame["data"])
    text = json.dumps(frame, ensure_ascii=False)
    if recipe["escape"] is not None:
        # Valid UTF-8 on the wire, but it decodes to a lone surrogate (or to a number JSON does
        # not have) inside the server: spliced into every string value, at both JSON levels.
        token = recipe["escape"]
        if token.startswith("\\u"):
            if text_data:  # inside the data string, one JSON level down
                text = text.replace('\\": \\"', '\\": \\"\\' + token)
            else:
                text = text.replace(': "', ': "' + token)
        else:
            text = text.replace(f'\\"{PLACEHOLDER}\\"', token).replace(f'"{PLACEHOLDER}"', token)
    if recipe["nesting"] and text.endswith("}") and text != "{}":
        n = recipe["nesting"]
        text = text[:-1] + ', "deep": ' + "[" * n + "]" * n + "}"
    return text


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


# -- invariants ----------------------------------------------------------------------------------


def check_frames(sent: list[str], closes: list[tuple[int, str]]) -> None:
    for text in sent:
        text.encode("utf-8")  # the writer greenlet does this; a lone surrogate would kill it
        frame = json.loads(text, parse_constant=_no_constants)  # NaN/Infinity would break JSON.parse
        assert isinstance(frame, dict) and isinstance(frame.get("event"), str), text
        assert frame["event"].startswith(SERVER_EVENTS_PREFIXES), text
        if frame["event"] in ("pusher:error", "sockudo:error"):
            data = frame["data"]
            assert data["code"] in DOCUMENTED_CODES, text
            assert data["message"] != "Internal server error", text
    for code, _reason in closes:
        assert code in DOCUMENTED_CODES, closes


def _no_constants(name: str) -> Any:
    raise AssertionError(f"the server wrote a non-JSON number {name}")


def bookkeeping(world: World) -> dict[str, Any]:
    """What the node holds, as plain data (socket ids, channels, members, users, watchers)."""
    return {
        app_id: {
            "sockets": sorted(ns.sockets),
            "channels": {c: sorted(s) for c, s in ns.channels.items()},
            "presence": {c: {u: (json.dumps(m.user_info, sort_keys=True), sorted(m.socket_ids))
                             for u, m in members.items()} for c, members in ns.presence.items()},
            "users": {u: sorted(s) for u, s in ns.users.items()},
            "watchers": {u: sorted(s) for u, s in ns.watchers.items()},
        }
        for app_id, ns in world.adapter.namespaces.items()
    }


def bystanders(world: World) -> list[Any]:
    """Sockets that exist before the hostile one: same app and another app, same channel names."""
    same = world.connect(APP.key)
    same.subscribe(BYSTANDER_PRESENCE, user_id="bystander", user_info={"name": "B"})
    same.signin({"id": "bystander"})
    same.subscribe("room-of-the-bystander")
    other = world.connect(OTHER.key)
    for channel in SHARED_CHANNELS:
        other.subscribe(channel, user_id="u1" if channel.startswith("presence-") else None)
    other.signin({"id": "u1", "watchlist": ["u1", "u2"]})
    for client in (same, other):
        client.take()
    return [same, other]


def peer(world: World, protocol: int) -> Any:
    """A well-behaved socket of the same app on the shared channels: it may receive what the
    hostile socket legitimately causes (client events, member_added), but only valid frames."""
    client = world.connect(APP.key, protocol=protocol)
    for channel in SHARED_CHANNELS:
        client.subscribe(channel, user_id="u2" if channel.startswith("presence-") else None)
    client.take()
    return client


def run(recipes_list: list[dict[str, Any]], protocol: int, home: str = "private-room") -> None:
    world = World(APP, OTHER)
    others = bystanders(world)
    before = {c.socket_id: (dict(c.conn.channels), c.conn.user_id) for c in others}
    held = bookkeeping(world)
    co = peer(world, 2 if protocol == 7 else 7)
    client = world.connect(APP.key, protocol=protocol)
    client.subscribe(home, user_id="u1" if home.startswith("presence-") else None)  # a legitimate join first
    for recipe in recipes_list:
        text = build(recipe, client.socket_id, home)
        world.handler.message(client.conn, text)  # must not raise
        world.clock.advance(0.3)
    check_frames(client.transport.sent, client.transport.closes)
    check_frames(co.transport.sent, co.transport.closes)
    assert co.transport.closes == []
    co.close()
    for other in others:
        assert other.take() == [], "a bystander received a frame caused by another socket"
        assert other.transport.closes == []
        assert (dict(other.conn.channels), other.conn.user_id) == before[other.socket_id]
    client.close()
    assert bookkeeping(world) == held, "the hostile socket left something behind"
    for other in others:  # and the bystanders still work
        other.send({"event": "pusher:ping", "data": {}})
        assert other.take_events() == ["pusher:pong"]


#: Private and presence weigh double: client events are allowed there, so more paths are reached.
HOMES = st.sampled_from(SHARED_CHANNELS + ["private-room", "presence-room"])
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.data_too_large])


@pytest.mark.slow
@SETTINGS
@given(st.lists(recipes(), min_size=1, max_size=8), st.sampled_from([7, 2]), HOMES)
def test_random_and_mutated_frames_never_raise_and_touch_nobody_else(recipes_list, protocol, home):
    run(recipes_list, protocol, home)


@settings(max_examples=250, deadline=None)
@given(st.sampled_from([*FIELDS, "client"]), st.sampled_from(["pusher:", "sockudo:"]), st.data())
def test_wrong_types_in_every_field_of_every_event(event, prefix, data):
    """Each documented field of each event, in turn, set to a value of a random JSON type."""
    world = World(APP, OTHER)
    others = bystanders(world)
    held = bookkeeping(world)
    client = world.connect(APP.key, protocol=data.draw(st.sampled_from([7, 2])))
    client.subscribe("private-room")  # so a client event gets as far as its data
    if event == "client":
        for field in ("event", "channel", "data", "user_id"):
            frame = {"event": "client-typing", "channel": "private-room", "data": {"x": 1}}
            frame[field] = data.draw(json_values, label=field)
            world.handler.message(client.conn, json.dumps(frame))
        prefix, event = "pusher:", "ping"  # and the envelope checks below on a ping
    for field in FIELDS[event]:
        payload: dict[str, Any] = {"channel": "presence-room"} if event != "signin" else {}
        payload[field] = data.draw(json_values, label=field)
        frame: dict[str, Any] = {"event": prefix + event, "data": payload}
        if data.draw(st.booleans(), label="data as string"):
            frame["data"] = json.dumps(payload)
        world.handler.message(client.conn, json.dumps(frame))
    # and the envelope's own fields
    for envelope in ({"event": data.draw(json_values)}, {"event": prefix + event, "channel": data.draw(json_values)},
                     {"event": prefix + event, "data": data.draw(json_values)},
                     {"event": "client-x", "channel": data.draw(json_values), "data": {}}):
        world.handler.message(client.conn, json.dumps(envelope))
    check_frames(client.transport.sent, client.transport.closes)
    for other in others:
        assert other.take() == []
    client.close()
    assert bookkeeping(world) == held


def test_handcrafted_hostile_frames() -> None:
    """Shapes found by the fuzzer (kept as regressions), plus the obvious extremes."""
    world = World(APP, OTHER)
    others = bystanders(world)
    held = bookkeeping(world)
    co = peer(world, 7)
    client = world.connect(APP.key, protocol=2)
    client.subscribe("private-room")
    sid = client.socket_id
    presence_data = '{"user_id":"u1","user_info":{"n":"\\ud800"}}'
    frames = [
        '{"event":"pusher:subscribe","data":{"channel":"\\ud800"}}',
        '{"event":"pusher:subscribe","data":{"channel":"presence-room","auth":"'
        + channel_auth(APP, sid, "presence-room", presence_data)
        + '","channel_data":' + json.dumps(presence_data) + "}}",
        '{"event":"pusher:signin","data":{"auth":"x\\udfff","user_data":"{\\"id\\":\\"u\\\\ud800\\"}"}}',
        '{"event":"client-x","channel":"private-room","data":{"v":NaN}}',
        '{"event":"pusher:channel_history","data":{"channel":"room","limit":Infinity}}',
        '{"event":"pusher:subscribe","data":{"channel":"room"}}',
        '{"event":"pusher:channel_history","data":{"channel":"room","limit":1e400,"start_serial":-1e999}}',
        '{"event":"client-x","channel":"private-room","data":{"v":1e400}}',
        '{"event":"pusher:resume","data":{"channel_positions":{"room":{"stream_id":"s","serial":1e400}}}}',
        '{"event":"pusher:ping","data":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"event":"pusher:subscribe","data":"' + '[' * 5000 + '"}',
        '{"event":"pusher:subscribe","data":{"channel":"room","pad":"' + "x" * 2_000_000 + '"}}',
        '{"event":"' + "pusher:" * 10_000 + '"}',
        '{"event":"pusher:resume","data":{"channel_positions":{' + ",".join(
            f'"c{i}":{{"serial":0}}' for i in range(5000)) + "}}}",
    ]
    for text in frames:
        world.handler.message(client.conn, text)
    check_frames(client.transport.sent, client.transport.closes)
    check_frames(co.transport.sent, co.transport.closes)
    for other in others:
        assert other.take() == []
    client.close()
    co.close()
    assert bookkeeping(world) == held


def test_a_frame_that_cannot_be_parsed_gets_4000_not_silence() -> None:
    world = World(APP)
    client = world.connect()
    for text in ("", "{", "[]", "null", '"x"', "{}", '{"event":1}', '{"event":"pusher:subscribe","data":7}'):
        world.handler.message(client.conn, text)
        frames = client.take()
        assert [f["event"] for f in frames] == ["pusher:error"], (text, frames)
        assert frames[0]["data"]["code"] == 4000


def test_deep_copy_of_recipes_is_not_needed() -> None:
    """``build`` never mutates its recipe (hypothesis may replay it while shrinking)."""
    recipe = {"kind": "mutated", "prefix": "pusher:", "channel": "room", "user_id": "u1", "user_info": {},
              "sign": "valid", "data_as_string": False, "value": {"a": [1]}, "override": ("channel", {"x": 1}),
              "drop": None, "base": "subscribe", "event": "pusher:subscribe", "text": "", "escape": None, "nesting": 0,
              "big": 0, "history": {}, "positions": {}}
    snapshot = copy.deepcopy(recipe)
    build(recipe, "1.1")
    assert recipe == snapshot
