"""The TCP metrics exporter: every metric operation, streamed as protobuf.

Wire format, as Sockudo's ``metrics-exporter-tcp`` (proto3, ``docs/event.proto``): a stream of
length-delimited ``Event`` messages (a varint byte length, then the message). A client first
gets one ``Metadata`` per metric, then a ``Metric`` for every operation (counter increment,
gauge increment/decrement/set, histogram or summary observation) made while it is connected.
Client input is ignored.

How operations are captured: every metric is one of the project's instruments
(``sockudo.metrics.instruments``), and the exporter listens on its registry's tap **only while at
least one client is connected**; with no client an operation pays one attribute check. For each
operation the exporter appends a small tuple to a bounded ingest queue; it never encodes, locks or
does I/O on the recording path. Metric names are those Prometheus shows (counters with
``_total``), labels are the metric's own plus the constant ones (``environment, region, node,
adapter``).

Backpressure never reaches the server: the ingest queue holds ``buffer_size``
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sockudo.metrics.instruments import Child, Kind, Operation, families, tap_of
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

_METRIC_TYPE = {Kind.COUNTER: COUNTER, Kind.GAUGE: GAUGE, Kind.HISTOGRAM: HISTOGRAM, Kind.SUMMARY: HISTOGRAM}
_WIRE_OPERATION = {
    Operation.INCREMENT_COUNTER: INCREMENT_COUNTER,
    Operation.INCREMENT_GAUGE: INCREMENT_GAUGE,
    Operation.DECREMENT_GAUGE: DECREMENT_GAUGE,
    Operation.SET_GAUGE: SET_GAUGE,
    Operation.OBSERVE: RECORD_HISTOGRAM,  # a summary's observation too: the wire has no summary
}


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

    def __init__(self, registry: CollectorRegistry, runtime: Runtime, host: str = "127.0.0.1", port: int = 5000,
                 buffer_size: int = 1024, labels: Mapping[str, str] | None = None, prefix: str = "sockudo_") -> None:
        self.registry = registry
        self.tap = tap_of(registry)
        self.runtime = runtime
        self.host = host
        self.port = port
        self.buffer_size = max(1, buffer_size)
        self.labels = dict(labels or {})
        self.prefix = prefix
        self.clients: list[_Client] = []
        self.dropped = {"ingest": 0, "client": 0}
        self.sent_events = 0
        self._ingest: deque[tuple[float, Child, Operation, float]] = deque()
        self._wake = runtime.event()
        self._listener: socket.socket | None = None
        self._running = False
        self._label_cache: dict[Child, dict[str, str]] = {}
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
        self.tap.remove(self)
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

    @property
    def listening(self) -> bool:
        """True while the exporter hears its registry's operations (a client is connected)."""
        return self in self.tap.listeners

    # -- the hot path: the tap calls this after each operation while a client is connected

    def record(self, child: Child, operation: Operation, value: float) -> None:
        if len(self._ingest) >= self.buffer_size:
            self.dropped["ingest"] += 1
            return
        self._ingest.append((time.time(), child, operation, value))
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
            metadata = b"".join(
                delimited(encode_metadata(f.exposed_name, _METRIC_TYPE[f.kind], f.unit or None, f.documentation))
                for f in families(self.registry)
            )
            client = _Client(sock, f"{addr[0]}:{addr[1]}", metadata, wake=self.runtime.event())
            self.tap.add(self)  # first: an operation made once the client is listed reaches it
            self.clients.append(client)
            logger.info("metrics tail client connected", extra={"client": client.address, "clients": len(self.clients)})
            self.runtime.spawn(self._writer, client)
            self.runtime.spawn(self._reader, client)

    def _labels_of(self, child: Child) -> dict[str, str]:
        labels = self._label_cache.get(child)
        if labels is None:
            if len(self._label_cache) > 100_000:
                self._label_cache.clear()
            labels = self._label_cache[child] = {**self.labels, **child.labels}
        return labels

    def _pump(self) -> None:
        """Encodes each captured operation once and hands it to every client's queue."""
        while self._running:
            if not self._ingest:
                self._wake.wait()
                self._wake.clear()
                continue
            frames: list[bytes] = []
            while self._ingest and len(frames) < self.SEND_BATCH:
                ts, child, operation, value = self._ingest.popleft()
                try:
                    frames.append(delimited(encode_metric(child.family.exposed_name, ts, self._labels_of(child),
                                                          _WIRE_OPERATION[operation], value)))
                except (ValueError, OverflowError):  # one odd value (NaN, inf as a count) must not end the stream
                    logger.debug("could not encode a metric event", exc_info=True)
            for client in list(self.clients):
                q = client.queue
                for frame in frames:
                    if len(q) >= self.buffer_size:
                        q.popleft()  # the client is behind: its oldest events go first
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
            self.tap.remove(self)
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
