"""The TCP metrics exporter: wire format checked against the protobuf schema,
metadata before live operations, zero cost without clients, bounded buffering that drops."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from sockudo.metrics.instruments import Counter, Gauge, Summary, families, tap_of
from sockudo.metrics.registry import Metrics
from sockudo.metrics.tcp import exporter as tcp
from sockudo.metrics.tcp import wire
from tests.support.eventproto import EventReader, event_pb2
from tests.support.fakes import FakeRuntime
from tests.support.procs import wait_until


def decode(event_bytes: bytes) -> Any:
    return event_pb2().Event.FromString(event_bytes)


# -- wire format ---------------------------------------------------------------------------------


def test_metadata_encodes_as_the_schema_says() -> None:
    ev = decode(wire.encode_metadata("sockudo_connected", wire.GAUGE, None, "WebSocket connections open now"))
    assert ev.WhichOneof("event") == "metadata"
    assert ev.metadata.name == "sockudo_connected"
    assert ev.metadata.metric_type == event_pb2().GAUGE
    assert ev.metadata.WhichOneof("unit") is None
    assert ev.metadata.description_value == "WebSocket connections open now"

    counter = decode(wire.encode_metadata("x_total", wire.COUNTER, "bytes", ""))
    assert counter.metadata.metric_type == event_pb2().COUNTER
    assert counter.metadata.unit_value == "bytes"
    assert counter.metadata.WhichOneof("description") == "description_value"  # empty but present


@pytest.mark.parametrize(
    ("operation", "value", "field"),
    [
        (wire.INCREMENT_COUNTER, 3, "increment_counter"),
        (wire.SET_COUNTER, 0, "set_counter"),
        (wire.INCREMENT_GAUGE, 1.5, "increment_gauge"),
        (wire.DECREMENT_GAUGE, 2.0, "decrement_gauge"),
        (wire.SET_GAUGE, -7.25, "set_gauge"),
        (wire.RECORD_HISTOGRAM, 0.0, "record_histogram"),
    ],
)
def test_every_operation_encodes_as_the_schema_says(operation: int, value: float, field: str) -> None:
    ts = 1_767_225_600.123456
    labels = {"app_id": "app-1", "port": "9601", "environment": "prod"}
    ev = decode(wire.encode_metric("sockudo_x", ts, labels, operation, value))
    m = ev.metric
    assert ev.WhichOneof("event") == "metric" and m.name == "sockudo_x"
    assert m.WhichOneof("operation") == field and getattr(m, field) == value
    assert dict(m.labels) == labels
    assert m.timestamp.seconds == 1_767_225_600 and abs(m.timestamp.nanos - 123_456_000) < 1_000
    assert wire.decode_event(wire.encode_metric("sockudo_x", ts, labels, operation, value))["metric"]["value"] == value


def test_hand_decoder_reads_a_delimited_stream() -> None:
    stream = io.BytesIO(
        wire.delimited(wire.encode_metadata("a_total", wire.COUNTER, None, "A"))
        + wire.delimited(wire.encode_metric("a_total", 1.5, {"k": "v"}, wire.INCREMENT_COUNTER, 300))
    )
    events = list(wire.read_events(stream))
    assert events[0] == {"metadata": {"name": "a_total", "metric_type": wire.COUNTER, "unit": None, "description": "A"}}
    assert events[1]["metric"] == {"name": "a_total", "timestamp": 1.5, "labels": {"k": "v"},
                                   "operation": "increment_counter", "value": 300}
    assert wire.format_event(events[1]) == '1970-01-01T00:00:01.500Z a_total{k="v"} increment_counter 300'


# -- the exporter over real sockets ---------------------------------------------------------------


@pytest.fixture
def exporter_factory() -> Iterator[Any]:
    made: list[tcp.TcpExporter] = []

    def make(registry: CollectorRegistry, buffer_size: int = 1024,
             labels: dict[str, str] | None = None) -> tcp.TcpExporter:
        exporter = tcp.TcpExporter(registry, FakeRuntime(), "127.0.0.1", 0, buffer_size,
                                  labels=labels or {"node": "n1"})
        exporter.start()
        made.append(exporter)
        return exporter

    yield make
    for exporter in made:
        exporter.stop()
        assert not exporter.tap.listeners


def connect(exporter: tcp.TcpExporter, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", exporter.port))
    wait_until(lambda: len(exporter.clients) >= 1, timeout=5, message="the exporter to register the client")
    return sock


def library_methods() -> tuple[Any, ...]:
    p = prometheus_client
    return p.Counter.inc, p.Gauge.inc, p.Gauge.dec, p.Gauge.set, p.Histogram.observe, p.Summary.observe


def test_the_exporter_listens_only_while_a_client_is_connected(exporter_factory: Any) -> None:
    originals = library_methods()
    registry = CollectorRegistry()
    exporter = exporter_factory(registry)
    assert not exporter.listening and not tap_of(registry).listeners
    sock = connect(exporter)
    assert exporter.listening and tap_of(registry).listeners == (exporter,)
    sock.close()
    wait_until(lambda: not exporter.clients, timeout=5, message="the client to be dropped")
    assert not tap_of(registry).listeners
    assert library_methods() == originals  # prometheus-client itself is never patched


def test_metadata_first_then_every_operation(exporter_factory: Any) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, port=9601)
    summary = Summary("sockudo_test_summary", "a summary", registry=registry)
    exporter = exporter_factory(registry, labels={"node": "n1", "environment": "test"})
    sock = connect(exporter)
    reader = EventReader(sock)

    app = metrics.app("app-1")
    app.connected.inc()
    app.new_connections.inc()
    app.connected.dec()
    metrics.cluster_nodes.set(3)
    metrics.broadcast_latency("app-1", "public", 5, 1.25)
    summary.observe(0.5)
    metrics.subscribed("app-1", "presence", new_channel=True)

    first, _ = reader.until(lambda e: True)
    assert first.WhichOneof("event") == "metadata"
    live, before = reader.until(lambda e: e.WhichOneof("event") == "metric")
    metadata = [first, *before]
    assert all(e.WhichOneof("event") == "metadata" for e in metadata)
    described = {e.metadata.name: e.metadata for e in metadata}
    # Names as Prometheus shows them; one Metadata per Counter/Gauge/Histogram/Summary.
    assert described["sockudo_connected"].metric_type == event_pb2().GAUGE
    assert described["sockudo_new_connections_total"].metric_type == event_pb2().COUNTER
    assert described["sockudo_broadcast_latency_ms"].metric_type == event_pb2().HISTOGRAM
    assert described["sockudo_connected"].description_value == "WebSocket connections open now"
    assert len(described) == len(families(registry))

    ops = [live]
    while len(ops) < 8:
        ops.append(reader.next())
    got = [(e.metric.name, e.metric.WhichOneof("operation"), getattr(e.metric, e.metric.WhichOneof("operation")))
           for e in ops]
    assert got == [
        ("sockudo_connected", "increment_gauge", 1.0),
        ("sockudo_new_connections_total", "increment_counter", 1),
        ("sockudo_connected", "decrement_gauge", 1.0),
        ("sockudo_cluster_nodes", "set_gauge", 3.0),
        ("sockudo_broadcast_latency_ms", "record_histogram", 1.25),
        ("sockudo_test_summary", "record_histogram", 0.5),
        ("sockudo_channel_subscriptions_total", "increment_counter", 1),
        ("sockudo_active_channels", "increment_gauge", 1.0),
    ]
    assert dict(ops[0].metric.labels) == {"node": "n1", "environment": "test", "app_id": "app-1", "port": "9601"}
    assert dict(ops[4].metric.labels)["recipient_count_bucket"] == "xs"
    assert abs(ops[0].metric.timestamp.seconds - time.time()) < 60
    sock.close()


def test_operations_before_a_client_and_of_other_registries_are_not_sent(exporter_factory: Any) -> None:
    registry, other = CollectorRegistry(), CollectorRegistry()
    mine = Counter("mine", "mine", registry=registry)
    theirs = Counter("theirs", "theirs", registry=other)
    exporter = exporter_factory(registry)
    mine.inc(5)  # nobody connected: not captured (no state snapshot)
    sock = connect(exporter)
    reader = EventReader(sock)
    theirs.inc()
    with pytest.raises(ValueError):
        mine.inc(-1)  # refused by the library: nothing is emitted
    mine.inc(2)
    event, before = reader.until(lambda e: e.WhichOneof("event") == "metric")
    assert [e.metadata.name for e in before] == ["mine_total"]
    assert (event.metric.name, event.metric.increment_counter) == ("mine_total", 2)
    with pytest.raises(TimeoutError):
        reader.next(timeout=0.3)
    sock.close()


def test_a_client_that_never_reads_blocks_nobody_and_drops_are_counted(exporter_factory: Any) -> None:
    registry = CollectorRegistry()
    counter = Counter("sockudo_busy", "busy", ["app_id"], registry=registry)
    child = counter.labels("app-1")
    exporter = exporter_factory(registry, buffer_size=64)
    stuck = connect(exporter, rcvbuf=4096)  # never reads
    reader_sock = connect(exporter)
    wait_until(lambda: len(exporter.clients) == 2, timeout=5, message="both clients")

    baseline_start = time.perf_counter()
    plain = Counter("plain_reference", "x", registry=CollectorRegistry())
    for _ in range(50_000):
        plain.inc()
    baseline = time.perf_counter() - baseline_start

    start = time.perf_counter()
    for _ in range(50_000):
        child.inc()
    elapsed = time.perf_counter() - start
    # Capturing is an append to a bounded deque: same order of cost as the bare increment,
    # and in no case waiting on the stuck client (bounded check, generous for CI noise).
    assert elapsed < max(2.0, baseline * 20), (elapsed, baseline)
    assert registry.get_sample_value("sockudo_busy_total", {"app_id": "app-1"}) == 50_000

    def dropped() -> float:
        ingest = registry.get_sample_value("sockudo_tcp_exporter_dropped_samples_total", {"stage": "ingest"}) or 0
        client = registry.get_sample_value("sockudo_tcp_exporter_dropped_samples_total", {"stage": "client"}) or 0
        return ingest + client

    wait_until(lambda: dropped() > 0, timeout=5, message="dropped samples to be counted")
    # Each client's queue stays bounded however far behind it is.
    assert all(len(c.queue) <= 64 for c in exporter.clients)
    # The reading client still receives live events (an increment made while the ingest
    # queue is still full is dropped too, so repeat until one gets through).
    reader = EventReader(reader_sock)

    def seven_arrives() -> bool:
        child.inc(7)
        try:
            event, _ = reader.until(lambda e: e.WhichOneof("event") == "metric" and e.metric.increment_counter == 7,
                                    timeout=0.5)
        except TimeoutError:
            return False
        return event.metric.name == "sockudo_busy_total"

    wait_until(seven_arrives, timeout=10, interval=0, message="a live event on the reading client")
    assert registry.get_sample_value("sockudo_tcp_exporter_clients") == 2
    stuck.close()
    reader_sock.close()


def test_bind_failure_raises_for_the_caller_to_log() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        exporter = tcp.TcpExporter(CollectorRegistry(), FakeRuntime(), "127.0.0.1", taken.getsockname()[1], 8)
        with pytest.raises(OSError):
            exporter.start()
    finally:
        taken.close()


def test_tail_prints_metadata_then_operations(exporter_factory: Any) -> None:
    registry = CollectorRegistry()
    gauge = Gauge("sockudo_tail_demo", "demo gauge", registry=registry)
    exporter = exporter_factory(registry)
    out = io.StringIO()
    done = threading.Event()

    def run() -> None:
        wire.tail("127.0.0.1", exporter.port, out, count=2)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    wait_until(lambda: exporter.clients, timeout=5, message="tail to connect")
    gauge.set(4)
    assert done.wait(10)
    lines = out.getvalue().splitlines()
    assert lines[0] == "# gauge sockudo_tail_demo demo gauge"
    assert lines[1].endswith(' sockudo_tail_demo{node="n1"} set_gauge 4.0')
