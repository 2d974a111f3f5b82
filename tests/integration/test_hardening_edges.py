"""Edge cases an attacker holding only an app key can reach, against a real server
(docs/security.md, docs/reliability.md). Requests a client library would refuse to send (two
``Content-Length`` headers, a path with ``//``, a broken ``Sec-WebSocket-Key``, a body cut off
half-way) go over raw sockets.

- one path, one meaning: a path with empty or dot segments is answered 404 before the per-IP
  limit and before any view, never redirected with a ``Location`` built from ``Host``;
- unambiguous framing: differing ``Content-Length`` headers, or one beside chunked encoding,
  are 400; a chunked body over ``request_limit_in_mb`` is 413; a bad WebSocket handshake is a
  quiet 400 (or 426 for an unknown version);
- ids are data: two push (publish id, device id) pairs that would have shared a Redis key are
  both delivered and both publishes finish;
- logs cannot be forged: a URL with an encoded newline does not start a log line, and a client
  that leaves mid-body is not an "unhandled error";
- a channel named three times in one publish gets one delivery and one history entry; an origin
  wildcard matches the origin's host, not a string suffix.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import websocket

from tests.support.procs import RedisServer, ServerProcess, wait_until
from tests.support.sdk import signed_url
from tests.support.wsraw import RawClient

APP: dict[str, Any] = {"id": "100", "key": "edge-key", "secret": "edge-secret", "enable_client_messages": True,
                       "history": {"enabled": True}}
ORIGINS: dict[str, Any] = {"id": "200", "key": "edge-origin", "secret": "edge-origin-secret",
                           "allowed_origins": ["https://*.example.com"]}


# -- raw HTTP ---------------------------------------------------------------------------------------


class Reply:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.headers}, {self.body[:200]!r})"


def raw_http(server: ServerProcess, request: bytes, timeout: float = 5.0) -> Reply:
    """Send ``request`` as is and read until the server closes (every request here says
    ``Connection: close`` or is refused with a close)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
    return Reply(data)


def request_bytes(method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"",
                  host: str = "127.0.0.1") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def signed_target(server: ServerProcess, method: str, path: str, body: bytes = b"",
                  app: dict[str, Any] = APP) -> str:
    """The request target (path and query) of a correctly signed call, signed over ``path`` as sent."""
    return signed_url(server.url, method, path, app, body)[len(server.url):]


def chunked(body: bytes, size: int = 4096) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


def event_body(channel: str, data: str, **extra: Any) -> bytes:
    return json.dumps({"name": "edge-event", "channel": channel, "data": data, **extra}).encode()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess([APP, ORIGINS], http_api={"request_limit_in_mb": 0.01},
                         env={"LOG_LEVEL": "DEBUG"}).start()
    yield proc
    proc.stop()


@pytest.fixture
def clients() -> Iterator[list[RawClient]]:
    opened: list[RawClient] = []
    yield opened
    for client in opened:
        client.close()


def subscriber(server: ServerProcess, opened: list[RawClient], channel: str) -> RawClient:
    client = RawClient.connect(server, APP["key"])
    opened.append(client)
    client.subscribe(channel)
    return client


def assert_no_traceback(server: ServerProcess) -> None:
    """Client mistakes are not the server's errors: no traceback, nothing at ERROR."""
    log = server.log()
    assert "Traceback" not in log and "unhandled error" not in log and "uncaught error" not in log, log[-3000:]
    assert not [line for line in log.splitlines() if " ERROR " in line[:40]], log[-3000:]


# -- 3. one path, one meaning ------------------------------------------------------------------------

#: Paths that name a signed route in another spelling. Each must be answered 404 before any
#: limit or view: the per-IP REST limit keys on the canonical prefix ``/apps/``.
PATH_VARIANTS = [
    ("POST", "//apps/100/events"),
    ("POST", "//apps/100/batch_events"),
    ("GET", "//apps/100/channels"),
    ("GET", "///apps/100/channels"),
    ("GET", "/apps/100//channels"),
    ("GET", "/apps//100/channels"),
    ("GET", "/apps/100/./channels"),
    ("GET", "/apps/100/x/../channels"),
    ("GET", "/./apps/100/channels"),
    ("GET", "//users/u/terminate_connections"),
]


def test_path_variants_answer_404_and_cannot_skip_the_rest_rate_limit(server_factory: Callable[..., ServerProcess]):
    limited = server_factory([APP], rate_limiter={"enabled": True,
                                                  "api_rate_limit": {"max_requests": 3, "window_seconds": 60}})
    for method, path in PATH_VARIANTS:
        body = event_body("edge-c", "x") if path.endswith("events") else b""
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))] if body else []
        reply = raw_http(limited, request_bytes(method, signed_target(limited, method, path, body), headers, body,
                                                host="evil.example"))
        assert reply.status == 404, (method, path, reply)
        assert "location" not in reply.headers, (method, path, reply)
    # The variants took nothing from the allowance, and the limit still holds on the real path.
    for _ in range(3):
        path = "/apps/100/channels"
        assert requests.get(signed_url(limited.url, "GET", path, APP), timeout=5).status_code == 200
    path = "/apps/100/channels"
    assert requests.get(signed_url(limited.url, "GET", path, APP), timeout=5).status_code == 429
    for method, path in PATH_VARIANTS[:3]:  # and over the limit, the variants still reach nothing
        body = event_body("edge-c", "x") if path.endswith("events") else b""
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))] if body else []
        reply = raw_http(limited, request_bytes(method, signed_target(limited, method, path, body), headers, body))
        assert reply.status in (404, 429), (method, path, reply)
    assert_no_traceback(limited)


def test_a_double_slash_is_404_never_a_redirect_built_from_the_host_header(server: ServerProcess):
    for target in ("/apps/100//channels", "/apps/100//channels?auth_key=edge-key", "//live", "/up//100"):
        reply = raw_http(server, request_bytes("GET", target, host="evil.example"))
        assert reply.status == 404, (target, reply)
        assert "location" not in reply.headers and b"evil.example" not in reply.body, (target, reply)


# -- 4. HTTP framing is unambiguous ------------------------------------------------------------------


def test_conflicting_content_lengths_and_content_length_with_chunked_are_400(
        server: ServerProcess, clients: list[RawClient]):
    channel = "edge-framing-" + uuid.uuid4().hex[:6]
    watcher = subscriber(server, clients, channel)
    body = event_body(channel, "smuggled")
    path = f"/apps/{APP['id']}/events"
    target = signed_target(server, "POST", path, body)
    json_type = ("Content-Type", "application/json")
    for headers, payload in (
        ([json_type, ("Content-Length", str(len(body))), ("Content-Length", "5")], body),
        ([json_type, ("Content-Length", "5"), ("Content-Length", str(len(body)))], body),
        ([json_type, ("Content-Length", f"{len(body)}, 5")], body),
        ([json_type, ("Content-Length", str(len(body))), ("Transfer-Encoding", "chunked")], chunked(body)),
        ([json_type, ("Transfer-Encoding", "chunked"), ("Content-Length", str(len(body)))], chunked(body)),
    ):
        reply = raw_http(server, request_bytes("POST", target, headers, payload))
        assert reply.status == 400, (headers, reply)
    # None of them was published; identical duplicates are one length (RFC 9112 §6.3) and are served.
    reply = raw_http(server, request_bytes("POST", target, [json_type, ("Content-Length", str(len(body))),
                                                            ("Content-Length", str(len(body)))], body))
    assert reply.status == 200, reply
    assert watcher.expect("edge-event")["data"] == "smuggled"
    with pytest.raises(AssertionError):
        watcher.expect("edge-event", timeout=0.5)
    assert_no_traceback(server)


def test_a_chunked_body_is_served_and_one_over_the_limit_is_413(server: ServerProcess, clients: list[RawClient]):
    channel = "edge-chunked-" + uuid.uuid4().hex[:6]
    watcher = subscriber(server, clients, channel)
    path = f"/apps/{APP['id']}/events"
    headers = [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]
    small = event_body(channel, "in-chunks" + "x" * 5000)
    reply = raw_http(server, request_bytes("POST", signed_target(server, "POST", path, small), headers,
                                           chunked(small, 1000)))
    assert reply.status == 200, reply
    assert watcher.expect("edge-event")["data"].startswith("in-chunks")
    limit = int(0.01 * 1024 * 1024)
    large = event_body(channel, "y" * (limit + 100))  # signed over the whole body, as a client would
    for route in ("events", "batch_events", "users/u/terminate_connections"):
        target = signed_target(server, "POST", f"/apps/{APP['id']}/{route}", large)
        reply = raw_http(server, request_bytes("POST", target, headers, chunked(large)))
        assert reply.status == 413, (route, reply)
        assert json.loads(reply.body)["code"] == "payload_too_large", reply
    assert_no_traceback(server)


def _handshake(key: str | None, version: str = "13", http: str = "HTTP/1.1") -> bytes:
    lines = [f"GET /app/{APP['key']}?protocol=7 {http}", "Host: 127.0.0.1", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Version: {version}"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_bad_websocket_handshake_is_a_quiet_400(server: ServerProcess):
    for key in ("!!!", "abc", base64.b64encode(b"x" * 15).decode(), base64.b64encode(b"x" * 17).decode(), "",
                "%%%%%%%%%%%%%%%%%%%%%%%%"):
        reply = raw_http(server, _handshake(key))
        assert reply.status == 400 and reply.body, (key, reply)
    reply = raw_http(server, _handshake(None))
    assert reply.status == 400 and reply.body, reply
    reply = raw_http(server, _handshake(base64.b64encode(b"x" * 16).decode(), version="8"))
    assert reply.status == 426 and reply.headers.get("sec-websocket-version") == "13", reply
    reply = raw_http(server, _handshake(base64.b64encode(b"x" * 16).decode(), http="HTTP/1.0"))
    assert reply.status == 400, reply
    RawClient.connect(server, APP["key"]).close()  # a good handshake still works
    assert_no_traceback(server)
    assert "Invalid key" not in server.log()


# -- 6. logs cannot be forged ------------------------------------------------------------------------

FORGED = "FORGED-0000 ERROR sockudo.admin: app secret rotated"


def test_a_url_cannot_forge_a_log_line_and_a_client_leaving_mid_body_is_no_error(server: ServerProcess):
    encoded = FORGED.replace(" ", "%20").replace(":", "%3A")
    for path, extra in ((f"/apps/100%0A{encoded}/events", []),
                        (f"/apps/100%0D%0A{encoded}/users/u/terminate_connections", []),
                        (f"/apps/100%0A{encoded}/batch_events", [("Upgrade", "websocket")]),
                        (f"/apps/100%0A{encoded}/events", [("Transfer-Encoding", "chunked")])):
        length = [] if extra and extra[0][0] == "Transfer-Encoding" else [("Content-Length", "100")]
        head = request_bytes("POST", path + "?auth_key=edge-key", [("Content-Type", "application/json"),
                                                                   *length, *extra], b'{"na')
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(head)  # and leave before the rest of the body
    wait_until(lambda: server.log().count("FORGED-0000") >= 2, timeout=10, message="the publish requests to be logged")
    for line in server.log().splitlines():
        assert not line.startswith("FORGED"), line
        assert "FORGED-0000" not in line or "\\n" in line, line
    assert_no_traceback(server)


# -- 7. small correctness gaps -----------------------------------------------------------------------


def test_a_channel_named_three_times_gets_one_delivery_and_one_history_entry(
        server: ServerProcess, clients: list[RawClient]):
    channel = "edge-dup-" + uuid.uuid4().hex[:6]
    watcher = subscriber(server, clients, channel)
    path = f"/apps/{APP['id']}/events"
    body = json.dumps({"name": "edge-event", "channels": [channel, channel, channel], "data": "once"}).encode()
    resp = requests.post(signed_url(server.url, "POST", path, APP, body), data=body,
                         headers={"Content-Type": "application/json"}, timeout=5)
    assert resp.status_code == 200, resp.text
    marker = json.dumps({"name": "edge-marker", "channel": channel, "data": "m"}).encode()
    assert requests.post(signed_url(server.url, "POST", path, APP, marker), data=marker,
                         headers={"Content-Type": "application/json"}, timeout=5).status_code == 200
    frames = []
    while True:
        frame = watcher.recv()
        if frame.get("event") == "edge-marker":
            break
        frames.append(frame)
    assert [f["data"] for f in frames if f.get("event") == "edge-event"] == ["once"], frames
    history = requests.get(signed_url(server.url, "GET", f"/apps/{APP['id']}/channels/{channel}/history", APP),
                           timeout=5)
    assert history.status_code == 200, history.text
    assert [item["event_name"] for item in history.json()["items"]].count("edge-event") == 1, history.json()


def test_an_origin_wildcard_matches_the_host_not_a_string_suffix(server: ServerProcess):
    for origin in ("https://evil.com/.example.com", "https://evil.com?.example.com", "https://evil.com#.example.com",
                   "https://a.example.com@evil.com", "https://evil.com\\.example.com", "http://a.example.com"):
        client = RawClient.open(server, ORIGINS["key"], origin=origin)
        try:
            client.expect_error_then_close(4009)
        finally:
            client.close()
    for origin in ("https://a.example.com", "https://A.b.Example.com"):
        RawClient.connect(server, ORIGINS["key"], origin=origin).close()


# -- 5. ids are data, not key syntax ------------------------------------------------------------------


@pytest.fixture(scope="module")
def push(redis_server: RedisServer) -> Iterator[Any]:
    from tests.support.push import Push

    harness = Push(redis_server)
    yield harness
    harness.close()


def test_push_ids_with_colons_never_share_a_delivery(push: Any):
    """Publish ``a:x`` to device ``b``, then publish ``a`` to device ``x:b``: the old key
    ``ds:{app}:{publish}:{device}`` was the same for both, so the second delivery was never
    attempted and its publish stayed ``dispatching``. Both must be delivered and finish."""
    run = uuid.uuid4().hex[:6]
    pairs = [(f"a{run}:x", f"b{run}"), (f"a{run}", f"x:b{run}")]
    tokens = {device: push.fcm_device(device) for device in {device for _, device in pairs}}
    for publish_id, device in pairs:
        resp = push.publish({"publishId": publish_id, "recipients": [{"type": "device", "device_id": device}],
                             "payload": {"title": "t"}})
        assert resp.status_code == 202, resp.text
        status = push.wait_state(publish_id, ("succeeded", "partially_succeeded", "failed", "dead_lettered"),
                                 timeout=15)
        assert status["state"] == "succeeded", status
        assert status["counters"]["succeeded"] == 1, status
    assert push.fcm.accepted_count(tokens[f"b{run}"]) == 1
    assert push.fcm.accepted_count(tokens[f"x:b{run}"]) == 1


def test_websocket_client_library_still_connects(server: ServerProcess):
    ws = websocket.create_connection(f"{server.ws_url}/app/{APP['key']}?protocol=7", timeout=5)
    try:
        assert json.loads(ws.recv())["event"] == "pusher:connection_established"
    finally:
        ws.close()
