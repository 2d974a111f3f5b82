"""Push metrics (Sockudo's ``sockudo_push_*`` names, never prefixed), created against
an injected registry. prometheus-client renders counters with ``_total`` (docs/metrics.md).

Labels are bounded: ``app`` (app id), ``provider`` (apns|fcm|webpush), ``status``/``outcome``,
``failure_class`` (8 classes), ``stage``/``state`` — never publish ids, devices or tokens.

Code that runs inside forked RQ work-horses records into a :class:`RecordingMetrics`; the job
leaves the recorded operations in ``job.meta`` and the worker's long-lived main process replays
them into its registry (the same approach as the webhook worker: no multiprocess files).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sockudo.metrics.instruments import Counter, Histogram
from sockudo.push.model import PROVIDERS
from sockudo.push.providers import ACCEPTED, FAILURE_CLASSES, REJECTED, RETRYABLE
from sockudo.push.status import TERMINAL

logger = logging.getLogger(__name__)

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
FANOUT_BUCKETS = (1, 10, 100, 1000, 10_000, 100_000, 1_000_000)

# name → (kind, help, labels, buckets)
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...] | None]] = {
    "sockudo_push_publish_accepted": ("counter", "Push publishes admitted, by result", ("app", "result"), None),
    "sockudo_push_publish_rejected": (
        "counter",
        "Push publishes refused at admission, by reason (invalid_input, conflict, service_unavailable)",
        ("app", "reason"),
        None,
    ),
    "sockudo_push_publish_acceptance_duration_seconds": (
        "histogram",
        "Time to admit a publish",
        ("app",),
        DURATION_BUCKETS,
    ),
    "sockudo_push_fanout_size": ("histogram", "Expected recipients per admitted publish", ("app",), FANOUT_BUCKETS),
    "sockudo_push_duplicate_suppressed": (
        "counter",
        "Repeated publishes (same publishId and body) and repeated delivery results that changed nothing",
        ("app",),
        None,
    ),
    "sockudo_push_scheduled_jobs": (
        "counter",
        "Publishes and retries scheduled for later (notBeforeMs, backoff)",
        ("app", "status"),
        None,
    ),
    "sockudo_push_planner_duration_seconds": (
        "histogram",
        "Time to expand a publish into delivery jobs",
        ("app",),
        DURATION_BUCKETS,
    ),
    "sockudo_push_delivery_jobs_emitted": ("counter", "Deliveries planned (one per device)", ("provider", "app"), None),
    "sockudo_push_dispatched": (
        "counter",
        "Provider requests by outcome (accepted, rejected, retryable, expired)",
        ("provider", "status", "app"),
        None,
    ),
    "sockudo_push_dispatch_duration_seconds": (
        "histogram",
        "Provider request latency, by outcome",
        ("provider", "status", "app"),
        DURATION_BUCKETS,
    ),
    "sockudo_push_provider_failures": (
        "counter",
        "Provider answers other than accepted, by failure class",
        ("provider", "failure_class", "app"),
        None,
    ),
    "sockudo_push_token_invalidations": (
        "counter",
        "Devices deleted because the provider said the token is dead",
        ("provider", "app"),
        None,
    ),
    "sockudo_push_delivery_status": (
        "counter",
        "Publishes reaching a final state (succeeded, partially_succeeded, failed, expired, dead_lettered)",
        ("status", "app"),
        None,
    ),
    "sockudo_push_retry_scheduled": ("counter", "Retries scheduled", ("provider", "app"), None),
    "sockudo_push_retry_attempted": ("counter", "Retry attempts started", ("provider", "app"), None),
    "sockudo_push_retry_expired": (
        "counter",
        "Deliveries that expired instead of being retried",
        ("provider", "app"),
        None,
    ),
    "sockudo_push_retry_dead_lettered": (
        "counter",
        "Deliveries dead-lettered (retries exhausted or failure)",
        ("provider", "app"),
        None,
    ),
    "sockudo_queue_dead_letter_replayed": ("counter", "Dead letters replayed", ("backend", "queue"), None),
    "sockudo_push_queue_local_requeued": (
        "counter",
        "Jobs taken over after their worker stopped renewing its lease",
        ("stage", "reason"),
        None,
    ),
    "sockudo_push_invariant_violations": (
        "counter",
        "Status writes refused because they would go backwards",
        ("invariant",),
        None,
    ),
    "sockudo_push_status_update_failures": (
        "counter",
        "Delivery status updates (claim, settle, state change) that failed or were refused, by component "
        "(planner, retry, feedback) and reason (cas_exhausted, invariant_violation, store_error)",
        ("component", "reason"),
        None,
    ),
    "sockudo_push_status_cas_conflicts": (
        "counter",
        "Status transactions retried after a concurrent write",
        ("component",),
        None,
    ),
    "sockudo_push_credential_writes": ("counter", "Provider credentials stored", ("provider", "app"), None),
}

STATUS_COMPONENTS = ("planner", "retry", "feedback")

# Every value of the counters' finite label sets (besides ``app``, one per configured app):
# ``PushMetrics.prepare`` creates these series at 0, so rates and the alert rules have data
# before the first failure.
FINITE_LABELS: dict[str, dict[str, tuple[str, ...]]] = {
    "sockudo_push_publish_accepted": {"result": ("accepted",)},
    "sockudo_push_publish_rejected": {"reason": ("invalid_input", "conflict", "service_unavailable")},
    "sockudo_push_duplicate_suppressed": {},
    "sockudo_push_scheduled_jobs": {"status": ("not_before", "retry")},
    "sockudo_push_delivery_jobs_emitted": {"provider": PROVIDERS},
    "sockudo_push_dispatched": {"provider": PROVIDERS, "status": (ACCEPTED, REJECTED, RETRYABLE, "expired")},
    "sockudo_push_provider_failures": {"provider": PROVIDERS, "failure_class": FAILURE_CLASSES},
    "sockudo_push_token_invalidations": {"provider": PROVIDERS},
    "sockudo_push_delivery_status": {"status": TERMINAL},
    "sockudo_push_retry_scheduled": {"provider": PROVIDERS},
    "sockudo_push_retry_attempted": {"provider": PROVIDERS},
    "sockudo_push_retry_expired": {"provider": PROVIDERS},
    "sockudo_push_retry_dead_lettered": {"provider": PROVIDERS},
    "sockudo_push_credential_writes": {"provider": PROVIDERS},
    "sockudo_push_invariant_violations": {"invariant": ("status_transition",)},
    "sockudo_push_status_update_failures": {"component": STATUS_COMPONENTS,
                                            "reason": ("store_error", "cas_exhausted", "invariant_violation")},
    "sockudo_push_status_cas_conflicts": {"component": STATUS_COMPONENTS},
}


class PushMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        for name, (kind, doc, labels, buckets) in DEFINITIONS.items():
            if kind == "counter":
                self._counters[name] = Counter(name, doc, labels, registry=registry)
            else:
                self._histograms[name] = Histogram(name, doc, labels, buckets=buckets or DURATION_BUCKETS,
                                                   registry=registry)

    def prepare(self, app_ids: list[str]) -> None:
        """Create every series of ``FINITE_LABELS`` at 0, for each of ``app_ids`` where the metric has ``app``."""
        for name, values in FINITE_LABELS.items():
            labelnames = DEFINITIONS[name][2]
            apps = app_ids if "app" in labelnames else [None]
            for app in apps:
                for combination in itertools.product(*values.values()):
                    labels = dict(zip(values, combination, strict=True))
                    if app is not None:
                        labels["app"] = app
                    self._family(name).labels(**labels)

    def _family(self, name: str) -> Counter | Histogram:
        return self._counters[name] if name in self._counters else self._histograms[name]

    def inc(self, name: str, labels: dict[str, str], amount: float = 1) -> None:
        self._counters[name].labels(**labels).inc(amount)

    def observe(self, name: str, labels: dict[str, str], value: float) -> None:
        self._histograms[name].labels(**labels).observe(value)

    def replay(self, ops: list[list[Any]]) -> None:
        """Apply operations recorded by :class:`RecordingMetrics` (from a work-horse's job meta)."""
        for op in ops or []:
            try:
                kind, name, labels, value = op
                if name not in DEFINITIONS:
                    continue
                if kind == "inc":
                    self.inc(name, labels, value)
                elif kind == "observe":
                    self.observe(name, labels, value)
            except (ValueError, TypeError, KeyError):  # KeyError: an "inc" of a histogram, or the reverse
                logger.debug("ignoring a malformed push metric operation")


class RecordingMetrics:
    """Same interface; keeps the operations (a work-horse's metrics go home in job.meta)."""

    def __init__(self, forward: PushMetrics | None = None) -> None:
        self.ops: list[list[Any]] = []
        self.forward = forward

    def inc(self, name: str, labels: dict[str, str], amount: float = 1) -> None:
        self.ops.append(["inc", name, labels, amount])
        if self.forward is not None:
            self.forward.inc(name, labels, amount)

    def observe(self, name: str, labels: dict[str, str], value: float) -> None:
        self.ops.append(["observe", name, labels, value])
        if self.forward is not None:
            self.forward.observe(name, labels, value)

    def take(self) -> list[list[Any]]:
        ops, self.ops = self.ops, []
        return ops


class PushQueueCollector(Collector):
    """``sockudo_push_queue_oldest_age_seconds{stage,state}`` and ``sockudo_push_queue_depth{stage,state}``,
    read from the job records at scrape time (stage ``delivery_jobs``: plan and dispatch jobs)."""

    def __init__(self, read: Callable[[], dict[str, tuple[int, float]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.read()
        except Exception as exc:  # a scrape must not fail because Redis is down
            logger.debug("push queue stats unavailable: %s", exc)
            return
        age = GaugeMetricFamily(
            "sockudo_push_queue_oldest_age_seconds",
            "Age of the oldest due push job not yet finished (0 if none)",
            labels=["stage", "state"],
        )
        depth = GaugeMetricFamily(
            "sockudo_push_queue_depth", "Push jobs not yet finished, by state", labels=["stage", "state"]
        )
        for state, (count, oldest) in stats.items():
            age.add_metric(["delivery_jobs", state], oldest)
            depth.add_metric(["delivery_jobs", state], count)
        yield age
        yield depth
