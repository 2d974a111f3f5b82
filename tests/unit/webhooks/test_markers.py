"""Pending-leave markers: keys, and the Redis driver (real Redis)."""

from __future__ import annotations

import redis

from sockudo.webhooks.markers import RedisMarkers, marker_key


def test_marker_keys_do_not_collide() -> None:
    a = marker_key("1", {"name": "member_removed", "channel": "presence-a:b", "user_id": "c"})
    b = marker_key("1", {"name": "member_removed", "channel": "presence-a", "user_id": "b:c"})
    c = marker_key("1", {"name": "channel_vacated", "channel": "presence-a"})
    assert len({a, b, c}) == 3


def test_redis_markers_cancel_and_release(rclient: redis.Redis) -> None:
    node_a, node_b = RedisMarkers(rclient, "p:"), RedisMarkers(rclient, "p:")
    node_a.mark("c:1:4:room", "t1", 5000)
    assert node_b.cancel("c:1:4:room") is True  # rejoin on another node
    assert node_a.release("c:1:4:room", "t1") is False
    node_a.mark("c:1:4:room", "t2", 5000)
    node_b.mark("c:1:4:room", "t3", 5000)
    assert node_a.release("c:1:4:room", "t2") is False and node_b.release("c:1:4:room", "t3") is True
