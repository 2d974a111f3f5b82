"""Per-connection limits in the handler: ``max_channels_per_connection``."""

from __future__ import annotations

from tests.support.fakes import World, make_app


def test_one_subscription_over_the_limit_gets_4300_and_nothing_is_held() -> None:
    world = World(make_app(max_channels_per_connection=3))
    client = world.connect()
    for channel in ("a", "private-b", "c"):
        client.subscribe(channel)
    client.take()
    client.subscribe("presence-d", user_id="u1")
    frames = client.take()
    assert [f["event"] for f in frames] == ["pusher:subscription_error", "pusher:error"]
    assert frames[0]["channel"] == "presence-d" and frames[0]["data"]["type"] == "LimitReached"
    assert frames[1]["data"]["code"] == 4300 and client.closed_with is None
    assert set(client.conn.channels) == {"a", "private-b", "c"}
    assert world.adapter.presence_members(world.app.id, "presence-d") == {}
    assert world.lifecycle("channel_occupied") == [{"name": "channel_occupied", "channel": c}
                                                   for c in ("a", "private-b", "c")]
    client.subscribe("a")  # a channel already held is re-acknowledged, not counted again
    assert client.take_events() == ["pusher_internal:subscription_succeeded"]
    client.unsubscribe("c")
    client.subscribe("presence-d", user_id="u1")
    assert "pusher_internal:subscription_succeeded" in client.take_events()


def test_zero_means_unlimited() -> None:
    world = World(make_app(max_channels_per_connection=0))
    client = world.connect()
    for i in range(250):
        client.subscribe(f"ch-{i}")
    assert len(client.conn.channels) == 250
    assert "pusher:error" not in client.take_events()
