"""A real Redis Cluster for tests: N ``redis-server --cluster-enabled yes`` processes on free ports,
joined with ``redis-cli --cluster create``; failover helpers for the tests with replicas.

Every wait has a deadline (``wait_until``); nothing sleeps for a fixed time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterable

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from tests.support.procs import free_port, wait_until

#: Short, so that a killed master is replaced within a few seconds (the default is 15 s).
NODE_TIMEOUT_MS = 1000
#: Redis Cluster's node-to-node bus listens on the client port + 10000.
BUS_OFFSET = 10000


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_ports(count: int) -> list[int]:
    """``count`` distinct free ports whose cluster bus port (port + 10000) is free too."""
    ports: list[int] = []
    for _ in range(200 * count):
        port = free_port()
        if port + BUS_OFFSET > 65535 or port in ports or port + BUS_OFFSET in ports:
            continue
        if any(p + BUS_OFFSET == port for p in ports):
            continue
        if _bindable(port + BUS_OFFSET):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free ports with free cluster bus ports")


class ClusterNodeProcess:
    """One ``redis-server`` of the cluster."""

    def __init__(self, port: int, directory: str) -> None:
        self.port = port
        self.dir = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ClusterNodeProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run `make test`, which installs it")
        os.makedirs(self.dir, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             # a replica may always take over (its link to the killed master is seconds old at most)
             "--cluster-replica-validity-factor", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, timeout=10, message=f"cluster node {self.port} to answer PING")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def ping(self) -> bool:
        with self.client() as c:
            return bool(c.ping())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self.paused

    def info(self) -> dict[str, str]:
        with self.client() as c:
            text = c.execute_command("CLUSTER", "INFO")
        if isinstance(text, bytes):
            text = text.decode()
        if isinstance(text, dict):
            return {str(k): str(v) for k, v in text.items()}
        return dict(line.split(":", 1) for line in str(text).strip().splitlines() if ":" in line)

    def role(self) -> str:
        with self.client() as c:
            return str(c.execute_command("ROLE")[0].decode())

    def kill(self) -> None:
        """SIGKILL: the abrupt death of the node."""
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self.proc.send_signal(signal.SIGCONT)
                self.paused = False
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the node hangs (no answer, connections stay open), as a frozen host does."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RedisClusterServer:
    """``masters`` masters with ``replicas`` replicas each, all 16384 slots assigned.

    ``startup_nodes`` / ``nodes_env`` give what a client or ``REDIS_CLUSTER_NODES`` needs;
    ``client()`` is a ``RedisCluster`` client; ``kill_master()`` / ``pause_master()`` with
    ``wait_failover()`` exercise a failover (needs ``replicas >= 1``).
    """

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters_count = masters
        self.replicas = replicas
        self.dir = tempfile.mkdtemp(prefix="sockudo-cluster-")
        ports = cluster_ports(masters * (1 + replicas))
        self.nodes = [ClusterNodeProcess(p, os.path.join(self.dir, str(p))) for p in ports]
        self._masters_before: set[int] = set()  # slot owners just before the last kill/pause

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    @property
    def nodes_env(self) -> str:
        """The value of ``REDIS_CLUSTER_NODES``: every node as ``host:port``, comma-separated."""
        return ",".join(n.address for n in self.nodes)

    def start(self) -> RedisClusterServer:
        try:
            for node in self.nodes:
                node.start()
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli is not installed")
            subprocess.run(
                [cli, "--cluster", "create", *(n.address for n in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
            )
            self.wait_ok()
            if self.replicas:
                wait_until(self._replicas_synced, timeout=30, message="every replica to be in sync with its master")
        except BaseException:
            self.stop()
            raise
        return self

    # -- state -------------------------------------------------------------------------------

    def live_nodes(self) -> list[ClusterNodeProcess]:
        return [n for n in self.nodes if n.alive()]

    def _ok_on(self, nodes: Iterable[ClusterNodeProcess]) -> bool:
        for node in nodes:
            info = node.info()
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
        return True

    def _slot_owners(self, node: ClusterNodeProcess) -> set[int]:
        """The ports of the masters that ``node`` says own slots."""
        with node.client() as c:
            slots = c.execute_command("CLUSTER", "SLOTS")
        return {int(entry[2][1]) for entry in slots}

    def _consistent(self) -> bool:
        """Every live node reports state ok, all slots served, and the same slot owners, all alive."""
        live = self.live_nodes()
        if not self._ok_on(live):
            return False
        live_ports = {n.port for n in live}
        views = [self._slot_owners(n) for n in live]
        return all(v == views[0] for v in views) and views[0] <= live_ports

    def _replicas_synced(self) -> bool:
        for node in self.live_nodes():
            with node.client() as c:
                info = c.info("replication")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says ``cluster_state:ok``, all slots covered, same slot owners."""
        wait_until(self._consistent, timeout=timeout, message="the cluster to be ok on every node")

    def masters(self) -> list[ClusterNodeProcess]:
        """The live nodes that own slots now (after a failover: the promoted replicas too)."""
        live = self.live_nodes()
        owners = self._slot_owners(live[0])
        return [n for n in live if n.port in owners]

    def master_for_key(self, key: str) -> ClusterNodeProcess:
        with self.live_nodes()[0].client() as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            slots = c.execute_command("CLUSTER", "SLOTS")
        for entry in slots:
            if int(entry[0]) <= slot <= int(entry[1]):
                port = int(entry[2][1])
                return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"no master for slot {slot}")

    # -- clients -----------------------------------------------------------------------------

    def client(self, **kwargs: object) -> RedisCluster:
        options: dict[str, object] = {"socket_timeout": 2, "socket_connect_timeout": 2}
        options.update(kwargs)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.startup_nodes],
                            **options)  # type: ignore[arg-type]

    def flushall(self) -> None:
        """Empty every master (replicas follow)."""
        for node in self.masters():
            with node.client() as c:
                c.flushall()

    # -- failures ----------------------------------------------------------------------------

    def _victim(self, node: ClusterNodeProcess | None, key: str | None) -> ClusterNodeProcess:
        if self.replicas < 1:
            raise RuntimeError("a failover needs replicas (RedisClusterServer(replicas=1))")
        self._masters_before = {n.port for n in self.masters()}
        if node is not None:
            return node
        return self.master_for_key(key) if key is not None else self.masters()[0]

    def kill_master(self, node: ClusterNodeProcess | None = None, key: str | None = None) -> ClusterNodeProcess:
        """SIGKILL a master (``node``, the owner of ``key``'s slot, or the first); returns it."""
        victim = self._victim(node, key)
        victim.kill()
        return victim

    def pause_master(self, node: ClusterNodeProcess | None = None, key: str | None = None) -> ClusterNodeProcess:
        """SIGSTOP a master; ``victim.resume()`` brings it back (it rejoins as a replica)."""
        victim = self._victim(node, key)
        victim.pause()
        return victim

    def wait_failover(self, old_master: ClusterNodeProcess, timeout: float = 30.0) -> ClusterNodeProcess:
        """Until a replica of ``old_master`` owns its slots, every live node agrees and says ok;
        returns the promoted node."""
        live = [n for n in self.nodes if n is not old_master and n.alive()]

        def promoted() -> ClusterNodeProcess | None:
            if not self._ok_on(live):
                return None
            views = [self._slot_owners(n) for n in live]
            owners = views[0]
            if old_master.port in owners or any(v != owners for v in views) or len(owners) != self.masters_count:
                return None
            new = [n for n in live if n.port in owners and n.port not in self._masters_before]
            return new[0] if len(new) == 1 and new[0].role() == "master" else None

        result: ClusterNodeProcess = wait_until(
            promoted, timeout=timeout, message=f"a replica of {old_master.address} to take over its slots")
        return result

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisClusterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: The two kinds of Redis a store runs on, as pytest params: a store test parametrized with them
#: runs once on each (the cluster run is marked ``rediscluster``: ``make test-cluster`` runs it).
STORE_BACKENDS = [pytest.param("redis", marks=pytest.mark.redis),
                  pytest.param("cluster", marks=[pytest.mark.redis, pytest.mark.rediscluster])]


def store_client(request: pytest.FixtureRequest, kind: str) -> redis.Redis | RedisCluster:
    """An emptied client of ``kind`` (a ``STORE_BACKENDS`` value): database 12 of the session's
    redis-server, or the session's Redis Cluster."""
    if kind == "cluster":
        cluster: RedisClusterServer = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        return cluster.client()
    server = request.getfixturevalue("redis_server")
    client = redis.Redis(port=server.port, db=12)
    client.flushdb()
    return client
