"""The webhook job and the reaper (real Redis + RQ, no worker process): retries, dead letters,
deferral on a busy endpoint, crash recovery."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import redis
from prometheus_client import CollectorRegistry
from rq import Queue, Retry
from rq.job import Job, JobStatus

from sockudo.webhooks.delivery import (
    EndpointSlots,
)
from sockudo.webhooks.metrics import WebhookMetrics
from sockudo.webhooks.model import (
    LEASE_KEY,
    RetryPolicy,
)
from sockudo.webhooks.queue import CRASH_ALLOWANCE, RqQueue
from tests.unit.webhooks.helpers import (
    Receiver,
    a_delivery,
    local_delivery,
)


def test_the_job_returns_a_scheduled_retry_then_dead_letters(receiver: Receiver, rclient: redis.Redis) -> None:
    """``deliver`` run by RQ's SimpleWorker in this process (no fork): 503 → a returned Retry
    with the policy's wait; 404 → a dead letter and a finished job."""
    from rq import SimpleWorker

    from workers.webhooks import ATTEMPTS, OUTCOME

    receiver.statuses[:] = [503, 404]
    queue = RqQueue(rclient, "p:")
    d = local_delivery(receiver.port)
    queue.enqueue([d])
    worker = SimpleWorker([queue.queue], connection=rclient)
    worker.work(burst=True)
    (job_id,) = queue.queue.scheduled_job_registry.get_job_ids()
    job = Job.fetch(job_id, connection=rclient)
    assert job.get_status() == JobStatus.SCHEDULED and job.meta[ATTEMPTS] == 1
    assert job.meta[OUTCOME]["outcome"] == "retry" and rclient.exists(LEASE_KEY.format(job_id=job_id))
    queue.queue.scheduled_job_registry.remove(job)
    queue.queue.enqueue_job(job)
    worker.work(burst=True)
    assert Job.fetch(job_id, connection=rclient).get_status() == JobStatus.FINISHED
    (letter,) = queue.dead_letters.list()
    assert (letter["reason"], letter["status"], letter["attempts"], letter["delivery_id"]) == (
        "permanent_failure", 404, 2, d.delivery_id)
    assert [dict(h)["X-Sockudo-Delivery-Id"] for _, h, _ in receiver.requests] == [d.delivery_id] * 2


def test_reaper_recovers_abandoned_overdue_and_failed_jobs(rclient: redis.Redis) -> None:
    from workers.worker import Reaper

    queue = RqQueue(rclient, "p:")
    registry = CollectorRegistry()
    reaper = Reaper(rclient, [queue.queue], 1.0, WebhookMetrics(registry), owner="test")
    rq_queue: Queue = queue.queue

    # A job its worker died on: started 10 s ago, no lease.
    queue.enqueue([a_delivery(), a_delivery()])
    dead_job, live_job = (Job.fetch(i, connection=rclient) for i in rq_queue.job_ids)
    rclient.delete(rq_queue.key)
    started = datetime.now(UTC) - timedelta(seconds=10)
    for job in (dead_job, live_job):
        job.set_status(JobStatus.STARTED)
        job.started_at = started
        job.save()
        rclient.zadd(rq_queue.started_job_registry.key, {f"{job.id}:exec": time.time() + 100})
    rclient.set(LEASE_KEY.format(job_id=live_job.id), "1", px=10_000)
    assert reaper.requeue_abandoned(rq_queue) == 1
    assert rq_queue.job_ids == [dead_job.id]
    assert registry.get_sample_value("sockudo_webhooks_abandoned_jobs_total") == 1

    # A retry no scheduler ran.
    rclient.delete(rq_queue.key)
    rq_queue.schedule_job(dead_job, datetime.now(UTC) - timedelta(seconds=30))
    assert reaper.enqueue_overdue(rq_queue) == 1 and rq_queue.job_ids == [dead_job.id]

    # A job RQ failed (crash allowance spent): becomes a dead letter.
    rclient.delete(rq_queue.key)
    rq_queue.failed_job_registry.add(dead_job, ttl=100, exc_string="boom")
    assert reaper.dead_letter_failed(rq_queue) == 1
    (letter,) = queue.dead_letters.list()
    assert letter["reason"] == "worker_failure" and rq_queue.failed_job_registry.count == 0


def test_a_busy_endpoint_defers_the_job_without_an_attempt(receiver: Receiver, rclient: redis.Redis) -> None:
    """All the endpoint's slots taken: the job makes no request, counts no attempt, keeps its
    crash allowance and comes back ~1 s later through RQ's scheduler (same job, same delivery id).
    Once a slot is free it is delivered, as attempt 1."""
    from rq import SimpleWorker

    from workers.webhooks import ATTEMPTS, DEFERRALS, OUTCOME

    queue = RqQueue(rclient, "p:")
    d = replace(local_delivery(receiver.port), max_concurrent=1)
    queue.enqueue([d])
    (job_id,) = queue.queue.job_ids
    slots = EndpointSlots(rclient)
    (held,) = [slots.acquire(d, 1, "another-attempt", 10_000)]
    assert held is not None
    worker = SimpleWorker([queue.queue], connection=rclient)
    before = time.time()
    worker.work(burst=True)
    assert receiver.requests == []
    job = Job.fetch(job_id, connection=rclient)
    assert job.get_status() == JobStatus.SCHEDULED and job.id in queue.queue.scheduled_job_registry.get_job_ids()
    assert job.meta.get(ATTEMPTS) is None and job.meta[DEFERRALS] == 1 and job.meta[OUTCOME]["outcome"] == "deferred"
    assert job.retries_left == CRASH_ALLOWANCE
    due = rclient.zscore(queue.queue.scheduled_job_registry.key, job_id)
    assert due is not None and before <= due <= time.time() + 2  # ~1 s, not the retry policy's backoff
    assert not rclient.exists(LEASE_KEY.format(job_id=job_id))
    assert rclient.get(held) == b"another-attempt"  # the holder's slot is untouched

    slots.release(held, "another-attempt")
    queue.queue.scheduled_job_registry.remove(job)
    queue.queue.enqueue_job(job)
    worker.work(burst=True)
    job = Job.fetch(job_id, connection=rclient)
    assert job.get_status() == JobStatus.FINISHED and job.meta[ATTEMPTS] == 1
    assert job.meta[OUTCOME]["outcome"] == "delivered"
    ((_, headers, _),) = receiver.requests
    assert headers["X-Sockudo-Delivery-Id"] == d.delivery_id
    assert rclient.keys("p:inflight:*") == []  # released after the attempt


def test_time_deferred_after_an_attempt_is_not_charged_to_the_budget(receiver: Receiver,
                                                                    rclient: redis.Redis) -> None:
    """A retry that waited 9.5 s for a slot, with a 2 s budget: only the 0.5 s it was not
    deferred counts, so a 503 is retried, not dead-lettered."""
    from rq import SimpleWorker

    from workers.webhooks import ATTEMPTS, DEFERRED_SINCE_MS, FIRST_ATTEMPT_MS, OUTCOME

    receiver.statuses[:] = [503]
    queue = RqQueue(rclient, "p:")
    d = replace(local_delivery(receiver.port), retry=RetryPolicy(initial_backoff_ms=100, max_elapsed_time_ms=2000))
    queue.enqueue([d])
    job = Job.fetch(queue.queue.job_ids[0], connection=rclient)
    now_ms = time.time() * 1000
    job.meta.update({ATTEMPTS: 1, FIRST_ATTEMPT_MS: now_ms - 10_000, DEFERRED_SINCE_MS: now_ms - 9_500})
    job.save_meta()
    SimpleWorker([queue.queue], connection=rclient).work(burst=True)
    job = Job.fetch(job.id, connection=rclient)
    assert job.meta[ATTEMPTS] == 2 and job.meta[OUTCOME]["outcome"] == "retry"
    assert queue.dead_letters.count() == 0


def test_returned_retry_is_rqs_value() -> None:
    assert isinstance(Retry(max=1, interval=[0.2]), Retry)  # type: ignore[list-item]  # rq's own hint says int; floats work
