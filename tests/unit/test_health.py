"""Readiness: concurrent, time-boxed checks; critical vs non-critical; the verdicts
``OK``/``DEGRADED``/``ERROR``/``DRAINING`` with ``X-Health-Check``; failures as metrics."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry

from sockudo.adapter.redis import RedisAdapter
from sockudo.cache import RedisCache
from sockudo.health import Check, Readiness, build_readiness, run_checks
from sockudo.http_api import create_app
from sockudo.webhooks.markers import MemoryMarkers
from sockudo.webhooks.metrics import WebhookMetrics
from sockudo.webhooks.model import WebhookSettings
from sockudo.webhooks.sink import WebhookSink
from tests.support.fakes import FakeRuntime, World, make_app


def slow(seconds: float) -> Any:
    def probe() -> bool:
        time.sleep(seconds)
        return True

    return probe


def boom() -> None:
    raise ConnectionError("Connection refused")


def test_checks_run_concurrently_and_each_is_time_boxed() -> None:
    started = time.monotonic()
    outcomes = run_checks([Check("a", slow(5), True), Check("b", slow(5), False), Check("c", lambda: True),
                           Check("d", boom), Check("e", lambda: False)], timeout_s=0.3)
    assert time.monotonic() - started < 2.0  # bounded by the timeout, not the sum of the checks
    by_name = {o.name: o for o in outcomes}
    assert not by_name["a"].ok and by_name["a"].reason == "timed out after 300 ms"
    assert not by_name["b"].ok and not by_name["b"].critical
    assert by_name["c"].ok
    assert not by_name["d"].ok and by_name["d"].reason == "ConnectionError: Connection refused"
    assert not by_name["e"].ok and by_name["e"].reason == "unhealthy"


def test_verdicts_and_metrics() -> None:
    registry = CollectorRegistry()
    readiness = Readiness(registry, timeout_ms=200)
    state = {"adapter": True, "queue": True}
    readiness.add_check("adapter", lambda: state["adapter"], critical=True)
    readiness.add_check("webhook_queue", lambda: state["queue"], critical=False)

    def failures(check: str) -> float | None:
        return registry.get_sample_value("sockudo_readiness_failures_total", {"check": check})

    assert failures("adapter") == 0  # the series exist before the first failure
    assert (readiness.evaluate(False).status, readiness.evaluate(False).http_status) == ("OK", 200)
    state["queue"] = False
    verdict = readiness.evaluate(False)
    assert (verdict.status, verdict.http_status) == ("DEGRADED", 200)
    assert verdict.reasons == ["webhook_queue: unhealthy"]
    assert failures("webhook_queue") == 1
    assert registry.get_sample_value("sockudo_readiness_check_up", {"check": "webhook_queue"}) == 0
    state["adapter"] = False
    assert (readiness.evaluate(False).status, readiness.evaluate(False).http_status) == ("ERROR", 503)
    assert failures("adapter") == 2
    assert registry.get_sample_value("sockudo_readiness_check_up", {"check": "adapter"}) == 0
    assert readiness.evaluate(True).status == "DRAINING"
    state.update(adapter=True, queue=True)
    readiness.evaluate(False)
    assert registry.get_sample_value("sockudo_readiness_check_up", {"check": "adapter"}) == 1


class FakeRedis:
    """A Redis client whose PING can fail or hang (what the probes call)."""

    def __init__(self) -> None:
        self.up = True
        self.delay = 0.0

    def register_script(self, script: str) -> Any:
        return None  # the adapter registers its scripts; these tests never run them

    def ping(self) -> bool:
        time.sleep(self.delay)
        if not self.up:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return True


class FakeQueue:
    backend = "fake"

    def __init__(self) -> None:
        self.up = True

    def enqueue(self, deliveries: list[Any]) -> None:
        return None

    def stats(self) -> Any:
        if not self.up:
            raise ConnectionError("queue backend down")
        return {}


def test_up_endpoints_with_the_checks_of_the_services() -> None:
    world = World(make_app(), make_app(id="app-off", key="key-off", enabled=False), health_check_timeout_ms=200)
    redis = FakeRedis()
    adapter = RedisAdapter(world.config, world.metrics, FakeRuntime(), client=redis)  # type: ignore[arg-type]
    adapter.healthy = True
    world.services.adapter = adapter
    world.services.cache = RedisCache(redis)
    queue = FakeQueue()
    world.services.events = WebhookSink(WebhookSettings(), queue, WebhookMetrics(CollectorRegistry()), FakeRuntime(),
                                        adapter, MemoryMarkers(), "sockudo:")
    readiness = build_readiness(world.services)
    assert [(c.name, c.critical) for c in readiness.checks] == [
        ("adapter", True), ("cache", True), ("webhook_queue", False)]
    flask = create_app(world.services, world.handler)
    flask.extensions["sockudo"]["readiness"] = readiness
    client = flask.test_client()

    def up(path: str = "/up") -> tuple[int, str, str]:
        resp = client.get(path)
        return resp.status_code, resp.get_data(as_text=True), resp.headers["X-Health-Check"]

    assert up() == (200, "OK", "OK")
    assert up("/up/app-1") == (200, "OK", "OK")
    assert up("/up/nope") == (404, "NOT_FOUND", "NOT_FOUND")
    assert up("/up/app-off") == (503, "ERROR", "ERROR")
    queue.up = False
    assert up() == (200, "DEGRADED", "DEGRADED")
    redis.delay = 1.0  # slower than health_check_timeout_ms
    started = time.monotonic()
    assert up("/up/app-1") == (503, "ERROR", "ERROR")
    assert time.monotonic() - started < 0.9
    redis.delay, redis.up = 0.0, False
    assert up() == (503, "ERROR", "ERROR")
    adapter.healthy = False
    redis.up, queue.up = True, True
    assert up() == (503, "ERROR", "ERROR")  # PING answers but the pub/sub listener is down
    adapter.healthy = True
    assert up() == (200, "OK", "OK")
    world.handler.draining = True
    assert up() == (503, "DRAINING", "DRAINING")
    registry = world.registry
    assert registry.get_sample_value("sockudo_readiness_failures_total", {"check": "adapter"}) == 3
    assert registry.get_sample_value("sockudo_readiness_failures_total", {"check": "webhook_queue"}) == 3
    assert registry.get_sample_value("sockudo_readiness_failures_total", {"check": "app_disabled"}) == 1


def test_local_adapter_has_no_checks_and_is_ready() -> None:
    world = World()
    flask = create_app(world.services, world.handler)
    resp = flask.test_client().get("/up")  # readiness built on first use
    assert (resp.status_code, resp.headers["X-Health-Check"]) == (200, "OK")
    assert flask.extensions["sockudo"]["readiness"].checks == []
