"""The Redis side of webhooks: the RQ queue ``webhooks`` and the cluster-wide debounce markers.

Jobs are enqueued by dotted path (``workers.webhooks.deliver``) with the delivery as a plain
dict: ``sockudo`` never imports ``workers``. Retries are RQ's own and scheduled, never
slept: after a retryable failure the job returns ``rq.Retry(interval=[wait])`` with the
policy's next wait (``rq worker --with-scheduler`` runs it when due). The ``Retry`` attached
at enqueue is a separate, small allowance for attempts lost to a crashed work-horse.
No gevent here.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rq import Queue, Retry
from rq.job import Job

from sockudo.services import Runtime
from sockudo.webhooks.delivery import (
    DEAD,
    RETRY,
    DeadLetters,
    RedisDeadLetters,
    Sender,
    console_event,
    dead_letter_record,
    decide,
    log_attempt,
    post,
    record_metrics,
)
from sockudo.webhooks.metrics import QueueStats, WebhookMetrics
from sockudo.webhooks.model import (
    RQ_JOB,
    RQ_QUEUE,
    Delivery,
    RetryPolicy,
    WebhookSettings,
    resign,
)

logger = logging.getLogger(__name__)

RESULT_TTL_S = 300  # a finished job is kept this long (the worker reads its outcome, then it expires)
FAILURE_TTL_S = 7 * 24 * 3600  # jobs RQ itself failed; the worker turns them into dead letters
# Retries RQ itself may spend when a work-horse dies mid-attempt or the job raises (a bug, a
# Redis hiccup). HTTP failures never use them: the job returns its own Retry for those.
CRASH_ALLOWANCE = 3
#: Deliveries the in-process queue holds (and the sink keeps while the queue is unreachable).
OUTBOX_LIMIT = 100_000
#: Attempts the in-process queue runs at once (greenlets of the server).
EMBEDDED_CONCURRENCY = 32


def rq_retry(policy: RetryPolicy) -> Retry:
    wait = policy.initial_backoff_ms / 1000.0
    return Retry(max=CRASH_ALLOWANCE, interval=[wait * (2 ** i) for i in range(CRASH_ALLOWANCE)])


def job_data(delivery: Delivery) -> Any:
    return Queue.prepare_data(
        RQ_JOB,
        args=(delivery.to_payload(),),
        timeout=delivery.job_timeout_s,
        result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S,
        # RQ logs the description; the default would print the body and the signature.
        description=f"webhook delivery {delivery.delivery_id} app {delivery.app_id}",
        retry=rq_retry(delivery.retry),
    )


class RqQueue:
    """Enqueues deliveries for RQ workers; one job per endpoint batch."""

    backend = "redis"

    def __init__(self, client: Any, prefix: str, name: str = RQ_QUEUE, dead_letter_limit: int = 10_000) -> None:
        self.client = client
        self.queue = Queue(name, connection=client)
        self.dead_letters = RedisDeadLetters(client, prefix, dead_letter_limit)

    def enqueue(self, deliveries: list[Delivery]) -> None:
        """Raises RedisError/OSError when Redis cannot take them; the caller keeps them."""
        if not deliveries:
            return
        with self.client.pipeline() as pipe:
            self.queue.enqueue_many([job_data(d) for d in deliveries], pipeline=pipe)
            pipe.execute()

    def stats(self) -> QueueStats:
        q = self.queue
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(q.key)
        pipe.zcard(q.scheduled_job_registry.key)
        pipe.zcard(q.started_job_registry.key)
        pipe.zcard(self.dead_letters.index_key)
        pipe.lindex(q.key, 0)
        ready, delayed, active, dead, head = pipe.execute()
        age = 0.0
        if head is not None:
            job_id = head.decode() if isinstance(head, bytes) else head
            enqueued = self.client.hget(Job.key_for(job_id), "enqueued_at")
            if enqueued:
                from rq.utils import utcparse

                age = max(0.0, time.time() - utcparse(enqueued.decode()).timestamp())
        return QueueStats(self.backend, q.name, {"ready": ready, "delayed": delayed, "active": active,
                                                 "dead_letter": dead}, age)


# -- debounce markers ------------------------------------------------------------------------


# -- the in-process queue (no Redis) ----------------------------------------------------------


class DeliveryQueue(Protocol):
    backend: str

    def enqueue(self, deliveries: list[Delivery]) -> None: ...
    def stats(self) -> QueueStats: ...


@dataclass
class _Job:
    delivery: Delivery
    attempt: int
    first_attempt_ms: float | None
    ready_since: float


def auto_endpoint_slots(total_slots: int) -> int:
    """``max_concurrent_per_endpoint = 0`` ("auto"): a quarter of the attempts that can run at
    once, at least 1, so a few slow endpoints cannot take every slot."""
    return max(1, total_slots // 4)


EndpointKey = tuple[str, str, str]  # app id, endpoint id, url: one webhook entry


def endpoint_key(delivery: Delivery) -> EndpointKey:
    return (delivery.app_id, delivery.endpoint, delivery.url)


class EmbeddedQueue:
    """Delivers from this process with the same policy as the RQ workers: ``concurrency``
    greenlets send, retries wait in sleeping greenlets, dead letters stay in memory.

    Each endpoint (webhook entry) has its own ready line and at most ``max_concurrent_per_endpoint``
    attempts in flight (0: ``auto_endpoint_slots(concurrency)``); the senders take endpoints in
    turn, so a slow endpoint's backlog waits in its own line while other endpoints' and other
    apps' deliveries go out. Every attempt is bounded by its endpoint's timeout as a whole
    (``delivery.post``). Nothing here survives a restart."""

    backend = "memory"

    def __init__(self, runtime: Runtime, metrics: WebhookMetrics | None, dead_letters: DeadLetters,
                 sender: Sender = post, clock: Callable[[], float] = time.time, concurrency: int = EMBEDDED_CONCURRENCY,
                 capacity: int = OUTBOX_LIMIT, tap: Any = None) -> None:
        self.runtime = runtime
        self.tap = tap  # the console's event tap (sockudo/console/tap.py), when there is one
        self.metrics = metrics
        self.dead_letters = dead_letters
        self.sender = sender
        self.clock = clock
        self.concurrency = concurrency
        self.capacity = capacity
        self._lines: dict[EndpointKey, deque[_Job]] = {}
        self._inflight: dict[EndpointKey, int] = {}
        self._turns: deque[EndpointKey] = deque()  # endpoints with a ready job and a free slot, each once
        self._queued = 0
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
        while (self._queued or self._active) and self.clock() < deadline:
            self.runtime.sleep(0.05)
        self._stopping = True
        self._wake.set()

    def enqueue(self, deliveries: list[Delivery]) -> None:
        now = self.clock()
        for delivery in deliveries:
            if self._queued >= self.capacity:
                if self.metrics is not None:
                    self.metrics.dropped.labels(delivery.app_id, delivery.endpoint_label).inc()
                logger.error("webhook queue full; delivery dropped",
                             extra={"app_id": delivery.app_id, "delivery_id": delivery.delivery_id})
                continue
            self._push(_Job(delivery, 1, None, now))
        self._wake.set()

    def stats(self) -> QueueStats:
        heads = [line[0].ready_since for line in self._lines.values() if line]
        age = max(0.0, self.clock() - min(heads)) if heads else 0.0
        return QueueStats(self.backend, "webhooks", {"ready": self._queued, "delayed": self._delayed,
                                                     "active": self._active,
                                                     "dead_letter": self.dead_letters.count()}, age)

    def slots(self, delivery: Delivery) -> int:
        return delivery.max_concurrent if delivery.max_concurrent > 0 else auto_endpoint_slots(self.concurrency)

    def _push(self, job: _Job) -> None:
        key = endpoint_key(job.delivery)
        line = self._lines.setdefault(key, deque())
        line.append(job)
        self._queued += 1
        if len(line) == 1:
            self._offer(key, job.delivery)

    def _offer(self, key: EndpointKey, delivery: Delivery) -> None:
        """Give the endpoint a turn if it has a ready job and a free slot (and no turn yet)."""
        line = self._lines.get(key)
        if line and self._inflight.get(key, 0) < self.slots(delivery) and key not in self._turns:
            self._turns.append(key)

    def take(self) -> _Job | None:
        """The next job to attempt (its endpoint's slot taken), endpoints in turn; None when
        every endpoint with ready jobs is at its cap."""
        if not self._turns:
            return None
        key = self._turns.popleft()
        line = self._lines[key]
        job = line.popleft()
        self._queued -= 1
        self._inflight[key] = self._inflight.get(key, 0) + 1
        if line:
            self._offer(key, job.delivery)
        else:
            del self._lines[key]
        return job

    def done(self, job: _Job) -> None:
        """Release the job's endpoint slot."""
        key = endpoint_key(job.delivery)
        left = self._inflight.get(key, 1) - 1
        if left > 0:
            self._inflight[key] = left
        else:
            self._inflight.pop(key, None)
        self._offer(key, job.delivery)
        if self._turns:
            self._wake.set()

    def _work(self) -> None:
        while not self._stopping:
            job = self.take()
            if job is None:
                self._wake.clear()
                self._wake.wait(1.0)
                continue
            self._active += 1
            try:
                self._attempt(job)
            except Exception:
                logger.exception("webhook delivery attempt failed unexpectedly",
                                 extra={"app_id": job.delivery.app_id, "delivery_id": job.delivery.delivery_id})
            finally:
                self._active -= 1
                self.done(job)

    def _attempt(self, job: _Job) -> None:
        delivery = job.delivery
        first = job.first_attempt_ms if job.first_attempt_ms is not None else self.clock() * 1000
        http = self.sender(delivery)
        now_ms = self.clock() * 1000
        result = decide(delivery, job.attempt, first, now_ms, http)
        log_attempt(delivery, result)
        record_metrics(self.metrics, delivery, result, now_ms)
        if self.tap is not None and self.tap.attached:
            fields = console_event(delivery, result)
            self.tap.record(fields.pop("app"), fields.pop("kind"), **fields)
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
        self._push(job)
        self._wake.set()



# -- replaying a dead letter (the CLI and the console) -------------------------------------------


def replay_dead_letter(queue: Any, record: dict[str, Any], app_key: str, app_secret: str,
                       settings: WebhookSettings, prefix: str, now_ms: int) -> Delivery:
    """Enqueue a dead letter again (``model.resign``: today's secret, a fresh ``time_ms`` and
    retry budget, the same delivery id), then remove it; a new failure writes a new one."""
    delivery = resign(record, app_key, app_secret, now_ms, settings, prefix)
    queue.enqueue([delivery])
    queue.dead_letters.remove(record["id"])
    return delivery
