"""Reading channel history, shared by REST ``GET …/channels/{c}/history`` and the WebSocket
``sockudo:channel_history`` request. Pure: raises ``ApiError`` for bad input."""

from __future__ import annotations

import json
from typing import Any

from sockudo.config import AppConfig
from sockudo.core import protocol as p
from sockudo.core.errors import ApiError
from sockudo.history.store import SequencerUnavailable, StoredMessage, decode_cursor, encode_cursor
from sockudo.metrics.registry import Metrics

NEWEST_FIRST = {"newest_first", "backwards", "reverse"}
OLDEST_FIRST = {"oldest_first", "forwards", "forward"}
MAX_PARAM = 2**63 - 1
#: ``sockudo:channel_history`` pages: ``limit`` defaults to 100 and, as on REST, is capped at
#: the app's ``max_page_size``. (Sockudo lets a WebSocket page hold up to 1,000 messages whatever
#: ``max_page_size`` says; here one ~100-byte request could then queue a frame of megabytes.)
WS_DEFAULT_LIMIT = 100


def _int_param(params: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = params.get(name)
        if value is None or value == "":
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ApiError(400, "invalid_input", f"{name} must be a whole number") from None
        if number < 0:
            raise ApiError(400, "invalid_input", f"{name} must not be negative")
        if number > MAX_PARAM:  # Redis stream ids are 64-bit: larger is bad input, not a 503
            raise ApiError(400, "invalid_input", f"{name} is too large")
        return number
    return None


def read_history(sequencer: Any, metrics: Metrics, app: AppConfig, channel: str, params: dict[str, Any],
                 attach_serial: int | None = None, *, websocket: bool = False) -> dict[str, Any]:
    """One page of ``channel``'s history.

    ``limit`` is capped at ``max_page_size``; it defaults to ``max_page_size`` on REST and to
    100 (or ``max_page_size`` if smaller) on the WebSocket ``sockudo:channel_history``
    (``websocket=True``), where ``attach_serial`` (the socket's, if any) caps the page for
    ``until_attach``.
    """
    attach = attach_serial
    if not app.history.enabled:
        raise ApiError(422, "feature_disabled", "History is not enabled for this app")
    error = p.channel_name_error(channel, app.max_channel_name_length)
    if error is not None:
        raise ApiError(400, "invalid_input", error)
    cfg = app.history
    limit = _int_param(params, "limit")
    if limit is None:
        limit = min(WS_DEFAULT_LIMIT, cfg.max_page_size) if websocket else cfg.max_page_size
    if limit == 0:
        raise ApiError(400, "invalid_input", "limit must be at least 1")
    limit = min(limit, cfg.max_page_size)
    direction = str(params.get("direction") or "newest_first")
    if direction in NEWEST_FIRST:
        direction = "newest_first"
    elif direction in OLDEST_FIRST:
        direction = "oldest_first"
    else:
        raise ApiError(400, "invalid_input", "direction must be newest_first or oldest_first")
    bounds: dict[str, Any] = {
        "start_serial": _int_param(params, "start_serial"),
        "end_serial": _int_param(params, "end_serial"),
        "start_time_ms": _int_param(params, "start_time_ms", "start"),
        "end_time_ms": _int_param(params, "end_time_ms", "end"),
    }
    if params.get("until_attach") in (True, "true", "1", 1):
        if attach is None:
            raise ApiError(400, "invalid_input", "until_attach needs a subscription to the channel")
        bounds["until_attach"] = True
        bounds["attach_serial"] = attach
        if bounds["end_serial"] is None or bounds["end_serial"] > attach:
            bounds["end_serial"] = attach

    try:
        state = sequencer.state(app, channel)
    except SequencerUnavailable:
        raise ApiError(503, "service_unavailable", "History store unavailable", headers={"Retry-After": "1"}) from None

    position: int | None = None
    cursor = params.get("cursor")
    if cursor:
        try:
            payload = decode_cursor(app, str(cursor))
            expected = {"app_id": app.id, "channel": channel, "direction": direction, "bounds": bounds}
            if any(payload.get(k) != v for k, v in expected.items()):
                raise ApiError(400, "invalid_cursor", "Cursor belongs to a different query")
            if payload.get("stream_id") != state.stream_id:
                raise ApiError(400, "invalid_cursor", "History was reset since this cursor was issued")
            position = int(payload["serial"])
        except ApiError:
            metrics.history_cursor_errors.labels(app.id, metrics.port).inc()
            raise
        except (KeyError, TypeError, ValueError):
            metrics.history_cursor_errors.labels(app.id, metrics.port).inc()
            raise ApiError(400, "invalid_cursor", "Malformed cursor") from None

    newest_first = direction == "newest_first"
    low = bounds["start_serial"] - 1 if bounds["start_serial"] else None
    high = bounds["end_serial"] + 1 if bounds["end_serial"] is not None else None
    if position is not None:
        if newest_first:
            high = position if high is None else min(high, position)
        else:
            low = position if low is None else max(low, position)

    items: list[StoredMessage] = []
    try:
        while len(items) <= limit:
            batch = sequencer.read(app, channel, low, high, newest_first, limit + 1)
            if not batch:
                break
            for message in batch:
                if bounds["start_time_ms"] is not None and message.published_ms < bounds["start_time_ms"]:
                    continue
                if bounds["end_time_ms"] is not None and message.published_ms > bounds["end_time_ms"]:
                    continue
                items.append(message)
            if newest_first:
                high = batch[-1].serial
            else:
                low = batch[-1].serial
            if len(batch) < limit + 1:
                break
    except SequencerUnavailable:
        raise ApiError(503, "service_unavailable", "History store unavailable", headers={"Retry-After": "1"}) from None
    metrics.history_reads.labels(app.id, metrics.port).inc()

    has_more = len(items) > limit
    items = items[:limit]
    next_cursor = None
    if has_more and items:
        next_cursor = encode_cursor(app, {
            "version": 1, "app_id": app.id, "channel": channel, "stream_id": state.stream_id,
            "serial": items[-1].serial, "direction": direction, "bounds": bounds,
        })
    stream_id = state.stream_id or ""
    out_items = []
    for m in items:
        frame = m.frame_v2(channel, stream_id)
        out_items.append({
            "stream_id": stream_id, "serial": m.serial, "published_at_ms": m.published_ms,
            "message_id": m.message_id, "event_name": m.event, "operation_kind": "create",
            # The payload as published: a string's own bytes, not its JSON-quoted form.
            "payload_size_bytes": len((m.data if isinstance(m.data, str) else p.dumps(m.data)).encode("utf-8")),
            "message": json.loads(frame),
        })
    # Messages were removed by retention when the oldest kept is not serial 1, or when
    # nothing is kept although the stream has had messages (all aged out).
    truncated = (state.oldest_serial is not None and state.oldest_serial > 1) or (
        state.oldest_serial is None and bool(state.newest_serial))
    return {
        "items": out_items,
        "direction": direction,
        "limit": limit,
        "has_more": has_more,
        "next_cursor": next_cursor,
        "bounds": bounds,
        "continuity": {
            "stream_id": state.stream_id,
            "oldest_available_serial": state.oldest_serial,
            "newest_available_serial": state.newest_serial if state.retained else None,
            "oldest_available_published_at_ms": state.oldest_ms,
            "newest_available_published_at_ms": state.newest_ms,
            "retained_messages": state.retained,
            "retained_bytes": state.retained_bytes,
            "complete": not truncated,
            "truncated_by_retention": truncated,
        },
        "stream_state": {
            "stream_id": state.stream_id,
            "durable_state": "healthy",
            "recovery_allowed": True,
            "reset_required": False,
            "reason": None,
        },
    }
