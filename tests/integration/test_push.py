"""Push notifications end to end: a real server, real Redis, real RQ workers (``python -m workers``)
and local fake APNs (HTTP/2 over TLS), FCM (with its OAuth token endpoint) and Web Push services
that check what the real ones check (tests/support/fake_push.py).

One server and two workers serve the module (their queue and Redis prefix are unique to this run);
each test uses its own devices, tokens and channels. Waits have deadlines; nothing sleeps blindly.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from sockudo.push import crypto
from tests.support import push_crypto
from tests.support.fake_push import FakeFCM, web_subscription
from tests.support.metrics import metric
from tests.support.procs import RedisServer, wait_until
from tests.support.push import (
    APP,
    CREDENTIALS_KEY,
    OTHER,
    TOPIC,
    Push,
    Worker,
    descendants,
    signed,
)


@pytest.fixture(scope="module")
def push(redis_server: RedisServer) -> Iterator[Push]:
    harness = Push(redis_server)
    yield harness
    harness.close()


@pytest.fixture(autouse=True)
def _reset(push: Push) -> Iterator[None]:
    push.reset()
    yield
    push.reset()


def channel_name() -> str:
    return "orders-" + uuid.uuid4().hex[:8]


# -- the happy path ----------------------------------------------------------------------------


def test_channel_publish_reaches_apns_fcm_and_web_push(push: Push) -> None:
    channel = channel_name()
    apns_token = push.apns_device("ios-1")
    fcm_token = push.fcm_device("android-1")
    sub, ua_key, auth = push.web_device("browser-1")
    for device in ("ios-1", "android-1", "browser-1"):
        push.subscribe(channel, device)

    resp = push.publish(
        {
            "recipients": [{"type": "channel", "channel": channel}],
            "payload": {"title": "Order updated", "body": "Packed", "templateData": {"orderId": 42}},
        }
    )
    assert resp.status_code == 202, resp.text
    accepted = resp.json()
    assert accepted["status"] == "accepted" and accepted["expectedRecipients"] == 3
    assert accepted["publishId"] == accepted["publish_id"]

    status = push.wait_state(accepted["publishId"], ("succeeded", "partially_succeeded", "failed", "dead_lettered"))
    assert status["state"] == "succeeded", status
    assert status["counters"] == {
        "planned": 3,
        "dispatched": 3,
        "succeeded": 3,
        "failed": 0,
        "expired": 0,
        "retryScheduled": 0,
        "retryAttempted": 0,
        "deadLettered": 0,
    }
    assert push.apns.accepted_count(apns_token) == 1
    assert push.fcm.accepted_count(fcm_token) == 1
    assert push.webpush.accepted_count(sub) == 1
    assert push.apns.auth_failures == push.fcm.auth_failures == push.webpush.auth_failures == 0
    # Kept for support and incident review: publish_status_ttl_days (30).
    ttl = push.redis.ttl(f"{push.prefix}pub:{APP['id']}:{accepted['publishId']}")
    assert 29 * 86400 < ttl <= 30 * 86400
    # APNs: the alert and custom data as Apple expects them, with our headers.
    delivered = push.apns.accepted[apns_token][0]
    assert delivered["payload"] == {
        "aps": {"alert": {"title": "Order updated", "body": "Packed"}},
        "data": {"orderId": 42},
    }
    assert delivered["headers"]["apns-topic"] == TOPIC and delivered["headers"]["apns-push-type"] == "alert"
    # FCM: data values are strings on the wire.
    assert push.fcm.accepted[fcm_token][0]["message"]["data"] == {"orderId": "42"}
    # Web Push: only the subscription's private key opens the message.
    body, headers = push.webpush.bodies[sub][0]
    assert headers["content-encoding"] == "aes128gcm"
    assert json.loads(push_crypto.webpush_decrypt(body, ua_key, auth)) == {
        "notification": {"title": "Order updated", "body": "Packed"},
        "data": {"orderId": 42},
    }


def test_sync_false_returns_publish_id_and_status_answers(push: Push) -> None:
    channel = channel_name()
    token = push.fcm_device("snake-android")
    push.subscribe(channel, "snake-android")
    # As SDK users publish: snake_case publish_id in the answer, `sync: false` in the request.
    resp = push.publish(
        {
            "recipients": [{"type": "channel", "channel": channel}],
            "payload": {"title": "Order updated", "body": "Packed"},
            "sync": False,
        }
    )
    assert resp.status_code == 202, resp.text
    publish_id = resp.json()["publish_id"]
    assert publish_id.startswith("pub_")
    status = push.wait_state(publish_id, ("succeeded",))
    assert status["publishId"] == publish_id and status["appId"] == APP["id"]
    assert push.fcm.accepted_count(token) == 1
    # `sync: true` (or ?mode=sync) is tolerated and answered asynchronously, and says so.
    resp = push.publish(
        {"recipients": [{"type": "device", "device_id": "snake-android"}], "payload": {"body": "again"}, "sync": True}
    )
    assert resp.status_code == 202 and resp.headers["X-Sockudo-Forced-Async"] == "publish-api-is-async"
    assert push.call("GET", "/publish/no-such-publish/status").status_code == 404


def test_client_and_device_recipients_plan_one_delivery_per_device(push: Push) -> None:
    user = "user-" + uuid.uuid4().hex[:6]
    phone = push.apns_device("u-phone-" + user, client_id=user)
    tablet = push.fcm_device("u-tablet-" + user, client_id=user)
    resp = push.publish(
        {
            "publishId": "multi-" + user,
            "recipients": [{"type": "client", "client_id": user}, {"type": "device", "device_id": "u-phone-" + user}],
            "payload": {"title": "Hello"},
        }
    )
    assert resp.status_code == 202, resp.text
    assert resp.json()["expectedRecipients"] == 3  # counted per recipient at admission …
    status = push.wait_state("multi-" + user, ("succeeded",))
    assert status["counters"]["planned"] == 2  # … but one delivery per device
    assert push.apns.accepted_count(phone) == 1 and push.fcm.accepted_count(tablet) == 1


def test_dead_tokens_delete_the_device_and_its_subscriptions(push: Push) -> None:
    channel = channel_name()
    apns_token = push.apns_device("dead-ios")
    fcm_token = push.fcm_device("dead-android")
    sub, _, web_auth = push.web_device("dead-browser")
    endpoint = push.webpush.endpoint(sub)
    for device in ("dead-ios", "dead-android", "dead-browser"):
        push.subscribe(channel, device)
    push.apns.script(apns_token, [(400, {"reason": "BadDeviceToken"}, {})])
    push.fcm.script(fcm_token, [FakeFCM.unregistered()])
    push.webpush.script(sub, [(410, None, {})])

    publish_id = push.publish(
        {"recipients": [{"type": "channel", "channel": channel}], "payload": {"title": "x"}}
    ).json()["publishId"]
    status = push.wait_state(publish_id, ("failed", "partially_succeeded", "succeeded"))
    assert status["state"] == "failed"
    assert status["counters"]["failed"] == 3 and status["counters"]["deadLettered"] == 0
    assert sorted((u["deviceId"], u["reason"]) for u in status["undelivered"]) == [
        ("dead-android", "UNREGISTERED"),
        ("dead-browser", "http_410"),
        ("dead-ios", "BadDeviceToken"),
    ]
    for device in ("dead-ios", "dead-android", "dead-browser"):
        assert push.call("GET", f"/deviceRegistrations/{device}").status_code == 404
    listed = push.call("GET", "/channelSubscriptions", params={"channel": channel}).json()
    assert listed["items"] == []
    # Device-terminal failures are not dead letters (nothing to replay to a dead token).
    letters = push.call("GET", "/deadLetters").json()["items"]
    assert publish_id not in {d["publishId"] for d in letters}

    # Logs: each invalidation is a worker log line with the ids, the provider, the provider's
    # error and the token's hash — never the token (APNs/FCM token, Web Push endpoint).
    def sha256(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    expected = {
        "apns": ("dead-ios", sha256(apns_token), "BadDeviceToken"),
        "fcm": ("dead-android", sha256(fcm_token), "UNREGISTERED"),
        "webpush": ("dead-browser", sha256(endpoint), "http_410"),
    }

    def invalidations() -> dict[str, dict[str, Any]] | None:
        found = {
            str(r.get("provider")): r
            for r in push.worker_log_records()
            if r.get("publish_id") == publish_id and r.get("failure_class") == "device_terminal"
        }
        return found if set(found) == set(expected) else None

    found = wait_until(invalidations, timeout=10, message="a worker log line per dead token")
    for provider, (device_id, token_hash, error) in expected.items():
        record = found[provider]
        assert record["target"] == "sockudo_push" and record["level"] == "warn", record
        assert record["app_id"] == APP["id"] and record["device_id"] == device_id, record
        assert record["token_hash"] == token_hash and record["error"] == error, record
        assert "[REDACTED]" not in record["message"], record  # the message itself reads as written
    logs = push.log_texts()
    for raw in (apns_token, fcm_token, endpoint, sub, web_auth):
        leaks = [name for name, text in logs.items() if raw in text]
        assert not leaks, f"a raw token/endpoint is in {leaks}"


def test_429_with_retry_after_is_retried_no_sooner_and_succeeds(push: Push) -> None:
    token = push.apns_device("throttled-ios")
    push.apns.script(token, [(429, {"reason": "TooManyRequests"}, {"retry-after": "2"})])
    publish_id = push.publish(
        {"recipients": [{"type": "device", "device_id": "throttled-ios"}], "payload": {"title": "later"}}
    ).json()["publishId"]
    status = push.wait_state(publish_id, ("succeeded", "failed", "dead_lettered"), timeout=20)
    assert status["state"] == "succeeded", status
    assert status["counters"]["retryScheduled"] == 1 and status["counters"]["retryAttempted"] == 1
    first, second = push.apns.requests[token][:2]
    assert second - first >= 2.0, f"retried after {second - first:.2f}s, Retry-After said 2"
    assert push.apns.accepted_count(token) == 1


def test_provider_down_past_the_retry_budget_dead_letters_then_replay_delivers(push: Push) -> None:
    token = push.fcm_device("outage-android")
    push.fcm.down = True
    publish_id = push.publish(
        {"recipients": [{"type": "device", "device_id": "outage-android"}], "payload": {"title": "outage"}}
    ).json()["publishId"]
    status = push.wait_state(publish_id, ("dead_lettered", "succeeded", "failed"))
    assert status["state"] == "dead_lettered"
    assert status["counters"]["deadLettered"] == 1 and status["counters"]["retryScheduled"] == 2  # 3 attempts
    assert len(push.fcm.requests[token]) == 3
    letters = push.call("GET", "/deadLetters", params={"provider": "fcm"}).json()["items"]
    letter = next(d for d in letters if d["publishId"] == publish_id)
    assert letter["replayable"] and letter["key"] == "outage-android" and letter["attempts"] == 3

    push.fcm.down = False
    resp = push.call("POST", f"/deadLetters/{letter['deadLetterId']}/replay")
    assert resp.status_code == 202, resp.text
    wait_until(lambda: push.fcm.accepted_count(token) == 1, timeout=15, message="replayed delivery")

    def replayed() -> dict[str, Any] | None:
        items = push.call("GET", "/deadLetters", params={"provider": "fcm"}).json()["items"]
        found = next(d for d in items if d["deadLetterId"] == letter["deadLetterId"])
        return found if found["replayState"] == "succeeded" else None

    assert wait_until(replayed, timeout=10)["messageId"].startswith("projects/")
    status = push.status(publish_id)
    assert status["state"] == "dead_lettered"  # the record is monotonic; replays are counted beside it
    assert status["replays"] == {"replayed": 1, "replaySucceeded": 1, "replayFailed": 0}
    again = push.call("POST", f"/deadLetters/{letter['deadLetterId']}/replay")
    assert again.status_code == 400  # already delivered
    assert push.call("POST", "/deadLetters/nope/replay").status_code == 404


def test_scheduled_publish_is_not_sent_before_not_before_ms(push: Push) -> None:
    token = push.fcm_device("scheduled-android")
    not_before = int(time.time() * 1000) + 1500
    publish_id = push.publish(
        {
            "recipients": [{"type": "device", "device_id": "scheduled-android"}],
            "payload": {"title": "soon"},
            "notBeforeMs": not_before,
        }
    ).json()["publishId"]
    status = push.wait_state(publish_id, ("dispatching",))
    assert status["retryAfterMs"] == not_before and status["notBeforeMs"] == not_before
    push.wait_state(publish_id, ("succeeded",))
    assert push.fcm.requests[token][0] * 1000 >= not_before


def test_a_push_is_never_sent_after_expires_at_ms(push: Push) -> None:
    token = push.apns_device("expiring-ios")
    push.apns.down = True  # every attempt answers 503 until the push expires
    expires = int(time.time() * 1000) + 700
    publish_id = push.publish(
        {
            "recipients": [{"type": "device", "device_id": "expiring-ios"}],
            "payload": {"title": "now or never"},
            "expiresAtMs": expires,
        }
    ).json()["publishId"]
    status = push.wait_state(publish_id, ("expired", "dead_lettered", "succeeded"))
    assert status["state"] == "expired" and status["counters"]["expired"] == 1
    assert all(t * 1000 < expires for t in push.apns.requests[token])
    assert push.apns.accepted_count(token) == 0


# -- bad input ----------------------------------------------------------------------------------


def test_bad_publish_input_is_refused_with_the_documented_status(push: Push) -> None:
    push.apns_device("bad-input-ios")
    device = [{"type": "device", "device_id": "bad-input-ios"}]

    def refused(body: dict[str, Any], status: int, code: str, words: str) -> None:
        resp = push.publish(body)
        assert resp.status_code == status, resp.text
        assert resp.json()["code"] == code and resp.json()["status"] == status
        assert words in resp.json()["error"], resp.json()

    refused(
        {"recipients": [{"type": "carrierPigeon", "coop": "x"}], "payload": {"title": "x"}},
        400,
        "invalid_input",
        "unknown recipient type 'carrierPigeon'",
    )
    refused(
        {"recipients": [{"type": "registeredTopic", "topic": "news"}], "payload": {"title": "x"}},
        400,
        "invalid_input",
        "not supported",
    )
    refused({"recipients": [], "payload": {"title": "x"}}, 400, "invalid_input", "recipients")
    refused({"recipients": device, "payload": {"title": "x" * 300}}, 400, "invalid_input", "payload.title exceeds 256")
    refused(
        {"recipients": device, "payload": {"title": "x", "templateData": {"blob": "y" * 9000}}},
        400,
        "invalid_input",
        "templateData exceeds 8192",
    )
    # Per-provider limits on the rendered payloads (APNs aps+data, FCM message, Web Push plaintext).
    refused(
        {"recipients": device, "payload": {"title": "x", "body": "b" * 4000, "templateData": {"k": "v" * 100}}},
        400,
        "invalid_input",
        "payload exceeds 4096 bytes",
    )
    refused(
        {
            "recipients": device,
            "payload": {"title": "x"},
            "providerOverrides": [{"provider": "apns", "payload": {"aps": {"alert": "a" * 4100}}}],
        },
        400,
        "invalid_input",
        "exceeds 4096 bytes",
    )
    # The icon goes to FCM (notification.image) and Web Push, not to APNs: only they overflow.
    refused(
        {
            "recipients": device,
            "payload": {"title": "x", "body": "b" * 3000, "icon": "https://cdn.example.com/" + "i" * 1500},
        },
        400,
        "invalid_input",
        "fcm payload exceeds 4096 bytes",
    )
    refused(
        {
            "recipients": device,
            "payload": {"title": "x"},
            "providerOverrides": [{"provider": "webPush", "payload": {"notification": {"title": "t" * 4100}}}],
        },
        400,
        "invalid_input",
        "providerOverrides[0].payload exceeds 4096 bytes",
    )
    refused({"recipients": device, "payload": {"title": "x"}, "expiresAtMs": 1000}, 400, "invalid_input", "past")
    refused(
        {"recipients": device, "payload": {"title": "x"}, "publishId": "bad id with spaces"},
        400,
        "invalid_input",
        "publishId",
    )
    resp = push.call("POST", "/publish", raw=b"recipients=1", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415


def test_publish_id_makes_publishing_idempotent_and_a_different_body_conflicts(push: Push) -> None:
    token = push.fcm_device("idem-android")
    body: dict[str, Any] = {
        "publishId": "idem-" + uuid.uuid4().hex[:6],
        "recipients": [{"type": "device", "device_id": "idem-android"}],
        "payload": {"title": "once"},
    }
    first = push.publish(body)
    assert first.status_code == 202 and "duplicate" not in first.json()
    push.wait_state(body["publishId"], ("succeeded",))
    again = push.publish(body)
    assert again.status_code == 202 and again.json()["duplicate"] is True
    assert again.json()["status"] == "succeeded" and again.json()["publishId"] == body["publishId"]
    snake = push.publish({**{k: v for k, v in body.items() if k != "publishId"}, "publish_id": body["publishId"]})
    assert snake.status_code == 202 and snake.json()["duplicate"] is True  # the snake_case spelling, same publish
    conflict = push.publish({**body, "payload": {"title": "twice"}})
    assert conflict.status_code == 409 and conflict.json()["code"] == "conflict"
    assert push.fcm.accepted_count(token) == 1


def test_missing_credentials_answer_503_with_the_reason(push: Push) -> None:
    token = os.urandom(32).hex()
    resp = signed(
        push.server,
        "POST",
        f"/apps/{OTHER['id']}/push/deviceRegistrations",
        {"id": "other-ios", "platform": "ios", "push": {"recipient": {"transportType": "apns", "deviceToken": token}}},
        app=OTHER,
    )
    assert resp.status_code == 201, resp.text
    resp = signed(
        push.server,
        "POST",
        f"/apps/{OTHER['id']}/push/publish",
        {"recipients": [{"type": "device", "device_id": "other-ios"}], "payload": {"title": "x"}},
        app=OTHER,
    )
    assert resp.status_code == 503, resp.text
    assert resp.json()["code"] == "service_unavailable"
    assert "no apns credentials for app 200" in resp.json()["error"]
    # Channels too: the check follows who is subscribed now.
    other = f"/apps/{OTHER['id']}/push"
    channel = channel_name()
    assert (
        signed(
            push.server,
            "POST",
            f"{other}/channelSubscriptions",
            {"channel": channel, "deviceId": "other-ios"},
            app=OTHER,
        ).status_code
        == 201
    )
    to_channel = {"recipients": [{"type": "channel", "channel": channel}], "payload": {"title": "x"}}
    assert signed(push.server, "POST", f"{other}/publish", to_channel, app=OTHER).status_code == 503
    assert signed(
        push.server, "DELETE", f"{other}/channelSubscriptions", params={"channel": channel}, app=OTHER
    ).json() == {"deleted": 1}
    empty = signed(push.server, "POST", f"{other}/publish", to_channel, app=OTHER)
    assert empty.status_code == 202 and empty.json()["expectedRecipients"] == 0


def test_bad_signatures_and_foreign_keys_are_refused(push: Push) -> None:
    path = f"/apps/{APP['id']}/push/deviceRegistrations"
    assert signed(push.server, "GET", path, secret="wrong-secret").status_code == 401
    foreign = signed(push.server, "GET", path, app=OTHER)  # validly signed, by another app
    assert foreign.status_code == 403 and foreign.json()["code"] == "forbidden"
    assert requests.get(push.server.url + path, timeout=5).status_code == 400  # not signed at all
    subscribe_only = push.call("GET", "/deviceRegistrations", headers={"x-sockudo-push-capability": "push-subscribe"})
    assert subscribe_only.status_code == 403
    tampered = push.call(
        "POST",
        "/publish",
        {"recipients": [{"type": "device", "device_id": "x"}], "payload": {"title": "signed"}},
        send_instead=b'{"recipients": [{"type": "channel", "channel": "all"}], "payload": {}}',
    )
    assert tampered.status_code == 401


# -- devices, subscriptions, credentials ---------------------------------------------------------


def test_device_registry_and_subscriptions_api(push: Push) -> None:
    user = "reg-" + uuid.uuid4().hex[:6]
    tokens = [push.fcm_device(f"{user}-{i}", client_id=user) for i in range(5)]
    again = push.register(
        f"{user}-0", {"transportType": "gcm", "registrationToken": tokens[0]}, client_id=user, platform="android"
    )
    assert again.json()["change"] == "unchanged"
    moved = push.register(
        f"{user}-0",
        {"transportType": "gcm", "registrationToken": "fcm-new-" + user},
        client_id=user,
        platform="android",
    )
    assert moved.json()["change"] == "updated"
    view = push.call("GET", f"/deviceRegistrations/{user}-0").json()
    assert view["recipient"] == {
        "transportType": "gcm",
        "provider": "fcm",
        "tokenHash": hashlib.sha256(("fcm-new-" + user).encode()).hexdigest(),
    }
    assert "fcm-new-" not in json.dumps(view)  # tokens are never returned

    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", "clientId": user, **({"cursor": cursor} if cursor else {})}
        page = push.call("GET", "/deviceRegistrations", params=params).json()
        seen += [d["id"] for d in page["items"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert seen == [f"{user}-{i}" for i in range(5)]

    channel = channel_name()
    for i in range(3):
        push.subscribe(channel, f"{user}-{i}")
    subs = push.call("GET", "/channelSubscriptions", params={"channel": channel}).json()
    assert [s["deviceId"] for s in subs["items"]] == [f"{user}-{i}" for i in range(3)]
    for item in subs["items"]:  # the subscription body: client, provider and token hash, never the token
        assert item["clientId"] == user and item["provider"] in ("apns", "fcm", "webPush"), item
        assert len(item["tokenHash"]) == 64 and set(item) == {
            "appId", "channel", "deviceId", "clientId", "provider", "tokenHash"}, item
    assert channel in push.call("GET", "/channelSubscriptions/channels", params={"limit": "1000"}).json()["items"]
    assert push.call(
        "DELETE", "/channelSubscriptions", params={"channel": channel, "deviceId": f"{user}-2"}
    ).json() == {"deleted": 1}
    assert push.call("DELETE", "/channelSubscriptions").status_code == 400
    assert push.call("POST", "/channelSubscriptions", {"channel": channel, "deviceId": "nope"}).status_code == 404

    assert push.call("DELETE", f"/deviceRegistrations/{user}-4").status_code == 204
    assert push.call("DELETE", f"/deviceRegistrations/{user}-4").status_code == 404
    assert push.call("DELETE", "/deviceRegistrations").status_code == 400  # no clientId
    assert push.call("DELETE", "/deviceRegistrations", params={"clientId": user}).json() == {
        "deleted": 4,
        "consistency": "eventual",
    }
    assert push.call("GET", "/channelSubscriptions", params={"channel": channel}).json()["items"] == []

    bad = push.register("bad-token", {"transportType": "apns", "deviceToken": "not-hex"})
    assert bad.status_code == 400 and "deviceToken" in bad.json()["error"]
    assert push.register("hms", {"transportType": "hms", "registrationToken": "x"}).status_code == 400


def test_credentials_are_write_only_and_never_logged(push: Push) -> None:
    listed = push.call("GET", "/credentials").json()["items"]
    assert {c["provider"] for c in listed} == {"apns", "fcm", "webpush"}
    assert all(set(c) == {"appId", "credentialId", "provider", "version", "updatedAtMs"} for c in listed)
    bad = push.call("POST", "/credentials/apns", {"teamId": "T", "keyId": "K", "privateKey": "not a key"})
    assert bad.status_code == 400
    raw_keys = [k.decode() for k in push.redis.scan_iter(match=f"{push.prefix}cred:*")]
    sealed = [push.redis.hget(k, "sealed") for k in raw_keys]
    assert raw_keys and all(isinstance(s, bytes) and s.startswith(b"envelope:v1:aes256gcm:") for s in sealed)
    secrets = [crypto.b64url(push_crypto.p256_raw_private(push.vapid_key)), "BEGIN PRIVATE KEY", CREDENTIALS_KEY]
    logs = push.logs()
    assert not any(s in logs for s in secrets)
    stored = b"".join(s for s in sealed if isinstance(s, bytes))
    assert b"PRIVATE KEY" not in stored


def test_push_metrics_on_the_server_and_the_workers(push: Push) -> None:
    token = push.fcm_device("metrics-android")
    publish_id = push.publish(
        {"recipients": [{"type": "device", "device_id": "metrics-android"}], "payload": {"title": "m"}}
    ).json()["publishId"]
    push.wait_state(publish_id, ("succeeded",))
    assert push.fcm.accepted_count(token) == 1
    text = push.server.metrics_text()
    assert metric(text, "sockudo_push_publish_accepted_total", app="100", result="accepted") >= 1
    assert metric(text, "sockudo_push_fanout_size_count", app="100") >= 1
    assert "sockudo_push_queue_oldest_age_seconds" in text and "sockudo_push_queue_depth" in text

    def dispatched() -> float:
        return sum(
            metric(w.metrics_text(), "sockudo_push_dispatched_total", app="100", provider="fcm", status="accepted")
            for w in push.workers
        )

    wait_until(dispatched, timeout=10, message="worker push metrics")
    joined = "".join(w.metrics_text() for w in push.workers)
    # Access tokens are shared by all workers and jobs (cached in Redis): no token per delivery.
    assert 1 <= push.fcm.token_requests <= 3
    assert 1 <= len(push.apns.jwts_seen) <= 3
    assert metric(joined, "sockudo_push_delivery_status_total", app="100", status="succeeded") >= 1
    assert metric(joined, "sockudo_push_dispatch_duration_seconds_count", provider="fcm", status="accepted") >= 1


# -- crashes -------------------------------------------------------------------------------------


def test_kill_9_of_a_worker_mid_dispatch_loses_no_delivery(push: Push) -> None:
    channel = channel_name()
    tokens = {}
    for i in range(10):
        tokens[f"crash-{i}"] = push.apns_device(f"crash-{i}")
        push.subscribe(channel, f"crash-{i}")
    push.apns.delay = 0.25  # every answer takes a while: workers are caught mid-request
    publish_id = push.publish(
        {"recipients": [{"type": "channel", "channel": channel}], "payload": {"title": "crash"}}
    ).json()["publishId"]
    wait_until(
        lambda: sum(push.apns.accepted_count(t) for t in tokens.values()) >= 1, timeout=15, message="dispatch under way"
    )
    from rq import Queue
    from rq import Worker as RqWorker

    def busy_worker() -> Worker | None:
        busy = {w.pid for w in RqWorker.all(queue=Queue(push.queue, connection=push.redis)) if w.get_current_job_id()}
        return next((w for w in push.workers if w.proc.pid in busy), None)

    victim = wait_until(busy_worker, timeout=10, interval=0.01, message="a worker busy with a batch")
    # The pooled worker runs its jobs in its own process (no forked work-horse): killing the
    # worker process itself kills the batch mid-request.
    assert not descendants(victim.proc.pid)
    push.workers.remove(victim)
    victim.kill9()
    push.workers.append(push.start_worker())
    status = push.wait_state(publish_id, ("succeeded", "partially_succeeded", "failed", "dead_lettered"), timeout=40)
    assert status["state"] == "succeeded", status
    assert status["counters"]["planned"] == 10 and status["counters"]["succeeded"] == 10
    duplicates = set(status.get("possibleDuplicates", []))
    assert "push job taken over" in push.server.log()  # the dead worker's batch was re-run
    for device, token in tokens.items():
        count = push.apns.accepted_count(token)
        # Exactly one accepted delivery each — unless the status names the device as possibly
        # delivered twice (its request was in flight when the worker died).
        assert count == 1 or (count == 2 and device in duplicates), (device, count, duplicates)


# -- embedded mode (no Redis) and the endpoint guard ----------------------------------------------


def test_embedded_mode_without_redis_delivers_and_refuses_local_endpoints_by_default(
    push: Push, server_factory: Any
) -> None:
    """``make run`` has no Redis: push runs from the in-process queue. Without the explicit test
    switch, provider endpoints on plain http / loopback are refused (here: the fake FCM)."""
    server = server_factory(
        [APP],
        env={"PUSH_CREDENTIALS_KEY": CREDENTIALS_KEY, "FCM_ENDPOINT": push.fcm.url, "PUSH_RETRY_MAX_ATTEMPTS": "1"},
    )

    def call(method: str, path: str, body: Any = None) -> requests.Response:
        return signed(server, method, f"/apps/{APP['id']}/push{path}", body)

    assert call("POST", "/credentials/fcm", {"serviceAccountJson": push.fcm.service_account()}).status_code == 201
    web = call(
        "POST",
        "/deviceRegistrations",
        {
            "id": "w",
            "platform": "browser",
            "push": {
                "recipient": {
                    "transportType": "web",
                    "endpoint": "https://127.0.0.1/push/x",
                    "p256dh": web_subscription()[1],
                    "auth": crypto.b64url(os.urandom(16)),
                }
            },
        },
    )
    assert web.status_code == 400 and "local or private host" in web.json()["error"]
    token = "fcm-" + uuid.uuid4().hex
    assert (
        call(
            "POST",
            "/deviceRegistrations",
            {
                "id": "a",
                "platform": "android",
                "push": {"recipient": {"transportType": "gcm", "registrationToken": token}},
            },
        ).status_code
        == 201
    )
    publish_id = call(
        "POST", "/publish", {"recipients": [{"type": "device", "device_id": "a"}], "payload": {"title": "x"}}
    ).json()["publishId"]

    def final() -> dict[str, Any] | None:
        status = call("GET", f"/publish/{publish_id}/status").json()
        return status if status["state"] in ("failed", "succeeded") else None

    status = wait_until(final, timeout=10)
    assert status["state"] == "failed"
    assert status["undelivered"][0]["reason"].startswith("endpoint_refused")
    assert push.fcm.accepted_count(token) == 0 and not push.fcm.requests.get(token)

    no_key = server_factory([APP])
    resp = signed(
        no_key, "POST", f"/apps/{APP['id']}/push/credentials/fcm", {"serviceAccountJson": push.fcm.service_account()}
    )
    assert resp.status_code == 400 and "PUSH_CREDENTIALS_KEY" in resp.json()["error"]


def test_embedded_mode_delivers_with_the_test_switch(push: Push, server_factory: Any) -> None:
    server = server_factory(
        [APP],
        env={
            "PUSH_CREDENTIALS_KEY": CREDENTIALS_KEY,
            "FCM_ENDPOINT": push.fcm.url,
            "PUSH_ALLOW_INSECURE_ENDPOINTS": "true",
        },
    )
    path = f"/apps/{APP['id']}/push"
    assert (
        signed(
            server, "POST", f"{path}/credentials/fcm", {"serviceAccountJson": push.fcm.service_account()}
        ).status_code
        == 201
    )
    token = "fcm-" + uuid.uuid4().hex
    assert (
        signed(
            server,
            "POST",
            f"{path}/deviceRegistrations",
            {
                "id": "a",
                "platform": "android",
                "push": {"recipient": {"transportType": "gcm", "registrationToken": token}},
            },
        ).status_code
        == 201
    )
    assert signed(server, "POST", f"{path}/channelSubscriptions", {"channel": "c", "deviceId": "a"}).status_code == 201
    publish_id = signed(
        server,
        "POST",
        f"{path}/publish",
        {"recipients": [{"type": "channel", "channel": "c"}], "payload": {"title": "x"}},
    ).json()["publishId"]
    wait_until(
        lambda: signed(server, "GET", f"{path}/publish/{publish_id}/status").json()["state"] == "succeeded", timeout=10
    )
    assert push.fcm.accepted_count(token) == 1


def test_batch_publish(push: Push) -> None:
    token = push.fcm_device("batch-android")
    item = {"recipients": [{"type": "device", "device_id": "batch-android"}], "payload": {"title": "one"}}
    resp = push.call("POST", "/batch/publish", [item, {**item, "payload": {"title": "two"}}])
    assert resp.status_code == 202, resp.text
    ids = [i["publishId"] for i in resp.json()["items"]]
    assert len(set(ids)) == 2
    for publish_id in ids:
        push.wait_state(publish_id, ("succeeded",))
    assert push.fcm.accepted_count(token) == 2
    bad = push.call("POST", "/batch/publish", [item, {"recipients": [{"type": "nope"}], "payload": {"title": "x"}}])
    assert bad.status_code == 400 and "items[1]" in bad.json()["error"]
    assert push.fcm.accepted_count(token) == 2  # nothing of a refused batch was published


def test_an_expired_apns_provider_token_is_replaced_and_the_push_resent_at_once(push: Push) -> None:
    token = push.apns_device("expired-jwt-ios")
    push.apns.script(token, [(403, {"reason": "ExpiredProviderToken"}, {})])
    publish_id = push.publish(
        {"recipients": [{"type": "device", "device_id": "expired-jwt-ios"}], "payload": {"title": "jwt"}}
    ).json()["publishId"]
    status = push.wait_state(publish_id, ("succeeded", "failed", "dead_lettered"))
    assert status["state"] == "succeeded" and status["counters"]["retryScheduled"] == 0
    assert len(push.apns.requests[token]) == 2 and push.apns.accepted_count(token) == 1
