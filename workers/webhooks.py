"""The webhook delivery job: one attempt of one signed delivery (spec §5.3).

``deliver`` is enqueued by the server as ``"workers.webhooks.deliver"`` with the delivery as a
plain dict (body, headers with the signature already computed, URL, policy): no app secret
ever reaches Redis. Per attempt it

- takes one of the endpoint's **in-flight slots** (``EndpointSlots``: at most
  ``max_concurrent_per_endpoint`` attempts per endpoint across all workers, default half the
  workers). When none is free the job is **deferred**: it returns ``rq.Retry`` for ~1 s later
  (same job, same delivery id) without making or counting an attempt, and the time it spends
  deferred after its first attempt is not charged to its retry budget. So a hanging endpoint
  can never hold every worker: its surplus jobs wait in RQ's scheduled registry instead;
- stamps the job's meta (attempt number, first-attempt time) and takes a **lease**
  (``sockudo_webhooks:lease:<job id>``, a little longer than the attempt can possibly run),
  so a worker that finds the job still "started" after the lease is gone knows its worker
  died (see ``workers.worker``);
- POSTs once with the endpoint's timeout;
- on a retryable failure with budget left, **returns** ``rq.Retry(interval=[wait])`` — RQ's
  "retry is a value": RQ schedules the next attempt after exactly the policy's wait (needs
  ``--with-scheduler``); nothing sleeps. (Raising would also retry, but RQ would then log the
  exception with the job's arguments — body and signature — attached, and take its waits
  from a list fixed at enqueue time.) The ``Retry`` given at enqueue is only for crashes:
  a work-horse that dies mid-attempt is retried by RQ from that allowance;
- on success returns; on a permanent failure, or when the budget is spent, writes a dead
  letter and returns (the job itself succeeded: it reached a final answer).

The outcome is also left in ``job.meta["sockudo_outcome"]``; the worker's main process turns
it into metrics after each job (no shared-memory metrics across forked work-horses).
"""

from __future__ import annotations

import logging
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

logger = logging.getLogger(__name__)

OUTCOME = "sockudo_outcome"
ATTEMPTS = "sockudo_attempts"
FIRST_ATTEMPT_MS = "sockudo_first_attempt_ms"
DEFERRALS = "sockudo_deferrals"  # deferrals in a row since the last attempt
DEFERRED_SINCE_MS = "sockudo_deferred_since_ms"  # when the current run of deferrals began
DEFERRED_MS = "sockudo_deferred_ms"  # time spent deferred after the first attempt (not charged to the budget)

# RQ's scheduler enqueues due jobs once a second, so ~1 s is the shortest useful wait. A job
# deferred many times in a row (an endpoint that hangs for its whole timeout) waits longer,
# so a large backlog for one endpoint costs its workers a bounded number of work-horses.
DEFER_S = (1, 1, 1, 1, 2, 2, 2, 2, 4)


def defer_delay_s(deferrals: int) -> int:
    """Wait before the next try of a job deferred ``deferrals`` (>= 1) times in a row."""
    return DEFER_S[min(max(deferrals, 1), len(DEFER_S)) - 1]


def endpoint_slots(job: Job, delivery: Delivery) -> int:
    """The endpoint's in-flight cap: the configured one, or (0, "auto") half the workers
    registered on the job's queue, at least 1 — with two or more workers, one always stays
    free for other endpoints."""
    if delivery.max_concurrent > 0:
        return delivery.max_concurrent
    try:
        workers = int(job.connection.scard(WORKERS_BY_QUEUE_KEY % job.origin))
    except RedisError:
        workers = 0
    return max(1, workers // 2)


def deliver(payload: dict[str, Any]) -> dict[str, Any] | Retry:
    delivery = Delivery.from_payload(payload)
    job = get_current_job()
    if job is None:  # called directly (no RQ, no Redis): one plain attempt
        return _attempt(delivery, None)
    slots = EndpointSlots(job.connection)
    owner = f"{job.id}:"
    token = owner + uuid.uuid4().hex
    key = slots.acquire(delivery, endpoint_slots(job, delivery), token, delivery.lease_ms, owner=owner)
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
