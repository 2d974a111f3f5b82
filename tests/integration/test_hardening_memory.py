"""Memory a client without credentials can make the server hold, tried the way an attacker would
(docs/security.md, "Bounds per socket"): raw sockets that stop reading, hand-built fragments, and
protocol-2 subscriptions to names nobody else uses. Every test measures the server process's
RSS or its Redis keys, and the close code or reply the client gets.

- the send queue is bounded in bytes (``websocket.max_buffer_bytes``), not only in messages: a
  client that stops reading while 90 KB messages arrive is closed with 4100 long before
  ``max_messages`` of them are queued;
- ``sockudo:channel_history`` pages are capped at the app's ``max_page_size`` (like REST), and a
  socket with unsent bytes queued gets 429 instead of another page: a hundred-byte request can no
  longer queue megabytes;
- one ``sockudo:resume`` replays at most what the socket may hold (``max_buffer_bytes``): the rest
  fails as ``position_expired`` (read history), instead of up to 100 channels x 1,000 messages;
- a fragmented message is bounded in fragments (``websocket.max_fragments``, close 1009), not only
  in payload bytes: empty and one-byte continuation frames cost nothing beyond their payload;
- subscribing to and leaving unique public channel names on protocol 2 (history and recovery
  on) leaves nothing behind, in memory or in Redis, and an idle channel's position from the
  subscribe ack still recovers what was published while its only subscriber was away.

Waits have deadlines; an absence is observed for a bounded window only.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.support.metrics import metric
from tests.support.procs import RssPeak, ServerProcess, rss_kb, wait_until
from tests.support.sdk import signed as signed_request
from tests.support.wsmany import CLOSE, PING, PONG, TEXT, Fleet, MiniWs, masked_frame
from tests.support.wsraw import TcpWebSocket

CONT = 0x0
MAX_PAGE_SIZE = 100
#: The defaults under test (docs/configuration.md): 1 MiB of unsent frames per socket, 1,024 fragments.
MAX_BUFFER_BYTES = 1 << 20
MAX_FRAGMENTS = 1024
APP: dict[str, Any] = {"id": "100", "key": "mem-key", "secret": "mem-secret", "max_event_payload_in_kb": 100,
                       "max_event_batch_size": 100,
                       "history": {"enabled": True, "max_page_size": MAX_PAGE_SIZE, "max_messages_per_channel": 5000},
                       "connection_recovery": {"enabled": True}}


def signed(server: ServerProcess, method: str, path: str, params: dict[str, Any] | None = None,
           body: Any = None) -> Any:
    resp = signed_request(server, method, path, body, {k: str(v) for k, v in (params or {}).items()}, app=APP)
    assert resp.status_code == 200, resp.text
    return resp.json()


def publish_batch(server: ServerProcess, channel: str, first: int, count: int, pad: int) -> None:
    batch = [{"name": "update", "channel": channel, "data": json.dumps({"i": i, "pad": "x" * pad})}
             for i in range(first, first + count)]
    signed(server, "POST", f"/apps/{APP['id']}/batch_events", body={"batch": batch})


def v2_socket(server: ServerProcess, rcvbuf: int | None = None) -> MiniWs:
    client = MiniWs(server.port, f"/app/{APP['key']}?protocol=2&client=raw&version=1.0", rcvbuf=rcvbuf)
    client.sock.settimeout(10)
    return client


def subscribe_v2(client: MiniWs, channel: str) -> dict[str, Any]:
    client.send_json({"event": "sockudo:subscribe", "data": {"channel": channel}})
    acks = lambda: client.events("sockudo_internal:subscription_succeeded", channel)  # noqa: E731
    client.read_until(acks)
    return acks()[-1]


def data_of(frame: dict[str, Any]) -> Any:
    data = frame.get("data")
    return json.loads(data) if isinstance(data, str) else data


def sample(server: ServerProcess, name: str) -> float:
    return metric(server.metrics_text(), name)


@pytest.fixture
def node(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory([APP])


# -- bytes per socket: the send queue --------------------------------------------------------------


def test_a_client_that_stops_reading_big_messages_is_cut_off_by_bytes_not_count(node: ServerProcess) -> None:
    """90 KB messages to a client with a 4 KiB receive buffer that reads nothing: it must get 4100
    once about ``max_buffer_bytes`` are queued, not after ``max_messages`` (1,000, about 90 MB)."""
    channel = "mem-slow-bytes"
    slow = v2_socket(node, rcvbuf=4096)
    fast = v2_socket(node)
    fleet = Fleet([fast])
    try:
        subscribe_v2(slow, channel)
        subscribe_v2(fast, channel)
        assert node.proc is not None
        before = rss_kb(node.proc.pid)
        sent = 0
        # Budget: the kernel's buffers (a few MiB on loopback at most) plus max_buffer_bytes.
        while sample(node, "sockudo_slow_consumer_disconnections_total") == 0:
            assert sent < 200, f"no 4100 after {sent} messages of 90 KB ({sent * 90} KB) queued for one socket"
            publish_batch(node, channel, sent, 5, 90_000)
            sent += 5
            fleet.pump(0)
        grown = rss_kb(node.proc.pid) - before
        assert grown < 24 * 1024, f"RSS grew by {grown} KiB for one slow socket"
        fleet.pump_until(lambda: len(fast.events("update")) == sent, 20, "the fast client's messages")
        slow.read_until(lambda: slow.close_code is not None or slow.eof)
        errors = slow.events("pusher:error") + slow.events("sockudo:error")
        assert errors and data_of(errors[-1])["code"] == 4100, errors[-1:]
        assert slow.close_code in (4100, None)  # None: the close raced the client's unread data (RST)
    finally:
        fleet.close()
        slow.close()


def fill_history(server: ServerProcess, channel: str, count: int, pad: int) -> None:
    for first in range(1, count + 1, 100):
        publish_batch(server, channel, first, min(100, count + 1 - first), pad)


def test_history_requests_from_a_socket_that_stops_reading_cannot_queue_megabytes(node: ServerProcess) -> None:
    """The issue's attack: a protocol-2 client subscribes, stops reading and asks for
    ``sockudo:channel_history`` pages of 1,000 messages again and again. Each ~100-byte request
    used to queue a multi-megabyte frame (up to 1,000 messages whatever ``max_page_size`` said),
    and 40 of them held ~90 MB until the count limit (1,000 frames) would have been reached."""
    channel = "mem-history"
    fill_history(node, channel, 1000, 2000)
    attacker = v2_socket(node, rcvbuf=4096)
    try:
        subscribe_v2(attacker, channel)
        assert node.proc is not None
        before = rss_kb(node.proc.pid)
        requests_sent = 40
        request = {"event": "sockudo:channel_history", "data": {"channel": channel, "limit": 1000}}
        for _ in range(requests_sent):
            attacker.send_json(request)
        # Every request is either served (a history read) or refused; wait until all are answered.
        wait_until(lambda: sample(node, "sockudo_history_reads_total")
                   + sample(node, "sockudo_rate_limit_triggered_total") >= requests_sent, timeout=30,
                   message="every history request to be answered or refused")
        grown = rss_kb(node.proc.pid) - before
        assert grown < (MAX_BUFFER_BYTES >> 10) + 16 * 1024, f"RSS grew by {grown} KiB for one socket's requests"

        # Reading now, the client finds capped pages and, for the rest, 429 (or it was cut off: 4100).
        attacker.read_until(lambda: len(attacker.events("sockudo:channel_history")) == requests_sent
                   or attacker.close_code is not None or attacker.eof, timeout=30)
        replies = [data_of(f) for f in attacker.events("sockudo:channel_history")]
        pages = [r for r in replies if "items" in r]
        refused = [r for r in replies if "items" not in r]
        assert pages and all(len(p["items"]) <= MAX_PAGE_SIZE and p["limit"] == MAX_PAGE_SIZE for p in pages)
        assert all(r["status"] == 429 for r in refused), refused[:3]
        assert refused or attacker.close_code == 4100, "a socket far behind was served every page"
    finally:
        attacker.close()


def test_websocket_history_pages_are_capped_like_rest(node: ServerProcess) -> None:
    """A client that reads: ``limit`` above ``max_page_size`` gets ``max_page_size`` items and a
    cursor to the next page, as the REST endpoint does."""
    channel = "mem-history-cap"
    fill_history(node, channel, 250, 10)
    rest = signed(node, "GET", f"/apps/{APP['id']}/channels/{channel}/history", {"limit": 1000})
    client = v2_socket(node)
    try:
        subscribe_v2(client, channel)
        serials: list[int] = []
        cursor = None
        while True:
            data: dict[str, Any] = {"channel": channel, "limit": 1000, "direction": "oldest_first"}
            if cursor:
                data["cursor"] = cursor
            client.send_json({"event": "sockudo:channel_history", "data": data})
            count = len(client.events("sockudo:channel_history"))
            client.read_until(lambda: len(client.events("sockudo:channel_history")) > count)  # noqa: B023
            page = data_of(client.events("sockudo:channel_history")[-1])
            assert page["limit"] == MAX_PAGE_SIZE == rest["limit"], page.get("error", page["limit"])
            serials += [item["serial"] for item in page["items"]]
            cursor = page["next_cursor"]
            if not page["has_more"]:
                break
        assert serials == list(range(1, 251))
    finally:
        client.close()


def test_one_resume_replays_no_more_than_the_socket_may_hold(node: ServerProcess) -> None:
    """20 channels with 200 messages of 10 KB each; a client that reads nothing resumes all of
    them from serial 0 (history serves the gaps: the hot buffers keep 100). The whole replay,
    ~40 MB, used to be built in memory before the first frame was queued."""
    channels = [f"mem-resume-{i}" for i in range(20)]
    for channel in channels:
        fill_history(node, channel, 200, 10_000)
    attacker = v2_socket(node, rcvbuf=4096)
    try:
        positions = {}
        for channel in channels:
            ack = subscribe_v2(attacker, channel)
            assert ack["serial"] == 200
            positions[channel] = {"stream_id": ack["stream_id"], "serial": 0}
        assert node.proc is not None
        with RssPeak(node.proc.pid) as rss:
            attacker.send_json({"event": "sockudo:resume", "data": {"channel_positions": positions}})
            wait_until(lambda: sample(node, "sockudo_history_recovery_success_total")
                       + sample(node, "sockudo_history_recovery_failures_total") >= len(channels), timeout=30,
                       message="every channel's resume to be decided")
            grown = rss.grown()
        assert grown < 16 * 1024, f"RSS peaked {grown} KiB over its baseline for one resume request"

        attacker.read_until(lambda: attacker.events("sockudo:resume_success") or attacker.close_code is not None
                   or attacker.eof, timeout=30)
        (done,) = attacker.events("sockudo:resume_success")
        failed = data_of(done)["failed"]
        replayed = sum(r["replayed"] for r in data_of(done)["recovered"])
        assert replayed * 10_000 <= MAX_BUFFER_BYTES and len(failed) + len(data_of(done)["recovered"]) == 20
        assert {f["code"] for f in failed} == {"position_expired"} and "history" in failed[0]["reason"]
        # The socket is still served, and history gives the messages page by page.
        attacker.send_json({"event": "sockudo:channel_history", "data": {"channel": channels[-1],
                                                                       "direction": "oldest_first"}})
        attacker.read_until(lambda: attacker.events("sockudo:channel_history"))
        page = data_of(attacker.events("sockudo:channel_history")[0])
        assert [item["serial"] for item in page["items"]] == list(range(1, MAX_PAGE_SIZE + 1))
    finally:
        attacker.close()


# -- bytes per socket: fragments -----------------------------------------------------------------------


def test_a_message_of_endless_empty_fragments_is_closed_with_1009(node: ServerProcess) -> None:
    """Empty continuation frames add nothing to the payload, so ``max_payload_kb`` never stopped
    them: a message may have at most ``max_fragments`` fragments."""
    raw = TcpWebSocket(node, f"/app/{APP['key']}?protocol=7")
    try:
        assert raw.status_line.startswith("HTTP/1.1 101"), raw.status_line
        raw.read_frame()  # connection_established
        raw.send_frame(TEXT, b"{", fin=False)
        try:
            raw.sock.sendall(_fragments(b"", 4 * MAX_FRAGMENTS))
        except OSError:
            pass  # the server already closed
        code, frames = raw.read_until_close(timeout=10)
        assert code == 1009, (code, frames[-3:])
    finally:
        raw.close()


def _fragments(payload: bytes, count: int) -> bytes:
    """``count`` non-final continuation frames carrying ``payload`` each."""
    one = masked_frame(CONT, payload)
    return (bytes([one[0] & 0x7F]) + one[1:]) * count


def test_many_sockets_of_one_byte_fragments_are_bounded(node: ServerProcess) -> None:
    """16 sockets each send a message as 60,000 one-byte fragments (under the 64 KiB payload
    limit) and never finish it. Each fragment used to be kept as its own object (~40 bytes for
    one byte of payload): ~40 MB in all. A WebSocket ping after the fragments proves the server
    has read them (control frames may come between fragments)."""
    assert node.proc is not None
    before = rss_kb(node.proc.pid)
    sockets = [TcpWebSocket(node, f"/app/{APP['key']}?protocol=7", timeout=20) for _ in range(16)]
    outcomes: list[int | str] = []
    try:
        for raw in sockets:
            raw.read_frame()  # connection_established
            try:
                raw.send_frame(TEXT, b"{", fin=False)
                raw.sock.sendall(_fragments(b" ", 60_000))
                raw.send_frame(PING, b"read-all")
            except OSError:
                pass  # closed by the server part-way: that is the bound working
        peak = rss_kb(node.proc.pid) - before
        for raw in sockets:
            try:
                opcode, payload = raw.read_frame(timeout=20)
                while opcode not in (PONG, CLOSE):
                    opcode, payload = raw.read_frame(timeout=20)
                outcomes.append("pong" if opcode == PONG else int.from_bytes(payload[:2], "big"))
            except (EOFError, ConnectionResetError):
                outcomes.append("reset")
        peak = max(peak, rss_kb(node.proc.pid) - before)
    finally:
        for raw in sockets:
            raw.close()
    assert peak < 12 * 1024, f"RSS grew by {peak} KiB for 16 unfinished fragmented messages"
    assert all(o in (1009, "reset") for o in outcomes), outcomes


# -- state a client creates, the server forgets ---------------------------------------------------------


def churn(client: MiniWs, names: list[str], chunk: int = 200) -> None:
    """Subscribe to and leave each name (pipelined), waiting for every ack."""
    client.keep_messages = False
    for start in range(0, len(names), chunk):
        part = names[start:start + chunk]
        frames = b"".join(
            masked_frame(TEXT, json.dumps({"event": e, "data": {"channel": n}}).encode())
            for n in part for e in ("sockudo:subscribe", "sockudo:unsubscribe"))
        client.sock.setblocking(True)
        client.sock.sendall(frames)
        want = start + len(part)
        client.read_until(lambda: client.counts["sockudo_internal:subscription_succeeded"] >= want)  # noqa: B023
    assert client.counts["sockudo:error"] == 0 and client.counts["pusher:error"] == 0, client.counts


def test_unique_channel_names_leave_no_keys_in_redis(server_factory: Callable[..., ServerProcess],
                                                      redis_url: str) -> None:
    """Each subscribe used to create ``…:stream:{channel}`` with a 24-hour TTL."""
    node = server_factory([APP], env={"REDIS_URL": redis_url})
    client = v2_socket(node)
    try:
        names = [f"mem-{uuid.uuid4().hex}" for _ in range(1000)]
        churn(client, names)
        store = redis.Redis.from_url(redis_url)
        leftover = [k for k in store.scan_iter(match=f"sockudo:app:{APP['id']}:*", count=1000)
                    if b":stream:mem-" in k or b":history:mem-" in k]
        assert leftover == [], f"{len(leftover)} keys left by 1,000 subscribe/unsubscribe pairs: {leftover[:3]}"
    finally:
        client.close()


def test_unique_channel_names_leave_nothing_in_memory(node: ServerProcess) -> None:
    """20,000 subscribe/unsubscribe pairs on one socket: each used to leave a sequencer entry
    (~1 KB) on the node and an entry in the socket's attach serials."""
    client = v2_socket(node)
    try:
        churn(client, [f"warm-{i}" for i in range(2000)])  # allocator and metric caches warm
        assert node.proc is not None
        before = rss_kb(node.proc.pid)
        churn(client, [f"mem-{uuid.uuid4().hex}" for _ in range(20_000)])
        grown = rss_kb(node.proc.pid) - before
        assert grown < 6 * 1024, f"RSS grew by {grown} KiB after 20,000 channels were left"
        client.send_json({"event": "pusher:ping", "data": {}})
        client.read_until(lambda: client.counts["sockudo:pong"] + client.counts["pusher:pong"] > 0)
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_an_idle_channel_position_still_recovers_what_was_missed(
        backend: str, server_factory: Callable[..., ServerProcess], request: pytest.FixtureRequest) -> None:
    """The position in the ack of a channel nobody has published to yet (no state is kept for
    it) resumes to the messages published while its only subscriber was away."""
    env = {"REDIS_URL": request.getfixturevalue("redis_url")} if backend == "redis" else {}
    server = server_factory([APP], env=env)
    channel = f"mem-idle-{uuid.uuid4().hex[:8]}"
    phone = v2_socket(server)
    ack = subscribe_v2(phone, channel)
    position = {"stream_id": ack["stream_id"], "serial": ack["serial"]}
    assert position["serial"] == 0 and position["stream_id"]
    phone.sock.close()  # gone: the channel is empty now
    wait_until(lambda: sample(server, "sockudo_connected") == 0, message="the phone to be gone")
    publish_batch(server, channel, 1, 3, 10)

    back = v2_socket(server)
    try:
        subscribe_v2(back, channel)
        back.send_json({"event": "sockudo:resume", "data": {"channel_positions": {channel: position}}})
        back.read_until(lambda: back.events("sockudo:resume_success"))
        replayed = back.events("update", channel)
        assert [json.loads(f["data"])["i"] for f in replayed] == [1, 2, 3]
        assert [f["serial"] for f in replayed] == [1, 2, 3]
        assert data_of(back.events("sockudo:resume_success")[0])["failed"] == []
    finally:
        back.close()
