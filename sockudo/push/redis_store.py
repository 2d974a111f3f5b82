"""The Redis push store: the same operations as :class:`~sockudo.push.store.MemoryStore`, durable
and shared by the server and every RQ worker.

Keys (prefix ``push.redis_prefix``, default ``sockudo:push:``)::

    dev:{app}:{id}        device record (JSON)          devs:{app}      zset of device ids (lex)
    cli:{app}:{client}    set of device ids             devch:{app}:{id} set of its channels
    ch:{app}:{channel}    set of subscribed device ids   chans:{app}     zset of channels (lex)
    cred:{app}:{provider} hash {sealed, version, updatedAtMs}   chprov:{app}:{channel} provider → subscriber count
    pub:{app}:{pid}       status record (hash)           ds:{app}:{pid}:{device} one delivery's state
    und:{app}:{pid}       undelivered device → outcome:reason    dup:{app}:{pid} possible duplicates (set)
    plan:{app}:{pid}      rendered payloads + recipients (JSON)  pdev:{app}:{pid} planned device ids (JSON)
    batch:{id}            a job's record (JSON)          leases / due   zsets: lease deadline / due time
    dl:{app}:{id}         dead letter (JSON)             dls:{app}      zset by occurredAtMs

Every client-chosen id is the key's last part (so it may contain ``:``) except in ``ds``, whose
``{pid}`` is a key segment (``sockudo/core/keys.py``: ``%``, ``:`` and ``#`` percent-encoded) and
whose ``{device}`` is the dispatcher's delivery key (the device id as a segment, ``#replay:…``
for a replay). Job ids join their parts the same way. Ids without those characters give the
same keys as before the encoding.

Delivery transitions are optimistic transactions on the delivery's own key (WATCH it, compute
with ``status.py``, MULTI/EXEC, retry on conflict); the counters move with HINCRBY in the same
MULTI, which reads the record back so completion is decided on exact counters, then written by a
monotonic WATCH/MULTI state change. Concurrent workers never lose or double an update, and
workers on different devices of one publish never conflict. Publish records and plans expire
after ``publish_status_ttl_days``; delivery states once no job can run again (max retry age + 2 d).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from redis.exceptions import WatchError

from sockudo.core import keys
from sockudo.push import status as st
from sockudo.push.store import _split_reason, dumps

logger = logging.getLogger(__name__)

_TAKE_EXPIRED_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""

# A job record and its lease in one step: a record written without its lease (Redis stopping
# between the two writes) would be found by a re-run of its planner ("already exists", so not
# enqueued again) and by no lease reaper, and its deliveries would never be sent.
_PUT_BATCH_LUA = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
return 1
"""

MAX_CAS = 64


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode_hash(raw: Mapping[Any, Any]) -> dict[str, Any]:
    return {_s(k): _s(v) for k, v in raw.items()}


class RedisStore:
    durable = True

    def __init__(
        self,
        client: Any,
        prefix: str = "sockudo:push:",
        status_ttl_s: int = 30 * 86400,
        on_conflict: Callable[[str], None] | None = None,
        delivery_ttl_s: int | None = None,
    ) -> None:
        self.r = client
        self.p = prefix
        # Delivery states only need to outlive every re-run of the publish's jobs.
        self.delivery_ttl_s = delivery_ttl_s or status_ttl_s
        self.status_ttl_s = status_ttl_s
        self.on_conflict = on_conflict or (lambda component: None)
        self._take_expired = client.register_script(_TAKE_EXPIRED_LUA)
        self._put_batch = client.register_script(_PUT_BATCH_LUA)

    def k(self, *parts: str) -> str:
        return self.p + ":".join(parts)

    def _cas(self, component: str, watch: list[str], body: Callable[[Any], Any]) -> Any:
        """Run ``body(pipe)`` under WATCH; it reads, calls ``pipe.multi()``, queues writes."""
        for _ in range(MAX_CAS):
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(*watch)
                    result = body(pipe)
                    pipe.execute()
                    return result
                except WatchError:
                    self.on_conflict(component)
        raise st.CasExhausted(f"push store: {component} transaction kept conflicting")

    # -- devices --

    def put_device(
        self, app_id: str, device: dict[str, Any], changed: Callable[[Mapping[str, Any], Mapping[str, Any]], bool]
    ) -> str:
        key = self.k("dev", app_id, device["id"])
        devch = self.k("devch", app_id, device["id"])

        def body(pipe: Any) -> str:
            raw = pipe.get(key)
            old = json.loads(raw) if raw else None
            if old is not None and not changed(old, device):
                pipe.multi()
                return "unchanged"
            new = dict(device)
            channels: list[str] = []
            if old is not None:
                new["createdAtMs"] = old.get("createdAtMs", new["createdAtMs"])
                if old.get("provider") != new["provider"]:
                    channels = [_s(c) for c in pipe.smembers(devch)]
            pipe.multi()
            pipe.set(key, dumps(new))
            for channel in channels:  # the device changed provider (e.g. re-registered from another browser)
                pipe.hincrby(self.k("chprov", app_id, channel), old["provider"], -1)  # type: ignore[index]
                pipe.hincrby(self.k("chprov", app_id, channel), new["provider"], 1)
            pipe.zadd(self.k("devs", app_id), {device["id"]: 0})
            if old is not None and old.get("clientId") and old.get("clientId") != new.get("clientId"):
                pipe.srem(self.k("cli", app_id, old["clientId"]), device["id"])
            if new.get("clientId"):
                pipe.sadd(self.k("cli", app_id, new["clientId"]), device["id"])
            return "inserted" if old is None else "updated"

        return str(self._cas("device", [key, devch], body))

    def get_device(self, app_id: str, device_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self.k("dev", app_id, device_id))
        return json.loads(raw) if raw else None

    def get_devices(self, app_id: str, ids: list[str]) -> list[dict[str, Any] | None]:
        if not ids:
            return []
        raws = self.r.mget([self.k("dev", app_id, i) for i in ids])
        return [json.loads(r) if r else None for r in raws]

    def list_devices(
        self, app_id: str, after: str | None, limit: int, client_id: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        if client_id is not None:
            ids = sorted(i for i in self.client_devices(app_id, client_id) if after is None or i > after)
            more = len(ids) > limit
            ids = ids[:limit]
        else:
            start = f"({after}" if after is not None else "-"
            ids = [_s(i) for i in self.r.zrangebylex(self.k("devs", app_id), start, "+", start=0, num=limit + 1)]
            more = len(ids) > limit
            ids = ids[:limit]
        items = [d for d in self.get_devices(app_id, ids) if d is not None]
        return items, (ids[-1] if more and ids else None)

    def delete_device(self, app_id: str, device_id: str) -> bool:
        key = self.k("dev", app_id, device_id)
        devch = self.k("devch", app_id, device_id)
        emptied: list[str] = []

        def body(pipe: Any) -> bool:
            raw = pipe.get(key)
            if raw is None:
                pipe.multi()
                return False
            old = json.loads(raw)
            channels = [_s(c) for c in pipe.smembers(devch)]
            emptied[:] = channels
            pipe.multi()
            pipe.delete(key, devch)
            pipe.zrem(self.k("devs", app_id), device_id)
            if old.get("clientId"):
                pipe.srem(self.k("cli", app_id, old["clientId"]), device_id)
            for channel in channels:
                pipe.srem(self.k("ch", app_id, channel), device_id)
                pipe.hincrby(self.k("chprov", app_id, channel), old["provider"], -1)
            return True

        deleted = bool(self._cas("device", [key, devch], body))
        for channel in emptied:
            self._drop_empty_channel(app_id, channel)
        return deleted

    def _drop_empty_channel(self, app_id: str, channel: str) -> None:
        if self.r.scard(self.k("ch", app_id, channel)) == 0:
            self.r.zrem(self.k("chans", app_id), channel)

    def client_devices(self, app_id: str, client_id: str) -> list[str]:
        return sorted(_s(i) for i in self.r.smembers(self.k("cli", app_id, client_id)))

    def delete_client_devices(self, app_id: str, client_id: str) -> int:
        return sum(1 for i in self.client_devices(app_id, client_id) if self.delete_device(app_id, i))

    # -- subscriptions --

    def subscribe(self, app_id: str, channel: str, device_id: str) -> bool:
        key = self.k("dev", app_id, device_id)
        devch = self.k("devch", app_id, device_id)

        def body(pipe: Any) -> bool:
            raw = pipe.get(key)
            if raw is None:
                pipe.multi()
                return False
            member = pipe.sismember(devch, channel)
            pipe.multi()
            if not member:
                pipe.sadd(self.k("ch", app_id, channel), device_id)
                pipe.sadd(devch, channel)
                pipe.zadd(self.k("chans", app_id), {channel: 0})
                # Per-channel provider counts: admission checks credentials without reading every device.
                pipe.hincrby(self.k("chprov", app_id, channel), json.loads(raw)["provider"], 1)
            return True

        return bool(self._cas("subscription", [key, devch], body))

    def _unsubscribe_one(self, app_id: str, channel: str, device_id: str) -> bool:
        key = self.k("dev", app_id, device_id)
        devch = self.k("devch", app_id, device_id)

        def body(pipe: Any) -> bool:
            raw = pipe.get(key)
            member = pipe.sismember(devch, channel)
            pipe.multi()
            pipe.srem(self.k("ch", app_id, channel), device_id)  # also cleans a stray member
            if not member:
                return False
            pipe.srem(devch, channel)
            if raw is not None:
                pipe.hincrby(self.k("chprov", app_id, channel), json.loads(raw)["provider"], -1)
            return True

        return bool(self._cas("subscription", [key, devch], body))

    def channel_devices(self, app_id: str, channel: str) -> list[str]:
        return sorted(_s(i) for i in self.r.smembers(self.k("ch", app_id, channel)))

    def channel_count(self, app_id: str, channel: str) -> int:
        return int(self.r.scard(self.k("ch", app_id, channel)))

    def channel_providers(self, app_id: str, channel: str) -> set[str]:
        counts = self.r.hgetall(self.k("chprov", app_id, channel))
        return {_s(p) for p, n in counts.items() if int(n) > 0}

    def list_subscriptions(
        self, app_id: str, channel: str | None, device_id: str | None, after: str | None, limit: int
    ) -> tuple[list[tuple[str, str]], str | None]:
        if channel is not None:
            pairs = [(channel, d) for d in self.channel_devices(app_id, channel) if device_id is None or d == device_id]
        elif device_id is not None:
            pairs = [(_s(c), device_id) for c in self.r.smembers(self.k("devch", app_id, device_id))]
        else:
            pairs = []
            for c in self.r.zrangebylex(self.k("chans", app_id), "-", "+"):
                pairs.extend((_s(c), d) for d in self.channel_devices(app_id, _s(c)))
                if len(pairs) > 100_000:
                    break
        pairs.sort()
        pairs = [p for p in pairs if after is None or f"{p[0]}\x00{p[1]}" > after]
        page = pairs[:limit]
        return page, (f"{page[-1][0]}\x00{page[-1][1]}" if len(pairs) > limit else None)

    def unsubscribe(self, app_id: str, channel: str | None, device_id: str | None) -> int:
        removed = 0
        if channel is not None:
            members = [device_id] if device_id is not None else self.channel_devices(app_id, channel)
            removed = sum(1 for d in members if self._unsubscribe_one(app_id, channel, d))
            self._drop_empty_channel(app_id, channel)
        elif device_id is not None:
            for c in [_s(c) for c in self.r.smembers(self.k("devch", app_id, device_id))]:
                removed += int(self._unsubscribe_one(app_id, c, device_id))
                self._drop_empty_channel(app_id, c)
        return removed

    def list_channels(self, app_id: str, after: str | None, limit: int) -> tuple[list[str], str | None]:
        start = f"({after}" if after is not None else "-"
        names = [_s(c) for c in self.r.zrangebylex(self.k("chans", app_id), start, "+", start=0, num=limit + 1)]
        return names[:limit], (names[limit - 1] if len(names) > limit else None)

    # -- credentials --

    def put_credential(self, app_id: str, provider: str, sealed: str, now_ms: int) -> int:
        key = self.k("cred", app_id, provider)
        with self.r.pipeline() as pipe:
            pipe.hincrby(key, "version", 1)
            pipe.hset(key, mapping={"sealed": sealed, "updatedAtMs": now_ms})
            version = pipe.execute()[0]
        return int(version)

    def get_credential(self, app_id: str, provider: str) -> dict[str, Any] | None:
        raw = _decode_hash(self.r.hgetall(self.k("cred", app_id, provider)))
        if not raw.get("sealed"):
            return None
        return {
            "sealed": raw["sealed"],
            "version": int(raw.get("version") or 1),
            "updatedAtMs": int(raw.get("updatedAtMs") or 0),
        }

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
        """Create unless present (returns the existing record then). The record, the plan and the
        plan job (id, record, lease deadline) are written in one transaction: a server that dies
        right after leaves a job the lease reaper enqueues, never a publish stuck in ``queued``."""
        key = self.k("pub", app_id, publish_id)

        def body(pipe: Any) -> dict[str, Any] | None:
            existing = pipe.hgetall(key)
            if existing:
                pipe.multi()
                return _decode_hash(existing)
            pipe.multi()
            pipe.hset(key, mapping={k: v for k, v in record.items() if v is not None})
            pipe.expire(key, ttl_s)
            pipe.set(self.k("plan", app_id, publish_id), dumps(plan), ex=ttl_s)
            if job is not None:
                batch_id, batch, deadline_ms = job
                pipe.set(self.k("batch", batch_id), dumps(batch), ex=self.status_ttl_s)
                pipe.zadd(self.k("leases"), {batch_id: deadline_ms})
                pipe.zadd(self.k("due"), {batch_id: int(batch.get("dueMs") or 0)})
            return None

        return self._cas("admission", [key], body)  # type: ignore[no-any-return]

    def get_status(self, app_id: str, publish_id: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(self.k("pub", app_id, publish_id))
        return _decode_hash(raw) if raw else None

    def status_detail(self, app_id: str, publish_id: str, limit: int = 100) -> tuple[list[dict[str, str]], list[str]]:
        _, und = self.r.hscan(self.k("und", app_id, publish_id), 0, count=limit)
        items = [{"deviceId": _s(d), **_split_reason(_s(v))} for d, v in sorted(und.items())][:limit]
        dups = sorted(_s(d) for d in self.r.srandmember(self.k("dup", app_id, publish_id), limit) or [])
        return items, dups

    def get_plan(self, app_id: str, publish_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self.k("plan", app_id, publish_id))
        return json.loads(raw) if raw else None

    def set_state(
        self, app_id: str, publish_id: str, state: str, now_ms: int, fields: Mapping[str, Any] | None = None
    ) -> st.Change:
        key = self.k("pub", app_id, publish_id)

        def body(pipe: Any) -> st.Change:
            record = _decode_hash(pipe.hgetall(key))
            if not record:
                pipe.multi()
                return st.Change()
            change = st.set_state(record, state, now_ms)
            pipe.multi()
            if not change.violation:
                writes = dict(change.fields)
                if fields and (change.fields or state == record.get("state")):
                    writes.update(fields)
                if writes:
                    pipe.hset(key, mapping={k: v for k, v in writes.items() if v is not None})
                    pipe.expire(key, self.status_ttl_s)
            return change

        return self._cas("planner", [key], body)  # type: ignore[no-any-return]

    def save_plan_devices(self, app_id: str, publish_id: str, ids: list[str]) -> list[str]:
        key = self.k("pdev", app_id, publish_id)
        if self.r.set(key, dumps(ids), nx=True, ex=self.status_ttl_s):
            return ids
        return list(json.loads(self.r.get(key) or "[]"))

    def _delivery_key(self, app_id: str, publish_id: str, key: str) -> str:
        # One key per delivery (not one hash per publish): workers settling different devices of
        # one publish never conflict on WATCH.
        # The publish id is a key segment: ids may contain ':', and "a:x" + "b" must not meet
        # "a" + "x:b" (the delivery key is the last part, already a segment: see the dispatcher).
        return self.k("ds", app_id, keys.segment(publish_id), key)

    def claim(
        self, app_id: str, publish_id: str, key: str, attempt: int, owner: str, now_ms: int, lease_until_ms: int
    ) -> st.Change:
        pub = self.k("pub", app_id, publish_id)
        state_key = self._delivery_key(app_id, publish_id, key)

        def body(pipe: Any) -> st.Change:
            current = pipe.get(state_key)
            change = st.claim(_s(current) if current is not None else None, attempt, owner, now_ms, lease_until_ms)
            pipe.multi()
            if change.delivery_state is not None:
                pipe.set(state_key, change.delivery_state, ex=self.delivery_ttl_s)
            for counter, n in change.increments.items():
                pipe.hincrby(pub, counter, n)
            if change.possible_duplicate:
                pipe.sadd(self.k("dup", app_id, publish_id), key)
                pipe.expire(self.k("dup", app_id, publish_id), self.status_ttl_s)
            return change

        return self._cas("retry", [state_key], body)  # type: ignore[no-any-return]

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
        """The delivery's transition under WATCH of its own key; the counters move with HINCRBY in
        the same MULTI, which also reads the record back, so the publish's completion is decided
        on exact post-update counters (then a monotonic state write — a worker killed before it
        leaves complete counters in a non-terminal record, which :meth:`complete` finishes when
        the job is re-run). ``dead_letter`` (letter, ttl s) is written in the same MULTI when this
        settle ends the delivery: a counted dead letter always exists, and a duplicate settle (a
        re-run) writes none."""
        pub = self.k("pub", app_id, publish_id)
        state_key = self._delivery_key(app_id, publish_id, key)
        for _ in range(MAX_CAS):
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(state_key)
                    if not pipe.exists(pub):
                        pipe.unwatch()
                        return st.Change(duplicate=True)
                    current = pipe.get(state_key)
                    change = st.settle(
                        {},  # counters are applied atomically below; completion is decided after
                        _s(current) if current is not None else None,
                        outcome,
                        now_ms,
                        next_attempt=next_attempt,
                        due_ms=due_ms,
                        replay=replay,
                    )
                    if change.duplicate:
                        pipe.unwatch()
                        return change
                    pipe.multi()
                    if change.delivery_state is not None:
                        pipe.set(state_key, change.delivery_state, ex=self.delivery_ttl_s)
                    for counter, n in change.increments.items():
                        pipe.hincrby(pub, counter, n)
                    if change.fields:
                        pipe.hset(pub, mapping=change.fields)
                    pipe.expire(pub, self.status_ttl_s)
                    if not replay and outcome not in (st.Outcome.ACCEPTED, st.Outcome.RETRY):
                        und = self.k("und", app_id, publish_id)
                        pipe.hset(und, key, f"{outcome.value}:{reason}")
                        pipe.expire(und, self.status_ttl_s)
                        if dead_letter is not None:
                            self._queue_dead_letter(pipe, app_id, *dead_letter)
                    pipe.hgetall(pub)
                    after = _decode_hash(pipe.execute()[-1])
                except WatchError:
                    self.on_conflict("feedback")
                    continue
            break
        else:
            raise st.CasExhausted("push store: feedback transaction kept conflicting")
        done = None if replay else st.terminal_state(after)
        if done is not None and not st.is_terminal(str(after.get("state"))):
            # Every worker that sees the last count computes the same state; the first write wins.
            final = self.set_state(app_id, publish_id, done, now_ms)
            if final.terminal == done:
                change.terminal = done
            change.violation = final.violation  # another terminal state won: counted by the caller
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
        """:meth:`claim` for a batch in one optimistic transaction (WATCH every delivery key,
        MGET, MULTI/EXEC): a few round trips for the whole batch instead of a few per device."""
        if not entries:
            return []
        pub = self.k("pub", app_id, publish_id)
        state_keys = [self._delivery_key(app_id, publish_id, key) for key, _ in entries]

        def body(pipe: Any) -> list[st.Change]:
            currents = pipe.mget(state_keys)
            changes = [
                st.claim(_s(cur) if cur is not None else None, attempt, owner, now_ms, lease_until_ms)
                for (_, attempt), cur in zip(entries, currents, strict=True)
            ]
            pipe.multi()
            increments: dict[str, int] = {}
            duplicates = []
            for (key, _), state_key, change in zip(entries, state_keys, changes, strict=True):
                if change.delivery_state is not None:
                    pipe.set(state_key, change.delivery_state, ex=self.delivery_ttl_s)
                for counter, n in change.increments.items():
                    increments[counter] = increments.get(counter, 0) + n
                if change.possible_duplicate:
                    duplicates.append(key)
            for counter, n in increments.items():
                pipe.hincrby(pub, counter, n)
            if duplicates:
                pipe.sadd(self.k("dup", app_id, publish_id), *duplicates)
                pipe.expire(self.k("dup", app_id, publish_id), self.status_ttl_s)
            return changes

        claimed: list[st.Change] = self._cas("retry", state_keys, body)
        return claimed

    def settle_many(self, app_id: str, publish_id: str, ops: list[st.SettleOp], now_ms: int) -> list[st.Change]:
        """:meth:`settle` for a batch in one optimistic transaction: the delivery transitions,
        the summed counters, undelivered entries and dead letters in one MULTI that reads the
        record back; completion is then decided on the exact counters, as for one settle."""
        if not ops:
            return []
        pub = self.k("pub", app_id, publish_id)
        state_keys = [self._delivery_key(app_id, publish_id, op.key) for op in ops]
        for _ in range(MAX_CAS):
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(*state_keys)
                    if not pipe.exists(pub):
                        pipe.unwatch()
                        return [st.Change(duplicate=True) for _ in ops]
                    currents = pipe.mget(state_keys)
                    changes = [
                        st.settle(
                            {},
                            _s(cur) if cur is not None else None,
                            op.outcome,
                            now_ms,
                            next_attempt=op.next_attempt,
                            due_ms=op.due_ms,
                            replay=op.replay,
                        )
                        for op, cur in zip(ops, currents, strict=True)
                    ]
                    if all(change.duplicate for change in changes):
                        pipe.unwatch()
                        return changes
                    pipe.multi()
                    increments: dict[str, int] = {}
                    fields: dict[str, Any] = {}
                    for op, state_key, change in zip(ops, state_keys, changes, strict=True):
                        if change.duplicate:
                            continue
                        if change.delivery_state is not None:
                            pipe.set(state_key, change.delivery_state, ex=self.delivery_ttl_s)
                        for counter, n in change.increments.items():
                            increments[counter] = increments.get(counter, 0) + n
                        fields.update(change.fields)
                        if not op.replay and op.outcome not in (st.Outcome.ACCEPTED, st.Outcome.RETRY):
                            und = self.k("und", app_id, publish_id)
                            pipe.hset(und, op.key, f"{op.outcome.value}:{op.reason}")
                            pipe.expire(und, self.status_ttl_s)
                            if op.dead_letter is not None:
                                self._queue_dead_letter(pipe, app_id, *op.dead_letter)
                    for counter, n in increments.items():
                        pipe.hincrby(pub, counter, n)
                    if fields:
                        pipe.hset(pub, mapping=fields)
                    pipe.expire(pub, self.status_ttl_s)
                    pipe.hgetall(pub)
                    after = _decode_hash(pipe.execute()[-1])
                except WatchError:
                    self.on_conflict("feedback")
                    continue
            break
        else:
            raise st.CasExhausted("push store: feedback transaction kept conflicting")
        counted = [c for op, c in zip(ops, changes, strict=True) if not c.duplicate and not op.replay]
        done = st.terminal_state(after) if counted else None
        if done is not None and not st.is_terminal(str(after.get("state"))):
            final = self.set_state(app_id, publish_id, done, now_ms)
            if final.terminal == done:
                counted[-1].terminal = done
            counted[-1].violation = final.violation
        return changes

    def complete(self, app_id: str, publish_id: str, now_ms: int) -> st.Change:
        """Give the publish its terminal state if its counters are complete and it has none yet
        (idempotent, monotonic; ``change.terminal`` is set only by the call that wrote it)."""
        record = self.get_status(app_id, publish_id)
        if not record:
            return st.Change()
        done = st.terminal_state(record)
        if done is None or st.is_terminal(str(record.get("state"))):
            return st.Change()
        return self.set_state(app_id, publish_id, done, now_ms)

    def delivery_state(self, app_id: str, publish_id: str, key: str) -> str | None:
        value = self.r.get(self._delivery_key(app_id, publish_id, key))
        return _s(value) if value is not None else None

    # -- batches --

    def put_batch(self, batch_id: str, batch: dict[str, Any], deadline_ms: int) -> bool:
        names = [self.k("batch", batch_id), self.k("leases"), self.k("due")]
        args = [dumps(batch), self.status_ttl_s, deadline_ms, int(batch.get("dueMs") or 0), batch_id]
        return bool(self._put_batch(keys=names, args=args))

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self.k("batch", batch_id))
        return json.loads(raw) if raw else None

    def renew(self, batch_id: str, deadline_ms: int) -> bool:
        return (
            bool(self.r.zadd(self.k("leases"), {batch_id: deadline_ms}, xx=True, ch=True))
            or self.r.zscore(self.k("leases"), batch_id) is not None
        )

    def finish_batch(self, batch_id: str) -> None:
        with self.r.pipeline() as pipe:
            pipe.zrem(self.k("leases"), batch_id)
            pipe.zrem(self.k("due"), batch_id)
            pipe.hdel(self.k("jobs"), batch_id)
            pipe.delete(self.k("batch", batch_id))
            pipe.execute()

    def set_job(self, batch_id: str, job_id: str) -> None:
        if self.r.exists(self.k("batch", batch_id)):  # not for a job that already finished
            self.r.hset(self.k("jobs"), batch_id, job_id)

    def get_job(self, batch_id: str) -> str | None:
        value = self.r.hget(self.k("jobs"), batch_id)
        return _s(value) if value is not None else None

    def bump(self, app_id: str, publish_id: str, counter: str, amount: int = 1) -> None:
        key = self.k("pub", app_id, publish_id)
        if self.r.exists(key):
            self.r.hincrby(key, counter, amount)

    def take_expired(self, now_ms: int, new_deadline_ms: int, limit: int = 100) -> list[str]:
        return [_s(b) for b in self._take_expired(keys=[self.k("leases")], args=[now_ms, new_deadline_ms, limit])]

    def lease_stats(self, now_ms: int) -> dict[str, tuple[int, float]]:
        due = self.k("due")
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zcount(due, "-inf", now_ms)
            pipe.zcount(due, f"({now_ms}", "+inf")
            pipe.zrange(due, 0, 0, withscores=True)
            ready, delayed, first = pipe.execute()
        oldest = (now_ms - first[0][1]) / 1000 if first and first[0][1] <= now_ms else 0.0
        return {"ready": (int(ready), max(0.0, oldest)), "delayed": (int(delayed), 0.0)}

    # -- dead letters --

    def add_dead_letter(self, app_id: str, letter: dict[str, Any], ttl_s: int) -> None:
        with self.r.pipeline() as pipe:
            self._queue_dead_letter(pipe, app_id, letter, ttl_s)
            pipe.execute()

    def _queue_dead_letter(self, pipe: Any, app_id: str, letter: dict[str, Any], ttl_s: int) -> None:
        pipe.set(self.k("dl", app_id, letter["deadLetterId"]), dumps(letter), ex=ttl_s)
        pipe.zadd(self.k("dls", app_id), {letter["deadLetterId"]: letter["occurredAtMs"]})
        # Index entries of letters past their retention go with each new one.
        pipe.zremrangebyscore(self.k("dls", app_id), "-inf", f"({letter['occurredAtMs'] - ttl_s * 1000}")

    def get_dead_letter(self, app_id: str, letter_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self.k("dl", app_id, letter_id))
        return json.loads(raw) if raw else None

    def update_dead_letter(self, app_id: str, letter_id: str, fields: Mapping[str, Any]) -> None:
        key = self.k("dl", app_id, letter_id)

        def body(pipe: Any) -> None:
            raw = pipe.get(key)
            ttl = pipe.ttl(key)
            pipe.multi()
            if raw:
                pipe.set(key, dumps({**json.loads(raw), **fields}), ex=max(1, int(ttl)) if ttl and ttl > 0 else None)

        self._cas("dead_letter", [key], body)

    def list_dead_letters(
        self, app_id: str, since_ms: int | None, until_ms: int | None, provider: str | None, offset: int, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        index = self.k("dls", app_id)
        low = since_ms if since_ms is not None else "-inf"
        high = until_ms if until_ms is not None else "+inf"
        out: list[dict[str, Any]] = []
        skipped = 0
        position = 0
        while True:
            ids = [_s(i) for i in self.r.zrevrangebyscore(index, high, low, start=position, num=500)]
            if not ids:
                return out, False
            position += len(ids)
            raws = self.r.mget([self.k("dl", app_id, i) for i in ids])
            for raw in raws:
                if raw is None:  # expired; its index entry goes with the next write
                    continue
                letter = json.loads(raw)
                if provider is not None and letter.get("provider") != provider:
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                if len(out) == limit:
                    return out, True
                out.append(letter)
