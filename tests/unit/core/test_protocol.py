"""Wire names, frame encoding/decoding and channel rules."""

from __future__ import annotations

import json

import pytest

from sockudo.core import protocol as p
from sockudo.core.protocol import ChannelKind

# -- channel kinds ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("my-channel", ChannelKind.PUBLIC),
        ("cache-x", ChannelKind.PUBLIC),
        ("private-x", ChannelKind.PRIVATE),
        ("private-cache-x", ChannelKind.PRIVATE),
        ("private-encrypted-x", ChannelKind.ENCRYPTED),
        ("private-encrypted-cache-x", ChannelKind.ENCRYPTED),
        ("presence-x", ChannelKind.PRESENCE),
        ("presence-cache-x", ChannelKind.PRESENCE),
        ("#server-to-user-42", ChannelKind.SERVER_TO_USER),
        # Prefixes are anchored: a kind word elsewhere in the name changes nothing.
        ("x-private-y", ChannelKind.PUBLIC),
        ("x-presence-y", ChannelKind.PUBLIC),
        ("Private-x", ChannelKind.PUBLIC),
    ],
)
def test_channel_kind(name: str, kind: ChannelKind) -> None:
    assert p.channel_kind(name) is kind


def test_only_private_encrypted_and_presence_need_auth() -> None:
    assert {k for k in ChannelKind if k.needs_auth} == {
        ChannelKind.PRIVATE,
        ChannelKind.ENCRYPTED,
        ChannelKind.PRESENCE,
    }


@pytest.mark.parametrize(
    ("name", "cached"),
    [
        ("cache-x", True),
        ("private-cache-x", True),
        ("private-encrypted-cache-x", True),
        ("presence-cache-x", True),
        ("x-cache-y", False),  # Sockudo's unanchored regex matched this; we must not
        ("my-cache-", False),
        ("cachex", False),
        ("private-x", False),
        ("presence-x-cache-y", False),
    ],
)
def test_cache_channel_detection_is_anchored(name: str, cached: bool) -> None:
    assert p.is_cache_channel(name) is cached


def test_presence_cache_channel_is_presence_and_cache() -> None:
    assert p.channel_kind("presence-cache-room") is ChannelKind.PRESENCE
    assert p.is_cache_channel("presence-cache-room")


def test_server_to_user_id() -> None:
    assert p.server_to_user_id("#server-to-user-42") == "42"
    assert p.server_to_user_id("#server-to-user-") is None
    assert p.server_to_user_id("private-x") is None


# -- channel name rules -----------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "A-Z_a=z@0,9.;:#", "private-chat:room", "#server-to-user-1", "x" * 200])
def test_valid_channel_names(name: str) -> None:
    assert p.channel_name_error(name, 200) is None


@pytest.mark.parametrize(
    "name",
    ["", "with space", "slash/", "star*", "quote'", "dollar$", "percent%", "ünïcode", "tab\t", "new\nline", "a+b"],
)
def test_invalid_channel_characters(name: str) -> None:
    assert p.channel_name_error(name, 200) is not None


@pytest.mark.parametrize("name", [None, 42, ["a"], {"a": 1}])
def test_non_string_channel_names_are_invalid(name: object) -> None:
    assert p.channel_name_error(name, 200) is not None


def test_channel_name_length_limit_is_200_by_default_and_the_app_limit_otherwise() -> None:
    assert p.channel_name_error("x" * 200, 200) is None
    assert "200" in (p.channel_name_error("x" * 201, 200) or "")
    assert p.channel_name_error("x" * 50, 50) is None
    assert p.channel_name_error("x" * 51, 50) is not None


def test_trailing_newline_is_not_a_valid_character() -> None:
    # ``$`` in a regex would let "abc\n" through; the rule must cover the whole string.
    assert p.channel_name_error("abc\n", 200) is not None


# -- frame encoding ---------------------------------------------------------------


def test_frame_omits_absent_fields() -> None:
    assert json.loads(p.frame("pusher:pong")) == {"event": "pusher:pong"}
    assert json.loads(p.frame("e", "d")) == {"event": "e", "data": "d"}
    assert json.loads(p.frame("e", channel="c")) == {"event": "e", "channel": "c"}
    assert json.loads(p.frame("e", {"a": 1}, channel="c", user_id="u")) == {
        "event": "e",
        "channel": "c",
        "data": {"a": 1},
        "user_id": "u",
    }
    assert "null" not in p.frame("e", None, None, None)


def test_frame_keeps_empty_but_present_data() -> None:
    assert json.loads(p.frame("e", "")) == {"event": "e", "data": ""}


def test_frames_are_compact_json() -> None:
    text = p.frame("e", {"a": [1, 2]}, channel="c")
    assert ", " not in text and ": " not in text
    assert p.dumps({"k": "é"}) == '{"k":"é"}'


def test_error_frame_shape() -> None:
    assert json.loads(p.error_frame(4009, "nope")) == {
        "event": "pusher:error",
        "data": {"code": 4009, "message": "nope"},
    }


# -- frame decoding ---------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "{", "not json", '{"event":"x"', "\x00"])
def test_decode_rejects_bad_json(text: str) -> None:
    with pytest.raises(p.FrameError):
        p.decode_frame(text)


@pytest.mark.parametrize("text", ["[]", "1", '"pusher:ping"', "null", "true"])
def test_decode_rejects_non_objects(text: str) -> None:
    with pytest.raises(p.FrameError):
        p.decode_frame(text)


@pytest.mark.parametrize("text", ["{}", '{"data":{}}', '{"event":""}', '{"event":1}', '{"event":null}'])
def test_decode_rejects_missing_event(text: str) -> None:
    with pytest.raises(p.FrameError):
        p.decode_frame(text)


def test_decode_rejects_non_string_channel() -> None:
    with pytest.raises(p.FrameError):
        p.decode_frame('{"event":"client-x","channel":5}')


def test_decode_rejects_deep_nesting_without_crashing() -> None:
    with pytest.raises(p.FrameError):
        p.decode_frame("[" * 100_000 + "]" * 100_000)


def test_decode_accepts_a_frame() -> None:
    msg = p.decode_frame('{"event":"pusher:subscribe","data":{"channel":"a"}}')
    assert msg == {"event": "pusher:subscribe", "data": {"channel": "a"}}


def test_data_may_be_an_object_or_a_json_string() -> None:
    as_object = p.decode_frame('{"event":"pusher:subscribe","data":{"channel":"a","auth":""}}')
    as_string = p.decode_frame(
        json.dumps({"event": "pusher:subscribe", "data": json.dumps({"channel": "a", "auth": ""})})
    )
    assert p.data_object(as_object) == p.data_object(as_string) == {"channel": "a", "auth": ""}


def test_absent_or_empty_data_is_an_empty_object() -> None:
    assert p.data_object({"event": "pusher:ping"}) == {}
    assert p.data_object({"event": "pusher:ping", "data": ""}) == {}


@pytest.mark.parametrize("data", ["not json", "[1]", "42", [1, 2], 7])
def test_data_that_is_not_an_object_is_an_error(data: object) -> None:
    with pytest.raises(p.FrameError):
        p.data_object({"event": "pusher:subscribe", "data": data})


def test_system_events_route_by_name_whatever_the_prefix() -> None:
    assert p.system_event_name("pusher:subscribe") == "subscribe"
    assert p.system_event_name("sockudo:subscribe") == "subscribe"
    assert p.system_event_name("pusher_internal:subscription_succeeded") is None
    assert p.system_event_name("client-x") is None
