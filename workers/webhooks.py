"""The webhook delivery job: one attempt of one signed delivery (spec §5.3).

``deliver`` is enqueued by the server as ``"workers.webhooks.deliver"`` with the delivery as a
plain dict (body, headers with the signature already computed, URL, policy): no app secret
ever reaches Redis. Per attempt it

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
from typing import Any

from rq import Retry, get_current_job
from rq.timeouts import JobTimeoutException

from sockudo.webhook_delivery import (
    DEAD,
    RETRY,
    HttpResult,
    RedisDeadLetters,
    dead_letter_record,
    decide,
    log_attempt,
    post,
)
from sockudo.webhooks import LEASE_KEY, Delivery

logger = logging.getLogger(__name__)

OUTCOME = "sockudo_outcome"
ATTEMPTS = "sockudo_attempts"
FIRST_ATTEMPT_MS = "sockudo_first_attempt_ms"


def deliver(payload: dict[str, Any]) -> dict[str, Any] | Retry:
    delivery = Delivery.from_payload(payload)
    job = get_current_job()
    now_ms = time.time() * 1000
    attempt = 1
    first_ms = now_ms
    if job is not None:
        attempt = int(job.meta.get(ATTEMPTS, 0)) + 1
        first_ms = float(job.meta.get(FIRST_ATTEMPT_MS) or now_ms)
        job.meta.update({ATTEMPTS: attempt, FIRST_ATTEMPT_MS: first_ms, OUTCOME: None})
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
    result = decide(delivery, attempt, first_ms, now_ms, http)
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
        return Retry(max=retried + 1, interval=[(result.retry_in_ms or 0) / 1000.0])
    return {"outcome": result.outcome, "attempts": attempt, "status": result.status}
