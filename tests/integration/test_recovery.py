"""Connection recovery, channel history and idempotent publish with real servers
(docs/recovery-and-history.md).

Real ``python -m sockudo`` processes on free ports, a real redis-server (flushed before each
test) for the cluster-wide store, raw ``?protocol=2`` sockets (websocket-client), the real
pusher-js client for protocol 7 and the official Python server SDK. "Delivered once" is shown
with a later sentinel event on the same path: frames on one channel arrive in order, so a
duplicate would arrive before the sentinel. Waits have deadlines; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cluster import node_env, start_all, wait_formed
from tests.support.procs import RedisServer, ServerProcess, wait_until
from tests.support.pusherjs import PusherJsDriver
from tests.support.sdk import APP, sdk_for, signed
from tests.support.wsraw import RawClient

RECOVERY = {"enabled": True}
HISTORY = {"enabled": True}
#: Lets one /batch_events call carry 100 events (filling 1,000 history entries in 10 calls).
BIG_BATCH_APP: dict[str, Any] = {**APP, "max_event_batch_size": 100}
GRACE = 3
_channels = itertools.count()


def fresh(name: str) -> str:
    """A channel name no other test in this run uses."""
    return f"{name}-{next(_channels)}-{int(time.time() * 1000) % 100000}"


# -- fixtures ------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("flushed_redis")


@pytest.fixture
def start(server_factory: Callable[..., ServerProcess],
          redis_server: RedisServer) -> Callable[..., list[ServerProcess]]:
    """``start(n, backend="memory"|"redis", apps=[...], **config)``: ``n`` nodes; with Redis they
    share the test Redis and the test waits until they see each other."""

    def run(n: int = 1, *, backend: str = "memory", apps: list[dict[str, Any]] | None = None,
            **top: Any) -> list[ServerProcess]:
        assert backend in ("memory", "redis")
        assert n == 1 or backend == "redis", "several nodes need Redis"
        top.setdefault("shutdown_grace_period", GRACE)
        env = node_env(redis_server.url) if backend == "redis" else {}
        nodes = [server_factory(apps or [APP], start=False, env=env, **top) for _ in range(n)]
        start_all(nodes)
        if backend == "redis":
            wait_formed(nodes)
        return nodes

    return run


# -- helpers: protocol-2 sockets -------------------------------------------------------------


class V2Client:
    """A raw ``?protocol=2`` socket that remembers each channel's last position."""

    def __init__(self, server: ServerProcess, key: str = APP["key"]) -> None:
        self.raw = RawClient(f"{server.ws_url}/app/{key}?protocol=2&client=raw&version=1.0")
        established = self.raw.expect("sockudo:connection_established")
        assert established["message_id"]
        self.socket_id = json.loads(established["data"])["socket_id"]
        self.positions: dict[str, dict[str, Any]] = {}

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        frame = self.raw.recv(timeout)
        if "serial" in frame and frame.get("channel") in self.positions:
            self.positions[frame["channel"]] = {"stream_id": frame["stream_id"], "serial": frame["serial"]}
        return frame

    def until(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every frame up to and including the first that matches."""
        deadline = time.monotonic() + timeout
        frames: list[dict[str, Any]] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching frame within {timeout}s; got {frames[-5:]}")
            try:
                frame = self.recv(remaining)
            except TimeoutError:
                continue
            frames.append(frame)
            if match(frame):
                return frames

    def subscribe(self, channel: str) -> dict[str, Any]:
        self.raw.send_json({"event": "sockudo:subscribe", "data": {"channel": channel}})
        (ack,) = [f for f in self.until(lambda f: f.get("event") == "sockudo_internal:subscription_succeeded"
                                        and f.get("channel") == channel)
                  if f.get("event") == "sockudo_internal:subscription_succeeded"]
        self.positions[channel] = {"stream_id": ack["stream_id"], "serial": ack["serial"]}
        return ack

    def resume(self, positions: dict[str, dict[str, Any]], timeout: float = 10.0) -> list[dict[str, Any]]:
        """Send ``sockudo:resume``; every frame up to ``sockudo:resume_success``."""
        self.raw.send_json({"event": "sockudo:resume", "data": {"channel_positions": positions}})
        return self.until(lambda f: f.get("event") == "sockudo:resume_success", timeout)

    def drop(self) -> None:
        """Vanish without a close frame, as a phone entering a tunnel does."""
        sock = self.raw.ws.sock
        assert sock is not None
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def close(self) -> None:
        self.raw.close()


@pytest.fixture
def v2() -> Iterator[Callable[..., V2Client]]:
    opened: list[V2Client] = []

    def make(server: ServerProcess, key: str = APP["key"]) -> V2Client:
        client = V2Client(server, key)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


def data_of(frame: dict[str, Any]) -> Any:
    data = frame.get("data")
    return json.loads(data) if isinstance(data, str) else data


def updates(frames: list[dict[str, Any]], event: str = "update") -> list[dict[str, Any]]:
    return [f for f in frames if f.get("event") == event]


def publish_each(server: ServerProcess, channel: str, numbers: range, event: str = "update") -> None:
    sdk = sdk_for(server)
    for i in numbers:
        sdk.trigger(channel, event, {"i": i})


def seen_3_then_missed(node: ServerProcess, v2: Any, channel: str, last: int = 33) -> dict[str, Any]:
    """A protocol-2 client sees serials 1-3 of ``channel`` and drops off (abruptly); 4 to
    ``last`` are published while it is away. Returns its last position (serial 3)."""
    phone = v2(node)
    phone.subscribe(channel)
    publish_each(node, channel, range(1, 4))
    phone.until(lambda f: f.get("serial") == 3)
    at3 = dict(phone.positions[channel])
    phone.drop()
    publish_each(node, channel, range(4, last + 1))
    return at3


def numbers_of(frames: list[dict[str, Any]]) -> list[int]:
    return [json.loads(f["data"])["i"] for f in frames]


# -- helpers: signed REST calls and metrics ---------------------------------------------------


def history(server: ServerProcess, channel: str, app: dict[str, Any] = APP, **params: Any) -> requests.Response:
    return signed(server, "GET", f"/apps/{app['id']}/channels/{channel}/history", params=params, app=app)


def history_page(server: ServerProcess, channel: str, app: dict[str, Any] = APP, **params: Any) -> dict[str, Any]:
    resp = history(server, channel, app, **params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def serials_of(page: dict[str, Any]) -> list[int]:
    return [item["serial"] for item in page["items"]]


def publish_events(server: ServerProcess, body: dict[str, Any], key_header: str | None = None,
                   app: dict[str, Any] = APP) -> requests.Response:
    headers = {"X-Idempotency-Key": key_header} if key_header is not None else None
    return signed(server, "POST", f"/apps/{app['id']}/events", body=body, headers=headers, app=app)


def fill(server: ServerProcess, channel: str, count: int, app: dict[str, Any] = BIG_BATCH_APP) -> None:
    """``count`` events on ``channel`` through /batch_events, 100 per call, ``i`` = 1..count."""
    for first in range(1, count + 1, 100):
        batch = [{"name": "update", "channel": channel, "data": json.dumps({"i": i})}
                 for i in range(first, min(first + 100, count + 1))]
        resp = signed(server, "POST", f"/apps/{app['id']}/batch_events", body={"batch": batch}, app=app)
        assert resp.status_code == 200, resp.text


def sample(server: ServerProcess, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(server.metrics_text()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# -- resume -------------------------------------------------------------------------------------


def _resume_after_50(origin: ServerProcess, target: ServerProcess, v2: Callable[..., V2Client], channel: str,
                     sync_target: Callable[[], None] | None = None) -> None:
    """The issue's scenario: drop off, 50 messages, come back (on ``target``) and resume."""
    phone = v2(origin)
    phone.subscribe(channel)
    publish_each(origin, channel, range(1, 4))
    assert numbers_of(updates(phone.until(lambda f: f.get("serial") == 3))) == [1, 2, 3]
    position = dict(phone.positions[channel])
    phone.drop()

    publish_each(origin, channel, range(4, 54))
    if sync_target is not None:
        sync_target()

    back = v2(target)
    back.subscribe(channel)
    frames = back.resume({channel: position})
    replayed = updates(frames)
    assert numbers_of(replayed) == list(range(4, 54))  # exactly those 50, in order, once
    assert [f["serial"] for f in replayed] == list(range(4, 54))
    assert {f["stream_id"] for f in replayed} == {position["stream_id"]}
    assert len({f["message_id"] for f in replayed}) == 50
    assert [f["event"] for f in frames if f not in replayed] == ["sockudo:resume_success"]
    result = data_of(frames[-1])
    assert result["failed"] == []
    (recovered,) = result["recovered"]
    assert (recovered["channel"], recovered["source"], recovered["replayed"]) == (channel, "hot", 50)
    assert recovered["position"] == {"stream_id": position["stream_id"], "serial": 53,
                                     "last_message_id": replayed[-1]["message_id"]}

    # Then live traffic, with nothing replayed twice before it.
    sdk_for(origin).trigger(channel, "update", {"i": 54})
    live = back.until(lambda f: f.get("event") == "update")
    assert [(numbers_of([f]), f["serial"]) for f in live] == [([54], 54)]

    assert sample(target, "sockudo_history_recovery_success_total", source="hot") == 1
    assert sample(target, "sockudo_recovery_replayed_messages_total", source="hot") == 50


def test_resume_after_50_missed_messages_single_node(start, v2) -> None:
    (node,) = start(connection_recovery=RECOVERY)
    _resume_after_50(node, node, v2, fresh("train"))


def test_resume_after_50_missed_messages_on_the_other_node(start, v2) -> None:
    a, b = start(2, backend="redis", connection_recovery=RECOVERY)
    channel = fresh("train")
    # A protocol-7 watcher on B: once it has the 50th message, so has B's replay buffer (a node
    # buffers a message from another node before delivering it). The test resumes right after.
    watcher = RawClient.connect(b, APP["key"])
    watcher.subscribe(channel)

    def b_has_them() -> None:
        frame = watcher.expect(lambda f: f.get("event") == "update" and json.loads(f["data"])["i"] == 53, timeout=10)
        assert "serial" not in frame and "message_id" not in frame  # protocol 7 unchanged

    try:
        _resume_after_50(a, b, v2, channel, b_has_them)
    finally:
        watcher.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_cold_recovery_then_expired_position_then_stream_reset(start, v2, backend: str) -> None:
    (node,) = start(backend=backend, connection_recovery={"enabled": True, "max_buffer_size": 10},
                    history={"enabled": True, "max_messages_per_channel": 40})
    channel = fresh("cold")
    # 30 missed: three times the buffer, inside history (40) -> recovered from history.
    at3 = seen_3_then_missed(node, v2, channel)
    back = v2(node)
    back.subscribe(channel)
    frames = back.resume({channel: at3})
    assert numbers_of(updates(frames)) == list(range(4, 34))
    assert [f["serial"] for f in updates(frames)] == list(range(4, 34))
    (recovered,) = data_of(frames[-1])["recovered"]
    assert (recovered["source"], recovered["replayed"], recovered["position"]["serial"]) == ("cold", 30, 33)
    assert sample(node, "sockudo_history_recovery_success_total", source="cold") == 1
    assert sample(node, "sockudo_recovery_replayed_messages_total", source="cold") == 30
    assert sample(node, "sockudo_recovery_buffer_misses_total") == 1  # the buffer (10) missed, history served

    # 50 more: history keeps 44..83, so serial 3 is beyond it -> a clear failure with the range.
    publish_each(node, channel, range(34, 84))
    back.until(lambda f: f.get("serial") == 83)
    frames = back.resume({channel: at3})
    assert [f["event"] for f in frames] == ["sockudo:resume_failed", "sockudo:resume_success"]
    failed = frames[0]
    assert failed["channel"] == channel
    info = data_of(failed)
    assert info["code"] == "position_expired"
    assert (info["oldest_available_serial"], info["newest_available_serial"]) == (44, 83)
    assert info["expected_stream_id"] == info["current_stream_id"] == at3["stream_id"]
    assert [f["code"] for f in data_of(frames[1])["failed"]] == ["position_expired"]
    assert sample(node, "sockudo_history_recovery_failures_total", code="position_expired") == 1
    assert sample(node, "sockudo_recovery_buffer_misses_total") == 2

    # An operator reset: a new stream; the old position can no longer be trusted.
    path = f"/apps/{APP['id']}/channels/{channel}/history/reset"
    wrong = {"confirm_channel": "other", "confirm_operation": "reset"}
    assert signed(node, "POST", path, body=wrong).status_code == 400
    assert signed(node, "POST", path, body={"confirm_channel": channel}).status_code == 400
    resp = signed(node, "POST", path, body={"confirm_channel": channel, "confirm_operation": "reset", "reason": "test"})
    assert resp.status_code == 200, resp.text
    assert history_page(node, channel)["items"] == []
    frames = back.resume({channel: back.positions[channel]})
    info = data_of(frames[0])
    assert (frames[0]["event"], info["code"]) == ("sockudo:resume_failed", "stream_reset")
    assert info["current_stream_id"] != at3["stream_id"]
    assert sample(node, "sockudo_history_recovery_failures_total", code="stream_reset") == 1
    assert sample(node, "sockudo_recovery_buffer_misses_total") == 2  # a reset is not a buffer miss
    # Publishing goes on in the new stream, from serial 1.
    sdk_for(node).trigger(channel, "update", {"i": 1})
    (fresh_frame,) = updates(back.until(lambda f: f.get("event") == "update"))
    assert fresh_frame["serial"] == 1 and fresh_frame["stream_id"] == info["current_stream_id"]


def test_gap_beyond_the_buffer_without_history_is_a_buffer_miss_and_shows_pressure(start, v2) -> None:
    """Recovery on, history off: a resume the buffer cannot serve fails as ``position_expired``
    and is counted as a buffer miss; the full buffer shows up as pressure."""
    (node,) = start(connection_recovery={"enabled": True, "max_buffer_size": 10})
    channel = fresh("pressure")
    at3 = seen_3_then_missed(node, v2, channel, last=30)  # 30 published into a buffer of 10: 20 dropped
    back = v2(node)
    back.subscribe(channel)
    frames = back.resume({channel: at3})
    assert [f["event"] for f in frames] == ["sockudo:resume_failed", "sockudo:resume_success"]
    info = data_of(frames[0])
    assert info["code"] == "position_expired"
    assert (info["oldest_available_serial"], info["newest_available_serial"]) == (21, 30)
    assert sample(node, "sockudo_recovery_buffer_misses_total", app_id=APP["id"]) == 1
    assert sample(node, "sockudo_history_recovery_failures_total", code="position_expired") == 1

    # Inside the buffer: served by it, no miss.
    frames = back.resume({channel: {**at3, "serial": 25}})
    assert [f["serial"] for f in updates(frames)] == list(range(26, 31))
    assert sample(node, "sockudo_recovery_buffer_misses_total") == 1

    assert sample(node, "sockudo_replay_buffer_full_evictions_total", app_id=APP["id"]) == 20
    wait_until(lambda: sample(node, "sockudo_replay_buffer_max_fill_ratio", app_id=APP["id"]) == 1.0,
               timeout=15, message="the fullest buffer's fill ratio after a housekeeping sweep")


@pytest.mark.parametrize("lost", ["stream", "history_only"])
def test_channel_stream_lost_from_redis(start, v2, redis_server: RedisServer, lost: str) -> None:
    """The channel's keys vanish from Redis underneath the server (eviction, a FLUSH, an
    operator's DEL). ``…:stream:{c}`` holds the stream id and serial counter, ``…:history:{c}``
    the history (a Redis Stream)."""
    (node,) = start(backend="redis", connection_recovery={"enabled": True, "max_buffer_size": 10},
                    history={"enabled": True})
    channel = fresh("lost")
    at3 = seen_3_then_missed(node, v2, channel)

    store = redis.Redis(port=redis_server.port)
    keys = [f"sockudo:app:{APP['id']}:history:{channel}"]
    if lost == "stream":
        keys.append(f"sockudo:app:{APP['id']}:stream:{channel}")
    assert store.delete(*keys) == len(keys)
    store.close()

    back = v2(node)
    ack = back.subscribe(channel)
    frames = back.resume({channel: at3})
    assert [f["event"] for f in frames] == ["sockudo:resume_failed", "sockudo:resume_success"]
    info = data_of(frames[0])
    assert info["expected_stream_id"] == at3["stream_id"]
    if lost == "stream":
        # Continuity is gone: the channel has no stream until its next message (the
        # re-subscribe is given the empty position), and the old position fails as
        # stream_reset. The old stream's frames still in this node's buffer are no
        # "available range" of the new one.
        assert info["code"] == "stream_reset"
        assert info["current_stream_id"] == ack["stream_id"] != at3["stream_id"]
        assert (info["oldest_available_serial"], info["newest_available_serial"]) == (None, 0)
        assert sample(node, "sockudo_history_recovery_failures_total", code="stream_reset") == 1
        # Even a position the old buffer could still serve: the stream it belongs to is gone.
        frames = back.resume({channel: {**at3, "serial": 30}})
        assert data_of(frames[0])["code"] == "stream_reset" and updates(frames) == []
        sdk_for(node).trigger(channel, "update", {"i": 1})
        (first,) = updates(back.until(lambda f: f.get("event") == "update"))
        assert first["serial"] == 1 and first["stream_id"] not in (ack["stream_id"], at3["stream_id"])
        assert serials_of(history_page(node, channel)) == [1]
        # The empty position from the ack resumes into the new stream.
        frames = back.resume({channel: {"stream_id": ack["stream_id"], "serial": 0}})
        assert [(f["stream_id"], f["serial"]) for f in updates(frames)] == [(first["stream_id"], 1)]
    else:
        # Only history went: the stream id and serials are intact, so this is no reset; the
        # missed messages are simply no longer kept (the cold tier finds nothing).
        assert info["code"] == "position_expired"
        assert info["current_stream_id"] == at3["stream_id"]
        assert info["newest_available_serial"] == 33
        assert sample(node, "sockudo_recovery_buffer_misses_total") == 1
        # A gap the buffer still holds is recovered: live continuity was never broken.
        frames = back.resume({channel: {**at3, "serial": 30}})
        assert [f["serial"] for f in updates(frames)] == [31, 32, 33]
        assert history_page(node, channel)["items"] == []


# -- protocol 7 is unchanged ---------------------------------------------------------------------


def test_pusherjs_on_protocol_7_sees_unchanged_frames_next_to_protocol_2(start, v2, pusherjs: PusherJsDriver) -> None:
    (node,) = start(connection_recovery=RECOVERY, history=HISTORY)
    channel = fresh("mixed")
    js = pusherjs.connect("p7", key=APP["key"], port=node.port, secret=APP["secret"], app_id=APP["id"])
    js.wait_connected()
    js.subscribe(channel)
    js.wait_subscribed(channel)
    modern = v2(node)
    modern.subscribe(channel)

    sdk_for(node).trigger(channel, "update", {"i": 1})
    (v2_frame,) = updates(modern.until(lambda f: f.get("event") == "update"))
    assert v2_frame["serial"] == 1 and v2_frame["message_id"] and v2_frame["stream_id"]
    js.wait_event(channel, "update")

    raw_in = [json.loads(e["data"]) for e in js.events("raw") if e.get("dir") == "in"]
    (update,) = [f for f in raw_in if f.get("event") == "update"]
    assert update == {"event": "update", "channel": channel, "data": v2_frame["data"]}
    for frame in raw_in:
        assert not {"serial", "stream_id", "message_id"} & set(frame), frame
        assert not frame["event"].startswith(("sockudo:", "sockudo_internal:")), frame
    (ack,) = [f for f in raw_in if f["event"] == "pusher_internal:subscription_succeeded"]
    assert ack == {"event": "pusher_internal:subscription_succeeded", "channel": channel, "data": "{}"}
    assert [e["data"] for e in js.events("event") if e.get("event") == "update"] == [{"i": 1}]


# -- history ------------------------------------------------------------------------------------


def _tampered(cursor: str) -> str:
    body, mac = cursor.split(".")
    swap = "A" if body[5] != "A" else "B"
    return body[:5] + swap + body[6:] + "." + mac


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_history_paging_through_1000_messages_both_ways(start, backend: str) -> None:
    (node,) = start(backend=backend, apps=[BIG_BATCH_APP],
                    history={"enabled": True, "max_page_size": 100, "max_messages_per_channel": 1000})
    channel = fresh("ledger")
    fill(node, channel, 1000)
    assert sample(node, "sockudo_history_writes_total") == 1000

    for direction, expected in (("newest_first", list(range(1000, 0, -1))), ("oldest_first", list(range(1, 1001)))):
        seen: list[int] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"direction": direction, "limit": 500}  # capped at max_page_size
            if cursor:
                params["cursor"] = cursor
            page = history_page(node, channel, **params)
            pages += 1
            assert page["limit"] == 100 and len(page["items"]) == 100
            seen.extend(json.loads(item["message"]["data"])["i"] for item in page["items"])
            assert serials_of(page) == seen[-100:]
            if not page["has_more"]:
                assert page["next_cursor"] is None
                break
            cursor = page["next_cursor"]
        assert seen == expected  # each exactly once, in order
        assert pages == 10
    assert sample(node, "sockudo_history_reads_total") == 20

    first = history_page(node, channel, limit=100)
    assert first["continuity"]["retained_messages"] == 1000 and first["continuity"]["complete"] is True
    bad = history(node, channel, limit=100, cursor=_tampered(first["next_cursor"]))
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_cursor"
    other_query = history(node, channel, limit=100, direction="oldest_first", cursor=first["next_cursor"])
    assert other_query.status_code == 400
    assert sample(node, "sockudo_history_cursor_errors_total") == 2
    assert history(node, channel, limit=0).status_code == 400


def test_history_disabled_is_422(start) -> None:
    (node,) = start()
    assert history(node, fresh("nothing")).status_code == 422


COUNT_APP: dict[str, Any] = {**APP, "history": {"max_messages_per_channel": 20}}
AGE_APP: dict[str, Any] = {"id": "101", "key": "age-key", "secret": "age-secret",
                           "history": {"retention_window_seconds": 2}}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_retention_by_count_and_by_age_with_per_app_overrides(start, backend: str, redis_server: RedisServer) -> None:
    (node,) = start(backend=backend, apps=[COUNT_APP, AGE_APP], history={"enabled": True})
    store = redis.Redis(port=redis_server.port)

    # By count (this app keeps 20).
    kept = fresh("kept")
    publish_each(node, kept, range(1, 51))
    page = history_page(node, kept, direction="oldest_first")
    assert serials_of(page) == list(range(31, 51))
    assert page["continuity"]["oldest_available_serial"] == 31
    assert page["continuity"]["truncated_by_retention"] is True
    if backend == "redis":
        assert store.xlen(f"sockudo:app:{APP['id']}:history:{kept}") == 20  # trimmed, not just hidden
    wait_until(lambda: sample(node, "sockudo_history_evictions_total") >= 30, timeout=15,
               message="evictions by count in the metrics")

    # By age (this app keeps 2 s).
    before = sample(node, "sockudo_history_evictions_total")
    aged = fresh("aged")
    sdk = sdk_for(node, AGE_APP)
    for i in range(5):
        sdk.trigger(aged, "update", {"i": i})
    assert len(history_page(node, aged, app=AGE_APP)["items"]) == 5
    wait_until(lambda: history_page(node, aged, app=AGE_APP)["items"] == [], timeout=15,
               message="aged-out history to disappear")
    if backend == "redis":
        assert store.xlen(f"sockudo:app:{AGE_APP['id']}:history:{aged}") == 0
    wait_until(lambda: sample(node, "sockudo_history_evictions_total") >= before + 5, timeout=15,
               message="evictions by age in the metrics")
    store.close()


def test_websocket_channel_history_until_attach(start, v2) -> None:
    (node,) = start(backend="redis", connection_recovery=RECOVERY, history=HISTORY)
    channel = fresh("merge")
    publish_each(node, channel, range(1, 6))
    c = v2(node)
    ack = c.subscribe(channel)
    assert (ack["serial"], data_of(ack)) == (5, {"attach_serial": 5})
    publish_each(node, channel, range(6, 9))
    live = updates(c.until(lambda f: f.get("serial") == 8))
    assert [f["serial"] for f in live] == [6, 7, 8]

    backfill: list[int] = []
    request: dict[str, Any] = {"channel": channel, "until_attach": True, "limit": 2}
    while True:
        c.raw.send_json({"event": "sockudo:channel_history", "data": request})
        (reply,) = c.until(lambda f: f.get("event") == "sockudo:channel_history")
        page = data_of(reply)
        assert page["bounds"]["attach_serial"] == 5 and page["bounds"]["until_attach"] is True
        backfill.extend(serials_of(page))
        if not page["has_more"]:
            break
        request["cursor"] = page["next_cursor"]
    assert backfill == [5, 4, 3, 2, 1]  # only up to the attach serial
    assert sorted(backfill + [f["serial"] for f in live]) == list(range(1, 9))  # a gap-free merge


def test_websocket_channel_history_limit_up_to_the_page_size(start, v2) -> None:
    """The WebSocket request's ``limit`` defaults to 100 and is capped at ``max_page_size`` (1,000
    here), as on REST (docs/security.md: a page is the most one request can queue)."""
    (node,) = start(backend="redis", apps=[BIG_BATCH_APP], connection_recovery=RECOVERY,
                    history={"enabled": True, "max_messages_per_channel": 2000, "max_page_size": 1000})
    channel = fresh("wide")
    fill(node, channel, 1200)
    assert history_page(node, channel, limit=5000)["limit"] == 1000
    c = v2(node)
    c.subscribe(channel)

    def ws_page(request: dict[str, Any]) -> dict[str, Any]:
        c.raw.send_json({"event": "sockudo:channel_history", "data": {"channel": channel, **request}})
        (reply,) = [f for f in c.until(lambda f: f.get("event") == "sockudo:channel_history", timeout=15)
                    if f.get("event") == "sockudo:channel_history"]
        return data_of(reply)

    page = ws_page({})
    assert page["limit"] == 100 and serials_of(page) == list(range(1200, 1100, -1))
    page = ws_page({"limit": 1000, "direction": "oldest_first"})
    assert page["limit"] == 1000 and serials_of(page) == list(range(1, 1001)) and page["has_more"]
    rest = ws_page({"limit": 1000, "direction": "oldest_first", "cursor": page["next_cursor"]})
    assert serials_of(rest) == list(range(1001, 1201)) and rest["has_more"] is False
    page = ws_page({"limit": 5000})
    assert page["limit"] == 1000 and len(page["items"]) == 1000
    assert ws_page({"limit": 0})["status"] == 400


# -- idempotent publish ---------------------------------------------------------------------------


def _delivered(watcher: RawClient, channel: str, sentinel_node: ServerProcess) -> list[str]:
    """Data of every ``paid`` frame up to a sentinel published after the requests."""
    sdk_for(sentinel_node).trigger(channel, "sentinel", {})
    frames: list[dict[str, Any]] = []
    while True:
        frame = watcher.recv(10)
        if frame.get("event") == "sentinel":
            return [f["data"] for f in frames if f.get("event") == "paid"]
        frames.append(frame)


def test_same_publish_three_times_with_one_key_is_delivered_once(start) -> None:
    (node,) = start()
    channel = fresh("pay")
    watcher = RawClient.connect(node, APP["key"])
    watcher.subscribe(channel)
    try:
        body = {"name": "paid", "channels": [channel], "data": "order-1", "idempotency_key": "order-1",
                "info": "subscription_count"}
        answers = [publish_events(node, body) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert [a.json() for a in answers] == [{"channels": {channel: {"subscription_count": 1}}}] * 3

        header_body = {"name": "paid", "channels": [channel], "data": "order-2"}
        answers = [publish_events(node, header_body, key_header="order-2") for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert len({a.text for a in answers}) == 1

        assert _delivered(watcher, channel, node) == ["order-1", "order-2"]
        assert sample(node, "sockudo_idempotency_duplicates_total") == 4

        for too_long in (publish_events(node, {**header_body, "idempotency_key": "k" * 129}),
                         publish_events(node, header_body, key_header="k" * 129)):
            assert too_long.status_code == 400 and too_long.json()["status"] == 400
        assert publish_events(node, {**header_body, "idempotency_key": "k" * 128}).status_code == 200
    finally:
        watcher.close()


def test_batch_item_keys_are_deduplicated(start) -> None:
    (node,) = start()
    channel = fresh("batch")
    watcher = RawClient.connect(node, APP["key"])
    watcher.subscribe(channel)
    try:
        path = f"/apps/{APP['id']}/batch_events"
        def item(key: str, data: str) -> dict[str, Any]:
            return {"name": "paid", "channel": channel, "data": data, "idempotency_key": key,
                    "info": "subscription_count"}

        first = signed(node, "POST", path, body={"batch": [item("a", "A"), item("b", "B")]})
        again = signed(node, "POST", path, body={"batch": [item("a", "A"), item("c", "C")]})
        assert first.json() == {"batch": [{"subscription_count": 1}, {"subscription_count": 1}]}
        assert again.json() == {"batch": [{}, {"subscription_count": 1}]}
        whole = {"batch": [{"name": "paid", "channel": channel, "data": "W"}]}
        for _ in range(2):
            assert signed(node, "POST", path, body=whole, headers={"X-Idempotency-Key": "whole"}).status_code == 200
        assert _delivered(watcher, channel, node) == ["A", "B", "C", "W"]
    finally:
        watcher.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_concurrent_duplicates_from_two_threads_are_delivered_once(start, backend: str) -> None:
    (node,) = start(backend=backend)
    channel = fresh("race")
    watcher = RawClient.connect(node, APP["key"])
    watcher.subscribe(channel)
    try:
        for round_ in range(5):
            body = {"name": "paid", "channels": [channel], "data": f"r{round_}", "idempotency_key": f"race-{round_}"}
            barrier = threading.Barrier(2)
            answers: list[requests.Response] = []

            def send(barrier: threading.Barrier, answers: list[requests.Response], body: dict[str, Any]) -> None:
                barrier.wait()
                answers.append(publish_events(node, body))

            threads = [threading.Thread(target=send, args=(barrier, answers, body)) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            assert len(answers) == 2
            for answer in answers:
                # The repeat either gets the first answer or, still in flight, 503 + Retry-After.
                assert (answer.status_code, answer.json()) == (200, {}) or (
                    answer.status_code == 503 and answer.headers["Retry-After"] == "1"), answer.text
            assert any(a.status_code == 200 for a in answers)
        assert _delivered(watcher, channel, node) == [f"r{i}" for i in range(5)]
    finally:
        watcher.close()


def test_duplicate_sent_to_the_other_node_is_suppressed(start) -> None:
    a, b = start(2, backend="redis")
    channel = fresh("two")
    watcher = RawClient.connect(a, APP["key"])
    watcher.subscribe(channel)
    try:
        body = {"name": "paid", "channels": [channel], "data": "once", "idempotency_key": "cross-1",
                "info": "subscription_count"}
        first = publish_events(a, body)
        second = publish_events(b, body)
        third = publish_events(b, {k: v for k, v in body.items() if k != "idempotency_key"}, key_header="cross-1")
        assert first.status_code == second.status_code == third.status_code == 200
        assert first.json() == second.json() == third.json() == {"channels": {channel: {"subscription_count": 1}}}
        # The sentinel goes through B too: a duplicate from B would reach A's watcher before it.
        assert _delivered(watcher, channel, b) == ["once"]
        assert sample(b, "sockudo_idempotency_duplicates_total") == 2
    finally:
        watcher.close()
