"""Metrics you can alert on from the first scrape: on a freshly started server and worker, every
counter with a known, finite label set (error types, disconnect reasons, webhook outcomes, push
states) is already there at 0, webhook metrics included although no app has a webhook yet; the
metrics listeners answer 404 on any path but ``/metrics``; and a real Prometheus loaded with the
shipped alert rules (conf/prometheus/alerts.yml) finds data for every series they select, with
no alert pending or firing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cluster import node_env
from tests.support.procs import RedisServer, ServerProcess, wait_until
from tests.support.prometheus import ALERTS, PrometheusServer
from tests.support.webhooks import WorkerProcess

APP = {"id": "910", "key": "fresh-key", "secret": "fresh-secret"}
EVENT_TYPES = ("channel_occupied", "channel_vacated", "member_added", "member_removed", "client_event",
               "cache_miss", "subscription_count")
PROVIDERS = ("apns", "fcm", "webpush")


class Fresh:
    """A server on Redis (push on, no webhook anywhere) and a worker, never used."""

    def __init__(self) -> None:
        self.redis = RedisServer().start()
        self.node = ServerProcess([APP], env=node_env(self.redis.url, PUSH_CREDENTIALS_KEY="fresh-credentials-key"),
                                  push={"enabled": True}).start()
        wait_until(lambda: requests.get(self.node.url + "/up", timeout=5).status_code == 200, timeout=15,
                   message="the node to be ready")
        # The worker reads the server's configuration (its apps), as a deployed one does.
        self.worker = WorkerProcess(self.redis.url, queues=("webhooks", "push"),
                                    env={"SOCKUDO_CONFIG": self.node.config_path}).start()

    def stop(self) -> None:
        self.worker.stop()
        self.node.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def fresh() -> Iterator[Fresh]:
    deployment = Fresh()
    yield deployment
    deployment.stop()


def samples(text: str) -> list[Any]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def series(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """``{sorted labels without the constant ones: value}`` of every sample called ``name``."""
    constant = {"environment", "region", "node", "adapter"}
    return {tuple(sorted((k, v) for k, v in s.labels.items() if k not in constant)): s.value
            for s in samples(text) if s.name == name}


def assert_zero(text: str, name: str, **fixed: str) -> None:
    """Every ``name`` series with ``fixed`` labels exists; all of them are 0."""
    found = {labels: v for labels, v in series(text, name).items() if set(fixed.items()) <= set(labels)}
    assert found, f"no {name} series with {fixed}"
    assert set(found.values()) == {0.0}, found


def label_values(text: str, name: str, label: str, **fixed: str) -> set[str]:
    return {dict(labels)[label] for labels in series(text, name)
            if set(fixed.items()) <= set(labels) and label in dict(labels)}


def test_a_fresh_server_has_every_finite_label_series_at_zero(fresh: Fresh) -> None:
    text = fresh.node.metrics_text()
    app = {"app_id": APP["id"]}
    assert label_values(text, "sockudo_connection_errors_total", "error_type", **app) >= {
        "app_disabled", "origin_not_allowed", "node_over_capacity", "app_over_quota", "unsupported_protocol",
        "pong_timeout", "invalid_message_format", "message_too_large", "invalid_utf8", "protocol_error",
        "authentication_failed", "api_authentication_failed"}
    assert label_values(text, "sockudo_connection_errors_total", "error_type", app_id="unknown") == {"app_not_found"}
    assert_zero(text, "sockudo_connection_errors_total")
    assert label_values(text, "sockudo_disconnections_by_reason_total", "reason", **app) >= {
        "client_closed", "connection_lost", "protocol_error", "invalid_utf8", "closed_4009", "closed_4100",
        "closed_4200", "closed_4201"}
    assert_zero(text, "sockudo_disconnections_by_reason_total", **app)
    assert label_values(text, "sockudo_publish_rejected_total", "reason", **app) >= {
        "invalid_input", "payload_too_large", "store_unavailable", "too_many_channels"}
    assert label_values(text, "sockudo_subscription_errors_total", "reason", **app) >= {
        "invalid_channel", "AuthError", "InvalidChannelData", "LimitReached"}
    assert label_values(text, "sockudo_client_events_rejected_total", "reason", **app) >= {
        "rate_limited", "disabled", "payload_too_large", "not_subscribed"}
    assert label_values(text, "sockudo_rate_limit_triggered_total", "limiter_type", app_id="unknown") == {
        "ip_websocket_upgrades", "ip_connections", "ip_api"}
    assert label_values(text, "sockudo_history_recovery_failures_total", "code", **app) == {
        "stream_reset", "position_expired", "continuity_unverifiable", "persistence_unavailable"}
    for name in ("sockudo_subscription_errors_total", "sockudo_publish_rejected_total",
                 "sockudo_client_events_rejected_total", "sockudo_history_recovery_success_total",
                 "sockudo_history_recovery_failures_total", "sockudo_publish_accepted_total",
                 "sockudo_history_write_failures_total", "sockudo_channel_subscriptions_total"):
        assert_zero(text, name, **app)
    # Webhooks: no app has one, the outcome counters exist anyway; the shared queue is reported.
    assert label_values(text, "sockudo_webhooks_queued_total", "event_type", **app) == set(EVENT_TYPES)
    assert label_values(text, "sockudo_webhooks_queued_total", "endpoint", **app) == {"none"}
    assert_zero(text, "sockudo_webhooks_queued_total", **app)
    assert label_values(text, "sockudo_queue_depth", "state", queue="webhooks") == {
        "ready", "delayed", "active", "dead_letter"}
    # Push admission (server side).
    assert label_values(text, "sockudo_push_publish_rejected_total", "reason", app=APP["id"]) == {
        "invalid_input", "conflict", "service_unavailable"}
    assert_zero(text, "sockudo_push_publish_rejected_total")


def test_a_fresh_worker_has_every_outcome_series_at_zero(fresh: Fresh) -> None:
    text = fresh.worker.metrics_text()
    app = {"app_id": APP["id"]}
    for name in ("sockudo_webhooks_delivered_total", "sockudo_webhooks_retried_total"):
        assert label_values(text, name, "event_type", **app) == set(EVENT_TYPES)
        assert_zero(text, name, **app)
    assert label_values(text, "sockudo_webhooks_failed_total", "reason", **app) == {
        "timeout", "connect", "request", "http_5xx"}
    assert label_values(text, "sockudo_webhooks_dead_lettered_total", "reason", **app) == {
        "permanent_failure", "retries_exhausted", "worker_failure"}
    assert label_values(text, "sockudo_push_dispatched_total", "status", app=APP["id"], provider="apns") == {
        "accepted", "rejected", "retryable", "expired"}
    assert label_values(text, "sockudo_push_provider_failures_total", "provider",
                        app=APP["id"], failure_class="credential_auth") == set(PROVIDERS)
    assert label_values(text, "sockudo_push_delivery_status_total", "status", app=APP["id"]) == {
        "succeeded", "partially_succeeded", "failed", "expired", "dead_lettered"}
    assert label_values(text, "sockudo_push_status_update_failures_total", "reason") == {
        "store_error", "cas_exhausted", "invariant_violation"}
    for name in ("sockudo_webhooks_failed_total", "sockudo_webhooks_dead_lettered_total",
                 "sockudo_push_dispatched_total", "sockudo_push_provider_failures_total",
                 "sockudo_push_status_update_failures_total"):
        assert_zero(text, name)


@pytest.mark.parametrize("path", ["/", "/metricsx", "/metrics/", "/up", "/favicon.ico", "/apps/910/events"])
def test_metrics_listeners_answer_404_off_metrics(fresh: Fresh, path: str) -> None:
    for port in (fresh.node.metrics_port, fresh.worker.metrics_port):
        resp = requests.get(f"http://127.0.0.1:{port}{path}", timeout=5)
        assert resp.status_code == 404, (port, path, resp.text[:200])
        assert "sockudo_" not in resp.text
        ok = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert ok.status_code == 200 and "sockudo_" in ok.text
        assert ok.headers["Content-Type"].startswith("text/plain")


SELECTOR = re.compile(r"\b(sockudo_[a-z0-9_]+)(\{[^}]*\})?")


def test_every_series_the_alert_rules_select_has_data_before_anything_happens(fresh: Fresh) -> None:
    prometheus = PrometheusServer({"sockudo": [f"127.0.0.1:{fresh.node.metrics_port}"],
                                   "sockudo-workers": [f"127.0.0.1:{fresh.worker.metrics_port}"]},
                                  rule_files=[ALERTS]).start()
    try:
        wait_until(prometheus.targets_up, timeout=20, interval=0.2, message="both targets scraped")
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        assert len(rules) == 10
        selectors = {m.group(0) for r in rules for m in SELECTOR.finditer(r["query"])}
        assert len(selectors) >= 12, selectors

        def no_data() -> list[str]:
            return sorted(s for s in selectors if not prometheus.query(s))

        wait_until(lambda: not no_data(), timeout=20, interval=0.5,
                   message=f"data for every selector of the alert rules (none for {no_data()})")

        def evaluated() -> bool:  # every rule evaluated at least twice since the data arrived
            current = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
            return all(r["health"] == "ok" and r.get("lastEvaluation", "").startswith("2") for r in current)

        wait_until(evaluated, timeout=20, interval=0.5, message="every rule evaluated without error")
        # rate() needs two samples: wait for those, then nothing may be pending or firing.
        wait_until(lambda: all(prometheus.query(f"count_over_time({s}[1m]) >= 3") for s in selectors),
                   timeout=20, interval=0.5, message="three scrapes of every selected series")
        assert prometheus.api("alerts")["alerts"] == []
    finally:
        prometheus.stop()
