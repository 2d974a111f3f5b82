"""Sockudo against the baselines. Each scenario runs against one server at a time, is bounded in count and
time, and returns a plain dict of figures (plus ``error`` when something went wrong)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .harness import (
    CpuMeter,
    Pools,
    Publisher,
    RestLoad,
    RunningServer,
    Target,
    cpu_seconds,
    percentiles,
    rss_kb,
    wait_for_quiet,
)

# A typical small Pusher payload (~100 bytes of data), the same for every server.
PAYLOAD = json.dumps({"message": "benchmark payload " + "x" * 64, "seq": 0}, separators=(",", ":"))


@dataclass(frozen=True)
class Sizes:
    fanout_subscribers: int = 1000
    fanout_publishes: int = 500
    fanout_warmup: int = 20
    # The pipelined shape: this many publishes in flight (the strict shapes use 1: publish the
    # next only when every subscriber has the previous).
    fanout_window: int = 4
    latency_subscribers: int = 500
    latency_rate: float = 10.0
    latency_seconds: float = 30.0
    connections: int = 10_000
    churn_clients: int = 500
    churn_channels: int = 1000
    churn_interval_ms: int = 250  # per client: 500 clients -> up to 2,000 cycles/s
    churn_seconds: float = 20.0
    # REST: keep-alive connections of the one Node publisher process, one publish in flight each
    rest_connections: int = 8
    rest_seconds: float = 10.0
    client_procs: int = 2
    # Before each run, wait up to this long for the machine to go nearly idle (a shared box).
    quiet_wait_s: float = 15.0
    # -- bench/features.py: each compares configurations in interleaved rounds --
    # cross-fanout: fan-out over 2 nodes vs 1 node
    cross_subscribers: int = 1000
    cross_publishes: int = 200  # per round and shape
    cross_rounds: int = 5
    # cross-latency: publish on node A at xlat_rate/s, receive on node B
    xlat_rate: float = 1000.0
    xlat_seconds: float = 10.0  # per round
    xlat_rounds: int = 3
    xlat_receivers: int = 100
    xlat_channels: int = 10  # publishes cycle over these; receivers are spread evenly on them
    xlat_publishers: int = 4  # processes, one keep-alive connection each
    # cross-churn: subscription churn over 2 nodes
    xchurn_clients: int = 200
    xchurn_channels: int = 1000
    xchurn_interval_ms: int = 1000
    xchurn_seconds: float = 120.0
    # webhooks: client events -> webhook events, publish latency beside, then the drain
    wh_senders: int = 100
    # 100 x 20.5: Node's timers run a little slow, and the target is 2,000 client events/s achieved
    wh_rate_per_sender: float = 20.5
    wh_seconds: float = 15.0  # per round
    wh_rounds: int = 4  # per configuration
    wh_subscribers: int = 200
    wh_publish_rate: float = 20.0
    wh_workers: int = 2
    wh_drain_timeout: float = 600.0
    wh_steady_rounds: int = 2  # then the same with the workers running
    # recovery-fanout: fan-out with recovery/history on vs off (protocol-2 subscribers)
    rec_subscribers: int = 1000
    rec_publishes: int = 200
    rec_rounds: int = 5
    # ... and a narrower fan-out, where the per-publish cost weighs more (0: skip)
    rec_narrow_subscribers: int = 200
    rec_narrow_publishes: int = 500
    # publish-cost: the cost of one publish, recovery+history off vs on
    cost_publishes: int = 1000
    cost_rounds: int = 5
    # resume
    resume_clients: int = 1000
    resume_channels: int = 10
    resume_missed: int = 20


FULL = Sizes()
QUICK = Sizes(
    fanout_subscribers=200, fanout_publishes=100, fanout_warmup=5,
    latency_subscribers=100, latency_seconds=4.0,
    connections=1000,
    churn_clients=100, churn_seconds=4.0,
    rest_connections=4, rest_seconds=3.0,
    quiet_wait_s=0.0,
    cross_subscribers=200, cross_publishes=100, cross_rounds=3,
    xlat_seconds=3.0, xlat_rounds=1,
    xchurn_seconds=20.0,
    wh_seconds=4.0, wh_rounds=2, wh_subscribers=100, wh_drain_timeout=120.0, wh_steady_rounds=1,
    rec_subscribers=200, rec_publishes=100, rec_rounds=3, rec_narrow_subscribers=0, cost_publishes=200, cost_rounds=2,
    resume_clients=200,
)


def _cpu_fields(meter: CpuMeter, units: int, unit: str) -> dict[str, Any]:
    return {
        "server_cpu_s": round(meter.cpu, 3),
        "wall_s": round(meter.wall, 3),
        "server_cpu_util": round(meter.cpu / meter.wall, 3) if meter.wall else None,
        "machine_busy_cores": round(meter.machine_busy, 2),
        **({"server_cpu_s_by_process": list(meter.by_pid.values())} if len(meter.by_pid) > 1 else {}),
        f"cpu_us_per_{unit}": round(meter.cpu / units * 1e6, 2) if units else None,
    }


# -- 1. fan-out -------------------------------------------------------------------------


def fanout(target: Target, sizes: Sizes, fresh: bool, window: int = 1, inflight: int = 100) -> dict[str, Any]:
    """N subscribers on one channel; publish, wait until every subscriber has it, publish
    the next ("as fast as they are delivered"); with ``window`` > 1, that many publishes may
    be in flight. Deliveries/s and server CPU per delivery."""
    n, total = sizes.fanout_subscribers, sizes.fanout_publishes
    out: dict[str, Any] = {"subscribers": n, "publishes": total, "window": window,
                           "http": "fresh" if fresh else "keep-alive"}
    with Pools(target, n, sizes.client_procs, {"kind": "same", "name": "fanout"}, inflight=inflight) as pools:
        c = pools.connect(timeout=60)
        if c["ok"] != n:
            return {**out, "error": f"only {c['ok']}/{n} subscribed: {c['errors']}"}
        pub = Publisher(target, fresh=fresh)
        pools.reset_count()
        for i in range(sizes.fanout_warmup):
            pub.publish("fanout", PAYLOAD)
            if not pools.wait_delivered(i + 1, timeout=30):
                counts = [p.count for p in pools.pools]
                return {**out, "error": f"warm-up publish {i} not delivered to all (per-pool counts {counts})"}
        pools.reset_count()
        rejected = 0
        meter = CpuMeter(target.pids).start()
        for i in range(total):
            if i >= window and not pools.wait_delivered(i - window + 1, timeout=30):
                meter.stop()
                return {**out, "error": f"publish {i} not delivered to every subscriber within 30 s"}
            if pub.publish("fanout", PAYLOAD) != 200:
                rejected += 1
        complete = pools.wait_delivered(total, timeout=30)
        meter.stop()
        pub.close()
        stats = pools.stats()
    deliveries = stats["count"]
    out.update({
        "deliveries": deliveries,
        "expected": n * total,
        "complete": complete and deliveries == n * total,
        "rejected_publishes": rejected,
        "deliveries_per_s": round(deliveries / meter.wall),
        "publishes_per_s": round(total / meter.wall, 1),
        **_cpu_fields(meter, deliveries, "delivery"),
        "client_errors": stats["errors"],
        "dropped_connections": n - stats["open"],
    })
    return out


# -- 2. latency -------------------------------------------------------------------------


def latency(target: Target, sizes: Sizes) -> dict[str, Any]:
    """N subscribers; publishes at a fixed rate carrying the send time; receivers compute
    end-to-end latency (publish request sent -> frame parsed by the client)."""
    n = sizes.latency_subscribers
    total = int(sizes.latency_rate * sizes.latency_seconds)
    out: dict[str, Any] = {"subscribers": n, "publishes": total, "rate_per_s": sizes.latency_rate}
    with Pools(target, n, sizes.client_procs, {"kind": "same", "name": "latency"}) as pools:
        c = pools.connect(timeout=60)
        if c["ok"] != n:
            return {**out, "error": f"only {c['ok']}/{n} subscribed: {c['errors']}"}
        pub = Publisher(target)
        pub.publish("latency", json.dumps({"t": time.time() * 1000}))  # open the keep-alive connection
        pools.wait_delivered(1, timeout=10)
        pools.broadcast("ok", cmd="latency")
        meter = CpuMeter(target.pids).start()
        start = time.perf_counter()
        for i in range(total):
            delay = start + i / sizes.latency_rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pub.publish("latency", json.dumps({"t": time.time() * 1000}))
        complete = pools.wait_delivered(total, timeout=15)
        meter.stop()
        pub.close()
        stats = pools.stats(latencies=True)
    samples = stats["latencies"]
    out.update({
        "samples": len(samples),
        "complete": complete and len(samples) == n * total,
        "latency_ms": percentiles(samples),
        **_cpu_fields(meter, len(samples), "delivery"),
        "client_errors": stats["errors"],
    })
    return out


# -- 3. idle connections ----------------------------------------------------------------


def connections(target: Target, sizes: Sizes) -> dict[str, Any]:
    """N connections, each subscribed to its own channel, held idle. RSS per connection is
    the server's RSS growth divided by N; the connect rate counts the handshake and the
    subscription ack."""
    n = sizes.connections
    out: dict[str, Any] = {"connections": n}
    time.sleep(0.5)
    rss0 = rss_kb(target.pids)
    # Spread the clients over several loopback source addresses so ephemeral ports never run short.
    sources = [f"127.0.0.{i}" for i in range(1, 5)]
    with Pools(target, n, sizes.client_procs, {"kind": "distinct", "prefix": "idle-"}, local_addresses=sources,
               inflight=100) as pools:
        meter = CpuMeter(target.pids).start()
        c = pools.connect(timeout=180)
        meter.stop()
        if c["ok"] != n:
            out["error"] = f"only {c['ok']}/{n} subscribed ({c['failed']} failed): {c['errors']}"
        time.sleep(3.0)  # idle; let lazily freed buffers settle
        rss1 = rss_kb(target.pids)
        stats = pools.stats()
        established = c["ok"]
    out.update({
        "established": established,
        "still_open_after_idle": stats["open"],
        "rss_before_mb": round(rss0 / 1024, 1),
        "rss_after_mb": round(rss1 / 1024, 1),
        "rss_per_connection_kb": round((rss1 - rss0) / max(1, established), 2),
        "connect_s": round(c["subscribed_ms"] / 1000, 3),
        "established_s": round(c["established_ms"] / 1000, 3),
        "connects_per_s": round(established / (c["subscribed_ms"] / 1000)) if c["subscribed_ms"] else None,
        **_cpu_fields(meter, established, "connection"),
        "client_errors": c["errors"] + stats["errors"],
    })
    return out


# -- 4. churn -------------------------------------------------------------------------------


def churn(target: Target, sizes: Sizes) -> dict[str, Any]:
    """Clients each hold one channel out of ``churn_channels`` and keep moving: subscribe to a
    random other channel, time its ack, unsubscribe from the old one, pause, repeat."""
    n = sizes.churn_clients
    out: dict[str, Any] = {"clients": n, "channels": sizes.churn_channels,
                           "offered_cycles_per_s": round(n * 1000 / sizes.churn_interval_ms)}
    with Pools(target, n, sizes.client_procs, {"kind": "distinct", "prefix": "churn-"}) as pools:
        c = pools.connect(timeout=60)
        if c["ok"] != n:
            return {**out, "error": f"only {c['ok']}/{n} subscribed: {c['errors']}"}
        meter = CpuMeter(target.pids).start()
        replies = pools.broadcast(
            "churn_done", timeout=sizes.churn_seconds + 60, cmd="churn", channels=sizes.churn_channels,
            prefix="churn-", interval_ms=sizes.churn_interval_ms, duration_ms=int(sizes.churn_seconds * 1000),
        )
        meter.stop()
    cycles = sum(r["cycles"] for r in replies)
    samples = [x for r in replies for x in r["latencies"]]
    elapsed = max(r["elapsed_ms"] for r in replies) / 1000
    out.update({
        "cycles": cycles,
        "cycles_per_s": round(cycles / elapsed),
        "subscribe_ack_ms": percentiles(samples),
        **_cpu_fields(meter, cycles, "cycle"),
        "client_errors": [e for r in replies for e in r["errors"]][:5],
    })
    return out


# -- 5. REST publish rate -------------------------------------------------------------------


def rest(target: Target, sizes: Sizes) -> dict[str, Any]:
    """Signed publishes/s accepted by the server, to a channel with one subscriber, from one
    Node process (``restload.js``) holding several keep-alive connections, each with one
    publish in flight. Server and client CPU come from /proc, over the same window."""
    k = sizes.rest_connections
    out: dict[str, Any] = {"publisher_connections": k, "subscribers": 1, "seconds": sizes.rest_seconds}
    body = json.dumps({"name": "bench", "channel": "rest", "data": PAYLOAD}, separators=(",", ":")).encode()
    with Pools(target, 1, 1, {"kind": "same", "name": "rest"}) as pools:
        c = pools.connect(timeout=30)
        if c["ok"] != 1:
            return {**out, "error": f"subscriber did not subscribe: {c['errors']}"}
        load = RestLoad(target, body, k, sizes.rest_seconds)
        try:
            ready = load.start(timeout=30)
            if ready.get("errors"):
                return {**out, "error": f"warm-up publishes failed: {ready['errors']}"}
            pools.reset_count()
            client_pids = [load.pid, *pools.pids]
            client_cpu0 = [cpu_seconds([pid]) for pid in client_pids]
            meter = CpuMeter(target.pids).start()
            done = load.go()
            meter.stop()
            client_cpu = [cpu_seconds([pid]) - c0 for pid, c0 in zip(client_pids, client_cpu0, strict=True)]
        finally:
            load.close()
        time.sleep(0.5)
        stats = pools.stats()
        plain = _plain_keepalive_ms(target)
    accepted = done["ok"]
    out.update({
        "accepted": accepted,
        "errors": done["errors"],
        "statuses": done["statuses"],
        "client_error_samples": done.get("error_samples", []),
        "publishes_per_s": round(accepted / meter.wall),
        "delivered_to_subscriber": stats["count"],
        **_cpu_fields(meter, accepted, "publish"),
        # the publisher process alone, and the subscriber's Node process beside it
        "client_cpu_util": round(client_cpu[0] / meter.wall, 3) if meter.wall else None,
        "client_cpu_us_per_publish": round(client_cpu[0] / accepted * 1e6, 2) if accepted else None,
        "subscriber_cpu_util": round(sum(client_cpu[1:]) / meter.wall, 3) if meter.wall else None,
        "plain_keepalive_request_ms": plain,
    })
    return out


def _plain_keepalive_ms(target: Target, requests: int = 20) -> dict[str, float | None]:
    """Sequential publishes on one keep-alive connection from a client that does what
    requests/urllib3 (the Pusher SDK) does: TCP_NODELAY, no TCP_QUICKACK trick."""
    pub = Publisher(target, quickack=False)
    pub.publish("rest", PAYLOAD)
    samples = []
    for _ in range(requests):
        t0 = time.perf_counter()
        pub.publish("rest", PAYLOAD)
        samples.append((time.perf_counter() - t0) * 1000)
    pub.close()
    return percentiles(samples, (50,))


SCENARIOS = ("fanout", "latency", "connections", "churn", "rest", "workers")


def run_on(kind: str, fn: Any, sizes: Sizes, *args: Any, tcp_nodelay: bool = False) -> dict[str, Any]:
    """Start a fresh server of ``kind``, run one scenario against it, stop it."""
    quiet = wait_for_quiet(sizes.quiet_wait_s)
    try:
        with RunningServer(kind, tcp_nodelay=tcp_nodelay) as server:
            result = fn(server.target, sizes, *args)
            result["server"] = server.target.label
            result["machine_busy_cores_before"] = quiet
            redis_pid = getattr(server, "redis_pid", None)
            if redis_pid:
                result["server_processes"] = len(server.target.pids)
            return result
    except Exception as exc:  # one broken run must not lose the rest of the suite
        return {"server": kind, "error": f"{type(exc).__name__}: {exc}"}


def workers_fanout(sizes: Sizes, single: dict[str, Any] | None) -> dict[str, Any]:
    """Fan-out with ``--workers 2`` and Redis, beside one process, compared by server CPU."""
    if single is None or "error" in single:
        single = run_on("sockudo", fanout, sizes, False)
    quiet = wait_for_quiet(sizes.quiet_wait_s)
    try:
        with RunningServer("sockudo-2w") as server:
            redis_cpu0 = cpu_seconds([server.redis_pid])
            # Fewer handshakes in flight than elsewhere, as when a burst of concurrent subscribes
            # could exhaust redis-py's pool; the Redis client now waits for a pooled connection
            # instead (sockudo/redis.py), so this only keeps the figures comparable.
            two = fanout(server.target, sizes, False, 1, inflight=20)
            two["redis_cpu_s"] = round(cpu_seconds([server.redis_pid]) - redis_cpu0, 3)
            two["redis_unreachable_warnings"] = server.log().count("redis unreachable")
            two["server"] = server.target.label
            two["machine_busy_cores_before"] = quiet
    except Exception as exc:
        two = {"server": "sockudo-2w", "error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, Any] = {"one_process": single, "two_workers": two}
    if "error" not in two and "error" not in single:
        c1 = single["cpu_us_per_delivery"]
        c2 = two["cpu_us_per_delivery"]
        # With a core per worker, capacity is set by the busier worker's CPU per delivery (the
        # one taking the REST publishes also publishes to Redis); the load generator shares
        # this machine, so measured throughput cannot show it directly.
        busiest = max(two.get("server_cpu_s_by_process") or [two["server_cpu_s"]])
        out["cpu_projected_throughput_ratio"] = round(c1 / (busiest / two["deliveries"] * 1e6), 2)
        out["cpu_projected_if_balanced"] = round(2 * c1 / c2, 2)
        out["measured_throughput_ratio"] = round(two["deliveries_per_s"] / single["deliveries_per_s"], 2)
    return out
