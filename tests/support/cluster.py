"""Helpers for multi-node tests: node settings, metrics reads, pusher-js clients and what they
saw (presence frames, member lists), a Redis Sentinel.

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
from tests.support.pusherjs import PusherJsClient, PusherJsDriver
from tests.support.sdk import APP, sdk_for

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


# -- pusher-js clients on several nodes, and what they saw ------------------------------------


def user(uid: str) -> dict[str, Any]:
    return {"user_id": uid, "user_info": {"name": uid.upper()}}


def connect(js: PusherJsDriver, name: str, node: ServerProcess | int, app: dict[str, Any] = APP,
            uid: str | None = None, *channels: str) -> PusherJsClient:
    """A connected pusher-js client of ``app`` on ``node`` (or a port), subscribed to ``channels``."""
    port = node if isinstance(node, int) else node.port
    client = js.connect(name, key=app["key"], port=port, secret=app["secret"], app_id=app["id"],
                        user_data=user(uid) if uid else None, raw=False)
    client.wait_connected()
    for channel in channels:
        client.subscribe(channel)
    for channel in channels:
        client.wait_subscribed(channel)
    return client


def received(client: PusherJsClient, channel: str, event: str) -> list[Any]:
    """Data of every ``event`` pusher-js emitted on ``channel`` so far."""
    return [e["data"] for e in client.events("event") if e["channel"] == channel and e["event"] == event]


def presence_frames(client: PusherJsClient, channel: str, kind: str) -> list[str]:
    """User ids of the ``pusher_internal:member_{kind}`` frames the client received. Frames, not
    pusher-js events: pusher-js hides a member_removed for a member it no longer lists."""
    return [str(e["data"]["user_id"]) for e in client.events("message")
            if e["channel"] == channel and e["event"] == f"pusher_internal:member_{kind}"]


def succeeded_presence(client: PusherJsClient, channel: str) -> dict[str, Any]:
    """The ``presence`` object of the raw subscription_succeeded frame (ids as sent, duplicates kept)."""
    frames = [e for e in client.events("message")
              if e["channel"] == channel and e["event"] == "pusher_internal:subscription_succeeded"]
    assert frames, f"{client.name} has no subscription_succeeded on {channel}"
    return frames[-1]["data"]["presence"]


def member_view(client: PusherJsClient, channel: str) -> set[str]:
    """The member list an app shows: the last subscription_succeeded, then added/removed in order."""
    view: set[str] = set()
    for e in client.events("message"):
        if e["channel"] != channel:
            continue
        if e["event"] == "pusher_internal:subscription_succeeded":
            view = {str(i) for i in e["data"]["presence"]["ids"]}
        elif e["event"] == "pusher_internal:member_added":
            view.add(str(e["data"]["user_id"]))
        elif e["event"] == "pusher_internal:member_removed":
            view.discard(str(e["data"]["user_id"]))
    return view


def user_ids(node: ServerProcess, channel: str) -> list[str]:
    """``GET /channels/{channel}/users`` through the SDK, sorted."""
    return sorted(u["id"] for u in sdk_for(node).users_info(channel)["users"])


def wait_member_frame(client: PusherJsClient, channel: str, kind: str, uid: str,
                      timeout: float = 10.0) -> dict[str, Any]:
    return client.wait_for(
        lambda e: e.get("type") == "message" and e.get("channel") == channel
        and e.get("event") == f"pusher_internal:member_{kind}" and str(e["data"].get("user_id")) == uid,
        timeout=timeout, desc=f"member_{kind} {uid} on {channel}",
    )


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
