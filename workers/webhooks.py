"""The webhook delivery job: one attempt of one signed delivery.

``deliver`` is enqueued by the server as ``"workers.webhooks.deliver"`` with the delivery as a
plain dict (body, headers with the signature already computed, URL, policy): no app secret
ever reaches Redis. Per attempt it

- takes one of the endpoint's **in-flight slots** (``EndpointSlots``: at most
  ``max_concurrent_per_endpoint`` attempts per endpoint across all workers, default a quarter
  of the workers' job slots). When none frees up within ``SLOT_WAIT_S`` the job is
  **deferred**: it returns ``rq.Retry`` for ~1 s later (same job, same delivery id) without
  making or counting an attempt, and the time it spends deferred after its first attempt is
  not charged to its retry budget. So a hanging endpoint
  can never hold every worker slot: its surplus jobs wait in RQ's scheduled registry instead;
- stamps the job's meta (attempt number, first-attempt time) and takes a **lease**
  (``sockudo_webhooks:lease:<job id>``, a little longer than the attempt can possibly run),
  so a worker that finds the job still "started" after the lease is gone knows its worker
  died (see ``workers.worker``);
- POSTs once, the endpoint's timeout bounding the whole attempt;
- on a retryable failure with budget left, **returns** ``rq.Retry(interval=[wait])`` — RQ's
  "retry is a value": RQ schedules the next attempt after exactly the policy's wait (needs
  ``--with-scheduler``); nothing sleeps. (Raising would also retry, but RQ would then log the
  exception with the job's arguments — body and signature — attached, and take its waits
  from a list fixed at enqueue time.) The ``Retry`` given at enqueue is only for crashes:
  a work-horse that dies mid-attempt is retried by RQ from that allowance;
- on success returns; on a permanent failure, or when the budget is spent, writes a dead
  letter and returns (the job itself succeeded: it reached a final answer).

The outcome is also left in ``job.meta["sockudo_outcome"]``; the worker turns it into metrics
after each job (the same path works for a plain ``rq worker``'s forked work-horses).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, cast

from redis.exceptions import RedisError
from rq import Retry, get_current_job
from rq.job import Job
from rq.timeouts import JobTimeoutException
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from sockudo.webhooks.delivery import (
    DEAD,
    DEFERRED,
    RETRY,
    AttemptResult,
    EndpointSlots,
    HttpResult,
    RedisDeadLetters,
    dead_letter_record,
    decide,
    log_attempt,
    post,
)
from sockudo.webhooks.model import LEASE_KEY, Delivery
from sockudo.webhooks.queue import auto_endpoint_slots

logger = logging.getLogger(__name__)

OUTCOME = "sockudo_outcome"
ATTEMPTS = "sockudo_attempts"
FIRST_ATTEMPT_MS = "sockudo_first_attempt_ms"
DEFERRALS = "sockudo_deferrals"  # deferrals in a row since the last attempt
DEFERRED_SINCE_MS = "sockudo_deferred_since_ms"  # when the current run of deferrals began
DEFERRED_MS = "sockudo_deferred_ms"  # time spent deferred after the first attempt (not charged to the budget)
SLOTS_FIELD = "sockudo_slots"  # in RQ's worker hash: how many jobs that worker runs at once

# RQ's scheduler enqueues due jobs once a second, so ~1 s is the shortest useful wait. A job
# deferred many times in a row (an endpoint that hangs for its whole timeout) waits longer,
# so a large backlog for one endpoint costs its workers a bounded number of short job runs.
DEFER_S = (1, 1, 1, 1, 2, 2, 2, 2, 4)


def defer_delay_s(deferrals: int) -> int:
    """Wait before the next try of a job deferred ``deferrals`` (>= 1) times in a row."""
    return DEFER_S[min(max(deferrals, 1), len(DEFER_S)) - 1]


def endpoint_slots(job: Job, delivery: Delivery) -> int:
    """The endpoint's in-flight cap: the configured one, or (0, "auto") a quarter of the jobs
    the workers registered on the job's queue can run at once, at least 1 — so a few slow
    endpoints cannot take every worker slot (``sockudo.webhooks.queue.auto_endpoint_slots``)."""
    if delivery.max_concurrent > 0:
        return delivery.max_concurrent
    return auto_endpoint_slots(queue_slots(job.connection, job.origin))


def queue_slots(connection: Any, queue: str) -> int:
    """Jobs the workers on ``queue`` can run at once: each ``python -m workers`` records its
    concurrency in its RQ worker hash; a worker without it (plain ``rq worker``) runs one."""
    try:
        keys = list(connection.smembers(WORKERS_BY_QUEUE_KEY % queue))
        if not keys:
            return 0
        pipe = connection.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, SLOTS_FIELD)
        values = pipe.execute()
    except RedisError:
        return 0
    return sum(int(v) if v and v.isdigit() else 1 for v in values)


def deliver(payload: dict[str, Any]) -> dict[str, Any] | Retry:
    delivery = Delivery.from_payload(payload)
    job = get_current_job()
    if job is None:  # called directly (no RQ, no Redis): one plain attempt
        return _attempt(delivery, None)
    slots = EndpointSlots(job.connection)
    owner = f"{job.id}:"
    token = owner + uuid.uuid4().hex
    cap = endpoint_slots(job, delivery)
    key = slots.acquire(delivery, cap, token, delivery.lease_ms, owner=owner)
    if key is None:
        key = _wait_for_slot(slots, delivery, cap, token, owner)
    if key is None:
        return _defer(job, delivery)
    try:
        return _attempt(delivery, job)
    finally:
        try:
            slots.release(key, token)
        except RedisError as exc:  # the slot expires by itself after lease_ms
            logger.warning("could not release a webhook in-flight slot: %s", exc,
                           extra={"app_id": delivery.app_id, "delivery_id": delivery.delivery_id})
        _slot_freed(delivery)


# A job whose endpoint has every slot taken waits this long in its worker for one before it is
# deferred. An endpoint that is busy but healthy frees a slot every few hundred milliseconds, so
# its jobs mostly get one here instead of going round RQ's scheduler; an endpoint that hangs
# costs each of its waiting jobs this much of a worker slot, then they are deferred.
SLOT_WAIT_S = 0.5
SLOT_POLL_S = 0.1  # slots freed by other worker processes are noticed this often

_freed: dict[tuple[str, str, str], threading.Condition] = {}


def _endpoint(delivery: Delivery) -> tuple[str, str, str]:
    return (delivery.app_id, delivery.endpoint, delivery.url)


def _wait_for_slot(slots: EndpointSlots, delivery: Delivery, cap: int, token: str, owner: str) -> str | None:
    """Wait up to SLOT_WAIT_S for a slot: woken when this process frees one of the endpoint's,
    else every SLOT_POLL_S. (Under ``python -m workers`` the condition is gevent's.)"""
    freed = _freed.setdefault(_endpoint(delivery), threading.Condition())
    deadline = time.monotonic() + SLOT_WAIT_S
    while (left := deadline - time.monotonic()) > 0:
        with freed:
            freed.wait(min(left, SLOT_POLL_S))
        key = slots.acquire(delivery, cap, token, delivery.lease_ms, owner=owner)
        if key is not None:
            return key
    return None


def _slot_freed(delivery: Delivery) -> None:
    freed = _freed.get(_endpoint(delivery))
    if freed is not None:
        with freed:
            freed.notify()


def _defer(job: Job, delivery: Delivery) -> Retry:
    """No slot: come back later. No attempt is made, counted or charged to the retry budget;
    RQ's crash allowance is not touched (a returned Retry is not a failure)."""
    now_ms = time.time() * 1000
    deferrals = int(job.meta.get(DEFERRALS) or 0) + 1
    job.meta[DEFERRALS] = deferrals
    if not job.meta.get(DEFERRED_SINCE_MS):
        job.meta[DEFERRED_SINCE_MS] = now_ms
    job.meta[OUTCOME] = AttemptResult(DEFERRED, int(job.meta.get(ATTEMPTS) or 0), None, None, 0.0).to_dict()
    job.save_meta()
    delay = defer_delay_s(deferrals)
    logger.debug("webhook endpoint busy, deferring %d s: app_id=%s delivery_id=%s deferrals=%d", delay,
                 delivery.app_id, delivery.delivery_id, deferrals,
                 extra={"app_id": delivery.app_id, "delivery_id": delivery.delivery_id})
    retried = int(job.number_of_retries or 0)
    return Retry(max=retried + 1, interval=[delay])


def _attempt(delivery: Delivery, job: Job | None) -> dict[str, Any] | Retry:
    now_ms = time.time() * 1000
    attempt = 1
    first_ms = now_ms
    deferred_ms = 0.0
    if job is not None:
        attempt = int(job.meta.get(ATTEMPTS, 0)) + 1
        first_ms = float(job.meta.get(FIRST_ATTEMPT_MS) or now_ms)
        deferred_ms = float(job.meta.get(DEFERRED_MS) or 0)
        since = job.meta.get(DEFERRED_SINCE_MS)
        if since and job.meta.get(FIRST_ATTEMPT_MS):  # before the first attempt the budget has not started
            deferred_ms += max(0.0, now_ms - float(since))
        job.meta.update({ATTEMPTS: attempt, FIRST_ATTEMPT_MS: first_ms, OUTCOME: None, DEFERRALS: 0,
                         DEFERRED_SINCE_MS: None, DEFERRED_MS: deferred_ms})
        pipe = job.connection.pipeline(transaction=False)
        pipe.set(LEASE_KEY.format(job_id=job.id), str(attempt), px=delivery.lease_ms)
        pipe.execute()
        job.save_meta()

    started = time.perf_counter()
    try:
        http = post(delivery)
    except JobTimeoutException:  # RQ's hard limit fired inside the request
        http = HttpResult(None, "timeout", time.perf_counter() - started)

    now_ms = time.time() * 1000
    # Time spent deferred (waiting for a slot) does not use up the retry budget.
    result = decide(delivery, attempt, first_ms + deferred_ms, now_ms, http)
    log_attempt(delivery, result)
    if job is not None:
        job.meta[OUTCOME] = result.to_dict()
        job.save_meta()
        if result.outcome == DEAD:
            record = dead_letter_record(delivery, result.dead_reason or "", attempt, first_ms, now_ms,
                                        result.status, result.error)
            RedisDeadLetters(job.connection, delivery.prefix, delivery.dead_letter_limit).add(record)
    if result.outcome == RETRY:
        # ``max`` only has to stay above RQ's count of returned retries: the policy decides.
        retried = int(job.number_of_retries or 0) if job is not None else 0
        # RQ's hint says whole seconds; it schedules with a timedelta, so a fraction works too.
        interval = cast(list[int], [(result.retry_in_ms or 0) / 1000.0])
        return Retry(max=retried + 1, interval=interval)
    return {"outcome": result.outcome, "attempts": attempt, "status": result.status}
