"""Serials, the in-memory history store, signed cursors and history reads.

``read_history`` is what both REST ``GET …/history`` and WebSocket ``sockudo:channel_history``
call; here it is called directly. A fake clock drives retention by age.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sockudo.config import AppConfig, HistoryConfig, RecoveryConfig
from sockudo.core.errors import ApiError
from sockudo.history.api import read_history
from sockudo.history.store import (
    MemorySequencer,
    RedisSequencer,
    SequencerUnavailable,
    decode_cursor,
    encode_cursor,
)
from sockudo.metrics.registry import Metrics
from tests.support.fakes import FakeClock, make_app
from tests.support.procs import unreachable_redis
from tests.support.rediscluster import STORE_BACKENDS, store_client

REST = object()  # Store.read's default: a REST read (no socket)
CH = "news"


def history_app(*, keep: int = 1000, retention: int = 86400, page: int = 100, enabled: bool = True,
                **kw: Any) -> AppConfig:
    return make_app(history=HistoryConfig(enabled=enabled, max_messages_per_channel=keep,
                                          retention_window_seconds=retention, max_page_size=page), **kw)


class Store:
    """A MemorySequencer with its clock (or the given sequencer), metrics and one app."""

    def __init__(self, app: AppConfig | None = None, seq: MemorySequencer | RedisSequencer | None = None) -> None:
        self.app = app or history_app()
        self.clock = FakeClock()
        self.seq = seq or MemorySequencer(self.clock)
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)

    def add(self, n: int, channel: str = CH, app: AppConfig | None = None) -> list[int]:
        return [self.seq.next(app or self.app, channel, f"m{i}", "ev", json.dumps({"i": i}), None)[1]
                for i in range(n)]

    def read(self, channel: str = CH, attach_serial: Any = REST, **params: Any) -> dict[str, Any]:
        """A REST read, or a WebSocket one when ``attach_serial`` is given (an int or None)."""
        if attach_serial is REST:
            return read_history(self.seq, self.metrics, self.app, channel, params)
        return read_history(self.seq, self.metrics, self.app, channel, params, attach_serial=attach_serial,
                            websocket=True)

    def status(self, **params: Any) -> int:
        with pytest.raises(ApiError) as info:
            self.read(**params)
        return info.value.status

    def sample(self, name: str) -> float:
        return self.registry.get_sample_value(name, {"app_id": self.app.id, "port": "9601"}) or 0.0


@pytest.fixture(params=["memory", *STORE_BACKENDS])
def store(request: pytest.FixtureRequest) -> Store:
    """In memory, then in a real Redis and a real Redis Cluster (tests that move the clock make
    their own memory ``Store``)."""
    if request.param == "memory":
        return Store()
    return Store(seq=RedisSequencer(store_client(request, request.param)))


def page_serials(page: dict[str, Any]) -> list[int]:
    return [item["serial"] for item in page["items"]]


# -- MemorySequencer ------------------------------------------------------------------------------


def test_serials_increase_per_app_and_channel(store: Store) -> None:
    other_app = history_app(id="app-2", key="key-2")
    assert store.add(3) == [1, 2, 3]
    assert store.add(2, channel="other") == [1, 2]
    assert store.add(2, app=other_app) == [1, 2]
    assert store.add(1) == [4]
    stream_id, serial = store.seq.position(store.app.id, CH)  # type: ignore[misc]
    assert serial == 4 and stream_id == store.seq.position(store.app.id, CH)[0]  # type: ignore[index]
    assert store.seq.position("app-2", CH)[0] != stream_id  # type: ignore[index]


def test_serials_without_history_store_nothing() -> None:
    app = make_app(connection_recovery=RecoveryConfig(enabled=True))
    s = Store(app)
    assert s.add(3) == [1, 2, 3]
    assert s.seq.state(app, CH).retained == 0


def test_ensure_creates_an_idle_position_and_reset_starts_a_new_stream(store: Store) -> None:
    assert store.seq.position(store.app.id, CH) is None
    stream_id, serial = store.seq.ensure(store.app, CH)
    assert serial == 0
    store.add(2)
    store.seq.reset(store.app, CH)
    assert store.seq.position(store.app.id, CH) is None
    store.add(1)
    new_stream, serial = store.seq.position(store.app.id, CH)  # type: ignore[misc]
    assert new_stream != stream_id and serial == 1


def test_trim_by_count_keeps_the_newest() -> None:
    s = Store(history_app(keep=5))
    s.add(8)
    state = s.seq.state(s.app, CH)
    assert (state.oldest_serial, state.newest_serial, state.retained) == (4, 8, 5)
    assert s.seq.purged == 3
    assert page_serials(s.read(direction="oldest_first")) == [4, 5, 6, 7, 8]


def test_trim_by_age_with_the_clock() -> None:
    s = Store(history_app(retention=10))
    s.add(3)
    s.clock.advance(6)
    s.add(2)
    bytes_before = s.seq.state(s.app, CH).retained_bytes
    s.clock.advance(5)  # the first three are now 11 s old
    assert s.seq.sweep([s.app]) == 3
    state = s.seq.state(s.app, CH)
    assert (state.oldest_serial, state.retained) == (4, 2)
    assert 0 < state.retained_bytes < bytes_before
    s.clock.advance(10)
    assert s.read()["items"] == []
    assert s.seq.purged == 5


def test_sweep_leaves_apps_without_history_alone() -> None:
    s = Store(history_app(retention=10))
    s.add(2)
    s.clock.advance(60)
    assert s.seq.sweep([]) == 0
    assert s.seq.sweep([history_app(enabled=False)]) == 0


# -- cursors --------------------------------------------------------------------------------------


def _cursor(app: AppConfig, **payload: Any) -> str:
    base = {"version": 1, "app_id": app.id, "channel": CH, "stream_id": "s", "serial": 5,
            "direction": "newest_first", "bounds": {}}
    base.update(payload)
    return encode_cursor(app, base)


def test_cursor_round_trip(store: Store) -> None:
    cursor = _cursor(store.app)
    assert decode_cursor(store.app, cursor)["serial"] == 5
    assert "=" not in cursor


def _tamper_body(app: AppConfig, cursor: str) -> str:
    body, mac = cursor.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["serial"] = 1
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return forged + "." + mac


@pytest.mark.parametrize("mangle", [
    lambda app, c: _tamper_body(app, c),
    lambda app, c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"),
    lambda app, c: c.replace(".", ""),
    lambda app, c: c + ".x",
    lambda app, c: "x" * 20000,
    lambda app, c: _cursor(make_app(secret="another-secret")),
    lambda app, c: _cursor(app, version=2),
])
def test_tampered_or_malformed_cursor_is_400(store: Store, mangle: Any) -> None:
    with pytest.raises(ApiError) as info:
        decode_cursor(store.app, mangle(store.app, _cursor(store.app)))
    assert info.value.status == 400 and info.value.slug == "invalid_cursor"


def test_tampered_cursor_in_a_read_is_400_and_counted(store: Store) -> None:
    store.add(30)
    first = store.read(limit=10)
    assert store.status(limit=10, cursor=_tamper_body(store.app, first["next_cursor"])) == 400
    assert store.sample("sockudo_history_cursor_errors_total") == 1


@pytest.mark.parametrize("changed", [
    {"direction": "oldest_first"},
    {"start_serial": 2},
    {"end_serial": 20},
    {"start_time_ms": 1},
])
def test_cursor_reused_with_another_query_is_400(store: Store, changed: dict[str, Any]) -> None:
    store.add(30)
    cursor = store.read(limit=10)["next_cursor"]
    assert store.status(limit=10, cursor=cursor, **changed) == 400
    assert store.sample("sockudo_history_cursor_errors_total") == 1


def test_cursor_for_another_channel_is_400(store: Store) -> None:
    store.add(30)
    store.add(30, channel="elsewhere")
    cursor = store.read(limit=10)["next_cursor"]
    with pytest.raises(ApiError) as info:
        store.read(channel="elsewhere", limit=10, cursor=cursor)
    assert info.value.status == 400


def test_cursor_from_before_a_reset_is_400(store: Store) -> None:
    store.add(30)
    cursor = store.read(limit=10)["next_cursor"]
    store.seq.reset(store.app, CH)
    store.add(30)
    assert store.status(limit=10, cursor=cursor) == 400


# -- reading --------------------------------------------------------------------------------------


def _all_pages(store: Store, **params: Any) -> tuple[list[int], int]:
    seen: list[int] = []
    pages = 0
    cursor = None
    while True:
        page = store.read(cursor=cursor, **params)
        pages += 1
        seen.extend(page_serials(page))
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return seen, pages
        cursor = page["next_cursor"]
        assert cursor


@pytest.mark.parametrize("direction,expected", [
    ("newest_first", list(range(1000, 0, -1))),
    ("backwards", list(range(1000, 0, -1))),
    ("oldest_first", list(range(1, 1001))),
    ("forwards", list(range(1, 1001))),
])
def test_paging_returns_every_message_exactly_once(direction: str, expected: list[int]) -> None:
    s = Store(history_app(keep=2000))
    s.add(1000)
    seen, pages = _all_pages(s, direction=direction, limit=100)
    assert seen == expected
    assert pages == 10


def test_paging_inside_serial_bounds(store: Store) -> None:
    store.add(50)
    seen, _ = _all_pages(store, direction="oldest_first", limit=7, start_serial=10, end_serial=30)
    assert seen == list(range(10, 31))
    seen, _ = _all_pages(store, limit=7, start_serial=10, end_serial=30)
    assert seen == list(range(30, 9, -1))


def test_time_bounds() -> None:
    store = Store()
    store.add(3)
    t1 = int(store.clock.advance(10) * 1000)
    store.add(3)
    store.clock.advance(10)
    store.add(3)
    page = store.read(direction="oldest_first", start_time_ms=t1, end_time_ms=t1 + 1)
    assert page_serials(page) == [4, 5, 6]
    assert page_serials(store.read(direction="oldest_first", start=t1, end=t1 + 1)) == [4, 5, 6]


def test_item_shape(store: Store) -> None:
    store.add(1)
    page = store.read()
    (item,) = page["items"]
    stream_id = store.seq.position(store.app.id, CH)[0]  # type: ignore[index]
    assert item["stream_id"] == stream_id and item["serial"] == 1 and item["message_id"] == "m0"
    assert item["event_name"] == "ev" and item["operation_kind"] == "create"
    assert item["payload_size_bytes"] == len('{"i": 0}')  # the payload as published, not re-encoded
    assert item["message"] == {"event": "ev", "channel": CH, "data": '{"i": 0}', "message_id": "m0",
                               "stream_id": stream_id, "serial": 1}
    assert page["direction"] == "newest_first" and page["limit"] == 100 and page["has_more"] is False
    continuity = page["continuity"]
    assert continuity["oldest_available_serial"] == continuity["newest_available_serial"] == 1
    assert continuity["retained_messages"] == 1 and continuity["complete"] is True
    assert store.sample("sockudo_history_reads_total") == 1


def test_continuity_reports_truncation_by_retention() -> None:
    s = Store(history_app(keep=5, retention=10))
    s.add(8)
    continuity = s.read()["continuity"]
    assert continuity["truncated_by_retention"] is True and continuity["complete"] is False
    assert continuity["oldest_available_serial"] == 4
    s.clock.advance(11)  # everything aged out: still not complete
    continuity = s.read()["continuity"]
    assert continuity["retained_messages"] == 0
    assert continuity["truncated_by_retention"] is True and continuity["complete"] is False


def test_limit_is_capped_at_the_page_size() -> None:
    s = Store(history_app(page=25))
    s.add(60)
    page = s.read(limit=500)
    assert page["limit"] == 25 and len(page["items"]) == 25 and page["has_more"]
    assert len(s.read()["items"]) == 25  # no limit: the page size


def test_websocket_pages_are_capped_at_the_page_size_like_rest() -> None:
    """``sockudo:channel_history`` takes ``limit`` (default 100), capped at ``max_page_size`` as
    on REST: a ~100-byte request must not turn into a frame of 1,000 messages."""
    s = Store(history_app(page=25, keep=5000))
    s.add(2500)
    assert s.read(limit=1000)["limit"] == 25
    page = s.read(attach_serial=None)
    assert page["limit"] == 25 and page_serials(page) == list(range(2500, 2475, -1))
    page = s.read(attach_serial=2500, limit=1000, direction="oldest_first")
    assert page["limit"] == 25 and page_serials(page) == list(range(1, 26)) and page["has_more"]
    following = s.read(attach_serial=2500, limit=1000, direction="oldest_first", cursor=page["next_cursor"])
    assert page_serials(following) == list(range(26, 51))
    assert s.status(attach_serial=None, limit=0) == 400
    wide = Store(history_app(page=500, keep=5000))
    wide.add(600)
    assert wide.read(attach_serial=None)["limit"] == 100  # the WebSocket default, under a larger page size
    assert wide.read(attach_serial=None, limit=1000)["limit"] == 500


@pytest.mark.parametrize("params", [
    {"limit": 0}, {"limit": -1}, {"limit": "ten"}, {"direction": "sideways"}, {"start_serial": "x"},
    {"end_serial": -4},
])
def test_bad_parameters_are_400(store: Store, params: dict[str, Any]) -> None:
    store.add(3)
    assert store.status(**params) == 400


def test_bad_channel_name_is_400(store: Store) -> None:
    with pytest.raises(ApiError) as info:
        store.read(channel="bad channel!")
    assert info.value.status == 400


def test_history_disabled_is_422() -> None:
    s = Store(history_app(enabled=False))
    assert s.status() == 422


def test_store_down_is_503() -> None:
    class Down(MemorySequencer):
        def state(self, *a: Any) -> Any:
            raise SequencerUnavailable("down")

    s = Store()
    s.seq = Down(s.clock)
    with pytest.raises(ApiError) as info:
        s.read()
    assert info.value.status == 503 and info.value.headers.get("Retry-After") == "1"


def test_until_attach_caps_the_page_at_the_attach_serial(store: Store) -> None:
    store.add(10)
    page = store.read(attach_serial=6, until_attach=True, direction="oldest_first")
    assert page_serials(page) == [1, 2, 3, 4, 5, 6]
    assert page["bounds"]["until_attach"] is True and page["bounds"]["attach_serial"] == 6
    page = store.read(attach_serial=6, until_attach=True, end_serial=3)
    assert page_serials(page) == [3, 2, 1]  # an earlier end_serial still applies


def test_until_attach_pages_with_its_cursor(store: Store) -> None:
    store.add(10)
    seen, pages = _all_pages(store, attach_serial=6, until_attach=True, limit=4)
    assert seen == [6, 5, 4, 3, 2, 1] and pages == 2


def test_until_attach_without_a_subscription_is_400(store: Store) -> None:
    store.add(3)
    assert store.status(until_attach=True) == 400  # REST
    assert store.status(attach_serial=None, until_attach=True) == 400  # a socket with no attach serial


def test_redis_away_is_sequencer_unavailable() -> None:
    store = RedisSequencer(unreachable_redis())
    app = make_app(history=HistoryConfig(enabled=True))
    with pytest.raises(SequencerUnavailable):
        store.position(app.id, "ch")
    with pytest.raises(SequencerUnavailable):
        store.next(app, "ch", "m1", "ev", "x", None)
