"""Publishing one application event to a channel: the single path REST publishes and client
events share.

It builds the frame once (and its protocol-2 form once, with ``message_id`` and, on channels
with recovery or history, ``stream_id``/``serial``), records it in the replay buffer, stores
cache-channel payloads, and hands the frame to the adapter.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from sockudo.adapter.base import Adapter
from sockudo.apps import AppStore
from sockudo.cache import Cache, cache_channel_key
from sockudo.config import AppConfig
from sockudo.core import protocol as p
from sockudo.core.wsframe import OutFrame
from sockudo.history.recovery import BufferedMessage, ReplayBuffers
from sockudo.history.store import Sequencer, SequencerUnavailable, StoredMessage
from sockudo.metrics.registry import Metrics

logger = logging.getLogger(__name__)

CACHE_TTL_SECONDS = 3600


class PublishUnavailable(Exception):
    """The message could not be sequenced/stored, so it was not delivered (nothing half-written)."""


class Publisher:
    def __init__(self, adapter: Adapter, cache: Cache, sequencer: Sequencer, buffers: ReplayBuffers, metrics: Metrics,
                 apps: AppStore) -> None:
        self.adapter = adapter
        self.cache = cache
        self.sequencer = sequencer
        self.buffers = buffers
        self.metrics = metrics
        self.apps = apps

    def publish(self, app: AppConfig, channel: str, event: str, data: Any, except_socket_id: str | None = None,
                user_id: str | None = None, cache: bool = False, count_publish: bool = True) -> int:
        """Deliver to every subscriber in the cluster; returns how many local sockets got it."""
        return self.publish_to(app, [channel], event, data, except_socket_id, user_id, cache, count_publish)

    def publish_to(self, app: AppConfig, channels: list[str], event: str, data: Any,
                   except_socket_id: str | None = None, user_id: str | None = None, cache: bool = False,
                   count_publish: bool = True) -> int:
        """One event to one or more channels. Every channel that numbers its messages gets its
        serial (and history entry) in one store call *before* anything is delivered: if the
        store fails, no channel gets the event (``PublishUnavailable``), never some of them."""
        sequenced = app.connection_recovery.enabled or app.history.enabled
        prepared: list[tuple[str, str, OutFrame, str | None]] = []
        numbered: list[tuple[OutFrame, str, str]] = []
        for channel in channels:
            text = p.frame(event, data, channel=channel, user_id=user_id)
            frame = OutFrame(text, channel=channel)
            target_user = p.server_to_user_id(channel)
            if sequenced and target_user is None:
                numbered.append((frame, channel, str(uuid.uuid4())))
            prepared.append((channel, text, frame, target_user))
        if numbered:
            self._number(app, numbered, event, data, user_id)
        return sum(self._send(app, channel, text, frame, target_user, except_socket_id, cache, count_publish)
                   for channel, text, frame, target_user in prepared)

    def _number(self, app: AppConfig, numbered: list[tuple[OutFrame, str, str]], event: str, data: Any,
                user_id: str | None) -> None:
        try:
            positions = self.sequencer.next_many(
                app, [(channel, message_id, event, data, user_id) for _, channel, message_id in numbered])
        except SequencerUnavailable as exc:
            self.metrics.history_write_failures.labels(app.id, self.metrics.port).inc()
            logger.error("cannot sequence a message; not delivered",
                         extra={"app_id": app.id, "error": str(exc)[:200]})
            raise PublishUnavailable("Message store unavailable") from exc
        for (frame, channel, message_id), (stream_id, serial, published_ms) in zip(numbered, positions, strict=True):
            if app.history.enabled:
                self.metrics.history_writes.labels(app.id, self.metrics.port).inc()
            stored = StoredMessage(serial, published_ms, message_id, event, data, user_id)
            frame.v2_text = stored.frame_v2(channel, stream_id)
            frame.serial = serial
            if app.connection_recovery.enabled:
                self.buffers.append(app.id, channel, BufferedMessage(serial, published_ms, frame.v2_text, message_id),
                                    stream_id, app.connection_recovery, published_ms)
            frame.meta = (stream_id, published_ms, message_id)

    def _send(self, app: AppConfig, channel: str, text: str, frame: OutFrame, target_user: str | None,
              except_socket_id: str | None, cache: bool, count_publish: bool) -> int:
        started = time.perf_counter()
        if target_user is not None:
            sent = self.adapter.send_to_user(app.id, target_user, frame, except_socket_id)
        else:
            sent = self.adapter.broadcast(app.id, channel, frame, except_socket_id)
        if cache and p.is_cache_channel(channel):
            self.cache.set(cache_channel_key(app.id, channel), text, CACHE_TTL_SECONDS)
        bound = self.metrics.app(app.id)
        if count_publish:
            bound.publishes.inc()
        if sent:
            bound.ws_sent.inc(sent)
            bound.bytes_sent.inc(sent * len(text))
            self.metrics.broadcast_latency(app.id, p.channel_type_label(channel), sent,
                                           (time.perf_counter() - started) * 1000)
        return sent

    def record_remote(self, app_id: str, channel: str, v2_text: str, stream_id: str, serial: int,
                      published_ms: int, message_id: str) -> None:
        """A sequenced message published on another node: keep it for resumes here too."""
        app = self.apps.by_id(app_id)
        if app is None or not app.connection_recovery.enabled:
            return
        self.buffers.append(app_id, channel, BufferedMessage(serial, published_ms, v2_text, message_id), stream_id,
                            app.connection_recovery, published_ms)

