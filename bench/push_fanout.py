"""``python -m bench.push_fanout``: push delivery at provider latency, old worker against new.

    python -m bench.push_fanout [--devices 10000] [--workers 2] [--latency-ms 100] [--runs 3]
                                [--providers apns,fcm,webpush] [--baseline-devices 100]
                                [--baseline-rev REV] [--fork]

A real server, a throwaway redis-server, N real ``python -m workers push`` processes (the pooled
worker: jobs run concurrently in the worker's own gevent process; ``--fork``: RQ's forking
worker, one work-horse process per job) and the
local fake APNs (HTTP/2 over TLS), FCM (OAuth + ``messages:send``) and Web Push services of
tests/support/fake_push.py, all on 127.0.0.1, each fake answering after ``--latency-ms``.
Devices are written straight into the push store (set-up stays short) and subscribed to one
channel per provider; every run publishes once to a channel and times it until the status
record is terminal: **devices delivered per second**, plus the publish's acceptance time.

Two worker configurations run side by side in one invocation, in interleaved rounds (median of
``--runs``):

- ``baseline``: the workers of ``--baseline-rev`` (a git revision, extracted with ``git
  archive``; e.g. the commit before concurrent dispatch), else the current code with one
  request in flight per provider (``PUSH_*_CONCURRENCY=1``): one delivery at a time per worker.
  Sending one at a time, a baseline run is ``--baseline-devices`` devices (10,000 would take
  minutes);
- ``concurrent``: the current workers with their defaults, ``--devices`` devices.

After each start the workers deliver one small publish per provider (50 devices, untimed): a
worker is long-lived, and its first publish also pays connections, handshakes and token signing.
Each run also reports the workers' CPU per delivery (from /proc: the worker processes and
their reaped work-horses) and the fakes' (this process's CPU time).

Targets: 2 workers, 100 ms latency: Web Push ≥ 1,000 devices/s (10,000 in ≤ 10 s), APNs and
FCM ≥ 2,000 devices/s; publish accepted in < 100 ms.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from bench.harness import extract_tree  # noqa: E402
from sockudo.push import crypto  # noqa: E402
from tests.support.fake_push import FakeAPNs, FakeFCM, FakeWebPush, web_subscription  # noqa: E402
from tests.support.procs import RedisServer, ServerProcess, free_port, wait_until  # noqa: E402
from tests.support.push import APP, KEY_ID, TEAM_ID, TOPIC, credential_bodies, signed  # noqa: E402

FINAL = ("succeeded", "partially_succeeded", "failed", "dead_lettered")
TARGETS = {"apns": 2000.0, "fcm": 2000.0, "webpush": 1000.0}
WARM_UP_DEVICES = 50  # per provider, delivered once after each worker start, before the timed runs


def cpu_s(pid: int) -> float:
    """CPU seconds of a process and its reaped children (RQ's work-horses) from /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="push-bench-")
        latency = args.latency_ms / 1000
        self.apns_key = ec.generate_private_key(ec.SECP256R1())
        self.vapid_key = ec.generate_private_key(ec.SECP256R1())
        self.apns = FakeAPNs(
            team_id=TEAM_ID,
            key_id=KEY_ID,
            public_key=self.apns_key.public_key(),
            topic=TOPIC,
            cert_dir=self.dir,
            delay=latency,
        )
        # FCM over HTTP/2 with TLS, as Google serves it (its certificate is in the same CA file).
        self.fcm = FakeFCM(delay=latency, cert_dir=self.dir)
        self.webpush = FakeWebPush(
            vapid_public_key=crypto.b64url(crypto.p256_public_raw(self.vapid_key)), delay=latency
        )
        self.redis = RedisServer().start()
        self.prefix = "sockudo:push:bench:"
        self.env = {
            "REDIS_URL": self.redis.url,
            "PUSH_CREDENTIALS_KEY": "bench-" + uuid.uuid4().hex,
            "PUSH_ALLOW_INSECURE_ENDPOINTS": "true",
            "PUSH_CA_FILE": self.ca_file(),
            "APNS_ENDPOINT": self.apns.url,
            "FCM_ENDPOINT": self.fcm.url,
            "PUSH_REDIS_PREFIX": self.prefix,
            "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        }
        self.server = ServerProcess([APP], env=self.env).start()
        self.workers: list[subprocess.Popen[bytes]] = []
        self.fakes = {"apns": self.apns, "fcm": self.fcm, "webpush": self.webpush}

    def ca_file(self) -> str:
        """One bundle with both fakes' self-signed certificates."""
        path = os.path.join(self.dir, "fakes-ca.pem")
        with open(path, "w", encoding="ascii") as out:
            for cert in (self.apns.cert_path, self.fcm.cert_path):
                with open(cert, encoding="ascii") as fh:
                    out.write(fh.read())
        return path

    def close(self) -> None:
        self.stop_workers()
        self.server.stop()
        for fake in self.fakes.values():
            fake.close()
        self.redis.stop()

    # -- set-up --

    def upload_credentials(self) -> None:
        for provider, body in credential_bodies(self.apns_key, self.fcm, self.vapid_key).items():
            resp = signed(self.server, "POST", f"/apps/{APP['id']}/push/credentials/{provider}", body)
            assert resp.status_code == 201, resp.text

    def register(self, provider: str, count: int, channels: dict[str, int]) -> None:
        """``count`` devices of ``provider``; the first ``n`` of them on each channel of ``channels``."""
        import redis

        from sockudo.push import model
        from sockudo.push.redis_store import RedisStore

        store = RedisStore(redis.Redis.from_url(self.redis.url), self.prefix)
        now = int(time.time() * 1000)
        _, p256dh, auth = web_subscription()

        def one(i: int) -> None:
            device_id = f"{provider}-{i:06d}"
            if provider == "apns":
                recipient: dict[str, Any] = {"transportType": "apns", "deviceToken": f"{i:064x}"}
            elif provider == "fcm":
                recipient = {"transportType": "gcm", "registrationToken": f"tok-{i:06d}"}
            else:
                recipient = {
                    "transportType": "web",
                    "endpoint": self.webpush.endpoint(f"sub{i:06d}"),
                    "p256dh": p256dh,
                    "auth": auth,
                }
            platform = {"apns": "ios", "fcm": "android", "webpush": "browser"}[provider]
            device = model.parse_device(
                APP["id"],
                {"id": device_id, "platform": platform, "push": {"recipient": recipient}},
                now_ms=now,
                allow_insecure=True,
            )
            store.put_device(APP["id"], device, model.device_changed)
            for channel, n in channels.items():
                if i < n:
                    store.subscribe(APP["id"], channel, device_id)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(count)))

    # -- workers --

    def start_workers(self, mode: str, base: Path | None) -> None:
        env = {**self.server.env, "SOCKUDO_CONFIG": self.server.config_path}
        # Planning happens in the workers: the batch size is theirs (the baseline keeps the default).
        env["PUSH_BATCH_SIZE"] = "100" if mode == "baseline" else str(self.args.batch_size)
        cwd = ROOT
        if mode == "baseline":
            if base is not None:
                cwd = base
                if not (base / "sockudo" / "push" / "h2client.py").exists():
                    # Before concurrent dispatch, FCM was sent over HTTP/1.1: the fake's HTTP/1.1 side.
                    env["FCM_ENDPOINT"] = f"http://127.0.0.1:{self.fcm.http_port}"
            else:
                env.update({f"PUSH_{p.upper()}_CONCURRENCY": "1" for p in ("apns", "fcm", "webpush")})
        command = [sys.executable, "-m", "workers", "push", "--metrics-port", "{port}", "--metrics-host", "127.0.0.1"]
        if mode == "concurrent" and self.args.fork:
            command.append("--fork")  # RQ's forking worker: a work-horse process (and connections) per job
        for i in range(self.args.workers):
            log = open(os.path.join(self.dir, f"{mode}-worker-{i}.log"), "ab")  # noqa: SIM115
            self.workers.append(
                subprocess.Popen(
                    [part.replace("{port}", str(free_port())) for part in command],
                    cwd=cwd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        time.sleep(2)  # let the workers import and connect before the clock starts

    def warm_up(self, providers: list[str]) -> None:
        """One small publish per provider before the timed ones: workers are long-lived, and the
        first publish after a start also pays the provider connections, TLS handshakes, token
        signing and lazy imports (for every provider, so the first one timed is not penalised)."""
        for provider in providers:
            out = self.run(provider, f"{provider}-warm", WARM_UP_DEVICES)
            assert out["state"] == "succeeded", out

    def stop_workers(self) -> None:
        for proc in self.workers:
            proc.terminate()
        for proc in self.workers:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.workers = []

    # -- one run --

    def run(self, provider: str, channel: str, devices: int) -> dict[str, Any]:
        fake = self.fakes[provider]
        before = fake.total_accepted()
        cpu_before = sum(cpu_s(p.pid) for p in self.workers)
        own_before = time.process_time()
        t0 = time.perf_counter()
        resp = signed(
            self.server,
            "POST",
            f"/apps/{APP['id']}/push/publish",
            {"recipients": [{"type": "channel", "channel": channel}], "payload": {"title": "bench"}},
        )
        accept_s = time.perf_counter() - t0
        assert resp.status_code == 202, resp.text
        publish_id = resp.json()["publishId"]

        def done() -> dict[str, Any] | None:
            status = signed(self.server, "GET", f"/apps/{APP['id']}/push/publish/{publish_id}/status").json()
            return status if status["state"] in FINAL else None

        status = wait_until(done, timeout=600, interval=0.05)
        total_s = time.perf_counter() - t0
        delivered = fake.total_accepted() - before
        time.sleep(0.3)  # the last work-horse's CPU is counted once it is reaped
        worker_cpu = sum(cpu_s(p.pid) for p in self.workers) - cpu_before
        fake_cpu = time.process_time() - own_before
        return {
            "devices": devices,
            "seconds": round(total_s, 2),
            "per_s": round(devices / total_s, 1),
            "accept_ms": round(accept_s * 1000, 1),
            "state": status["state"],
            "succeeded": status["counters"]["succeeded"],
            "provider_accepted": delivered,
            "worker_cpu_ms_per_delivery": round(worker_cpu * 1000 / devices, 2),
            "fake_cpu_ms_per_delivery": round(fake_cpu * 1000 / devices, 2),
        }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.push_fanout")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--baseline-devices", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100, help="devices per dispatch job (concurrent workers)")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--providers", default="apns,fcm,webpush")
    parser.add_argument("--baseline-rev", default=None, help="git revision whose workers are the baseline")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--fork", action="store_true",
                        help="run the current workers with --fork (RQ's forking worker, a work-horse per job) "
                             "instead of the default pooled worker")
    args = parser.parse_args()
    providers = [p for p in args.providers.split(",") if p]

    base = extract_tree(args.baseline_rev) if args.baseline_rev else None
    bench = Bench(args)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {p: {"baseline": [], "concurrent": []} for p in providers}
    try:
        bench.upload_credentials()
        started = time.perf_counter()
        for provider in providers:
            bench.register(provider, args.devices, {f"{provider}-all": args.devices,
                                                    f"{provider}-few": args.baseline_devices,
                                                    f"{provider}-warm": WARM_UP_DEVICES})
        print(f"registered {args.devices} devices per provider in {time.perf_counter() - started:.1f} s", flush=True)
        for run in range(args.runs):  # interleaved rounds: both configurations see the same machine load
            for mode in ("baseline", "concurrent"):
                bench.start_workers(mode, base)
                try:
                    bench.warm_up(providers)
                    for provider in providers:
                        few = mode == "baseline"
                        channel = f"{provider}-few" if few else f"{provider}-all"
                        out = bench.run(provider, channel, args.baseline_devices if few else args.devices)
                        results[provider][mode].append(out)
                        print(f"run {run + 1} {mode:10s} {provider:8s} {json.dumps(out)}", flush=True)
                finally:
                    bench.stop_workers()
    finally:
        bench.close()

    print()
    print(f"{args.workers} workers, {args.latency_ms:.0f} ms provider latency, median of {args.runs} runs "
          f"(baseline: {'rev ' + args.baseline_rev if args.baseline_rev else 'one request in flight per worker'})")
    print(f"{'provider':8s} {'baseline/s':>11s} {'concurrent/s':>13s} {'range/s':>13s} {'ratio':>7s} "
          f"{'total s':>8s} {'accept ms':>10s} {'cpu ms/dlv':>11s} {'fake ms':>8s} {'target/s':>9s}")
    summary = {}
    for provider in providers:
        base_rate = statistics.median(r["per_s"] for r in results[provider]["baseline"])
        new_rate = statistics.median(r["per_s"] for r in results[provider]["concurrent"])
        new_s = statistics.median(r["seconds"] for r in results[provider]["concurrent"])
        accept = statistics.median(r["accept_ms"] for r in results[provider]["concurrent"])
        rates = [r["per_s"] for r in results[provider]["concurrent"]]
        cpu = statistics.median(r["worker_cpu_ms_per_delivery"] for r in results[provider]["concurrent"])
        base_cpu = statistics.median(r["worker_cpu_ms_per_delivery"] for r in results[provider]["baseline"])
        fake_cpu = statistics.median(r["fake_cpu_ms_per_delivery"] for r in results[provider]["concurrent"])
        complete = all(
            r["provider_accepted"] == r["devices"] and r["state"] == "succeeded"
            for mode in ("baseline", "concurrent")
            for r in results[provider][mode]
        )
        ok = new_rate >= TARGETS[provider] and accept < 100 and complete
        summary[provider] = {"baseline_per_s": base_rate, "concurrent_per_s": new_rate, "ratio": new_rate / base_rate,
                             "concurrent_range_per_s": [min(rates), max(rates)], "concurrent_s": new_s,
                             "accept_ms": accept, "worker_cpu_ms_per_delivery": cpu,
                             "baseline_worker_cpu_ms_per_delivery": base_cpu, "fake_cpu_ms_per_delivery": fake_cpu,
                             "complete": complete, "target_met": ok}
        span = f"{min(rates):.0f}-{max(rates):.0f}"
        print(f"{provider:8s} {base_rate:11.1f} {new_rate:13.1f} {span:>13s} {new_rate / base_rate:6.1f}x "
              f"{new_s:8.2f} {accept:10.1f} {cpu:11.2f} {fake_cpu:8.2f} {TARGETS[provider]:9.0f} "
              f"{'OK' if ok else 'MISSED'}"
              f"{'' if complete else ' (deliveries missing or duplicated)'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
