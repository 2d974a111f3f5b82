"""The shared container the composition root builds, and the runtime interface.

``Services`` holds what the handler and the REST API share (apps, adapter, publisher, stores,
metrics); ``Runtime`` is the concurrency the services are given (``sockudo.server.runtime``
implements it with gevent; tests with threads or a fake).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sockudo.adapter import Adapter
from sockudo.apps import AppStore
from sockudo.cache import Cache
from sockudo.config import Config
from sockudo.console.tap import EventTap
from sockudo.history.idempotency import IdempotencyStore, MemoryIdempotency
from sockudo.history.recovery import RecoveryService, ReplayBuffers
from sockudo.history.store import MemorySequencer, Sequencer
from sockudo.metrics.registry import Metrics
from sockudo.publisher import (
    CACHE_TTL_SECONDS,  # noqa: F401  (re-exported for the REST layer)
    Publisher,
)
from sockudo.redis import RedisClients
from sockudo.webhooks.lifecycle import LifecycleSink, NullSink

if TYPE_CHECKING:  # the push service pulls in its providers' HTTP and crypto libraries
    from sockudo.push.service import PushService


class Runtime(Protocol):
    def spawn(self, fn: Callable[..., Any], *args: Any) -> Any: ...
    def sleep(self, seconds: float) -> None: ...
    def event(self) -> Any: ...



@dataclass
class Services:
    """Everything the handler and the REST API share; built once by the composition root."""

    config: Config
    apps: AppStore
    adapter: Adapter
    cache: Cache
    metrics: Metrics
    events: LifecycleSink = field(default_factory=NullSink)
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    sequencer: Sequencer | None = None
    buffers: ReplayBuffers = field(default_factory=ReplayBuffers)
    idempotency: IdempotencyStore | None = None
    redis: RedisClients | None = None  # None in tests that build services by hand
    push: PushService | None = None  # None when [push] is disabled
    # The console's event tap (sockudo/console/tap.py): hooks report to it only while a console
    # watches. The composition root gives it the node id and gevent's Event.
    tap: EventTap = field(default_factory=lambda: EventTap("local", threading.Event))
    publisher: Publisher = field(init=False)
    recovery: RecoveryService = field(init=False)

    def __post_init__(self) -> None:
        if self.sequencer is None:
            self.sequencer = MemorySequencer(self.clock)
        if self.idempotency is None:
            self.idempotency = MemoryIdempotency(self.clock)
        self.publisher = Publisher(self.adapter, self.cache, self.sequencer, self.buffers, self.metrics, self.apps)
        self.recovery = RecoveryService(self.buffers, self.sequencer, self.metrics, self.clock)

