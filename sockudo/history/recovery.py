"""Connection recovery: the per-channel replay buffer (hot tier) and resume decisions.

Pure: no I/O, an injected clock. Every node keeps a buffer for every recovery-enabled channel
it sees messages for (its own publishes and those received from other nodes), so a client may
resume on any node.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sockudo.config import RecoveryConfig

# resume failure codes
STREAM_RESET = "stream_reset"
POSITION_EXPIRED = "position_expired"
CONTINUITY_UNVERIFIABLE = "continuity_unverifiable"
PERSISTENCE_UNAVAILABLE = "persistence_unavailable"


@dataclass(frozen=True)
class BufferedMessage:
    serial: int
    published_ms: int
    text: str  # the protocol-2 frame
    message_id: str


class BufferPressure:
    """One app's replay-buffer pressure, exported at scrape time (``Metrics.watch_replay_buffers``).

    ``full_evictions`` is bumped on the publish path, so it is a plain integer, not a metric.
    """

    __slots__ = ("full_evictions", "max_fill_ratio")

    def __init__(self) -> None:
        self.full_evictions = 0  # messages dropped because their buffer held max_buffer_size
        self.max_fill_ratio = 0.0  # the fullest buffer at the last sweep, vs max_buffer_size


@dataclass
class ChannelBuffer:
    stream_id: str
    entries: deque[BufferedMessage] = field(default_factory=deque)
    pressure: BufferPressure = field(default_factory=BufferPressure)

    @property
    def newest_serial(self) -> int | None:
        return self.entries[-1].serial if self.entries else None

    @property
    def oldest_serial(self) -> int | None:
        return self.entries[0].serial if self.entries else None


@dataclass
class ReplayResult:
    """Either ``messages`` to replay (possibly empty) or a failure ``code``."""

    messages: list[BufferedMessage] = field(default_factory=list)
    code: str | None = None
    current_stream_id: str | None = None
    oldest_serial: int | None = None
    newest_serial: int | None = None

    @property
    def ok(self) -> bool:
        return self.code is None


class ReplayBuffers:
    def __init__(self) -> None:
        self.channels: dict[tuple[str, str], ChannelBuffer] = {}
        self.pressure: dict[str, BufferPressure] = {}  # per app id

    def _pressure(self, app_id: str) -> BufferPressure:
        pressure = self.pressure.get(app_id)
        if pressure is None:
            pressure = self.pressure[app_id] = BufferPressure()
        return pressure

    def size(self) -> int:
        return sum(len(b.entries) for b in self.channels.values())

    def append(self, app_id: str, channel: str, message: BufferedMessage, stream_id: str,
               cfg: RecoveryConfig, now_ms: int) -> None:
        key = (app_id, channel)
        buf = self.channels.get(key)
        if buf is None or buf.stream_id != stream_id:
            buf = self.channels[key] = ChannelBuffer(stream_id, pressure=self._pressure(app_id))
        newest = buf.newest_serial
        if newest is not None:
            if message.serial <= newest:
                # Already have it (our own publish echoed) or out of order: keep the buffer
                # contiguous rather than reorder.
                if any(m.serial == message.serial for m in buf.entries):
                    return
                buf.entries.clear()
            elif message.serial != newest + 1:
                buf.entries.clear()  # a gap (missed cross-node message): continuity restarts here
        buf.entries.append(message)
        self._evict(buf, cfg, now_ms)

    @staticmethod
    def _evict(buf: ChannelBuffer, cfg: RecoveryConfig, now_ms: int) -> None:
        entries = buf.entries
        if len(entries) > cfg.max_buffer_size:
            evicted = 0
            while len(entries) > cfg.max_buffer_size:
                entries.popleft()
                evicted += 1
            buf.pressure.full_evictions += evicted  # the recoverable window is now size-bound
        cutoff = now_ms - cfg.buffer_ttl_seconds * 1000
        while entries and entries[0].published_ms < cutoff:
            entries.popleft()

    def position(self, app_id: str, channel: str) -> tuple[str, int | None] | None:
        buf = self.channels.get((app_id, channel))
        if buf is None:
            return None
        return buf.stream_id, buf.newest_serial

    def replay(self, app_id: str, channel: str, stream_id: str | None, after_serial: int,
               cfg: RecoveryConfig, now_ms: int, current: tuple[str, int] | None) -> ReplayResult:
        """Frames with serial > ``after_serial``, contiguous to the newest (hot tier).

        ``current`` is the channel's authoritative (stream_id, newest serial) when known
        (from the sequencer); it lets an idle channel be recovered with nothing to replay.
        """
        buf = self.channels.get((app_id, channel))
        if buf is not None:
            self._evict(buf, cfg, now_ms)
        current_stream = current[0] if current else (buf.stream_id if buf else None)
        newest = current[1] if current else (buf.newest_serial if buf else None)
        # The buffer's range is only "available" when it is the channel's current stream: a
        # buffer left from a lost stream says nothing about the new one.
        same_stream = buf is not None and buf.stream_id == current_stream
        result = ReplayResult(current_stream_id=current_stream, newest_serial=newest,
                              oldest_serial=buf.oldest_serial if buf is not None and same_stream else None)
        if stream_id is None or current_stream is None:
            result.code = CONTINUITY_UNVERIFIABLE
            return result
        if stream_id != current_stream:
            result.code = STREAM_RESET
            return result
        if newest is None or after_serial == newest:
            return result  # nothing missed
        if after_serial > newest:
            result.code = CONTINUITY_UNVERIFIABLE  # the client is ahead of us
            return result
        if newest - after_serial > cfg.max_buffer_size:
            result.code = POSITION_EXPIRED
            return result
        # The buffer may already hold a message newer than ``newest`` (published while the
        # position was being read): it is contiguous, so replay it too; the socket's hold
        # gate drops the live copy. A buffer *behind* the store cannot prove continuity.
        if buf is None or buf.stream_id != current_stream or buf.oldest_serial is None \
                or buf.oldest_serial > after_serial + 1 or (buf.newest_serial or 0) < newest:
            result.code = POSITION_EXPIRED  # evicted, or a gap: the cold tier may still help
            return result
        result.messages = [m for m in buf.entries if m.serial > after_serial]
        return result

    def sweep(self, cfg_for: dict[str, RecoveryConfig], now_ms: int) -> None:
        """Drop expired entries and empty buffers (called periodically), and measure each
        app's fullest buffer against its ``max_buffer_size``."""
        fill: dict[str, float] = {}
        for key in list(self.channels):
            cfg = cfg_for.get(key[0])
            buf = self.channels[key]
            if cfg is None:
                del self.channels[key]
                continue
            self._evict(buf, cfg, now_ms)
            if not buf.entries:
                del self.channels[key]
                continue
            ratio = len(buf.entries) / cfg.max_buffer_size if cfg.max_buffer_size > 0 else 1.0
            if ratio > fill.get(key[0], 0.0):
                fill[key[0]] = ratio
        for app_id in list(self.pressure):
            if app_id not in cfg_for:
                del self.pressure[app_id]  # an app that is gone: stop exporting it
            else:
                self.pressure[app_id].max_fill_ratio = fill.get(app_id, 0.0)


# -- the resume service ----------------------------------------------------------

MAX_COLD_REPLAY = 1000
TOO_MUCH_TO_REPLAY = "More missed messages than one resume may replay; read them from history"


def frames_size(frames: list[str]) -> int:
    """The bytes ``frames`` take on the wire (UTF-8: a frame's characters can be up to 4 bytes each)."""
    return sum(len(text.encode("utf-8")) for text in frames)


def _too_big(frames: list[str], max_bytes: int | None) -> bool:
    return max_bytes is not None and frames_size(frames) > max_bytes


@dataclass
class ResumeOutcome:
    frames: list[str] = field(default_factory=list)
    last_serial: int | None = None
    recovered: dict[str, Any] = field(default_factory=dict)
    failure: dict[str, Any] | None = None


class RecoveryService:
    """Decides one channel's resume: hot tier (this node's buffer), then cold tier (history)."""

    def __init__(self, buffers: ReplayBuffers, sequencer: Any, metrics: Any, clock: Callable[[], float]) -> None:
        self.buffers = buffers
        self.sequencer = sequencer
        self.metrics = metrics
        self.clock = clock
        metrics.watch_replay_buffers(buffers)

    def _fail(self, app_id: str, channel: str, code: str, reason: str, expected: Any, result: ReplayResult | None,
              ) -> ResumeOutcome:
        self.metrics.recovery_failures.labels(app_id, self.metrics.port, code).inc()
        return ResumeOutcome(failure={
            "channel": channel, "code": code, "reason": reason, "expected_stream_id": expected,
            "current_stream_id": result.current_stream_id if result else None,
            "oldest_available_serial": result.oldest_serial if result else None,
            "newest_available_serial": result.newest_serial if result else None,
        })

    def resume(self, app: Any, channel: str, stream_id: Any, serial: Any, legacy: bool, subscribed: bool,
               max_bytes: int | None = None) -> ResumeOutcome:
        """One channel's resume. ``max_bytes`` bounds the frames it may replay (what is left of
        the socket's send budget): a longer replay fails as ``position_expired`` instead, and
        the client reads the messages from history page by page."""
        from sockudo.history.store import SequencerUnavailable, empty_stream_id  # history imports config only

        if not isinstance(channel, str) or not subscribed:
            return self._fail(app.id, str(channel), CONTINUITY_UNVERIFIABLE,
                              "Subscribe to the channel before resuming it", stream_id, None)
        if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
            return self._fail(app.id, channel, CONTINUITY_UNVERIFIABLE, "serial must be a whole number", stream_id,
                              None)
        cfg = app.connection_recovery
        now_ms = int(self.clock() * 1000)
        try:
            current = self.sequencer.position(app.id, channel)
        except SequencerUnavailable:
            return self._fail(app.id, channel, PERSISTENCE_UNAVAILABLE, "Message store unavailable", stream_id, None)
        empty = empty_stream_id(app.id, channel)
        if legacy:
            # A legacy position has no stream id: only the hot tier, and only if our buffer
            # is the channel's current stream.
            stream_id = current[0] if current else None
        elif current is None:
            # No stream: nothing has been published to the channel (or its stream was lost from
            # the store). Subscribers are given the empty position now; any other is a reset.
            current = (empty, 0)
        lookup = stream_id
        if not legacy and stream_id == empty and current is not None and current[0] != empty:
            # A position taken before the channel's first message: its whole stream was missed.
            if serial != 0:
                return self._fail(app.id, channel, CONTINUITY_UNVERIFIABLE,
                                  "A position before the channel's first message has serial 0", stream_id, None)
            lookup = current[0]
        result = self.buffers.replay(app.id, channel, lookup, serial, cfg, now_ms, current)
        source = "hot"
        frames = [m.text for m in result.messages]
        last = result.messages[-1] if result.messages else None
        if not result.ok and result.code == POSITION_EXPIRED:
            # The hot tier could not serve the position (evicted, expired, a gap, or more than
            # max_buffer_size missed): a buffer miss, whether or not history is there to help.
            self.metrics.recovery_buffer_misses.labels(app.id, self.metrics.port).inc()
        if not result.ok and result.code == POSITION_EXPIRED and not legacy and app.history.enabled:
            newest = result.newest_serial or 0
            wanted = newest - serial
            if 0 < wanted <= MAX_COLD_REPLAY:
                try:
                    stored = self.sequencer.read(app, channel, serial, None, False, wanted)
                except SequencerUnavailable:
                    return self._fail(app.id, channel, PERSISTENCE_UNAVAILABLE, "History store unavailable",
                                      stream_id, result)
                contiguous = len(stored) == wanted and all(m.serial == serial + 1 + i for i, m in enumerate(stored))
                if contiguous:
                    assert current is not None
                    frames = [m.frame_v2(channel, current[0]) for m in stored]
                    if _too_big(frames, max_bytes):
                        return self._fail(app.id, channel, POSITION_EXPIRED, TOO_MUCH_TO_REPLAY, stream_id, result)
                    source = "cold"
                    result.code = None
                    last_serial, last_id = stored[-1].serial, stored[-1].message_id
                    self.metrics.recovery_success.labels(app.id, self.metrics.port, source).inc()
                    self.metrics.recovery_replayed.labels(app.id, self.metrics.port, source).inc(len(frames))
                    return ResumeOutcome(frames, last_serial, {
                        "channel": channel, "source": source, "replayed": len(frames),
                        "position": {"stream_id": current[0], "serial": last_serial, "last_message_id": last_id},
                    })
            # The available range to report is what history still holds (the client can
            # backfill it), not just this node's buffer.
            try:
                retained = self.sequencer.state(app, channel).oldest_serial
            except SequencerUnavailable:
                retained = None
            if retained is not None and (result.oldest_serial is None or retained < result.oldest_serial):
                result.oldest_serial = retained
        if legacy and not result.ok:
            # A serial without a stream id can only be trusted against this node's buffer;
            # anything else cannot be verified, whatever the hot tier said.
            result.code = CONTINUITY_UNVERIFIABLE
            stream_id = None
        if not result.ok:
            reason = {
                STREAM_RESET: "The channel's stream was reset; re-subscribe and read history",
                POSITION_EXPIRED: "The position is older than what is retained",
                CONTINUITY_UNVERIFIABLE: "The position cannot be verified against this channel",
            }.get(result.code or "", "Cannot recover")
            return self._fail(app.id, channel, result.code or CONTINUITY_UNVERIFIABLE, reason, stream_id, result)
        if _too_big(frames, max_bytes):
            return self._fail(app.id, channel, POSITION_EXPIRED, TOO_MUCH_TO_REPLAY, stream_id, result)
        self.metrics.recovery_success.labels(app.id, self.metrics.port, source).inc()
        if frames:
            self.metrics.recovery_replayed.labels(app.id, self.metrics.port, source).inc(len(frames))
        position_serial = last.serial if last else serial
        return ResumeOutcome(frames, last.serial if last else None, {
            "channel": channel, "source": source, "replayed": len(frames),
            "position": {"stream_id": result.current_stream_id, "serial": position_serial,
                         "last_message_id": last.message_id if last else None},
        })
