"""The TCP exporter's schema (docs/event.proto), compiled with protoc at test time, and a
length-delimited reader that decodes with the real protobuf runtime (not our hand decoder)."""

from __future__ import annotations

import importlib
import importlib.resources
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
_module: Any = None


def event_pb2() -> Any:
    """The generated module for ``docs/event.proto`` (compiled once per test session)."""
    global _module
    if _module is None:
        from grpc_tools import protoc

        out = tempfile.mkdtemp(prefix="sockudo-proto-")
        include = str(importlib.resources.files("grpc_tools") / "_proto")
        rc = protoc.main(["protoc", f"-I{include}", f"-I{ROOT / 'docs'}", f"--python_out={out}", "event.proto"])
        assert rc == 0, "protoc could not compile docs/event.proto"
        sys.path.insert(0, out)
        try:
            _module = importlib.import_module("event_pb2")
        finally:
            sys.path.remove(out)
    return _module


class EventReader:
    """Reads ``varint length + Event`` frames from a socket, decoding with protobuf."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self, deadline: float) -> None:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("exporter closed the stream")
        self.buf += chunk

    def next(self, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            length = shift = 0
            pos = 0
            complete = False
            while pos < len(self.buf):
                b = self.buf[pos]
                pos += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    complete = True
                    break
            if complete and len(self.buf) >= pos + length:
                message = self.buf[pos:pos + length]
                self.buf = self.buf[pos + length:]
                return event_pb2().Event.FromString(message)
            if time.monotonic() >= deadline:
                raise TimeoutError("no complete event in time")
            self._fill(deadline)

    def until(self, predicate: Any, timeout: float = 10.0) -> tuple[Any, list[Any]]:
        """Events until one matches; returns it and everything read before it."""
        deadline = time.monotonic() + timeout
        seen: list[Any] = []
        while True:
            event = self.next(max(0.01, deadline - time.monotonic()))
            if predicate(event):
                return event, seen
            seen.append(event)
