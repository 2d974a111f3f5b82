"""The REST API's Pusher logic, called directly with parsed bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sockudo import rest
from sockudo.core.errors import ApiError
from sockudo.handler import CACHE_TTL_SECONDS
from tests.support.fakes import Client, World, data_of, make_app


@pytest.fixture
def world() -> World:
    return World(make_app())


def joined(w: World, channel: str, user_id: str | None = None) -> Client:
    c = w.connect()
    c.subscribe(channel, user_id=user_id)
    frames = c.take()
    assert "pusher_internal:subscription_succeeded" in [f["event"] for f in frames], frames
    return c


def trigger(w: World, **body: Any) -> dict[str, Any]:
    return rest.trigger(w.services, w.app, body)


def status_of(fn: Any, *args: Any) -> int:
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value.status


def trigger_status(w: World, **body: Any) -> int:
    return status_of(rest.trigger, w.services, w.app, body)


# -- POST /events ---------------------------------------------------------------------------


def test_trigger_delivers_to_every_channel_and_subscriber(world: World) -> None:
    a1, a2, b, other = joined(world, "a"), joined(world, "a"), joined(world, "b"), joined(world, "c")
    assert trigger(world, name="order.created", channels=["a", "b"], data='{"id":1}') == {}
    for c in (a1, a2):
        assert c.take() == [{"event": "order.created", "channel": "a", "data": '{"id":1}'}]
    assert b.take() == [{"event": "order.created", "channel": "b", "data": '{"id":1}'}]
    assert other.take() == []
    assert world.sample("sockudo_publish_accepted_total") == 2


def test_trigger_with_single_channel_field(world: World) -> None:
    c = joined(world, "a")
    trigger(world, name="e", channel="a", data="x")
    assert c.take() == [{"event": "e", "channel": "a", "data": "x"}]


def test_channels_wins_over_channel(world: World) -> None:
    a, b = joined(world, "a"), joined(world, "b")
    trigger(world, name="e", channel="a", channels=["b"], data="x")
    assert a.take() == []
    assert len(b.take()) == 1


def test_json_data_is_stringified(world: World) -> None:
    c = joined(world, "a")
    trigger(world, name="e", channel="a", data={"k": [1, 2]})
    (frame,) = c.take()
    assert isinstance(frame["data"], str)
    assert json.loads(frame["data"]) == {"k": [1, 2]}


def test_missing_name_is_400(world: World) -> None:
    assert trigger_status(world, channels=["a"], data="x") == 400
    assert trigger_status(world, name="", channels=["a"], data="x") == 400
    assert trigger_status(world, name=5, channels=["a"], data="x") == 400


def test_name_too_long_is_400(world: World) -> None:
    trigger(world, name="n" * 200, channels=["a"], data="x")
    assert trigger_status(world, name="n" * 201, channels=["a"], data="x") == 400


@pytest.mark.parametrize("body", [{}, {"channels": []}, {"channels": "a"}, {"channel": None}])
def test_missing_channels_is_400(world: World, body: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as info:
        rest.trigger(world.services, world.app, {"name": "e", "data": "x", **body})
    assert info.value.status == 400
    assert info.value.slug == "missing_channel_info"


def test_too_many_channels_is_400(world: World) -> None:
    trigger(world, name="e", channels=[f"c{i}" for i in range(100)], data="x")
    assert trigger_status(world, name="e", channels=[f"c{i}" for i in range(101)], data="x") == 400


@pytest.mark.parametrize("channel", ["bad channel", "x" * 201, "", 7, None, "a/b"])
def test_bad_channel_is_400(world: World, channel: Any) -> None:
    assert trigger_status(world, name="e", channels=["ok", channel], data="x") == 400


def test_payload_over_10kb_is_413(world: World) -> None:
    c = joined(world, "a")
    trigger(world, name="e", channels=["a"], data="x" * 10 * 1024)
    c.take()
    assert trigger_status(world, name="e", channels=["a"], data="x" * (10 * 1024 + 1)) == 413
    assert c.take() == []
    assert world.sample("sockudo_publish_rejected_total", reason="payload_too_large") == 1


def test_payload_limit_counts_utf8_bytes(world: World) -> None:
    assert trigger_status(world, name="e", channels=["a"], data="é" * (5 * 1024 + 1)) == 413


def test_app_payload_limit_applies() -> None:
    w = World(make_app(max_event_payload_in_kb=100))
    trigger(w, name="e", channels=["a"], data="x" * 50 * 1024)


@pytest.mark.parametrize("socket_id", ["abc", "1.2.3", "1.", ".1", "1-2", "", 12, "1.2\n"])
def test_malformed_socket_id_is_400(world: World, socket_id: Any) -> None:
    assert trigger_status(world, name="e", channels=["a"], data="x", socket_id=socket_id) == 400


def test_nothing_is_delivered_when_validation_fails(world: World) -> None:
    c = joined(world, "a")
    with pytest.raises(ApiError):
        trigger(world, name="e", channels=["a", "bad channel"], data="x")
    assert c.take() == []


def test_socket_id_is_excluded(world: World) -> None:
    sender, other = joined(world, "a"), joined(world, "a")
    trigger(world, name="e", channels=["a"], data="x", socket_id=sender.socket_id)
    assert sender.take() == []
    assert other.take() == [{"event": "e", "channel": "a", "data": "x"}]


def test_info_subscription_count_and_user_count(world: World) -> None:
    joined(world, "presence-a", "u1")
    joined(world, "presence-a", "u1")
    joined(world, "presence-a", "u2")
    body = trigger(
        world, name="e", channels=["presence-a", "presence-b"], data="x", info="subscription_count,user_count"
    )
    assert body == {
        "channels": {
            "presence-a": {"subscription_count": 3, "user_count": 2},
            "presence-b": {"subscription_count": 0, "user_count": 0},
        }
    }


def test_info_subscription_count_on_public_channels(world: World) -> None:
    joined(world, "a")
    assert trigger(world, name="e", channels=["a"], data="x", info="subscription_count") == {
        "channels": {"a": {"subscription_count": 1}}
    }


def test_info_user_count_on_non_presence_channel_is_400(world: World) -> None:
    assert trigger_status(world, name="e", channels=["a"], data="x", info="user_count") == 400


def test_unknown_info_attribute_is_400(world: World) -> None:
    assert trigger_status(world, name="e", channels=["a"], data="x", info="colour") == 400


# -- POST /batch_events ----------------------------------------------------------------------


def test_batch_delivers_in_order(world: World) -> None:
    a, b = joined(world, "a"), joined(world, "b")
    batch = [
        {"channel": "a", "name": "e1", "data": "1"},
        {"channel": "b", "name": "e2", "data": "2"},
        {"channel": "a", "name": "e3", "data": "3"},
    ]
    assert rest.trigger_batch(world.services, world.app, {"batch": batch}) == {}
    assert [f["event"] for f in a.take()] == ["e1", "e3"]
    assert [f["event"] for f in b.take()] == ["e2"]


def test_batch_over_10_is_400(world: World) -> None:
    c = joined(world, "a")
    item = {"channel": "a", "name": "e", "data": "x"}
    rest.trigger_batch(world.services, world.app, {"batch": [item] * 10})
    c.take()
    assert status_of(rest.trigger_batch, world.services, world.app, {"batch": [item] * 11}) == 400
    assert c.take() == []


@pytest.mark.parametrize("body", [{}, {"batch": {}}, {"batch": "x"}, [], {"batch": [1]}, {"batch": [{"channel": "a"}]}])
def test_malformed_batch_is_400(world: World, body: Any) -> None:
    assert status_of(rest.trigger_batch, world.services, world.app, body) == 400


def test_batch_with_info_returns_one_entry_per_item(world: World) -> None:
    joined(world, "presence-a", "u1")
    joined(world, "b")
    joined(world, "b")
    batch = [
        {"channel": "presence-a", "name": "e", "data": "x", "info": "user_count"},
        {"channel": "c", "name": "e", "data": "x"},
        {"channels": ["b", "a"], "name": "e", "data": "x", "info": "subscription_count"},
    ]
    assert rest.trigger_batch(world.services, world.app, {"batch": batch}) == {
        "batch": [{"user_count": 1}, {}, {"subscription_count": 2}]
    }


def test_batch_socket_id_exclusion(world: World) -> None:
    sender, other = joined(world, "a"), joined(world, "a")
    batch = [{"channel": "a", "name": "e", "data": "x", "socket_id": sender.socket_id}]
    rest.trigger_batch(world.services, world.app, {"batch": batch})
    assert sender.take() == []
    assert len(other.take()) == 1


# -- GET /channels ---------------------------------------------------------------------------


def test_list_channels_lists_occupied_channels(world: World) -> None:
    joined(world, "a")
    joined(world, "presence-x", "u1")
    gone = joined(world, "gone")
    gone.close()
    assert rest.list_channels(world.services, world.app, "", None) == {"channels": {"a": {}, "presence-x": {}}}


def test_list_channels_with_prefix_and_user_count(world: World) -> None:
    joined(world, "a")
    joined(world, "presence-x", "u1")
    joined(world, "presence-x", "u1")
    joined(world, "presence-y", "u2")
    assert rest.list_channels(world.services, world.app, "presence-", "user_count") == {
        "channels": {"presence-x": {"user_count": 1}, "presence-y": {"user_count": 1}}
    }
    assert rest.list_channels(world.services, world.app, "presence-x", "user_count,subscription_count") == {
        "channels": {"presence-x": {"user_count": 1, "subscription_count": 2}}
    }
    assert rest.list_channels(world.services, world.app, "private-", None) == {"channels": {}}


@pytest.mark.parametrize("prefix", ["", "private-", "a"])
def test_list_channels_user_count_needs_the_presence_prefix(world: World, prefix: str) -> None:
    assert status_of(rest.list_channels, world.services, world.app, prefix, "user_count") == 400


def test_list_channels_only_sees_its_own_app() -> None:
    w = World(make_app(id="1", key="k1"), make_app(id="2", key="k2"))
    c = w.connect("k2")
    c.subscribe("a")
    assert rest.list_channels(w.services, w.apps[0], "", None) == {"channels": {}}
    assert rest.list_channels(w.services, w.apps[1], "", None) == {"channels": {"a": {}}}


# -- GET /channels/{c} -------------------------------------------------------------------------


def test_channel_info_unoccupied(world: World) -> None:
    assert rest.channel_info(world.services, world.app, "a", None) == {"occupied": False}
    assert rest.channel_info(world.services, world.app, "a", "subscription_count") == {
        "occupied": False,
        "subscription_count": 0,
    }


def test_channel_info_counts(world: World) -> None:
    joined(world, "presence-x", "u1")
    joined(world, "presence-x", "u1")
    joined(world, "presence-x", "u2")
    assert rest.channel_info(world.services, world.app, "presence-x", "user_count,subscription_count") == {
        "occupied": True,
        "user_count": 2,
        "subscription_count": 3,
    }


def test_channel_info_user_count_on_non_presence_is_400(world: World) -> None:
    assert status_of(rest.channel_info, world.services, world.app, "a", "user_count") == 400


def test_channel_info_bad_name_is_400(world: World) -> None:
    assert status_of(rest.channel_info, world.services, world.app, "bad channel", None) == 400


def test_channel_info_cache(world: World) -> None:
    trigger(world, name="price", channel="cache-p", data="42")
    world.clock.advance(100)
    info = rest.channel_info(world.services, world.app, "cache-p", "cache")
    assert info == {"occupied": False, "cache": {"data": "42", "event": "price", "ttl": CACHE_TTL_SECONDS - 100}}
    assert rest.channel_info(world.services, world.app, "cache-q", "cache") == {"occupied": False}
    assert status_of(rest.channel_info, world.services, world.app, "a", "cache") == 400


# -- GET /channels/{presence-c}/users -----------------------------------------------------


def test_channel_users_unique_by_user(world: World) -> None:
    joined(world, "presence-x", "u1")
    joined(world, "presence-x", "u1")
    joined(world, "presence-x", "7")
    body = rest.channel_users(world.services, world.app, "presence-x")
    assert sorted(body["users"], key=lambda u: u["id"]) == [{"id": "7"}, {"id": "u1"}]
    assert rest.channel_users(world.services, world.app, "presence-empty") == {"users": []}


@pytest.mark.parametrize("channel", ["a", "private-x", "cache-x", "bad channel"])
def test_channel_users_on_non_presence_is_400(world: World, channel: str) -> None:
    assert status_of(rest.channel_users, world.services, world.app, channel) == 400


# -- partial cluster answers ------------------------------------------------------------------


@pytest.fixture
def partial(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    """The adapter answers presence from this node only (another node or Redis unreachable)."""
    local = world.adapter

    def members_checked(app_id: str, channel: str) -> tuple[dict[str, Any], bool]:
        return local.presence_members(app_id, channel), False

    monkeypatch.setattr(world.adapter, "presence_members_checked", members_checked, raising=False)
    return world


def test_channel_users_marks_a_partial_answer(partial: World) -> None:
    joined(partial, "presence-x", "u1")
    assert rest.channel_users(partial.services, partial.app, "presence-x") == {
        "users": [{"id": "u1"}], "complete": False}


def test_channel_info_marks_a_partial_user_count(partial: World) -> None:
    joined(partial, "presence-x", "u1")
    assert rest.channel_info(partial.services, partial.app, "presence-x", "user_count") == {
        "occupied": True, "user_count": 1, "user_count_complete": False}
    # no flag when user_count was not asked for
    assert rest.channel_info(partial.services, partial.app, "presence-x", None) == {"occupied": True}


def test_list_channels_marks_a_partial_user_count(partial: World) -> None:
    joined(partial, "presence-x", "u1")
    assert rest.list_channels(partial.services, partial.app, "presence-", "user_count") == {
        "channels": {"presence-x": {"user_count": 1}}, "complete": False}


def test_trigger_info_marks_a_partial_user_count(partial: World) -> None:
    joined(partial, "presence-x", "u1")
    body = trigger(partial, name="e", channels=["presence-x"], data="x", info="user_count")
    assert body == {"channels": {"presence-x": {"user_count": 1, "user_count_complete": False}}}


def test_complete_answers_carry_no_flag(world: World) -> None:
    joined(world, "presence-x", "u1")
    assert world.adapter.presence_members_checked(world.app.id, "presence-x") == ({"u1": {}}, True)
    assert rest.channel_users(world.services, world.app, "presence-x") == {"users": [{"id": "u1"}]}
    assert rest.channel_info(world.services, world.app, "presence-x", "user_count") == {
        "occupied": True, "user_count": 1}


# -- POST /users/{id}/terminate_connections -------------------------------------------------


def test_terminate_user_connections_sends_4009_and_closes_every_socket(world: World) -> None:
    u1a, u1b, u2 = world.connect(), world.connect(), world.connect()
    for c, uid in ((u1a, "u1"), (u1b, "u1"), (u2, "u2")):
        c.signin({"id": uid})
        c.take()
    assert rest.terminate_user_connections(world.services, world.app, "u1") == {}
    for c in (u1a, u1b):
        frames = c.take()
        assert frames == [
            {"event": "pusher:error", "data": {"code": 4009, "message": "You got disconnected by the app."}}
        ]
        assert c.closed_with == 4009
    assert u2.take() == []
    assert u2.transport.closes == []


def test_terminate_unknown_user_is_fine(world: World) -> None:
    assert rest.terminate_user_connections(world.services, world.app, "nobody") == {}


def test_terminate_needs_a_user_id(world: World) -> None:
    assert status_of(rest.terminate_user_connections, world.services, world.app, "") == 400


def test_closed_sockets_are_not_terminated_again(world: World) -> None:
    c = world.connect()
    c.signin({"id": "u1"})
    c.close()
    c.take()
    rest.terminate_user_connections(world.services, world.app, "u1")
    assert c.take() == []
    assert c.transport.closes == []


def test_events_reach_presence_subscribers_with_data_as_published(world: World) -> None:
    c = joined(world, "presence-x", "u1")
    trigger(world, name="e", channel="presence-x", data='{"a":1}')
    (frame,) = c.take()
    assert data_of(frame) == {"a": 1}
    assert "user_id" not in frame
