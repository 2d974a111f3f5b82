"""Graceful deploys (docs/reliability.md): a rolling restart of two nodes under traffic.

Two nodes joined through Redis, an app with connection recovery and history. Six protocol-2
clients (three per node) are subscribed to a feed and members of a presence channel; a
publisher sends numbered messages without pause, through whichever node answers. Node A gets
SIGTERM, is started again, then node B the same. Each client reconnects to the other node when
told 4200, re-subscribes and resumes from the last serial it saw, holding live messages until
``resume_success`` and dropping any serial it already has (the client's half of connection
recovery, docs/recovery-and-history.md).

Proven: every acknowledged publish reaches every client, each exactly once and in serial order;
no resume fails; presence lists all six users on both nodes at the end and nobody once they leave.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
import websocket

from tests.support.cluster import node_env, start_all, tracebacks, wait_formed
from tests.support.procs import RedisServer, ServerProcess, wait_until
from tests.support.sdk import sdk_for

APP: dict[str, Any] = {"id": "100", "key": "deploy-key", "secret": "deploy-secret",
                       "connection_recovery": {"enabled": True}, "history": {"enabled": True}}
FEED, ROOM = "deploy-feed", "presence-deploy"
GRACE = 3


def presence_auth(socket_id: str, user_id: str) -> dict[str, str]:
    channel_data = json.dumps({"user_id": user_id})
    sig = hmac.new(APP["secret"].encode(), f"{socket_id}:{ROOM}:{channel_data}".encode(), hashlib.sha256).hexdigest()
    return {"auth": f"{APP['key']}:{sig}", "channel_data": channel_data}


class ResumingClient(threading.Thread):
    """A protocol-2 client that survives node restarts by resuming (one thread, bounded loops)."""

    def __init__(self, name: str, nodes: list[ServerProcess], first: int, stop: threading.Event) -> None:
        super().__init__(daemon=True, name=name)
        self.user = name
        self.nodes = nodes
        self.preferred = first
        self.stop_event = stop
        self.by_serial: dict[int, int] = {}  # serial -> message number
        self.duplicates = 0
        self.failures: list[Any] = []
        self.reconnects = 0
        self.errors: list[str] = []
        self.position: dict[str, Any] | None = None
        self.ready = threading.Event()
        self.node_port: int | None = None

    def _connect(self) -> websocket.WebSocket:
        """The preferred node first, then the others (a draining node answers 503)."""
        deadline = time.monotonic() + 30
        order = self.nodes[self.preferred:] + self.nodes[:self.preferred]
        while True:
            for node in order:
                try:
                    ws = websocket.create_connection(f"{node.ws_url}/app/{APP['key']}?protocol=2", timeout=5)
                    self.node_port = node.port
                    return ws
                except (OSError, websocket.WebSocketException):
                    continue
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.user}: no node accepted a connection")
            time.sleep(0.05)

    def _session(self) -> None:
        ws = self._connect()
        try:
            established = json.loads(ws.recv())
            socket_id = json.loads(established["data"])["socket_id"]
            ws.send(json.dumps({"event": "sockudo:subscribe", "data": {"channel": FEED}}))
            ws.send(json.dumps({"event": "sockudo:subscribe", "data": {"channel": ROOM, **presence_auth(socket_id,
                                                                                                          self.user)}}))
            resuming = self.position is not None
            if resuming:
                ws.send(json.dumps({"event": "sockudo:resume", "data": {"channel_positions": {FEED: self.position}}}))
            held: list[dict[str, Any]] = []
            ws.settimeout(0.5)
            while not self.stop_event.is_set():
                try:
                    opcode, payload = ws.recv_data(control_frame=False)
                except websocket.WebSocketTimeoutException:
                    continue
                except (websocket.WebSocketConnectionClosedException, OSError):
                    return  # the node went away (or told us 4200): reconnect and resume
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    return
                frame = json.loads(payload)
                event = frame.get("event")
                if event == "sockudo_internal:subscription_succeeded" and frame.get("channel") == FEED:
                    if self.position is None:
                        self.position = {"stream_id": frame["stream_id"], "serial": frame["serial"]}
                    self.ready.set()
                elif event == "tick":
                    if resuming:
                        held.append(frame)  # live messages wait until the replay is complete
                    else:
                        self._take(frame)
                elif event == "sockudo:resume_failed":
                    self.failures.append(frame)
                elif event == "sockudo:resume_success":
                    resuming = False
                    for f in sorted(held, key=lambda f: f["serial"]):
                        self._take(f)
                    held.clear()
                elif event in ("sockudo:error", "pusher:error") and frame["data"]["code"] != 4200:
                    self.errors.append(json.dumps(frame))
        finally:
            try:
                ws.close(timeout=1)
            except Exception:
                pass

    def _take(self, frame: dict[str, Any]) -> None:
        serial = frame["serial"]
        if serial in self.by_serial:
            self.duplicates += 1
            return
        assert self.position is not None
        self.by_serial[serial] = int(frame["data"])
        if serial > self.position["serial"]:
            self.position = {"stream_id": frame["stream_id"], "serial": serial}

    def run(self) -> None:
        try:
            for _ in range(100):  # bounded: each pass is one connection
                self._session()
                if self.stop_event.is_set():
                    return
                self.reconnects += 1
        except BaseException as exc:  # reported by the test
            self.errors.append(repr(exc))
            self.ready.set()


@pytest.mark.slow
def test_rolling_restart_loses_nothing_for_resuming_clients(
        server_factory: Callable[..., ServerProcess], own_redis: RedisServer) -> None:
    own_redis.start()
    nodes = [server_factory([APP], start=False, env=node_env(own_redis.url), shutdown_grace_period=GRACE)
             for _ in range(2)]
    start_all(nodes)
    wait_formed(nodes)
    stop_clients, stop_publisher = threading.Event(), threading.Event()
    clients = [ResumingClient(f"u{i}", nodes, i % 2, stop_clients) for i in range(6)]
    acked: list[int] = []
    attempted = [0]
    publisher_errors: list[str] = []

    def publish() -> None:
        n = 0
        sdks = [sdk_for(node, APP) for node in nodes]
        while not stop_publisher.is_set() and n < 100_000:
            for attempt in range(40):  # through whichever node answers
                try:
                    attempted[0] = n + 1
                    sdks[(n + attempt) % 2].trigger(FEED, "tick", str(n))
                    acked.append(n)
                    break
                except Exception:
                    time.sleep(0.05)
            else:
                publisher_errors.append(f"message {n} not accepted by any node")
            n += 1
            time.sleep(0.01)

    publisher = threading.Thread(target=publish, daemon=True)
    try:
        for client in clients:
            client.start()
        for client in clients:
            assert client.ready.wait(10), client.errors
        wait_until(lambda: all(
            requests.get(f"{n.url}/live", timeout=2).status_code == 200 for n in nodes), timeout=5)
        publisher.start()
        wait_until(lambda: len(acked) >= 50, timeout=15, message="traffic before the deploy")

        for node in nodes:  # the rolling restart: one node at a time
            before = len(acked)
            node.signal(signal.SIGTERM)
            assert node.proc is not None
            assert node.proc.wait(timeout=GRACE + 10) == 0, node.log()[-3000:]
            node.start()
            wait_formed(nodes, timeout=20)
            wait_until(lambda before=before: len(acked) >= before + 50, timeout=20,
                       message="traffic after the restart")

        stop_publisher.set()
        publisher.join(15)
        assert not publisher_errors, publisher_errors
        final = set(acked)

        def caught_up() -> bool:
            return all(final <= set(c.by_serial.values()) for c in clients)

        wait_until(caught_up, timeout=30, interval=0.1, message="every client to hold every acknowledged message")
        for client in clients:
            assert not client.errors, (client.user, client.errors)
            assert not client.failures, (client.user, client.failures)
            serials = sorted(client.by_serial)
            numbers = [client.by_serial[s] for s in serials]
            assert numbers == sorted(numbers), f"{client.user}: serial order and publish order disagree"
            assert len(numbers) == len(set(numbers)), f"{client.user}: a message arrived twice"
            assert set(numbers) <= set(range(attempted[0])), f"{client.user}: a message nobody sent"
        assert sum(c.reconnects for c in clients) >= 6, "nobody was moved by the deploy"

        sdk = sdk_for(nodes[0], APP)
        everyone = sorted(c.user for c in clients)
        for node in nodes:
            wait_until(lambda node=node: sorted(u["id"] for u in sdk_for(node, APP).users_info(ROOM)["users"])
                       == everyone, timeout=10, message="presence on both nodes after the deploy")
        assert sdk.channel_info(ROOM, ["user_count"])["user_count"] == 6
    finally:
        stop_publisher.set()
        stop_clients.set()
        for client in clients:
            client.join(5)
    for node in nodes:
        wait_until(lambda node=node: sdk_for(node, APP).users_info(ROOM)["users"] == [], timeout=10,
                   message="presence to empty once everyone left")
    assert tracebacks(*nodes) == 0
