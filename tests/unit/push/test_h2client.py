"""The push HTTP/2 client (``sockudo/push/h2client.py``) against a small ``h2`` server: many
threads share one connection, and a request whose answer never comes is cut at its deadline
by resetting its own stream only."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import h2.config
import h2.connection
import h2.events
import pytest

from sockudo.push import h2client


class SlowPathServer:
    """Prior-knowledge HTTP/2 on 127.0.0.1: ``/fast`` answers 200 after 50 ms, ``/never`` never."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.resets: list[int] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        lock = threading.Lock()
        paths: dict[int, str] = {}

        def answer(stream_id: int) -> None:
            time.sleep(0.05)
            with lock:
                conn.send_headers(stream_id, [(":status", "200")], end_stream=True)
                sock.sendall(conn.data_to_send())

        try:
            while data := sock.recv(65536):
                with lock:
                    events = conn.receive_data(data)
                    sock.sendall(conn.data_to_send())
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        paths[event.stream_id] = next(str(v) for k, v in event.headers if str(k) == ":path")
                    elif isinstance(event, h2.events.StreamEnded) and paths[event.stream_id] == "/fast":
                        threading.Thread(target=answer, args=(event.stream_id,), daemon=True).start()
                    elif isinstance(event, h2.events.StreamReset):
                        self.resets.append(event.stream_id)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[SlowPathServer]:
    srv = SlowPathServer()
    yield srv
    srv.close()


def test_threads_share_one_connection_and_a_late_stream_is_reset_alone(server: SlowPathServer) -> None:
    import ssl

    client = h2client.H2Client(ssl.create_default_context(), 2.0)
    base = f"http://127.0.0.1:{server.port}"
    try:
        started = time.monotonic()
        with pytest.raises(h2client.H2Timeout):
            client.post(f"{base}/never", content=b"x", headers={}, timeout=0.3)
        assert 0.25 <= time.monotonic() - started < 1.0
        with ThreadPoolExecutor(50) as pool:
            answers = list(
                pool.map(lambda _: client.post(f"{base}/fast", content=b"{}", headers={}, timeout=5).status_code,
                         range(200))
            )
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert answers == [200] * 200
    assert server.connections == 1  # one connection for the timed-out stream and all 200 others
    assert server.resets  # the late stream was cancelled, the connection kept
    assert elapsed < 200 * 0.05 / 4, elapsed  # the 50 ms answers overlapped


def test_a_request_past_its_expiry_is_never_sent(server: SlowPathServer) -> None:
    import ssl

    client = h2client.H2Client(ssl.create_default_context(), 2.0)
    try:
        with pytest.raises(h2client.H2Expired):
            client.post(f"http://127.0.0.1:{server.port}/fast", content=b"{}", headers={}, timeout=1,
                        not_after=time.time() - 1)
    finally:
        client.close()
