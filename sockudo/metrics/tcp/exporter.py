"""The TCP metrics exporter (spec §1.3): every metric operation, streamed as protobuf.

Wire format, as Sockudo's ``metrics-exporter-tcp`` (proto3, ``docs/event.proto``): a stream of
length-delimited ``Event`` messages (a varint byte length, then the message). A client first
gets one ``Metadata`` per metric, then a ``Metric`` for every operation (counter increment,
gauge increment/decrement/set, histogram or summary observation) made while it is connected.
Client input is ignored.

How operations are captured: prometheus-client's ``Counter.inc``, ``Gauge.inc/dec/set`` and
``Histogram/Summary.observe`` are wrapped **at class level, only while at least one client is
connected** (``MetricTap``). With no client the methods are the library's own: zero cost. The
wrapper calls the original first, then appends a small tuple to a bounded ingest queue; it never
encodes, locks or does I/O. Metric names are those Prometheus shows (counters with ``_total``),
labels are the metric's own plus the constant ones (``environment, region, node, adapter``).

Backpressure never reaches the server (spec §1.3): the ingest queue holds ``buffer_size``
operations — when full, new ones are dropped; each client's queue holds ``buffer_size``
encoded events — when full, its oldest are discarded. Both are counted in
``sockudo_tcp_exporter_dropped_samples_total{stage="ingest"|"client"}``. A client that never
reads only blocks its own writer. Hence: not a source for alerts or SLOs; Prometheus is.

Protobuf is encoded by hand (varints, tags, doubles: a few lines), so the server needs no
``protobuf`` dependency; the tests decode the stream with the real protobuf runtime.
Greenlets come from the injected runtime and sockets from the stdlib (cooperative under
gevent's monkey-patching), so this module imports no gevent.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram, Summary
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase

from sockudo.metrics.tcp.wire import (
    COUNTER,
    DECREMENT_GAUGE,
    GAUGE,
    HISTOGRAM,
    INCREMENT_COUNTER,
    INCREMENT_GAUGE,
    RECORD_HISTOGRAM,
    SET_GAUGE,
    delimited,
    encode_metadata,
    encode_metric,
)
from sockudo.services import Runtime

logger = logging.getLogger(__name__)


class _Listener(Protocol):
    def record(self, metric: Any, operation: int, value: float) -> None: ...


_listeners: list[_Listener] = []
_originals: dict[tuple[type, str], Callable[..., Any]] = {}


def _emit(metric: Any, operation: int, value: float) -> None:
    for listener in _listeners:
        listener.record(metric, operation, value)


def _wrappers() -> dict[tuple[type, str], Callable[..., Any]]:
    counter_inc = Counter.inc
    gauge_inc, gauge_dec, gauge_set = Gauge.inc, Gauge.dec, Gauge.set
    histogram_observe, summary_observe = Histogram.observe, Summary.observe

    def c_inc(self: Any, amount: float = 1, exemplar: Any = None) -> None:
        counter_inc(self, amount, exemplar)
        _emit(self, INCREMENT_COUNTER, amount)

    def g_inc(self: Any, amount: float = 1) -> None:
        gauge_inc(self, amount)
        _emit(self, INCREMENT_GAUGE, amount)

    def g_dec(self: Any, amount: float = 1) -> None:
        gauge_dec(self, amount)
        _emit(self, DECREMENT_GAUGE, amount)

    def g_set(self: Any, value: float) -> None:
        gauge_set(self, value)
        _emit(self, SET_GAUGE, value)

    def h_observe(self: Any, amount: float, exemplar: Any = None) -> None:
        histogram_observe(self, amount, exemplar)
        _emit(self, RECORD_HISTOGRAM, amount)

    def s_observe(self: Any, amount: float) -> None:
        summary_observe(self, amount)
        _emit(self, RECORD_HISTOGRAM, amount)

    return {
        (Counter, "inc"): c_inc,
        (Gauge, "inc"): g_inc,
        (Gauge, "dec"): g_dec,
        (Gauge, "set"): g_set,
        (Histogram, "observe"): h_observe,
        (Summary, "observe"): s_observe,
    }


def tap_installed() -> bool:
    return bool(_originals)


def _add_listener(listener: _Listener) -> None:
    if listener in _listeners:
        return
    _listeners.append(listener)
    if not _originals:
        for (cls, attr), wrapper in _wrappers().items():
            _originals[(cls, attr)] = cls.__dict__[attr]
            setattr(cls, attr, wrapper)


def _remove_listener(listener: _Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)
    if not _listeners and _originals:
        for (cls, attr), original in _originals.items():
            setattr(cls, attr, original)
        _originals.clear()


def metric_type_of(metric: Any) -> int:
    kind = getattr(metric, "_type", "")
    return COUNTER if kind == "counter" else GAUGE if kind == "gauge" else HISTOGRAM


def exposed_name(metric: Any) -> str:
    """The name Prometheus shows: prometheus-client renders counters as ``<name>_total``."""
    return metric._name + "_total" if metric._type == "counter" else metric._name


def registry_metrics(registry: Any) -> list[MetricWrapperBase]:
    """The Counter/Gauge/Histogram/Summary objects registered in ``registry``."""
    lock = getattr(registry, "_lock", None)
    mapping = getattr(registry, "_collector_to_names", {})
    if lock is not None:
        with lock:
            collectors = list(mapping)
    else:
        collectors = list(mapping)
    found = [c for c in collectors if isinstance(c, (Counter, Gauge, Histogram, Summary))]
    return sorted(found, key=lambda m: m._name)


# -- the exporter -------------------------------------------------------------------------------




@dataclass(eq=False)
class _Client:
    sock: socket.socket
    address: str
    metadata: bytes
    queue: deque[bytes] = field(default_factory=deque)
    wake: Any = None
    closed: bool = False


class TcpExporter:
    """Listens on ``host:port`` and streams metric operations to every connected client."""

    SEND_BATCH = 256

    def __init__(self, registry: Any, runtime: Runtime, host: str = "127.0.0.1", port: int = 5000,
                 buffer_size: int = 1024, labels: Mapping[str, str] | None = None, prefix: str = "sockudo_") -> None:
        self.registry = registry
        self.runtime = runtime
        self.host = host
        self.port = port
        self.buffer_size = max(1, buffer_size)
        self.labels = dict(labels or {})
        self.prefix = prefix
        self.clients: list[_Client] = []
        self.dropped = {"ingest": 0, "client": 0}
        self.sent_events = 0
        self._ingest: deque[tuple[float, Any, int, float]] = deque()
        self._names: set[str] = set()
        self._wake = runtime.event()
        self._listener: socket.socket | None = None
        self._running = False
        self._label_cache: dict[int, tuple[Any, dict[str, str]]] = {}
        self._collector = _ExporterCollector(self)

    # -- lifecycle

    def start(self) -> int:
        """Binds and starts accepting; returns the bound port. Raises OSError if it cannot bind."""
        self._listener = socket.create_server((self.host, self.port), reuse_port=False)
        self.port = self._listener.getsockname()[1]
        self._running = True
        self.runtime.spawn(self._accept_loop)
        self.runtime.spawn(self._pump)
        try:
            self.registry.register(self._collector)
        except ValueError:  # registered already (restart in one process)
            pass
        return self.port

    def stop(self) -> None:
        self._running = False
        _remove_listener(self)
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        for client in list(self.clients):
            self._drop(client)
        self._wake.set()
        try:
            self.registry.unregister(self._collector)
        except KeyError:
            pass

    # -- the hot path: called from the wrapped metric methods

    def record(self, metric: Any, operation: int, value: float) -> None:
        if metric._name not in self._names:
            return  # another registry's metric (tests run several servers' metrics in one process)
        if len(self._ingest) >= self.buffer_size:
            self.dropped["ingest"] += 1
            return
        self._ingest.append((time.time(), metric, operation, value))
        self._wake.set()

    # -- background work

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while self._running:
            try:
                sock, addr = self._listener.accept()
            except OSError:
                if not self._running:
                    return
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            metrics = registry_metrics(self.registry)
            self._names = {m._name for m in metrics}
            metadata = b"".join(
                delimited(encode_metadata(exposed_name(m), metric_type_of(m), m._unit or None, m._documentation))
                for m in metrics
            )
            client = _Client(sock, f"{addr[0]}:{addr[1]}", metadata, wake=self.runtime.event())
            self.clients.append(client)
            _add_listener(self)
            logger.info("metrics tail client connected", extra={"client": client.address, "clients": len(self.clients)})
            self.runtime.spawn(self._writer, client)
            self.runtime.spawn(self._reader, client)

    def _labels_of(self, metric: Any) -> dict[str, str]:
        cached = self._label_cache.get(id(metric))
        if cached is not None and cached[0] is metric:
            return cached[1]
        labels = {**self.labels, **dict(zip(metric._labelnames, metric._labelvalues, strict=False))}
        if len(self._label_cache) > 100_000:
            self._label_cache.clear()
        self._label_cache[id(metric)] = (metric, labels)
        return labels

    def _pump(self) -> None:
        """Encodes each captured operation once and hands it to every client's queue."""
        while self._running:
            if not self._ingest:
                self._wake.wait()
                self._wake.clear()
                continue
            frames = []
            while self._ingest and len(frames) < self.SEND_BATCH:
                ts, metric, operation, value = self._ingest.popleft()
                try:
                    frames.append(delimited(encode_metric(exposed_name(metric), ts, self._labels_of(metric),
                                                          operation, value)))
                except Exception:  # one odd value must not end the stream
                    logger.debug("could not encode a metric event", exc_info=True)
            for client in list(self.clients):
                q = client.queue
                for frame in frames:
                    if len(q) >= self.buffer_size:
                        q.popleft()  # the client is behind: its oldest events go first (spec §1.3)
                        self.dropped["client"] += 1
                    q.append(frame)
                client.wake.set()
            self.runtime.sleep(0)  # let the writers run between large batches

    def _writer(self, client: _Client) -> None:
        try:
            client.sock.sendall(client.metadata)
            while not client.closed:
                if not client.queue:
                    client.wake.wait()
                    client.wake.clear()
                    continue
                chunk = [client.queue.popleft() for _ in range(min(self.SEND_BATCH, len(client.queue)))]
                client.sock.sendall(b"".join(chunk))
                self.sent_events += len(chunk)
        except OSError:
            pass
        self._drop(client)

    def _reader(self, client: _Client) -> None:
        """Input is ignored; end of stream (or an error) drops the client."""
        try:
            while not client.closed:
                if not client.sock.recv(4096):
                    break
        except OSError:
            pass
        self._drop(client)

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        client.wake.set()
        try:
            client.sock.close()
        except OSError:
            pass
        if client in self.clients:
            self.clients.remove(client)
            logger.info("metrics tail client disconnected",
                        extra={"client": client.address, "clients": len(self.clients)})
        if not self.clients:
            _remove_listener(self)
            self._ingest.clear()


class _ExporterCollector:
    """The exporter's own numbers, read at scrape time (never through the tap: no feedback)."""

    def __init__(self, exporter: TcpExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        p = self.exporter.prefix
        dropped = CounterMetricFamily(
            f"{p}tcp_exporter_dropped_samples",
            "Metric events the TCP exporter dropped instead of blocking the server (ingest queue full, or a "
            "client's queue full: its oldest events)", labels=["stage"],
        )
        for stage, count in self.exporter.dropped.items():
            dropped.add_metric([stage], count)
        yield dropped
        clients = GaugeMetricFamily(f"{p}tcp_exporter_clients", "Clients connected to the TCP metrics exporter")
        clients.add_metric([], len(self.exporter.clients))
        yield clients
