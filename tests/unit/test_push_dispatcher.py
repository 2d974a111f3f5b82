"""The worker-side pipeline with the in-memory store, a recording queue and a scripted transport:
planning, retries as scheduled jobs, device invalidation, dead letters and replay, takeover of a
job whose worker died."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from sockudo.push import status as st
from sockudo.push.crypto import seal
from sockudo.push.dispatcher import Dispatcher, credential_aad
from sockudo.push.metrics import PushMetrics
from sockudo.push.providers import ACCEPTED, DEVICE_TERMINAL, PROVIDER_TRANSIENT, REJECTED, RETRYABLE, ProviderResult
from sockudo.push.service import PushService
from sockudo.push.settings import parse_settings
from sockudo.push.store import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


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

    def send(self, provider: str, device: dict[str, Any], rendered: Any, creds: Any, ctx: Any) -> ProviderResult:
        self.sent.append(ctx.device_id)
        queue = self.script.get(ctx.device_id)
        return queue.pop(0) if queue else ProviderResult(ACCEPTED, message_id="m")


def build(**settings: Any) -> tuple[PushService, Queue, Clients, Clock, CollectorRegistry]:
    clock, queue, clients, registry = Clock(), Queue(), Clients(), CollectorRegistry()
    config = parse_settings(
        {
            "credentials_key": "k",
            "batch_size": 2,
            "lease_ms": 1000,
            "retry": {"max_attempts": 2, "initial_backoff_ms": 100, "max_backoff_ms": 100},
            **settings,
        }
    )
    store = MemoryStore()
    metrics = PushMetrics(registry)
    dispatcher = Dispatcher(config, store, queue, lambda: clients, metrics, clock=clock)  # type: ignore[arg-type]
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


def run_all(service: PushService, queue: Queue, clock: Clock) -> None:
    while queue.jobs:
        for _, batch_id, at_ms in queue.take():
            if at_ms and at_ms > clock() * 1000:
                clock.t = at_ms / 1000
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
        service.metrics,  # type: ignore[arg-type]
        clock=clock,
    )
    dead.store.claim("app", pid, "d0", 1, dead.owner, int(clock.t * 1000), int(clock.t * 1000) + 1000)
    clock.t += 5
    assert service.dispatcher.reap() >= 1  # every unfinished job's lease has lapsed
    run_all(service, queue, clock)
    status = service.status("app", pid)
    assert status["state"] == st.SUCCEEDED and status["counters"]["succeeded"] == 3
    assert status["possibleDuplicates"] == ["d0"]
    assert (
        registry.get_sample_value(
            "sockudo_push_queue_local_requeued_total", {"stage": "dispatch", "reason": "lease_expired"}
        )
        >= 1
    )


def test_expired_pushes_are_never_sent() -> None:
    service, queue, clients, clock, registry = build()
    pid = service.publish(
        "app",
        {
            "recipients": [{"type": "device", "device_id": "d0"}],
            "payload": {"title": "x"},
            "expiresAtMs": int(clock.t * 1000) + 10,
        },
    )["publishId"]
    clock.t += 1
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
        service.metrics,  # type: ignore[arg-type]
        clock=clock,
    )
    now = int(clock.t * 1000)
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

    def gives_up(*args: Any, **kwargs: Any) -> st.Change:
        raise st.CasExhausted("push store: feedback transaction kept conflicting")

    service.store.settle = gives_up  # type: ignore[method-assign]
    batch_id = queue.take()[0][1]
    try:
        service.dispatcher.run(batch_id)
    except st.CasExhausted:
        pass
    else:
        raise AssertionError("a status update that was given up must fail the job (it is re-run)")
    assert registry.get_sample_value(failures, {"component": "feedback", "reason": "cas_exhausted"}) == 1

    def breaks(*args: Any, **kwargs: Any) -> st.Change:
        raise ConnectionError("redis went away")

    service.store.claim = breaks  # type: ignore[method-assign]
    try:
        service.dispatcher.run(batch_id)
    except ConnectionError:
        pass
    assert registry.get_sample_value(failures, {"component": "retry", "reason": "store_error"}) == 1
