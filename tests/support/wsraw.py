"""Raw WebSocket clients for integration tests: websocket-client for well-formed frames, a
hand-rolled TCP client for frames no library will send (unmasked frames).

Every read has a deadline; nothing here sleeps for a fixed time.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import websocket
from websocket import ABNF

from tests.support.procs import ServerProcess


class Closed(Exception):
    """The server closed the WebSocket; ``code`` is the close code it sent (None if absent)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed with {code} {reason!r}")
        self.code = code
        self.reason = reason


def close_code(payload: bytes) -> tuple[int | None, str]:
    if len(payload) >= 2:
        return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")
    return None, ""


class RawClient:
    """One Pusher client speaking raw frames through websocket-client."""

    def __init__(self, url: str, origin: str | None = None, timeout: float = 5.0,
                 suppress_origin: bool = False) -> None:
        kwargs: dict[str, Any] = {"timeout": timeout, "skip_utf8_validation": True, "suppress_origin": suppress_origin}
        if origin is not None:
            kwargs["origin"] = origin
        self.ws = websocket.create_connection(url, **kwargs)
        self.socket_id: str | None = None
        self.activity_timeout: int | None = None
        self.closed: Closed | None = None
        self.last_control: tuple[int, bytes] | None = None

    # -- connecting --

    @classmethod
    def connect(cls, server: ServerProcess, key: str, query: str = "protocol=7&client=raw&version=1.0",
                origin: str | None = None, timeout: float = 5.0) -> RawClient:
        """Open ``/app/{key}`` and consume ``pusher:connection_established``."""
        return cls.connect_url(f"{server.ws_url}/app/{key}?{query}", origin=origin, timeout=timeout)

    @classmethod
    def connect_url(cls, url: str, origin: str | None = None, timeout: float = 5.0) -> RawClient:
        client = cls(url, origin=origin, timeout=timeout)
        frame = client.expect("pusher:connection_established", timeout=timeout)
        data = json.loads(frame["data"])
        client.socket_id = data["socket_id"]
        client.activity_timeout = data["activity_timeout"]
        return client

    @classmethod
    def open(cls, server: ServerProcess, key: str, query: str = "protocol=7&client=raw&version=1.0",
             origin: str | None = None, timeout: float = 5.0, suppress_origin: bool = False) -> RawClient:
        """Open the socket without waiting for anything (for refused connections)."""
        return cls(f"{server.ws_url}/app/{key}?{query}", origin=origin, timeout=timeout,
                   suppress_origin=suppress_origin)

    # -- reading --

    def recv_message(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next text/binary message as ``(opcode, payload)``; raises ``Closed`` on a close frame
        and ``TimeoutError`` when nothing arrives in time. WebSocket pongs are remembered."""
        if self.closed is not None:
            raise self.closed
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame before the deadline")
            self.ws.settimeout(remaining)
            try:
                opcode, payload = self.ws.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException:
                raise TimeoutError("no frame before the deadline") from None
            except (websocket.WebSocketConnectionClosedException, ConnectionError) as exc:
                self.closed = Closed(None, f"connection lost: {exc}")
                raise self.closed from None
            if opcode == ABNF.OPCODE_CLOSE:
                self.closed = Closed(*close_code(payload))
                raise self.closed
            if opcode in (ABNF.OPCODE_PING, ABNF.OPCODE_PONG):
                self.last_control = (opcode, payload)
                continue
            return opcode, payload

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame, parsed as JSON."""
        opcode, payload = self.recv_message(timeout)
        assert opcode == ABNF.OPCODE_TEXT, f"expected a text frame, got opcode {opcode}"
        return json.loads(payload.decode("utf-8"))

    def recv_text(self, timeout: float = 5.0) -> str:
        opcode, payload = self.recv_message(timeout)
        assert opcode == ABNF.OPCODE_TEXT, f"expected a text frame, got opcode {opcode}"
        return payload.decode("utf-8")

    def expect(self, event: str | Callable[..., bool], timeout: float = 5.0,
               channel: str | None = None) -> dict[str, Any]:
        """Read frames until one matches; frames before it are discarded."""
        match = event if callable(event) else (lambda f: f.get("event") == event)
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while True:
            remaining = deadline - time.monotonic()
            try:
                frame = self.recv(max(remaining, 0.001))
            except TimeoutError:
                raise AssertionError(f"no frame matching {event!r} within {timeout}s; saw {seen}") from None
            if match(frame) and (channel is None or frame.get("channel") == channel):
                return frame
            seen.append(frame)

    def expect_close(self, timeout: float = 5.0) -> Closed:
        """Read until the server's close frame; returns it (with the code)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.recv_message(max(deadline - time.monotonic(), 0.001))
            except Closed as closed:
                return closed
            except TimeoutError:
                raise AssertionError(f"socket not closed within {timeout}s") from None

    def expect_error_then_close(self, code: int, timeout: float = 5.0) -> dict[str, Any]:
        """``pusher:error`` with ``code`` (earlier frames are skipped), then immediately a close
        with the same code."""
        frame = self.expect("pusher:error", timeout)
        assert frame["data"]["code"] == code, frame
        assert "channel" not in frame, frame
        try:
            extra = self.recv_message(timeout)
        except Closed as closed:
            assert closed.code == code, f"close code {closed.code} ({closed.reason!r}), expected {code}"
            return frame
        except TimeoutError:
            raise AssertionError(f"no close frame within {timeout}s after {frame}") from None
        raise AssertionError(f"expected the close frame right after {frame}, got {extra!r}")

    # -- writing --

    def send_json(self, obj: Any) -> None:
        self.ws.send(json.dumps(obj))

    def send_text(self, text: str | bytes) -> None:
        self.ws.send(text, opcode=ABNF.OPCODE_TEXT)

    def send_binary(self, data: bytes) -> None:
        self.ws.send(data, opcode=ABNF.OPCODE_BINARY)

    def ping_pong(self, timeout: float = 5.0) -> None:
        """``pusher:ping`` → ``pusher:pong``: proves the socket is still served."""
        self.send_json({"event": "pusher:ping", "data": {}})
        self.expect("pusher:pong", timeout)

    def subscribe(self, channel: str, auth: dict[str, Any] | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """Subscribe (``auth`` as returned by the SDK's ``authenticate``) and wait for the ack."""
        data: dict[str, Any] = {"channel": channel}
        if auth:
            data.update(auth)
        self.send_json({"event": "pusher:subscribe", "data": data})
        return self.expect("pusher_internal:subscription_succeeded", timeout, channel=channel)

    def signin(self, auth: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Sign in with the SDK's ``authenticate_user`` answer; waits for signin_success."""
        self.send_json({"event": "pusher:signin", "data": auth})
        return self.expect("pusher:signin_success", timeout)

    def close(self) -> None:
        try:
            self.ws.close(timeout=1)
        except Exception:
            pass


# -- a hand-rolled client for frames websocket-client refuses to send ---------------


class TcpWebSocket:
    """A WebSocket over a bare TCP socket: handshake by hand, arbitrary frames."""

    def __init__(self, server: ServerProcess, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.status_line = head.split(b"\r\n", 1)[0].decode()

    def send_frame(self, opcode: int, payload: bytes, *, masked: bool = True, fin: bool = True, rsv: int = 0) -> None:
        b1 = (0x80 if fin else 0) | rsv | opcode
        n = len(payload)
        mask_bit = 0x80 if masked else 0
        if n < 126:
            header = struct.pack("!BB", b1, mask_bit | n)
        elif n < 65536:
            header = struct.pack("!BBH", b1, mask_bit | 126, n)
        else:
            header = struct.pack("!BBQ", b1, mask_bit | 127, n)
        if masked:
            mask = os.urandom(4)
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            header += mask
        self.sock.sendall(header + payload)

    def _need(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame before the deadline")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next server frame as ``(opcode, payload)`` (server frames are unmasked)."""
        deadline = time.monotonic() + timeout
        b1, b2 = self._need(2, deadline)
        length = b2 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._need(2, deadline))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._need(8, deadline))
        return b1 & 0x0F, self._need(length, deadline)

    def read_until_close(self, timeout: float = 5.0) -> tuple[int | None, list[tuple[int, bytes]]]:
        """Frames up to and including the close frame: returns ``(close code, frames before it)``."""
        deadline = time.monotonic() + timeout
        frames: list[tuple[int, bytes]] = []
        while True:
            opcode, payload = self.read_frame(max(deadline - time.monotonic(), 0.001))
            if opcode == ABNF.OPCODE_CLOSE:
                return close_code(payload)[0], frames
            frames.append((opcode, payload))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@contextmanager
def watching(server: Any, key: str, channel: str) -> Iterator[RawClient]:
    """A subscriber kept open while bad input is thrown at the server: it must keep receiving."""
    client = RawClient.connect(server, key)
    client.subscribe(channel)
    try:
        yield client
    finally:
        client.close()
