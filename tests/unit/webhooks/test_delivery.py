"""One delivery attempt: its outcome and log line, the stdlib sender against a local receiver, dead
letters (memory and real Redis), outcome metrics and per-endpoint slots."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace

import pytest
import redis
from prometheus_client import CollectorRegistry
from rq.job import Job

from sockudo.webhooks.delivery import (
    DEAD,
    DEFERRED,
    DELIVERED,
    RETRY,
    AttemptResult,
    EndpointSlots,
    HttpResult,
    MemoryDeadLetters,
    RedisDeadLetters,
    decide,
    log_attempt,
    post,
    record_dead_lettered,
    record_metrics,
)
from sockudo.webhooks.metrics import WebhookMetrics
from sockudo.webhooks.model import (
    RetryPolicy,
    WebhookSettings,
    build_deliveries,
)
from sockudo.webhooks.queue import RqQueue
from tests.unit.webhooks.helpers import (
    KEY,
    SECRET,
    Receiver,
    a_delivery,
    endpoint,
    local_delivery,
    sdk,
)


def test_decide() -> None:
    d = a_delivery(initial_backoff_ms=1000, max_elapsed_time_ms=5000)
    assert decide(d, 1, 0, 10, HttpResult(200, None, 0.01)).outcome == DELIVERED
    retry = decide(d, 1, 0, 10, HttpResult(503, None, 0.01))
    assert (retry.outcome, retry.retry_in_ms, retry.reason) == (RETRY, 1000, "http_5xx")
    assert decide(d, 2, 0, 1500, HttpResult(None, "timeout", 1.0)).retry_in_ms == 2000
    last = decide(d, 3, 0, 3500, HttpResult(None, "connect", 0.0))  # 3.5 s + 4 s > 5 s
    assert (last.outcome, last.dead_reason, last.error) == (DEAD, "retries_exhausted", "connect")
    permanent = decide(d, 1, 0, 10, HttpResult(404, None, 0.01))
    assert (permanent.outcome, permanent.dead_reason, permanent.status) == (DEAD, "permanent_failure", 404)


def test_failure_log_line_has_the_facts_and_no_secrets(caplog: pytest.LogCaptureFixture) -> None:
    d = a_delivery()
    caplog.set_level(logging.DEBUG)
    log_attempt(d, decide(d, 2, 0, 10, HttpResult(500, None, 0.2)))
    log_attempt(d, decide(d, 1, 0, 10, HttpResult(404, None, 0.2)))
    assert len(caplog.records) == 2
    warn, error = caplog.records
    assert warn.levelname == "WARNING" and error.levelname == "ERROR"
    for record in caplog.records:
        text = record.getMessage() + json.dumps(record.__dict__, default=str)
        assert "app_id=7" in record.getMessage() and d.delivery_id in record.getMessage()
        for secret in ("s3cret", "/in", d.body, dict(d.headers)["X-Pusher-Signature"], SECRET):
            assert secret not in text
    assert "status=500" in warn.getMessage() and "attempt=2" in warn.getMessage()


def test_memory_dead_letters_keep_the_newest() -> None:
    letters = MemoryDeadLetters(limit=2)
    for i in range(3):
        letters.add({"id": str(i), "app_id": "1"})
    assert [r["id"] for r in letters.list()] == ["2", "1"]


def test_post_sends_the_exact_signed_bytes(receiver: Receiver) -> None:
    d = local_delivery(receiver.port)
    assert post(d).status == 200
    ((path, headers, body),) = receiver.requests
    assert path == "/hook?x=1" and headers["X-Custom"] == "1"
    assert body == d.body.encode("utf-8")
    assert sdk().validate_webhook(KEY, headers["X-Pusher-Signature"], body.decode()) is not None


def test_post_bounds_the_whole_attempt_however_slowly_the_answer_trickles() -> None:
    """One byte every 50 ms never trips a 400 ms per-read timeout; the attempt's deadline does."""
    from tests.support.webhooks import Receiver as ScriptedReceiver

    slow = ScriptedReceiver(trickle_every=0.05, script={"/hook": ["trickle"]}).start()
    results: list[HttpResult] = []
    try:
        sender = threading.Thread(target=lambda: results.append(post(local_delivery(slow.port, timeout_ms=400))),
                                  daemon=True)
        sender.start()
        sender.join(3)
        assert results, "the attempt outlived its 400 ms timeout by seconds"
        ((status, error, seconds),) = [(r.status, r.error, r.seconds) for r in results]
        assert (status, error) == (None, "timeout") and seconds < 0.6
    finally:
        slow.stop()


def test_post_reuses_keep_alive_connections() -> None:
    from sockudo.webhooks.delivery import ConnectionPool
    from tests.support.webhooks import Receiver as ScriptedReceiver

    server = ScriptedReceiver().start()
    pool = ConnectionPool()
    try:
        d = local_delivery(server.port)
        assert post(d, pool).status == 200
        (idle,) = pool._idle.values()
        (conn,) = idle
        assert post(d, pool).status == 200
        assert pool._idle[("http", "127.0.0.1", server.port)] == [conn]  # the same connection, reused
        assert len(server.requests) == 2
    finally:
        pool.clear()
        server.stop()


def test_retry_after_slows_the_retries_down_within_the_budget() -> None:
    d = replace(a_delivery(), retry=RetryPolicy(initial_backoff_ms=1000, max_backoff_ms=60_000,
                                                max_elapsed_time_ms=300_000))
    asked = decide(d, 1, 0, 100, HttpResult(429, None, 0.1, retry_after_ms=30_000))
    assert (asked.outcome, asked.retry_in_ms) == ("retry", 30_000)
    capped = decide(d, 1, 0, 100, HttpResult(503, None, 0.1, retry_after_ms=3_600_000))
    assert capped.retry_in_ms == 60_000  # at most the longest backoff
    late = decide(d, 3, 0, 290_000, HttpResult(429, None, 0.1, retry_after_ms=30_000))
    assert (late.outcome, late.retry_in_ms) == ("retry", 4000)  # the asked wait would pass the budget


def test_post_reports_connection_errors_and_timeouts() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert post(local_delivery(port)).error == "connect"  # bound, not listening
        s.listen(1)  # accepts (backlog) but never answers
        result = post(local_delivery(port, timeout_ms=200))
        assert (result.status, result.error) == (None, "timeout")


def test_redis_dead_letters_newest_first_and_bounded(rclient: redis.Redis) -> None:
    letters = RedisDeadLetters(rclient, "p:", limit=3)
    for i in range(5):
        letters.add({"id": f"id{i}", "app_id": "1" if i % 2 else "2", "failed_ms": 1000 + i})
    assert [r["id"] for r in letters.list()] == ["id4", "id3", "id2"]
    assert [r["id"] for r in letters.list(app_id="1")] == ["id3"]
    assert letters.count() == 3 and letters.get("id0") is None
    assert letters.remove("id3") and not letters.remove("id3")


def test_outcome_metrics_are_labelled_by_app_endpoint_event_type_and_reason() -> None:
    registry = CollectorRegistry()
    metrics = WebhookMetrics(registry)
    (d,) = build_deliveries("1", KEY, SECRET, [endpoint(event_types=["channel_occupied", "client_event"])],
                            WebhookSettings(), 1, [{"name": "channel_occupied", "channel": "c"},
                                                   {"name": "client_event", "channel": "c", "event": "client-x",
                                                    "data": "{}"},
                                                   {"name": "client_event", "channel": "c", "event": "client-y",
                                                    "data": "{}"}])
    record_metrics(metrics, d, decide(d, 1, 0, 10, HttpResult(503, None, 0.01)))
    record_metrics(metrics, d, decide(d, 2, 0, 10, HttpResult(404, None, 0.01)))
    record_metrics(metrics, d, AttemptResult(DEFERRED, 2, None, None, 0.0))
    value = registry.get_sample_value
    for name, count in (("channel_occupied", 1), ("client_event", 2)):
        labels = {"app_id": "1", "endpoint": d.endpoint, "event_type": name}
        assert value("sockudo_webhooks_failed_total", {**labels, "reason": "http_5xx"}) == count
        assert value("sockudo_webhooks_failed_total", {**labels, "reason": "http_404"}) == count
        assert value("sockudo_webhooks_retried_total", labels) == count
        assert value("sockudo_webhooks_dead_lettered_total", {**labels, "reason": "permanent_failure"}) == count
    assert value("sockudo_webhooks_deferred_total", {"app_id": "1", "endpoint": d.endpoint}) == 1
    # a deferral is not an attempt: no latency sample, no failure
    assert value("sockudo_webhooks_delivery_latency_seconds_count", {"app_id": "1"}) == 2
    # a caller that only knows (app_id, reason) still counts, under a bounded "unknown" endpoint and type
    metrics.dead_lettered.labels("1", "worker_failure").inc()
    assert value("sockudo_webhooks_dead_lettered_total",
                 {"app_id": "1", "endpoint": "unknown", "event_type": "unknown", "reason": "worker_failure"}) == 1
    record_dead_lettered(metrics, d, "worker_failure")
    assert value("sockudo_webhooks_dead_lettered_total",
                 {"app_id": "1", "endpoint": d.endpoint, "event_type": "client_event", "reason": "worker_failure"}) == 2


def test_endpoint_slots_cap_attempts_per_url_and_expire(rclient: redis.Redis) -> None:
    slots = EndpointSlots(rclient)
    d = a_delivery()
    other = replace(d, url="http://other.example.com/hook")
    held = [slots.acquire(d, 2, f"t{i}", 5000) for i in range(3)]
    assert held[0] is not None and held[1] is not None and held[2] is None  # two in flight, the third waits
    assert held[0].startswith("p:inflight:") and "s3cret" not in held[0] and "hooks.example" not in held[0]
    assert slots.acquire(other, 2, "x", 5000) is not None  # another endpoint is not affected
    assert 0 < rclient.pttl(held[0]) <= 5000  # a killed worker's slot frees itself
    assert slots.release(held[0], "not-mine") is False  # compare-and-delete
    assert slots.release(held[0], "t0") is True
    assert slots.acquire(d, 2, "t3", 5000) == held[0]
    rclient.pexpire(held[1], 1)
    time.sleep(0.01)
    assert slots.acquire(d, 2, "t4", 5000) == held[1]
    # a job whose earlier attempt's work-horse died takes its own stale slot over at once
    assert slots.acquire(d, 2, "job9:a", 5000, owner="job9:") is None  # full
    slots.release(held[1], "t4")
    assert slots.acquire(d, 2, "job9:a", 5000, owner="job9:") == held[1]
    assert slots.acquire(d, 2, "job8:b", 5000, owner="job8:") is None  # someone else's: it waits
    assert slots.acquire(d, 2, "job9:c", 5000, owner="job9:") == held[1]  # the horse died: retake
    assert rclient.get(held[1]) == b"job9:c"


def test_auto_cap_is_a_quarter_of_the_workers_job_slots(rclient: redis.Redis) -> None:
    from rq.worker_registration import WORKERS_BY_QUEUE_KEY

    from workers.webhooks import SLOTS_FIELD, endpoint_slots

    queue = RqQueue(rclient, "p:")
    queue.enqueue([a_delivery()])
    job = Job.fetch(queue.queue.job_ids[0], connection=rclient)
    assert endpoint_slots(job, a_delivery()) == 1  # no worker registered: 1
    rclient.sadd(WORKERS_BY_QUEUE_KEY % "webhooks", "rq:worker:a", "rq:worker:b")
    assert endpoint_slots(job, a_delivery()) == 1  # 2 plain rq workers (one job each): 1
    rclient.hset("rq:worker:a", SLOTS_FIELD, 100)  # a python -m workers with --concurrency 100
    assert endpoint_slots(job, a_delivery()) == 25  # (100 + 1) // 4
    rclient.hset("rq:worker:b", SLOTS_FIELD, 100)
    assert endpoint_slots(job, a_delivery()) == 50
    assert endpoint_slots(job, replace(a_delivery(), max_concurrent=4)) == 4  # configured


