"""Console sign-in: the token, sessions and CSRF tokens."""

from __future__ import annotations

import pytest

from sockudo.console.sessions import Sessions, generate_token, same


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_only_the_token_signs_in() -> None:
    sessions = Sessions("s3cret-token")
    assert sessions.sign_in(None) is None
    assert sessions.sign_in("") is None
    assert sessions.sign_in("s3cret-tokeN") is None
    assert sessions.sign_in("s3cret-token-and-more") is None
    session = sessions.sign_in("s3cret-token")
    assert session is not None and sessions.get(session.id) == session
    assert session.id != session.csrf


def test_an_empty_token_is_refused_at_start() -> None:
    with pytest.raises(ValueError):
        Sessions("")
    assert not same("", "")


def test_csrf_token_must_match_the_session() -> None:
    sessions = Sessions("t")
    a, b = sessions.sign_in("t"), sessions.sign_in("t")
    assert a is not None and b is not None
    assert sessions.csrf_ok(a, a.csrf)
    assert not sessions.csrf_ok(a, b.csrf)
    assert not sessions.csrf_ok(a, None)


def test_sessions_expire_and_are_bounded() -> None:
    clock = Clock()
    sessions = Sessions("t", clock=clock, ttl=60, limit=2)
    first = sessions.sign_in("t")
    assert first is not None
    clock.now += 61
    assert sessions.get(first.id) is None
    a, b, c = sessions.sign_in("t"), sessions.sign_in("t"), sessions.sign_in("t")
    assert a is not None and b is not None and c is not None
    assert len(sessions) == 2 and sessions.get(a.id) is None and sessions.get(c.id) == c
    sessions.sign_out(c.id)
    assert sessions.get(c.id) is None


def test_generated_tokens_are_long_and_random() -> None:
    tokens = {generate_token() for _ in range(50)}
    assert len(tokens) == 50 and all(len(t) >= 32 for t in tokens)


def test_guessing_is_throttled_for_everyone_until_the_window_moves() -> None:
    from sockudo.console.sessions import FAILURE_WINDOW_SECONDS, Throttled

    clock = Clock()
    sessions = Sessions("right-token", clock=clock, max_failures=3)
    for _ in range(3):
        assert sessions.sign_in("guess") is None
    with pytest.raises(Throttled):
        sessions.sign_in("right-token")  # even the right token waits: the token is not even compared
    clock.now += FAILURE_WINDOW_SECONDS
    assert sessions.sign_in("right-token") is not None
