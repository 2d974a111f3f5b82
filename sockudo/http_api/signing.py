"""Pusher request signing for every ``/apps/{id}/*`` route (spec §5.2)."""

from __future__ import annotations

from typing import Any

from flask import current_app, g, request

from sockudo.config import AppConfig
from sockudo.core.auth import query_pairs, verify_rest_request
from sockudo.core.errors import ApiError
from sockudo.core.protocol import loads
from sockudo.handler import Handler
from sockudo.services import Services


def services() -> Services:
    return current_app.extensions["sockudo"]["services"]  # type: ignore[no-any-return]


def handler() -> Handler:
    return current_app.extensions["sockudo"]["handler"]  # type: ignore[no-any-return]


def authenticate(s: Services, app_id: str | None, method: str, environ: dict[str, Any], body: bytes) -> AppConfig:
    """Check a request's Pusher signature (spec §5.2); returns the app. No Flask here, so the
    publish fast path (``fastpath.py``) and the Flask routes share exactly one check."""
    query = environ.get("QUERY_STRING", "")
    if not query:
        raise ApiError(400, "invalid_input", "Missing authentication query parameters")
    params = {k.lower(): v for k, v in query_pairs(query)}
    key = params.get("auth_key")
    app = s.apps.by_key(key) if key else None
    if app is None:
        raise ApiError(404, "app_not_found", "Unknown auth_key")
    if app_id is not None and app.id != app_id:
        raise ApiError(401, "auth_failed", "auth_key does not belong to this app")
    # PATH_INFO arrives latin-1 decoded per WSGI; restore the UTF-8 the client signed.
    path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
    try:
        verify_rest_request(secret=app.secret, method=method, path=path, query_string=query, body=body, now=s.clock())
    except ApiError:
        s.metrics.connection_error(app.id, "api_authentication_failed")
        raise
    if not app.enabled:
        raise ApiError(403, "app_disabled", "App is disabled")
    return app


def require_signed_app(app_id: str | None = None) -> AppConfig:
    """Authenticate the request; returns the app. ``app_id`` None: the key decides the app."""
    app = authenticate(services(), app_id, request.method, request.environ, request.get_data(cache=True))
    g.app = app
    return app


def json_body() -> object:
    """The request body as JSON; 415 without a JSON content type, 400 when unparsable."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    try:
        # The strict parser: NaN, 1e400 and escaped lone surrogates are bad input (400), not
        # a UnicodeEncodeError (500) or an idempotency key Redis cannot store (503) later on.
        data = loads(request.get_data(cache=True).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # nested too deep is bad input too
        data = None
    if data is None:
        raise ApiError(400, "invalid_input", "Body is not valid JSON")
    return data
