"""Push storage: devices, channel subscriptions, credentials, publish status, plans, job leases
and dead letters. :class:`MemoryStore` here (embedded mode, not durable); the Redis store is in
``redis_store.py``. Both apply the pure transitions of ``status.py`` atomically.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

from sockudo.push import status as st


def apply_change(record: dict[str, Any], change: st.Change) -> None:
    for key, n in change.increments.items():
        record[key] = int(record.get(key) or 0) + n
    record.update(change.fields)


class MemoryStore:
    """Everything in this process's memory, guarded by one lock. Lost on restart (documented)."""

    durable = False

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.devices: dict[str, dict[str, dict[str, Any]]] = {}
        self.subs: dict[str, dict[str, set[str]]] = {}  # app → channel → device ids
        self.creds: dict[tuple[str, str], dict[str, Any]] = {}
        self.statuses: dict[tuple[str, str], dict[str, Any]] = {}
        self.deliveries: dict[tuple[str, str], dict[str, str]] = {}
        self.undelivered: dict[tuple[str, str], dict[str, str]] = {}
        self.duplicates: dict[tuple[str, str], set[str]] = {}
        self.plans: dict[tuple[str, str], dict[str, Any]] = {}
        self.plan_devices: dict[tuple[str, str], list[str]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.leases: dict[str, int] = {}
        self.dead: dict[str, dict[str, dict[str, Any]]] = {}
        self.jobs: dict[str, str] = {}

    # -- devices --

    def put_device(
        self, app_id: str, device: dict[str, Any], changed: Callable[[Mapping[str, Any], Mapping[str, Any]], bool]
    ) -> str:
        with self.lock:
            devices = self.devices.setdefault(app_id, {})
            old = devices.get(device["id"])
            if old is not None and not changed(old, device):
                return "unchanged"
            if old is not None:
                device = {**device, "createdAtMs": old.get("createdAtMs", device["createdAtMs"])}
            devices[device["id"]] = device
            return "inserted" if old is None else "updated"

    def get_device(self, app_id: str, device_id: str) -> dict[str, Any] | None:
        with self.lock:
            device = self.devices.get(app_id, {}).get(device_id)
            return dict(device) if device else None

    def get_devices(self, app_id: str, ids: list[str]) -> list[dict[str, Any] | None]:
        with self.lock:
            devices = self.devices.get(app_id, {})
            return [devices.get(i) for i in ids]

    def list_devices(
        self, app_id: str, after: str | None, limit: int, client_id: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        with self.lock:
            ids = sorted(
                i
                for i, d in self.devices.get(app_id, {}).items()
                if (after is None or i > after) and (client_id is None or d.get("clientId") == client_id)
            )
            page = ids[:limit]
            items = [dict(self.devices[app_id][i]) for i in page]
            return items, (page[-1] if len(ids) > limit else None)

    def delete_device(self, app_id: str, device_id: str) -> bool:
        with self.lock:
            if self.devices.get(app_id, {}).pop(device_id, None) is None:
                return False
            for channel, members in list(self.subs.get(app_id, {}).items()):
                members.discard(device_id)
                if not members:
                    del self.subs[app_id][channel]
            return True

    def client_devices(self, app_id: str, client_id: str) -> list[str]:
        with self.lock:
            return sorted(i for i, d in self.devices.get(app_id, {}).items() if d.get("clientId") == client_id)

    def delete_client_devices(self, app_id: str, client_id: str) -> int:
        with self.lock:
            ids = self.client_devices(app_id, client_id)
            return sum(1 for i in ids if self.delete_device(app_id, i))

    # -- subscriptions --

    def subscribe(self, app_id: str, channel: str, device_id: str) -> bool:
        with self.lock:
            if device_id not in self.devices.get(app_id, {}):
                return False
            self.subs.setdefault(app_id, {}).setdefault(channel, set()).add(device_id)
            return True

    def channel_devices(self, app_id: str, channel: str) -> list[str]:
        with self.lock:
            return sorted(self.subs.get(app_id, {}).get(channel, ()))

    def channel_count(self, app_id: str, channel: str) -> int:
        with self.lock:
            return len(self.subs.get(app_id, {}).get(channel, ()))

    def channel_providers(self, app_id: str, channel: str) -> set[str]:
        with self.lock:
            devices = self.devices.get(app_id, {})
            return {devices[i]["provider"] for i in self.subs.get(app_id, {}).get(channel, ()) if i in devices}

    def list_subscriptions(
        self, app_id: str, channel: str | None, device_id: str | None, after: str | None, limit: int
    ) -> tuple[list[tuple[str, str]], str | None]:
        with self.lock:
            pairs = sorted(
                (c, d)
                for c, members in self.subs.get(app_id, {}).items()
                for d in members
                if (channel is None or c == channel) and (device_id is None or d == device_id)
            )
            pairs = [p for p in pairs if after is None or f"{p[0]}\x00{p[1]}" > after]
            page = pairs[:limit]
            return page, (f"{page[-1][0]}\x00{page[-1][1]}" if len(pairs) > limit else None)

    def unsubscribe(self, app_id: str, channel: str | None, device_id: str | None) -> int:
        with self.lock:
            removed = 0
            for c, members in list(self.subs.get(app_id, {}).items()):
                if channel is not None and c != channel:
                    continue
                if device_id is None:
                    removed += len(members)
                    members.clear()
                elif device_id in members:
                    members.discard(device_id)
                    removed += 1
                if not members:
                    del self.subs[app_id][c]
            return removed

    def list_channels(self, app_id: str, after: str | None, limit: int) -> tuple[list[str], str | None]:
        with self.lock:
            channels = sorted(c for c in self.subs.get(app_id, {}) if after is None or c > after)
            return channels[:limit], (channels[limit - 1] if len(channels) > limit else None)

    # -- credentials --

    def put_credential(self, app_id: str, provider: str, sealed: str, now_ms: int) -> int:
        with self.lock:
            old = self.creds.get((app_id, provider))
            version = (old["version"] + 1) if old else 1
            self.creds[(app_id, provider)] = {"sealed": sealed, "version": version, "updatedAtMs": now_ms}
            return version

    def get_credential(self, app_id: str, provider: str) -> dict[str, Any] | None:
        with self.lock:
            found = self.creds.get((app_id, provider))
            return dict(found) if found else None

    # -- status --

    def create_status(
        self,
        app_id: str,
        publish_id: str,
        record: dict[str, Any],
        plan: dict[str, Any],
        ttl_s: int,
        job: tuple[str, dict[str, Any], int] | None = None,
    ) -> dict[str, Any] | None:
        """Create unless present; returns the existing record when there is one."""
        with self.lock:
            key = (app_id, publish_id)
            if key in self.statuses:
                return dict(self.statuses[key])
            self.statuses[key] = dict(record)
            self.plans[key] = plan
            if job is not None:
                self.put_batch(*job)
            return None

    def get_status(self, app_id: str, publish_id: str) -> dict[str, Any] | None:
        with self.lock:
            found = self.statuses.get((app_id, publish_id))
            return dict(found) if found else None

    def status_detail(self, app_id: str, publish_id: str, limit: int = 100) -> tuple[list[dict[str, str]], list[str]]:
        with self.lock:
            und = self.undelivered.get((app_id, publish_id), {})
            items = [{"deviceId": d, **_split_reason(v)} for d, v in sorted(und.items())[:limit]]
            return items, sorted(self.duplicates.get((app_id, publish_id), set()))[:limit]

    def get_plan(self, app_id: str, publish_id: str) -> dict[str, Any] | None:
        with self.lock:
            return self.plans.get((app_id, publish_id))

    def set_state(
        self, app_id: str, publish_id: str, state: str, now_ms: int, fields: Mapping[str, Any] | None = None
    ) -> st.Change:
        with self.lock:
            record = self.statuses.get((app_id, publish_id))
            if record is None:
                return st.Change()
            change = st.set_state(record, state, now_ms)
            if not change.violation:
                apply_change(record, change)
                if fields and (change.fields or state == record.get("state")):
                    record.update(fields)
            return change

    def save_plan_devices(self, app_id: str, publish_id: str, ids: list[str]) -> list[str]:
        with self.lock:
            return self.plan_devices.setdefault((app_id, publish_id), list(ids))

    def claim(
        self, app_id: str, publish_id: str, key: str, attempt: int, owner: str, now_ms: int, lease_until_ms: int
    ) -> st.Change:
        with self.lock:
            deliveries = self.deliveries.setdefault((app_id, publish_id), {})
            change = st.claim(deliveries.get(key), attempt, owner, now_ms, lease_until_ms)
            if change.delivery_state is not None:
                deliveries[key] = change.delivery_state
            record = self.statuses.get((app_id, publish_id))
            if record is not None:
                apply_change(record, change)
            if change.possible_duplicate:
                self.duplicates.setdefault((app_id, publish_id), set()).add(key)
            return change

    def settle(
        self,
        app_id: str,
        publish_id: str,
        key: str,
        outcome: st.Outcome,
        now_ms: int,
        *,
        next_attempt: int | None = None,
        due_ms: int | None = None,
        replay: bool = False,
        reason: str = "",
        dead_letter: tuple[dict[str, Any], int] | None = None,
    ) -> st.Change:
        """``dead_letter`` (letter, ttl s) is recorded with the transition, atomically, only when
        this settle ends the delivery (not for a duplicate, nor a replay)."""
        with self.lock:
            record = self.statuses.get((app_id, publish_id))
            if record is None:
                return st.Change(duplicate=True)
            deliveries = self.deliveries.setdefault((app_id, publish_id), {})
            change = st.settle(
                record, deliveries.get(key), outcome, now_ms, next_attempt=next_attempt, due_ms=due_ms, replay=replay
            )
            if change.delivery_state is not None:
                deliveries[key] = change.delivery_state
            apply_change(record, change)
            if not replay and not change.duplicate and outcome not in (st.Outcome.ACCEPTED, st.Outcome.RETRY):
                self.undelivered.setdefault((app_id, publish_id), {})[key] = f"{outcome.value}:{reason}"
                if dead_letter is not None:
                    self.add_dead_letter(app_id, *dead_letter)
            return change

    def claim_many(
        self,
        app_id: str,
        publish_id: str,
        entries: list[tuple[str, int]],
        owner: str,
        now_ms: int,
        lease_until_ms: int,
    ) -> list[st.Change]:
        """:meth:`claim` for several (key, attempt) of one publish."""
        with self.lock:
            return [self.claim(app_id, publish_id, k, a, owner, now_ms, lease_until_ms) for k, a in entries]

    def settle_many(self, app_id: str, publish_id: str, ops: list[st.SettleOp], now_ms: int) -> list[st.Change]:
        """:meth:`settle` for several deliveries of one publish."""
        with self.lock:
            return [
                self.settle(
                    app_id,
                    publish_id,
                    op.key,
                    op.outcome,
                    now_ms,
                    next_attempt=op.next_attempt,
                    due_ms=op.due_ms,
                    replay=op.replay,
                    reason=op.reason,
                    dead_letter=op.dead_letter,
                )
                for op in ops
            ]

    def complete(self, app_id: str, publish_id: str, now_ms: int) -> st.Change:
        """Give the publish its terminal state if its counters are complete and it has none yet
        (idempotent; ``change.terminal`` is set only by the call that wrote it)."""
        with self.lock:
            record = self.statuses.get((app_id, publish_id))
            if record is None:
                return st.Change()
            done = st.terminal_state(record)
            if done is None or st.is_terminal(str(record.get("state"))):
                return st.Change()
            change = st.set_state(record, done, now_ms)
            apply_change(record, change)
            return change

    def delivery_state(self, app_id: str, publish_id: str, key: str) -> str | None:
        with self.lock:
            return self.deliveries.get((app_id, publish_id), {}).get(key)

    # -- batches (job records + leases) --

    def put_batch(self, batch_id: str, batch: dict[str, Any], deadline_ms: int) -> bool:
        with self.lock:
            if batch_id in self.batches:
                return False
            self.batches[batch_id] = batch
            self.leases[batch_id] = deadline_ms
            return True

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        with self.lock:
            return self.batches.get(batch_id)

    def renew(self, batch_id: str, deadline_ms: int) -> bool:
        with self.lock:
            if batch_id not in self.leases:
                return False
            self.leases[batch_id] = deadline_ms
            return True

    def finish_batch(self, batch_id: str) -> None:
        with self.lock:
            self.batches.pop(batch_id, None)
            self.leases.pop(batch_id, None)
            self.jobs.pop(batch_id, None)

    def set_job(self, batch_id: str, job_id: str) -> None:
        with self.lock:
            self.jobs[batch_id] = job_id

    def get_job(self, batch_id: str) -> str | None:
        with self.lock:
            return self.jobs.get(batch_id)

    def bump(self, app_id: str, publish_id: str, counter: str, amount: int = 1) -> None:
        with self.lock:
            record = self.statuses.get((app_id, publish_id))
            if record is not None:
                record[counter] = int(record.get(counter) or 0) + amount

    def take_expired(self, now_ms: int, new_deadline_ms: int, limit: int = 100) -> list[str]:
        with self.lock:
            ids = sorted((d, b) for b, d in self.leases.items() if d <= now_ms)[:limit]
            for _, b in ids:
                self.leases[b] = new_deadline_ms
            return [b for _, b in ids]

    def lease_stats(self, now_ms: int) -> dict[str, tuple[int, float]]:
        with self.lock:
            return _lease_stats(list(self.leases.values()), [b.get("dueMs", 0) for b in self.batches.values()], now_ms)

    # -- dead letters --

    def add_dead_letter(self, app_id: str, letter: dict[str, Any], ttl_s: int) -> None:
        with self.lock:
            self.dead.setdefault(app_id, {})[letter["deadLetterId"]] = letter

    def get_dead_letter(self, app_id: str, letter_id: str) -> dict[str, Any] | None:
        with self.lock:
            found = self.dead.get(app_id, {}).get(letter_id)
            return dict(found) if found else None

    def update_dead_letter(self, app_id: str, letter_id: str, fields: Mapping[str, Any]) -> None:
        with self.lock:
            found = self.dead.get(app_id, {}).get(letter_id)
            if found is not None:
                found.update(fields)

    def list_dead_letters(
        self, app_id: str, since_ms: int | None, until_ms: int | None, provider: str | None, offset: int, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        with self.lock:
            letters = sorted(self.dead.get(app_id, {}).values(), key=lambda d: (-d["occurredAtMs"], d["deadLetterId"]))
        letters = [
            d
            for d in letters
            if (since_ms is None or d["occurredAtMs"] >= since_ms)
            and (until_ms is None or d["occurredAtMs"] <= until_ms)
            and (provider is None or d.get("provider") == provider)
        ]
        return [dict(d) for d in letters[offset : offset + limit]], len(letters) > offset + limit


def _split_reason(value: str) -> dict[str, str]:
    outcome, _, reason = value.partition(":")
    return {"outcome": outcome, "reason": reason}


def _lease_stats(deadlines: list[int], dues: list[int], now_ms: int) -> dict[str, tuple[int, float]]:
    """(count, oldest age s) for jobs ready/delayed, from due times."""
    ready = [d for d in dues if d <= now_ms]
    delayed = [d for d in dues if d > now_ms]
    return {
        "ready": (len(ready), (now_ms - min(ready)) / 1000 if ready else 0.0),
        "delayed": (len(delayed), 0.0),
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
