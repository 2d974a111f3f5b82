"""The per-socket transport over a real (gevent) socket pair: the send queue is bounded in bytes
as well as in frames, and its byte count returns to zero once the peer has read everything (a
count that drifted up would refuse history to a client that is not behind, or cut it off)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket

from sockudo.core.wsframe import OutFrame
from sockudo.server.transport import WsTransport


@pytest.fixture
def pair() -> Iterator[tuple[gsocket.socket, gsocket.socket]]:
    server, client = gsocket.socketpair()
    for s in (server, client):  # small kernel buffers, so the queue fills early
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield server, client
    server.close()
    client.close()


def frame(size: int) -> OutFrame:
    return OutFrame(json.dumps({"event": "e", "channel": "c", "data": "x" * size}))


def read_all(sock: gsocket.socket, until: bytes) -> bytes:
    got = b""
    with gevent.Timeout(5):
        while until not in got:
            got += sock.recv(65536)
    return got


def test_the_queue_is_cut_off_by_bytes_before_it_is_by_count(pair: Any) -> None:
    server, client = pair
    slow: list[bool] = []
    transport = WsTransport(server, max_messages=1000, on_slow_consumer=lambda: slow.append(True),
                            max_bytes=64 * 1024)
    sent = 0
    while not slow:
        assert sent < 200, "never cut off: the bytes were not counted"
        transport.send(frame(10_000))
        sent += 1
        assert transport.pending_bytes() <= 64 * 1024 or slow
    assert transport.closing and sent < 100  # long before 1,000 frames
    assert b"4100" in read_all(client, b"\x88")  # the error frame, then the close frame


def test_the_byte_count_is_zero_once_the_peer_has_read_everything(pair: Any) -> None:
    server, client = pair
    transport = WsTransport(server, max_messages=1000, max_bytes=1 << 20)
    frames = [frame(5000) for _ in range(20)]
    for f in frames:
        transport.send(f)
    transport.send_pong(b"p")
    assert transport.pending_bytes() > 0  # the kernel took only part
    expected = sum(len(f.wire) for f in frames) + 3
    got = b""
    with gevent.Timeout(5):
        while len(got) < expected:
            got += client.recv(65536)
    transport.join_writer(5)
    assert len(got) == expected and transport.pending_bytes() == 0 and not transport.closing
