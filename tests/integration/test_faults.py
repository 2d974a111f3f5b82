"""Faults as automated tests with real processes (docs/reliability.md).

Already proven elsewhere, and not repeated here: ``kill -9`` of a node under traffic
(``test_cluster.py::test_kill_9_removes_the_dead_nodes_members_within_the_bound``), a Redis
restart mid-run resuming cross-node delivery and presence (``test_cluster.py::
test_redis_restart_mid_run_resumes_delivery_and_presence``), start-up with Redis down
(``…::test_startup_with_redis_down_becomes_ready_once_redis_starts``), Sentinel failover
(``…::test_sentinel_failover_during_traffic``), an RQ worker or work-horse killed mid-job
(``test_webhooks.py::test_kill_9_of_the_worker_mid_delivery_still_delivers_exactly_once``).

Here:

- **Redis stopped for a while** (``FAULT_REDIS_OUTAGE_SECONDS``, default 30) under traffic, with
  webhooks and an RQ worker: local delivery never stops, cross-node delivery resumes, and every
  webhook event raised during the outage is delivered afterwards;
- **Redis out of memory** (``maxmemory`` + ``noeviction``) with history on: publishes fail with
  a clear 503, no subscriber receives a message that history does not hold, no acknowledged
  message is missing from history, and everything recovers when memory returns;
- **fan-out to 300 sockets while 30 % are reset** (RST, ``SO_LINGER 0``) mid-stream: the process
  survives and every other socket receives every message, in order.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import requests

from tests.support.cluster import HEARTBEAT_INTERVAL, node_env, start_all, tracebacks, up_status, wait_formed
from tests.support.metrics import metric
from tests.support.procs import RedisServer, ServerProcess, wait_until
from tests.support.push import Push
from tests.support.sdk import sdk_for
from tests.support.webhooks import Receiver, WorkerProcess
from tests.support.wsmany import Fleet, connect_many
from tests.support.wsraw import RawClient

OUTAGE_SECONDS = float(os.environ.get("FAULT_REDIS_OUTAGE_SECONDS", "30"))
KEY, SECRET, APP_ID = "fault-key", "fault-secret", "100"
FAST_WEBHOOKS: dict[str, Any] = {
    "debounce_ms": 300, "batching": {"enabled": True, "duration": 50, "size": 100},
    "retry": {"initial_backoff_ms": 100, "max_backoff_ms": 1000, "max_elapsed_time_ms": 60000},
}

pytestmark = pytest.mark.slow  # outages, restarts and soaks: tens of seconds each


def signed_post(node: ServerProcess, path: str, body: dict[str, Any]) -> requests.Response:
    raw = json.dumps(body).encode()
    query = {"auth_key": KEY, "auth_timestamp": str(int(time.time())), "auth_version": "1.0",
             "body_md5": hashlib.md5(raw).hexdigest()}
    to_sign = "\n".join(["POST", path, "&".join(f"{k}={v}" for k, v in sorted(query.items()))])
    query["auth_signature"] = hmac.new(SECRET.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    return requests.post(node.url + path, params=query, data=raw, headers={"Content-Type": "application/json"},
                         timeout=10)


def signed_get(node: ServerProcess, path: str, params: dict[str, str]) -> requests.Response:
    query = {**params, "auth_key": KEY, "auth_timestamp": str(int(time.time())), "auth_version": "1.0"}
    to_sign = "\n".join(["GET", path, "&".join(f"{k}={v}" for k, v in sorted(query.items()))])
    query["auth_signature"] = hmac.new(SECRET.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    return requests.get(node.url + path, params=query, timeout=10)


def delivered_across(sender: ServerProcess, receiver_client: RawClient, channel: str) -> bool:
    marker = f"x-{time.monotonic_ns()}"
    sdk_for(sender, {"id": APP_ID, "key": KEY, "secret": SECRET}).trigger(channel, "cross", marker)
    try:
        receiver_client.expect(lambda f: f.get("event") == "cross" and f.get("data") == marker, timeout=1)
    except AssertionError:
        return False
    return True


# -- Redis stopped for a while --------------------------------------------------------------------


def test_redis_outage_keeps_local_delivery_and_loses_no_webhook(
        server_factory: Callable[..., ServerProcess], receiver: Receiver, tmp_path: Any) -> None:
    # Redis restarts with its data (append-only file), as a production Redis does: webhooks
    # already queued in it (here: retries of a failing endpoint) must survive the outage too.
    own_redis = RedisServer(data_dir=str(tmp_path)).start()
    worker = WorkerProcess(own_redis.url).start()
    app = {"id": APP_ID, "key": KEY, "secret": SECRET, "webhooks": [
        {"url": receiver.url("/hooks"),
         "event_types": ["channel_occupied", "channel_vacated", "member_added", "member_removed"]},
        {"url": receiver.url("/held"), "event_types": ["channel_occupied"], "filter": {"channel_prefix": "held-"}}]}
    # /held fails until Redis is back: its deliveries wait in Redis as scheduled retries meanwhile.
    receiver.script["/held"] = [503] * 100_000
    patient = {**FAST_WEBHOOKS, "retry": {**FAST_WEBHOOKS["retry"], "max_backoff_ms": 2000,
                                          "max_elapsed_time_ms": 300_000}}
    nodes = [server_factory([app], start=False, env=node_env(own_redis.url), webhooks=patient,
                            shutdown_grace_period=2) for _ in range(2)]
    a, b = nodes
    sdk_a = sdk_for(a, app)
    clients: list[RawClient] = []
    try:
        start_all(nodes)
        wait_formed(nodes)
        ua, ub = RawClient.connect(a, KEY), RawClient.connect(b, KEY)
        clients += [ua, ub]
        ua.subscribe("fault-live")
        ub.subscribe("fault-live")
        wait_until(lambda: delivered_across(a, ub, "fault-live"), timeout=10, message="A → B before the outage")
        held = {f"held-{i}" for i in range(20)}
        holder = RawClient.connect(a, KEY)
        clients.append(holder)
        for channel in sorted(held):
            holder.subscribe(channel)
        wait_until(lambda: len(receiver.at("/held")) >= 2, timeout=15, message="failed attempts at /held")

        own_redis.stop()
        outage_started = time.monotonic()
        wait_until(lambda: up_status(a) == 503, timeout=15, message="node A to notice the outage")
        expected: set[tuple[str, str, str]] = set()
        published = 0
        k = 0
        while time.monotonic() - outage_started < OUTAGE_SECONDS:
            # local delivery: every publish on A reaches A's subscriber at once
            sdk_a.trigger("fault-live", "local", str(published))
            assert ua.expect(lambda f, n=published: f.get("event") == "local" and f.get("data") == str(n),
                             timeout=5)["channel"] == "fault-live"
            published += 1
            if published % 25 == 0:  # lifecycle events, i.e. webhooks, raised during the outage
                visitor = RawClient.connect(a, KEY)
                channel, room = f"hook-outage-{k}", f"presence-hook-outage-{k}"
                visitor.subscribe(channel)
                visitor.subscribe(room, sdk_a.authenticate(room, visitor.socket_id, {"user_id": f"v{k}"}))
                visitor.close()
                expected |= {("channel_occupied", channel, ""), ("channel_vacated", channel, ""),
                             ("channel_occupied", room, ""), ("member_added", room, f"v{k}"),
                             ("member_removed", room, f"v{k}"), ("channel_vacated", room, "")}
                k += 1
            assert published < 200_000  # a bound on the loop, far above what 30 s allow
        assert k >= 2, "no webhook traffic during the outage"

        assert not receiver.events_at("/held")
        own_redis.start_again()  # same port, same data
        receiver.script["/held"].clear()  # the endpoint recovers too: the next retry succeeds
        wait_until(lambda: delivered_across(a, ub, "fault-live"), timeout=30, interval=0.2,
                   message="A → B delivery after the outage")
        wait_until(lambda: delivered_across(b, ua, "fault-live"), timeout=30, interval=0.2,
                   message="B → A delivery after the outage")

        def delivered() -> set[tuple[str, str, str]]:
            return {(e["name"], e["channel"], e.get("user_id", "")) for e in receiver.events_at("/hooks")}

        # The worker retries its Redis connection with RQ's backoff (1, 2, 4 … s): after a
        # 10 s outage it may take ~15 s more to come back, then the backlog goes out.
        try:
            wait_until(lambda: expected <= delivered(), timeout=90, interval=0.2)
        except AssertionError:
            missing = expected - delivered()
            raise AssertionError(f"{len(missing)} of {len(expected)} webhook events of the outage never arrived, "
                                 f"e.g. {sorted(missing)[:5]}; worker log:\n{worker.log()[-2000:]}") from None

        def held_delivered() -> set[str]:
            return {e["channel"] for e in receiver.events_at("/held")}

        try:
            wait_until(lambda: held <= held_delivered(), timeout=90, interval=0.2)
        except AssertionError:
            raise AssertionError(f"retries queued in Redis before the outage were lost: "
                                 f"{sorted(held - held_delivered())[:5]}; "
                                 f"worker log:\n{worker.log()[-2000:]}") from None
        for node in nodes:
            assert up_status(node) == 200
        assert worker.proc is not None and worker.proc.poll() is None, "the worker quit during the outage"
        assert tracebacks(a, b) == 0, a.log()[-3000:] + b.log()[-3000:]
    finally:
        for client in clients:
            client.close()
        for node in nodes:
            node.stop()
        worker.stop()
        own_redis.stop()


def test_the_worker_outlives_a_redis_restart_in_the_middle_of_a_delivery(
        server_factory: Callable[..., ServerProcess], own_redis: RedisServer, receiver: Receiver) -> None:
    """RQ's own loop quits on a Redis error outside its wait for a job (e.g. while it
    finishes one); ``python -m workers`` must carry on once Redis is back, or every webhook
    raised later waits for an operator to notice."""
    own_redis.start()
    worker = WorkerProcess(own_redis.url).start()
    receiver.script["/hooks"] = ["hang"]
    app = {"id": APP_ID, "key": KEY, "secret": SECRET, "webhooks": [{
        "url": receiver.url("/hooks"), "event_types": ["channel_occupied"], "request_timeout_ms": 20000}]}
    server = server_factory([app], env={"REDIS_URL": own_redis.url}, webhooks=FAST_WEBHOOKS)
    first = RawClient.connect(server, KEY)
    try:
        first.subscribe("before-the-restart")
        wait_until(lambda: receiver.at("/hooks"), timeout=15, message="a delivery in progress")
        own_redis.stop()
        receiver.release.set()  # the attempt ends (no answer) while Redis is away
        wait_until(lambda: "Connection refused" in worker.log() or "Error 111" in worker.log(), timeout=30,
                   message="the worker to run into the outage")
        own_redis.start()  # a fresh, empty redis-server on the same port
        later = RawClient.connect(server, KEY)
        later.subscribe("after-the-restart")
        later.close()
        try:
            wait_until(lambda: {"name": "channel_occupied", "channel": "after-the-restart"}
                       in receiver.events_at("/hooks"), timeout=60, interval=0.2)
        except AssertionError:
            raise AssertionError(f"a webhook raised after the restart never arrived; worker log:\n"
                                 f"{worker.log()[-3000:]}") from None
        assert worker.proc is not None and worker.proc.poll() is None, worker.log()[-3000:]
    finally:
        first.close()
        worker.stop()


def test_a_worker_started_while_redis_is_away_waits_for_it(own_redis: RedisServer) -> None:
    """A worker (re)started during a Redis outage — a deploy, a crash loop, a Redis failover —
    waits for Redis instead of dying on RQ's first command, then serves its queue."""
    worker = WorkerProcess(own_redis.url).start()  # Redis is not running yet
    try:
        wait_until(lambda: "could not reach Redis to register" in worker.log(), timeout=20,
                   message="the worker to notice Redis is away")
        assert worker.proc is not None and worker.proc.poll() is None, worker.log()[-2000:]
        own_redis.start()
        wait_until(lambda: "Listening on" in worker.log(), timeout=20, message="the worker to serve its queue")
        assert worker.proc.poll() is None, worker.log()[-2000:]
    finally:
        worker.stop()


@pytest.mark.parametrize("when", ["starting", "idle"])
def test_sigterm_still_stops_the_worker(own_redis: RedisServer, when: str) -> None:
    """The restart-on-error loop must not swallow a requested stop: a worker given SIGTERM (a
    deploy, ``heroku ps:restart``) exits cleanly and promptly — while it starts up, before RQ
    has its signal handlers, and once it waits for jobs."""
    own_redis.start()
    worker = WorkerProcess(own_redis.url).start()
    try:
        assert worker.proc is not None
        if when == "idle":
            wait_until(lambda: "Listening on" in worker.log(), timeout=15, message="the worker to wait for jobs")
        stopped_at = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=15) == 0, worker.log()[-2000:]
        assert time.monotonic() - stopped_at < 10
        assert "starting it again" not in worker.log()
    finally:
        worker.stop()


def test_pushes_queued_when_redis_stops_are_delivered_after_it_restarts(tmp_path: Any) -> None:
    """A production Redis restarts with its data (here: an append-only file). Pushes admitted
    before the outage — some being dispatched, some scheduled to go out during it — are all
    delivered afterwards; a publish tried during the outage is refused with 503, not lost
    behind a 202."""
    store = RedisServer(data_dir=str(tmp_path)).start()
    harness = Push(store)
    try:
        in_flight = {f"outage-now-{i}": harness.apns_device(f"outage-now-{i}") for i in range(30)}
        scheduled = {f"outage-later-{i}": harness.apns_device(f"outage-later-{i}") for i in range(30)}
        now_channel = f"push-outage-now-{time.monotonic_ns()}"
        later_channel = f"push-outage-later-{time.monotonic_ns()}"
        for device in in_flight:
            harness.subscribe(now_channel, device)
        for device in scheduled:
            harness.subscribe(later_channel, device)
        harness.apns.delay = 0.2  # the workers are mid-dispatch when Redis goes away
        outage_ms = int(OUTAGE_SECONDS * 1000)
        started = harness.publish({"recipients": [{"type": "channel", "channel": now_channel}],
                                   "payload": {"title": "now"}})
        later = harness.publish({"recipients": [{"type": "channel", "channel": later_channel}],
                                 "payload": {"title": "later"},
                                 "notBeforeMs": int(time.time() * 1000) + min(2000, outage_ms // 2)})
        assert started.status_code == 202 and later.status_code == 202, (started.text, later.text)
        wait_until(lambda: sum(harness.apns.accepted_count(t) for t in in_flight.values()) >= 1, timeout=15,
                   message="dispatch under way")
        store.stop()
        down_since = time.monotonic()
        refused = 0
        while time.monotonic() - down_since < OUTAGE_SECONDS:
            resp = harness.publish({"recipients": [{"type": "channel", "channel": now_channel}],
                                    "payload": {"title": "during"}})
            assert resp.status_code == 503, resp.text  # a clear refusal; the caller keeps it
            refused += 1
            time.sleep(0.5)
        assert refused >= 2
        store.start_again()  # same port, same data

        for answer, tokens in ((started, in_flight), (later, scheduled)):
            publish_id = answer.json()["publishId"]
            status = harness.wait_state(publish_id, ("succeeded", "partially_succeeded", "failed", "dead_lettered"),
                                        timeout=120)
            assert status["state"] == "succeeded", status
            assert status["counters"]["planned"] == len(tokens) == status["counters"]["succeeded"], status
            duplicates = set(status.get("possibleDuplicates", []))
            for device, token in tokens.items():
                count = harness.apns.accepted_count(token)
                # Every device got its push; twice only where the status says it may have.
                assert count == 1 or (count == 2 and device in duplicates), (device, count, duplicates)
        for worker in harness.workers:
            assert worker.proc.poll() is None, harness.logs()
    finally:
        harness.close()
        store.stop()


# -- Redis out of memory ---------------------------------------------------------------------------


def test_redis_out_of_memory_fails_publishes_cleanly_and_recovers(
        server_factory: Callable[..., ServerProcess], own_redis: RedisServer) -> None:
    own_redis.start()
    app = {"id": APP_ID, "key": KEY, "secret": SECRET, "max_event_payload_in_kb": 64,
           "history": {"enabled": True, "max_messages_per_channel": 0}, "connection_recovery": {"enabled": True}}
    nodes = [server_factory([app], start=False, env=node_env(own_redis.url), shutdown_grace_period=2)
             for _ in range(2)]
    a, b = nodes
    start_all(nodes)
    wait_formed(nodes)
    channel = "oom-channel"
    subscribers = [RawClient.connect(node, KEY) for node in (a, b)]
    control = redis.Redis(port=own_redis.port)
    try:
        for s in subscribers:
            s.subscribe(channel)
        wait_until(lambda: delivered_across(a, subscribers[1], channel), timeout=10)
        received: list[list[str]] = [[], []]

        def drain() -> None:
            for index, s in enumerate(subscribers):
                while True:
                    try:
                        frame = s.recv(timeout=0.05)
                    except TimeoutError:
                        break
                    if frame.get("event") == "oom":
                        received[index].append(frame["data"][:12])

        used = int(control.info("memory")["used_memory"])
        control.config_set("maxmemory-policy", "noeviction")
        control.config_set("maxmemory", used + 3 * 1024 * 1024)
        acked: list[str] = []
        refused: list[str] = []
        refusals_in_a_row = 0
        pad = "p" * 30_000
        for i in range(1000):
            ident = f"m{i:06d}".ljust(12, ".")
            node = nodes[i % 2]
            resp = signed_post(node, f"/apps/{APP_ID}/events", {"name": "oom", "channel": channel,
                                                                "data": ident + pad})
            if resp.status_code == 200:
                acked.append(ident)
                refusals_in_a_row = 0
            else:
                assert resp.status_code == 503, resp.text
                assert resp.json() == {"code": "service_unavailable", "status": 503,
                                       "error": "Message store unavailable; the event was not published"}
                assert resp.headers["Retry-After"] == "1"
                refused.append(ident)
                refusals_in_a_row += 1
                if refusals_in_a_row >= 10:
                    break
            if i % 20 == 0:
                drain()
        assert refusals_in_a_row >= 10, "Redis never ran out of memory"
        assert len(acked) > 10, acked
        # Stay out of memory for a few heartbeats: the nodes' own writes (heartbeats, presence
        # counts) are refused too, and every publish meanwhile must keep failing cleanly.
        control.config_set("maxmemory", 1024 * 1024)  # far below what is used: no write gets through now
        oom_until = time.monotonic() + 3 * HEARTBEAT_INTERVAL + 1
        while time.monotonic() < oom_until:
            ident = f"m{len(acked) + len(refused):06d}".ljust(12, ".")
            resp = signed_post(nodes[len(refused) % 2], f"/apps/{APP_ID}/events",
                               {"name": "oom", "channel": channel, "data": ident + pad})
            assert resp.status_code == 503, resp.text
            refused.append(ident)
            drain()

        def crossed(sender: ServerProcess, index: int) -> bool:
            """A marker published on ``sender`` reaches subscriber ``index`` (recording what comes before)."""
            marker = f"x-{time.monotonic_ns()}"
            sdk_for(sender, app).trigger(channel, "cross", marker)
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline:
                try:
                    frame = subscribers[index].recv(timeout=0.1)
                except TimeoutError:
                    continue
                if frame.get("event") == "oom":
                    received[index].append(frame["data"][:12])
                elif frame.get("data") == marker:
                    return True
            return False

        control.config_set("maxmemory", 0)  # memory returns
        for node in nodes:
            wait_until(lambda node=node: up_status(node) == 200, timeout=20, message="/up after the OOM")
        wait_until(lambda: crossed(a, 1), timeout=20, message="A → B after the OOM")
        wait_until(lambda: crossed(b, 0), timeout=20, message="B → A after the OOM")
        after = "after.oom..."
        assert signed_post(a, f"/apps/{APP_ID}/events", {"name": "oom", "channel": channel,
                                                         "data": after}).status_code == 200
        acked.append(after)
        for index, s in enumerate(subscribers):
            while after not in received[index]:
                frame = s.recv(timeout=10)
                if frame.get("event") == "oom":
                    received[index].append(frame["data"][:12])

        history: list[dict[str, Any]] = []
        params = {"limit": "100", "direction": "oldest_first"}
        for _ in range(100):
            page = signed_get(a, f"/apps/{APP_ID}/channels/{channel}/history", params)
            assert page.status_code == 200, page.text
            body = page.json()
            history.extend(body["items"])
            if not body.get("has_more"):
                break
            params = {"limit": "100", "direction": "oldest_first", "cursor": body["next_cursor"]}
        held = [str(item["message"]["data"])[:12] for item in history if item["event_name"] == "oom"]
        serials = [item["serial"] for item in history]
        assert serials == list(range(serials[0], serials[0] + len(serials))), "a gap in history's serials"
        assert set(acked) <= set(held), f"acknowledged but not in history: {set(acked) - set(held)}"
        assert not set(refused) & set(held), "a refused publish was half-written to history"
        for index in range(2):
            assert set(received[index]) <= set(held), "a subscriber got a message history does not hold"
            assert not set(refused) & set(received[index]), "a refused publish was delivered"
            for origin in (0, 1):  # in order per publishing node (nodes interleave: docs/reliability.md)
                mine = [m for m in received[index] if m.startswith("m") and int(m[1:7]) % 2 == origin]
                assert mine == sorted(mine), "out of order"
            assert set(acked) <= set(received[index]), f"node {index}'s subscriber missed an acknowledged message"
        assert tracebacks(a, b) == 0
    finally:
        control.config_set("maxmemory", 0)
        for s in subscribers:
            s.close()


# -- fan-out while sockets are reset ---------------------------------------------------------------


def test_fan_out_to_300_sockets_while_30_percent_are_reset(server_factory: Callable[..., ServerProcess]) -> None:
    app = {"id": APP_ID, "key": KEY, "secret": SECRET, "max_event_batch_size": 10}
    server = server_factory([app])
    channel, total = "fanout", 600
    clients = connect_many(server.port, KEY, 300)
    fleet = Fleet(clients)
    victims = random.Random(9).sample(clients, 90)
    survivors = [c for c in clients if c not in victims]
    errors: list[BaseException] = []
    try:
        for c in clients:
            c.sock.setblocking(True)
            c.subscribe(channel)
            c.sock.setblocking(False)
        fleet.pump_until(lambda: all(c.events("pusher_internal:subscription_succeeded") for c in clients), 20,
                         "every subscription")
        sdk = sdk_for(server, app)
        started = threading.Event()

        def publisher() -> None:
            try:
                for first in range(0, total, 10):
                    sdk.trigger_batch([{"channel": channel, "name": "tick", "data": str(n)}
                                       for n in range(first, first + 10)])
                    started.set()
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)
                started.set()

        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        started.wait(10)
        fleet.pump_until(lambda: min(len(c.events("tick")) for c in victims) >= 5, 10, "the stream to start")
        for c in victims:  # mid-stream: the server is writing to them right now
            fleet.remove(c)
            c.reset()
        assert thread.is_alive(), "the stream ended before the resets; make it longer"
        thread.join(30)
        assert not errors, errors
        fleet.pump_until(lambda: all(len(c.events("tick")) == total for c in survivors), 30,
                         "every survivor to get every message")
        for c in survivors:
            assert [int(m["data"]) for m in c.events("tick")] == list(range(total))
        assert requests.get(server.url + "/live", timeout=5).status_code == 200
        wait_until(lambda: metric(server.metrics_text(), "sockudo_connected") == len(survivors), timeout=15,
                   message="the reset sockets to be cleaned up")
        assert "Traceback" not in server.log()
    finally:
        fleet.close()
