"""Every concurrency primitive the server uses, in one place (gevent)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.pool

spawn = gevent.spawn
spawn_later = gevent.spawn_later
sleep = gevent.sleep
Event = gevent.event.Event
Greenlet = gevent.Greenlet
joinall = gevent.joinall
killall = gevent.killall
GreenletExit = gevent.GreenletExit

#: How long a greenlet may go on reading bytes that are already there before it lets the others run.
FAIR_SLICE_SECONDS = 0.01


class FairSlice:
    """Yields to the other greenlets when ``check()`` finds ``FAIR_SLICE_SECONDS`` have gone by
    since it last did. A read of bytes already received never switches greenlets, so a peer
    sending faster than its bytes are handled (tiny WebSocket frames, one-byte chunks, pipelined
    requests) held the whole process, and no timer could fire."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.monotonic()

    def check(self) -> None:
        if time.monotonic() - self.last >= FAIR_SLICE_SECONDS:
            gevent.sleep(0.0001)  # > 0: after the loop has polled for I/O (sleep(0) may come back first)
            self.last = time.monotonic()


def fair(read: Callable[..., Any]) -> Callable[..., Any]:
    """``read`` with a ``FairSlice`` check before each call."""
    fair_slice = FairSlice()

    def fair_read(*args: Any) -> Any:
        fair_slice.check()
        return read(*args)

    return fair_read


class GeventRuntime:
    """The primitives handed to services that run background work (the Redis adapter)."""

    @staticmethod
    def spawn(fn, *args):  # type: ignore[no-untyped-def]
        return gevent.spawn(fn, *args)

    @staticmethod
    def sleep(seconds: float) -> None:
        gevent.sleep(seconds)

    @staticmethod
    def event() -> gevent.event.Event:
        return gevent.event.Event()
