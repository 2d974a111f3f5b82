"""The worker-side pipeline with the in-memory store, a recording queue and a scripted transport:
planning, retries as scheduled jobs, device invalidation, dead letters and replay, takeover of a
job whose worker died."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sockudo.push import status as st
from sockudo.push.crypto import seal
from sockudo.push.dispatcher import Dispatcher, credential_aad, dead_letter_id
from sockudo.push.metrics import PushMetrics
from sockudo.push.providers import (
    ACCEPTED,
    CREDENTIAL_AUTH,
    DEVICE_TERMINAL,
    PROVIDER_TRANSIENT,
    REJECTED,
    RETRYABLE,
    ProviderResult,
    SendContext,
)
from sockudo.push.service import PushService
from sockudo.push.settings import parse_settings
from sockudo.push.store import MemoryStore
from tests.support.fakes import FakeClock


class Queue:
    backend = "memory"

    def __init__(self) -> None:
        self.jobs: list[tuple[str, str, int | None]] = []

    def enqueue(self, func: str, batch_id: str, at_ms: int | None = None) -> str:
        self.jobs.append((func, batch_id, at_ms))
        return f"job-{len(self.jobs)}"

    def job_state(self, job_id: str | None) -> str:
        return "other"

    def take(self) -> list[tuple[str, str, int | None]]:
        jobs, self.jobs = self.jobs, []
        return jobs


class Clients:
    def __init__(self) -> None:
        self.script: dict[str, list[ProviderResult]] = {}
        self.sent: list[str] = []

    def send(self, provider: str, device: Mapping[str, Any], rendered: Mapping[str, Any],
             credentials: Mapping[str, Any], ctx: SendContext) -> ProviderResult:
        self.sent.append(ctx.device_id)
        queue = self.script.get(ctx.device_id)
        return queue.pop(0) if queue else ProviderResult(ACCEPTED, message_id="m")

    def submit(self, provider: str, device: Mapping[str, Any], rendered: Mapping[str, Any],
               credentials: Mapping[str, Any], ctx: SendContext) -> Future[ProviderResult]:
        future: Future[ProviderResult] = Future()
        future.set_result(self.send(provider, device, rendered, credentials, ctx))
        return future


def build(store: Any = None, **settings: Any) -> tuple[PushService, Queue, Clients, FakeClock, CollectorRegistry]:
    clock, queue, clients, registry = FakeClock(1_700_000_000.0), Queue(), Clients(), CollectorRegistry()
    config = parse_settings(
        {
            "credentials_key": "k",
            "batch_size": 2,
            "lease_ms": 1000,
            "retry": {"max_attempts": 2, "initial_backoff_ms": 100, "max_backoff_ms": 100},
            **settings,
        }
    )
    store = store if store is not None else MemoryStore()
    metrics = PushMetrics(registry)
    dispatcher = Dispatcher(config, store, queue, lambda: clients, metrics, clock=clock)
    service = PushService(config, store, queue, dispatcher, metrics, clock=clock)
    for i in range(3):
        service.register_device(
            "app",
            {
                "id": f"d{i}",
                "platform": "android",
                "push": {"recipient": {"transportType": "gcm", "registrationToken": f"t{i}"}},
            },
        )
        service.subscribe("app", {"channel": "c", "deviceId": f"d{i}"})
    sealed = seal("k", b'{"serviceAccount": {}}', credential_aad("app", "fcm"))  # the transport is scripted
    service.store.put_credential("app", "fcm", sealed, 0)
    dispatcher.settings = config
    return service, queue, clients, clock, registry


def run_all(service: PushService, queue: Queue, clock: FakeClock) -> None:
    while queue.jobs:
        for _, batch_id, at_ms in queue.take():
            if at_ms and at_ms > clock() * 1000:
                clock.now = at_ms / 1000
            service.dispatcher.run(batch_id)


def publish(service: PushService) -> str:
    return str(
        service.publish("app", {"recipients": [{"type": "channel", "channel": "c"}], "payload": {"title": "x"}})[
            "publishId"
        ]
    )


def test_plan_dispatch_and_complete() -> None:
    service, queue, clients, clock, registry = build()
    pid = publish(service)
    run_all(service, queue, clock)
    status = service.status("app", pid)
    assert status["state"] == st.SUCCEEDED and status["counters"]["planned"] == 3
    assert sorted(clients.sent) == ["d0", "d1", "d2"]
    assert (
        registry.get_sample_value(
            "sockudo_push_dispatched_total", {"provider": "fcm", "status": "accepted", "app": "app"}
        )
        == 3
    )
    assert registry.get_sample_value("sockudo_push_delivery_status_total", {"status": "succeeded", "app": "app"}) == 1


def test_retry_is_a_scheduled_job_and_exhaustion_dead_letters_then_replay() -> None:
    service, queue, clients, clock, registry = build()
    down = ProviderResult(RETRYABLE, PROVIDER_TRANSIENT, "http_503", status=503)
    clients.script["d1"] = [down, down]
    pid = publish(service)
    run_all(service, queue, clock)
    status = service.status("app", pid)
    assert status["state"] == st.PARTIALLY_SUCCEEDED
    assert status["counters"]["retryScheduled"] == 1 and status["counters"]["deadLettered"] == 1
    letter = service.list_dead_letters("app", {})["items"][0]
    assert letter["key"] == "d1" and letter["replayable"]
    assert service.replay_dead_letter("app", letter["deadLetterId"])["replayed"]
    run_all(service, queue, clock)
    assert clients.sent.count("d1") == 3
    assert service.store.get_dead_letter("app", letter["deadLetterId"])["replayState"] == "succeeded"
    assert service.status("app", pid)["replays"]["replaySucceeded"] == 1


def test_device_terminal_deletes_the_device() -> None:
    service, queue, clients, clock, registry = build()
    clients.script["d0"] = [ProviderResult(REJECTED, DEVICE_TERMINAL, "UNREGISTERED", status=404)]
    pid = publish(service)
    run_all(service, queue, clock)
    assert service.store.get_device("app", "d0") is None and service.store.channel_devices("app", "c") == ["d1", "d2"]
    assert service.status("app", pid)["undelivered"] == [
        {"deviceId": "d0", "outcome": "rejected", "reason": "UNREGISTERED"}
    ]
    assert registry.get_sample_value("sockudo_push_token_invalidations_total", {"provider": "fcm", "app": "app"}) == 1


def test_a_job_whose_worker_died_is_taken_over_without_double_counting() -> None:
    service, queue, clients, clock, registry = build()
    pid = publish(service)
    plan = queue.take()
    service.dispatcher.run(plan[0][1])
    first = queue.take()[0][1]
    # A worker claims d0 then dies before settling it (nothing renews its lease any more).
    batch = service.store.get_batch(first)
    assert batch is not None
    dead = Dispatcher(
        service.settings,
        service.store,
        queue,
        lambda: clients,
        service.metrics,
        clock=clock,
    )
    dead.store.claim("app", pid, "d0", 1, dead.owner, int(clock.now * 1000), int(clock.now * 1000) + 1000)
    clock.now += 5
    assert service.dispatcher.reap() >= 1  # every unfinished job's lease has lapsed
    run_all(service, queue, clock)
    status = service.status("app", pid)
    assert status["state"] == st.SUCCEEDED and status["counters"]["succeeded"] == 3
    assert status["possibleDuplicates"] == ["d0"]
    assert (
        registry.get_sample_value(
            "sockudo_push_queue_local_requeued_total", {"stage": "dispatch", "reason": "lease_expired"}
        )
        or 0
    ) >= 1


def test_expired_pushes_are_never_sent() -> None:
    service, queue, clients, clock, registry = build()
    pid = service.publish(
        "app",
        {
            "recipients": [{"type": "device", "device_id": "d0"}],
            "payload": {"title": "x"},
            "expiresAtMs": int(clock.now * 1000) + 10,
        },
    )["publishId"]
    clock.now += 1
    run_all(service, queue, clock)
    assert service.status("app", pid)["state"] == st.EXPIRED and clients.sent == []


def test_a_second_run_leaves_deliveries_held_by_a_live_worker_and_the_job_to_it() -> None:
    service, queue, clients, clock, registry = build()
    pid = publish(service)
    service.dispatcher.run(queue.take()[0][1])
    first = queue.take()[0][1]
    other = Dispatcher(
        service.settings,
        service.store,
        queue,
        lambda: clients,
        service.metrics,
        clock=clock,
    )
    now = int(clock.now * 1000)
    other.store.claim("app", pid, "d0", 1, other.owner, now, now + 60_000)  # alive, mid-request
    service.dispatcher.run(first)
    assert clients.sent == ["d1"]  # d0 is left to its holder …
    assert service.store.get_batch(first) is not None  # … and so is finishing the job


def test_status_update_failures_are_counted_by_component_and_reason() -> None:
    """``sockudo_push_status_update_failures_total``: a settle whose transaction is given up (CAS
    exhausted) fails the job and is counted; a planner write that would go backwards is refused
    and counted (also as an invariant violation)."""
    service, queue, clients, clock, registry = build()
    pid = publish(service)
    run_all(service, queue, clock)  # succeeded
    failures = "sockudo_push_status_update_failures_total"

    # A re-run of the plan after the publish completed: DISPATCHING would go backwards.
    service.dispatcher.run_plan("replan", {"app": "app", "pid": pid})
    assert service.status("app", pid)["state"] == st.SUCCEEDED
    assert registry.get_sample_value(failures, {"component": "planner", "reason": "invariant_violation"}) == 1
    assert registry.get_sample_value("sockudo_push_invariant_violations_total", {"invariant": "status_transition"}) == 1
    sent = len(clients.sent)
    run_all(service, queue, clock)  # the re-run's batches find every delivery settled
    assert len(clients.sent) == sent

    pid = publish(service)
    service.dispatcher.run(queue.take()[0][1])  # planned

    def gives_up(*args: Any, **kwargs: Any) -> list[st.Change]:
        raise st.CasExhausted("push store: feedback transaction kept conflicting")

    service.store.settle_many = gives_up
    batch_id = queue.take()[0][1]
    try:
        service.dispatcher.run(batch_id)
    except st.CasExhausted:
        pass
    else:
        raise AssertionError("a status update that was given up must fail the job (it is re-run)")
    assert registry.get_sample_value(failures, {"component": "feedback", "reason": "cas_exhausted"}) == 1

    def breaks(*args: Any, **kwargs: Any) -> list[st.Change]:
        raise ConnectionError("redis went away")

    service.store.claim_many = breaks
    try:
        service.dispatcher.run(batch_id)
    except ConnectionError:
        pass
    assert registry.get_sample_value(failures, {"component": "retry", "reason": "store_error"}) == 1


# -- a worker killed between the steps of a settle ---------------------------------------------


class Killed(RuntimeError):
    """The worker process dies here (kill -9): nothing after this point of the job runs."""


def crash_once(obj: Any, name: str, when: Callable[..., bool], *, after: bool = False) -> list[int]:
    """Make ``obj.name`` kill the job the first time ``when(*args, **kwargs)`` holds — before the
    call, or right after it returned (``after=True``). Returns a list that counts the crashes."""
    real = getattr(obj, name)
    crashed: list[int] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hit = not crashed and when(*args, **kwargs)
        if hit and not after:
            crashed.append(1)
            raise Killed(name)
        result = real(*args, **kwargs)
        if hit:
            crashed.append(1)
            raise Killed(name)
        return result

    setattr(obj, name, wrapper)
    return crashed


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Any:
    if request.param == "memory":
        return MemoryStore()
    import redis

    from sockudo.push.redis_store import RedisStore

    server = request.getfixturevalue("redis_server")
    return RedisStore(redis.Redis.from_url(server.url), f"t:{uuid.uuid4().hex[:8]}:")


def publish_to(service: PushService, device_id: str) -> str:
    return str(
        service.publish("app", {"recipients": [{"type": "device", "device_id": device_id}], "payload": {"title": "x"}})[
            "publishId"
        ]
    )


def run_until_killed(service: PushService, queue: Queue, clock: FakeClock) -> None:
    """Run the queue until the simulated kill (which must happen)."""
    try:
        run_all(service, queue, clock)
    except Killed:
        return
    raise AssertionError("the simulated crash did not happen")


def rerun_dead_job(service: PushService, queue: Queue, clock: FakeClock) -> int:
    """The dead worker's lease lapses, the maintenance tick re-enqueues its job, it runs again."""
    clock.now += 5
    reaped = service.dispatcher.reap()
    run_all(service, queue, clock)
    return reaped


def run_killed(service: PushService, queue: Queue, clock: FakeClock) -> None:
    run_until_killed(service, queue, clock)
    assert rerun_dead_job(service, queue, clock) >= 1


def letters_of(service: PushService, pid: str) -> list[dict[str, Any]]:
    return [d for d in service.list_dead_letters("app", {})["items"] if d["publishId"] == pid]


@pytest.mark.parametrize(
    ("result", "final", "counter"),
    [
        (ProviderResult(ACCEPTED, message_id="m"), st.SUCCEEDED, "succeeded"),
        (ProviderResult(REJECTED, CREDENTIAL_AUTH, "SENDER_ID_MISMATCH", status=403), st.FAILED, "failed"),
    ],
    ids=["accepted", "rejected_with_dead_letter"],
)
def test_killed_between_the_counters_and_the_final_state_the_rerun_completes_the_publish(
    redis_server: Any, result: ProviderResult, final: str, counter: str
) -> None:
    """Redis: a settle's counters are one transaction, the terminal state a second write. A worker
    killed between the two leaves every counter complete and the state ``dispatching``; the
    re-run of its job (every claim now SKIP) must still finish the publish — and the dead letter
    of a rejected delivery must exist, once."""
    import redis

    from sockudo.push.redis_store import RedisStore

    store = RedisStore(redis.Redis.from_url(redis_server.url), f"t:{uuid.uuid4().hex[:8]}:")
    service, queue, clients, clock, registry = build(store)
    clients.script["d0"] = [result]
    pid = publish_to(service, "d0")
    crash_once(store, "set_state", lambda app, p, state, *a, **kw: st.is_terminal(state))
    run_until_killed(service, queue, clock)
    torn = service.status("app", pid)
    assert torn["state"] == st.DISPATCHING and torn["counters"][counter] == 1  # the crash window itself

    assert rerun_dead_job(service, queue, clock) == 1
    status = service.status("app", pid)
    assert status["state"] == final, status
    assert status["counters"][counter] == 1 and "completedAtMs" in status
    assert clients.sent == ["d0"]  # the settled delivery is not sent again
    assert registry.get_sample_value("sockudo_push_delivery_status_total", {"status": final, "app": "app"}) == 1
    letters = letters_of(service, pid)
    assert len(letters) == (1 if final == st.FAILED else 0)
    # Nothing left for the reaper: the re-run finished the job.
    clock.now += 5
    assert service.dispatcher.reap() == 0


@pytest.mark.parametrize(
    ("script", "final", "attempt", "stage"),
    [
        (
            [ProviderResult(REJECTED, CREDENTIAL_AUTH, "SENDER_ID_MISMATCH", status=403)],
            st.FAILED,
            1,
            "delivery_result",
        ),
        (
            [ProviderResult(RETRYABLE, PROVIDER_TRANSIENT, "http_503", status=503)] * 2,
            st.DEAD_LETTERED,
            2,
            "retry",
        ),
    ],
    ids=["rejected", "retries_exhausted"],
)
def test_killed_right_after_a_dead_letter_settle_the_rerun_leaves_exactly_one_dead_letter(
    store: Any, script: list[ProviderResult], final: str, attempt: int, stage: str
) -> None:
    """The settle that ends a delivery as failed / dead-lettered returns, then the worker dies.
    The counters already say ``deadLettered``/``failed``: the dead letter must exist (to list and
    replay), exactly once, with an id the re-run can recompute (publish, device, attempt)."""
    service, queue, clients, clock, registry = build(store)
    clients.script["d0"] = list(script)
    pid = publish_to(service, "d0")
    crashed = crash_once(
        store,
        "settle_many",
        lambda *a, **kw: any(op.outcome in (st.Outcome.REJECTED, st.Outcome.DEAD_LETTER) for op in a[2]),
        after=True,
    )
    run_killed(service, queue, clock)
    assert crashed == [1]
    status = service.status("app", pid)
    assert status["state"] == final, status
    letters = letters_of(service, pid)
    assert len(letters) == 1, letters
    letter = letters[0]
    assert letter["key"] == "d0" and letter["stage"] == stage and letter["attempts"] == attempt
    assert letter["deadLetterId"] == dead_letter_id("app", pid, "d0", attempt)
    assert clients.sent == ["d0"] * attempt  # nothing sent again by the re-run
    # The letter is a working one: replay delivers it.
    assert service.replay_dead_letter("app", letter["deadLetterId"])["replayed"]
    run_all(service, queue, clock)
    assert service.store.get_dead_letter("app", letter["deadLetterId"])["replayState"] == "succeeded"
    assert len(letters_of(service, pid)) == 1


def test_dead_letter_ids_are_deterministic_per_publish_device_and_attempt() -> None:
    first = dead_letter_id("app", "pub", "d0", 2)
    assert first == dead_letter_id("app", "pub", "d0", 2)
    others = {dead_letter_id("app", "pub", "d0", 3), dead_letter_id("app", "pub", "d1", 2),
              dead_letter_id("app", "pub2", "d0", 2), dead_letter_id("app2", "pub", "d0", 2)}
    assert first not in others and len(others) == 4


def test_a_duplicate_settle_writes_no_second_dead_letter(store: Any) -> None:
    """The store writes a dead letter with the settle that ends the delivery, in one step; the
    same settle again (a re-run) is a duplicate and writes nothing."""
    record = st.new_record("a", "p", intent_hash="h", expected=1, now_ms=0, not_before_ms=None, expires_at_ms=None)
    store.create_status("a", "p", record, {}, 3600)
    store.set_state("a", "p", st.DISPATCHING, 1, {"planned": 1})
    letter = {"deadLetterId": dead_letter_id("a", "p", "d", 1), "appId": "a", "publishId": "p", "key": "d",
              "provider": "fcm", "occurredAtMs": 5, "replayable": True}
    first = store.settle("a", "p", "d", st.Outcome.REJECTED, 5, reason="x", dead_letter=(letter, 3600))
    later = {**letter, "occurredAtMs": 6}
    again = store.settle("a", "p", "d", st.Outcome.REJECTED, 6, reason="x", dead_letter=(later, 3600))
    assert not first.duplicate and again.duplicate
    items, more = store.list_dead_letters("a", None, None, None, 0, 10)
    assert [d["deadLetterId"] for d in items] == [letter["deadLetterId"]] and not more
    assert items[0]["occurredAtMs"] == 5
    assert store.get_status("a", "p")["state"] == st.FAILED


def test_a_rerun_in_the_same_process_flags_what_the_dead_run_left_in_flight(store: Any) -> None:
    """A worker keeps its dispatcher across jobs. A run that died after its provider accepted a
    delivery but before the settle is re-run by the same dispatcher: the delivery is sent again
    and listed as a possible duplicate (the re-run is a different claim owner)."""
    service, queue, clients, clock, registry = build(store)
    pid = publish_to(service, "d0")
    crashed = crash_once(store, "settle_many", lambda *a, **kw: True)  # the answer is never settled
    run_killed(service, queue, clock)
    assert crashed == [1]
    status = service.status("app", pid)
    assert status["state"] == st.SUCCEEDED, status
    assert clients.sent == ["d0", "d0"]
    assert status["possibleDuplicates"] == ["d0"]
