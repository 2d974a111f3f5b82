"""Pusher error codes and the domain errors raised by the pure core.

Codes follow the ranges of the Pusher protocol
(https://pusher.com/docs/channels/library_auth_reference/pusher-websockets-protocol/): 4000-4099 the client must
not reconnect, 4100-4199 back off then reconnect, 4200-4299 reconnect now,
4300+ other (non-fatal channel or client-event errors).
"""

from __future__ import annotations

from enum import IntEnum


class PusherCode(IntEnum):
    GENERIC = 4000
    APP_NOT_FOUND = 4001
    APP_DISABLED = 4003
    APP_OVER_QUOTA = 4004
    UNSUPPORTED_PROTOCOL = 4007
    UNAUTHORIZED = 4009
    OVER_CAPACITY = 4100
    RECONNECT_NOW = 4200
    PONG_TIMEOUT = 4201
    CHANNEL_ERROR = 4300
    CLIENT_EVENT_ERROR = 4301
    WATCHLIST_LIMIT = 4302


class PusherError(Exception):
    """An error answered on the WebSocket with a ``pusher:error`` frame.

    ``fatal`` errors close the socket with the same code after the frame.
    """

    def __init__(self, code: PusherCode | int, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.fatal = fatal


class SubscriptionError(Exception):
    """A failed subscribe: answered with ``pusher:subscription_error`` on the channel
    (what pusher-js apps bind) plus a non-fatal ``pusher:error`` with ``code``."""

    def __init__(self, code: PusherCode | int, message: str, status: int, error_type: str) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.status = status
        self.error_type = error_type


class ApiError(Exception):
    """An error answered by the REST API: ``{"error", "code", "status"}``."""

    def __init__(self, status: int, slug: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.slug = slug
        self.message = message
        self.headers = headers or {}


class ConfigError(Exception):
    """Invalid configuration; the message names the offending key."""
