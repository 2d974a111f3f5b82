"""A small HTTP/2 client for the push providers (APNs, FCM over TLS), on the ``h2`` library.

Why not httpx's HTTP/2: its synchronous HTTP/2 connection, shared by many threads, breaks under
load (streams closed twice, ``KeyError`` in its bookkeeping, connections dropped with requests
that the server had already answered). Here one reader thread per connection owns the socket's
input and hands each stream's events to the thread waiting for it; writes take a lock. So any
number of threads share one connection, as HTTP/2 intends, up to the server's
``SETTINGS_MAX_CONCURRENT_STREAMS``.

Each request has one deadline for everything (a stream slot, headers and body out, the answer
in), however slowly the server trickles bytes: when it passes, only that stream is reset
(``CANCEL``) and :class:`H2Timeout` raised; the connection and its other streams carry on.
A connection that fails fails its open streams with :class:`H2ConnectionError`, and the next
request opens a new one. After a ``GOAWAY`` the
streams the server did not process fail as :class:`H2Refused` (not sent: safe to send again).

Errors are ``OSError`` subclasses whose names say what happened (``Timeout``, ``Connect``),
which is how the providers classify transport failures.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
from hpack import NeverIndexedHeaderTuple

logger = logging.getLogger(__name__)


class H2Error(OSError):
    pass


class H2Timeout(H2Error):
    pass


class H2ConnectError(H2Error):
    pass


class H2ConnectionError(H2Error):
    pass


class H2Refused(H2Error):
    pass


class H2Expired(Exception):
    """The request was not sent: its ``not_after`` time had passed when its turn came."""


@dataclass
class H2Response:
    status_code: int
    headers: dict[str, str]
    content: bytes


@dataclass
class _Stream:
    done: threading.Event = field(default_factory=threading.Event)
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    error: BaseException | None = None


class _PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding: the pure-Python Huffman coder was the largest CPU cost per
    request (unique paths and message ids), for a few bytes saved on a local-latency-bound link."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class _CountedH2(h2.connection.H2Connection):
    """``h2``'s connection whose open-outbound-stream count (asked for each new stream) comes
    from our own stream table instead of a scan of every stream h2 knows (O(streams) per
    request: most of the CPU of a request at hundreds of streams in flight). Every
    :data:`SCAN_EVERY`-th count still runs h2's scan, which also forgets closed streams."""

    SCAN_EVERY = 64
    counted: Any = None  # () -> our open streams
    _asked = 0

    @property
    def open_outbound_streams(self) -> int:
        self._asked += 1
        if self.counted is None or self._asked % self.SCAN_EVERY == 0:
            return self._open_streams(int(self.config.client_side))
        return int(self.counted())


class H2Connection:
    """One HTTP/2 connection shared by threads. One I/O thread does all reads and writes on the
    socket (an SSL object must not be used by two threads at once); requests queue their
    frames under the lock and wake it.

    Request headers are sent as given (names lowercased, as HTTP/2 requires; ``h2`` still
    validates them) and indexed by HPACK, the provider token included: it is the same on every
    request of the connection, which then carries it as a one-byte index. Headers whose value
    differs on every request (``unique``: the APNs path and ``apns-id``) are not indexed, so they
    never evict the repeated ones and the table HPACK searches stays short."""

    def __init__(self, sock: socket.socket, authority: str, scheme: str) -> None:
        self.sock = sock
        self.authority = authority
        self.scheme = scheme
        self.conn = _CountedH2(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8", normalize_outbound_headers=False)
        )
        self.conn.encoder = _PlainEncoder()
        self.streams: dict[int, _Stream] = {}
        # Our table holds exactly the streams h2 has open: added with their headers, removed when
        # they end, are reset (by either side) or fail with the connection.
        self.conn.counted = self.streams.__len__
        self.lock = threading.Lock()  # the h2 state machine, the streams and the output buffer
        self.cond = threading.Condition(self.lock)  # stream slots and flow-control windows
        self.closed: BaseException | None = None
        self.goaway_last: int | None = None
        self.out = bytearray()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.conn.initiate_connection()
        self.out += self.conn.data_to_send()
        self.sock.setblocking(False)
        threading.Thread(target=self._io, name="push-h2-io", daemon=True).start()

    @property
    def usable(self) -> bool:
        return self.closed is None and self.goaway_last is None

    def close(self) -> None:
        self._fail(H2ConnectionError("connection closed"))
        self._wake()

    def _wake(self) -> None:
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass  # already woken (buffer full) or closed

    def _queue(self) -> None:
        """Under the lock: move h2's pending frames to the output buffer and wake the I/O thread."""
        data = self.conn.data_to_send()
        if data:
            self.out += data
            self._wake()

    # -- the I/O thread --

    def _io(self) -> None:
        try:
            while self.closed is None:
                with self.lock:
                    want_write = bool(self.out)
                readable = bool(self.sock.pending()) if isinstance(self.sock, ssl.SSLSocket) else False
                if not readable:
                    r, w, _ = select.select([self.sock, self.wake_r], [self.sock] if want_write else [], [], 5.0)
                    if self.wake_r in r:
                        try:
                            while self.wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                    readable = self.sock in r
                if readable:
                    self._read_some()
                if want_write or readable:
                    self._write_some()
        except (OSError, h2.exceptions.ProtocolError) as exc:
            self._fail(exc if isinstance(exc, H2Error) else H2ConnectionError(f"{type(exc).__name__}: {exc}"))
        finally:
            for sock in (self.sock, self.wake_r, self.wake_w):
                try:
                    sock.close()
                except OSError:
                    pass

    def _read_some(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return
        if not data:
            raise H2ConnectionError("the server closed the connection")
        with self.lock:
            for event in self.conn.receive_data(data):
                self._event(event)
            self._queue()
            self.cond.notify_all()

    def _write_some(self) -> None:
        with self.lock:
            if not self.out:
                return
            chunk = bytes(self.out[:65536])
        try:
            sent = self.sock.send(chunk)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return
        with self.lock:
            del self.out[:sent]

    def _event(self, event: Any) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            for name, value in event.headers:
                key, text = str(name).lower(), str(value)
                if key == ":status":
                    stream.status = int(text)
                else:
                    stream.headers[key] = text
        elif isinstance(event, h2.events.DataReceived):
            if event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if stream is not None:
                stream.body += event.data
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            self.streams.pop(event.stream_id, None)
            stream.done.set()
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            self.streams.pop(event.stream_id, None)
            refused = event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
            stream.error = (H2Refused if refused else H2ConnectionError)(f"stream reset ({event.error_code!r})")
            stream.done.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway_last = event.last_stream_id or 0
            for stream_id in [s for s in self.streams if s > self.goaway_last]:
                unprocessed = self.streams.pop(stream_id)
                unprocessed.error = H2Refused("GOAWAY: the server did not process this request")
                unprocessed.done.set()

    def _fail(self, error: BaseException) -> None:
        with self.lock:
            if self.closed is None:
                self.closed = error
            streams = list(self.streams.values())
            self.streams.clear()  # the same table: h2's count reads it
            for stream in streams:
                stream.error = error
                stream.done.set()
            self.cond.notify_all()

    # -- a request --

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        deadline: float,
        not_after: float | None = None,
        unique: tuple[str, ...] = (),
    ) -> H2Response:
        stream = _Stream()
        with self.cond:
            # Our open streams (h2 counts its own by scanning every stream: O(streams) per call).
            while self.usable and len(self.streams) >= self.conn.remote_settings.max_concurrent_streams:
                if not self.cond.wait(max(0.0, deadline - time.monotonic())):
                    raise H2Timeout("no stream slot on the connection before the deadline")
            if not self.usable:
                raise H2Refused("connection not usable")
            if not_after is not None and time.time() >= not_after:
                raise H2Expired("not sent: past its expiry")
            stream_id = self.conn.get_next_available_stream_id()
            pseudo = [(":method", method), (":scheme", self.scheme), (":authority", self.authority), (":path", path)]
            fields: list[Any] = pseudo + [(name.lower(), value) for name, value in headers.items()]
            if unique:
                fields = [NeverIndexedHeaderTuple(*f) if f[0] in unique else f for f in fields]
            try:
                self.conn.send_headers(stream_id, fields, end_stream=not body)
            except h2.exceptions.TooManyStreamsError:
                raise H2Refused("no stream slot (the server lowered its limit)") from None
            self.streams[stream_id] = stream
            view = memoryview(body)
            while view and not stream.done.is_set():
                window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
                if window <= 0:
                    self._queue()
                    if not self.cond.wait(max(0.0, deadline - time.monotonic())):
                        self._cancel(stream_id)
                        raise H2Timeout("flow-control window stayed closed until the deadline")
                    continue
                chunk, view = view[:window], view[window:]
                self.conn.send_data(stream_id, bytes(chunk), end_stream=not view)
            self._queue()
        if not stream.done.wait(max(0.0, deadline - time.monotonic())):
            with self.lock:
                self._cancel(stream_id)
            raise H2Timeout("no complete answer before the deadline")
        if stream.error is not None:
            raise stream.error
        return H2Response(stream.status, stream.headers, bytes(stream.body))

    def _cancel(self, stream_id: int) -> None:
        """Under the lock: reset one stream (its deadline passed); the connection carries on."""
        if self.streams.pop(stream_id, None) is None:
            return
        try:
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.ProtocolError:
            return
        self._queue()


class H2Client:
    """HTTP/2 to any origin: one shared connection per origin, opened on demand, replaced when
    it fails. TLS with ALPN ``h2`` for https, prior knowledge for http (tests)."""

    def __init__(self, tls: ssl.SSLContext, connect_timeout: float) -> None:
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.lock = threading.Lock()
        self.connections: dict[str, H2Connection] = {}
        self.connecting: dict[str, threading.Lock] = {}

    def close(self) -> None:
        with self.lock:
            connections, self.connections = self.connections, {}
        for conn in connections.values():
            conn.close()

    def _connection(self, scheme: str, host: str, port: int, deadline: float) -> H2Connection:
        origin = f"{scheme}://{host}:{port}"
        with self.lock:
            conn = self.connections.get(origin)
            if conn is not None and conn.usable:
                return conn
            gate = self.connecting.setdefault(origin, threading.Lock())
        if not gate.acquire(timeout=max(0.001, deadline - time.monotonic())):
            raise H2Timeout("waiting for the connection timed out")
        try:
            with self.lock:
                conn = self.connections.get(origin)
                if conn is not None and conn.usable:
                    return conn
            conn = self._connect(scheme, host, port, deadline)
            with self.lock:
                old = self.connections.get(origin)
                self.connections[origin] = conn
            if old is not None:
                old.close()
            return conn
        finally:
            gate.release()

    def _connect(self, scheme: str, host: str, port: int, deadline: float) -> H2Connection:
        timeout = max(0.001, min(self.connect_timeout, deadline - time.monotonic()))
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError:
            raise H2Timeout(f"connect to {host}:{port} timed out") from None
        except OSError as exc:
            raise H2ConnectError(f"connect to {host}:{port}: {exc}") from None
        if scheme == "https":
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock = self.tls.wrap_socket(sock, server_hostname=host)
            except TimeoutError:
                sock.close()
                raise H2Timeout("TLS handshake timed out") from None
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise H2ConnectError(f"TLS handshake: {exc}") from None
            if sock.selected_alpn_protocol() != "h2":
                sock.close()
                raise H2ConnectError("the server did not agree to HTTP/2 (ALPN h2)")
        authority = host if port == (443 if scheme == "https" else 80) else f"{host}:{port}"
        try:
            return H2Connection(sock, authority, scheme)
        except OSError as exc:
            sock.close()
            raise H2ConnectError(f"HTTP/2 preface: {exc}") from None

    def post(
        self,
        url: str,
        *,
        content: bytes,
        headers: dict[str, str],
        timeout: float,
        not_after: float | None = None,
        unique: tuple[str, ...] = (),
    ) -> H2Response:
        """POST within ``timeout`` seconds in all, not after the epoch time ``not_after``
        (:class:`H2Expired`: never sent). A request the server never processed (its
        connection went away first, or it refused the stream) is sent once more on a new one."""
        deadline = time.monotonic() + timeout
        parts = urlsplit(url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        for attempt in range(2):
            conn = self._connection(scheme, host, port, deadline)
            try:
                return conn.request("POST", path, headers, content, deadline, not_after, unique)
            except H2Refused:
                if attempt:
                    raise
        raise H2Refused("unreachable")  # pragma: no cover
