"""Sockudo for Python: a Pusher-protocol realtime server on gevent."""

__version__ = "0.1.0"
