"""The REST API of a real server, driven by the official ``pusher`` Python SDK and by
hand-signed HTTP requests, with raw WebSocket subscribers checking what is delivered.

Covers the HTTP API, channel signatures and users. The servers are shared per
module; every test uses its own channel names and users.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pusher
import pytest
import requests

from tests.support.metrics import metric
from tests.support.procs import ServerProcess, wait_until
from tests.support.sdk import APP, WATCH, sdk_for
from tests.support.wsraw import RawClient

APP_B = {"id": "200", "key": "app-key-2", "secret": "app-secret-2"}
APP_OFF: dict[str, Any] = {"id": "300", "key": "app-key-3", "secret": "app-secret-3", "enabled": False}
EMPTY_MD5 = hashlib.md5(b"").hexdigest()

_unset: Any = object()
_counter = itertools.count()


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess([APP, APP_B, APP_OFF]).start()
    yield proc
    proc.stop()


@pytest.fixture
def clients(server: ServerProcess) -> Iterator[list[RawClient]]:
    """Raw clients opened by a test (``connect()``), all closed afterwards."""
    opened: list[RawClient] = []
    yield opened
    for c in opened:
        c.close()


def connect(server: ServerProcess, opened: list[RawClient], app: dict[str, Any] = APP) -> RawClient:
    client = RawClient.connect(server, app["key"])
    opened.append(client)
    return client


def assert_still_publishing(sdk: pusher.Pusher, watcher: RawClient) -> None:
    """A good publish still reaches the module's long-lived subscriber."""
    marker = f"alive-{next(_counter)}"
    assert sdk.trigger(WATCH, "still-alive", marker) in ({}, {"ok": True})
    frame = watcher.expect(lambda f: f.get("event") == "still-alive" and f.get("data") == marker)
    assert frame == {"event": "still-alive", "channel": WATCH, "data": marker}


def presence_auth(sdk: pusher.Pusher, channel: str, client: RawClient, user_id: str,
                  user_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SDK's own presence signature; ``channel_data`` is the raw string it signed."""
    data: dict[str, Any] = {"user_id": user_id}
    if user_info is not None:
        data["user_info"] = user_info
    auth = sdk.authenticate(channel, client.socket_id, data)
    assert ", " in auth["channel_data"] or user_info is None  # json.dumps defaults, not compact
    return auth


# -- hand-signed requests ------------------------------------------------------


def signed_query(app: dict[str, Any], method: str, path: str, params: dict[str, str] | None = None,
                 body: bytes = b"", *, timestamp: int | None = None, body_md5: Any = _unset,
                 key: str | None = None, secret: str | None = None, drop: tuple[str, ...] = ()) -> str:
    """A Pusher-signed query string, with every part overridable to forge bad ones;
    ``drop`` leaves parameters out before signing."""
    q = dict(params or {})
    q["auth_key"] = key or app["key"]
    q["auth_timestamp"] = str(int(time.time()) if timestamp is None else timestamp)
    q["auth_version"] = "1.0"
    for name in drop:
        q.pop(name, None)
    if body_md5 is _unset:
        if method == "POST":
            q["body_md5"] = hashlib.md5(body).hexdigest()
    elif body_md5 is not None:
        q["body_md5"] = body_md5
    to_sign = "\n".join([method, path, "&".join(f"{k}={v}" for k, v in sorted(q.items()))])
    q["auth_signature"] = hmac.new((secret or app["secret"]).encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    return "&".join(f"{k}={v}" for k, v in sorted(q.items()))


def call(server: ServerProcess, method: str, path: str, body: Any = None, *, app: dict[str, Any] = APP,
         params: dict[str, str] | None = None, content_type: str = "application/json",
         **sign_kw: Any) -> requests.Response:
    """Send a signed request; ``body`` may be raw bytes or a JSON-able value."""
    raw = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
    query = signed_query(app, method, path, params, raw, **sign_kw)
    headers = {"Content-Type": content_type} if method == "POST" else {}
    return requests.request(method, f"{server.url}{path}?{query}", data=raw or None, headers=headers, timeout=10)


def event_body(channel: str = "rest-bad", **extra: Any) -> dict[str, Any]:
    return {"name": "e", "channels": [channel], "data": "x", **extra}


def assert_api_error(resp: requests.Response, status: int) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert body["status"] == status and isinstance(body["error"], str) and body["code"], body


# -- publishing with the SDK -----------------------------------------------------------


def test_trigger_reaches_subscriber_with_the_exact_frame(server, sdk, clients):
    sub = connect(server, clients)
    sub.subscribe("rest-one")

    assert sdk.trigger("rest-one", "order.created", {"id": 1, "name": "A"}) == {}

    text = sub.recv_text()
    frame = json.loads(text)
    assert frame == {"event": "order.created", "channel": "rest-one", "data": json.dumps({"id": 1, "name": "A"})}
    assert list(frame) == ["event", "channel", "data"]  # V1 sees only these fields, nothing null


def test_trigger_to_several_channels(server, sdk, clients):
    a, b, both = connect(server, clients), connect(server, clients), connect(server, clients)
    a.subscribe("rest-multi-a")
    b.subscribe("rest-multi-b")
    both.subscribe("rest-multi-a")
    both.subscribe("rest-multi-b")

    sdk.trigger(["rest-multi-a", "rest-multi-b", "rest-multi-empty"], "multi", "payload")

    assert a.recv() == {"event": "multi", "channel": "rest-multi-a", "data": "payload"}
    assert b.recv() == {"event": "multi", "channel": "rest-multi-b", "data": "payload"}
    got = {both.recv()["channel"], both.recv()["channel"]}
    assert got == {"rest-multi-a", "rest-multi-b"}


def test_trigger_with_socket_id_excludes_that_socket_only(server, sdk, clients):
    excluded, other = connect(server, clients), connect(server, clients)
    excluded.subscribe("rest-excl")
    other.subscribe("rest-excl")

    sdk.trigger("rest-excl", "first", "1", socket_id=excluded.socket_id)
    sdk.trigger("rest-excl", "second", "2")

    assert other.recv()["event"] == "first"
    assert other.recv()["event"] == "second"
    # Frames to one socket keep their order, so "second" first proves "first" never came.
    assert excluded.recv() == {"event": "second", "channel": "rest-excl", "data": "2"}


def test_trigger_batch_reaches_each_channel(server, sdk, clients):
    sub, excluded = connect(server, clients), connect(server, clients)
    sub.subscribe("rest-batch-a")
    sub.subscribe("rest-batch-b")
    excluded.subscribe("rest-batch-b")

    result = sdk.trigger_batch([
        {"channel": "rest-batch-a", "name": "one", "data": {"n": 1}},
        {"channel": "rest-batch-b", "name": "two", "data": "plain", "socket_id": excluded.socket_id},
        {"channel": "rest-batch-b", "name": "three", "data": "last"},
    ])

    assert result == {}
    assert sub.recv() == {"event": "one", "channel": "rest-batch-a", "data": json.dumps({"n": 1})}
    assert sub.recv() == {"event": "two", "channel": "rest-batch-b", "data": "plain"}
    assert sub.recv()["event"] == "three"
    assert excluded.recv()["event"] == "three"  # the item's socket_id excluded it from "two" only


def test_trigger_batch_with_info(server, sdk, clients):
    u1, u2 = connect(server, clients), connect(server, clients)
    for client, user in ((u1, "tb-1"), (u2, "tb-2")):
        client.subscribe("presence-rest-tb", presence_auth(sdk, "presence-rest-tb", client, user))
    u1.subscribe("rest-tb-pub")

    result = sdk.trigger_batch([
        {"channel": "presence-rest-tb", "name": "e1", "data": "d1", "info": "subscription_count,user_count"},
        {"channel": "rest-tb-pub", "name": "e2", "data": "d2"},
        {"channel": "rest-tb-pub", "name": "e3", "data": "d3", "info": "subscription_count"},
    ])

    assert result == {"batch": [{"subscription_count": 2, "user_count": 2}, {}, {"subscription_count": 1}]}
    assert u2.expect("e1", channel="presence-rest-tb")["data"] == "d1"


def test_channels_info_with_prefix_and_user_count(server, sdk, clients):
    a1, a2, b1, pub = (connect(server, clients) for _ in range(4))
    a1.subscribe("presence-rest-ci-a", presence_auth(sdk, "presence-rest-ci-a", a1, "ci-1", {"name": "One"}))
    a2.subscribe("presence-rest-ci-a", presence_auth(sdk, "presence-rest-ci-a", a2, "ci-2"))
    b1.subscribe("presence-rest-ci-b", presence_auth(sdk, "presence-rest-ci-b", b1, "ci-1"))
    pub.subscribe("rest-ci-public")

    presence = sdk.channels_info(prefix_filter="presence-rest-ci-", attributes=["user_count"])
    assert presence == {"channels": {"presence-rest-ci-a": {"user_count": 2}, "presence-rest-ci-b": {"user_count": 1}}}

    public = sdk.channels_info(prefix_filter="rest-ci-")
    assert public == {"channels": {"rest-ci-public": {}}}

    counts = sdk.channels_info(prefix_filter="presence-rest-ci-", attributes=["subscription_count"])
    assert counts["channels"]["presence-rest-ci-a"] == {"subscription_count": 2}


def test_channel_info_presence_counts_sockets_and_unique_users(server, sdk, clients):
    tab1, tab2 = connect(server, clients), connect(server, clients)
    channel = "presence-rest-chinfo"
    tab1.subscribe(channel, presence_auth(sdk, channel, tab1, "same-user", {"name": "A"}))
    tab2.subscribe(channel, presence_auth(sdk, channel, tab2, "same-user", {"name": "A"}))

    info = sdk.channel_info(channel, ["subscription_count", "user_count"])
    assert info == {"occupied": True, "subscription_count": 2, "user_count": 1}

    tab1.close()
    wait_until(lambda: sdk.channel_info(channel, ["subscription_count", "user_count"])
               == {"occupied": True, "subscription_count": 1, "user_count": 1}, timeout=5)
    tab2.close()
    wait_until(lambda: sdk.channel_info(channel) == {"occupied": False}, timeout=5)

    assert sdk.channel_info("rest-chinfo-nobody") == {"occupied": False}


def test_users_info_lists_unique_presence_users(server, sdk, clients):
    channel = "presence-rest-users"
    c1, c2, c3 = (connect(server, clients) for _ in range(3))
    for client, user in ((c1, "ui-1"), (c2, "ui-2"), (c3, "ui-1")):
        client.subscribe(channel, presence_auth(sdk, channel, client, user))

    users = sdk.users_info(channel)
    assert sorted(users["users"], key=lambda u: u["id"]) == [{"id": "ui-1"}, {"id": "ui-2"}]


def test_terminate_user_connections_via_sdk_unprefixed_route(server, sdk, clients, watcher):
    # The Python SDK posts /users/{id}/terminate_connections with no /apps/{id} prefix.
    request = sdk._pusher_client.terminate_user_connections.make_request("term-1")
    assert request.path == "/users/term-1/terminate_connections"
    victim1, victim2, bystander = (connect(server, clients) for _ in range(3))
    victim1.signin(sdk.authenticate_user(victim1.socket_id, {"id": "term-1"}))
    victim2.subscribe("presence-rest-term", presence_auth(sdk, "presence-rest-term", victim2, "term-1"))
    bystander.signin(sdk.authenticate_user(bystander.socket_id, {"id": "term-2"}))
    bystander.subscribe("presence-rest-term", presence_auth(sdk, "presence-rest-term", bystander, "term-2"))

    assert sdk.terminate_user_connections("term-1") in ({}, {"ok": True})

    victim1.expect_error_then_close(4009)
    victim2.expect_error_then_close(4009)
    # The other user's socket stays connected and served.
    removed = bystander.expect("pusher_internal:member_removed", channel="presence-rest-term")
    assert json.loads(removed["data"]) == {"user_id": "term-1"}
    bystander.ping_pong()
    assert sdk.users_info("presence-rest-term") == {"users": [{"id": "term-2"}]}
    assert_still_publishing(sdk, watcher)


def test_terminate_user_connections_stays_within_the_app(server, sdk, clients):
    # The unprefixed route takes the app from auth_key: app B terminating "iso-1" must not
    # touch app A's "iso-1".
    on_a = connect(server, clients)
    on_a.signin(sdk.authenticate_user(on_a.socket_id, {"id": "iso-1"}))
    on_b = connect(server, clients, APP_B)
    sdk_b = sdk_for(server, APP_B)
    on_b.signin(sdk_b.authenticate_user(on_b.socket_id, {"id": "iso-1"}))

    sdk_b.terminate_user_connections("iso-1")

    on_b.expect_error_then_close(4009)
    on_a.ping_pong()


def test_terminate_user_connections_prefixed_route(server, sdk, clients):
    victim, bystander = connect(server, clients), connect(server, clients)
    victim.signin(sdk.authenticate_user(victim.socket_id, {"id": "term-3"}))
    bystander.signin(sdk.authenticate_user(bystander.socket_id, {"id": "term-4"}))

    resp = call(server, "POST", f"/apps/{APP['id']}/users/term-3/terminate_connections", {})

    assert resp.status_code == 200, resp.text
    victim.expect_error_then_close(4009)
    bystander.ping_pong()


def test_send_to_user_reaches_signed_in_socket_only(server, sdk, clients):
    user, other_user, anonymous = (connect(server, clients) for _ in range(3))
    user_data = sdk.authenticate_user(user.socket_id, {"id": "stu-1", "user_info": {"name": "A"}})
    success = user.signin(user_data)
    assert success["data"] == {"user_data": user_data["user_data"]}
    other_user.signin(sdk.authenticate_user(other_user.socket_id, {"id": "stu-2"}))
    for c in (other_user, anonymous):
        c.subscribe("rest-stu-pub")

    sdk.send_to_user("stu-1", "private-note", {"text": "hi"})
    sdk.trigger("rest-stu-pub", "after", "x")

    assert user.recv() == {"event": "private-note", "channel": "#server-to-user-stu-1",
                           "data": json.dumps({"text": "hi"})}
    assert other_user.recv()["event"] == "after"
    assert anonymous.recv()["event"] == "after"


# -- signing and bad input ------------------------------------------------


def test_forged_signature_is_401(server, sdk, watcher):
    resp = call(server, "POST", "/apps/100/events", event_body(), secret="not-the-secret")
    assert_api_error(resp, 401)
    with pytest.raises(pusher.errors.PusherBadAuth):
        pusher.Pusher(app_id="100", key=APP["key"], secret="wrong", host="127.0.0.1", port=server.port,
                      ssl=False, timeout=10).trigger("rest-bad", "e", "x")
    assert_still_publishing(sdk, watcher)


@pytest.mark.parametrize("skew", [-700, 700], ids=["past", "future"])
def test_timestamp_outside_600s_is_401(server, sdk, watcher, skew):
    resp = call(server, "POST", "/apps/100/events", event_body(), timestamp=int(time.time()) + skew)
    assert_api_error(resp, 401)
    # Inside the window the same request is fine.
    ok = call(server, "POST", "/apps/100/events", event_body(), timestamp=int(time.time()) - 300)
    assert ok.status_code == 200, ok.text
    assert_still_publishing(sdk, watcher)


@pytest.mark.parametrize("kw", [{"drop": ("auth_timestamp",)}, {"timestamp": "soon"}],
                         ids=["missing", "not-an-integer"])
def test_bad_auth_timestamp_is_401(server, sdk, watcher, kw):
    resp = call(server, "POST", "/apps/100/events", event_body(), **kw)
    assert_api_error(resp, 401)
    assert_still_publishing(sdk, watcher)


def test_every_query_parameter_is_signed(server, sdk, watcher):
    path = "/apps/100/channels/rest-signed-params"
    query = signed_query(APP, "GET", path, {"info": "subscription_count"})
    ok = requests.get(f"{server.url}{path}?{query}", timeout=10)
    assert ok.status_code == 200 and ok.json() == {"occupied": False, "subscription_count": 0}, ok.text
    # A parameter added after signing invalidates the signature.
    resp = requests.get(f"{server.url}{path}?{signed_query(APP, 'GET', path)}&info=subscription_count", timeout=10)
    assert_api_error(resp, 401)
    # So does a signature made for another path.
    resp = requests.get(f"{server.url}{path}x?{query}", timeout=10)
    assert_api_error(resp, 401)
    assert_still_publishing(sdk, watcher)


def test_post_with_wrong_body_md5_is_401(server, sdk, watcher):
    resp = call(server, "POST", "/apps/100/events", event_body(), body_md5=hashlib.md5(b"other").hexdigest())
    assert_api_error(resp, 401)
    assert_still_publishing(sdk, watcher)


def test_post_without_body_md5_is_401(server, sdk, watcher):
    resp = call(server, "POST", "/apps/100/events", event_body(), body_md5=None)
    assert_api_error(resp, 401)
    assert_still_publishing(sdk, watcher)


def test_get_accepts_empty_body_md5_but_rejects_another(server, sdk, watcher):
    ok = call(server, "GET", "/apps/100/channels", body_md5=EMPTY_MD5)
    assert ok.status_code == 200 and "channels" in ok.json(), ok.text
    ok_without = call(server, "GET", "/apps/100/channels")
    assert ok_without.status_code == 200, ok_without.text
    bad = call(server, "GET", "/apps/100/channels", body_md5=hashlib.md5(b"x").hexdigest())
    assert_api_error(bad, 401)
    assert_still_publishing(sdk, watcher)


def test_unknown_auth_key_is_404(server, sdk, watcher):
    resp = call(server, "POST", "/apps/100/events", event_body(), key="no-such-key")
    assert_api_error(resp, 404)
    assert_still_publishing(sdk, watcher)


def test_key_of_another_app_is_401(server, sdk, watcher):
    # Signed correctly with app A's key and secret, but on app B's path.
    resp = call(server, "POST", f"/apps/{APP_B['id']}/events", event_body(), app=APP)
    assert_api_error(resp, 401)
    # App B's own credentials work on its path.
    ok = call(server, "POST", f"/apps/{APP_B['id']}/events", event_body(), app=APP_B)
    assert ok.status_code == 200, ok.text
    assert_still_publishing(sdk, watcher)


def test_no_query_string_is_400(server, sdk, watcher):
    resp = requests.post(f"{server.url}/apps/100/events", json=event_body(), timeout=10)
    assert_api_error(resp, 400)
    resp = requests.get(f"{server.url}/apps/100/channels", timeout=10)
    assert_api_error(resp, 400)
    assert_still_publishing(sdk, watcher)


def test_payload_over_10kb_is_413(server, sdk, watcher):
    big = "x" * (10 * 1024 + 1)
    # The SDK lets 10-30 KB through (it only checks > 30 KB), so the server answers.
    with pytest.raises(pusher.errors.PusherBadStatus, match=r"^413"):
        sdk.trigger("rest-bad", "big", big)
    resp = call(server, "POST", "/apps/100/events", event_body(data=big))
    assert_api_error(resp, 413)
    just_fits = call(server, "POST", "/apps/100/events", event_body(data="x" * 10 * 1024))
    assert just_fits.status_code == 200, just_fits.text
    assert_still_publishing(sdk, watcher)


def test_event_name_over_200_chars_is_400(server, sdk, watcher):
    with pytest.raises(ValueError):  # the SDK refuses client-side, so sign by hand
        sdk.trigger("rest-bad", "e" * 201, "x")
    resp = call(server, "POST", "/apps/100/events", {"name": "e" * 201, "channels": ["rest-bad"], "data": "x"})
    assert_api_error(resp, 400)
    ok = call(server, "POST", "/apps/100/events", {"name": "e" * 200, "channels": ["rest-bad"], "data": "x"})
    assert ok.status_code == 200, ok.text
    assert_still_publishing(sdk, watcher)


def test_more_than_100_channels_is_400(server, sdk, watcher):
    channels = [f"rest-many-{i}" for i in range(101)]
    with pytest.raises(ValueError):
        sdk.trigger(channels, "e", "x")
    resp = call(server, "POST", "/apps/100/events", {"name": "e", "channels": channels, "data": "x"})
    assert_api_error(resp, 400)
    ok = call(server, "POST", "/apps/100/events", {"name": "e", "channels": channels[:100], "data": "x"})
    assert ok.status_code == 200, ok.text
    assert_still_publishing(sdk, watcher)


def test_batch_over_10_events_is_400(server, sdk, watcher, clients):
    sub = connect(server, clients)
    sub.subscribe("rest-batch-big")
    batch = [{"channel": "rest-batch-big", "name": f"e{i}", "data": "x"} for i in range(11)]
    with pytest.raises(pusher.errors.PusherBadRequest):
        sdk.trigger_batch(batch)
    resp = call(server, "POST", "/apps/100/batch_events", {"batch": batch})
    assert_api_error(resp, 400)
    # Nothing of the refused batch was published; a batch of 10 is fine.
    sdk.trigger_batch(batch[:10])
    assert sub.recv()["event"] == "e0"
    assert_still_publishing(sdk, watcher)


@pytest.mark.parametrize("channel", ["bad channel", "bad/channel", "ümlaut", "", "x" * 201],
                         ids=["space", "slash", "non-ascii", "empty", "too-long"])
def test_invalid_channel_name_is_400(server, sdk, watcher, channel):
    resp = call(server, "POST", "/apps/100/events", {"name": "e", "channels": [channel], "data": "x"})
    assert_api_error(resp, 400)
    assert_still_publishing(sdk, watcher)


def test_missing_channels_is_400(server, sdk, watcher):
    resp = call(server, "POST", "/apps/100/events", {"name": "e", "data": "x"})
    assert_api_error(resp, 400)
    assert_still_publishing(sdk, watcher)


def test_non_json_body_is_400(server, sdk, watcher):
    resp = call(server, "POST", "/apps/100/events", b"{not json")
    assert_api_error(resp, 400)
    assert_still_publishing(sdk, watcher)


def test_deeply_nested_json_body_is_400(server, sdk, watcher):
    resp = call(server, "POST", "/apps/100/events", b"[" * 50000)
    assert_api_error(resp, 400)
    assert "RecursionError" not in server.log()
    assert_still_publishing(sdk, watcher)


def test_wrong_content_type_is_415(server, sdk, watcher):
    resp = call(server, "POST", "/apps/100/events", event_body(), content_type="text/plain")
    assert_api_error(resp, 415)
    # No Content-Type at all.
    resp = requests.post(f"{server.url}/apps/100/events?{signed_query(APP, 'POST', '/apps/100/events', None, b'{}')}",
                         data=b"{}", timeout=10)
    assert_api_error(resp, 415)
    ok = call(server, "POST", "/apps/100/events", event_body(), content_type="application/json; charset=utf-8")
    assert ok.status_code == 200, ok.text
    assert_still_publishing(sdk, watcher)


def test_user_count_on_non_presence_is_400(server, sdk, watcher):
    with pytest.raises(pusher.errors.PusherBadRequest):
        sdk.channel_info("rest-not-presence", ["user_count"])
    with pytest.raises(pusher.errors.PusherBadRequest):
        sdk.channels_info(prefix_filter="rest-", attributes=["user_count"])
    resp = call(server, "GET", "/apps/100/channels/rest-not-presence", params={"info": "user_count"})
    assert_api_error(resp, 400)
    resp = call(server, "POST", "/apps/100/events", event_body(info="user_count"))
    assert_api_error(resp, 400)
    assert_still_publishing(sdk, watcher)


def test_users_of_non_presence_channel_is_400(server, sdk, watcher):
    with pytest.raises(pusher.errors.PusherBadRequest):
        sdk.users_info("private-rest-users")
    resp = call(server, "GET", "/apps/100/channels/rest-plain/users")
    assert_api_error(resp, 400)
    assert_still_publishing(sdk, watcher)


def test_disabled_app_rest_call_is_refused(server, sdk, watcher):
    resp = call(server, "POST", f"/apps/{APP_OFF['id']}/events", event_body(), app=APP_OFF)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    assert resp.json()["status"] == resp.status_code
    off_sdk = sdk_for(server, APP_OFF)
    with pytest.raises((pusher.errors.PusherForbidden, pusher.errors.PusherBadRequest,
                        pusher.errors.PusherBadAuth, pusher.errors.PusherBadStatus)):
        off_sdk.channels_info()
    assert_still_publishing(sdk, watcher)


# -- the publish routes share every route's plumbing -------------------------------------


@pytest.mark.parametrize("route", ["events", "batch_events"])
def test_publish_routes_answer_a_cors_preflight_and_405_to_other_methods(server, route):
    url = f"{server.url}/apps/{APP['id']}/{route}"
    preflight = requests.options(url, headers={"Origin": "https://example.com",
                                               "Access-Control-Request-Method": "POST"}, timeout=5)
    assert preflight.status_code == 200
    assert "POST" in preflight.headers["Allow"]
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "X-Idempotency-Key" in preflight.headers["Access-Control-Allow-Headers"]
    for method in ("GET", "PUT", "DELETE"):
        resp = requests.request(method, url, timeout=5)
        assert_api_error(resp, 405)
        assert resp.json()["code"] == "method_not_allowed"


def test_publishes_and_other_calls_share_cors_headers_and_http_counters(server, sdk):
    before = metric(server.metrics_text(), "sockudo_http_calls_received_total")
    published = call(server, "POST", f"/apps/{APP['id']}/events", event_body("rest-counted"))
    listed = call(server, "GET", f"/apps/{APP['id']}/channels")
    refused = call(server, "POST", f"/apps/{APP['id']}/events", b"{not json")
    assert published.status_code == 200 and listed.status_code == 200
    assert_api_error(refused, 400)
    for resp in (published, listed, refused):
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert resp.headers["Access-Control-Allow-Methods"] == "GET, POST, PUT, PATCH, DELETE, OPTIONS"
    wait_until(lambda: metric(server.metrics_text(), "sockudo_http_calls_received_total") == before + 3,
               timeout=5, message="the three signed calls to be counted")


def test_chunked_publish_is_delivered_and_an_oversized_one_is_413(server_factory):
    small = server_factory([APP], http_api={"request_limit_in_mb": 0.001})  # 1,048 bytes
    watcher = RawClient.connect(small, APP["key"])
    try:
        watcher.subscribe("rest-chunked")
        path = f"/apps/{APP['id']}/events"
        for data, status in (("x" * 100, 200), ("y" * 2000, 413)):
            raw = json.dumps({"name": "e", "channels": ["rest-chunked"], "data": data}).encode()
            query = signed_query(APP, "POST", path, body=raw)
            resp = requests.post(f"{small.url}{path}?{query}", data=iter([raw[:50], raw[50:]]),  # chunked
                                 headers={"Content-Type": "application/json"}, timeout=10)
            assert resp.request.headers.get("Transfer-Encoding") == "chunked"
            assert resp.status_code == status, resp.text
        assert json.loads(watcher.recv_text())["data"] == "x" * 100
    finally:
        watcher.close()


def test_body_over_request_limit_is_413(server_factory):
    small = server_factory([APP], http_api={"request_limit_in_mb": 0.001})  # 1,048 bytes
    sdk = sdk_for(small)
    watcher = RawClient.connect(small, APP["key"])
    try:
        watcher.subscribe(WATCH)
        body = event_body(data="y" * 2000)  # far under the 10 KB event limit
        resp = call(small, "POST", "/apps/100/events", body)
        assert resp.status_code == 413, (resp.status_code, resp.text)
        with pytest.raises(pusher.errors.PusherBadStatus, match=r"^413"):
            sdk.trigger("rest-bad", "e", "y" * 2000)
        assert_still_publishing(sdk, watcher)
    finally:
        watcher.close()


# -- unsigned operational endpoints ---------------------------------------------


def test_health_endpoints(server):
    live = requests.get(f"{server.url}/live", timeout=5)
    assert live.status_code == 200
    up = requests.get(f"{server.url}/up", timeout=5)
    assert up.status_code == 200 and up.headers["X-Health-Check"] == "OK"
    app_up = requests.get(f"{server.url}/up/{APP['id']}", timeout=5)
    assert app_up.status_code == 200 and app_up.headers["X-Health-Check"] == "OK"
    unknown = requests.get(f"{server.url}/up/unknown", timeout=5)
    assert unknown.status_code == 404
    disabled = requests.get(f"{server.url}/up/{APP_OFF['id']}", timeout=5)
    assert disabled.status_code == 503


def test_unknown_route_is_plain_404(server):
    resp = requests.get(f"{server.url}/no/such/route", timeout=5)
    assert resp.status_code == 404
    assert resp.text == "404 NOT FOUND"
    assert resp.headers["Content-Type"].startswith("text/plain")
    # Unknown routes under /apps/ are 404 too, signed or not.
    assert requests.get(f"{server.url}/apps/100/nothing-here", timeout=5).status_code == 404
    assert call(server, "GET", "/apps/100/nothing-here").status_code == 404
