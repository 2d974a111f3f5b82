"""The per-socket transport: write now if the kernel takes it, else queue for one writer.

Two greenlets must never write one gevent socket, and a slow client must never hold up a
fan-out. ``send`` never blocks and never switches greenlets:

- when nothing is queued, the frame goes straight to the kernel with one non-blocking
  ``send`` on the raw socket (the common case: a fan-out to N sockets is N syscalls in the
  publisher's greenlet, with no greenlet switch per socket);
- when the kernel takes only part (or nothing), the rest is queued and a writer greenlet is
  spawned to drain the queue with blocking ``sendall``; it exits once the queue is empty, so
  an idle connection costs no greenlet at all;
- a client whose queue reaches ``max_messages`` frames or ``max_bytes`` bytes is
  disconnected with 4100 instead of growing memory: the count alone let a client that stops
  reading hold ``max_messages`` frames of any size (history pages of megabytes each).
  ``queued_bytes`` counts the encoded frames not yet handed to the kernel; a frame written
  now is never queued, so a socket holds at most ``max_bytes`` plus the rest of one frame
  the kernel took only part of.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from sockudo.core import protocol
from sockudo.core.errors import PusherCode
from sockudo.core.wsframe import OP_PONG, OutFrame, encode, encode_close
from sockudo.server import runtime
from sockudo.server.guard import is_tls

logger = logging.getLogger(__name__)

CLOSE_FLUSH_SECONDS = 5.0  # how long a closing socket may take to flush before it is cut
BATCH = 64


class WsTransport:
    __slots__ = (
        "sock",
        "raw",
        "queue",
        "queued_bytes",
        "max_messages",
        "max_bytes",
        "closing",
        "close_code",
        "close_reason",
        "close_queued",
        "dead",
        "writer",
        "on_slow_consumer",
        "v2",
        "tls",
    )

    def __init__(self, sock: socket.socket, max_messages: int, on_slow_consumer: Callable[[], None] | None = None,
                 v2: bool = False, max_bytes: int = 1 << 20) -> None:
        self.sock = sock
        # gevent's socket wraps a non-blocking OS socket; writing to that directly is a plain
        # syscall that fails with BlockingIOError instead of parking the greenlet.
        # Never for TLS: its ``_sock`` is the OS socket *under* the TLS layer (plaintext on the wire).
        self.tls = is_tls(sock)
        self.raw: Any = None if self.tls else getattr(sock, "_sock", None)
        self.v2 = v2  # protocol-2 socket: write each frame's protocol-2 form
        self.queue: deque[OutFrame | bytes] = deque()
        self.queued_bytes = 0
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.closing = False
        self.close_code = 1000
        self.close_reason = ""
        self.close_queued = False
        self.dead = False
        self.on_slow_consumer = on_slow_consumer
        self.writer: Any = None

    # -- called from any greenlet; never blocks, never switches --

    def send(self, frame: OutFrame) -> None:
        if self.closing:
            return
        queue = self.queue
        if queue or self.writer is not None:
            self._enqueue(frame, len(frame.wire_v2 if self.v2 else frame.wire))
            return
        self._write_now(frame.wire_v2 if self.v2 else frame.wire)

    def send_pong(self, payload: bytes) -> None:
        """Answer a WebSocket ping. Pongs wait in the same bounded queue as messages: a client
        that floods pings and reads nothing is a slow consumer like any other (4100), not a
        way to grow the server's memory."""
        if self.closing:
            return
        pong = encode(OP_PONG, payload)
        if self.queue or self.writer is not None:
            self._enqueue(pong, len(pong))
        else:
            self._write_now(pong)

    def pending_bytes(self) -> int:
        """Bytes accepted for this socket but not yet handed to the kernel."""
        return self.queued_bytes

    def close(self, code: int, reason: str) -> None:
        """Send the close frame after everything already queued, then half-close."""
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        self.close_reason = reason
        runtime.spawn_later(CLOSE_FLUSH_SECONDS, self.abort)
        if self.dead:
            return
        if self.writer is None:
            self._start_writer()

    def abort(self) -> None:
        """Cut the TCP connection now; wakes a reader or writer blocked on it."""
        self.dead = True
        self._clear()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def stop(self) -> None:
        """The connection is over: release anything queued and let a writer finish."""
        self.closing = True
        self.dead = True
        self._clear()

    # -- internals --

    def _enqueue(self, item: OutFrame | bytes, size: int) -> None:
        if len(self.queue) >= self.max_messages or self.queued_bytes + size > self.max_bytes:
            self._slow_consumer()
            return
        self.queue.append(item)
        self.queued_bytes += size

    def _clear(self) -> None:
        self.queue.clear()
        self.queued_bytes = 0

    def _write_now(self, data: bytes) -> None:
        if self.dead:
            return
        raw = self.raw
        if raw is None:  # not a gevent socket (tests): queue it for the writer
            self.queue.append(data)
            self.queued_bytes += len(data)
            self._start_writer()
            return
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # The peer went away: harmless; the reader sees EOF and cleans up.
            self.dead = True
            self._clear()
            return
        if sent < len(data):
            rest = data[sent:]
            self.queue.appendleft(rest)
            self.queued_bytes += len(rest)
            self._start_writer()

    def _start_writer(self) -> None:
        if self.writer is None and not self.dead:
            self.writer = runtime.spawn(self._drain)

    def _slow_consumer(self) -> None:
        if self.on_slow_consumer is not None:
            self.on_slow_consumer()
        self._clear()
        message = "Client send queue is full (too slow to keep up)"
        self.queue.append(OutFrame(protocol.error_frame(PusherCode.OVER_CAPACITY, message)))
        self.close(PusherCode.OVER_CAPACITY, message)

    def _drain(self) -> None:
        """The writer greenlet: blocking writes until the queue is empty (then it exits)."""
        queue = self.queue
        sendall = self.sock.sendall
        v2 = self.v2
        try:
            while not self.dead:
                if queue:
                    parts = []
                    for _ in range(min(len(queue), BATCH)):
                        item = queue.popleft()
                        parts.append(item if isinstance(item, bytes) else item.wire_v2 if v2 else item.wire)
                    data = parts[0] if len(parts) == 1 else b"".join(parts)
                    sendall(data)
                    self.queued_bytes = max(0, self.queued_bytes - len(data))
                    continue
                if self.closing and not self.close_queued:
                    self.close_queued = True
                    sendall(encode_close(self.close_code, self.close_reason))
                    if not self.tls:  # TLS: the reader still needs the TLS layer for the reply
                        try:
                            self.sock.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                return
        except OSError:
            self.dead = True
            self._clear()
            self.abort()
        finally:
            self.writer = None

    def join_writer(self, timeout: float) -> None:
        writer = self.writer
        if writer is not None:
            writer.join(timeout=timeout)
