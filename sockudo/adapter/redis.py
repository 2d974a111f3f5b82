"""The Redis adapter: several server processes and machines behave as one.

Three layers, as in python-socketio: the ``LocalAdapter`` keeps this node's bookkeeping and
delivers to its sockets; this class handles everything here first, then tells the other nodes
through a message :class:`~sockudo.adapter.bus.Bus` (dropping its own echoes by node id); Redis
only publishes and stores.

- **Interest routing.** A node listens only to what it has local sockets for: the pub/sub
  channel of each Pusher channel with a local subscriber (``{prefix}#c{tag}``), of each user with
  a local socket or watcher (``{prefix}#u{tag}``), and the control channel. Interest changes are
  batched per event-loop tick (the wanted set is computed from local state and diffed against
  what the bus was told); a subscriber's ``subscription_succeeded`` waits until Redis has
  confirmed the subscription, so nothing published after it is missed.
- **Broadcasts** go to the channel's pub/sub channel only. Local delivery never waits on Redis:
  the envelope is queued for a publisher greenlet that pipelines it out.
- **Counts and transitions** live in Redis, in the channel's (or user's) hash slot: a hash of
  node → subscribers per channel, presence hashes, a hash of node → 1 per online user, the
  app's occupied-channel set and node → sockets per app. The first/last node of a hash is
  decided by a one-key Lua script, so occupied/vacated, a presence user's first join / last
  leave and online/offline happen exactly once cluster-wide. Readers sum the hashes of live
  nodes (pipelined reads, no question to other nodes); an answer is flagged partial when Redis
  is unreachable or a live peer has not (re)registered since Redis lost its data.
- **Heartbeats** go into a sorted set; a node silent for ``node_timeout`` is dead and one
  survivor releases its holdings (listed in its holdings set), sending ``member_removed`` for
  its presence users.
- **Redis outages**: everything falls back to this node's own answers and is marked
  incomplete; the bus reconnects with backoff and resubscribes, and once back (or when Redis's
  run id changes after a restart) this node re-registers its holdings. A holding released during
  the outage was announced then, so the resync releases it from Redis without announcing it again.

Blocking calls are fine here: under gevent they yield. Greenlets come from the injected
``runtime`` so this module imports no gevent.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisError

from sockudo.adapter import cluster as c
from sockudo.adapter.base import ClusterListener, RemoteMessageRecorder
from sockudo.adapter.bus import Bus, RedisBus
from sockudo.adapter.local import LocalAdapter
from sockudo.adapter.sharded_bus import PublishFailed, ShardedBus
from sockudo.config import Config
from sockudo.core import protocol
from sockudo.core.connection import Connection
from sockudo.core.wsframe import OutFrame
from sockudo.metrics.registry import Metrics
from sockudo.redis import make_client
from sockudo.services import Runtime

logger = logging.getLogger(__name__)

OUTBOX_LIMIT = 20000
PARTIAL_LOG_INTERVAL = 30.0  # seconds between warnings about answers given from this node only
INTEREST_LOG_INTERVAL = 30.0  # seconds between warnings about subscriptions Redis confirmed late
PUBLISH_BATCH = 256
READ_BATCH = 500  # keys per pipelined read or resync write
LEAVE_TIMEOUT = 2.0  # seconds a graceful stop spends leaving the cluster through Redis
FAILURES = (RedisError, OSError)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _run_id(info: Any) -> str | None:
    """Redis's run id from ``INFO server``: one server's, or every primary's of a Redis Cluster
    (a dict per node), so a restart of any of them is noticed."""
    if not isinstance(info, dict):
        return None
    if "run_id" in info:
        return str(info["run_id"])
    ids = sorted(str(v.get("run_id")) for v in info.values() if isinstance(v, dict) and "run_id" in v)
    return ",".join(ids) or None


def _queue_eval(pipe: Any, script: str, keys: list[str], args: list[Any]) -> None:
    """EVAL on a pipeline, as a plain command: a Redis Cluster pipeline has no ``eval`` method
    and refuses EVALSHA, but routes EVAL by its keys (all in one slot here)."""
    pipe.execute_command("EVAL", script, len(keys), *keys, *args)


class RedisAdapter:
    def __init__(self, config: Config, metrics: Metrics, runtime: Runtime, node_id: str | None = None,
                 client: redis.Redis | RedisCluster | None = None, bus: Bus | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.runtime = runtime
        self.local = LocalAdapter()
        self.node_id = node_id or uuid.uuid4().hex
        self.keys = c.Keys(config.redis_prefix)
        self.client = client or make_client(config)
        if bus is None:  # sharded pub/sub on a Redis Cluster, PUBLISH/SUBSCRIBE on one Redis or Sentinel
            bus = ShardedBus(self.client, runtime) if isinstance(self.client, RedisCluster) \
                else RedisBus(self.client, runtime)
        self.bus: Bus = bus
        self._node_acquire = self.client.register_script(c.NODE_ACQUIRE_LUA)
        self._node_release = self.client.register_script(c.NODE_RELEASE_LUA)
        self._presence_acquire = self.client.register_script(c.PRESENCE_ACQUIRE_LUA)
        self._presence_release = self.client.register_script(c.PRESENCE_RELEASE_LUA)
        self.listener: ClusterListener | None = None
        # Called with (app_id, channel, v2_text, stream_id, serial, published_ms, message_id) for a
        # sequenced message published elsewhere, so this node's replay buffer has it too.
        self.on_remote_message: RemoteMessageRecorder | None = None
        self.healthy = False
        self._dirty = True  # holdings must be (re)written to Redis
        self._listening = False  # the bus has subscribed once (commands may still fail)
        self._stopping = False
        self._peers: set[str] = set()
        # Peer → when it was last seen live (monotonic). A peer missing from Redis's node set
        # (Redis restarted empty, or failed over) is still expected until node_timeout passes,
        # so reads are marked partial instead of being silently local.
        self._peer_seen: dict[str, float] = {}
        self._outbox: deque[tuple[str, str, float]] = deque()
        self._outbox_wakeup = runtime.event()
        self._redis_run_id: str | None = None
        # Monotonic time this node got Redis back after losing it. Heartbeats written before an
        # outage look expired afterwards: nobody is taken for dead until every live peer has had
        # node_timeout to beat again (0.0: never lost Redis, no grace needed).
        self._back_since = 0.0
        self._coming_back = False  # set on (re)connection; the first answered heartbeat starts the grace
        self._last_error_log = 0.0
        self._last_partial_log = -PARTIAL_LOG_INTERVAL
        self._last_interest_log = -INTEREST_LOG_INTERVAL
        # Holdings this node released while Redis could not be told. Their last leave was
        # announced then (from this node's own answer); when Redis kept them through the outage,
        # the resync releases them without announcing the leave a second time.
        self._released_unsynced: set[str] = set()
        self._timeout = config.requests_timeout_ms / 1000.0
        # Holding member → event set when the Redis call changing it returns: calls about one
        # holding never overtake each other (a release and the next acquire arrive in order).
        self._inflight: dict[str, Any] = {}
        # Interest: pub/sub channel → (kind, app_id, name) for the ones told or about to be.
        self._topics: dict[str, tuple[str, str, str]] = {}
        self._told: set[str] = {self.keys.control}
        self._interest_dirty: set[str] = set()
        self._interest_scheduled = False
        # Per-tick batches of count writes: (app_id, channel) subscriber counts, app socket counts.
        self._counts_dirty: set[tuple[str, str]] = set()
        self._connections_dirty: set[str] = set()
        self._counts_scheduled = False
        # Bound metric children of the receive path (one lookup per message otherwise).
        port = metrics.port
        self._received = {kind: metrics.adapter_received_envelopes.labels(port, kind) for kind in c.KINDS}
        self._suppressed = metrics.adapter_duplicates_suppressed.labels(port)
        self._receive_latency = metrics.adapter_receive_latency_ms.labels(port)
        self.bus.set_interest([self.keys.control], [])

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self.runtime.spawn(self._listen_loop)
        self.runtime.spawn(self._publish_loop)
        self.runtime.spawn(self._heartbeat_loop)

    def stop(self, timeout: float = LEAVE_TIMEOUT) -> None:
        """Leave the cluster: the caller has closed every socket already. Bounded by
        ``timeout`` so an unreachable Redis (connect timeouts, Sentinel lookups) cannot hold
        the exit past the shutdown grace period; the survivors' dead-node cleanup then
        releases what this node held."""
        self._stopping = True
        if not self.healthy:
            logger.warning("redis unreachable; leaving this node's cleanup to the dead-node timeout")
            self.bus.close()
            return
        finished = self.runtime.event()
        self.runtime.spawn(self._leave, finished)
        finished.wait(timeout)
        if not finished.is_set():
            logger.warning("leaving the cluster timed out; the dead-node timeout will clean up",
                           extra={"timeout_s": timeout})
        self.bus.close()

    def _leave(self, finished: Any) -> None:
        try:
            self._flush_outbox()
            self.client.zrem(self.keys.nodes, self.node_id)
            # Tell the others now: until their next heartbeat they would count this node.
            self.bus.publish([(self.keys.control, self._node_dead_message(self.node_id))])
            self._release_all_holdings(self.node_id, notify=False)
        except FAILURES as exc:
            logger.warning("could not leave the cluster cleanly: %s", exc)
        finally:
            finished.set()

    def set_listener(self, listener: ClusterListener) -> None:
        self.listener = listener

    def readiness_probe(self) -> Callable[[], bool]:
        def probe() -> bool:
            self.client.ping()
            if not self.healthy:
                raise ConnectionError("pub/sub listener not connected")
            return True

        return probe

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.healthy and time.monotonic() < deadline:
            self.runtime.sleep(0.05)
        return self.healthy

    # -- failure handling -----------------------------------------------------

    def _failed(self, what: str, exc: BaseException) -> None:
        if self.healthy:
            logger.warning("redis unreachable, serving local answers until it is back",
                           extra={"op": what, "error": str(exc)})
        elif time.monotonic() - self._last_error_log > 30:
            logger.warning("redis still unreachable", extra={"op": what, "error": str(exc)})
        else:
            logger.debug("redis call failed", extra={"op": what, "error": str(exc)})
        self._last_error_log = time.monotonic()
        self.healthy = False
        self._dirty = True
        self.metrics.adapter_up.labels("redis").set(0)

    # -- publishing (never on the caller's time) ---------------------------------

    def _publish(self, topic: str, payload: str) -> None:
        if len(self._outbox) >= OUTBOX_LIMIT:
            self.metrics.transport_dropped.labels("redis").inc()
            return
        self._outbox.append((topic, payload, time.perf_counter()))
        self._outbox_wakeup.set()

    def _publish_loop(self) -> None:
        while True:
            if not self._outbox:
                self._outbox_wakeup.wait()
                self._outbox_wakeup.clear()
                continue
            if not self.healthy:
                # Keep what is queued for a short outage; the bounded outbox drops the rest.
                self.runtime.sleep(0.05)
                continue
            self._flush_outbox()

    def _flush_outbox(self) -> None:
        while self._outbox:
            batch = [self._outbox.popleft() for _ in range(min(PUBLISH_BATCH, len(self._outbox)))]
            try:
                self.bus.publish([(topic, payload) for topic, payload, _ in batch])
            except PublishFailed as exc:
                # Some masters of a cluster were unreachable (a failover): the others got their
                # items; the lost ones are counted and the next batch goes out as usual.
                self.metrics.transport_dropped.labels("redis").inc(exc.dropped)
                logger.warning("publish to some cluster masters failed", extra={"dropped": exc.dropped,
                                                                              "error": str(exc)})
                continue
            except FAILURES as exc:
                self.metrics.transport_dropped.labels("redis").inc(len(batch))
                self._failed("publish", exc)
                return
            now = time.perf_counter()
            histogram = self.metrics.adapter_publish_latency_ms.labels(self.metrics.port)
            histogram.observe((now - batch[0][2]) * 1000)

    # -- interest (what this node listens to) -----------------------------------

    def _interest_changed(self, kind: str, app_id: str, name: str) -> None:
        """Local state of a channel or user changed: its pub/sub channel is looked at again at
        the next flush (this tick's end, or a subscriber's own flush)."""
        topic = self.keys.channel_topic(app_id, name) if kind == c.KIND_CHANNEL else self.keys.user_topic(app_id, name)
        self._topics[topic] = (kind, app_id, name)
        self._interest_dirty.add(topic)
        if not self._interest_scheduled:
            self._interest_scheduled = True
            self.runtime.spawn(self._scheduled_interest_flush)

    def _scheduled_interest_flush(self) -> None:
        self._interest_scheduled = False
        self._flush_interest()

    def _wants(self, topic: str) -> bool:
        entry = self._topics.get(topic)
        if entry is None:
            return False
        kind, app_id, name = entry
        ns = self.local.namespaces.get(app_id)
        if ns is None:
            return False
        if kind == c.KIND_CHANNEL:
            return bool(ns.channels.get(name))
        return bool(ns.users.get(name) or ns.watchers.get(name))

    def _flush_interest(self) -> None:
        if not self._interest_dirty:
            return
        dirty, self._interest_dirty = self._interest_dirty, set()
        add, remove = c.interest_diff(dirty, self._wants, self._told)
        self._told.update(add)
        self._told.difference_update(remove)
        for topic in dirty:
            if topic not in self._told:
                self._topics.pop(topic, None)
        if add or remove:
            self.bus.set_interest(add, remove)

    def _await_interest(self) -> None:
        """Flush the interest now and wait (bounded) until Redis confirmed it: what is published
        after this returns reaches this node."""
        self._flush_interest()
        if not self.healthy or not self._listening or not getattr(self.bus, "connected", True):
            return  # nothing to wait for during an outage; the bus resubscribes when back
        if self.bus.wait_applied(self._timeout):
            return
        self.metrics.adapter_interest_timeouts.labels(self.metrics.port).inc()
        now = time.monotonic()
        if now - self._last_interest_log >= INTEREST_LOG_INTERVAL:
            self._last_interest_log = now
            logger.warning("redis did not confirm a subscription in time; subscribed anyway",
                           extra={"timeout_ms": self.config.requests_timeout_ms})

    # -- the pub/sub listener --------------------------------------------------

    def _listen_loop(self) -> None:
        self.bus.run(self._dispatch, self._connected, lambda: self._stopping)

    def _connected(self, first: bool) -> None:
        if not first:
            self._coming_back = True
        # Subscribed from here on: if the resync below fails, the heartbeat loop retries it
        # (``_recovered``) without waiting for the bus to reconnect.
        self._listening = True
        try:
            self._heartbeat(resync=True)
        except FAILURES as exc:
            self._failed("resync", exc)
            return
        if not first:
            self.metrics.transport_reconnections.labels("redis").inc()
            logger.info("redis reachable again; cross-node delivery resumed")
        self.healthy = True
        self.metrics.adapter_up.labels("redis").set(1)
        self._outbox_wakeup.set()

    def _dispatch(self, topic: str, data: bytes) -> None:
        try:
            kind = self.keys.kind_of(topic)
            if kind is None:
                return
            self._received[kind].inc()
            msg = c.decode(data)
            if msg is None:
                return
            if msg.get("node_id") == self.node_id:
                self._suppressed.inc()
                return
            action = c.route(kind, msg, self.node_id)
            if action == c.TO_CHANNEL or action == c.TO_USER:
                self._on_broadcast(msg)
            elif action == c.TERMINATE:
                self.local.terminate_user(msg["app_id"], msg["user_id"], int(msg.get("code", 4009)),
                                          str(msg.get("message", "")))
            elif action == c.WATCHLIST:
                self.local.notify_watchers(msg["app_id"], msg["user_id"], OutFrame(msg["message"]))
            elif action == c.FORGET_NODE:
                self._forget_peer(msg["dead_node_id"])
        except Exception:  # a bug in dispatch must not end cross-node delivery
            logger.exception("error handling a cross-node message")

    def _on_broadcast(self, msg: dict[str, Any]) -> None:
        app_id, text = msg["app_id"], msg["message"]
        v2_text = msg.get("message_v2")
        serial = msg.get("serial")
        frame = OutFrame(text, v2_text if isinstance(v2_text, str) else None, msg.get("channel"),
                         serial if isinstance(serial, int) else None)
        if (frame.serial is not None and frame.v2_text is not None and frame.channel is not None
                and self.on_remote_message is not None):
            try:
                self.on_remote_message(app_id, frame.channel, frame.v2_text, str(msg.get("stream_id")), frame.serial,
                                       int(msg.get("published_ms", 0)), str(msg.get("message_id", "")))
            except Exception:
                logger.exception("could not buffer a remote message")
        except_id = msg.get("except_socket_id")
        user_id = msg.get("user_id")
        if isinstance(user_id, str):
            self.local.send_to_user(app_id, user_id, frame, except_id)
        else:
            sent = self.local.broadcast(app_id, msg["channel"], frame, except_id)
            if sent:
                bound = self.metrics.app(app_id)
                bound.ws_sent.inc(sent)
                bound.bytes_sent.inc(sent * len(text))
        sent_ms = msg.get("timestamp_ms")
        if isinstance(sent_ms, (int, float)):
            latency_ms = max(0.0, time.time() * 1000 - sent_ms)
            self._receive_latency.observe(latency_ms)

    def _partial(self, app_id: str, what: str, missing: set[str] | None = None) -> None:
        """A partial answer (the caller marks it): counted, and logged as a warning at most once
        per ``PARTIAL_LOG_INTERVAL`` so an outage under REST traffic is not a log storm.
        ``missing``: peers expected but not registered in Redis; None: Redis unreachable."""
        self.metrics.adapter_uncomplete.labels(app_id, self.metrics.port).inc()
        extra: dict[str, Any] = {"app_id": app_id, "request_type": what}
        if missing is None:
            message = "redis unreachable; answering from this node only, marked partial"
        else:
            message = "some nodes are not registered in redis yet; answer marked partial"
            extra["missing_nodes"] = sorted(missing)
        now = time.monotonic()
        if now - self._last_partial_log >= PARTIAL_LOG_INTERVAL:
            self._last_partial_log = now
            logger.warning(message, extra=extra)
        else:
            logger.debug(message, extra=extra)

    # -- heartbeats and dead nodes ---------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stopping:
            try:
                if not self.healthy and self._listening:
                    self._recovered()
                else:
                    self._heartbeat()
            except FAILURES as exc:
                self._failed("heartbeat", exc)
            except Exception:
                logger.exception("heartbeat failed")
            self.runtime.sleep(self.config.heartbeat_interval)

    def _recovered(self) -> None:
        """Commands work again while the pub/sub listener never dropped (a command failed on its
        own: Redis out of memory, a timeout). Without this, only a reconnect of the listener
        made the node healthy again, so after an OOM it stayed local-only until restarted."""
        self._coming_back = True
        self._heartbeat(resync=True)
        self.healthy = True
        self.metrics.adapter_up.labels("redis").set(1)
        self.metrics.transport_reconnections.labels("redis").inc()
        logger.info("redis commands succeed again; cross-node delivery resumed")
        self._outbox_wakeup.set()

    def _heartbeat(self, resync: bool = False) -> None:
        """Beat, learn the live and dead peers, resync when needed (``resync``: always).

        This node is (re)registered in the node set only after its holdings are written, so a
        peer expected but absent from the set tells a reader that counts and presence read from
        Redis may lack that peer's share (the answer is flagged partial)."""
        now_ms = int(time.time() * 1000)
        cutoff = now_ms - int(self.config.node_timeout * 1000)
        pipe = self.client.pipeline(transaction=False)
        pipe.zrangebyscore(self.keys.nodes, cutoff, "+inf")
        pipe.zrangebyscore(self.keys.nodes, "-inf", f"({cutoff}")
        live, dead = pipe.execute()
        info = self.client.info("server")  # not on the pipeline: a Redis Cluster pipeline refuses INFO
        now = time.monotonic()
        if self._coming_back:  # Redis answers again from now on (a frozen Redis held the call)
            self._coming_back = False
            self._back_since = now
        for n in live:
            self._peer_seen[_text(n)] = now
        self._peer_seen.pop(self.node_id, None)
        self._peer_seen = {n: t for n, t in self._peer_seen.items() if now - t < self.config.node_timeout}
        self._peers = set(self._peer_seen)
        self.metrics.cluster_nodes.set(len(self._peers) + 1)
        run_id = _run_id(info)
        if self._redis_run_id is not None and run_id != self._redis_run_id:
            logger.warning("redis restarted or failed over; re-registering this node's state")
            self._dirty = True
        self._redis_run_id = run_id
        if resync or (self._dirty and self.healthy):
            self._resync()
        self.client.zadd(self.keys.nodes, {self.node_id: now_ms})
        if self._back_since and now - self._back_since < self.config.node_timeout:
            return  # just back from an outage: old heartbeats are not deaths (yet)
        for node in dead:
            self._cleanup_dead(_text(node))

    def _node_dead_message(self, dead_node_id: str) -> str:
        return c.encode({"node_id": self.node_id, "request_type": c.NODE_DEAD, "dead_node_id": dead_node_id})

    def _forget_peer(self, node_id: str) -> None:
        """``node_id`` is gone: stop counting on it."""
        if node_id == self.node_id:
            return
        self._peers.discard(node_id)
        self._peer_seen.pop(node_id, None)
        self.metrics.cluster_nodes.set(len(self._peers) + 1)

    def _cleanup_dead(self, node_id: str) -> None:
        if node_id == self.node_id:
            return  # we were too slow to beat (a long pause); our holdings are still ours
        self._forget_peer(node_id)
        if not self.client.set(self.keys.cleanup_lock(node_id), self.node_id, nx=True, ex=60):
            return  # another survivor is on it
        logger.warning("node is dead; removing its sockets from the cluster", extra={"dead_node_id": node_id})
        # Queued ahead of the member_removed broadcasts, so peers have stopped counting the node
        # by the time clients see its members leave.
        self._publish(self.keys.control, self._node_dead_message(node_id))
        released = self._release_all_holdings(node_id, notify=True)
        self.client.zrem(self.keys.nodes, node_id)
        self.metrics.dead_nodes_cleaned.inc()
        logger.info("dead node removed", extra={"dead_node_id": node_id, "released": released})

    def _release_all_holdings(self, node_id: str, notify: bool) -> int:
        members = self.client.smembers(self.keys.holdings(node_id))
        count = 0
        for member in members:
            holding = c.Holding.from_member(member)
            if holding is None:
                continue
            if self._do_release(holding, node_id) and notify:
                self._notify_release(holding)
            count += 1
        self.client.delete(self.keys.holdings(node_id))
        return count

    def _notify_release(self, holding: c.Holding) -> None:
        if self.listener is None:
            return
        try:
            if holding.kind == c.HOLD_PRESENCE:
                self.listener.on_member_removed(holding.app_id, holding.channel, holding.user_id)
            elif holding.kind == c.HOLD_CHANNEL:
                self.listener.on_channel_vacated(holding.app_id, holding.channel)
            elif holding.kind == c.HOLD_USER:
                self.listener.on_user_offline(holding.app_id, holding.user_id)
        except Exception:
            logger.exception("error reporting a cluster transition")

    # -- holdings (cluster refcounts) ------------------------------------------------

    def _serialized(self, member: str, call: Callable[[], bool]) -> bool:
        """Run ``call`` once no other call about the same holding is on its way to Redis."""
        while (pending := self._inflight.get(member)) is not None:
            pending.wait(self._timeout + 5.0)
        done = self.runtime.event()
        self._inflight[member] = done
        try:
            return call()
        finally:
            if self._inflight.get(member) is done:
                del self._inflight[member]
            done.set()

    def _do_acquire(self, holding: c.Holding, node_id: str, info: str = "", count: int = 1) -> bool:
        """Take ``node_id``'s share; True if it is the first share (listed in the holdings set
        first, so a node dying in between leaves nothing the cleanup cannot find)."""
        self.client.sadd(self.keys.holdings(node_id), holding.member())
        app_id = holding.app_id
        if holding.kind == c.HOLD_CHANNEL:
            first = bool(self._node_acquire(keys=[self.keys.subs(app_id, holding.channel)], args=[node_id, count]))
            if first:
                self.client.sadd(self.keys.channels(app_id), holding.channel)
            return first
        if holding.kind == c.HOLD_PRESENCE:
            keys = [self.keys.presence(app_id, holding.channel), self.keys.presence_info(app_id, holding.channel),
                    self.keys.presence_held(app_id, holding.channel)]
            return bool(self._presence_acquire(keys=keys, args=[holding.user_id,
                                                                c.presence_field(node_id, holding.user_id), info]))
        if holding.kind == c.HOLD_USER:
            return bool(self._node_acquire(keys=[self.keys.online(app_id, holding.user_id)], args=[node_id, 1]))
        if holding.kind == c.HOLD_CONNECTIONS:
            self.client.hset(self.keys.connections(app_id), node_id, count)
        return False

    def _do_release(self, holding: c.Holding, node_id: str) -> bool:
        """Give ``node_id``'s share back; True if it was the last."""
        app_id = holding.app_id
        last = False
        if holding.kind == c.HOLD_CHANNEL:
            last = bool(self._node_release(keys=[self.keys.subs(app_id, holding.channel)], args=[node_id]))
            if last:
                self._unlist_channels(app_id, [holding.channel])
        elif holding.kind == c.HOLD_PRESENCE:
            keys = [self.keys.presence(app_id, holding.channel), self.keys.presence_info(app_id, holding.channel),
                    self.keys.presence_held(app_id, holding.channel)]
            last = bool(self._presence_release(keys=keys, args=[holding.user_id,
                                                                c.presence_field(node_id, holding.user_id)]))
        elif holding.kind == c.HOLD_USER:
            last = bool(self._node_release(keys=[self.keys.online(app_id, holding.user_id)], args=[node_id]))
        elif holding.kind == c.HOLD_CONNECTIONS:
            self.client.hdel(self.keys.connections(app_id), node_id)
        self.client.srem(self.keys.holdings(node_id), holding.member())
        return last

    def _unlist_channels(self, app_id: str, channels: list[str]) -> None:
        """Take vacated channels out of the app's index. The index lives in another slot than
        the channels, so this is not atomic with the vacate: a channel occupied again meanwhile
        (its occupier adds it before or after this removal) is put back after looking again."""
        if not channels:
            return
        index = self.keys.channels(app_id)
        self.client.srem(index, *channels)
        pipe = self.client.pipeline(transaction=False)
        for channel in channels:
            pipe.exists(self.keys.subs(app_id, channel))
        back = [channel for channel, exists in zip(channels, pipe.execute(), strict=True) if exists]
        if back:
            self.client.sadd(index, *back)

    def _acquire(self, holding: c.Holding, info: str = "", count: int = 1) -> bool | None:
        """True if this node made the count go 0→1; None when Redis could not be asked."""
        if not self.healthy:
            self._dirty = True
            return None
        try:
            return self._serialized(holding.member(), lambda: self._do_acquire(holding, self.node_id, info, count))
        except FAILURES as exc:
            self._failed("acquire", exc)
            return None

    def _release(self, holding: c.Holding) -> bool | None:
        """True if this node made the count go 1→0; None when Redis could not be asked (the
        caller then announces from this node's own answer, and the resync stays silent)."""
        member = holding.member()
        if not self.healthy:
            self._dirty = True
            self._released_unsynced.add(member)
            return None
        try:
            return self._serialized(member, lambda: self._do_release(holding, self.node_id))
        except FAILURES as exc:
            self._failed("release", exc)
            self._released_unsynced.add(member)
            return None

    def _desired_holdings(self) -> dict[str, tuple[c.Holding, str, int]]:
        desired: dict[str, tuple[c.Holding, str, int]] = {}
        for app_id, ns in list(self.local.namespaces.items()):
            if ns.sockets:
                h = c.Holding(c.HOLD_CONNECTIONS, app_id)
                desired[h.member()] = (h, "", len(ns.sockets))
            for channel, subs in list(ns.channels.items()):
                if subs:
                    h = c.Holding(c.HOLD_CHANNEL, app_id, channel)
                    desired[h.member()] = (h, "", len(subs))
            for channel, members in list(ns.presence.items()):
                for user_id, member in list(members.items()):
                    h = c.Holding(c.HOLD_PRESENCE, app_id, channel, user_id)
                    desired[h.member()] = (h, protocol.dumps(member.user_info), 1)
            for user_id, sockets in list(ns.users.items()):
                if sockets:
                    h = c.Holding(c.HOLD_USER, app_id, "", user_id)
                    desired[h.member()] = (h, "", 1)
        return desired

    def _resync(self) -> None:
        """Make Redis hold exactly this node's current state (after start, an outage or a
        Redis restart). Stale holdings are released, with events if they were the last —
        except those this node already announced when it released them during the outage."""
        self._dirty = False
        announced = set(self._released_unsynced)
        desired = self._desired_holdings()
        current = {_text(m) for m in self.client.smembers(self.keys.holdings(self.node_id))}
        for member in current - set(desired):
            holding = c.Holding.from_member(member)
            if holding is None:
                self.client.srem(self.keys.holdings(self.node_id), member)
                continue
            if self._serialized(member, self._releaser(holding)) and member not in announced:
                self._notify_release(holding)
        entries = list(desired.items())
        for i in range(0, len(entries), READ_BATCH):
            chunk = entries[i:i + READ_BATCH]
            self.client.sadd(self.keys.holdings(self.node_id), *[member for member, _ in chunk])
            pipe = self.client.pipeline(transaction=False)
            for _, (holding, info, count) in chunk:
                self._queue_acquire(pipe, holding, info, count)
            pipe.execute()
        # Left while this ran: their leave released (and announced) them, but the writes above,
        # made from the state read at the start, may have taken them again. Give them back, silently.
        for member in set(desired) - set(self._desired_holdings()):
            self._serialized(member, self._releaser(desired[member][0]))
        # Released now, or held again (then in ``desired``): either way settled. A release
        # that happened during this resync stays for the next one.
        self._released_unsynced -= announced
        if set(self._desired_holdings()) != set(desired):
            self._dirty = True  # local state moved while this ran: look again at the next beat

    def _releaser(self, holding: c.Holding) -> Callable[[], bool]:
        """A resync's release of this node's share, skipped if the node holds it again by the time
        it runs (a join while the resync waited on Redis: that join's own acquire counts)."""
        return lambda: not self._held_here(holding) and self._do_release(holding, self.node_id)

    def _held_here(self, holding: c.Holding) -> bool:
        """Whether this node's local state holds ``holding`` now (as :meth:`_desired_holdings` sees it)."""
        ns = self.local.namespaces.get(holding.app_id)
        if ns is None:
            return False
        if holding.kind == c.HOLD_CONNECTIONS:
            return bool(ns.sockets)
        if holding.kind == c.HOLD_CHANNEL:
            return bool(ns.channels.get(holding.channel))
        if holding.kind == c.HOLD_PRESENCE:
            return holding.user_id in ns.presence.get(holding.channel, {})
        if holding.kind == c.HOLD_USER:
            return bool(ns.users.get(holding.user_id))
        return False

    def _queue_acquire(self, pipe: Any, holding: c.Holding, info: str, count: int) -> None:
        """A resync's (re)acquire on a pipeline: same writes as :meth:`_do_acquire`, no answer."""
        app_id, node = holding.app_id, self.node_id
        if holding.kind == c.HOLD_CHANNEL:
            _queue_eval(pipe, c.NODE_ACQUIRE_LUA, [self.keys.subs(app_id, holding.channel)], [node, count])
            pipe.sadd(self.keys.channels(app_id), holding.channel)
        elif holding.kind == c.HOLD_PRESENCE:
            _queue_eval(pipe, c.PRESENCE_ACQUIRE_LUA,
                        [self.keys.presence(app_id, holding.channel), self.keys.presence_info(app_id, holding.channel),
                         self.keys.presence_held(app_id, holding.channel)],
                        [holding.user_id, c.presence_field(node, holding.user_id), info])
        elif holding.kind == c.HOLD_USER:
            _queue_eval(pipe, c.NODE_ACQUIRE_LUA, [self.keys.online(app_id, holding.user_id)], [node, 1])
        elif holding.kind == c.HOLD_CONNECTIONS:
            pipe.hset(self.keys.connections(app_id), node, count)

    # -- counts written in per-tick batches ----------------------------------------------

    def _count_changed(self, app_id: str, channel: str) -> None:
        self._counts_dirty.add((app_id, channel))
        self._schedule_counts()

    def _connections_changed(self, app_id: str) -> None:
        self._connections_dirty.add(app_id)
        self._schedule_counts()

    def _schedule_counts(self) -> None:
        if not self._counts_scheduled:
            self._counts_scheduled = True
            self.runtime.spawn(self._flush_counts)

    def _flush_counts(self) -> None:
        self._counts_scheduled = False
        counts, self._counts_dirty = self._counts_dirty, set()
        apps, self._connections_dirty = self._connections_dirty, set()
        if not self.healthy:
            self._dirty = True  # the resync writes every count when Redis is back
            return
        node = self.node_id
        holdings = self.keys.holdings(node)
        pipe = self.client.pipeline(transaction=False)
        for app_id in apps:
            n = self.local.socket_count(app_id)
            if n:
                pipe.sadd(holdings, c.Holding(c.HOLD_CONNECTIONS, app_id).member())
                pipe.hset(self.keys.connections(app_id), node, n)
            else:
                pipe.hdel(self.keys.connections(app_id), node)
                pipe.srem(holdings, c.Holding(c.HOLD_CONNECTIONS, app_id).member())
        for app_id, channel in counts:
            n = self.local.subscriber_count(app_id, channel)
            if n:
                _queue_eval(pipe, c.NODE_UPDATE_LUA, [self.keys.subs(app_id, channel)], [node, n])
        try:
            pipe.execute()
        except FAILURES as exc:
            self._failed("counts", exc)

    # -- reads ------------------------------------------------------------------------

    def _live(self, registered: Iterable[tuple[str | bytes, float]]) -> tuple[set[str], set[str]]:
        """(nodes whose shares count, expected peers missing from the node set) from
        ``ZRANGE nodes 0 -1 WITHSCORES``: a node counts while its heartbeat is fresh."""
        cutoff = time.time() * 1000 - self.config.node_timeout * 1000
        every, fresh = c.live_nodes(registered, cutoff)
        return fresh | self._peers, set(self._peers) - every

    def _read(self, app_id: str, what: str, call: Callable[[Any], Any]) -> tuple[Any, set[str], bool] | None:
        """Run ``call`` on a pipeline with a read of the node set: (its reply, the live nodes,
        complete), or None when Redis cannot be asked. Incomplete (counted and logged) when an
        expected peer is not registered."""
        if not self.healthy:
            self._partial(app_id, what)
            return None
        try:
            pipe = self.client.pipeline(transaction=False)
            call(pipe)
            pipe.zrange(self.keys.nodes, 0, -1, withscores=True)
            reply, registered = pipe.execute()
        except FAILURES as exc:
            self._failed(what, exc)
            self._partial(app_id, what)
            return None
        live, missing = self._live(registered)
        if missing:
            self._partial(app_id, what, missing)
        return reply, live, not missing

    # -- Adapter interface: sockets --------------------------------------------------

    def add_socket(self, app_id: str, conn: Connection) -> None:
        self.local.add_socket(app_id, conn)
        self._connections_changed(app_id)

    def remove_socket(self, app_id: str, socket_id: str) -> None:
        had = self.local.socket_count(app_id)
        self.local.remove_socket(app_id, socket_id)
        if self.local.socket_count(app_id) < had:
            self._connections_changed(app_id)

    def socket_count(self, app_id: str) -> int:
        """Open sockets of the app on every live node (for ``max_connections``)."""
        local = self.local.socket_count(app_id)
        if not self.healthy:
            return local
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(self.keys.connections(app_id))
            pipe.zrange(self.keys.nodes, 0, -1, withscores=True)
            counts, registered = pipe.execute()
        except FAILURES as exc:
            self._failed("socket_count", exc)
            return local
        live, _ = self._live(registered)
        return local + c.sum_counts(counts, live, self.node_id)

    def node_socket_count(self) -> int:
        return self.local.node_socket_count()

    def node_connections(self, app_ids: list[str]) -> dict[str, int]:
        """Open sockets of ``app_ids`` per live node, this one included (the console's cluster view)."""
        nodes = {self.node_id: sum(self.local.socket_count(a) for a in app_ids)}
        nodes.update({peer: 0 for peer in self._peers})
        if not self.healthy:
            return nodes
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for app_id in app_ids:
                    pipe.hgetall(self.keys.connections(app_id))
                replies = pipe.execute()
        except FAILURES as exc:
            self._failed("node_connections", exc)
            return nodes
        for counts in replies:
            for node, value in counts.items():
                node_id = _text(node)
                if node_id in self._peers:
                    nodes[node_id] += max(0, int(value))
        return nodes

    def all_connections(self) -> list[Connection]:
        return self.local.all_connections()

    # -- channels -------------------------------------------------------------------

    def subscribe(self, app_id: str, channel: str, conn: Connection) -> tuple[int, bool]:
        count, first_here = self.local.subscribe(app_id, channel, conn)
        occupied = False
        if first_here:
            self._interest_changed(c.KIND_CHANNEL, app_id, channel)
            self._flush_interest()  # the bus subscribes while the acquire below is on its way
            result = self._acquire(c.Holding(c.HOLD_CHANNEL, app_id, channel), count=count)
            occupied = first_here if result is None else result
            if self.local.subscriber_count(app_id, channel) != count:
                self._count_changed(app_id, channel)  # others joined while the acquire was on its way
        else:
            self._count_changed(app_id, channel)
        self._await_interest()
        return count, occupied

    def unsubscribe(self, app_id: str, channel: str, socket_id: str) -> tuple[int, bool]:
        remaining, last_here = self.local.unsubscribe(app_id, channel, socket_id)
        if not last_here:
            if remaining:
                self._count_changed(app_id, channel)
            return remaining, False
        self._interest_changed(c.KIND_CHANNEL, app_id, channel)
        vacated = self._release(c.Holding(c.HOLD_CHANNEL, app_id, channel))
        return remaining, last_here if vacated is None else vacated

    def subscriber_count_checked(self, app_id: str, channel: str) -> tuple[int, bool]:
        local = self.local.subscriber_count(app_id, channel)
        read = self._read(app_id, "subscription_count", lambda p: p.hgetall(self.keys.subs(app_id, channel)))
        if read is None:
            return local, False
        fields, live, complete = read
        return local + c.sum_counts(fields, live, self.node_id), complete

    def subscriber_count(self, app_id: str, channel: str) -> int:
        return self.subscriber_count_checked(app_id, channel)[0]

    def channels_checked(self, app_id: str, prefix: str = "") -> tuple[dict[str, int], bool]:
        local = self.local.channels(app_id, prefix)
        read = self._read(app_id, "channels", lambda p: p.smembers(self.keys.channels(app_id)))
        if read is None:
            return local, False
        members, live, complete = read
        names = sorted(n for n in (_text(m) for m in members) if n.startswith(prefix))
        counts = dict(local)
        empty: list[str] = []
        try:
            for i in range(0, len(names), READ_BATCH):
                chunk = names[i:i + READ_BATCH]
                pipe = self.client.pipeline(transaction=False)
                for name in chunk:
                    pipe.hgetall(self.keys.subs(app_id, name))
                for name, fields in zip(chunk, pipe.execute(), strict=True):
                    if not fields:
                        empty.append(name)
                        continue
                    n = c.sum_counts(fields, live, self.node_id)
                    if n:
                        counts[name] = counts.get(name, 0) + n
            self._unlist_channels(app_id, empty)  # left over by a race; see _unlist_channels
        except FAILURES as exc:
            self._failed("channels", exc)
            self._partial(app_id, "channels")
            return local, False
        return {name: n for name, n in counts.items() if n > 0}, complete

    def channels(self, app_id: str, prefix: str = "") -> dict[str, int]:
        return self.channels_checked(app_id, prefix)[0]

    def broadcast(self, app_id: str, channel: str, frame: OutFrame, except_socket_id: str | None = None) -> int:
        sent = self.local.broadcast(app_id, channel, frame, except_socket_id)
        envelope: dict[str, Any] = {"node_id": self.node_id, "app_id": app_id, "channel": channel,
                                    "message": frame.text, "timestamp_ms": time.time() * 1000}
        if except_socket_id is not None:
            envelope["except_socket_id"] = except_socket_id
        if frame.v2_text is not None:
            envelope["message_v2"] = frame.v2_text
        if frame.meta is not None and frame.serial is not None:
            envelope["stream_id"], envelope["published_ms"], envelope["message_id"] = frame.meta
            envelope["serial"] = frame.serial
        self._publish(self.keys.channel_topic(app_id, channel), c.encode(envelope))
        return sent

    # -- presence -----------------------------------------------------------------

    def presence_join(self, app_id: str, channel: str, socket_id: str, user_id: str, user_info: Any) -> bool:
        first_here = self.local.presence_join(app_id, channel, socket_id, user_id, user_info)
        if not first_here:
            return False
        first = self._acquire(c.Holding(c.HOLD_PRESENCE, app_id, channel, user_id), protocol.dumps(user_info))
        return first_here if first is None else first

    def presence_leave(self, app_id: str, channel: str, socket_id: str, user_id: str) -> bool:
        last_here = self.local.presence_leave(app_id, channel, socket_id, user_id)
        if not last_here:
            return False
        last = self._release(c.Holding(c.HOLD_PRESENCE, app_id, channel, user_id))
        return last_here if last is None else last

    def presence_members(self, app_id: str, channel: str) -> dict[str, Any]:
        return self.presence_members_checked(app_id, channel)[0]

    def presence_members_checked(self, app_id: str, channel: str) -> tuple[dict[str, Any], bool]:
        """Members on every node, read from Redis; False with this node's own members when
        Redis is unreachable, or when a peer this node still expects has not (re)registered
        in Redis yet (Redis restarted or failed over and lost its holdings)."""
        members = self.local.presence_members(app_id, channel)
        read = self._read(app_id, "presence_members", lambda p: p.hgetall(self.keys.presence_info(app_id, channel)))
        if read is None:
            return members, False
        stored, _, complete = read
        merged: dict[str, Any] = {}
        for uid, info in stored.items():
            try:
                merged[_text(uid)] = json.loads(info)
            except ValueError:
                merged[_text(uid)] = {}
        merged.update(members)
        return merged, complete

    # -- users ----------------------------------------------------------------------

    def add_user_socket(self, app_id: str, user_id: str, conn: Connection) -> bool:
        first_here = self.local.add_user_socket(app_id, user_id, conn)
        if not first_here:
            return False
        self._interest_changed(c.KIND_USER, app_id, user_id)
        first = self._acquire(c.Holding(c.HOLD_USER, app_id, "", user_id))
        return first_here if first is None else first

    def remove_user_socket(self, app_id: str, user_id: str, socket_id: str) -> bool:
        last_here = self.local.remove_user_socket(app_id, user_id, socket_id)
        if not last_here:
            return False
        self._interest_changed(c.KIND_USER, app_id, user_id)
        last = self._release(c.Holding(c.HOLD_USER, app_id, "", user_id))
        return last_here if last is None else last

    def user_online(self, app_id: str, user_id: str) -> bool:
        if self.local.user_online(app_id, user_id):
            return True
        if not self.healthy:
            return False
        try:
            return bool(self.client.exists(self.keys.online(app_id, user_id)))
        except FAILURES as exc:
            self._failed("user_online", exc)
            return False

    def send_to_user(self, app_id: str, user_id: str, frame: OutFrame, except_socket_id: str | None = None) -> int:
        sent = self.local.send_to_user(app_id, user_id, frame, except_socket_id)
        envelope: dict[str, Any] = {"node_id": self.node_id, "app_id": app_id, "user_id": user_id,
                                    "channel": protocol.SERVER_TO_USER_PREFIX + user_id, "message": frame.text,
                                    "timestamp_ms": time.time() * 1000}
        if except_socket_id is not None:
            envelope["except_socket_id"] = except_socket_id
        self._publish(self.keys.user_topic(app_id, user_id), c.encode(envelope))
        return sent

    def terminate_user(self, app_id: str, user_id: str, code: int, message: str) -> int:
        closed = self.local.terminate_user(app_id, user_id, code, message)
        self._publish(self.keys.user_topic(app_id, user_id), c.encode({
            "node_id": self.node_id, "app_id": app_id, "request_type": c.TERMINATE_USER, "user_id": user_id,
            "code": code, "message": message,
        }))
        return closed

    # -- watchlist --------------------------------------------------------------------

    def watch(self, app_id: str, conn: Connection, user_ids: tuple[str, ...]) -> None:
        self.local.watch(app_id, conn, user_ids)
        for user_id in user_ids:
            self._interest_changed(c.KIND_USER, app_id, user_id)
        self._await_interest()  # an online/offline change after this reaches the watcher

    def unwatch(self, app_id: str, conn: Connection, user_ids: tuple[str, ...]) -> None:
        self.local.unwatch(app_id, conn, user_ids)
        for user_id in user_ids:
            self._interest_changed(c.KIND_USER, app_id, user_id)

    def notify_watchers(self, app_id: str, user_id: str, frame: OutFrame) -> int:
        sent = self.local.notify_watchers(app_id, user_id, frame)
        self._publish(self.keys.user_topic(app_id, user_id), c.encode({
            "node_id": self.node_id, "app_id": app_id, "request_type": c.WATCHLIST_NOTIFY, "user_id": user_id,
            "message": frame.text,
        }))
        return sent
