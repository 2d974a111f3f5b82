"""The per-socket transport: a bounded outbound queue drained by one writer greenlet.

Two greenlets must never write one gevent socket, and a slow client must never hold up a
fan-out. So ``send`` only appends to a deque (never blocks, never switches); a single writer
greenlet drains it, joining queued frames into one ``sendall``. A client whose queue reaches
``max_messages`` is disconnected with 4100 (spec §1.5) instead of growing memory.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable

from .. import protocol
from ..errors import PusherCode
from ..wsframe import OP_PONG, OutFrame, encode, encode_close
from . import runtime

logger = logging.getLogger(__name__)

CLOSE_FLUSH_SECONDS = 5.0  # how long a closing socket may take to flush before it is cut
BATCH = 64


class WsTransport:
    __slots__ = (
        "sock",
        "queue",
        "max_messages",
        "wakeup",
        "waiting",
        "closing",
        "close_code",
        "close_reason",
        "dead",
        "writer",
        "on_slow_consumer",
        "v2",
    )

    def __init__(self, sock: socket.socket, max_messages: int, on_slow_consumer: Callable[[], None] | None = None,
                 v2: bool = False) -> None:
        self.sock = sock
        self.v2 = v2  # protocol-2 socket: write each frame's protocol-2 form
        self.queue: deque[OutFrame | bytes] = deque()
        self.max_messages = max_messages
        self.wakeup = runtime.Event()
        self.waiting = False
        self.closing = False
        self.close_code = 1000
        self.close_reason = ""
        self.dead = False
        self.on_slow_consumer = on_slow_consumer
        self.writer = runtime.spawn(self._write_loop)

    # -- called from any greenlet; never blocks --

    def send(self, frame: OutFrame) -> None:
        if self.closing:
            return
        queue = self.queue
        if len(queue) >= self.max_messages:
            self._slow_consumer()
            return
        queue.append(frame)
        if self.waiting:
            self.wakeup.set()

    def send_pong(self, payload: bytes) -> None:
        if not self.closing:
            self.queue.append(encode(OP_PONG, payload))
            if self.waiting:
                self.wakeup.set()

    def close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        self.close_reason = reason
        self.wakeup.set()
        runtime.spawn_later(CLOSE_FLUSH_SECONDS, self.abort)

    def abort(self) -> None:
        """Cut the TCP connection now; wakes a reader or writer blocked on it."""
        self.dead = True
        self.wakeup.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _slow_consumer(self) -> None:
        if self.on_slow_consumer is not None:
            self.on_slow_consumer()
        self.queue.clear()
        message = "Client send queue is full (too slow to keep up)"
        self.queue.append(OutFrame(protocol.error_frame(PusherCode.OVER_CAPACITY, message)))
        self.close(PusherCode.OVER_CAPACITY, message)

    # -- the writer greenlet --

    def _write_loop(self) -> None:
        queue = self.queue
        sendall = self.sock.sendall
        v2 = self.v2
        try:
            while not self.dead:
                if queue:
                    if len(queue) == 1:
                        item = queue.popleft()
                        data = item if isinstance(item, bytes) else item.wire_v2 if v2 else item.wire
                    else:
                        parts = []
                        for _ in range(min(len(queue), BATCH)):
                            item = queue.popleft()
                            parts.append(item if isinstance(item, bytes) else item.wire_v2 if v2 else item.wire)
                        data = b"".join(parts)
                    sendall(data)
                    continue
                if self.closing:
                    sendall(encode_close(self.close_code, self.close_reason))
                    try:
                        self.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                self.waiting = True
                self.wakeup.wait()
                self.waiting = False
                self.wakeup.clear()
        except OSError:
            # The peer went away mid-write: harmless, the reader sees EOF and cleans up.
            self.dead = True
            queue.clear()
            self.abort()

    def stop(self) -> None:
        """The connection is over: release the writer and anything queued."""
        self.closing = True
        self.dead = True
        self.queue.clear()
        self.wakeup.set()
