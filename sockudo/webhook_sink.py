"""The server's webhook pipeline: lifecycle events in, signed deliveries out (spec §5.2-5.3).

``WebhookSink`` is the ``LifecycleSink`` the handler emits into. ``emit`` only appends to an
in-memory inbox (the handler never waits on Redis or HTTP); one pump greenlet (from the
injected runtime; this module imports no gevent) then

1. **debounces** ``channel_vacated`` / ``member_removed``: each leaves a pending marker and
   waits ``debounce_ms``; a ``channel_occupied`` / ``member_added`` for the same channel/member
   inside the window deletes the marker and both are dropped. With Redis the marker lives in
   Redis, so a leave on node A and a rejoin on node B cancel each other. When the window
   closes and the marker is still this leave's, the channel (member) is checked once more
   cluster-wide and the event sent only if it is still gone;
2. **batches** events per app for ``batching.duration`` ms or ``batching.size`` events;
3. **builds** one signed delivery per endpoint (only the event types it lists, after its
   filter) and hands them to the queue: RQ on Redis, or the in-process ``EmbeddedQueue``.

If Redis refuses an enqueue, deliveries wait in a bounded outbox and are retried every
second; only when that fills are they dropped (counted and logged).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .config import AppConfig, Config
from .webhook_delivery import (
    DEAD,
    RETRY,
    DeadLetters,
    MemoryDeadLetters,
    Sender,
    dead_letter_record,
    decide,
    log_attempt,
    post,
    record_metrics,
)
from .webhook_metrics import QueueCollector, QueueStats, WebhookMetrics
from .webhooks import (
    CANCELS,
    CHANNEL_VACATED,
    DEBOUNCED,
    MEMBER_REMOVED,
    Batch,
    Batcher,
    Delivery,
    WebhookEndpoint,
    WebhookSettings,
    build_deliveries,
    normalize_event,
    wanted_event_types,
)

logger = logging.getLogger(__name__)

OUTBOX_LIMIT = 100_000
OUTBOX_RETRY_S = 1.0
ENQUEUE_CHUNK = 500


class Runtime(Protocol):
    def spawn(self, fn: Callable[..., Any], *args: Any) -> Any: ...
    def sleep(self, seconds: float) -> None: ...
    def event(self) -> Any: ...


class DeliveryQueue(Protocol):
    backend: str

    def enqueue(self, deliveries: list[Delivery]) -> None: ...
    def stats(self) -> QueueStats: ...


class Markers(Protocol):
    def mark(self, key: str, token: str, ttl_ms: int) -> None: ...
    def cancel(self, key: str) -> bool: ...
    def release(self, key: str, token: str) -> bool: ...


class MemoryMarkers:
    """Pending-leave markers for one process (no Redis)."""

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}

    def mark(self, key: str, token: str, ttl_ms: int) -> None:
        self._tokens[key] = token

    def cancel(self, key: str) -> bool:
        return self._tokens.pop(key, None) is not None

    def release(self, key: str, token: str) -> bool:
        if self._tokens.get(key) == token:
            del self._tokens[key]
            return True
        return False


def marker_key(app_id: str, event: dict[str, Any]) -> str:
    """One key per channel (occupancy) or per channel member (presence); lengths keep it unambiguous."""
    channel = str(event.get("channel", ""))
    if event.get("name") in (MEMBER_REMOVED, "member_added"):
        user = str(event.get("user_id", ""))
        return f"m:{app_id}:{len(channel)}:{channel}:{user}"
    return f"c:{app_id}:{len(channel)}:{channel}"


@dataclass
class _Inbound:
    app: AppConfig
    event: dict[str, Any]
    time_ms: int
    debounced: bool = False  # already through the debounce: straight to the batch
    # Set by emit(): the marker was written / the cancel was tried on the handler's path, in the
    # same order as the cluster transitions themselves (doing it later, on the pump, let a
    # rejoin on another node miss a leave's marker and send a second channel_occupied).
    marker: tuple[str, str | None] | None = None
    cancelled: bool | None = None


class WebhookSink:
    def __init__(self, settings: WebhookSettings, queue: DeliveryQueue, metrics: WebhookMetrics, runtime: Runtime,
                 adapter: Any, markers: Markers, key_prefix: str, clock: Callable[[], float] = time.time,
                 failures: tuple[type[BaseException], ...] = (OSError,)) -> None:
        self.settings = settings
        self.queue = queue
        self.metrics = metrics
        self.runtime = runtime
        self.adapter = adapter
        self.markers = markers
        self.key_prefix = key_prefix
        self.clock = clock
        self.failures = failures  # what a Redis outage raises (RedisError, OSError)
        self.batcher = Batcher(settings.batching_enabled, settings.batching_duration_ms, settings.batching_size)
        self._inbox: deque[_Inbound] = deque()
        self._wake = runtime.event()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._apps: dict[str, AppConfig] = {}
        self._wanted: dict[str, tuple[tuple[WebhookEndpoint, ...], frozenset[str], frozenset[str]]] = {}
        self._outbox: deque[Delivery] = deque()
        self._outbox_retry_at = 0.0
        self._checks = 0  # debounce re-checks running
        self._last_enqueue_error_log = 0.0
        self._last_marker_error_log = 0.0
        self._started = False
        self._stopping = False

    # -- LifecycleSink --------------------------------------------------------------

    def emit(self, app: AppConfig, event: dict[str, Any]) -> None:
        """Called on the handler's path: a set lookup and an append, nothing that blocks."""
        entry = self._wanted.get(app.id)
        if entry is None or entry[0] is not app.webhooks:
            direct = frozenset().union(*(e.event_types for e in app.webhooks)) if app.webhooks else frozenset()
            entry = (app.webhooks, direct, wanted_event_types(app.webhooks))
            self._wanted[app.id] = entry
        name = event.get("name")
        if name not in entry[2]:
            return
        item = _Inbound(app, event, int(self.clock() * 1000))
        debounce = self.settings.debounce_ms
        if debounce > 0 and name in DEBOUNCED:
            key = marker_key(app.id, event)
            token: str | None = uuid.uuid4().hex
            try:
                self.markers.mark(key, token, debounce * 2 + 5000)
            except self.failures as exc:
                self._marker_trouble("not stored; deciding on this node alone", exc)
                token = None  # the timer must not look for a marker that was never written
            item.marker = (key, token)
        elif debounce > 0 and name in CANCELS:
            try:
                item.cancelled = self.markers.cancel(marker_key(app.id, {**event, "name": CANCELS[name]}))
            except self.failures as exc:
                self._marker_trouble("not readable; sending the event", exc)
                item.cancelled = False
        self._inbox.append(item)
        self._wake.set()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        start_queue = getattr(self.queue, "start", None)
        if start_queue is not None:
            start_queue()
        self.runtime.spawn(self._pump)

    def stop(self, timeout: float | None = None) -> None:
        """Let pending debounces finish (up to ``timeout``), then flush every batch to the queue."""
        if timeout is None:
            timeout = self.settings.debounce_ms / 1000.0 + 1.0
        deadline = self.clock() + timeout
        while (self._timers or self._inbox or self._checks) and self.clock() < deadline:
            self.runtime.sleep(0.05)
        self._stopping = True
        self._wake.set()
        self._step(force=True)
        if self._outbox:
            logger.error("webhook deliveries not enqueued at shutdown", extra={"count": len(self._outbox)})
        stop_queue = getattr(self.queue, "stop", None)
        if stop_queue is not None:
            stop_queue()

    # -- the pump -----------------------------------------------------------------------

    def _pump(self) -> None:
        while not self._stopping:
            self._wake.wait(self._next_timeout())
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._step()
            except Exception:  # a bug here must not end webhook delivery
                logger.exception("webhook pump step failed")

    def _next_timeout(self) -> float | None:
        candidates = []
        if self._timers:
            candidates.append(self._timers[0][0])
        due = self.batcher.next_due()
        if due is not None:
            candidates.append(due)
        if self._outbox:
            candidates.append(self._outbox_retry_at)
        if not candidates:
            return None
        return max(0.0, min(candidates) - self.clock())

    def _step(self, force: bool = False) -> None:
        while self._inbox:
            self._route(self._inbox.popleft())
        now = self.clock()
        while self._timers and (force or self._timers[0][0] <= now):
            _, _, fire = heapq.heappop(self._timers)
            fire()
        if force:
            while self._inbox:
                self._route(self._inbox.popleft())
        for batch in self.batcher.drain() if force else self.batcher.due(now):
            self._flush(batch)
        if self._outbox and (force or now >= self._outbox_retry_at):
            self._drain_outbox()

    def _route(self, item: _Inbound) -> None:
        app, event = item.app, item.event
        name = event.get("name")
        debounce = self.settings.debounce_ms
        if not item.debounced and debounce > 0:
            if name in DEBOUNCED:
                if item.marker is not None:
                    key, token = item.marker
                else:
                    key = marker_key(app.id, event)
                    token = uuid.uuid4().hex
                    try:
                        self.markers.mark(key, token, debounce * 2 + 5000)
                    except self.failures as exc:
                        self._marker_trouble("not stored; deciding on this node alone", exc)
                        token = None  # the timer must not look for a marker that was never written
                due = self.clock() + debounce / 1000.0
                heapq.heappush(self._timers, (due, next(self._seq), lambda: self._fire(item, key, token)))
                return
            if name in CANCELS:
                cancelled = item.cancelled
                if cancelled is None:
                    try:
                        cancelled = self.markers.cancel(marker_key(app.id, {**event, "name": CANCELS[name]}))
                    except self.failures as exc:
                        self._marker_trouble("not readable; sending the event", exc)
                        cancelled = False
                if cancelled:
                    self.metrics.debounce_cancelled.labels(app.id, CANCELS[name]).inc()
                    return
        if name not in self._wanted[app.id][1]:
            return  # only watched to cancel a debounced leave
        self._apps[app.id] = app
        for batch in self.batcher.add(app.id, normalize_event(event), item.time_ms, self.clock()):
            self._flush(batch)

    def _marker_trouble(self, what: str, exc: BaseException) -> None:
        now = self.clock()
        if now - self._last_marker_error_log > 10:
            self._last_marker_error_log = now
            logger.warning("webhook debounce marker %s: %s", what, exc)

    def _fire(self, item: _Inbound, key: str, token: str | None) -> None:
        """The debounce window closed: off the pump (the re-check may ask other nodes)."""
        self._checks += 1
        if self._stopping:
            self._check(item, key, token)
        else:
            self.runtime.spawn(self._check, item, key, token)

    def _check(self, item: _Inbound, key: str, token: str | None) -> None:
        try:
            try:
                pending = True if token is None else self.markers.release(key, token)
            except self.failures:
                pending = True  # Redis is away: decide on this node's view
            if not pending:
                return  # a rejoin cancelled it, or a newer leave owns the marker
            if not self._still_gone(item.app, item.event):
                self.metrics.debounce_cancelled.labels(item.app.id, str(item.event.get("name"))).inc()
                return
            item.debounced = True
            if self._stopping:
                self._route(item)
            else:
                self._inbox.append(item)
                self._wake.set()
        except Exception:
            logger.exception("webhook debounce check failed")
        finally:
            self._checks -= 1

    def _still_gone(self, app: AppConfig, event: dict[str, Any]) -> bool:
        """``channel_vacated`` only at a cluster-wide count of 0; ``member_removed`` only if the
        user is in no node's member list. When the check itself fails, send (spec §5.2)."""
        channel = str(event.get("channel", ""))
        try:
            if event.get("name") == CHANNEL_VACATED:
                return int(self.adapter.subscriber_count(app.id, channel)) == 0
            return str(event.get("user_id")) not in self.adapter.presence_members(app.id, channel)
        except Exception as exc:
            logger.warning("webhook debounce re-check failed; sending the event: %s", exc)
            return True

    # -- to the queue ---------------------------------------------------------------------

    def _flush(self, batch: Batch) -> None:
        app = self._apps.get(batch.app_id)
        if app is None:
            return
        deliveries = build_deliveries(app.id, app.key, app.secret, app.webhooks, self.settings, batch.time_ms,
                                      batch.events, prefix=self.key_prefix)
        if not deliveries:
            return
        if self._outbox:
            self._keep(deliveries)
            return
        self._enqueue(deliveries)

    def _enqueue(self, deliveries: list[Delivery]) -> bool:
        try:
            self.queue.enqueue(deliveries)
        except self.failures as exc:
            self.metrics.enqueue_failures.inc()
            now = self.clock()
            if now - self._last_enqueue_error_log > 10:
                self._last_enqueue_error_log = now
                logger.warning("webhook queue unreachable; keeping deliveries and retrying: %s", exc,
                               extra={"count": len(deliveries)})
            self._keep(deliveries)
            self._outbox_retry_at = now + OUTBOX_RETRY_S
            return False
        for delivery in deliveries:
            for name in delivery.event_names:
                self.metrics.queued.labels(delivery.app_id, name).inc()
        return True

    def _keep(self, deliveries: list[Delivery]) -> None:
        self._outbox.extend(deliveries)
        dropped = 0
        while len(self._outbox) > OUTBOX_LIMIT:
            lost = self._outbox.popleft()
            self.metrics.dropped.labels(lost.app_id).inc()
            dropped += 1
        if dropped:
            logger.error("webhook outbox full; oldest deliveries dropped", extra={"dropped": dropped})

    def _drain_outbox(self) -> None:
        while self._outbox:
            chunk = [self._outbox.popleft() for _ in range(min(ENQUEUE_CHUNK, len(self._outbox)))]
            if not self._enqueue(chunk):
                # _enqueue put the chunk at the back; restore the original order
                for _ in range(len(chunk)):
                    self._outbox.appendleft(self._outbox.pop())
                return
        logger.info("webhook queue reachable again; backlog enqueued")


# -- the in-process queue (no Redis) ---------------------------------------------------------


@dataclass
class _Job:
    delivery: Delivery
    attempt: int
    first_attempt_ms: float | None
    ready_since: float


class EmbeddedQueue:
    """Delivers from this process with the same policy as the RQ workers: ``concurrency``
    greenlets send, retries wait in sleeping greenlets, dead letters stay in memory.
    Nothing here survives a restart."""

    backend = "memory"

    def __init__(self, runtime: Runtime, metrics: WebhookMetrics | None, dead_letters: DeadLetters,
                 sender: Sender = post, clock: Callable[[], float] = time.time, concurrency: int = 20,
                 capacity: int = OUTBOX_LIMIT) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.dead_letters = dead_letters
        self.sender = sender
        self.clock = clock
        self.concurrency = concurrency
        self.capacity = capacity
        self._ready: deque[_Job] = deque()
        self._wake = runtime.event()
        self._delayed = 0
        self._active = 0
        self._stopping = False
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            for _ in range(self.concurrency):
                self.runtime.spawn(self._work)

    def stop(self, timeout: float = 2.0) -> None:
        """Give ready and running deliveries ``timeout`` seconds, then stop (retries waiting for
        their time are dropped: this queue does not survive a restart)."""
        deadline = self.clock() + timeout
        while (self._ready or self._active) and self.clock() < deadline:
            self.runtime.sleep(0.05)
        self._stopping = True
        self._wake.set()

    def enqueue(self, deliveries: list[Delivery]) -> None:
        now = self.clock()
        for delivery in deliveries:
            if len(self._ready) >= self.capacity:
                if self.metrics is not None:
                    self.metrics.dropped.labels(delivery.app_id).inc()
                logger.error("webhook queue full; delivery dropped",
                             extra={"app_id": delivery.app_id, "delivery_id": delivery.delivery_id})
                continue
            self._ready.append(_Job(delivery, 1, None, now))
        self._wake.set()

    def stats(self) -> QueueStats:
        oldest = self._ready[0].ready_since if self._ready else None
        age = max(0.0, self.clock() - oldest) if oldest is not None else 0.0
        return QueueStats(self.backend, "webhooks", {"ready": len(self._ready), "delayed": self._delayed,
                                                     "active": self._active,
                                                     "dead_letter": self.dead_letters.count()}, age)

    def _work(self) -> None:
        while not self._stopping:
            if not self._ready:
                self._wake.clear()
                self._wake.wait(1.0)
                continue
            job = self._ready.popleft()
            self._active += 1
            try:
                self._attempt(job)
            except Exception:
                logger.exception("webhook delivery attempt failed unexpectedly",
                                 extra={"app_id": job.delivery.app_id, "delivery_id": job.delivery.delivery_id})
            finally:
                self._active -= 1

    def _attempt(self, job: _Job) -> None:
        delivery = job.delivery
        first = job.first_attempt_ms if job.first_attempt_ms is not None else self.clock() * 1000
        http = self.sender(delivery)
        now_ms = self.clock() * 1000
        result = decide(delivery, job.attempt, first, now_ms, http)
        log_attempt(delivery, result)
        record_metrics(self.metrics, delivery, result, now_ms)
        if result.outcome == RETRY:
            self._delayed += 1
            self.runtime.spawn(self._later, (result.retry_in_ms or 0) / 1000.0,
                               _Job(delivery, job.attempt + 1, first, 0.0))
        elif result.outcome == DEAD:
            self.dead_letters.add(dead_letter_record(delivery, result.dead_reason or "", job.attempt, first, now_ms,
                                                     result.status, result.error))

    def _later(self, seconds: float, job: _Job) -> None:
        self.runtime.sleep(seconds)
        self._delayed -= 1
        job.ready_since = self.clock()
        self._ready.append(job)
        self._wake.set()


# -- composition -------------------------------------------------------------------------------


def uses_redis(config: Config) -> bool:
    driver = config.webhooks.queue_driver
    return driver == "redis" or (driver == "auto" and bool(config.redis_url or config.redis_sentinels))


def build_webhook_sink(config: Config, registry: Any, runtime: Runtime, adapter: Any) -> WebhookSink | None:
    """The sink for the composition root; None when no app has a webhook (the null sink stays)."""
    if not any(app.webhooks for app in config.apps):
        return None
    settings = config.webhooks
    prefix = config.metrics.prefix
    metrics = WebhookMetrics(registry, prefix)
    key_prefix = f"{config.redis_prefix}webhooks:"
    queue: Any
    markers: Markers
    failures: tuple[type[BaseException], ...] = (OSError,)
    if uses_redis(config):
        from redis.exceptions import RedisError

        from .adapter.redis import make_client
        from .webhook_queue import RedisMarkers, RqQueue

        client = make_client(config)
        queue = RqQueue(client, key_prefix, dead_letter_limit=settings.dead_letter_limit)
        markers = RedisMarkers(client, key_prefix)
        failures = (RedisError, OSError)
    else:
        queue = EmbeddedQueue(runtime, metrics, MemoryDeadLetters(settings.dead_letter_limit))
        markers = MemoryMarkers()
    registry.register(QueueCollector(queue.stats, prefix))
    logger.info("webhooks enabled", extra={"queue": queue.backend,
                                           "apps": [a.id for a in config.apps if a.webhooks]})
    return WebhookSink(settings, queue, metrics, runtime, adapter, markers, key_prefix, failures=failures)
