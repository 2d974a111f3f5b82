"""``python -m bench [scenario ...] [--quick] [--json out.json]``: the benchmark suite.

Runs each scenario against Sockudo and the two baselines (a bare gevent-websocket
broadcaster, Flask-SocketIO under gevent), one fresh server at a time, on 127.0.0.1 only.
Prints a table per scenario with ratios to the baselines, checks the targets (docs/performance.md),
and writes everything as JSON to ``bench/results/``. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import features
from . import scenarios as sc
from .harness import ROOT, flask_socketio_available, raise_fd_limit
from .report import print_report, targets

RESULTS = ROOT / "bench" / "results"
ALL_SERVERS = ("sockudo", "bare", "flask-socketio")


def machine_info() -> dict[str, Any]:
    import gevent

    model = ""
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gevent": gevent.__version__,
        "node": node,
        "fd_limit": raise_fd_limit(),
        # Anything else busy on this box skews every figure: recorded so a reader can tell.
        "loadavg_at_start": open("/proc/loadavg", encoding="ascii").read().split()[:3],
    }
    try:
        from importlib.metadata import version

        info["gevent_websocket"] = version("gevent-websocket")
        info["flask_socketio"] = version("flask-socketio")
        info["python_socketio"] = version("python-socketio")
    except Exception:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", metavar="scenario",
                        help=f"any of {', '.join(sc.SCENARIOS + features.SCENARIOS)}, or the groups "
                             f"{', '.join(features.GROUPS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="scaled-down smoke run (about 2 minutes)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON here")
    parser.add_argument("--servers", default=",".join(ALL_SERVERS),
                        help="comma-separated subset of sockudo,bare,flask-socketio")
    parser.add_argument("--py-spy", metavar="PATH",
                        help="side-by-side scenarios: sample every server node with this py-spy binary (collapsed "
                             "stacks in --profile-dir); the sampling costs the servers some CPU")
    parser.add_argument("--profile-dir", metavar="DIR", help="where --py-spy writes (default bench/results/profiles)")
    args = parser.parse_args(argv)
    if args.py_spy:
        features.PROFILE["py_spy"] = args.py_spy
    if args.profile_dir:
        features.PROFILE["dir"] = args.profile_dir
    known = sc.SCENARIOS + features.SCENARIOS
    unknown = [s for s in args.scenarios if s not in known and s not in features.GROUPS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(known)} "
                     f"or {', '.join(features.GROUPS)}")
    chosen = [x for s in args.scenarios for x in features.GROUPS.get(s, (s,))] or list(known)
    chosen = list(dict.fromkeys(chosen))
    servers = [s for s in args.servers.split(",") if s]
    if "flask-socketio" in servers and not flask_socketio_available():
        print("note: flask-socketio is not installed here (pip install -r bench/requirements.txt); "
              "skipping that baseline", file=sys.stderr)
        servers.remove("flask-socketio")
    if shutil.which("node") is None:
        print("bench: node is not on PATH", file=sys.stderr)
        return 2
    sizes = sc.QUICK if args.quick else sc.FULL
    info = machine_info()
    started = time.time()
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT)
    report: dict[str, Any] = {
        "code": git.stdout.strip() or None,
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": info,
        "sizes": sizes.__dict__,
        "results": {},
    }
    results: dict[str, Any] = report["results"]

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    for name in chosen:
        if name in features.SCENARIOS:
            if shutil.which("redis-server") is None:
                results[name] = {"error": "redis-server is not installed"}
                continue
            log(f"{name}: sockudo (configurations side by side)")
            results[name] = features.run(name, sizes, log)
        elif name == "fanout":
            # Three shapes: a fresh HTTP connection per publish, keep-alive, and
            # keep-alive with publishes pipelined. bare-encode (ws.send per socket) runs only in
            # the first shape, as a reference for the per-socket framing cost.
            for key, fresh, window in (("fanout_fresh", True, 1), ("fanout_keepalive", False, 1),
                                       ("fanout_pipelined", False, sizes.fanout_window)):
                results[key] = {}
                kinds = [k for k in ("sockudo", "bare", "bare-encode", "flask-socketio")
                         if k in servers or (k == "bare-encode" and fresh and "bare" in servers)]
                for kind in kinds:
                    log(f"{key}: {kind}")
                    results[key][kind] = sc.run_on(kind, sc.fanout, sizes, fresh, window)
        elif name == "workers":
            if "sockudo" not in servers:
                continue
            if shutil.which("redis-server") is None:
                results["workers"] = {"error": "redis-server is not installed"}
                continue
            log("workers: sockudo --workers 2 with Redis")
            single = results.get("fanout_keepalive", {}).get("sockudo")
            results["workers"] = sc.workers_fanout(sizes, single)
        else:
            fn = {"latency": sc.latency, "connections": sc.connections, "churn": sc.churn, "rest": sc.rest}[name]
            results[name] = {}
            for kind in servers:
                log(f"{name}: {kind}")
                # REST: the baselines set TCP_NODELAY as Sockudo does (see RunningServer)
                results[name][kind] = sc.run_on(kind, fn, sizes, tcp_nodelay=name == "rest")
    report["elapsed_s"] = round(time.time() - started, 1)
    report["targets"] = targets(results, full=not args.quick)

    # the JSON first: a long run's figures must survive a failure to print them
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    path = RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json"
    text = json.dumps(report, indent=2)
    path.write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(text + "\n")
    print_report(report)
    print(f"\nJSON: {path.relative_to(ROOT)}")
    if args.json:
        print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
