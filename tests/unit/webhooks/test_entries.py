"""Every configured webhook entry is its own endpoint: deliveries, ids, duplicates, slots,
dead letters and what older servers left queued."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from typing import Any

import pytest
import redis

from sockudo.config import AppConfig, Config
from sockudo.webhooks.delivery import EndpointSlots, HttpResult, dead_letter_record, decide, log_attempt
from sockudo.webhooks.model import (
    Delivery,
    WebhookSettings,
    build_deliveries,
    distinct_endpoints,
    duplicate_endpoints,
    endpoint_id,
    inflight_keys,
    parse_endpoints,
    resign,
)
from sockudo.webhooks.sink import warn_duplicate_endpoints

KEY, SECRET = "app-key", "app-secret"
URL = "http://hooks.example.com/pusher/webhook?token=s3cret"


def entries(*extra: dict[str, Any]) -> Any:
    """Three entries on one URL with different types, filters and headers (+ ``extra``)."""
    return parse_endpoints("webhooks", [
        {"url": URL, "event_types": ["channel_occupied"], "filter": {"channel_prefix": "private-"},
         "headers": {"X-Entry": "private"}},
        {"url": URL, "event_types": ["member_added"], "filter": {"channel_prefix": "presence-"},
         "headers": {"X-Entry": "presence"}},
        {"url": URL, "event_types": ["channel_occupied", "member_added"], "filter": {"channel_suffix": "-audit"},
         "headers": {"X-Entry": "audit"}},
        *extra,
    ])


EVENTS = [
    {"name": "channel_occupied", "channel": "private-orders"},
    {"name": "member_added", "channel": "presence-lobby", "user_id": "u1"},
    {"name": "channel_occupied", "channel": "private-ledger-audit"},
    {"name": "channel_occupied", "channel": "public-news"},
]


def deliver(endpoints: Any, events: list[dict[str, Any]] = EVENTS) -> list[Delivery]:
    return build_deliveries("1", KEY, SECRET, endpoints, WebhookSettings(), 1000, events, prefix="p:")


def channels(delivery: Delivery) -> list[str]:
    return [e["channel"] for e in json.loads(delivery.body)["events"]]


def test_entries_sharing_a_url_each_get_what_they_select_with_their_own_headers() -> None:
    private, presence, audit = deliver(entries())
    assert {d.url for d in (private, presence, audit)} == {URL}
    assert (channels(private), channels(presence), channels(audit)) == (
        ["private-orders", "private-ledger-audit"], ["presence-lobby"], ["private-ledger-audit"])
    assert [dict(d.headers)["X-Entry"] for d in (private, presence, audit)] == ["private", "presence", "audit"]
    # An event two entries select is two independent deliveries.
    assert len({private.delivery_id, presence.delivery_id, audit.delivery_id}) == 3
    assert [d.endpoint.split("-")[0] for d in (private, presence, audit)] == ["0", "1", "2"]


def test_an_entry_selecting_nothing_of_a_batch_gets_no_delivery() -> None:
    (only,) = deliver(entries(), [{"name": "member_added", "channel": "presence-x", "user_id": "u"}])
    assert dict(only.headers)["X-Entry"] == "presence" and only.endpoint.startswith("1-")


def test_an_identical_entry_is_delivered_once_and_reported() -> None:
    copy = {"url": URL, "event_types": ["channel_occupied"], "filter": {"channel_prefix": "private-"},
            "headers": {"x-entry": "private"}}  # header names compare case-insensitively
    endpoints = entries(copy)
    assert duplicate_endpoints(endpoints) == ((3, 0),)
    assert [i for i, _ in distinct_endpoints(endpoints)] == [endpoint_id(i, endpoints[i]) for i in range(3)]
    assert len(deliver(endpoints)) == 3
    # Any difference (here only a header's value) makes it an entry of its own.
    different = entries({**copy, "headers": {"X-Entry": "private-2"}})
    assert duplicate_endpoints(different) == ()
    assert sorted(dict(d.headers)["X-Entry"] for d in deliver(different)) == [
        "audit", "presence", "private", "private-2"]


def test_duplicates_are_warned_about_once_each_without_the_url(caplog: pytest.LogCaptureFixture) -> None:
    copy = {"url": URL, "event_types": ["member_added"], "filter": {"channel_prefix": "presence-"},
            "headers": {"X-Entry": "presence"}}
    config = Config(apps=(AppConfig(id="42", key=KEY, secret=SECRET, webhooks=entries(copy, copy)),
                          AppConfig(id="43", key="k2", secret="s2", webhooks=entries())))
    with caplog.at_level(logging.WARNING, logger="sockudo.webhooks.sink"):
        warn_duplicate_endpoints(config)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "app 42: webhooks[3] is configured identically to webhooks[1]; its events are delivered once",
        "app 42: webhooks[4] is configured identically to webhooks[1]; its events are delivered once",
    ]


def test_endpoint_ids_are_short_stable_and_reveal_no_url_or_header_value() -> None:
    endpoints = entries()
    ids = [endpoint_id(i, e) for i, e in enumerate(endpoints)]
    assert ids == [endpoint_id(i, e) for i, e in enumerate(entries())]  # the same config, the same ids
    for value in ids:
        index, digest = value.split("-")
        assert index.isdigit() and len(digest) == 8 and int(digest, 16) >= 0
    assert not any(secret in value for value in ids for secret in ("s3cret", "hooks.example", "private", "audit"))
    changed = replace(endpoints[0], event_types=frozenset({"channel_occupied", "channel_vacated"}))
    assert endpoint_id(0, changed) != ids[0]  # a changed entry is a new series, not a silent continuation


def test_payload_carries_the_endpoint_and_a_job_from_an_older_server_still_loads() -> None:
    delivery = deliver(entries())[2]
    again = Delivery.from_payload(json.loads(json.dumps(delivery.to_payload())))
    assert again == delivery and again.endpoint_label == delivery.endpoint
    old = delivery.to_payload()
    del old["endpoint"]  # what servers before per-entry endpoints enqueued
    legacy = Delivery.from_payload(old)
    assert legacy.endpoint == "" and legacy.endpoint_label == "unknown"
    assert legacy.body == delivery.body and legacy.headers == delivery.headers


def test_in_flight_slots_are_per_entry_and_old_jobs_keep_the_urls_slots() -> None:
    private, presence, _ = deliver(entries())
    sha = hashlib.sha1(URL.encode()).hexdigest()
    assert inflight_keys(private, 2) == [f"p:inflight:{sha}:1:{private.endpoint}:0",
                                         f"p:inflight:{sha}:1:{private.endpoint}:1"]
    assert set(inflight_keys(private, 2)).isdisjoint(inflight_keys(presence, 2))
    # A job queued by an older server: the key older workers use for it too, so the cap holds
    # across a rolling upgrade.
    assert inflight_keys(replace(private, endpoint=""), 1) == [f"p:inflight:{sha}:0"]


def test_endpoint_slots_of_two_entries_on_one_url_are_independent(rclient: redis.Redis) -> None:
    slots = EndpointSlots(rclient)
    private, presence, _ = deliver(entries())
    assert slots.acquire(private, 1, "a", 5000) is not None
    assert slots.acquire(private, 1, "b", 5000) is None  # the entry's one slot is taken
    assert slots.acquire(presence, 1, "c", 5000) is not None  # the other entry's is its own


def test_dead_letters_name_their_entry_and_replays_keep_it() -> None:
    audit = deliver(entries())[2]
    record = dead_letter_record(audit, "permanent_failure", 1, 1000, 2000, 404, None)
    assert record["endpoint"] == audit.endpoint
    again = resign(record, KEY, SECRET, 5000, WebhookSettings(), "p:")
    assert again.endpoint == audit.endpoint and dict(again.headers)["X-Entry"] == "audit"
    del record["endpoint"]  # a dead letter written by an older server
    assert resign(record, KEY, SECRET, 5000, WebhookSettings(), "p:").endpoint == ""


def test_failure_logs_name_the_entry(caplog: pytest.LogCaptureFixture) -> None:
    audit = deliver(entries())[2]
    with caplog.at_level(logging.WARNING, logger="sockudo.webhooks.delivery"):
        log_attempt(audit, decide(audit, 1, 0, 10, HttpResult(503, None, 0.01)))
    (record,) = caplog.records
    assert f"endpoint_id={audit.endpoint}" in record.getMessage()
    assert record.endpoint_id == audit.endpoint  # type: ignore[attr-defined]
    assert "s3cret" not in record.getMessage() and "/pusher/webhook" not in record.getMessage()
