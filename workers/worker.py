"""The webhook worker: RQ's forking ``Worker`` plus metrics and prompt crash recovery.

**Metrics.** Jobs run in forked work-horses, one per job; counting in the horse would need
prometheus-client's multiprocess mode and leave one file per horse pid. Instead the job
records its outcome in ``job.meta`` and this (long-lived) main process counts it after the
horse exits, into an ordinary registry served on ``WORKER_METRICS_PORT``.

**Crashed workers.** RQ recovers a job whose work-horse died while the worker lives (it
retries it from the job's crash allowance). When the whole worker dies (``kill -9``, a lost
machine), RQ only notices after the job's heartbeat expires (≥ 60 s) *and* another worker
runs its maintenance (every 10 min by default); its scheduler lock also stays taken for
about a minute, stalling scheduled retries. The ``Reaper`` thread fixes both, every
``reap_interval`` seconds, under a Redis lock so one worker does it at a time:

- a ``workers.webhooks.deliver`` job still *started* whose lease key has expired (the lease
  outlives any legitimate attempt: RQ kills an attempt at ``job_timeout``) is put back at
  the front of its queue — the next attempt carries the same delivery id;
- scheduled jobs overdue by more than ``SCHEDULER_STALL_S`` (no scheduler is running them)
  are enqueued;
- jobs RQ moved to its FailedJobRegistry (crash allowance spent, or a bug) become dead
  letters, so every terminal failure is listed and replayable in one place.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from sockudo.console.relay import Reporter, console_channel
from sockudo.webhooks.delivery import (
    DEFERRED,
    REASON_WORKER,
    AttemptResult,
    RedisDeadLetters,
    console_event,
    dead_letter_record,
    record_dead_lettered,
    record_metrics,
)
from sockudo.webhooks.metrics import WebhookMetrics
from sockudo.webhooks.model import LEASE_KEY, REAPER_LOCK_KEY, RQ_JOB, Delivery

from .webhooks import ATTEMPTS, FIRST_ATTEMPT_MS, OUTCOME

logger = logging.getLogger(__name__)

STARTUP_GRACE_S = 5.0  # a just-started job may not have taken its lease yet
SCHEDULER_STALL_S = 10.0  # RQ's scheduler runs due jobs every second; this late means none runs
BATCH = 500
WEBHOOKS_PREFIX = "webhooks:"  # the server keys its webhooks under "{redis prefix}webhooks:"


class WebhookWorker(Worker):
    """``rq worker`` semantics (fork per job, ``--with-scheduler``) with webhook metrics."""

    webhook_metrics: WebhookMetrics | None = None
    console: Any = None  # sockudo.console.relay.Reporter: attempts to the operator console, while one listens
    push_metrics: Any = None  # sockudo.push.metrics.PushMetrics: workers/push.py jobs leave their ops in meta
    stop_signalled = False  # SIGTERM/SIGINT arrived: the loop ended on request, not on an error

    def request_stop(self, signum: Any, frame: Any) -> None:
        # RQ's idle worker stops by raising StopRequested without setting _stop_requested, so
        # run_worker could not tell a requested stop from a crash; remember the signal here.
        self.stop_signalled = True
        super().request_stop(signum, frame)

    def execute_job(self, job: Job, queue: Queue) -> None:
        super().execute_job(job, queue)
        try:
            self._count(job)
            self._count_push(job)
        except Exception:  # metrics must never stop the worker
            logger.exception("could not record webhook metrics", extra={"job_id": job.id})

    def _count_push(self, job: Job) -> None:
        if self.push_metrics is None or not (job.func_name or "").startswith("workers.push."):
            return
        try:
            meta = job.get_meta(refresh=True)
        except NoSuchJobError:
            return
        self.push_metrics.replay(meta.get("sockudo_push_metrics") or [])

    def _count(self, job: Job) -> None:
        if self.webhook_metrics is None or job.func_name != RQ_JOB:
            return
        try:
            meta = job.get_meta(refresh=True)
        except NoSuchJobError:
            return
        outcome = meta.get(OUTCOME)
        if outcome:
            delivery, result = Delivery.from_payload(job.args[0]), AttemptResult.from_dict(outcome)
            record_metrics(self.webhook_metrics, delivery, result)
            if self.console is not None and result.outcome != DEFERRED and delivery.prefix.endswith(WEBHOOKS_PREFIX):
                redis_prefix = delivery.prefix[: -len(WEBHOOKS_PREFIX)]
                self.console.report(console_channel(redis_prefix), console_event(delivery, result))

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """RQ's version attaches the job's arguments (body, signature) to the log record; a JSON
        log handler would print them. Log the failure without them."""
        exc = exc_info[1] if len(exc_info) > 1 else None
        logger.error("webhook job raised %s: %s", type(exc).__name__ if exc else "?", exc,
                     extra={"job_id": job.id, "queue": job.origin})


class Reaper(threading.Thread):
    def __init__(self, connection: Any, queues: list[Queue], interval: float, metrics: WebhookMetrics | None,
                 owner: str) -> None:
        super().__init__(name="webhook-reaper", daemon=True)
        self.connection = connection
        self.queues = queues
        self.interval = interval
        self.metrics = metrics
        self.owner = owner
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            for queue in self.queues:
                try:
                    self.sweep(queue)
                except RedisError as exc:
                    logger.warning("webhook reaper: redis unavailable: %s", exc)
                except Exception:
                    logger.exception("webhook reaper sweep failed")

    def sweep(self, queue: Queue) -> None:
        lock = REAPER_LOCK_KEY.format(queue=queue.name)
        if not self.connection.set(lock, self.owner, nx=True, px=max(100, int(self.interval * 900))):
            return  # another worker sweeps this round
        self.requeue_abandoned(queue)
        self.enqueue_overdue(queue)
        self.dead_letter_failed(queue)

    def requeue_abandoned(self, queue: Queue, now: float | None = None) -> int:
        now = time.time() if now is None else now
        registry = queue.started_job_registry
        requeued = 0
        for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False)[:BATCH]:
            if self.connection.exists(LEASE_KEY.format(job_id=job_id)):
                continue
            try:
                job = Job.fetch(job_id, connection=self.connection)
            except NoSuchJobError:
                continue
            if job.func_name != RQ_JOB or job.get_status(refresh=False) != JobStatus.STARTED:
                continue
            if job.started_at is not None and now - job.started_at.timestamp() < STARTUP_GRACE_S:
                continue
            # Enqueue first: a crash between the two steps leaves a stale registry entry
            # (harmless, the job is no longer 'started'), never a job that is nowhere.
            queue.enqueue_job(job, at_front=True)
            self.connection.zrem(registry.key, f"{job_id}:{execution_id}")
            requeued += 1
            if self.metrics is not None:
                self.metrics.abandoned.inc()
            meta = job.meta or {}
            logger.warning("webhook job abandoned by a dead worker; requeued job_id=%s attempts=%s", job_id,
                           meta.get(ATTEMPTS), extra={"job_id": job_id, "attempt": meta.get(ATTEMPTS)})
        return requeued

    def enqueue_overdue(self, queue: Queue, now: float | None = None) -> int:
        now = time.time() if now is None else now
        registry = queue.scheduled_job_registry
        ids = self.connection.zrangebyscore(registry.key, 0, int(now - SCHEDULER_STALL_S), start=0, num=BATCH)
        moved = 0
        for raw in ids:
            job_id = raw.decode() if isinstance(raw, bytes) else raw
            try:
                job = Job.fetch(job_id, connection=self.connection)
            except NoSuchJobError:
                self.connection.zrem(registry.key, job_id)
                continue
            if job.func_name != RQ_JOB or not self.connection.zrem(registry.key, job_id):
                continue  # not ours, or a scheduler took it meanwhile
            queue.enqueue_job(job)
            moved += 1
        if moved:
            logger.warning("no RQ scheduler ran due webhook retries; enqueued %d of them", moved)
        return moved

    def dead_letter_failed(self, queue: Queue, now: float | None = None) -> int:
        now_ms = (time.time() if now is None else now) * 1000
        registry = queue.failed_job_registry
        moved = 0
        for job_id in registry.get_job_ids(0, BATCH - 1, cleanup=False):
            try:
                job = Job.fetch(job_id, connection=self.connection)
            except NoSuchJobError:
                registry.remove(job_id)
                continue
            if job.func_name != RQ_JOB:
                continue
            delivery = Delivery.from_payload(job.args[0])
            meta = job.meta or {}
            last = meta.get(OUTCOME) or {}
            record = dead_letter_record(delivery, REASON_WORKER, int(meta.get(ATTEMPTS, 0)), meta.get(FIRST_ATTEMPT_MS),
                                        now_ms, last.get("status"), last.get("error") or "job_failed")
            RedisDeadLetters(self.connection, delivery.prefix, delivery.dead_letter_limit).add(record)
            registry.remove(job, delete_job=True)
            moved += 1
            if self.metrics is not None:
                record_dead_lettered(self.metrics, delivery, REASON_WORKER)
            logger.error("webhook delivery failed, dead-lettered (worker_failure): app_id=%s attempt=%s delivery_id=%s",
                         delivery.app_id, meta.get(ATTEMPTS), delivery.delivery_id,
                         extra={"app_id": delivery.app_id, "delivery_id": delivery.delivery_id,
                                "attempt": meta.get(ATTEMPTS), "reason": REASON_WORKER})
        return moved


RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)  # waits between Redis probes while it is unreachable


def run_worker(connection: Any, queue_names: list[str], *, name: str | None = None, metrics_port: int | None = None,
               metrics_host: str = "0.0.0.0", reap_interval: float = 5.0, burst: bool = False,
               logging_level: str = "INFO", prefix: str = "sockudo_", labels: dict[str, str] | None = None,
               apps: Sequence[Any] = ()) -> bool:
    """Run one worker until stopped (SIGTERM/SIGINT: warm shutdown, as ``rq worker``).

    RQ's work loop retries a lost Redis only while it waits for a job; a connection error
    anywhere else (heartbeat, maintenance, preparing a job) ends the loop. A worker that
    exits when Redis restarts leaves every queued webhook and push waiting for an operator,
    so this function runs the loop again — with a fresh RQ ``Worker`` — once Redis answers.

    ``apps`` (the configuration's) get their outcome series at 0 from the start.
    """
    stop = threading.Event()
    _install_stop_handlers(stop, None)  # a SIGTERM while starting up is a stop, not a kill
    registry = CollectorRegistry()
    metrics = WebhookMetrics(registry, prefix)
    metrics.prepare(apps)
    queues = [Queue(n, connection=connection) for n in queue_names]
    from sockudo.push.metrics import PushMetrics

    from . import push as push_jobs

    push_metrics = PushMetrics(registry)
    push_metrics.prepare([app.id for app in apps])
    push_jobs.preload()  # work-horses are forked per job: import push's modules once, here
    if metrics_port is not None:
        from prometheus_client import make_wsgi_app

        from sockudo.metrics.labels import ConstantLabels
        from sockudo.metrics.listener import MetricsListener, serve_in_thread

        # The server's constant labels (environment, region, node, adapter) on every series.
        exposition = make_wsgi_app(ConstantLabels(registry, labels or {}))
        serve_in_thread(MetricsListener({"/metrics": exposition}), metrics_host, metrics_port)
        logger.info("worker metrics on :%d/metrics", metrics_port)
    console = Reporter(connection, f"worker {name or socket.gethostname()}:{os.getpid()}",
                       failures=(RedisError, OSError))
    worked = False
    reaper = None
    try:
        for run in itertools.count():
            # A restarted loop takes a new name: the old one may still be registered as alive.
            worker = WebhookWorker(queues, connection=connection, name=_run_name(name, run), worker_ttl=60,
                                   # A short maintenance interval lets this worker take over RQ's scheduler
                                   # lock soon after the worker holding it died (the lock expires ~1 min
                                   # after its last beat).
                                   maintenance_interval=30)
            worker.webhook_metrics = metrics
            worker.console = console
            worker.push_metrics = push_metrics
            if reaper is None and reap_interval > 0:
                reaper = Reaper(connection, queues, reap_interval, metrics, owner=f"{worker.name}:{os.getpid()}")
                reaper.start()
            # Until RQ installs its own handlers (after connecting and starting its scheduler), a
            # SIGTERM must still mean "stop": the flag makes RQ's loop end before its first job.
            _install_stop_handlers(stop, worker)
            if stop.is_set():
                return worked
            try:
                worked = bool(worker.work(burst=burst, with_scheduler=True, logging_level=logging_level)) or worked
            except RedisError as exc:  # teardown could not register the worker's death
                logger.warning("worker %s ended without reaching Redis: %s", worker.name, exc)
                _quietly(worker.unsubscribe)
            if burst or worker.stop_signalled or worker._stop_requested or stop.is_set():
                return worked
            logger.error("worker %s: RQ's work loop ended on an error (Redis unreachable?); starting it again "
                         "once Redis answers", worker.name)
            _install_stop_handlers(stop, None)
            if not wait_for_redis(connection, stop):
                return worked
    finally:
        if reaper is not None:
            reaper.stopped.set()
    return worked  # pragma: no cover - the loop only ends by returning


def wait_for_redis(connection: Any, stop: threading.Event, backoff: tuple[float, ...] = RESTART_BACKOFF_S) -> bool:
    """Block until ``PING`` succeeds (True) or ``stop`` is set (False)."""
    for attempt in itertools.count():
        try:
            connection.ping()
            return True
        except RedisError:
            pass
        if stop.wait(backoff[min(attempt, len(backoff) - 1)]):
            return False
    return False  # pragma: no cover


def _run_name(name: str | None, run: int) -> str | None:
    if run == 0:
        return name
    return f"{name or 'sockudo-worker'}.{os.getpid()}.r{run}"


def _install_stop_handlers(stop: threading.Event, worker: WebhookWorker | None) -> None:
    """Before a worker's loop and between two runs (RQ's handlers are bound to one Worker)."""
    def handler(signum: int, frame: Any) -> None:
        stop.set()
        if worker is not None:
            worker.stop_signalled = True
            worker._stop_requested = True  # RQ checks it at the top of every loop turn

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _quietly(fn: Any) -> None:
    try:
        fn()
    except Exception:  # best effort while Redis is away
        logger.debug("ignored error while tearing down a worker", exc_info=True)
