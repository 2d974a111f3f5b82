"""The console's event tap: what the Pusher logic reports while someone watches.

The handler, the REST path, the webhook sink and the push service call ``tap.record(...)``
behind ``if tap.attached:``. ``attached`` is True only while a console page (here, or on another
node through the relay) is connected, so with nobody watching a hook costs one attribute read
and nothing is built, queued or encoded.

Every watcher (one per open page) has its own bounded queue. When a page reads slower than the
app produces, the queue keeps the newest events and counts what it threw away
(``Watcher.dropped``, shown on the page and summed in ``EventTap.dropped``): a slow browser
never slows the fan-out, and memory stays bounded whatever the traffic.

Events are plain dicts ready for JSON: ``t`` (Unix ms), ``node``, ``app``, ``kind`` and the
kind's own fields. Hook sites pass only what an operator may see: never an app secret, an auth
signature or a device token. Event payloads (``data``) are in them: the page that shows them
requires a signed-in console session.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any, Protocol

# What the page can filter on; the order is the order of its checkboxes.
KINDS = ("connection", "disconnection", "subscribed", "unsubscribed", "api_message", "client_event", "webhook", "push")
MESSAGE_KINDS = frozenset({"api_message", "client_event"})  # counted for the messages/s chart

ConsoleEvent = dict[str, Any]

DEFAULT_WATCHER_CAPACITY = 1000
DEFAULT_MAX_WATCHERS = 16
DEFAULT_OUTBOUND_CAPACITY = 2000


class Wake(Protocol):
    def set(self) -> None: ...
    def clear(self) -> None: ...
    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> Any: ...


class TooManyWatchers(Exception):
    """Every console page costs a queue: their number is bounded too."""


class Watcher:
    """One console page's queue of events (of one app, or of all)."""

    def __init__(self, app_id: str | None, capacity: int, wake: Wake) -> None:
        self.app_id = app_id
        self.capacity = max(1, capacity)
        self.queue: deque[ConsoleEvent] = deque()
        self.dropped = 0
        self.closed = False
        self._wake = wake

    def offer(self, event: ConsoleEvent) -> bool:
        """Queue ``event`` if it is for this page; returns whether an older one was dropped."""
        if self.app_id is not None and event.get("app") != self.app_id:
            return False
        dropped = False
        if len(self.queue) >= self.capacity:
            self.queue.popleft()  # the page is behind: it loses its oldest events, not the newest
            self.dropped += 1
            dropped = True
        self.queue.append(event)
        if not self._wake.is_set():
            self._wake.set()
        return dropped

    def take(self, limit: int = 500, timeout: float | None = None) -> list[ConsoleEvent]:
        """Up to ``limit`` queued events, waiting at most ``timeout`` seconds for the first."""
        if not self.queue and not self.closed:
            self._wake.wait(timeout)
        self._wake.clear()
        out: list[ConsoleEvent] = []
        while self.queue and len(out) < limit:
            out.append(self.queue.popleft())
        return out

    def close(self) -> None:
        self.closed = True
        self._wake.set()


class EventTap:
    """Hands reported events to the console pages watching, and to other nodes' consoles."""

    # ``wake_factory`` makes a Wake: threading.Event in tests, gevent's Event in the server.
    def __init__(self, node_id: str, wake_factory: Callable[[], Any], clock: Callable[[], float] = time.time,
                 watcher_capacity: int = DEFAULT_WATCHER_CAPACITY, max_watchers: int = DEFAULT_MAX_WATCHERS,
                 outbound_capacity: int = DEFAULT_OUTBOUND_CAPACITY) -> None:
        self.node_id = node_id
        self.wake_factory = wake_factory
        self.clock = clock
        self.watcher_capacity = watcher_capacity
        self.max_watchers = max_watchers
        self.outbound_capacity = outbound_capacity
        self.attached = False  # read by every hook: True while anyone (here or elsewhere) watches
        self.watchers: list[Watcher] = []
        self.remote_watching = False  # set by the relay: another node has a console open
        self.outbound: deque[ConsoleEvent] = deque()  # for the relay, filled only while remote_watching
        self.outbound_dropped = 0
        self._watchers_dropped = 0  # of watchers already gone
        self.messages: defaultdict[str, int] = defaultdict(int)  # per app, since the last stats sample

    # -- pages -----------------------------------------------------------------------

    def watch(self, app_id: str | None = None) -> Watcher:
        if len(self.watchers) >= self.max_watchers:
            raise TooManyWatchers(f"at most {self.max_watchers} console pages may watch at once")
        watcher = Watcher(app_id, self.watcher_capacity, self.wake_factory())
        self.watchers.append(watcher)
        self._update()
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        watcher.close()
        if watcher in self.watchers:
            self.watchers.remove(watcher)
            self._watchers_dropped += watcher.dropped
        self._update()

    def set_remote_watching(self, watching: bool) -> None:
        self.remote_watching = watching
        if not watching:
            self.outbound.clear()
        self._update()

    def _update(self) -> None:
        self.attached = bool(self.watchers) or self.remote_watching
        if not self.watchers:
            self.messages.clear()

    @property
    def page_dropped(self) -> int:
        """Events thrown away because a page was behind (pages gone included)."""
        return self._watchers_dropped + sum(w.dropped for w in self.watchers)

    @property
    def dropped(self) -> int:
        """Events thrown away because a page or the relay was behind."""
        return self.page_dropped + self.outbound_dropped

    # -- the hook ----------------------------------------------------------------------

    def record(self, app_id: str, kind: str, **fields: Any) -> None:
        """Report one event of this node. Callers check ``attached`` first (it is cheaper)."""
        if not self.attached:
            return
        event: ConsoleEvent = {"t": int(self.clock() * 1000), "node": self.node_id, "app": app_id, "kind": kind}
        event.update(fields)
        self.deliver(event)
        if self.remote_watching:
            if len(self.outbound) >= self.outbound_capacity:
                self.outbound.popleft()
                self.outbound_dropped += 1
            self.outbound.append(event)

    def deliver(self, event: ConsoleEvent) -> None:
        """To this node's pages: events of this node, and those the relay brings from others."""
        if not self.watchers:
            return
        if event.get("kind") in MESSAGE_KINDS:
            self.messages[event.get("app", "")] += 1
        for watcher in self.watchers:
            watcher.offer(event)

    def take_message_counts(self) -> dict[str, int]:
        """Messages per app since the last call (the stats sampler calls this once a second)."""
        counts = dict(self.messages)
        self.messages.clear()
        return counts


def close_code(reason: str) -> int | None:
    """The WebSocket close code in a disconnection reason such as ``closed_4009``."""
    if reason.startswith("closed_"):
        try:
            return int(reason[7:])
        except ValueError:
            return None
    return None
