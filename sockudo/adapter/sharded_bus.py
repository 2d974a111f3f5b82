"""The Redis Cluster driver of the message bus: sharded pub/sub (SPUBLISH / SSUBSCRIBE, Redis 7).

A shard channel lives in the hash slot of its name, like a key, and only the shard owning that
slot carries its messages. So:

- **publish** groups the items by the master owning each channel's slot (from the client's slot
  map) and sends one pipeline per master: one round trip per master per batch. A master that
  cannot be reached does not hold up the others; its items are counted in ``PublishFailed``.
- **listening** uses one pub/sub connection, and one listener (a greenlet from the injected
  runtime), per master owning a slot with interest. The listener alone reads and writes its
  connection: ``set_interest`` changes the listener's wanted set and wakes it (through a socket
  pair, so a listener blocked on its connection wakes at once); the listener sends the
  difference as SSUBSCRIBE / SUNSUBSCRIBE commands, one per slot (a command naming channels of
  two slots fails with CROSSSLOT), followed by a PING whose reply marks everything before it as
  acknowledged (``wait_applied``). The PING doubles as the health check of a silent connection.
- **failover and resharding**: a lost connection, a ``sunsubscribe`` pushed by the server (the
  slot left that master) or a MOVED reply to SSUBSCRIBE make the ``run`` loop refresh the slot
  map (CLUSTER SLOTS, with backoff) and move only the affected slots to their new owner. A
  channel is never subscribed on two connections at once (a shard delivers its messages on
  replicas too, so an old master demoted in place would otherwise deliver them twice): the new
  owner subscribes a slot only after the old connection released it (unsubscribed, pushed out,
  or closed). Messages published while a slot has no subscription are lost (pub/sub is
  at-most-once); ``on_connected(False)`` tells the adapter so, and clients catch up from history.

See https://redis.io/docs/latest/develop/interact/pubsub/#sharded-pubsub. Nothing here imports
gevent: blocking calls yield under the server's monkey-patching, and the tests run listeners on
threads (the shared state is guarded by a lock that is never held across I/O).
"""

from __future__ import annotations

import logging
import random
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError, MovedError, RedisClusterException, RedisError, ResponseError

if TYPE_CHECKING:
    from sockudo.services import Runtime

logger = logging.getLogger(__name__)

#: What a lost or unreachable master raises.
FAILURES = (RedisError, OSError)
#: A refresh of the slot map can also fail with the cluster client's own errors.
REFRESH_FAILURES = (RedisError, RedisClusterException, OSError)

#: Reconnect backoff: from MIN, doubling, up to MAX seconds (with jitter).
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
#: Slot-map refreshes back off the same way, up to this (one CLUSTER SLOTS a second at most).
REFRESH_MAX_S = 1.0
#: After a master timed out a publish, its items are dropped at once for this long (or until its
#: listener hears from it again), so that a hung master does not hold up every batch.
PUBLISH_HOLD_S = 5.0
#: How often the ``run`` loop wakes with nothing to do (it wakes at once on any change).
TICK_S = 0.25
#: While a master stays unreachable, one failed attempt in this many is logged as a warning.
LOG_EVERY = 30
#: A listener reading a burst lets the other greenlets run at least this often.
FAIR_SLICE_S = 0.01


class PublishFailed(RedisError):
    """Some items of a publish batch could not be handed to their master; ``dropped`` says how many."""

    def __init__(self, message: str, dropped: int) -> None:
        super().__init__(message)
        self.dropped = dropped


@dataclass
class ShardedBusStats:
    """Counters the adapter can export (the bus does not own a metrics registry)."""

    #: Pub/sub connections to a master lost (closed, reset, or silent past the ping timeout).
    connection_losses: int = 0
    #: Slot-map refreshes (CLUSTER SLOTS) after a failure, a MOVED reply or a pushed sunsubscribe.
    slot_refreshes: int = 0
    #: Slots whose subscriptions moved to another master after a refresh.
    slots_moved: int = 0
    #: Channels subscribed again because their slot moved or their connection was lost.
    resubscribed: int = 0
    #: ``sunsubscribe`` messages pushed by the server (a slot migrated away from its master).
    pushed_unsubscribes: int = 0


@dataclass
class _Pending:
    """A command sent on a listener's connection whose replies are still to be read."""

    kind: bytes  # b"ssubscribe", b"sunsubscribe" or b"ping"
    remaining: set[str]
    slot: int
    gen: int


class _Listener:
    """One master's pub/sub connection and the greenlet that alone reads and writes it.

    ``want``: the channels the bus wants subscribed here (changed by the bus, under its lock).
    ``expect``: what the connection will be subscribed to once every command sent is processed.
    ``have``: what the server confirmed. ``requested`` / ``applied``: generations for
    ``wait_applied`` (a change bumps ``requested``; a PING reply sets ``applied``)."""

    def __init__(self, bus: ShardedBus, name: str) -> None:
        self.bus = bus
        self.name = name
        self.want: set[str] = set()
        self.expect: set[str] = set()
        self.have: set[str] = set()
        self.inflight: deque[_Pending] = deque()
        self.requested = 1  # a new listener has its first subscription to make
        self.applied = 0
        self.sent_gen = 0
        #: ``requested`` when channels last moved here from another master: ``wait_applied`` waits for them
        self.moved_gen = 0
        self.connected = False
        self.started = False
        self.retired = False
        self.was_connected = False
        self.conn: redis.Connection | None = None
        self.last_ping = 0.0
        self.ping_outstanding_since: float | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poked = False

    # -- called by the bus, any greenlet ------------------------------------------------

    def poke(self) -> None:
        """Wake the listener if it is waiting on its connection."""
        if not self._poked:
            self._poked = True
            try:
                self._wake_w.send(b"x")
            except OSError:  # full (a wake-up is pending anyway) or closed (the listener is gone)
                pass

    def discard(self) -> None:
        """Release a listener that never ran (the bus closed before ``run``)."""
        self._wake_r.close()
        self._wake_w.close()

    # -- the listener's own loop ---------------------------------------------------------

    def run(self) -> None:
        bus = self.bus
        backoff = BACKOFF_MIN_S
        failures = 0  # connection attempts failed in a row
        try:
            while True:
                with bus._lock:
                    if bus._closed or (not self.want and not self.expect and not self.have and not self.inflight):
                        self._retire()
                        return
                if self.conn is None:
                    try:
                        self._connect()
                    except FAILURES as exc:
                        failures += 1
                        log = logger.warning if failures == 1 or failures % LOG_EVERY == 0 else logger.debug
                        log("cannot reach a cluster master for pub/sub; retrying",
                            extra={"node": self.name, "error": str(exc), "attempts": failures})
                        bus._request_refresh()
                        bus.runtime.sleep(backoff * random.uniform(0.8, 1.2))
                        backoff = min(backoff * 2, BACKOFF_MAX_S)
                        continue
                failures = 0
                try:
                    self._sync()
                    self._read(TICK_S)
                    if self.applied >= self.sent_gen and self.connected:
                        backoff = BACKOFF_MIN_S
                except FAILURES as exc:
                    self._lost(exc)
                    bus.runtime.sleep(backoff * random.uniform(0.8, 1.2))
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                except Exception as exc:  # a bug here must not end this master's delivery: start over
                    logger.exception("error in a cluster pub/sub listener", extra={"node": self.name})
                    self._lost(exc)
                    bus.runtime.sleep(backoff * random.uniform(0.8, 1.2))
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            self._close_conn()
            self._wake_r.close()
            self._wake_w.close()

    def _retire(self) -> None:
        """Called under the bus lock: nothing wanted or held here any more."""
        self.retired = True
        if self.bus._listeners.get(self.name) is self:
            del self.bus._listeners[self.name]
        self.bus._wake.set()

    def _connect(self) -> None:
        conn = self.bus._connection_for(self.name)
        conn.connect()
        self.conn = conn
        with self.bus._lock:
            self.have.clear()
            self.expect.clear()
            self.inflight.clear()
            self.connected = True
            resubscribing = len(self.want) if self.was_connected else 0
            self.was_connected = True
        if resubscribing:
            self.bus.stats.resubscribed += resubscribing
            logger.info("pub/sub connection to a cluster master re-established; resubscribing",
                        extra={"node": self.name, "channels": resubscribing})
            # A master that hung and came back may now be a replica of its shard (a replica still
            # delivers the shard's messages, but the slots belong to the promoted node): look again.
            self.bus._request_refresh()
        self.last_ping = time.monotonic()
        self.ping_outstanding_since = None

    def _close_conn(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.disconnect()
            except OSError:
                pass

    def _lost(self, exc: BaseException) -> None:
        bus = self.bus
        self._close_conn()
        with bus._lock:
            self.connected = False
            self.have.clear()
            self.expect.clear()
            self.inflight.clear()
            self.requested += 1  # everything wanted here must be subscribed again
            bus._degraded = True
            bus.stats.connection_losses += 1
            bus._check_released(self)
        if not bus._closed:
            logger.warning("lost the pub/sub connection to a cluster master; refreshing the slot map",
                           extra={"node": self.name, "error": str(exc)})
        bus._request_refresh()

    def _sync(self) -> None:
        """Send what differs between ``want`` and ``expect``, then a PING barrier."""
        bus = self.bus
        conn = self.conn
        assert conn is not None
        with bus._lock:
            gen = self.requested
            to_sub = self.want - self.expect
            to_unsub = self.expect - self.want
            if not to_sub and not to_unsub and gen == self.sent_gen:
                return
            self.expect |= to_sub
            self.expect -= to_unsub
            self.sent_gen = gen
            commands: list[tuple[Any, ...]] = []
            for kind, channels in ((b"ssubscribe", to_sub), (b"sunsubscribe", to_unsub)):
                by_slot: dict[int, list[str]] = {}
                for channel in channels:
                    by_slot.setdefault(bus._slot(channel), []).append(channel)
                for slot, names in by_slot.items():
                    self.inflight.append(_Pending(kind, set(names), slot, gen))
                    commands.append((kind.decode().upper(), *names))
            self.inflight.append(_Pending(b"ping", set(), -1, gen))
            commands.append(("PING",))
        if self.ping_outstanding_since is None:
            self.ping_outstanding_since = time.monotonic()
        self.last_ping = time.monotonic()
        conn.send_packed_command(conn.pack_commands(commands), check_health=False)

    def _read(self, wait: float) -> None:
        """Handle every reply already received, then wait up to ``wait`` for more or a poke."""
        conn = self.conn
        assert conn is not None
        self._drain(conn)
        sock = getattr(conn, "_sock", None)  # redis-py exposes no public accessor for the socket
        if sock is None:
            raise redis.ConnectionError("pub/sub connection closed")
        readable, _, _ = select.select([sock, self._wake_r], [], [], wait)
        if self._wake_r in readable:
            self._poked = False
            try:
                while self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
        if sock in readable:
            self._drain(conn)
        self._health(conn)

    def _drain(self, conn: redis.Connection) -> None:
        # Reading bytes already received never yields to the other greenlets: do it now and then
        # (as the server's FairSlice does for sockets), so a flood on one shard holds nobody up.
        last_yield = time.monotonic()
        while conn.can_read(timeout=0):
            now = time.monotonic()
            if now - last_yield >= FAIR_SLICE_S:
                self.bus.runtime.sleep(0.0001)
                last_yield = now
            try:
                reply = conn.read_response(disconnect_on_error=True)
            except ResponseError as err:  # an error reply to the oldest command in flight
                self._command_failed(err)
                continue
            self._handle(reply)

    def _health(self, conn: redis.Connection) -> None:
        """A PING every ``ping_interval`` when idle; no reply within ``ping_timeout``: the master
        is gone silent (a hung host, a network partition), so the connection is given up."""
        now = time.monotonic()
        bus = self.bus
        if self.ping_outstanding_since is not None:
            if now - self.ping_outstanding_since > bus.ping_timeout:
                raise redis.TimeoutError(f"no reply to PING within {bus.ping_timeout} s")
            return
        if now - self.last_ping >= bus.ping_interval:
            with bus._lock:
                self.inflight.append(_Pending(b"ping", set(), -1, self.sent_gen))
            self.ping_outstanding_since = now
            self.last_ping = now
            conn.send_command("PING", check_health=False)

    def _handle(self, reply: Any) -> None:
        bus = self.bus
        if isinstance(reply, bytes) and reply.upper() == b"PONG":  # PING outside subscribed mode
            reply = [b"pong", b""]
        if not isinstance(reply, list) or not reply:
            raise redis.ConnectionError(f"unexpected pub/sub reply type {type(reply).__name__}")
        kind = reply[0].lower() if isinstance(reply[0], bytes) else b""
        if kind == b"smessage":
            channel = reply[1].decode()
            if channel in bus._interest:  # a channel just dropped may still deliver until its SUNSUBSCRIBE
                bus._deliver(channel, reply[2])
            return
        head = self.inflight[0] if self.inflight else None
        if kind == b"pong":
            if head is None or head.kind != b"ping":
                raise redis.ConnectionError("PING reply out of order on a pub/sub connection")
            self.inflight.popleft()
            self.ping_outstanding_since = None
            bus._publish_hold.pop(self.name, None)  # it answers again: publish to it again
            with bus._lock:
                self.applied = max(self.applied, head.gen)
                bus._notify()
            return
        channel = reply[1].decode()
        if kind == b"ssubscribe":
            if head is None or head.kind != kind or channel not in head.remaining:
                raise redis.ConnectionError("SSUBSCRIBE confirmation out of order on a pub/sub connection")
            head.remaining.discard(channel)
            if not head.remaining:
                self.inflight.popleft()
            with bus._lock:
                self.have.add(channel)  # until its SUNSUBSCRIBE is confirmed, should one be in flight
            return
        if kind == b"sunsubscribe":
            if head is not None and head.kind == kind and channel in head.remaining:
                head.remaining.discard(channel)
                if not head.remaining:
                    self.inflight.popleft()
                with bus._lock:
                    self.have.discard(channel)
                    bus._check_released(self)
                return
            # Not a reply: the server dropped the subscription because the slot left this master.
            with bus._lock:
                bus.stats.pushed_unsubscribes += 1
                slot = bus._slot(channel)
                self.have.discard(channel)
                self.expect.discard(channel)
                bus._slot_gone(slot, self, pushed=True)
            return
        raise redis.ConnectionError("unexpected pub/sub reply on a cluster connection")

    def _command_failed(self, err: ResponseError) -> None:
        bus = self.bus
        if isinstance(err, AskError) and (not self.inflight or self.inflight[0].slot != err.slot_id):
            # The MOVED answer to a SUNSUBSCRIBE whose channel the server had pushed out just
            # before: that push was taken for the command's reply already. Nothing to do.
            return
        if not self.inflight:
            raise redis.ConnectionError(f"error reply with no command in flight: {err}")
        head = self.inflight.popleft()
        with bus._lock:
            if head.kind == b"ssubscribe":
                self.expect -= head.remaining
                moved = isinstance(err, MovedError)
                logger.info("shard subscribe refused; refreshing the slot map",
                            extra={"node": self.name, "slot": head.slot, "moved": moved,
                                   "error": type(err).__name__})
                bus._slot_gone(head.slot, self, pushed=False)
            elif head.kind == b"sunsubscribe":  # the slot is not served here: nothing is subscribed
                self.have -= head.remaining
                bus._check_released(self)
            else:
                self.ping_outstanding_since = None
                self.applied = max(self.applied, head.gen)
                bus._notify()


class ShardedBus:
    """The ``Bus`` on a Redis Cluster: SPUBLISH pipelined per master, one SSUBSCRIBE listener per
    master owning a slot with interest, restored after failover or resharding.

    ``client``: the process's ``RedisCluster`` (its slot map and node connections are shared).
    ``runtime``: spawns the listeners and sleeps (gevent in the server, threads in tests).
    ``ping_interval`` / ``ping_timeout``: the health check of an idle pub/sub connection; a master
    that does not answer within ``ping_timeout`` is treated as lost."""

    def __init__(self, client: RedisCluster, runtime: Runtime, *, ping_interval: float = 1.0,
                 ping_timeout: float = 3.0) -> None:
        self.client = client
        self.runtime = runtime
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.stats = ShardedBusStats()
        self._lock = threading.Lock()
        self._wake = runtime.event()
        self._interest: set[str] = set()
        self._slot_of: dict[str, int] = {}
        self._by_slot: dict[int, set[str]] = {}
        #: slot -> name of the master whose listener should hold it (None: waiting for a refresh)
        self._assign: dict[int, str | None] = {}
        #: slot -> the listener that still has to unsubscribe it before its new owner subscribes
        self._releasing: dict[int, _Listener] = {}
        #: slots with interest whose owner is unknown until the next refresh
        self._unassigned: set[int] = set()
        #: unassigned slot -> the master that refused or dropped it (to count a move)
        self._dropped_by: dict[int, str] = {}
        self._listeners: dict[str, _Listener] = {}
        self._waiters: list[tuple[dict[str, int], Any]] = []
        self._running = False
        self._closed = False
        self._degraded = False
        self._refresh_wanted = False
        self._refresh_delay = BACKOFF_MIN_S
        self._next_refresh = 0.0
        self._refresh_failures = 0  # in a row
        self._on_message: Callable[[str, bytes], None] | None = None
        #: master name -> until when publish skips it (it timed out; see PUBLISH_HOLD_S)
        self._publish_hold: dict[str, float] = {}

    # -- publish ----------------------------------------------------------------------------

    def publish(self, items: Sequence[tuple[str, str]]) -> None:
        """SPUBLISH each item, pipelined per master owning its slot. Raises ``PublishFailed``
        (a ``RedisError``) naming how many items did not reach Redis; the others went out."""
        groups: dict[str, list[tuple[str, str]]] = {}
        dropped = 0
        first_error: BaseException | None = None
        manager = self.client.nodes_manager
        for channel, payload in items:
            try:
                node = manager.get_node_from_slot(self.client.keyslot(channel))
            except REFRESH_FAILURES as exc:  # the slot is not covered (a master is down, no failover yet)
                dropped += 1
                first_error = first_error or exc
                continue
            groups.setdefault(node.name, []).append((channel, payload))
        redirected: list[tuple[str, str]] = []
        now = time.monotonic()
        for name, group in groups.items():
            node = self.client.get_node(node_name=name)
            try:
                if node is None:
                    raise redis.ConnectionError("master left the slot map")
                if self._publish_hold.get(name, 0.0) > now:
                    raise redis.TimeoutError("master timed out a moment ago")
                pipe = self.client.get_redis_connection(node).pipeline(transaction=False)
                for channel, payload in group:
                    pipe.execute_command("SPUBLISH", channel, payload)
                results = pipe.execute(raise_on_error=False)
            except FAILURES as exc:
                dropped += len(group)
                first_error = first_error or exc
                if isinstance(exc, redis.TimeoutError | TimeoutError) and self._publish_hold.get(name, 0.0) <= now:
                    if name not in self._publish_hold:
                        logger.warning("a cluster master timed out a publish; skipping it for a while",
                                       extra={"node": name, "hold_s": PUBLISH_HOLD_S})
                    self._publish_hold[name] = now + PUBLISH_HOLD_S
                self._request_refresh()
                continue
            self._publish_hold.pop(name, None)
            for item, result in zip(group, results, strict=True):
                if isinstance(result, MovedError):
                    redirected.append(item)
                elif isinstance(result, Exception):
                    dropped += 1
                    first_error = first_error or result
        for channel, payload in redirected:  # the slot moved: the cluster client follows MOVED
            try:
                self.client.execute_command("SPUBLISH", channel, payload)
            except REFRESH_FAILURES as exc:
                dropped += 1
                first_error = first_error or exc
        if redirected:
            self._request_refresh()
        if dropped:
            raise PublishFailed(f"{dropped} of {len(items)} messages not published: {first_error}", dropped)

    # -- interest -------------------------------------------------------------------------

    def set_interest(self, add: Collection[str], remove: Collection[str]) -> None:
        touched: set[_Listener] = set()
        with self._lock:
            for channel in add:
                if channel in self._interest:
                    continue
                slot = self.client.keyslot(channel)
                self._interest.add(channel)
                self._slot_of[channel] = slot
                self._by_slot.setdefault(slot, set()).add(channel)
                if slot not in self._assign:
                    self._place(slot, self._owner(slot))
                owner = self._assign[slot]
                if owner is not None and slot not in self._releasing:
                    listener = self._listener(owner)
                    listener.want.add(channel)
                    touched.add(listener)
            for channel in remove:
                if channel not in self._interest:
                    continue
                self._interest.discard(channel)
                slot = self._slot_of.pop(channel)
                channels = self._by_slot[slot]
                channels.discard(channel)
                owner = self._assign.get(slot)
                if not channels:
                    del self._by_slot[slot]
                    del self._assign[slot]
                    self._unassigned.discard(slot)
                    self._dropped_by.pop(slot, None)
                if owner is not None and owner in self._listeners:
                    listener = self._listeners[owner]
                    listener.want.discard(channel)
                    touched.add(listener)
            for listener in touched:
                listener.requested += 1
        for listener in touched:
            listener.poke()
        self._wake.set()

    def wait_applied(self, timeout: float) -> bool:
        with self._lock:
            target = {name: listener.requested for name, listener in self._listeners.items()}
            if self._satisfied(target):
                return True
            event = self.runtime.event()
            waiter = (target, event)
            self._waiters.append(waiter)
        try:
            event.wait(timeout)
        finally:
            with self._lock:
                self._waiters.remove(waiter)
                done = self._satisfied(target)
        return done

    # -- the loop the adapter runs ----------------------------------------------------------

    def run(self, on_message: Callable[[str, bytes], None], on_connected: Callable[[bool], None],
            stopping: Callable[[], bool]) -> None:
        self._on_message = on_message
        with self._lock:
            self._running = True
            for listener in self._listeners.values():
                self._start(listener)
        first = True
        try:
            while not stopping() and not self._closed:
                self._wake.wait(TICK_S)
                self._wake.clear()
                if self._refresh_wanted and time.monotonic() >= self._next_refresh:
                    self._refresh()
                if self._settled():
                    self._refresh_delay = BACKOFF_MIN_S
                    if first or self._degraded:
                        self._degraded = False
                        if not first:
                            logger.info("cluster pub/sub restored on every master",
                                        extra={"masters": len(self._listeners)})
                        try:
                            on_connected(first)
                        except Exception:  # the adapter's bug must not end cross-node delivery
                            logger.exception("error in the bus's on_connected callback")
                        first = False
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            listeners = list(self._listeners.values())
            for _, event in self._waiters:
                event.set()
        for listener in listeners:
            if listener.started:
                listener.poke()  # it closes its connection and ends
            else:
                listener.discard()
        self._wake.set()

    # -- internals (callers hold self._lock unless said otherwise) ------------------------------

    def _slot(self, channel: str) -> int:
        slot = self._slot_of.get(channel)
        return slot if slot is not None else self.client.keyslot(channel)

    def _owner(self, slot: int) -> str | None:
        try:
            return str(self.client.nodes_manager.get_node_from_slot(slot).name)
        except REFRESH_FAILURES:
            self._refresh_wanted = True
            return None

    def _place(self, slot: int, owner: str | None) -> None:
        self._assign[slot] = owner
        if owner is None:
            self._unassigned.add(slot)
        else:
            self._unassigned.discard(slot)

    def _listener(self, name: str) -> _Listener:
        listener = self._listeners.get(name)
        if listener is None:
            listener = _Listener(self, name)
            self._listeners[name] = listener
            if self._running:
                self._start(listener)
        return listener

    def _start(self, listener: _Listener) -> None:
        if not listener.started and not self._closed:
            listener.started = True
            self.runtime.spawn(listener.run)

    def _connection_for(self, name: str) -> redis.Connection:
        """A connection of its own to master ``name``, with the cluster client's settings (TLS,
        password, timeouts) but RESP2 (messages arrive as plain replies), bytes, and no health
        check of redis-py's (it would read a PING reply the listener must see)."""
        node = self.client.get_node(node_name=name)
        if node is None:
            raise redis.ConnectionError("master left the slot map")
        pool = self.client.get_redis_connection(node).connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs.update(protocol=2, decode_responses=False, health_check_interval=0)
        # redis-py's maintenance notifications (server push messages) need RESP3; not for this connection
        kwargs.pop("maint_notifications_config", None)
        kwargs.pop("oss_cluster_maint_notifications_handler", None)
        if kwargs.get("socket_timeout") is None:
            kwargs["socket_timeout"] = 5.0
        conn: redis.Connection = pool.connection_class(**kwargs)
        return conn

    def _deliver(self, channel: str, data: bytes) -> None:
        """Called by a listener, without the lock."""
        assert self._on_message is not None
        try:
            self._on_message(channel, data)
        except Exception:  # a bug in dispatch must not end cross-node delivery
            logger.exception("error in the bus's on_message callback")

    def _request_refresh(self) -> None:
        """Any greenlet: ask the ``run`` loop for a slot-map refresh (coalesced, with backoff)."""
        self._refresh_wanted = True
        self._wake.set()

    def _refresh(self) -> None:
        """In the ``run`` loop, without the lock: CLUSTER SLOTS, then move the slots that changed owner."""
        self._refresh_wanted = False
        self._next_refresh = time.monotonic() + self._refresh_delay * random.uniform(0.8, 1.2)
        self._refresh_delay = min(self._refresh_delay * 2, REFRESH_MAX_S)
        self.stats.slot_refreshes += 1
        try:
            self.client.nodes_manager.initialize()
        except REFRESH_FAILURES as exc:
            self._refresh_failures += 1
            log = logger.warning if self._refresh_failures % LOG_EVERY == 1 else logger.debug
            log("cannot refresh the cluster slot map; retrying",
                extra={"error": str(exc), "attempts": self._refresh_failures})
            self._refresh_wanted = True
            return
        self._refresh_failures = 0
        touched: set[_Listener] = set()
        moved = 0
        with self._lock:
            for slot, channels in self._by_slot.items():
                owner = self._owner(slot)
                current = self._assign.get(slot)
                if owner == current:
                    continue
                dropped_by = self._dropped_by.pop(slot, None) if owner is not None else None
                if dropped_by is not None and dropped_by != owner:
                    moved += 1
                if current is not None:
                    moved += 1
                    old = self._listeners.get(current)
                    if old is not None:
                        old.want -= channels
                        touched.add(old)
                        if slot not in self._releasing and self._holds(old, slot):
                            self._releasing[slot] = old
                self._place(slot, owner)
                if owner is not None and slot not in self._releasing:
                    new = self._listener(owner)
                    new.want |= channels
                    touched.add(new)
                    self.stats.resubscribed += len(channels)
            for listener in touched:
                listener.requested += 1
                listener.moved_gen = listener.requested
            self.stats.slots_moved += moved
            if moved:
                self._degraded = True  # messages published during the move may be lost
        if moved:
            logger.info("cluster slots with subscriptions changed master; moving them",
                        extra={"slots": moved})
        for listener in touched:
            listener.poke()

    def _holds(self, listener: _Listener, slot: int) -> bool:
        return any(self._slot(channel) == slot for channel in listener.have | listener.expect)

    def _slot_gone(self, slot: int, listener: _Listener, pushed: bool) -> None:
        """``listener``'s master refused or dropped ``slot``: wait for a refresh to place it."""
        if pushed:
            self._degraded = True
            gone = {c for c in listener.have | listener.expect if self._slot(c) == slot}
            listener.have -= gone
            listener.expect -= gone
        if self._assign.get(slot) == listener.name:
            self._place(slot, None)
            self._dropped_by[slot] = listener.name
            listener.want -= self._by_slot.get(slot, set())
            listener.requested += 1
            if not pushed and slot not in self._releasing and self._holds(listener, slot):
                self._releasing[slot] = listener
        self._check_released(listener)
        self._request_refresh()

    def _check_released(self, listener: _Listener) -> None:
        """Hand over the slots ``listener`` was releasing once it holds none of their channels."""
        pending = [slot for slot, holder in self._releasing.items() if holder is listener]
        if not pending:
            return
        held = {self._slot(c) for c in listener.have | listener.expect} if listener.connected else set()
        for slot in pending:
            if slot in held:
                continue
            del self._releasing[slot]
            owner = self._assign.get(slot)
            channels = self._by_slot.get(slot)
            if owner is not None and channels:
                new = self._listener(owner)
                new.want |= channels
                new.requested += 1
                new.moved_gen = new.requested
                self.stats.resubscribed += len(channels)
                new.poke()
        self._notify()

    def _satisfied(self, target: dict[str, int]) -> bool:
        if self._closed:
            return False
        if self._releasing or self._unassigned:
            return False
        for name, listener in self._listeners.items():
            if listener.applied < max(target.get(name, 0), listener.moved_gen):
                return False
        return True

    def _settled(self) -> bool:
        with self._lock:
            if not self._satisfied({name: lst.requested for name, lst in self._listeners.items()}):
                return False
            return all(listener.connected for listener in self._listeners.values())

    def _notify(self) -> None:
        for target, event in self._waiters:
            if self._satisfied(target):
                event.set()
        self._wake.set()
