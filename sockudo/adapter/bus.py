"""The message bus between nodes: publish to pub/sub channels, listen to the ones this node needs.

The adapter decides what a node is interested in (the channels and users it has local sockets
for, plus the control channel); a bus carries messages for exactly that set. ``RedisBus`` drives
one Redis (standalone or a Sentinel master) with PUBLISH/SUBSCRIBE; a Redis Cluster driver uses
sharded pub/sub. The bus is pure: it blocks its caller's thread or greenlet, nothing more.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import redis
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from sockudo.services import Runtime

logger = logging.getLogger(__name__)


class Bus(Protocol):
    def publish(self, items: Sequence[tuple[str, str]]) -> None:
        """Send (pubsub channel, payload) pairs, pipelined. Raises redis.RedisError/OSError on failure."""

    def run(
        self,
        on_message: Callable[[str, bytes], None],
        on_connected: Callable[[bool], None],
        stopping: Callable[[], bool],
    ) -> None:
        """Blocking loop (the adapter runs it in a greenlet): connect, subscribe to the current interest
        set, call on_connected(first_time) once subscribed, deliver messages via on_message(channel, data);
        on a failure, reconnect with backoff and resubscribe everything (calling on_connected(False)).
        Raises nothing; returns when stopping() is true."""

    def set_interest(self, add: Collection[str], remove: Collection[str]) -> None:
        """Change the subscribed set (already batched by the caller). Takes effect asynchronously; returns
        at once. The bus keeps the full set so it can restore it after a reconnect or failover."""

    def wait_applied(self, timeout: float) -> bool:
        """Block until every set_interest call made before it is acknowledged by Redis (the SUBSCRIBE
        confirmations were read); False on timeout. The adapter calls it before a subscriber's
        subscription_succeeded so that nothing published after that is missed."""

    def close(self) -> None: ...


#: Channels per SUBSCRIBE / UNSUBSCRIBE command (a resubscribe of many channels is split).
SUBSCRIBE_CHUNK = 1000
#: How long the listener waits for data before it looks at ``stopping()`` again, in seconds.
IDLE_POLL = 1.0
#: The PING argument that marks how far the interest set has been applied.
APPLIED_TOKEN = "sockudo-bus-applied:"
FAILURES = (RedisError, OSError)


class RedisBus:
    """PUBLISH/SUBSCRIBE on one Redis (standalone, or the master Sentinel names).

    One connection listens; only the greenlet (or thread) in :meth:`run` reads and writes it.
    :meth:`set_interest` records the wanted set and wakes the listener through a pipe, so the
    listener sends the SUBSCRIBE/UNSUBSCRIBE commands itself, followed by ``PING <generation>``;
    the PONG (which Redis sends after the confirmations of the commands before it) marks that
    generation applied. Delivery never waits on the pipe: the listener sleeps in ``select`` on
    the Redis socket and the pipe together.
    """

    def __init__(self, client: redis.Redis, runtime: Runtime | None = None) -> None:
        self.client = client
        self._event: Callable[[], Any] = runtime.event if runtime is not None else threading.Event
        self._sleep: Callable[[float], None] = runtime.sleep if runtime is not None else time.sleep
        self._wanted: set[str] = set()
        self._requested = 0  # generation of the last set_interest call
        self._applied = 0  # generation whose PING answer has been read
        self._advanced = self._event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False
        self._running = False

    # -- Bus --

    def publish(self, items: Sequence[tuple[str, str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for channel, payload in items:
            pipe.publish(channel, payload)
        pipe.execute()

    def set_interest(self, add: Collection[str], remove: Collection[str]) -> None:
        self._wanted.difference_update(remove)
        self._wanted.update(add)
        self._requested += 1
        self._wake()

    def wait_applied(self, timeout: float) -> bool:
        target = self._requested
        deadline = time.monotonic() + timeout
        while self._applied < target:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._advanced.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        self._closed = True
        self._wake()
        if not self._running:
            self._close_pipe()

    def run(self, on_message: Callable[[str, bytes], None], on_connected: Callable[[bool], None],
            stopping: Callable[[], bool]) -> None:
        self._running = True
        backoff = 0.1
        first = True
        try:
            while not (stopping() or self._closed):
                conn = None
                try:
                    conn = self.client.connection_pool.get_connection()
                    conn.connect()
                    subscribed: set[str] = set()
                    token = self._apply(conn, subscribed)
                    self._read_until_applied(conn, token, on_message, stopping)
                    on_connected(first)
                    first = False
                    backoff = 0.1
                    self._listen(conn, subscribed, on_message, stopping)
                except FAILURES as exc:
                    logger.debug("pub/sub connection failed: %s", exc)
                    self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                finally:
                    if conn is not None:
                        self._release(conn)
        finally:
            self._running = False
            if self._closed:
                self._close_pipe()

    # -- the listener --

    def _listen(self, conn: Any, subscribed: set[str], on_message: Callable[[str, bytes], None],
                stopping: Callable[[], bool]) -> None:
        sent = self._applied
        while not (stopping() or self._closed):
            if self._requested != sent:
                sent = self._apply(conn, subscribed)
            while conn.can_read(timeout=0):
                self._handle(conn.read_response(push_request=True), on_message)
            sock = conn._sock
            if sock is None:
                raise ConnectionError("pub/sub connection closed")
            readable, _, _ = select.select([sock, self._wake_r], [], [], IDLE_POLL)
            if self._wake_r in readable:
                self._drain_wake()

    def _apply(self, conn: Any, subscribed: set[str]) -> int:
        """Send the difference between the wanted and the subscribed set, then the PING that
        marks this generation; returns the generation."""
        generation = self._requested
        wanted = set(self._wanted)
        add = sorted(wanted - subscribed)
        remove = sorted(subscribed - wanted)
        for i in range(0, len(add), SUBSCRIBE_CHUNK):
            conn.send_command("SUBSCRIBE", *add[i:i + SUBSCRIBE_CHUNK])
        for i in range(0, len(remove), SUBSCRIBE_CHUNK):
            conn.send_command("UNSUBSCRIBE", *remove[i:i + SUBSCRIBE_CHUNK])
        subscribed.clear()
        subscribed.update(wanted)
        conn.send_command("PING", f"{APPLIED_TOKEN}{generation}")
        return generation

    def _read_until_applied(self, conn: Any, generation: int, on_message: Callable[[str, bytes], None],
                            stopping: Callable[[], bool]) -> None:
        timeout = float(conn.socket_timeout or 5.0)
        deadline = time.monotonic() + timeout
        while self._applied < generation and not stopping():
            if time.monotonic() > deadline:
                raise TimeoutError("no answer to SUBSCRIBE")
            if conn.can_read(timeout=min(0.5, timeout)):
                self._handle(conn.read_response(push_request=True), on_message)

    def _handle(self, response: Any, on_message: Callable[[str, bytes], None]) -> None:
        if isinstance(response, (bytes, str)):  # PONG outside subscribed mode
            response = [b"pong", response]
        if not isinstance(response, list) or not response:
            return
        kind = response[0].decode() if isinstance(response[0], bytes) else str(response[0])
        if kind == "message" and len(response) >= 3:
            channel = response[1].decode() if isinstance(response[1], bytes) else str(response[1])
            data = response[2] if isinstance(response[2], bytes) else str(response[2]).encode()
            on_message(channel, data)
        elif kind == "pong" and len(response) >= 2:
            text = response[1].decode() if isinstance(response[1], bytes) else str(response[1])
            if text.startswith(APPLIED_TOKEN):
                self._mark_applied(int(text[len(APPLIED_TOKEN):]))

    def _mark_applied(self, generation: int) -> None:
        if generation <= self._applied:
            return
        self._applied = generation
        advanced, self._advanced = self._advanced, self._event()
        advanced.set()

    def _release(self, conn: Any) -> None:
        try:
            conn.disconnect()
        except FAILURES:
            pass
        try:
            self.client.connection_pool.release(conn)
        except FAILURES:
            pass

    # -- the wake-up pipe --

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # full (a wake-up is pending anyway) or closed

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _close_pipe(self) -> None:
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
