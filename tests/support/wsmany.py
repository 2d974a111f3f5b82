"""Many WebSocket clients from one test thread: a minimal client over a raw socket (handshake by
hand, so socket options such as a tiny receive buffer or an RST on close can be set) and a
``Fleet`` that reads all of them with one ``selectors`` loop.

Every wait has a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA


def masked_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    if not payload:
        return header + key
    mask = int.from_bytes((key * (n // 4 + 1))[:n], "little")
    body = (int.from_bytes(payload, "little") ^ mask).to_bytes(n, "little")
    return header + key + body


class MiniWs:
    """One client. ``messages`` collects parsed text frames; ``close_code`` is set by a close frame,
    ``eof`` when the server closed the TCP connection."""

    def __init__(self, port: int, path: str, *, host: str = "127.0.0.1", rcvbuf: int | None = None,
                 timeout: float = 5.0, name: str = "") -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the advertised window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            buf += chunk
        head, _, leftover = buf.partition(b"\r\n\r\n")
        self.status = head.split(b"\r\n", 1)[0].decode()
        if " 101 " not in self.status + " ":
            self.sock.close()
            raise ConnectionError(f"upgrade refused: {self.status}")
        self.messages: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()  # events by name, kept even when messages are not
        self.keep_messages = True
        self.auto_pong = True  # answer the server's pings (a silent client is closed with 4201)
        self.close_code: int | None = None
        self.eof = False
        self.socket_id: str | None = None
        self.dead = False  # killed by the test
        self.buf = leftover
        self._parse()

    # -- writing (blocking; small frames) --

    def send_json(self, obj: Any) -> None:
        self.sock.sendall(masked_frame(TEXT, json.dumps(obj).encode()))

    def subscribe(self, channel: str, auth: dict[str, Any] | None = None) -> None:
        self.send_json({"event": "pusher:subscribe", "data": {"channel": channel, **(auth or {})}})

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.send(data)  # a few bytes: fits even a non-blocking socket's buffer
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.sendall(masked_frame(CLOSE, struct.pack("!H", 1000)))
        except OSError:
            pass
        self.sock.close()
        self.dead = True

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0): the peer's next write fails, no FIN handshake."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        self.dead = True

    # -- reading --

    def feed(self, data: bytes) -> None:
        if not data:
            self.eof = True
            return
        self.buf += data
        self._parse()

    def _parse(self) -> None:
        while True:
            buf = self.buf
            if len(buf) < 2:
                return
            length = buf[1] & 0x7F
            offset = 2
            if length == 126:
                if len(buf) < 4:
                    return
                (length,) = struct.unpack("!H", buf[2:4])
                offset = 4
            elif length == 127:
                if len(buf) < 10:
                    return
                (length,) = struct.unpack("!Q", buf[2:10])
                offset = 10
            if len(buf) < offset + length:
                return
            opcode = buf[0] & 0x0F
            payload = buf[offset:offset + length]
            self.buf = buf[offset + length:]
            if opcode == TEXT:
                message = json.loads(payload)
                if message.get("event") == "pusher:connection_established":
                    self.socket_id = json.loads(message["data"])["socket_id"]
                self.counts[message.get("event", "")] += 1
                if message.get("event") == "pusher:ping" and self.auto_pong:  # as pusher-js does
                    self._send_quietly(masked_frame(TEXT, b'{"event":"pusher:pong","data":{}}'))
                if self.keep_messages:
                    self.messages.append(message)
            elif opcode == PING and self.auto_pong:
                self._send_quietly(masked_frame(PONG, payload))
            elif opcode == CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005

    def read_available(self) -> None:
        """Read what the kernel has now (non-blocking)."""
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(262144)
                self.feed(data)
                if not data:
                    return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.eof = True

    def read_until(self, condition: Callable[[], Any], timeout: float = 10.0) -> None:
        """Read (blocking, with a deadline) until ``condition()`` holds; a connection that closes
        first must have met it."""
        deadline = time.monotonic() + timeout
        self.sock.setblocking(True)
        while not condition():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"condition not met within {timeout}s; last frames {self.messages[-3:]}"
            self.sock.settimeout(remaining)
            try:
                self.feed(self.sock.recv(262144))
            except TimeoutError:
                continue
            except OSError:
                self.eof = True
            if self.eof:
                assert condition(), f"connection closed first; last frames {self.messages[-3:]}"
                return

    def events(self, name: str, channel: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("event") == name and (channel is None or m.get("channel") == channel)]


class Fleet:
    """Reads many ``MiniWs`` with one selector. ``pump_until(cond)`` reads until ``cond()`` holds."""

    def __init__(self, clients: Iterable[MiniWs] = ()) -> None:
        self.selector = selectors.DefaultSelector()
        self.clients: list[MiniWs] = []
        for client in clients:
            self.add(client)

    def add(self, client: MiniWs) -> MiniWs:
        client.sock.setblocking(False)
        self.selector.register(client.sock, selectors.EVENT_READ, client)
        self.clients.append(client)
        return client

    def remove(self, client: MiniWs) -> None:
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError, OSError):
            pass
        if client in self.clients:
            self.clients.remove(client)

    def pump(self, timeout: float = 0.05) -> None:
        for key, _ in self.selector.select(timeout):
            client: MiniWs = key.data
            try:
                data = client.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            client.feed(data)
            if client.eof:
                self.remove(client)

    def pump_until(self, condition: Callable[[], bool], timeout: float, message: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {message or condition}")
            self.pump(0.05)

    def close(self) -> None:
        for client in list(self.clients):
            self.remove(client)
            if not client.dead:
                try:
                    client.sock.close()
                except OSError:
                    pass
        self.selector.close()


def connect_many(port: int, key: str, count: int, query: str = "protocol=7", **kwargs: Any) -> list[MiniWs]:
    """``count`` clients, each past ``connection_established``."""
    clients = []
    for i in range(count):
        client = MiniWs(port, f"/app/{key}?{query}", name=str(i), **kwargs)
        deadline = time.monotonic() + 5
        client.sock.settimeout(5)
        while client.socket_id is None:
            assert time.monotonic() < deadline, "no connection_established"
            client.feed(client.sock.recv(65536))
            assert not client.eof, "closed before connection_established"
        clients.append(client)
    return clients
