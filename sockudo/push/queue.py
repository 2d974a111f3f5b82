"""Where push jobs go: the RQ queue ``push`` (durable, run by ``python -m workers push``) or, without
Redis, an in-process queue (embedded mode: not durable — a restart loses queued work).

Jobs are enqueued by dotted path (``workers.push.plan`` / ``workers.push.dispatch``) with a job
record id as their only argument; the record itself (devices, attempt numbers) lives in the push
store, so a job can be re-enqueued at any time without losing or duplicating deliveries.
"""

from __future__ import annotations

import logging
import math
import queue as stdqueue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)

PLAN_JOB = "workers.push.plan"
DISPATCH_JOB = "workers.push.dispatch"
JOB_TIMEOUT_S = 900  # a whole batch; each provider request has its own (much shorter) timeout


class RqPushQueue:
    backend = "redis"

    def __init__(self, client: Any, name: str = "push") -> None:
        from rq import Queue

        self.client = client
        self.name = name
        self.queue = Queue(name, connection=client)

    def enqueue(self, func: str, batch_id: str, at_ms: int | None = None) -> str:
        options: dict[str, Any] = {
            "job_timeout": JOB_TIMEOUT_S,
            "result_ttl": 60,
            "failure_ttl": 86_400,
            "description": f"push {func.rsplit('.', 1)[-1]} {batch_id}",
        }
        if at_ms is not None and at_ms > time.time() * 1000 + 5:
            # RQ keeps whole seconds (it truncates): round up so the job never runs early.
            when = datetime.fromtimestamp(math.ceil(at_ms / 1000), UTC)
            job = self.queue.enqueue_at(when, func, batch_id, **options)
        else:
            job = self.queue.enqueue(func, batch_id, **options)
        return str(job.id)

    def job_state(self, job_id: str | None) -> str:
        """``queued`` (waiting its turn in the queue), ``scheduled`` (waiting for its time) or
        ``other``. A job whose status says queued but that is not in the queue's list is
        ``other``: a worker took it and died (or lost Redis) before RQ marked it started, and
        nothing would ever run it again."""
        if not job_id:
            return "other"
        from rq.exceptions import NoSuchJobError
        from rq.job import Job, JobStatus

        try:
            status = Job.fetch(job_id, connection=self.client).get_status(refresh=False)
        except NoSuchJobError:
            return "other"
        if status == JobStatus.QUEUED:
            return "queued" if self.client.lpos(self.queue.key, job_id) is not None else "other"
        if status == JobStatus.DEFERRED:
            return "queued"
        return "scheduled" if status == JobStatus.SCHEDULED else "other"


class InProcessQueue:
    """Embedded mode: a few worker threads (greenlets under the server's monkey-patching) and
    timers for scheduled jobs. Not durable."""

    backend = "memory"

    def __init__(self, run: Callable[[str], None], workers: int = 4) -> None:
        self.run = run
        self.jobs: stdqueue.Queue[str | None] = stdqueue.Queue()
        self.threads: list[threading.Thread] = []
        self.timers: set[threading.Timer] = set()
        self.lock = threading.Lock()
        self.workers = workers
        self.counter = 0

    def start(self) -> None:
        if self.threads:
            return
        for i in range(self.workers):
            t = threading.Thread(target=self._loop, name=f"push-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        with self.lock:
            for timer in self.timers:
                timer.cancel()
            self.timers.clear()
        for _ in self.threads:
            self.jobs.put(None)
        self.threads = []

    def _loop(self) -> None:
        while True:
            batch_id = self.jobs.get()
            if batch_id is None:
                return
            try:
                self.run(batch_id)
            except Exception:
                logger.exception("push job failed", extra={"batch_id": batch_id})

    def enqueue(self, func: str, batch_id: str, at_ms: int | None = None) -> str:
        self.start()
        with self.lock:
            self.counter += 1
            job_id = f"mem-{self.counter}"
        delay = ((at_ms or 0) - time.time() * 1000) / 1000
        if delay > 0:
            timer: threading.Timer

            def fire() -> None:
                with self.lock:
                    self.timers.discard(timer)
                self.jobs.put(batch_id)

            timer = threading.Timer(delay, fire)
            timer.daemon = True
            with self.lock:
                self.timers.add(timer)
            timer.start()
        else:
            self.jobs.put(batch_id)
        return job_id

    def job_state(self, job_id: str | None) -> str:
        return "queued"  # nothing to take over in one process
