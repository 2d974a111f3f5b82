"""``python -m bench.adapter_routing``: what a node pays for channels it has no subscriber of.

    python -m bench.adapter_routing [--nodes 2,4,8] [--publishes 2000] [--runs 3]
                                    [--subscribers 100] [--baseline-rev REV] [--quick]

Configurations run side by side in one invocation, in interleaved rounds (the order
alternates): ``baseline`` is the server of git revision ``--baseline-rev`` (extracted with ``git
archive``; by default the last commit with the broadcast adapter, where every node receives
every publish), ``current`` the tree this runs from, and ``current, cluster`` the same on a
3-master Redis Cluster (sharded pub/sub; ``--no-cluster`` leaves it out). Each run gets its own
throwaway redis-server or cluster.

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
from tests.support.rediscluster import RedisClusterServer  # noqa: E402

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


class Backend:
    """The Redis the nodes share: one redis-server, or a 3-master Redis Cluster."""

    def __init__(self, stack: ExitStack, sharded: bool) -> None:
        self.servers: list[redis.Redis]
        if sharded:
            cluster = RedisClusterServer(masters=3)
            stack.callback(cluster.stop)
            cluster.start()
            self.env = {"ADAPTER_DRIVER": "redis-cluster", "REDIS_CLUSTER_NODES": cluster.nodes_env}
            self.pids = [n.proc.pid for n in cluster.nodes if n.proc is not None]
            self.servers = [n.client() for n in cluster.nodes]
        else:
            server = RedisServer()
            stack.callback(server.stop)
            server.start()
            self.env = {"REDIS_URL": server.url, "ADAPTER_DRIVER": "redis"}
            self.pids = [server.proc.pid] if server.proc is not None else []
            self.servers = [redis.Redis.from_url(server.url)]

    def bytes_out(self) -> int:
        return sum(int(s.info("stats")["total_net_output_bytes"]) for s in self.servers)


#: The configurations compared: (source tree label, Redis Cluster or not).
CONFIGS = {"baseline": ("baseline", False), "current": ("current", False), "current, cluster": ("current", True)}


@contextmanager
def _cluster(root: Path, sharded: bool, n: int,
             subscribers: dict[int, tuple[int, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The Redis (or Redis Cluster) and ``n`` nodes of the tree at ``root``; ``subscribers``:
    node index → (clients, loadgen channel spec)."""
    with ExitStack() as stack:
        backend = Backend(stack, sharded)
        nodes = []
        for i in range(n):
            node = Node(f"node {i}", apps=[_app()], env=dict(backend.env), root=root)
            stack.callback(node.stop)
            node.start()
            nodes.append(node)
        pools: dict[int, Pools] = {}
        for i, (count, channels) in subscribers.items():
            pools[i] = _pools(stack, nodes[i].target, count, 1, channels)
            _connect(pools[i], count, f"node {i}")
        pub = Publisher(nodes[0].target)
        stack.callback(pub.close)
        yield {"backend": backend, "nodes": nodes, "pools": pools, "pub": pub}


def _publish(pub: Publisher, channels: list[str], total: int, delivered: Callable[[int], bool]) -> None:
    for i in range(total):
        if i >= WINDOW and i % WINDOW == 0 and not delivered(i - WINDOW):
            raise RuntimeError(f"publish {i - WINDOW} was not delivered in time")
        if pub.publish(channels[i % len(channels)], PAYLOAD) != 200:
            raise RuntimeError(f"publish {i} rejected")
    if not delivered(total):
        raise RuntimeError("not every publish was delivered in time")


# -- idle nodes -------------------------------------------------------------------------------


def idle_round(root: Path, sharded: bool, n: int, publishes: int, subscribers: int) -> dict[str, float]:
    spec = {0: (subscribers, {"kind": "same", "name": "hot"})}
    spec.update({i: (1, {"kind": "same", "name": f"cold-{i}"}) for i in range(1, n)})
    with _cluster(root, sharded, n, spec) as c:
        nodes, hot, pub, backend = c["nodes"], c["pools"][0], c["pub"], c["backend"]
        others = [node.pid for node in nodes[1:]]
        _publish(pub, ["hot"], 50, lambda k: hot.wait_delivered(k, timeout=30))  # warm-up
        time.sleep(1.0)
        idle = CpuMeter(others).start()
        time.sleep(2.0)
        idle.stop()
        idle_rate = idle.cpu / idle.wall
        hot.reset_count()
        received0, bytes0 = _received(nodes), backend.bytes_out()
        meter = CpuMeter(others).start()
        redis_meter = CpuMeter(backend.pids).start()
        _publish(pub, ["hot"], publishes, lambda k: hot.wait_delivered(k, timeout=30))
        meter.stop()
        redis_meter.stop()
        received = _received(nodes) - received0
        bytes_out = backend.bytes_out() - bytes0
    extra_cpu = max(0.0, meter.cpu - idle_rate * meter.wall)
    return {
        "idle_node_us_per_publish": extra_cpu / (publishes * (n - 1)) * 1e6,
        "deliveries_per_publish": received / publishes,
        "redis_bytes_out_per_publish": bytes_out / publishes,
        "redis_us_per_publish": redis_meter.cpu / publishes * 1e6,
        "publishes_per_s": publishes / meter.wall,
    }


# -- throughput on 4 nodes -----------------------------------------------------------------------


def throughput_round(root: Path, sharded: bool, shape: str, publishes: int, subscribers: int) -> dict[str, float]:
    n = 4
    per = subscribers // n
    if shape == "one channel":
        spec = {i: (per, {"kind": "same", "name": "fan"}) for i in range(n)}
        channels = ["fan"]
    else:
        spec = {i: (per, {"kind": "same", "name": f"own-{i}"}) for i in range(n)}
        channels = [f"own-{i}" for i in range(n)]
    with _cluster(root, sharded, n, spec) as c:
        nodes, pools, pub = c["nodes"], c["pools"], c["pub"]
        merged = Pools.merge(list(pools.values()))
        share = len(channels)  # each pool sees 1/share of the publishes

        def delivered(k: int) -> bool:
            return merged.wait_delivered(k // share, timeout=30)

        _publish(pub, channels, 40, delivered)  # warm-up
        merged.reset_count()
        pids = [node.pid for node in nodes] + c["backend"].pids
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
    parser.add_argument("--no-cluster", action="store_true", help="leave out the Redis Cluster configuration")
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.publishes, args.runs = "2,4", 500, 1
    raise_fd_limit()
    counts = [int(x) for x in args.nodes.split(",")]
    trees = {"baseline": extract_tree(args.baseline_rev), "current": ROOT}
    configs = {k: v for k, v in CONFIGS.items() if not (args.no_cluster and v[1])}
    print(f"baseline: {args.baseline_rev}; current: the working tree (on one Redis, and on a 3-master Redis "
          f"Cluster); {args.publishes} publishes per run, {args.runs} runs, {args.subscribers} subscribers")

    def rounds(what: str, keys: list[Any], measure: Callable[[Path, bool, Any], dict[str, float]]
               ) -> dict[tuple[Any, str], list[dict[str, float]]]:
        out: dict[tuple[Any, str], list[dict[str, float]]] = {}
        for key in keys:
            for r in range(args.runs):
                order = list(configs) if r % 2 == 0 else list(reversed(configs))
                for label in order:
                    tree, sharded = configs[label]
                    res = measure(trees[tree], sharded, key)
                    out.setdefault((key, label), []).append(res)
                    print(f"  {what}: {key}, {label}, run {r + 1}: "
                          + ", ".join(f"{k} {v:,.2f}" for k, v in res.items()), flush=True)
        return out

    idle = rounds("idle nodes", counts,
                  lambda root, sharded, n: idle_round(root, sharded, n, args.publishes, args.subscribers))
    rows = []
    for n in counts:
        base_us = _median([x["idle_node_us_per_publish"] for x in idle[(n, "baseline")]])
        for label in configs:
            runs = idle[(n, label)]
            us = [x["idle_node_us_per_publish"] for x in runs]
            rows.append([f"{n} nodes, {label}", _median(us), _range(us),
                         f"{_median(us) / base_us:.1%}" if base_us else "-",
                         _median([x["deliveries_per_publish"] for x in runs]),
                         _median([x["redis_bytes_out_per_publish"] for x in runs]),
                         _median([x["redis_us_per_publish"] for x in runs])])
    print("\nA node without a subscriber of the channel: its CPU per publish (µs); Redis per publish")
    print_rows(["configuration", "idle node µs", "range", "of baseline", "deliveries", "Redis bytes out",
                "Redis CPU µs"], rows)

    shapes = ["one channel", "a channel per node"]
    thr = rounds("throughput", shapes,
                 lambda root, sharded, shape: throughput_round(root, sharded, shape, args.publishes,
                                                               args.subscribers))
    rows = []
    for shape in shapes:
        base = _median([x["deliveries_per_s"] for x in thr[(shape, "baseline")]])
        for label in configs:
            rate = [x["deliveries_per_s"] for x in thr[(shape, label)]]
            rows.append([f"{shape}, {label}", _median(rate), _range(rate), f"{_median(rate) / base:.2f}x",
                         _median([x["cpu_us_per_delivery"] for x in thr[(shape, label)]])])
    print("\n4 nodes on this machine: deliveries/s (publishes to node 0) and server CPU per delivery (µs, "
          "nodes and Redis)")
    print_rows(["configuration", "deliveries/s", "range", "of baseline", "CPU µs"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
