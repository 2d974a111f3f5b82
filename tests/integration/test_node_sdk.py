"""The node ``pusher`` server SDK (what Laravel/Node backends publish with) against a real
server, with pusher-js subscribers receiving (the driver's ``rest`` command, tests/js/README.md).

Covers the HTTP API, server-to-user and terminate. The node SDK differs from the
Python one in ways the server must absorb: compact JSON bodies, no ``body_md5`` on GETs,
and ``terminateUserConnections`` posting to the ``/apps/{id}/users/...`` route.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.procs import ServerProcess
from tests.support.pusherjs import PusherJsClient, PusherJsDriver, PusherJsError
from tests.support.sdk import APP

MASTER_KEY_B64 = base64.b64encode(bytes(range(100, 132))).decode()


@pytest.fixture
def connect(pusherjs: PusherJsDriver, shared_server: ServerProcess) -> Callable[..., PusherJsClient]:
    def make(name: str, *channels: str, **opts: Any) -> PusherJsClient:
        client = pusherjs.connect(name, key=APP["key"], port=shared_server.port, secret=APP["secret"],
                                  app_id=APP["id"], **opts)
        client.wait_connected()
        for channel in channels:
            client.subscribe(channel)
        for channel in channels:
            client.wait_subscribed(channel)
        return client

    return make


@pytest.fixture
def node(pusherjs: PusherJsDriver, shared_server: ServerProcess) -> Callable[..., dict]:
    """``node(method, *args)``: one node SDK call for APP; returns the parsed body of a 2xx answer."""

    def call(method: str, *args: Any, **creds: Any) -> Any:
        creds = {"app_id": APP["id"], "key": APP["key"], "secret": APP["secret"], "port": shared_server.port, **creds}
        result = pusherjs.rest(method, *args, **creds)
        assert result["ok"] and result["status"] == 200, f"node SDK {method} failed: {json.dumps(result)}"
        return result["body"]

    return call


def test_node_trigger_reaches_pusherjs_with_the_exact_data(connect, node) -> None:
    alice = connect("alice", "node-public")
    payload = {"text": "héllo ✓", "n": 1, "nested": {"list": [1, None, True]}}

    node("trigger", "node-public", "order.created", payload)
    assert alice.wait_event("node-public", "order.created")["data"] == payload
    frames = [json.loads(e["data"]) for e in alice.events("raw") if e["dir"] == "in"]
    frame = next(f for f in frames if f["event"] == "order.created")
    # The node SDK sends compact JSON; the server relays that string unchanged.
    compact = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    assert frame == {"event": "order.created", "channel": "node-public", "data": compact}


def test_node_trigger_several_channels_and_socket_exclusion(connect, node) -> None:
    alice = connect("alice", "node-multi-1", "node-multi-2")
    bob = connect("bob", "node-multi-1")

    node("trigger", ["node-multi-1", "node-multi-2"], "fanout", {"k": 1}, {"socket_id": alice.socket_id})
    assert bob.wait_event("node-multi-1", "fanout")["data"] == {"k": 1}
    node("trigger", ["node-multi-1", "node-multi-2"], "sentinel", {})
    alice.wait_event("node-multi-1", "sentinel")
    sentinel = alice.wait_event("node-multi-2", "sentinel")
    assert "fanout" not in [e["event"] for e in alice.events("event") if e["_seq"] < sentinel["_seq"]]


def test_node_trigger_batch(connect, node) -> None:
    alice = connect("alice", "node-batch-1", "node-batch-2")

    node("triggerBatch", [
        {"channel": "node-batch-1", "name": "first", "data": {"i": 1}},
        {"channel": "node-batch-2", "name": "second", "data": "two"},
    ])
    first = alice.wait_event("node-batch-1", "first")
    second = alice.wait_event("node-batch-2", "second")
    assert (first["data"], second["data"]) == ({"i": 1}, "two")
    assert first["_seq"] < second["_seq"]


def test_node_get_channels_users_and_channel_info(connect, node) -> None:
    connect("u1a", "presence-node-q-lobby", user_data={"user_id": "node-u1"})
    connect("u1b", "presence-node-q-lobby", user_data={"user_id": "node-u1"})
    connect("u2", "presence-node-q-lobby", "presence-node-q-side", user_data={"user_id": "node-u2"})

    params = {"filter_by_prefix": "presence-node-q-", "info": "user_count"}
    assert node("get", {"path": "/channels", "params": params}) == {
        "channels": {"presence-node-q-lobby": {"user_count": 2}, "presence-node-q-side": {"user_count": 1}},
    }
    users = node("get", {"path": "/channels/presence-node-q-lobby/users"})
    assert sorted(u["id"] for u in users["users"]) == ["node-u1", "node-u2"]
    params = {"info": "user_count,subscription_count"}
    assert node("get", {"path": "/channels/presence-node-q-lobby", "params": params}) == {
        "occupied": True, "user_count": 2, "subscription_count": 3,
    }


def test_node_send_to_user_and_terminate(connect, node) -> None:
    alice = connect("alice", "node-term", user_data={"id": "node-alice"})
    bob = connect("bob", "node-term", user_data={"id": "node-bob"})
    for client in (alice, bob):
        client.signin()
        client.wait_signed_in()

    node("sendToUser", "node-alice", "notify", {"msg": "hi"})
    assert alice.wait_for({"type": "user_event", "event": "notify"})["data"] == {"msg": "hi"}
    node("sendToUser", "node-bob", "sentinel", {})
    sentinel = bob.wait_for({"type": "user_event", "event": "sentinel"})
    assert [e["event"] for e in bob.events("user_event") if e["_seq"] < sentinel["_seq"]] == []

    node("terminateUserConnections", "node-alice")  # POST /apps/{id}/users/node-alice/terminate_connections
    alice.wait_error(4009)
    closed = alice.wait_closed(4009)
    alice.assert_no_event({"type": "ws_open_attempt"}, within=1.0, since=closed["_seq"])
    node("trigger", "node-term", "after", {})
    bob.wait_event("node-term", "after")
    assert bob.events("closed") == []


def test_node_encrypted_trigger_is_decrypted_by_pusherjs(connect, node) -> None:
    channel = "private-encrypted-node-vault"
    alice = connect("alice", channel, encryption_master_key_base64=MASTER_KEY_B64)
    node("trigger", channel, "secret", {"pin": "1234"}, encryption_master_key_base64=MASTER_KEY_B64)
    assert alice.wait_event(channel, "secret")["data"] == {"pin": "1234"}


def test_node_sdk_sees_http_errors(pusherjs, shared_server) -> None:
    creds = {"app_id": APP["id"], "key": APP["key"], "port": shared_server.port}
    bad_secret = pusherjs.rest("trigger", "node-any", "ev", {}, secret="wrong-secret", **creds)
    assert bad_secret["ok"] is False and bad_secret["status"] == 401
    unknown_key = pusherjs.rest("trigger", "node-any", "ev", {}, secret=APP["secret"],
                                **{**creds, "key": "no-such-key"})
    assert unknown_key["ok"] is False and 400 <= unknown_key["status"] < 500
    with pytest.raises(PusherJsError, match="Invalid channel name"):
        pusherjs.rest("trigger", "bad channel!", "ev", {}, secret=APP["secret"], **creds)
