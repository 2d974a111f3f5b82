"""The worker process: RQ jobs run concurrently in one long-lived, gevent-patched process.

**Worker model.** ``PoolWorker`` is RQ's ``SimpleWorker`` (jobs run in the worker's own
process, no fork per job) with a bounded pool of greenlets: the main greenlet dequeues a job
whenever a pool slot is free and runs RQ's own ``perform_job`` for it in that slot, so up to
``concurrency`` jobs are in flight at once — each mostly waiting on its endpoint's answer.
Modules, configuration and HTTP connections (``sockudo.webhooks.delivery``'s keep-alive pool)
live as long as the process, not one job. RQ's job timeout is a
``gevent.Timeout`` in the job's greenlet (``GeventDeathPenalty``), not SIGALRM.

The pool serves the webhooks queue. ``ForkingWorker`` — RQ's forking worker, one work-horse
process per job, in a process that is not monkey-patched — serves other queues (push, whose
dispatcher has its own send concurrency) and ``--fork``.

**Metrics.** Each job leaves its outcome in ``job.meta``; the worker counts it after the job,
in its own registry served on ``WORKER_METRICS_PORT`` (the same path for jobs run by a plain
``rq worker``, whose forked work-horses share no registry).

**Stopping.** SIGTERM/SIGINT: no new job is taken, the jobs in flight finish (each bounded by
its job timeout), then the worker deregisters and exits. A second signal stops at once: the
jobs in flight are abandoned, and the reaper of another (or the next) worker puts them back.

**Crashed workers.** When the whole worker dies (``kill -9``, a lost machine), RQ only notices
after the job's heartbeat expires (≥ 60 s) *and* another worker runs its maintenance (every
10 min by default); its scheduler lock also stays taken for about a minute, stalling
scheduled retries. The ``Reaper`` fixes both, every ``reap_interval`` seconds, under a Redis
lock so one worker does it at a time:

- a ``workers.webhooks.deliver`` job still *started* whose lease key has expired (the lease
  outlives any legitimate attempt: an attempt is killed at ``job_timeout``) is put back at
  the front of its queue — the next attempt carries the same delivery id;
- scheduled jobs overdue by more than ``SCHEDULER_STALL_S`` (no scheduler is running them)
  are enqueued;
- jobs RQ moved to its FailedJobRegistry (crash allowance spent, or a bug) become dead
  letters, so every terminal failure is listed and replayable in one place.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import gevent.pool
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.exceptions import DequeueTimeout, NoSuchJobError
from rq.job import Job, JobStatus
from rq.scheduler import RQScheduler
from rq.timeouts import BaseDeathPenalty
from rq.worker import BaseWorker, DequeueStrategy, SimpleWorker

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

from . import DEFAULT_CONCURRENCY
from .webhooks import ATTEMPTS, FIRST_ATTEMPT_MS, OUTCOME, SLOTS_FIELD

logger = logging.getLogger(__name__)

STARTUP_GRACE_S = 5.0  # a just-started job may not have taken its lease yet
SCHEDULER_STALL_S = 10.0  # RQ's scheduler runs due jobs every second; this late means none runs
BATCH = 500
POLL_S = 1  # the main greenlet's longest wait (BLPOP, a full pool): how soon it sees a stop request
HEARTBEAT_S = 10.0  # the worker's own heartbeat while jobs keep coming (RQ's TTL is worker_ttl + 60 s)
WEBHOOKS_PREFIX = "webhooks:"  # the server keys its webhooks under "{redis prefix}webhooks:"


class _Sent:
    """A send under way in a :class:`GreenletExecutor` (what the push dispatcher needs of a
    future: ``add_done_callback`` and ``result`` once done), without the locks and condition a
    ``concurrent.futures.Future`` makes for each send."""

    __slots__ = ("_value", "_error", "_callbacks", "_done")

    def __init__(self) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Any], object]] = []
        self._done = False

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        if self._done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def result(self) -> Any:
        if not self._done:
            raise RuntimeError("the send has not finished")
        if self._error is not None:
            raise self._error
        return self._value

    def _finish(self, value: Any, error: BaseException | None) -> None:
        self._value, self._error, self._done = value, error, True
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                logger.exception("push send callback failed")


class GreenletExecutor:
    """The push provider clients' sends in the pooled worker: at most ``limit`` greenlets run
    submitted calls, the others wait their turn in order (``submit`` never blocks, like a
    thread pool's). A greenlet that finishes a call takes the next waiting one."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = max(1, limit)
        self.running = 0
        self.waiting: collections.deque[tuple[_Sent, Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self.closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> _Sent:
        if self.closed:
            raise RuntimeError("executor shut down")
        sent = _Sent()
        if self.running < self.limit:
            self.running += 1
            gevent.spawn(self._drain, sent, fn, args)
        else:
            self.waiting.append((sent, fn, args))
        return sent

    def _drain(self, sent: _Sent, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            while True:
                try:
                    value = fn(*args)
                except Exception as exc:
                    sent._finish(None, exc)
                except BaseException as exc:  # killed (GreenletExit): the send ends with it
                    sent._finish(None, exc)
                    raise
                else:
                    sent._finish(value, None)
                if not self.waiting:
                    return
                sent, fn, args = self.waiting.popleft()
        finally:
            self.running -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.closed = True
        if cancel_futures:
            while self.waiting:
                sent, _, _ = self.waiting.popleft()
                sent._finish(None, RuntimeError("executor shut down"))


class _Counting:
    """Turns the outcome a job left in its ``meta`` into this worker's metrics."""

    webhook_metrics: WebhookMetrics | None = None
    console: Any = None  # sockudo.console.relay.Reporter: attempts to the operator console, while one listens
    push_metrics: Any = None  # sockudo.push.metrics.PushMetrics: workers/push.py jobs leave their ops in meta

    def count_outcome(self, job: Job, meta: dict[str, Any]) -> None:
        try:
            if self.push_metrics is not None and (job.func_name or "").startswith("workers.push."):
                self.push_metrics.replay(meta.get("sockudo_push_metrics") or [])
            outcome = meta.get(OUTCOME)
            if self.webhook_metrics is not None and job.func_name == RQ_JOB and outcome:
                delivery, result = Delivery.from_payload(job.args[0]), AttemptResult.from_dict(outcome)
                record_metrics(self.webhook_metrics, delivery, result)
                if (self.console is not None and result.outcome != DEFERRED
                        and delivery.prefix.endswith(WEBHOOKS_PREFIX)):
                    redis_prefix = delivery.prefix[: -len(WEBHOOKS_PREFIX)]
                    self.console.report(console_channel(redis_prefix), console_event(delivery, result))
        except Exception:  # metrics must never stop the worker
            logger.exception("could not record job metrics", extra={"job_id": job.id})

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """RQ's version attaches the job's arguments (body, signature) to the log record; a JSON
        log handler would print them. Log the failure without them."""
        exc = exc_info[1] if len(exc_info) > 1 else None
        logger.error("job raised %s: %s", type(exc).__name__ if exc else "?", exc,
                     extra={"job_id": job.id, "queue": job.origin})


class ForkingWorker(_Counting, Worker):
    """RQ's forking worker (``rq worker --with-scheduler``: one work-horse process per job) with
    metrics: the horse leaves the outcome in the job's meta, this long-lived process counts it."""

    stop_signalled = False

    def request_stop(self, signum: Any, frame: Any) -> None:
        # RQ's idle worker stops by raising StopRequested without setting _stop_requested, so
        # run_worker could not tell a requested stop from a crash; remember the signal here.
        self.stop_signalled = True
        super().request_stop(signum, frame)

    def execute_job(self, job: Job, queue: Queue) -> None:
        super().execute_job(job, queue)
        try:
            meta = job.get_meta(refresh=True)
        except NoSuchJobError:
            return
        self.count_outcome(job, meta)


class GeventDeathPenalty(BaseDeathPenalty):
    """RQ's job timeout as a ``gevent.Timeout`` raised in the job's own greenlet (SIGALRM, RQ's
    default, would interrupt whichever greenlet happens to run)."""

    _timer: gevent.Timeout | None = None

    def setup_death_penalty(self) -> None:
        seconds = self._timeout if self._timeout and self._timeout > 0 else None
        self._timer = gevent.Timeout(seconds, self._exception(
            f"Task exceeded maximum timeout value ({self._timeout} seconds)"))
        self._timer.start()

    def cancel_death_penalty(self) -> None:
        if self._timer is not None:
            self._timer.close()


class _Running:
    """What RQ's worker asks of a scheduler's process, answered for a greenlet."""

    pid = None

    def __init__(self, greenlet: gevent.Greenlet) -> None:
        self.greenlet = greenlet

    def is_alive(self) -> bool:
        return not self.greenlet.dead

    def join(self, timeout: float | None = None) -> None:
        self.greenlet.join(timeout)


class GreenletScheduler(RQScheduler):
    """RQ's scheduler (due retries and deferrals back into their queue, once a second) in a
    greenlet of the worker process. RQ forks a process for it, but a fork of a gevent process
    copies every greenlet running at that moment — the jobs in flight, which would then run
    twice, and the metrics server."""

    def _install_signal_handlers(self) -> None:
        pass  # the worker's handlers stop it

    def start(self) -> _Running:
        self._status = self.Status.STARTED
        running = _Running(gevent.spawn(self._run))
        self._process = running  # type: ignore[assignment]
        return running

    def _run(self) -> None:
        try:
            self.work()
        except RedisError as exc:  # the worker's maintenance starts it again once it has the lock
            self.log.warning("scheduler stopped: Redis unavailable: %s", exc)
        except Exception:
            self.log.exception("scheduler failed")


class PoolWorker(_Counting, SimpleWorker):
    """RQ's ``SimpleWorker`` running up to ``concurrency`` jobs at once, one greenlet each
    (``--with-scheduler`` semantics, RQ's own ``perform_job`` bookkeeping per job)."""

    death_penalty_class = GeventDeathPenalty
    concurrency = DEFAULT_CONCURRENCY
    stop_signalled = False  # SIGTERM/SIGINT arrived: the loop ended on request, not on an error
    force_stop = False  # a second signal: leave the jobs in flight to the reaper

    def request_stop(self, signum: Any, frame: Any) -> None:
        # A signal handler runs in whichever greenlet is current: it only sets flags, and the
        # main greenlet (which wakes at least every POLL_S) acts on them.
        if self.stop_signalled:
            self.force_stop = True
        self.stop_signalled = True
        self._stop_requested = True

    def work(self, burst: bool = False, logging_level: str | None = None,
             date_format: str = DEFAULT_LOGGING_DATE_FORMAT, log_format: str = DEFAULT_LOGGING_FORMAT,
             max_jobs: int | None = None, max_idle_time: int | None = None,
             with_scheduler: bool = False, dequeue_strategy: DequeueStrategy = DequeueStrategy.DEFAULT) -> bool:
        """RQ's work loop, with the job run in a pool greenlet instead of inline; the loop takes
        the next job as soon as a pool slot is free. Returns whether any job ran."""
        self.bootstrap(logging_level, date_format, log_format)
        self._dequeue_strategy = dequeue_strategy
        # How many jobs this worker runs at once, beside RQ's fields (expires with the worker's
        # hash): the jobs' "auto" per-endpoint cap adds them up over the queue's workers.
        self.connection.hset(self.key, SLOTS_FIELD, self.concurrency)
        if with_scheduler:
            self._start_scheduler(burst, logging_level, date_format, log_format)
        self._install_signal_handlers()
        pool = gevent.pool.Pool(self.concurrency)
        self._running: dict[str, tuple[Job, Any]] = {}
        started = 0
        beat = time.monotonic()
        try:
            while not self._stop_requested:
                self.check_for_suspension(burst)
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                if time.monotonic() - beat >= HEARTBEAT_S:
                    self.heartbeat()
                    self._beat_running()
                    beat = time.monotonic()
                if pool.full():
                    pool.wait_available(timeout=POLL_S)
                    continue
                result = self._dequeue(None if burst else POLL_S)
                if result is None:
                    if burst:
                        pool.join()  # their retries may be due only later: burst means "the queue is empty"
                        if self._dequeue_peek():
                            continue
                        self.log.info("Worker %s: done, quitting", self.name)
                        break
                    continue
                job, queue = result
                pool.spawn(self._run, job, queue)
                started += 1
                if max_jobs is not None and started >= max_jobs:
                    break
            if self.force_stop:
                self.log.warning("Worker %s: cold shut down; %d jobs in flight are left to the reaper", self.name,
                                 len(pool))
                pool.kill(block=False)
                raise SystemExit(1)
            if len(pool):
                self.log.info("Worker %s: stopping after the %d jobs in flight", self.name, len(pool))
            while len(pool) and not self.force_stop:
                pool.join(timeout=POLL_S)
                if time.monotonic() - beat >= HEARTBEAT_S:
                    self.heartbeat()
                    self._beat_running()
                    beat = time.monotonic()
            if self.force_stop and len(pool):
                pool.kill(block=False)
                raise SystemExit(1)
        finally:
            if not self.force_stop:
                pool.join()
            self.teardown()
        return bool(started)

    def _start_scheduler(self, burst: bool = False, logging_level: str | None = "INFO",
                         date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
                         log_format: str = DEFAULT_LOGGING_FORMAT) -> None:
        """RQ's own, with the scheduler in a greenlet (``GreenletScheduler``)."""
        self.scheduler = GreenletScheduler(self.queues, connection=self.connection,
                                           logging_level=logging_level if logging_level is not None else self.log.level,
                                           date_format=date_format, log_format=log_format, serializer=self.serializer)
        self.scheduler.acquire_locks()
        if self.scheduler.acquired_locks:
            if burst:
                try:
                    self.scheduler.register_birth()
                    self.scheduler.enqueue_scheduled_jobs()
                finally:
                    self.scheduler.release_locks()
                    self.scheduler.register_death()
            else:
                self.scheduler.start()

    def stop_scheduler(self) -> None:
        if self.scheduler is not None and self.scheduler._process is not None:
            self.scheduler.request_stop()
            self.scheduler._process.join(timeout=self.scheduler.interval + 2)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # RQ's forking worker's, not SimpleWorker's (the whole job timeout + 60 s): a job left
        # 'started' by a worker that died (or lost Redis) expires from the started registry within
        # about 90 s, and RQ's maintenance then fails it into its retries, as with work-horses.
        return BaseWorker.get_heartbeat_ttl(self, job, working_time)

    def _beat_running(self) -> None:
        """What RQ's forking worker does while it waits for its horse: keep each running job's
        heartbeat (and its entry in the started registry) fresh."""
        for job, execution in list(self._running.values()):
            try:
                self.maintain_heartbeats(job, execution)
            except RedisError as exc:
                self.log.warning("Worker %s: could not renew job %s's heartbeat: %s", self.name, job.id, exc)
                return

    def _dequeue(self, timeout: int | None) -> tuple[Job, Queue] | None:
        try:
            result = self.queue_class.dequeue_any(self._ordered_queues, timeout, connection=self.connection,
                                                  job_class=self.job_class, serializer=self.serializer,
                                                  death_penalty_class=self.death_penalty_class)
        except DequeueTimeout:
            return None
        if result is not None:
            job, queue = result
            self.reorder_queues(reference_queue=queue)
            job.redis_server_version = self.get_redis_server_version()
            self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id)
        return result

    def _dequeue_peek(self) -> bool:
        return any(queue.count for queue in self.queues)

    def _run(self, job: Job, queue: Queue) -> None:
        """One job in a pool greenlet: RQ's execution record, perform, success/failure/retry."""
        try:
            execution = self.prepare_execution(job)
            self._running[job.id] = (job, execution)
            try:
                self.perform_job(job, queue, execution)
            finally:
                self._running.pop(job.id, None)
        except RedisError as exc:
            # RQ could not record the job's start or end. A webhook job still 'started' has a
            # lease that expires; the reaper then puts it back.
            self.log.error("Worker %s: job %s: Redis unavailable: %s", self.name, job.id, exc)
        self.count_outcome(job, job.meta)  # the job updated this very object's meta



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
        self._unstarted: dict[str, float] = {}  # job id -> when first seen dequeued but not started

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
            status = job.get_status(refresh=False)
            if status == JobStatus.STARTED:
                if job.func_name != RQ_JOB:
                    continue  # no lease to tell a dead worker's job from a running one
                if job.started_at is not None and now - job.started_at.timestamp() < STARTUP_GRACE_S:
                    continue
            elif status != JobStatus.QUEUED or not self._unstarted_for(job_id, now):
                # QUEUED in the started registry (any job: it never ran): its worker died
                # between RQ's two preparation steps.
                continue
            # Enqueue first: a crash between the steps leaves a stale entry (harmless, the job is
            # no longer 'started'), never a job that is nowhere.
            queue.enqueue_job(job, at_front=True)
            self.connection.zrem(registry.key, f"{job_id}:{execution_id}")
            self.connection.lrem(queue.intermediate_queue_key, 0, job_id)
            requeued += 1
            self._abandoned(job)
        # Dequeued (moved to RQ's intermediate list) by a worker that died before it registered
        # the job as started: RQ itself would fail it only after a minute or more.
        for raw in self.connection.lrange(queue.intermediate_queue_key, 0, BATCH - 1):
            job_id = raw.decode() if isinstance(raw, bytes) else raw
            if job_id in registry or self.connection.exists(LEASE_KEY.format(job_id=job_id)):
                continue  # started (the loop above watches it), or running
            try:
                job = Job.fetch(job_id, connection=self.connection)
            except NoSuchJobError:
                continue
            if job.get_status(refresh=False) != JobStatus.QUEUED or not self._unstarted_for(job_id, now):
                continue
            queue.enqueue_job(job, at_front=True)
            self.connection.lrem(queue.intermediate_queue_key, 0, job_id)
            requeued += 1
            self._abandoned(job)
        for job_id in [j for j, seen in self._unstarted.items() if now - seen > 60 * STARTUP_GRACE_S]:
            del self._unstarted[job_id]  # started normally meanwhile
        return requeued

    def _unstarted_for(self, job_id: str, now: float) -> bool:
        """Whether this reaper has seen the job dequeued but not started for STARTUP_GRACE_S (a
        live worker starts a dequeued job within milliseconds)."""
        first = self._unstarted.setdefault(job_id, now)
        if now - first < STARTUP_GRACE_S:
            return False
        del self._unstarted[job_id]
        return True

    def _abandoned(self, job: Job) -> None:
        if job.func_name != RQ_JOB:
            logger.warning("job abandoned by a dead worker before it started; requeued job_id=%s", job.id,
                           extra={"job_id": job.id, "queue": job.origin})
            return
        if self.metrics is not None:
            self.metrics.abandoned.inc()
        meta = job.meta or {}
        logger.warning("webhook job abandoned by a dead worker; requeued job_id=%s attempts=%s", job.id,
                       meta.get(ATTEMPTS), extra={"job_id": job.id, "attempt": meta.get(ATTEMPTS)})

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
               apps: Sequence[Any] = (), concurrency: int = DEFAULT_CONCURRENCY, pooled: bool = True) -> bool:
    """Run one worker until stopped (SIGTERM/SIGINT: warm shutdown, as ``rq worker``), running up
    to ``concurrency`` jobs at once (the pool) or one per forked work-horse.

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
    # Import push's modules and read the configuration once, before the first job. The pool runs
    # push jobs in this process: they count into this registry directly and send on greenlets.
    if pooled:
        push_jobs.preload(metrics=push_metrics, executor=GreenletExecutor)
    else:
        push_jobs.preload()
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
            worker_class = PoolWorker if pooled else ForkingWorker
            try:
                worker = worker_class(queues, connection=connection, name=_run_name(name, run), worker_ttl=60,
                                       # A short maintenance interval lets this worker take over RQ's scheduler
                                       # lock soon after the worker holding it died (the lock expires ~1 min
                                       # after its last beat).
                                       maintenance_interval=30)
            except RedisError as exc:  # RQ names its connection on creation: Redis is away (starting up?)
                logger.warning("worker could not reach Redis to register: %s; starting once Redis answers", exc)
                if not wait_for_redis(connection, stop):
                    return worked
                continue
            if isinstance(worker, PoolWorker):
                worker.concurrency = max(1, concurrency)
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
            except RedisError as exc:  # Redis went away (dequeueing, bookkeeping, teardown)
                logger.warning("worker %s ended without reaching Redis: %s", worker.name, exc)
                _quietly(worker.unsubscribe)
                _quietly(worker.stop_scheduler if worker.scheduler else lambda: None)
            except Exception:  # a bug in the loop: start a fresh worker rather than exit
                logger.exception("worker %s: work loop failed", worker.name)
                _quietly(worker.teardown)
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


def _install_stop_handlers(stop: threading.Event, worker: PoolWorker | ForkingWorker | None) -> None:
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
