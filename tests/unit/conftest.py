"""Fixtures shared by unit tests of several packages: a local HTTP receiver and a real Redis."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import redis

from tests.unit.webhooks.helpers import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([])
    yield r
    r.close()


@pytest.fixture
def rclient(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """A real Redis (the session's redis-server); ``make test-unit`` may run where none is installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    redis_server = request.getfixturevalue("redis_server")
    client = redis.Redis(port=redis_server.port, db=11)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()
