"""The Pusher protocol for one connection, driven with recording transports."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from sockudo import handler as handler_module
from sockudo import rest
from sockudo.core.errors import PusherError
from tests.support.fakes import Client, World, channel_auth, data_of, make_app, user_auth


@pytest.fixture
def world() -> World:
    return World(make_app(enable_client_messages=True))


def errors(frames: list[dict[str, Any]]) -> list[int]:
    return [f["data"]["code"] for f in frames if f["event"] == "pusher:error"]


def only(frames: list[dict[str, Any]], event: str) -> dict[str, Any]:
    matching = [f for f in frames if f["event"] == event]
    assert len(matching) == 1, frames
    return matching[0]


def presence_ack(frames: list[dict[str, Any]]) -> dict[str, Any]:
    return data_of(only(frames, "pusher_internal:subscription_succeeded"))["presence"]


def subscribed(c: Client, channel: str, **kw: Any) -> list[dict[str, Any]]:
    c.subscribe(channel, **kw)
    frames = c.take()
    assert only(frames, "pusher_internal:subscription_succeeded")["channel"] == channel
    return frames


# -- connection_established and admission -------------------------------------


def test_connection_established_frame(world: World) -> None:
    c = world.connect()
    frame = c.established
    assert frame is not None
    assert frame["event"] == "pusher:connection_established"
    assert set(frame) == {"event", "data"}
    assert isinstance(frame["data"], str)  # a JSON string, as pusher-js expects
    data = json.loads(frame["data"])
    assert re.fullmatch(r"\d+\.\d+", data["socket_id"])
    assert data["socket_id"] == c.socket_id
    assert data["activity_timeout"] == 120


def test_activity_timeout_comes_from_config() -> None:
    w = World(make_app(), activity_timeout=42)
    established = w.connect().established
    assert established is not None and data_of(established)["activity_timeout"] == 42


def test_socket_ids_are_unique(world: World) -> None:
    ids = {world.connect().socket_id for _ in range(200)}
    assert len(ids) == 200


def _admit_code(w: World, key: str | None = None, origin: str | None = None) -> int:
    with pytest.raises(PusherError) as info:
        w.handler.admit(key or w.app.key, origin)
    assert info.value.fatal
    return info.value.code


def test_unknown_app_key_is_4001(world: World) -> None:
    assert _admit_code(world, "no-such-key") == 4001


def test_disabled_app_is_4003() -> None:
    assert _admit_code(World(make_app(enabled=False))) == 4003


def test_app_connection_quota_is_4004() -> None:
    w = World(make_app(max_connections=2))
    a = w.connect()
    w.connect()
    assert _admit_code(w) == 4004
    a.close()
    w.connect()  # a slot freed up


def test_node_connection_limit_is_4100() -> None:
    w = World(make_app(id="1", key="k1"), make_app(id="2", key="k2"), max_connections=2)
    w.connect("k1")
    w.connect("k2")
    assert _admit_code(w, "k1") == 4100
    assert _admit_code(w, "k2") == 4100


@pytest.mark.parametrize(
    ("allowed", "origin", "ok"),
    [
        ((), None, True),
        ((), "https://anything.test", True),
        (("*",), None, True),
        (("any",), "https://x.test", True),
        (("https://app.example.com",), "https://app.example.com", True),
        (("https://app.example.com",), "HTTPS://App.Example.COM", True),
        (("https://app.example.com",), "http://app.example.com", False),
        (("https://app.example.com",), "https://evil.com", False),
        (("https://app.example.com",), None, False),
        (("https://app.example.com",), "", False),
        (("https://*.example.com",), "https://a.example.com", True),
        (("https://*.example.com",), "https://example.com", False),
        (("https://*.example.com",), "https://a.example.com.evil.com", False),
        (("https://*.example.com",), "https://evilexample.com", False),
        (("https://*.example.com",), "https://.example.com", False),  # the wildcard must match something
        (("https://*.example.com",), "http://a.example.com", False),
        # the wildcard matches the parsed host, not a string suffix of the whole origin
        (("https://*.example.com",), "https://evil.com/.example.com", False),
        (("https://*.example.com",), "https://evil.com?.example.com", False),
        (("https://*.example.com",), "https://evil.com#.example.com", False),
        (("https://*.example.com",), "https://a.example.com@evil.com", False),
        (("https://*.example.com",), "https://x@a.example.com", False),
        (("https://*.example.com",), "https://evil.com\\.example.com", False),
        (("https://*.example.com",), "https://a.example.com:8443", False),
        (("https://*.example.com:8443",), "https://a.example.com:8443", True),
        (("https://*.example.com",), "https://a.example.com/", True),
        (("example.com",), "https://example.com", True),
        (("example.com",), "http://example.com", True),
        (("example.com",), "https://sub.example.com", False),
        (("localhost:3000",), "http://localhost:3000", True),
        (("localhost:3000",), "http://localhost:3001", False),
        (("https://a.com", "https://b.com"), "https://b.com", True),
    ],
)
def test_origin_allow_list(allowed: tuple[str, ...], origin: str | None, ok: bool) -> None:
    w = World(make_app(allowed_origins=allowed))
    if ok:
        w.connect(origin=origin)
    else:
        assert _admit_code(w, origin=origin) == 4009


# -- subscribe: public, private, presence -----------------------------------


def test_public_subscribe_is_acked(world: World) -> None:
    c = world.connect()
    c.take()
    c.send({"event": "pusher:subscribe", "data": {"channel": "news", "auth": ""}})  # pusher-js sends auth ""
    (ack,) = c.take()
    assert ack == {"event": "pusher_internal:subscription_succeeded", "channel": "news", "data": "{}"}


def test_subscribe_data_as_json_string(world: World) -> None:
    c = world.connect()
    c.take()
    c.send({"event": "pusher:subscribe", "data": json.dumps({"channel": "news"})})
    assert c.take_events() == ["pusher_internal:subscription_succeeded"]


def test_sockudo_prefix_routes_like_pusher(world: World) -> None:
    c = world.connect()
    c.take()
    c.send({"event": "sockudo:subscribe", "data": {"channel": "news"}})
    assert c.take_events() == ["pusher_internal:subscription_succeeded"]


def test_private_subscribe_with_golden_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handler_module, "new_socket_id", lambda: "1234.5678")
    w = World(make_app(key="app-key", secret="app-secret"))
    c = w.connect()
    c.take()
    golden = "app-key:d7d4254b75e2b60944b91bc92e916d56da84c4835011f5aa3c59a8e7f6e8b65d"
    c.subscribe("private-foo", auth=golden)
    assert c.take_events() == ["pusher_internal:subscription_succeeded"]


def test_private_subscribe_with_good_auth(world: World) -> None:
    c = world.connect()
    subscribed(c, "private-room")
    assert "private-room" in c.conn.channels


@pytest.mark.parametrize("channel", ["private-room", "private-encrypted-room", "presence-room"])
def test_bad_auth_gives_subscription_error_401_and_4009(world: World, channel: str) -> None:
    c = world.connect()
    other = world.connect()
    c.take()
    channel_data = '{"user_id":"u1"}' if channel.startswith("presence-") else None
    # A signature valid for another socket is still wrong for this one.
    c.subscribe(channel, channel_data=channel_data, auth=channel_auth(c.app, other.socket_id, channel, channel_data))
    frames = c.take()
    err = only(frames, "pusher:subscription_error")
    assert err["channel"] == channel
    assert err["data"]["status"] == 401
    assert errors(frames) == [4009]
    assert c.transport.closes == []  # non-fatal
    assert channel not in c.conn.channels
    assert world.adapter.subscriber_count(world.app.id, channel) == 0


def test_missing_auth_is_rejected(world: World) -> None:
    c = world.connect()
    c.take()
    c.send({"event": "pusher:subscribe", "data": {"channel": "private-room"}})
    frames = c.take()
    assert only(frames, "pusher:subscription_error")["data"]["status"] == 401
    assert errors(frames) == [4009]
    c.send({"event": "pusher:subscribe", "data": {"channel": "private-room", "auth": ""}})
    assert errors(c.take()) == [4009]


def test_auth_signed_with_another_apps_secret_is_rejected(world: World) -> None:
    c = world.connect()
    c.take()
    c.subscribe("private-room", auth=channel_auth(make_app(secret="other"), c.socket_id, "private-room"))
    assert errors(c.take()) == [4009]


@pytest.mark.parametrize("channel", ["bad channel", "x" * 201, "", "star*"])
def test_bad_channel_name_is_4300_with_status_400(world: World, channel: str) -> None:
    c = world.connect()
    c.take()
    c.send({"event": "pusher:subscribe", "data": {"channel": channel}})
    frames = c.take()
    assert errors(frames) == [4300]
    sub_errors = [f for f in frames if f["event"] == "pusher:subscription_error"]
    for f in sub_errors:
        assert f["data"]["status"] == 400
    if channel:
        assert len(sub_errors) == 1
    assert c.transport.closes == []


def test_app_channel_name_limit_applies() -> None:
    w = World(make_app(max_channel_name_length=10))
    c = w.connect()
    c.take()
    c.subscribe("x" * 11)
    assert errors(c.take()) == [4300]
    subscribed(c, "x" * 10)


def test_presence_subscribe_ack_shape(world: World) -> None:
    c = world.connect()
    frames = subscribed(c, "presence-room", user_id="u1", user_info={"name": "Ann"})
    ack = only(frames, "pusher_internal:subscription_succeeded")
    assert isinstance(ack["data"], str)
    assert json.loads(ack["data"]) == {"presence": {"ids": ["u1"], "hash": {"u1": {"name": "Ann"}}, "count": 1}}


def test_presence_accepts_python_style_channel_data(world: World) -> None:
    """The python SDK's json.dumps uses ", " and ": "; the raw string is what's signed."""
    c = world.connect()
    raw = json.dumps({"user_id": "u1", "user_info": {"name": "Ann"}})
    assert ", " in raw
    frames = subscribed(c, "presence-room", channel_data=raw)
    assert presence_ack(frames)["hash"] == {"u1": {"name": "Ann"}}


def test_presence_auth_over_reserialised_data_is_rejected(world: World) -> None:
    c = world.connect()
    c.take()
    raw = json.dumps({"user_id": "u1", "user_info": {"name": "Ann"}})
    compact = json.dumps(json.loads(raw), separators=(",", ":"))
    c.subscribe("presence-room", channel_data=raw, auth=channel_auth(c.app, c.socket_id, "presence-room", compact))
    assert errors(c.take()) == [4009]


@pytest.mark.parametrize(
    "channel_data",
    [None, "not json", "[1]", '{"user_info":{}}', '{"user_id":""}', '{"user_id":null}', '{"user_id":true}'],
)
def test_presence_needs_channel_data_with_a_user_id(world: World, channel_data: str | None) -> None:
    c = world.connect()
    c.take()
    data: dict[str, Any] = {
        "channel": "presence-room",
        "auth": channel_auth(c.app, c.socket_id, "presence-room", channel_data),
    }
    if channel_data is not None:
        data["channel_data"] = channel_data
    c.send({"event": "pusher:subscribe", "data": data})
    frames = c.take()
    assert "pusher:subscription_error" in [f["event"] for f in frames]
    assert errors(frames)
    assert c.transport.closes == []
    assert world.adapter.presence_members(world.app.id, "presence-room") == {}


def test_numeric_user_id_is_accepted_and_stringified(world: World) -> None:
    a = world.connect()
    b = world.connect()
    subscribed(a, "presence-room", user_id="u1")
    frames = subscribed(b, "presence-room", channel_data='{"user_id":42,"user_info":{"n":1}}')
    ack = presence_ack(frames)
    assert sorted(ack["ids"]) == ["42", "u1"]
    assert ack["hash"]["42"] == {"n": 1}
    added = only(a.take(), "pusher_internal:member_added")
    assert data_of(added) == {"user_id": "42", "user_info": {"n": 1}}


def test_presence_ids_and_count_are_unique_users(world: World) -> None:
    a1, a2, b = world.connect(), world.connect(), world.connect()
    subscribed(a1, "presence-room", user_id="a")
    subscribed(a2, "presence-room", user_id="a")
    ack = presence_ack(subscribed(b, "presence-room", user_id="b"))
    assert sorted(ack["ids"]) == ["a", "b"]
    assert ack["count"] == 2
    assert sorted(ack["hash"]) == ["a", "b"]


def test_member_added_only_on_a_users_first_socket_and_never_to_the_joiner(world: World) -> None:
    watcher = world.connect()
    subscribed(watcher, "presence-room", user_id="w")
    a1 = world.connect()
    frames = subscribed(a1, "presence-room", user_id="a", user_info={"tab": 1})
    assert "pusher_internal:member_added" not in [f["event"] for f in frames]
    added = only(watcher.take(), "pusher_internal:member_added")
    assert added["channel"] == "presence-room"
    assert isinstance(added["data"], str)
    assert json.loads(added["data"]) == {"user_id": "a", "user_info": {"tab": 1}}
    # The same user's second socket: nobody hears about it.
    a2 = world.connect()
    subscribed(a2, "presence-room", user_id="a", user_info={"tab": 2})
    assert watcher.take() == []
    assert a1.take() == []


def test_member_removed_only_after_the_last_socket(world: World) -> None:
    watcher, a1, a2 = world.connect(), world.connect(), world.connect()
    for c, uid in ((watcher, "w"), (a1, "a"), (a2, "a")):
        subscribed(c, "presence-room", user_id=uid)
    watcher.take()
    a1.unsubscribe("presence-room")
    assert watcher.take() == []
    a2.close()
    removed = only(watcher.take(), "pusher_internal:member_removed")
    assert removed["channel"] == "presence-room"
    assert json.loads(removed["data"]) == {"user_id": "a"}
    assert world.adapter.presence_members(world.app.id, "presence-room").keys() == {"w"}


def test_member_removed_on_unsubscribe_of_the_only_socket(world: World) -> None:
    watcher, a = world.connect(), world.connect()
    subscribed(watcher, "presence-room", user_id="w")
    subscribed(a, "presence-room", user_id="a")
    watcher.take()
    a.unsubscribe("presence-room")
    assert data_of(only(watcher.take(), "pusher_internal:member_removed")) == {"user_id": "a"}
    assert a.take() == []


def test_presence_member_limit_is_4100() -> None:
    w = World(make_app(max_presence_members_per_channel=2))
    a, b, c, a2 = (w.connect() for _ in range(4))
    subscribed(a, "presence-room", user_id="a")
    subscribed(b, "presence-room", user_id="b")
    c.take()
    c.subscribe("presence-room", user_id="c")
    frames = c.take()
    assert errors(frames) == [4100]
    assert only(frames, "pusher:subscription_error")["channel"] == "presence-room"
    assert c.transport.closes == []
    # A second socket of a user already present does not add a member.
    subscribed(a2, "presence-room", user_id="a")


def test_user_info_size_limit_is_4300() -> None:
    w = World(make_app(max_presence_member_size_in_kb=1))
    c = w.connect()
    c.take()
    c.subscribe("presence-room", user_id="u", user_info={"bio": "x" * 1100})
    frames = c.take()
    assert errors(frames) == [4300]
    assert only(frames, "pusher:subscription_error")["data"]["status"] == 400
    subscribed(c, "presence-room", user_id="u", user_info={"bio": "x" * 900})


def test_resubscribe_re_acks_and_does_not_double_count(world: World) -> None:
    watcher, c = world.connect(), world.connect()
    subscribed(watcher, "presence-room", user_id="w")
    subscribed(c, "presence-room", user_id="u")
    subscribed(c, "news")
    watcher.take()
    before = world.sample("sockudo_channel_subscriptions_total", channel_type="presence")
    ack = presence_ack(subscribed(c, "presence-room", user_id="u"))
    assert ack["count"] == 2
    subscribed(c, "news")
    assert world.adapter.subscriber_count(world.app.id, "presence-room") == 2
    assert world.adapter.subscriber_count(world.app.id, "news") == 1
    assert world.sample("sockudo_channel_subscriptions_total", channel_type="presence") == before
    assert watcher.take() == []  # no second member_added
    assert len(world.lifecycle("member_added")) == 2
    assert len(world.lifecycle("channel_occupied")) == 2


def test_unsubscribe_from_a_channel_not_joined_is_ignored(world: World) -> None:
    c = world.connect()
    c.take()
    c.unsubscribe("news")
    c.send({"event": "pusher:unsubscribe", "data": {}})
    assert c.take() == []
    assert world.lifecycle("channel_vacated") == []


# -- client events ---------------------------------------------------------------------


def _pair(w: World, channel: str = "private-chat", **kw: Any) -> tuple[Client, Client]:
    a, b = w.connect(), w.connect()
    if channel.startswith("presence-"):
        subscribed(a, channel, user_id="ua")
        subscribed(b, channel, user_id="ub")
    else:
        subscribed(a, channel)
        subscribed(b, channel)
    a.take()
    return a, b


def test_client_event_is_relayed_to_others_but_not_echoed(world: World) -> None:
    a, b = _pair(world)
    third = world.connect()
    subscribed(third, "private-chat")
    a.send({"event": "client-typing", "channel": "private-chat", "data": {"who": "A"}})
    expected = {"event": "client-typing", "channel": "private-chat", "data": {"who": "A"}}
    assert b.take() == [expected]
    assert third.take() == [expected]
    assert a.take() == []


def test_client_event_data_string_is_relayed_verbatim(world: World) -> None:
    a, b = _pair(world)
    a.send({"event": "client-x", "channel": "private-chat", "data": '{"raw": true}'})
    assert b.take() == [{"event": "client-x", "channel": "private-chat", "data": '{"raw": true}'}]


def test_client_event_on_presence_carries_user_id(world: World) -> None:
    a, b = _pair(world, "presence-room")
    b.take()
    a.send({"event": "client-typing", "channel": "presence-room", "data": {}})
    (frame,) = b.take()
    assert frame["user_id"] == "ua"
    hook = world.lifecycle("client_event")[-1]
    assert hook["user_id"] == "ua"
    assert hook["socket_id"] == a.socket_id
    assert hook["event"] == "client-typing"
    assert hook["channel"] == "presence-room"


def test_client_events_disabled_is_4301() -> None:
    w = World(make_app(enable_client_messages=False))
    a, b = _pair(w)
    a.send({"event": "client-x", "channel": "private-chat", "data": {}})
    assert errors(a.take()) == [4301]
    assert b.take() == []
    assert a.transport.closes == []


@pytest.mark.parametrize("channel", ["public-chat", "private-encrypted-chat", "#server-to-user-u1"])
def test_client_events_on_wrong_channel_types_are_4301(world: World, channel: str) -> None:
    a, b = world.connect(), world.connect()
    if channel.startswith("private-"):
        subscribed(a, channel)
        subscribed(b, channel)
    elif not channel.startswith("#"):
        subscribed(a, channel)
        subscribed(b, channel)
    a.take()
    a.send({"event": "client-x", "channel": channel, "data": {}})
    assert errors(a.take()) == [4301]
    assert b.take() == []


def test_client_event_when_not_subscribed_is_4301(world: World) -> None:
    a, b = world.connect(), world.connect()
    subscribed(b, "private-chat")
    a.take()
    a.send({"event": "client-x", "channel": "private-chat", "data": {}})
    assert errors(a.take()) == [4301]
    assert b.take() == []


def test_client_event_payload_limit_is_4301() -> None:
    w = World(make_app(enable_client_messages=True, max_event_payload_in_kb=1))
    a, b = _pair(w)
    a.send({"event": "client-x", "channel": "private-chat", "data": {"x": "y" * 1100}})
    assert errors(a.take()) == [4301]
    assert b.take() == []


def test_client_event_rate_limit_per_second() -> None:
    w = World(make_app(enable_client_messages=True, max_client_events_per_second=3))
    a, b = _pair(w)
    for i in range(3):
        a.send({"event": "client-x", "channel": "private-chat", "data": {"i": i}})
    assert len(b.take()) == 3
    assert a.take() == []
    w.clock.advance(0.5)
    a.send({"event": "client-x", "channel": "private-chat", "data": {"i": 3}})
    frames = a.take()
    assert errors(frames) == [4301]
    assert "rate limit" in frames[0]["data"]["message"]
    assert b.take() == []
    assert a.transport.closes == []
    w.clock.advance(0.6)  # a new one-second window
    a.send({"event": "client-x", "channel": "private-chat", "data": {"i": 4}})
    assert [data_of(f)["i"] for f in b.take()] == [4]
    assert w.sample("sockudo_client_events_rejected_total", reason="rate_limited") == 1


def test_client_event_name_limit_is_4301() -> None:
    w = World(make_app(enable_client_messages=True, max_event_name_length=20))
    a, b = _pair(w)
    a.send({"event": "client-" + "x" * 14, "channel": "private-chat", "data": {}})
    assert errors(a.take()) == [4301]
    a.send({"event": "client-" + "x" * 13, "channel": "private-chat", "data": {}})
    assert a.take() == []
    assert len(b.take()) == 1


def test_subscription_count_when_the_app_enables_it() -> None:
    w = World(make_app(enable_subscription_count=True))
    a, b = w.connect(), w.connect()
    subscribed(a, "news")
    a.take()
    b.subscribe("news")
    expected = {"event": "pusher_internal:subscription_count", "channel": "news", "data": '{"subscription_count":2}'}
    assert expected in a.take()
    assert expected in b.take()
    b.close()
    assert data_of(only(a.take(), "pusher_internal:subscription_count")) == {"subscription_count": 1}


def test_no_subscription_count_by_default(world: World) -> None:
    a, b = world.connect(), world.connect()
    subscribed(a, "news")
    subscribed(b, "news")
    assert a.take() == []


def test_non_client_unknown_events_are_ignored(world: World) -> None:
    a, b = _pair(world)
    a.send({"event": "my-event", "channel": "private-chat", "data": {}})
    a.send({"event": "pusher:unknown_thing", "data": {}})
    assert a.take() == [] and b.take() == []


# -- cache channels ---------------------------------------------------------------------


def test_cache_miss_when_empty(world: World) -> None:
    c = world.connect()
    frames = subscribed(c, "cache-prices")
    assert [f["event"] for f in frames] == ["pusher_internal:subscription_succeeded", "pusher:cache_miss"]
    assert frames[1]["channel"] == "cache-prices"
    assert world.lifecycle("cache_miss") == [{"name": "cache_miss", "channel": "cache-prices"}]


def test_cache_replays_last_rest_published_event(world: World) -> None:
    rest.trigger(world.services, world.app, {"name": "price", "channel": "cache-prices", "data": "1"})
    rest.trigger(world.services, world.app, {"name": "price", "channel": "cache-prices", "data": "2"})
    c = world.connect()
    frames = subscribed(c, "cache-prices")
    assert frames[1:] == [{"event": "price", "channel": "cache-prices", "data": "2"}]
    assert world.lifecycle("cache_miss") == []


def test_cached_event_expires(world: World) -> None:
    rest.trigger(world.services, world.app, {"name": "price", "channel": "cache-prices", "data": "1"})
    world.clock.advance(handler_module.CACHE_TTL_SECONDS + 1)
    c = world.connect()
    assert [f["event"] for f in subscribed(c, "cache-prices")][-1] == "pusher:cache_miss"


def test_presence_cache_channel_is_presence_with_cache(world: World) -> None:
    c = world.connect()
    frames = subscribed(c, "presence-cache-room", user_id="u1")
    assert presence_ack(frames)["ids"] == ["u1"]
    assert frames[-1]["event"] == "pusher:cache_miss"


def test_not_a_cache_channel_gets_no_cache_frames(world: World) -> None:
    c = world.connect()
    assert [f["event"] for f in subscribed(c, "x-cache-y")] == ["pusher_internal:subscription_succeeded"]


# -- sign-in, server-to-user, watchlist -----------------------------------------------


def test_signin_success_echoes_user_data(world: World) -> None:
    c = world.connect()
    c.take()
    # python-style separators: the reply must carry the very string that was signed
    user_data = c.signin(json.dumps({"id": "u1", "user_info": {"name": "A"}}))
    assert ", " in user_data
    (frame,) = c.take()
    assert frame == {"event": "pusher:signin_success", "data": {"user_data": user_data}}


def test_signin_golden_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handler_module, "new_socket_id", lambda: "1234.5678")
    w = World(make_app(key="app-key", secret="app-secret"))
    c = w.connect()
    c.take()
    golden = "app-key:5ba671aa7bd507bed73ee100ddde26597f227f0a8c084fd2bd69b0ba095bcd19"
    c.signin('{"id":"u1","name":"A"}', auth=golden)
    assert c.take_events() == ["pusher:signin_success"]


def test_signin_with_bad_signature_is_non_fatal_4009(world: World) -> None:
    c = world.connect()
    other = world.connect()
    c.take()
    user_data = json.dumps({"id": "u1"})
    c.signin(user_data, auth=user_auth(c.app, other.socket_id, user_data))
    assert errors(c.take()) == [4009]
    assert c.transport.closes == []
    assert not c.conn.signed_in
    # The socket still works.
    subscribed(c, "news")


@pytest.mark.parametrize("user", ['{"name":"no id"}', '{"id":""}', '{"id":42}', "[]", "not json"])
def test_signin_needs_a_string_id(world: World, user: str) -> None:
    c = world.connect()
    c.take()
    c.signin(user)
    assert errors(c.take()) == [4009]
    assert c.transport.closes == []


def test_server_to_user_channel_only_for_the_signed_in_user(world: World) -> None:
    c = world.connect()
    c.take()
    c.subscribe("#server-to-user-u1")
    assert errors(c.take()) == [4009]  # not signed in yet
    c.signin({"id": "u1"})
    c.take()
    c.subscribe("#server-to-user-u2")
    frames = c.take()
    assert errors(frames) == [4009]
    assert only(frames, "pusher:subscription_error")["data"]["status"] == 401
    subscribed(c, "#server-to-user-u1")


def test_send_to_user_reaches_every_socket_of_the_user(world: World) -> None:
    a1, a2, b = world.connect(), world.connect(), world.connect()
    for c, uid in ((a1, "u1"), (a2, "u1"), (b, "u2")):
        c.signin({"id": uid})
        subscribed(c, f"#server-to-user-{uid}")
    rest.trigger(world.services, world.app, {"name": "note", "channel": "#server-to-user-u1", "data": "hi"})
    expected = [{"event": "note", "channel": "#server-to-user-u1", "data": "hi"}]
    assert a1.take() == expected
    assert a2.take() == expected
    assert b.take() == []


def _watch_events(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for f in frames:
        if f["event"] == "pusher_internal:watchlist_events":
            out.extend(data_of(f)["events"])
    return out


def test_watchlist_online_offline() -> None:
    w = World(make_app(enable_watchlist_events=True))
    watcher = w.connect()
    watcher.take()
    watcher.signin({"id": "w", "watchlist": ["b"]})
    frames = watcher.take()
    assert frames[0]["event"] == "pusher:signin_success"
    assert _watch_events(frames) == [{"name": "offline", "user_ids": ["b"]}]

    b1 = w.connect()
    b1.signin({"id": "b"})
    online = only(watcher.take(), "pusher_internal:watchlist_events")
    assert online == {
        "event": "pusher_internal:watchlist_events",
        "data": {"events": [{"name": "online", "user_ids": ["b"]}]},
    }

    b2 = w.connect()
    b2.signin({"id": "b"})
    assert watcher.take() == []  # already online
    b1.close()
    assert watcher.take() == []
    b2.close()
    assert _watch_events(watcher.take()) == [{"name": "offline", "user_ids": ["b"]}]


def test_watchlist_initial_state_lists_online_users() -> None:
    w = World(make_app(enable_watchlist_events=True))
    b = w.connect()
    b.signin({"id": "b"})
    watcher = w.connect()
    watcher.take()
    watcher.signin({"id": "w", "watchlist": ["b", "c"]})
    assert _watch_events(watcher.take()) == [
        {"name": "online", "user_ids": ["b"]},
        {"name": "offline", "user_ids": ["c"]},
    ]


def test_no_watchlist_frames_unless_the_app_enables_them(world: World) -> None:
    watcher = world.connect()
    watcher.take()
    watcher.signin({"id": "w", "watchlist": ["b"]})
    b = world.connect()
    b.signin({"id": "b"})
    b.close()
    assert _watch_events(watcher.take()) == []


def test_user_authentication_timeout_closes_4009() -> None:
    w = World(make_app(enable_user_authentication=True), user_authentication_timeout=60)
    lazy, signer, subscriber = w.connect(), w.connect(), w.connect()
    signer.signin({"id": "s"})
    subscribed(subscriber, "private-x")
    now = w.clock.advance(61)
    for c in (lazy, signer, subscriber):
        c.take()
        w.handler.check_liveness(c.conn, now)
    assert errors(lazy.take()) == [4009]
    assert lazy.closed_with == 4009
    for c in (signer, subscriber):
        assert errors(c.take()) == []
        assert c.transport.closes == []


# -- liveness ---------------------------------------------------------------------------


def test_idle_socket_is_pinged_then_closed_4201(world: World) -> None:
    c = world.connect()
    c.take()
    world.handler.check_liveness(c.conn, world.clock.advance(119))
    assert c.take() == []
    world.handler.check_liveness(c.conn, world.clock.advance(1))
    (ping,) = c.take()
    assert ping["event"] == "pusher:ping"
    world.handler.check_liveness(c.conn, world.clock.advance(29))
    assert c.take() == []
    world.handler.check_liveness(c.conn, world.clock.advance(1))
    frames = c.take()
    assert errors(frames) == [4201]
    assert frames[0]["data"]["message"] == "Pong reply not received in time"
    assert c.closed_with == 4201
    assert world.sample("sockudo_connection_errors_total", error_type="pong_timeout") == 1


@pytest.mark.parametrize(
    "reply",
    [{"event": "pusher:pong", "data": {}}, {"event": "pusher:subscribe", "data": {"channel": "a"}}, "not even json"],
)
def test_any_inbound_frame_resets_liveness(world: World, reply: Any) -> None:
    c = world.connect()
    world.handler.check_liveness(c.conn, world.clock.advance(120))
    assert "pusher:ping" in c.take_events()
    world.clock.advance(20)
    c.send(reply)
    c.take()
    world.handler.check_liveness(c.conn, world.clock.advance(15))  # 35 s after the ping
    assert c.take() == []
    assert c.transport.closes == []
    world.handler.check_liveness(c.conn, world.clock.advance(105))  # idle again for 120 s
    assert c.take_events() == ["pusher:ping"]


def test_websocket_level_activity_counts(world: World) -> None:
    c = world.connect()
    c.take()
    world.clock.advance(100)
    world.handler.touch(c.conn)
    world.handler.check_liveness(c.conn, world.clock.advance(100))
    assert c.take() == []


@pytest.mark.parametrize(
    "ping",
    [
        {"event": "pusher:ping", "data": {}},
        {"event": "pusher:ping", "data": ""},
        '{"event": "pusher:ping", "data": ""}',
        {"event": "pusher:ping"},
    ],
)
def test_client_ping_gets_pong(world: World, ping: Any) -> None:
    c = world.connect()
    c.take()
    c.send(ping)
    assert c.take_events() == ["pusher:pong"]


@pytest.mark.parametrize(
    "text", ["{not json", "[]", '{"data":{}}', '"pusher:ping"', '{"event":"pusher:subscribe","data":"not json"}']
)
def test_malformed_frames_get_4000_and_the_socket_stays_open(world: World, text: str) -> None:
    c = world.connect()
    c.take()
    c.send(text)
    assert errors(c.take()) == [4000]
    assert c.transport.closes == []
    subscribed(c, "still-works")


def test_binary_frames_get_4000(world: World) -> None:
    c = world.connect()
    c.take()
    world.handler.binary_message(c.conn)
    assert errors(c.take()) == [4000]
    assert c.transport.closes == []


def test_shutdown_sends_4200_then_closes(world: World) -> None:
    c = world.connect()
    c.take()
    world.handler.shutdown(c.conn)
    assert errors(c.take()) == [4200]
    assert c.closed_with == 4200


def test_closed_socket_gets_nothing_more(world: World) -> None:
    a, b = _pair(world)
    b.close()
    b.take()
    a.send({"event": "client-x", "channel": "private-chat", "data": {}})
    rest.trigger(world.services, world.app, {"name": "e", "channel": "private-chat", "data": "d"})
    world.handler.message(b.conn, '{"event":"pusher:ping"}')
    assert b.take() == []


# -- lifecycle events and clean-up ----------------------------------------------------------


def test_lifecycle_events_at_the_right_transitions(world: World) -> None:
    a, b = world.connect(), world.connect()
    subscribed(a, "presence-room", user_id="u1")
    subscribed(b, "presence-room", user_id="u1")
    assert world.lifecycle() == [
        {"name": "channel_occupied", "channel": "presence-room"},
        {"name": "member_added", "channel": "presence-room", "user_id": "u1"},
    ]
    a.close()
    assert len(world.lifecycle()) == 2
    b.unsubscribe("presence-room")
    assert world.lifecycle()[2:] == [
        {"name": "member_removed", "channel": "presence-room", "user_id": "u1"},
        {"name": "channel_vacated", "channel": "presence-room"},
    ]
    assert all(app_id == world.app.id for app_id, _ in world.sink.events)


def test_occupied_and_vacated_once_per_channel(world: World) -> None:
    clients = [world.connect() for _ in range(3)]
    for c in clients:
        subscribed(c, "news")
    for c in clients:
        c.close()
    assert world.lifecycle() == [
        {"name": "channel_occupied", "channel": "news"},
        {"name": "channel_vacated", "channel": "news"},
    ]


def test_client_event_lifecycle_on_private_channel_has_no_user_id(world: World) -> None:
    a, _ = _pair(world)
    a.send({"event": "client-x", "channel": "private-chat", "data": {"k": 1}})
    (hook,) = world.lifecycle("client_event")
    assert hook["channel"] == "private-chat"
    assert hook["event"] == "client-x"
    assert json.loads(hook["data"]) == {"k": 1}
    assert hook["socket_id"] == a.socket_id
    assert "user_id" not in hook


def test_closing_every_socket_leaves_no_state_behind(world: World) -> None:
    w = World(make_app(enable_watchlist_events=True, enable_client_messages=True))
    clients = [w.connect() for _ in range(4)]
    for i, c in enumerate(clients):
        c.signin({"id": f"u{i % 2}", "watchlist": ["u0", "u1"]})
        subscribed(c, "presence-room", user_id=f"u{i % 2}")
        subscribed(c, "private-chat")
        subscribed(c, "news")
        subscribed(c, f"#server-to-user-u{i % 2}")
    for c in clients:
        c.close()
    assert w.adapter.namespaces == {}


def test_close_is_idempotent(world: World) -> None:
    c = world.connect()
    subscribed(c, "presence-room", user_id="u")
    c.close()
    c.close()
    assert len(world.lifecycle("member_removed")) == 1
    assert world.sample("sockudo_connected") == 0


# -- metrics ------------------------------------------------------------------------------------


def test_connection_and_subscription_metrics_move(world: World) -> None:
    a, b = world.connect(), world.connect()
    assert world.sample("sockudo_connected") == 2
    assert world.sample("sockudo_new_connections_total") == 2
    subscribed(a, "news")
    subscribed(b, "news")
    subscribed(a, "presence-room", user_id="u")
    assert world.sample("sockudo_channel_subscriptions_total", channel_type="public") == 2
    assert world.sample("sockudo_channel_subscriptions_total", channel_type="presence") == 1
    a.close()
    assert world.sample("sockudo_connected") == 1
    assert world.sample("sockudo_new_disconnections_total") == 1
    assert world.sample("sockudo_channel_unsubscriptions_total", channel_type="public") == 1


def test_refused_connections_are_counted(world: World) -> None:
    with pytest.raises(PusherError):
        world.handler.admit("nope", None)
    # The label is fixed: a client must not be able to mint new series with made-up keys.
    assert world.sample("sockudo_connection_errors_total", app_id="unknown", error_type="app_not_found") == 1
    assert world.sample("sockudo_connection_errors_total", app_id="nope", error_type="app_not_found") == 0


def test_message_counters(world: World) -> None:
    a, b = _pair(world)
    received_before = world.sample("sockudo_ws_messages_received_total")
    a.send({"event": "client-x", "channel": "private-chat", "data": {}})
    assert world.sample("sockudo_ws_messages_received_total") == received_before + 1
    assert world.sample("sockudo_client_events_received_total") == 1
