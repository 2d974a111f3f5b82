"""Adapters route frames to sockets: locally, and (later) across nodes through Redis.

Every method is synchronous. A cross-node adapter may block its caller's greenlet while it
reads or writes Redis; the handler neither knows nor cares.
"""

from sockudo.adapter.base import Adapter
from sockudo.adapter.local import LocalAdapter

__all__ = ["Adapter", "LocalAdapter"]
