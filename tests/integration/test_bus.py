"""RedisBus against a real redis-server: interest applied and confirmed, restored after the
connection is cut, and one connection read by the listener alone (threads stand in for
greenlets; the server runs the same code under gevent)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from sockudo.adapter.bus import RedisBus
from tests.support.procs import RedisServer, wait_until


class Listening:
    """A bus running its listener on a thread, recording what it hears."""

    def __init__(self, server: RedisServer) -> None:
        self.client = redis.Redis(port=server.port, socket_timeout=5)
        self.bus = RedisBus(self.client)
        self.messages: list[tuple[str, bytes]] = []
        self.connected: list[bool] = []
        self.stopped = False
        self.thread = threading.Thread(target=self.bus.run, daemon=True,
                                       args=(self._message, self.connected.append, lambda: self.stopped))

    def _message(self, channel: str, data: bytes) -> None:
        self.messages.append((channel, data))

    def start(self) -> Listening:
        self.thread.start()
        wait_until(lambda: self.connected, timeout=5, message="the bus to subscribe")
        return self

    def stop(self) -> None:
        self.stopped = True
        self.bus.close()
        self.thread.join(timeout=5)
        self.client.close()


@pytest.fixture
def listening(redis_server: RedisServer) -> Iterator[Listening]:
    bus = Listening(redis_server)
    yield bus
    bus.stop()


def numsub(client: redis.Redis, channel: str) -> int:
    reply: Any = client.pubsub_numsub(channel)
    return int(reply[0][1])


def test_interest_is_confirmed_before_wait_applied_returns_and_removed_again(listening: Listening) -> None:
    listening.bus.set_interest(["bus-control"], [])
    listening.start()
    assert listening.connected == [True]
    client = listening.client
    for round_ in range(20):  # each change is in Redis by the time wait_applied returns
        listening.bus.set_interest([f"bus-{round_}"], [f"bus-{round_ - 1}"])
        assert listening.bus.wait_applied(5)
        assert numsub(client, f"bus-{round_}") == 1 and numsub(client, f"bus-{round_ - 1}") == 0
        assert client.publish(f"bus-{round_}", str(round_)) == 1
    wait_until(lambda: len(listening.messages) == 20, timeout=5)
    assert listening.messages == [(f"bus-{n}", str(n).encode()) for n in range(20)]
    # a channel added and removed before the listener ran is never subscribed
    listening.bus.set_interest(["bus-fleeting"], [])
    listening.bus.set_interest([], ["bus-fleeting"])
    assert listening.bus.wait_applied(5) and numsub(client, "bus-fleeting") == 0


def test_a_cut_connection_is_restored_with_every_channel(listening: Listening) -> None:
    listening.bus.set_interest([f"bus-keep-{n}" for n in range(1500)], [])  # more than one SUBSCRIBE
    listening.start()
    client = listening.client
    killed = client.client_kill_filter(_type="pubsub")
    assert killed == 1
    wait_until(lambda: listening.connected == [True, False], timeout=10, message="the bus to resubscribe")
    assert listening.bus.wait_applied(5)
    assert all(numsub(client, f"bus-keep-{n}") == 1 for n in (0, 999, 1000, 1499))
    client.publish("bus-keep-1499", "after")
    wait_until(lambda: ("bus-keep-1499", b"after") in listening.messages, timeout=5)


def test_wait_applied_times_out_while_nobody_listens(redis_server: RedisServer) -> None:
    bus = RedisBus(redis.Redis(port=redis_server.port))
    bus.set_interest(["bus-nobody"], [])
    assert bus.wait_applied(0.2) is False
    bus.close()
