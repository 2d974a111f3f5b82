"""Wire formats, keys, scripts and pure helpers of the Redis adapter. No I/O.

Envelopes are Sockudo's: a broadcast is ``{node_id, app_id, channel, message, except_socket_id,
timestamp_ms}`` where ``message`` is the frame's JSON text (plus ``message_v2``, ``serial`` and
the stream fields of a sequenced message); a user envelope has ``user_id`` too; a control or user
command has ``request_type``.

Pub/sub channels: ``{prefix}#c{tag}`` per Pusher channel, ``{prefix}#u{tag}`` per user,
``{prefix}#control`` for every node. Every key of one channel (or user) carries that channel's
hash tag (:func:`sockudo.core.keys.tag`), so each script below touches one hash slot only and the
same code runs on one Redis and on a Redis Cluster.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sockudo.core.keys import join, segment, tag

# command types carried by envelopes (Sockudo's names)
TERMINATE_USER = "TerminateUserConnections"
WATCHLIST_NOTIFY = "WatchlistNotify"
NODE_DEAD = "NodeDead"  # ``dead_node_id`` left (graceful stop) or was cleaned up: stop counting it

# what a pub/sub channel carries (the ``kind`` label of the received-envelopes metric)
KIND_CHANNEL = "channel"
KIND_USER = "user"
KIND_CONTROL = "control"
KINDS = (KIND_CHANNEL, KIND_USER, KIND_CONTROL)


@dataclass(frozen=True)
class Keys:
    """Every Redis key and pub/sub channel the adapter uses, under one prefix."""

    prefix: str

    # -- pub/sub channels --

    @property
    def control(self) -> str:
        return f"{self.prefix}#control"

    # After its hash tag, every name carries the app id and the channel (or user) itself: two
    # names whose 40-bit tags collide (likely among a million live channels, or sought on
    # purpose by a client) share a slot, never a key or a pub/sub channel.

    def channel_topic(self, app_id: str, channel: str) -> str:
        return f"{self.prefix}#c{tag(app_id, channel)}{join(app_id, channel)}"

    def user_topic(self, app_id: str, user_id: str) -> str:
        return f"{self.prefix}#u{tag(app_id, user_id)}{join(app_id, user_id)}"

    def kind_of(self, topic: str) -> str | None:
        """``channel``, ``user`` or ``control`` for a pub/sub channel of this prefix, else None."""
        if not topic.startswith(self.prefix):
            return None
        rest = topic[len(self.prefix):]
        if rest == "#control":
            return KIND_CONTROL
        if rest.startswith("#c{"):
            return KIND_CHANNEL
        if rest.startswith("#u{"):
            return KIND_USER
        return None

    # -- nodes --

    @property
    def nodes(self) -> str:
        """Sorted set: node id → last heartbeat (ms)."""
        return f"{self.prefix}nodes"

    def holdings(self, node_id: str) -> str:
        """Set of what a node holds in the keys below, for cleanup when it dies."""
        return f"{self.prefix}node:{node_id}:holds"

    def cleanup_lock(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}:cleanup"

    # -- one channel (all in the channel's slot) --

    def subs(self, app_id: str, channel: str) -> str:
        """Hash: node id → that node's subscribers of the channel."""
        return f"{self.prefix}{tag(app_id, channel)}:subs:{join(app_id, channel)}"

    def presence(self, app_id: str, channel: str) -> str:
        """Hash: user id → number of nodes where the user is a member."""
        return f"{self.prefix}{tag(app_id, channel)}:presence:{join(app_id, channel)}"

    def presence_info(self, app_id: str, channel: str) -> str:
        """Hash: user id → user_info JSON."""
        return f"{self.prefix}{tag(app_id, channel)}:presence_info:{join(app_id, channel)}"

    def presence_held(self, app_id: str, channel: str) -> str:
        """Hash: ``[node, user]`` → 1 while that node holds that member (makes joins idempotent)."""
        return f"{self.prefix}{tag(app_id, channel)}:presence_held:{join(app_id, channel)}"

    # -- one user (the user's slot) --

    def online(self, app_id: str, user_id: str) -> str:
        """Hash: node id → 1 while the node has a socket of the user."""
        return f"{self.prefix}{tag(app_id, user_id)}:online:{join(app_id, user_id)}"

    # -- one app (the app's slot) --

    def channels(self, app_id: str) -> str:
        """Set: the app's occupied channels (a superset for a moment after a race; readers check)."""
        return f"{self.prefix}{tag(app_id, '')}:channels:{segment(app_id)}"

    def connections(self, app_id: str) -> str:
        """Hash: node id → open sockets of the app on that node."""
        return f"{self.prefix}{tag(app_id, '')}:connections:{segment(app_id)}"


# Node refcounts: a hash of node → value per channel (subscribers) or user (online). The first
# node makes the hash non-empty, the last empties it: exactly one caller sees each transition.

NODE_ACQUIRE_LUA = """
local existed = redis.call('HEXISTS', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if existed == 1 then return 0 end
if redis.call('HLEN', KEYS[1]) == 1 then return 1 end
return 0
"""

NODE_RELEASE_LUA = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 1 end
return 0
"""

#: A node's count of a hash it holds; no-op once released (a late update cannot resurrect it).
NODE_UPDATE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"""

# Presence: KEYS = presence, presence_info, presence_held; ARGV = user id, held field, info.
PRESENCE_ACQUIRE_LUA = """
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) end
if redis.call('HSETNX', KEYS[3], ARGV[2], '1') == 0 then return 0 end
if redis.call('HINCRBY', KEYS[1], ARGV[1], 1) == 1 then return 1 end
return 0
"""

PRESENCE_RELEASE_LUA = """
if redis.call('HDEL', KEYS[3], ARGV[2]) == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


HOLD_CHANNEL = "channel"  # the node has a subscriber of the channel
HOLD_PRESENCE = "presence"  # the node has a socket of the user in the presence channel
HOLD_USER = "user"  # the node has a socket of the (signed-in or presence) user
HOLD_CONNECTIONS = "connections"  # the node has written its socket count of the app


@dataclass(frozen=True)
class Holding:
    """One node's share of a cluster-wide refcount (listed in the node's holdings set)."""

    kind: str
    app_id: str
    channel: str = ""
    user_id: str = ""

    def member(self) -> str:
        return json.dumps([self.kind, self.app_id, self.channel, self.user_id], separators=(",", ":"))

    @classmethod
    def from_member(cls, member: str | bytes) -> Holding | None:
        try:
            kind, app_id, channel, user_id = json.loads(member)
        except (ValueError, TypeError, UnicodeDecodeError):
            return None
        return cls(str(kind), str(app_id), str(channel), str(user_id))


def presence_field(node_id: str, user_id: str) -> str:
    """The ``presence_held`` field of one node's membership of one user."""
    return json.dumps([node_id, user_id], separators=(",", ":"))


def interest_diff(names: Iterable[str], wanted: Callable[[str], bool], told: set[str]) -> tuple[list[str], list[str]]:
    """What to subscribe and unsubscribe for ``names`` whose local state changed: the wanted
    state now (the truth) against what the bus was told. A name that came and went between two
    flushes yields nothing."""
    add: list[str] = []
    remove: list[str] = []
    for name in names:
        want = wanted(name)
        if want and name not in told:
            add.append(name)
        elif not want and name in told:
            remove.append(name)
    return add, remove


def live_nodes(registered: Iterable[tuple[str | bytes, float]], cutoff_ms: float) -> tuple[set[str], set[str]]:
    """(every registered node, those that beat since ``cutoff_ms``) from ``ZRANGE … WITHSCORES``."""
    every: set[str] = set()
    fresh: set[str] = set()
    for node, score in registered:
        node_id = node.decode() if isinstance(node, bytes) else node
        every.add(node_id)
        if score >= cutoff_ms:
            fresh.add(node_id)
    return every, fresh


def sum_counts(fields: dict[Any, Any], live: set[str], skip: str) -> int:
    """The sum of a node hash's values of ``live`` nodes, ``skip`` (this node, counted locally) aside."""
    total = 0
    for node, value in fields.items():
        node_id = node.decode() if isinstance(node, bytes) else node
        if node_id == skip or node_id not in live:
            continue
        try:
            total += max(0, int(value))
        except (TypeError, ValueError):
            continue
    return total


# what a received envelope asks of this node (see :func:`route`)
TO_CHANNEL = "to_channel"  # deliver to the local subscribers of ``channel``
TO_USER = "to_user"  # deliver to the local sockets of ``user_id``
TERMINATE = "terminate"  # close the local sockets of ``user_id``
WATCHLIST = "watchlist"  # tell the local watchers of ``user_id``
FORGET_NODE = "forget_node"  # ``dead_node_id`` is gone


def route(kind: str, msg: dict[str, Any], own_node_id: str) -> str | None:
    """What to do with envelope ``msg`` received on a pub/sub channel of ``kind``: one of the
    ``TO_*``/``TERMINATE``/``WATCHLIST``/``FORGET_NODE`` actions, or None for this node's own
    echo or an envelope that does not belong on that channel (ignored)."""
    if msg.get("node_id") == own_node_id:
        return None
    if kind == KIND_CONTROL:
        return FORGET_NODE if msg.get("request_type") == NODE_DEAD and isinstance(msg.get("dead_node_id"), str) \
            else None
    if not isinstance(msg.get("app_id"), str):
        return None
    if kind == KIND_USER:
        if not isinstance(msg.get("user_id"), str):
            return None
        command = msg.get("request_type")
        if command is None:
            return TO_USER if isinstance(msg.get("message"), str) else None
        if command == TERMINATE_USER:
            return TERMINATE
        if command == WATCHLIST_NOTIFY and isinstance(msg.get("message"), str):
            return WATCHLIST
        return None
    if kind == KIND_CHANNEL and isinstance(msg.get("channel"), str) and isinstance(msg.get("message"), str) \
            and "user_id" not in msg and "request_type" not in msg:
        return TO_CHANNEL
    return None


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def decode(raw: str | bytes) -> dict[str, Any] | None:
    try:
        msg = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return msg if isinstance(msg, dict) else None
