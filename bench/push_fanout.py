"""``python -m bench.push_fanout [--devices 10000] [--workers 2]``: push fan-out benchmark (issue 6).

A real server, a throwaway redis-server, N real ``python -m workers push`` processes and a local
fake FCM (tests/support/fake_push.py: OAuth token endpoint + messages:send, HTTP/1.1), all on
127.0.0.1. Registers the devices (straight into the push store, to keep set-up short), subscribes
them to one channel, publishes once, and prints:

- the publish's acceptance time (client round trip of ``POST …/push/publish``, and the server's
  own ``sockudo_push_publish_acceptance_duration_seconds``);
- the time until the status record is terminal, and the provider-side delivery count.

Targets (issue 6): accepted in < 100 ms; fully dispatched within 30 s by two workers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.fake_push import FakeFCM  # noqa: E402
from tests.support.procs import RedisServer, ServerProcess, free_port, wait_until  # noqa: E402
from tests.support.push import APP, signed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.push_fanout")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()

    import redis
    from prometheus_client.parser import text_string_to_metric_families

    from sockudo.push import model
    from sockudo.push.redis_store import RedisStore

    redis_server = RedisServer().start()
    fcm = FakeFCM()
    key = "bench-" + uuid.uuid4().hex
    prefix = "sockudo:push:bench:"
    env = {
        "REDIS_URL": redis_server.url,
        "PUSH_CREDENTIALS_KEY": key,
        "PUSH_ALLOW_INSECURE_ENDPOINTS": "true",
        "FCM_ENDPOINT": fcm.url,
        "PUSH_REDIS_PREFIX": prefix,
        "PUSH_BATCH_SIZE": str(args.batch_size),
        "LOG_LEVEL": "WARNING",
    }
    server = ServerProcess([APP], env=env).start()
    workers: list[subprocess.Popen[bytes]] = []
    logdir = tempfile.mkdtemp(prefix="push-bench-")
    try:
        resp = signed(
            server, "POST", f"/apps/{APP['id']}/push/credentials/fcm", {"serviceAccountJson": fcm.service_account()}
        )
        assert resp.status_code == 201, resp.text
        store = RedisStore(redis.Redis.from_url(redis_server.url), prefix)
        started = time.perf_counter()
        channel = "bench"
        now = int(time.time() * 1000)
        for i in range(args.devices):
            device = model.parse_device(
                APP["id"],
                {
                    "id": f"dev-{i:06d}",
                    "platform": "android",
                    "push": {"recipient": {"transportType": "gcm", "registrationToken": f"tok-{i:06d}"}},
                },
                now_ms=now,
                allow_insecure=True,
            )
            store.put_device(APP["id"], device, model.device_changed)
            store.subscribe(APP["id"], channel, device["id"])
        print(f"registered and subscribed {args.devices} devices in {time.perf_counter() - started:.1f} s")

        worker_env = {**server.env, "SOCKUDO_CONFIG": server.config_path}
        for i in range(args.workers):
            log = open(os.path.join(logdir, f"worker-{i}.log"), "ab")
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "workers",
                        "push",
                        "--metrics-port",
                        str(free_port()),
                        "--metrics-host",
                        "127.0.0.1",
                    ],
                    cwd=ROOT,
                    env=worker_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        time.sleep(2)  # let the workers import and connect before the clock starts

        t0 = time.perf_counter()
        resp = signed(
            server,
            "POST",
            f"/apps/{APP['id']}/push/publish",
            {"recipients": [{"type": "channel", "channel": channel}], "payload": {"title": "bench"}},
        )
        accept_s = time.perf_counter() - t0
        assert resp.status_code == 202, resp.text
        publish_id = resp.json()["publishId"]

        def done() -> dict[str, object] | None:
            status = signed(server, "GET", f"/apps/{APP['id']}/push/publish/{publish_id}/status").json()
            return (
                status if status["state"] in ("succeeded", "partially_succeeded", "failed", "dead_lettered") else None
            )

        status = wait_until(done, timeout=300, interval=0.2)
        total_s = time.perf_counter() - t0
        server_accept = 0.0
        for family in text_string_to_metric_families(server.metrics_text()):
            for sample in family.samples:
                if sample.name == "sockudo_push_publish_acceptance_duration_seconds_sum":
                    server_accept += sample.value
        result = {
            "devices": args.devices,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "accept_round_trip_ms": round(accept_s * 1000, 1),
            "accept_server_ms": round(server_accept * 1000, 1),
            "dispatch_total_s": round(total_s, 2),
            "state": status["state"],
            "counters": status["counters"],
            "provider_accepted": fcm.total_accepted(),
            "deliveries_per_s": round(args.devices / total_s, 1),
        }
        print(json.dumps(result, indent=2))
        print(
            f"targets: accepted < 100 ms: {'OK' if accept_s < 0.1 else 'MISSED'}; "
            f"dispatched within 30 s: {'OK' if total_s <= 30 and fcm.total_accepted() == args.devices else 'MISSED'}"
        )
        return 0
    finally:
        for proc in workers:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()
        fcm.close()
        redis_server.stop()


if __name__ == "__main__":
    sys.exit(main())
