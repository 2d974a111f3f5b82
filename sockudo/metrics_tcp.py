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

import datetime as _dt
import logging
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, TextIO

from prometheus_client import Counter, Gauge, Histogram, Summary
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase

logger = logging.getLogger(__name__)

# -- wire format (docs/event.proto) -------------------------------------------------------------

COUNTER, GAUGE, HISTOGRAM = 0, 1, 2
METRIC_TYPE_NAMES = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}

INCREMENT_COUNTER = 4
SET_COUNTER = 5
INCREMENT_GAUGE = 6
DECREMENT_GAUGE = 7
SET_GAUGE = 8
RECORD_HISTOGRAM = 9
OPERATION_NAMES = {
    INCREMENT_COUNTER: "increment_counter",
    SET_COUNTER: "set_counter",
    INCREMENT_GAUGE: "increment_gauge",
    DECREMENT_GAUGE: "decrement_gauge",
    SET_GAUGE: "set_gauge",
    RECORD_HISTOGRAM: "record_histogram",
}
_UINT_OPERATIONS = (INCREMENT_COUNTER, SET_COUNTER)

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf does
    out = bytearray()
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _tag(field_number: int, wire_type: int) -> bytes:
    return varint((field_number << 3) | wire_type)


def _len_field(field_number: int, payload: bytes) -> bytes:
    return _tag(field_number, _LEN) + varint(len(payload)) + payload


def _str_field(field_number: int, value: str) -> bytes:
    return _len_field(field_number, value.encode("utf-8"))


def encode_metadata(name: str, metric_type: int, unit: str | None = None, description: str | None = None) -> bytes:
    """``Event{metadata}``, without the length prefix."""
    body = _str_field(1, name)
    if metric_type:  # proto3: the default (COUNTER = 0) is not written
        body += _tag(2, _VARINT) + varint(metric_type)
    if unit is not None:  # oneof members are written even when empty
        body += _str_field(3, unit)
    if description is not None:
        body += _str_field(4, description)
    return _len_field(1, body)


def encode_metric(name: str, timestamp: float, labels: Mapping[str, str], operation: int, value: float) -> bytes:
    """``Event{metric}``, without the length prefix. ``timestamp`` is Unix seconds."""
    seconds = int(timestamp // 1)
    nanos = int(round((timestamp - seconds) * 1e9))
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    ts = b""
    if seconds:
        ts += _tag(1, _VARINT) + varint(seconds)
    if nanos:
        ts += _tag(2, _VARINT) + varint(nanos)
    body = _str_field(1, name) + _len_field(2, ts)
    for key, val in labels.items():
        body += _len_field(3, _str_field(1, key) + _str_field(2, val))
    if operation in _UINT_OPERATIONS:
        body += _tag(operation, _VARINT) + varint(max(0, int(round(value))))
    else:
        body += _tag(operation, _FIXED64) + struct.pack("<d", float(value))
    return _len_field(2, body)


def delimited(message: bytes) -> bytes:
    return varint(len(message)) + message


# -- decoding (for ``python -m sockudo metrics tail``; tests use the protobuf runtime) ----------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _FIXED64:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == _FIXED32:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def decode_event(buf: bytes) -> dict[str, Any]:
    """One ``Event`` as a dict: ``{"metadata": {...}}`` or ``{"metric": {...}}``."""
    for number, _, value in _fields(buf):
        if number == 1:
            meta: dict[str, Any] = {"name": "", "metric_type": COUNTER, "unit": None, "description": None}
            for n, _, v in _fields(value):
                if n == 1:
                    meta["name"] = v.decode("utf-8")
                elif n == 2:
                    meta["metric_type"] = v
                elif n == 3:
                    meta["unit"] = v.decode("utf-8")
                elif n == 4:
                    meta["description"] = v.decode("utf-8")
            return {"metadata": meta}
        if number == 2:
            metric: dict[str, Any] = {"name": "", "timestamp": 0.0, "labels": {}, "operation": None, "value": None}
            for n, wire, v in _fields(value):
                if n == 1:
                    metric["name"] = v.decode("utf-8")
                elif n == 2:
                    secs = nanos = 0
                    for tn, _, tv in _fields(v):
                        if tn == 1:
                            secs = tv - (1 << 64) if tv >= 1 << 63 else tv
                        elif tn == 2:
                            nanos = tv
                    metric["timestamp"] = secs + nanos / 1e9
                elif n == 3:
                    entry = {en: ev.decode("utf-8") for en, _, ev in _fields(v)}
                    metric["labels"][entry.get(1, "")] = entry.get(2, "")
                elif n in OPERATION_NAMES:
                    metric["operation"] = OPERATION_NAMES[n]
                    metric["value"] = v if wire == _VARINT else struct.unpack("<d", v)[0]
            return {"metric": metric}
    return {}


def read_events(stream: BinaryIO) -> Iterator[dict[str, Any]]:
    """Length-delimited events from a byte stream, until it ends."""
    while True:
        length = shift = 0
        while True:
            b = stream.read(1)
            if not b:
                return
            length |= (b[0] & 0x7F) << shift
            if not b[0] & 0x80:
                break
            shift += 7
        payload = stream.read(length)
        if len(payload) < length:
            return
        yield decode_event(payload)


def format_event(event: Mapping[str, Any]) -> str:
    """One line for a terminal."""
    if "metadata" in event:
        m = event["metadata"]
        kind = METRIC_TYPE_NAMES.get(m["metric_type"], str(m["metric_type"]))
        unit = f" unit={m['unit']}" if m.get("unit") else ""
        return f"# {kind} {m['name']}{unit} {m.get('description') or ''}".rstrip()
    m = event.get("metric", {})
    when = _dt.datetime.fromtimestamp(m.get("timestamp", 0.0), _dt.UTC).isoformat(timespec="milliseconds")
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(m.get("labels", {}).items()))
    return f"{when.replace('+00:00', 'Z')} {m.get('name')}{{{labels}}} {m.get('operation')} {m.get('value')}"


def tail(host: str, port: int, out: TextIO, count: int | None = None, connect_timeout: float = 5.0) -> int:
    """``python -m sockudo metrics tail``: print events as they arrive. Returns an exit code."""
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as exc:
        print(f"sockudo: cannot connect to the TCP metrics exporter at {host}:{port}: {exc}", file=sys.stderr)
        return 1
    sock.settimeout(None)
    seen = 0
    with sock, sock.makefile("rb") as stream:
        try:
            for event in read_events(stream):
                print(format_event(event), file=out, flush=True)
                seen += 1
                if count is not None and seen >= count:
                    break
        except KeyboardInterrupt:
            pass
    return 0


# -- capturing metric operations ----------------------------------------------------------------


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


class Runtime(Protocol):
    def spawn(self, fn: Callable[..., Any], *args: Any) -> Any: ...
    def sleep(self, seconds: float) -> None: ...
    def event(self) -> Any: ...


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
