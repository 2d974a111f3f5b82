"""The printed tables, the ratios to the baselines, and the targets (docs/performance.md)."""

from __future__ import annotations

from typing import Any

from .features import SCENARIOS as FEATURES
from .features import feature_targets, print_features
from .fmt import fmt as _fmt
from .fmt import print_rows

LABELS = {
    "sockudo": "sockudo",
    "bare": "bare gevent-ws",
    "bare-encode": "bare (ws.send)",
    "flask-socketio": "Flask-SocketIO",
}


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 2)
    return None


def _table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}")
    print_rows(header, rows)


# (column title, path into a result, lower is better?)
COLUMNS: dict[str, list[tuple[str, tuple[str, ...], bool]]] = {
    "fanout": [
        ("deliveries/s", ("deliveries_per_s",), False),
        ("CPU µs/delivery", ("cpu_us_per_delivery",), True),
        ("server CPU util", ("server_cpu_util",), False),
        ("publishes/s", ("publishes_per_s",), False),
    ],
    "latency": [
        ("p50 ms", ("latency_ms", "p50"), True),
        ("p95 ms", ("latency_ms", "p95"), True),
        ("p99 ms", ("latency_ms", "p99"), True),
        ("max ms", ("latency_ms", "max"), True),
        ("CPU µs/delivery", ("cpu_us_per_delivery",), True),
    ],
    "connections": [
        ("RSS KB/conn", ("rss_per_connection_kb",), True),
        ("connects/s", ("connects_per_s",), False),
        ("all subscribed s", ("connect_s",), True),
        ("CPU µs/conn", ("cpu_us_per_connection",), True),
        ("RSS after MB", ("rss_after_mb",), True),
    ],
    "churn": [
        ("cycles/s", ("cycles_per_s",), False),
        ("ack p50 ms", ("subscribe_ack_ms", "p50"), True),
        ("ack p95 ms", ("subscribe_ack_ms", "p95"), True),
        ("ack p99 ms", ("subscribe_ack_ms", "p99"), True),
        ("CPU µs/cycle", ("cpu_us_per_cycle",), True),
    ],
    "rest": [
        ("publishes/s", ("publishes_per_s",), False),
        ("CPU µs/publish", ("cpu_us_per_publish",), True),
        ("server CPU util", ("server_cpu_util",), False),
        ("client CPU util", ("client_cpu_util",), False),
        ("machine busy cores", ("machine_busy_cores",), False),
        ("plain keep-alive req ms", ("plain_keepalive_request_ms", "p50"), True),
    ],
}

# the one or two columns each scenario is compared on
RATIO_ON: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "fanout": [("deliveries/s", ("deliveries_per_s",)), ("CPU/delivery", ("cpu_us_per_delivery",))],
    "latency": [("p95", ("latency_ms", "p95")), ("p99", ("latency_ms", "p99"))],
    "connections": [("RSS/conn", ("rss_per_connection_kb",)), ("connects/s", ("connects_per_s",))],
    "churn": [("ack p95", ("subscribe_ack_ms", "p95")), ("CPU/cycle", ("cpu_us_per_cycle",))],
    "rest": [("publishes/s", ("publishes_per_s",)), ("CPU/publish", ("cpu_us_per_publish",))],
}

TITLES = {
    "fanout_fresh": "1. Fan-out, fresh HTTP connection per publish (the baseline broadcaster's shape)",
    "fanout_keepalive": "1. Fan-out, keep-alive HTTP publisher",
    "fanout_pipelined": "1. Fan-out, keep-alive HTTP publisher, publishes pipelined",
    "latency": "2. Latency (publish request sent -> frame parsed by the subscriber)",
    "connections": "3. Idle connections, each subscribed to its own channel",
    "churn": "4. Churn: subscribe/unsubscribe cycles across channels",
    "rest": "5. REST publish rate, one subscriber",
}


def ratios(scenario: str, per_server: dict[str, Any]) -> dict[str, float | None]:
    """Sockudo's figure divided by each baseline's (for every comparison column)."""
    base = scenario.split("_")[0]
    s = per_server.get("sockudo")
    out: dict[str, float | None] = {}
    for name, path in RATIO_ON[base]:
        for other in ("bare", "flask-socketio"):
            if other in per_server:
                out[f"{name} vs {LABELS[other]}"] = _ratio(_get(s, *path), _get(per_server[other], *path))
    return out


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\nMachine: {m['nproc']} × {m['cpu_model']}, Python {m['python']}, gevent {m['gevent']}, node {m['node']}")
    print(f"Command: {report['command']}   ({'quick' if report['quick'] else 'full'} sizes, {report['elapsed_s']} s)")
    results = report["results"]
    for key, per_server in results.items():
        if key == "workers" or key in FEATURES:
            continue
        base = key.split("_")[0]
        cols = COLUMNS[base]
        rows = []
        for kind, r in per_server.items():
            row: list[Any] = [LABELS.get(kind, kind)]
            if "error" in r:
                row += ["ERROR: " + r["error"][:80]] + [None] * (len(cols) - 1)
            else:
                row += [_get(r, *path) for _, path, _ in cols]
            rows.append(row)
        first: dict[str, Any] = next(iter(per_server.values()), {})
        size = {k: first.get(k) for k in ("subscribers", "publishes", "window", "connections", "clients", "channels",
                                           "rate_per_s", "publisher_processes", "publisher_connections",
                                           "offered_cycles_per_s") if first.get(k)}
        _table(f"{TITLES.get(key, key)}  {size}", ["server", *[c[0] for c in cols]], rows)
        rs = ratios(key, per_server)
        if rs:
            print("  sockudo ratios: " + ", ".join(f"{k} {_fmt(v)}×" for k, v in rs.items()))
        for kind, r in per_server.items():
            if r.get("complete") is False or r.get("client_errors"):
                print(f"  note ({kind}): complete={r.get('complete')} errors={r.get('client_errors')}")
    w = results.get("workers")
    if w:
        print("\n7. Fan-out with --workers 2 and Redis (keep-alive publisher)")
        if "error" in w:
            print(f"  ERROR: {w['error']}")
        else:
            rows = []
            for label, r in (("1 process", w["one_process"]), ("--workers 2", w["two_workers"])):
                if "error" in r:
                    rows.append([label, "ERROR: " + r["error"][:80], None, None, None])
                else:
                    rows.append([label, r["deliveries_per_s"], r["cpu_us_per_delivery"], r["server_cpu_util"],
                                 r.get("redis_cpu_s")])
            _table("", ["server", "deliveries/s", "CPU µs/delivery", "server CPU util", "redis CPU s"], rows)
            two = w["two_workers"]
            if two.get("server_cpu_s_by_process"):
                print(f"  server CPU s by process (supervisor, workers): {two['server_cpu_s_by_process']}")
            print(f"  throughput ratio projected from server CPU, a core per worker, bound by the busier worker: "
                  f"{_fmt(w.get('cpu_projected_throughput_ratio'))}× (if perfectly balanced: "
                  f"{_fmt(w.get('cpu_projected_if_balanced'))}×); measured on this shared 2-core box: "
                  f"{_fmt(w.get('measured_throughput_ratio'))}×")
    print_features(results)
    print("\nTargets" + (" — quick sizes: indicative only" if report["quick"] else ""))
    for t in report["targets"]:
        mark = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        print(f"  [{mark:7}] {t['target']}: {t['value']}")


def targets(results: dict[str, Any], full: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(target: str, value: Any, met: bool | None) -> None:
        out.append({"target": target, "value": value, "met": met})

    for key, shape in (("fanout_fresh", "fresh conn per publish"), ("fanout_keepalive", "keep-alive"),
                       ("fanout_pipelined", "keep-alive, pipelined")):
        f = results.get(key, {})
        s, b, fs = f.get("sockudo"), f.get("bare"), f.get("flask-socketio")
        r = _ratio(_get(s, "cpu_us_per_delivery"), _get(b, "cpu_us_per_delivery"))
        if r is not None:
            add(f"CPU/delivery ≤ 1.2× bare broadcaster ({shape})", f"{r}×", r <= 1.2)
            add(f"CPU/delivery ≤ 1.0× bare broadcaster, stretch ({shape})", f"{r}×", r <= 1.0)
        r = _ratio(_get(s, "deliveries_per_s"), _get(b, "deliveries_per_s"))
        if r is not None:
            add(f"fan-out deliveries/s ≥ 90% of bare ({shape})", f"{r * 100:.0f}%", r >= 0.9)
        r = _ratio(_get(s, "deliveries_per_s"), _get(fs, "deliveries_per_s"))
        if r is not None:
            add(f"fan-out deliveries/s ≥ 2.5× Flask-SocketIO ({shape})", f"{r}×", r >= 2.5)
    lat = _get(results, "latency", "sockudo", "latency_ms")
    if lat and lat.get("p95") is not None:
        add("latency p95 < 10 ms", f"{lat['p95']} ms", lat["p95"] < 10)
        add("latency p99 < 25 ms", f"{lat['p99']} ms", lat["p99"] < 25)
    c = results.get("connections", {})
    r = _ratio(_get(c, "sockudo", "rss_per_connection_kb"), _get(c, "bare", "rss_per_connection_kb"))
    if r is not None:
        add("idle RSS/connection ≤ 1.15× bare", f"{r}× ({c['sockudo']['rss_per_connection_kb']} KB vs "
            f"{c['bare']['rss_per_connection_kb']} KB)", r <= 1.15)
    cs = _get(c, "sockudo", "connect_s")
    if cs is not None:
        n = c["sockudo"]["connections"]
        add(f"{n:,} connections established in < 10 s", f"{cs} s", cs < 10 if n >= 10_000 or not full else None)
    rp = _get(results, "rest", "sockudo", "publishes_per_s")
    if rp is not None:
        add("REST ≥ 3,000 signed publishes/s (one process)", f"{rp:,}/s", rp >= 3000)
    w = results.get("workers", {})
    if w.get("cpu_projected_throughput_ratio") is not None:
        v = w["cpu_projected_throughput_ratio"]
        add("--workers 2 fan-out ≥ 1.6× one process (by server CPU)", f"{v}×", v >= 1.6)
    return out + feature_targets(results, full)
