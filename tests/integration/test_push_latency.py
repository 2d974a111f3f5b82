"""Push delivery at provider latency: real server, real Redis, two real ``python -m workers push``
processes, and fake APNs / FCM / Web Push services that take 100 ms per answer (like the real
ones across the internet) and serve a bounded number of requests at once.

Sent one at a time, 200 deliveries to a 100 ms provider take 20 s (10 s on two workers); the
workers send a batch's requests concurrently, so they finish in a fraction of that. A worker
killed mid-batch loses nothing, and a provider pushing back (429) slows the sender down instead
of failing devices.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.procs import RedisServer, wait_until
from tests.support.push import Push, Worker, descendants

LATENCY_S = 0.1
DEVICES = 200
FINAL = ("succeeded", "partially_succeeded", "failed", "dead_lettered")


@pytest.fixture(scope="module")
def push(redis_server: RedisServer) -> Iterator[Push]:
    # Production-sized batches (a dispatch job per 100 devices), a short lease for the crash test.
    harness = Push(redis_server, env={"PUSH_BATCH_SIZE": "100", "PUSH_REQUEST_TIMEOUT_MS": "5000"})
    yield harness
    harness.close()


@pytest.fixture(autouse=True)
def _reset(push: Push) -> Iterator[None]:
    push.reset()
    for fake in (push.apns, push.fcm, push.webpush):
        fake.delay = LATENCY_S
        fake.peak_in_flight = 0
        fake.throttled = 0
    yield
    push.reset()


def register(push: Push, provider: str, count: int) -> tuple[str, dict[str, str], Callable[[str], int]]:
    """``count`` devices of one provider on a fresh channel: (channel, device id → token, accepted count)."""
    channel = "latency-" + uuid.uuid4().hex[:8]
    tokens: dict[str, str] = {}
    for i in range(count):
        device_id = f"{provider}-{channel}-{i}"
        if provider == "apns":
            tokens[device_id] = push.apns_device(device_id)
        elif provider == "fcm":
            tokens[device_id] = push.fcm_device(device_id)
        else:
            tokens[device_id] = push.web_device(device_id)[0]
        push.subscribe(channel, device_id)
    fake = {"apns": push.apns, "fcm": push.fcm, "webpush": push.webpush}[provider]
    return channel, tokens, fake.accepted_count


def talking_to(port: int, pids: list[int]) -> bool:
    """Whether one of ``pids`` has a connection to 127.0.0.1:``port`` (whichever process sends:
    a forked work-horse or the worker itself)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                    inodes.add(fields[9])
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def publish(push: Push, channel: str) -> str:
    resp = push.publish({"recipients": [{"type": "channel", "channel": channel}], "payload": {"title": "hi"}})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["publishId"])


@pytest.mark.parametrize("provider", ["apns", "fcm", "webpush"])
def test_200_deliveries_to_a_100_ms_provider_are_sent_concurrently(push: Push, provider: str) -> None:
    channel, tokens, accepted = register(push, provider, DEVICES)
    fake = {"apns": push.apns, "fcm": push.fcm, "webpush": push.webpush}[provider]
    started = time.monotonic()
    publish_id = publish(push, channel)
    status = push.wait_state(publish_id, FINAL, timeout=30)
    elapsed = time.monotonic() - started
    assert status["state"] == "succeeded", status
    assert status["counters"]["succeeded"] == DEVICES
    assert all(accepted(token) == 1 for token in tokens.values())  # each device exactly once
    # One at a time, two workers would need DEVICES × 100 ms / 2 = 10 s.
    assert elapsed < DEVICES * LATENCY_S / 4, f"{DEVICES} deliveries took {elapsed:.1f} s"
    assert fake.peak_in_flight >= 20, fake.peak_in_flight


def test_a_worker_killed_mid_batch_loses_and_duplicates_nothing(push: Push) -> None:
    channel, tokens, accepted = register(push, "fcm", DEVICES)
    push.fcm.delay = 1.0  # long answers: the kill lands while a batch's requests are in flight
    publish_id = publish(push, channel)

    def busy_worker() -> Worker | None:
        if push.fcm.in_flight < 20:
            return None
        port = push.fcm.port
        return next((w for w in push.workers if talking_to(port, [w.proc.pid, *descendants(w.proc.pid)])), None)

    victim = wait_until(busy_worker, timeout=15, interval=0.01, message="a worker with requests in flight")
    push.workers.remove(victim)
    victim.kill9()
    push.fcm.delay = LATENCY_S
    push.workers.append(push.start_worker())
    status = push.wait_state(publish_id, FINAL, timeout=60)
    assert status["state"] == "succeeded", status
    assert status["counters"]["planned"] == DEVICES and status["counters"]["succeeded"] == DEVICES
    duplicates = set(status.get("possibleDuplicates", []))
    for device, token in tokens.items():
        count = accepted(token)
        # Once each — twice only for a device the status names (its request was in flight).
        assert count == 1 or (count == 2 and device in duplicates), (device, count, sorted(duplicates)[:5])
    assert sum(accepted(token) for token in tokens.values()) < 2 * DEVICES


def test_provider_back_pressure_slows_the_sender_and_fails_no_device(push: Push) -> None:
    channel, tokens, accepted = register(push, "webpush", 100)
    push.webpush.max_concurrency = 8  # far below the workers' concurrency: it answers 429 beyond
    push.webpush.busy_retry_after = "0"
    publish_id = publish(push, channel)
    status: dict[str, Any] = push.wait_state(publish_id, FINAL, timeout=60)
    assert push.webpush.throttled > 0  # the provider did push back
    assert status["state"] == "succeeded", status
    counters = status["counters"]
    assert counters["succeeded"] == 100 and counters["failed"] == 0 and counters["deadLettered"] == 0
    assert all(accepted(token) == 1 for token in tokens.values())


def test_provider_connections_outlive_the_jobs(push: Push) -> None:
    """Each worker process keeps one APNs connection for all its jobs (as Apple asks): two
    publishes of two dispatch jobs each open at most one connection per worker — a worker that
    forked a work-horse per job would open one per job."""
    before = push.apns.connections
    for _ in range(2):
        channel, tokens, accepted = register(push, "apns", DEVICES)
        status = push.wait_state(publish(push, channel), FINAL, timeout=30)
        assert status["state"] == "succeeded", status
        assert all(accepted(token) == 1 for token in tokens.values())
    assert push.apns.connections - before <= len(push.workers), push.apns.connections - before
