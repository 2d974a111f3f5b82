"""Several server processes joined through Redis behave as one server.

Real redis-server (plus a replica and a Sentinel for the failover test), real ``python -m
sockudo`` processes on their own ports, real pusher-js clients (``tests/js/driver.js``) and the
official Python server SDK. Nodes run with a 1 s heartbeat and a 3 s node timeout so node death
is noticed in seconds.

"Exactly once" is shown by counting the frames each client received after a bounded
observation window (absence can only be observed for a bounded time), or by a later sentinel
event on the same path where ordering guarantees it. Waits have deadlines; nothing sleeps for a
fixed time.
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pusher
import pytest
import redis
from prometheus_client import CollectorRegistry

from sockudo.adapter.cluster import HOLD_PRESENCE, Holding, Keys
from sockudo.adapter.redis import RedisAdapter
from sockudo.config import AppConfig, Config
from sockudo.core.connection import Connection
from sockudo.metrics.registry import Metrics
from tests.support.cluster import (
    DEAD_NODE_BOUND,
    HEARTBEAT_INTERVAL,
    SentinelServer,
    connect,
    member_view,
    metrics_at,
    node_env,
    presence_frames,
    received,
    start_all,
    succeeded_presence,
    tracebacks,
    up_status,
    user_ids,
    wait_formed,
    wait_member_frame,
)
from tests.support.fakes import FakeRuntime, RecordingListener, RecordingTransport
from tests.support.metrics import metric
from tests.support.procs import RedisServer, ServerProcess, free_port, free_port_pair, wait_until
from tests.support.pusherjs import PusherJsClient
from tests.support.sdk import APP, sdk_for
from tests.support.wsraw import RawClient

APP_ONE: dict[str, Any] = {"id": "300", "key": "cluster-one-key", "secret": "cluster-one-secret", "max_connections": 1}

#: The bounded window in which a duplicate would have to show up to be caught.
DUPLICATE_WINDOW = 0.75
#: Shutdown grace period of the test nodes (keeps teardown short).
GRACE = 3


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def cluster(server_factory: Callable[..., ServerProcess],
            redis_server: RedisServer) -> Callable[..., list[ServerProcess]]:
    """``cluster(n, apps=[APP], env=node_env(shared redis), formed=True, **config)``: n nodes
    started side by side; with ``formed`` it waits until every node is connected and sees the
    others."""

    def start(n: int, *, apps: list[dict[str, Any]] | None = None, env: dict[str, str] | None = None,
              formed: bool = True, **top: Any) -> list[ServerProcess]:
        top.setdefault("shutdown_grace_period", GRACE)
        node_environment = node_env(redis_server.url) if env is None else env
        nodes = [server_factory(apps or [APP], start=False, env=node_environment, **top) for _ in range(n)]
        start_all(nodes)
        if formed:
            wait_formed(nodes)
        return nodes

    return start

pytestmark = pytest.mark.usefixtures("flushed_redis")


# -- helpers -------------------------------------------------------------------------------


_attempts = itertools.count()


def delivered_across(sdk: pusher.Pusher, client: PusherJsClient, channel: str, timeout: float = 1.0) -> bool:
    """Trigger a fresh event through ``sdk``; True once ``client`` (elsewhere) receives it."""
    n = next(_attempts)
    try:
        sdk.trigger(channel, "probe", {"n": n})
    except Exception:  # the REST call may fail while a node is restarting; the probe retries
        return False
    try:
        client.wait_for(lambda e: e.get("type") == "event" and e.get("channel") == channel
                        and e.get("event") == "probe" and e["data"] == {"n": n}, timeout=timeout)
    except AssertionError:
        return False
    return True


def honest_count(nodes: list[ServerProcess], channel: str, expected: int, wrong: list[str]) -> bool:
    """Ask every node for the channel's subscription_count. An answer must be right or flagged
    partial (``subscription_count_complete: false``); wrong unflagged answers are collected in
    ``wrong``. True once every node gives the right, complete answer."""
    settled = True
    for node in nodes:
        info = sdk_for(node).channel_info(channel, ["subscription_count"])
        complete = info.get("subscription_count_complete", True)
        if complete and info.get("subscription_count") != expected:
            wrong.append(f"node {node.port} answered {info} (expected {expected})")
        settled = settled and complete and info.get("subscription_count") == expected
    return settled


def open_raw(node: ServerProcess, key: str) -> RawClient | None:
    """A raw socket if the node admits it, else None (the refusal is consumed)."""
    client = RawClient.open(node, key)
    frame = client.recv(5)
    if frame["event"] == "pusher:connection_established":
        return client
    client.close()
    return None


class HealthRoutingProxy:
    """A tiny TCP load balancer: each new connection goes to the first backend whose ``/up``
    answers 200, as a real balancer uses the readiness check. Threads, no gevent."""

    def __init__(self, backends: list[ServerProcess]) -> None:
        self.backends = backends
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.sockets: list[socket.socket] = []
        self.routed: list[int] = []  # backend port of every accepted connection
        self.closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _pick(self) -> ServerProcess | None:
        for node in self.backends:
            try:
                if up_status(node) == 200:
                    return node
            except Exception:
                continue
        return None

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(downstream,), daemon=True).start()

    def _serve(self, downstream: socket.socket) -> None:
        node = self._pick()
        if node is None:
            downstream.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", node.port), timeout=5)
        except OSError:
            downstream.close()
            return
        upstream.settimeout(None)
        self.routed.append(node.port)
        self.sockets += [downstream, upstream]
        threading.Thread(target=self._pump, args=(upstream, downstream), daemon=True).start()
        self._pump(downstream, upstream)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass


# -- delivery across nodes -----------------------------------------------------------------


def test_rest_events_reach_subscribers_on_every_node_exactly_once(cluster, pusherjs) -> None:
    nodes = cluster(3)
    channel = "cluster-fanout"
    subscribers = [connect(pusherjs, f"sub-{i}", node, APP, None, channel) for i, node in enumerate(nodes)]

    # six events, published through all three nodes in turn
    sdks = [sdk_for(node) for node in nodes]
    for n in range(6):
        sdks[n % 3].trigger(channel, "news", {"n": n})
    for sub in subscribers:
        wait_until(lambda sub=sub: len(received(sub, channel, "news")) >= 6, timeout=10,
                   message=f"{sub.name} to receive the six events")
    pusherjs.assert_no_event({"type": "event", "event": "news"}, within=DUPLICATE_WINDOW)
    for sub in subscribers:
        assert sorted(d["n"] for d in received(sub, channel, "news")) == list(range(6)), sub.name
        # events published through one node keep their order on every node
        for origin in range(3):
            got = [d["n"] for d in received(sub, channel, "news") if d["n"] % 3 == origin]
            assert got == sorted(got), (sub.name, got)


def test_client_events_and_socket_exclusion_across_nodes(cluster, pusherjs) -> None:
    a, b = cluster(2)
    channel = "private-cluster-chat"
    a1 = connect(pusherjs, "a1", a, APP, None, channel)
    a2 = connect(pusherjs, "a2", a, APP, None, channel)
    b1 = connect(pusherjs, "b1", b, APP, None, channel)

    # a client event from node A reaches node A's and node B's other subscribers, not its sender
    assert a1.trigger(channel, "client-hello", {"from": "a1"})
    for client in (a2, b1):
        assert client.wait_event(channel, "client-hello")["data"] == {"from": "a1"}
    sdk_for(a).trigger(channel, "after-a1", {})
    a1.wait_event(channel, "after-a1")
    assert received(a1, channel, "client-hello") == []

    # and the other way round
    assert b1.trigger(channel, "client-hello", {"from": "b1"})
    for client in (a1, a2):
        client.wait_for(lambda e: e.get("event") == "client-hello" and e.get("data") == {"from": "b1"})
    sdk_for(b).trigger(channel, "after-b1", {})
    b1.wait_event(channel, "after-b1")
    assert [d["from"] for d in received(b1, channel, "client-hello")] == ["a1"]

    # REST socket_id exclusion: published on B, excluding a socket on A (and vice versa). The
    # follow-up event takes the same path, so the excluded client would have had it first.
    sdk_for(b).trigger(channel, "excluded", {"x": 1}, socket_id=a1.socket_id)
    sdk_for(b).trigger(channel, "after-exclusion", {})
    for client in (a2, b1):
        client.wait_event(channel, "excluded")
    a1.wait_event(channel, "after-exclusion")
    assert received(a1, channel, "excluded") == []

    sdk_for(a).trigger(channel, "excluded-2", {"x": 2}, socket_id=b1.socket_id)
    sdk_for(a).trigger(channel, "after-exclusion-2", {})
    for client in (a1, a2):
        client.wait_event(channel, "excluded-2")
    b1.wait_event(channel, "after-exclusion-2")
    assert received(b1, channel, "excluded-2") == []

    pusherjs.assert_no_event(
        lambda e: e.get("type") == "event" and e.get("event", "").startswith(("client-", "excluded")),
        within=DUPLICATE_WINDOW)
    assert len(received(a2, channel, "client-hello")) == 2
    assert len(received(b1, channel, "excluded")) == 1


# -- presence and counts across nodes -----------------------------------------------------------


def test_presence_lists_users_and_counts_identical_from_every_node(cluster, pusherjs) -> None:
    nodes = cluster(3)
    channel, public = "presence-cluster-room", "cluster-counted"
    members: list[PusherJsClient] = []
    for i, node in enumerate(nodes):
        client = connect(pusherjs, f"u{i}", node, APP, f"u{i}", channel, public)
        members.append(client)
        # each joiner on a new node is told about the members on the others
        presence = succeeded_presence(client, channel)
        assert sorted(presence["ids"]) == [f"u{j}" for j in range(i + 1)]
        assert presence["hash"] == {f"u{j}": {"name": f"U{j}"} for j in range(i + 1)}
        assert presence["count"] == i + 1

    # the same user on all three nodes: listed once, announced once
    for i, node in enumerate(nodes):
        client = connect(pusherjs, f"watcher-{i}", node, APP, "watcher", channel)
        presence = succeeded_presence(client, channel)
        assert sorted(presence["ids"]) == ["u0", "u1", "u2", "watcher"]
        assert presence["count"] == 4

    expected_added = {0: ["u1", "u2", "watcher"], 1: ["u2", "watcher"], 2: ["watcher"]}
    for i, client in enumerate(members):
        wait_until(lambda i=i, client=client: presence_frames(client, channel, "added") == expected_added[i],
                   timeout=10, message=f"u{i}'s member_added frames")
    pusherjs.assert_no_event({"type": "message", "event": "pusher_internal:member_added"}, within=DUPLICATE_WINDOW)
    for i, client in enumerate(members):
        assert presence_frames(client, channel, "added") == expected_added[i]
        assert member_view(client, channel) == {"u0", "u1", "u2", "watcher"}

    for node in nodes:
        sdk = sdk_for(node)
        assert user_ids(node, channel) == ["u0", "u1", "u2", "watcher"]
        assert sdk.channel_info(channel, ["user_count", "subscription_count"]) == {
            "occupied": True, "user_count": 4, "subscription_count": 6}
        assert sdk.channel_info(public, ["subscription_count"]) == {"occupied": True, "subscription_count": 3}
        assert sdk.channels_info("presence-", ["user_count"])["channels"] == {channel: {"user_count": 4}}
        assert sdk.channels_info()["channels"] == {channel: {}, public: {}}
    assert tracebacks(*nodes) == 0


def test_same_user_on_two_nodes_one_member_added_one_member_removed(cluster, pusherjs) -> None:
    a, b = cluster(2)
    channel = "presence-cluster-dup"
    observers = [connect(pusherjs, "obs-a", a, APP, "obs-a", channel),
                 connect(pusherjs, "obs-b", b, APP, "obs-b", channel)]

    tab1 = connect(pusherjs, "dup-tab1", a, APP, "dup", channel)
    tab2 = connect(pusherjs, "dup-tab2", b, APP, "dup", channel)
    assert sorted(succeeded_presence(tab2, channel)["ids"]) == ["dup", "obs-a", "obs-b"]
    # a later joiner through node B: its member_added follows any the second tab caused
    connect(pusherjs, "late", b, APP, "late", channel)
    for obs in observers:
        wait_member_frame(obs, channel, "added", "late")
        assert presence_frames(obs, channel, "added").count("dup") == 1, obs.name

    # closing one tab: the user is still present, nobody is told anything
    tab1.disconnect()
    for node in (a, b):
        wait_until(lambda node=node: sdk_for(node).channel_info(channel, ["subscription_count"]) == {
            "occupied": True, "subscription_count": 4}, timeout=10, message="the first tab's subscription to be gone")
    sdk_for(a).trigger(channel, "after-tab1", {})
    for obs in observers:
        obs.wait_event(channel, "after-tab1")
    pusherjs.assert_no_event({"type": "message", "event": "pusher_internal:member_removed"}, within=DUPLICATE_WINDOW)
    for node in (a, b):
        assert user_ids(node, channel) == ["dup", "late", "obs-a", "obs-b"]

    # closing the last tab: exactly one member_removed on both nodes
    tab2.disconnect()
    for obs in observers:
        wait_member_frame(obs, channel, "removed", "dup")
    pusherjs.assert_no_event({"type": "message", "event": "pusher_internal:member_removed"}, within=DUPLICATE_WINDOW)
    for obs in observers:
        assert presence_frames(obs, channel, "removed") == ["dup"], obs.name
        assert member_view(obs, channel) == {"late", "obs-a", "obs-b"}
    for node in (a, b):
        assert user_ids(node, channel) == ["late", "obs-a", "obs-b"]


def test_cache_channel_payload_is_shared_by_every_node(cluster, pusherjs) -> None:
    a, b = cluster(2)
    channel = "cache-cluster-prices"
    first = connect(pusherjs, "cache-first", b, APP, None, channel)
    first.wait_event(channel, "pusher:cache_miss")  # nothing cached anywhere yet
    sdk_for(a).trigger(channel, "price", {"eur": 7})  # published through A only
    wait_until(lambda: received(first, channel, "price") == [{"eur": 7}], timeout=10,
               message="the live event on B")
    # a later subscriber on B gets A's last event from the shared cache, not a cache miss
    late = connect(pusherjs, "cache-late", b, APP, None, channel)
    assert late.wait_event(channel, "price")["data"] == {"eur": 7}
    assert not received(late, channel, "pusher:cache_miss")
    assert "cache" in sdk_for(b).channel_info(channel, ["cache"])


def test_cache_channel_payload_lives_in_redis_not_in_a_process(cluster, pusherjs, redis_server) -> None:
    """Shared through Redis, not process memory: once the publishing node has stopped, a node
    started after the publish (it never saw the event) serves it to a new subscriber, and the
    payload is a key in Redis with the cache TTL."""
    (a,) = cluster(1)
    channel = "cache-cluster-late-node"
    sdk_for(a).trigger(channel, "price", {"eur": 8})  # nobody subscribed anywhere: only the cache keeps it
    client = redis.Redis.from_url(redis_server.url)
    keys = [k for k in client.scan_iter(match="*" + channel + "*") if client.type(k) == b"string"]
    assert len(keys) == 1 and 0 < client.pttl(keys[0]), keys
    a.stop()
    (c,) = cluster(1)  # a process that did not exist when the event was published
    late = connect(pusherjs, "cache-late-node", c, APP, None, channel)
    assert late.wait_event(channel, "price")["data"] == {"eur": 8}
    assert not received(late, channel, "pusher:cache_miss")


APP_USERS: dict[str, Any] = {"id": "301", "key": "cluster-users-key", "secret": "cluster-users-secret",
                             "enable_watchlist_events": True}


def test_users_across_nodes_send_to_user_watchlist_and_terminate(cluster, pusherjs) -> None:
    """Users are cluster-wide: a user signed in on node B is reached by sendToUser through node
    A, a watcher on A sees them come online and go offline, and terminate_connections through A
    closes their socket on B (and only theirs)."""
    a, b = cluster(2, apps=[APP_USERS])

    def signed_in(name: str, node: ServerProcess, user: dict[str, Any]) -> PusherJsClient:
        client = pusherjs.connect(name, key=APP_USERS["key"], port=node.port, secret=APP_USERS["secret"],
                                  app_id=APP_USERS["id"], user_data=user, raw=False)
        client.wait_connected()
        client.signin()
        client.wait_signed_in()
        return client

    watcher = signed_in("cu-watcher", a, {"id": "cu-watcher", "watchlist": ["cu-bob"]})
    first = watcher.wait_for({"type": "watchlist", "event": "offline"})
    bob = signed_in("cu-bob", b, {"id": "cu-bob"})
    carol = signed_in("cu-carol", b, {"id": "cu-carol"})
    online = watcher.wait_for({"type": "watchlist", "event": "online"}, since=first["_seq"] + 1)
    assert online["data"] == {"name": "online", "user_ids": ["cu-bob"]}

    sdk_a = sdk_for(a, APP_USERS)
    sdk_a.send_to_user("cu-bob", "notify", {"msg": "through A"})
    assert bob.wait_for({"type": "user_event", "event": "notify"})["data"] == {"msg": "through A"}

    sdk_a.terminate_user_connections("cu-bob")
    assert bob.wait_error(4009)["error"]["data"]["message"] == "You got disconnected by the app."
    bob.wait_closed(4009)
    offline = watcher.wait_for({"type": "watchlist", "event": "offline"}, since=online["_seq"] + 1)
    assert offline["data"] == {"name": "offline", "user_ids": ["cu-bob"]}
    sdk_a.send_to_user("cu-carol", "still-here", {})
    carol.wait_for({"type": "user_event", "event": "still-here"})
    assert carol.events("closed") == []


def test_max_connections_is_cluster_wide(cluster) -> None:
    a, b = cluster(2, apps=[APP, APP_ONE])
    first = RawClient.connect(a, APP_ONE["key"])
    try:
        for node in (b, a):
            RawClient.open(node, APP_ONE["key"]).expect_error_then_close(4004)
        # the other app is not affected
        RawClient.connect(b, APP["key"]).close()
    finally:
        first.close()
    # once the socket on A is gone, node B admits one
    second = wait_until(lambda: open_raw(b, APP_ONE["key"]), timeout=10, interval=0.1,
                        message="node B to admit a socket after node A's closed")
    try:
        RawClient.open(a, APP_ONE["key"]).expect_error_then_close(4004)
    finally:
        second.close()


# -- node failure -------------------------------------------------------------------------------


def test_kill_9_removes_the_dead_nodes_members_within_the_bound(cluster, pusherjs) -> None:
    a, b, c = cluster(3, apps=[APP, APP_ONE])
    channel, public = "presence-cluster-kill", "cluster-kill-count"
    obs_a = connect(pusherjs, "obs-a", a, APP, "obs-a", channel, public)
    obs_c = connect(pusherjs, "obs-c", c, APP, "obs-c", channel, public)
    connect(pusherjs, "v1", b, APP, "v1", channel, public)
    connect(pusherjs, "v2", b, APP, "v2", channel)
    both_a = connect(pusherjs, "both-a", a, APP, "both", channel)  # this user also has a tab on the dying node
    connect(pusherjs, "both-b", b, APP, "both", channel)
    quota = RawClient.connect(b, APP_ONE["key"])  # the app's only allowed socket, on the dying node
    everyone = ["both", "obs-a", "obs-c", "v1", "v2"]
    for obs in (obs_a, obs_c):
        wait_until(lambda obs=obs: member_view(obs, channel) == set(everyone), timeout=10)
    assert user_ids(a, channel) == everyone
    assert sdk_for(a).channel_info(public, ["subscription_count"])["subscription_count"] == 3
    RawClient.open(a, APP_ONE["key"]).expect_error_then_close(4004)

    killed_at = time.monotonic()
    assert b.proc is not None
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(timeout=5)
    for obs in (obs_a, obs_c):
        for uid in ("v1", "v2"):
            wait_member_frame(obs, channel, "removed", uid, timeout=DEAD_NODE_BOUND + 6)
    elapsed = time.monotonic() - killed_at
    assert elapsed <= DEAD_NODE_BOUND + 2, f"members removed {elapsed:.1f}s after the kill (bound {DEAD_NODE_BOUND}s)"

    for uid in ("v1", "v2"):
        wait_member_frame(both_a, channel, "removed", uid)
    pusherjs.assert_no_event({"type": "message", "event": "pusher_internal:member_removed"}, within=DUPLICATE_WINDOW)
    for obs in (obs_a, obs_c, both_a):
        # one member_removed per user, and none for the user still connected on node A
        assert sorted(presence_frames(obs, channel, "removed")) == ["v1", "v2"], obs.name
    for obs in (obs_a, obs_c):
        assert member_view(obs, channel) == {"both", "obs-a", "obs-c"}
    for node in (a, c):
        assert user_ids(node, channel) == ["both", "obs-a", "obs-c"]
        info = sdk_for(node).channel_info(channel, ["user_count", "subscription_count"])
        assert info == {"occupied": True, "user_count": 3, "subscription_count": 3}
        assert sdk_for(node).channel_info(public, ["subscription_count"])["subscription_count"] == 2
    # the dead node's socket no longer counts against the app's quota
    admitted = wait_until(lambda: open_raw(a, APP_ONE["key"]), timeout=5, message="the quota to be freed")
    admitted.close()
    quota.close()
    assert tracebacks(a, c) == 0


def test_kill_9_under_traffic_clients_move_and_presence_converges(cluster, pusherjs) -> None:
    """The issue's fault: a node dies mid-traffic. Publishing through the survivors never stops,
    their subscribers get every message, the dead node's users come back through another node
    (as a load balancer would send them), and presence ends with each user exactly once."""
    a, b, c = cluster(3)
    room, news = "presence-kill-traffic", "kill-traffic"
    obs_a = connect(pusherjs, "kt-obs-a", a, APP, "kt-obs-a", room, news)
    obs_c = connect(pusherjs, "kt-obs-c", c, APP, "kt-obs-c", room, news)
    for uid in ("kt-v1", "kt-v2"):
        connect(pusherjs, f"{uid}-on-b", b, APP, uid, room, news)
    everyone = {"kt-obs-a", "kt-obs-c", "kt-v1", "kt-v2"}
    for obs in (obs_a, obs_c):
        wait_until(lambda obs=obs: member_view(obs, room) == everyone, timeout=10)

    published: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def publish() -> None:
        sdk = sdk_for(a)
        n = 0
        while not stop.is_set() and n < 5000:  # bounded
            try:
                sdk.trigger(news, "tick", {"n": n})
                published.append(n)
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                failures.append(repr(exc))
            n += 1
            stop.wait(0.02)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        wait_until(lambda: len(published) >= 20, timeout=10, message="traffic before the kill")
        assert b.proc is not None
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(timeout=5)
        moved = [connect(pusherjs, f"{uid}-on-c", c, APP, uid, room, news) for uid in ("kt-v1", "kt-v2")]
        # the dead node's sockets are cleaned up; the users stay, through their new sockets
        wait_until(lambda: all(user_ids(node, room) == sorted(everyone) for node in (a, c))
                   and sdk_for(a).channel_info(room, ["subscription_count"])["subscription_count"] == 4,
                   timeout=DEAD_NODE_BOUND + 10, interval=0.2, message="presence to converge without node B")
        for obs in (obs_a, obs_c):
            wait_until(lambda obs=obs: member_view(obs, room) == everyone, timeout=10)
        mark = len(published)
        wait_until(lambda: len(published) >= mark + 20, timeout=10, message="traffic after the kill")
    finally:
        stop.set()
        publisher.join(timeout=15)
    assert not failures, failures[:3]
    last = published[-1]
    for client in (obs_a, obs_c):
        wait_until(lambda client=client: any(d["n"] == last for d in received(client, news, "tick")), timeout=10,
                   message=f"{client.name} to receive the last tick")
        assert [d["n"] for d in received(client, news, "tick")] == published, client.name  # all, in order
    for client in moved:
        got = [d["n"] for d in received(client, news, "tick")]
        assert got and got == published[published.index(got[0]):], client.name  # from its join on, no gap
    assert tracebacks(a, c) == 0


# -- Redis failure ------------------------------------------------------------------------------


def test_redis_restart_mid_run_resumes_delivery_and_presence(cluster, pusherjs, own_redis: RedisServer) -> None:
    own_redis.start()
    a, b = cluster(2, env=node_env(own_redis.url))
    channel, public = "presence-cluster-restart", "cluster-restart"
    ua = connect(pusherjs, "ua", a, APP, "ua", channel, public)
    ub = connect(pusherjs, "ub", b, APP, "ub", channel, public)
    assert delivered_across(sdk_for(a), ub, public, timeout=5)
    assert user_ids(b, channel) == ["ua", "ub"]

    # outage: readiness fails, local delivery and the REST API keep working
    own_redis.stop()
    wait_until(lambda: up_status(a) == 503 and up_status(b) == 503, timeout=10, message="/up to report the outage")
    sdk_for(a).trigger(public, "local-during-outage", {})
    ua.wait_event(public, "local-during-outage")
    # only what this node knows by itself, and marked as such
    assert sdk_for(a).users_info(channel) == {"users": [{"id": "ua"}], "complete": False}
    assert sdk_for(a).channel_info(channel, ["user_count"]) == {
        "occupied": True, "user_count": 1, "user_count_complete": False, "subscription_count_complete": False}

    # a new, empty redis-server on the same port: everything resumes without restarting a node
    assert sdk_for(a).channel_info(public, ["subscription_count"]) == {
        "occupied": True, "subscription_count": 1, "subscription_count_complete": False}  # partial, and says so

    # a new, empty redis-server on the same port: everything resumes without restarting a node.
    # While the nodes find each other again, a count is right or flagged partial, never silently wrong.
    own_redis.start()
    wrong: list[str] = []
    wait_until(lambda: honest_count([a, b], public, 2, wrong), timeout=20, interval=0.05,
               message="complete cluster-wide counts again")
    assert not wrong, wrong
    wait_until(lambda: up_status(a) == 200 and up_status(b) == 200, timeout=20, message="/up to recover")
    wait_until(lambda: delivered_across(sdk_for(a), ub, public), timeout=20, message="A → B delivery to resume")
    wait_until(lambda: delivered_across(sdk_for(b), ua, public), timeout=20, message="B → A delivery to resume")
    for node in (a, b):
        wait_until(lambda node=node: user_ids(node, channel) == ["ua", "ub"], timeout=10,
                   message="presence to be registered again")

    # a quick restart (no pause in between) is noticed too
    own_redis.restart()
    wait_until(lambda: honest_count([a, b], public, 2, wrong), timeout=20, interval=0.05,
               message="complete counts after a quick restart")
    assert not wrong, wrong
    wait_until(lambda: delivered_across(sdk_for(b), ua, public), timeout=20, message="delivery after a quick restart")
    for node in (a, b):
        wait_until(lambda node=node: user_ids(node, channel) == ["ua", "ub"], timeout=10,
                   message="presence to be registered after a quick restart")

    # nobody left or joined as far as the clients are concerned
    assert presence_frames(ua, channel, "removed") == [] and presence_frames(ub, channel, "removed") == []
    assert member_view(ua, channel) == member_view(ub, channel) == {"ua", "ub"}
    assert tracebacks(a, b) == 0, a.log() + b.log()
    for node in (a, b):
        warnings = [line for line in node.log().splitlines() if "WARNING" in line or "ERROR" in line]
        assert len(warnings) <= 12, "\n".join(warnings)  # a few lines per outage, not a storm


@pytest.mark.slow
def test_leave_during_an_outage_that_keeps_redis_data_is_announced_once(cluster, pusherjs,
                                                                         own_redis: RedisServer) -> None:
    """Redis frozen (SIGSTOP: it keeps its data, unlike a restart) while a presence member on
    node B leaves: B announces the leave from its own state; when Redis comes back B's stale
    holding is released without announcing it a second time. Observers on both nodes see
    exactly one member_removed. A long node timeout keeps the freeze from looking like node
    death."""
    own_redis.start()
    a, b = cluster(2, env=node_env(own_redis.url, ADAPTER_NODE_TIMEOUT="30"))
    channel = "presence-cluster-pause"
    obs_a = connect(pusherjs, "obs-a", a, APP, "obs-a", channel)
    obs_b = connect(pusherjs, "obs-b", b, APP, "obs-b", channel)
    leaver = connect(pusherjs, "leaver", b, APP, "leaver", channel)
    everyone = {"leaver", "obs-a", "obs-b"}
    for obs in (obs_a, obs_b):
        wait_until(lambda obs=obs: member_view(obs, channel) == everyone, timeout=10)
    assert user_ids(a, channel) == sorted(everyone)

    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: up_status(a) == 503 and up_status(b) == 503, timeout=15, interval=0.1,
                   message="both nodes to notice the frozen Redis")
        leaver.disconnect()
        wait_member_frame(obs_b, channel, "removed", "leaver")  # B answers from its own state
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)

    wait_until(lambda: up_status(a) == 200 and up_status(b) == 200, timeout=20, interval=0.1,
               message="/up to recover")
    wait_member_frame(obs_a, channel, "removed", "leaver", timeout=10)  # B's queued announcement
    # An event published through B after its recovery travels behind anything B sent before it.
    sdk_for(b).trigger(channel, "after-recovery", {})
    for obs in (obs_a, obs_b):
        obs.wait_event(channel, "after-recovery")
    pusherjs.assert_no_event({"type": "message", "event": "pusher_internal:member_removed"}, within=DUPLICATE_WINDOW)
    for obs in (obs_a, obs_b):
        assert presence_frames(obs, channel, "removed") == ["leaver"], obs.name
        assert member_view(obs, channel) == {"obs-a", "obs-b"}
    for node in (a, b):
        wait_until(lambda node=node: user_ids(node, channel) == ["obs-a", "obs-b"], timeout=10,
                   message="the leaver to be gone from /users")
    assert tracebacks(a, b) == 0


@pytest.mark.slow
def test_redis_away_longer_than_the_node_timeout_is_not_mistaken_for_dead_nodes(
        cluster, pusherjs, own_redis: RedisServer) -> None:
    """Redis frozen (keeping its data) for longer than ``node_timeout``: when it answers again
    every node's last heartbeat in it is old. The first node back must not take its peers for
    dead — their users are still connected — so no member leaves and no one is re-added."""
    own_redis.start()
    a, b = cluster(2, env=node_env(own_redis.url))
    channel = "presence-cluster-long-freeze"
    obs_a = connect(pusherjs, "lf-obs-a", a, APP, "lf-obs-a", channel)
    obs_b = connect(pusherjs, "lf-obs-b", b, APP, "lf-obs-b", channel)
    everyone = {"lf-obs-a", "lf-obs-b"}
    for obs in (obs_a, obs_b):
        wait_until(lambda obs=obs: member_view(obs, channel) == everyone, timeout=10)
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: up_status(a) == 503 and up_status(b) == 503, timeout=15, interval=0.1,
                   message="both nodes to notice the frozen Redis")
        frozen_at = time.monotonic()
        wait_until(lambda: time.monotonic() - frozen_at > DEAD_NODE_BOUND + 1, timeout=DEAD_NODE_BOUND + 5,
                   interval=0.2, message="the freeze to outlast the node timeout")
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: up_status(a) == 200 and up_status(b) == 200, timeout=20, interval=0.1,
               message="/up to recover")
    # Long enough for any (wrong) dead-node cleanup to have run on either node.
    settled_at = time.monotonic()
    wait_until(lambda: time.monotonic() - settled_at > DEAD_NODE_BOUND + HEARTBEAT_INTERVAL, timeout=30,
               interval=0.2, message="a node timeout after the recovery")
    for obs in (obs_a, obs_b):
        assert presence_frames(obs, channel, "removed") == [], obs.name
        assert member_view(obs, channel) == everyone
    for node in (a, b):
        assert user_ids(node, channel) == sorted(everyone)
    assert delivered_across(sdk_for(a), obs_b, channel, timeout=5)
    assert tracebacks(a, b) == 0


def _hand_adapter(redis_server: RedisServer, node_id: str) -> tuple[RedisAdapter, RecordingListener]:
    """A Redis adapter in this process, connected by hand (its greenlets are not started)."""
    config = replace(Config(), adapter_driver="redis", redis_url=redis_server.url, heartbeat_interval=1.0,
                     node_timeout=30.0)
    adapter = RedisAdapter(config, Metrics(CollectorRegistry()), FakeRuntime(), node_id=node_id)
    transitions = RecordingListener()
    adapter.set_listener(transitions)
    adapter._heartbeat(resync=True)
    adapter.healthy = True
    return adapter, transitions


def _presence_socket(adapter: RedisAdapter, app: AppConfig, socket_id: str, channel: str, uid: str) -> None:
    conn = Connection(socket_id, app, RecordingTransport(), 7, 0.0)
    adapter.add_socket(app.id, conn)
    adapter.subscribe(app.id, channel, conn)
    adapter.add_user_socket(app.id, uid, conn)
    adapter.presence_join(app.id, channel, socket_id, uid, {"name": uid})


def test_leaves_announced_during_an_outage_are_not_announced_again_by_the_resync(redis_server) -> None:
    """The adapter's side of the test above, for every kind of holding: what this node released
    (and its handler announced) while Redis was unreachable is released silently once Redis is
    back with its data; a stale holding nobody announced is still announced."""
    app = AppConfig(id="1", key="k", secret="s")
    adapter, transitions = _hand_adapter(redis_server, "node-resync")
    _presence_socket(adapter, app, "1.1", "presence-x", "u1")
    adapter._resync()
    direct = redis.Redis(port=redis_server.port)
    assert direct.hkeys(adapter.keys.presence_info(app.id, "presence-x")) == [b"u1"]

    adapter.healthy = False  # Redis unreachable; it keeps its data
    assert adapter.presence_leave(app.id, "presence-x", "1.1", "u1") is True  # the handler announces
    assert adapter.unsubscribe(app.id, "presence-x", "1.1") == (0, True)
    assert adapter.remove_user_socket(app.id, "u1", "1.1") is True
    adapter.remove_socket(app.id, "1.1")
    assert adapter.presence_members_checked(app.id, "presence-x") == ({}, False)
    # a holding this node has in Redis but never announced (say, left over from before)
    stale = Holding(HOLD_PRESENCE, app.id, "presence-y", "u9")
    adapter._do_acquire(stale, adapter.node_id, "{}")

    adapter._recovered()  # Redis answers again
    assert transitions.calls == [("member_removed", "presence-y", "u9")]
    assert direct.smembers(adapter.keys.holdings(adapter.node_id)) == set()
    assert direct.hkeys(adapter.keys.presence_info(app.id, "presence-x")) == []
    assert adapter.presence_members_checked(app.id, "presence-x") == ({}, True)
    direct.close()


def test_presence_read_from_a_restarted_redis_is_partial_until_every_node_registers(redis_server) -> None:
    app = AppConfig(id="1", key="k", secret="s")
    one, _ = _hand_adapter(redis_server, "node-one")
    two, _ = _hand_adapter(redis_server, "node-two")
    _presence_socket(one, app, "1.1", "presence-x", "u1")
    _presence_socket(two, app, "2.1", "presence-x", "u2")
    one._heartbeat()
    assert one._peers == {"node-two"}
    assert one.presence_members_checked(app.id, "presence-x") == ({"u1": {"name": "u1"}, "u2": {"name": "u2"}}, True)

    direct = redis.Redis(port=redis_server.port)
    direct.flushall()  # Redis came back empty; node one re-registers first
    one._heartbeat(resync=True)
    assert one.presence_members_checked(app.id, "presence-x") == ({"u1": {"name": "u1"}}, False)
    registered_while_syncing: list[Any] = []
    resync = two._resync

    def watched_resync() -> None:
        registered_while_syncing.append(direct.zscore(two.keys.nodes, two.node_id))
        resync()

    two._resync = watched_resync  # type: ignore[method-assign]
    two._heartbeat(resync=True)
    assert registered_while_syncing == [None]  # a node is listed only once its holdings are written
    assert one.presence_members_checked(app.id, "presence-x") == ({"u1": {"name": "u1"}, "u2": {"name": "u2"}}, True)
    direct.close()


@pytest.mark.slow
def test_startup_with_redis_down_becomes_ready_once_redis_starts(cluster, pusherjs, own_redis: RedisServer) -> None:
    a, b = cluster(2, env=node_env(own_redis.url), formed=False)  # nothing listens on the port yet
    assert up_status(a) == 503 and up_status(b) == 503
    channel = "cluster-late-redis"
    sub = connect(pusherjs, "sub", b, APP, None, channel)  # local service works meanwhile

    own_redis.start()
    wait_formed([a, b], timeout=20)
    wait_until(lambda: delivered_across(sdk_for(a), sub, channel), timeout=10, message="A → B delivery")
    assert tracebacks(a, b) == 0


# -- several processes on one port --------------------------------------------------------------


def test_workers_share_one_port_and_see_each_others_events(server_factory, redis_server, pusherjs) -> None:
    metrics_port = free_port_pair()  # worker i serves its metrics on metrics.port + i
    node = server_factory([APP], env=node_env(redis_server.url, METRICS_PORT=str(metrics_port)),
                          extra_args=["--workers", "2"], shutdown_grace_period=GRACE)
    ports = (metrics_port, metrics_port + 1)
    try:
        wait_until(lambda: all(metric(metrics_at(p), "sockudo_cluster_nodes") == 2 for p in ports), timeout=20,
                   interval=0.1, message="both workers to join the cluster")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{node.log()}") from None
    wait_until(lambda: up_status(node) == 200, timeout=10)

    channel = "private-cluster-workers"
    clients: list[PusherJsClient] = []

    def spread() -> bool:
        return len(clients) >= 4 and all(metric(metrics_at(p), "sockudo_connected") > 0 for p in ports)

    while not spread():
        assert len(clients) < 30, "every connection landed on the same worker"
        clients.append(connect(pusherjs, f"w{len(clients)}", node, APP, None, channel))

    sdk = sdk_for(node)
    sdk.trigger(channel, "to-all", {"k": 1})
    assert clients[0].trigger(channel, "client-from-w0", {"k": 2})
    for client in clients:
        client.wait_event(channel, "to-all")
    for client in clients[1:]:
        client.wait_event(channel, "client-from-w0")
    pusherjs.assert_no_event(lambda e: e.get("type") == "event" and e.get("event") in ("to-all", "client-from-w0"),
                             within=DUPLICATE_WINDOW)
    for client in clients:
        assert len(received(client, channel, "to-all")) == 1
        assert len(received(client, channel, "client-from-w0")) == (0 if client is clients[0] else 1)
    # both workers answer the REST API with the cluster-wide count
    for _ in range(6):
        assert sdk.channel_info(channel, ["subscription_count"])["subscription_count"] == len(clients)


@pytest.mark.parametrize("how", ["--workers", "WEB_CONCURRENCY"])
def test_workers_without_redis_refuse_to_start(server_factory, how: str) -> None:
    env = {"REDIS_URL": "", "REDIS_SENTINELS": "", "ADAPTER_DRIVER": "", "WEB_CONCURRENCY": ""}
    extra: list[str] = []
    if how == "--workers":
        extra = ["--workers", "2"]
    else:
        env["WEB_CONCURRENCY"] = "2"
    node = server_factory([APP], start=False, env=env, extra_args=extra)
    node.start(wait=False)
    assert node.proc is not None
    code = node.proc.wait(timeout=20)
    assert code != 0
    assert "needs the Redis adapter" in node.log()


# -- Redis Sentinel -------------------------------------------------------------------------------


@pytest.mark.slow
def test_sentinel_failover_during_traffic(cluster, pusherjs) -> None:
    master = RedisServer().start()
    replica = RedisServer(["--replicaof", "127.0.0.1", str(master.port)]).start()
    sentinel = SentinelServer(master)
    stop_traffic = threading.Event()
    nodes: list[ServerProcess] = []
    try:
        replica_client = redis.Redis(port=replica.port, decode_responses=True)
        wait_until(lambda: replica_client.info("replication").get("master_link_status") == "up", timeout=10,
                   message="the replica to sync")
        sentinel.start()
        wait_until(lambda: sentinel.known_replicas() >= 1, timeout=15, interval=0.1,
                   message="the sentinel to discover the replica")

        env = node_env(None, REDIS_URL="", REDIS_SENTINELS=sentinel.address, REDIS_SENTINEL_MASTER="mymaster")
        nodes = cluster(2, env=env)
        a, b = nodes
        channel = "cluster-sentinel"
        sub = connect(pusherjs, "sub", b, APP, None, channel)
        assert delivered_across(sdk_for(a), sub, channel, timeout=5)

        sent = itertools.count()
        last_sent = [-1]

        def traffic() -> None:
            sdk = sdk_for(a)
            while not stop_traffic.is_set():
                n = next(sent)
                try:
                    sdk.trigger(channel, "tick", {"n": n})
                    last_sent[0] = n
                except Exception:
                    pass
                stop_traffic.wait(0.05)

        threading.Thread(target=traffic, daemon=True).start()
        wait_until(lambda: received(sub, channel, "tick"), timeout=5, message="traffic to flow")

        master.kill()
        wait_until(lambda: sentinel.master_port() == replica.port, timeout=20, interval=0.2,
                   message="the sentinel to promote the replica")
        promoted_at = last_sent[0]
        wait_until(lambda: any(d["n"] > promoted_at for d in received(sub, channel, "tick")), timeout=30,
                   interval=0.1, message="cross-node delivery on the new master")
        stop_traffic.set()
        wait_until(lambda: up_status(a) == 200 and up_status(b) == 200, timeout=10)
        assert delivered_across(sdk_for(b), connect(pusherjs, "sub-a", a, APP, None, channel), channel, timeout=5)
        assert tracebacks(a, b) == 0

        # with no Redis and no Sentinel left at all, a SIGTERM still ends within the grace period
        sentinel.stop()
        replica.stop()
        wait_until(lambda: up_status(a) == 503, timeout=15, message="/up to report the lost Redis")
        terminated_at = time.monotonic()
        a.signal(signal.SIGTERM)
        assert a.proc is not None
        assert a.proc.wait(timeout=GRACE + 10) == 0
        assert time.monotonic() - terminated_at < GRACE, a.log()
    finally:
        stop_traffic.set()
        for node in nodes:  # while their Redis is still there to say goodbye to
            node.stop()
        sentinel.stop()
        replica.stop()
        master.stop()


def test_sentinel_with_passwords_tls_off_and_a_database(server_factory, pusherjs) -> None:
    """Production Sentinel setups use passwords (the master's and the sentinels' own) and often a
    database other than 0: ``REDIS_PASSWORD``, ``REDIS_SENTINEL_PASSWORD``, ``REDIS_DB``."""
    master = RedisServer(password="master-pw-3f9").start()
    sentinel = SentinelServer(master, password="sentinel-pw-7c2").start()
    try:
        env = {"REDIS_SENTINELS": sentinel.address, "REDIS_SENTINEL_MASTER": "mymaster",
               "REDIS_PASSWORD": "master-pw-3f9", "REDIS_SENTINEL_PASSWORD": "sentinel-pw-7c2", "REDIS_DB": "5"}
        nodes = [server_factory([APP], start=False, env=env, shutdown_grace_period=GRACE) for _ in range(2)]
        start_all(nodes)
        wait_formed(nodes)
        wait_until(lambda: all(up_status(n) == 200 for n in nodes), timeout=20, message="both nodes ready")
        sub = connect(pusherjs, "sentinel-auth-sub", nodes[1], APP, None, "sentinel-auth")
        wait_until(lambda: delivered_across(sdk_for(nodes[0]), sub, "sentinel-auth"), timeout=10,
                   message="delivery across nodes through the password-protected master")
        data = redis.Redis(port=master.port, password="master-pw-3f9")
        assert data.info("keyspace").get("db5"), "the nodes did not use database 5"
        assert not data.info("keyspace").get("db0")
        for node in nodes:
            assert "master-pw-3f9" not in node.log() and "sentinel-pw-7c2" not in node.log()
    finally:
        sentinel.stop()
        master.stop()


# -- graceful shutdown ----------------------------------------------------------------------------


def test_sigterm_sends_4200_and_clients_move_to_the_surviving_node(cluster, pusherjs, redis_server) -> None:
    # A long node timeout: members leaving promptly can only be the graceful shutdown's doing.
    a, b = cluster(2, env=node_env(redis_server.url, ADAPTER_NODE_TIMEOUT="60"))
    channel = "presence-cluster-term"
    proxy = HealthRoutingProxy([b, a])  # prefers B while B is ready, like a load balancer
    try:
        obs = connect(pusherjs, "obs", a, APP, "obs", channel)
        mover = connect(pusherjs, "mover", proxy.port, APP, "mover", channel)
        stayer = connect(pusherjs, "stayer", b, APP, "stayer", channel)  # tied to B, cannot move
        assert proxy.routed == [b.port]
        wait_until(lambda: member_view(obs, channel) == {"obs", "mover", "stayer"}, timeout=10)
        mark = pusherjs.mark()

        terminated_at = time.monotonic()
        b.signal(signal.SIGTERM)
        for client in (mover, stayer):
            error = client.wait_message("pusher:error", since=mark)
            assert error["data"]["code"] == 4200, error
            client.wait_closed(4200, since=mark)
        # the stayer's membership ends with the shutdown, not after the dead-node timeout
        wait_member_frame(obs, channel, "removed", "stayer", timeout=10)
        assert time.monotonic() - terminated_at < 5
        assert b.proc is not None
        b.proc.wait(timeout=GRACE + 5)
        assert time.monotonic() - terminated_at < GRACE + 0.5  # the whole stop fits the grace period
        assert b.proc.returncode == 0, b.log()
        # the node said goodbye: the survivor stops asking it at once (no partial, slow answer)
        asked_at = time.monotonic()
        assert "subscription_count_complete" not in sdk_for(a).channel_info(channel, ["subscription_count"])
        assert time.monotonic() - asked_at < 1

        # pusher-js reconnects by itself (4200 = reconnect now) through the balancer to node A
        mover.wait_for(lambda e: e.get("type") == "connected" and e["_seq"] > mark, timeout=15,
                       desc="mover reconnected")
        mover.wait_for(lambda e: e.get("type") == "event" and e.get("channel") == channel
                       and e.get("event") == "pusher:subscription_succeeded" and e["_seq"] > mark, timeout=10)
        assert proxy.routed[-1] == a.port
        stayer.disconnect()

        # presence is consistent on the survivor, whatever order the leave and rejoin took
        wait_until(lambda: member_view(obs, channel) == {"obs", "mover"}, timeout=10,
                   message="the observer's member list")
        assert member_view(mover, channel) == {"obs", "mover"}
        assert user_ids(a, channel) == ["mover", "obs"]
        assert sdk_for(a).channel_info(channel, ["user_count", "subscription_count"]) == {
            "occupied": True, "user_count": 2, "subscription_count": 2}
        assert presence_frames(obs, channel, "removed").count("stayer") == 1
        assert tracebacks(a, b) == 0
    finally:
        proxy.close()


# -- interest routing: a node hears only what it has subscribers for ------------------------------

KEYS = Keys("sockudo_adapter:")  # the nodes' default adapter.redis.prefix


def envelopes(node: ServerProcess, kind: str = "channel") -> float:
    return metric(node.metrics_text(), "sockudo_adapter_received_envelopes_total", kind=kind)


def listeners(redis_server: RedisServer, channel: str) -> int:
    """How many nodes listen to ``channel``'s pub/sub channel (``PUBSUB NUMSUB``)."""
    client = redis.Redis(port=redis_server.port)
    try:
        return int(client.pubsub_numsub(KEYS.channel_topic(APP["id"], channel))[0][1])
    finally:
        client.close()


def test_a_node_without_subscribers_of_a_channel_receives_nothing_for_it(cluster, redis_server) -> None:
    a, b = cluster(2)
    channel = "routed-only-to-a"
    sub = RawClient.connect(a, APP["key"])
    try:
        sub.subscribe(channel)
        before_a, before_b = envelopes(a), envelopes(b)
        for n in range(20):  # through B, which has no subscriber of the channel
            sdk_for(b).trigger(channel, "news", {"n": n})
        for n in range(20, 25):  # and through A itself
            sdk_for(a).trigger(channel, "news", {"n": n})
        got = [json.loads(sub.expect("news", timeout=5)["data"])["n"] for _ in range(25)]
        assert got == list(range(25))  # each once, in order per publishing node
        assert envelopes(a) - before_a >= 20
        assert envelopes(b) == before_b  # B never heard of the channel: not even its own publishes
        assert listeners(redis_server, channel) == 1  # A alone listens
    finally:
        sub.close()


def test_two_publishers_on_two_nodes_reach_every_subscriber_once_and_in_order(cluster) -> None:
    a, b = cluster(2)
    channel = "routed-two-publishers"
    subs = [RawClient.connect(node, APP["key"]) for node in (a, a, b)]
    failures: list[str] = []
    try:
        for sub in subs:
            sub.subscribe(channel)

        def publish(node: ServerProcess, origin: str) -> None:
            sdk = sdk_for(node)
            for n in range(40):
                try:
                    sdk.trigger(channel, "news", {"origin": origin, "n": n})
                except Exception as exc:  # noqa: BLE001 - asserted below
                    failures.append(repr(exc))

        threads = [threading.Thread(target=publish, args=(node, name), daemon=True)
                   for node, name in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not failures, failures[:3]
        for sub in subs:
            got = [json.loads(sub.expect("news", timeout=5)["data"]) for _ in range(80)]
            for origin in ("a", "b"):
                assert [d["n"] for d in got if d["origin"] == origin] == list(range(40)), origin
            with pytest.raises(AssertionError):
                sub.expect("news", timeout=DUPLICATE_WINDOW)  # nothing twice
    finally:
        for sub in subs:
            sub.close()


def test_subscription_count_is_cluster_wide_right_after_a_node_starts(server_factory, redis_server) -> None:
    """No question to other nodes and no waiting for a heartbeat: node A counts node B's
    subscriber as soon as B is up, although A's heartbeat (5 s here) has not seen B yet."""
    env = node_env(redis_server.url, ADAPTER_HEARTBEAT_INTERVAL="5", ADAPTER_NODE_TIMEOUT="15")
    a = server_factory([APP], env=env, shutdown_grace_period=GRACE)
    wait_until(lambda: up_status(a) == 200, timeout=15, message="node A to be ready")
    channel = "routed-count"
    on_a = RawClient.connect(a, APP["key"])
    on_a.subscribe(channel)
    b = server_factory([APP], env=env, shutdown_grace_period=GRACE)
    wait_until(lambda: up_status(b) == 200, timeout=15, message="node B to be ready")
    on_b = RawClient.connect(b, APP["key"])
    try:
        on_b.subscribe(channel)
        counted_at = time.monotonic()
        for node in (a, b):
            wait_until(lambda node=node: sdk_for(node).channel_info(channel, ["subscription_count"]) == {
                "occupied": True, "subscription_count": 2}, timeout=1.0, interval=0.05,
                message=f"node {node.port} to count both subscribers")
            listed = sdk_for(node).channels_info(attributes=["subscription_count"])["channels"]
            assert listed[channel] == {"subscription_count": 2}, listed
        assert time.monotonic() - counted_at < 1.5
    finally:
        on_a.close()
        on_b.close()


def test_churn_leaves_the_node_subscribed_exactly_where_it_has_subscribers(cluster, redis_server) -> None:
    """Two sockets on A subscribe and unsubscribe five channels over and over without waiting;
    when they stop, A listens in Redis to exactly the channels it still has subscribers of, and a
    publish through B to each channel reaches exactly the sockets subscribed to it."""
    a, b = cluster(2)
    names = [f"routed-churn-{i}" for i in range(5)]
    s1, s2 = RawClient.connect(a, APP["key"]), RawClient.connect(a, APP["key"])
    try:
        for _ in range(15):
            for name in names:
                for sock in (s1, s2):
                    sock.send_json({"event": "pusher:subscribe", "data": {"channel": name}})
                    sock.send_json({"event": "pusher:unsubscribe", "data": {"channel": name}})
        finals = {s1: names[0:2], s2: names[1:3]}
        for sock, keep in finals.items():
            for name in keep:
                sock.send_json({"event": "pusher:subscribe", "data": {"channel": name}})
            sock.ping_pong(timeout=10)  # everything before it has been handled
        wanted = {names[0]: 1, names[1]: 1, names[2]: 1, names[3]: 0, names[4]: 0}
        wait_until(lambda: {n: listeners(redis_server, n) for n in names} == wanted,
                   timeout=5, interval=0.05, message="A's Redis subscriptions to settle on its subscribers")
        before = envelopes(a)
        for name in names:
            sdk_for(b).trigger(name, "after-churn", {"channel": name})
        for sock, keep in finals.items():
            got = []
            while True:
                try:
                    got.append(json.loads(sock.expect("after-churn", timeout=DUPLICATE_WINDOW * 2)["data"])["channel"])
                except AssertionError:
                    break
            assert sorted(got) == keep
        assert envelopes(a) - before == 3  # nothing for the two channels nobody on A holds
        for node in (a, b):
            counts = sdk_for(node).channels_info(attributes=["subscription_count"])["channels"]
            assert {n: v["subscription_count"] for n, v in counts.items() if n in names} == {
                names[0]: 1, names[1]: 2, names[2]: 1}
    finally:
        s1.close()
        s2.close()


def test_transitions_happen_once_across_nodes_and_leave_no_keys(redis_server) -> None:
    """Two adapters in this process over one Redis: the first subscriber cluster-wide makes the
    channel occupied, the last one vacates it, counts are the sum of both nodes, and once
    everyone left (or a dead node was cleaned up) no adapter key but the node set is left."""
    app = AppConfig(id="1", key="k", secret="s")
    one, transitions = _hand_adapter(redis_server, "node-one")
    two, _ = _hand_adapter(redis_server, "node-two")
    one._heartbeat()
    two._heartbeat()
    conns = {sid: Connection(sid, app, RecordingTransport(), 7, 0.0) for sid in ("1.1", "1.2", "2.1")}
    for sid, node in (("1.1", one), ("1.2", one), ("2.1", two)):
        node.add_socket(app.id, conns[sid])
    assert one.subscribe(app.id, "news", conns["1.1"]) == (1, True)
    assert one.subscribe(app.id, "news", conns["1.2"]) == (2, False)
    assert two.subscribe(app.id, "news", conns["2.1"]) == (1, False)
    one._flush_counts()  # the per-tick count batch (its greenlet is not running here)
    for node in (one, two):
        assert node.subscriber_count_checked(app.id, "news") == (3, True)
        assert node.channels_checked(app.id) == ({"news": 3}, True)
    assert two.unsubscribe(app.id, "news", "2.1") == (0, False)
    assert one.unsubscribe(app.id, "news", "1.1") == (1, False)
    assert one.unsubscribe(app.id, "news", "1.2") == (0, True)
    assert two.channels_checked(app.id) == ({}, True)

    # node two dies holding a channel and a presence member: node one releases them, once
    two.subscribe(app.id, "presence-x", conns["2.1"])
    two.add_user_socket(app.id, "u2", conns["2.1"])
    two.presence_join(app.id, "presence-x", "2.1", "u2", {"name": "u2"})
    assert one.presence_members_checked(app.id, "presence-x") == ({"u2": {"name": "u2"}}, True)
    one._release_all_holdings("node-two", notify=True)
    assert sorted(transitions.calls) == sorted([
        ("member_removed", "presence-x", "u2"), ("channel_vacated", "presence-x"), ("user_offline", "u2")])
    for sid, node in (("1.1", one), ("1.2", one)):
        node.remove_socket(app.id, sid)
    one._flush_counts()
    direct = redis.Redis(port=redis_server.port)
    left = sorted(k.decode() for k in direct.scan_iter(match="sockudo_adapter:*"))
    assert left == ["sockudo_adapter:nodes"], left
    assert direct.hgetall(one.keys.connections(app.id)) == {}
    direct.close()
