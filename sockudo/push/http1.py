"""A lean HTTP/1.1 client for the push services spoken over HTTP/1.1 (Web Push, the FCM OAuth
token endpoint, plain-http FCM test endpoints).

Keep-alive connections are pooled per origin and each is used by one request at a time; a
request takes an idle connection (the most recently used) or opens one, and puts it back when
its answer was read to the end and the server keeps it open. Taking and giving back are O(1),
whatever the number of connections (a general-purpose pool that scans every connection per
request costs more CPU than the push itself at a few hundred connections).

Each request has one deadline for everything — connect, TLS handshake, request out, status
line, headers and body in — checked before every socket operation, however slowly the server
trickles bytes. A reused connection that the server had closed while it was idle (no byte of an
answer came back) is replaced once by a fresh one within the same deadline.

Plain sockets and ``ssl``: under the worker's gevent monkey-patching they cooperate, in a thread
pool they block their thread. Answers are bounded (headers and body, :data:`MAX_HEAD_BYTES`,
:data:`MAX_BODY_BYTES`); errors are ``OSError`` subclasses whose names say what happened
(``Timeout``, ``Connect``), as the providers classify transport failures.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024
READ_SIZE = 65536


class Http1Error(OSError):
    pass


class Http1Timeout(Http1Error):
    pass


class Http1ConnectError(Http1Error):
    pass


class Http1ProtocolError(Http1Error):
    pass


class Http1Closed(Http1Error):
    """The server closed the connection before any byte of an answer."""


class BadHeader(ValueError):
    """A header name or value that would break the request's framing (CR, LF, NUL)."""


@dataclass
class Http1Response:
    status_code: int
    headers: dict[str, str]
    content: bytes


class _Conn:
    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise Http1Timeout("push attempt deadline passed")
    return left


_UNSAFE = ("\r", "\n", "\0")


def _head(method: str, path: str, authority: str, headers: Mapping[str, str], length: int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {length}\r\n"]
    for name, value in headers.items():
        if any(c in name or c in value for c in _UNSAFE) or ":" in name:
            raise BadHeader(f"header {name!r} has characters HTTP/1.1 cannot carry")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


class Http1Client:
    """HTTP/1.1 with keep-alive to any origin; thread- and greenlet-safe. ``idle_per_origin``
    bounds the idle connections kept (the callers bound the requests in flight)."""

    def __init__(self, tls: ssl.SSLContext, connect_timeout: float, idle_per_origin: int = 100) -> None:
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.idle_per_origin = max(1, idle_per_origin)
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def post(self, url: str, *, content: bytes, headers: Mapping[str, str], timeout: float) -> Http1Response:
        """POST ``content`` within ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        parts = urlsplit(url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        authority = host if port == (443 if scheme == "https" else 80) else f"{host}:{port}"
        if ":" in host:
            authority = f"[{host}]" if port == (443 if scheme == "https" else 80) else f"[{host}]:{port}"
        request = _head("POST", path, authority, headers, len(content)) + content
        origin = (scheme, host, port)
        while True:
            conn, reused = self._take(origin, deadline)
            keep = False
            try:
                response, keep = self._exchange(conn, request, deadline)
                return response
            except (Http1Closed, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise Http1ConnectError("the server closed the connection without an answer") from None
                # An idle connection the server had closed: once more on a fresh one.
            finally:
                if keep:
                    self._give_back(origin, conn)
                else:
                    conn.close()

    # -- the pool --

    def _take(self, origin: tuple[str, str, int], deadline: float) -> tuple[_Conn, bool]:
        with self._lock:
            idle = self._idle.get(origin)
            if idle:
                return idle.pop(), True
        return self._connect(*origin, deadline), False

    def _give_back(self, origin: tuple[str, str, int], conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < self.idle_per_origin:
                idle.append(conn)
                return
        conn.close()

    def _connect(self, scheme: str, host: str, port: int, deadline: float) -> _Conn:
        timeout = min(self.connect_timeout, _left(deadline))
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError:
            raise Http1Timeout(f"connect to {host}:{port} timed out") from None
        except OSError as exc:
            raise Http1ConnectError(f"connect to {host}:{port}: {exc}") from None
        if scheme == "https":
            sock = self._handshake(sock, host, deadline)
        return _Conn(sock)

    def _handshake(self, raw: socket.socket, host: str, deadline: float) -> ssl.SSLSocket:
        """The TLS handshake, non-blocking so that a trickled handshake is bounded too."""
        try:
            tls = self.tls.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False)
            tls.setblocking(False)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Http1Timeout("TLS handshake timed out")
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    select.select([tls], [], [], left)
                except ssl.SSLWantWriteError:
                    select.select([], [tls], [], left)
        except Http1Timeout:
            raw.close()
            raise
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise Http1ConnectError(f"TLS handshake: {exc}") from None
        tls.setblocking(True)
        return tls

    # -- one exchange --

    def _exchange(self, conn: _Conn, request: bytes, deadline: float) -> tuple[Http1Response, bool]:
        sock = conn.sock
        try:
            sock.settimeout(_left(deadline))
            sock.sendall(request)
            status, headers, keep_alive = self._read_head(conn, deadline)
            body, complete = self._read_body(conn, status, headers, deadline)
        except TimeoutError:
            raise Http1Timeout("no complete answer before the deadline") from None
        return Http1Response(status, headers, body), keep_alive and complete and not conn.buf

    def _recv(self, conn: _Conn, deadline: float) -> bytes:
        conn.sock.settimeout(_left(deadline))
        return conn.sock.recv(READ_SIZE)

    def _read_head(self, conn: _Conn, deadline: float) -> tuple[int, dict[str, str], bool]:
        buf = conn.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise Http1ProtocolError("response head too large")
                data = self._recv(conn, deadline)
                if not data:
                    if not buf:
                        raise Http1Closed("closed before an answer")
                    raise Http1ProtocolError("closed in the middle of the response head")
                buf += data
                continue
            head = bytes(buf[:end]).decode("latin-1")
            del buf[: end + 4]
            lines = head.split("\r\n")
            status_line = lines[0].split(" ", 2)
            if len(status_line) < 2 or not status_line[0].startswith("HTTP/1.") or not status_line[1].isdigit():
                raise Http1ProtocolError("not an HTTP/1.x status line")
            status = int(status_line[1])
            if 100 <= status < 200:
                continue  # an interim answer (100 Continue): the real one follows
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise Http1ProtocolError("malformed header line")
                key = name.strip().lower()
                value = value.strip()
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            keep_alive = status_line[0] == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
            return status, headers, keep_alive

    def _read_body(self, conn: _Conn, status: int, headers: dict[str, str], deadline: float) -> tuple[bytes, bool]:
        """The body (at most MAX_BODY_BYTES of it) and whether the connection is at the end of
        this answer (reusable)."""
        if status in (204, 304):
            return b"", True
        buf = conn.buf
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._read_chunked(conn, deadline)
        length_text = headers.get("content-length")
        if length_text is not None:
            if not length_text.isdigit():
                raise Http1ProtocolError("bad Content-Length")
            length = int(length_text)
            want = min(length, MAX_BODY_BYTES)
            while len(buf) < want:
                data = self._recv(conn, deadline)
                if not data:
                    raise Http1ProtocolError("closed in the middle of the body")
                buf += data
            body = bytes(buf[:want])
            del buf[:want]
            return body, length <= MAX_BODY_BYTES
        # Delimited by the end of the connection: read what fits, never reuse.
        while len(buf) < MAX_BODY_BYTES:
            data = self._recv(conn, deadline)
            if not data:
                break
            buf += data
        body = bytes(buf[:MAX_BODY_BYTES])
        buf.clear()
        return body, False

    def _read_chunked(self, conn: _Conn, deadline: float) -> tuple[bytes, bool]:
        buf = conn.buf
        body = bytearray()

        def line() -> bytes:
            while True:
                end = buf.find(b"\r\n")
                if end >= 0:
                    out = bytes(buf[:end])
                    del buf[: end + 2]
                    return out
                if len(buf) > MAX_HEAD_BYTES:
                    raise Http1ProtocolError("chunk line too long")
                data = self._recv(conn, deadline)
                if not data:
                    raise Http1ProtocolError("closed in the middle of a chunked body")
                buf.extend(data)

        while True:
            size_text = line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise Http1ProtocolError("bad chunk size") from None
            if size == 0:
                while line():  # trailers, up to the empty line
                    pass
                return bytes(body), True
            if len(body) + size > MAX_BODY_BYTES:
                return bytes(body), False  # too long: what we have, and the connection is dropped
            while len(buf) < size + 2:
                data = self._recv(conn, deadline)
                if not data:
                    raise Http1ProtocolError("closed in the middle of a chunk")
                buf += data
            body += buf[:size]
            del buf[: size + 2]
