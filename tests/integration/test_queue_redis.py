"""QUEUE_REDIS_URL: the adapter on one Redis, the RQ queues (and what the workers share with the
server) on another. A webhook is still delivered, by ``python -m workers`` configured the same
way as the server (no ``--url``), and the queue's keys are on the queue Redis only."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from tests.support.procs import RedisServer, ServerProcess, wait_until
from tests.support.webhooks import KEY, Receiver, WorkerProcess, app, assert_signed, webhooks
from tests.support.wsraw import RawClient


@pytest.fixture
def queue_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def test_webhooks_queue_on_their_own_redis(
        server_factory: Callable[..., ServerProcess], receiver: Receiver, redis_url: str,
        queue_redis: RedisServer) -> None:
    env = {"REDIS_URL": redis_url, "QUEUE_REDIS_URL": queue_redis.url}
    worker = WorkerProcess(None, env=env).start()
    try:
        server = server_factory([app({"url": receiver.url("/hooks"), "event_types": ["channel_occupied"]})],
                                env=env, webhooks=webhooks())
        client = RawClient.connect(server, KEY)
        client.subscribe("queued-elsewhere")
        wait_until(lambda: receiver.at("/hooks"), timeout=15, message="the channel_occupied webhook")
        body = assert_signed(receiver.at("/hooks")[0])
        assert body["events"][0] == {"name": "channel_occupied", "channel": "queued-elsewhere"}
        client.close()
    finally:
        worker.stop()

    queue_keys = [str(k) for k in redis.Redis(port=queue_redis.port, decode_responses=True).keys("*")]
    adapter_keys = [str(k) for k in redis.Redis.from_url(redis_url, decode_responses=True).keys("*")]
    assert any(k.startswith("rq:") for k in queue_keys), queue_keys  # the worker, its queue and registries
    assert not [k for k in adapter_keys if k.startswith("rq:") or ":webhooks:" in k], adapter_keys
    assert any(k.startswith("sockudo_adapter:") for k in adapter_keys)  # the adapter did use its Redis
