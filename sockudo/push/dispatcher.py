"""The push pipeline's work: planning a publish and dispatching delivery batches.

Runs inside RQ work-horses (``workers/push.py``) or the embedded in-process queue. Every job is a
*job record* in the store (``plan`` or ``dispatch``) with a **lease**: the worker renews it after
each delivery; a record whose lease lapses (its worker was killed) is re-enqueued by the
maintenance tick. Re-running a job is always safe — each delivery (publishId, deviceId) is
*claimed* before sending and *settled* after, atomically, so a delivery that already has an end
is never sent again. Only a request that was in flight when its worker died may be sent twice;
such devices are listed in the status record's ``possibleDuplicates``.

Retries are scheduled (a new ``dispatch`` record due later, ``enqueue_at`` in RQ), never slept.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sockudo.core import keys
from sockudo.push import status as st
from sockudo.push.crypto import CryptoError, sha256_hex, unseal
from sockudo.push.metrics import PushMetrics, RecordingMetrics
from sockudo.push.providers import (
    CREDENTIAL_AUTH,
    DEVICE_TERMINAL,
    EXPIRED,
    REJECTED,
    RETRYABLE,
    UNKNOWN,
    ProviderResult,
    SendContext,
)
from sockudo.push.queue import DISPATCH_JOB, PLAN_JOB
from sockudo.push.retry import next_attempt, parse_retry_after
from sockudo.push.settings import PushSettings

logger = logging.getLogger("sockudo_push")

Metrics = PushMetrics | RecordingMetrics
# A scheduled job this overdue has no running RQ scheduler (its lock may belong to a dead worker).
SCHEDULER_STALL_MS = 5000
# Provider answers wait at most this long, or until this many have arrived, before their batch
# settle (one Redis transaction). A worker killed in that window leaves them claimed: they are
# sent again by the takeover and listed as possible duplicates.
SETTLE_EVERY_S = 0.05
SETTLE_GROUP = 50


def now_ms() -> int:
    return int(time.time() * 1000)


def credential_aad(app_id: str, provider: str) -> str:
    return f"push-credential:{app_id}:{provider}"


def load_credentials(store: Any, key: str | None, app_id: str, provider: str) -> dict[str, Any] | None:
    entry = store.get_credential(app_id, provider)
    if entry is None or key is None:
        return None
    try:
        material = json.loads(unseal(key, entry["sealed"], credential_aad(app_id, provider)))
    except (CryptoError, ValueError):
        logger.error(
            "stored push credentials do not decrypt with the configured key",
            extra={"app_id": app_id, "provider": provider, "error": "credential_decrypt_failed"},
        )
        return None
    material["version"] = entry.get("version", 1)
    return dict(material)


def dead_letter_id(app_id: str, publish_id: str, device_id: str, attempt: int) -> str:
    """Deterministic: a re-run of the job that dead-letters this delivery names the same letter."""
    return sha256_hex(keys.join(app_id, publish_id, device_id, str(attempt)))[:32]


@dataclass
class _Delivery:
    device_id: str
    attempt: int
    provider: str
    replay: str | None
    device: dict[str, Any] | None
    key: str


@dataclass
class _Settles:
    """Answers of one publish waiting for their batch settle: (op, replay id, message id, then)."""

    app_id: str
    publish_id: str
    items: list[tuple[st.SettleOp, str | None, str | None, Callable[[st.Change], None] | None]] = field(
        default_factory=list
    )


class Pending(Protocol):
    """A send under way: a ``concurrent.futures.Future`` or anything with these two methods
    (``result`` is only called once the callback ran)."""

    def add_done_callback(self, fn: Callable[[Any], object]) -> None: ...

    def result(self) -> ProviderResult: ...


class Sender(Protocol):
    """What the dispatcher sends with: ``ProviderClients`` (tests hand it a scripted one)."""

    def submit(self, provider: str, device: Mapping[str, Any], rendered: Mapping[str, Any],
               credentials: Mapping[str, Any], ctx: SendContext) -> Pending: ...


class Dispatcher:
    def __init__(
        self,
        settings: PushSettings,
        store: Any,
        queue: Any,
        clients: Callable[[], Sender],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self._clients_factory = clients
        self._clients: Sender | None = None
        self._clients_pid = 0
        self.metrics = metrics
        self.clock = clock
        self.owner = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"  # each run claims as owner:pid:run
        self._leases: dict[str, tuple[int, int]] = {}  # job → (renewed at, lease deadline), ms

    def clients(self) -> Sender:
        """The provider clients (made on first use; again in a forked child)."""
        if self._clients is None or self._clients_pid != os.getpid():
            self._clients = self._clients_factory()
            self._clients_pid = os.getpid()
        return self._clients

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- scheduling helpers --

    def _renew(self, batch_id: str, force: bool = False) -> int:
        """Extend the job's lease — every lease/4 at most — and return its deadline."""
        now = self.now_ms()
        renewed_at, until = self._leases.get(batch_id, (0, 0))
        if force or now - renewed_at >= self.settings.lease_ms // 4:
            until = now + self.settings.lease_ms
            self.store.renew(batch_id, until)
            self._leases[batch_id] = (now, until)
        return until

    def submit(self, batch_id: str, batch: dict[str, Any]) -> bool:
        """Record a job (lease deadline = due + lease) and hand it to the queue; False if it existed."""
        due = int(batch.get("dueMs") or self.now_ms())
        if not self.store.put_batch(batch_id, batch, due + self.settings.lease_ms):
            return False
        self.enqueue(batch_id, batch)
        return True

    def enqueue(self, batch_id: str, batch: dict[str, Any]) -> None:
        func = PLAN_JOB if batch.get("kind") == "plan" else DISPATCH_JOB
        try:
            job_id = self.queue.enqueue(func, batch_id, at_ms=batch.get("dueMs"))
            self.store.set_job(batch_id, job_id)
        except Exception as exc:  # the lease reaper enqueues it once Redis answers again
            logger.warning(
                "could not enqueue push job; the maintenance tick retries it",
                extra={"app_id": batch.get("app"), "publish_id": batch.get("pid"), "error": str(exc)},
            )

    # -- entry point --

    def run(self, batch_id: str) -> None:
        batch = self.store.get_batch(batch_id)
        if batch is None:
            return  # finished by an earlier run
        due = int(batch.get("dueMs") or 0)
        if due > self.now_ms() + 50:  # started early (a reaper takeover, a queue's coarse clock): wait again
            self.store.renew(batch_id, due + self.settings.lease_ms)
            self.enqueue(batch_id, batch)
            return
        self._renew(batch_id, force=True)
        try:
            if batch.get("kind") == "plan":
                self.run_plan(batch_id, batch)
            else:
                self.run_batch(batch_id, batch)
        finally:
            self._leases.pop(batch_id, None)

    # -- planning --

    def _expand(self, app_id: str, recipients: list[list[str]]) -> list[str]:
        ids: dict[str, None] = {}
        for kind, value in recipients:
            if kind == "device":
                if self.store.get_device(app_id, value) is not None:
                    ids.setdefault(value)
            elif kind == "client":
                for device_id in self.store.client_devices(app_id, value):
                    ids.setdefault(device_id)
            elif kind == "channel":
                for device_id in self.store.channel_devices(app_id, value):
                    ids.setdefault(device_id)
        return list(ids)

    def run_plan(self, batch_id: str, batch: dict[str, Any]) -> None:
        app_id, publish_id = batch["app"], batch["pid"]
        started = time.perf_counter()
        record = self.store.get_status(app_id, publish_id)
        plan = self.store.get_plan(app_id, publish_id)
        if record is None or plan is None:
            self.store.finish_batch(batch_id)
            return
        now = self.now_ms()
        if st.rank(str(record.get("state"))) < st.rank(st.PLANNING):
            self._status(
                "planner", app_id, publish_id, lambda: self.store.set_state(app_id, publish_id, st.PLANNING, now)
            )
        ids = self.store.save_plan_devices(app_id, publish_id, self._expand(app_id, plan["recipients"]))
        due = max(now, int(plan.get("notBeforeMs") or 0))
        fields: dict[str, Any] = {"planned": len(ids)}
        if due > now:
            fields["retryAfterMs"] = due
        if not ids:
            change = self._status(
                "planner",
                app_id,
                publish_id,
                lambda: self.store.set_state(
                    app_id,
                    publish_id,
                    st.SUCCEEDED,
                    now,
                    {**fields, "errorReason": "no registered devices matched the recipients"},
                ),
            )
            self._completed(app_id, publish_id, change)
            self.store.finish_batch(batch_id)
            return
        self._status(
            "planner", app_id, publish_id, lambda: self.store.set_state(app_id, publish_id, st.DISPATCHING, now, fields)
        )
        size = self.settings.batch_size
        emitted: dict[str, int] = {}
        for index in range(0, len(ids), size):
            chunk = ids[index : index + size]
            devices = self.store.get_devices(app_id, chunk)
            items = []
            for device_id, device in zip(chunk, devices, strict=True):
                provider = device["provider"] if device else "unknown"
                emitted[provider] = emitted.get(provider, 0) + 1
                items.append([device_id, 1, provider, None])
            self.submit(
                keys.join(app_id, publish_id, f"d{index // size}"),
                {"kind": "dispatch", "app": app_id, "pid": publish_id, "items": items, "dueMs": due},
            )
            self._renew(batch_id)
        for provider, count in emitted.items():
            self.metrics.inc("sockudo_push_delivery_jobs_emitted", {"provider": provider, "app": app_id}, count)
        if due > now:
            self.metrics.inc("sockudo_push_scheduled_jobs", {"app": app_id, "status": "not_before"})
        self.metrics.observe("sockudo_push_planner_duration_seconds", {"app": app_id}, time.perf_counter() - started)
        logger.info(
            "push publish planned",
            extra={
                "app_id": app_id,
                "publish_id": publish_id,
                "planned": len(ids),
                "not_before_ms": plan.get("notBeforeMs"),
            },
        )
        self.store.finish_batch(batch_id)

    # -- dispatch --

    def run_batch(self, batch_id: str, batch: dict[str, Any]) -> None:
        """Claim the batch's deliveries (one transaction), send them concurrently through the
        provider clients' pools, and settle the answers in groups as they arrive (one
        transaction per group), renewing the job's lease meanwhile."""
        app_id, publish_id = batch["app"], batch["pid"]
        record = self.store.get_status(app_id, publish_id)
        plan = self.store.get_plan(app_id, publish_id)
        if record is None or plan is None:
            self.store.finish_batch(batch_id)
            return
        first_ms = max(int(record.get("createdAtMs") or 0), int(plan.get("notBeforeMs") or 0))
        items = batch["items"]
        devices = self.store.get_devices(app_id, [item[0] for item in items])
        deliveries = []
        for (device_id, attempt, provider, replay), device in zip(items, devices, strict=True):
            if device is not None:
                provider = device["provider"]  # re-registered since planning: send where it is now
            # The delivery's key: the device id as a key segment (no ':' or '#'), plus '#replay:…'
            # for a dead letter's replay; no device id can pass for another device's replay.
            key = keys.segment(device_id) if replay is None else f"{keys.segment(device_id)}#replay:{replay}"
            deliveries.append(_Delivery(device_id, int(attempt), provider, replay, device, key))
        now = self.now_ms()
        # Each run claims as its own owner: a re-run of this job — even in the same process,
        # which keeps its dispatcher across jobs — finds the deliveries a dead run left in
        # flight held by another owner, and flags them as possible duplicates.
        owner = f"{self.owner}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        # The deliveries' lease is the job's: when a takeover finds the job lapsed, its in-flight
        # deliveries have lapsed too.
        lease_until = self._renew(batch_id)
        claims = self._status_many(
            "retry",
            app_id,
            publish_id,
            lambda: self.store.claim_many(
                app_id, publish_id, [(d.key, d.attempt) for d in deliveries], owner, now, lease_until
            ),
        )
        settles = _Settles(app_id, publish_id)
        credentials: dict[str, dict[str, Any] | None] = {}
        expires = plan.get("expiresAtMs")
        in_flight: dict[Pending, tuple[_Delivery, float]] = {}
        # Finished sends arrive here (a queue, not concurrent.futures.wait: that re-registers a
        # waiter on every pending future at each call, quadratic in the batch).
        answers: queue.SimpleQueue[Pending] = queue.SimpleQueue()
        busy = False
        for delivery, claim in zip(deliveries, claims, strict=True):
            if claim.claim is st.Claim.BUSY:
                busy = True
                continue
            if claim.claim is st.Claim.SKIP:
                continue
            labels = {"provider": delivery.provider, "app": app_id}
            if claim.increments.get("retryAttempted"):
                self.metrics.inc("sockudo_push_retry_attempted", labels)
            if claim.possible_duplicate:
                logger.warning(
                    "push delivery resent: its previous worker died mid-request (possible duplicate)",
                    extra=self._log(app_id, publish_id, delivery),
                )
            if expires is not None and now >= int(expires):
                self._settle(settles, delivery, st.Outcome.EXPIRED, reason="expired")
                self.metrics.inc("sockudo_push_dispatched", {**labels, "status": "expired"})
                continue
            if delivery.device is None:
                self._settle(settles, delivery, st.Outcome.REJECTED, reason="device_not_found")
                continue
            if delivery.provider not in credentials:
                credentials[delivery.provider] = load_credentials(
                    self.store, self.settings.credentials_key, app_id, delivery.provider
                )
            creds = credentials[delivery.provider]
            if creds is None:
                result = ProviderResult(REJECTED, CREDENTIAL_AUTH, "credentials_missing")
                self._answered(settles, plan, first_ms, delivery, result, 0.0)
                continue
            ctx = SendContext(
                app_id, publish_id, delivery.device_id, int(expires) if expires is not None else None, self.clock()
            )
            future = self.clients().submit(
                delivery.provider, delivery.device, plan["rendered"][delivery.provider], creds, ctx
            )
            in_flight[future] = (delivery, time.perf_counter())
            future.add_done_callback(answers.put)
        self._flush(settles)
        tick = self.settings.lease_ms / 4000
        oldest = 0.0  # when the oldest answer not yet settled arrived
        while in_flight:
            timeout = tick if not settles.items else max(0.0, oldest + SETTLE_EVERY_S - time.monotonic())
            done = []
            try:
                done.append(answers.get(timeout=timeout))
                while True:
                    done.append(answers.get_nowait())
            except queue.Empty:
                pass
            for future in done:
                delivery, started = in_flight.pop(future)
                try:
                    result = future.result()
                except Exception as exc:  # a bug in a sender must not strand the batch's other answers
                    logger.exception("push sender failed", extra=self._log(app_id, publish_id, delivery))
                    result = ProviderResult(RETRYABLE, UNKNOWN, f"sender_error: {type(exc).__name__}")
                if not settles.items:
                    oldest = time.monotonic()
                self._answered(settles, plan, first_ms, delivery, result, time.perf_counter() - started)
            # Answers are settled in groups: one transaction per SETTLE_EVERY_S or SETTLE_GROUP answers.
            if not in_flight or len(settles.items) >= SETTLE_GROUP or time.monotonic() - oldest >= SETTLE_EVERY_S:
                self._flush(settles)
            self._renew(batch_id)
        self._flush(settles)
        # A re-run after a worker died between a settle's counters and the state write finds
        # every claim settled: the publish is completed here, whoever counted last.
        self._reconcile(app_id, publish_id)
        if not busy:  # else another live run of this job still works on it and finishes it
            self.store.finish_batch(batch_id)

    @staticmethod
    def _log(app_id: str, publish_id: str, delivery: _Delivery) -> dict[str, Any]:
        log = {
            "app_id": app_id,
            "publish_id": publish_id,
            "provider": delivery.provider,
            "device_id": delivery.device_id,
            "attempt": delivery.attempt,
        }
        if delivery.device is not None:
            log["token_hash"] = delivery.device.get("tokenHash")
        return log

    def _answered(
        self,
        settles: _Settles,
        plan: dict[str, Any],
        first_ms: int,
        delivery: _Delivery,
        result: ProviderResult,
        elapsed: float,
    ) -> None:
        """Count and log one provider answer and queue its settle (and retry or dead letter)."""
        app_id, publish_id = settles.app_id, settles.publish_id
        labels = {"provider": delivery.provider, "app": app_id}
        self.metrics.inc("sockudo_push_dispatched", {**labels, "status": result.outcome})
        self.metrics.observe("sockudo_push_dispatch_duration_seconds", {**labels, "status": result.outcome}, elapsed)
        if result.failure_class:
            self.metrics.inc("sockudo_push_provider_failures", {**labels, "failure_class": result.failure_class})
        log = self._log(app_id, publish_id, delivery)
        log.update({"error": result.reason or None, "failure_class": result.failure_class, "status": result.status})
        if result.outcome == EXPIRED:
            logger.info("push expired before it was sent", extra=log)
            self._settle(settles, delivery, st.Outcome.EXPIRED, reason="expired")
            return
        if result.outcome == "accepted":
            logger.info("push delivered", extra=log)
            self._settle(settles, delivery, st.Outcome.ACCEPTED, message_id=result.message_id)
            return
        if result.outcome == RETRYABLE:
            self._retry(settles, delivery, plan, first_ms, result, log)
            return
        # rejected
        if result.failure_class == DEVICE_TERMINAL:
            # (Not "token invalid": the log redaction takes "token <word>" for a credential.)
            logger.warning("push device invalidated by the provider; device and its subscriptions deleted", extra=log)
            if self.store.delete_device(app_id, delivery.device_id):
                self.metrics.inc("sockudo_push_token_invalidations", labels)
            self._settle(settles, delivery, st.Outcome.REJECTED, reason=result.reason)
            return
        logger.warning("push delivery rejected", extra=log)
        letter = None
        if delivery.replay is None:
            letter = self._dead_letter(
                app_id,
                publish_id,
                delivery.device_id,
                delivery.provider,
                result,
                delivery.attempt,
                stage="delivery_result",
            )
        self._settle(
            settles,
            delivery,
            st.Outcome.REJECTED,
            reason=result.reason,
            dead_letter=letter,
            then=lambda change: self._dead_lettered(letter, change),
        )

    def _retry(
        self,
        settles: _Settles,
        delivery: _Delivery,
        plan: dict[str, Any],
        first_ms: int,
        result: ProviderResult,
        log: dict[str, Any],
    ) -> None:
        app_id, publish_id, key = settles.app_id, settles.publish_id, delivery.key
        attempt, provider = delivery.attempt, delivery.provider
        labels = {"provider": provider, "app": app_id}
        now = self.now_ms()
        decision = next_attempt(
            self.settings.retry,
            attempt=attempt,
            key=keys.join(app_id, publish_id, key),
            now_ms=now,
            first_attempt_ms=first_ms,
            retry_after_ms=parse_retry_after(result.retry_after, now),
            expires_at_ms=plan.get("expiresAtMs"),
        )
        if decision.retry:
            retry_id = keys.join(app_id, publish_id, "r", key, str(attempt + 1))
            # The job record first: a crash after it leaves a retry that runs (and is flagged as a
            # possible duplicate), never a delivery that nobody will attempt again.
            batch = {
                "kind": "dispatch",
                "app": app_id,
                "pid": publish_id,
                "dueMs": decision.due_ms,
                "items": [[delivery.device_id, attempt + 1, provider, delivery.replay]],
            }
            created = self.store.put_batch(retry_id, batch, decision.due_ms + self.settings.lease_ms)

            def scheduled(change: st.Change) -> None:
                if change.duplicate:
                    if created:
                        self.store.finish_batch(retry_id)
                    return
                if created:
                    self.enqueue(retry_id, batch)
                self.metrics.inc("sockudo_push_retry_scheduled", labels)
                self.metrics.inc("sockudo_push_scheduled_jobs", {"app": app_id, "status": "retry"})
                logger.warning(
                    "push delivery failed; retry scheduled",
                    extra={**log, "retry_delay_ms": decision.due_ms - now, "retryable": True},
                )

            self._settle(
                settles,
                delivery,
                st.Outcome.RETRY,
                next_attempt=attempt + 1,
                due_ms=decision.due_ms,
                then=scheduled,
            )
            return
        if decision.reason == "expired":
            self.metrics.inc("sockudo_push_retry_expired", labels)
            logger.warning("push delivery expired before its next retry", extra=log)
            self._settle(settles, delivery, st.Outcome.EXPIRED, reason=result.reason)
            return
        self.metrics.inc("sockudo_push_retry_dead_lettered", labels)
        logger.error("push delivery dead-lettered", extra={**log, "reason": decision.reason})
        letter = None
        if delivery.replay is None:
            letter = self._dead_letter(
                app_id,
                publish_id,
                delivery.device_id,
                provider,
                result,
                attempt,
                stage="retry",
                reason=f"{decision.reason}: {result.reason}",
            )
        self._settle(
            settles,
            delivery,
            st.Outcome.DEAD_LETTER,
            reason=f"{decision.reason}:{result.reason}",
            dead_letter=letter,
            then=lambda change: self._dead_lettered(letter, change),
        )

    def _settle(
        self,
        settles: _Settles,
        delivery: _Delivery,
        outcome: st.Outcome,
        *,
        reason: str = "",
        message_id: str | None = None,
        next_attempt: int | None = None,
        due_ms: int | None = None,
        dead_letter: dict[str, Any] | None = None,
        then: Callable[[st.Change], None] | None = None,
    ) -> None:
        """Queue one attempt's settle for the next :meth:`_flush`. ``dead_letter`` is written by
        the store with the settle itself (one transaction) when it ends the delivery, so a
        worker killed right after can't leave a counted dead letter that does not exist."""
        letter = (dead_letter, self.settings.dead_letter_ttl_days * 86_400) if dead_letter is not None else None
        op = st.SettleOp(
            delivery.key,
            outcome,
            next_attempt=next_attempt,
            due_ms=due_ms,
            replay=delivery.replay is not None,
            reason=reason,
            dead_letter=letter,
        )
        settles.items.append((op, delivery.replay, message_id, then))

    def _flush(self, settles: _Settles) -> None:
        """Settle every queued answer in one store transaction, then run their follow-ups."""
        if not settles.items:
            return
        items, settles.items = settles.items, []
        app_id, publish_id = settles.app_id, settles.publish_id
        changes = self._status_many(
            "feedback",
            app_id,
            publish_id,
            lambda: self.store.settle_many(app_id, publish_id, [item[0] for item in items], self.now_ms()),
        )
        for (op, replay, message_id, then), change in zip(items, changes, strict=True):
            if change.duplicate:
                self.metrics.inc("sockudo_push_duplicate_suppressed", {"app": app_id})
            if replay is not None and op.outcome is not st.Outcome.RETRY and not change.duplicate:
                self.store.update_dead_letter(
                    app_id,
                    replay,
                    {
                        "replayState": {"accepted": "succeeded", "dead_letter": "dead_lettered"}.get(
                            op.outcome.value, op.outcome.value
                        ),
                        "replayReason": op.reason or None,
                        "messageId": message_id,
                        "replayable": op.outcome is not st.Outcome.ACCEPTED,
                        "replayedAtMs": self.now_ms(),
                    },
                )
            if then is not None:
                then(change)
            self._completed(app_id, publish_id, change)

    def _status_many(
        self, component: str, app_id: str, publish_id: str, write: Callable[[], list[st.Change]]
    ) -> list[st.Change]:
        """:meth:`_status` for a batch write."""
        result: list[st.Change] = []

        def one() -> st.Change:
            result.extend(write())
            merged = st.Change()
            merged.violation = any(change.violation for change in result)
            return merged

        self._status(component, app_id, publish_id, one)
        return result

    def _status(self, component: str, app_id: str, publish_id: str, write: Callable[[], st.Change]) -> st.Change:
        """One status write (planner state change, retry claim, feedback settle). A write that
        fails (CAS given up, store error: re-raised, the job is re-run) or is refused as a
        backwards transition counts in ``sockudo_push_status_update_failures_total``."""
        try:
            change = write()
        except Exception as exc:
            reason = "cas_exhausted" if isinstance(exc, st.CasExhausted) else "store_error"
            self.metrics.inc("sockudo_push_status_update_failures", {"component": component, "reason": reason})
            logger.error(
                "push status update failed",
                extra={"app_id": app_id, "publish_id": publish_id, "component": component, "reason": reason,
                       "error": f"{type(exc).__name__}: {exc}"},
            )
            raise
        if change.violation:
            self.metrics.inc(
                "sockudo_push_status_update_failures", {"component": component, "reason": "invariant_violation"}
            )
            self.metrics.inc("sockudo_push_invariant_violations", {"invariant": "status_transition"})
            logger.warning(
                "push status update refused: it would go backwards",
                extra={"app_id": app_id, "publish_id": publish_id, "component": component},
            )
        return change

    def _reconcile(self, app_id: str, publish_id: str) -> None:
        """Complete a publish whose counters all add up but whose state is not terminal yet (the
        worker that counted last died before writing it). Idempotent: only the writer counts it."""
        record = self.store.get_status(app_id, publish_id)
        if record is None or st.is_terminal(str(record.get("state"))) or st.terminal_state(record) is None:
            return
        change = self._status(
            "feedback", app_id, publish_id, lambda: self.store.complete(app_id, publish_id, self.now_ms())
        )
        self._completed(app_id, publish_id, change)

    def _completed(self, app_id: str, publish_id: str, change: st.Change) -> None:
        if change.terminal is None:
            return
        self.metrics.inc("sockudo_push_delivery_status", {"status": change.terminal, "app": app_id})
        record = self.store.get_status(app_id, publish_id) or {}
        logger.info(
            "push publish completed",
            extra={
                "app_id": app_id,
                "publish_id": publish_id,
                "state": change.terminal,
                **{c: int(record.get(c) or 0) for c in ("planned", "succeeded", "failed", "expired", "deadLettered")},
            },
        )

    def _dead_letter(
        self,
        app_id: str,
        publish_id: str,
        device_id: str,
        provider: str,
        result: ProviderResult,
        attempts: int,
        *,
        stage: str,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """The dead-letter record of this delivery's last attempt (written by the settle)."""
        at = self.now_ms()
        return {
            "deadLetterId": dead_letter_id(app_id, publish_id, device_id, attempts),
            "appId": app_id,
            "publishId": publish_id,
            "provider": provider,
            "stage": stage,
            "key": device_id,
            "reason": reason or result.reason,
            "failureClass": result.failure_class,
            "attempts": attempts,
            "occurredAtMs": at,
            "replayable": True,
            "replayState": None,
            "replayCount": 0,
        }

    def _dead_lettered(self, letter: dict[str, Any] | None, change: st.Change) -> None:
        if letter is None or change.duplicate:
            return  # a replay, or a settle that had already happened (and wrote the letter)
        logger.warning(
            "push dead letter recorded",
            extra={
                "app_id": letter["appId"],
                "publish_id": letter["publishId"],
                "provider": letter["provider"],
                "error": letter["reason"],
                "dead_letter_id": letter["deadLetterId"],
            },
        )

    # -- maintenance: jobs whose worker died --

    def reap(self, limit: int = 100) -> int:
        now = self.now_ms()
        taken = self.store.take_expired(now, now + self.settings.lease_ms, limit)
        requeued = 0
        for batch_id in taken:
            batch = self.store.get_batch(batch_id)
            if batch is None:
                self.store.finish_batch(batch_id)
                continue
            state = self.queue.job_state(self.store.get_job(batch_id))
            if state == "queued":
                continue  # still waiting behind others: nobody has started it, nothing died
            if state == "scheduled" and int(batch.get("dueMs") or 0) > now - SCHEDULER_STALL_MS:
                continue  # RQ's scheduler will move it when due
            self.enqueue(batch_id, {**batch, "dueMs": None})
            requeued += 1
            self.metrics.inc(
                "sockudo_push_queue_local_requeued", {"stage": str(batch.get("kind")), "reason": "lease_expired"}
            )
            logger.warning(
                "push job taken over: its worker stopped renewing the lease",
                extra={"app_id": batch.get("app"), "publish_id": batch.get("pid"), "batch_id": batch_id},
            )
        return requeued
