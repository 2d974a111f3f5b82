"""The TTL cache behind cache channels: in memory on a fake clock, in a real Redis and Redis Cluster,
and Redis away."""

from __future__ import annotations

from typing import Any

import pytest
from redis.cluster import RedisCluster

from sockudo.cache import MemoryCache, RedisCache, cache_channel_key
from sockudo.core.keys import tag
from tests.support.fakes import FakeClock
from tests.support.procs import unreachable_redis


def test_get_returns_value_and_seconds_left() -> None:
    clock = FakeClock()
    cache = MemoryCache(clock)
    assert cache.get("k") is None
    cache.set("k", "v", 60)
    assert cache.get("k") == ("v", 60)
    clock.advance(15)
    assert cache.get("k") == ("v", 45)


def test_entries_expire_at_their_ttl() -> None:
    clock = FakeClock()
    cache = MemoryCache(clock)
    cache.set("k", "v", 10)
    clock.advance(9.5)
    assert cache.get("k") is not None
    clock.advance(0.5)
    assert cache.get("k") is None


def test_set_replaces_value_and_ttl() -> None:
    clock = FakeClock()
    cache = MemoryCache(clock)
    cache.set("k", "old", 10)
    clock.advance(8)
    cache.set("k", "new", 10)
    clock.advance(8)
    assert cache.get("k") == ("new", 2)


def test_sweep_drops_only_expired_entries() -> None:
    clock = FakeClock()
    cache = MemoryCache(clock)
    cache.set("short", "a", 1)
    cache.set("long", "b", 100)
    clock.advance(5)
    cache.sweep()
    assert "short" not in cache._items
    assert cache.get("long") == ("b", 95)


def test_many_expired_entries_do_not_accumulate() -> None:
    clock = FakeClock()
    cache = MemoryCache(clock)
    for i in range(5000):
        cache.set(f"k{i}", "v", 1)
        clock.advance(0.01)
    # Entries set more than a second ago are swept as new ones arrive.
    assert len(cache._items) < 2100


def test_cache_keys_separate_apps_and_channels() -> None:
    keys = {cache_channel_key(a, c) for a in ("1", "2") for c in ("cache-a", "cache-b")}
    assert len(keys) == 4


def test_redis_cache_with_redis_away_is_a_miss_and_a_skipped_write() -> None:
    cache = RedisCache(unreachable_redis())
    cache.set("k", "v", 10)
    assert cache.get("k") is None


def test_a_bug_behind_the_redis_cache_is_not_taken_for_redis_being_away() -> None:
    class Buggy:
        def pipeline(self, transaction: bool = True) -> None:
            raise TypeError("a bug, not an outage")

        def set(self, *args: object, **kwargs: object) -> None:
            raise TypeError("a bug, not an outage")

    cache = RedisCache(Buggy())
    with pytest.raises(TypeError):
        cache.get("k")
    with pytest.raises(TypeError):
        cache.set("k", "v", 10)


def test_redis_cache_keeps_the_last_message_on_redis_and_on_a_cluster(store_redis: Any) -> None:
    """The payload and its seconds left, from a real Redis and a real Redis Cluster; on one Redis
    the key is the one of before the cluster existed."""
    cache = RedisCache(store_redis)
    key = cache_channel_key("app-1", "cache-{prices}")
    assert cache.get(key) is None
    cache.set(key, '{"event":"ev"}', 30)
    value, left = cache.get(key)  # type: ignore[misc]
    assert value == '{"event":"ev"}' and 29 < left <= 30
    stored = f"sockudo:{tag('', key)}{key}" if isinstance(store_redis, RedisCluster) else f"sockudo:{key}"
    assert store_redis.exists(stored) == 1
