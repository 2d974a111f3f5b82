"""Webhooks without servers: config, filters, batching, signing, retry policy, the sink's
debounce, the in-process queue, dead letters (real Redis), the RQ job and the reaper's
recovery rules (real Redis + RQ, no worker process)."""

from __future__ import annotations

import ast
import hashlib
import hmac
import http.server
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pusher
import pytest
import redis
from prometheus_client import CollectorRegistry
from rq import Queue, Retry
from rq.job import Job, JobStatus

from sockudo.config import AppConfig, load_config
from sockudo.core.errors import ConfigError
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
    dead_letter_record,
    decide,
    log_attempt,
    post,
    record_dead_lettered,
    record_metrics,
)
from sockudo.webhooks.markers import MemoryMarkers, RedisMarkers, marker_key
from sockudo.webhooks.metrics import WebhookMetrics
from sockudo.webhooks.model import (
    LEASE_KEY,
    RQ_JOB,
    Batcher,
    Delivery,
    RetryPolicy,
    Verdict,
    WebhookSettings,
    build_deliveries,
    channel_namespace,
    classify,
    endpoint_host,
    failure_reason,
    normalize_event,
    parse_endpoint,
    parse_endpoints,
    parse_settings,
    redact_url,
    resign,
)
from sockudo.webhooks.queue import CRASH_ALLOWANCE, EmbeddedQueue, RqQueue, rq_retry
from sockudo.webhooks.sink import WebhookSink
from tests.support.fakes import FakeClock, FakeRuntime

ROOT = Path(__file__).resolve().parents[3]
KEY, SECRET = "app-key", "app-secret"


def sdk(key: str = KEY, secret: str = SECRET) -> pusher.Pusher:
    return pusher.Pusher(app_id="1", key=key, secret=secret)


def endpoint(**overrides: Any) -> Any:
    raw = {"url": "http://hooks.example.com/in?token=s3cret", "event_types": ["channel_occupied"], **overrides}
    return parse_endpoint("webhooks[0]", raw)


def make_app(*hooks: dict[str, Any], app_id: str = "1") -> AppConfig:
    return AppConfig(id=app_id, key=KEY, secret=SECRET, webhooks=parse_endpoints("webhooks", list(hooks)))


# -- configuration ------------------------------------------------------------------


def test_settings_defaults_follow_the_spec() -> None:
    s = parse_settings({})
    assert (s.request_timeout_ms, s.batching_enabled, s.batching_duration_ms, s.batching_size) == (10000, True, 50, 100)
    assert s.retry == RetryPolicy(True, None, 300_000, 1000, 60_000)
    assert s.debounce_ms == 3000 and s.queue_driver == "auto"
    assert s.max_concurrent_per_endpoint == 0  # auto: a quarter of the workers' job slots, at least 1


def test_max_concurrent_per_endpoint_from_toml_env_and_auto() -> None:
    assert parse_settings({"max_concurrent_per_endpoint": 3}).max_concurrent_per_endpoint == 3
    assert parse_settings({"max_concurrent_per_endpoint": "auto"}).max_concurrent_per_endpoint == 0
    env = {"WEBHOOK_MAX_CONCURRENT_PER_ENDPOINT": "2"}
    settings = parse_settings({"max_concurrent_per_endpoint": 5}, env)
    assert settings.max_concurrent_per_endpoint == 2
    # it travels in the job: the workers apply the server's setting
    (d,) = build_deliveries("1", KEY, SECRET, [endpoint()], settings, 1, [{"name": "channel_occupied", "channel": "c"}])
    assert d.max_concurrent == 2 and Delivery.from_payload(d.to_payload()) == d
    old_job = {k: v for k, v in d.to_payload().items() if k != "max_concurrent"}  # queued before the cap existed
    assert Delivery.from_payload(old_job).max_concurrent == 0
    record = dead_letter_record(d, "retries_exhausted", 3, 1, 2)
    assert resign(record, KEY, SECRET, 5, settings, "p:").max_concurrent == 2


def test_settings_from_toml_tables_then_env() -> None:
    s = parse_settings(
        {"request_timeout_ms": 2000, "batching": {"enabled": False, "size": 5}, "retry": {"max_attempts": 4}},
        {"WEBHOOK_BATCHING_DURATION": "20", "WEBHOOK_RETRY_INITIAL_BACKOFF_MS": "200", "WEBHOOK_DEBOUNCE_MS": "0",
         "WEBHOOK_BATCHING_ENABLED": "true"},
    )
    assert (s.request_timeout_ms, s.batching_enabled, s.batching_duration_ms, s.batching_size) == (2000, True, 20, 5)
    assert (s.retry.max_attempts, s.retry.initial_backoff_ms, s.debounce_ms) == (4, 200, 0)


@pytest.mark.parametrize("raw, key", [
    ({"batching": {"duration": "soon"}}, "webhooks.batching.duration"),
    ({"retry": {"initial_backoff_ms": 0}}, "webhooks.retry.initial_backoff_ms"),
    ({"retry": {"max_backoff_ms": 10}}, "webhooks.retry.max_backoff_ms"),
    ({"retry": {"jitter": True}}, "webhooks.retry.jitter"),
    ({"batching_enabled": True}, "webhooks.batching_enabled"),
    ({"queue_driver": "kafka"}, "webhooks.queue_driver"),
    ({"max_concurrent_per_endpoint": -1}, "webhooks.max_concurrent_per_endpoint"),
    ({"max_concurrent_per_endpoint": "many"}, "webhooks.max_concurrent_per_endpoint"),
])
def test_bad_settings_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_settings(raw)


@pytest.mark.parametrize("raw, message", [
    ({"event_types": ["channel_occupied"]}, r"webhooks\[0\]\.url is required"),
    ({"url": "ftp://x", "event_types": ["channel_occupied"]}, r"webhooks\[0\]\.url must be an http"),
    ({"url": "http://x", "event_types": []}, r"webhooks\[0\]\.event_types"),
    ({"url": "http://x", "event_types": ["channel_ocupied"]}, "unknown event type 'channel_ocupied'"),
    ({"url": "http://x", "event_types": ["client_event"], "filter": {"channel_pattern": "(["}},
     r"webhooks\[0\]\.filter\.channel_pattern"),
    ({"url": "http://x", "event_types": ["client_event"], "filter": {"channel_prefx": "a"}},
     r"webhooks\[0\]\.filter\.channel_prefx"),
    ({"url": "http://x", "event_types": ["client_event"], "headers": {"X-Pusher-Signature": "x"}}, "set by the server"),
    ({"url": "http://x", "event_types": ["client_event"], "headers": {"X-A": "a\nb"}}, "line breaks"),
    ({"url": "http://x", "event_types": ["client_event"], "secret": "x"}, r"unknown key webhooks\[0\]\.secret"),
    ({"lambda": {"function_name": "f"}, "event_types": ["client_event"]}, "Lambda"),
])
def test_bad_endpoint_names_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_endpoints("webhooks", [raw])


def test_config_file_validates_webhooks_at_start_up(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[webhooks]\nrequest_timeout_ms = 1500\n[webhooks.batching]\nsize = 3\n'
        '[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "s"\n'
        'webhooks = [{url = "https://h.example/x", event_types = ["client_event"], '
        'filter = {channel_prefix = "private-"}, headers = {X-Env = "prod"}}]\n'
    )
    config = load_config(str(path), {})
    assert config.webhooks.request_timeout_ms == 1500 and config.webhooks.batching_size == 3
    (hook,) = config.apps[0].webhooks
    assert hook.url == "https://h.example/x" and hook.headers == (("X-Env", "prod"),)
    assert hook.filter.prefix == "private-"

    path.write_text('[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "s"\n'
                    'webhooks = [{url = "http://h", event_types = ["nope"]}]\n')
    with pytest.raises(ConfigError, match=r"app_manager\.array\.apps\[0\]\.webhooks\[0\]\.event_types"):
        load_config(str(path), {})
    path.write_text('[webhooks]\nretries = 3\n')
    with pytest.raises(ConfigError, match=r"webhooks\.retries"):
        load_config(str(path), {})
    path.write_text('[webhooks]\nqueue_driver = "redis"\n')
    with pytest.raises(ConfigError, match="queue_driver"):
        load_config(str(path), {})


# -- filters --------------------------------------------------------------------------


@pytest.mark.parametrize("flt, channel, matches", [
    ({}, "anything", True),
    ({"channel_prefix": "private-"}, "private-chat", True),
    ({"channel_prefix": "private-"}, "presence-chat", False),
    ({"channel_suffix": "-eu"}, "orders-eu", True),
    ({"channel_suffix": "-eu"}, "orders-us", False),
    ({"channel_pattern": r"^orders-\d+$"}, "orders-42", True),
    ({"channel_pattern": r"^orders-\d+$"}, "orders-x", False),
    ({"channel_prefix": "private-", "channel_suffix": "-eu"}, "private-a-eu", True),
    ({"channel_prefix": "private-", "channel_suffix": "-eu"}, "private-a-us", False),
    ({"channel_namespace": "billing"}, "private-billing:42", True),
    ({"channel_namespaces": ["billing", "ops"]}, "ops:1", True),
    ({"channel_namespace": "billing"}, "billing-42", False),
])
def test_channel_filter(flt: dict[str, Any], channel: str, matches: bool) -> None:
    hook = endpoint(event_types=["client_event"], filter=flt)
    assert hook.wants({"name": "client_event", "channel": channel}) is matches
    assert hook.wants({"name": "member_added", "channel": channel}) is False  # type not listed


def test_channel_namespace_strips_the_type_prefix() -> None:
    assert channel_namespace("presence-cache-room:1") == "room"
    assert channel_namespace("plain") == ""


# -- retry policy and classification ----------------------------------------------------


def test_backoff_doubles_from_one_second_capped_at_sixty_within_five_minutes() -> None:
    policy = RetryPolicy()
    schedule = policy.schedule_ms()
    assert schedule[:7] == [1000, 2000, 4000, 8000, 16000, 32000, 60000]
    assert set(schedule[6:]) == {60000}
    assert sum(schedule) <= 300_000 < sum(schedule) + 60_000
    assert policy.next_delay_ms(3, elapsed_ms=299_000) is None  # the next wait would pass the budget


def test_max_attempts_and_disabled_retry() -> None:
    assert RetryPolicy(max_attempts=3).schedule_ms() == [1000, 2000]
    assert RetryPolicy(enabled=False).schedule_ms() == []


@pytest.mark.parametrize("status, verdict", [
    (200, Verdict.OK), (204, Verdict.OK), (500, Verdict.RETRYABLE), (503, Verdict.RETRYABLE),
    (408, Verdict.RETRYABLE), (409, Verdict.RETRYABLE), (425, Verdict.RETRYABLE), (429, Verdict.RETRYABLE),
    (None, Verdict.RETRYABLE), (400, Verdict.PERMANENT), (401, Verdict.PERMANENT), (404, Verdict.PERMANENT),
    (410, Verdict.PERMANENT), (301, Verdict.PERMANENT),
])
def test_classification(status: int | None, verdict: Verdict) -> None:
    assert classify(status) is verdict


def test_failure_reasons_are_bounded_labels() -> None:
    assert failure_reason(503, None) == "http_5xx"
    assert failure_reason(404, None) == "http_404"
    assert failure_reason(None, "timeout") == "timeout"


# -- deliveries: only the listed events, exact body, signature the SDK accepts ------------


def test_deliveries_per_endpoint_signed_for_the_sdk() -> None:
    hooks = [
        endpoint(event_types=["channel_occupied", "client_event"], headers={"X-Env": "prod"}),
        endpoint(url="http://other.example/h", event_types=["member_added"], filter={"channel_prefix": "presence-"}),
    ]
    now_ms = int(time.time() * 1000)
    events = [
        {"name": "channel_occupied", "channel": "news"},
        {"name": "member_added", "channel": "presence-room", "user_id": "u1"},
        {"name": "client_event", "channel": "private-a", "event": "client-x", "data": "{\"a\":1}", "socket_id": "1.2"},
    ]
    ids = iter(["d1", "d2"])
    first, second = build_deliveries("1", KEY, SECRET, hooks, WebhookSettings(), now_ms, events,
                                     new_id=lambda: next(ids))
    body = json.loads(first.body)
    assert list(body) == ["time_ms", "events"] and body["time_ms"] == now_ms
    assert [e["name"] for e in body["events"]] == ["channel_occupied", "client_event"]
    assert first.event_names == ("channel_occupied", "client_event")
    headers = dict(first.headers)
    assert headers["X-Pusher-Key"] == KEY and headers["X-Sockudo-Delivery-Id"] == "d1"
    assert headers["X-Env"] == "prod" and headers["Content-Type"] == "application/json"
    expected = hmac.new(SECRET.encode(), first.body.encode(), hashlib.sha256).hexdigest()
    assert headers["X-Pusher-Signature"] == expected
    assert sdk().validate_webhook(KEY, headers["X-Pusher-Signature"], first.body) == body
    assert sdk(secret="other").validate_webhook(KEY, headers["X-Pusher-Signature"], first.body) is None
    assert json.loads(second.body)["events"] == [events[1]]
    assert SECRET not in json.dumps(first.to_payload())
    assert Delivery.from_payload(json.loads(json.dumps(first.to_payload()))) == first


def test_cache_miss_carries_empty_data() -> None:
    assert normalize_event({"name": "cache_miss", "channel": "cache-x"}) == {
        "name": "cache_miss", "channel": "cache-x", "data": "{}"}


def test_resign_keeps_the_delivery_id_and_signs_with_todays_secret() -> None:
    (delivery,) = build_deliveries("1", KEY, SECRET, [endpoint()], WebhookSettings(), 1000,
                                   [{"name": "channel_occupied", "channel": "a"}])
    record = dead_letter_record(delivery, "retries_exhausted", 5, 1000, 2000, None, "connect")
    now_ms = int(time.time() * 1000)
    again = resign(record, KEY, "rotated", now_ms, WebhookSettings(), "p:")
    assert again.delivery_id == delivery.delivery_id
    assert json.loads(again.body) == {"time_ms": now_ms, "events": [{"name": "channel_occupied", "channel": "a"}]}
    sig = dict(again.headers)["X-Pusher-Signature"]
    assert sdk(secret="rotated").validate_webhook(KEY, sig, again.body) is not None


def test_urls_never_reach_logs_whole() -> None:
    assert endpoint_host("https://user:pw@h.example:8443/p/tok?k=v") == "https://h.example:8443"
    assert redact_url("https://user:pw@h.example/p/x?k=v") == "https://h.example/p/x?…"


# -- batching ------------------------------------------------------------------------------


def test_batcher_by_size_and_by_window() -> None:
    b = Batcher(True, 50, 3)
    assert b.add("a", {"n": 1}, 100, now=0.0) == []
    assert b.add("b", {"n": 2}, 101, now=0.01) == []
    assert b.add("a", {"n": 3}, 99, now=0.02) == []
    (full,) = b.add("a", {"n": 4}, 102, now=0.03)
    assert [e["n"] for e in full.events] == [1, 3, 4] and full.time_ms == 99
    assert b.due(0.05) == [] and b.next_due() == pytest.approx(0.06)
    (late,) = b.due(0.061)
    assert late.app_id == "b" and len(b) == 0


def test_batching_off_sends_each_event_alone() -> None:
    b = Batcher(False, 50, 100)
    assert [len(x.events) for x in b.add("a", {"n": 1}, 1, 0.0)] == [1]


# -- one attempt's outcome and its log line -------------------------------------------------


def a_delivery(**policy: Any) -> Delivery:
    settings = WebhookSettings(retry=RetryPolicy(**policy))
    (d,) = build_deliveries("7", KEY, SECRET, [endpoint()], settings, 1000,
                            [{"name": "channel_occupied", "channel": "c"}], prefix="p:")
    return d


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


# -- the sink: debounce, batching, only what endpoints ask for ---------------------------


class RecordingQueue:
    backend = "memory"

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    def enqueue(self, deliveries: list[Delivery]) -> None:
        self.deliveries.extend(deliveries)

    def events(self) -> list[dict[str, Any]]:
        return [e for d in self.deliveries for e in json.loads(d.body)["events"]]


class Occupancy:
    """The adapter's cluster-wide answers, as the sink's re-check sees them."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.members: dict[str, dict[str, Any]] = {}

    def subscriber_count(self, app_id: str, channel: str) -> int:
        return self.counts.get(channel, 0)

    def presence_members(self, app_id: str, channel: str) -> dict[str, Any]:
        return self.members.get(channel, {})


@pytest.fixture
def sink_parts() -> Iterator[tuple[WebhookSink, RecordingQueue, FakeClock, Occupancy, CollectorRegistry]]:
    clock, queue, occupancy, registry = FakeClock(1000.0), RecordingQueue(), Occupancy(), CollectorRegistry()
    settings = WebhookSettings(debounce_ms=1000, batching_duration_ms=50, batching_size=100)
    sink = WebhookSink(settings, queue, WebhookMetrics(registry), FakeRuntime(threads=False), occupancy, MemoryMarkers(), "p:",
                       clock=clock)
    yield sink, queue, clock, occupancy, registry


ALL_TYPES = ["channel_occupied", "channel_vacated", "member_added", "member_removed", "client_event", "cache_miss",
             "subscription_count"]


def run(sink: WebhookSink, clock: FakeClock, seconds: float = 0.0) -> None:
    sink._step()
    clock.now += seconds
    sink._step()


def test_leave_and_rejoin_inside_the_window_sends_nothing(sink_parts: Any) -> None:
    sink, queue, clock, occupancy, registry = sink_parts
    app = make_app({"url": "http://h/x", "event_types": ALL_TYPES})
    for event in ({"name": "channel_vacated", "channel": "room"},
                  {"name": "member_removed", "channel": "presence-r", "user_id": "u1"}):
        sink.emit(app, event)
    run(sink, clock, 0.5)
    sink.emit(app, {"name": "channel_occupied", "channel": "room"})
    sink.emit(app, {"name": "member_added", "channel": "presence-r", "user_id": "u1"})
    run(sink, clock, 2.0)
    assert queue.events() == []
    assert registry.get_sample_value("sockudo_webhooks_debounce_cancelled_total",
                                     {"app_id": "1", "event_type": "channel_vacated"}) == 1


def test_leave_sent_after_the_window_when_still_gone(sink_parts: Any) -> None:
    sink, queue, clock, occupancy, registry = sink_parts
    app = make_app({"url": "http://h/x", "event_types": ["channel_vacated", "member_removed"]})
    sink.emit(app, {"name": "channel_vacated", "channel": "room"})
    sink.emit(app, {"name": "member_removed", "channel": "presence-r", "user_id": "u1"})
    run(sink, clock, 0.9)
    assert queue.events() == []
    run(sink, clock, 0.2)  # window closed → into the batch
    run(sink, clock, 0.1)  # batch window closed → queued
    assert queue.events() == [{"name": "channel_vacated", "channel": "room"},
                              {"name": "member_removed", "channel": "presence-r", "user_id": "u1"}]
    # The join is only watched (to cancel a pending leave), never sent to this endpoint.
    sink.emit(app, {"name": "channel_occupied", "channel": "room"})
    run(sink, clock, 1.0)
    assert len(queue.events()) == 2


def test_leave_dropped_when_the_cluster_still_has_the_channel(sink_parts: Any) -> None:
    sink, queue, clock, occupancy, _ = sink_parts
    app = make_app({"url": "http://h/x", "event_types": ["channel_vacated", "member_removed"]})
    occupancy.counts["room"] = 1
    occupancy.members["presence-r"] = {"u1": {}}
    sink.emit(app, {"name": "channel_vacated", "channel": "room"})
    sink.emit(app, {"name": "member_removed", "channel": "presence-r", "user_id": "u1"})
    run(sink, clock, 2.0)
    run(sink, clock, 1.0)
    assert queue.events() == []


def test_a_newer_leave_owns_the_marker(sink_parts: Any) -> None:
    sink, queue, clock, _, _ = sink_parts
    app = make_app({"url": "http://h/x", "event_types": ["channel_vacated", "channel_occupied"]})
    sink.emit(app, {"name": "channel_vacated", "channel": "room"})
    run(sink, clock, 0.5)
    sink.emit(app, {"name": "channel_vacated", "channel": "room"})  # e.g. reported by another node
    run(sink, clock, 0.6)  # first timer: not its token any more → nothing
    run(sink, clock, 0.1)
    assert queue.events() == []
    run(sink, clock, 0.5)
    run(sink, clock, 0.1)
    assert queue.events() == [{"name": "channel_vacated", "channel": "room"}]


def test_batches_per_app_and_only_listed_types(sink_parts: Any) -> None:
    sink, queue, clock, _, registry = sink_parts
    app = make_app({"url": "http://h/x", "event_types": ["client_event", "cache_miss"]})
    other = make_app({"url": "http://h/y", "event_types": ["channel_occupied"]}, app_id="2")
    sink.emit(app, {"name": "client_event", "channel": "presence-a", "event": "client-e", "data": "{}",
                    "socket_id": "1.1", "user_id": "u"})
    sink.emit(app, {"name": "cache_miss", "channel": "cache-x"})
    sink.emit(app, {"name": "subscription_count", "channel": "x", "subscription_count": 1})  # not listed
    sink.emit(other, {"name": "channel_occupied", "channel": "z"})
    run(sink, clock, 0.06)
    assert len(queue.deliveries) == 2
    by_app = {d.app_id: json.loads(d.body)["events"] for d in queue.deliveries}
    assert [e["name"] for e in by_app["1"]] == ["client_event", "cache_miss"]
    assert by_app["1"][0]["user_id"] == "u" and by_app["1"][1]["data"] == "{}"
    assert registry.get_sample_value("sockudo_webhooks_queued_total",
                                     {"app_id": "1", "endpoint": queue.deliveries[0].endpoint,
                                      "event_type": "cache_miss"}) == 1
    assert queue.deliveries[0].endpoint.startswith("0-")


def test_stop_sends_pending_leaves_and_open_batches(sink_parts: Any) -> None:
    sink, queue, clock, _, _ = sink_parts
    app = make_app({"url": "http://h/x", "event_types": ["channel_vacated", "client_event"]})
    sink.emit(app, {"name": "channel_vacated", "channel": "room"})
    sink.emit(app, {"name": "client_event", "channel": "private-a", "event": "client-e", "data": "1",
                    "socket_id": "1.1"})
    sink.stop(timeout=0)
    assert [e["name"] for e in queue.events()] == ["client_event", "channel_vacated"]


def test_apps_without_webhooks_cost_a_lookup(sink_parts: Any) -> None:
    sink, queue, clock, _, _ = sink_parts
    sink.emit(AppConfig(id="9", key="k9", secret="s9"), {"name": "channel_occupied", "channel": "a"})
    assert not sink._inbox


def test_queue_outage_keeps_deliveries_until_it_is_back() -> None:
    clock = FakeClock(1000.0)

    class FlakyQueue(RecordingQueue):
        down = True

        def enqueue(self, deliveries: list[Delivery]) -> None:
            if self.down:
                raise ConnectionError("redis down")
            super().enqueue(deliveries)

    queue, registry = FlakyQueue(), CollectorRegistry()
    sink = WebhookSink(WebhookSettings(debounce_ms=0), queue, WebhookMetrics(registry), FakeRuntime(threads=False), Occupancy(),
                       MemoryMarkers(), "p:", clock=clock)
    app = make_app({"url": "http://h/x", "event_types": ["channel_occupied"]})
    sink.emit(app, {"name": "channel_occupied", "channel": "a"})
    run(sink, clock, 0.1)
    sink.emit(app, {"name": "channel_occupied", "channel": "b"})
    run(sink, clock, 0.1)
    assert queue.deliveries == [] and len(sink._outbox) == 2
    queue.down = False
    run(sink, clock, 1.0)
    assert [e["channel"] for e in queue.events()] == ["a", "b"]
    assert registry.get_sample_value("sockudo_webhooks_enqueue_failures_total") >= 1


def test_redis_down_at_the_leave_still_sends_it_after_the_window() -> None:
    class DownThenUp(MemoryMarkers):
        down = True

        def mark(self, key: str, token: str, ttl_ms: int) -> None:
            if self.down:
                raise ConnectionError("redis down")
            super().mark(key, token, ttl_ms)

    clock, queue, markers = FakeClock(1000.0), RecordingQueue(), DownThenUp()
    sink = WebhookSink(WebhookSettings(debounce_ms=1000), queue, WebhookMetrics(CollectorRegistry()), FakeRuntime(threads=False),
                       Occupancy(), markers, "p:", clock=clock)
    app = make_app({"url": "http://h/x", "event_types": ["channel_vacated"]})
    sink.emit(app, {"name": "channel_vacated", "channel": "room"})
    run(sink, clock, 0.5)
    markers.down = False  # back before the window closes: the leave was never marked, send it anyway
    run(sink, clock, 0.6)
    run(sink, clock, 0.1)
    assert queue.events() == [{"name": "channel_vacated", "channel": "room"}]


def test_marker_keys_do_not_collide() -> None:
    a = marker_key("1", {"name": "member_removed", "channel": "presence-a:b", "user_id": "c"})
    b = marker_key("1", {"name": "member_removed", "channel": "presence-a", "user_id": "b:c"})
    c = marker_key("1", {"name": "channel_vacated", "channel": "presence-a"})
    assert len({a, b, c}) == 3


# -- the in-process queue ---------------------------------------------------------------------


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


def test_memory_dead_letters_keep_the_newest() -> None:
    letters = MemoryDeadLetters(limit=2)
    for i in range(3):
        letters.add({"id": str(i), "app_id": "1"})
    assert [r["id"] for r in letters.list()] == ["2", "1"]


# -- HTTP: the stdlib sender against a local receiver ---------------------------------------


class Receiver:
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((self.path, dict(self.headers), body))
                self.send_response(outer.statuses.pop(0) if outer.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([])
    yield r
    r.close()


def local_delivery(port: int, path: str = "/hook?x=1", timeout_ms: int = 2000) -> Delivery:
    hook = parse_endpoint("w", {"url": f"http://127.0.0.1:{port}{path}", "event_types": ["channel_occupied"],
                                "headers": {"X-Custom": "1"}, "request_timeout_ms": timeout_ms})
    (d,) = build_deliveries("1", KEY, SECRET, [hook], WebhookSettings(), int(time.time() * 1000),
                            [{"name": "channel_occupied", "channel": "é"}], prefix="p:")
    return d


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


# -- Redis: dead letters, markers, the queue, the job and the reaper --------------------------


@pytest.fixture
def rclient(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """A real Redis (the session's redis-server); ``make test-unit`` may run where none is installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    redis_server = request.getfixturevalue("redis_server")
    client = redis.Redis(port=redis_server.port, db=11)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_redis_dead_letters_newest_first_and_bounded(rclient: redis.Redis) -> None:
    letters = RedisDeadLetters(rclient, "p:", limit=3)
    for i in range(5):
        letters.add({"id": f"id{i}", "app_id": "1" if i % 2 else "2", "failed_ms": 1000 + i})
    assert [r["id"] for r in letters.list()] == ["id4", "id3", "id2"]
    assert [r["id"] for r in letters.list(app_id="1")] == ["id3"]
    assert letters.count() == 3 and letters.get("id0") is None
    assert letters.remove("id3") and not letters.remove("id3")


def test_redis_markers_cancel_and_release(rclient: redis.Redis) -> None:
    node_a, node_b = RedisMarkers(rclient, "p:"), RedisMarkers(rclient, "p:")
    node_a.mark("c:1:4:room", "t1", 5000)
    assert node_b.cancel("c:1:4:room") is True  # rejoin on another node
    assert node_a.release("c:1:4:room", "t1") is False
    node_a.mark("c:1:4:room", "t2", 5000)
    node_b.mark("c:1:4:room", "t3", 5000)
    assert node_a.release("c:1:4:room", "t2") is False and node_b.release("c:1:4:room", "t3") is True


def test_rq_jobs_carry_no_secret_and_a_crash_allowance(rclient: redis.Redis) -> None:
    queue = RqQueue(rclient, "p:")
    d = a_delivery()
    queue.enqueue([d])
    (job_id,) = queue.queue.job_ids
    job = Job.fetch(job_id, connection=rclient)
    assert job.func_name == RQ_JOB and job.timeout == d.job_timeout_s
    assert job.retries_left == CRASH_ALLOWANCE
    assert SECRET not in rclient.hget(job.key, "data").decode("latin-1")
    assert d.body not in (job.description or "")
    assert queue.stats().depth["ready"] == 1
    assert rq_retry(RetryPolicy(initial_backoff_ms=500)).intervals == [0.5, 1.0, 2.0]


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
    started = datetime.now(timezone.utc) - timedelta(seconds=10)
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
    rq_queue.schedule_job(dead_job, datetime.now(timezone.utc) - timedelta(seconds=30))
    assert reaper.enqueue_overdue(rq_queue) == 1 and rq_queue.job_ids == [dead_job.id]

    # A job RQ failed (crash allowance spent): becomes a dead letter.
    rclient.delete(rq_queue.key)
    rq_queue.failed_job_registry.add(dead_job, ttl=100, exc_string="boom")
    assert reaper.dead_letter_failed(rq_queue) == 1
    (letter,) = queue.dead_letters.list()
    assert letter["reason"] == "worker_failure" and rq_queue.failed_job_registry.count == 0


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
    assert before <= due <= time.time() + 2  # ~1 s, not the retry policy's backoff
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
    assert isinstance(Retry(max=1, interval=[0.2]), Retry)


# -- import rules -----------------------------------------------------------------------------


def test_job_modules_import_without_gevent_and_sockudo_never_imports_workers() -> None:
    """The job functions also run under a plain ``rq worker``; only the worker process
    (``workers.worker``, ``python -m workers``) is gevent's."""
    code = ("import sys, workers.webhooks, workers.push, sockudo.webhooks.model, sockudo.webhooks.delivery;"
            "print('gevent' in sys.modules or 'flask' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    def imported(path: Path) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
        return names

    for path in (ROOT / "sockudo").rglob("*.py"):
        assert "workers" not in imported(path), f"{path} imports workers"
    for path in (ROOT / "sockudo" / "webhooks").glob("*.py"):
        assert not imported(path) & {"gevent", "flask", "geventwebsocket"}, path.name
    assert not imported(ROOT / "sockudo" / "webhooks" / "model.py") & {"rq", "redis", "http", "socket"}
