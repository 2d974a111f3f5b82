"""The Redis push store under concurrent workers (a real redis-server): every delivery counted
once, the publish completed exactly once, even with each result reported twice at the same time."""

from __future__ import annotations

import threading
import uuid

import redis

from sockudo.push import status as st
from sockudo.push.redis_store import RedisStore
from tests.support.procs import RedisServer


def test_concurrent_duplicated_settles_count_once_and_complete_once(redis_server: RedisServer) -> None:
    store = RedisStore(redis.Redis.from_url(redis_server.url), f"t:{uuid.uuid4().hex[:6]}:")
    record = st.new_record("a", "p", intent_hash="h", expected=200, now_ms=0, not_before_ms=None, expires_at_ms=None)
    assert store.create_status("a", "p", record, {}, 3600) is None
    assert store.create_status("a", "p", record, {}, 3600) is not None  # the second admission sees the first
    store.set_state("a", "p", st.DISPATCHING, 1, {"planned": 200})
    terminals: list[str] = []
    lock = threading.Lock()

    def worker(devices: range) -> None:
        for d in devices:
            outcome = st.Outcome.ACCEPTED if d % 10 else st.Outcome.REJECTED
            change = store.settle("a", "p", f"d{d}", outcome, 2, reason="x")
            if change.terminal:
                with lock:
                    terminals.append(change.terminal)

    # Four threads, two over each half: every device's result arrives twice, concurrently.
    threads = [
        threading.Thread(target=worker, args=(r,))
        for r in (range(0, 100), range(0, 100), range(100, 200), range(100, 200))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = store.get_status("a", "p")
    assert final is not None
    assert (int(final["succeeded"]), int(final["failed"]), int(final["dispatched"])) == (180, 20, 200)
    assert final["state"] == st.PARTIALLY_SUCCEEDED and terminals == [st.PARTIALLY_SUCCEEDED]
    undelivered, _ = store.status_detail("a", "p")
    assert len(undelivered) == 20 and {u["outcome"] for u in undelivered} == {"rejected"}


def test_claims_and_leases(redis_server: RedisServer) -> None:
    store = RedisStore(redis.Redis.from_url(redis_server.url), f"t:{uuid.uuid4().hex[:6]}:")
    record = st.new_record("a", "p", intent_hash="h", expected=1, now_ms=0, not_before_ms=None, expires_at_ms=None)
    store.create_status("a", "p", record, {}, 3600)
    assert store.claim("a", "p", "d", 1, "w1", 100, 200).claim is st.Claim.SEND
    assert store.claim("a", "p", "d", 1, "w2", 150, 250).claim is st.Claim.BUSY
    again = store.claim("a", "p", "d", 1, "w2", 300, 400)
    assert again.claim is st.Claim.SEND_AGAIN and store.status_detail("a", "p")[1] == ["d"]
    assert store.put_batch("b1", {"kind": "dispatch", "dueMs": 0}, 1000)
    assert not store.put_batch("b1", {"kind": "dispatch", "dueMs": 0}, 1000)
    assert store.take_expired(999, 5000) == [] and store.take_expired(1000, 5000) == ["b1"]
    assert store.take_expired(1000, 5000) == []  # taken once, its deadline moved on
    store.finish_batch("b1")
    assert store.get_batch("b1") is None and store.take_expired(10_000, 20_000) == []


def test_a_transaction_that_keeps_conflicting_raises_cas_exhausted(redis_server: RedisServer) -> None:
    """The dispatcher counts ``CasExhausted`` as a status update failure (reason cas_exhausted)."""
    from redis.exceptions import WatchError

    conflicts: list[str] = []
    client = redis.Redis.from_url(redis_server.url)
    store = RedisStore(client, f"t:{uuid.uuid4().hex[:6]}:", on_conflict=conflicts.append)

    def always_conflicts(pipe: object) -> None:
        raise WatchError("another writer")

    try:
        store._cas("planner", [store.k("pub", "a", "p")], always_conflicts)
    except st.CasExhausted as exc:
        assert "planner" in str(exc)
    else:
        raise AssertionError("expected CasExhausted")
    assert conflicts and set(conflicts) == {"planner"}


def test_publish_and_device_ids_with_colons_keep_their_deliveries_apart(redis_server: RedisServer) -> None:
    """("a:x", "b") and ("a", "x:b") shared the key ``ds:{app}:a:x:b``: the second claim found
    the first's state and the second delivery was never attempted."""
    store = RedisStore(redis.Redis.from_url(redis_server.url), f"t:{uuid.uuid4().hex[:6]}:")
    for pid in ("a:x", "a"):
        record = st.new_record("app", pid, intent_hash="h", expected=1, now_ms=0, not_before_ms=None,
                               expires_at_ms=None)
        store.create_status("app", pid, record, {}, 3600)
    assert store.claim("app", "a:x", "b", 1, "w1", 100, 200).claim is st.Claim.SEND
    store.settle("app", "a:x", "b", st.Outcome.ACCEPTED, 150)
    assert store.claim("app", "a", "x:b", 1, "w1", 160, 260).claim is st.Claim.SEND


def test_batch_claim_and_settle_match_one_by_one(redis_server: RedisServer) -> None:
    """claim_many / settle_many: one transaction for a batch, the same transitions and counters
    as one delivery at a time; a re-run's claims skip settled deliveries and duplicates count once."""
    store = RedisStore(redis.Redis.from_url(redis_server.url), f"t:{uuid.uuid4().hex[:6]}:")
    record = st.new_record("a", "p", intent_hash="h", expected=4, now_ms=0, not_before_ms=None, expires_at_ms=None)
    store.create_status("a", "p", record, {}, 3600)
    store.set_state("a", "p", st.DISPATCHING, 1, {"planned": 4})
    claims = store.claim_many("a", "p", [(f"d{i}", 1) for i in range(4)], "w1", 10, 1000)
    assert [c.claim for c in claims] == [st.Claim.SEND] * 4
    assert [c.claim for c in store.claim_many("a", "p", [("d0", 1)], "w2", 20, 2000)] == [st.Claim.BUSY]
    letter = {"deadLetterId": "L1", "occurredAtMs": 5, "key": "d3"}
    ops = [
        st.SettleOp("d0", st.Outcome.ACCEPTED),
        st.SettleOp("d1", st.Outcome.ACCEPTED),
        st.SettleOp("d2", st.Outcome.RETRY, next_attempt=2, due_ms=500),
        st.SettleOp("d3", st.Outcome.REJECTED, reason="BadDeviceToken", dead_letter=(letter, 3600)),
    ]
    changes = store.settle_many("a", "p", ops, 30)
    assert not any(c.duplicate for c in changes) and not any(c.terminal for c in changes)
    again = store.settle_many("a", "p", ops[:2], 31)  # a re-run reporting the same answers
    assert all(c.duplicate for c in again)
    status = store.get_status("a", "p")
    assert status is not None
    assert (int(status["succeeded"]), int(status["failed"]), int(status["retryScheduled"])) == (2, 1, 1)
    assert store.get_dead_letter("a", "L1") is not None
    rerun = store.claim_many("a", "p", [("d0", 1), ("d2", 2)], "w3", 600, 2000)
    assert [c.claim for c in rerun] == [st.Claim.SKIP, st.Claim.SEND]
    last = store.settle_many("a", "p", [st.SettleOp("d2", st.Outcome.ACCEPTED)], 700)
    assert last[0].terminal == st.PARTIALLY_SUCCEEDED
    assert store.get_status("a", "p")["state"] == st.PARTIALLY_SUCCEEDED  # type: ignore[index]


def test_a_queued_job_missing_from_its_queue_is_not_waiting_its_turn(redis_server: RedisServer) -> None:
    """The lease reaper leaves a job that waits its turn in the queue alone; one whose status says
    queued but that is in no queue list (its worker took it and died, or lost Redis, before RQ
    marked it started) must be taken over, or its deliveries wait forever."""
    import time

    from sockudo.push.queue import DISPATCH_JOB, RqPushQueue

    client = redis.Redis.from_url(redis_server.url)
    queue = RqPushQueue(client, "push-" + uuid.uuid4().hex[:8])
    waiting = queue.enqueue(DISPATCH_JOB, "a:p:d0")
    later = queue.enqueue(DISPATCH_JOB, "a:p:d1", at_ms=int(time.time() * 1000) + 60_000)
    assert queue.job_state(waiting) == "queued"
    assert queue.job_state(later) == "scheduled"
    client.lrem(queue.queue.key, 0, waiting)  # taken off the queue by a worker that then died
    assert queue.job_state(waiting) == "other"
    assert queue.job_state("no-such-job") == "other"


class _CutAfter(redis.Connection):
    """A connection to the real server that is cut once ``budget`` more commands have gone out
    (Redis stopping between two of a caller's writes)."""

    budget: int | None = None

    def send_packed_command(self, command: object, check_health: bool = True) -> None:
        if _CutAfter.budget is not None:
            if _CutAfter.budget <= 0:
                raise redis.ConnectionError("connection cut")
            _CutAfter.budget -= 1
        super().send_packed_command(command, check_health)


def test_a_job_record_is_never_left_without_its_lease(redis_server: RedisServer) -> None:
    """A job record that exists without its lease is never run: a re-run of its planner finds it
    already recorded (so does not enqueue it) and the lease reaper does not know it. Whichever
    command the connection is cut after, the record and its lease are written together or not
    at all."""
    prefix = f"t:{uuid.uuid4().hex[:6]}:"
    healthy = RedisStore(redis.Redis.from_url(redis_server.url), prefix)
    pool = redis.ConnectionPool.from_url(redis_server.url, connection_class=_CutAfter)
    cut = RedisStore(redis.Redis(connection_pool=pool), prefix)
    assert cut.put_batch("warm", {"kind": "dispatch", "dueMs": 0}, 1000)  # the connection is up
    try:
        for budget in range(4):
            batch_id = f"b{budget}"
            cut.r.ping()  # connected again: the budget counts the store's own commands
            _CutAfter.budget = budget
            try:
                cut.put_batch(batch_id, {"kind": "dispatch", "dueMs": 0}, 1000)
            except redis.ConnectionError:
                pass
            _CutAfter.budget = None
            if healthy.get_batch(batch_id) is not None:
                assert batch_id in healthy.take_expired(1000, 5000), budget
    finally:
        _CutAfter.budget = None
        pool.disconnect()
