"""The project's instruments: values land in the injected registry; listeners hear operations."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from sockudo.metrics.instruments import Child, Counter, Gauge, Histogram, Operation, Summary, families, tap_of


class Heard:
    def __init__(self) -> None:
        self.ops: list[tuple[str, dict[str, str], Operation, float]] = []

    def record(self, child: Child, operation: Operation, value: float) -> None:
        self.ops.append((child.family.exposed_name, child.labels, operation, value))


def test_values_are_prometheus_clients_and_a_label_set_is_one_child() -> None:
    registry = CollectorRegistry()
    requests = Counter("reqs", "requests", ["app_id", "port"], registry=registry)
    by_position = requests.labels("a1", 9601)
    assert requests.labels("a1", 9601) is by_position
    by_position.inc(2)
    requests.labels(port="9601", app_id="a1").inc()
    assert registry.get_sample_value("reqs_total", {"app_id": "a1", "port": "9601"}) == 3
    assert by_position.labels == {"app_id": "a1", "port": "9601"}

    level = Gauge("level", "level", registry=registry)
    level.set(5)
    level.dec(2)
    latency = Histogram("latency_ms", "latency", ["app_id"], buckets=(1, 10), registry=registry)
    latency.labels("a1").observe(4)
    assert registry.get_sample_value("level") == 3
    assert registry.get_sample_value("latency_ms_bucket", {"app_id": "a1", "le": "10.0"}) == 1
    assert [f.exposed_name for f in families(registry)] == ["latency_ms", "level", "reqs_total"]


def test_wrong_labels_are_refused_as_prometheus_client_refuses_them() -> None:
    registry = CollectorRegistry()
    requests = Counter("reqs", "requests", ["app_id"], registry=registry)
    with pytest.raises(ValueError):
        requests.inc()  # a labelled metric needs its label values
    with pytest.raises(ValueError):
        requests.labels("a1", "extra")
    with pytest.raises(ValueError):
        requests.labels(app="a1")
    with pytest.raises(ValueError):
        Counter("plain", "plain", registry=registry).labels("x")


def test_listeners_hear_their_registrys_operations_only_while_added() -> None:
    registry, other = CollectorRegistry(), CollectorRegistry()
    heard = Heard()
    counter = Counter("reqs", "requests", ["app_id"], registry=registry)
    gauge = Gauge("level", "level", registry=registry)
    summary = Summary("size", "size", registry=registry)
    theirs = Counter("theirs", "theirs", registry=other)
    counter.labels("a1").inc()  # nobody listens yet
    tap_of(registry).add(heard)
    counter.labels("a1").inc(3)
    gauge.inc()
    gauge.dec(0.5)
    gauge.set(7)
    summary.observe(1.5)
    theirs.inc()
    with pytest.raises(ValueError):
        counter.labels("a1").inc(-1)  # refused by prometheus-client: nothing to hear
    tap_of(registry).remove(heard)
    counter.labels("a1").inc()
    assert heard.ops == [
        ("reqs_total", {"app_id": "a1"}, Operation.INCREMENT_COUNTER, 3),
        ("level", {}, Operation.INCREMENT_GAUGE, 1),
        ("level", {}, Operation.DECREMENT_GAUGE, 0.5),
        ("level", {}, Operation.SET_GAUGE, 7),
        ("size", {}, Operation.OBSERVE, 1.5),
    ]
    assert registry.get_sample_value("reqs_total", {"app_id": "a1"}) == 5
