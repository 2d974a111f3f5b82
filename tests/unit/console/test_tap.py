"""The console's event tap: nothing happens while nobody watches; queues are bounded."""

from __future__ import annotations

import threading

import pytest

from sockudo.console.tap import EventTap, TooManyWatchers, close_code


def make_tap(**kwargs: int) -> EventTap:
    return EventTap("node-a", threading.Event, clock=lambda: 1.5, **kwargs)


def test_detached_until_a_page_watches_and_again_after_it_leaves() -> None:
    tap = make_tap()
    assert not tap.attached
    tap.record("app", "connection", socket_id="1.2")  # nobody watching: nothing kept anywhere
    watcher = tap.watch("app")
    assert tap.attached
    assert watcher.take(timeout=0) == []
    tap.record("app", "connection", socket_id="1.2")
    assert watcher.take(timeout=0) == [{"t": 1500, "node": "node-a", "app": "app", "kind": "connection",
                                        "socket_id": "1.2"}]
    tap.unwatch(watcher)
    assert not tap.attached and tap.watchers == []


def test_a_page_sees_only_its_app() -> None:
    tap = make_tap()
    mine, all_apps = tap.watch("a"), tap.watch(None)
    tap.record("a", "api_message", channel="x")
    tap.record("b", "api_message", channel="y")
    assert [e["channel"] for e in mine.take(timeout=0)] == ["x"]
    assert [e["channel"] for e in all_apps.take(timeout=0)] == ["x", "y"]


def test_a_slow_page_loses_its_oldest_events_and_counts_them() -> None:
    tap = make_tap(watcher_capacity=3)
    watcher = tap.watch("app")
    for i in range(10):
        tap.record("app", "api_message", channel=f"c{i}")
    assert [e["channel"] for e in watcher.take(timeout=0)] == ["c7", "c8", "c9"]
    assert watcher.dropped == 7 and tap.dropped == 7
    tap.unwatch(watcher)
    assert tap.dropped == 7  # still counted once the page is gone


def test_take_waits_for_the_first_event_up_to_the_timeout() -> None:
    tap = make_tap()
    watcher = tap.watch("app")
    threading.Timer(0.05, lambda: tap.record("app", "connection")).start()
    assert [e["kind"] for e in watcher.take(timeout=5)] == ["connection"]
    assert watcher.take(timeout=0.01) == []


def test_the_number_of_pages_is_bounded() -> None:
    tap = make_tap(max_watchers=2)
    tap.watch("a")
    tap.watch("a")
    with pytest.raises(TooManyWatchers):
        tap.watch("a")


def test_events_go_to_other_nodes_only_while_they_watch_and_the_queue_is_bounded() -> None:
    tap = make_tap(outbound_capacity=2)
    tap.record("app", "connection")
    assert not tap.outbound
    tap.set_remote_watching(True)
    assert tap.attached  # no page here, but another node's console wants our events
    for i in range(5):
        tap.record("app", "api_message", channel=f"c{i}")
    assert [e["channel"] for e in tap.outbound] == ["c3", "c4"]
    assert tap.outbound_dropped == 3
    tap.set_remote_watching(False)
    assert not tap.attached and not tap.outbound


def test_message_counts_for_the_chart_cover_remote_events_too() -> None:
    tap = make_tap()
    tap.watch("a")
    tap.record("a", "api_message", channel="x")
    tap.record("a", "client_event", channel="x")
    tap.record("a", "connection")
    tap.deliver({"t": 1, "node": "node-b", "app": "a", "kind": "api_message"})
    assert tap.take_message_counts() == {"a": 3}
    assert tap.take_message_counts() == {}


def test_close_code_from_a_disconnection_reason() -> None:
    assert close_code("closed_4009") == 4009
    assert close_code("client_closed") is None
    assert close_code("closed_x") is None


def test_drops_are_counted_in_prometheus() -> None:
    from prometheus_client import CollectorRegistry

    from sockudo.console.metrics import ConsoleCollector

    tap = make_tap(watcher_capacity=2, outbound_capacity=1)
    registry = CollectorRegistry()
    registry.register(ConsoleCollector(tap))
    watcher = tap.watch("app")
    tap.set_remote_watching(True)
    for _ in range(5):
        tap.record("app", "connection")
    assert registry.get_sample_value("sockudo_console_dropped_events_total", {"stage": "page"}) == 3
    assert registry.get_sample_value("sockudo_console_dropped_events_total", {"stage": "relay"}) == 4
    assert registry.get_sample_value("sockudo_console_streams") == 1
    tap.unwatch(watcher)
    assert registry.get_sample_value("sockudo_console_dropped_events_total", {"stage": "page"}) == 3
    assert registry.get_sample_value("sockudo_console_streams") == 0
