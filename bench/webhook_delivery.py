"""``python -m bench.webhook_delivery``: webhook deliveries per second to an endpoint with real
latency, for the worker before and after the pool, side by side in one run.

    python -m bench.webhook_delivery [--delay-ms 200] [--rounds 3] [--seconds 10] [--json out.json]

One Redis, one receiver (``bench.webhook_receiver`` answering every request after
``--delay-ms``), and per round, one after the other on a freshly flushed database with the same
backlog of signed deliveries (one event each) for that one endpoint:

- ``forking``: ``python -m workers --fork``, RQ's forking worker (``rq worker --with-scheduler``
  semantics) — one work-horse process per job, one request at a time — which is what
  ``python -m workers`` ran before the pool;
- ``pool``: ``python -m workers`` (default ``--concurrency`` 100, per-endpoint cap "auto": a
  quarter of the slots, 25);
- ``pool-cap100``: the same with ``max_concurrent_per_endpoint = 100`` (the cap at the pool's size).

Each worker runs for ``--seconds``; its rate is the deliveries the receiver counted (each
delivery id once, every signature checked) over the time from the first to the last of them.
The figures are medians over the rounds, with each configuration's ratio to ``forking``.
Everything on 127.0.0.1; about ``rounds x 3 x (seconds + 3)`` seconds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

import redis

from bench.harness import APP_ID, APP_KEY, APP_SECRET, ROOT, cpu_seconds
from sockudo.webhooks.model import RetryPolicy, WebhookSettings, build_deliveries, parse_endpoint
from sockudo.webhooks.queue import RqQueue
from tests.support.procs import RedisServer, free_port, wait_until

PREFIX = "bench_webhooks:"
KINDS = ("forking", "pool", "pool-cap100")


def _receiver(stack: ExitStack, delay_ms: float) -> int:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.webhook_receiver", "--port", str(port),
                             "--delay-ms", str(delay_ms)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    stack.callback(_stop, proc)
    wait_until(lambda: _stats(port), timeout=20, message="webhook receiver")
    return port


def _stats(port: int, reset: bool = False) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        if reset:
            conn.request("POST", "/reset", body=b"{}")
        else:
            conn.request("GET", "/stats")
        raw = conn.getresponse().read()
        return json.loads(raw) if raw else {}
    finally:
        conn.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _enqueue(client: redis.Redis, url: str, count: int, max_concurrent: int) -> None:
    hook = parse_endpoint("bench", {"url": url, "event_types": ["channel_occupied"]})
    settings = WebhookSettings(retry=RetryPolicy(), max_concurrent_per_endpoint=max_concurrent)
    now = int(time.time() * 1000)
    deliveries = [d for i in range(count) for d in build_deliveries(
        APP_ID, APP_KEY, APP_SECRET, [hook], settings, now, [{"name": "channel_occupied", "channel": f"bench-{i}"}],
        prefix=PREFIX)]
    queue = RqQueue(client, PREFIX)
    for start in range(0, len(deliveries), 500):
        queue.enqueue(deliveries[start:start + 500])


def _worker(kind: str, redis_url: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOCKUDO_", "REDIS_", "WEBHOOK_"))}
    env["LOG_LEVEL"] = "warning"
    cmd = [sys.executable, "-m", "workers", "--url", redis_url, *(["--fork"] if kind == "forking" else [])]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _children_cpu(pid: int) -> float:
    """cutime + cstime: the CPU of reaped children (the forking worker's work-horses)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, redis_url: str, port: int, backlog: int, seconds: float) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    _stats(port, reset=True)
    _enqueue(client, f"http://127.0.0.1:{port}/hook", backlog, 100 if kind == "pool-cap100" else 0)
    proc = _worker(kind, redis_url)
    try:
        started = time.monotonic()
        deadline = started + seconds + 5  # + start-up
        while time.monotonic() < deadline:
            stats = _stats(port)
            if stats["first_s"] and time.time() - stats["first_s"] >= seconds:
                break
            if stats["deliveries"] >= backlog:
                break
            time.sleep(0.25)
        stats = _stats(port)
        cpu = cpu_seconds([proc.pid]) + _children_cpu(proc.pid)
    finally:
        _stop(proc)
        client.close()
    span = (stats["last_s"] or 0) - (stats["first_s"] or 0)
    rate = stats["deliveries"] / span if span > 0 else 0.0
    return {"deliveries": stats["deliveries"], "seconds": round(span, 2), "per_s": round(rate, 1),
            "duplicates": stats["duplicates"], "bad_signatures": stats["bad_signatures"],
            "worker_cpu_ms_per_delivery": round(1000 * cpu / stats["deliveries"], 2) if stats["deliveries"] else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_delivery", description=__doc__.split("\n")[0])
    parser.add_argument("--delay-ms", type=float, default=200.0, help="the endpoint's latency (default 200)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each worker runs per round")
    parser.add_argument("--backlog", type=int, default=3000, help="deliveries queued before each worker starts")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    with ExitStack() as stack:
        server = RedisServer().start()
        stack.callback(server.stop)
        port = _receiver(stack, args.delay_ms)
        for rnd in range(args.rounds):
            for kind in KINDS:
                res = measure(kind, server.url, port, args.backlog, args.seconds)
                results[kind].append(res)
                print(f"round {rnd + 1}/{args.rounds} {kind:12} {res['per_s']:7.1f} deliveries/s "
                      f"({res['deliveries']} in {res['seconds']} s, duplicates {res['duplicates']}, "
                      f"bad signatures {res['bad_signatures']}, worker CPU {res['worker_cpu_ms_per_delivery']} "
                      f"ms/delivery)", flush=True)

    base = [r["per_s"] for r in results["forking"]]
    summary: dict[str, Any] = {"delay_ms": args.delay_ms, "rounds": args.rounds, "seconds": args.seconds,
                               "runs": results, "median": {}}
    print(f"\nwebhook deliveries/s to one endpoint answering in {args.delay_ms:.0f} ms "
          f"(median of {args.rounds} rounds; ratio: per round, to that round's forking worker)")
    print(f"{'worker':14}{'deliveries/s':>14}{'ratio':>9}{'CPU ms/delivery':>17}")
    for kind in KINDS:
        rates = [r["per_s"] for r in results[kind]]
        ratios = [r / b for r, b in zip(rates, base, strict=True) if b]
        cpu = [r["worker_cpu_ms_per_delivery"] for r in results[kind] if r["worker_cpu_ms_per_delivery"] is not None]
        med = {"per_s": statistics.median(rates), "ratio": round(statistics.median(ratios), 1) if ratios else None,
               "cpu_ms_per_delivery": statistics.median(cpu) if cpu else None}
        summary["median"][kind] = med
        print(f"{kind:14}{med['per_s']:14.1f}{(med['ratio'] or 0):8.1f}x{(med['cpu_ms_per_delivery'] or 0):17.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
