"""Message serials and channel history.

A *sequencer* gives each message on a recovery- or history-enabled channel its
``(stream_id, serial)``; with history on it also stores the message, atomically with the
serial. Two stores: in memory (one node, lost on restart) and Redis (a hash per channel for
the stream id and serial counter, a Redis Stream per channel for history, entry id
``{serial}-0``, trimmed by count on every append and by age both on append and when idle —
an idle stream expires whole). Redis's own clock stamps ``published_at_ms`` so every node
agrees on order and age.

The history *reader* pages with an opaque cursor: base64url JSON signed with the app secret,
so a tampered cursor or one reused with a different query is refused with 400.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from redis.crc import key_slot

from sockudo.config import AppConfig, HistoryConfig
from sockudo.core import protocol as p
from sockudo.core.errors import ApiError
from sockudo.core.keys import tag
from sockudo.redis import is_cluster

logger = logging.getLogger(__name__)

MAX_CURSOR_BYTES = 16384


@dataclass(frozen=True)
class StoredMessage:
    serial: int
    published_ms: int
    message_id: str
    event: str
    data: Any
    user_id: str | None = None

    def frame_v2(self, channel: str, stream_id: str) -> str:
        """The protocol-2 frame as delivered live."""
        out: dict[str, Any] = {"event": self.event, "channel": channel}
        if self.data is not None:
            out["data"] = self.data
        if self.user_id is not None:
            out["user_id"] = self.user_id
        out["message_id"] = self.message_id
        out["stream_id"] = stream_id
        out["serial"] = self.serial
        return p.dumps(out)


@dataclass
class StreamState:
    stream_id: str | None
    newest_serial: int | None
    oldest_serial: int | None = None
    oldest_ms: int | None = None
    newest_ms: int | None = None
    retained: int = 0
    retained_bytes: int = 0


#: Namespace of ``empty_stream_id`` (a fixed, random UUID).
_EMPTY_STREAM_NAMESPACE = uuid.UUID("6f1c2b9e-3d4a-4e55-9a7b-0c8d2e1f4a63")


def empty_stream_id(app_id: str, channel: str) -> str:
    """The stream id given for a channel that has no stream yet (nothing published to it).

    Nothing is stored for such a channel: serial state is created by the first publish, so a
    client cannot make the server keep state by subscribing to names nobody uses. The id is
    derived from the names, so every node gives the same one; a position ``(this id, 0)``
    means "before the channel's first message" and resumes into the stream the first publish
    creates (``RecoveryService.resume``). A real stream id is a random UUID, never this one.
    """
    return str(uuid.uuid5(_EMPTY_STREAM_NAMESPACE, f"{app_id}\x00{channel}"))


class SequencerUnavailable(Exception):
    """The store could not assign a serial (Redis down or out of memory)."""


#: One message to number: ``(channel, message_id, event, data, user_id)``.
Numbering = tuple[str, str, str, Any, str | None]


class Sequencer(Protocol):
    def next(self, app: AppConfig, channel: str, message_id: str, event: str, data: Any,
             user_id: str | None) -> tuple[str, int, int]:
        """``(stream_id, serial, published_ms)``; stores the message when history is on."""

    def next_many(self, app: AppConfig, items: list[Numbering]) -> list[tuple[str, int, int]]:
        """``next`` for several channels at once (one event published to many): all or none."""

    def position(self, app_id: str, channel: str) -> tuple[str, int] | None: ...
    def ensure(self, app: AppConfig, channel: str) -> tuple[str, int]: ...
    def state(self, app: AppConfig, channel: str) -> StreamState: ...
    def read(self, app: AppConfig, channel: str, after: int | None, before: int | None, newest_first: bool,
             limit: int) -> list[StoredMessage]: ...
    def reset(self, app: AppConfig, channel: str) -> None: ...
    def sweep(self, apps: list[AppConfig]) -> int: ...
    def take_purged(self) -> int:
        """Entries retention removed (on write or in ``sweep``) since the last call."""


# -- memory ------------------------------------------------------------------------


@dataclass
class _MemoryChannel:
    stream_id: str
    serial: int = 0
    messages: deque[StoredMessage] = field(default_factory=deque)
    bytes: int = 0


def _size(message: StoredMessage) -> int:
    return len(p.dumps(message.data)) + len(message.event) + 64


class MemorySequencer:
    """One node, lost on restart (the embedded default)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.channels: dict[tuple[str, str], _MemoryChannel] = {}
        self.purged = 0

    def _channel(self, app_id: str, channel: str) -> _MemoryChannel:
        state = self.channels.get((app_id, channel))
        if state is None:
            state = self.channels[(app_id, channel)] = _MemoryChannel(str(uuid.uuid4()))
        return state

    def next(self, app: AppConfig, channel: str, message_id: str, event: str, data: Any,
             user_id: str | None) -> tuple[str, int, int]:
        state = self._channel(app.id, channel)
        state.serial += 1
        now_ms = int(self.clock() * 1000)
        if app.history.enabled:
            message = StoredMessage(state.serial, now_ms, message_id, event, data, user_id)
            state.messages.append(message)
            state.bytes += _size(message)
            self._trim(state, app.history, now_ms)
        return state.stream_id, state.serial, now_ms

    def next_many(self, app: AppConfig, items: list[Numbering]) -> list[tuple[str, int, int]]:
        # In memory nothing can fail half-way (there is no store to lose).
        return [self.next(app, channel, message_id, event, data, user_id)
                for channel, message_id, event, data, user_id in items]

    def _trim(self, state: _MemoryChannel, cfg: HistoryConfig, now_ms: int) -> int:
        removed = 0
        cutoff = now_ms - cfg.retention_window_seconds * 1000
        while state.messages and (
            (cfg.max_messages_per_channel and len(state.messages) > cfg.max_messages_per_channel)
            or state.messages[0].published_ms < cutoff
        ):
            state.bytes -= _size(state.messages.popleft())
            removed += 1
        self.purged += removed
        return removed

    def position(self, app_id: str, channel: str) -> tuple[str, int] | None:
        state = self.channels.get((app_id, channel))
        return (state.stream_id, state.serial) if state else None

    def ensure(self, app: AppConfig, channel: str) -> tuple[str, int]:
        state = self._channel(app.id, channel)
        return state.stream_id, state.serial

    def state(self, app: AppConfig, channel: str) -> StreamState:
        state = self.channels.get((app.id, channel))
        if state is None:
            return StreamState(None, None)
        self._trim(state, app.history, int(self.clock() * 1000))
        msgs = state.messages
        return StreamState(
            state.stream_id, state.serial,
            msgs[0].serial if msgs else None, msgs[0].published_ms if msgs else None,
            msgs[-1].published_ms if msgs else None, len(msgs), state.bytes,
        )

    def read(self, app: AppConfig, channel: str, after: int | None, before: int | None, newest_first: bool,
             limit: int) -> list[StoredMessage]:
        state = self.channels.get((app.id, channel))
        if state is None:
            return []
        self._trim(state, app.history, int(self.clock() * 1000))
        selected = [m for m in state.messages
                    if (after is None or m.serial > after) and (before is None or m.serial < before)]
        if newest_first:
            selected.reverse()
        return selected[:limit]

    def reset(self, app: AppConfig, channel: str) -> None:
        self.channels.pop((app.id, channel), None)

    def take_purged(self) -> int:
        purged, self.purged = self.purged, 0
        return purged

    def sweep(self, apps: list[AppConfig]) -> int:
        by_id = {a.id: a for a in apps}
        now_ms = int(self.clock() * 1000)
        removed = 0
        for (app_id, _), state in list(self.channels.items()):
            app = by_id.get(app_id)
            if app is not None and app.history.enabled:
                removed += self._trim(state, app.history, now_ms)
        return removed


# -- redis --------------------------------------------------------------------------

NEXT_LUA = """
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS / 2 do
  local seq_key, hist_key, a = KEYS[2 * i - 1], KEYS[2 * i], (i - 1) * 9
  local sid = redis.call('HGET', seq_key, 'stream_id')
  if not sid then
    sid = ARGV[a + 1]
    redis.call('DEL', hist_key)
    redis.call('HSET', seq_key, 'stream_id', sid, 'serial', 0)
  end
  local serial = redis.call('HINCRBY', seq_key, 'serial', 1)
  redis.call('PEXPIRE', seq_key, ARGV[a + 3])
  local purged = 0
  if ARGV[a + 2] == '1' then
    local maxlen = tonumber(ARGV[a + 4])
    redis.call('XADD', hist_key, serial .. '-0', 'm', ARGV[a + 6], 'e', ARGV[a + 7], 'd', ARGV[a + 8],
               'u', ARGV[a + 9], 't', ms)
    if maxlen > 0 then purged = purged + redis.call('XTRIM', hist_key, 'MAXLEN', maxlen) end
    local cutoff = ms - tonumber(ARGV[a + 5])
    for j = 1, 100 do
      local first = redis.call('XRANGE', hist_key, '-', '+', 'COUNT', 1)
      if #first == 0 then break end
      local fields = first[1][2]
      local ts = 0
      for k = 1, #fields, 2 do if fields[k] == 't' then ts = tonumber(fields[k + 1]) end end
      if ts >= cutoff then break end
      redis.call('XDEL', hist_key, first[1][1])
      purged = purged + 1
    end
    redis.call('PEXPIRE', hist_key, tonumber(ARGV[a + 5]) + 60000)
  end
  out[#out + 1] = sid
  out[#out + 1] = serial
  out[#out + 1] = ms
  out[#out + 1] = purged
end
return out
"""

# Retention of one stream outside an append: by count, then by age against Redis's clock.
# Returns {purged, published_ms of the oldest entry kept (0 when empty)}.
TRIM_LUA = """
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[1])
local purged = 0
local maxlen = tonumber(ARGV[2])
if maxlen > 0 then purged = redis.call('XTRIM', KEYS[1], 'MAXLEN', maxlen) end
for i = 1, 1000 do
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #first == 0 then return {purged, 0} end
  local fields = first[1][2]
  local ts = 0
  for j = 1, #fields, 2 do if fields[j] == 't' then ts = tonumber(fields[j + 1]) end end
  if ts >= cutoff then return {purged, ts} end
  redis.call('XDEL', KEYS[1], first[1][1])
  purged = purged + 1
end
return {purged, cutoff}
"""


def _decode_entry(entry: Any) -> StoredMessage | None:
    entry_id, fields = entry
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
         for k, v in fields.items()}
    try:
        serial = int(str(entry_id).split("-")[0])
        data = json.loads(f.get("d", "null"))
        return StoredMessage(serial, int(f.get("t", 0)), f.get("m", ""), f.get("e", ""), data, f.get("u") or None)
    except (ValueError, TypeError):
        return None


class RedisSequencer:
    """Cluster-wide serials and history in Redis (survives node restarts).

    On a Redis Cluster (a ``RedisCluster`` client) both keys of a channel start with its hash tag,
    ``tag(app_id, channel)``, so the numbering script touches one slot; on one Redis or Sentinel the
    keys are exactly as before the cluster existed (an upgrade keeps its history)."""

    def __init__(self, client: Any, prefix: str = "sockudo:") -> None:
        self.client = client
        self.prefix = prefix
        self.cluster = is_cluster(client)
        self._next = client.register_script(NEXT_LUA)
        self._trim = client.register_script(TRIM_LUA)
        self.purged = 0
        # Streams this node wrote to -> when (ms) their oldest entry ages out, for ``sweep``.
        self.expiry_due: dict[tuple[str, str], int] = {}

    def _keys(self, app_id: str, channel: str) -> tuple[str, str]:
        head = self.prefix + tag(app_id, channel) if self.cluster else self.prefix
        return f"{head}app:{app_id}:stream:{channel}", f"{head}app:{app_id}:history:{channel}"

    def next(self, app: AppConfig, channel: str, message_id: str, event: str, data: Any,
             user_id: str | None) -> tuple[str, int, int]:
        return self.next_many(app, [(channel, message_id, event, data, user_id)])[0]

    def next_many(self, app: AppConfig, items: list[Numbering]) -> list[tuple[str, int, int]]:
        """One script call numbers (and stores) every message: Redis runs it whole or, out of
        memory, refuses it at its first write (the only point it checks the limit, so a script is never
        cut off half-way) — never some channels and not others.

        On a Redis Cluster one script runs per hash slot (the channels of one slot together, the
        slots in ascending order): all-or-none per slot, not across slots. A slot that fails raises
        ``SequencerUnavailable`` after the slots before it were numbered."""
        cfg = app.history
        keep_ms = max(cfg.retention_window_seconds, app.connection_recovery.buffer_ttl_seconds, 86400) * 1000
        keys: list[list[str]] = []
        args: list[list[Any]] = []
        for channel, message_id, event, data, user_id in items:
            keys.append(list(self._keys(app.id, channel)))
            args.append([str(uuid.uuid4()), "1" if cfg.enabled else "0", keep_ms, cfg.max_messages_per_channel,
                         cfg.retention_window_seconds * 1000, message_id, event, p.dumps(data), user_id or ""])
        if self.cluster:
            groups: dict[int, list[int]] = {}
            for i, pair in enumerate(keys):
                groups.setdefault(key_slot(pair[0].encode()), []).append(i)
            batches = [groups[slot] for slot in sorted(groups)]
        else:
            batches = [list(range(len(items)))]
        flat: list[Any] = [None] * (4 * len(items))
        for batch in batches:
            try:
                result = self._next(keys=[k for i in batch for k in keys[i]], args=[a for i in batch for a in args[i]])
            except redis.RedisError as exc:  # including out of memory with noeviction
                raise SequencerUnavailable(str(exc)) from exc
            for j, i in enumerate(batch):
                flat[4 * i:4 * i + 4] = result[4 * j:4 * j + 4]
        out: list[tuple[str, int, int]] = []
        for i, (channel, *_rest) in enumerate(items):
            sid, serial, ms, purged = flat[4 * i:4 * i + 4]
            self.purged += int(purged)
            if cfg.enabled:
                self.expiry_due.setdefault((app.id, channel), int(ms) + cfg.retention_window_seconds * 1000)
            out.append(((sid.decode() if isinstance(sid, bytes) else sid), int(serial), int(ms)))
        return out

    def _apply_retention(self, app: AppConfig, channel: str) -> int:
        """Trim one stream now; returns when its oldest kept entry ages out (0: empty)."""
        _, hist_key = self._keys(app.id, channel)
        retention_ms = app.history.retention_window_seconds * 1000
        purged, oldest_ms = self._trim(keys=[hist_key], args=[retention_ms, app.history.max_messages_per_channel])
        self.purged += int(purged)
        return int(oldest_ms) + retention_ms if int(oldest_ms) else 0

    def position(self, app_id: str, channel: str) -> tuple[str, int] | None:
        seq_key, _ = self._keys(app_id, channel)
        try:
            values = self.client.hmget(seq_key, "stream_id", "serial")
        except redis.RedisError as exc:
            raise SequencerUnavailable(str(exc)) from exc
        sid, serial = values
        if sid is None:
            return None
        return (sid.decode() if isinstance(sid, bytes) else sid), int(serial or 0)

    def ensure(self, app: AppConfig, channel: str) -> tuple[str, int]:
        """The channel's position, creating its stream (serial 0) if it has none yet."""
        seq_key, hist_key = self._keys(app.id, channel)
        try:
            if self.client.hsetnx(seq_key, "stream_id", str(uuid.uuid4())):
                pipe = self.client.pipeline(transaction=False)
                pipe.hsetnx(seq_key, "serial", 0)
                pipe.delete(hist_key)
                pipe.pexpire(seq_key, max(app.history.retention_window_seconds, 86400) * 1000)
                pipe.execute()
        except redis.RedisError as exc:
            raise SequencerUnavailable(str(exc)) from exc
        position = self.position(app.id, channel)
        assert position is not None
        return position

    def state(self, app: AppConfig, channel: str) -> StreamState:
        _, hist_key = self._keys(app.id, channel)
        position = self.position(app.id, channel)
        if position is None:
            return StreamState(None, None)
        try:
            if app.history.enabled:
                self._apply_retention(app, channel)  # a read never shows what retention removed
            pipe = self.client.pipeline(transaction=False)
            pipe.xrange(hist_key, "-", "+", count=1)
            pipe.xrevrange(hist_key, "+", "-", count=1)
            pipe.xlen(hist_key)
            pipe.memory_usage(hist_key)
            first, last, length, usage = pipe.execute()
        except redis.RedisError as exc:
            raise SequencerUnavailable(str(exc)) from exc
        oldest = _decode_entry(first[0]) if first else None
        newest = _decode_entry(last[0]) if last else None
        return StreamState(position[0], position[1], oldest.serial if oldest else None,
                           oldest.published_ms if oldest else None, newest.published_ms if newest else None,
                           int(length), int(usage or 0))

    def read(self, app: AppConfig, channel: str, after: int | None, before: int | None, newest_first: bool,
             limit: int) -> list[StoredMessage]:
        _, hist_key = self._keys(app.id, channel)
        low = f"({after}-0" if after is not None else "-"
        high = f"({before}-0" if before is not None else "+"
        try:
            if newest_first:
                entries = self.client.xrevrange(hist_key, high, low, count=limit)
            else:
                entries = self.client.xrange(hist_key, low, high, count=limit)
        except redis.RedisError as exc:
            raise SequencerUnavailable(str(exc)) from exc
        return [m for m in (_decode_entry(e) for e in entries) if m is not None]

    def reset(self, app: AppConfig, channel: str) -> None:
        try:
            self.client.delete(*self._keys(app.id, channel))
        except redis.RedisError as exc:
            raise SequencerUnavailable(str(exc)) from exc

    def take_purged(self) -> int:
        purged, self.purged = self.purged, 0
        return purged

    def sweep(self, apps: list[AppConfig]) -> int:
        """Retention by age for the streams this node wrote to, when their oldest entry is due.

        (An idle stream nobody sweeps still expires whole a minute after its retention window.)
        """
        by_id = {a.id: a for a in apps}
        now_ms = int(time.time() * 1000)
        before = self.purged
        for key, due in list(self.expiry_due.items()):
            if due > now_ms:
                continue
            app = by_id.get(key[0])
            if app is None or not app.history.enabled:
                del self.expiry_due[key]
                continue
            try:
                next_due = self._apply_retention(app, key[1])
            except redis.RedisError as exc:  # Redis down: try again next time
                logger.warning("history retention sweep failed", extra={"app_id": key[0], "error": str(exc)[:200]})
                break
            if next_due:
                self.expiry_due[key] = next_due
            else:
                del self.expiry_due[key]
        return self.purged - before


# -- cursors ------------------------------------------------------------------------


def encode_cursor(app: AppConfig, payload: dict[str, Any]) -> str:
    body = base64.urlsafe_b64encode(p.dumps(payload).encode()).rstrip(b"=")
    mac = hmac.new(app.secret.encode(), body, hashlib.sha256).digest()[:16]
    return body.decode() + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def decode_cursor(app: AppConfig, cursor: str) -> dict[str, Any]:
    if len(cursor) > MAX_CURSOR_BYTES or cursor.count(".") != 1:
        raise ApiError(400, "invalid_cursor", "Malformed cursor")
    body, mac = cursor.split(".")
    expected = base64.urlsafe_b64encode(
        hmac.new(app.secret.encode(), body.encode(), hashlib.sha256).digest()[:16]
    ).rstrip(b"=").decode()
    if not hmac.compare_digest(mac.encode(), expected.encode()):
        raise ApiError(400, "invalid_cursor", "Cursor has been tampered with")
    try:
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except ValueError:
        raise ApiError(400, "invalid_cursor", "Malformed cursor") from None
    if not isinstance(payload, dict) or payload.get("version") != 1:
        raise ApiError(400, "invalid_cursor", "Unsupported cursor")
    return payload
