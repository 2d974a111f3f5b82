"""Test doubles for the pure core: the one fake clock, the one fake runtime, a recording transport, and a small
harness that wires a ``Handler`` to a ``LocalAdapter``, ``MemoryCache``, ``Metrics`` and a
``RecordingSink`` exactly as the composition root does, minus sockets and greenlets.

Signatures are computed here with ``hmac``/``hashlib`` directly, never through
``sockudo.auth``, so the tests check the server against an independent signer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry

from sockudo.adapter import LocalAdapter
from sockudo.apps import AppStore
from sockudo.cache import MemoryCache
from sockudo.config import AppConfig, Config
from sockudo.core.connection import Connection
from sockudo.handler import Handler
from sockudo.metrics.registry import Metrics
from sockudo.services import Services
from sockudo.webhooks.lifecycle import RecordingSink

START = 1_700_000_000.0


def hmac_hex(secret: str, message: str) -> str:
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def channel_auth(app: AppConfig, socket_id: str, channel: str, channel_data: str | None = None) -> str:
    to_sign = f"{socket_id}:{channel}" if channel_data is None else f"{socket_id}:{channel}:{channel_data}"
    return f"{app.key}:{hmac_hex(app.secret, to_sign)}"


def user_auth(app: AppConfig, socket_id: str, user_data: str) -> str:
    return f"{app.key}:{hmac_hex(app.secret, f'{socket_id}::user::{user_data}')}"


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class FakeRuntime:
    """The ``sockudo.services.Runtime`` for tests.

    ``threads=True``: spawned work runs on an OS thread and sleeping sleeps (the server hands
    services gevent's runtime; threads are the closest thing without monkey-patching).
    ``threads=False``: spawned work runs at once, sleeping returns at once and events never
    block, for tests that own the clock."""

    def __init__(self, threads: bool = True) -> None:
        self.threads = threads

    def spawn(self, fn: Any, *args: Any) -> Any:
        if not self.threads:
            return fn(*args)
        thread = threading.Thread(target=fn, args=args, daemon=True)
        thread.start()
        return thread

    def sleep(self, seconds: float) -> None:
        if self.threads:
            time.sleep(seconds)

    def event(self) -> Any:
        return threading.Event() if self.threads else _SetEvent()


class _SetEvent:
    """An event that never blocks (``FakeRuntime(threads=False)``)."""

    def set(self) -> None: ...
    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool:
        return True


class RecordingTransport:
    """Records every frame's text and the close call; never blocks.

    ``v2``: a protocol-2 socket, which (like the server's transport) writes each frame's
    protocol-2 form."""

    def __init__(self, v2: bool = False) -> None:
        self.v2 = v2
        self.sent: list[str] = []
        self.closes: list[tuple[int, str]] = []
        self.backlog = 0  # what pending_bytes() reports: set it to play a client that is behind

    def send(self, frame: Any) -> None:
        self.sent.append(frame.text_v2 if self.v2 else frame.text)

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def pending_bytes(self) -> int:
        return self.backlog


def data_of(frame: dict[str, Any]) -> Any:
    """A frame's data, JSON-decoded when it is a string (as pusher-js does)."""
    data = frame.get("data")
    if isinstance(data, str):
        try:
            return json.loads(data)
        except ValueError:
            return data
    return data


class Client:
    """One connected socket driven through the handler."""

    def __init__(self, world: World, conn: Connection, transport: RecordingTransport) -> None:
        self.world = world
        self.conn = conn
        self.transport = transport
        self._seen = 0
        # The connection_established frame, kept apart so ``take`` starts after it.
        self.established = self.take()[0] if transport.sent else None

    @property
    def socket_id(self) -> str:
        return self.conn.socket_id

    @property
    def app(self) -> AppConfig:
        return self.conn.app

    @property
    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(t) for t in self.transport.sent]

    def take(self) -> list[dict[str, Any]]:
        """Frames received since the last ``take``."""
        new = self.transport.sent[self._seen :]
        self._seen = len(self.transport.sent)
        return [json.loads(t) for t in new]

    def take_events(self) -> list[str]:
        return [f["event"] for f in self.take()]

    @property
    def closed_with(self) -> int | None:
        return self.transport.closes[-1][0] if self.transport.closes else None

    def send(self, message: Any) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        self.world.handler.message(self.conn, text)

    def subscribe(
        self,
        channel: str,
        *,
        user_id: Any = None,
        user_info: Any = None,
        channel_data: str | None = None,
        auth: str | None = None,
    ) -> None:
        data: dict[str, Any] = {"channel": channel}
        if channel_data is None and user_id is not None:
            member: dict[str, Any] = {"user_id": user_id}
            if user_info is not None:
                member["user_info"] = user_info
            channel_data = json.dumps(member, separators=(",", ":"))
        if channel_data is not None:
            data["channel_data"] = channel_data
        if auth is None and channel.startswith(("private-", "presence-")):
            auth = channel_auth(self.app, self.socket_id, channel, channel_data)
        if auth is not None:
            data["auth"] = auth
        self.send({"event": "pusher:subscribe", "data": data})

    def unsubscribe(self, channel: str) -> None:
        self.send({"event": "pusher:unsubscribe", "data": {"channel": channel}})

    def signin(self, user: dict[str, Any] | str, auth: str | None = None) -> str:
        user_data = user if isinstance(user, str) else json.dumps(user, separators=(",", ":"))
        if auth is None:
            auth = user_auth(self.app, self.socket_id, user_data)
        self.send({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}})
        return user_data

    def close(self, reason: str = "client_closed") -> None:
        self.world.handler.close(self.conn, reason)


def make_app(**overrides: Any) -> AppConfig:
    values: dict[str, Any] = {"id": "app-1", "key": "key-1", "secret": "secret-1"}
    values.update(overrides)
    return AppConfig(**values)


class World:
    """A handler and its services on one fake node."""

    def __init__(self, *apps: AppConfig, **config: Any) -> None:
        self.apps = apps or (make_app(),)
        self.config = replace(Config(), apps=self.apps, **config)
        self.clock = FakeClock()
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.sink = RecordingSink()
        self.adapter = LocalAdapter()
        self.cache = MemoryCache(self.clock)
        self.services = Services(
            config=self.config,
            apps=AppStore(self.apps),
            adapter=self.adapter,
            cache=self.cache,
            metrics=self.metrics,
            events=self.sink,
            clock=self.clock,
        )
        self.handler = Handler(self.services)

    @property
    def app(self) -> AppConfig:
        return self.apps[0]

    def connect(self, app_key: str | None = None, origin: str | None = None, protocol: int = 7) -> Client:
        app = self.handler.admit(app_key or self.app.key, origin)
        transport = RecordingTransport(v2=protocol == 2)
        conn = self.handler.open(app, transport, protocol)
        return Client(self, conn, transport)

    def lifecycle(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for _, e in self.sink.events if name is None or e["name"] == name]

    def sample(self, metric: str, app_id: str | None = None, **labels: str) -> float:
        value = self.registry.get_sample_value(metric, {"app_id": app_id or self.app.id, "port": "9601", **labels})
        return 0.0 if value is None else value


class RecordingListener:
    """The Redis adapter's cluster listener: records each transition it is told of."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def on_member_removed(self, app_id: str, channel: str, user_id: str) -> None:
        self.calls.append(("member_removed", channel, user_id))

    def on_channel_vacated(self, app_id: str, channel: str) -> None:
        self.calls.append(("channel_vacated", channel))

    def on_user_offline(self, app_id: str, user_id: str) -> None:
        self.calls.append(("user_offline", user_id))
