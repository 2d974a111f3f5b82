"""``GET /apps/{id}/channels``, ``/channels/{c}``, ``/channels/{c}/users``."""

from __future__ import annotations

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from sockudo import rest
from sockudo.core.errors import ApiError
from sockudo.history.api import read_history
from sockudo.history.store import SequencerUnavailable
from sockudo.http_api.signing import json_body, require_signed_app, services

bp = Blueprint("channels", __name__)


@bp.get("/apps/<app_id>/channels")
def list_channels(app_id: str) -> ResponseReturnValue:
    app = require_signed_app(app_id)
    prefix = request.args.get("filter_by_prefix", "")
    return jsonify(rest.list_channels(services(), app, prefix, request.args.get("info")))


@bp.get("/apps/<app_id>/channels/<path:channel>/users")
def channel_users(app_id: str, channel: str) -> ResponseReturnValue:
    app = require_signed_app(app_id)
    return jsonify(rest.channel_users(services(), app, channel))


@bp.get("/apps/<app_id>/channels/<path:channel>/history")
def channel_history(app_id: str, channel: str) -> ResponseReturnValue:
    app = require_signed_app(app_id)
    s = services()
    return jsonify(read_history(s.sequencer, s.metrics, app, channel, request.args.to_dict()))


@bp.post("/apps/<app_id>/channels/<path:channel>/history/reset")
def reset_history(app_id: str, channel: str) -> ResponseReturnValue:
    """Operator reset: a new stream id; resumes across it fail with ``stream_reset``."""
    app = require_signed_app(app_id)
    body = json_body()
    if not isinstance(body, dict) or body.get("confirm_channel") != channel or body.get("confirm_operation") != "reset":
        raise ApiError(400, "invalid_input", "confirm_channel must name the channel and confirm_operation be \"reset\"")
    s = services()
    try:
        s.sequencer.reset(app, channel)  # type: ignore[union-attr]
        # Start the new stream now, so a resume across the reset is told ``stream_reset``
        # (not "cannot verify") even before the next message.
        stream_id, _ = s.sequencer.ensure(app, channel)  # type: ignore[union-attr]
    except SequencerUnavailable:
        raise ApiError(503, "service_unavailable", "History store unavailable") from None
    s.buffers.channels.pop((app.id, channel), None)
    return jsonify({"ok": True, "stream_id": stream_id})


@bp.get("/apps/<app_id>/channels/<path:channel>")
def channel_info(app_id: str, channel: str) -> ResponseReturnValue:
    app = require_signed_app(app_id)
    return jsonify(rest.channel_info(services(), app, channel, request.args.get("info")))
