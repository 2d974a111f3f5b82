"""Scenarios for the Redis adapter, webhook and recovery targets (docs/performance.md).

Unlike the scenarios of bench/scenarios.py (one server kind at a time), each of these starts every compared
configuration at once — its own server(s) and its own throwaway redis-server — connects all
clients, then measures the configurations in interleaved rounds (the order rotates each round).
Other load on the shared machine therefore hits every configuration alike; figures are the
medians over rounds, and comparisons are ratios of medians. Server cost is the server processes'
own CPU (plus redis-server's where Redis is part of the configuration), from /proc.

| scenario | group | what |
|---|---|---|
| ``cross-fanout`` | cluster | 1,000 subscribers split over 2 nodes vs the same on one node → deliveries/s ratio |
| ``cross-latency`` | cluster | publish on node A (signed REST, keep-alive publishers, 1,000/s), receive on B → p99 |
| ``cross-churn`` | cluster | 200 clients switching among 1,000 channels every second, 2 nodes → exact /channels |
| ``webhooks`` | — | 2,000 client events/s → webhooks via RQ; publish latency vs off; drain by 2 workers |
| ``recovery-fanout`` | recovery | fan-out with [connection_recovery] + [history] on vs off, memory and Redis mode |
| ``publish-cost`` | recovery | per publish: round trip, server and Redis CPU, recovery+history on vs off |
| ``resume`` | recovery | 1,000 protocol-2 clients each missing 20 messages resume → time, exactness |
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from sockudo.core.auth import rest_signature
from tests.support.procs import RedisServer, ServerProcess, free_port, wait_until

from .fmt import fmt as _f
from .fmt import print_rows as _rows
from .harness import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    ROOT,
    CpuMeter,
    Pools,
    Publisher,
    Target,
    cpu_seconds,
    percentiles,
    wait_for_quiet,
)
from .scenarios import PAYLOAD, Sizes

# --py-spy PATH --profile-dir DIR: every node of these scenarios is sampled by py-spy
PROFILE: dict[str, Any] = {"py_spy": None, "dir": str(ROOT / "bench" / "results" / "profiles"), "scenario": ""}

SCENARIOS = ("cross-fanout", "cross-latency", "cross-churn", "webhooks", "recovery-fanout", "publish-cost", "resume")
GROUPS = {"cluster": ("cross-fanout", "cross-latency", "cross-churn"),
          "recovery": ("recovery-fanout", "publish-cost", "resume")}


def _app(**extra: Any) -> dict[str, Any]:
    return {"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET, **extra}


def _pct(samples: list[float], points: tuple[float, ...]) -> dict[str, float | None]:
    """Like harness.percentiles, but names fractional points right ("p99.9")."""
    ordered = sorted(samples)
    out: dict[str, float | None] = {}
    for p in points:
        name = f"p{p:g}"
        if not ordered:
            out[name] = None
            continue
        index = min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))
        out[name] = round(ordered[index], 3)
    out["max"] = round(ordered[-1], 3) if ordered else None
    return out


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 3)
    return None


# -- servers ------------------------------------------------------------------------------


class Node:
    """One ``python -m sockudo`` (a node of a cluster, or a lone server) and how to reach it."""

    def __init__(self, label: str, apps: list[dict[str, Any]] | None = None, env: dict[str, str] | None = None,
                 protocol: int = 7, **top: Any) -> None:
        self.label = label
        self.protocol = protocol
        self.server = ServerProcess(apps=apps or [_app()], env=env or {}, **top)
        self.target: Target

    def start(self) -> Node:
        self.server.start()
        self.pid = self.server.proc.pid  # type: ignore[union-attr]
        self.target = Target("sockudo", self.label, self.server.port, "pusher", [self.pid], signed=True,
                             protocol=self.protocol)
        self._spy: subprocess.Popen[bytes] | None = None
        if PROFILE.get("py_spy"):
            # --py-spy: sample this node for its whole life; collapsed stacks, one file per node
            os.makedirs(PROFILE["dir"], exist_ok=True)
            name = "".join(ch if ch.isalnum() else "-" for ch in self.label)
            path = os.path.join(PROFILE["dir"], f"{PROFILE['scenario']}-{name}-{self.pid}.txt")
            self._spy = subprocess.Popen([PROFILE["py_spy"], "record", "--pid", str(self.pid), "--format", "raw",
                                          "--rate", "100", "--nonblocking", "--output", path],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        spy = getattr(self, "_spy", None)
        if spy is not None and spy.poll() is None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        self.server.stop()

    def metric(self, name: str) -> float:
        """Sum of every sample called ``name`` (all label sets) from this node's /metrics."""
        total = 0.0
        for line in self.server.metrics_text().splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def get(self, path: str, params: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, Any, float]:
        """Signed GET; returns (status, JSON body, seconds)."""
        pairs = [("auth_key", APP_KEY), ("auth_timestamp", str(int(time.time()))), ("auth_version", "1.0"),
                 *(params or {}).items()]
        sig = rest_signature(APP_SECRET, "GET", path, pairs)
        query = urllib.parse.urlencode([*pairs, ("auth_signature", sig)])
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=timeout)
        t0 = time.perf_counter()
        try:
            conn.request("GET", f"{path}?{query}")
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, json.loads(body) if body else None, time.perf_counter() - t0
        finally:
            conn.close()


def _start(stack: ExitStack, node: Node) -> Node:
    stack.callback(node.stop)  # registered first: a failed start still stops it
    return node.start()


def _redis_server(stack: ExitStack) -> RedisServer:
    server = RedisServer()
    stack.callback(server.stop)
    return server.start()


def _pools(stack: ExitStack, target: Target, n: int, procs: int, channels: dict[str, Any],
           inflight: int = 50) -> Pools:
    pools = Pools(target, n, procs, channels, inflight=inflight)
    stack.callback(pools.close)
    return pools


def _connect(pools: Pools, n: int, what: str, timeout: float = 120) -> None:
    c = pools.connect(timeout=timeout)
    if c["ok"] != n:
        raise RuntimeError(f"{what}: only {c['ok']}/{n} subscribed: {c['errors']}")


def _rotated(items: list[Any], r: int) -> list[Any]:
    k = r % len(items)
    return items[k:] + items[:k]


# -- one fan-out burst ----------------------------------------------------------------------


def fanout_round(pools: Pools, pub: Publisher, channel: str, total: int, window: int, pids: list[int],
                 timeout: float = 30) -> dict[str, Any]:
    """``total`` publishes to ``channel``, at most ``window`` in flight (1: each only once every
    subscriber has the previous); deliveries/s and CPU per delivery of ``pids``."""
    pools.reset_count()
    meter = CpuMeter(pids).start()
    for i in range(total):
        if i >= window and not pools.wait_delivered(i - window + 1, timeout=timeout):
            meter.stop()
            return {"error": f"publish {i} not delivered to every subscriber within {timeout} s"}
        if pub.publish(channel, PAYLOAD) != 200:
            meter.stop()
            return {"error": f"publish {i} rejected"}
    complete = pools.wait_delivered(total, timeout=timeout)
    meter.stop()
    stats = pools.stats()
    deliveries = stats["count"]
    return {
        "deliveries": deliveries,
        "complete": complete and deliveries == pools.n * total,
        "deliveries_per_s": round(deliveries / meter.wall),
        "cpu_us_per_delivery": round(meter.cpu / deliveries * 1e6, 2) if deliveries else None,
        "server_cpu_s_by_process": list(meter.by_pid.values()),
        "machine_busy_cores": round(meter.machine_busy, 2),
        "wall_s": round(meter.wall, 3),
    }


def _summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rounds if "error" not in r]
    out: dict[str, Any] = {
        "rounds": len(rounds),
        "deliveries_per_s": _median([r["deliveries_per_s"] for r in ok]),
        "cpu_us_per_delivery": _median([r["cpu_us_per_delivery"] for r in ok]),
        "deliveries_per_s_all": [r["deliveries_per_s"] for r in ok],
        "cpu_us_per_delivery_all": [r["cpu_us_per_delivery"] for r in ok],
        "all_complete": all(r.get("complete") for r in ok) and len(ok) == len(rounds),
        "machine_busy_cores": _median([r["machine_busy_cores"] for r in ok]),
    }
    if ok and len(ok[0]["server_cpu_s_by_process"]) > 1:
        out["cpu_share_by_process"] = [
            _median([r["server_cpu_s_by_process"][i] / max(1e-9, sum(r["server_cpu_s_by_process"])) for r in ok])
            for i in range(len(ok[0]["server_cpu_s_by_process"]))
        ]
    errors = [r["error"] for r in rounds if "error" in r]
    if errors:
        out["errors"] = errors[:3]
    return out


def _interleaved_fanout(configs: dict[str, dict[str, Any]], sizes: Sizes, rounds: int, publishes: int,
                        log: Callable[[str], None]) -> dict[str, Any]:
    """Each config: {"pools", "pub", "pids", "channel"}; rounds × (window 1, window W) each."""
    shapes = {"strict": 1, "pipelined": sizes.fanout_window}
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {k: {s: [] for s in shapes} for k in configs}
    for cfg in configs.values():  # warm-up (connections, code paths, first serials)
        for _ in range(sizes.fanout_warmup):
            cfg["pub"].publish(cfg["channel"], PAYLOAD)
        cfg["pools"].wait_delivered(sizes.fanout_warmup, timeout=30)
    for r in range(rounds):
        wait_for_quiet(sizes.quiet_wait_s / 3)
        for name in _rotated(list(configs), r):
            cfg = configs[name]
            for shape, window in shapes.items():
                res = fanout_round(cfg["pools"], cfg["pub"], cfg["channel"], publishes, window, cfg["pids"])
                raw[name][shape].append(res)
                log(f"  round {r + 1}/{rounds} {name} {shape}: {res.get('deliveries_per_s')} deliveries/s, "
                    f"{res.get('cpu_us_per_delivery')} µs/delivery {res.get('error', '')}")
    return {name: {shape: {**_summarise(raw[name][shape]), "window": shapes[shape]} for shape in shapes}
            for name in configs}


# -- cross-fanout: cross-node fan-out ---------------------------------------------------------


def cross_fanout(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    n = sizes.cross_subscribers
    out: dict[str, Any] = {"subscribers": n, "publishes_per_round": sizes.cross_publishes,
                           "rounds": sizes.cross_rounds, "pipelined_window": sizes.fanout_window}
    with ExitStack() as stack:
        r1 = _redis_server(stack)
        r2 = _redis_server(stack)
        single = _start(stack, Node("one node (local adapter)"))
        single_r = _start(stack, Node("one node (redis adapter)", env={"REDIS_URL": r1.url}))
        a = _start(stack, Node("node A", env={"REDIS_URL": r2.url}))
        b = _start(stack, Node("node B", env={"REDIS_URL": r2.url}))
        r1_pid, r2_pid = r1.proc.pid, r2.proc.pid  # type: ignore[union-attr]
        ch = {"kind": "same", "name": "fanout"}
        p_single = _pools(stack, single.target, n, sizes.client_procs, ch)
        p_single_r = _pools(stack, single_r.target, n, sizes.client_procs, ch)
        p_a = _pools(stack, a.target, n // 2, 1, ch)
        p_b = _pools(stack, b.target, n - n // 2, 1, ch)
        p_two = Pools.merge([p_a, p_b])
        for pools, what in ((p_single, "one node"), (p_single_r, "one node redis"), (p_two, "two nodes")):
            _connect(pools, n, what)
        time.sleep(1.0)  # cluster-wide subscription state settles
        pubs = [Publisher(t) for t in (single.target, single_r.target, a.target)]
        for pub in pubs:
            stack.callback(pub.close)
        configs = {
            "one_node": {"pools": p_single, "pub": pubs[0], "pids": [single.pid], "channel": "fanout"},
            "one_node_redis": {"pools": p_single_r, "pub": pubs[1], "pids": [single_r.pid, r1_pid],
                               "channel": "fanout"},
            "two_nodes": {"pools": p_two, "pub": pubs[2], "pids": [a.pid, b.pid, r2_pid], "channel": "fanout"},
        }
        out["configs"] = {"one_node": "1 process, local adapter, 1,000 subscribers",
                          "one_node_redis": "1 process with REDIS_URL (redis adapter), 1,000 subscribers",
                          "two_nodes": "2 processes + Redis, 500 subscribers on each, publishes to node A"}
        out["cpu_processes"] = {"one_node": ["server"], "one_node_redis": ["server", "redis"],
                                "two_nodes": ["node A", "node B", "redis"]}
        out["results"] = _interleaved_fanout(configs, sizes, sizes.cross_rounds, sizes.cross_publishes, log)
        count = b.metric("sockudo_adapter_receive_latency_ms_count")
        if count:
            out["node_b_adapter_receive_latency_ms_mean"] = round(
                b.metric("sockudo_adapter_receive_latency_ms_sum") / count, 3)
    res = out["results"]
    out["ratios"] = {
        shape: {
            "two_nodes_vs_one_node": _ratio(res["two_nodes"][shape]["deliveries_per_s"],
                                            res["one_node"][shape]["deliveries_per_s"]),
            "two_nodes_vs_one_node_redis": _ratio(res["two_nodes"][shape]["deliveries_per_s"],
                                                  res["one_node_redis"][shape]["deliveries_per_s"]),
            "cpu_two_nodes_vs_one_node": _ratio(res["two_nodes"][shape]["cpu_us_per_delivery"],
                                                res["one_node"][shape]["cpu_us_per_delivery"]),
        }
        for shape in ("strict", "pipelined")
    }
    return out


# -- cross-latency: cross-node latency at 1,000 publishes/s --------------------------------------


def _paced_publisher(target: Target, channels: list[str], rate: float, seconds: float, start_at: float,
                     results: Any) -> None:
    """One keep-alive signed publisher at ``rate``/s from wall time ``start_at``; the data
    carries the send time (ms since the epoch) for the receivers."""
    pub = Publisher(target)
    pub.publish("warm-up", PAYLOAD)  # connect before the clock (a channel nobody listens on)
    total = int(rate * seconds)
    ok = errors = 0
    max_lag = 0.0
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    t0 = time.perf_counter()
    for i in range(total):
        due = t0 + i / rate
        lag = time.perf_counter() - due
        if lag < 0:
            time.sleep(-lag)
        else:
            max_lag = max(max_lag, lag)
        try:
            status = pub.publish(channels[i % len(channels)], json.dumps({"t": time.time() * 1000}))
        except OSError:
            status = 0
        if status == 200:
            ok += 1
        else:
            errors += 1
    elapsed = time.perf_counter() - t0
    pub.close()
    results.put({"ok": ok, "errors": errors, "elapsed": elapsed, "max_lag_ms": round(max_lag * 1000, 1)})


def _latency_round(pools: Pools, pub_target: Target, channels: list[str], per_channel: int, sizes: Sizes,
                   pids: list[int]) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    k = sizes.xlat_publishers
    results = ctx.Queue()
    start_at = time.time() + 2.0  # spawned interpreters import and connect first
    # each publisher cycles over its own share of the channels
    procs = [ctx.Process(target=_paced_publisher,
                         args=(pub_target, channels[i::k] or channels, sizes.xlat_rate / k, sizes.xlat_seconds,
                               start_at, results)) for i in range(k)]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at - time.time() - 0.3))
    pools.broadcast("ok", cmd="latency")  # drops the warm-up messages' samples
    meter = CpuMeter(pids).start()
    totals = [results.get(timeout=sizes.xlat_seconds + 60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    published = sum(t["ok"] for t in totals)
    expected = published * per_channel
    deadline = time.monotonic() + 10
    while True:  # let the last deliveries land
        stats = pools.stats(latencies=False)
        if stats["count"] >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    meter.stop()
    stats = pools.stats(latencies=True)
    samples = stats["latencies"]
    elapsed = max(t["elapsed"] for t in totals)
    return {
        "published": published,
        "publish_errors": sum(t["errors"] for t in totals),
        "publishes_per_s": round(published / elapsed, 1),
        "publisher_max_lag_ms": max(t["max_lag_ms"] for t in totals),
        "deliveries": stats["count"],
        "expected_deliveries": expected,
        "samples": len(samples),
        "latency_ms": _pct(samples, (50, 90, 99, 99.9)),
        "_samples": samples,
        "server_cpu_s_by_process": list(meter.by_pid.values()),
        "server_cpu_util": round(meter.cpu / meter.wall, 3),
        "machine_busy_cores": round(meter.machine_busy, 2),
    }


def cross_latency(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    n, m = sizes.xlat_receivers, sizes.xlat_channels
    channels = [f"lat-{i}" for i in range(m)]
    out: dict[str, Any] = {"rate_per_s": sizes.xlat_rate, "seconds_per_round": sizes.xlat_seconds,
                           "rounds": sizes.xlat_rounds, "receivers": n, "channels": m,
                           "receivers_per_channel": n // m, "publisher_processes": sizes.xlat_publishers}
    with ExitStack() as stack:
        r = _redis_server(stack)
        a = _start(stack, Node("node A", env={"REDIS_URL": r.url}))
        b = _start(stack, Node("node B", env={"REDIS_URL": r.url}))
        single = _start(stack, Node("one node (local adapter)"))
        ch = {"kind": "mod", "prefix": "lat-", "m": m}
        p_b = _pools(stack, b.target, n, 1, ch)
        p_single = _pools(stack, single.target, n, 1, ch)
        _connect(p_b, n, "receivers on node B")
        _connect(p_single, n, "receivers on the single node")
        time.sleep(1.0)
        configs = {
            "cross_node": (p_b, a.target, [a.pid, b.pid, r.proc.pid]),  # type: ignore[union-attr]
            "one_node": (p_single, single.target, [single.pid]),
        }
        out["configs"] = {"cross_node": "publish on node A, receivers on node B (Redis adapter)",
                          "one_node": "publish and receive on one process (local adapter)"}
        raw: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
        for rnd in range(sizes.xlat_rounds):
            wait_for_quiet(sizes.quiet_wait_s / 3)
            for name in _rotated(list(configs), rnd):
                pools, target, pids = configs[name]
                res = _latency_round(pools, target, channels, n // m, sizes, pids)
                raw[name].append(res)
                log(f"  round {rnd + 1}/{sizes.xlat_rounds} {name}: {res['publishes_per_s']} publishes/s, "
                    f"latency {res['latency_ms']}")
        recv = b.metric("sockudo_adapter_receive_latency_ms_count")
        if recv:
            out["node_b_adapter_receive_latency_ms_mean"] = round(
                b.metric("sockudo_adapter_receive_latency_ms_sum") / recv, 3)
    out["results"] = {}
    for name, rounds in raw.items():
        pooled = [x for rr in rounds for x in rr.pop("_samples")]
        out["results"][name] = {
            "latency_ms_pooled": _pct(pooled, (50, 90, 99, 99.9)),
            "p99_ms_median_of_rounds": _median([rr["latency_ms"]["p99"] for rr in rounds]),
            "p50_ms_median_of_rounds": _median([rr["latency_ms"]["p50"] for rr in rounds]),
            "publishes_per_s_median": _median([rr["publishes_per_s"] for rr in rounds]),
            "complete": all(rr["deliveries"] == rr["expected_deliveries"] and not rr["publish_errors"]
                            for rr in rounds),
            "rounds": rounds,
        }
    return out


# -- cross-churn: subscription churn over two nodes ---------------------------------------------


def _channel_counts(node: Node, prefix: str) -> tuple[dict[str, int], bool, float]:
    status, body, took = node.get(f"/apps/{APP_ID}/channels",
                                  {"filter_by_prefix": prefix, "info": "subscription_count"})
    if status != 200:
        raise RuntimeError(f"/channels on {node.label}: HTTP {status} {body}")
    counts = {c: v["subscription_count"] for c, v in body["channels"].items()}
    return counts, body.get("complete", True), took


def cross_churn(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """The churn over two nodes; at the same time, the same churn on one process (local
    adapter) as the reference for CPU per cycle and ack latency (both loads are light)."""
    n = sizes.xchurn_clients
    prefix = "churn-"
    out: dict[str, Any] = {"clients": n, "channels": sizes.xchurn_channels, "interval_ms": sizes.xchurn_interval_ms,
                           "seconds": sizes.xchurn_seconds, "nodes": 2,
                           "offered_cycles_per_s": round(n * 1000 / sizes.xchurn_interval_ms)}
    uncomplete = "sockudo_horizontal_adapter_uncomplete_promises_total"
    with ExitStack() as stack:
        r = _redis_server(stack)
        a = _start(stack, Node("node A", env={"REDIS_URL": r.url}))
        b = _start(stack, Node("node B", env={"REDIS_URL": r.url}))
        single = _start(stack, Node("one node (local adapter)"))
        ch = {"kind": "distinct", "prefix": prefix}
        p_a = _pools(stack, a.target, n // 2, 1, ch)
        p_b = _pools(stack, b.target, n - n // 2, 1, ch)
        p_s = _pools(stack, single.target, n, 1, ch)
        _connect(p_a, n // 2, "clients on node A")
        _connect(p_b, n - n // 2, "clients on node B")
        _connect(p_s, n, "clients on the single node")
        nodes = (a, b)
        before = {node.label: node.metric(uncomplete) for node in nodes}
        envelopes = "sockudo_adapter_received_envelopes_total"
        received_before = {node.label: node.metric(envelopes) for node in nodes}
        polls: list[dict[str, Any]] = []
        stop = threading.Event()

        def poll() -> None:  # /channels on both nodes during the churn: cross-node queries under load
            i = 0
            while not stop.wait(1.0):
                node = nodes[i % 2]
                i += 1
                try:
                    counts, complete, took = _channel_counts(node, prefix)
                    polls.append({"node": node.label, "ms": round(took * 1000, 2), "complete": complete})
                except Exception as exc:  # noqa: BLE001 — recorded, not fatal
                    polls.append({"node": node.label, "error": str(exc)})

        poller = threading.Thread(target=poll, daemon=True)
        cluster = Pools.merge([p_a, p_b])
        everyone = Pools.merge([p_a, p_b, p_s])
        meter = CpuMeter([a.pid, b.pid, r.proc.pid]).start()  # type: ignore[union-attr]
        meter_s = CpuMeter([single.pid]).start()
        poller.start()
        log(f"  churning for {sizes.xchurn_seconds} s (2 nodes, and one node beside)")
        replies_all = everyone.broadcast("churn_done", timeout=sizes.xchurn_seconds + 60, cmd="churn",
                                         channels=sizes.xchurn_channels, prefix=prefix,
                                         interval_ms=sizes.xchurn_interval_ms,
                                         duration_ms=int(sizes.xchurn_seconds * 1000))
        stop.set()
        poller.join(timeout=15)
        meter.stop()
        meter_s.stop()
        replies, replies_s = replies_all[:len(cluster.pools)], replies_all[len(cluster.pools):]
        held = [c for rep in cluster.broadcast("held", cmd="held") for c in rep["channels"] if c is not None]
        held_s = [c for rep in p_s.broadcast("held", cmd="held") for c in rep["channels"] if c is not None]
        expected = dict(Counter(held))
        time.sleep(1.0)  # the last unsubscribes (no ack in the protocol) reach both nodes
        checks: dict[str, Any] = {}
        for node, want in ((a, expected), (b, expected), (single, dict(Counter(held_s)))):
            counts, complete, _ = _channel_counts(node, prefix)
            checks[node.label] = {"exact": counts == want and complete, "complete": complete,
                                  "occupied": len(counts), "subscriptions": sum(counts.values()),
                                  "expected_occupied": len(want), "expected_subscriptions": sum(want.values()),
                                  "mismatched_channels": sorted(set(counts.items()) ^ set(want.items()))[:5]}
        # channel by channel too (a sample, occupied and not): /channels/{c}
        sample = random.Random(3).sample(range(sizes.xchurn_channels), 40)
        single_wrong = []
        for idx in sample:
            name = f"{prefix}{idx}"
            for node in nodes:
                status, body, _ = node.get(f"/apps/{APP_ID}/channels/{name}", {"info": "subscription_count"})
                want = expected.get(name, 0)
                if status != 200 or body.get("subscription_count") != want or body.get("occupied") != (want > 0):
                    single_wrong.append({"node": node.label, "channel": name, "want": want, "got": body})
        after = {node.label: node.metric(uncomplete) for node in nodes}
        received_after = {node.label: node.metric(envelopes) for node in nodes}
        logs = {node.label: node.server.log() for node in nodes}
    cycles = sum(rep["cycles"] for rep in replies)
    cycles_s = sum(rep["cycles"] for rep in replies_s)
    samples = [x for rep in replies for x in rep["latencies"]]
    samples_s = [x for rep in replies_s for x in rep["latencies"]]
    elapsed = max(rep["elapsed_ms"] for rep in replies) / 1000
    ok_polls = [p for p in polls if "error" not in p]
    out.update({
        "cycles": cycles,
        "cycles_per_s": round(cycles / elapsed),
        "subscribe_ack_ms": percentiles(samples),
        "pending_acks_left": sum(rep.get("pending_left", 0) for rep in replies),
        "expected_subscriptions": len(held),
        "expected_occupied_channels": len(expected),
        "channels_check": checks,
        "exact_on_both_nodes": checks[a.label]["exact"] and checks[b.label]["exact"],
        "single_channel_checks": len(sample) * 2,
        "single_channel_wrong": single_wrong[:5],
        "single_channel_wrong_count": len(single_wrong),
        "uncomplete_promises_delta": {k: after[k] - before[k] for k in after},
        "envelopes_received": {k: received_after[k] - received_before[k] for k in received_after},
        "polls_during_churn": len(polls),
        "poll_errors": [p for p in polls if "error" in p][:3],
        "poll_incomplete": sum(1 for p in ok_polls if not p["complete"]),
        "poll_ms": percentiles([p["ms"] for p in ok_polls], (50, 99)),
        "partial_answer_log_lines": {k: v.count("marked partial") for k, v in logs.items()},
        "server_cpu_s_by_process": list(meter.by_pid.values()),
        "cpu_us_per_cycle": round(meter.cpu / cycles * 1e6, 1) if cycles else None,
        "cpu_us_per_cycle_nodes_only": round((meter.cpu - list(meter.by_pid.values())[-1]) / cycles * 1e6, 1)
        if cycles else None,
        "client_errors": [e for rep in replies for e in rep["errors"]][:5],
        "one_node": {
            "cycles": cycles_s,
            "subscribe_ack_ms": percentiles(samples_s),
            "cpu_us_per_cycle": round(meter_s.cpu / cycles_s * 1e6, 1) if cycles_s else None,
            "client_errors": [e for rep in replies_s for e in rep["errors"]][:5],
        },
    })
    out["no_request_timeouts"] = (all(v == 0 for v in out["uncomplete_promises_delta"].values())
                                  and out["poll_incomplete"] == 0)
    return out


# -- webhooks ------------------------------------------------------------------------


def _webhook_receiver(stack: ExitStack) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.webhook_receiver", "--port", str(port), "--delay-ms", "0"],
                            cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=sys.stderr)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    stack.callback(stop)
    wait_until(lambda: _receiver_stats(port), timeout=20, message="webhook receiver")
    return port, proc


def _receiver_stats(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/stats")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _children_cpu(pids: list[int]) -> float:
    """cutime + cstime: CPU of reaped children (RQ's work-horses, one fork per job)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[13]) + int(fields[14])
        except FileNotFoundError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def _webhook_round(node: Node, senders: Pools, subs: Pools, sizes: Sizes) -> dict[str, Any]:
    duration = sizes.wh_seconds
    for p in senders.pools:
        p.send(cmd="client_events", rate=sizes.wh_rate_per_sender, duration_ms=int((duration + 1.0) * 1000),
               event="client-bench")
    time.sleep(0.5)
    subs.broadcast("ok", cmd="latency")
    pub = Publisher(node.target)
    pub.publish("latency", json.dumps({"t": time.time() * 1000}))
    total = int(sizes.wh_publish_rate * duration)
    meter = CpuMeter([node.pid]).start()
    start = time.perf_counter()
    for i in range(total):
        delay = start + i / sizes.wh_publish_rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        pub.publish("latency", json.dumps({"t": time.time() * 1000}))
    subs.wait_delivered(total + 1, timeout=15)
    meter.stop()
    pub.close()
    done = [p.wait_event("client_events_done", duration + 30) for p in senders.pools]
    stats = subs.stats(latencies=True)
    samples = stats["latencies"]
    sent = sum(d["sent"] for d in done)
    elapsed = max(d["elapsed_ms"] for d in done) / 1000
    return {
        "client_events_sent": sent,
        "client_events_per_s": round(sent / elapsed),
        "sender_errors": [e for d in done for e in d["errors"]][:3],
        "sender_frames_received": sum(d["frames_received"] for d in done),
        "latency_ms": percentiles(samples, (50, 95, 99)),
        "_samples": samples,
        "samples": len(samples),
        "server_cpu_util": round(meter.cpu / meter.wall, 3),
        "machine_busy_cores": round(meter.machine_busy, 2),
    }


def webhooks(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    rate = sizes.wh_senders * sizes.wh_rate_per_sender
    out: dict[str, Any] = {
        "client_events_per_s_offered": rate, "senders": sizes.wh_senders, "seconds_per_round": sizes.wh_seconds,
        "rounds": sizes.wh_rounds, "latency_subscribers": sizes.wh_subscribers,
        "publish_rate_per_s": sizes.wh_publish_rate, "workers": sizes.wh_workers,
        "batching": "on (server defaults: 50 ms, 100 events per batch)",
    }
    queued_metric = "sockudo_webhooks_queued_total"
    with ExitStack() as stack:
        port, _ = _webhook_receiver(stack)
        r_off = _redis_server(stack)
        r_on = _redis_server(stack)
        base = {"enable_client_messages": True, "max_client_events_per_second": 100}
        hook = {"url": f"http://127.0.0.1:{port}/hook", "event_types": ["client_event"]}
        off = _start(stack, Node("webhooks off", apps=[_app(**base)], env={"REDIS_URL": r_off.url}))
        on = _start(stack, Node("webhooks on", apps=[_app(**base, webhooks=[hook])], env={"REDIS_URL": r_on.url}))
        pools: dict[str, tuple[Pools, Pools]] = {}
        for node in (off, on):
            senders = _pools(stack, node.target, sizes.wh_senders, 1, {"kind": "private", "prefix": "private-wh-"})
            subs = _pools(stack, node.target, sizes.wh_subscribers, 1, {"kind": "same", "name": "latency"})
            _connect(senders, sizes.wh_senders, f"senders on {node.label}")
            _connect(subs, sizes.wh_subscribers, f"subscribers on {node.label}")
            pools[node.label] = (senders, subs)
        queued0 = on.metric(queued_metric)
        raw: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        cfgs = {"off": off, "on": on}
        for rnd in range(sizes.wh_rounds):
            wait_for_quiet(sizes.quiet_wait_s / 3)
            for name in _rotated(list(cfgs), rnd):
                node = cfgs[name]
                res = _webhook_round(node, *pools[node.label], sizes)
                raw[name].append(res)
                log(f"  round {rnd + 1}/{sizes.wh_rounds} webhooks {name}: {res['client_events_per_s']} client "
                    f"events/s, publish latency {res['latency_ms']}, server CPU util {res['server_cpu_util']}")
        time.sleep(1.0)  # the last batch (50 ms window) leaves the server
        queued = on.metric(queued_metric) - queued0
        import redis as redis_py

        rq_queue = "rq:queue:webhooks"
        rclient = redis_py.Redis.from_url(r_on.url)
        stack.callback(rclient.close)
        jobs_waiting = rclient.llen(rq_queue)
        received_before = _receiver_stats(port)
        out["enqueue"] = {
            "webhook_events_queued": int(queued),
            "jobs_waiting": jobs_waiting,
            "events_per_job": round(queued / jobs_waiting, 1) if jobs_waiting else None,
            "enqueue_failures": on.metric("sockudo_webhooks_enqueue_failures_total"),
            "dropped": on.metric("sockudo_webhooks_dropped_total"),
            "received_before_workers_started": received_before["events"],
        }
        # -- drain: two workers ------------------------------------------------------------
        log(f"  draining {jobs_waiting} jobs ({int(queued)} events) with {sizes.wh_workers} workers")
        worker_env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKUDO_")}
        worker_env.update({"PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING"})
        workers: list[subprocess.Popen[bytes]] = []
        logdir = on.server.dir
        t0 = time.perf_counter()
        for i in range(sizes.wh_workers):
            log_fh = open(os.path.join(logdir, f"worker-{i}.log"), "ab")
            stack.callback(log_fh.close)
            w = subprocess.Popen([sys.executable, "-m", "workers", "--url", r_on.url, "--name", f"bench-{i}",
                                  ], cwd=ROOT, env=worker_env, stdout=log_fh,
                                 stderr=subprocess.STDOUT)
            workers.append(w)

            def stop_worker(w: subprocess.Popen[bytes] = w) -> None:
                if w.poll() is None:
                    w.send_signal(signal.SIGTERM)
                    try:
                        w.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        w.kill()
                        w.wait()

            stack.callback(stop_worker)
        first_at = None
        deadline = time.monotonic() + sizes.wh_drain_timeout
        last = received_before
        cpu_pids = [w.pid for w in workers]
        cpu0 = cpu_seconds(cpu_pids) + _children_cpu(cpu_pids)
        while time.monotonic() < deadline:
            last = _receiver_stats(port)
            if first_at is None and last["events"] > received_before["events"]:
                first_at = time.perf_counter()
            if last["events"] >= queued:
                break
            time.sleep(0.1)
        t_end = time.perf_counter()
        worker_cpu = cpu_seconds(cpu_pids) + _children_cpu(cpu_pids) - cpu0
        left = rclient.llen(rq_queue)
        drained = last["events"] - received_before["events"]
        out["drain"] = {
            "events_delivered": drained,
            "deliveries": last["deliveries"] - received_before["deliveries"],
            "duplicate_deliveries": last["duplicates"],
            "all_delivered": last["events"] >= queued,
            "jobs_left_in_queue": left,
            "time_to_empty_s": round(t_end - t0, 2),
            "time_from_first_delivery_s": round(t_end - first_at, 2) if first_at else None,
            "worker_startup_s": round(first_at - t0, 2) if first_at else None,
            "events_per_s": round(drained / (t_end - first_at)) if first_at and t_end > first_at else None,
            "jobs_per_s": round((last["deliveries"] - received_before["deliveries"]) / (t_end - first_at), 1)
            if first_at and t_end > first_at else None,
            "events_per_s_incl_startup": round(drained / (t_end - t0)),
            "worker_cpu_s_incl_work_horses": round(worker_cpu, 2),
            "bad_signatures": last["bad_signatures"],
        }
        # -- steady state: the same rounds with the workers running beside the server ------
        # (they share this 2-core machine with the server and the load generator, so this
        # latency also carries their CPU; the backlog left at the end shows whether two
        # workers keep up with the enqueue rate)
        steady: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        queued1 = on.metric(queued_metric)
        delivered1 = _receiver_stats(port)["events"]
        backlog: list[int] = []
        for rnd in range(sizes.wh_steady_rounds):
            for name in _rotated(list(cfgs), rnd):
                node = cfgs[name]
                res = _webhook_round(node, *pools[node.label], sizes)
                res.pop("_samples")
                steady[name].append(res)
                if name == "on":
                    backlog.append(rclient.llen(rq_queue))
                log(f"  steady round {rnd + 1}/{sizes.wh_steady_rounds} webhooks {name} (workers running): "
                    f"publish latency {res['latency_ms']}, jobs waiting {backlog[-1] if name == 'on' else '-'}")
        time.sleep(1.0)
        queued_steady = on.metric(queued_metric) - queued1
        t_catch = time.perf_counter()
        while time.monotonic() < deadline + 60:
            got = _receiver_stats(port)["events"] - delivered1
            if got >= queued_steady:
                break
            time.sleep(0.1)
        out["steady"] = {
            "rounds": steady,
            "p99_ms_median_of_rounds": {k: _median([x["latency_ms"]["p99"] for x in v]) for k, v in steady.items()},
            "p50_ms_median_of_rounds": {k: _median([x["latency_ms"]["p50"] for x in v]) for k, v in steady.items()},
            "jobs_waiting_at_end_of_on_rounds": backlog,
            "events_queued": int(queued_steady),
            "events_delivered": _receiver_stats(port)["events"] - delivered1,
            "caught_up_s_after_last_round": round(time.perf_counter() - t_catch, 2),
        }
    out["results"] = {}
    for name, rounds in raw.items():
        pooled = [x for rr in rounds for x in rr.pop("_samples")]
        out["results"][name] = {
            "latency_ms_pooled": percentiles(pooled, (50, 95, 99)),
            "p50_ms_median_of_rounds": _median([rr["latency_ms"]["p50"] for rr in rounds]),
            "p95_ms_median_of_rounds": _median([rr["latency_ms"]["p95"] for rr in rounds]),
            "p99_ms_median_of_rounds": _median([rr["latency_ms"]["p99"] for rr in rounds]),
            "client_events_per_s_median": _median([rr["client_events_per_s"] for rr in rounds]),
            "server_cpu_util_median": _median([rr["server_cpu_util"] for rr in rounds]),
            "rounds": rounds,
        }
    on_r, off_r = out["results"]["on"], out["results"]["off"]
    out["latency_ratio_on_vs_off"] = {
        q: _ratio(on_r[f"{q}_ms_median_of_rounds"], off_r[f"{q}_ms_median_of_rounds"]) for q in ("p50", "p95", "p99")
    }
    out["webhook_events_per_s_enqueued"] = round(out["enqueue"]["webhook_events_queued"]
                                                 / (sizes.wh_rounds * (sizes.wh_seconds + 1.0)))
    return out


# -- recovery-fanout: fan-out with recovery and history ----------------------------------------------


def _recovery_fanout_width(n: int, publishes: int, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"subscribers": n, "subscriber_protocol": 2, "publishes_per_round": publishes,
                           "rounds": sizes.rec_rounds, "pipelined_window": sizes.fanout_window}
    on: dict[str, Any] = {"connection_recovery": {"enabled": True}, "history": {"enabled": True}}
    with ExitStack() as stack:
        r_off = _redis_server(stack)
        r_on = _redis_server(stack)
        nodes = {
            "memory_off": _start(stack, Node("memory, recovery+history off", protocol=2)),
            "memory_on": _start(stack, Node("memory, recovery+history on", protocol=2, **on)),
            "redis_off": _start(stack, Node("redis, recovery+history off", env={"REDIS_URL": r_off.url}, protocol=2)),
            "redis_on": _start(stack, Node("redis, recovery+history on", env={"REDIS_URL": r_on.url}, protocol=2,
                                           **on)),
        }
        redis_pid = {"redis_off": r_off.proc.pid, "redis_on": r_on.proc.pid}  # type: ignore[union-attr]
        configs: dict[str, dict[str, Any]] = {}
        for name, node in nodes.items():
            pools = _pools(stack, node.target, n, sizes.client_procs, {"kind": "same", "name": "fanout"})
            _connect(pools, n, name)
            pub = Publisher(node.target)
            stack.callback(pub.close)
            pids = [node.pid] + ([redis_pid[name]] if name in redis_pid else [])
            configs[name] = {"pools": pools, "pub": pub, "pids": pids, "channel": "fanout"}
        res = _interleaved_fanout(configs, sizes, sizes.rec_rounds, publishes, log)
        # the "on" servers really numbered and stored the messages
        for name in ("redis_on", "memory_on"):
            status, body, _ = nodes[name].get(f"/apps/{APP_ID}/channels/fanout/history", {"limit": "1"})
            out[f"{name}_history_newest_serial"] = ((body or {}).get("items") or [{}])[0].get("serial") \
                if status == 200 else f"HTTP {status}"
    out["results"] = res
    out["ratios"] = {
        mode: {shape: {
            "deliveries_per_s_on_vs_off": _ratio(res[f"{mode}_on"][shape]["deliveries_per_s"],
                                                 res[f"{mode}_off"][shape]["deliveries_per_s"]),
            "cpu_per_delivery_on_vs_off": _ratio(res[f"{mode}_on"][shape]["cpu_us_per_delivery"],
                                                 res[f"{mode}_off"][shape]["cpu_us_per_delivery"]),
        } for shape in ("strict", "pipelined")}
        for mode in ("memory", "redis")
    }
    return out


def recovery_fanout(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """The full load (1,000 subscribers), then a narrower fan-out (``rec_narrow_subscribers``),
    where the per-publish cost of numbering and storing a message weighs more."""
    out = _recovery_fanout_width(sizes.rec_subscribers, sizes.rec_publishes, sizes, log)
    if sizes.rec_narrow_subscribers:
        log(f"  narrower fan-out: {sizes.rec_narrow_subscribers} subscribers")
        out["narrow"] = _recovery_fanout_width(sizes.rec_narrow_subscribers, sizes.rec_narrow_publishes, sizes, log)
    return out


def publish_cost(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """What numbering and storing costs one publish: sequential signed publishes (one keep-alive
    connection) to a channel with one protocol-2 subscriber, recovery+history off vs on, memory
    and Redis mode, interleaved rounds; round trip, server CPU and redis-server CPU per publish."""
    on: dict[str, Any] = {"connection_recovery": {"enabled": True}, "history": {"enabled": True}}
    n = sizes.cost_publishes
    out: dict[str, Any] = {"publishes_per_round": n, "rounds": sizes.cost_rounds, "subscribers": 1}
    with ExitStack() as stack:
        r_off = _redis_server(stack)
        r_on = _redis_server(stack)
        nodes = {
            "memory_off": _start(stack, Node("memory off", protocol=2)),
            "memory_on": _start(stack, Node("memory on", protocol=2, **on)),
            "redis_off": _start(stack, Node("redis off", env={"REDIS_URL": r_off.url}, protocol=2)),
            "redis_on": _start(stack, Node("redis on", env={"REDIS_URL": r_on.url}, protocol=2, **on)),
        }
        redis_pid = {"redis_off": r_off.proc.pid, "redis_on": r_on.proc.pid}  # type: ignore[union-attr]
        pubs: dict[str, Publisher] = {}
        for name, node in nodes.items():
            pools = _pools(stack, node.target, 1, 1, {"kind": "same", "name": "cost"})
            _connect(pools, 1, name)
            pubs[name] = Publisher(node.target)
            stack.callback(pubs[name].close)
            for _ in range(50):
                pubs[name].publish("cost", PAYLOAD)
        raw: dict[str, list[tuple[float, float, float]]] = {k: [] for k in nodes}
        for rnd in range(sizes.cost_rounds):
            for name in _rotated(list(nodes), rnd):
                server, rpid = nodes[name].pid, redis_pid.get(name)
                s0 = cpu_seconds([server])
                r0 = cpu_seconds([rpid]) if rpid else 0.0
                lat = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    pubs[name].publish("cost", PAYLOAD)
                    lat.append(time.perf_counter() - t0)
                s1 = cpu_seconds([server])
                r1 = cpu_seconds([rpid]) if rpid else 0.0
                raw[name].append((statistics.median(lat) * 1e6, (s1 - s0) / n * 1e6, (r1 - r0) / n * 1e6))
    out["results"] = {
        name: {"round_trip_us": round(statistics.median(x[0] for x in v)),
               "server_cpu_us": round(statistics.median(x[1] for x in v)),
               "redis_cpu_us": round(statistics.median(x[2] for x in v))}
        for name, v in raw.items()
    }
    return out


# -- resume: resume of 1,000 clients --------------------------------------------------------


def _resume_once(label: str, connect: Node, resume_on: Node, sizes: Sizes, pids: list[int],
                 log: Callable[[str], None]) -> dict[str, Any]:
    n, m, missed = sizes.resume_clients, sizes.resume_channels, sizes.resume_missed
    channels = [f"resume-{i}" for i in range(m)]
    with ExitStack() as stack:
        pools = _pools(stack, connect.target, n, sizes.client_procs, {"kind": "mod", "prefix": "resume-", "m": m},
                       inflight=100)
        _connect(pools, n, f"{label}: protocol-2 clients")
        pools.broadcast("ok", cmd="track")
        pub = Publisher(connect.target)
        stack.callback(pub.close)
        live = 2
        for _ in range(live):
            for c in channels:
                pub.publish(c, PAYLOAD)
        deadline = time.monotonic() + 20
        while pools.stats()["count"] < live * n and time.monotonic() < deadline:
            time.sleep(0.1)
        before = pools.broadcast("positions", cmd="positions")
        with_pos = sum(p["with_position"] for p in before)
        pools.broadcast("dropped", cmd="drop")
        time.sleep(0.5)  # the server sees the closes
        # the missed messages are published on the node the clients left (with two nodes, the
        # one they come back to has them from Redis)
        for _ in range(missed):
            for c in channels:
                pub.publish(c, PAYLOAD)
        time.sleep(0.5)
        meter = CpuMeter(pids).start()
        replies = pools.broadcast("resumed", timeout=90, cmd="resume", url=resume_on.target.ws_url, expect=missed,
                                  timeout_ms=60_000)
        meter.stop()
        # live traffic continues after the resume, without a gap
        for c in channels:
            pub.publish(c, PAYLOAD)
        time.sleep(1.0)
        after = pools.broadcast("positions", cmd="positions")
    total_ms = [x for r in replies for x in r["total_ms"]]
    resume_ms = [x for r in replies for x in r["resume_ms"]]
    res = {
        "clients": n,
        "channels": m,
        "missed_per_client": missed,
        "positions_before_drop": with_pos,
        "resumed_ok": sum(r["ok"] for r in replies),
        "exactly_the_missed_messages": sum(r["exact"] for r in replies),
        "failed_connect": sum(r["failed_connect"] for r in replies),
        "failed_resume": sum(r["failed_resume"] for r in replies),
        "incomplete": sum(r.get("incomplete", 0) for r in replies),
        "wrong_examples": [w for r in replies for w in r["wrong"]][:3],
        "recovered_from": dict(sum((Counter(r.get("sources", {})) for r in replies), Counter())),
        "wall_s": round(max(r["wall_ms"] for r in replies) / 1000, 3),
        "per_client_reconnect_to_success_ms": percentiles(total_ms, (50, 99)),
        "per_client_resume_to_success_ms": percentiles(resume_ms, (50, 99)),
        "server_cpu_s": round(meter.cpu, 3),
        "gaps_after_live": sum(p["gaps"] for p in after),
        "duplicates_after_live": sum(p["dups"] for p in after),
        "client_errors": [e for r in replies for e in r["errors"]][:3],
    }
    log(f"  {label}: {res['exactly_the_missed_messages']}/{n} exact, wall {res['wall_s']} s")
    return res


def resume(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"clients": sizes.resume_clients, "channels": sizes.resume_channels,
                           "missed_per_client": sizes.resume_missed, "results": {}}
    on: dict[str, Any] = {"connection_recovery": {"enabled": True}, "history": {"enabled": True}}
    runs = (
        ("memory", False, False),
        ("redis", True, False),
        ("redis_other_node", True, True),
    )
    for label, use_redis, two in runs:
        wait_for_quiet(sizes.quiet_wait_s / 3)
        try:
            with ExitStack() as stack:
                env = {}
                pids: list[int] = []
                if use_redis:
                    r = _redis_server(stack)
                    env = {"REDIS_URL": r.url}
                    pids.append(r.proc.pid)  # type: ignore[union-attr]
                a = _start(stack, Node(f"{label} A", env=env, protocol=2, **on))
                b = _start(stack, Node(f"{label} B", env=env, protocol=2, **on)) if two else a
                pids += [a.pid] + ([b.pid] if two else [])
                out["results"][label] = _resume_once(label, a, b, sizes, pids, log)
        except Exception as exc:  # noqa: BLE001
            out["results"][label] = {"error": f"{type(exc).__name__}: {exc}"}
    out["configs"] = {"memory": "one process, in-memory history (hot tier: the replay buffer)",
                      "redis": "one process with Redis (replay buffer; history in Redis streams)",
                      "redis_other_node": "connected to node A, resumed on node B (Redis)"}
    return out


RUNNERS: dict[str, Callable[[Sizes, Callable[[str], None]], dict[str, Any]]] = {
    "cross-fanout": cross_fanout,
    "cross-latency": cross_latency,
    "cross-churn": cross_churn,
    "webhooks": webhooks,
    "recovery-fanout": recovery_fanout,
    "publish-cost": publish_cost,
    "resume": resume,
}


def run(name: str, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    wait_for_quiet(sizes.quiet_wait_s)
    PROFILE["scenario"] = name
    try:
        return RUNNERS[name](sizes, log)
    except Exception as exc:  # one broken scenario must not lose the rest of the suite
        import traceback

        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}


# -- printing and targets -----------------------------------------------------------------------


def _print_cross_fanout(r: dict[str, Any]) -> None:
    rows = [[name, shape, s["deliveries_per_s"], s["cpu_us_per_delivery"], s.get("cpu_share_by_process"),
             s["all_complete"]] for name, shapes in r["results"].items() for shape, s in shapes.items()]
    _rows(["config", "shape", "deliveries/s", "CPU µs/delivery", "CPU share by process", "complete"], rows)
    for shape, rr in r["ratios"].items():
        print(f"  {shape}: two nodes / one node = {_f(rr['two_nodes_vs_one_node'])}× deliveries/s "
              f"(vs one node with the redis adapter {_f(rr['two_nodes_vs_one_node_redis'])}×); "
              f"CPU/delivery {_f(rr['cpu_two_nodes_vs_one_node'])}×")


def _print_cross_latency(r: dict[str, Any]) -> None:
    rows = []
    for name, s in r["results"].items():
        lat = s["latency_ms_pooled"]
        rows.append([name, s["publishes_per_s_median"], lat["p50"], lat["p90"], lat["p99"], lat["p99.9"],
                     lat["max"], s["p99_ms_median_of_rounds"], s["complete"]])
    _rows(["config", "publishes/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "p99 median/round",
           "complete"], rows)


def _print_cross_churn(r: dict[str, Any]) -> None:
    print(f"  cycles/s {r['cycles_per_s']}, subscribe ack {r['subscribe_ack_ms']}, CPU µs/cycle "
          f"{r['cpu_us_per_cycle']} (nodes + redis; by process {r['server_cpu_s_by_process']} s)")
    one = r.get("one_node")
    if one:
        print(f"  the same churn on one process beside it: ack {one['subscribe_ack_ms']}, CPU µs/cycle "
              f"{one['cpu_us_per_cycle']}")
    for node, c in r["channels_check"].items():
        print(f"  /channels on {node}: exact={c['exact']} occupied={c['occupied']} "
              f"subscriptions={c['subscriptions']} (expected {c['expected_occupied']} / "
              f"{c['expected_subscriptions']}) {c['mismatched_channels'] or ''}")
    print(f"  /channels/{{c}} checks wrong: {r['single_channel_wrong_count']}/{r['single_channel_checks']}; "
          f"uncomplete_promises delta {r['uncomplete_promises_delta']}; polls during churn "
          f"{r['polls_during_churn']} (incomplete {r['poll_incomplete']}, {r['poll_ms']} ms)")


def _print_webhooks(r: dict[str, Any]) -> None:
    rows = [[name, s["client_events_per_s_median"], s["p50_ms_median_of_rounds"], s["p95_ms_median_of_rounds"],
             s["p99_ms_median_of_rounds"], s["server_cpu_util_median"]] for name, s in r["results"].items()]
    _rows(["webhooks", "client events/s", "p50 ms", "p95 ms", "p99 ms", "server CPU util"], rows)
    print(f"  on/off: {r['latency_ratio_on_vs_off']}; enqueued {r['enqueue']}")
    print(f"  drain: {r['drain']}")
    st = r.get("steady")
    if st:
        print(f"  with the workers running: p50 {st['p50_ms_median_of_rounds']} p99 "
              f"{st['p99_ms_median_of_rounds']} ms; jobs waiting after each 'on' round "
              f"{st['jobs_waiting_at_end_of_on_rounds']}; {st['events_delivered']}/{st['events_queued']} "
              f"delivered {st['caught_up_s_after_last_round']} s after the last round")


def _print_on_off(block: dict[str, Any]) -> None:
    """A recovery fan-out table (configs × shapes) and its on/off ratios."""
    rows = [[name, shape, s["deliveries_per_s"], s["cpu_us_per_delivery"], s["all_complete"]]
            for name, shapes in block["results"].items() for shape, s in shapes.items()]
    _rows(["config", "shape", "deliveries/s", "CPU µs/delivery", "complete"], rows)
    for mode, shapes in block["ratios"].items():
        for shape, rr in shapes.items():
            print(f"  {mode} {shape}: on/off deliveries/s {_f(rr['deliveries_per_s_on_vs_off'])}×, "
                  f"CPU/delivery {_f(rr['cpu_per_delivery_on_vs_off'])}×")


def _print_recovery_fanout(r: dict[str, Any]) -> None:
    _print_on_off(r)
    nr = r.get("narrow")
    if nr:
        print(f"  narrower fan-out, {nr['subscribers']} subscribers, {nr['publishes_per_round']} publishes "
              f"per round and shape:")
        _print_on_off(nr)


def _print_publish_cost(r: dict[str, Any]) -> None:
    _rows(["config", "round trip µs", "server CPU µs", "redis CPU µs"],
          [[k, v["round_trip_us"], v["server_cpu_us"], v["redis_cpu_us"]] for k, v in r["results"].items()])


def _print_resume(r: dict[str, Any]) -> None:
    rows = []
    for name, s in r["results"].items():
        if "error" in s:
            rows.append([name, "ERROR: " + s["error"][:80], None, None, None, None])
            continue
        rows.append([name, s["wall_s"], s["exactly_the_missed_messages"], s["failed_resume"],
                     s["per_client_reconnect_to_success_ms"]["p99"], s["per_client_resume_to_success_ms"]["p99"]])
    _rows(["config", "all resumed s", "exact", "failed", "reconnect→success p99 ms", "resume→success p99 ms"], rows)


#: (results key, its heading, how to print its figures), in report order.
_SECTIONS: list[tuple[str, Callable[[dict[str, Any]], str], Callable[[dict[str, Any]], None]]] = [
    ("cross-fanout", lambda r: f"I3a. Cross-node fan-out: {r.get('subscribers')} subscribers, "
                               f"{r.get('publishes_per_round')} publishes × {r.get('rounds')} interleaved rounds "
                               f"per shape (medians)", _print_cross_fanout),
    ("cross-latency", lambda r: f"I3b. Cross-node latency: {_f(r.get('rate_per_s'))} publishes/s for "
                                f"{r.get('seconds_per_round')} s × {r.get('rounds')} rounds, {r.get('receivers')} "
                                f"receivers on {r.get('channels')} channels", _print_cross_latency),
    ("cross-churn", lambda r: f"I3c. Churn over 2 nodes: {r.get('clients')} clients, {r.get('channels')} channels, "
                              f"every {r.get('interval_ms')} ms for {r.get('seconds')} s", _print_cross_churn),
    ("webhooks", lambda r: f"I4. Webhooks: {_f(r.get('client_events_per_s_offered'))} client events/s, "
                           f"{r.get('rounds')} rounds × {r.get('seconds_per_round')} s per config, publish latency "
                           f"to {r.get('latency_subscribers')} subscribers at {r.get('publish_rate_per_s')}/s",
     _print_webhooks),
    ("recovery-fanout", lambda r: f"I5a. Fan-out with recovery+history: {r.get('subscribers')} protocol-2 "
                                  f"subscribers, {r.get('publishes_per_round')} publishes × {r.get('rounds')} rounds "
                                  f"per shape (medians)", _print_recovery_fanout),
    ("publish-cost", lambda r: f"I5. Cost of one publish (1 subscriber, sequential keep-alive publishes, "
                               f"{r.get('rounds')} rounds × {r.get('publishes_per_round')}, medians)",
     _print_publish_cost),
    ("resume", lambda r: f"I5b. Resume: {r.get('clients')} protocol-2 clients on {r.get('channels')} channels, "
                         f"each missing {r.get('missed_per_client')}", _print_resume),
]


def print_features(results: dict[str, Any]) -> None:
    for key, heading, body in _SECTIONS:
        r = results.get(key)
        if not r:
            continue
        print("\n" + heading(r))
        if "error" in r:
            print(f"  ERROR: {r['error']}")
        else:
            body(r)


def feature_targets(results: dict[str, Any], full: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(target: str, value: Any, met: bool | None) -> None:
        out.append({"target": target, "value": value, "met": met})

    r = results.get("cross-fanout")
    if r and "ratios" in r:
        for shape in ("strict", "pipelined"):
            v = r["ratios"][shape]["two_nodes_vs_one_node"]
            if v is not None:
                add(f"cluster: 2-node fan-out deliveries/s ≥ 70% of one node ({shape})", f"{v * 100:.0f}%", v >= 0.7)
    r = results.get("cross-latency")
    if r and "results" in r:
        s = r["results"]["cross_node"]
        p99 = s["latency_ms_pooled"]["p99"]
        add(f"cluster: cross-node p99 < 50 ms at {_f(r['rate_per_s'])} publishes/s",
            f"{p99} ms pooled (median of rounds {s['p99_ms_median_of_rounds']} ms, "
            f"{s['publishes_per_s_median']}/s achieved)", p99 is not None and p99 < 50)
    r = results.get("cross-churn")
    if r and "exact_on_both_nodes" in r:
        add(f"cluster: churn ({r['seconds']} s) ends with exact /channels counts on both nodes",
            f"exact={r['exact_on_both_nodes']}, /channels/{{c}} wrong {r['single_channel_wrong_count']}",
            r["exact_on_both_nodes"] and r["single_channel_wrong_count"] == 0)
        add("cluster: churn causes no cross-node request timeouts",
            f"uncomplete_promises Δ {r['uncomplete_promises_delta']}, incomplete polls {r['poll_incomplete']}",
            r["no_request_timeouts"])
    r = results.get("webhooks")
    if r and "results" in r:
        rate = r["webhook_events_per_s_enqueued"]
        add("webhooks: 2,000 webhook events/s enqueued", f"{rate:,}/s", rate >= 1900)
        for q in ("p50", "p95", "p99"):
            v = r["latency_ratio_on_vs_off"][q]
            if v is not None:
                add(f"webhooks: publish latency {q} with webhooks ≤ 1.10× without", f"{v}×", v <= 1.10)
        d = r["drain"]
        add(f"webhooks: drained by {r['workers']} workers (batching on)",
            f"{d['events_per_s']} events/s, empty after {d['time_to_empty_s']} s", d["all_delivered"])
    r = results.get("recovery-fanout")
    for part in (r, (r or {}).get("narrow")):
        if not part or "ratios" not in part:
            continue
        for mode in ("memory", "redis"):
            for shape in ("strict", "pipelined"):
                v = part["ratios"][mode][shape]["deliveries_per_s_on_vs_off"]
                if v is not None:
                    add(f"recovery: fan-out with recovery+history ≥ 80% of off ({mode}, {shape}, "
                        f"{part['subscribers']:,} subscribers)", f"{v * 100:.0f}%", v >= 0.8)
    r = results.get("resume")
    if r and "results" in r:
        for name, s in r["results"].items():
            if "error" in s:
                add(f"recovery: resume of {r['clients']:,} clients < 5 s ({name})", s["error"][:60], False)
                continue
            exact = s["exactly_the_missed_messages"] == s["clients"]
            add(f"recovery: resume of {s['clients']:,} clients × {s['missed_per_client']} missed < 5 s ({name})",
                f"{s['wall_s']} s, {s['exactly_the_missed_messages']}/{s['clients']} exact",
                s["wall_s"] < 5 and exact if (full or s["clients"] >= 1000) else None)
    return out
