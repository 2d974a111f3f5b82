"""The server's webhook pipeline: lifecycle events in, signed deliveries out.

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
3. **builds** one signed delivery per endpoint, i.e. per configured entry even when entries
   share a URL (only the event types it lists, after its filter), and hands them to the queue:
   RQ on Redis, or the in-process ``EmbeddedQueue``.

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
from typing import Any

from sockudo.config import AppConfig, Config
from sockudo.redis import RedisClients, queue_configured
from sockudo.services import Runtime
from sockudo.webhooks.delivery import (
    MemoryDeadLetters,
)
from sockudo.webhooks.markers import Markers, MemoryMarkers, marker_key
from sockudo.webhooks.metrics import QueueCollector, WebhookMetrics
from sockudo.webhooks.model import (
    CANCELS,
    CHANNEL_VACATED,
    DEBOUNCED,
    Batch,
    Batcher,
    Delivery,
    WebhookEndpoint,
    WebhookSettings,
    build_deliveries,
    duplicate_endpoints,
    normalize_event,
    redact_url,
    wanted_event_types,
)
from sockudo.webhooks.queue import OUTBOX_LIMIT, DeliveryQueue, EmbeddedQueue

logger = logging.getLogger(__name__)

OUTBOX_RETRY_S = 1.0
ENQUEUE_CHUNK = 500












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
                 failures: tuple[type[BaseException], ...] = (OSError,), tap: Any = None) -> None:
        self.settings = settings
        self.tap = tap  # the console's event tap (sockudo/console/tap.py), when there is one
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
            item.marker = self._mark(app.id, event)
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

    def readiness_probe(self) -> Callable[[], object]:
        return self.queue.stats

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

    def _mark(self, app_id: str, event: dict[str, Any]) -> tuple[str, str | None]:
        """Leave this leave's pending marker for the debounce window; ``(key, token)``, the token
        None when the marker could not be stored (the timer must not look for it then)."""
        key = marker_key(app_id, event)
        token = uuid.uuid4().hex
        try:
            self.markers.mark(key, token, self.settings.debounce_ms * 2 + 5000)
        except self.failures as exc:
            self._marker_trouble("not stored; deciding on this node alone", exc)
            return key, None
        return key, token

    def _route(self, item: _Inbound) -> None:
        app, event = item.app, item.event
        name = event.get("name")
        debounce = self.settings.debounce_ms
        if not item.debounced and debounce > 0:
            if name in DEBOUNCED:
                key, token = item.marker if item.marker is not None else self._mark(app.id, event)
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
        user is in no node's member list. When the check itself fails, send."""
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
        tap = self.tap
        for delivery in deliveries:
            for name in delivery.event_names:
                self.metrics.queued.labels(delivery.app_id, delivery.endpoint_label, name).inc()
            if tap is not None and tap.attached:
                tap.record(delivery.app_id, "webhook", status="queued", delivery_id=delivery.delivery_id,
                           events=list(delivery.event_names), endpoint=delivery.endpoint or None,
                           url=redact_url(delivery.url))
        return True

    def _keep(self, deliveries: list[Delivery]) -> None:
        self._outbox.extend(deliveries)
        dropped = 0
        while len(self._outbox) > OUTBOX_LIMIT:
            lost = self._outbox.popleft()
            self.metrics.dropped.labels(lost.app_id, lost.endpoint_label).inc()
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






# -- composition -------------------------------------------------------------------------------


def uses_redis(config: Config) -> bool:
    driver = config.webhooks.queue_driver
    return driver == "redis" or (driver == "auto" and queue_configured(config))


def warn_duplicate_endpoints(config: Config) -> None:
    """One warning per webhook entry configured identically to an earlier one of the same app:
    its events are delivered once, by the earlier entry. Names the entries by index (the URL may
    carry credentials)."""
    for app in config.apps:
        for index, original in duplicate_endpoints(app.webhooks):
            logger.warning("app %s: webhooks[%d] is configured identically to webhooks[%d]; "
                           "its events are delivered once", app.id, index, original,
                           extra={"app_id": app.id})


def build_webhook_sink(config: Config, registry: Any, runtime: Runtime, adapter: Any,
                       clients: RedisClients | None = None, tap: Any = None) -> WebhookSink | None:
    """The sink for the composition root; None when no app has a webhook (the null sink stays).

    The webhook metrics exist either way, at 0 for every app, and with a Redis queue its depth
    is reported too: dashboards and alerts have data before the first app gets a webhook."""
    settings = config.webhooks
    prefix = config.metrics.prefix
    metrics = WebhookMetrics(registry, prefix)
    metrics.prepare(config.apps)
    key_prefix = f"{config.redis_prefix}webhooks:"
    enabled = any(app.webhooks for app in config.apps)
    queue: Any
    markers: Markers
    failures: tuple[type[BaseException], ...] = (OSError,)
    if uses_redis(config):
        from redis.exceptions import RedisError

        from sockudo.webhooks.markers import RedisMarkers
        from sockudo.webhooks.queue import RqQueue

        client = (clients or RedisClients(config)).queue  # RQ and the markers its jobs read: one Redis
        queue = RqQueue(client, key_prefix, dead_letter_limit=settings.dead_letter_limit)
        registry.register(QueueCollector(queue.stats, prefix))
        if not enabled:
            return None
        markers = RedisMarkers(client, key_prefix)
        failures = (RedisError, OSError)
    elif not enabled:
        return None
    else:
        queue = EmbeddedQueue(runtime, metrics, MemoryDeadLetters(settings.dead_letter_limit), tap=tap)
        markers = MemoryMarkers()
        registry.register(QueueCollector(queue.stats, prefix))
    warn_duplicate_endpoints(config)
    logger.info("webhooks enabled", extra={"queue": queue.backend,
                                           "apps": [a.id for a in config.apps if a.webhooks]})
    return WebhookSink(settings, queue, metrics, runtime, adapter, markers, key_prefix, failures=failures, tap=tap)
