"""``python -m bench.console_fanout [--quick]``: fan-out with the operator console watching.

Three servers started side by side, each with N subscribers (pusher protocol 7, raw ``ws``
clients from ``loadgen.js``) on one channel and signed REST publishes to it:

- ``no_console``: the console is enabled (as by default) but nobody has it open;
- ``console_following``: a signed-in console streams the app's event log (Server-Sent Events),
  read as fast as it comes, as a browser following the busy channel would;
- ``console_stalled``: a console that opened the stream and stopped reading (a frozen tab):
  its queue fills and drops (counted), and must not slow the fan-out either.

Configurations are measured in interleaved rounds (order rotating; bench/features.py), each
round in two shapes (strict: one publish in flight; pipelined: a window), and compared by the
ratio of median deliveries/s. Target (docs/console.md): with a console attached, throughput
stays at least 0.9x of the same server without one. Prints the figures; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.features import (  # noqa: E402
    Node,
    _app,
    _connect,
    _interleaved_fanout,
    _pools,
    _ratio,
    _start,
)
from bench.fmt import fmt, print_rows  # noqa: E402
from bench.harness import APP_ID, Publisher, raise_fd_limit  # noqa: E402
from bench.scenarios import FULL, QUICK  # noqa: E402

TOKEN = "bench-console-token-0123456789abcdef"
CHANNEL = "fanout"


class ConsoleReader:
    """A signed-in console's event stream, read on a thread (or opened and left unread)."""

    def __init__(self, node: Node, read: bool) -> None:
        base = f"http://127.0.0.1:{node.server.metrics_port}/console"
        self.http = requests.Session()
        resp = self.http.post(base + "/login", data={"token": TOKEN}, allow_redirects=False, timeout=10)
        if resp.status_code != 303:
            raise RuntimeError(f"console sign-in failed: {resp.status_code} {resp.text[:200]}")
        self.stream = self.http.get(f"{base}/api/apps/{APP_ID}/events", stream=True, timeout=30)
        if self.stream.status_code != 200:
            raise RuntimeError(f"console stream refused: {self.stream.status_code}")
        self.events = 0
        self.dropped = 0
        self.closed = False
        if read:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        kind = ""
        try:
            for raw in self.stream.iter_lines():
                if self.closed:
                    return
                line = raw.decode("utf-8")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if kind == "events":
                        self.events += len(data)
                    elif kind == "stats":
                        self.dropped = data["dropped"]
        except (requests.RequestException, ValueError, AttributeError, OSError):
            return  # closed under the reader (AttributeError: urllib3 once the response is closed)

    def close(self) -> None:
        self.closed = True
        self.stream.close()
        self.http.close()


def run(quick: bool, rounds: int | None, log: Any, subscribers: int | None = None,
        publishes: int | None = None) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    n = subscribers or sizes.cross_subscribers
    publishes = publishes or sizes.cross_publishes
    rounds = rounds or sizes.cross_rounds
    out: dict[str, Any] = {"subscribers": n, "publishes_per_round": publishes, "rounds": rounds,
                           "pipelined_window": sizes.fanout_window}
    with ExitStack() as stack:
        names = ("no_console", "console_following", "console_stalled")
        nodes = {name: _start(stack, Node(name, apps=[_app()], console={"token": TOKEN})) for name in names}
        pools = {}
        for name, node in nodes.items():
            pools[name] = _pools(stack, node.target, n, sizes.client_procs, {"kind": "same", "name": CHANNEL})
            _connect(pools[name], n, name)
        following = ConsoleReader(nodes["console_following"], read=True)
        stack.callback(following.close)
        stalled = ConsoleReader(nodes["console_stalled"], read=False)
        stack.callback(stalled.close)
        pubs = {name: Publisher(node.target) for name, node in nodes.items()}
        for pub in pubs.values():
            stack.callback(pub.close)
        configs = {name: {"pools": pools[name], "pub": pubs[name], "pids": [nodes[name].pid], "channel": CHANNEL}
                   for name in names}
        started = time.monotonic()
        out["results"] = _interleaved_fanout(configs, sizes, rounds, publishes, log)
        out["seconds"] = round(time.monotonic() - started, 1)
        out["console_following_events_received"] = following.events
        out["console_following_dropped"] = following.dropped
        stats = stalled.http.get(f"http://127.0.0.1:{nodes['console_stalled'].server.metrics_port}/console"
                                 f"/api/apps/{APP_ID}/overview", timeout=10).json()
        out["console_stalled_dropped"] = stats["dropped"]
    res = out["results"]
    out["ratios"] = {shape: {other: _ratio(res[other][shape]["deliveries_per_s"],
                                           res["no_console"][shape]["deliveries_per_s"])
                             for other in ("console_following", "console_stalled")}
                     for shape in ("strict", "pipelined")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.console_fanout", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer subscribers and publishes (about a minute)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: the suite's cross-node rounds)")
    parser.add_argument("--subscribers", type=int, help="subscribers per server (default 1,000; --quick 200)")
    parser.add_argument("--publishes", type=int, help="publishes per round and shape (default 200; --quick 100)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    raise_fd_limit()
    begun = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - begun:6.1f}s] {msg}", file=sys.stderr, flush=True)

    result = run(args.quick, args.rounds, log, args.subscribers, args.publishes)
    print(f"\nconsole-fanout: {result['subscribers']} subscribers, {result['publishes_per_round']} publishes per "
          f"round and shape, {result['rounds']} rounds (medians)")
    rows = [[name, shape, s["deliveries_per_s"], s["cpu_us_per_delivery"], s["all_complete"]]
            for name, shapes in result["results"].items() for shape, s in shapes.items()]
    print_rows(["config", "shape", "deliveries/s", "CPU µs/delivery", "complete"], rows)
    for shape, ratios in result["ratios"].items():
        print(f"  {shape}: following / none = {fmt(ratios['console_following'])}x, "
              f"stalled / none = {fmt(ratios['console_stalled'])}x deliveries/s (target >= 0.9)")
    print(f"  the following console received {fmt(result['console_following_events_received'])} events "
          f"(dropped {fmt(result['console_following_dropped'])}); the stalled one dropped "
          f"{fmt(result['console_stalled_dropped'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
