"""Idempotent HTTP publish: the store, the claim/poll algorithm, and the REST
functions ``trigger``/``trigger_batch`` with keys in the body, the header, and per batch item.

The concurrent case is shown without threads: the first request's claim is left in the store
(``__processing__``) and the injected ``sleep`` records the polls of the repeat.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from sockudo import rest
from sockudo.config import IdempotencyConfig, RecoveryConfig
from sockudo.core.errors import ApiError
from sockudo.core.keys import tag
from sockudo.history import idempotency
from sockudo.history.idempotency import PROCESSING, IdempotencyUnavailable, MemoryIdempotency, RedisIdempotency
from sockudo.history.store import MemorySequencer, SequencerUnavailable
from tests.support.fakes import Client, FakeClock, World, make_app
from tests.support.procs import unreachable_redis
from tests.support.rediscluster import STORE_BACKENDS, store_client

CH = "payments"


class Sleeps:
    """An injected ``sleep`` that records each call and can act between polls."""

    def __init__(self, world: World | None = None, action: Any = None) -> None:
        self.calls: list[float] = []
        self.world = world
        self.action = action

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.world is not None:
            self.world.clock.advance(seconds)
        if self.action is not None:
            self.action(len(self.calls))


@pytest.fixture(params=["memory", *STORE_BACKENDS])
def world(request: pytest.FixtureRequest) -> World:
    """A world whose idempotency store is in memory, then in a real Redis and a real Redis Cluster."""
    w = World(make_app())
    w.services.sleep = Sleeps(w)
    if request.param != "memory":
        w.services.idempotency = RedisIdempotency(store_client(request, request.param))
    return w


def listener(w: World, channel: str = CH) -> Client:
    c = w.connect()
    c.subscribe(channel)
    c.take()
    return c


def delivered(c: Client) -> list[Any]:
    return [f["data"] for f in c.take() if not f["event"].startswith("pusher")]


def event(key: str | None = None, data: str = "paid", channel: str = CH, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "payment", "channels": [channel], "data": data, **extra}
    if key is not None:
        body["idempotency_key"] = key
    return body


def api_error(fn: Any, *args: Any, **kw: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kw)
    return info.value


def duplicates(w: World) -> float:
    return w.sample("sockudo_idempotency_duplicates_total")


# -- the store ------------------------------------------------------------------------------------


def test_memory_store_claims_once_until_the_ttl_expires() -> None:
    clock = FakeClock()
    store = MemoryIdempotency(clock)
    assert store.claim("k", 10) is None
    assert store.claim("k", 10) == PROCESSING
    store.store("k", '{"ok":1}', 10)
    assert store.claim("k", 10) == '{"ok":1}'
    clock.advance(10)
    assert store.get("k") is None
    assert store.claim("k", 10) is None
    store.release("k")
    assert store.get("k") is None


@pytest.mark.parametrize("key", ["", None, 12, "x" * 129])
def test_empty_or_too_long_keys_are_400(key: Any) -> None:
    assert api_error(idempotency.validate_key, key, 128).status == 400


def test_a_key_of_exactly_the_maximum_is_accepted() -> None:
    assert idempotency.validate_key("x" * 128, 128) == "x" * 128


def test_begin_returns_none_for_a_new_key_and_the_response_for_a_repeat() -> None:
    store = MemoryIdempotency(FakeClock())
    sleeps = Sleeps()
    assert idempotency.begin(store, "k", 60, sleeps) is None
    store.store("k", "{}", 60)
    assert idempotency.begin(store, "k", 60, sleeps) == "{}"
    assert sleeps.calls == []


def test_begin_polls_six_times_then_answers_503_with_retry_after() -> None:
    store = MemoryIdempotency(FakeClock())
    store.claim("k", 60)  # another request is publishing
    sleeps = Sleeps()
    error = api_error(idempotency.begin, store, "k", 60, sleeps)
    assert error.status == 503 and error.slug == "backpressure"
    assert error.headers == {"Retry-After": "1"}
    assert sleeps.calls == [0.05] * 6


def test_begin_returns_the_response_stored_while_it_polled() -> None:
    store = MemoryIdempotency(FakeClock())
    store.claim("k", 60)
    def answer_on_the_second_poll(n: int) -> None:
        if n == 2:
            store.store("k", '{"first":true}', 60)

    sleeps = Sleeps(action=answer_on_the_second_poll)
    assert idempotency.begin(store, "k", 60, sleeps) == '{"first":true}'
    assert len(sleeps.calls) == 2


def test_begin_claims_a_key_released_while_it_polled() -> None:
    store = MemoryIdempotency(FakeClock())
    store.claim("k", 60)
    def release_on_the_third_poll(n: int) -> None:
        if n == 3:
            store.release("k")

    sleeps = Sleeps(action=release_on_the_third_poll)
    assert idempotency.begin(store, "k", 60, sleeps) is None
    assert store.get("k") == PROCESSING  # claimed for this request now


def test_store_failure_is_503_and_never_publishes(world: World) -> None:
    c = listener(world)
    world.services.idempotency = RedisIdempotency(unreachable_redis())
    error = api_error(rest.trigger, world.services, world.app, event("k1"))
    assert error.status == 503
    assert delivered(c) == []


def test_a_bug_in_the_store_is_not_reported_as_the_store_being_down(world: World) -> None:
    class Buggy(MemoryIdempotency):
        def claim(self, key: str, ttl_seconds: int) -> str | None:
            raise TypeError("a bug, not an outage")

    c = listener(world)
    world.services.idempotency = Buggy(world.clock)
    with pytest.raises(TypeError):
        rest.trigger(world.services, world.app, event("k1"))
    assert delivered(c) == []


# -- POST /events -------------------------------------------------------------------------------


def test_repeat_with_a_body_key_returns_the_first_response_and_delivers_once(world: World) -> None:
    c = listener(world)
    body = event("order-1", info="subscription_count")
    answers = [rest.trigger(world.services, world.app, body) for _ in range(3)]
    assert answers[0] == {"channels": {CH: {"subscription_count": 1}}}
    assert answers == [answers[0]] * 3
    assert delivered(c) == ["paid"]
    assert duplicates(world) == 2
    assert world.sample("sockudo_idempotency_publish_total") == 3


def test_repeat_with_the_header_key_delivers_once(world: World) -> None:
    c = listener(world)
    answers = [rest.trigger(world.services, world.app, event(), "hdr-1") for _ in range(3)]
    assert answers == [{}, {}, {}]
    assert delivered(c) == ["paid"]


def test_body_key_wins_over_the_header(world: World) -> None:
    c = listener(world)
    rest.trigger(world.services, world.app, event("body-key"), "header-key")
    rest.trigger(world.services, world.app, event(), "header-key")  # a different key: delivered
    rest.trigger(world.services, world.app, event("body-key"), "another-header")  # the body key: not
    assert delivered(c) == ["paid", "paid"]


def test_without_a_key_every_publish_is_delivered(world: World) -> None:
    c = listener(world)
    rest.trigger(world.services, world.app, event())
    rest.trigger(world.services, world.app, event())
    assert delivered(c) == ["paid", "paid"]


def test_keys_are_per_app() -> None:
    a, b = make_app(), make_app(id="app-2", key="key-2", secret="s2")
    w = World(a, b)
    w.services.sleep = Sleeps(w)
    ca = listener(w)
    cb = w.connect(app_key="key-2")
    cb.subscribe(CH)
    cb.take()
    rest.trigger(w.services, a, event("same"))
    rest.trigger(w.services, b, event("same"))
    assert delivered(ca) == ["paid"] and delivered(cb) == ["paid"]


def test_after_the_ttl_the_key_publishes_again() -> None:
    w = World(make_app(idempotency=IdempotencyConfig(ttl_seconds=30)))
    w.services.sleep = Sleeps(w)
    c = listener(w)
    rest.trigger(w.services, w.app, event("k"))
    w.clock.advance(29)
    rest.trigger(w.services, w.app, event("k"))
    w.clock.advance(2)
    rest.trigger(w.services, w.app, event("k"))
    assert delivered(c) == ["paid", "paid"]


def test_disabled_idempotency_ignores_keys() -> None:
    w = World(make_app(idempotency=IdempotencyConfig(enabled=False)))
    c = listener(w)
    rest.trigger(w.services, w.app, event("k"))
    rest.trigger(w.services, w.app, event("k"), "k")
    assert delivered(c) == ["paid", "paid"]


def test_key_longer_than_the_limit_is_400_and_not_delivered(world: World) -> None:
    c = listener(world)
    assert api_error(rest.trigger, world.services, world.app, event("k" * 129)).status == 400
    assert api_error(rest.trigger, world.services, world.app, event(), "k" * 129).status == 400
    assert api_error(rest.trigger, world.services, world.app, event("")).status == 400
    assert delivered(c) == []


def test_concurrent_repeat_gets_503_with_retry_after_after_the_polls(world: World) -> None:
    c = listener(world)
    store = world.services.idempotency
    assert store is not None
    store.claim(f"app:{world.app.id}:idempotency:k", 60)  # the first request is still publishing
    error = api_error(rest.trigger, world.services, world.app, event("k"))
    assert error.status == 503 and error.headers["Retry-After"] == "1"
    assert world.services.sleep.calls == [0.05] * 6  # type: ignore[attr-defined]
    assert delivered(c) == []


def test_a_failed_publish_releases_the_key_so_a_retry_publishes() -> None:
    class Flaky(MemorySequencer):
        down = True

        def next(self, *args: Any, **kw: Any) -> Any:
            if self.down:
                raise SequencerUnavailable("down")
            return super().next(*args, **kw)

    w = World(make_app(connection_recovery=RecoveryConfig(enabled=True)))
    w.services.sleep = Sleeps(w)
    flaky = Flaky(w.clock)
    w.services.sequencer = w.services.publisher.sequencer = w.services.recovery.sequencer = flaky
    c = listener(w)
    assert api_error(rest.trigger, w.services, w.app, event("k")).status == 503
    flaky.down = False
    rest.trigger(w.services, w.app, event("k"))
    assert delivered(c) == ["paid"]


def test_a_lost_response_record_does_not_fail_the_publish(world: World) -> None:
    class NoStore(MemoryIdempotency):
        def store(self, key: str, response: str, ttl_seconds: int) -> None:
            raise IdempotencyUnavailable("redis went away")

    c = listener(world)
    world.services.idempotency = NoStore(world.clock)
    assert rest.trigger(world.services, world.app, event("k")) == {}
    assert delivered(c) == ["paid"]
    assert world.sample("sockudo_publish_rejected_total", reason="idempotency_store_failed") == 1


# -- POST /batch_events -----------------------------------------------------------------------------


def batch(*items: dict[str, Any]) -> dict[str, Any]:
    return {"batch": list(items)}


def test_batch_item_keys_dedupe_each_item(world: World) -> None:
    c = listener(world)
    first = rest.trigger_batch(world.services, world.app, batch(event("a", "A"), event("b", "B")))
    second = rest.trigger_batch(world.services, world.app, batch(event("a", "A"), event("c", "C")))
    assert first == second == {}
    assert delivered(c) == ["A", "B", "C"]
    assert duplicates(world) == 1


def test_batch_duplicate_item_answers_an_empty_entry(world: World) -> None:
    c = listener(world)
    items = [event("a", "A", info="subscription_count"), event("b", "B", info="subscription_count")]
    first = rest.trigger_batch(world.services, world.app, batch(*items))
    assert first == {"batch": [{"subscription_count": 1}, {"subscription_count": 1}]}
    again = rest.trigger_batch(world.services, world.app, batch(items[0], event("c", "C", info="subscription_count")))
    assert again == {"batch": [{}, {"subscription_count": 1}]}
    assert delivered(c) == ["A", "B", "C"]


def test_batch_header_key_covers_the_whole_request(world: World) -> None:
    c = listener(world)
    body = batch(event(None, "A"), event(None, "B"))
    answers = [rest.trigger_batch(world.services, world.app, body, "batch-1") for _ in range(3)]
    assert answers == [{}, {}, {}]
    assert delivered(c) == ["A", "B"]
    # The batch key and an /events key of the same name are different keys.
    rest.trigger(world.services, world.app, event(None, "single"), "batch-1")
    assert delivered(c) == ["single"]


def test_batch_item_key_and_events_key_share_one_namespace(world: World) -> None:
    """An item key dedupes against a single publish with that key (both are event keys)."""
    c = listener(world)
    rest.trigger(world.services, world.app, event("shared", "first"))
    rest.trigger_batch(world.services, world.app, batch(event("shared", "again"), event(None, "other")))
    assert delivered(c) == ["first", "other"]


def test_batch_with_an_over_long_item_key_is_400_before_anything_is_published(world: World) -> None:
    c = listener(world)
    error = api_error(rest.trigger_batch, world.services, world.app, batch(event("ok", "A"), event("k" * 200, "B")))
    assert error.status == 400
    assert delivered(c) == []


def test_response_stored_is_json(world: World) -> None:
    rest.trigger(world.services, world.app, event("k", info="subscription_count"))
    store = world.services.idempotency
    assert store is not None
    stored = store.get(f"app:{world.app.id}:idempotency:k") or ""
    assert json.loads(stored) == {"channels": {CH: {"subscription_count": 0}}}


def test_the_redis_store_claims_once_replays_and_releases(store_redis: Any) -> None:
    store = RedisIdempotency(store_redis)
    key = "app:1:idempotency:{order}-7"  # a client's braces do not choose the slot on a cluster
    assert store.claim(key, 60) is None
    assert store.claim(key, 60) == PROCESSING
    store.store(key, '{"ok":1}', 60)
    assert store.claim(key, 60) == store.get(key) == '{"ok":1}'
    store.release(key)
    assert store.get(key) is None
    expected = f"sockudo:{tag('', key)}{key}" if store.cluster else f"sockudo:{key}"
    store.claim(key, 60)
    assert store_redis.exists(expected) == 1  # one Redis: the key of before the cluster existed
