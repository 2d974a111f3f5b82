"""Shared fixtures: real servers on free ports, a real redis-server, the real SDKs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.procs import RedisServer, ServerProcess
from tests.support.rediscluster import STORE_BACKENDS, RedisClusterServer, store_client
from tests.support.sdk import APP

try:  # the pusher-js harness (tests/js); present once node deps are installed
    from tests.support.fixtures_js import pusherjs  # noqa: F401
except ImportError:  # pragma: no cover
    pass

#: Fixtures that start or use a real redis-server: a test needing any of them is marked ``redis``.
REDIS_FIXTURES = {"redis_server", "own_redis", "flushed_redis", "redis_url",
                  "redis_cluster", "flushed_cluster", "redis_cluster_ha"}
#: Fixtures that start a real Redis Cluster: such a test is marked ``rediscluster`` too; `make test`
#: leaves those to `make test-cluster`.
CLUSTER_FIXTURES = {"redis_cluster", "flushed_cluster", "redis_cluster_ha"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if REDIS_FIXTURES & fixtures:
            item.add_marker(pytest.mark.redis)
        if CLUSTER_FIXTURES & fixtures:
            item.add_marker(pytest.mark.rediscluster)


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


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    """A real Redis Cluster of 3 masters (no replicas), shared by the session: tests use their own
    keys, or ``flushed_cluster``."""
    cluster = RedisClusterServer(masters=3).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def flushed_cluster(redis_cluster: RedisClusterServer) -> Iterator[RedisClusterServer]:
    """The session's cluster, emptied before the test."""
    redis_cluster.flushall()
    yield redis_cluster


@pytest.fixture
def redis_cluster_ha() -> Iterator[RedisClusterServer]:
    """A cluster of this test alone: 3 masters with one replica each, to kill or pause a master
    (``kill_master``/``pause_master``) and ``wait_failover``."""
    cluster = RedisClusterServer(masters=3, replicas=1).start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=STORE_BACKENDS)
def store_redis(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An empty Redis for a store: a database of the session's redis-server (a ``redis.Redis``),
    then the session's Redis Cluster (a ``RedisCluster``; the stores put hash tags in their keys)."""
    client = store_client(request, request.param)
    yield client
    client.close()
