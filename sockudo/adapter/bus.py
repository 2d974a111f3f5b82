"""The message bus between nodes: publish to pub/sub channels, listen to the ones this node needs.

The adapter decides what a node is interested in (the channels and users it has local sockets
for, plus the control channel); a bus carries messages for exactly that set. ``RedisBus`` drives
one Redis (standalone or a Sentinel master) with PUBLISH/SUBSCRIBE; a Redis Cluster driver uses
sharded pub/sub. The bus is pure: it blocks its caller's thread or greenlet, nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Protocol


class Bus(Protocol):
    def publish(self, items: Sequence[tuple[str, str]]) -> None:
        """Send (pubsub channel, payload) pairs, pipelined. Raises redis.RedisError/OSError on failure."""

    def run(
        self,
        on_message: Callable[[str, bytes], None],
        on_connected: Callable[[bool], None],
        stopping: Callable[[], bool],
    ) -> None:
        """Blocking loop (the adapter runs it in a greenlet): connect, subscribe to the current interest
        set, call on_connected(first_time) once subscribed, deliver messages via on_message(channel, data);
        on a failure, reconnect with backoff and resubscribe everything (calling on_connected(False)).
        Raises nothing; returns when stopping() is true."""

    def set_interest(self, add: Collection[str], remove: Collection[str]) -> None:
        """Change the subscribed set (already batched by the caller). Takes effect asynchronously; returns
        at once. The bus keeps the full set so it can restore it after a reconnect or failover."""

    def wait_applied(self, timeout: float) -> bool:
        """Block until every set_interest call made before it is acknowledged by Redis (the SUBSCRIBE
        confirmations were read); False on timeout. The adapter calls it before a subscriber's
        subscription_succeeded so that nothing published after that is missed."""

    def close(self) -> None: ...
