"""Console events across a Redis cluster: every node's events reach every open console.

One Redis pub/sub channel (``{prefix}console``), used only while a console is open somewhere:

* A node with a console page open subscribes to it (and unsubscribes when the last page closes).
* Every node asks Redis once a second how many subscribe (``PUBSUB NUMSUB``). While another
  node listens, its tap also queues its own events in a bounded outbound queue (oldest dropped
  and counted when full) and a greenlet publishes them in batches. With no console open
  anywhere, the only cost is that one question a second.
* A listener hands the batches of other nodes to its pages (its own echoes are skipped by node
  id), at most ``MAX_EVENTS_PER_BATCH`` per message.

Greenlets come from the injected runtime and Redis from the injected client, so this module
imports neither gevent nor redis. A Redis failure is logged (rate-limited) and retried: the
console then shows this node's events only.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from sockudo.console.tap import EventTap

logger = logging.getLogger(__name__)

CHECK_INTERVAL_SECONDS = 1.0
CHANNEL_SUFFIX = "console"
PUBLISH_BATCH = 200
MAX_EVENTS_PER_BATCH = 500
ERROR_LOG_INTERVAL_SECONDS = 30.0


def console_channel(redis_prefix: str) -> str:
    """The relay's pub/sub channel, under the adapter's Redis prefix."""
    return f"{redis_prefix}{CHANNEL_SUFFIX}"


class ConsoleRelay:
    def __init__(self, tap: EventTap, client: Any, channel: str, runtime: Any,
                 failures: tuple[type[BaseException], ...] = (OSError,)) -> None:
        self.tap = tap
        self.client = client
        self.channel = channel
        self.runtime = runtime
        self.failures = failures
        self.received = 0
        self._pubsub: Any = None
        self._running = False
        self._wake = runtime.event()
        self._last_error_log = 0.0

    def start(self) -> None:
        self._running = True
        self.runtime.spawn(self._check_loop)
        self.runtime.spawn(self._publish_loop)

    def stop(self) -> None:
        self._running = False
        self._wake.set()
        self._stop_listening()
        self.tap.set_remote_watching(False)

    # -- who listens --------------------------------------------------------------------

    def _check_loop(self) -> None:
        while self._running:
            try:
                self.check()
            except self.failures as exc:
                self._trouble("console relay: redis unreachable", exc)
                self.tap.set_remote_watching(False)
                self._stop_listening()
            self.runtime.sleep(CHECK_INTERVAL_SECONDS)

    def check(self) -> None:
        if self.tap.watchers and self._pubsub is None:
            self._start_listening()
        elif not self.tap.watchers and self._pubsub is not None:
            self._stop_listening()
        listening = self.client.pubsub_numsub(self.channel)
        count = int(listening[0][1]) if listening else 0
        others = count - (1 if self._pubsub is not None else 0)
        if (others > 0) != self.tap.remote_watching:
            self.tap.set_remote_watching(others > 0)
            if others > 0:
                self._wake.set()

    def _start_listening(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel)
        self._pubsub = pubsub
        self.runtime.spawn(self._listen, pubsub)

    def _stop_listening(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except self.failures:
                pass

    def _listen(self, pubsub: Any) -> None:
        while self._pubsub is pubsub:
            try:
                message = pubsub.get_message(timeout=1.0)
            except self.failures as exc:
                if self._pubsub is pubsub:
                    self._trouble("console relay: subscription lost", exc)
                    self._stop_listening()
                return
            if message is None or message.get("type") != "message":
                continue
            self._receive(message.get("data"))

    def _receive(self, raw: Any) -> None:
        try:
            batch = json.loads(raw)
        except (TypeError, ValueError):
            return
        if not isinstance(batch, dict) or batch.get("node") == self.tap.node_id:
            return  # our own echo
        events = batch.get("events")
        if not isinstance(events, list):
            return
        for event in events[:MAX_EVENTS_PER_BATCH]:
            if isinstance(event, dict):
                self.tap.deliver(event)
                self.received += 1

    # -- our events to the others ---------------------------------------------------------

    def _publish_loop(self) -> None:
        outbound = self.tap.outbound
        while self._running:
            if not outbound:
                self._wake.clear()
                # Idle (nobody watches elsewhere): sleep until check() sees a listener. Watched: poll
                # often, since the console shows events within a second and record() must not wake us.
                self._wake.wait(0.05 if self.tap.remote_watching else None)
                continue
            batch = [outbound.popleft() for _ in range(min(PUBLISH_BATCH, len(outbound)))]
            payload = json.dumps({"node": self.tap.node_id, "events": batch}, separators=(",", ":"), default=str)
            try:
                self.client.publish(self.channel, payload)
            except self.failures as exc:
                self._trouble("console relay: publish failed; events dropped", exc)
                self.tap.outbound_dropped += len(batch)

    def _trouble(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_SECONDS:
            self._last_error_log = now
            logger.warning("%s: %s", what, exc)


class Reporter:
    """For a process without consoles of its own (an RQ worker): publish its events to the relay
    channel while some console listens. Whether one does is asked at most once a
    ``CHECK_INTERVAL_SECONDS`` per channel, so with nobody watching an event costs a dict read."""

    def __init__(self, client: Any, node: str, clock: Any = time.monotonic,
                 failures: tuple[type[BaseException], ...] = (OSError,)) -> None:
        self.client = client
        self.node = node
        self.clock = clock
        self.failures = failures
        self._listening: dict[str, tuple[float, bool]] = {}
        self._last_error_log = 0.0

    def report(self, channel: str, event: dict[str, Any]) -> bool:
        """Publish ``event`` (``app``, ``kind`` and its fields) if a console listens; returns whether it did."""
        now = self.clock()
        try:
            checked = self._listening.get(channel)
            if checked is None or now - checked[0] >= CHECK_INTERVAL_SECONDS:
                reply = self.client.pubsub_numsub(channel)
                checked = (now, bool(reply and int(reply[0][1]) > 0))
                self._listening[channel] = checked
            if not checked[1]:
                return False
            event = {"t": int(time.time() * 1000), "node": self.node, **event}
            self.client.publish(channel, json.dumps({"node": self.node, "events": [event]}, separators=(",", ":"),
                                                    default=str))
            return True
        except self.failures as exc:
            if now - self._last_error_log >= ERROR_LOG_INTERVAL_SECONDS:
                self._last_error_log = now
                logger.warning("console reporter: redis unreachable: %s", exc)
            return False
