"""The REST API's Pusher logic (https://pusher.com/docs/channels/library_auth_reference/rest-api/), free of Flask.

Each function takes the parsed JSON body or query values and returns the response body,
or raises ``ApiError`` with the documented status.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from typing import Any

from sockudo.cache import cache_channel_key
from sockudo.config import AppConfig
from sockudo.core import protocol as p
from sockudo.core.errors import ApiError, PusherCode
from sockudo.history import idempotency
from sockudo.publisher import PublishUnavailable
from sockudo.services import Services

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


def _validate_event(services: Services, app: AppConfig, body: Any) -> dict[str, Any]:
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
    # A channel named twice is one channel: one delivery, one serial, one history entry.
    channels = list(dict.fromkeys(channels))
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
        raise _reject(services, app, 400, "invalid_input", "invalid_input",
                      f"Unknown info attribute {sorted(unknown)[0]}")
    if "user_count" in info and not all(p.channel_kind(c) is p.ChannelKind.PRESENCE for c in channels):
        raise _reject(services, app, 400, "invalid_input", "invalid_input",
                      "user_count is only available on presence channels")
    return {"name": name, "channels": channels, "data": data, "socket_id": socket_id, "info": info}


def _deliver(services: Services, app: AppConfig, event: dict[str, Any]) -> None:
    try:  # every channel or none (Publisher.publish_to)
        services.publisher.publish_to(app, event["channels"], event["name"], event["data"], event["socket_id"],
                                      cache=True)
    except PublishUnavailable:
        services.metrics.publish_rejected(app.id, "store_unavailable")
        raise ApiError(503, "service_unavailable", "Message store unavailable; the event was not published",
                       headers={"Retry-After": "1"}) from None
    tap = services.tap
    if tap.attached:  # the console watches (one flag read otherwise)
        for channel in event["channels"]:
            tap.record(app.id, "api_message", channel=channel, event=event["name"], data=event["data"],
                       socket_id=event["socket_id"])


def _user_count(services: Services, app: AppConfig, channel: str, out: dict[str, Any]) -> bool:
    """Put the channel's cluster-wide ``user_count`` in ``out``, with ``"user_count_complete":
    false`` beside it when some node's members could not be read; returns completeness."""
    members, complete = services.adapter.presence_members_checked(app.id, channel)
    out["user_count"] = len(members)
    if not complete:
        out["user_count_complete"] = False  # partial cluster answer (logged by the adapter)
    return complete


def _channel_info(services: Services, app: AppConfig, channel: str, info: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "subscription_count" in info:
        count, complete = services.adapter.subscriber_count_checked(app.id, channel)
        out["subscription_count"] = count
        if not complete:
            out["subscription_count_complete"] = False
    if "user_count" in info:
        _user_count(services, app, channel, out)
    return out


def _idempotent(services: Services, app: AppConfig, key: str,
                run: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """Run ``run`` once per key inside the app's idempotency TTL; repeats get the first answer.

    Returns ``(response, duplicate)``."""
    cfg = app.idempotency
    store = services.idempotency
    assert store is not None
    services.metrics.idempotency_publishes.labels(app.id, services.metrics.port).inc()
    stored = idempotency.begin(store, key, cfg.ttl_seconds, services.sleep)
    if stored is not None:
        services.metrics.idempotency_duplicates.labels(app.id, services.metrics.port).inc()
        return json.loads(stored), True
    try:
        response = run()
    except BaseException:
        # Let a retry publish; with the store down too, the claim lapses with its TTL instead
        # (and the caller still gets the publish's own error).
        with contextlib.suppress(idempotency.IdempotencyUnavailable):
            store.release(key)
        raise
    try:
        store.store(key, p.dumps(response), cfg.ttl_seconds)
    except idempotency.IdempotencyUnavailable:  # the publish happened; a lost record only weakens dedupe of a retry
        services.metrics.publish_rejected(app.id, "idempotency_store_failed")
    return response, False


def _request_key(app: AppConfig, body: Any, header_key: str | None) -> str | None:
    if not app.idempotency.enabled:
        return None
    key = body.get("idempotency_key") if isinstance(body, dict) and "idempotency_key" in body else header_key
    if key is None:
        return None
    return idempotency.validate_key(key, app.idempotency.max_key_length)


def trigger(services: Services, app: AppConfig, body: Any, idempotency_key: str | None = None) -> dict[str, Any]:
    """``POST /apps/{id}/events``; ``idempotency_key`` in the body or ``X-Idempotency-Key``."""
    event = _validate_event(services, app, body)
    key = _request_key(app, body, idempotency_key)

    def run() -> dict[str, Any]:
        _deliver(services, app, event)
        if event["info"]:
            return {"channels": {c: _channel_info(services, app, c, event["info"]) for c in event["channels"]}}
        return {}

    if key is None:
        return run()
    return _idempotent(services, app, f"app:{app.id}:idempotency:{key}", run)[0]


def trigger_batch(services: Services, app: AppConfig, body: Any, idempotency_key: str | None = None) -> dict[str, Any]:
    """``POST /apps/{id}/batch_events``: every item is validated before any is published.

    ``X-Idempotency-Key`` covers the whole request; an item's own ``idempotency_key`` dedupes
    that item (a duplicate item is skipped and answered with ``{}``).
    """
    batch = body.get("batch") if isinstance(body, dict) else None
    if not isinstance(batch, list):
        raise _reject(services, app, 400, "invalid_input", "invalid_input", "batch must be a list of events")
    if len(batch) > app.max_event_batch_size:
        raise _reject(services, app, 400, "limit_exceeded", "batch_too_large",
                      f"At most {app.max_event_batch_size} events per batch")
    events = [_validate_event(services, app, item) for item in batch]
    item_keys = [_request_key(app, item, None) for item in batch]
    want_info = any(e["info"] for e in events)

    def run() -> dict[str, Any]:
        results: list[dict[str, Any]] = []
        for event, key in zip(events, item_keys, strict=True):
            def one(event: dict[str, Any] = event) -> dict[str, Any]:
                _deliver(services, app, event)
                return _channel_info(services, app, event["channels"][0], event["info"]) if event["info"] else {}

            if key is None:
                results.append(one())
            else:
                result, duplicate = _idempotent(services, app, f"app:{app.id}:idempotency:{key}", one)
                results.append({} if duplicate else result)
        return {"batch": results} if want_info else {}

    if idempotency_key is None or not app.idempotency.enabled:
        return run()
    key = idempotency.validate_key(idempotency_key, app.idempotency.max_key_length)
    return _idempotent(services, app, f"app:{app.id}:batch-idempotency:{key}", run)[0]


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
            members, members_complete = services.adapter.presence_members_checked(app.id, name)
            entry["user_count"] = len(members)
            complete = complete and members_complete
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
        _user_count(services, app, channel, out)
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
    members, complete = services.adapter.presence_members_checked(app.id, channel)
    out: dict[str, Any] = {"users": [{"id": uid} for uid in members]}
    if not complete:
        out["complete"] = False  # some node's members could not be read (logged by the adapter)
    return out


def terminate_user_connections(services: Services, app: AppConfig, user_id: str) -> dict[str, Any]:
    """``POST …/users/{id}/terminate_connections``: every socket of the user gets 4009."""
    if not user_id:
        raise ApiError(400, "invalid_input", "user id is required")
    services.adapter.terminate_user(app.id, user_id, PusherCode.UNAUTHORIZED, "You got disconnected by the app.")
    return {}
