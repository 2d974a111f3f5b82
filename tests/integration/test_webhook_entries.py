"""Every configured webhook entry is its own endpoint, even when several share one URL.

A common layout (and how soketi's own tests configure it): one ``/pusher/webhook`` route in
the app, several entries posting to it with different event types, filters and headers. Each
entry must get exactly the events it selects, as its own deliveries (own delivery ids, own
headers, own retries and dead letters, own metric series); two entries that both select an
event each deliver it. Only an entry configured identically to an earlier one is folded into
it, with a warning at start-up.

Real server, real receiver, real redis-server and ``python -m workers`` (RQ), and the
embedded queue (no Redis) too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue

from tests.support.procs import ServerProcess, wait_until
from tests.support.webhooks import (
    APP_ID,
    KEY,
    SDK,
    SECRET,
    Receiver,
    WorkerProcess,
    app,
    assert_signed,
    cli,
    dead_letters,
    stays_false,
    webhooks,
)
from tests.support.wsraw import RawClient

ROUTE = "/pusher/webhook"


def entries(url: str) -> list[dict[str, Any]]:
    """Three entries on one URL, told apart by their ``X-Entry`` header, plus an exact copy of the first."""
    private = {"url": url, "event_types": ["channel_occupied"], "filter": {"channel_prefix": "private-"},
               "headers": {"X-Entry": "private"}}
    return [
        private,
        {"url": url, "event_types": ["member_added"], "filter": {"channel_prefix": "presence-"},
         "headers": {"X-Entry": "presence"}},
        {"url": url, "event_types": ["channel_occupied", "member_added"], "filter": {"channel_suffix": "-audit"},
         "headers": {"X-Entry": "audit"}},
        dict(private),  # webhooks[3]: configured identically to webhooks[0]
    ]


# What each entry must receive, exactly once each: (name, channel, user_id or "").
EXPECTED = {
    "private": Counter({("channel_occupied", "private-orders", ""): 1,
                        ("channel_occupied", "private-ledger-audit", ""): 1}),
    "presence": Counter({("member_added", "presence-lobby", "u1"): 1,
                         ("member_added", "presence-desk-audit", "u2"): 1}),
    "audit": Counter({("channel_occupied", "private-ledger-audit", ""): 1,
                      ("channel_occupied", "presence-desk-audit", ""): 1,
                      ("member_added", "presence-desk-audit", "u2"): 1}),
}


def received(at: Receiver) -> dict[str, Counter[tuple[str, str, str]]]:
    """Events answered 200 at the shared route, by the entry (``X-Entry``) whose request carried them."""
    out: dict[str, Counter[tuple[str, str, str]]] = {}
    for request in at.at(ROUTE):
        if request.status != 200:
            continue
        entry = request.headers.get("X-Entry", "?")
        for event in request.events:
            out.setdefault(entry, Counter())[(event["name"], event["channel"], event.get("user_id", ""))] += 1
    return out


def by_endpoint(text: str, name: str, labels: dict[str, str]) -> dict[str, float]:
    """``name``'s samples matching ``labels``, summed per ``endpoint`` label."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                endpoint = sample.labels.get("endpoint", "<none>")
                out[endpoint] = out.get(endpoint, 0.0) + sample.value
    return out


def by_entry_index(counts: dict[str, float]) -> dict[str, float]:
    """Endpoint labels are ``<index in the app's webhooks list>-<short hash>``: key them by the index."""
    return {label.split("-", 1)[0]: value for label, value in counts.items() if value}


def worker_metrics_text(worker: WorkerProcess) -> str:
    return requests.get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).text


@pytest.mark.parametrize("queue", ["rq", "embedded"])
def test_entries_sharing_a_url_each_get_their_own_events(
        server_factory: Callable[..., ServerProcess], receiver: Receiver,
        request: pytest.FixtureRequest, queue: str) -> None:
    env: dict[str, str] = {}
    metrics_of: Callable[[], str]
    if queue == "rq":
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
        worker: WorkerProcess = request.getfixturevalue("worker_factory")()
        metrics_of = lambda: worker_metrics_text(worker)  # noqa: E731
    server = server_factory([app(*entries(receiver.url(ROUTE)))], env=env, webhooks=webhooks())
    if queue == "embedded":
        metrics_of = server.metrics_text

    # Start-up names the folded copy once; never the URL's path (it may hold a token).
    warnings = [line for line in server.log().splitlines() if "webhooks[3]" in line]
    assert len(warnings) == 1, server.log()
    assert "webhooks[0]" in warnings[0] and APP_ID in warnings[0]
    assert ROUTE not in server.log()

    client = RawClient.connect(server, KEY)
    for channel in ("private-orders", "private-ledger-audit", "public-news"):
        client.subscribe(channel, SDK.authenticate(channel, client.socket_id) if channel[:8] == "private-" else None)
    for channel, user in (("presence-lobby", "u1"), ("presence-desk-audit", "u2")):
        client.subscribe(channel, SDK.authenticate(channel, client.socket_id, {"user_id": user}))

    wait_until(lambda: received(receiver) == EXPECTED, timeout=20,
               message=f"each entry's events (got {received(receiver)})")
    # The copy of webhooks[0] adds nothing, and nothing arrives twice: batching (50 ms) and a
    # worker's pass are well inside this window.
    stays_false(lambda: received(receiver) != EXPECTED, 1.5, "a late or duplicate delivery")

    requests_ = receiver.at(ROUTE)
    for got in requests_:
        assert_signed(got)
        assert got.status == 200
    # Independent deliveries: one delivery id per request, never shared between entries.
    assert len({r.delivery_id for r in requests_}) == len(requests_)
    overlap = [r for r in requests_ if {"name": "channel_occupied", "channel": "private-ledger-audit"} in r.events]
    assert sorted(r.headers["X-Entry"] for r in overlap) == ["audit", "private"]
    assert overlap[0].delivery_id != overlap[1].delivery_id

    # Metrics name the entry (index and a short hash), never the URL.
    delivered = lambda: by_entry_index(by_endpoint(metrics_of(), "sockudo_webhooks_delivered_total",  # noqa: E731
                                                   {"app_id": APP_ID}))
    wait_until(lambda: delivered() == {"0": 2, "1": 2, "2": 3}, timeout=5,
               message=f"delivered per entry (got {delivered()})")
    labels = by_endpoint(metrics_of(), "sockudo_webhooks_delivered_total", {"app_id": APP_ID})
    assert all(ROUTE not in label and "127.0.0.1" not in label for label in labels)
    client.close()


def test_each_entry_on_a_failing_url_leaves_its_own_dead_letter(
        server_factory: Callable[..., ServerProcess], receiver: Receiver, redis_url: str,
        worker_factory: Callable[[], WorkerProcess]) -> None:
    worker = worker_factory()
    receiver.script["/gone"] = [404, 404]
    env = {"REDIS_URL": redis_url}
    url = receiver.url("/gone")
    server = server_factory([app(
        {"url": url, "event_types": ["channel_occupied"], "headers": {"X-Entry": "all"}},
        {"url": url, "event_types": ["channel_occupied"], "filter": {"channel_prefix": "orders-"},
         "headers": {"X-Entry": "orders"}})], env=env, webhooks=webhooks())
    client = RawClient.connect(server, KEY)
    client.subscribe("orders-1")

    letters = wait_until(lambda: (lambda got: got if len(got) == 2 else None)(dead_letters(server, env)),
                         timeout=20, message="one dead letter per entry")
    assert sorted(r.headers["X-Entry"] for r in receiver.at("/gone")) == ["all", "orders"]
    assert len({r["delivery_id"] for r in letters}) == 2
    endpoints = sorted(r["endpoint"] for r in letters)
    assert [e.split("-", 1)[0] for e in endpoints] == ["0", "1"]
    assert all(r["reason"] == "permanent_failure" and r["events"] == ["channel_occupied"] for r in letters)
    listed = cli(server, "list", env=env)
    assert all(f"endpoint={e}" in listed.stdout for e in endpoints), listed.stdout
    wait_until(lambda: by_entry_index(by_endpoint(worker_metrics_text(worker), "sockudo_webhooks_dead_lettered_total",
                                                  {"app_id": APP_ID, "reason": "permanent_failure"}))
               == {"0": 1, "1": 1}, timeout=5, message="dead letters counted per entry")

    # A replay goes to its entry again: same delivery id, the entry's own header.
    target = next(r for r in letters if r["endpoint"].startswith("1-"))
    replay = cli(server, "replay", "--id", target["id"], env=env)
    assert replay.returncode == 0, replay.stderr
    wait_until(lambda: receiver.processed, timeout=15, message="the replayed delivery")
    (again,) = receiver.processed.values()
    assert again.delivery_id == target["delivery_id"] and again.headers["X-Entry"] == "orders"
    client.close()


# -- rolling upgrade: what an older server left in Redis -------------------------------------------

# A job argument and a dead letter exactly as servers before per-entry endpoints wrote them (no
# "endpoint" key). A new worker must still deliver the job, and the CLI list and replay the letter.
def legacy_payload(url: str, delivery_id: str, body: str) -> dict[str, Any]:
    headers = [["Content-Type", "application/json"], ["X-Pusher-Key", KEY],
               ["X-Pusher-Signature", hmac.new(SECRET.encode(), body.encode(), hashlib.sha256).hexdigest()],
               ["X-Sockudo-Delivery-Id", delivery_id]]
    return {"v": 1, "delivery_id": delivery_id, "app_id": APP_ID, "url": url, "body": body, "headers": headers,
            "custom_headers": [], "events": ["channel_occupied"], "created_ms": int(time.time() * 1000),
            "timeout_ms": 5000,
            "retry": {"enabled": True, "max_attempts": None, "max_elapsed_time_ms": 20000,
                      "initial_backoff_ms": 100, "max_backoff_ms": 400},
            "prefix": "sockudo_adapter:webhooks:", "dead_letter_limit": 10000, "max_concurrent": 0}


def test_jobs_and_dead_letters_from_before_per_entry_endpoints_still_go_out(
        server_factory: Callable[..., ServerProcess], receiver: Receiver, redis_url: str,
        worker_factory: Callable[[], WorkerProcess]) -> None:
    env = {"REDIS_URL": redis_url}
    url = receiver.url("/legacy")
    server = server_factory([app({"url": url, "event_types": ["channel_occupied"]})], env=env, webhooks=webhooks())
    client = redis.Redis.from_url(redis_url)
    body = json.dumps({"time_ms": int(time.time() * 1000),
                       "events": [{"name": "channel_occupied", "channel": "queued-before-upgrade"}]},
                      separators=(",", ":"))
    Queue("webhooks", connection=client).enqueue(
        "workers.webhooks.deliver", legacy_payload(url, "a" * 32, body), job_timeout=7,
        description="webhook delivery legacy")
    record: dict[str, Any] = {
        "id": "b" * 32, "delivery_id": "c" * 32, "app_id": APP_ID, "url": url, "reason": "retries_exhausted",
        "status": 503, "error": None, "attempts": 3, "events": ["channel_occupied"],
        "body": json.dumps({"time_ms": 1, "events": [{"name": "channel_occupied", "channel": "dead-before"}]}),
        "custom_headers": [], "timeout_ms": 5000, "created_ms": 1, "first_attempt_ms": 1, "failed_ms": 2}
    client.hset("sockudo_adapter:webhooks:dead_letter_data", record["id"], json.dumps(record))
    client.zadd("sockudo_adapter:webhooks:dead_letters", {record["id"]: 2})

    worker_factory()
    wait_until(lambda: "a" * 32 in receiver.processed, timeout=15, message="the job queued before the upgrade")
    assert_signed(receiver.processed["a" * 32])
    assert receiver.events_at("/legacy") == [{"name": "channel_occupied", "channel": "queued-before-upgrade"}]

    listed = cli(server, "list", env=env)
    assert listed.returncode == 0 and record["id"] in listed.stdout, listed.stderr
    replay = cli(server, "replay", "--id", record["id"], env=env)
    assert replay.returncode == 0, replay.stderr
    wait_until(lambda: "c" * 32 in receiver.processed, timeout=15, message="the replayed old dead letter")
    assert assert_signed(receiver.processed["c" * 32])["events"] == [{"name": "channel_occupied",
                                                                      "channel": "dead-before"}]
    assert dead_letters(server, env) == []
    client.close()
