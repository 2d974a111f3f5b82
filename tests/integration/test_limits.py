"""Resource limits, each tried to exhaustion against a real server (docs/security.md).

- the inbound message limit is enforced from the frame header: a gigabyte declared and 48 MiB
  streamed never grows the server's memory by more than a few MiB, and an 8 MiB message gets
  4000 while the socket stays;
- ``[rate_limiter]`` (off by default): WebSocket upgrades per IP (429), open WebSockets per IP
  (429), signed REST calls per IP (429 with the ``X-RateLimit-*`` headers);
- slow-loris: one header byte per second is dropped after the header timeout, a body that
  trickles gets 408 after the body timeout, and an established WebSocket is not subject to either;
- ``max_channels_per_connection``: one more subscription gets 4300;
- the bounded outbound queue: a client that stops reading is closed with 4100 while another
  keeps receiving every message.

Waits have deadlines; an absence is observed for a bounded window only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pusher
import pytest
import redis
import requests
import websocket

from tests.support.metrics import metric
from tests.support.procs import RedisServer, ServerProcess, rss_kb, wait_until
from tests.support.sdk import assert_still_delivering, sdk_for, signed_url
from tests.support.wsmany import Fleet, MiniWs, masked_frame
from tests.support.wsraw import RawClient

APP: dict[str, Any] = {"id": "100", "key": "limits-key", "secret": "limits-secret", "max_channels_per_connection": 5,
                       "max_event_payload_in_kb": 100}
HEADER_TIMEOUT = BODY_TIMEOUT = 1.5
MAX_MESSAGES = 20


def publish(server: ServerProcess, channel: str, event: str, data: str) -> None:
    body = json.dumps({"name": event, "channels": [channel], "data": data}).encode()
    query = {"auth_key": APP["key"], "auth_timestamp": str(int(time.time())), "auth_version": "1.0",
             "body_md5": hashlib.md5(body).hexdigest()}
    path = f"/apps/{APP['id']}/events"
    to_sign = "\n".join(["POST", path, "&".join(f"{k}={v}" for k, v in sorted(query.items()))])
    query["auth_signature"] = hmac.new(APP["secret"].encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    resp = requests.post(server.url + path, params=query, data=body, headers={"Content-Type": "application/json"},
                         timeout=10)
    assert resp.status_code == 200, resp.text


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess([APP], websocket={"max_messages": MAX_MESSAGES},
                         http_api={"header_timeout_seconds": HEADER_TIMEOUT, "body_timeout_seconds": BODY_TIMEOUT}
                         ).start()
    yield proc
    proc.stop()


# -- the inbound message limit ---------------------------------------------------------------------


def test_a_gigabyte_declared_and_never_sent_is_never_buffered(server, sdk, watcher):
    client = MiniWs(server.port, f"/app/{APP['key']}?protocol=7")
    try:
        assert server.proc is not None
        before = rss_kb(server.proc.pid)
        client.sock.settimeout(30)
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 30) + os.urandom(4)  # 1 GiB text frame
        client.sock.sendall(header)
        chunk = os.urandom(1 << 20)
        for _ in range(48):  # 48 MiB of it; sendall returns only as the server reads and discards
            client.sock.sendall(chunk)
        assert_still_delivering(sdk, watcher)  # the reader is busy skipping; nobody else waits
        grown = rss_kb(server.proc.pid) - before
        assert grown < 16 * 1024, f"server RSS grew by {grown} KiB while skipping an oversize frame"
    finally:
        client.reset()


def test_an_8_mib_message_gets_4000_and_the_socket_stays(server, sdk, watcher):
    client = RawClient.connect(server, APP["key"])
    try:
        message = b'{"event":"pusher:ping","data":{"pad":"' + b"x" * (8 << 20) + b'"}}'
        client.ws.sock.sendall(masked_frame(0x1, message))
        frame = client.expect("pusher:error", timeout=20)
        assert frame["data"]["code"] == 4000, frame
        client.ping_pong()
    finally:
        client.close()
    assert_still_delivering(sdk, watcher)


# -- per-IP limits ([rate_limiter]) ------------------------------------------------------------------


def upgrade_status(server: ServerProcess, key: str = APP["key"]) -> tuple[int, RawClient | None]:
    try:
        return 101, RawClient.connect(server, key, timeout=5)
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code, None


def test_rate_limiter_is_off_by_default(server):
    opened = []
    try:
        for _ in range(25):  # more than Sockudo's 20 per minute
            status, client = upgrade_status(server)
            assert status == 101
            opened.append(client)
    finally:
        for c in opened:
            c.close()


def test_upgrades_per_ip_over_the_window_get_429(server_factory: Callable[..., ServerProcess]):
    limited = server_factory([APP], env={"RATE_LIMITER_ENABLED": "true", "RATE_LIMITER_WEBSOCKET_MAX_REQUESTS": "5"})
    for _ in range(5):
        status, client = upgrade_status(limited)
        assert status == 101 and client is not None
        client.close()
    status, _ = upgrade_status(limited)
    assert status == 429
    resp = requests.get(f"{limited.url}/app/{APP['key']}", headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13"}, timeout=5)
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 1
    # the REST API and health checks have their own (or no) limit
    assert requests.get(limited.url + "/live", timeout=5).status_code == 200
    sdk_for(limited, APP).trigger("c", "e", "still publishing")
    assert metric(limited.metrics_text(), "sockudo_rate_limit_triggered_total") >= 2


def test_open_websockets_per_ip_are_capped(server_factory: Callable[..., ServerProcess]):
    limited = server_factory([APP], rate_limiter={"enabled": True, "max_connections_per_ip": 3,
                                                  "websocket_rate_limit": {"max_requests": 1000, "window_seconds": 60,
                                                                           "identifier": "websocket_connect"}})
    attempts = [upgrade_status(limited)[1] for _ in range(3)]
    opened = [client for client in attempts if client is not None]
    try:
        assert len(opened) == 3
        assert upgrade_status(limited)[0] == 429
        opened[0].close()  # a slot frees once the server has let go of that socket

        def admitted() -> bool:
            status, client = upgrade_status(limited)
            if client is not None:
                opened.append(client)
            return status == 101

        wait_until(admitted, timeout=10, interval=0.1, message="the freed slot")
        assert upgrade_status(limited)[0] == 429
        for client in opened[1:]:
            client.ping_pong()  # the sockets holding the slots are untouched
    finally:
        for client in opened:
            if client is not None:
                client.close()


def test_signed_rest_calls_per_ip_over_the_window_get_429_with_headers(server_factory: Callable[..., ServerProcess]):
    limited = server_factory([APP], rate_limiter={"enabled": True,
                                                  "api_rate_limit": {"max_requests": 5, "window_seconds": 60}})
    sdk = sdk_for(limited, APP)
    for i in range(5):
        sdk.trigger("c", "e", str(i))
    resp = requests.get(f"{limited.url}/apps/{APP['id']}/channels", timeout=5)  # unsigned still counts
    assert resp.status_code == 429, resp.text
    assert resp.json() == {"error": "Too many requests from this address", "code": "rate_limited", "status": 429}
    assert resp.headers["X-RateLimit-Limit"] == "5" and resp.headers["X-RateLimit-Remaining"] == "0"
    assert int(resp.headers["Retry-After"]) >= 1 and int(resp.headers["X-RateLimit-Reset"]) > time.time()
    with pytest.raises(pusher.errors.PusherError):
        sdk.trigger("c", "e", "over")
    for path in ("/live", "/up", "/usage"):
        assert requests.get(limited.url + path, timeout=5).status_code == 200
    status, client = upgrade_status(limited)
    assert status == 101 and client is not None  # WebSocket upgrades have their own limit
    client.close()


def test_with_the_redis_driver_two_nodes_share_one_allowance(
        server_factory: Callable[..., ServerProcess], redis_server: RedisServer):
    """``driver = "redis"`` (as Sockudo): an address gets ``max_requests`` in all, whichever
    node behind the balancer its requests reach — not that many per node."""
    prefix = f"limits-{uuid.uuid4().hex[:8]}:"
    limits = {"enabled": True, "driver": "redis", "api_rate_limit": {"max_requests": 6, "window_seconds": 60},
              "websocket_rate_limit": {"max_requests": 4, "window_seconds": 60}}
    nodes = [server_factory([APP], env={"REDIS_URL": redis_server.url, "REDIS_PREFIX": prefix},
                            rate_limiter=limits) for _ in range(2)]
    sdks = [sdk_for(node, APP) for node in nodes]
    for i in range(6):
        sdks[i % 2].trigger("c", "e", str(i))  # three through each node
    for node in nodes:
        resp = requests.get(f"{node.url}/apps/{APP['id']}/channels", timeout=5)
        assert resp.status_code == 429, resp.text
        assert resp.headers["X-RateLimit-Limit"] == "6"
    opened = []
    try:
        for i in range(4):
            status, client = upgrade_status(nodes[i % 2])
            assert status == 101
            opened.append(client)
        assert [upgrade_status(node)[0] for node in nodes] == [429, 429]
    finally:
        for client in opened:
            if client is not None:
                client.close()
    assert redis.Redis.from_url(redis_server.url).keys(f"{prefix}rate_limit:*")


# -- slow-loris ----------------------------------------------------------------------------------------


def trickle(server: ServerProcess, data: bytes, per_byte: float, timeout: float) -> tuple[float, bytes]:
    """Send ``data`` one byte every ``per_byte`` seconds until the server closes the connection;
    returns (seconds until it did, what it answered)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    started = time.monotonic()
    answer = b""
    try:
        for byte in data:
            assert time.monotonic() - started < timeout, "the server kept a trickling client"
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(per_byte)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            answer += chunk
            if not chunk:
                break
        else:
            raise AssertionError("the whole request was sent before the server gave up")
        sock.settimeout(5)
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:
            pass
        return time.monotonic() - started, answer
    finally:
        sock.close()


def test_one_header_byte_per_second_is_dropped(server, sdk, watcher):
    request = b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 40 + b"\r\n\r\n"
    elapsed, answer = trickle(server, request, per_byte=1.0, timeout=HEADER_TIMEOUT + 5)
    assert HEADER_TIMEOUT - 0.2 <= elapsed <= HEADER_TIMEOUT + 2.5, elapsed
    assert answer in (b"", ) or answer.startswith(b"HTTP/1.1 408"), answer
    assert requests.get(server.url + "/live", timeout=5).status_code == 200
    assert_still_delivering(sdk, watcher)


def test_a_trickling_body_gets_408(server, sdk, watcher):
    # Signed (with the MD5 of the 200 bytes it trickles): an unsigned request is refused from its
    # query alone, before its body is read.
    target = signed_url("", "POST", "/apps/100/events", APP, b" " * 200)
    head = (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        sock.sendall(head)  # the headers in time, then the body one byte every half second
        started = time.monotonic()
        answer = b""
        for _ in range(200):
            assert time.monotonic() - started < BODY_TIMEOUT + 5, "the server kept a trickling body"
            try:
                sock.sendall(b" ")
            except OSError:
                break
            sock.settimeout(0.5)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            answer += chunk
            if not chunk or b"\r\n\r\n" in answer:
                break
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert BODY_TIMEOUT - 0.2 <= elapsed <= BODY_TIMEOUT + 2.5, elapsed
    assert "Traceback" not in server.log()
    assert_still_delivering(sdk, watcher)


def test_an_established_websocket_is_not_subject_to_the_request_timeouts(server, watcher):
    client = RawClient.connect(server, APP["key"])
    try:
        with pytest.raises(TimeoutError):  # silent past both timeouts: nothing arrives, nothing closes
            client.recv(timeout=HEADER_TIMEOUT + BODY_TIMEOUT + 0.5)
        client.ping_pong()
    finally:
        client.close()


# -- channels per connection -------------------------------------------------------------------------


def test_one_channel_over_max_channels_per_connection_gets_4300(server, sdk, watcher):
    client = RawClient.connect(server, APP["key"])
    try:
        for i in range(5):
            client.subscribe(f"many-{i}")
        client.send_json({"event": "pusher:subscribe", "data": {"channel": "many-5"}})
        error = client.expect("pusher:subscription_error")
        assert error["channel"] == "many-5" and error["data"]["type"] == "LimitReached", error
        frame = client.expect("pusher:error")
        assert frame["data"]["code"] == 4300, frame
        client.subscribe("many-0")  # re-subscribing to a held channel is still fine
        client.send_json({"event": "pusher:unsubscribe", "data": {"channel": "many-0"}})
        client.subscribe("many-5")  # a freed slot can be used
        sdk.trigger("many-5", "e", "x")
        assert client.expect("e")["channel"] == "many-5"
    finally:
        client.close()
    assert_still_delivering(sdk, watcher)


# -- the bounded outbound queue ------------------------------------------------------------------------


def test_a_ping_flood_from_a_client_that_never_reads_gets_4100(server, sdk, watcher):
    """Every WebSocket ping must be answered with a pong; a client that sends pings and reads
    none of the pongs fills its queue like a slow consumer and is cut off the same way (4100),
    instead of growing the server's memory pong by pong."""
    flooder = MiniWs(server.port, f"/app/{APP['key']}?protocol=7", rcvbuf=4096)
    try:
        before = metric(server.metrics_text(), "sockudo_slow_consumer_disconnections_total")
        ping = masked_frame(0x9, b"p" * 125) * 100
        sent = 0
        flooder.sock.settimeout(10)
        while metric(server.metrics_text(), "sockudo_slow_consumer_disconnections_total") == before:
            assert sent < 200_000, "a ping flood was never cut off"
            try:
                for _ in range(10):
                    flooder.sock.sendall(ping)
                    sent += 100
            except OSError:
                break  # the server already cut the connection
        assert metric(server.metrics_text(), "sockudo_slow_consumer_disconnections_total") == before + 1
        # The server ends the connection. (Whether the client still reads the 4100 frame
        # depends on TCP: its own unread pings make the server's close a reset, which
        # discards what was in flight. A client that stops sending gets it: next test.)
        deadline = time.monotonic() + 15
        while flooder.close_code is None and not flooder.eof:
            assert time.monotonic() < deadline, "the flooding client was not closed"
            try:
                flooder.feed(flooder.sock.recv(262144))
            except OSError:
                break
        assert all(e["data"]["code"] == 4100 for e in flooder.events("pusher:error"))
    finally:
        flooder.close()
    assert_still_delivering(sdk, watcher)


def test_a_client_that_stops_reading_gets_4100_while_others_receive_everything(server, sdk, watcher):
    channel = "limits-slow"
    slow = MiniWs(server.port, f"/app/{APP['key']}?protocol=7", rcvbuf=4096)
    fast = MiniWs(server.port, f"/app/{APP['key']}?protocol=7")
    fleet = Fleet([fast])
    try:
        slow.sock.settimeout(5)
        slow.subscribe(channel)
        while not slow.events("pusher_internal:subscription_succeeded"):
            slow.feed(slow.sock.recv(65536))
        fast.subscribe(channel)
        fleet.pump_until(lambda: fast.events("pusher_internal:subscription_succeeded"), 5)
        # From here on the slow client reads nothing.
        before = metric(server.metrics_text(), "sockudo_slow_consumer_disconnections_total")
        payload = "x" * 90_000
        sent = 0
        while metric(server.metrics_text(), "sockudo_slow_consumer_disconnections_total") == before:
            assert sent < 400, "the slow consumer was never disconnected"
            for _ in range(10):
                started = time.monotonic()
                publish(server, channel, "big", f"{sent}:{payload}")  # over the SDK's 30 KB guard
                assert time.monotonic() - started < 2, "a publish waited on the slow client"
                sent += 1
                fleet.pump(0)
        # The others got everything, in order.
        fleet.pump_until(lambda: len(fast.events("big")) == sent, 20, "the fast client's messages")
        assert [int(m["data"].split(":", 1)[0]) for m in fast.events("big")] == list(range(sent))
        # Reading again, the slow client finds the end of its stream: 4100, then the close.
        slow.sock.settimeout(5)
        deadline = time.monotonic() + 10
        while slow.close_code is None and not slow.eof:
            assert time.monotonic() < deadline, "the slow client was not closed"
            slow.feed(slow.sock.recv(262144))
        errors = slow.events("pusher:error")
        assert errors and errors[-1]["data"]["code"] == 4100, errors
        assert slow.close_code == 4100
        assert len(slow.events("big")) < sent  # it really was behind
    finally:
        fleet.close()
        slow.close()
    assert_still_delivering(sdk, watcher)
