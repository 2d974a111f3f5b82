"""The pure webhook model: settings and endpoints, filters, retry policy and classification, signed
deliveries, batching."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest

from sockudo.config import load_config
from sockudo.core.errors import ConfigError
from sockudo.webhooks.delivery import (
    dead_letter_record,
)
from sockudo.webhooks.model import (
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
    parse_endpoints,
    parse_settings,
    redact_url,
    resign,
)
from tests.unit.webhooks.helpers import (
    KEY,
    SECRET,
    endpoint,
    sdk,
)


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
