"""The Redis adapter's pure parts: pub/sub channel names, interest diffing, envelope routing,
live-node sums, and that every script's keys share one hash slot."""

from __future__ import annotations

import pytest

from sockudo.adapter import cluster as c
from sockudo.core.keys import tag

KEYS = c.Keys("sockudo_adapter:")


def slot_tag(key: str) -> str:
    """What Redis Cluster hashes: the text between the first ``{`` and the next ``}``."""
    start = key.index("{")
    return key[start + 1:key.index("}", start + 1)]


def test_pubsub_channels_are_told_apart_by_kind_and_carry_the_channel_tag() -> None:
    channel, user = KEYS.channel_topic("1", "news"), KEYS.user_topic("1", "news")
    assert channel.startswith("sockudo_adapter:#c" + tag("1", "news"))
    assert user.startswith("sockudo_adapter:#u" + tag("1", "news"))
    assert KEYS.kind_of(channel) == c.KIND_CHANNEL
    assert KEYS.kind_of(user) == c.KIND_USER
    assert KEYS.kind_of(KEYS.control) == c.KIND_CONTROL
    assert KEYS.kind_of("other:#c{abc}") is None and KEYS.kind_of("sockudo_adapter:#broadcast") is None
    assert KEYS.channel_topic("1", "a") != KEYS.channel_topic("2", "a")


def test_every_key_one_script_touches_is_in_the_channels_slot() -> None:
    for name in ("presence-room", "private-{x}", "a}b{c", "#server-to-user-u1"):
        keys = [KEYS.subs("app", name), KEYS.presence("app", name), KEYS.presence_info("app", name),
                KEYS.presence_held("app", name)]
        assert {slot_tag(k) for k in keys} == {tag("app", name)[1:-1]}, keys
        assert len(set(keys)) == 4
        assert slot_tag(KEYS.channel_topic("app", name)) == tag("app", name)[1:-1]
    assert slot_tag(KEYS.online("app", "u1")) == slot_tag(KEYS.user_topic("app", "u1"))
    assert slot_tag(KEYS.channels("app")) == slot_tag(KEYS.connections("app")) == tag("app", "")[1:-1]


def test_names_whose_tags_collide_share_no_key_and_no_pubsub_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tag is 40 bits: among a million live channels two collide about every other time, and
    a client can search for a name colliding with another's channel. They may share a slot, but
    not a count, a member list or a pub/sub channel (the node would stop listening to one when
    the other's last subscriber left)."""
    monkeypatch.setattr(c, "tag", lambda app_id, name: "{0123456789}")
    def names(app_id: str, name: str) -> list[str]:
        return [KEYS.channel_topic(app_id, name), KEYS.user_topic(app_id, name), KEYS.subs(app_id, name),
                KEYS.presence(app_id, name), KEYS.presence_info(app_id, name), KEYS.presence_held(app_id, name),
                KEYS.online(app_id, name)]
    pairs = [(("1", "presence-a"), ("1", "presence-b")), (("1", "a:b"), ("1:a", "b")), (("1", "x"), ("2", "x"))]
    for one, other in pairs:
        assert not set(names(*one)) & set(names(*other)), (one, other)
    assert KEYS.channels("1") != KEYS.channels("2") and KEYS.connections("1") != KEYS.connections("2")


def test_interest_diff_takes_the_wanted_state_now_against_what_was_told() -> None:
    wanted = {"a", "b"}
    told = {"b", "c"}
    add, remove = c.interest_diff(["a", "b", "c", "d"], lambda n: n in wanted, told)
    assert (sorted(add), sorted(remove)) == (["a"], ["c"])
    # subscribed and left again between two flushes: nothing to tell
    assert c.interest_diff(["d"], lambda n: False, told) == ([], [])
    # left and came back between two flushes: nothing either
    assert c.interest_diff(["c"], lambda n: True, told) == ([], [])


def test_envelopes_are_routed_by_the_kind_of_channel_they_came_on() -> None:
    me = "node-a"
    broadcast = {"node_id": "node-b", "app_id": "1", "channel": "news", "message": "{}"}
    assert c.route(c.KIND_CHANNEL, broadcast, me) == c.TO_CHANNEL
    assert c.route(c.KIND_CHANNEL, {**broadcast, "node_id": me}, me) is None  # own echo
    assert c.route(c.KIND_CHANNEL, {**broadcast, "user_id": "u"}, me) is None  # not a channel envelope
    assert c.route(c.KIND_USER, broadcast, me) is None
    to_user = {**broadcast, "user_id": "u1", "channel": "#server-to-user-u1"}
    assert c.route(c.KIND_USER, to_user, me) == c.TO_USER
    terminate = {"node_id": "node-b", "app_id": "1", "user_id": "u1", "request_type": c.TERMINATE_USER,
                 "code": 4009, "message": "bye"}
    assert c.route(c.KIND_USER, terminate, me) == c.TERMINATE
    assert c.route(c.KIND_CHANNEL, terminate, me) is None
    watch = {"node_id": "node-b", "app_id": "1", "user_id": "u1", "request_type": c.WATCHLIST_NOTIFY, "message": "{}"}
    assert c.route(c.KIND_USER, watch, me) == c.WATCHLIST
    assert c.route(c.KIND_USER, {**watch, "request_type": "SomethingElse"}, me) is None
    dead = {"node_id": "node-b", "request_type": c.NODE_DEAD, "dead_node_id": "node-c"}
    assert c.route(c.KIND_CONTROL, dead, me) == c.FORGET_NODE
    assert c.route(c.KIND_CONTROL, broadcast, me) is None
    assert c.route(c.KIND_CHANNEL, {"node_id": "x", "app_id": 1, "channel": "news", "message": "{}"}, me) is None


def test_counts_sum_only_live_nodes_other_than_this_one() -> None:
    registered: list[tuple[str | bytes, float]] = [(b"a", 1000.0), ("b", 5000.0), (b"c", 9000.0)]
    every, fresh = c.live_nodes(registered, cutoff_ms=4000)
    assert every == {"a", "b", "c"} and fresh == {"b", "c"}
    fields = {b"a": b"5", b"b": b"2", "c": "3", b"me": b"7", b"d": b"bad"}
    assert c.sum_counts(fields, fresh | {"me", "d"}, skip="me") == 5


def test_holdings_round_trip() -> None:
    for holding in (c.Holding(c.HOLD_CHANNEL, "1", "a:b"), c.Holding(c.HOLD_PRESENCE, "1", "presence-x", "u\"1"),
                    c.Holding(c.HOLD_CONNECTIONS, "1")):
        assert c.Holding.from_member(holding.member()) == holding
    assert c.Holding.from_member(b"not json") is None
    assert c.presence_field("n1", "u:1") != c.presence_field("n1:u", "1")
