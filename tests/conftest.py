"""Shared fixtures: real servers on free ports, a real redis-server, the real SDKs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pusher
import pytest

from tests.support.procs import RedisServer, ServerProcess

try:  # the pusher-js harness (tests/js); present once node deps are installed
    from tests.support.fixtures_js import pusherjs  # noqa: F401
except ImportError:  # pragma: no cover
    pass

# Numeric ids: the Python SDK only accepts ^[0-9]+$ app ids.
APP = {"id": "100", "key": "app-key-1", "secret": "app-secret-1", "enable_client_messages": True}


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with the given apps/options; all are stopped after the test."""
    started: list[ServerProcess] = []

    def make(apps: list[dict[str, Any]] | None = None, *, start: bool = True, **kwargs: Any) -> ServerProcess:
        server = ServerProcess(apps if apps is not None else [APP], **kwargs)
        started.append(server)
        return server.start() if start else server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ServerProcess]:
    """One server for a module whose tests each use their own channels."""
    server = ServerProcess([APP]).start()
    yield server
    server.stop()


def sdk_for(server: ServerProcess, app: dict[str, Any] = APP) -> pusher.Pusher:
    """The official Python server SDK pointed at ``server``."""
    return pusher.Pusher(app_id=app["id"], key=app["key"], secret=app["secret"], host="127.0.0.1",
                         port=server.port, ssl=False, timeout=10)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()
