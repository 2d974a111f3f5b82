"""Retry timing. Pure.

Delay for attempt n (the attempt that just failed) = ``initial · 2^(n−1)`` capped at
``max_backoff``, ± ``jitter_ratio`` drawn deterministically from SHA-256 of the retry key (so a
re-run of the same job schedules the same time). A provider's ``Retry-After`` wins when
respected, and the jitter then only ever adds (never earlier than the provider asked). No
retry past ``min(first attempt + max_elapsed, expiresAtMs)`` and none beyond ``max_attempts``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from sockudo.push.settings import PushRetryPolicy


def _unit(key: str) -> float:
    """A number in [0, 1) from the key."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def parse_retry_after(value: str | None, now_ms: int) -> int | None:
    """``Retry-After`` (seconds or HTTP-date) → delay in ms, or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value) * 1000
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0, int(when.timestamp() * 1000) - now_ms)


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    due_ms: int = 0
    reason: str = ""  # when not retrying: attempts_exhausted | age_exceeded | expired


def next_attempt(
    policy: PushRetryPolicy,
    *,
    attempt: int,
    key: str,
    now_ms: int,
    first_attempt_ms: int,
    retry_after_ms: int | None,
    expires_at_ms: int | None,
) -> RetryDecision:
    if attempt >= policy.max_attempts:
        return RetryDecision(False, reason="attempts_exhausted")
    base = min(policy.initial_backoff_ms * 2 ** max(0, attempt - 1), policy.max_backoff_ms)
    ratio = policy.jitter_ratio_percent / 100.0
    u = _unit(f"{key}:{attempt}")
    if retry_after_ms is not None and policy.respect_retry_after:
        delay = int(retry_after_ms * (1 + ratio * u)) if retry_after_ms >= 1000 else retry_after_ms
    else:
        delay = int(base * (1 + ratio * (2 * u - 1)))
    due = now_ms + max(0, delay)
    if expires_at_ms is not None and due >= expires_at_ms:
        return RetryDecision(False, reason="expired")
    if due > first_attempt_ms + policy.max_elapsed_secs * 1000:
        return RetryDecision(False, reason="age_exceeded")
    return RetryDecision(True, due_ms=due)
