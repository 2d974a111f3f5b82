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
