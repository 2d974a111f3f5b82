"""Wire-level names, frame encoding/decoding and channel rules of the Pusher protocol.

Pure: no I/O. Every wire string the server speaks lives here.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any

# -- event names ---------------------------------------------------------------

CONNECTION_ESTABLISHED = "pusher:connection_established"
ERROR = "pusher:error"
PING = "pusher:ping"
PONG = "pusher:pong"
SIGNIN_SUCCESS = "pusher:signin_success"
SUBSCRIPTION_ERROR = "pusher:subscription_error"
CACHE_MISS = "pusher:cache_miss"
SUBSCRIPTION_SUCCEEDED = "pusher_internal:subscription_succeeded"
MEMBER_ADDED = "pusher_internal:member_added"
MEMBER_REMOVED = "pusher_internal:member_removed"
SUBSCRIPTION_COUNT = "pusher_internal:subscription_count"
WATCHLIST_EVENTS = "pusher_internal:watchlist_events"

CLIENT_EVENT_PREFIX = "client-"
SYSTEM_PREFIXES = ("pusher:", "sockudo:")

SERVER_TO_USER_PREFIX = "#server-to-user-"

# -- frames --------------------------------------------------------------------

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(value: Any) -> str:
    """Compact JSON, as Pusher sends it."""
    return _dumps(value)


def frame(event: str, data: Any = None, channel: str | None = None, user_id: str | None = None) -> str:
    """Encode one server frame; absent fields are omitted, never sent as null."""
    out: dict[str, Any] = {"event": event}
    if channel is not None:
        out["channel"] = channel
    if data is not None:
        out["data"] = data
    if user_id is not None:
        out["user_id"] = user_id
    return _dumps(out)


def to_v2(text: str, message_id: str) -> str:
    """The protocol-2 form of a frame: ``pusher:``/``pusher_internal:`` become
    ``sockudo:``/``sockudo_internal:``, and every non-ping frame carries a ``message_id``."""
    try:
        msg = json.loads(text)
    except ValueError:
        return text
    if not isinstance(msg, dict):
        return text
    event = msg.get("event")
    if isinstance(event, str):
        if event.startswith("pusher_internal:"):
            msg["event"] = "sockudo_internal:" + event[len("pusher_internal:"):]
        elif event.startswith("pusher:"):
            msg["event"] = "sockudo:" + event[len("pusher:"):]
        if event not in (PING, PONG) and "message_id" not in msg:
            msg["message_id"] = message_id
    return _dumps(msg)


def error_frame(code: int, message: str) -> str:
    return frame(ERROR, {"code": code, "message": message})


class FrameError(ValueError):
    """An inbound frame that is not a JSON object with a string ``event``."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if number in (_INF, -_INF):  # 1e400: Python says inf, and would write it back as Infinity
        raise ValueError(f"{text} is out of range")
    return number


_INF = float("inf")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_CHAR = re.compile("[\ud800-\udfff]")  # a str made from bytes with errors="surrogateescape"


def loads(text: str) -> Any:
    """``json.loads`` for client input, stricter than Python's: ``NaN``/``Infinity``, numbers out
    of float range (``1e400``) and ``\\uD800``-style escapes that decode to a lone surrogate raise
    ``ValueError``. Python accepts all three, and would relay them to other clients as a frame
    that is not JSON (``Infinity``) or cannot be encoded as UTF-8 (which killed the writer
    greenlet of every recipient)."""
    if not text.isascii() and _SURROGATE_CHAR.search(text):
        raise ValueError("text is not valid Unicode")
    value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    if _SURROGATE_ESCAPE.search(text):
        try:
            _dumps(value).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("string escapes a lone surrogate") from None
    return value


def decode_frame(text: str) -> dict[str, Any]:
    """Parse an inbound frame. Client ``data`` may be an object or a JSON string."""
    try:
        msg = loads(text)
    except (ValueError, RecursionError) as exc:
        raise FrameError("Invalid JSON") from exc
    if not isinstance(msg, dict):
        raise FrameError("Frame must be a JSON object")
    event = msg.get("event")
    if not isinstance(event, str) or not event:
        raise FrameError("Frame has no event name")
    channel = msg.get("channel")
    if channel is not None and not isinstance(channel, str):
        raise FrameError("channel must be a string")
    return msg


def data_object(msg: dict[str, Any]) -> dict[str, Any]:
    """The frame's ``data`` as an object: objects pass, JSON strings are parsed."""
    data = msg.get("data")
    if isinstance(data, str):
        if not data:
            return {}
        try:
            data = loads(data)
        except (ValueError, RecursionError) as exc:  # deep nesting is bad input, not a server error
            raise FrameError("data is not valid JSON") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FrameError("data must be an object")
    return data


def system_event_name(event: str) -> str | None:
    """``pusher:subscribe`` and ``sockudo:subscribe`` route alike; returns ``subscribe``."""
    for prefix in SYSTEM_PREFIXES:
        if event.startswith(prefix):
            return event[len(prefix):]
    return None


# -- channels ------------------------------------------------------------------


class ChannelKind(Enum):
    PUBLIC = "public"
    PRIVATE = "private"
    ENCRYPTED = "private_encrypted"
    PRESENCE = "presence"
    SERVER_TO_USER = "server_to_user"

    @property
    def needs_auth(self) -> bool:
        return self in (ChannelKind.PRIVATE, ChannelKind.ENCRYPTED, ChannelKind.PRESENCE)


def channel_kind(name: str) -> ChannelKind:
    """Prefixes are checked most specific first; cache variants keep their base kind."""
    if name.startswith("private-encrypted-"):
        return ChannelKind.ENCRYPTED
    if name.startswith("private-"):
        return ChannelKind.PRIVATE
    if name.startswith("presence-"):
        return ChannelKind.PRESENCE
    if name.startswith(SERVER_TO_USER_PREFIX):
        return ChannelKind.SERVER_TO_USER
    return ChannelKind.PUBLIC


_CACHE_PREFIXES = ("cache-", "private-cache-", "private-encrypted-cache-", "presence-cache-")


def is_cache_channel(name: str) -> bool:
    """Cache channels are recognised by an anchored prefix (Sockudo's unanchored match is a bug)."""
    return name.startswith(_CACHE_PREFIXES)


def channel_type_label(name: str) -> str:
    """A bounded label for metrics: the kind, never the name."""
    return channel_kind(name).value


_CHANNEL_CHARS = re.compile(r"\A[A-Za-z0-9\-_=@,.;:#]+\Z")


def channel_name_error(name: Any, max_length: int) -> str | None:
    """Why ``name`` is not a valid channel name, or None."""
    if not isinstance(name, str) or not name:
        return "Channel name is required"
    if len(name) > max_length:
        return f"Channel name too long (max {max_length} characters)"
    if not _CHANNEL_CHARS.match(name):
        return "Channel name contains invalid characters"
    return None


def server_to_user_id(channel: str) -> str | None:
    if channel.startswith(SERVER_TO_USER_PREFIX):
        return channel[len(SERVER_TO_USER_PREFIX):] or None
    return None
