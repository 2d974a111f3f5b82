"""``POST /apps/{id}/events`` and ``/batch_events``."""

from __future__ import annotations

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from sockudo import rest
from sockudo.http_api.signing import json_body, require_signed_app, services

bp = Blueprint("events", __name__)


@bp.post("/apps/<app_id>/events")
def trigger(app_id: str) -> ResponseReturnValue:
    app = require_signed_app(app_id)
    return jsonify(rest.trigger(services(), app, json_body(), request.headers.get("X-Idempotency-Key")))


@bp.post("/apps/<app_id>/batch_events")
def trigger_batch(app_id: str) -> ResponseReturnValue:
    app = require_signed_app(app_id)
    return jsonify(rest.trigger_batch(services(), app, json_body(), request.headers.get("X-Idempotency-Key")))
