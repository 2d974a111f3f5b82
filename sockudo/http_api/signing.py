"""The Flask routes' side of request signing: the signed request's app, and its JSON body.

The check itself (``common.authenticate``) is shared with the publish fast path."""

from __future__ import annotations

from flask import current_app, g, request

from sockudo.config import AppConfig
from sockudo.handler import Handler
from sockudo.http_api.common import authenticate, parse_json_body
from sockudo.services import Services


def services() -> Services:
    return current_app.extensions["sockudo"]["services"]  # type: ignore[no-any-return]


def handler() -> Handler:
    return current_app.extensions["sockudo"]["handler"]  # type: ignore[no-any-return]


def require_signed_app(app_id: str | None = None) -> AppConfig:
    """Authenticate the request; returns the app. ``app_id`` None: the key decides the app."""
    app, _ = authenticate(services(), app_id, request.method, request.environ, lambda: request.get_data(cache=True))
    g.app = app
    return app


def json_body() -> object:
    """The request body as JSON; 415 without a JSON content type, 400 when unparsable."""
    return parse_json_body(request.content_type or "", request.get_data(cache=True))
