"""``ShardedBus`` alone (no server) against a real Redis Cluster: publish and receive on every
shard, interest changes and ``wait_applied``, and a master failover and a slot migration under
traffic, after which the bus receives again on every channel without a restart and without
delivering any message twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from sockudo.adapter.bus import Bus
from sockudo.adapter.sharded_bus import ShardedBus
from sockudo.core.keys import tag
from tests.support.fakes import FakeRuntime
from tests.support.procs import wait_until
from tests.support.rediscluster import RedisClusterServer

PREFIX = "bus-test"


def channel(name: str) -> str:
    """A pub/sub channel named as the adapter names a Pusher channel's (its hash tag decides the slot)."""
    return f"{PREFIX}#c{tag('app', name)}"


class Running:
    """A bus whose ``run`` loop is on a thread, recording what it delivers."""

    def __init__(self, bus: ShardedBus) -> None:
        self.bus = bus
        self.received: list[tuple[str, bytes]] = []
        self.connected: list[bool] = []
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=bus.run, args=(self.on_message, self.connected.append,
                                                             lambda: self.stop), daemon=True)

    def on_message(self, name: str, data: bytes) -> None:
        with self.lock:
            self.received.append((name, data))

    def messages(self, name: str | None = None) -> list[bytes]:
        with self.lock:
            return [data for ch, data in self.received if name is None or ch == name]

    def start(self) -> Running:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop = True
        self.bus.close()
        self.thread.join(timeout=10)


@pytest.fixture
def bus_on(redis_cluster: RedisClusterServer) -> Iterator[Running]:
    client = redis_cluster.client()
    bus: Bus = ShardedBus(client, FakeRuntime())  # mypy checks the driver against the interface
    assert isinstance(bus, ShardedBus)
    running = Running(bus).start()
    yield running
    running.close()
    client.close()


def spread(cluster: RedisClusterServer, count: int) -> list[str]:
    """``count`` channels; asserts that they land on every master."""
    names = [channel(f"ch-{i}") for i in range(count)]
    assert len({cluster.master_for_key(n).port for n in names}) == len(cluster.masters())
    return names


def test_publish_and_receive_on_every_shard(redis_cluster: RedisClusterServer, bus_on: Running) -> None:
    names = spread(redis_cluster, 60)
    bus_on.bus.set_interest(names, ())
    assert bus_on.bus.wait_applied(10)
    wait_until(lambda: bus_on.connected == [True], timeout=10, message="on_connected(True)")
    # one listener (one connection) per master
    assert len(bus_on.bus._listeners) == 3
    bus_on.bus.publish([(n, f"m-{i}") for i, n in enumerate(names)])
    wait_until(lambda: len(bus_on.messages()) == 60, timeout=10, message="every message")
    assert sorted(bus_on.received) == sorted((n, f"m-{i}".encode()) for i, n in enumerate(names))


def test_interest_changes_take_effect(redis_cluster: RedisClusterServer, bus_on: Running) -> None:
    names = spread(redis_cluster, 30)
    kept, dropped = names[:15], names[15:]
    bus = bus_on.bus
    bus.set_interest(names, ())
    assert bus.wait_applied(10)
    bus.set_interest((), dropped)
    assert bus.wait_applied(10)
    bus.publish([(n, "after-drop") for n in names])
    wait_until(lambda: len(bus_on.messages()) == len(kept), timeout=10, message="the kept channels' messages")
    # a marker published after the others on every dropped channel's shard shows nothing else came
    marker = kept[0]
    bus.publish([(marker, "marker")])
    wait_until(lambda: b"marker" in bus_on.messages(marker), timeout=10)
    assert {ch for ch, _ in bus_on.received} == set(kept)
    # Redis itself no longer has the dropped ones subscribed
    client = redis_cluster.client()
    assert all(client.execute_command("SPUBLISH", n, "x") == 0 for n in dropped)
    assert bus.wait_applied(1)
    bus.set_interest(dropped[:1], ())
    assert bus.wait_applied(10)
    bus.publish([(dropped[0], "back")])
    wait_until(lambda: bus_on.messages(dropped[0]) == [b"back"], timeout=10)
    client.close()


def test_channel_without_interest_delivers_nothing(redis_cluster: RedisClusterServer, bus_on: Running) -> None:
    wanted, unwanted = channel("wanted"), channel("unwanted")
    bus_on.bus.set_interest([wanted], ())
    assert bus_on.bus.wait_applied(10)
    bus_on.bus.publish([(unwanted, "no"), (wanted, "yes")])
    wait_until(lambda: bus_on.messages(wanted) == [b"yes"], timeout=10)
    client = redis_cluster.client()
    assert client.execute_command("SPUBLISH", unwanted, "x") == 0
    assert bus_on.messages() == [b"yes"]
    client.close()


def test_wait_applied_before_run_is_false_then_true(redis_cluster: RedisClusterServer) -> None:
    client = redis_cluster.client()
    bus = ShardedBus(client, FakeRuntime())
    bus.set_interest([channel("early")], ())
    assert not bus.wait_applied(0.2)  # nothing listens before run()
    running = Running(bus).start()
    try:
        assert bus.wait_applied(10)
        wait_until(lambda: running.connected == [True], timeout=10)
    finally:
        running.close()
        client.close()


def test_publish_to_channels_of_every_master_is_one_pipeline_each(redis_cluster: RedisClusterServer) -> None:
    client = redis_cluster.client()
    bus = ShardedBus(client, FakeRuntime())
    before = {n.port: int(n.client().info("commandstats").get("cmdstat_spublish", {}).get("calls", 0))
              for n in redis_cluster.masters()}
    names = spread(redis_cluster, 30)
    bus.publish([(n, "x") for n in names])
    after = {n.port: int(n.client().info("commandstats").get("cmdstat_spublish", {}).get("calls", 0))
             for n in redis_cluster.masters()}
    per_master = {port: after[port] - before[port] for port in after}
    assert sum(per_master.values()) == 30 and all(v > 0 for v in per_master.values())
    client.close()


class Publisher:
    """Publishes numbered messages to every channel, round after round, on a thread."""

    def __init__(self, bus: ShardedBus, names: list[str]) -> None:
        self.bus = bus
        self.names = names
        self.round = 0
        self.failed_batches = 0
        self.stop = False
        self.sent_at: dict[int, float] = {}
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        while not self.stop:
            self.round += 1
            self.sent_at[self.round] = time.monotonic()
            try:
                self.bus.publish([(n, str(self.round)) for n in self.names])
            except (redis.RedisError, OSError):
                self.failed_batches += 1
            time.sleep(0.02)

    def start(self) -> Publisher:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop = True
        self.thread.join(timeout=10)


def numbers(running: Running, name: str) -> list[int]:
    return [int(data) for data in running.messages(name)]


def check_resumed(running: Running, publisher: Publisher, names: list[str], since_round: int) -> None:
    """Every channel receives rounds published after ``since_round``; none twice, none out of order."""
    def all_receive() -> bool:
        return all(any(n > since_round for n in numbers(running, name)) for name in names)

    wait_until(all_receive, timeout=30, message="every channel to receive again")
    for name in names:
        got = numbers(running, name)
        assert len(got) == len(set(got)), f"a message was delivered twice on {name}"
        assert got == sorted(got), f"messages out of order on {name}"


def largest_gap(running: Running, publisher: Publisher, names: list[str]) -> tuple[int, float]:
    """The most consecutive rounds any channel missed, and that window in seconds."""
    worst = (0, 0.0)
    for name in names:
        got = numbers(running, name)
        for a, b in zip(got, got[1:], strict=False):
            if b - a - 1 > worst[0]:
                worst = (b - a - 1, publisher.sent_at[b] - publisher.sent_at[a])
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "pause", "pause-kept"])
def test_master_failover_under_traffic(redis_cluster_ha: RedisClusterServer, how: str) -> None:
    """``kill``: SIGKILL, the connection breaks. ``pause``: SIGSTOP, the bus gives the silent
    connection up. ``pause-kept``: SIGSTOP with a ping timeout longer than the failover, so the
    bus still holds its subscriptions on the old master when it comes back as a replica of the
    same shard (which delivers the shard's messages too): they are released before the promoted
    master's are made, or every message would arrive twice."""
    cluster = redis_cluster_ha
    client = cluster.client()
    ping_timeout = 60.0 if how == "pause-kept" else 1.5
    bus = ShardedBus(client, FakeRuntime(), ping_interval=0.5, ping_timeout=ping_timeout)
    running = Running(bus).start()
    names = spread(cluster, 30)
    bus.set_interest(names, ())
    assert bus.wait_applied(10)
    publisher = Publisher(bus, names).start()
    try:
        wait_until(lambda: all(numbers(running, n) for n in names), timeout=10, message="traffic on every channel")
        victim_key = names[0]
        victim = cluster.kill_master(key=victim_key) if how == "kill" else cluster.pause_master(key=victim_key)
        killed_at = publisher.round
        promoted = cluster.wait_failover(victim)
        if how != "kill":
            victim.resume()  # it rejoins as a replica of the shard it led: it must not deliver twice
        check_resumed(running, publisher, names, since_round=publisher.round)
        wait_until(lambda: running.connected == [True, False], timeout=15, message="on_connected(False) once")
        # traffic goes on a while after the failover: still no duplicates, nothing lost any more
        resumed_round = publisher.round
        wait_until(lambda: publisher.round > resumed_round + 20, timeout=10)
    finally:
        publisher.close()
    final = publisher.round
    wait_until(lambda: all(numbers(running, n)[-1:] == [final] for n in names), timeout=10,
               message="the last round on every channel")
    check_resumed(running, publisher, names, since_round=killed_at)
    for name in names:  # after recovery, every round arrived
        got = numbers(running, name)
        assert got[-20:] == list(range(final - 19, final + 1))
    missed, window = largest_gap(running, publisher, names)
    print(f"\nfailover ({how}): largest gap {missed} rounds, {window:.2f} s; stats {bus.stats}")
    assert bus.stats.slot_refreshes >= 1 and bus.stats.slots_moved >= 1
    assert bus.stats.connection_losses == (0 if how == "pause-kept" else 1)
    # listening on the promoted master; the old one's listener has ended
    wait_until(lambda: {int(name.split(":")[1]) for name in bus._listeners} == {m.port for m in cluster.masters()},
               timeout=10, message="one listener per master, the promoted one included")
    assert promoted.port in {m.port for m in cluster.masters()}
    running.close()
    client.close()


def move_slot(cluster: RedisClusterServer, slot: int, source: int, target: int) -> None:
    """Migrate ``slot`` (it holds no keys) from master port ``source`` to ``target``, as
    ``redis-cli --cluster reshard`` does: IMPORTING / MIGRATING, then SETSLOT NODE on both."""
    nodes = {n.port: n for n in cluster.nodes}
    with nodes[source].client() as src, nodes[target].client() as dst:
        target_id = dst.execute_command("CLUSTER", "MYID").decode()
        source_id = src.execute_command("CLUSTER", "MYID").decode()
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    cluster.wait_ok()


def ssubscribe_calls(cluster: RedisClusterServer) -> int:
    """SSUBSCRIBE commands the masters have run (refused ones included)."""
    total = 0
    for node in cluster.masters():
        with node.client() as c:
            stats = c.info("commandstats").get("cmdstat_ssubscribe", {})
        total += int(stats.get("calls", 0)) + int(stats.get("rejected_calls", 0))
    return total


def test_subscription_follows_a_migrated_slot(redis_cluster: RedisClusterServer) -> None:
    cluster = redis_cluster
    client = cluster.client()
    bus = ShardedBus(client, FakeRuntime())
    running = Running(bus).start()
    names = spread(cluster, 12)
    moving = names[0]
    slot = client.keyslot(moving)
    source = cluster.master_for_key(moving).port
    target = next(n.port for n in cluster.masters() if n.port != source)
    bus.set_interest(names, ())
    assert bus.wait_applied(10)
    publisher = Publisher(bus, names).start()
    try:
        wait_until(lambda: all(numbers(running, n) for n in names), timeout=10, message="traffic on every channel")
        calls_before = ssubscribe_calls(cluster)
        moved_at = publisher.round
        move_slot(cluster, slot, source, target)
        check_resumed(running, publisher, names, since_round=publisher.round)
        assert bus.stats.pushed_unsubscribes >= 1 and bus.stats.slots_moved >= 1
        assert f"127.0.0.1:{target}" in bus._listeners
        # the other channels kept their subscriptions: only the moving one was subscribed again
        # (twice at most: a refresh may read a node that has not yet heard of the move)
        assert 1 <= bus.stats.resubscribed <= 2 and bus.stats.connection_losses == 0
        assert ssubscribe_calls(cluster) - calls_before == bus.stats.resubscribed
        wait_until(lambda: running.connected == [True, False], timeout=10, message="on_connected(False) once")
    finally:
        publisher.close()
        try:
            move_slot(cluster, slot, target, source)  # the session's cluster as it was
        finally:
            running.close()
            client.close()
    check_resumed(running, publisher, names, since_round=moved_at)
    missed, window = largest_gap(running, publisher, names)
    print(f"\nslot migration: largest gap {missed} rounds, {window:.2f} s; stats {bus.stats}")



def test_subscribe_refused_with_moved_follows_the_slot(redis_cluster: RedisClusterServer) -> None:
    """The client's slot map is stale (the slot moved after it was read): the SSUBSCRIBE is
    answered with MOVED, the bus refreshes the map and subscribes on the new owner."""
    cluster = redis_cluster
    client = cluster.client()
    bus = ShardedBus(client, FakeRuntime())
    running = Running(bus).start()
    name = channel("moved-before-subscribe")
    slot = client.keyslot(name)
    source = cluster.master_for_key(name).port
    target = next(n.port for n in cluster.masters() if n.port != source)
    move_slot(cluster, slot, source, target)
    try:
        assert client.nodes_manager.get_node_from_slot(slot).port == source  # stale
        bus.set_interest([name], ())
        assert bus.wait_applied(10)
        # the listener of the old owner, left with nothing to listen to, ends
        wait_until(lambda: list(bus._listeners) == [f"127.0.0.1:{target}"], timeout=5)
        assert bus.stats.slot_refreshes >= 1 and bus.stats.slots_moved == 1
        bus.publish([(name, "found")])
        wait_until(lambda: running.messages(name) == [b"found"], timeout=10)
    finally:
        move_slot(cluster, slot, target, source)
        running.close()
        client.close()

GEVENT_SCRIPT = """
from gevent import monkey; monkey.patch_all()
import json, os, sys, time
import gevent
from redis.cluster import ClusterNode, RedisCluster
from sockudo.adapter.sharded_bus import ShardedBus
from sockudo.server.runtime import GeventRuntime

nodes = [ClusterNode(h, int(p)) for h, p in (a.split(":") for a in os.environ["NODES"].split(","))]
client = RedisCluster(startup_nodes=nodes, socket_timeout=2, socket_connect_timeout=2)
bus = ShardedBus(client, GeventRuntime())
got, connected, stop = [], [], []
runner = gevent.spawn(bus.run, lambda ch, data: got.append(ch), connected.append, lambda: bool(stop))
names = sys.argv[1:]
bus.set_interest(names[:-1], ())
first = bus.wait_applied(5)
started = time.monotonic()
bus.set_interest(names[-1:], ())
one = bus.wait_applied(5)
one_ms = (time.monotonic() - started) * 1000
bus.publish([(name, "x") for name in names])
deadline = time.monotonic() + 5
while len(got) < len(names) and time.monotonic() < deadline:
    gevent.sleep(0.01)
bus.set_interest((), names)
removed = bus.wait_applied(5)
while bus._listeners and time.monotonic() < deadline:
    gevent.sleep(0.01)
stop.append(True)
runner.join(timeout=5)
print(json.dumps({"applied": [first, one, removed], "one_ms": one_ms, "received": sorted(got),
                  "connected": connected, "listeners_left": len(bus._listeners), "returned": runner.dead}))
"""


def test_runs_under_gevent(redis_cluster: RedisClusterServer) -> None:
    """The server runs the bus under gevent's monkey-patching: listeners are greenlets that wait
    on their connection and their wake-up socket at once, so a new interest is confirmed without
    waiting for a poll interval, and every listener ends once nothing is wanted."""
    names = spread(redis_cluster, 21)
    result = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT, *names], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "NODES": redis_cluster.nodes_env},
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["applied"] == [True, True, True]
    assert report["received"] == sorted(names)
    assert report["connected"] == [True] and report["listeners_left"] == 0 and report["returned"]
    assert report["one_ms"] < 100  # a poll interval (the bus's tick is 250 ms) would show here
