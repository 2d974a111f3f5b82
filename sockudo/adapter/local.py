"""The single-node adapter: delivers to this process's sockets."""

from __future__ import annotations

from typing import Any

from sockudo.adapter.base import ClusterListener, RemoteMessageRecorder
from sockudo.core import protocol
from sockudo.core.connection import Connection
from sockudo.core.namespace import Namespace
from sockudo.core.wsframe import OutFrame


class LocalAdapter:
    def __init__(self) -> None:
        self.namespaces: dict[str, Namespace] = {}

    healthy = True  # nothing outside this process to lose
    on_remote_message: RemoteMessageRecorder | None = None  # no other nodes publish here

    def start(self) -> None:
        return None

    def wait_connected(self, timeout: float) -> bool:
        return True

    def stop(self, timeout: float) -> None:
        return None

    def set_listener(self, listener: ClusterListener) -> None:
        return None  # with no other nodes, no transition happens elsewhere

    def readiness_probe(self) -> None:
        return None  # nothing outside this process to check

    def namespace(self, app_id: str) -> Namespace:
        ns = self.namespaces.get(app_id)
        if ns is None:
            ns = self.namespaces[app_id] = Namespace()
        return ns

    def _drop_if_empty(self, app_id: str) -> None:
        ns = self.namespaces.get(app_id)
        if ns is not None and ns.is_empty():
            del self.namespaces[app_id]

    # -- sockets --

    def add_socket(self, app_id: str, conn: Connection) -> None:
        self.namespace(app_id).add_socket(conn)

    def remove_socket(self, app_id: str, socket_id: str) -> None:
        ns = self.namespaces.get(app_id)
        if ns is not None:
            ns.remove_socket(socket_id)
            self._drop_if_empty(app_id)

    def socket_count(self, app_id: str) -> int:
        ns = self.namespaces.get(app_id)
        return len(ns.sockets) if ns else 0

    def node_socket_count(self) -> int:
        return sum(len(ns.sockets) for ns in self.namespaces.values())

    def all_connections(self) -> list[Connection]:
        return [c for ns in self.namespaces.values() for c in ns.sockets.values()]

    # -- channels --

    def subscribe(self, app_id: str, channel: str, conn: Connection) -> tuple[int, bool]:
        count = self.namespace(app_id).subscribe(channel, conn)
        return count, count == 1

    def unsubscribe(self, app_id: str, channel: str, socket_id: str) -> tuple[int, bool]:
        ns = self.namespaces.get(app_id)
        if ns is None or socket_id not in ns.channels.get(channel, ()):
            return (ns.subscriber_count(channel) if ns else 0), False
        remaining = ns.unsubscribe(channel, socket_id)
        return remaining, remaining == 0

    def subscriber_count(self, app_id: str, channel: str) -> int:
        ns = self.namespaces.get(app_id)
        return ns.subscriber_count(channel) if ns else 0

    def channels(self, app_id: str, prefix: str = "") -> dict[str, int]:
        ns = self.namespaces.get(app_id)
        if ns is None:
            return {}
        return {name: len(subs) for name, subs in ns.channels.items() if name.startswith(prefix)}

    def subscriber_count_checked(self, app_id: str, channel: str) -> tuple[int, bool]:
        return self.subscriber_count(app_id, channel), True

    def channels_checked(self, app_id: str, prefix: str = "") -> tuple[dict[str, int], bool]:
        return self.channels(app_id, prefix), True

    def broadcast(self, app_id: str, channel: str, frame: OutFrame, except_socket_id: str | None = None) -> int:
        """Queue ``frame`` for every local subscriber; returns how many got it.

        The hot path of every publish: one dict lookup, then one non-blocking queue
        append per socket, the same bytes for all.
        """
        ns = self.namespaces.get(app_id)
        if ns is None:
            return 0
        subs = ns.channels.get(channel)
        if not subs:
            return 0
        recipients = list(subs.values())  # a send may close a socket and mutate subs
        sent = 0
        for conn in recipients:
            if conn.socket_id != except_socket_id:
                conn.send(frame)
                sent += 1
        return sent

    # -- presence --

    def presence_join(self, app_id: str, channel: str, socket_id: str, user_id: str, user_info: Any) -> bool:
        return self.namespace(app_id).presence_join(channel, socket_id, user_id, user_info)

    def presence_leave(self, app_id: str, channel: str, socket_id: str, user_id: str) -> bool:
        ns = self.namespaces.get(app_id)
        return ns.presence_leave(channel, socket_id, user_id) if ns else False

    def presence_members(self, app_id: str, channel: str) -> dict[str, Any]:
        ns = self.namespaces.get(app_id)
        return ns.presence_members(channel) if ns else {}

    def presence_members_checked(self, app_id: str, channel: str) -> tuple[dict[str, Any], bool]:
        return self.presence_members(app_id, channel), True

    # -- users --

    def add_user_socket(self, app_id: str, user_id: str, conn: Connection) -> bool:
        return self.namespace(app_id).add_user_socket(user_id, conn)

    def remove_user_socket(self, app_id: str, user_id: str, socket_id: str) -> bool:
        ns = self.namespaces.get(app_id)
        return ns.remove_user_socket(user_id, socket_id) if ns else False

    def user_online(self, app_id: str, user_id: str) -> bool:
        ns = self.namespaces.get(app_id)
        return bool(ns and ns.users.get(user_id))

    def send_to_user(self, app_id: str, user_id: str, frame: OutFrame, except_socket_id: str | None = None) -> int:
        ns = self.namespaces.get(app_id)
        if ns is None:
            return 0
        sent = 0
        for conn in ns.user_sockets(user_id):
            if conn.socket_id != except_socket_id:
                conn.send(frame)
                sent += 1
        return sent

    def terminate_user(self, app_id: str, user_id: str, code: int, message: str) -> int:
        ns = self.namespaces.get(app_id)
        if ns is None:
            return 0
        sockets = ns.user_sockets(user_id)
        text = protocol.error_frame(code, message)
        for conn in sockets:
            conn.send_text(text)
            conn.transport.close(code, message)
        return len(sockets)

    # -- watchlist --

    def watch(self, app_id: str, conn: Connection, user_ids: tuple[str, ...]) -> None:
        self.namespace(app_id).watch(conn, user_ids)

    def unwatch(self, app_id: str, conn: Connection, user_ids: tuple[str, ...]) -> None:
        ns = self.namespaces.get(app_id)
        if ns is not None:
            ns.unwatch(conn, user_ids)

    def notify_watchers(self, app_id: str, user_id: str, frame: OutFrame) -> int:
        ns = self.namespaces.get(app_id)
        if ns is None:
            return 0
        watchers = ns.watchers_of(user_id)
        for conn in watchers:
            conn.send(frame)
        return len(watchers)
