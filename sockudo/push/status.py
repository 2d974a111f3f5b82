"""The publish status record and its monotonic state machine. Pure: no I/O.

A status record is a flat mapping (a Redis hash in production) of counters and fields. Each
planned delivery — one per (publishId, deviceId) — also has a small *delivery state* string:

    ""/None          pending (never claimed)
    i|n|owner|lease  attempt n in flight by ``owner`` until ``lease`` (ms)
    r|n|due          attempt n scheduled for ``due`` (a retry)
    a f x d          accepted, failed, expired, dead-lettered (final)

The stores apply :func:`claim` and :func:`settle` atomically (WATCH/MULTI in Redis, a lock in
memory), so concurrent workers and re-run jobs never double count: a final delivery state is
never left, and a settle of an already final delivery is a duplicate that changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

QUEUED = "queued"
PLANNING = "planning"
DISPATCHING = "dispatching"
SUCCEEDED = "succeeded"
PARTIALLY_SUCCEEDED = "partially_succeeded"
FAILED = "failed"
EXPIRED = "expired"
DEAD_LETTERED = "dead_lettered"

TERMINAL = (SUCCEEDED, PARTIALLY_SUCCEEDED, FAILED, EXPIRED, DEAD_LETTERED)
_RANK = {QUEUED: 0, PLANNING: 1, DISPATCHING: 2, **{s: 3 for s in TERMINAL}}

COUNTERS = (
    "planned",
    "dispatched",
    "succeeded",
    "failed",
    "expired",
    "retryScheduled",
    "retryAttempted",
    "deadLettered",
)
EXTRA_COUNTERS = ("replayed", "replaySucceeded", "replayFailed")

FINAL_CODES = {"a": "accepted", "f": "failed", "x": "expired", "d": "dead_lettered"}


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RETRY = "retry"  # retryable: another attempt is scheduled
    EXPIRED = "expired"
    DEAD_LETTER = "dead_letter"  # retryable but out of attempts/age


class Claim(StrEnum):
    SEND = "send"
    SEND_AGAIN = "send_again"  # the previous holder died mid-request: may be a duplicate
    SKIP = "skip"  # final or superseded
    BUSY = "busy"  # held by another worker whose lease is still running


class CasExhausted(RuntimeError):
    """A status transaction kept conflicting with concurrent writes and was given up."""


@dataclass
class Change:
    """What a transition writes: status fields, the delivery's new state, side effects."""

    fields: dict[str, str | int] = field(default_factory=dict)
    increments: dict[str, int] = field(default_factory=dict)
    delivery_state: str | None = None  # None: unchanged
    claim: Claim | None = None
    duplicate: bool = False
    terminal: str | None = None  # the terminal state reached by this change
    violation: bool = False
    possible_duplicate: bool = False


@dataclass
class SettleOp:
    """One delivery's settle, as a batch settle takes it (see the stores' ``settle_many``)."""

    key: str
    outcome: Outcome
    next_attempt: int | None = None
    due_ms: int | None = None
    replay: bool = False
    reason: str = ""
    dead_letter: tuple[dict[str, Any], int] | None = None  # (letter, ttl s)


def rank(state: str) -> int:
    return _RANK.get(state, -1)


def is_terminal(state: str) -> bool:
    return state in TERMINAL


def new_record(
    app_id: str,
    publish_id: str,
    *,
    intent_hash: str,
    expected: int,
    now_ms: int,
    not_before_ms: int | None,
    expires_at_ms: int | None,
    fanout_regime: str = "fastPath",
) -> dict[str, str | int]:
    record: dict[str, str | int] = {
        "appId": app_id,
        "publishId": publish_id,
        "state": QUEUED,
        "intentHash": intent_hash,
        "expectedRecipients": expected,
        "fanoutRegime": fanout_regime,
        "createdAtMs": now_ms,
        "updatedAtMs": now_ms,
        **{c: 0 for c in COUNTERS},
        **{c: 0 for c in EXTRA_COUNTERS},
    }
    if not_before_ms is not None:
        record["notBeforeMs"] = not_before_ms
    if expires_at_ms is not None:
        record["expiresAtMs"] = expires_at_ms
    return record


def _int(record: Mapping[str, object], key: str) -> int:
    value = record.get(key) or 0
    if not isinstance(value, (int, float, str, bytes)):
        return 0
    try:
        return int(value)
    except ValueError:
        return 0


def terminal_state(record: Mapping[str, object]) -> str | None:
    """Once every planned delivery has an end, the publish has one."""
    planned = _int(record, "planned")
    ok, failed = _int(record, "succeeded"), _int(record, "failed")
    expired, dead = _int(record, "expired"), _int(record, "deadLettered")
    if planned <= 0 or ok + failed + expired + dead < planned:
        return None
    if failed + expired + dead == 0:
        return SUCCEEDED
    if ok > 0:
        return PARTIALLY_SUCCEEDED
    if expired > 0:
        return EXPIRED
    if dead > 0:
        return DEAD_LETTERED
    return FAILED


def set_state(record: Mapping[str, object], new: str, now_ms: int) -> Change:
    """Move forward only: a repeat is a no-op, a regression is ignored and reported."""
    current = str(record.get("state") or QUEUED)
    change = Change()
    if new == current:
        return change
    if rank(new) <= rank(current):
        change.violation = True
        return change
    change.fields = {"state": new, "updatedAtMs": now_ms}
    if is_terminal(new):
        change.fields["completedAtMs"] = now_ms
        change.terminal = new
    return change


def parse_delivery(state: str | None) -> tuple[str, list[str]]:
    if not state:
        return "", []
    kind, *rest = state.split("|")
    return kind, rest


def claim(state: str | None, attempt: int, owner: str, now_ms: int, lease_until_ms: int) -> Change:
    """May ``owner`` send attempt ``attempt`` of this delivery now?"""
    kind, rest = parse_delivery(state)
    change = Change()
    inflight = f"i|{attempt}|{owner}|{lease_until_ms}"
    if kind in FINAL_CODES:
        change.claim = Claim.SKIP
        change.duplicate = True
    elif kind == "":
        change.claim = Claim.SEND
    elif kind == "r":
        scheduled = int(rest[0])
        if attempt < scheduled:
            change.claim = Claim.SKIP  # a stale copy of an earlier attempt
            change.duplicate = True
        else:
            change.claim = Claim.SEND
            change.increments["retryAttempted"] = 1
    elif kind == "i":
        held, holder, lease = int(rest[0]), rest[1], int(rest[2])
        if holder == owner:
            change.claim = Claim.SEND
        elif lease > now_ms:
            change.claim = Claim.BUSY  # a live worker is on it
            change.duplicate = True
        elif attempt < held:
            change.claim = Claim.SKIP
            change.duplicate = True
        else:
            # Its holder stopped renewing mid-request: the provider may or may not have it.
            change.claim = Claim.SEND_AGAIN
            change.possible_duplicate = True
            attempt = max(attempt, held)
            inflight = f"i|{attempt}|{owner}|{lease_until_ms}"
    else:  # unknown encoding: treat as pending
        change.claim = Claim.SEND
    if change.claim in (Claim.SEND, Claim.SEND_AGAIN):
        change.delivery_state = inflight
    return change


def settle(
    record: Mapping[str, object],
    state: str | None,
    outcome: Outcome,
    now_ms: int,
    *,
    next_attempt: int | None = None,
    due_ms: int | None = None,
    replay: bool = False,
) -> Change:
    """Record the end of one attempt."""
    kind, _ = parse_delivery(state)
    change = Change()
    if kind in FINAL_CODES:
        change.duplicate = True
        return change
    inc: dict[str, int] = {}
    if replay:
        # A dead letter replayed: counted apart, the publish's outcome stays what it was.
        if outcome is Outcome.ACCEPTED:
            inc["replaySucceeded"] = 1
            change.delivery_state = "a"
        elif outcome is Outcome.RETRY:
            change.delivery_state = f"r|{next_attempt}|{due_ms}"
        else:
            inc["replayFailed"] = 1
            change.delivery_state = {Outcome.EXPIRED: "x", Outcome.DEAD_LETTER: "d"}.get(outcome, "f")
        change.increments = inc
        change.fields = {"updatedAtMs": now_ms}
        return change
    if outcome is Outcome.ACCEPTED:
        inc = {"dispatched": 1, "succeeded": 1}
        change.delivery_state = "a"
    elif outcome is Outcome.REJECTED:
        inc = {"dispatched": 1, "failed": 1}
        change.delivery_state = "f"
    elif outcome is Outcome.EXPIRED:
        inc = {"dispatched": 1, "expired": 1}
        change.delivery_state = "x"
    elif outcome is Outcome.DEAD_LETTER:
        inc = {"deadLettered": 1}
        change.delivery_state = "d"
    elif outcome is Outcome.RETRY:
        assert next_attempt is not None and due_ms is not None
        inc = {"retryScheduled": 1}
        change.delivery_state = f"r|{next_attempt}|{due_ms}"
        change.fields["retryAfterMs"] = due_ms
    change.increments = inc
    change.fields["updatedAtMs"] = now_ms
    after = dict(record)
    for key, n in inc.items():
        after[key] = _int(record, key) + n
    current = str(record.get("state") or QUEUED)
    done = terminal_state(after)
    if done is not None and not is_terminal(current):
        change.fields.update({"state": done, "completedAtMs": now_ms})
        change.terminal = done
    return change


def public_view(
    record: Mapping[str, object],
    *,
    undelivered: list[dict[str, str]] | None = None,
    possible_duplicates: list[str] | None = None,
) -> dict[str, object]:
    """``GET …/status``: Sockudo's status shape, camelCase, plus support detail (capped lists)."""
    view: dict[str, object] = {
        "appId": record.get("appId"),
        "publishId": record.get("publishId"),
        "state": record.get("state") or QUEUED,
        "counters": {c: _int(record, c) for c in COUNTERS},
        "expectedRecipients": _int(record, "expectedRecipients"),
        "fanoutRegime": record.get("fanoutRegime") or "fastPath",
        "createdAtMs": _int(record, "createdAtMs"),
        "updatedAtMs": _int(record, "updatedAtMs"),
    }
    for key in ("retryAfterMs", "completedAtMs", "notBeforeMs", "expiresAtMs"):
        if record.get(key) not in (None, ""):
            view[key] = _int(record, key)
    if record.get("errorReason"):
        view["errorReason"] = record.get("errorReason")
    replay = {c: _int(record, c) for c in EXTRA_COUNTERS}
    if any(replay.values()):
        view["replays"] = replay
    if undelivered:
        view["undelivered"] = undelivered
    if possible_duplicates:
        view["possibleDuplicates"] = possible_duplicates
    return view
