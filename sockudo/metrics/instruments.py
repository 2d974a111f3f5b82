"""The project's metric instruments: prometheus-client's, plus a tap that other code can listen on.

Every metric Sockudo records is made here (``Counter``, ``Gauge``, ``Histogram``, ``Summary``),
against an injected ``CollectorRegistry``. An operation goes to prometheus-client, which holds
the values and renders ``/metrics``; then, only while something listens on the registry's
``Tap`` (the TCP exporter, while a client is connected), to the listeners too. With nobody
listening, the tap costs an operation one attribute check.

``labels(...)`` returns the child bound to one label set, cached by the values as passed: hot
paths bind their children once (``Metrics.app``) or pay one dict lookup.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar
from weakref import WeakKeyDictionary

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase


class Kind(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"
    SUMMARY = "summary"


class Operation(enum.Enum):
    """What an operation did, as a listener hears it."""

    INCREMENT_COUNTER = "increment_counter"
    INCREMENT_GAUGE = "increment_gauge"
    DECREMENT_GAUGE = "decrement_gauge"
    SET_GAUGE = "set_gauge"
    OBSERVE = "observe"  # a histogram's or a summary's observation


class Listener(Protocol):
    def record(self, child: Child, operation: Operation, value: float) -> None:
        """Called after each operation, on the caller's thread or greenlet: must be quick and never block."""


class Tap:
    """One registry's instruments, and who listens to their operations."""

    __slots__ = ("families", "listeners")

    def __init__(self) -> None:
        self.families: list[Family] = []
        # A tuple, replaced on change: operations iterate it without a lock.
        self.listeners: tuple[Listener, ...] = ()

    def add(self, listener: Listener) -> None:
        if listener not in self.listeners:
            self.listeners = (*self.listeners, listener)

    def remove(self, listener: Listener) -> None:
        self.listeners = tuple(x for x in self.listeners if x is not listener)


_taps: WeakKeyDictionary[CollectorRegistry, Tap] = WeakKeyDictionary()


def tap_of(registry: CollectorRegistry) -> Tap:
    """The tap of the instruments made against ``registry``."""
    tap = _taps.get(registry)
    if tap is None:
        tap = _taps[registry] = Tap()
    return tap


class Child:
    """One label set of a metric (or the metric itself, when it has no labels)."""

    __slots__ = ("family", "labels", "_tap")

    def __init__(self, family: Family, labels: dict[str, str]) -> None:
        self.family = family
        self.labels = labels  # label name -> value
        self._tap = family.tap

    def _emit(self, operation: Operation, value: float) -> None:
        for listener in self._tap.listeners:
            listener.record(self, operation, value)


C = TypeVar("C", bound=Child)


class Family(Generic[C]):
    """A metric: its prometheus-client collector, and a child per label set."""

    kind: Kind

    def __init__(self, metric: MetricWrapperBase, registry: CollectorRegistry) -> None:
        described = next(iter(metric.describe()))  # the name and unit as prometheus-client settled them
        self.name: str = described.name
        self.documentation: str = described.documentation
        self.unit: str = described.unit
        self.tap = tap_of(registry)
        self._metric = metric
        self._labelnames: tuple[str, ...] = ()
        self._children: dict[tuple[object, ...], C] = {}
        self._unlabelled: C | None = None
        self.tap.families.append(self)

    def _init_labels(self, labelnames: Sequence[str]) -> None:
        self._labelnames = tuple(labelnames)
        if not self._labelnames:
            self._unlabelled = self._bind(self._metric, {})

    @property
    def labelnames(self) -> tuple[str, ...]:
        return self._labelnames

    @property
    def exposed_name(self) -> str:
        """The name Prometheus shows: prometheus-client renders counters as ``<name>_total``."""
        return f"{self.name}_total" if self.kind is Kind.COUNTER else self.name

    def labels(self, *values: object, **named: object) -> C:
        """The child for one label set (by position or by name); the same object for the same values."""
        if named:
            if values or sorted(named) != sorted(self._labelnames):
                raise ValueError(f"{self.name}: incorrect label names {sorted(named)}")
            values = tuple(named[n] for n in self._labelnames)
        child = self._children.get(values)
        if child is None:
            inner = self._metric.labels(*values)  # prometheus-client checks the count
            labels = dict(zip(self._labelnames, (str(v) for v in values), strict=True))
            child = self._children[values] = self._bind(inner, labels)
        return child

    def _root(self) -> C:
        if self._unlabelled is None:
            raise ValueError(f"{self.kind.value} metric {self.name} is missing label values")
        return self._unlabelled

    def _bind(self, inner: MetricWrapperBase, labels: dict[str, str]) -> C:
        raise NotImplementedError


class CounterChild(Child):
    __slots__ = ("_inc",)

    def __init__(self, family: Family, labels: dict[str, str], inner: prometheus_client.Counter) -> None:
        super().__init__(family, labels)
        self._inc = inner.inc

    def inc(self, amount: float = 1) -> None:
        self._inc(amount)
        if self._tap.listeners:
            self._emit(Operation.INCREMENT_COUNTER, amount)


class GaugeChild(Child):
    __slots__ = ("_inc", "_dec", "_set")

    def __init__(self, family: Family, labels: dict[str, str], inner: prometheus_client.Gauge) -> None:
        super().__init__(family, labels)
        self._inc, self._dec, self._set = inner.inc, inner.dec, inner.set

    def inc(self, amount: float = 1) -> None:
        self._inc(amount)
        if self._tap.listeners:
            self._emit(Operation.INCREMENT_GAUGE, amount)

    def dec(self, amount: float = 1) -> None:
        self._dec(amount)
        if self._tap.listeners:
            self._emit(Operation.DECREMENT_GAUGE, amount)

    def set(self, value: float) -> None:
        self._set(value)
        if self._tap.listeners:
            self._emit(Operation.SET_GAUGE, value)


class ObserverChild(Child):
    __slots__ = ("_observe",)

    def __init__(self, family: Family, labels: dict[str, str],
                 inner: prometheus_client.Histogram | prometheus_client.Summary) -> None:
        super().__init__(family, labels)
        self._observe = inner.observe

    def observe(self, amount: float) -> None:
        self._observe(amount)
        if self._tap.listeners:
            self._emit(Operation.OBSERVE, amount)


class Counter(Family[CounterChild]):
    kind = Kind.COUNTER

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry, unit: str = "") -> None:
        super().__init__(prometheus_client.Counter(name, documentation, labelnames, unit=unit, registry=registry),
                         registry)
        self._init_labels(labelnames)

    def _bind(self, inner: MetricWrapperBase, labels: dict[str, str]) -> CounterChild:
        assert isinstance(inner, prometheus_client.Counter)
        return CounterChild(self, labels, inner)

    def inc(self, amount: float = 1) -> None:
        self._root().inc(amount)


class Gauge(Family[GaugeChild]):
    kind = Kind.GAUGE

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry, unit: str = "") -> None:
        super().__init__(prometheus_client.Gauge(name, documentation, labelnames, unit=unit, registry=registry),
                         registry)
        self._init_labels(labelnames)

    def _bind(self, inner: MetricWrapperBase, labels: dict[str, str]) -> GaugeChild:
        assert isinstance(inner, prometheus_client.Gauge)
        return GaugeChild(self, labels, inner)

    def inc(self, amount: float = 1) -> None:
        self._root().inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._root().dec(amount)

    def set(self, value: float) -> None:
        self._root().set(value)


class Histogram(Family[ObserverChild]):
    kind = Kind.HISTOGRAM

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry, buckets: Sequence[float] = prometheus_client.Histogram.DEFAULT_BUCKETS,
                 unit: str = "") -> None:
        super().__init__(prometheus_client.Histogram(name, documentation, labelnames, unit=unit, registry=registry,
                                                     buckets=buckets), registry)
        self._init_labels(labelnames)

    def _bind(self, inner: MetricWrapperBase, labels: dict[str, str]) -> ObserverChild:
        assert isinstance(inner, prometheus_client.Histogram)
        return ObserverChild(self, labels, inner)

    def observe(self, amount: float) -> None:
        self._root().observe(amount)


class Summary(Family[ObserverChild]):
    kind = Kind.SUMMARY

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry, unit: str = "") -> None:
        super().__init__(prometheus_client.Summary(name, documentation, labelnames, unit=unit, registry=registry),
                         registry)
        self._init_labels(labelnames)

    def _bind(self, inner: MetricWrapperBase, labels: dict[str, str]) -> ObserverChild:
        assert isinstance(inner, prometheus_client.Summary)
        return ObserverChild(self, labels, inner)

    def observe(self, amount: float) -> None:
        self._root().observe(amount)


def families(registry: CollectorRegistry) -> list[Family]:
    """The instruments made against ``registry``, by name."""
    return sorted(tap_of(registry).families, key=lambda f: f.name)

