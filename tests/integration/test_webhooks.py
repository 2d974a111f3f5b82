"""Webhooks end to end: real servers, a real redis-server, real ``python -m workers`` (RQ)
processes, real WebSocket clients and a local HTTP receiver scripted per path.

Every wait is a deadline (``wait_until``); settings are shortened (debounce, backoff, budget)
so the module stays well under its time budget.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import redis

from tests.support.metrics import metric
from tests.support.procs import ServerProcess, free_port, wait_until
from tests.support.sdk import sdk_for
from tests.support.webhooks import (
    ALL_TYPES,
    APP_ID,
    KEY,
    SDK,
    SECRET,
    Receiver,
    WorkerProcess,
    app,
    assert_signed,
    cli,
    dead_letters,
    stays_false,
    webhooks,
)
from tests.support.wsraw import RawClient

# -- every event type, signed; filters and headers ---------------------------------------------


def test_every_event_type_arrives_signed_filtered_and_with_headers(
        server_factory: Callable[..., ServerProcess], receiver: Receiver, redis_url: str,
        worker_factory: Callable[[], WorkerProcess]) -> None:
    worker_factory()
    server = server_factory([app(
        {"url": receiver.url("/all?token=abc"), "event_types": ALL_TYPES, "headers": {"X-Custom": "hello"}},
        {"url": receiver.url("/presence"), "event_types": ["member_added", "channel_occupied"],
         "filter": {"channel_prefix": "presence-"}},
        enable_subscription_count=True)], env={"REDIS_URL": redis_url}, webhooks=webhooks())
    room = "presence-room"
    c1 = RawClient.connect(server, KEY)
    c1.subscribe("cache-prices")
    c1.expect("pusher:cache_miss", channel="cache-prices")
    c1.subscribe(room, SDK.authenticate(room, c1.socket_id, {"user_id": "u1"}))
    c2 = RawClient.connect(server, KEY)
    c2.subscribe(room, SDK.authenticate(room, c2.socket_id, {"user_id": "u2"}))
    c1.send_json({"event": "client-hi", "channel": room, "data": {"x": 1}})
    c2.expect("client-hi")
    c2.close()
    wait_until(lambda: {"name": "member_removed", "channel": room, "user_id": "u2"} in receiver.events_at("/all"),
               timeout=15, message="member_removed u2")
    c1.close()

    def vacated() -> bool:
        names = {(e["name"], e["channel"]) for e in receiver.events_at("/all")}
        return {("channel_vacated", room), ("channel_vacated", "cache-prices")} <= names
    wait_until(vacated, timeout=15, message="both channels vacated")

    events = receiver.events_at("/all")
    assert {e["name"] for e in events} == set(ALL_TYPES)
    by_name = {e["name"]: e for e in reversed(events)}  # first occurrence of each
    assert by_name["cache_miss"] == {"name": "cache_miss", "channel": "cache-prices", "data": "{}"}
    assert by_name["subscription_count"] == {"name": "subscription_count", "channel": "cache-prices",
                                             "subscription_count": 1}
    client_event = by_name["client_event"]
    assert client_event == {"name": "client_event", "channel": room, "event": "client-hi",
                            "data": json.dumps({"x": 1}, separators=(",", ":")), "socket_id": c1.socket_id,
                            "user_id": "u1"} or json.loads(client_event["data"]) == {"x": 1}
    assert client_event["user_id"] == "u1" and client_event["socket_id"] == c1.socket_id
    assert [e for e in events if e["name"] == "member_added"] == [
        {"name": "member_added", "channel": room, "user_id": "u1"},
        {"name": "member_added", "channel": room, "user_id": "u2"}]

    for request in receiver.at("/all"):
        assert_signed(request)
        assert request.headers["X-Custom"] == "hello"
    presence = receiver.at("/presence")
    assert presence, "the filtered endpoint got nothing"
    for request in presence:
        assert_signed(request)
        assert "X-Custom" not in request.headers
    assert sorted((e["name"], e.get("user_id", "")) for e in receiver.events_at("/presence")) == [
        ("channel_occupied", ""), ("member_added", "u1"), ("member_added", "u2")]
    assert len({r.delivery_id for r in receiver.requests}) == len(receiver.requests)


# -- retries, permanent failures, dead letters and replay -----------------------------------------


def test_500_three_times_then_200_is_delivered_once_with_retries_counted(
        server_factory: Callable[..., ServerProcess], receiver: Receiver, redis_url: str,
        worker_factory: Callable[[], WorkerProcess]) -> None:
    worker = worker_factory()
    receiver.script["/flaky"] = [500, 500, 500]
    server = server_factory([app({"url": receiver.url("/flaky?token=abc123"), "event_types": ["channel_occupied"]})],
                            env={"REDIS_URL": redis_url}, webhooks=webhooks())
    client = RawClient.connect(server, KEY)
    client.subscribe("flaky-channel")
    wait_until(lambda: receiver.events_at("/flaky"), timeout=20, message="the 4th attempt answered 200")

    attempts = receiver.at("/flaky")
    assert [r.status for r in attempts] == [500, 500, 500, 200]
    assert len({r.delivery_id for r in attempts}) == 1 and len({r.body for r in attempts}) == 1
    assert receiver.events_at("/flaky") == [{"name": "channel_occupied", "channel": "flaky-channel"}]
    assert_signed(attempts[-1])
    labels = {"app_id": APP_ID}
    wait_until(lambda: worker.metric("sockudo_webhooks_delivered_total", {**labels, "event_type": "channel_occupied"}),
               timeout=5, message="delivered counted")
    assert worker.metric("sockudo_webhooks_retried_total", labels) == 3
    assert worker.metric("sockudo_webhooks_failed_total", {**labels, "reason": "http_5xx"}) == 3
    assert worker.metric("sockudo_webhooks_dead_lettered_total", labels) == 0
    assert metric(server.metrics_text(), "sockudo_webhooks_queued_total",
                  **labels, event_type="channel_occupied") == 1

    log = worker.log()
    failures = [line for line in log.splitlines() if "webhook delivery failed" in line]
    assert len(failures) == 3
    assert all(f"delivery_id={attempts[0].delivery_id}" in line and "status=500" in line for line in failures)
    assert [f"attempt={n}" in line for n, line in enumerate(failures, 1)] == [True] * 3
    for secret in ("abc123", "/flaky", "flaky-channel", attempts[0].headers["X-Pusher-Signature"]):
        assert secret not in log
    client.close()


def test_404_is_not_retried_and_becomes_one_dead_letter(
        server_factory: Callable[..., ServerProcess], receiver: Receiver, redis_url: str,
        worker_factory: Callable[[], WorkerProcess]) -> None:
    worker = worker_factory()
    receiver.script["/gone"] = [404] * 5
    env = {"REDIS_URL": redis_url}
    server = server_factory([app({"url": receiver.url("/gone"), "event_types": ["channel_occupied"]})], env=env,
                            webhooks=webhooks())
    client = RawClient.connect(server, KEY)
    client.subscribe("gone-channel")
    (letter,) = wait_until(lambda: dead_letters(server, env), timeout=20, message="a dead letter")
    assert (letter["reason"], letter["status"], letter["attempts"]) == ("permanent_failure", 404, 1)
    (request,) = receiver.at("/gone")
    assert letter["delivery_id"] == request.delivery_id
    wait_until(lambda: worker.metric("sockudo_webhooks_dead_lettered_total",
                                     {"app_id": APP_ID, "reason": "permanent_failure"}) == 1, timeout=5)
    assert worker.metric("sockudo_webhooks_retried_total") == 0
    # The job finished with its final answer; nothing is scheduled, so nothing can come again.
    rclient = redis.Redis.from_url(redis_url)
    assert rclient.zcard("rq:scheduled:webhooks") == 0 and rclient.llen("rq:queue:webhooks") == 0
    assert len(receiver.at("/gone")) == 1
    client.close()


def test_receiver_down_past_the_budget_then_replay_delivers_it(
        server_factory: Callable[..., ServerProcess], redis_url: str,
        worker_factory: Callable[[], WorkerProcess]) -> None:
    worker_factory()
    down_port = free_port()  # nothing listens here yet
    env = {"REDIS_URL": redis_url}
    server = server_factory(
        [app({"url": f"http://127.0.0.1:{down_port}/late?sig=topsecret", "event_types": ["channel_occupied"]})],
        env=env, webhooks=webhooks(retry={"initial_backoff_ms": 200, "max_elapsed_time_ms": 1500}))
    client = RawClient.connect(server, KEY)
    client.subscribe("late-channel")
    (letter,) = wait_until(lambda: dead_letters(server, env), timeout=20, message="the budget to run out")
    # Waits of 200, 400, 800 ms fit in 1.5 s on paper; RQ's scheduler runs due jobs once a
    # second, so real time decides how many attempts fit. At least one retry happened.
    assert (letter["reason"], letter["error"]) == ("retries_exhausted", "connect") and letter["attempts"] >= 2

    listed = cli(server, "list", env=env)
    assert letter["id"] in listed.stdout and "retries_exhausted" in listed.stdout
    assert "topsecret" not in listed.stdout and "late-channel" not in listed.stdout

    back = Receiver(port=down_port).start()
    try:
        replay = cli(server, "replay", "--all", env=env)
        assert replay.returncode == 0, replay.stderr
        wait_until(lambda: back.processed, timeout=15, message="the replayed delivery")
        (request,) = back.at("/late")
        body = assert_signed(request)
        assert body["events"] == [{"name": "channel_occupied", "channel": "late-channel"}]
        assert request.delivery_id == letter["delivery_id"]
        assert dead_letters(server, env) == []
    finally:
        back.stop()
    client.close()


# -- a worker killed mid-delivery ------------------------------------------------------------------


def test_kill_9_of_the_worker_mid_delivery_still_delivers_exactly_once(
        server_factory: Callable[..., ServerProcess], receiver: Receiver, redis_url: str,
        worker_factory: Callable[[], WorkerProcess]) -> None:
    first = worker_factory()
    receiver.script["/slowpoke"] = ["hang"]
    server = server_factory(
        [app({"url": receiver.url("/slowpoke"), "event_types": ["channel_occupied"], "request_timeout_ms": 4000})],
        env={"REDIS_URL": redis_url}, webhooks=webhooks())
    client = RawClient.connect(server, KEY)
    client.subscribe("doomed-channel")
    wait_until(lambda: receiver.at("/slowpoke"), timeout=15, message="the first attempt to reach the receiver")
    first.kill9()  # mid-request: nobody is left to notice
    second = worker_factory()
    wait_until(lambda: receiver.processed, timeout=30, message="redelivery by the second worker")
    assert second.metric("sockudo_webhooks_abandoned_jobs_total") == 1

    attempts = receiver.at("/slowpoke")
    assert [r.status for r in attempts] == [None, 200]
    assert attempts[0].delivery_id == attempts[1].delivery_id  # the receiver's dedupe key
    assert len(receiver.processed) == 1
    assert receiver.events_at("/slowpoke") == [{"name": "channel_occupied", "channel": "doomed-channel"}]
    client.close()


def test_a_hanging_endpoint_does_not_hold_up_another(
        server_factory: Callable[..., ServerProcess], receiver: Receiver, redis_url: str,
        worker_factory: Callable[[], WorkerProcess]) -> None:
    worker_factory()
    worker_factory()
    receiver.script["/stuck"] = ["hang"]
    server = server_factory([app(
        {"url": receiver.url("/stuck"), "event_types": ["channel_occupied"], "request_timeout_ms": 5000},
        {"url": receiver.url("/quick"), "event_types": ["channel_occupied"]})],
        env={"REDIS_URL": redis_url}, webhooks=webhooks())
    client = RawClient.connect(server, KEY)
    client.subscribe("shared-channel")
    wait_until(lambda: receiver.events_at("/quick") and receiver.at("/stuck"), timeout=10,
               message="the quick endpoint served while the other hangs")
    assert [r.status for r in receiver.at("/stuck")] == [None]
    receiver.release.set()  # let the stuck request end (unanswered) so its worker can stop
    client.close()


def test_a_hanging_endpoint_with_a_backlog_does_not_hold_up_another(
        server_factory: Callable[..., ServerProcess], receiver: Receiver, redis_url: str,
        worker_factory: Callable[..., WorkerProcess]) -> None:
    """12 deliveries for an endpoint that hangs, 2 workers of 4 job slots each: without a
    per-endpoint cap all 8 slots sit in /stuck's timeouts while /quick's jobs wait behind them.
    With the cap (auto: a quarter of the 8 slots = 2 attempts in flight per endpoint) /stuck's
    surplus jobs are deferred and /quick is served within seconds. Once /stuck answers again,
    every one of its deliveries is processed exactly once; none is dead-lettered or lost."""
    workers = [worker_factory(concurrency=4), worker_factory(concurrency=4)]
    receiver.script["/stuck"] = ["hang"] * 100
    env = {"REDIS_URL": redis_url}
    server = server_factory([app(
        {"url": receiver.url("/stuck"), "event_types": ["channel_occupied"], "request_timeout_ms": 3000,
         "filter": {"channel_prefix": "stuck-"}},
        {"url": receiver.url("/quick"), "event_types": ["channel_occupied"], "filter": {"channel_prefix": "quick-"}})],
        env=env, webhooks=webhooks(batching={"enabled": False, "duration": 50, "size": 100}))
    stuck = [f"stuck-{i}" for i in range(12)]
    quick = [f"quick-{i}" for i in range(3)]
    client = RawClient.connect(server, KEY)
    for channel in stuck:  # one delivery (one RQ job) each: batching is off
        client.subscribe(channel)
    queued = lambda: metric(server.metrics_text(), "sockudo_webhooks_queued_total",  # noqa: E731
                            app_id=APP_ID, event_type="channel_occupied")
    wait_until(lambda: queued() == len(stuck), timeout=10, message="/stuck's deliveries queued")
    wait_until(lambda: receiver.at("/stuck"), timeout=10, message="a worker stuck in /stuck")

    raised = time.monotonic()
    for channel in quick:
        client.subscribe(channel)
    quick_channels = lambda: sorted(e["channel"] for e in receiver.events_at("/quick"))  # noqa: E731
    wait_until(lambda: quick_channels() == quick, timeout=6,
               message="/quick's deliveries while /stuck hangs with a backlog")
    assert time.monotonic() - raised < 6
    assert all(r.status is None for r in receiver.at("/stuck"))  # still hanging meanwhile
    wait_until(lambda: sum(w.metric("sockudo_webhooks_deferred_total", {"app_id": APP_ID}) for w in workers) > 0,
               timeout=5, message="deferrals counted")

    receiver.script["/stuck"].clear()  # /stuck answers 200 from now on …
    receiver.release.set()  # … and the hung requests end (unanswered: the worker already timed out)

    def stuck_processed() -> list[str]:
        return sorted(e["channel"] for r in receiver.processed.values() if r.path == "/stuck" for e in r.events)
    wait_until(lambda: stuck_processed() == sorted(stuck), timeout=45, message="every /stuck delivery, once")
    answered = [r.delivery_id for r in receiver.at("/stuck") if r.status == 200]
    assert len(answered) == len(set(answered)) == len(stuck)  # no delivery answered twice
    assert len({r.delivery_id for r in receiver.at("/stuck")}) == len(stuck)  # retries kept their delivery id
    assert dead_letters(server, env) == []
    client.close()


# -- two nodes: cluster-wide occupancy and a cross-node debounce --------------------------------------


@pytest.mark.slow
def test_two_nodes_vacated_only_when_the_last_subscriber_anywhere_leaves(
        server_factory: Callable[..., ServerProcess], receiver: Receiver, redis_url: str,
        worker_factory: Callable[[], WorkerProcess]) -> None:
    worker_factory()
    env = {"REDIS_URL": redis_url}
    config = dict(apps=[app({"url": receiver.url("/occ"), "event_types": ["channel_occupied", "channel_vacated"]})],
                  env=env, webhooks=webhooks(debounce_ms=1500))
    node1, node2 = server_factory(**config), server_factory(**config)
    events = lambda: receiver.events_at("/occ")  # noqa: E731

    a = RawClient.connect(node1, KEY)
    a.subscribe("room")
    b = RawClient.connect(node2, KEY)
    b.subscribe("room")
    wait_until(events, timeout=10, message="channel_occupied")
    debounce_s = 1.5
    margin_s = 2.0  # batching (50 ms), the queue and a worker's delivery, with room to spare
    vacated = lambda: [e for e in events() if e["name"] == "channel_vacated"]  # noqa: E731

    a.close()  # node 1 is empty, node 2 still has a subscriber: no vacated
    closed = time.monotonic()
    sdk2 = sdk_for(node2, {"id": APP_ID, "key": KEY, "secret": SECRET})
    wait_until(lambda: sdk2.channel_info("room", ["subscription_count"]).get("subscription_count") == 1, timeout=10)
    # Past node 1's debounce window (plus delivery time) nothing may have arrived: b is still there.
    stays_false(vacated, closed + debounce_s + margin_s - time.monotonic(),
                "channel_vacated while a subscriber remains on node 2")

    b.close()  # the last one anywhere: node 2 marks a pending vacated in Redis …
    wait_until(lambda: not sdk2.channel_info("room").get("occupied"), timeout=5)
    c = RawClient.connect(node1, KEY)
    c.subscribe("room")  # … and node 1's rejoin, inside the window, cancels it (and its own occupied)
    wait_until(lambda: metric(node1.metrics_text(), "sockudo_webhooks_debounce_cancelled_total",
                              event_type="channel_vacated") == 1, timeout=5)
    c.close()
    wait_until(vacated, timeout=15, message="the final channel_vacated")
    # Every node's window has closed by now or closes within it: still exactly one vacated.
    stays_false(lambda: len(vacated()) > 1, debounce_s + margin_s, "a second channel_vacated")
    assert events() == [{"name": "channel_occupied", "channel": "room"},
                        {"name": "channel_vacated", "channel": "room"}]


# -- no Redis: the embedded queue --------------------------------------------------------------------


def test_embedded_mode_delivers_retries_and_keeps_dead_letters_in_memory(
        server_factory: Callable[..., ServerProcess], receiver: Receiver) -> None:
    receiver.script["/emb"] = [503]
    receiver.script["/nope"] = [410]
    server = server_factory([app({"url": receiver.url("/emb"), "event_types": ["channel_occupied", "client_event"]},
                                 {"url": receiver.url("/nope"), "event_types": ["channel_occupied"]})],
                            webhooks=webhooks())
    client = RawClient.connect(server, KEY)
    client.subscribe("local-channel")
    wait_until(lambda: receiver.events_at("/emb"), timeout=10, message="the retried delivery")
    assert [r.status for r in receiver.at("/emb")] == [503, 200]
    assert_signed(receiver.at("/emb")[-1])
    text = lambda: server.metrics_text()  # noqa: E731
    wait_until(lambda: metric(text(), "sockudo_queue_depth", backend="memory", state="dead_letter") == 1, timeout=5)
    assert metric(text(), "sockudo_webhooks_retried_total", app_id=APP_ID) == 1
    assert metric(text(), "sockudo_webhooks_dead_lettered_total", app_id=APP_ID, reason="permanent_failure") == 1
    assert metric(text(), "sockudo_webhooks_delivered_total", app_id=APP_ID, event_type="channel_occupied") == 1
    assert len(receiver.at("/nope")) == 1
    client.close()
