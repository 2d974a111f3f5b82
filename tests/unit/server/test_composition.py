"""The composition root builds one Redis client for the whole process."""

from __future__ import annotations

from pathlib import Path

from sockudo.adapter.redis import RedisAdapter
from sockudo.cache import RedisCache
from sockudo.config import load_config
from sockudo.history.idempotency import RedisIdempotency
from sockudo.history.store import RedisSequencer
from sockudo.server.main import build_services
from sockudo.webhooks.markers import RedisMarkers
from sockudo.webhooks.queue import RqQueue
from sockudo.webhooks.sink import WebhookSink
from tests.support.procs import RedisServer, toml_config


def test_every_redis_subsystem_shares_one_client(redis_server: RedisServer, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    webhook = {"url": "http://127.0.0.1:9/hook", "event_types": ["channel_occupied"]}
    path.write_text(toml_config([{"id": "1", "key": "k", "secret": "s", "webhooks": [webhook]}]))
    config = load_config(str(path), env={"REDIS_URL": redis_server.url})
    services = build_services(config)
    adapter, events, sequencer = services.adapter, services.events, services.sequencer
    assert isinstance(adapter, RedisAdapter) and isinstance(sequencer, RedisSequencer)
    assert isinstance(events, WebhookSink) and isinstance(events.queue, RqQueue)
    assert isinstance(events.markers, RedisMarkers) and isinstance(services.cache, RedisCache)
    assert isinstance(services.idempotency, RedisIdempotency)
    shared = adapter.client
    assert services.redis is not None and shared is services.redis.shared
    assert sequencer.client is shared and services.idempotency.client is shared and services.cache.client is shared
    assert events.queue.client is shared and events.markers.client is shared
    assert services.push is not None and services.push.queue.client is shared
    # one connection pool between them all
    pools = {id(c.connection_pool) for c in (shared, sequencer.client, events.queue.client, services.push.queue.client)}
    assert len(pools) == 1
