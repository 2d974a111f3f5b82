"""Key segments: client ids joined into one key never collide, and plain ids are unchanged."""

from __future__ import annotations

import hashlib
import itertools

from sockudo.core import keys


def test_distinct_tuples_of_ids_never_join_into_the_same_key() -> None:
    alphabet = ["", "a", ":", "%", "#", "%3A", "a:b", "b", "%25", "#replay:x", "x%23"]
    joined: dict[str, tuple[str, ...]] = {}
    for parts in itertools.product(alphabet, repeat=3):
        key = keys.join(*parts)
        assert joined.setdefault(key, parts) == parts, (key, parts, joined[key])


def test_a_segment_round_trips_and_plain_ids_are_unchanged() -> None:
    for value in ("", "a", "a:b", "a%3Ab", "%", "#replay:1", "dev-1_x.y@z=+", "100"):
        segment = keys.segment(value)
        assert ":" not in segment and "#" not in segment
        assert keys.unsegment(segment) == value
    assert keys.segment("pub_0a1b") == "pub_0a1b" and keys.join("100", "pub_1", "d0") == "100:pub_1:d0"


def test_the_tag_of_a_channel_is_stable_brace_free_inside_and_tells_apps_and_names_apart() -> None:
    assert keys.tag("1", "presence-room") == keys.tag("1", "presence-room")
    assert keys.tag("1", "x") != keys.tag("2", "x") and keys.tag("1", "x") != keys.tag("1", "y")
    # The NUL separator: ("1", "2x") and ("12", "x") are different pairs.
    assert keys.tag("1", "2x") != keys.tag("12", "x")
    for app_id, name in (("1", ""), ("a}b", "{c}"), ("1", "private-{x}"), ("ü", "é" * 200)):
        tag = keys.tag(app_id, name)
        assert len(tag) == 12 and tag[0] == "{" and tag[-1] == "}"
        assert "{" not in tag[1:-1] and "}" not in tag[1:-1]
        int(tag[1:-1], 16)
    # Fixed value: the stores and the adapter of nodes of different versions must agree.
    assert keys.tag("1", "my-channel") == "{" + hashlib.sha1(b"1\0my-channel").hexdigest()[:10] + "}"
