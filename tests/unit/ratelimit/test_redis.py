"""``[rate_limiter] driver = "redis"``: the per-IP windows counted in a real Redis, shared by
every node, atomic under races, and falling back to per-process counting when Redis is away."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from sockudo.config import load_config
from sockudo.core.errors import ConfigError
from sockudo.core.keys import tag
from sockudo.ratelimit.redis import RETRY_AFTER_FAILURE_S, RedisRateLimiter
from tests.support.fakes import FakeClock
from tests.support.procs import free_port

WINDOW = 10.0


@pytest.fixture
def client(store_redis: Any) -> Any:
    """A real Redis, then a real Redis Cluster (both windows of an address share a slot there)."""
    return store_redis


def limiter(client: Any, prefix: str, clock: FakeClock, max_requests: int = 5) -> RedisRateLimiter:
    return RedisRateLimiter(client, prefix, "api", max_requests, WINDOW, clock=clock, monotonic=clock)


def test_two_nodes_share_one_allowance_per_address(client: Any) -> None:
    prefix, clock = f"t-{uuid.uuid4().hex[:8]}:", FakeClock(1_000_000.0)  # the start of a window
    node_a, node_b = limiter(client, prefix, clock), limiter(client, prefix, clock)
    assert [node_a.hit("10.0.0.1")[:2] for _ in range(3)] == [(True, 4), (True, 3), (True, 2)]
    assert [node_b.hit("10.0.0.1")[:2] for _ in range(2)] == [(True, 1), (True, 0)]
    allowed, remaining, reset = node_a.hit("10.0.0.1")
    assert (allowed, remaining) == (False, 0) and 0 < reset <= WINDOW
    assert not node_b.hit("10.0.0.1")[0]
    assert node_b.hit("10.0.0.2")[0]  # another address has its own allowance


def test_the_previous_window_counts_less_as_it_slides_out(client: Any) -> None:
    prefix, clock = f"t-{uuid.uuid4().hex[:8]}:", FakeClock(1_000_000.0)
    node = limiter(client, prefix, clock, max_requests=4)
    for _ in range(4):
        assert node.hit("ip")[0]
    clock.advance(WINDOW * 1.25)  # a quarter into the next window: 3 of the 4 still count
    assert node.hit("ip")[0]
    assert not node.hit("ip")[0]
    clock.advance(WINDOW * 0.5)  # three quarters in: 1 of the old 4 counts, plus the 1 new
    assert [node.hit("ip")[0] for _ in range(3)] == [True, True, False]
    clock.advance(WINDOW * 2)  # long after: a fresh allowance
    assert all(node.hit("ip")[0] for _ in range(4))


def test_racing_nodes_never_both_take_the_last_slot(client: Any) -> None:
    prefix, clock = f"t-{uuid.uuid4().hex[:8]}:", FakeClock(1_000_000.0)
    nodes = [limiter(client, prefix, clock, max_requests=25) for _ in range(8)]
    results: list[bool] = []
    lock = threading.Lock()

    def burst(node: RedisRateLimiter) -> None:
        for _ in range(10):
            allowed = node.hit("racer")[0]
            with lock:
                results.append(allowed)

    threads = [threading.Thread(target=burst, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 80 and results.count(True) == 25


def test_without_redis_it_counts_per_process_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(1_000_000.0)
    gone = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    node = limiter(gone, "t:", clock, max_requests=3)
    with caplog.at_level(logging.WARNING, logger="sockudo.ratelimit.redis"):
        assert [node.hit("ip")[0] for _ in range(4)] == [True, True, True, False]  # still limited
    assert "counting per process" in caplog.text
    assert caplog.text.count("redis unavailable") == 1  # one attempt, then the fallback for a while
    clock.advance(RETRY_AFTER_FAILURE_S + 0.1)
    with caplog.at_level(logging.WARNING, logger="sockudo.ratelimit.redis"):
        node.hit("ip")
    assert caplog.text.count("redis unavailable") == 2  # tried Redis again


def test_the_redis_driver_without_redis_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigError, match=r"rate_limiter\.driver"):
        load_config(None, {"RATE_LIMITER_ENABLED": "true", "RATE_LIMITER_DRIVER": "redis"})
    config = load_config(None, {"RATE_LIMITER_ENABLED": "true", "RATE_LIMITER_DRIVER": "redis",
                                "REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert config.rate_limiter.driver == "redis"


def test_one_redis_keeps_the_counter_keys_of_before_the_cluster(client: Any) -> None:
    clock = FakeClock(1_000_000.0)
    limiter(client, "kl:", clock).hit("10.1.2.3")
    index = int(1_000_000.0 // WINDOW)
    if isinstance(client, RedisCluster):  # both windows of the address in one slot
        assert client.get(f"kl:rate_limit:api:{tag('kl:rate_limit:api:', '10.1.2.3')}10.1.2.3:{index}") == b"1"
    else:
        assert client.get(f"kl:rate_limit:api:10.1.2.3:{index}") == b"1"
