"""Helpers for multi-node tests: node settings, metrics reads, a Redis Sentinel.

Every wait has a deadline (``wait_until``); nothing sleeps for a fixed time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from typing import Any

import redis
import requests

from tests.support.metrics import metric
from tests.support.procs import RedisServer, ServerProcess, free_port, wait_until

#: Short adapter timings so node death is noticed in seconds (defaults: 5 s / 15 s).
HEARTBEAT_INTERVAL = 1.0
NODE_TIMEOUT = 3.0
#: A node killed with SIGKILL is declared dead by a survivor's heartbeat at most
#: ``node_timeout + heartbeat_interval`` after its last beat (docs/configuration.md).
DEAD_NODE_BOUND = NODE_TIMEOUT + HEARTBEAT_INTERVAL


def node_env(redis_url: str | None = None, **extra: str) -> dict[str, str]:
    """Environment of a clustered node: the Redis URL plus the short test timings."""
    env = {"ADAPTER_NODE_TIMEOUT": str(NODE_TIMEOUT), "ADAPTER_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL)}
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    env.update(extra)
    return env


def metrics_at(port: int) -> str:
    return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def up_status(node: ServerProcess) -> int:
    return requests.get(node.url + "/up", timeout=5).status_code


def answers(node: ServerProcess) -> bool:
    """``/live`` answers (raises if the process has exited, so a wait fails fast)."""
    if node.proc is not None and node.proc.poll() is not None:
        raise RuntimeError(f"server exited with {node.proc.returncode}:\n{node.log()}")
    return requests.get(node.url + "/live", timeout=1).status_code == 200


def start_all(nodes: Iterable[ServerProcess], timeout: float = 20.0) -> list[ServerProcess]:
    """Start the processes side by side, then wait for each to answer."""
    nodes = list(nodes)
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        wait_until(lambda node=node: answers(node), timeout=timeout,
                   message=f"node on port {node.port} to answer /live")
    return nodes


def wait_formed(nodes: list[ServerProcess], timeout: float = 15.0) -> None:
    """Every node is connected to Redis (``/up`` 200) and sees all the others."""
    def formed() -> bool:
        return all(up_status(n) == 200 and metric(n.metrics_text(), "sockudo_cluster_nodes") == len(nodes)
                   for n in nodes)

    wait_until(formed, timeout=timeout, interval=0.1, message=f"a cluster of {len(nodes)} nodes to form")


def tracebacks(*nodes: ServerProcess) -> int:
    return sum(node.log().count("Traceback") for node in nodes)


class SentinelServer:
    """``redis-server sentinel.conf --sentinel`` on a free port, watching one master."""

    def __init__(self, master: RedisServer, name: str = "mymaster", down_after_ms: int = 1000,
                 failover_timeout_ms: int = 3000, password: str | None = None) -> None:
        self.port = free_port()
        self.name = name
        self.password = password  # the sentinel's own; the master's comes from ``master.password``
        self.dir = tempfile.mkdtemp(prefix="sockudo-sentinel-")
        self.config_path = os.path.join(self.dir, "sentinel.conf")
        with open(self.config_path, "w", encoding="utf-8") as fh:
            fh.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nprotected-mode no\n"
                f"sentinel monitor {name} 127.0.0.1 {master.port} 1\n"
                f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
                f"sentinel failover-timeout {name} {failover_timeout_ms}\n"
                + (f"sentinel auth-pass {name} {master.password}\n" if master.password else "")
                + (f"requirepass {password}\n" if password else "")
            )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, decode_responses=True, password=self.password)

    def start(self) -> SentinelServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run `make test`, which installs it")
        self.proc = subprocess.Popen([binary, self.config_path, "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        wait_until(client.ping, timeout=10, message="redis sentinel to answer PING")
        client.close()
        return self

    def master_port(self) -> int:
        client = self.client()
        try:
            address: Any = client.sentinel_get_master_addr_by_name(self.name)  # (host, port)
            return int(address[1])
        finally:
            client.close()

    def known_replicas(self) -> int:
        client = self.client()
        try:
            return sum(1 for r in client.sentinel_slaves(self.name) if not r.get("is_sdown"))
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
