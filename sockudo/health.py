"""Readiness for ``/up`` and ``/up/{app_id}``: time-boxed checks, one verdict.

Each check runs concurrently and is bounded by ``health_check_timeout_ms``
(``HEALTH_CHECK_TIMEOUT_MS``, default 2000): a check that has not answered in time has failed.

| check | when | critical |
|---|---|---|
| ``adapter`` | Redis adapter: ``PING`` answered and the pub/sub listener connected | yes |
| ``cache`` | Redis cache (cache channels, idempotency): ``PING`` | yes |
| ``webhook_queue`` | webhooks on: the queue answers (RQ on Redis: queue stats) | no |
| ``push_queue`` | push on: its job queue answers (``queue_stats``) | no |

Verdict: shutting down ⇒ 503 ``DRAINING`` (no checks); a critical failure ⇒ 503 ``ERROR``;
only non-critical failures ⇒ 200 ``DEGRADED``; else 200 ``OK``. Every failed check bumps
``sockudo_readiness_failures_total{check}`` and ``sockudo_readiness_check_up{check}`` holds the
last result (1/0), so readiness problems are visible in Prometheus, not only to the prober.

Concurrency uses ``threading`` (greenlets once gevent has monkey-patched it), so this module
imports no gevent and runs in unit tests as it is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from sockudo.metrics.instruments import Counter, Gauge

if TYPE_CHECKING:
    from sockudo.services import Services

logger = logging.getLogger(__name__)

OK, DEGRADED, ERROR, DRAINING, NOT_FOUND = "OK", "DEGRADED", "ERROR", "DRAINING", "NOT_FOUND"


#: A readiness probe: raises, or returns False, when the thing it checks is unhealthy.
Probe = Callable[[], object]


@dataclass(frozen=True)
class Check:
    name: str
    probe: Probe
    critical: bool = True


@dataclass
class Outcome:
    name: str
    ok: bool
    critical: bool
    reason: str = ""
    seconds: float = 0.0


@dataclass
class Verdict:
    status: str
    http_status: int
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [f"{o.name}: {o.reason}" for o in self.outcomes if not o.ok]


def run_checks(checks: list[Check], timeout_s: float) -> list[Outcome]:
    """All checks at once; each one that has not answered by ``timeout_s`` has failed."""
    results: dict[str, Outcome] = {}
    done = threading.Event()
    lock = threading.Lock()

    def one(check: Check) -> None:
        started = time.monotonic()
        try:
            ok = check.probe() is not False
            reason = "" if ok else "unhealthy"
        except Exception as exc:  # noqa: BLE001 - any failure of a probe is a failed check
            ok, reason = False, f"{type(exc).__name__}: {exc}"[:200]
        with lock:
            results[check.name] = Outcome(check.name, ok, check.critical, reason, time.monotonic() - started)
            if len(results) == len(checks):
                done.set()

    if checks:
        for check in checks:
            threading.Thread(target=one, args=(check,), name=f"health-{check.name}", daemon=True).start()
        done.wait(timeout_s)
    with lock:
        return [results.get(c.name) or Outcome(c.name, False, c.critical, f"timed out after {timeout_s * 1000:.0f} ms",
                                               timeout_s)
                for c in checks]


class Readiness:
    """The readiness checks of one server, and the metrics they move."""

    def __init__(self, registry: CollectorRegistry, timeout_ms: int = 2000, prefix: str = "sockudo_") -> None:
        self.timeout_s = timeout_ms / 1000.0
        self.checks: list[Check] = []
        self.failures = Counter(
            f"{prefix}readiness_failures", "Readiness checks (/up) that failed or timed out, by check", ["check"],
            registry=registry,
        )
        self.check_up = Gauge(
            f"{prefix}readiness_check_up", "Result of the last readiness check (/up): 1 passed, 0 failed", ["check"],
            registry=registry,
        )

    def add_check(self, name: str, probe: Probe, critical: bool) -> None:
        """Register a check (e.g. push's queue). A name registered twice replaces the first."""
        self.checks = [c for c in self.checks if c.name != name] + [Check(name, probe, critical)]
        self.failures.labels(name)  # the series exists from the start (0), so rate() works at once
        self.check_up.labels(name).set(1)

    def failed(self, name: str) -> None:
        """A failure outside the checks (no apps, app disabled)."""
        self.failures.labels(name).inc()

    def evaluate(self, draining: bool) -> Verdict:
        if draining:
            return Verdict(DRAINING, 503)
        outcomes = run_checks(self.checks, self.timeout_s)
        for o in outcomes:
            self.check_up.labels(o.name).set(1 if o.ok else 0)
            if not o.ok:
                self.failures.labels(o.name).inc()
        if any(not o.ok and o.critical for o in outcomes):
            verdict = Verdict(ERROR, 503, outcomes)
            logger.error("readiness check failed", extra={"status": ERROR, "reasons": verdict.reasons})
        elif any(not o.ok for o in outcomes):
            verdict = Verdict(DEGRADED, 200, outcomes)
            logger.warning("readiness degraded", extra={"status": DEGRADED, "reasons": verdict.reasons})
        else:
            verdict = Verdict(OK, 200, outcomes)
        return verdict


def build_readiness(services: Services) -> Readiness:
    """The checks that apply to this server's services: each driver hands over its probe, or
    None when it depends on nothing outside this process (the local adapter, the memory cache)."""
    config = services.config
    readiness = Readiness(services.metrics.registry, config.health_check_timeout_ms, config.metrics.prefix)
    for name in ("apps", "app_disabled"):
        readiness.failures.labels(name)  # failures outside the checks: no apps, a disabled app probed
    push = services.push
    checks: list[tuple[str, Probe | None, bool]] = [
        ("adapter", services.adapter.readiness_probe(), True),
        ("cache", services.cache.readiness_probe(), True),
        ("webhook_queue", services.events.readiness_probe(), False),
        ("push_queue", push.queue_stats if push is not None else None, False),
    ]
    for name, probe, critical in checks:
        if probe is not None:
            readiness.add_check(name, probe, critical=critical)
    return readiness
