"""End to end with the real clients: pusher-js 8 (``tests/js/driver.js``, auth signed by the
node ``pusher`` SDK) subscribing, and the official Python ``pusher`` SDK publishing.

What a user of a Pusher-compatible server relies on: delivery with the exact data, socket
exclusion, private/presence/encrypted/cache channels, client events, sign-in with
server-to-user events and watchlists, terminating users, the connection-level error codes
pusher-js acts on, and the channel queries of the REST API.

One server per module, with one app per feature that needs its own settings or an exact
channel list; every test uses its own channel and user names. "Did not happen" is shown by
a later sentinel event on the same socket where possible (frames on one socket are ordered),
and by a short bounded observation only where nothing can follow (a client that must stay
down).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import pusher
import pytest

from tests.support.procs import ServerProcess, wait_until
from tests.support.pusherjs import PusherJsClient, PusherJsDriver
from tests.support.sdk import APP, sdk_for

APP_NO_CLIENT_EVENTS = {"id": "101", "key": "pjs-noclient-key", "secret": "pjs-noclient-secret"}
APP_WATCHLIST: dict[str, Any] = {"id": "102", "key": "pjs-watch-key", "secret": "pjs-watch-secret",
                                 "enable_watchlist_events": True}
APP_ONE_CONNECTION: dict[str, Any] = {"id": "103", "key": "pjs-one-key", "secret": "pjs-one-secret",
                                      "max_connections": 1}
APP_QUERIES = {"id": "104", "key": "pjs-query-key", "secret": "pjs-query-secret"}

MASTER_KEY_B64 = base64.b64encode(bytes(range(32))).decode()

#: How long a client that must stay down is watched for a reconnect attempt. pusher-js
#: reconnects at once for 4200-4299 and after ~1 s for transport errors.
NO_RECONNECT_WINDOW = 1.5


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess([APP, APP_NO_CLIENT_EVENTS, APP_WATCHLIST, APP_ONE_CONNECTION, APP_QUERIES]).start()
    yield proc
    proc.stop()


@pytest.fixture
def connect(pusherjs: PusherJsDriver, server: ServerProcess) -> Callable[..., PusherJsClient]:
    """``connect(name, app=APP, wait=True, **driver options)``: a pusher-js client of ``app``."""

    def make(name: str, app: dict[str, Any] = APP, *, wait: bool = True, **opts: Any) -> PusherJsClient:
        client = pusherjs.connect(name, key=app["key"], port=server.port, secret=app["secret"], app_id=app["id"],
                                  **opts)
        if wait:
            client.wait_connected()
        return client

    return make


def subscribed(client: PusherJsClient, *channels: str) -> PusherJsClient:
    for channel in channels:
        client.subscribe(channel)
    for channel in channels:
        client.wait_subscribed(channel)
    return client


def channel_events(client: PusherJsClient, channel: str, until: dict[str, Any]) -> list[str]:
    """Names of the events pusher-js emitted on ``channel`` before the event ``until``."""
    return [e["event"] for e in client.events("event") if e["channel"] == channel and e["_seq"] < until["_seq"]]


def raw_inbound(client: PusherJsClient, event: str) -> list[dict[str, Any]]:
    """The exact inbound frames named ``event``, parsed."""
    frames = [json.loads(e["data"]) for e in client.events("raw") if e["dir"] == "in"]
    return [f for f in frames if f.get("event") == event]


def assert_stays_down(client: PusherJsClient, closed: dict[str, Any]) -> None:
    """After a refused close, pusher-js must not open another WebSocket (no reconnect loop)."""
    # pusher-js may switch state before the close event reaches the driver: look from the start.
    client.wait_for(lambda e: e.get("type") == "state" and e.get("current") in ("disconnected", "failed"),
                    desc="state disconnected/failed")
    client.assert_no_event({"type": "ws_open_attempt"}, within=NO_RECONNECT_WINDOW, since=closed["_seq"])
    assert client.query()["state"] in ("disconnected", "failed")
    assert len(client.events("ws_open_attempt")) == 1


# -- public channels ---------------------------------------------------------------------


def test_trigger_reaches_pusherjs_with_the_exact_data(connect, sdk) -> None:
    alice = subscribed(connect("alice"), "pjs-public")
    payload = {"text": "héllo ✓", "n": 1, "f": 1.5, "nested": {"list": [1, None, True]}, "empty": ""}

    assert sdk.trigger("pjs-public", "order.created", payload) == {}
    ev = alice.wait_event("pjs-public", "order.created")
    assert ev["data"] == payload
    # The server relays the SDK's JSON string as is.
    frame = raw_inbound(alice, "order.created")[0]
    assert frame == {"event": "order.created", "channel": "pjs-public", "data": json.dumps(payload, ensure_ascii=False)}

    sdk.trigger("pjs-public", "plain", "just text, not JSON")
    assert alice.wait_event("pjs-public", "plain")["data"] == "just text, not JSON"


def test_trigger_to_several_channels(connect, sdk) -> None:
    alice = subscribed(connect("alice"), "pjs-multi-1")
    bob = subscribed(connect("bob"), "pjs-multi-1", "pjs-multi-2")

    sdk.trigger(["pjs-multi-1", "pjs-multi-2", "pjs-multi-nobody"], "fanout", {"k": "v"})
    assert alice.wait_event("pjs-multi-1", "fanout")["data"] == {"k": "v"}
    assert bob.wait_event("pjs-multi-1", "fanout")["data"] == {"k": "v"}
    assert bob.wait_event("pjs-multi-2", "fanout")["data"] == {"k": "v"}


def test_trigger_batch(connect, sdk) -> None:
    alice = subscribed(connect("alice"), "pjs-batch-1", "pjs-batch-2")

    sdk.trigger_batch([
        {"channel": "pjs-batch-1", "name": "first", "data": {"i": 1}},
        {"channel": "pjs-batch-2", "name": "second", "data": "two"},
        {"channel": "pjs-batch-1", "name": "third", "data": {"i": 3}},
    ])
    first = alice.wait_event("pjs-batch-1", "first")
    second = alice.wait_event("pjs-batch-2", "second")
    third = alice.wait_event("pjs-batch-1", "third")
    assert (first["data"], second["data"], third["data"]) == ({"i": 1}, "two", {"i": 3})
    assert first["_seq"] < second["_seq"] < third["_seq"]  # batch items are published in order


def test_socket_id_excludes_only_that_client(connect, sdk) -> None:
    alice = subscribed(connect("alice"), "pjs-exclude")
    bob = subscribed(connect("bob"), "pjs-exclude")

    sdk.trigger("pjs-exclude", "not-for-alice", {"x": 1}, socket_id=alice.socket_id)
    assert bob.wait_event("pjs-exclude", "not-for-alice")["data"] == {"x": 1}
    sdk.trigger("pjs-exclude", "sentinel", {})
    sentinel = alice.wait_event("pjs-exclude", "sentinel")
    assert "not-for-alice" not in channel_events(alice, "pjs-exclude", sentinel)


# -- private channels ----------------------------------------------------------------------


def test_private_channel_with_node_sdk_auth(connect, sdk) -> None:
    alice = connect("alice")
    alice.subscribe("private-pjs-orders")
    alice.wait_subscribed("private-pjs-orders")
    auth = alice.wait_for({"type": "auth", "kind": "channel", "channel": "private-pjs-orders"})
    assert auth["forged"] is False and auth["socket_id"] == alice.socket_id

    sdk.trigger("private-pjs-orders", "shipped", {"order": 7})
    assert alice.wait_event("private-pjs-orders", "shipped")["data"] == {"order": 7}


def test_forged_private_auth_is_refused_and_connection_stays_usable(connect, sdk) -> None:
    alice = connect("alice", forge_auth=["private-pjs-forged"])
    alice.subscribe("private-pjs-forged")
    err = alice.wait_event("private-pjs-forged", "pusher:subscription_error")
    assert err["data"]["status"] == 401
    assert err["data"]["type"] == "AuthError"
    assert alice.wait_error(4009)["error"]["data"]["code"] == 4009
    assert alice.query()["channels"]["private-pjs-forged"]["subscribed"] is False

    subscribed(alice, "private-pjs-after-forged")
    sdk.trigger("private-pjs-after-forged", "still-works", {"ok": True})
    assert alice.wait_event("private-pjs-after-forged", "still-works")["data"] == {"ok": True}
    assert alice.events("closed") == []
    assert alice.query()["state"] == "connected"


# -- presence ---------------------------------------------------------------------------------


def test_presence_members_are_per_user_not_per_tab(connect, sdk) -> None:
    room = "presence-pjs-room"
    alice_info, bob_info = {"name": "Alice"}, {"name": "Bob"}
    alice1 = connect("alice1", user_data={"user_id": "pjs-alice", "user_info": alice_info})
    bob = connect("bob", user_data={"user_id": "pjs-bob", "user_info": bob_info})
    alice2 = connect("alice2", user_data={"user_id": "pjs-alice", "user_info": alice_info})

    alice1.subscribe(room)
    ok = alice1.wait_subscribed(room)["data"]
    assert ok["ids"] == ["pjs-alice"] and ok["count"] == 1
    assert ok["me"] == {"id": "pjs-alice", "info": alice_info}

    bob.subscribe(room)
    ok = bob.wait_subscribed(room)["data"]
    assert sorted(ok["ids"]) == ["pjs-alice", "pjs-bob"] and ok["count"] == 2
    assert ok["members"] == {"pjs-alice": alice_info, "pjs-bob": bob_info}
    assert ok["me"] == {"id": "pjs-bob", "info": bob_info}
    added = alice1.wait_event(room, "pusher:member_added")
    assert added["data"] == {"id": "pjs-bob", "info": bob_info}

    # A second tab of Alice: the member list stays unique and nobody hears of a new member.
    alice2.subscribe(room)
    ok = alice2.wait_subscribed(room)["data"]
    assert sorted(ok["ids"]) == ["pjs-alice", "pjs-bob"] and ok["count"] == 2
    assert ok["me"] == {"id": "pjs-alice", "info": alice_info}
    # pusher-js keys members by id, so check the wire list too: one entry per user.
    wire = alice2.wait_message("pusher_internal:subscription_succeeded", room)["data"]["presence"]
    assert sorted(wire["ids"]) == ["pjs-alice", "pjs-bob"] and wire["count"] == 2

    assert sorted(u["id"] for u in sdk.users_info(room)["users"]) == ["pjs-alice", "pjs-bob"]
    assert sdk.channel_info(room, ["user_count", "subscription_count"]) == {
        "occupied": True, "user_count": 2, "subscription_count": 3,
    }

    # A client event on presence carries the sender's user id and is not echoed to it.
    assert bob.trigger(room, "client-wave", {"from": "bob"})
    for tab in (alice1, alice2):
        wave = tab.wait_event(room, "client-wave")
        assert wave["data"] == {"from": "bob"}
        assert wave["metadata"] == {"user_id": "pjs-bob"}
    sdk.trigger(room, "sentinel-1", {})
    sentinel = bob.wait_event(room, "sentinel-1")
    assert "client-wave" not in channel_events(bob, room, sentinel)
    assert channel_events(bob, room, sentinel).count("pusher:member_added") == 0
    assert [e for e in alice1.events("event") if e["event"] == "pusher:member_added"] == [added]

    # Closing one of Alice's tabs: nothing; closing the last: exactly one member_removed.
    alice2.disconnect()
    wait_until(lambda: sdk.channel_info(room, ["subscription_count"])["subscription_count"] == 2,
               message="alice's second tab to leave")
    sdk.trigger(room, "sentinel-2", {})
    sentinel = bob.wait_event(room, "sentinel-2")
    assert "pusher:member_removed" not in channel_events(bob, room, sentinel)
    assert sorted(u["id"] for u in sdk.users_info(room)["users"]) == ["pjs-alice", "pjs-bob"]

    alice1.disconnect()
    removed = bob.wait_event(room, "pusher:member_removed")
    assert removed["data"] == {"id": "pjs-alice", "info": alice_info}
    assert sdk.users_info(room) == {"users": [{"id": "pjs-bob"}]}
    sdk.trigger(room, "sentinel-3", {})
    sentinel = bob.wait_event(room, "sentinel-3")
    assert channel_events(bob, room, sentinel).count("pusher:member_removed") == 1
    assert bob.query()["channels"][room]["members"]["ids"] == ["pjs-bob"]


# -- encrypted channels ---------------------------------------------------------------------


def test_private_encrypted_is_decrypted_by_pusherjs(connect, server) -> None:
    channel = "private-encrypted-pjs-vault"
    alice = connect("alice", encryption_master_key_base64=MASTER_KEY_B64)
    subscribed(alice, channel)
    assert alice.wait_for({"type": "auth", "channel": channel})["has_shared_secret"] is True

    sdk = pusher.Pusher(app_id=APP["id"], key=APP["key"], secret=APP["secret"], host="127.0.0.1",
                        port=server.port, ssl=False, timeout=10, encryption_master_key_base64=MASTER_KEY_B64)
    payload = {"card": "4242", "note": "ünïcode"}
    sdk.trigger(channel, "secret", payload)
    assert alice.wait_event(channel, "secret")["data"] == payload

    # The server relayed the SDK's ciphertext: the plaintext never crossed the socket.
    frame = raw_inbound(alice, "secret")[0]
    assert set(json.loads(frame["data"])) == {"nonce", "ciphertext"}
    assert "4242" not in frame["data"]

    # Client events are refused on encrypted channels (Pusher; Sockudo wrongly allows them).
    assert alice.send_raw("client-leak", {"card": "4242"}, channel=channel)
    assert alice.wait_error(4301)["error"]["data"]["code"] == 4301
    assert alice.query()["state"] == "connected"


# -- cache channels ---------------------------------------------------------------------------


def test_cache_channel_replays_the_last_event(connect, sdk) -> None:
    channel = "cache-pjs-prices"
    alice = connect("alice")
    alice.subscribe(channel)
    alice.wait_subscribed(channel)
    miss = alice.wait_event(channel, "pusher:cache_miss")
    assert raw_inbound(alice, "pusher:cache_miss") == [{"event": "pusher:cache_miss", "channel": channel, "data": "{}"}]
    assert "cache" not in sdk.channel_info(channel, ["cache"])

    sdk.trigger(channel, "price", {"eur": 1})
    sdk.trigger(channel, "price", {"eur": 2})
    alice.wait_for(lambda e: e.get("type") == "event" and e.get("event") == "price" and e["data"] == {"eur": 2},
                   since=miss["_seq"], desc="second price")

    bob = connect("bob")
    bob.subscribe(channel)
    ok = bob.wait_subscribed(channel)
    replay = bob.wait_event(channel, "price")
    assert replay["data"] == {"eur": 2} and replay["_seq"] > ok["_seq"]

    info = sdk.channel_info(channel, ["cache", "subscription_count"])
    assert info["occupied"] is True and info["subscription_count"] == 2
    assert json.loads(info["cache"]["data"]) == {"eur": 2}
    assert 0 < info["cache"]["ttl"] <= 3600

    # The replay replaced the cache miss (a later publish, itself now the cached one, proves the order).
    sdk.trigger(channel, "sentinel", {})
    sentinel = bob.wait_event(channel, "sentinel")
    assert channel_events(bob, channel, sentinel) == ["pusher:subscription_succeeded", "price"]


# -- client events ------------------------------------------------------------------------------


def test_client_events_are_relayed_and_not_echoed(connect, sdk) -> None:
    channel = "private-pjs-chat"
    alice = subscribed(connect("alice"), channel)
    bob = subscribed(connect("bob"), channel)

    assert alice.trigger(channel, "client-typing", {"who": "alice"}) is True
    got = bob.wait_event(channel, "client-typing")
    assert got["data"] == {"who": "alice"} and "metadata" not in got  # no user_id outside presence

    sdk.trigger(channel, "sentinel", {})
    sentinel = alice.wait_event(channel, "sentinel")
    assert "client-typing" not in channel_events(alice, channel, sentinel)


def test_client_events_on_a_disabled_app_get_4301(connect, server) -> None:
    channel = "private-pjs-quiet"
    alice = subscribed(connect("alice", APP_NO_CLIENT_EVENTS), channel)
    bob = subscribed(connect("bob", APP_NO_CLIENT_EVENTS), channel)

    assert alice.trigger(channel, "client-typing", {"who": "alice"}) is True
    assert alice.wait_error(4301)["error"]["data"]["code"] == 4301

    # Non-fatal: alice stays connected and subscribed; bob never got the client event.
    sdk_for(server, APP_NO_CLIENT_EVENTS).trigger(channel, "server-event", {"n": 1})
    for client in (alice, bob):
        sentinel = client.wait_event(channel, "server-event")
        assert "client-typing" not in channel_events(client, channel, sentinel)
    assert alice.events("closed") == [] and alice.query()["state"] == "connected"


# -- users: sign-in, server-to-user, watchlist, terminate ------------------------------------------


def test_signin_and_send_to_user(connect, sdk) -> None:
    alice = connect("alice", user_data={"id": "pjs-sig-alice", "user_info": {"name": "Alice"}})
    bob = connect("bob", user_data={"id": "pjs-sig-bob"})
    for client in (alice, bob):
        client.signin()
    for client in (alice, bob):
        client.wait_signed_in()
    assert alice.query()["user"]["id"] == "pjs-sig-alice"

    sdk.send_to_user("pjs-sig-alice", "notify", {"msg": "hi alice"})
    ev = alice.wait_for({"type": "user_event", "event": "notify"})
    assert ev["data"] == {"msg": "hi alice"}

    sdk.send_to_user("pjs-sig-bob", "sentinel", {})
    sentinel = bob.wait_for({"type": "user_event", "event": "sentinel"})
    assert [e["event"] for e in bob.events("user_event") if e["_seq"] < sentinel["_seq"]] == []


def test_watchlist_online_and_offline(connect) -> None:
    alice = connect("alice", APP_WATCHLIST, user_data={"id": "pjs-w-alice", "watchlist": ["pjs-w-bob"]})
    alice.signin()
    alice.wait_signed_in()
    first = alice.wait_for({"type": "watchlist", "event": "offline"})
    assert first["data"]["user_ids"] == ["pjs-w-bob"]

    bob = connect("bob", APP_WATCHLIST, user_data={"id": "pjs-w-bob"})
    bob.signin()
    bob.wait_signed_in()
    online = alice.wait_for({"type": "watchlist", "event": "online"}, since=first["_seq"] + 1)
    assert online["data"] == {"name": "online", "user_ids": ["pjs-w-bob"]}

    bob.disconnect()
    offline = alice.wait_for({"type": "watchlist", "event": "offline"}, since=online["_seq"])
    assert offline["data"] == {"name": "offline", "user_ids": ["pjs-w-bob"]}


def test_terminate_user_connections(connect, sdk) -> None:
    alice = subscribed(connect("alice", user_data={"id": "pjs-term-alice"}), "pjs-term")
    bob = subscribed(connect("bob", user_data={"id": "pjs-term-bob"}), "pjs-term")
    for client in (alice, bob):
        client.signin()
        client.wait_signed_in()

    sdk.terminate_user_connections("pjs-term-alice")
    err = alice.wait_error(4009)
    assert err["error"]["data"]["message"] == "You got disconnected by the app."
    closed = alice.wait_closed(4009)
    assert err["_seq"] < closed["_seq"]
    assert_stays_down(alice, closed)

    sdk.trigger("pjs-term", "after", {"n": 1})
    assert bob.wait_event("pjs-term", "after")["data"] == {"n": 1}
    assert bob.events("closed") == [] and bob.query()["state"] == "connected"


# -- connection level --------------------------------------------------------------------------------


def test_unknown_app_key_gets_4001_and_no_reconnect_loop(pusherjs, server) -> None:
    ghost = pusherjs.connect("ghost", key="no-such-key", port=server.port)
    ghost.wait_error(4001)
    closed = ghost.wait_closed(4001)
    assert ghost.events("connected") == []
    assert_stays_down(ghost, closed)


def test_app_over_connection_quota_gets_4004(connect) -> None:
    first = connect("first", APP_ONE_CONNECTION)
    second = connect("second", APP_ONE_CONNECTION, wait=False)
    second.wait_error(4004)
    closed = second.wait_closed(4004)
    assert second.events("connected") == []
    assert_stays_down(second, closed)
    assert first.query()["state"] == "connected"


def test_lower_server_activity_timeout_is_honoured(pusherjs, server_factory) -> None:
    srv = server_factory([APP], activity_timeout=1)
    alice = pusherjs.connect("alice", key=APP["key"], port=srv.port, activity_timeout=120_000)
    alice.wait_connected()
    established = json.loads(
        next(json.loads(e["data"]) for e in alice.events("raw") if "connection_established" in e["data"])["data"]
    )
    assert established["activity_timeout"] == 1

    def raw(direction: str, event: str) -> Callable[[dict[str, Any]], bool]:
        return lambda e: e.get("type") == "raw" and e["dir"] == direction and json.loads(e["data"])["event"] == event

    # pusher-js pings after 1 s of silence (not its own 120 s) and the server answers.
    cursor = 0
    for _ in range(2):
        ping = alice.wait_for(raw("out", "pusher:ping"), timeout=5, since=cursor, desc="pusher-js ping")
        pong = alice.wait_for(raw("in", "pusher:pong"), timeout=5, since=ping["_seq"], desc="server pong")
        cursor = pong["_seq"] + 1
    assert alice.events("closed") == [] and alice.events("error") == []
    assert [e["current"] for e in alice.events("state")] == ["connecting", "connected"]
    assert alice.query()["state"] == "connected"


# -- channel queries ------------------------------------------------------------------------------------


def test_channels_info_presence_prefix_is_exact(connect, server) -> None:
    sdk = sdk_for(server, APP_QUERIES)
    u1a = connect("u1a", APP_QUERIES, user_data={"user_id": "q-u1"})
    u1b = connect("u1b", APP_QUERIES, user_data={"user_id": "q-u1"})
    u2 = connect("u2", APP_QUERIES, user_data={"user_id": "q-u2"})
    u3 = connect("u3", APP_QUERIES, user_data={"user_id": "q-u3"})
    subscribed(u1a, "presence-q-lobby", "q-public")
    subscribed(u1b, "presence-q-lobby")
    subscribed(u2, "presence-q-lobby", "private-q-side")
    subscribed(u3, "presence-q-solo")

    assert sdk.channels_info(prefix_filter="presence-", attributes=["user_count"]) == {
        "channels": {"presence-q-lobby": {"user_count": 2}, "presence-q-solo": {"user_count": 1}},
    }
    assert sdk.channels_info() == {
        "channels": {"presence-q-lobby": {}, "presence-q-solo": {}, "q-public": {}, "private-q-side": {}},
    }
    assert sdk.channels_info(prefix_filter="presence-q-l", attributes=["user_count", "subscription_count"]) == {
        "channels": {"presence-q-lobby": {"user_count": 2, "subscription_count": 3}},
    }

    u3.disconnect()
    wait_until(lambda: "presence-q-solo" not in sdk.channels_info(prefix_filter="presence-")["channels"],
               message="presence-q-solo to be vacated")
    assert sdk.channels_info(prefix_filter="presence-", attributes=["user_count"]) == {
        "channels": {"presence-q-lobby": {"user_count": 2}},
    }
