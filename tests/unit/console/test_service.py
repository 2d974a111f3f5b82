"""What the console reads and does (sockudo/console/service.py), and the hooks that feed its
log, on the pure core: a handler with a local adapter and recording transports."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sockudo.console.service import Console, ConsoleError, _without_tokens
from sockudo.console.tap import Watcher
from sockudo.webhooks.delivery import MemoryDeadLetters, dead_letter_record
from sockudo.webhooks.model import WebhookEndpoint, WebhookSettings, build_deliveries
from sockudo.webhooks.queue import EmbeddedQueue
from tests.support.fakes import FakeRuntime, World, make_app
from tests.support.procs import wait_until

SECRET_HEADER = ("Authorization", "Bearer endpoint-credential-123")


def watched(world: World) -> tuple[Console, Watcher]:
    console = Console(world.services, world.services.tap, FakeRuntime(threads=False), clock=world.clock)
    return console, world.services.tap.watch(world.app.id)


def kinds(events: list[dict]) -> list[tuple[str, str | None]]:
    return [(e["kind"], e.get("channel")) for e in events]


def test_the_log_sees_what_happens_after_the_page_opens() -> None:
    world = World(make_app(enable_client_messages=True))
    early = world.connect()  # before any page: nothing is kept for it
    _, watcher = watched(world)
    client = world.connect()
    client.subscribe("private-room")
    client.send({"event": "client-typing", "channel": "private-room", "data": {"who": "ada"}})
    client.unsubscribe("private-room")
    world.handler.close(client.conn, "closed_4009")
    early.close()
    events = watcher.take(timeout=0)
    assert kinds(events) == [("connection", None), ("subscribed", "private-room"), ("client_event", "private-room"),
                             ("unsubscribed", "private-room"), ("disconnection", None), ("disconnection", None)]
    typing = events[2]
    assert typing["event"] == "client-typing" and json.loads(typing["data"]) == {"who": "ada"}
    assert events[1]["occupied"] is True and events[3]["vacated"] is True
    assert events[4]["code"] == 4009 and events[5]["code"] is None and events[5]["reason"] == "client_closed"
    assert all("auth" not in e and world.app.secret not in json.dumps(e) for e in events)


def test_the_event_creator_takes_the_rest_path_and_its_limits() -> None:
    world = World(make_app(max_event_name_length=10))
    console, watcher = watched(world)
    subscriber = world.connect()
    subscriber.subscribe("news")
    subscriber.take()
    console.publish(world.app.id, {"channel": "news", "name": "headline", "data": {"t": 1}})
    (frame,) = subscriber.take()
    assert frame["event"] == "headline" and json.loads(frame["data"]) == {"t": 1}
    assert [e for e in watcher.take(timeout=0) if e["kind"] == "api_message"][0]["event"] == "headline"
    with pytest.raises(ConsoleError) as too_long:
        console.publish(world.app.id, {"channel": "news", "name": "x" * 11, "data": {}})
    assert too_long.value.status == 400
    with pytest.raises(ConsoleError) as no_app:
        console.publish("nope", {"channel": "news", "name": "e"})
    assert no_app.value.status == 404
    # Only the fields the REST API takes from a form: no socket to exclude.
    console.publish(world.app.id, {"channel": "news", "name": "again", "data": {}, "socket_id": subscriber.socket_id})
    assert [f["event"] for f in subscriber.take()] == ["again"]


def test_dead_letters_are_listed_without_body_headers_or_url_credentials_and_replayed() -> None:
    world = World()
    app = world.app
    endpoint = WebhookEndpoint("https://user:pass@hooks.example.com/in?key=k", frozenset({"channel_occupied"}),
                               headers=(SECRET_HEADER,))
    (delivery,) = build_deliveries(app.id, app.key, app.secret, [endpoint], WebhookSettings(), 1000,
                                   [{"name": "channel_occupied", "channel": "c"}])
    letters = MemoryDeadLetters()
    letters.add(dead_letter_record(delivery, "permanent_failure", 1, 1000, 2000, 410))
    queue = EmbeddedQueue(FakeRuntime(threads=False), None, letters)
    world.services.events = SimpleNamespace(queue=queue, emit=lambda app, event: None)
    console, watcher = watched(world)
    listed = console.dead_letters(app.id)
    text = json.dumps(listed)
    assert "pass" not in text and "key=k" not in text and "endpoint-credential" not in text and "body" not in text
    (letter,) = listed["dead_letters"]
    assert letter["status"] == 410 and letter["events"] == ["channel_occupied"]
    replayed = console.replay_dead_letter(app.id, letter["id"])
    assert replayed["delivery_id"] == delivery.delivery_id and letters.count() == 0
    assert queue.stats().depth["ready"] == 1  # the replayed delivery waits in the queue again
    assert [e["status"] for e in watcher.take(timeout=0)] == ["replayed"]
    with pytest.raises(ConsoleError):
        console.replay_dead_letter(app.id, letter["id"])  # gone now


def test_push_status_never_carries_a_token() -> None:
    view = {"publishId": "p", "undelivered": [{"deviceId": "d1", "deviceToken": "abc", "reason": "x"}],
            "counters": {"succeeded": 1}, "token": "t"}
    assert _without_tokens(view) == {"publishId": "p", "undelivered": [{"deviceId": "d1", "reason": "x"}],
                                     "counters": {"succeeded": 1}}


def test_members_and_channels_of_an_app() -> None:
    world = World()
    console, _ = watched(world)
    a, b = world.connect(), world.connect()
    a.subscribe("presence-lobby", user_id="ada", user_info={"name": "Ada"})
    b.subscribe("presence-lobby", user_id="bob")
    b.subscribe("chat")
    assert console.channels(world.app.id)["channels"] == [
        {"name": "chat", "subscribers": 1, "presence": False},
        {"name": "presence-lobby", "subscribers": 2, "presence": True}]
    members = console.members(world.app.id, "presence-lobby")
    assert members["count"] == 2 and members["members"][0] == {"user_id": "ada", "user_info": {"name": "Ada"}}
    with pytest.raises(ConsoleError):
        console.members(world.app.id, "chat")


def test_the_sampler_runs_only_while_a_page_is_open() -> None:
    world = World()
    tap = world.services.tap
    console = Console(world.services, tap, FakeRuntime(threads=True), clock=world.clock)
    world.connect()
    watcher = tap.watch(world.app.id)
    console.page_opened()
    sample = wait_until(lambda: console.stats.latest(world.app.id), timeout=5, message="a first sample")
    assert sample["connections"] == 1 and sample["channels"] == 0
    tap.unwatch(watcher)
    wait_until(lambda: not console._sampling, timeout=5, message="the sampler to stop with the last page")
