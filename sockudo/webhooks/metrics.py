"""Webhook metrics, created against an injected registry (the server's, or a worker's own).

Outcome counters count one per event per endpoint (a configured entry of an app's
``webhooks`` list; entries sharing a URL are separate endpoints): ``queued``, ``delivered``
and ``dead_lettered`` once per event, so ``queued - delivered - dead_lettered`` is what is
still in flight; ``failed`` and ``retried`` once per event per failed attempt (a batch of 3
events that fails twice adds 6). So every outcome breaks down by app, endpoint, event type and
reason. Labels stay bounded: ``app_id``, ``endpoint`` (the entry's ``endpoint_id``,
``<index>-<8 hex>``: as many as the config has entries; ``unknown`` for jobs queued by an older
server; ``none`` for an app without webhooks, whose series exist at 0), ``event_type`` (the 7
webhook event names), ``reason`` (``timeout|connect|request|http_5xx|http_<4xx>``, or the
dead-letter reasons) — never URLs, channels or delivery ids. The latency histograms stay per app.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sockudo.metrics.instruments import Counter, CounterChild, Histogram
from sockudo.webhooks.model import DEBOUNCED, EVENT_TYPES, UNKNOWN_ENDPOINT, distinct_endpoints

logger = logging.getLogger(__name__)

#: Failure and dead-letter reasons created at 0 by ``WebhookMetrics.prepare`` (an endpoint's
#: ``http_<4xx>`` status appears at its first use).
FAILURE_REASONS = ("timeout", "connect", "request", "http_5xx")
DEAD_LETTER_REASONS = ("permanent_failure", "retries_exhausted", "worker_failure")
#: The ``endpoint`` of an app without webhooks, whose series ``prepare`` creates at 0.
NO_ENDPOINT = "none"

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str = "sockudo_") -> None:
        p = prefix
        r = registry
        self.queued = Counter(
            f"{p}webhooks_queued", "Webhook events handed to the delivery queue (one per event per endpoint)",
            ["app_id", "endpoint", "event_type"], registry=r,
        )
        self.delivered = Counter(
            f"{p}webhooks_delivered", "Webhook events delivered with a 2xx answer (one per event per endpoint)",
            ["app_id", "endpoint", "event_type"], registry=r,
        )
        self.failed = Counter(
            f"{p}webhooks_failed",
            "Webhook events in failed delivery attempts (one per event per endpoint per attempt), by reason "
            "(timeout, connect, request, http_5xx, http_<4xx>)",
            ["app_id", "endpoint", "event_type", "reason"], registry=r,
        )
        self.retried = Counter(
            f"{p}webhooks_retried",
            "Webhook events whose delivery was scheduled for a retry after a retryable failure "
            "(one per event per endpoint per retry)",
            ["app_id", "endpoint", "event_type"], registry=r,
        )
        self.dead_lettered = _DeadLettered(Counter(
            f"{p}webhooks_dead_lettered",
            "Webhook events given up and stored in a dead letter (one per event per endpoint), by reason "
            "(permanent_failure, retries_exhausted, worker_failure)",
            ["app_id", "endpoint", "event_type", "reason"], registry=r,
        ))
        self.deferred = Counter(
            f"{p}webhooks_deferred",
            "Deliveries put back for ~1 s because their endpoint already had max_concurrent_per_endpoint "
            "attempts in flight (no attempt made or counted)",
            ["app_id", "endpoint"], registry=r,
        )
        self.attempt_seconds = Histogram(
            f"{p}webhooks_delivery_latency_seconds", "Duration of one delivery attempt (the HTTP request), in seconds",
            ["app_id"], buckets=SECONDS_BUCKETS, registry=r,
        )
        self.delivery_delay_seconds = Histogram(
            f"{p}webhooks_delivery_delay_seconds",
            "From the batch's first event to its 2xx answer (queueing and retries included), in seconds",
            ["app_id"], buckets=SECONDS_BUCKETS, registry=r,
        )
        self.debounce_cancelled = Counter(
            f"{p}webhooks_debounce_cancelled",
            "Leaves (channel_vacated, member_removed) cancelled by a rejoin inside the debounce window",
            ["app_id", "event_type"], registry=r,
        )
        self.enqueue_failures = Counter(
            f"{p}webhooks_enqueue_failures", "Attempts to enqueue deliveries that failed (kept in memory and retried)",
            registry=r,
        )
        self.dropped = Counter(
            f"{p}webhooks_dropped", "Deliveries dropped because the in-process backlog was full",
            ["app_id", "endpoint"], registry=r,
        )
        self.abandoned = Counter(
            f"{p}webhooks_abandoned_jobs", "Jobs left 'started' by a dead worker and put back on the queue",
            registry=r,
        )

    def prepare(self, apps: Iterable[Any]) -> None:
        """Create every outcome series of the configured ``apps`` at 0 (each endpoint, event type and
        reason), so rates and alerts have data before the first webhook. An app without webhooks
        gets its series under ``endpoint="none"``: sums by app have data before it has any."""
        for app in apps:
            endpoints = [eid for eid, _ in distinct_endpoints(app.webhooks)] or [NO_ENDPOINT]
            for endpoint in endpoints:
                for event_type in sorted(EVENT_TYPES):
                    for counter in (self.queued, self.delivered, self.retried):
                        counter.labels(app.id, endpoint, event_type)
                    for reason in FAILURE_REASONS:
                        self.failed.labels(app.id, endpoint, event_type, reason)
                    for reason in DEAD_LETTER_REASONS:
                        self.dead_lettered.labels(app.id, endpoint, event_type, reason)
                self.deferred.labels(app.id, endpoint)
                self.dropped.labels(app.id, endpoint)
            for leave in sorted(DEBOUNCED):
                self.debounce_cancelled.labels(app.id, leave)
            self.attempt_seconds.labels(app.id)
            self.delivery_delay_seconds.labels(app.id)

UNKNOWN_EVENT_TYPE = "unknown"


class _DeadLettered:
    """``sockudo_webhooks_dead_lettered_total{app_id,endpoint,event_type,reason}``.

    ``labels(app_id, endpoint, event_type, reason)`` as on any counter. The older two-value call
    ``labels(app_id, reason)`` (a caller that knows neither the endpoint nor the events) still
    works and counts under ``endpoint="unknown", event_type="unknown"``; callers should use
    ``record_dead_lettered`` instead."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def labels(self, *values: str, **named: str) -> CounterChild:
        if len(values) == 2 and not named:
            app_id, reason = values
            return self.counter.labels(app_id, UNKNOWN_ENDPOINT, UNKNOWN_EVENT_TYPE, reason)
        return self.counter.labels(*values, **named)


@dataclass
class QueueStats:
    backend: str  # "redis" | "memory"
    queue: str
    depth: dict[str, int]  # state -> count: ready, delayed, active, dead_letter
    oldest_age_seconds: float


class QueueCollector(Collector):
    """Queue depth and oldest age, read at scrape time (Sockudo's ``sockudo_queue_depth{state}``)."""

    def __init__(self, read: Callable[[], QueueStats], prefix: str = "sockudo_") -> None:
        self.read = read
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.read()
        except Exception as exc:  # a scrape must not fail because the queue backend is down
            logger.debug("webhook queue stats unavailable: %s", exc)
            return
        depth = GaugeMetricFamily(
            f"{self.prefix}queue_depth", "Jobs in the queue by state (ready, delayed, active, dead_letter)",
            labels=["backend", "queue", "state"],
        )
        for state, count in stats.depth.items():
            depth.add_metric([stats.backend, stats.queue, state], count)
        yield depth
        age = GaugeMetricFamily(
            f"{self.prefix}queue_oldest_age_seconds", "Age of the oldest ready job (0 when none waits)",
            labels=["backend", "queue"],
        )
        age.add_metric([stats.backend, stats.queue], stats.oldest_age_seconds)
        yield age
