"""The delivery queues: the in-process queue and the RQ queue (real Redis)."""

from __future__ import annotations

import time
from dataclasses import replace

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
    while (job := queue.take()) is not None:  # what the worker greenlets do, one attempt at a time
        queue._attempt(job)
        queue.done(job)
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


def test_embedded_queue_caps_each_endpoint_and_takes_endpoints_in_turn() -> None:
    """8 senders: "auto" lets one endpoint have 2 attempts in flight. A backlog of 10 for /slow
    does not keep /other waiting: the senders take endpoints in turn, and /slow's surplus stays
    in its own line until one of its attempts ends."""
    queue = EmbeddedQueue(FakeRuntime(threads=False), None, MemoryDeadLetters(), concurrency=8)
    app = make_app({"url": "http://h/slow", "event_types": ["channel_occupied"]},
                   {"url": "http://h/other", "event_types": ["channel_occupied"]})
    slow, other = build_deliveries("1", KEY, SECRET, app.webhooks, WebhookSettings(), 1,
                                   [{"name": "channel_occupied", "channel": "c"}])
    queue.enqueue([replace(slow, delivery_id=str(i)) for i in range(10)] + [other])
    taken = [queue.take() for _ in range(4)]
    assert [j.delivery.url if j else None for j in taken] == ["http://h/slow", "http://h/other", "http://h/slow",
                                                              None]
    assert queue.stats().depth["ready"] == 8
    assert taken[0] is not None
    queue.done(taken[0])
    nxt = queue.take()
    assert nxt is not None and nxt.delivery.url == "http://h/slow"
    assert queue.slots(replace(slow, max_concurrent=5)) == 5  # a configured cap
