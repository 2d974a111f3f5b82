"""Per-app bookkeeping on this node: sockets, channel subscribers, presence, users.

Pure data structures, no I/O. Presence is counted per *user*: a user with three tabs is
one member, added on the first socket and removed after the last.
"""

from __future__ import annotations

from typing import Any

from sockudo.core.connection import Connection


class PresenceMember:
    __slots__ = ("user_info", "socket_ids")

    def __init__(self, user_info: Any) -> None:
        self.user_info = user_info
        self.socket_ids: set[str] = set()


class Namespace:
    __slots__ = ("sockets", "channels", "presence", "users", "watchers")

    def __init__(self) -> None:
        self.sockets: dict[str, Connection] = {}
        # channel -> socket_id -> connection (dict, so fan-out iterates values directly)
        self.channels: dict[str, dict[str, Connection]] = {}
        # presence channel -> user_id -> member
        self.presence: dict[str, dict[str, PresenceMember]] = {}
        # user_id -> socket_id -> connection (signed-in and presence users)
        self.users: dict[str, dict[str, Connection]] = {}
        # watched user_id -> watcher socket_id -> connection
        self.watchers: dict[str, dict[str, Connection]] = {}

    def is_empty(self) -> bool:
        return not (self.sockets or self.channels or self.presence or self.users or self.watchers)

    # -- sockets and channels --

    def add_socket(self, conn: Connection) -> None:
        self.sockets[conn.socket_id] = conn

    def remove_socket(self, socket_id: str) -> None:
        self.sockets.pop(socket_id, None)

    def subscribe(self, channel: str, conn: Connection) -> int:
        subs = self.channels.get(channel)
        if subs is None:
            subs = self.channels[channel] = {}
        subs[conn.socket_id] = conn
        return len(subs)

    def unsubscribe(self, channel: str, socket_id: str) -> int:
        subs = self.channels.get(channel)
        if subs is None:
            return 0
        subs.pop(socket_id, None)
        if not subs:
            del self.channels[channel]
            return 0
        return len(subs)

    def subscriber_count(self, channel: str) -> int:
        subs = self.channels.get(channel)
        return len(subs) if subs else 0

    # -- presence --

    def presence_join(self, channel: str, socket_id: str, user_id: str, user_info: Any) -> bool:
        """Record the socket as ``user_id``; True when it is the user's first socket here."""
        members = self.presence.get(channel)
        if members is None:
            members = self.presence[channel] = {}
        member = members.get(user_id)
        first = member is None
        if member is None:
            member = members[user_id] = PresenceMember(user_info)
        else:
            member.user_info = user_info  # the newest socket's info wins, as in Pusher
        member.socket_ids.add(socket_id)
        return first

    def presence_leave(self, channel: str, socket_id: str, user_id: str) -> bool:
        """Forget the socket; True when it was the user's last socket here."""
        members = self.presence.get(channel)
        if not members:
            return False
        member = members.get(user_id)
        if member is None or socket_id not in member.socket_ids:
            return False
        member.socket_ids.discard(socket_id)
        if member.socket_ids:
            return False
        del members[user_id]
        if not members:
            del self.presence[channel]
        return True

    def presence_members(self, channel: str) -> dict[str, Any]:
        members = self.presence.get(channel) or {}
        return {uid: m.user_info for uid, m in members.items()}

    # -- users and watchers --

    def add_user_socket(self, user_id: str, conn: Connection) -> bool:
        """True when this is the user's first socket here."""
        sockets = self.users.get(user_id)
        if sockets is None:
            sockets = self.users[user_id] = {}
        first = not sockets
        sockets[conn.socket_id] = conn
        return first

    def remove_user_socket(self, user_id: str, socket_id: str) -> bool:
        """True when the user has no socket left here."""
        sockets = self.users.get(user_id)
        if sockets is None or socket_id not in sockets:
            return False
        del sockets[socket_id]
        if sockets:
            return False
        del self.users[user_id]
        return True

    def user_sockets(self, user_id: str) -> list[Connection]:
        return list((self.users.get(user_id) or {}).values())

    def watch(self, conn: Connection, user_ids: tuple[str, ...]) -> None:
        for uid in user_ids:
            self.watchers.setdefault(uid, {})[conn.socket_id] = conn

    def unwatch(self, conn: Connection, user_ids: tuple[str, ...]) -> None:
        for uid in user_ids:
            watchers = self.watchers.get(uid)
            if watchers is not None:
                watchers.pop(conn.socket_id, None)
                if not watchers:
                    del self.watchers[uid]

    def watchers_of(self, user_id: str) -> list[Connection]:
        return list((self.watchers.get(user_id) or {}).values())
