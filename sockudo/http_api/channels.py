"""``GET /apps/{id}/channels``, ``/channels/{c}``, ``/channels/{c}/users``."""

from __future__ import annotations

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from .. import rest
from .signing import require_signed_app, services

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


@bp.get("/apps/<app_id>/channels/<path:channel>")
def channel_info(app_id: str, channel: str) -> ResponseReturnValue:
    app = require_signed_app(app_id)
    return jsonify(rest.channel_info(services(), app, channel, request.args.get("info")))
