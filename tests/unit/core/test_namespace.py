"""Per-app bookkeeping: subscribers, presence counted per user, the user index, watchers."""

from __future__ import annotations

import pytest

from sockudo.core.connection import Connection
from sockudo.core.namespace import Namespace
from tests.support.fakes import RecordingTransport, make_app


@pytest.fixture
def ns() -> Namespace:
    return Namespace()


def _conn(socket_id: str) -> Connection:
    return Connection(socket_id, make_app(), RecordingTransport(), 7, now=0.0)


def test_subscribe_counts_sockets_and_forgets_empty_channels(ns: Namespace) -> None:
    a, b = _conn("1.1"), _conn("2.2")
    assert ns.subscribe("room", a) == 1
    assert ns.subscribe("room", b) == 2
    assert ns.subscribe("room", a) == 2  # the same socket twice is one subscriber
    assert ns.subscriber_count("room") == 2
    assert ns.unsubscribe("room", "1.1") == 1
    assert ns.unsubscribe("room", "1.1") == 1  # unknown socket: no change
    assert ns.unsubscribe("room", "2.2") == 0
    assert "room" not in ns.channels
    assert ns.subscriber_count("room") == 0
    assert ns.unsubscribe("never", "1.1") == 0


def test_same_user_on_two_sockets_joins_once_and_leaves_once(ns: Namespace) -> None:
    assert ns.presence_join("presence-r", "1.1", "u1", {"name": "A"}) is True
    assert ns.presence_join("presence-r", "2.2", "u1", {"name": "A"}) is False
    assert ns.presence_leave("presence-r", "1.1", "u1") is False
    assert ns.presence_members("presence-r") == {"u1": {"name": "A"}}
    assert ns.presence_leave("presence-r", "2.2", "u1") is True
    assert ns.presence_members("presence-r") == {}
    assert "presence-r" not in ns.presence


def test_members_are_unique_by_user_id(ns: Namespace) -> None:
    ns.presence_join("presence-r", "1.1", "u1", {"tab": 1})
    ns.presence_join("presence-r", "2.2", "u1", {"tab": 2})
    ns.presence_join("presence-r", "3.3", "u2", None)
    members = ns.presence_members("presence-r")
    assert sorted(members) == ["u1", "u2"]
    assert members["u1"] == {"tab": 2}  # the newest socket's info wins


def test_presence_is_per_channel(ns: Namespace) -> None:
    assert ns.presence_join("presence-a", "1.1", "u1", {}) is True
    assert ns.presence_join("presence-b", "1.1", "u1", {}) is True
    assert ns.presence_leave("presence-a", "1.1", "u1") is True
    assert ns.presence_members("presence-b") == {"u1": {}}


def test_leaving_a_socket_that_never_joined_is_not_a_last_leave(ns: Namespace) -> None:
    ns.presence_join("presence-r", "1.1", "u1", {})
    assert ns.presence_leave("presence-r", "9.9", "u1") is False
    assert ns.presence_leave("presence-r", "1.1", "someone-else") is False
    assert ns.presence_leave("presence-nope", "1.1", "u1") is False
    assert ns.presence_members("presence-r") == {"u1": {}}
    # A repeated leave of the same socket is reported once.
    assert ns.presence_leave("presence-r", "1.1", "u1") is True
    assert ns.presence_leave("presence-r", "1.1", "u1") is False


def test_user_index_first_and_last_socket(ns: Namespace) -> None:
    a, b = _conn("1.1"), _conn("2.2")
    assert ns.add_user_socket("u1", a) is True
    assert ns.add_user_socket("u1", b) is False
    assert {c.socket_id for c in ns.user_sockets("u1")} == {"1.1", "2.2"}
    assert ns.remove_user_socket("u1", "1.1") is False
    assert ns.remove_user_socket("u1", "1.1") is False
    assert ns.remove_user_socket("u1", "2.2") is True
    assert ns.user_sockets("u1") == []
    assert ns.remove_user_socket("nobody", "1.1") is False


def test_watchers(ns: Namespace) -> None:
    a, b = _conn("1.1"), _conn("2.2")
    ns.watch(a, ("u1", "u2"))
    ns.watch(b, ("u1",))
    assert {c.socket_id for c in ns.watchers_of("u1")} == {"1.1", "2.2"}
    ns.unwatch(a, ("u1", "u2"))
    assert [c.socket_id for c in ns.watchers_of("u1")] == ["2.2"]
    assert ns.watchers_of("u2") == []


def test_namespace_is_empty_after_everything_is_undone(ns: Namespace) -> None:
    a = _conn("1.1")
    ns.add_socket(a)
    ns.subscribe("presence-r", a)
    ns.presence_join("presence-r", "1.1", "u1", {})
    ns.add_user_socket("u1", a)
    ns.watch(a, ("u2",))
    assert not ns.is_empty()
    ns.unwatch(a, ("u2",))
    ns.remove_user_socket("u1", "1.1")
    ns.presence_leave("presence-r", "1.1", "u1")
    ns.unsubscribe("presence-r", "1.1")
    ns.remove_socket("1.1")
    assert ns.is_empty()
