"""What every REST route shares, the Flask routes' and the publish fast path's alike: the Pusher
signature check, CORS headers, the JSON error body, the request body limit and JSON body
parsing. No Flask here, so the fast path (``fastpath.py``) uses exactly these without Flask.
"""

from __future__ import annotations

from typing import Any

from sockudo.config import AppConfig, Config
from sockudo.core.auth import query_pairs, verify_rest_request
from sockudo.core.errors import ApiError
from sockudo.core.protocol import dumps, loads
from sockudo.services import Services

CORS_HEADERS: tuple[tuple[str, str], ...] = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "Content-Type, X-Idempotency-Key"),
)


def body_limit(config: Config) -> int:
    """The largest request body accepted, in bytes (``request_limit_in_mb``); larger ones get 413."""
    return int(config.request_limit_in_mb * 1024 * 1024)


def json_bytes(value: object) -> bytes:
    """A JSON answer's body: compact, newline-terminated."""
    return dumps(value).encode() + b"\n"


def error_body(status: int, slug: str, message: str) -> bytes:
    """The body of every error answer: ``{"error": message, "code": slug, "status": status}``."""
    return json_bytes({"error": message, "code": slug, "status": status})


def is_json(content_type: str) -> bool:
    """``application/json`` or ``application/*+json``, parameters ignored (as werkzeug's ``is_json``)."""
    mimetype = content_type.split(";", 1)[0].strip().lower()
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def parse_json_body(content_type: str, body: bytes) -> object:
    """The request body as JSON; 415 without a JSON content type, 400 when it does not parse.

    The strict parser: NaN, 1e400 and escaped lone surrogates are bad input (400), not a
    UnicodeEncodeError (500) or an idempotency key Redis cannot store (503) later on."""
    if not is_json(content_type):
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    try:
        data = loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # nested too deep is bad input too
        data = None
    if data is None:
        raise ApiError(400, "invalid_input", "Body is not valid JSON")
    return data


def authenticate(s: Services, app_id: str | None, method: str, environ: dict[str, Any], body: bytes) -> AppConfig:
    """Check a request's Pusher signature; returns the app (404 unknown key, 401 bad signature or
    another app's key, 403 app disabled)."""
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
