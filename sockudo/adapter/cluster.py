"""Wire formats and pure helpers of the Redis adapter. No I/O.

Broadcasts use Sockudo's envelope: ``{node_id, app_id, channel, message, except_socket_id,
timestamp_ms}`` where ``message`` is the frame's JSON text. Queries use ``{request_id, node_id,
app_id, request_type, …, reply_to}`` and replies ``{request_id, node_id, app_id, …}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# request types (Sockudo's names)
CHANNEL_SOCKETS_COUNT = "ChannelSocketsCount"
CHANNELS_WITH_SOCKETS_COUNT = "ChannelsWithSocketsCount"
SOCKETS_COUNT = "SocketsCount"
TERMINATE_USER = "TerminateUserConnections"
WATCHLIST_NOTIFY = "WatchlistNotify"
NODE_DEAD = "NodeDead"  # ``dead_node_id`` left (graceful stop) or was cleaned up: stop asking it


@dataclass(frozen=True)
class Keys:
    """Every Redis key and pub/sub channel the adapter uses, under one prefix."""

    prefix: str

    @property
    def broadcast(self) -> str:
        return f"{self.prefix}#broadcast"

    @property
    def requests(self) -> str:
        return f"{self.prefix}#requests"

    def node_inbox(self, node_id: str) -> str:
        return f"{self.prefix}#node:{node_id}"

    @property
    def nodes(self) -> str:
        """Sorted set: node id → last heartbeat (ms)."""
        return f"{self.prefix}nodes"

    def holdings(self, node_id: str) -> str:
        """Set of what a node holds in the cluster refcounts, for cleanup when it dies."""
        return f"{self.prefix}node:{node_id}:holds"

    def cleanup_lock(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}:cleanup"

    def channels(self, app_id: str) -> str:
        """Hash: occupied channel → number of nodes with a subscriber."""
        return f"{self.prefix}app:{app_id}:channels"

    def presence(self, app_id: str, channel: str) -> str:
        """Hash: user id → number of nodes where the user is a member of ``channel``."""
        return f"{self.prefix}app:{app_id}:presence:{channel}"

    def presence_info(self, app_id: str, channel: str) -> str:
        """Hash: user id → user_info JSON."""
        return f"{self.prefix}app:{app_id}:presence_info:{channel}"

    def users(self, app_id: str) -> str:
        """Hash: user id → number of nodes with a socket of that user."""
        return f"{self.prefix}app:{app_id}:users"

    def connections(self, app_id: str) -> str:
        """Hash: node id → open sockets of the app on that node."""
        return f"{self.prefix}app:{app_id}:connections"


# A "holding" is one node's share of a cluster-wide refcount: (count hash, info hash, field).
# ACQUIRE/RELEASE run atomically in Redis, so two nodes joining the same presence user at once
# still yield exactly one first-join (request/reply between nodes cannot promise that).

ACQUIRE_LUA = """
local added = redis.call('SADD', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], ARGV[3]) end
if added == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if n == 1 then return 1 end
return 0
"""

RELEASE_LUA = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[2], ARGV[2], -1)
if n <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('HDEL', KEYS[3], ARGV[2])
  return 1
end
return 0
"""


HOLD_CHANNEL = "channel"  # the node has a subscriber of the channel
HOLD_PRESENCE = "presence"  # the node has a socket of the user in the presence channel
HOLD_USER = "user"  # the node has a socket of the (signed-in or presence) user


@dataclass(frozen=True)
class Holding:
    """One node's share of a cluster-wide refcount."""

    kind: str
    app_id: str
    channel: str
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

    def redis_keys(self, keys: Keys, node_id: str) -> tuple[list[str], str]:
        """``([holdings set, count hash, info hash], field)`` for the Lua scripts."""
        if self.kind == HOLD_CHANNEL:
            count_key, info_key, fld = keys.channels(self.app_id), keys.channels(self.app_id) + ":info", self.channel
        elif self.kind == HOLD_PRESENCE:
            count_key = keys.presence(self.app_id, self.channel)
            info_key, fld = keys.presence_info(self.app_id, self.channel), self.user_id
        else:
            count_key, info_key, fld = keys.users(self.app_id), keys.users(self.app_id) + ":info", self.user_id
        return [keys.holdings(node_id), count_key, info_key], fld


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def decode(raw: str | bytes) -> dict[str, Any] | None:
    try:
        msg = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return msg if isinstance(msg, dict) else None


@dataclass
class PendingQuery:
    """A query waiting for the other nodes' replies."""

    expected: set[str]
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.expected.issubset(self.replies)


def merge_counts(local: int, replies: list[dict[str, Any]], key: str = "sockets_count") -> int:
    total = local
    for reply in replies:
        value = reply.get(key)
        if isinstance(value, int):
            total += value
    return total


def merge_channel_counts(local: dict[str, int], replies: list[dict[str, Any]]) -> dict[str, int]:
    merged = dict(local)
    for reply in replies:
        channels = reply.get("channels_with_sockets_count")
        if isinstance(channels, dict):
            for name, count in channels.items():
                if isinstance(count, int):
                    merged[name] = merged.get(name, 0) + count
    return {name: count for name, count in merged.items() if count > 0}
