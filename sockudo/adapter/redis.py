"""The Redis adapter: several server processes and machines behave as one.

Three layers, as in python-socketio: the ``LocalAdapter`` keeps this node's bookkeeping and
delivers to its sockets; this class handles everything here first, then tells the other nodes
through Redis pub/sub (dropping its own echoes by node id); Redis only publishes and stores.

- **Broadcasts** go to ``{prefix}#broadcast``. Local delivery never waits on Redis: the
  envelope is queued for a publisher greenlet that pipelines it out.
- **Transitions** that must happen exactly once cluster-wide (channel occupied/vacated, a
  presence user's first join / last leave, a user online/offline) are refcounts of *nodes*
  kept in Redis hashes and changed by Lua scripts, atomically. Presence member lists and
  ``/users`` are read from the same hashes; such a read is flagged partial when Redis is
  unreachable or a live peer has not (re)registered since Redis lost its data.
- **Counts** that change with every subscribe (sockets per channel, ``/channels``) stay in
  each node's memory and are gathered by request/reply with a deadline; a partial answer is
  flagged to the caller, counted and logged.
- **Heartbeats** go into a sorted set; a node silent for ``node_timeout`` is dead and one
  survivor releases its holdings, sending ``member_removed`` for its presence users.
- **Redis outages**: everything falls back to this node's own answers and is marked
  incomplete; the listener reconnects with backoff and, once back (or when Redis's run id
  changes after a restart), re-registers this node's holdings. A holding released during the
  outage was announced then, so the resync releases it from Redis without announcing it again.

Blocking calls are fine here: under gevent they yield. Greenlets come from the injected
``runtime`` so this module imports no gevent.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import RedisError

from sockudo.adapter import cluster as c
from sockudo.adapter.base import ClusterListener, RemoteMessageRecorder
from sockudo.adapter.local import LocalAdapter
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
PUBLISH_BATCH = 256
LEAVE_TIMEOUT = 2.0  # seconds a graceful stop spends leaving the cluster through Redis
FAILURES = (RedisError, OSError)


class RedisAdapter:
    def __init__(self, config: Config, metrics: Metrics, runtime: Runtime, node_id: str | None = None,
                 client: redis.Redis | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.runtime = runtime
        self.local = LocalAdapter()
        self.node_id = node_id or uuid.uuid4().hex
        self.keys = c.Keys(config.redis_prefix)
        self.client = client or make_client(config)
        self._acquire_script = self.client.register_script(c.ACQUIRE_LUA)
        self._release_script = self.client.register_script(c.RELEASE_LUA)
        self.listener: ClusterListener | None = None
        # Called with (app_id, channel, v2_text, stream_id, serial, published_ms, message_id) for a
        # sequenced message published elsewhere, so this node's replay buffer has it too.
        self.on_remote_message: RemoteMessageRecorder | None = None
        self.healthy = False
        self._dirty = True  # holdings must be (re)written to Redis
        self._listening = False  # the pub/sub listener is subscribed (commands may still fail)
        self._stopping = False
        self._peers: set[str] = set()
        # Peer → when it was last seen live (monotonic). A peer missing from Redis's node set
        # (Redis restarted empty, or failed over) is still expected until node_timeout passes,
        # so queries wait for it and are marked partial instead of being silently local.
        self._peer_seen: dict[str, float] = {}
        self._pending: dict[str, tuple[c.PendingQuery, Any]] = {}
        self._outbox: deque[tuple[str, str, float]] = deque()
        self._outbox_wakeup = runtime.event()
        self._redis_run_id: str | None = None
        # Monotonic time this node got Redis back after losing it. Heartbeats written before an
        # outage look expired afterwards: nobody is taken for dead until every live peer has had
        # node_timeout to beat again (0.0: never lost Redis, no grace needed).
        self._back_since = 0.0
        self._coming_back = False  # set on (re)connection; the first answered heartbeat starts the grace
        self._connection_apps: set[str] = set()
        self._last_error_log = 0.0
        self._last_partial_log = -PARTIAL_LOG_INTERVAL
        # Holdings this node released while Redis could not be told. Their last leave was
        # announced then (from this node's own answer); when Redis kept them through the outage,
        # the resync releases them without announcing the leave a second time.
        self._released_unsynced: set[str] = set()
        self._timeout = config.requests_timeout_ms / 1000.0

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
            return
        finished = self.runtime.event()
        self.runtime.spawn(self._leave, finished)
        finished.wait(timeout)
        if not finished.is_set():
            logger.warning("leaving the cluster timed out; the dead-node timeout will clean up",
                           extra={"timeout_s": timeout})

    def _leave(self, finished: Any) -> None:
        try:
            self._flush_outbox()
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(self.keys.nodes, self.node_id)
            for app_id in self._connection_apps:
                pipe.hdel(self.keys.connections(app_id), self.node_id)
            # Tell the others now: until their next heartbeat they would wait for our replies.
            pipe.publish(self.keys.requests, self._node_dead_message(self.node_id))
            pipe.execute()
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

    def _publish(self, channel: str, payload: str) -> None:
        if len(self._outbox) >= OUTBOX_LIMIT:
            self.metrics.transport_dropped.labels("redis").inc()
            return
        self._outbox.append((channel, payload, time.perf_counter()))
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
                pipe = self.client.pipeline(transaction=False)
                for channel, payload, _ in batch:
                    pipe.publish(channel, payload)
                pipe.execute()
            except FAILURES as exc:
                self.metrics.transport_dropped.labels("redis").inc(len(batch))
                self._failed("publish", exc)
                return
            now = time.perf_counter()
            histogram = self.metrics.adapter_publish_latency_ms.labels(self.metrics.port)
            histogram.observe((now - batch[0][2]) * 1000)

    # -- the pub/sub listener --------------------------------------------------

    def _listen_loop(self) -> None:
        backoff = 0.1
        first = True
        while not self._stopping:
            pubsub = None
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.keys.broadcast, self.keys.requests, self.keys.node_inbox(self.node_id))
                self._connected(first)
                first = False
                backoff = 0.1
                while not self._stopping:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["channel"], message["data"])
            except FAILURES as exc:
                self._listening = False
                self._failed("subscribe", exc)
                self.runtime.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug in dispatch must not end cross-node delivery
                self._listening = False
                logger.exception("error in the redis listener")
                self.runtime.sleep(backoff)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except FAILURES:
                        pass

    def _connected(self, first: bool) -> None:
        if not first:
            self._coming_back = True
        self._heartbeat(resync=True)
        self._listening = True
        if not first:
            self.metrics.transport_reconnections.labels("redis").inc()
            logger.info("redis reachable again; cross-node delivery resumed")
        self.healthy = True
        self.metrics.adapter_up.labels("redis").set(1)
        self._outbox_wakeup.set()

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        msg = c.decode(data)
        if msg is None:
            return
        if msg.get("node_id") == self.node_id:
            self.metrics.adapter_duplicates_suppressed.labels(self.metrics.port).inc()
            return
        if name == self.keys.broadcast:
            self._on_broadcast(msg)
        elif name == self.keys.requests:
            self._on_request(msg)
        else:
            self._on_response(msg)

    def _on_broadcast(self, msg: dict[str, Any]) -> None:
        app_id, text = msg.get("app_id"), msg.get("message")
        if not isinstance(app_id, str) or not isinstance(text, str):
            return
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
            channel = msg.get("channel")
            if isinstance(channel, str):
                sent = self.local.broadcast(app_id, channel, frame, except_id)
                if sent:
                    bound = self.metrics.app(app_id)
                    bound.ws_sent.inc(sent)
                    bound.bytes_sent.inc(sent * len(text))
        sent_ms = msg.get("timestamp_ms")
        if isinstance(sent_ms, (int, float)):
            latency_ms = max(0.0, time.time() * 1000 - sent_ms)
            self.metrics.adapter_receive_latency_ms.labels(self.metrics.port).observe(latency_ms)

    def _on_request(self, req: dict[str, Any]) -> None:
        kind, app_id = req.get("request_type"), req.get("app_id")
        if kind == c.NODE_DEAD and isinstance(req.get("dead_node_id"), str):
            self._forget_peer(req["dead_node_id"])
            return
        if not isinstance(app_id, str):
            return
        reply: dict[str, Any] = {"request_id": req.get("request_id"), "node_id": self.node_id, "app_id": app_id}
        if kind == c.CHANNEL_SOCKETS_COUNT:
            reply["sockets_count"] = self.local.subscriber_count(app_id, str(req.get("channel", "")))
        elif kind == c.CHANNELS_WITH_SOCKETS_COUNT:
            reply["channels_with_sockets_count"] = self.local.channels(app_id, str(req.get("prefix", "")))
        elif kind == c.SOCKETS_COUNT:
            reply["sockets_count"] = self.local.socket_count(app_id)
        elif kind == c.TERMINATE_USER:
            self.local.terminate_user(app_id, str(req.get("user_id")), int(req.get("code", 4009)),
                                      str(req.get("message", "")))
            return
        elif kind == c.WATCHLIST_NOTIFY and isinstance(req.get("message"), str):
            self.local.notify_watchers(app_id, str(req.get("user_id")), OutFrame(req["message"]))
            return
        else:
            return
        self.metrics.adapter_received_requests.labels(app_id, self.metrics.port).inc()
        reply_to = req.get("reply_to")
        if isinstance(reply_to, str) and reply_to.startswith(self.keys.prefix):
            self._publish(reply_to, c.encode(reply))

    def _on_response(self, reply: dict[str, Any]) -> None:
        entry = self._pending.get(str(reply.get("request_id")))
        node = reply.get("node_id")
        if entry is None or not isinstance(node, str):
            return
        pending, done = entry
        pending.replies[node] = reply
        self.metrics.adapter_received_responses.labels(str(reply.get("app_id")), self.metrics.port).inc()
        if pending.complete:
            done.set()

    # -- request/reply ------------------------------------------------------------

    def _query(self, app_id: str, request_type: str, **fields: Any) -> tuple[list[dict[str, Any]], bool]:
        """Ask every other live node; returns (replies, complete)."""
        if not self.healthy:
            self._partial(app_id, request_type)
            return [], False
        peers = set(self._peers)
        if not peers:
            return [], True
        request_id = uuid.uuid4().hex
        pending = c.PendingQuery(expected=peers)
        done = self.runtime.event()
        self._pending[request_id] = (pending, done)
        started = time.perf_counter()
        labels = (app_id, self.metrics.port)
        self.metrics.adapter_sent_requests.labels(*labels).inc()
        try:
            self._publish(self.keys.requests, c.encode({
                "request_id": request_id, "node_id": self.node_id, "app_id": app_id, "request_type": request_type,
                "reply_to": self.keys.node_inbox(self.node_id), **fields,
            }))
            done.wait(self._timeout)
        finally:
            self._pending.pop(request_id, None)
        self.metrics.adapter_resolve_time.labels(*labels).observe((time.perf_counter() - started) * 1000)
        if pending.complete:
            self.metrics.adapter_resolved.labels(*labels).inc()
        else:
            self.metrics.adapter_uncomplete.labels(*labels).inc()
            logger.warning(
                "cross-node query answered partially",
                extra={"app_id": app_id, "request_type": request_type,
                       "missing_nodes": sorted(pending.expected - set(pending.replies))},
            )
        return list(pending.replies.values()), pending.complete

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
        peer expected but absent from the set tells a reader that a presence list read from
        Redis may lack that peer's members (``presence_members_checked``)."""
        now_ms = int(time.time() * 1000)
        cutoff = now_ms - int(self.config.node_timeout * 1000)
        pipe = self.client.pipeline(transaction=False)
        pipe.zrangebyscore(self.keys.nodes, cutoff, "+inf")
        pipe.zrangebyscore(self.keys.nodes, "-inf", f"({cutoff}")
        pipe.info("server")
        live, dead, info = pipe.execute()
        now = time.monotonic()
        if self._coming_back:  # Redis answers again from now on (a frozen Redis held the call)
            self._coming_back = False
            self._back_since = now
        for n in live:
            self._peer_seen[n.decode() if isinstance(n, bytes) else n] = now
        self._peer_seen.pop(self.node_id, None)
        self._peer_seen = {n: t for n, t in self._peer_seen.items() if now - t < self.config.node_timeout}
        self._peers = set(self._peer_seen)
        self.metrics.cluster_nodes.set(len(self._peers) + 1)
        run_id = info.get("run_id") if isinstance(info, dict) else None
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
            self._cleanup_dead(node.decode() if isinstance(node, bytes) else node)

    def _node_dead_message(self, dead_node_id: str) -> str:
        return c.encode({"request_id": uuid.uuid4().hex, "node_id": self.node_id, "app_id": "",
                         "request_type": c.NODE_DEAD, "dead_node_id": dead_node_id})

    def _forget_peer(self, node_id: str) -> None:
        """``node_id`` is gone: stop counting on it, and stop waiting for its replies."""
        if node_id == self.node_id:
            return
        self._peers.discard(node_id)
        self._peer_seen.pop(node_id, None)
        self.metrics.cluster_nodes.set(len(self._peers) + 1)
        for pending, done in list(self._pending.values()):
            pending.expected.discard(node_id)
            if pending.complete:
                done.set()

    def _cleanup_dead(self, node_id: str) -> None:
        if node_id == self.node_id:
            return  # we were too slow to beat (a long pause); our holdings are still ours
        self._forget_peer(node_id)
        if not self.client.set(self.keys.cleanup_lock(node_id), self.node_id, nx=True, ex=60):
            return  # another survivor is on it
        logger.warning("node is dead; removing its sockets from the cluster", extra={"dead_node_id": node_id})
        # Queued ahead of the member_removed broadcasts, so peers have dropped the node
        # from their queries by the time clients see its members leave.
        self._publish(self.keys.requests, self._node_dead_message(node_id))
        released = self._release_all_holdings(node_id, notify=True)
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self.keys.nodes, node_id)
        for key in self.client.scan_iter(match=f"{self.keys.prefix}app:*:connections", count=500):
            pipe.hdel(key, node_id)
        pipe.execute()
        self.metrics.dead_nodes_cleaned.inc()
        logger.info("dead node removed", extra={"dead_node_id": node_id, "released": released})

    def _release_all_holdings(self, node_id: str, notify: bool) -> int:
        members = self.client.smembers(self.keys.holdings(node_id))
        count = 0
        for member in members:
            holding = c.Holding.from_member(member)
            if holding is None:
                continue
            if self._release_holding(holding, node_id, member) and notify:
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

    def _acquire(self, holding: c.Holding, info: str = "") -> bool | None:
        """True if this node made the count go 0→1; None when Redis could not be asked."""
        if not self.healthy:
            self._dirty = True
            return None
        keys, fld = holding.redis_keys(self.keys, self.node_id)
        try:
            return bool(self._acquire_script(keys=keys, args=[holding.member(), fld, info]))
        except FAILURES as exc:
            self._failed("acquire", exc)
            return None

    def _release_holding(self, holding: c.Holding, node_id: str, member: Any = None) -> bool:
        keys, fld = holding.redis_keys(self.keys, node_id)
        return bool(self._release_script(keys=keys, args=[member if member is not None else holding.member(), fld, ""]))

    def _release(self, holding: c.Holding) -> bool | None:
        """True if this node made the count go 1→0; None when Redis could not be asked (the
        caller then announces from this node's own answer, and the resync stays silent)."""
        if not self.healthy:
            self._dirty = True
            self._released_unsynced.add(holding.member())
            return None
        try:
            return self._release_holding(holding, self.node_id)
        except FAILURES as exc:
            self._failed("release", exc)
            self._released_unsynced.add(holding.member())
            return None

    def _desired_holdings(self) -> dict[str, tuple[c.Holding, str]]:
        desired: dict[str, tuple[c.Holding, str]] = {}
        for app_id, ns in list(self.local.namespaces.items()):
            for channel in list(ns.channels):
                h = c.Holding(c.HOLD_CHANNEL, app_id, channel)
                desired[h.member()] = (h, "")
            for channel, members in list(ns.presence.items()):
                for user_id, member in list(members.items()):
                    h = c.Holding(c.HOLD_PRESENCE, app_id, channel, user_id)
                    desired[h.member()] = (h, protocol.dumps(member.user_info))
            for user_id in list(ns.users):
                h = c.Holding(c.HOLD_USER, app_id, "", user_id)
                desired[h.member()] = (h, "")
        return desired

    def _resync(self) -> None:
        """Make Redis hold exactly this node's current state (after start, an outage or a
        Redis restart). Stale holdings are released, with events if they were the last —
        except those this node already announced when it released them during the outage."""
        self._dirty = False
        announced = set(self._released_unsynced)
        desired = self._desired_holdings()
        held = self.client.smembers(self.keys.holdings(self.node_id))
        current = {m.decode() if isinstance(m, bytes) else m for m in held}
        for member in current - set(desired):
            holding = c.Holding.from_member(member)
            if holding is not None and self._release_holding(holding, self.node_id, member) \
                    and member not in announced:
                self._notify_release(holding)
        for member, (holding, info) in desired.items():
            if member not in current or holding.kind == c.HOLD_PRESENCE:
                keys, fld = holding.redis_keys(self.keys, self.node_id)
                self._acquire_script(keys=keys, args=[member, fld, info])
        pipe = self.client.pipeline(transaction=False)
        for app_id, ns in list(self.local.namespaces.items()):
            pipe.hset(self.keys.connections(app_id), self.node_id, len(ns.sockets))
            self._connection_apps.add(app_id)
        for app_id in self._connection_apps - set(self.local.namespaces):
            pipe.hdel(self.keys.connections(app_id), self.node_id)
        pipe.execute()
        # Released now, or held again (then in ``desired``): either way settled. A release
        # that happened during this resync stays for the next one.
        self._released_unsynced -= announced

    def _connections_delta(self, app_id: str, delta: int) -> None:
        if not self.healthy:
            self._dirty = True
            return
        self._connection_apps.add(app_id)
        try:
            self.client.hincrby(self.keys.connections(app_id), self.node_id, delta)
        except FAILURES as exc:
            self._failed("connections", exc)

    # -- Adapter interface: sockets --------------------------------------------------

    def add_socket(self, app_id: str, conn: Connection) -> None:
        self.local.add_socket(app_id, conn)
        self._connections_delta(app_id, 1)

    def remove_socket(self, app_id: str, socket_id: str) -> None:
        had = self.local.socket_count(app_id)
        self.local.remove_socket(app_id, socket_id)
        if self.local.socket_count(app_id) < had:
            self._connections_delta(app_id, -1)

    def socket_count(self, app_id: str) -> int:
        """Open sockets of the app on every live node (for ``max_connections``)."""
        local = self.local.socket_count(app_id)
        if not self.healthy:
            return local
        try:
            counts = self.client.hgetall(self.keys.connections(app_id))
        except FAILURES as exc:
            self._failed("socket_count", exc)
            return local
        total = local
        for node, value in counts.items():
            node_id = node.decode() if isinstance(node, bytes) else node
            if node_id in self._peers:
                total += max(0, int(value))
        return total

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
                node_id = node.decode() if isinstance(node, bytes) else node
                if node_id in self._peers:
                    nodes[node_id] += max(0, int(value))
        return nodes

    def all_connections(self) -> list[Connection]:
        return self.local.all_connections()

    # -- channels -------------------------------------------------------------------

    def subscribe(self, app_id: str, channel: str, conn: Connection) -> tuple[int, bool]:
        count, first_here = self.local.subscribe(app_id, channel, conn)
        if not first_here:
            return count, False
        occupied = self._acquire(c.Holding(c.HOLD_CHANNEL, app_id, channel))
        return count, first_here if occupied is None else occupied

    def unsubscribe(self, app_id: str, channel: str, socket_id: str) -> tuple[int, bool]:
        remaining, last_here = self.local.unsubscribe(app_id, channel, socket_id)
        if not last_here:
            return remaining, False
        vacated = self._release(c.Holding(c.HOLD_CHANNEL, app_id, channel))
        return remaining, last_here if vacated is None else vacated

    def subscriber_count_checked(self, app_id: str, channel: str) -> tuple[int, bool]:
        replies, complete = self._query(app_id, c.CHANNEL_SOCKETS_COUNT, channel=channel)
        return c.merge_counts(self.local.subscriber_count(app_id, channel), replies), complete

    def subscriber_count(self, app_id: str, channel: str) -> int:
        return self.subscriber_count_checked(app_id, channel)[0]

    def channels_checked(self, app_id: str, prefix: str = "") -> tuple[dict[str, int], bool]:
        replies, complete = self._query(app_id, c.CHANNELS_WITH_SOCKETS_COUNT, prefix=prefix)
        return c.merge_channel_counts(self.local.channels(app_id, prefix), replies), complete

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
        self._publish(self.keys.broadcast, c.encode(envelope))
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
        if not self.healthy:
            self._partial(app_id, "presence_members")
            return members, False
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(self.keys.presence_info(app_id, channel))
            pipe.zrange(self.keys.nodes, 0, -1)
            stored, registered = pipe.execute()
        except FAILURES as exc:
            self._failed("presence_members", exc)
            self._partial(app_id, "presence_members")
            return members, False
        missing = set(self._peers) - {n.decode() if isinstance(n, bytes) else n for n in registered}
        if missing:
            self._partial(app_id, "presence_members", missing)
        merged: dict[str, Any] = {}
        for uid, info in stored.items():
            user_id = uid.decode() if isinstance(uid, bytes) else uid
            try:
                merged[user_id] = json.loads(info)
            except ValueError:
                merged[user_id] = {}
        merged.update(members)
        return merged, not missing

    # -- users ----------------------------------------------------------------------

    def add_user_socket(self, app_id: str, user_id: str, conn: Connection) -> bool:
        first_here = self.local.add_user_socket(app_id, user_id, conn)
        if not first_here:
            return False
        first = self._acquire(c.Holding(c.HOLD_USER, app_id, "", user_id))
        return first_here if first is None else first

    def remove_user_socket(self, app_id: str, user_id: str, socket_id: str) -> bool:
        last_here = self.local.remove_user_socket(app_id, user_id, socket_id)
        if not last_here:
            return False
        last = self._release(c.Holding(c.HOLD_USER, app_id, "", user_id))
        return last_here if last is None else last

    def user_online(self, app_id: str, user_id: str) -> bool:
        if self.local.user_online(app_id, user_id):
            return True
        if not self.healthy:
            return False
        try:
            return bool(self.client.hexists(self.keys.users(app_id), user_id))
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
        self._publish(self.keys.broadcast, c.encode(envelope))
        return sent

    def terminate_user(self, app_id: str, user_id: str, code: int, message: str) -> int:
        closed = self.local.terminate_user(app_id, user_id, code, message)
        self._publish(self.keys.requests, c.encode({
            "request_id": uuid.uuid4().hex, "node_id": self.node_id, "app_id": app_id,
            "request_type": c.TERMINATE_USER, "user_id": user_id, "code": code, "message": message,
        }))
        return closed

    # -- watchlist --------------------------------------------------------------------

    def watch(self, app_id: str, conn: Connection, user_ids: tuple[str, ...]) -> None:
        self.local.watch(app_id, conn, user_ids)

    def unwatch(self, app_id: str, conn: Connection, user_ids: tuple[str, ...]) -> None:
        self.local.unwatch(app_id, conn, user_ids)

    def notify_watchers(self, app_id: str, user_id: str, frame: OutFrame) -> int:
        sent = self.local.notify_watchers(app_id, user_id, frame)
        self._publish(self.keys.requests, c.encode({
            "request_id": uuid.uuid4().hex, "node_id": self.node_id, "app_id": app_id,
            "request_type": c.WATCHLIST_NOTIFY, "user_id": user_id, "message": frame.text,
        }))
        return sent
