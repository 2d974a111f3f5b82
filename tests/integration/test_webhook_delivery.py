"""Webhook delivery at real network latency: a real ``python -m workers`` sends many deliveries
at once to a receiver that takes its time, nothing is lost or duplicated when the worker is
killed mid-batch, and (without Redis) an endpoint that trickles its answer costs at most its
timeout per attempt and delays nobody else."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import redis

from sockudo.webhooks.model import RetryPolicy, WebhookSettings, build_deliveries, parse_endpoint
from sockudo.webhooks.queue import RqQueue
from tests.support.procs import ServerProcess, wait_until
from tests.support.webhooks import (
    APP_ID,
    KEY,
    SECRET,
    Receiver,
    WorkerProcess,
    app,
    assert_signed,
    webhooks,
)
from tests.support.wsraw import RawClient

PREFIX = "sockudo_adapter:webhooks:"  # the server's default, where dead letters go


@pytest.fixture
def slow_receiver() -> Iterator[Receiver]:
    """Answers every request after 100 ms."""
    r = Receiver(delay=0.1).start()
    yield r
    r.stop()


def enqueue(redis_url: str, url: str, count: int, *, timeout_ms: int = 2000, max_concurrent: int = 0) -> set[str]:
    """``count`` signed deliveries (one event each) for one endpoint, queued as the server does."""
    hook = parse_endpoint("w", {"url": url, "event_types": ["channel_occupied"], "request_timeout_ms": timeout_ms})
    settings = WebhookSettings(retry=RetryPolicy(initial_backoff_ms=200, max_backoff_ms=400),
                               max_concurrent_per_endpoint=max_concurrent)
    deliveries = [d for i in range(count) for d in build_deliveries(
        APP_ID, KEY, SECRET, [hook], settings, int(time.time() * 1000),
        [{"name": "channel_occupied", "channel": f"batch-{i}"}], prefix=PREFIX)]
    client = redis.Redis.from_url(redis_url)
    try:
        RqQueue(client, PREFIX).enqueue(deliveries)
    finally:
        client.close()
    return {d.delivery_id for d in deliveries}


def dead_letter_count(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.zcard(f"{PREFIX}dead_letters"))
    finally:
        client.close()


def test_one_worker_sends_many_deliveries_at_once(
        slow_receiver: Receiver, redis_url: str, worker_factory: Callable[[], WorkerProcess]) -> None:
    """200 deliveries to an endpoint that answers in 100 ms: one at a time that is 20 s; one
    worker process with its pool sends them concurrently, each signed, each once."""
    worker_factory()
    ids = enqueue(redis_url, slow_receiver.url("/slow"), 200)
    started = time.monotonic()
    wait_until(lambda: len(slow_receiver.processed) == 200, timeout=20, message="200 deliveries")
    elapsed = time.monotonic() - started
    assert elapsed < 8, f"200 deliveries to a 100 ms endpoint took {elapsed:.1f} s"
    assert set(slow_receiver.processed) == ids
    assert len(slow_receiver.requests) == 200  # none sent twice
    for request in slow_receiver.requests:
        assert_signed(request)
    assert dead_letter_count(redis_url) == 0


def test_killing_the_worker_mid_batch_loses_and_duplicates_nothing(
        redis_url: str, worker_factory: Callable[..., WorkerProcess]) -> None:
    """``kill -9`` of a worker with dozens of deliveries in flight: a second worker's reaper puts
    the abandoned ones back, every delivery is answered, and the only repeats are the attempts
    that were in flight at the kill (same delivery id: the receiver's dedupe key)."""
    receiver = Receiver(delay=0.3).start()
    try:
        first = worker_factory(concurrency=20)
        ids = enqueue(redis_url, receiver.url("/batch"), 150, timeout_ms=1000, max_concurrent=200)
        wait_until(lambda: len(receiver.processed) >= 40, timeout=20, message="the batch under way")
        killing = time.monotonic()
        first.kill9()
        killed = time.monotonic()
        in_flight = [r for r in list(receiver.requests) if r.ended is None or r.ended > killing]
        assert in_flight, "nothing was in flight at the kill"
        second = worker_factory()
        wait_until(lambda: len(receiver.processed) == len(ids), timeout=40, message="every delivery answered")
        assert set(receiver.processed) == ids
        requests = Counter(r.delivery_id for r in receiver.requests)
        before_kill = {r.delivery_id for r in receiver.requests if r.at < killed}
        assert {i for i, n in requests.items() if n > 1} <= before_kill  # only attempts under way were repeated
        assert max(requests.values()) <= 2
        assert second.metric("sockudo_webhooks_abandoned_jobs_total") >= 1
        assert dead_letter_count(redis_url) == 0
    finally:
        receiver.stop()


def test_workers_a_trickling_endpoint_costs_its_timeout_and_delays_no_other(
        receiver: Receiver, redis_url: str, worker_factory: Callable[..., WorkerProcess]) -> None:
    """With Redis: a worker of 8 slots (auto cap: 2 per endpoint), 10 deliveries to an endpoint
    that trickles one byte every 0.2 s forever, then 5 to another. Each trickled attempt ends
    at its 1 s deadline, and the other endpoint's deliveries go out at once."""
    receiver.trickle_every = 0.2
    receiver.script["/trickle"] = ["trickle"] * 1000
    worker_factory(concurrency=8)
    try:
        enqueue(redis_url, receiver.url("/trickle"), 10, timeout_ms=1000)
        wait_until(lambda: len(receiver.at("/trickle")) >= 2, timeout=10, message="/trickle being tried")
        raised = time.monotonic()
        ids = enqueue(redis_url, receiver.url("/quick"), 5)
        wait_until(lambda: set(receiver.processed) >= ids, timeout=5, message="/quick's deliveries")
        assert time.monotonic() - raised < 2.5
        ended = lambda: [r for r in receiver.at("/trickle") if r.ended is not None]  # noqa: E731
        wait_until(lambda: len(ended()) >= 4, timeout=10, message="/trickle's attempts ending at their deadline")
        durations = [r.ended - r.at for r in ended() if r.ended is not None]
        assert max(durations) < 1.0 + 2 * 0.2 + 0.5, durations
    finally:
        receiver.release.set()


def test_embedded_queue_a_trickling_endpoint_costs_its_timeout_and_delays_no_other(
        server_factory: Callable[..., ServerProcess], receiver: Receiver) -> None:
    """No Redis: the server sends. /trickle answers one byte every 0.2 s forever; each attempt
    must end at its 1 s timeout (a per-read timeout never fires), and /quick's deliveries — more
    of them than the queue has senders behind /trickle's backlog — arrive at once."""
    receiver.trickle_every = 0.2
    receiver.script["/trickle"] = ["trickle"] * 1000
    server = server_factory([app(
        {"url": receiver.url("/trickle"), "event_types": ["channel_occupied"], "request_timeout_ms": 1000,
         "filter": {"channel_prefix": "slow-"}},
        {"url": receiver.url("/quick"), "event_types": ["channel_occupied"], "filter": {"channel_prefix": "quick-"}})],
        webhooks=webhooks(batching={"enabled": False, "duration": 50, "size": 100},
                          retry={"initial_backoff_ms": 100, "max_backoff_ms": 100, "max_elapsed_time_ms": 60000}))
    client = RawClient.connect(server, KEY)
    try:
        for i in range(40):  # more deliveries than the embedded queue's 32 senders
            client.subscribe(f"slow-{i}")
        wait_until(lambda: len(receiver.at("/trickle")) >= 5, timeout=10, message="/trickle being tried")
        raised = time.monotonic()
        quick = [f"quick-{i}" for i in range(5)]
        for channel in quick:
            client.subscribe(channel)
        wait_until(lambda: sorted(e["channel"] for e in receiver.events_at("/quick")) == quick, timeout=5,
                   message="/quick's deliveries while /trickle trickles")
        assert time.monotonic() - raised < 2
        # Each /trickle attempt ends at its 1 s deadline: the sender hangs up, which the
        # receiver notices at its next byte (0.2 s later, or one more if the first write lands).
        ended = lambda: [r for r in receiver.at("/trickle") if r.ended is not None]  # noqa: E731
        wait_until(lambda: len(ended()) >= 8, timeout=10, message="/trickle's attempts ending at their deadline")
        durations = [r.ended - r.at for r in ended() if r.ended is not None]
        assert max(durations) < 1.0 + 2 * 0.2 + 0.5, durations
        assert not any(e["channel"].startswith("slow-") for e in receiver.events_at("/quick"))
    finally:
        receiver.release.set()
        client.close()
