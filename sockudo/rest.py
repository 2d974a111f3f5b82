"""The REST API's Pusher logic (spec §5.4-§5.8), free of Flask.

Each function takes the parsed JSON body or query values and returns the response body,
or raises ``ApiError`` with the documented status.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from . import protocol as p
from .cache import cache_channel_key
from .config import AppConfig
from .errors import ApiError, PusherCode
from .handler import CACHE_TTL_SECONDS, Services
from .wsframe import OutFrame

_SOCKET_ID = re.compile(r"\A\d+\.\d+\Z")
_INFO_ATTRIBUTES = {"user_count", "subscription_count", "cache"}


def _reject(services: Services, app: AppConfig, status: int, slug: str, reason: str, message: str) -> ApiError:
    services.metrics.publish_rejected(app.id, reason)
    return ApiError(status, slug, message)


def _info_set(raw: Any) -> set[str]:
    if raw is None or raw == "":
        return set()
    if not isinstance(raw, str):
        raise ApiError(400, "invalid_input", "info must be a comma-separated string")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _validate_event(services: Services, app: AppConfig, body: Any, *, in_batch: bool) -> dict[str, Any]:
    """Check one event against the app's limits; returns the normalised event."""
    if not isinstance(body, dict):
        raise _reject(services, app, 400, "invalid_input", "invalid_input", "Event must be a JSON object")
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise _reject(services, app, 400, "invalid_input", "invalid_input", "name is required")
    if len(name) > app.max_event_name_length:
        raise _reject(services, app, 400, "limit_exceeded", "event_name_too_long",
                      f"Event name is longer than {app.max_event_name_length} characters")
    channels = body.get("channels")
    if channels is None and body.get("channel") is not None:
        channels = [body.get("channel")]
    if not isinstance(channels, list) or not channels:
        raise _reject(services, app, 400, "missing_channel_info", "invalid_input", "channels or channel is required")
    if len(channels) > app.max_event_channels_at_once:
        raise _reject(services, app, 400, "limit_exceeded", "too_many_channels",
                      f"At most {app.max_event_channels_at_once} channels per event")
    for channel in channels:
        error = p.channel_name_error(channel, app.max_channel_name_length)
        if error is not None:
            raise _reject(services, app, 400, "invalid_input", "invalid_channel", error)
    data = body.get("data", "")
    if not isinstance(data, str):
        data = p.dumps(data)  # Sockudo stringifies JSON data; Pusher SDKs always send a string
    if len(data.encode("utf-8")) > app.max_event_payload_in_kb * 1024:
        raise _reject(services, app, 413, "payload_too_large", "payload_too_large",
                      f"Event data is larger than {app.max_event_payload_in_kb:g} KB")
    socket_id = body.get("socket_id")
    if socket_id is not None and (not isinstance(socket_id, str) or not _SOCKET_ID.match(socket_id)):
        raise _reject(services, app, 400, "invalid_input", "invalid_input", "socket_id is malformed")
    info = _info_set(body.get("info"))
    unknown = info - {"user_count", "subscription_count"}
    if unknown:
        raise _reject(services, app, 400, "invalid_input", "invalid_input", f"Unknown info attribute {sorted(unknown)[0]}")
    if "user_count" in info and not all(p.channel_kind(c) is p.ChannelKind.PRESENCE for c in channels):
        raise _reject(services, app, 400, "invalid_input", "invalid_input", "user_count is only available on presence channels")
    return {"name": name, "channels": channels, "data": data, "socket_id": socket_id, "info": info}


def _deliver(services: Services, app: AppConfig, event: dict[str, Any]) -> None:
    adapter = services.adapter
    m = services.metrics.app(app.id)
    for channel in event["channels"]:
        frame = OutFrame(p.frame(event["name"], event["data"], channel=channel))
        started = time.perf_counter()
        user_id = p.server_to_user_id(channel)
        if user_id is not None:
            sent = adapter.send_to_user(app.id, user_id, frame, event["socket_id"])
        else:
            sent = adapter.broadcast(app.id, channel, frame, event["socket_id"])
        if p.is_cache_channel(channel):
            services.cache.set(cache_channel_key(app.id, channel), frame.text, CACHE_TTL_SECONDS)
        m.publishes.inc()
        if sent:
            m.ws_sent.inc(sent)
            m.bytes_sent.inc(sent * len(frame.text))
            services.metrics.broadcast_latency(
                app.id, p.channel_type_label(channel), sent, (time.perf_counter() - started) * 1000
            )


def _channel_info(services: Services, app: AppConfig, channel: str, info: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "subscription_count" in info:
        out["subscription_count"] = services.adapter.subscriber_count(app.id, channel)
    if "user_count" in info:
        out["user_count"] = len(services.adapter.presence_members(app.id, channel))
    return out


def trigger(services: Services, app: AppConfig, body: Any) -> dict[str, Any]:
    """``POST /apps/{id}/events``."""
    event = _validate_event(services, app, body, in_batch=False)
    _deliver(services, app, event)
    if event["info"]:
        return {"channels": {c: _channel_info(services, app, c, event["info"]) for c in event["channels"]}}
    return {}


def trigger_batch(services: Services, app: AppConfig, body: Any) -> dict[str, Any]:
    """``POST /apps/{id}/batch_events``: items are validated first, then run in order."""
    batch = body.get("batch") if isinstance(body, dict) else None
    if not isinstance(batch, list):
        raise _reject(services, app, 400, "invalid_input", "invalid_input", "batch must be a list of events")
    if len(batch) > app.max_event_batch_size:
        raise _reject(services, app, 400, "limit_exceeded", "batch_too_large",
                      f"At most {app.max_event_batch_size} events per batch")
    events = [_validate_event(services, app, item, in_batch=True) for item in batch]
    for event in events:
        _deliver(services, app, event)
    if any(e["info"] for e in events):
        return {"batch": [_channel_info(services, app, e["channels"][0], e["info"]) if e["info"] else {} for e in events]}
    return {}


def list_channels(services: Services, app: AppConfig, prefix: str, info_raw: str | None) -> dict[str, Any]:
    """``GET /apps/{id}/channels``: occupied channels, optionally filtered by prefix."""
    info = _info_set(info_raw)
    unknown = info - {"user_count", "subscription_count"}
    if unknown:
        raise ApiError(400, "invalid_input", f"Unknown info attribute {sorted(unknown)[0]}")
    if "user_count" in info and not prefix.startswith("presence-"):
        raise ApiError(400, "invalid_input", "user_count requires filter_by_prefix=presence-")
    channels, complete = services.adapter.channels_checked(app.id, prefix)
    out: dict[str, Any] = {"channels": {}}
    for name, count in channels.items():
        if count <= 0:
            continue
        entry: dict[str, Any] = {}
        if "subscription_count" in info:
            entry["subscription_count"] = count
        if "user_count" in info:
            entry["user_count"] = len(services.adapter.presence_members(app.id, name))
        out["channels"][name] = entry
    if not complete:
        out["complete"] = False  # some node did not answer in time (logged by the adapter)
    return out


def channel_info(services: Services, app: AppConfig, channel: str, info_raw: str | None) -> dict[str, Any]:
    """``GET /apps/{id}/channels/{channel}``."""
    error = p.channel_name_error(channel, app.max_channel_name_length)
    if error is not None:
        raise ApiError(400, "invalid_input", error)
    info = _info_set(info_raw)
    unknown = info - _INFO_ATTRIBUTES
    if unknown:
        raise ApiError(400, "invalid_input", f"Unknown info attribute {sorted(unknown)[0]}")
    if "user_count" in info and p.channel_kind(channel) is not p.ChannelKind.PRESENCE:
        raise ApiError(400, "invalid_input", "user_count is only available on presence channels")
    count, complete = services.adapter.subscriber_count_checked(app.id, channel)
    out: dict[str, Any] = {"occupied": count > 0}
    if "subscription_count" in info:
        out["subscription_count"] = count
    if not complete:
        out["subscription_count_complete"] = False  # Sockudo's marker for a partial cluster answer
    if "user_count" in info:
        out["user_count"] = len(services.adapter.presence_members(app.id, channel))
    if "cache" in info:
        if not p.is_cache_channel(channel):
            raise ApiError(400, "invalid_input", "cache is only available on cache channels")
        cached = services.cache.get(cache_channel_key(app.id, channel))
        if cached is not None:
            stored = json.loads(cached[0])
            out["cache"] = {"data": stored.get("data"), "event": stored.get("event"), "ttl": int(cached[1])}
    return out


def channel_users(services: Services, app: AppConfig, channel: str) -> dict[str, Any]:
    """``GET /apps/{id}/channels/{presence-channel}/users``."""
    error = p.channel_name_error(channel, app.max_channel_name_length)
    if error is not None:
        raise ApiError(400, "invalid_input", error)
    if p.channel_kind(channel) is not p.ChannelKind.PRESENCE:
        raise ApiError(400, "invalid_input", "Users are only available on presence channels")
    members = services.adapter.presence_members(app.id, channel)
    return {"users": [{"id": uid} for uid in members]}


def terminate_user_connections(services: Services, app: AppConfig, user_id: str) -> dict[str, Any]:
    """``POST …/users/{id}/terminate_connections``: every socket of the user gets 4009."""
    if not user_id:
        raise ApiError(400, "invalid_input", "user id is required")
    services.adapter.terminate_user(app.id, user_id, PusherCode.UNAUTHORIZED, "You got disconnected by the app.")
    return {}
