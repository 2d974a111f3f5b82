"""Attacks by a client holding no credentials at all (not even an app key), against a real server
process over raw sockets (docs/security.md, "Bounds per socket" and "Request edges").

The per-socket bounds hold once a WebSocket is established and a REST call has been
authenticated; these tests look at what a connection can make the node hold *before* that:

- request headers: up to 100 header lines of 64 KiB each (Python's header parser limits) were
  read and kept; a WebSocket keeps its request headers (``environ``) for its whole life, so a
  handful of upgrades with fat headers held hundreds of megabytes for as long as they stayed open;
- request bodies: every signed route read the whole body (up to ``request_limit_in_mb``, 10 MiB)
  before it looked at the query, so a connection with no query at all made the node hold 10 MiB
  until the body's deadline, and nothing bounds how many such connections there are;
- more than 100 header lines was an unhandled ``HTTPException`` (a traceback at ERROR for every
  such request), not the quiet 400 of other malformed requests;
- time: the node is one process of cooperative greenlets, so a connection whose bytes keep
  arriving faster than they are handled must still let the others run. A WebSocket streaming
  tiny frames, or a request body of one-byte chunks (to any path), held the process for as long
  as it kept sending: every other client waited.

Every test measures the server's RSS (or reads its log) and fails without a bound.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import requests

from tests.support.procs import RssPeak, ServerProcess, rss_kb
from tests.support.sdk import signed as signed_request
from tests.support.wsmany import TEXT, MiniWs, masked_frame

APP = {"id": "300", "key": "attack-key", "secret": "attack-secret"}
SOCKETS = 16


def upgrade_with_fat_headers(server: ServerProcess, lines: int, size: int) -> socket.socket:
    """A WebSocket upgrade carrying ``lines`` extra headers of ``size`` bytes each; returns the
    socket once the server has answered (101 or otherwise)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    head = (f"GET /app/{APP['key']}?protocol=7&client=raw&version=1.0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n").encode()
    filler = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * size) for i in range(lines))
    try:
        sock.sendall(head + filler + b"\r\n")
    except OSError:
        pass  # refused before the end of the headers: what a bound does
    return sock


def test_websocket_upgrades_cannot_park_megabytes_of_headers(server_factory: Callable[..., ServerProcess]) -> None:
    """16 upgrades with 94 headers of 64,000 bytes each (Python's per-line and per-count limits;
    6 MB per request). An established WebSocket keeps its request's headers for its whole life, so
    they must be bounded in bytes (431, as nginx and Node refuse header blocks over 8-64 KiB).
    Without a bound: ~13 MiB per socket for as long as it is open (20 sockets held 270 MiB)."""
    server = server_factory([APP])
    assert server.proc is not None
    before = rss_kb(server.proc.pid)
    socks = []
    statuses = []
    try:
        for _ in range(SOCKETS):
            sock = upgrade_with_fat_headers(server, 94, 64_000)
            socks.append(sock)
            try:
                statuses.append(sock.recv(64).split(b"\r\n", 1)[0])
            except OSError:
                statuses.append(b"reset")
        grown = rss_kb(server.proc.pid) - before
        assert grown < 32 * 1024, (f"{SOCKETS} upgrades with 6 MB of headers each grew RSS by {grown // 1024} MiB "
                                   f"(answers: {sorted(set(statuses))})")
        assert not any(status.startswith(b"HTTP/1.1 101") for status in statuses), statuses
    finally:
        for sock in socks:
            sock.close()


def test_unfinished_header_blocks_are_bounded_in_bytes(server_factory: Callable[..., ServerProcess]) -> None:
    """16 requests that send 94 headers of 64,000 bytes and never finish their header block: each
    was held whole for the 10 s header deadline (30 such connections: +183 MiB)."""
    server = server_factory([APP])
    assert server.proc is not None
    socks = []
    with RssPeak(server.proc.pid) as peak:
        try:
            for _ in range(SOCKETS):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                socks.append(sock)
                try:
                    sock.sendall(b"GET /apps/300/channels HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 64_000) for i in range(94)))
                except OSError:
                    pass
            time.sleep(0.5)  # let the server read what it will (bounded wait, then measure)
            grown = peak.grown()
        finally:
            for sock in socks:
                sock.close()
    assert grown < 32 * 1024, f"{SOCKETS} unfinished header blocks of 6 MB grew RSS by {grown // 1024} MiB"


BODY = 9_500_000  # under the default request_limit_in_mb (10 MiB)


def _unsigned_body(server: ServerProcess, request_line: str, chunked: bool) -> socket.socket:
    """Send a request with no query (so no signature) and all but the last byte of a 9.5 MB body."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {BODY}"
    try:
        sock.sendall(f"{request_line} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"{framing}\r\n\r\n".encode())
        piece = b"x" * 500_000
        for _ in range(BODY // len(piece) - 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece) - 1, piece[:-1]) if chunked else piece[:-1])
    except OSError:
        pass  # answered (and closed) before the body was sent: nothing held
    return sock


def _bodies_held(server: ServerProcess, request_line: str, chunked: bool = False) -> tuple[int, list[bytes]]:
    assert server.proc is not None
    socks: list[socket.socket] = []
    with RssPeak(server.proc.pid) as peak:
        try:
            for _ in range(SOCKETS):
                socks.append(_unsigned_body(server, request_line, chunked))
            time.sleep(0.5)  # the server reads what it will (bounded wait, then measure)
            grown = peak.grown()
            answers = []
            for sock in socks:
                try:
                    sock.sendall(b"0\r\n\r\n" if chunked else b"x")
                except OSError:
                    pass
                try:
                    answers.append(sock.recv(64).split(b"\r\n", 1)[0])
                except OSError:
                    answers.append(b"reset")
        finally:
            for sock in socks:
                sock.close()
    return grown, answers


def test_an_unsigned_publish_is_refused_before_its_body_is_buffered(
        server_factory: Callable[..., ServerProcess]) -> None:
    """16 connections POST a 9.5 MB body to ``/apps/300/events`` with no query at all and hold the
    last byte: the node held every body (30 connections: +286 MiB) until the body deadline, for
    a request it refuses (400) without looking at the body. The query (auth_key, timestamp,
    signature over method, path and query including ``body_md5``) can be checked first."""
    server = server_factory([APP])
    grown, answers = _bodies_held(server, "POST /apps/300/events")
    assert grown < 48 * 1024, f"{SOCKETS} unsigned 9.5 MB publishes grew RSS by {grown // 1024} MiB ({answers[:2]})"


def test_an_unsigned_chunked_request_is_refused_before_its_body_is_buffered(
        server_factory: Callable[..., ServerProcess]) -> None:
    """The same with chunked bodies: the listener reads a chunked body whole (up to the limit)
    before any route or signature is looked at, on any path."""
    server = server_factory([APP])
    grown, answers = _bodies_held(server, "POST /apps/300/events", chunked=True)
    assert grown < 48 * 1024, (f"{SOCKETS} unsigned chunked 9.5 MB bodies grew RSS by {grown // 1024} MiB "
                               f"({answers[:2]})")


def test_more_than_100_header_lines_is_a_quiet_400(server_factory: Callable[..., ServerProcess]) -> None:
    """Python's header parser raises ``HTTPException`` past 100 lines; it was logged at ERROR with
    a traceback for every such request (anyone could fill the error log)."""
    server = server_factory([APP], env={"LOG_LEVEL": "DEBUG"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /apps/300/channels HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     + b"".join(b"X-H%d: a\r\n" % i for i in range(150)) + b"\r\n")
        status = sock.recv(64).split(b"\r\n", 1)[0]
    assert status.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), status
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert not [line for line in log.splitlines() if " ERROR " in line[:40]], log[-3000:]


# -- time: one connection must not hold the process --------------------------------------------------


@contextmanager
def live_latency(server: ServerProcess) -> Iterator[list[float]]:
    """``GET /live`` every 50 ms from another thread while the block runs; yields the latencies."""
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        session = requests.Session()
        while not stop.is_set():
            start = time.monotonic()
            try:
                session.get(server.url + "/live", timeout=60)
            except requests.RequestException:
                pass
            latencies.append(time.monotonic() - start)
            stop.wait(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(timeout=70)


FLOOD_SECONDS = 4.0


def test_a_websocket_streaming_tiny_frames_does_not_freeze_the_node(
        server_factory: Callable[..., ServerProcess]) -> None:
    """One socket (app key only) sends ignored 19-byte frames as fast as TCP lets it for 4 s: its
    greenlet never found its buffer empty, so it never yielded, and ``/live`` (like every other
    socket's delivery and pings) waited for the whole flood (7.5 s for a 7.5 s flood)."""
    server = server_factory([APP])
    client = MiniWs(server.port, f"/app/{APP['key']}?protocol=7&client=raw&version=1.0")
    blob = masked_frame(TEXT, b'{"event":"x"}') * 20_000
    try:
        with live_latency(server) as latencies:
            time.sleep(0.2)
            start = time.monotonic()
            while time.monotonic() - start < FLOOD_SECONDS:
                client.sock.sendall(blob)
        worst = max(latencies)
        assert worst < 1.0, f"/live took {worst:.1f} s while one WebSocket streamed frames for {FLOOD_SECONDS} s"
    finally:
        client.close()


def test_a_body_of_one_byte_chunks_does_not_freeze_the_node(server_factory: Callable[..., ServerProcess]) -> None:
    """A chunked body of 150,000 one-byte chunks (900 KB on the wire) to a path that takes no body:
    the listener reads chunked bodies whole, a byte at a time through a reader that armed a
    ``gevent.Timeout`` per read (~4 us a byte), without yielding while bytes were there. 6 MB of
    it held the process for 29 s (past the 30 s body deadline, which cannot fire in a greenlet
    that never yields)."""
    server = server_factory([APP])
    body = b"1\r\nx\r\n" * 150_000 + b"0\r\n\r\n"
    with live_latency(server) as latencies:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            start = time.monotonic()
            sock.sendall(b"POST /live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + body)
            status = sock.recv(64).split(b"\r\n", 1)[0]
            took = time.monotonic() - start
    worst = max(latencies)
    assert worst < 1.0, (f"/live took {worst:.1f} s while one request body of one-byte chunks was read "
                         f"(answered {status!r} after {took:.1f} s)")


def test_pipelined_requests_on_one_connection_do_not_freeze_the_node(
        server_factory: Callable[..., ServerProcess]) -> None:
    """20,000 unsigned requests written at once on one keep-alive connection (880 KB): each was
    answered in turn without the greenlet ever yielding while the next request was already there,
    so ``/live`` on another connection waited for all of them (6.2 s)."""
    server = server_factory([APP])
    count = 20_000
    answered = [0]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:

        def drain() -> None:
            try:
                while answered[0] < count:
                    data = sock.recv(1 << 20)
                    if not data:
                        return
                    answered[0] += data.count(b"HTTP/1.1 ")
            except OSError:
                return

        reader = threading.Thread(target=drain, daemon=True)
        with live_latency(server) as latencies:
            time.sleep(0.2)
            reader.start()
            sock.sendall(b"GET /apps/300/channels HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * count)
            reader.join(timeout=60)
    worst = max(latencies)
    assert answered[0] == count, answered
    assert worst < 1.0, f"/live took {worst:.1f} s while one connection's {count} pipelined requests were answered"


# -- the resume budget is bytes ------------------------------------------------------------------------

RECOVERY_APP = {"id": "301", "key": "attack-v2", "secret": "attack-v2-secret", "max_event_payload_in_kb": 100,
                "max_event_batch_size": 100, "history": {"enabled": True, "max_messages_per_channel": 1000},
                "connection_recovery": {"enabled": True}}
MAX_BUFFER_BYTES = 1 << 20  # websocket.max_buffer_bytes, the default


def test_one_resume_replays_no_more_bytes_than_the_socket_may_hold(
        server_factory: Callable[..., ServerProcess]) -> None:
    """The resume budget is ``max_buffer_bytes`` (docs/security.md), but it was spent in characters:
    frames are UTF-8 without ``\\u`` escapes, so messages of three-byte characters replayed about
    three times the budget. Two channels of 200 messages of 3,000 euro signs (9 KB each): each
    channel's replay is ~620 K characters, ~1.8 MB; at most one channel's may be replayed."""
    server = server_factory([RECOVERY_APP])
    channels = ["utf8-a", "utf8-b"]
    for channel in channels:
        for first in range(0, 200, 100):
            batch = [{"name": "update", "channel": channel,
                      "data": json.dumps({"i": i, "pad": "\u20ac" * 3000}, ensure_ascii=False)}
                     for i in range(first, first + 100)]
            resp = signed_request(server, "POST", f"/apps/{RECOVERY_APP['id']}/batch_events", {"batch": batch},
                                  app=RECOVERY_APP)
            assert resp.status_code == 200, resp.text
    client = MiniWs(server.port, f"/app/{RECOVERY_APP['key']}?protocol=2&client=raw&version=1.0", timeout=10)
    try:
        positions = {}
        for channel in channels:
            client.send_json({"event": "sockudo:subscribe", "data": {"channel": channel}})
            client.read_until(lambda: client.events("sockudo_internal:subscription_succeeded", channel),  # noqa: B023
                              timeout=20)
            ack = client.events("sockudo_internal:subscription_succeeded", channel)[0]
            positions[channel] = {"stream_id": ack["stream_id"], "serial": 0}
        client.send_json({"event": "sockudo:resume", "data": {"channel_positions": positions}})
        client.read_until(lambda: client.events("sockudo:resume_success") or client.close_code is not None,
                          timeout=20)
        replayed = [m for m in client.messages if m.get("event") == "update"]
        size = sum(len(json.dumps(m, ensure_ascii=False, separators=(",", ":")).encode()) for m in replayed)
        assert size <= MAX_BUFFER_BYTES, (f"one resume replayed {len(replayed)} messages, {size} bytes "
                                          f"(budget {MAX_BUFFER_BYTES})")
    finally:
        client.close()
