"""Fixtures shared by the integration modules (tests/conftest.py has the session-wide ones).

A module defines its own ``server`` fixture (module scope) and, when it talks as another app than
the default, a module-level ``APP``; ``sdk`` and ``watcher`` then use that server and app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pusher
import pytest
import redis

from tests.support import sdk as sdk_support
from tests.support.procs import RedisServer, ServerProcess
from tests.support.webhooks import Receiver, WorkerProcess
from tests.support.wsraw import RawClient, watching


def _app(request: pytest.FixtureRequest) -> dict[str, object]:
    return getattr(request.module, "APP", sdk_support.APP)


@pytest.fixture(scope="module")
def sdk(request: pytest.FixtureRequest, server: ServerProcess) -> pusher.Pusher:
    """The official Python SDK, as the module's app, pointed at the module's server."""
    return sdk_support.sdk_for(server, _app(request))


@pytest.fixture(scope="module")
def watcher(request: pytest.FixtureRequest, server: ServerProcess) -> Iterator[RawClient]:
    """A subscriber of ``WATCH`` connected before any bad input and kept for the whole module:
    whatever a test throws at the server, it must keep receiving (``assert_still_delivering``)."""
    with watching(server, str(_app(request)["key"]), sdk_support.WATCH) as client:
        yield client


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone, not yet started: the test starts, stops, freezes or
    restarts it without disturbing others."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def flushed_redis(redis_server: RedisServer) -> Iterator[None]:
    """The session's Redis, emptied before the test: no node, presence, serial, history or
    idempotency state of an earlier test (a node killed with SIGKILL leaves its holdings)."""
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    client.close()
    yield


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A scripted webhook receiver on a free port."""
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A database of the session's redis-server of our own, empty for each test."""
    client = redis.Redis(port=redis_server.port, db=9)
    client.flushdb()
    yield f"redis://127.0.0.1:{redis_server.port}/9"
    client.flushdb()
    client.close()


@pytest.fixture
def worker_factory(redis_url: str) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``python -m workers`` processes (``concurrency=N``: job slots); stopped after the test."""
    started: list[WorkerProcess] = []

    def make(concurrency: int | None = None) -> WorkerProcess:
        worker = WorkerProcess(redis_url, concurrency)
        started.append(worker)
        return worker.start()

    yield make
    for worker in started:
        worker.stop()
