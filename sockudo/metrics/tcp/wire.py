"""The TCP metrics exporter's wire format: encoding, decoding, and the ``tail`` client.

As Sockudo's ``metrics-exporter-tcp`` (proto3, ``docs/event.proto``): a stream of
length-delimited ``Event`` messages (a varint byte length, then the message). A client first
gets one ``Metadata`` per metric, then a ``Metric`` for every operation. Protobuf is encoded by
hand (varints, tags, doubles: a few lines), so the server needs no ``protobuf`` dependency; the
tests decode the stream with the real protobuf runtime.
"""

from __future__ import annotations

import datetime as _dt
import logging
import socket
import struct
import sys
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, TextIO

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


