"""The push HTTP/1.1 client (``sockudo/push/http1.py``) against a raw socket server: keep-alive
connections are reused, an idle connection the server closed is replaced without failing the
request, chunked and length-delimited answers are read to their end, and framing-breaking
headers are refused before anything is sent."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator

import pytest

from sockudo.push import http1


class RawServer:
    """Accepts connections; ``answer(request_bytes) -> (reply_bytes, keep_open)`` per request."""

    def __init__(self, answer: Callable[[bytes], tuple[bytes, bool]]) -> None:
        self.answer = answer
        self.accepted = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(rest) < length:
                    rest += conn.recv(65536)
                request, buf = head + b"\r\n\r\n" + rest[:length], rest[length:]
                reply, keep_open = self.answer(request)
                conn.sendall(reply)
                if not keep_open:
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client() -> Iterator[http1.Http1Client]:
    c = http1.Http1Client(ssl.create_default_context(), 2.0)
    yield c
    c.close()


def post(client: http1.Http1Client, server: RawServer, body: bytes = b"x") -> http1.Http1Response:
    return client.post(f"http://127.0.0.1:{server.port}/push/a", content=body, headers={"ttl": "60"}, timeout=2.0)


def test_keep_alive_connections_are_reused(client: http1.Http1Client) -> None:
    server = RawServer(lambda req: (b"HTTP/1.1 201 Created\r\nLocation: /m/1\r\nContent-Length: 2\r\n\r\nok", True))
    try:
        for _ in range(5):
            resp = post(client, server)
            assert (resp.status_code, resp.headers["location"], resp.content) == (201, "/m/1", b"ok")
        assert server.accepted == 1
    finally:
        server.close()


def test_an_idle_connection_the_server_closed_is_replaced(client: http1.Http1Client) -> None:
    # Each answer keeps its connection "alive" but the server closes it right after.
    server = RawServer(lambda req: (b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", False))
    try:
        assert [post(client, server).status_code for _ in range(3)] == [201, 201, 201]
        assert server.accepted == 3
    finally:
        server.close()


def test_chunked_answers_and_connection_close(client: http1.Http1Client) -> None:
    chunked = b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    server = RawServer(lambda req: (chunked, True))
    try:
        assert (post(client, server).content, post(client, server).status_code) == (b"hello world", 400)
        assert server.accepted == 1
    finally:
        server.close()
    closing = RawServer(lambda req: (b"HTTP/1.1 410 Gone\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False))
    try:
        assert [post(client, closing).status_code for _ in range(2)] == [410, 410]
        assert closing.accepted == 2  # "Connection: close" is honoured: never reused
    finally:
        closing.close()


def test_headers_that_would_break_framing_are_refused(client: http1.Http1Client) -> None:
    with pytest.raises(http1.BadHeader):
        client.post("http://127.0.0.1:9/x", content=b"", headers={"topic": "a\r\nx-injected: 1"}, timeout=1.0)
