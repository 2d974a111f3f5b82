"""``POST /apps/{id}/users/{uid}/terminate_connections``.

The Python SDK posts to ``/users/{uid}/terminate_connections`` without the app prefix;
both routes are served, the unprefixed one resolving the app from ``auth_key``.
"""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue

from sockudo import rest
from sockudo.http_api.signing import require_signed_app, services

bp = Blueprint("users", __name__)


@bp.post("/apps/<app_id>/users/<user_id>/terminate_connections")
def terminate(app_id: str, user_id: str) -> ResponseReturnValue:
    app = require_signed_app(app_id)
    return jsonify(rest.terminate_user_connections(services(), app, user_id))


@bp.post("/users/<user_id>/terminate_connections")
def terminate_unprefixed(user_id: str) -> ResponseReturnValue:
    app = require_signed_app(None)
    return jsonify(rest.terminate_user_connections(services(), app, user_id))
