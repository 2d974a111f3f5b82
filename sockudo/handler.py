"""The Pusher protocol for one WebSocket connection
(https://pusher.com/docs/channels/library_auth_reference/pusher-websockets-protocol/).

Pure logic: it reads frames as text, talks to sockets only through ``Connection.transport``
and to other sockets only through the adapter. No gevent, no Flask; tests drive it with a
recording transport.
"""

from __future__ import annotations

import logging
import random
import re
from typing import Any
from urllib.parse import urlsplit

from sockudo.cache import cache_channel_key
from sockudo.config import AppConfig
from sockudo.console.tap import close_code
from sockudo.core import protocol as p
from sockudo.core.auth import verify_channel_auth, verify_user_auth
from sockudo.core.connection import Connection, Transport
from sockudo.core.errors import ApiError, PusherCode, PusherError, SubscriptionError
from sockudo.core.wsframe import OutFrame
from sockudo.history.recovery import frames_size
from sockudo.history.store import SequencerUnavailable, empty_stream_id
from sockudo.publisher import (
    CACHE_TTL_SECONDS,  # noqa: F401  (re-exported for the REST layer)
    PublishUnavailable,
)
from sockudo.services import Services

logger = logging.getLogger(__name__)




def new_socket_id() -> str:
    """``a.b`` with numeric parts: SDKs validate ``^\\d+\\.\\d+$``."""
    return f"{random.randint(0, 10**10)}.{random.randint(0, 10**10)}"


_HOST = re.compile(r"[a-z0-9_.*-]+|\[[0-9a-f:.]+\]")


def _origin_parts(value: str, scheme_required: bool) -> tuple[str | None, str, int | None] | None:
    """``(scheme, host, port)`` of ``scheme://host[:port]`` (``host[:port]`` when the scheme may
    be absent); None for anything else: a path, a query, userinfo, a host with odd characters."""
    value = value.strip().lower()
    if "://" not in value:
        if scheme_required:
            return None
        value = "//" + value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname or ""
    if (parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc
            or not _HOST.fullmatch(host)):
        return None
    return parts.scheme or None, host, port


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """Origin allow-list: empty list allows all; ``*``/``any`` allow all;
    exact or ``https://*.example.com`` wildcard match; an entry without scheme matches the
    origin without its scheme. Case-insensitive. The origin is parsed and its host compared
    (a wildcard matches within the host only, never a path or userinfo)."""
    if not allowed:
        return True
    if any(a.strip().lower() in ("*", "any") for a in allowed):
        return True
    if not origin:
        return False
    parsed = _origin_parts(origin, scheme_required=True)
    if parsed is None or "*" in parsed[1]:
        return False
    scheme, host, port = parsed
    for entry in allowed:
        pattern = _origin_parts(entry, scheme_required=False)
        if pattern is None:
            continue
        want_scheme, want_host, want_port = pattern
        if (want_scheme is not None and want_scheme != scheme) or want_port != port:
            continue
        if "*" in want_host:
            head, _, tail = want_host.partition("*")
            if host.startswith(head) and host.endswith(tail) and len(host) > len(head) + len(tail):
                return True
        elif host == want_host:
            return True
    return False


class Handler:
    """Admits connections, then handles their frames and their end."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.config = services.config
        self.adapter = services.adapter
        self.metrics = services.metrics
        self.events = services.events
        self.clock = services.clock
        self.draining = False

    # -- connection lifecycle --------------------------------------------------

    def admit(self, app_key: str, origin: str | None, protocol_version: int = 7) -> AppConfig:
        """Decide whether a new socket for ``app_key`` may connect.

        Raises a fatal ``PusherError`` for the server edge to send before closing.
        """
        app = self.s.apps.by_key(app_key)
        if app is None:
            self.metrics.connection_error("unknown", "app_not_found")  # never a client-chosen label
            raise PusherError(PusherCode.APP_NOT_FOUND, f"App key {app_key} does not exist", fatal=True)
        if not app.enabled:
            self.metrics.connection_error(app.id, "app_disabled")
            raise PusherError(PusherCode.APP_DISABLED, "App is disabled", fatal=True)
        if protocol_version != 2 and protocol_version < 5:
            # Pusher protocols 5-7 (and newer) are served as 7; 2 is Sockudo's protocol 2.
            self.metrics.connection_error(app.id, "unsupported_protocol")
            raise PusherError(PusherCode.UNSUPPORTED_PROTOCOL, "Unsupported protocol version", fatal=True)
        if not origin_allowed(origin, app.allowed_origins):
            self.metrics.connection_error(app.id, "origin_not_allowed")
            raise PusherError(PusherCode.UNAUTHORIZED, "Origin not allowed", fatal=True)
        if self.config.max_connections and self.adapter.node_socket_count() >= self.config.max_connections:
            self.metrics.connection_error(app.id, "node_over_capacity")
            raise PusherError(PusherCode.OVER_CAPACITY, "Server is over capacity", fatal=True)
        if app.max_connections and self.adapter.socket_count(app.id) >= app.max_connections:
            self.metrics.connection_error(app.id, "app_over_quota")
            raise PusherError(PusherCode.APP_OVER_QUOTA, "Application is over connection quota", fatal=True)
        return app

    def open(self, app: AppConfig, transport: Transport, protocol_version: int) -> Connection:
        now = self.clock()
        conn = Connection(new_socket_id(), app, transport, protocol_version, now)
        if app.enable_user_authentication:
            conn.auth_deadline = now + self.config.user_authentication_timeout
        self.adapter.add_socket(app.id, conn)
        tap = self.s.tap
        if tap.attached:  # the console watches (one flag read otherwise)
            tap.record(app.id, "connection", socket_id=conn.socket_id, protocol=protocol_version)
        m = self.metrics.app(app.id)
        m.connected.inc()
        m.new_connections.inc()
        data = p.dumps({"socket_id": conn.socket_id, "activity_timeout": self.config.activity_timeout})
        self._send(conn, p.frame(p.CONNECTION_ESTABLISHED, data))
        return conn

    def close(self, conn: Connection, reason: str) -> None:
        """The socket is gone (either side closed it): undo everything it held."""
        if conn.closed:
            return
        conn.closed = True
        app = conn.app
        for channel in list(conn.channels):
            self._leave(conn, channel)
        if conn.watchlist:
            self.adapter.unwatch(app.id, conn, conn.watchlist)
        if conn.user_id is not None:
            self._remove_user_socket(conn)
        self.adapter.remove_socket(app.id, conn.socket_id)
        m = self.metrics.app(app.id)
        m.connected.dec()
        m.new_disconnections.inc()
        self.metrics.disconnected(app.id, reason)
        tap = self.s.tap
        if tap.attached:
            tap.record(app.id, "disconnection", socket_id=conn.socket_id, reason=reason, code=close_code(reason))

    def check_liveness(self, conn: Connection, now: float) -> None:
        """Called by the server's shared timer: ping idle sockets, close silent ones."""
        if conn.closed:
            return
        if conn.auth_deadline is not None and now >= conn.auth_deadline:
            self._fail(conn, PusherError(PusherCode.UNAUTHORIZED, "Connection not authenticated in time", fatal=True))
            return
        if conn.ping_sent_at is not None:
            if now - conn.ping_sent_at >= self.config.pong_timeout:
                self.metrics.connection_error(conn.app.id, "pong_timeout")
                self._fail(conn, PusherError(PusherCode.PONG_TIMEOUT, "Pong reply not received in time", fatal=True))
        elif now - conn.last_activity >= self.config.activity_timeout:
            conn.ping_sent_at = now
            self._send(conn, p.frame(p.PING, "{}"))

    def touch(self, conn: Connection) -> None:
        """Any inbound traffic, WebSocket pings included, counts as activity."""
        conn.last_activity = self.clock()
        conn.ping_sent_at = None

    def shutdown(self, conn: Connection) -> None:
        self._fail(conn, PusherError(PusherCode.RECONNECT_NOW, "Server shutting down", fatal=True))

    # -- inbound frames --------------------------------------------------------

    def message(self, conn: Connection, text: str) -> None:
        """Handle one inbound text frame. Never raises: errors become ``pusher:error``."""
        if conn.closed:
            return
        self.touch(conn)
        m = self.metrics.app(conn.app.id)
        m.ws_received.inc()
        m.bytes_received.inc(len(text))
        try:
            msg = p.decode_frame(text)
            event: str = msg["event"]
            name = p.system_event_name(event)
            if name is not None:
                self._system(conn, name, msg)
            elif event.startswith(p.CLIENT_EVENT_PREFIX):
                self._client_event(conn, msg)
            # Anything else is ignored, as Pusher and Sockudo do.
        except p.FrameError as exc:
            self.metrics.connection_error(conn.app.id, "invalid_message_format")
            self._send(conn, p.error_frame(PusherCode.GENERIC, str(exc)))
        except PusherError as exc:
            self._fail(conn, exc)

    def binary_message(self, conn: Connection) -> None:
        self.touch(conn)
        self.metrics.connection_error(conn.app.id, "invalid_message_format")
        self._send(conn, p.error_frame(PusherCode.GENERIC, "Binary frames are not supported"))

    def _system(self, conn: Connection, name: str, msg: dict[str, Any]) -> None:
        if name == "ping":
            self._send(conn, p.frame(p.PONG, "{}"))
        elif name == "pong":
            pass  # touch() already cleared the pending ping
        elif name == "subscribe":
            self._subscribe(conn, p.data_object(msg))
        elif name == "unsubscribe":
            channel = p.data_object(msg).get("channel")
            if isinstance(channel, str) and channel in conn.channels:
                self._leave(conn, channel)
        elif name == "signin":
            self._signin(conn, p.data_object(msg))
        elif name == "resume":
            self._resume(conn, p.data_object(msg))
        elif name == "channel_history":
            self._channel_history(conn, p.data_object(msg))
        # Other pusher:/sockudo: events are ignored.

    # -- subscribe / unsubscribe ----------------------------------------------

    def _subscribe(self, conn: Connection, data: dict[str, Any]) -> None:
        app = conn.app
        channel = data.get("channel")
        error = p.channel_name_error(channel, app.max_channel_name_length)
        if error is not None:
            label = "invalid"
            self.metrics.subscription_error(app.id, label, "invalid_channel")
            chan = channel if isinstance(channel, str) and len(channel) <= 1024 else None
            self._subscription_failed(conn, chan,
                                      SubscriptionError(PusherCode.CHANNEL_ERROR, error, 400, "ChannelError"))
            return
        assert isinstance(channel, str)
        conn.hold()
        try:
            self._join(conn, channel, data)
        except SubscriptionError as exc:
            self.metrics.subscription_error(app.id, p.channel_type_label(channel), exc.error_type)
            if exc.error_type == "AuthError":
                self.metrics.connection_error(app.id, "authentication_failed")
            self._subscription_failed(conn, channel, exc)
        finally:
            conn.release()

    # -- protocol 2: resume and history ------------------------------

    def _resume(self, conn: Connection, data: dict[str, Any]) -> None:
        app = conn.app
        if not app.connection_recovery.enabled:
            raise PusherError(PusherCode.CLIENT_EVENT_ERROR, "Connection recovery is not enabled for this app")
        positions = data.get("channel_positions")
        legacy = data.get("channel_serials")
        requests: list[tuple[str, str | None, Any, bool]] = []
        if isinstance(positions, dict):
            for channel, pos in positions.items():
                pos = pos if isinstance(pos, dict) else {}
                requests.append((channel, pos.get("stream_id"), pos.get("serial"), False))
        elif isinstance(legacy, dict):
            requests = [(channel, None, serial, True) for channel, serial in legacy.items()]
        if not requests:
            raise PusherError(PusherCode.WATCHLIST_LIMIT, "No resume positions given")

        conn.hold()  # live messages wait until the replay is written
        delivered: dict[str, int] = {}
        try:
            recovered: list[dict[str, Any]] = []
            failed: list[dict[str, Any]] = []
            replays: list[str] = []
            # The replay is written after the failures, so it is collected first: never more
            # than the socket may hold (up to 100 channels x 1,000 history messages could be
            # read otherwise). A channel that would go over fails as position_expired.
            budget = max(0, self.config.websocket_max_buffer_bytes - conn.transport.pending_bytes())
            for channel, stream_id, serial, is_legacy in requests[:100]:
                outcome = self.s.recovery.resume(app, channel, stream_id, serial, is_legacy,
                                                 subscribed=channel in conn.channels, max_bytes=budget)
                if outcome.failure is not None:
                    failed.append(outcome.failure)
                    self._send(conn, p.frame("sockudo:resume_failed", p.dumps(outcome.failure), channel=channel))
                    continue
                budget -= frames_size(outcome.frames)
                replays.extend(outcome.frames)
                if outcome.last_serial is not None:
                    delivered[channel] = outcome.last_serial
                recovered.append(outcome.recovered)
            for text in replays:
                conn.transport.send(OutFrame(text, text))
            if replays:
                m = self.metrics.app(app.id)
                m.ws_sent.inc(len(replays))
            self._send(conn, p.frame("sockudo:resume_success", p.dumps({"recovered": recovered, "failed": failed})))
        finally:
            conn.release(delivered)

    def _channel_history(self, conn: Connection, data: dict[str, Any]) -> None:
        from sockudo.history.api import read_history

        channel = data.get("channel")
        if not isinstance(channel, str) or channel not in conn.channels:
            raise PusherError(PusherCode.CHANNEL_ERROR, "Subscribe to the channel before reading its history")
        if conn.transport.pending_bytes():
            # The socket has not taken what it was sent: another page would only wait in its
            # queue. Without this, a client that stops reading turned ~100-byte requests into
            # megabytes held by the server until the queue's limit cut it off.
            self.metrics.rate_limited(conn.app.id, "channel_history", "websocket")
            error = {"error": "Read what was sent before asking for more history", "code": "rate_limited",
                     "status": 429}
            self._send(conn, p.frame("sockudo:channel_history", p.dumps(error), channel=channel))
            return
        params = dict(data)
        try:
            page = read_history(self.s.sequencer, self.metrics, conn.app, channel, params,
                                attach_serial=(conn.attach_serials or {}).get(channel), websocket=True)
        except ApiError as exc:
            self._send(conn, p.frame("sockudo:channel_history", p.dumps({"error": exc.message, "code": exc.slug,
                                                                         "status": exc.status}), channel=channel))
            return
        self._send(conn, p.frame("sockudo:channel_history", p.dumps(page), channel=channel))

    def _subscription_failed(self, conn: Connection, channel: str | None, exc: SubscriptionError) -> None:
        """``pusher:subscription_error`` on the channel, which pusher-js apps bind, and a
        non-fatal ``pusher:error`` carrying the Pusher code."""
        if channel is not None:
            data = {"type": exc.error_type, "error": exc.message, "status": exc.status}
            self._send(conn, p.frame(p.SUBSCRIPTION_ERROR, data, channel=channel))
        self._send(conn, p.error_frame(exc.code, exc.message))

    def _join(self, conn: Connection, channel: str, data: dict[str, Any]) -> None:
        app = conn.app
        kind = p.channel_kind(channel)
        user_id: str | None = None
        user_info: Any = None

        if kind.needs_auth:
            auth = data.get("auth")
            if not isinstance(auth, str) or not auth:
                raise SubscriptionError(
                    PusherCode.UNAUTHORIZED, "Authentication signature required for this channel", 401, "AuthError"
                )
            channel_data: str | None = None
            if kind is p.ChannelKind.PRESENCE:
                raw = data.get("channel_data")
                if not isinstance(raw, str):
                    raise SubscriptionError(PusherCode.GENERIC, "channel_data is required for presence channels", 400,
                                            "InvalidChannelData")
                channel_data = raw
            if not verify_channel_auth(app.key, app.secret, conn.socket_id, channel, auth, channel_data):
                raise SubscriptionError(PusherCode.UNAUTHORIZED, "Invalid signature", 401, "AuthError")
            if channel_data is not None:
                user_id, user_info = self._parse_channel_data(app, channel_data)
        elif kind is p.ChannelKind.SERVER_TO_USER:
            if not conn.signed_in or p.server_to_user_id(channel) != conn.user_id:
                raise SubscriptionError(
                    PusherCode.UNAUTHORIZED, "Sign in as this user to subscribe to its channel", 401, "AuthError"
                )

        if channel in conn.channels:
            # Re-subscribing is idempotent; re-send the ack.
            self._ack(conn, channel, kind)
            return
        limit = app.max_channels_per_connection
        if limit and len(conn.channels) >= limit:
            # A bound on what one socket may hold (docs/security.md): 4300, like other channel limits.
            raise SubscriptionError(PusherCode.CHANNEL_ERROR, f"Too many channels on one connection (max {limit})",
                                    400, "LimitReached")

        if kind is p.ChannelKind.PRESENCE:
            assert user_id is not None
            members = self.adapter.presence_members(app.id, channel)
            if user_id not in members and len(members) >= app.max_presence_members_per_channel:
                raise SubscriptionError(PusherCode.OVER_CAPACITY, "Presence channel is full", 400, "LimitReached")

        local_count, occupied = self.adapter.subscribe(app.id, channel, conn)
        conn.channels[channel] = user_id
        if kind.needs_auth or kind is p.ChannelKind.SERVER_TO_USER:
            conn.auth_deadline = None
        self.metrics.subscribed(app.id, kind.value, local_count == 1)
        tap = self.s.tap
        if tap.attached:
            tap.record(app.id, "subscribed", channel=channel, socket_id=conn.socket_id, user_id=user_id,
                       occupied=occupied or None)
        if occupied:
            self.events.emit(app, {"name": "channel_occupied", "channel": channel})

        if kind is p.ChannelKind.PRESENCE:
            assert user_id is not None
            if conn.user_id is None:
                conn.user_id = user_id
                conn.user_info = user_info
                self._add_user_socket(conn)
            first = self.adapter.presence_join(app.id, channel, conn.socket_id, user_id, user_info)
            self._ack(conn, channel, kind)
            if first:
                self.metrics.app(app.id)  # keep the bound children warm
                self.metrics.presence_joins.labels(app.id, self.metrics.port).inc()
                added = p.frame(p.MEMBER_ADDED, p.dumps({"user_id": user_id, "user_info": user_info}), channel=channel)
                self._broadcast(app, channel, OutFrame(added), except_socket_id=conn.socket_id)
                self.events.emit(app, {"name": "member_added", "channel": channel, "user_id": user_id})
        else:
            self._ack(conn, channel, kind)
            if app.enable_subscription_count:
                self._subscription_count(app, channel)

        if p.is_cache_channel(channel):
            cached = self.s.cache.get(cache_channel_key(app.id, channel))
            if cached is not None:
                self._send(conn, cached[0])
            else:
                self._send(conn, p.frame(p.CACHE_MISS, "{}", channel=channel))
                self.events.emit(app, {"name": "cache_miss", "channel": channel})

    def _parse_channel_data(self, app: AppConfig, channel_data: str) -> tuple[str, Any]:
        try:
            parsed = p.loads(channel_data)
        except (ValueError, RecursionError):
            raise SubscriptionError(PusherCode.GENERIC, "channel_data is not valid JSON", 400,
                                    "InvalidChannelData") from None
        if not isinstance(parsed, dict):
            raise SubscriptionError(PusherCode.GENERIC, "channel_data must be a JSON object", 400, "InvalidChannelData")
        raw_id = parsed.get("user_id")
        # Some SDKs send numeric ids; accept and stringify them.
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or raw_id == "":
            raise SubscriptionError(PusherCode.GENERIC, "channel_data.user_id is missing", 400, "InvalidChannelData")
        user_info = parsed.get("user_info", {})
        if user_info is None:
            user_info = {}
        limit = app.max_presence_member_size_in_kb * 1024
        if len(p.dumps(user_info).encode("utf-8")) > limit:
            raise SubscriptionError(PusherCode.CHANNEL_ERROR, "user_info is too large", 400, "LimitReached")
        return str(raw_id), user_info

    def _ack(self, conn: Connection, channel: str, kind: p.ChannelKind) -> None:
        payload: dict[str, Any] = {}
        if kind is p.ChannelKind.PRESENCE:
            members = self.adapter.presence_members(conn.app.id, channel)
            payload = {"presence": {"ids": list(members), "hash": members, "count": len(members)}}
        app = conn.app
        if conn.protocol == 2 and (app.connection_recovery.enabled or app.history.enabled) \
                and p.server_to_user_id(channel) is None:
            # Protocol 2: the ack carries the channel's position, so even an
            # idle channel gives the client a starting point for a later resume. A channel
            # nobody has published to has no stream yet and gets none here: its position is
            # (empty_stream_id, 0), which resumes into its first stream. (Creating the stream
            # on subscribe let anyone with the app key leave one behind per channel name.)
            stream_id: str | None
            serial: int | None
            try:
                position = self.s.sequencer.position(app.id, channel)  # type: ignore[union-attr]
            except SequencerUnavailable:
                stream_id, serial = None, None
            else:
                stream_id, serial = position if position is not None else (empty_stream_id(app.id, channel), 0)
            if serial is not None:
                if conn.attach_serials is None:
                    conn.attach_serials = {}
                conn.attach_serials[channel] = serial
                if app.history.enabled:
                    payload["attach_serial"] = serial
            frame: dict[str, Any] = {"event": "sockudo_internal:subscription_succeeded", "channel": channel,
                                     "data": p.dumps(payload)}
            if stream_id is not None:
                frame["stream_id"] = stream_id
                frame["serial"] = serial
            self._send(conn, p.dumps(frame))
            return
        self._send(conn, p.frame(p.SUBSCRIPTION_SUCCEEDED, p.dumps(payload), channel=channel))

    def _leave(self, conn: Connection, channel: str) -> None:
        app = conn.app
        user_id = conn.channels.pop(channel, None)
        if conn.attach_serials:
            conn.attach_serials.pop(channel, None)
        local_remaining, vacated = self.adapter.unsubscribe(app.id, channel, conn.socket_id)
        tap = self.s.tap
        if tap.attached:
            tap.record(app.id, "unsubscribed", channel=channel, socket_id=conn.socket_id, user_id=user_id,
                       vacated=vacated or None)
        kind = p.channel_kind(channel)
        self.metrics.unsubscribed(app.id, kind.value, local_remaining == 0)
        if user_id is not None and self.adapter.presence_leave(app.id, channel, conn.socket_id, user_id):
            self.metrics.presence_leaves.labels(app.id, self.metrics.port).inc()
            removed = p.frame(p.MEMBER_REMOVED, p.dumps({"user_id": user_id}), channel=channel)
            self._broadcast(app, channel, OutFrame(removed), except_socket_id=conn.socket_id)
            self.events.emit(app, {"name": "member_removed", "channel": channel, "user_id": user_id})
        if vacated:
            self.events.emit(app, {"name": "channel_vacated", "channel": channel})
        elif app.enable_subscription_count and kind is not p.ChannelKind.PRESENCE:
            self._subscription_count(app, channel)

    def _subscription_count(self, app: AppConfig, channel: str) -> None:
        """Pusher's opt-in ``pusher_internal:subscription_count``, cluster-wide."""
        count = self.adapter.subscriber_count(app.id, channel)
        text = p.frame(p.SUBSCRIPTION_COUNT, p.dumps({"subscription_count": count}), channel=channel)
        self._broadcast(app, channel, OutFrame(text))
        self.events.emit(app, {"name": "subscription_count", "channel": channel, "subscription_count": count})

    # -- client events ------------------------------------------------------

    def _client_event(self, conn: Connection, msg: dict[str, Any]) -> None:
        app = conn.app
        event: str = msg["event"]
        channel = msg.get("channel")

        limit = app.max_client_events_per_second
        if limit:
            now = self.clock()
            if now - conn.event_window_start >= 1.0:
                conn.event_window_start = now
                conn.event_window_count = 0
            conn.event_window_count += 1
            if conn.event_window_count > limit:
                self.metrics.client_event_rejected(app.id, "rate_limited")
                self.metrics.rate_limited(app.id, "client_events", "websocket")
                raise PusherError(PusherCode.CLIENT_EVENT_ERROR, "Client event rejected due to rate limit")
        if not app.enable_client_messages:
            self.metrics.client_event_rejected(app.id, "disabled")
            raise PusherError(PusherCode.CLIENT_EVENT_ERROR, "Client events are not enabled for this app")
        if len(event) > app.max_event_name_length:
            self.metrics.client_event_rejected(app.id, "event_name_too_long")
            raise PusherError(PusherCode.CLIENT_EVENT_ERROR, "Event name too long")
        if not isinstance(channel, str) or p.channel_name_error(channel, app.max_channel_name_length):
            self.metrics.client_event_rejected(app.id, "invalid_channel")
            raise PusherError(PusherCode.CLIENT_EVENT_ERROR, "Invalid channel for a client event")
        kind = p.channel_kind(channel)
        if kind not in (p.ChannelKind.PRIVATE, p.ChannelKind.PRESENCE):
            self.metrics.client_event_rejected(app.id, "wrong_channel_type")
            raise PusherError(
                PusherCode.CLIENT_EVENT_ERROR, "Client events are only allowed on private and presence channels"
            )
        data = msg.get("data")
        encoded = p.dumps(data) if data is not None else ""
        if len(encoded.encode("utf-8")) > app.max_event_payload_in_kb * 1024:
            self.metrics.client_event_rejected(app.id, "payload_too_large")
            raise PusherError(PusherCode.CLIENT_EVENT_ERROR, "Client event payload too large")
        if channel not in conn.channels:
            self.metrics.client_event_rejected(app.id, "not_subscribed")
            raise PusherError(PusherCode.CLIENT_EVENT_ERROR, "Client is not subscribed to this channel")

        user_id = conn.channels[channel] if kind is p.ChannelKind.PRESENCE else None
        try:
            self.s.publisher.publish(app, channel, event, data, except_socket_id=conn.socket_id, user_id=user_id,
                                     count_publish=False)
        except PublishUnavailable:
            raise PusherError(PusherCode.GENERIC, "Message store unavailable; client event not delivered") from None
        self.metrics.app(app.id).client_events.inc()
        hook: dict[str, Any] = {
            "name": "client_event",
            "channel": channel,
            "event": event,
            "data": data if isinstance(data, str) else encoded,
            "socket_id": conn.socket_id,
        }
        if user_id is not None:
            hook["user_id"] = user_id
        self.events.emit(app, hook)
        tap = self.s.tap
        if tap.attached:
            tap.record(app.id, "client_event", channel=channel, event=event, socket_id=conn.socket_id,
                       user_id=user_id, data=hook["data"])

    # -- sign-in, users and watchlist ----------------------------------------

    def _signin(self, conn: Connection, data: dict[str, Any]) -> None:
        app = conn.app
        auth = data.get("auth")
        user_data = data.get("user_data")
        if not isinstance(auth, str) or not isinstance(user_data, str):
            raise PusherError(PusherCode.UNAUTHORIZED, "auth and user_data are required to sign in")
        try:
            user = p.loads(user_data)
        except (ValueError, RecursionError):  # deep nesting is bad input, not a server error
            user = None
        if not isinstance(user, dict) or not isinstance(user.get("id"), str) or not user["id"]:
            raise PusherError(PusherCode.UNAUTHORIZED, "user_data must be a JSON object with a string id")
        if not verify_user_auth(app.key, app.secret, conn.socket_id, user_data, auth):
            self.metrics.connection_error(app.id, "authentication_failed")
            raise PusherError(PusherCode.UNAUTHORIZED, "Invalid signature")

        user_id: str = user["id"]
        if conn.user_id is not None and conn.user_id != user_id:
            self._remove_user_socket(conn)
            conn.user_id = None
        conn.signed_in = True
        conn.auth_deadline = None
        if conn.user_id is None:
            conn.user_id = user_id
            conn.user_info = user.get("user_info")
            self._add_user_socket(conn)
        self._send(conn, p.frame(p.SIGNIN_SUCCESS, {"user_data": user_data}))

        watchlist = user.get("watchlist")
        if app.enable_watchlist_events and isinstance(watchlist, list):
            ids = tuple(str(w) for w in watchlist if isinstance(w, (str, int)))[:100]
            if conn.watchlist:
                self.adapter.unwatch(app.id, conn, conn.watchlist)
            conn.watchlist = ids
            self.adapter.watch(app.id, conn, ids)
            online = [u for u in ids if self.adapter.user_online(app.id, u)]
            offline = [u for u in ids if u not in online]
            events = []
            if online:
                events.append({"name": "online", "user_ids": online})
            if offline:
                events.append({"name": "offline", "user_ids": offline})
            if events:
                self._send(conn, p.frame(p.WATCHLIST_EVENTS, {"events": events}))

    def _add_user_socket(self, conn: Connection) -> None:
        assert conn.user_id is not None
        app = conn.app
        if self.adapter.add_user_socket(app.id, conn.user_id, conn) and app.enable_watchlist_events:
            self._watchlist_notify(app, conn.user_id, "online")

    def _remove_user_socket(self, conn: Connection) -> None:
        assert conn.user_id is not None
        app = conn.app
        if self.adapter.remove_user_socket(app.id, conn.user_id, conn.socket_id) and app.enable_watchlist_events:
            self._watchlist_notify(app, conn.user_id, "offline")

    def _watchlist_notify(self, app: AppConfig, user_id: str, state: str) -> None:
        text = p.frame(p.WATCHLIST_EVENTS, {"events": [{"name": state, "user_ids": [user_id]}]})
        self.adapter.notify_watchers(app.id, user_id, OutFrame(text))

    # -- cluster transitions reported by the adapter (a dead node, a healed outage) --

    def on_member_removed(self, app_id: str, channel: str, user_id: str) -> None:
        app = self.s.apps.by_id(app_id)
        if app is None:
            return
        self.metrics.presence_leaves.labels(app.id, self.metrics.port).inc()
        removed = p.frame(p.MEMBER_REMOVED, p.dumps({"user_id": user_id}), channel=channel)
        self._broadcast(app, channel, OutFrame(removed))
        self.events.emit(app, {"name": "member_removed", "channel": channel, "user_id": user_id})

    def on_channel_vacated(self, app_id: str, channel: str) -> None:
        app = self.s.apps.by_id(app_id)
        if app is not None:
            self.events.emit(app, {"name": "channel_vacated", "channel": channel})

    def on_user_offline(self, app_id: str, user_id: str) -> None:
        app = self.s.apps.by_id(app_id)
        if app is not None and app.enable_watchlist_events:
            self._watchlist_notify(app, user_id, "offline")

    # -- output helpers --------------------------------------------------------------

    def _broadcast(self, app: AppConfig, channel: str, frame: OutFrame, except_socket_id: str | None = None) -> int:
        sent = self.adapter.broadcast(app.id, channel, frame, except_socket_id)
        if sent:
            m = self.metrics.app(app.id)
            m.ws_sent.inc(sent)
            m.bytes_sent.inc(sent * len(frame.text))
        return sent

    def _send(self, conn: Connection, text: str) -> None:
        conn.send_text(text)
        m = self.metrics.app(conn.app.id)
        m.ws_sent.inc()
        m.bytes_sent.inc(len(text))

    def _fail(self, conn: Connection, exc: PusherError) -> None:
        self._send(conn, p.error_frame(exc.code, exc.message))
        if exc.fatal:
            conn.transport.close(exc.code, exc.message)
