"""Observability end to end: real servers on Redis, a real worker (webhooks and push)
with local fake APNs and FCM (tests/support/fake_push.py), a real Prometheus (Debian's package)
scraping them, the TCP exporter decoded with the protobuf schema, JSON logs read back from the
server's and the worker's output.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families

from tests.support import sdk
from tests.support.cluster import node_env, start_all, wait_formed
from tests.support.eventproto import EventReader
from tests.support.fake_push import FakeAPNs, FakeFCM
from tests.support.procs import ROOT, RedisServer, ServerProcess, free_port, wait_until
from tests.support.prometheus import ALERTS, DASHBOARD, PrometheusServer, binary, fast_rules
from tests.support.wsraw import RawClient

SECRET = "obs-secret-Zq81-kept-private"
APP: dict[str, Any] = {"id": "700", "key": "obs-key", "secret": SECRET, "enable_client_messages": True,
                       "max_event_payload_in_kb": 1,
                       "history": {"max_messages_per_channel": 3}}  # the scenario's 4 publishes to one channel purge 1
signed = functools.partial(sdk.signed, app=APP)
LABELS = {"environment": "itest", "region": "loopback", "node": "node-a"}


# -- helpers --------------------------------------------------------------------------------------


def samples(text: str) -> list[Any]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    return sum(s.value for s in samples(text)
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def publish(server: ServerProcess, channel: str, data: Any, idempotency_key: str | None = None) -> requests.Response:
    headers = {"X-Idempotency-Key": idempotency_key} if idempotency_key else None
    return signed(server, "POST", f"/apps/{APP['id']}/events",
                  body={"name": "update", "channel": channel, "data": json.dumps(data)}, headers=headers)


def channel_auth(socket_id: str, channel: str, channel_data: str | None = None, secret: str = SECRET) -> str:
    text = f"{socket_id}:{channel}" + (f":{channel_data}" if channel_data is not None else "")
    return f"{APP['key']}:{hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()}"


class WebhookReceiver:
    """``/ok`` answers 200, ``/fail`` answers 500; counts what arrives."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {"/ok": 0, "/fail": 0}
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.hits[self.path] = receiver.hits.get(self.path, 0) + 1
                self.send_response(200 if self.path == "/ok" else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Worker:
    """``python -m workers`` (the RQ worker: webhooks and push queues) with its metrics port."""

    def __init__(self, redis_url: str, env: dict[str, str], queues: tuple[str, ...] = ("webhooks",)) -> None:
        self.metrics_port = free_port()
        self.log_path = Path(tempfile.mkdtemp(prefix="sockudo-worker-")) / "worker.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers", *queues, "--url", redis_url, "--metrics-port", str(self.metrics_port),
             "--metrics-host", "127.0.0.1"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.log_path.read_text()}")
            return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=1).status_code == 200

        wait_until(ready, timeout=30, message="the worker's metrics port")

    def metrics_text(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def node_settings(webhooks: WebhookReceiver | None = None, tcp_port: int | None = None,
                  node: str = "node-a") -> dict[str, Any]:
    app = dict(APP)
    if webhooks is not None:
        app["webhooks"] = [
            {"url": webhooks.url("/ok"), "event_types": ["channel_occupied"]},
            {"url": webhooks.url("/fail"), "event_types": ["channel_occupied"],
             "retry": {"max_attempts": 2, "initial_backoff_ms": 100, "max_backoff_ms": 100}},
        ]
    metrics: dict[str, Any] = {}
    if tcp_port is not None:
        metrics["tcp_exporter"] = {"enabled": True, "host": "127.0.0.1", "port": tcp_port, "buffer_size": 16}
    return {"apps": [app], "metrics": metrics, "connection_recovery": {"enabled": True}, "push": {"enabled": True},
            "history": {"enabled": True}, "webhooks": {"debounce_ms": 0, "batching": {"enabled": False}},
            "node": node}


def make_node(redis_url: str, node: str, env: dict[str, str] | None = None, **kwargs: Any) -> ServerProcess:
    settings = node_settings(node=node, **kwargs)
    env = node_env(redis_url, SOCKUDO_ENVIRONMENT=LABELS["environment"], SOCKUDO_REGION=LABELS["region"],
                   SOCKUDO_NODE=settings.pop("node"), LOG_OUTPUT_FORMAT="json", LOG_LEVEL="DEBUG", **(env or {}))
    apps = settings.pop("apps")
    return ServerProcess(apps, env=env, **settings)


# -- push against local fake providers (as tests/integration/test_push.py) ---------------------

TOPIC, TEAM_ID, KEY_ID = "com.example.orders", "TEAM123456", "KEY1234567"


class PushProviders:
    """Fake APNs (HTTP/2, TLS) and FCM, and the environment that points push at them."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sockudo-obs-push-")
        self.apns_key = ec.generate_private_key(ec.SECP256R1())
        self.apns = FakeAPNs(team_id=TEAM_ID, key_id=KEY_ID, public_key=self.apns_key.public_key(), topic=TOPIC,
                             cert_dir=self.dir, delay=0.0)
        self.fcm = FakeFCM(delay=0.0)
        self.env = {"PUSH_CREDENTIALS_KEY": "obs-credentials-key-" + uuid.uuid4().hex,
                    "PUSH_ALLOW_INSECURE_ENDPOINTS": "true", "PUSH_CA_FILE": self.apns.cert_path,
                    "APNS_ENDPOINT": self.apns.url, "FCM_ENDPOINT": self.fcm.url}

    @staticmethod
    def call(server: ServerProcess, method: str, path: str, body: Any = None) -> requests.Response:
        return signed(server, method, f"/apps/{APP['id']}/push{path}", body=body)

    def upload_credentials(self, server: ServerProcess) -> None:
        pem = self.apns_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()).decode()
        for provider, body in (("apns", {"teamId": TEAM_ID, "keyId": KEY_ID, "privateKey": pem, "topic": TOPIC}),
                               ("fcm", {"serviceAccountJson": json.dumps(self.fcm.service_account())})):
            resp = self.call(server, "POST", f"/credentials/{provider}", body)
            assert resp.status_code == 201, resp.text

    def device(self, server: ServerProcess, device_id: str, provider: str, channel: str) -> str:
        """Register a device (apns or fcm), subscribe it to ``channel``; returns its token."""
        if provider == "apns":
            token = os.urandom(32).hex()
            body = {"id": device_id, "platform": "ios", "formFactor": "phone",
                    "push": {"recipient": {"transportType": "apns", "deviceToken": token}}}
        else:
            token = "fcm-" + uuid.uuid4().hex
            body = {"id": device_id, "platform": "android", "formFactor": "phone",
                    "push": {"recipient": {"transportType": "gcm", "registrationToken": token}}}
        resp = self.call(server, "POST", "/deviceRegistrations", body)
        assert resp.status_code == 201, resp.text
        resp = self.call(server, "POST", "/channelSubscriptions", {"channel": channel, "deviceId": device_id})
        assert resp.status_code == 201, resp.text
        return token

    def stop(self) -> None:
        self.apns.close()
        self.fcm.close()


# -- the deployment shared by the module: two nodes, a worker, a webhook receiver, push fakes ----


class Deployment:
    def __init__(self) -> None:
        self.redis = RedisServer().start()
        self.webhooks = WebhookReceiver()
        self.push = PushProviders()
        self.tcp_port = free_port()
        self.a = make_node(self.redis.url, "node-a", env=self.push.env, webhooks=self.webhooks,
                           tcp_port=self.tcp_port)
        self.b = make_node(self.redis.url, "node-b", env=self.push.env, webhooks=self.webhooks)
        start_all([self.a, self.b])
        wait_formed([self.a, self.b])
        # The worker reads the server's configuration (apps, [push]) like a deployed one would.
        self.worker = Worker(self.redis.url, {**self.a.env, "SOCKUDO_NODE": "worker-1",
                                              "SOCKUDO_CONFIG": self.a.config_path}, queues=("webhooks", "push"))
        self.push.upload_credentials(self.a)

    def stop(self) -> None:
        self.worker.stop()
        for node in (self.a, self.b):
            node.stop()
        self.webhooks.stop()
        self.push.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    d = Deployment()
    yield d
    d.stop()


# -- the scripted scenario ---------------------------------------------------------------------

@pytest.mark.slow
def test_scenario_moves_every_signal(deployment: Deployment) -> None:
    a, b = deployment.a, deployment.b
    before_a, before_b, before_w = a.metrics_text(), b.metrics_text(), deployment.worker.metrics_text()
    app = {"app_id": APP["id"]}

    def delta(text_before: str, text_after: str, name: str, **labels: str) -> float:
        return value(text_after, name, **labels) - value(text_before, name, **labels)

    # connect, bad auth, presence join and leave (node A)
    client = RawClient.connect(a, APP["key"])
    assert client.socket_id is not None
    client.send_json({"event": "pusher:subscribe",
                      "data": {"channel": "private-orders-zz1",
                               "auth": channel_auth(client.socket_id, "private-orders-zz1", secret="bad")}})
    client.expect("pusher:subscription_error")
    member = json.dumps({"user_id": "user-zz1", "user_info": {}})
    client.send_json({"event": "pusher:subscribe", "data": {
        "channel": "presence-room-zz1", "auth": channel_auth(client.socket_id, "presence-room-zz1", member),
        "channel_data": member}})
    client.expect("pusher_internal:subscription_succeeded")
    client.send_json({"event": "pusher:unsubscribe", "data": {"channel": "presence-room-zz1"}})

    # cross-node fan-out: a subscriber on B, publishes on A (one repeated with an idempotency key)
    far = RawClient.connect(b, APP["key"])
    far.send_json({"event": "pusher:subscribe", "data": {"channel": "fanout-zz1"}})
    far.expect("pusher_internal:subscription_succeeded")
    assert publish(a, "fanout-zz1", {"n": 1}, idempotency_key="idem-zz1").status_code == 200
    assert publish(a, "fanout-zz1", {"n": 1}, idempotency_key="idem-zz1").status_code == 200
    far.expect("update", channel="fanout-zz1")
    # oversize payload (the app allows 1 KB)
    assert publish(a, "fanout-zz1", {"blob": "x" * 2048}).status_code == 413

    # resume: a protocol-2 socket drops off, misses 3 messages, comes back and resumes
    v2_url = f"{a.ws_url}/app/{APP['key']}?protocol=2&client=raw&version=1.0"
    phone = RawClient(v2_url)
    phone.expect("sockudo:connection_established")
    phone.send_json({"event": "sockudo:subscribe", "data": {"channel": "resume-zz1"}})
    phone.expect("sockudo_internal:subscription_succeeded")
    assert publish(a, "resume-zz1", {"n": 0}).status_code == 200
    seen = phone.expect("update", channel="resume-zz1")
    position = {"stream_id": seen["stream_id"], "serial": seen["serial"]}
    phone.close()
    for n in range(1, 4):
        assert publish(a, "resume-zz1", {"n": n}).status_code == 200
    back = RawClient(v2_url)
    back.expect("sockudo:connection_established")
    back.send_json({"event": "sockudo:subscribe", "data": {"channel": "resume-zz1"}})
    back.expect("sockudo_internal:subscription_succeeded")
    back.send_json({"event": "sockudo:resume", "data": {"channel_positions": {"resume-zz1": position}}})
    result = json.loads(back.expect("sockudo:resume_success", timeout=10)["data"])
    assert result["failed"] == [] and [r["replayed"] for r in result["recovered"]] == [3], result
    # a resume that cannot succeed: a stream this channel never had
    back.send_json({"event": "sockudo:resume", "data": {"channel_positions": {
        "resume-zz1": {"stream_id": "not-this-stream", "serial": 1}}}})
    back.expect("sockudo:resume_failed", timeout=10)

    # history: one good read, one with a bad cursor
    path = f"/apps/{APP['id']}/channels/resume-zz1/history"
    assert signed(a, "GET", path).status_code == 200
    assert signed(a, "GET", path, params={"cursor": "not-a-cursor"}).status_code == 400

    # push with one bad token: a good FCM device and an APNs device the provider calls dead, on one
    # channel, published the way SDK users do (sync: false -> publish_id -> status)
    push = deployment.push
    good = push.device(a, "obs-android-zz1", "fcm", "orders-zz1")
    dead = push.device(a, "obs-ios-zz1", "apns", "orders-zz1")
    push.apns.script(dead, [(400, {"reason": "BadDeviceToken"}, {})])
    resp = push.call(a, "POST", "/publish", {"recipients": [{"type": "channel", "channel": "orders-zz1"}],
                                             "payload": {"title": "Order updated", "body": "Packed"},
                                             "sync": False})
    assert resp.status_code == 202, resp.text
    publish_id = resp.json()["publish_id"]
    # and one scheduled for later (notBeforeMs) to the good device
    resp = push.call(a, "POST", "/publish", {"recipients": [{"type": "device", "device_id": "obs-android-zz1"}],
                                             "payload": {"title": "Later"},
                                             "notBeforeMs": int(time.time() * 1000) + 2000})
    assert resp.status_code == 202, resp.text
    later_id = resp.json()["publish_id"]

    def push_state(server: ServerProcess, pid: str) -> str | None:
        answer = push.call(server, "GET", f"/publish/{pid}/status")
        assert answer.status_code == 200, answer.text
        state = answer.json()["state"]
        return state if state in ("succeeded", "partially_succeeded", "failed", "expired", "dead_lettered") else None

    # The status endpoint answers for the publish_id, on either node.
    assert wait_until(lambda: push_state(b, publish_id), timeout=30, interval=0.1,
                      message="the push publish to complete") == "partially_succeeded"
    status = push.call(a, "GET", f"/publish/{publish_id}/status").json()
    assert status["publishId"] == publish_id and status["appId"] == APP["id"]
    assert {k: status["counters"][k] for k in ("planned", "dispatched", "succeeded", "failed")} == {
        "planned": 2, "dispatched": 2, "succeeded": 1, "failed": 1}
    assert [(u["deviceId"], u["reason"]) for u in status["undelivered"]] == [("obs-ios-zz1", "BadDeviceToken")]
    assert push.call(a, "GET", "/deviceRegistrations/obs-ios-zz1").status_code == 404  # the dead token is gone
    assert wait_until(lambda: push_state(a, later_id), timeout=30, interval=0.1,
                      message="the scheduled push to complete") == "succeeded"
    assert push.fcm.accepted_count(good) == 2 and push.apns.accepted_count(dead) == 0

    # webhooks: the subscriptions above made channels occupied -> one good, one failing endpoint
    def webhook_outcomes() -> bool:
        w = deployment.worker.metrics_text()
        return (delta(before_w, w, "sockudo_webhooks_delivered_total", **app) >= 1
                and delta(before_w, w, "sockudo_webhooks_dead_lettered_total", **app) >= 1)

    wait_until(webhook_outcomes, timeout=30, interval=0.2, message="webhook delivered and dead-lettered")

    def moved() -> dict[str, float]:
        ta, tb, tw = a.metrics_text(), b.metrics_text(), deployment.worker.metrics_text()
        return {
            "connections": delta(before_a, ta, "sockudo_new_connections_total", **app),
            "active sockets": value(ta, "sockudo_connected", **app),
            "auth failures": delta(before_a, ta, "sockudo_subscription_errors_total", reason="AuthError", **app),
            "subscribe successes": delta(before_a, ta, "sockudo_channel_subscriptions_total", **app),
            "presence joins": delta(before_a, ta, "sockudo_presence_member_joins_total", **app),
            "presence leaves": delta(before_a, ta, "sockudo_presence_member_leaves_total", **app),
            "publish accepted": delta(before_a, ta, "sockudo_publish_accepted_total", **app),
            "idempotency publishes": delta(before_a, ta, "sockudo_idempotency_publish_total", **app),
            "idempotency hits": delta(before_a, ta, "sockudo_idempotency_duplicates_total", **app),
            "payload too large": delta(before_a, ta, "sockudo_publish_rejected_total", reason="payload_too_large",
                                       **app),
            "adapter publish latency": delta(before_a, ta, "sockudo_adapter_publish_latency_ms_count"),
            "adapter receive latency": delta(before_b, tb, "sockudo_adapter_receive_latency_ms_count"),
            "duplicate suppression": delta(before_a, ta, "sockudo_adapter_duplicates_suppressed_total"),
            "resume successes": delta(before_a, ta, "sockudo_history_recovery_success_total", **app),
            "resume failures": delta(before_a, ta, "sockudo_history_recovery_failures_total", code="stream_reset",
                                     **app),
            "disconnect reasons": delta(before_a, ta, "sockudo_disconnections_by_reason_total",
                                        reason="client_closed", **app),
            "replayed": delta(before_a, ta, "sockudo_recovery_replayed_messages_total", **app),
            "history writes": delta(before_a, ta, "sockudo_history_writes_total", **app),
            "history reads": delta(before_a, ta, "sockudo_history_reads_total", **app),
            "cursor errors": delta(before_a, ta, "sockudo_history_cursor_errors_total", **app),
            "retention purges": delta(before_a, ta, "sockudo_history_evictions_total"),
            "webhooks queued": (delta(before_a, ta, "sockudo_webhooks_queued_total", **app)
                                + delta(before_b, tb, "sockudo_webhooks_queued_total", **app)),
            "webhooks delivered": delta(before_w, tw, "sockudo_webhooks_delivered_total", **app),
            "webhooks failed": delta(before_w, tw, "sockudo_webhooks_failed_total", **app),
            "webhooks retried": delta(before_w, tw, "sockudo_webhooks_retried_total", **app),
            "webhooks dead-lettered": delta(before_w, tw, "sockudo_webhooks_dead_lettered_total", **app),
            # push: admission on the server, everything after it in the worker (label `app`, Sockudo's)
            "push accepted": delta(before_a, ta, "sockudo_push_publish_accepted_total", app=APP["id"],
                                   result="accepted"),
            "push scheduled": delta(before_w, tw, "sockudo_push_scheduled_jobs_total", app=APP["id"],
                                    status="not_before"),
            "push dispatched fcm accepted": delta(before_w, tw, "sockudo_push_dispatched_total", app=APP["id"],
                                                  provider="fcm", status="accepted"),
            "push dispatched apns rejected": delta(before_w, tw, "sockudo_push_dispatched_total", app=APP["id"],
                                                   provider="apns", status="rejected"),
            "push provider errors": delta(before_w, tw, "sockudo_push_provider_failures_total", app=APP["id"],
                                          provider="apns", failure_class="device_terminal"),
            "push token invalidations": delta(before_w, tw, "sockudo_push_token_invalidations_total",
                                              app=APP["id"], provider="apns"),
            "push status partially succeeded": delta(before_w, tw, "sockudo_push_delivery_status_total",
                                                     app=APP["id"], status="partially_succeeded"),
            "push status succeeded": delta(before_w, tw, "sockudo_push_delivery_status_total", app=APP["id"],
                                           status="succeeded"),
        }

    expected_at_least = {
        "connections": 3, "active sockets": 2, "auth failures": 1, "subscribe successes": 2, "presence joins": 1,
        "presence leaves": 1, "publish accepted": 5, "idempotency publishes": 2, "idempotency hits": 1,
        "payload too large": 1, "adapter publish latency": 1, "adapter receive latency": 1,
        "duplicate suppression": 1, "resume successes": 1, "resume failures": 1, "disconnect reasons": 1,
        "replayed": 3, "history writes": 5,
        "history reads": 1, "cursor errors": 1, "retention purges": 1, "webhooks queued": 2, "webhooks delivered": 1,
        "webhooks failed": 2, "webhooks retried": 1, "webhooks dead-lettered": 1,
        "push accepted": 2, "push scheduled": 1, "push dispatched fcm accepted": 2,
        "push dispatched apns rejected": 1, "push provider errors": 1, "push token invalidations": 1,
        "push status partially succeeded": 1, "push status succeeded": 1,
    }
    def short() -> dict[str, float]:
        now = moved()
        return {k: now[k] for k, v in expected_at_least.items() if now[k] < v}

    try:
        wait_until(lambda: not short(), timeout=20, interval=0.2, message="every signal to move")
    except AssertionError:
        raise AssertionError(f"signals that did not move enough: {short()}") from None
    got = moved()
    # Exact where the scenario pins the amount.
    assert got["auth failures"] == 1 and got["presence joins"] == 1 and got["presence leaves"] == 1
    assert got["idempotency hits"] == 1 and got["payload too large"] == 1 and got["cursor errors"] == 1
    assert got["publish accepted"] == 5  # fanout once (the repeat is served from the cache) + 4 resume
    assert got["resume successes"] == 1 and got["replayed"] == 3 and got["resume failures"] == 1
    assert got["disconnect reasons"] == 1  # the phone's close; every other socket is still open
    # readiness: a probe of /up leaves every check's last result in the metrics
    assert requests.get(a.url + "/up", timeout=5).status_code == 200
    checks = [smp for smp in samples(a.metrics_text()) if smp.name == "sockudo_readiness_check_up"]
    assert checks and all(smp.value == 1 for smp in checks), checks
    push_exact = {k: v for k, v in got.items() if k.startswith("push ")}
    assert push_exact == {k: v for k, v in expected_at_least.items() if k.startswith("push ")}, push_exact
    tw = deployment.worker.metrics_text()
    assert delta(before_w, tw, "sockudo_push_provider_failures_total", provider="fcm") == 0
    assert delta(before_w, tw, "sockudo_push_status_update_failures_total") == 0  # every status write landed
    for c in (client, far, back):
        c.close()


# -- labels and cardinality ---------------------------------------------------------------------


def test_every_series_has_the_constant_labels_and_no_unbounded_value(deployment: Deployment) -> None:
    a = deployment.a
    markers: list[str] = []
    sockets: list[RawClient] = []
    for i in range(3):
        c = RawClient.connect(a, APP["key"])
        assert c.socket_id is not None
        sockets.append(c)
        channel, user, token = f"private-card-ZQX{i}9", f"user-ZQX{i}7", f"tok-ZQX{i}5"
        markers += [channel, user, token, c.socket_id]
        c.send_json({"event": "pusher:subscribe", "data": {"channel": channel, "auth": f"{APP['key']}:{token}"}})
        c.expect("pusher:subscription_error")
        member = json.dumps({"user_id": user, "user_info": {"name": user}})
        presence = f"presence-ZQX{i}3"
        markers.append(presence)
        c.send_json({"event": "pusher:subscribe", "data": {
            "channel": presence, "auth": channel_auth(c.socket_id, presence, member), "channel_data": member}})
        c.expect("pusher_internal:subscription_succeeded")
        publish_id = f"pub-ZQX{i}1"
        markers.append(publish_id)
        assert publish(a, f"news-ZQX{i}2", {"x": i}, idempotency_key=publish_id).status_code == 200
        markers.append(f"news-ZQX{i}2")
    # an unknown app key and a bad REST signature
    RawClient.open(a, "unknown-key-ZQX").expect_close()
    markers.append("unknown-key-ZQX")
    assert signed(a, "GET", f"/apps/{APP['id']}/channels", secret="wrong-ZQX").status_code == 401

    scrapes = ((a.metrics_text(), "node-a"), (deployment.b.metrics_text(), "node-b"),
               (deployment.worker.metrics_text(), "worker-1"))
    for source, expected_node in scrapes:
        found = samples(source)
        assert found
        for s in found:
            for key, want in {**LABELS, "node": expected_node, "adapter": "redis"}.items():
                assert s.labels.get(key) == want, (s.name, s.labels)
            for label, v in s.labels.items():
                for marker in markers:
                    assert marker not in v, f"{s.name}{{{label}={v!r}}} carries {marker!r}"
                assert not re.fullmatch(r"\d{5,}\.\d{5,}", v), f"{s.name} {label}={v!r} looks like a socket id"
                assert SECRET not in v
    for c in sockets:
        c.close()


# -- Prometheus ---------------------------------------------------------------------------------


def alert_exprs(text: str) -> list[str]:
    """The ``expr:`` values of a rules file (single-line or ``|`` blocks), without a YAML library."""
    exprs: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(\|)?\s*(.*)$", line)
        if not m:
            continue
        if not m.group(2):
            exprs.append(m.group(3))
            continue
        indent, block = len(m.group(1)), []
        for following in lines[i + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following)
        exprs.append("\n".join(block))
    return exprs


def referenced_metrics() -> set[str]:
    """Every metric name the dashboard's queries and the alert rules' expressions use."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    exprs += alert_exprs(ALERTS.read_text())
    names: set[str] = set()
    for expr in exprs:
        names |= set(re.findall(r"\b((?:sockudo|process)_[a-z0-9_]*[a-z0-9])\b", expr))
    return names


def family_of(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_promtool_accepts_the_rules() -> None:
    out = subprocess.run([binary("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 10 rules found" in out.stdout


def test_prometheus_scrapes_every_metric_the_dashboard_and_alerts_use(deployment: Deployment) -> None:
    names = referenced_metrics()
    assert {"sockudo_connected", "sockudo_readiness_failures_total", "sockudo_queue_depth",
            "sockudo_push_provider_failures_total", "sockudo_push_status_update_failures_total"} <= names
    prometheus = PrometheusServer({
        "sockudo": [f"127.0.0.1:{deployment.a.metrics_port}", f"127.0.0.1:{deployment.b.metrics_port}"],
        "sockudo-workers": [f"127.0.0.1:{deployment.worker.metrics_port}"],
    }, rule_files=[ALERTS]).start()
    try:
        wait_until(prometheus.targets_up, timeout=20, interval=0.2, message="every target up")
        requests.get(deployment.a.url + "/up", timeout=5)  # readiness metrics move on probes
        wanted = {family_of(n) for n in names}

        def missing() -> set[str]:
            # Metadata (HELP/TYPE) covers families without series yet; OpenMetrics names a
            # counter's family without ``_total``.
            seen = prometheus.metadata_names() | prometheus.series_names()
            return {n for n in wanted if n not in seen and n.removesuffix("_total") not in seen}

        wait_until(lambda: not missing(), timeout=30, interval=0.5,
                   message=f"Prometheus to have scraped every referenced metric (missing: {missing()})")
        # Series carry the constant labels in Prometheus too.
        result = prometheus.query('sum by (environment, region, node, adapter) (sockudo_connected)')
        assert {tuple(sorted(r["metric"].items())) for r in result} >= {
            tuple(sorted({**LABELS, "node": "node-a", "adapter": "redis"}.items()))}
    finally:
        prometheus.stop()


@pytest.mark.slow
def test_readiness_alert_fires_when_redis_stops(tmp_path: Path) -> None:
    """Redis goes away: /up turns 503 and SockudoReadinessFailing (and the adapter alert) fire
    within their ``for:`` windows (shortened to 3 s in a test copy of the rules)."""
    redis_server = RedisServer().start()
    node = make_node(redis_server.url, "node-a")
    prometheus = None
    try:
        node.start()
        wait_until(lambda: requests.get(node.url + "/up", timeout=5).status_code == 200, timeout=15,
                   message="the node to be ready")
        rules = fast_rules(ALERTS, tmp_path / "alerts.yml", for_window="3s")
        prometheus = PrometheusServer({"sockudo": [f"127.0.0.1:{node.metrics_port}"]}, rule_files=[rules]).start()
        wait_until(prometheus.targets_up, timeout=20, interval=0.2, message="the node scraped")
        wait_until(lambda: prometheus.query("sockudo_readiness_failures_total"), timeout=20, interval=0.2,
                   message="readiness metrics in Prometheus")
        assert prometheus.alert_state("SockudoReadinessFailing") is None

        redis_server.stop()
        probes: list[int] = []

        def firing() -> bool:
            probes.append(requests.get(node.url + "/up", timeout=5).status_code)  # the load balancer's probe
            return prometheus.alert_state("SockudoReadinessFailing") == "firing"

        started = time.monotonic()
        wait_until(firing, timeout=30, interval=0.5, message="SockudoReadinessFailing to fire")
        assert 503 in probes
        # Pending first, for its 3 s window, then firing: well inside 30 s.
        assert time.monotonic() - started >= 3
        wait_until(lambda: prometheus.alert_state("SockudoAdapterDisconnected") == "firing", timeout=20,
                   interval=0.5, message="SockudoAdapterDisconnected to fire")
        alerts = prometheus.api("alerts")["alerts"]
        readiness = [x for x in alerts if x["labels"]["alertname"] == "SockudoReadinessFailing"]
        assert {x["labels"]["check"] for x in readiness} == {"adapter", "cache"}
        assert {x["labels"]["node"] for x in readiness} == {"node-a"}
        assert all("fails readiness" in x["annotations"]["summary"] for x in readiness)
    finally:
        if prometheus is not None:
            prometheus.stop()
        node.stop()
        redis_server.stop()


# -- TCP exporter -------------------------------------------------------------------------------


def test_tcp_exporter_streams_metadata_then_live_operations(deployment: Deployment) -> None:
    a = deployment.a
    sock = socket.create_connection(("127.0.0.1", deployment.tcp_port), timeout=5)
    reader = EventReader(sock)
    try:
        first = reader.next()
        assert first.WhichOneof("event") == "metadata"
        client = RawClient.connect(a, APP["key"])
        live, metadata = reader.until(lambda e: e.WhichOneof("event") == "metric"
                                      and e.metric.name == "sockudo_new_connections_total", timeout=10)
        described = {first.metadata.name} | {e.metadata.name for e in metadata if e.WhichOneof("event") == "metadata"}
        assert {"sockudo_connected", "sockudo_new_connections_total", "sockudo_broadcast_latency_ms"} <= described
        assert live.metric.increment_counter == 1
        assert dict(live.metric.labels) == {**LABELS, "adapter": "redis", "app_id": APP["id"],
                                            "port": str(a.metrics_port)}
        client.close()
        gone, _ = reader.until(lambda e: e.WhichOneof("event") == "metric" and e.metric.name == "sockudo_connected"
                               and e.metric.WhichOneof("operation") == "decrement_gauge", timeout=10)
        assert gone.metric.decrement_gauge == 1.0
    finally:
        sock.close()


def publish_rate(server: ServerProcess, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        assert publish(server, "rate-zz1", {"i": i}).status_code == 200
    return time.perf_counter() - started


@pytest.mark.slow
def test_a_tcp_client_that_never_reads_does_not_slow_publishing(deployment: Deployment) -> None:
    a = deployment.a
    publish_rate(a, 20)  # warm up
    baseline = publish_rate(a, 200)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    stuck.connect(("127.0.0.1", deployment.tcp_port))  # never reads
    try:
        wait_until(lambda: value(a.metrics_text(), "sockudo_tcp_exporter_clients") >= 1, timeout=10,
                   message="the exporter to count the client")
        with_stuck = publish_rate(a, 200)
        # Bounded check: capturing is an append to a bounded queue; the stuck socket only blocks
        # its own writer. Generous margins for a shared CI machine.
        assert with_stuck < baseline * 3 + 2.0, (baseline, with_stuck)
        # Keep publishing (bounded) until the stuck client's socket buffers are full and its
        # queue overflows: then samples are dropped, and counted.
        def dropped() -> bool:
            publish_rate(a, 50)
            return value(a.metrics_text(), "sockudo_tcp_exporter_dropped_samples_total") > 0

        wait_until(dropped, timeout=60, interval=0, message="dropped samples to be counted")
        assert requests.get(a.url + "/live", timeout=2).status_code == 200
    finally:
        stuck.close()


def test_metrics_tail_prints_events(deployment: Deployment) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sockudo", "metrics", "tail", "--host", "127.0.0.1", "--port", str(deployment.tcp_port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_until(lambda: lines, timeout=15, message="tail to print the metadata")
        assert lines[0].startswith("# ")
        client = RawClient.connect(deployment.a, APP["key"])
        wait_until(lambda: any("sockudo_new_connections_total{" in line and line.endswith("increment_counter 1")
                               for line in lines), timeout=15, message="tail to print the new connection")
        assert any(line.startswith("# counter sockudo_new_connections_total ") for line in lines)
        assert any(line.startswith("# gauge sockudo_connected ") for line in lines)
        client.close()
    finally:
        proc.kill()
        proc.wait()


# -- logs ---------------------------------------------------------------------------------------


def test_json_logs_carry_no_secret(deployment: Deployment) -> None:
    a = deployment.a
    # Things an attacker or a careless client sends that carry signatures and secrets.
    c = RawClient.connect(a, APP["key"])
    sig = hmac.new(SECRET.encode(), b"x", hashlib.sha256).hexdigest()
    c.send_json({"event": "pusher:subscribe", "data": {"channel": "private-log-zz1", "auth": f"{APP['key']}:{sig}"}})
    c.expect("pusher:subscription_error")
    c.close()
    assert signed(a, "GET", f"/apps/{APP['id']}/channels", secret="nope").status_code == 401
    requests.get(f"{a.url}/apps/{APP['id']}/events?auth_signature={sig}", timeout=5)
    requests.get(f"{a.url}/up", timeout=5)
    text = a.log()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)  # every line is one JSON object
        assert list(record)[:3] == ["timestamp", "level", "target"], record
        assert record["level"] in ("debug", "info", "warn", "error", "critical")
    assert SECRET not in text and sig not in text
    started = next(json.loads(line) for line in lines if '"sockudo listening"' in line)
    assert started["adapter"] == "redis" and started["target"] == "sockudo.server.main"


def test_worker_logs_carry_no_app_secret(deployment: Deployment) -> None:
    """The worker redacts the configured apps' secrets by value, as the server does: a job that logs
    one (and RQ's own "job started" line, which prints the job's arguments) never prints it."""
    import redis
    from rq import Queue

    connection = redis.Redis.from_url(deployment.redis.url)
    job = Queue("webhooks", connection=connection).enqueue("logging.warning", "job-zz1 signs with %s", SECRET)
    wait_until(lambda: job.get_status(refresh=True) == "finished", timeout=30, interval=0.1,
               message="the worker to run the job")
    wait_until(lambda: "job-zz1 signs with" in deployment.worker.log(), timeout=10, message="the job's log line")
    text = deployment.worker.log()
    assert SECRET not in text
    line = next(line for line in text.splitlines() if "job-zz1 signs with" in line and '"level": "warn"' in line)
    assert json.loads(line)["message"] == "job-zz1 signs with [REDACTED]"
