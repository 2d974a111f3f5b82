"""Key segments: client ids joined into one key never collide, and plain ids are unchanged."""

from __future__ import annotations

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
