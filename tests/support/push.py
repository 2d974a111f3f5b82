"""The push test bed: a server, two ``python -m workers push`` processes, fake APNs / FCM / Web Push
services (tests/support/fake_push.py), their keys, and a unique queue and Redis prefix per run."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from typing import Any

import redis
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sockudo.push import crypto
from tests.support import push_crypto, sdk
from tests.support.fake_push import MAX_CONCURRENCY, FakeAPNs, FakeFCM, FakeWebPush, web_subscription
from tests.support.procs import ROOT, RedisServer, ServerProcess, free_port, wait_until

APP = {"id": "100", "key": "push-key", "secret": "push-secret"}
OTHER = {"id": "200", "key": "other-key", "secret": "other-secret"}
TOPIC = "com.example.orders"
TEAM_ID, KEY_ID = "TEAM123456", "KEY1234567"
CREDENTIALS_KEY = "test-credentials-key-" + uuid.uuid4().hex

#: A request signed as the push app (or ``app=``).
signed = functools.partial(sdk.signed, app=APP)


# -- helpers -----------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def credential_bodies(apns_key: ec.EllipticCurvePrivateKey, fcm: FakeFCM,
                      vapid_key: ec.EllipticCurvePrivateKey) -> dict[str, dict[str, Any]]:
    """The ``POST /push/credentials/{provider}`` bodies for the fake providers' keys."""
    pem = apns_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "apns": {"teamId": TEAM_ID, "keyId": KEY_ID, "privateKey": pem, "topic": TOPIC},
        "fcm": {"serviceAccountJson": json.dumps(fcm.service_account())},
        "webpush": {"publicKey": crypto.b64url(crypto.p256_public_raw(vapid_key)),
                    "privateKey": crypto.b64url(push_crypto.p256_raw_private(vapid_key))},
    }


class Worker:
    """``python -m workers <queue>`` in its own process group (so kill -9 takes its work-horse too)."""

    def __init__(self, queue: str, env: dict[str, str], log_path: str) -> None:
        self.log_path = log_path
        self.metrics_port = free_port()
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers",
                queue,
                "--metrics-port",
                str(self.metrics_port),
                "--metrics-host",
                "127.0.0.1",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def metrics_text(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def kill9(self) -> None:
        """SIGKILL the worker and its work-horse (RQ puts the horse in a session of its own)."""
        victims = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


class Push:
    """The module's server, workers, fakes and keys."""

    def __init__(self, redis_server: RedisServer, env: dict[str, str] | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="sockudo-push-")
        self.apns_key = ec.generate_private_key(ec.SECP256R1())
        self.vapid_key = ec.generate_private_key(ec.SECP256R1())
        self.vapid_public = crypto.b64url(crypto.p256_public_raw(self.vapid_key))
        # Functional tests run the fakes without their default latency (tests that need it set it).
        self.apns = FakeAPNs(
            team_id=TEAM_ID,
            key_id=KEY_ID,
            public_key=self.apns_key.public_key(),
            topic=TOPIC,
            cert_dir=self.dir,
            delay=0.0,
        )
        self.fcm = FakeFCM(delay=0.0)
        self.webpush = FakeWebPush(vapid_public_key=self.vapid_public, delay=0.0)
        run = uuid.uuid4().hex[:8]
        self.queue = f"push-{run}"
        self.prefix = f"sockudo:push:{run}:"
        self.redis = redis.Redis.from_url(redis_server.url)
        self.env = {
            "REDIS_URL": redis_server.url,
            "PUSH_CREDENTIALS_KEY": CREDENTIALS_KEY,
            "PUSH_ALLOW_INSECURE_ENDPOINTS": "true",
            "PUSH_CA_FILE": self.apns.cert_path,
            "APNS_ENDPOINT": self.apns.url,
            "FCM_ENDPOINT": self.fcm.url,
            "PUSH_QUEUE_NAME": self.queue,
            "PUSH_REDIS_PREFIX": self.prefix,
            "PUSH_LEASE_MS": "2000",
            "PUSH_MAINTENANCE_INTERVAL_MS": "200",
            "PUSH_REQUEST_TIMEOUT_MS": "1500",
            "PUSH_BATCH_SIZE": "2",
            "PUSH_RETRY_MAX_ATTEMPTS": "3",
            "PUSH_RETRY_INITIAL_BACKOFF_MS": "200",
            "PUSH_RETRY_MAX_BACKOFF_MS": "400",
            "WEBHOOK_REAP_INTERVAL_MS": "500",
            # One JSON object per line (server and workers): log fields can be checked exactly.
            "LOG_OUTPUT_FORMAT": "json",
            **(env or {}),
        }
        self.server = ServerProcess([APP, OTHER], env=self.env).start()
        self.worker_env = {**self.server.env, "SOCKUDO_CONFIG": self.server.config_path}
        self.workers = [self.start_worker() for _ in range(2)]
        self.upload_credentials()

    def start_worker(self) -> Worker:
        return Worker(self.queue, self.worker_env, os.path.join(self.dir, f"worker-{uuid.uuid4().hex[:6]}.log"))

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".log"):
                with open(os.path.join(self.dir, name), encoding="utf-8", errors="replace") as fh:
                    out.append(f"--- {name}\n{fh.read()[-6000:]}")
        return self.server.log()[-6000:] + "\n" + "\n".join(out)

    def log_texts(self) -> dict[str, str]:
        """Every log of the module, whole: ``server`` and each worker's (``worker-….log``, killed
        workers' included)."""
        texts = {"server": self.server.log()}
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".log"):
                with open(os.path.join(self.dir, name), encoding="utf-8", errors="replace") as fh:
                    texts[name] = fh.read()
        return texts

    def worker_log_records(self) -> list[dict[str, Any]]:
        """The workers' JSON log lines, parsed (anything else a process printed is skipped)."""
        records = []
        for name, text in self.log_texts().items():
            if not name.startswith("worker-"):
                continue
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
        return records

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.server.stop()
        self.apns.close()
        self.fcm.close()
        self.webpush.close()

    def reset(self) -> None:
        for fake in (self.apns, self.fcm, self.webpush):
            with fake.lock:
                fake.scripts.clear()
                fake.down = False
                fake.delay = 0.0
                fake.max_concurrency = MAX_CONCURRENCY

    # -- API --

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        return signed(self.server, method, f"/apps/{APP['id']}/push{path}", body, **kwargs)

    def upload_credentials(self) -> None:
        for provider, body in credential_bodies(self.apns_key, self.fcm, self.vapid_key).items():
            resp = self.call("POST", f"/credentials/{provider}", body)
            assert resp.status_code == 201, resp.text

    def register(
        self, device_id: str, recipient: dict[str, Any], client_id: str | None = None, platform: str = "ios"
    ) -> requests.Response:
        body: dict[str, Any] = {
            "id": device_id,
            "platform": platform,
            "formFactor": "phone",
            "push": {"recipient": recipient},
        }
        if client_id:
            body["clientId"] = client_id
        return self.call("POST", "/deviceRegistrations", body)

    def apns_device(self, device_id: str, **kw: Any) -> str:
        token = os.urandom(32).hex()
        assert self.register(device_id, {"transportType": "apns", "deviceToken": token}, **kw).status_code == 201
        return token

    def fcm_device(self, device_id: str, **kw: Any) -> str:
        token = "fcm-" + uuid.uuid4().hex
        resp = self.register(device_id, {"transportType": "gcm", "registrationToken": token}, platform="android", **kw)
        assert resp.status_code == 201, resp.text
        return token

    def web_device(self, device_id: str, **kw: Any) -> tuple[str, ec.EllipticCurvePrivateKey, str]:
        sub = uuid.uuid4().hex
        key, p256dh, auth = web_subscription()
        resp = self.register(
            device_id,
            {"transportType": "web", "endpoint": self.webpush.endpoint(sub), "p256dh": p256dh, "auth": auth},
            platform="browser",
            **kw,
        )
        assert resp.status_code == 201, resp.text
        return sub, key, auth

    def subscribe(self, channel: str, device_id: str) -> None:
        resp = self.call("POST", "/channelSubscriptions", {"channel": channel, "deviceId": device_id})
        assert resp.status_code == 201, resp.text

    def publish(self, body: dict[str, Any]) -> requests.Response:
        return self.call("POST", "/publish", body)

    def status(self, publish_id: str) -> dict[str, Any]:
        resp = self.call("GET", f"/publish/{publish_id}/status")
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def wait_state(self, publish_id: str, states: tuple[str, ...], timeout: float = 20) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            status = self.status(publish_id)
            return status if status["state"] in states else None

        try:
            return wait_until(done, timeout=timeout, interval=0.05, message=f"publish {publish_id} to reach {states}")
        except AssertionError:
            print(self.status(publish_id))
            print(self.logs())
            raise
