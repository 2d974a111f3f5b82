"""The publish status state machine and the per-delivery claim/settle rules, pure."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from sockudo.push import status as st
from sockudo.push.store import MemoryStore, apply_change


def record(planned: int = 3, state: str = st.DISPATCHING) -> dict[str, Any]:
    r = st.new_record("app", "pub", intent_hash="h", expected=planned, now_ms=0, not_before_ms=None, expires_at_ms=None)
    r.update({"planned": planned, "state": state})
    return r


def settle_all(outcomes: list[st.Outcome], planned: int) -> dict[str, Any]:
    r = record(planned)
    for i, outcome in enumerate(outcomes):
        change = st.settle(r, f"i|1|w|{10**13}", outcome, now_ms=i + 1)
        apply_change(r, change)
    return r


@pytest.mark.parametrize(
    ("outcomes", "final"),
    [
        ([st.Outcome.ACCEPTED] * 3, st.SUCCEEDED),
        ([st.Outcome.ACCEPTED, st.Outcome.REJECTED, st.Outcome.ACCEPTED], st.PARTIALLY_SUCCEEDED),
        ([st.Outcome.REJECTED, st.Outcome.EXPIRED, st.Outcome.DEAD_LETTER], st.EXPIRED),
        ([st.Outcome.REJECTED, st.Outcome.DEAD_LETTER, st.Outcome.REJECTED], st.DEAD_LETTERED),
        ([st.Outcome.REJECTED] * 3, st.FAILED),
    ],
)
def test_terminal_state_follows_the_counters(outcomes: list[st.Outcome], final: str) -> None:
    r = settle_all(outcomes, 3)
    assert r["state"] == final and r["completedAtMs"] == 3


def test_not_terminal_until_every_planned_delivery_has_an_end() -> None:
    r = settle_all([st.Outcome.ACCEPTED, st.Outcome.ACCEPTED], 3)
    assert r["state"] == st.DISPATCHING
    retry = st.settle(r, "i|1|w|9", st.Outcome.RETRY, 5, next_attempt=2, due_ms=99)
    assert retry.delivery_state == "r|2|99" and retry.increments == {"retryScheduled": 1} and retry.terminal is None


def test_counters_match_the_spec_feedback_rules() -> None:
    r = record()
    assert st.settle(r, None, st.Outcome.ACCEPTED, 1).increments == {"dispatched": 1, "succeeded": 1}
    assert st.settle(r, None, st.Outcome.REJECTED, 1).increments == {"dispatched": 1, "failed": 1}
    assert st.settle(r, None, st.Outcome.EXPIRED, 1).increments == {"dispatched": 1, "expired": 1}
    assert st.settle(r, None, st.Outcome.DEAD_LETTER, 1).increments == {"deadLettered": 1}


def test_a_final_delivery_is_never_counted_twice() -> None:
    r = record()
    for final in ("a", "f", "x", "d"):
        change = st.settle(r, final, st.Outcome.ACCEPTED, 1)
        assert change.duplicate and not change.increments and change.delivery_state is None
        assert st.claim(final, 1, "w", 1, 100).claim is st.Claim.SKIP


def test_state_only_moves_forward() -> None:
    r = record(state=st.QUEUED)
    change = st.set_state(r, st.DISPATCHING, 5)
    apply_change(r, change)
    assert r["state"] == st.DISPATCHING
    back = st.set_state(r, st.PLANNING, 6)
    assert back.violation and not back.fields
    assert st.set_state(r, st.DISPATCHING, 7).fields == {}  # a repeat is a no-op
    apply_change(r, st.set_state(r, st.SUCCEEDED, 8))
    assert st.set_state(r, st.FAILED, 9).violation  # terminal is final


def test_claims_after_a_crash_and_for_retries() -> None:
    assert st.claim(None, 1, "w1", 100, 200).claim is st.Claim.SEND
    # Another live worker holds it: skip.
    assert st.claim("i|1|w1|200", 1, "w2", 150, 250).claim is st.Claim.BUSY
    # Its lease lapsed (worker died mid-request): send again, flagged as a possible duplicate.
    again = st.claim("i|1|w1|200", 1, "w2", 300, 400)
    assert again.claim is st.Claim.SEND_AGAIN and again.possible_duplicate and again.delivery_state == "i|1|w2|400"
    # A retry is claimed by its attempt, counted once; an older copy is stale.
    retry = st.claim("r|2|500", 2, "w3", 600, 700)
    assert retry.claim is st.Claim.SEND and retry.increments == {"retryAttempted": 1}
    assert st.claim("r|2|500", 1, "w3", 600, 700).claim is st.Claim.SKIP


def test_replays_are_counted_apart_and_leave_the_state() -> None:
    r = record(planned=1, state=st.DEAD_LETTERED)
    change = st.settle(r, None, st.Outcome.ACCEPTED, 10, replay=True)
    assert change.increments == {"replaySucceeded": 1} and "state" not in change.fields


def test_public_view_shape() -> None:
    view = st.public_view(record(), undelivered=[{"deviceId": "d", "outcome": "rejected", "reason": "x"}])
    counters, undelivered = view["counters"], view["undelivered"]
    assert isinstance(counters, dict) and set(counters) == set(st.COUNTERS)
    assert isinstance(undelivered, list) and undelivered[0]["deviceId"] == "d"
    assert view["state"] == st.DISPATCHING
    assert "replays" not in view and "possibleDuplicates" not in view


@settings(max_examples=150, deadline=None)
@given(hs.lists(hs.tuples(hs.integers(0, 4), hs.sampled_from(list(st.Outcome)), hs.booleans()), max_size=40))
def test_any_interleaving_of_duplicated_results_counts_each_device_once(
    events: list[tuple[int, st.Outcome, bool]],
) -> None:
    """Five devices; results arrive in any order, repeated (re-run jobs); the record never
    over-counts and reaches a terminal state exactly when every device has a final result."""
    store = MemoryStore()
    store.create_status("a", "p", record(planned=5), {}, 60)
    finals: dict[int, st.Outcome] = {}
    attempts = {d: 1 for d in range(5)}
    for device, outcome, _ in events:
        key = f"d{device}"
        claim = store.claim("a", "p", key, attempts[device], "w", 0, 10)
        if claim.claim in (st.Claim.SKIP, st.Claim.BUSY):
            continue
        if outcome is st.Outcome.RETRY:
            store.settle("a", "p", key, outcome, 1, next_attempt=attempts[device] + 1, due_ms=2)
            attempts[device] += 1
        else:
            store.settle("a", "p", key, outcome, 1)
            finals.setdefault(device, outcome)
    r = store.get_status("a", "p")
    assert r is not None
    ends = r["succeeded"] + r["failed"] + r["expired"] + r["deadLettered"]
    assert ends == len(finals)
    assert r["succeeded"] == sum(1 for o in finals.values() if o is st.Outcome.ACCEPTED)
    assert (r["state"] in st.TERMINAL) == (len(finals) == 5)
