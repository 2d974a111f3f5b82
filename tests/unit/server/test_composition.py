"""The composition root builds one Redis client for the whole process."""

from __future__ import annotations

from pathlib import Path

from sockudo.config import load_config
from sockudo.server.main import build_services
from tests.support.procs import RedisServer, toml_config


def test_every_redis_subsystem_shares_one_client(redis_server: RedisServer, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    webhook = {"url": "http://127.0.0.1:9/hook", "event_types": ["channel_occupied"]}
    path.write_text(toml_config([{"id": "1", "key": "k", "secret": "s", "webhooks": [webhook]}]))
    config = load_config(str(path), env={"REDIS_URL": redis_server.url})
    services = build_services(config)
    events = services.events
    shared = services.adapter.client
    assert services.redis is not None and shared is services.redis.shared
    assert services.sequencer.client is shared  # type: ignore[union-attr]
    assert services.idempotency.client is shared  # type: ignore[union-attr]
    assert services.cache.client is shared  # type: ignore[attr-defined]
    assert events.queue.client is shared and events.markers.client is shared  # type: ignore[attr-defined]
    assert services.push is not None and services.push.queue.client is shared
    # one connection pool between them all
    pools = {id(c.connection_pool) for c in (shared, services.sequencer.client, events.queue.client,  # type: ignore[union-attr]
                                              services.push.queue.client)}
    assert len(pools) == 1
