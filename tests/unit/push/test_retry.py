"""Retry timing: exponential backoff with deterministic jitter, Retry-After, bounds."""

from __future__ import annotations

from sockudo.push.retry import next_attempt, parse_retry_after
from sockudo.push.settings import PushRetryPolicy

POLICY = PushRetryPolicy(
    max_attempts=5, initial_backoff_ms=1000, max_backoff_ms=8000, max_elapsed_secs=3600, jitter_ratio_percent=20
)


def decide(attempt: int, **kw: object) -> object:
    args = {
        "attempt": attempt,
        "key": "k",
        "now_ms": 0,
        "first_attempt_ms": 0,
        "retry_after_ms": None,
        "expires_at_ms": None,
    }
    args.update(kw)
    return next_attempt(POLICY, **args)  # type: ignore[arg-type]


def test_backoff_doubles_with_bounded_jitter_and_caps() -> None:
    for attempt, base in ((1, 1000), (2, 2000), (3, 4000), (4, 8000)):
        d = decide(attempt)
        assert d.retry and base * 0.8 <= d.due_ms <= base * 1.2  # type: ignore[attr-defined]
    assert decide(2).due_ms == decide(2).due_ms  # type: ignore[attr-defined]  # deterministic per key
    assert decide(2, key="other").due_ms != decide(2).due_ms  # type: ignore[attr-defined]


def test_retry_after_wins_and_is_never_undercut() -> None:
    for key in ("a", "b", "c", "d"):
        d = decide(1, key=key, retry_after_ms=2000)
        assert d.retry and 2000 <= d.due_ms <= 2400  # type: ignore[attr-defined]


def test_bounds_attempts_age_and_expiry() -> None:
    assert decide(5).reason == "attempts_exhausted"  # type: ignore[attr-defined]
    assert decide(1, first_attempt_ms=-3_600_000).reason == "age_exceeded"  # type: ignore[attr-defined]
    assert decide(1, expires_at_ms=500).reason == "expired"  # type: ignore[attr-defined]


def test_parse_retry_after() -> None:
    assert parse_retry_after("2", 0) == 2000
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470000) == 10_000
    assert parse_retry_after("soon", 0) is None and parse_retry_after(None, 0) is None
