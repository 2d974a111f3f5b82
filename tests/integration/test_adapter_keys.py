"""The adapter's counts and transitions on a real Redis and on a real Redis Cluster.

Two adapters in this process share one store: occupied/vacated, presence first join / last
leave and online/offline happen once; counts sum both nodes; a dead node's share is released
by the other; afterwards nothing is left but the dead node's cleanup lock. On the cluster every script's keys share
one hash slot (the cluster refuses anything else), and no command the adapter sends may be one a
cluster pipeline refuses. Messages between nodes are not the subject here: the bus is a silent
stand-in (``test_bus.py`` and ``test_cluster.py`` cover the real one).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sockudo.adapter.redis import RedisAdapter
from sockudo.config import AppConfig, Config
from sockudo.core.connection import Connection
from sockudo.metrics.registry import Metrics
from tests.support.fakes import FakeRuntime, RecordingListener, RecordingTransport
from tests.support.procs import wait_until
from tests.support.rediscluster import STORE_BACKENDS, store_client

APP = AppConfig(id="1", key="k", secret="s")


class SilentBus:
    """A bus that carries nothing (this module tests what the adapter keeps in Redis)."""

    def publish(self, items: Sequence[tuple[str, str]]) -> None: ...
    def run(self, on_message: Any, on_connected: Any, stopping: Any) -> None: ...
    def set_interest(self, add: Collection[str], remove: Collection[str]) -> None: ...
    def wait_applied(self, timeout: float) -> bool:
        return True
    def close(self) -> None: ...


class ConfirmingBus(SilentBus):
    """A bus whose subscriptions Redis confirms only when the adapter waits for them."""

    def __init__(self) -> None:
        self.requested: set[str] = set()
        self.confirmed: set[str] = set()

    def set_interest(self, add: Collection[str], remove: Collection[str]) -> None:
        self.requested.update(add)
        self.requested.difference_update(remove)

    def wait_applied(self, timeout: float) -> bool:
        self.confirmed = set(self.requested)
        return True


def node(client: Any, node_id: str, bus: Any = None) -> tuple[RedisAdapter, RecordingListener]:
    config = replace(Config(), adapter_driver="redis", heartbeat_interval=1.0, node_timeout=30.0)
    adapter = RedisAdapter(config, Metrics(CollectorRegistry()), FakeRuntime(), node_id=node_id, client=client,
                           bus=bus or SilentBus())
    transitions = RecordingListener()
    adapter.set_listener(transitions)
    adapter._connected(True)  # what the bus calls once subscribed: resync, register, healthy
    return adapter, transitions


@pytest.mark.parametrize("kind", STORE_BACKENDS)
def test_transitions_once_counts_summed_and_a_dead_node_released(request: pytest.FixtureRequest, kind: str) -> None:
    client = store_client(request, kind)
    one, seen = node(client, "node-one")
    two, _ = node(client, "node-two")
    one._heartbeat()
    conns = {sid: Connection(sid, APP, RecordingTransport(), 7, 0.0) for sid in ("1.1", "1.2", "2.1")}
    for sid, adapter in (("1.1", one), ("1.2", one), ("2.1", two)):
        adapter.add_socket(APP.id, conns[sid])
    channels = [f"ch-{i}" for i in range(12)]  # spread over the cluster's slots
    for name in channels:
        assert one.subscribe(APP.id, name, conns["1.1"]) == (1, True)
        assert two.subscribe(APP.id, name, conns["2.1"]) == (1, False)
    assert one.subscribe(APP.id, "ch-0", conns["1.2"]) == (2, False)
    one._flush_counts()  # the per-tick batches (their greenlet is not running here)
    two._flush_counts()
    for adapter in (one, two):  # a per-tick batch spawned by the subscribe may still be on its way
        wait_until(lambda a=adapter: a.subscriber_count_checked(APP.id, "ch-0") == (3, True), timeout=5)
        assert adapter.channels_checked(APP.id) == ({name: 3 if name == "ch-0" else 2 for name in channels}, True)
        assert adapter.socket_count(APP.id) == 3

    assert two.presence_join(APP.id, "presence-x", "2.1", "u2", {"name": "u2"}) is True
    assert one.presence_join(APP.id, "presence-x", "1.1", "u2", {"name": "u2"}) is False  # same user
    assert two.add_user_socket(APP.id, "u2", conns["2.1"]) is True
    assert one.presence_members_checked(APP.id, "presence-x") == ({"u2": {"name": "u2"}}, True)
    assert one.user_online(APP.id, "u2") is True

    # node two dies: node one releases its share, announcing only what was two's alone
    one._cleanup_dead("node-two")
    assert sorted(seen.calls) == [("user_offline", "u2")]
    assert one.subscriber_count_checked(APP.id, "ch-1") == (1, True)
    assert one.presence_members_checked(APP.id, "presence-x") == ({"u2": {"name": "u2"}}, True)  # still on one

    for name in channels:
        assert one.unsubscribe(APP.id, name, "1.1") == ((1, False) if name == "ch-0" else (0, True))
    assert one.unsubscribe(APP.id, "ch-0", "1.2") == (0, True)
    assert one.presence_leave(APP.id, "presence-x", "1.1", "u2") is True
    assert one.channels_checked(APP.id) == ({}, True)
    for sid in ("1.1", "1.2"):
        one.remove_socket(APP.id, sid)
    one._flush_counts()
    one._leave(FakeRuntime().event())
    servers = [client] if kind == "redis" else [
        client.get_redis_connection(primary) for primary in client.get_primaries()]  # type: ignore[union-attr]
    keys = [k for server in servers for k in server.keys("sockudo_adapter:*")]
    left = sorted(k.decode() if isinstance(k, bytes) else k for k in keys)
    assert left == ["sockudo_adapter:node:node-two:cleanup"], left  # the cleanup lock (it expires)


def test_a_signed_in_user_is_listened_to_before_add_user_socket_returns(request: pytest.FixtureRequest) -> None:
    """The handler sends ``pusher:signin_success`` right after ``add_user_socket``: a
    ``#server-to-user-*`` event or ``terminate_connections`` published on another node after that
    must reach this node, so the user's pub/sub channel is confirmed by then, as a channel's is
    before ``subscription_succeeded``."""
    bus = ConfirmingBus()
    one, _ = node(store_client(request, "redis"), "node-one", bus)
    conn = Connection("1.1", APP, RecordingTransport(), 7, 0.0)
    one.add_socket(APP.id, conn)
    assert one.add_user_socket(APP.id, "u1", conn) is True
    assert one.keys.user_topic(APP.id, "u1") in bus.confirmed
    one.remove_user_socket(APP.id, "u1", "1.1")
    one.remove_socket(APP.id, "1.1")
    one._flush_counts()
    one._leave(FakeRuntime().event())


def test_a_node_taken_for_dead_while_paused_registers_its_shares_again(request: pytest.FixtureRequest) -> None:
    """A node frozen longer than ``node_timeout`` (SIGSTOP, a suspended VM, a blocked loop): a
    survivor releases its shares. When it runs again its sockets are still there, so its next
    heartbeat must put its shares back; else its subscribers and members stay invisible to every
    other node (counts, ``GET /channels``, member lists) until it restarts."""
    client = store_client(request, "redis")
    one, _ = node(client, "node-one")
    two, _ = node(client, "node-two")
    conn = Connection("2.1", APP, RecordingTransport(), 7, 0.0)
    two.add_socket(APP.id, conn)
    assert two.subscribe(APP.id, "presence-p", conn) == (1, True)
    assert two.presence_join(APP.id, "presence-p", "2.1", "u2", {"n": 2}) is True
    one._cleanup_dead("node-two")  # what a survivor does once node two's heartbeat is too old
    assert one.subscriber_count_checked(APP.id, "presence-p") == (0, True)
    two._heartbeat()  # node two runs again
    assert one.subscriber_count_checked(APP.id, "presence-p") == (1, True)
    assert one.presence_members_checked(APP.id, "presence-p") == ({"u2": {"n": 2}}, True)
    assert one.channels_checked(APP.id) == ({"presence-p": 1}, True)
    two.unsubscribe(APP.id, "presence-p", "2.1")
    two.presence_leave(APP.id, "presence-p", "2.1", "u2")
    two.remove_socket(APP.id, "2.1")
    for adapter in (one, two):
        adapter._flush_counts()
        adapter._leave(FakeRuntime().event())
    client.delete(one.keys.cleanup_lock("node-two"))


class _HookedClient:
    """The adapter's Redis client, running ``hook`` once just before the next SADD."""

    def __init__(self, real: Any, hook: Any) -> None:
        self.real, self.hook = real, hook

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def sadd(self, key: str, *members: Any) -> Any:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return self.real.sadd(key, *members)


def test_a_leave_while_the_resync_writes_the_shares_is_neither_undone_nor_announced_twice(
        request: pytest.FixtureRequest) -> None:
    """The resync (after an outage, or when local state moved during the last one) writes the
    shares it listed; a socket leaving meanwhile releases its share and announces the vacate.
    The resync must not put that share back: the channel would count a subscriber nobody has,
    and the next resync would release it again and announce ``channel_vacated`` a second time."""
    client = store_client(request, "redis")
    two, seen = node(client, "node-two")
    conn = Connection("2.1", APP, RecordingTransport(), 7, 0.0)
    two.add_socket(APP.id, conn)
    assert two.subscribe(APP.id, "raced", conn) == (1, True)
    left: list[tuple[int, bool]] = []

    def leave_meanwhile() -> None:  # the socket leaves while the resync is on its way to Redis
        thread = threading.Thread(target=lambda: left.append(two.unsubscribe(APP.id, "raced", "2.1")), daemon=True)
        thread.start()
        thread.join(timeout=1.0)  # done at once, or waiting for the resync's write of this share
        threads.append(thread)

    threads: list[threading.Thread] = []
    two.client = _HookedClient(client, leave_meanwhile)  # type: ignore[assignment]
    two._resync()
    threads[0].join(timeout=10)
    assert left == [(0, True)]  # the leave was announced by the unsubscribe itself
    assert client.hgetall(two.keys.subs(APP.id, "raced")) == {}
    two._resync()  # local state moved during the first one: the next beat looks again
    assert seen.calls == []
    two.remove_socket(APP.id, "2.1")
    two._flush_counts()
    two._leave(FakeRuntime().event())


def test_churn_during_an_outage_keeps_the_outage_bookkeeping_bounded(request: pytest.FixtureRequest) -> None:
    """While Redis is unreachable a client subscribing to and leaving fresh channels must not
    grow what the node remembers for the resync: a holding taken and given back during the
    outage never reached Redis, so there is nothing to release silently afterwards. What was
    held before the outage and released during it is still not announced again."""
    client = store_client(request, "redis")
    one, seen = node(client, "node-one")
    conn = Connection("1.1", APP, RecordingTransport(), 7, 0.0)
    one.add_socket(APP.id, conn)
    assert one.subscribe(APP.id, "before", conn) == (1, True)
    one.healthy = False  # Redis unreachable (what a failed call leaves behind)
    assert one.unsubscribe(APP.id, "before", "1.1") == (0, True)  # announced from this node's answer
    for i in range(2000):
        assert one.subscribe(APP.id, f"churn-{i}", conn) == (1, True)
        assert one.unsubscribe(APP.id, f"churn-{i}", "1.1") == (0, True)
    assert len(one._released_unsynced) <= 1
    one._connected(False)  # Redis back: the resync releases "before" without announcing it again
    assert seen.calls == []
    assert one.channels_checked(APP.id) == ({}, True)
    one.remove_socket(APP.id, "1.1")
    one._flush_counts()
    one._leave(FakeRuntime().event())
class CallFirst:
    """The adapter's Redis client, except that the first call of ``method`` runs ``before`` first:
    what another greenlet does while the resync waits on Redis at that point."""

    def __init__(self, client: Any, method: str, before: Any) -> None:
        self._client, self._method, self._before = client, method, before

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if name != self._method or self._before is None:
            return value
        before, self._before = self._before, None

        def call(*args: Any, **kwargs: Any) -> Any:
            before()
            return value(*args, **kwargs)

        return call


@pytest.mark.parametrize("kind", STORE_BACKENDS)
def test_a_leave_during_a_resync_is_announced_once_and_stays_left(request: pytest.FixtureRequest,
                                                                  kind: str) -> None:
    """The resync writes the state it read before waiting on Redis: a member who left meanwhile
    (the leave announced by its handler) must not be put back, then announced gone a second time
    by the next resync."""
    client = store_client(request, kind)
    one, seen = node(client, "node-one")
    conn = Connection("1.1", APP, RecordingTransport(), 7, 0.0)
    one.add_socket(APP.id, conn)
    one.subscribe(APP.id, "presence-r", conn)
    assert one.presence_join(APP.id, "presence-r", "1.1", "u1", {"name": "u1"}) is True
    left: list[bool] = []
    threads: list[threading.Thread] = []

    def leave_meanwhile() -> None:  # another greenlet's leave, while the resync is on its way to Redis
        thread = threading.Thread(
            target=lambda: left.append(one.presence_leave(APP.id, "presence-r", "1.1", "u1")), daemon=True)
        thread.start()
        thread.join(timeout=1.0)  # done at once, or waiting for the resync's write of this share
        threads.append(thread)

    # the leave lands while the resync writes its shares (its first SADD of the holdings set)
    one.client = CallFirst(client, "sadd", leave_meanwhile)  # type: ignore[assignment]
    one._resync()
    one.client = client
    threads[0].join(timeout=10)
    assert left == [True]  # the handler announces this leave
    assert one.presence_members_checked(APP.id, "presence-r") == ({}, True)
    one._resync()
    assert seen.calls == []  # and nobody else does


@pytest.mark.parametrize("kind", STORE_BACKENDS)
def test_a_join_during_a_resync_is_not_announced_gone(request: pytest.FixtureRequest, kind: str) -> None:
    """A member who joins while the resync reads the node's holdings is not taken for a stale
    holding: no member_removed, and the member stays listed."""
    client = store_client(request, kind)
    one, seen = node(client, "node-one")
    conn = Connection("1.1", APP, RecordingTransport(), 7, 0.0)
    one.add_socket(APP.id, conn)
    one.subscribe(APP.id, "presence-j", conn)
    joined: list[bool] = []
    one.client = CallFirst(client, "smembers",  # type: ignore[assignment]
                           lambda: joined.append(one.presence_join(APP.id, "presence-j", "1.1", "u2", {"name": "u2"})))
    one._resync()
    one.client = client
    assert joined == [True]  # the handler announces this join
    assert seen.calls == []
    assert one.presence_members_checked(APP.id, "presence-j") == ({"u2": {"name": "u2"}}, True)
    one._resync()
    assert seen.calls == []
    assert one.presence_members_checked(APP.id, "presence-j") == ({"u2": {"name": "u2"}}, True)
