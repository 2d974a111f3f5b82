"""A bounded soak (docs/reliability.md): two nodes joined through Redis under churn.

    make soak                      # 30 minutes (SOAK_SECONDS=1800)
    SOAK_SECONDS=300 make soak     # any length
    .venv/bin/python -m tests.soak # the same, without make

For the whole run, on two nodes sharing one redis-server:

- **connection churn**: ``CHURN_THREADS`` clients connect to a random node, subscribe, hold the
  socket a little, then leave — cleanly (close frame) or abruptly (TCP reset, no close);
- **subscription churn**: each visit subscribes to a few public, private and presence channels
  from a pool, unsubscribes some, re-subscribes, sends client events;
- **presence joins and leaves**: presence channels with user ids from a small pool, so users
  often have sockets on both nodes at once;
- **publishes**: REST publishes at ``PUBLISH_RATE`` per second through both nodes, received by
  long-lived observers on both nodes (which must receive every one of them, answering the
  server's ``pusher:ping`` every ``activity_timeout`` = 10 s as pusher-js does).

After a warm-up (a quarter of the run, at least 10 s) the nodes' RSS is sampled as the baseline.
When the load stops and every client has left, it asserts:

- ``GET /apps/{id}/channels`` is empty on both nodes and ``sockudo_connected`` is 0;
- Redis holds no holdings, channel, presence or user keys for the nodes (``sockudo_adapter:*``,
  except the node heartbeats and zero connection counts);
- each node's RSS is within 20 % of its baseline.

The CI variant (``tests/integration/test_soak.py``) runs the same for ``SOAK_CI_SECONDS``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis
import requests
import websocket

from tests.support.cluster import node_env, start_all, wait_formed
from tests.support.metrics import metric
from tests.support.procs import RedisServer, ServerProcess, rss_kb, wait_until
from tests.support.wsmany import Fleet, connect_many

APP: dict[str, Any] = {"id": "100", "key": "soak-key", "secret": "soak-secret", "enable_client_messages": True,
                       "max_client_events_per_second": 0}
CHURN_THREADS = int(os.environ.get("SOAK_CHURN_THREADS", "6"))
PUBLISH_RATE = float(os.environ.get("SOAK_PUBLISH_RATE", "40"))  # REST publishes per second
OBSERVERS_PER_NODE = 5
PUBLIC = [f"soak-pub-{i}" for i in range(8)]
PRIVATE = [f"private-soak-{i}" for i in range(6)]
PRESENCE = [f"presence-soak-{i}" for i in range(6)]
USERS = [f"user-{i}" for i in range(30)]
RSS_TOLERANCE = 0.20


def sign(message: str) -> str:
    return hmac.new(APP["secret"].encode(), message.encode(), hashlib.sha256).hexdigest()


def rest(node: ServerProcess, method: str, path: str, body: Any = None) -> requests.Response:
    raw = b"" if body is None else json.dumps(body).encode()
    query = {"auth_key": APP["key"], "auth_timestamp": str(int(time.time())), "auth_version": "1.0"}
    if method == "POST":
        query["body_md5"] = hashlib.md5(raw).hexdigest()
    query["auth_signature"] = sign("\n".join([method, path, "&".join(f"{k}={v}" for k, v in sorted(query.items()))]))
    return requests.request(method, node.url + path, params=query, data=raw or None, timeout=10,
                            headers={"Content-Type": "application/json"} if method == "POST" else {})


@dataclass
class Stats:
    counts: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def error(self, text: str) -> None:
        with self.lock:
            if len(self.errors) < 50:
                self.errors.append(text)


def churn(nodes: list[ServerProcess], stop: threading.Event, stats: Stats, seed: int) -> None:
    """Visit after visit: connect, (un)subscribe, talk, leave."""
    rng = random.Random(seed)
    while not stop.is_set():
        node = rng.choice(nodes)
        try:
            ws = websocket.create_connection(f"{node.ws_url}/app/{APP['key']}?protocol={rng.choice([7, 7, 2])}",
                                             timeout=5)
        except (OSError, websocket.WebSocketException) as exc:
            stats.error(f"connect: {exc!r}")
            time.sleep(0.1)
            continue
        stats.add("connections")
        try:
            visit(ws, rng, stats)
        except (OSError, websocket.WebSocketException, ValueError, KeyError) as exc:
            stats.error(f"visit: {exc!r}")
        finally:
            if rng.random() < 0.35:  # vanish: a reset, no close frame
                try:
                    if ws.sock is not None:
                        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except (OSError, AttributeError):
                    pass
                ws.shutdown()
                stats.add("resets")
            else:
                try:
                    ws.close(timeout=1)
                except Exception:
                    ws.shutdown()


def visit(ws: websocket.WebSocket, rng: random.Random, stats: Stats) -> None:
    established = json.loads(ws.recv())
    socket_id = json.loads(established["data"])["socket_id"]
    v2 = established["event"].startswith("sockudo:")
    prefix = "sockudo:" if v2 else "pusher:"
    ack = "sockudo_internal:subscription_succeeded" if v2 else "pusher_internal:subscription_succeeded"
    wanted = rng.sample(PUBLIC, rng.randint(0, 2)) + rng.sample(PRIVATE, rng.randint(0, 2)) \
        + rng.sample(PRESENCE, rng.randint(0, 2))
    user = rng.choice(USERS)
    for channel in wanted:
        data: dict[str, Any] = {"channel": channel}
        if channel.startswith("presence-"):
            channel_data = json.dumps({"user_id": user, "user_info": {"n": user}})
            data["channel_data"] = channel_data
            data["auth"] = APP["key"] + ":" + sign(f"{socket_id}:{channel}:{channel_data}")
        elif channel.startswith("private-"):
            data["auth"] = APP["key"] + ":" + sign(f"{socket_id}:{channel}")
        ws.send(json.dumps({"event": prefix + "subscribe", "data": data}))
    pending = set(wanted)
    deadline = time.monotonic() + 5
    ws.settimeout(0.5)
    while pending and time.monotonic() < deadline:
        frame = _recv(ws)
        if frame is None:
            continue
        if frame.get("event") == ack:
            pending.discard(frame.get("channel"))
        elif frame.get("event", "").endswith(":error") or frame.get("event", "").endswith("subscription_error"):
            stats.error(f"subscribe: {frame}")
            return
    if pending:
        stats.error(f"no ack for {pending}")
        return
    stats.add("subscriptions", len(wanted))
    stats.add("presence_joins", sum(c.startswith("presence-") for c in wanted))
    joined = [c for c in wanted if not c.startswith("#")]
    for _ in range(rng.randint(0, 3)):
        action = rng.random()
        if joined and action < 0.3:
            channel = rng.choice(joined)
            ws.send(json.dumps({"event": prefix + "unsubscribe", "data": {"channel": channel}}))
            joined.remove(channel)
            stats.add("unsubscriptions")
        elif action < 0.6:
            talk = [c for c in joined if c.startswith(("private-", "presence-"))]
            if talk:
                ws.send(json.dumps({"event": "client-soak", "channel": rng.choice(talk), "data": {"from": socket_id}}))
                stats.add("client_events")
        else:
            ws.send(json.dumps({"event": prefix + "ping", "data": {}}))
    hold_until = time.monotonic() + rng.uniform(0, 0.4)
    ws.settimeout(0.1)
    while time.monotonic() < hold_until:  # read what arrives while connected
        frame = _recv(ws)
        if frame is not None and frame.get("event", "").endswith(":error"):
            stats.error(f"error frame: {frame}")


def _recv(ws: websocket.WebSocket) -> dict[str, Any] | None:
    try:
        opcode, payload = ws.recv_data()
    except websocket.WebSocketTimeoutException:
        return None
    if opcode != websocket.ABNF.OPCODE_TEXT:
        return None
    return json.loads(payload)


def publisher(nodes: list[ServerProcess], stop: threading.Event, stats: Stats, sent: Counter[str]) -> None:
    rng = random.Random(1)
    interval = 1.0 / PUBLISH_RATE
    n = 0
    next_at = time.monotonic()
    while not stop.is_set():
        channel = rng.choice(PUBLIC)
        resp = rest(rng.choice(nodes), "POST", f"/apps/{APP['id']}/events",
                    {"name": "soak", "channel": channel, "data": str(n)})
        if resp.status_code == 200:
            with stats.lock:
                sent[channel] += 1
            stats.add("publishes")
        else:
            stats.error(f"publish {resp.status_code}: {resp.text[:200]}")
        n += 1
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))


def adapter_leftovers(client: redis.Redis) -> list[str]:
    """``sockudo_adapter:*`` keys that should be gone once nobody is connected."""
    left = []
    for raw in client.scan_iter(match="sockudo_adapter:*", count=1000):
        key = raw.decode()
        if key.endswith(":nodes") or key == "sockudo_adapter:nodes":
            continue  # the live nodes' heartbeats
        if key.endswith(":connections"):
            if any(int(v) != 0 for v in client.hvals(key)):
                left.append(f"{key}={client.hgetall(key)}")
            continue
        if ":webhooks:" in key or ":cleanup" in key:
            continue
        left.append(key)
    return left


def run(seconds: float, *, log: Any = None) -> dict[str, Any]:
    """The soak, end to end; raises AssertionError on a failed check, returns the figures."""
    log = log or (lambda text: print(text, flush=True))
    redis_server = RedisServer().start()
    # A short activity timeout, so the liveness sweep (pings, pongs) runs all the time as well.
    nodes = [ServerProcess([APP], env=node_env(redis_server.url), shutdown_grace_period=3, activity_timeout=10,
                           pong_timeout=5) for _ in range(2)]
    stop, stop_publisher, stop_pump = threading.Event(), threading.Event(), threading.Event()
    stats = Stats()
    sent: Counter[str] = Counter()
    fleet: Fleet | None = None
    threads: list[threading.Thread] = []
    try:
        start_all(nodes)
        wait_formed(nodes)
        observers = []
        for node in nodes:
            observers += connect_many(node.port, APP["key"], OBSERVERS_PER_NODE)
        fleet = Fleet(observers)
        for client in observers:
            client.sock.setblocking(True)
            for channel in PUBLIC:
                client.subscribe(channel)
            client.sock.setblocking(False)
        fleet.pump_until(lambda: all(len(c.events("pusher_internal:subscription_succeeded")) == len(PUBLIC)
                                     for c in observers), 20, "observers subscribed")
        for client in observers:
            client.keep_messages = False  # count from here on (a 30-minute run would hoard them)

        pumped = fleet

        def pump() -> None:
            while not stop_pump.is_set():
                pumped.pump(0.05)

        threads = [threading.Thread(target=churn, args=(nodes, stop, stats, i), daemon=True)
                   for i in range(CHURN_THREADS)]
        threads.append(threading.Thread(target=publisher, args=(nodes, stop_publisher, stats, sent), daemon=True))
        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        started = time.monotonic()
        for t in threads:
            t.start()

        warmup = max(10.0, seconds / 4)
        time.sleep(min(warmup, seconds))
        baseline = {n.port: rss_kb(n.proc.pid) for n in nodes if n.proc}
        log(f"soak: warm-up done after {warmup:.0f}s; RSS baseline (KiB) {baseline}; {dict(stats.counts)}")
        end = started + seconds
        while time.monotonic() < end:
            time.sleep(min(30.0, max(0.0, end - time.monotonic())))
            log(f"soak: {time.monotonic() - started:.0f}s {dict(stats.counts)} errors={len(stats.errors)} RSS "
                f"{ {n.port: rss_kb(n.proc.pid) for n in nodes if n.proc} }")
        stop.set()
        stop_publisher.set()
        for t in threads:
            t.join(15)
            assert not t.is_alive(), f"{t.name} did not stop"

        total = sum(sent.values())
        try:
            wait_until(lambda: all(c.counts["soak"] == total for c in observers), timeout=30)
        except AssertionError:
            raise AssertionError(f"observers did not receive all {total} publishes: "
                                 f"{[(c.name, c.counts['soak'], c.close_code, c.eof) for c in observers]}") from None
        assert all(c.close_code is None and not c.eof for c in observers), "an observer was disconnected"
        stop_pump.set()
        pumper.join(5)
        for client in observers:
            client.close()
        fleet.close()
        fleet = None

        def empty_everywhere() -> bool:
            for node in nodes:
                if rest(node, "GET", f"/apps/{APP['id']}/channels").json() != {"channels": {}}:
                    return False
                if metric(node.metrics_text(), "sockudo_connected") != 0:
                    return False
            return not adapter_leftovers(redis.Redis(port=redis_server.port))

        try:
            wait_until(empty_everywhere, timeout=30, interval=0.5, message="bookkeeping to return to empty")
        except AssertionError:
            details = {n.port: rest(n, "GET", f"/apps/{APP['id']}/channels").json() for n in nodes}
            raise AssertionError(f"not empty: channels {details}, redis "
                                 f"{adapter_leftovers(redis.Redis(port=redis_server.port))[:20]}") from None
        final = {n.port: rss_kb(n.proc.pid) for n in nodes if n.proc}
        figures = {"seconds": seconds, "counts": dict(stats.counts), "publishes_received_per_observer": total,
                   "rss_baseline_kib": baseline, "rss_final_kib": final, "errors": stats.errors[:10],
                   "observers": len(observers)}
        log(f"soak: done {json.dumps(figures)}")
        assert not stats.errors, stats.errors[:10]
        for port, before in baseline.items():
            assert final[port] <= before * (1 + RSS_TOLERANCE), \
                f"node {port}: RSS {final[port]} KiB vs baseline {before} KiB (> {RSS_TOLERANCE:.0%})"
        for node in nodes:
            assert "Traceback" not in node.log(), node.log()[-3000:]
        return figures
    except AssertionError:
        for node in nodes:  # what the nodes said, for the post-mortem
            lines = [line for line in node.log().splitlines() if " WARNING " in line or " ERROR " in line
                     or "Traceback" in line]
            log(f"soak: node {node.port}: {len(lines)} warning/error lines; last: " + "\n".join(lines[-15:]))
        raise
    finally:
        stop.set()
        stop_publisher.set()
        stop_pump.set()
        if fleet is not None:
            fleet.close()
        for node in nodes:
            node.stop()
        redis_server.stop()


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "1800"))
    try:
        run(seconds)
    except AssertionError as exc:
        print(f"soak FAILED: {exc}", file=sys.stderr)
        return 1
    print("soak passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
