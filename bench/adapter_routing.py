"""``python -m bench.adapter_routing``: what a node pays for channels it has no subscriber of.

    python -m bench.adapter_routing [--nodes 2,4,8] [--publishes 2000] [--runs 3]
                                    [--subscribers 100] [--baseline-rev REV] [--quick]

Two adapters run side by side in one invocation, in interleaved rounds (the order alternates):
``baseline`` is the server of git revision ``--baseline-rev`` (extracted with ``git archive``;
e.g. the last commit with the broadcast adapter, where every node receives every publish),
``current`` the tree this runs from. Each configuration gets its own throwaway redis-server.

- **idle nodes** (for each node count N): node 0 holds ``--subscribers`` clients on channel
  ``hot``; every other node holds one client on a channel of its own. ``--publishes`` signed REST
  publishes to ``hot`` go to node 0. Measured: the CPU the other N-1 nodes spend per publish
  (their idle CPU over the same wall time subtracted), how many envelopes Redis delivered to
  nodes per publish (the nodes' ``adapter_receive_latency_ms`` samples plus their own echoes,
  ``adapter_duplicates_suppressed``), and Redis's output bytes per publish.
  Target: an idle node's CPU per publish ≤ 5 % of the baseline's; deliveries per publish = the
  number of nodes holding the channel (1 here), not N.
- **throughput** (4 nodes on this machine's cores): ``--subscribers`` clients spread over 4 nodes,
  (a) all on one channel, (b) each node's clients on a channel of their own, publishes spread
  round-robin over the 4 channels; all publishes to node 0. Deliveries/s and server CPU per
  delivery (the 4 nodes plus redis-server). Target: ≥ the baseline's.

Prints the figures (medians of ``--runs``, with the range); writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.features import Node, _app, _connect, _pools  # noqa: E402
from bench.fmt import print_rows  # noqa: E402
from bench.harness import CpuMeter, Pools, Publisher, extract_tree, raise_fd_limit  # noqa: E402
from bench.scenarios import PAYLOAD  # noqa: E402
from tests.support.procs import RedisServer  # noqa: E402

#: Metrics whose samples count the envelopes Redis delivered to a node (received from other
#: nodes, and the node's own echoes).
RECEIVED = ("sockudo_adapter_receive_latency_ms_count", "sockudo_adapter_duplicates_suppressed_total")
WINDOW = 20  # publishes in flight before waiting for delivery


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _range(values: list[float]) -> str:
    return f"{min(values):,.1f}–{max(values):,.1f}" if values else "-"


def _received(nodes: list[Node]) -> float:
    return sum(node.metric(name) for node in nodes for name in RECEIVED)


def _redis_bytes_out(url: str) -> int:
    return int(redis.Redis.from_url(url).info("stats")["total_net_output_bytes"])


@contextmanager
def _cluster(root: Path, n: int, subscribers: dict[int, tuple[int, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """A redis-server and ``n`` nodes of the tree at ``root``; ``subscribers``: node index →
    (clients, loadgen channel spec)."""
    with ExitStack() as stack:
        server = RedisServer()
        stack.callback(server.stop)
        server.start()
        nodes = []
        for i in range(n):
            node = Node(f"node {i}", apps=[_app()], env={"REDIS_URL": server.url, "ADAPTER_DRIVER": "redis"},
                        root=root)
            stack.callback(node.stop)
            node.start()
            nodes.append(node)
        pools: dict[int, Pools] = {}
        for i, (count, channels) in subscribers.items():
            pools[i] = _pools(stack, nodes[i].target, count, 1, channels)
            _connect(pools[i], count, f"node {i}")
        pub = Publisher(nodes[0].target)
        stack.callback(pub.close)
        yield {"redis": server, "nodes": nodes, "pools": pools, "pub": pub}


def _publish(pub: Publisher, channels: list[str], total: int, delivered: Callable[[int], bool]) -> None:
    for i in range(total):
        if i >= WINDOW and i % WINDOW == 0 and not delivered(i - WINDOW):
            raise RuntimeError(f"publish {i - WINDOW} was not delivered in time")
        if pub.publish(channels[i % len(channels)], PAYLOAD) != 200:
            raise RuntimeError(f"publish {i} rejected")
    if not delivered(total):
        raise RuntimeError("not every publish was delivered in time")


# -- idle nodes -------------------------------------------------------------------------------


def idle_round(root: Path, n: int, publishes: int, subscribers: int) -> dict[str, float]:
    spec = {0: (subscribers, {"kind": "same", "name": "hot"})}
    spec.update({i: (1, {"kind": "same", "name": f"cold-{i}"}) for i in range(1, n)})
    with _cluster(root, n, spec) as c:
        nodes, hot, pub = c["nodes"], c["pools"][0], c["pub"]
        others = [node.pid for node in nodes[1:]]
        _publish(pub, ["hot"], 50, lambda k: hot.wait_delivered(k, timeout=30))  # warm-up
        time.sleep(1.0)
        idle = CpuMeter(others).start()
        time.sleep(2.0)
        idle.stop()
        idle_rate = idle.cpu / idle.wall
        hot.reset_count()
        received0, bytes0 = _received(nodes), _redis_bytes_out(c["redis"].url)
        meter = CpuMeter(others).start()
        redis_meter = CpuMeter([c["redis"].proc.pid]).start()
        _publish(pub, ["hot"], publishes, lambda k: hot.wait_delivered(k, timeout=30))
        meter.stop()
        redis_meter.stop()
        received = _received(nodes) - received0
        bytes_out = _redis_bytes_out(c["redis"].url) - bytes0
    extra_cpu = max(0.0, meter.cpu - idle_rate * meter.wall)
    return {
        "idle_node_us_per_publish": extra_cpu / (publishes * (n - 1)) * 1e6,
        "deliveries_per_publish": received / publishes,
        "redis_bytes_out_per_publish": bytes_out / publishes,
        "redis_us_per_publish": redis_meter.cpu / publishes * 1e6,
        "publishes_per_s": publishes / meter.wall,
    }


# -- throughput on 4 nodes -----------------------------------------------------------------------


def throughput_round(root: Path, shape: str, publishes: int, subscribers: int) -> dict[str, float]:
    n = 4
    per = subscribers // n
    if shape == "one channel":
        spec = {i: (per, {"kind": "same", "name": "fan"}) for i in range(n)}
        channels = ["fan"]
    else:
        spec = {i: (per, {"kind": "same", "name": f"own-{i}"}) for i in range(n)}
        channels = [f"own-{i}" for i in range(n)]
    with _cluster(root, n, spec) as c:
        nodes, pools, pub = c["nodes"], c["pools"], c["pub"]
        merged = Pools.merge(list(pools.values()))
        share = len(channels)  # each pool sees 1/share of the publishes

        def delivered(k: int) -> bool:
            return merged.wait_delivered(k // share, timeout=30)

        _publish(pub, channels, 40, delivered)  # warm-up
        merged.reset_count()
        pids = [node.pid for node in nodes] + [c["redis"].proc.pid]
        meter = CpuMeter(pids).start()
        _publish(pub, channels, publishes, delivered)
        meter.stop()
        deliveries = merged.stats()["count"]
    return {"deliveries_per_s": deliveries / meter.wall, "cpu_us_per_delivery": meter.cpu / deliveries * 1e6}


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.adapter_routing", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="2,4,8", help="node counts of the idle-node runs")
    parser.add_argument("--publishes", type=int, default=2000)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline-rev", default="f35b664",
                        help="git revision of the baseline server (default: the last broadcast adapter)")
    parser.add_argument("--quick", action="store_true", help="2 and 4 nodes, 500 publishes, 1 run")
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.publishes, args.runs = "2,4", 500, 1
    raise_fd_limit()
    counts = [int(x) for x in args.nodes.split(",")]
    trees = {"baseline": extract_tree(args.baseline_rev), "current": ROOT}
    print(f"baseline: {args.baseline_rev}; current: the working tree; {args.publishes} publishes per run, "
          f"{args.runs} runs, {args.subscribers} subscribers")

    idle: dict[tuple[int, str], list[dict[str, float]]] = {}
    for n in counts:
        for r in range(args.runs):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for label in order:
                res = idle_round(trees[label], n, args.publishes, args.subscribers)
                idle.setdefault((n, label), []).append(res)
                print(f"  idle nodes: {n} nodes, {label}, run {r + 1}: "
                      + ", ".join(f"{k} {v:,.2f}" for k, v in res.items()), flush=True)
    rows = []
    for n in counts:
        b, cur = idle[(n, "baseline")], idle[(n, "current")]
        b_us = _median([x["idle_node_us_per_publish"] for x in b])
        c_us = _median([x["idle_node_us_per_publish"] for x in cur])
        rows.append([n, b_us, c_us, f"{c_us / b_us:.1%}" if b_us else "-",
                     _median([x["deliveries_per_publish"] for x in b]),
                     _median([x["deliveries_per_publish"] for x in cur]),
                     _median([x["redis_bytes_out_per_publish"] for x in b]),
                     _median([x["redis_bytes_out_per_publish"] for x in cur]),
                     _median([x["redis_us_per_publish"] for x in b]),
                     _median([x["redis_us_per_publish"] for x in cur])])
    print("\nCPU of a node without a subscriber of the channel, per publish (µs), and Redis deliveries per publish")
    print_rows(["nodes", "baseline µs", "current µs", "current/baseline", "baseline deliv.", "current deliv.",
                "baseline B out", "current B out", "baseline Redis µs", "current Redis µs"], rows)

    thr: dict[tuple[str, str], list[dict[str, float]]] = {}
    for shape in ("one channel", "a channel per node"):
        for r in range(args.runs):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for label in order:
                res = throughput_round(trees[label], shape, args.publishes, args.subscribers)
                thr.setdefault((shape, label), []).append(res)
                print(f"  throughput: {shape}, {label}, run {r + 1}: "
                      + ", ".join(f"{k} {v:,.1f}" for k, v in res.items()), flush=True)
    rows = []
    for shape in ("one channel", "a channel per node"):
        b_rate = [x["deliveries_per_s"] for x in thr[(shape, "baseline")]]
        c_rate = [x["deliveries_per_s"] for x in thr[(shape, "current")]]
        rows.append([shape, _median(b_rate), _range(b_rate), _median(c_rate), _range(c_rate),
                     f"{_median(c_rate) / _median(b_rate):.2f}x",
                     _median([x["cpu_us_per_delivery"] for x in thr[(shape, "baseline")]]),
                     _median([x["cpu_us_per_delivery"] for x in thr[(shape, "current")]])])
    print("\n4 nodes on this machine: deliveries/s (publishes to node 0) and server CPU per delivery (µs)")
    print_rows(["shape", "baseline/s", "range", "current/s", "range", "ratio", "baseline µs", "current µs"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
