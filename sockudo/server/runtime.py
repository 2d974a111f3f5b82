"""Every concurrency primitive the server uses, in one place (gevent)."""

from __future__ import annotations

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
