"""The delivery queues: the in-process queue and the RQ queue (real Redis)."""

from __future__ import annotations

import time

import redis
from prometheus_client import CollectorRegistry
from rq.job import Job

from sockudo.webhooks.delivery import (
    HttpResult,
    MemoryDeadLetters,
)
from sockudo.webhooks.metrics import WebhookMetrics
from sockudo.webhooks.model import (
    RQ_JOB,
    Delivery,
    RetryPolicy,
    WebhookSettings,
    build_deliveries,
)
from sockudo.webhooks.queue import CRASH_ALLOWANCE, EmbeddedQueue, RqQueue, rq_retry
from tests.support.fakes import FakeRuntime
from tests.unit.webhooks.helpers import (
    KEY,
    SECRET,
    a_delivery,
    make_app,
)


def test_embedded_queue_retries_then_delivers_and_dead_letters_permanent_failures() -> None:
    answers = {"http://h/retry": [500, 500, 200], "http://h/gone": [404]}
    sent: list[str] = []

    def sender(delivery: Delivery) -> HttpResult:
        sent.append(delivery.url)
        return HttpResult(answers[delivery.url].pop(0), None, 0.01)

    registry = CollectorRegistry()
    metrics = WebhookMetrics(registry)
    letters = MemoryDeadLetters()
    queue = EmbeddedQueue(FakeRuntime(threads=False), metrics, letters, sender=sender)
    settings = WebhookSettings(retry=RetryPolicy(initial_backoff_ms=10))
    app = make_app({"url": "http://h/retry", "event_types": ["channel_occupied"]},
                   {"url": "http://h/gone", "event_types": ["channel_occupied"]})
    deliveries = build_deliveries("1", KEY, SECRET, app.webhooks, settings, int(time.time() * 1000),
                                  [{"name": "channel_occupied", "channel": "c"}])
    queue.enqueue(deliveries)
    while queue._ready:  # what the worker greenlets do, one attempt at a time
        queue._attempt(queue._ready.popleft())
    assert sent == ["http://h/retry", "http://h/gone", "http://h/retry", "http://h/retry"]
    (letter,) = letters.list()
    assert (letter["reason"], letter["status"], letter["attempts"], letter["url"]) == ("permanent_failure", 404, 1,
                                                                                     "http://h/gone")
    assert letter["endpoint"] == deliveries[1].endpoint
    value = registry.get_sample_value
    retry = {"app_id": "1", "endpoint": deliveries[0].endpoint, "event_type": "channel_occupied"}
    gone = {**retry, "endpoint": deliveries[1].endpoint}
    assert value("sockudo_webhooks_retried_total", retry) == 2
    assert value("sockudo_webhooks_failed_total", {**retry, "reason": "http_5xx"}) == 2
    assert value("sockudo_webhooks_delivered_total", retry) == 1
    assert value("sockudo_webhooks_dead_lettered_total", {**gone, "reason": "permanent_failure"}) == 1
    assert queue.stats().depth == {"ready": 0, "delayed": 0, "active": 0, "dead_letter": 1}


def test_rq_jobs_carry_no_secret_and_a_crash_allowance(rclient: redis.Redis) -> None:
    queue = RqQueue(rclient, "p:")
    d = a_delivery()
    queue.enqueue([d])
    (job_id,) = queue.queue.job_ids
    job = Job.fetch(job_id, connection=rclient)
    assert job.func_name == RQ_JOB and job.timeout == d.job_timeout_s
    assert job.retries_left == CRASH_ALLOWANCE
    data = rclient.hget(job.key, "data")
    assert isinstance(data, bytes) and SECRET not in data.decode("latin-1")
    assert d.body not in (job.description or "")
    assert queue.stats().depth["ready"] == 1
    assert rq_retry(RetryPolicy(initial_backoff_ms=500)).intervals == [0.5, 1.0, 2.0]
