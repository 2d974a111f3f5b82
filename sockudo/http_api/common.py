"""What every REST route shares, the Flask routes' and the publish fast path's alike: the Pusher
signature check, CORS headers, the JSON error body, the request body limit and JSON body
parsing. No Flask here, so the fast path (``fastpath.py``) uses exactly these without Flask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sockudo.config import AppConfig, Config
from sockudo.config.cors import CorsConfig
from sockudo.core.auth import query_pairs, verify_body_md5, verify_rest_query
from sockudo.core.errors import ApiError
from sockudo.core.protocol import dumps, loads
from sockudo.services import Services


def cors_headers(cors: CorsConfig, origin: str | None) -> list[tuple[str, str]]:
    """The CORS headers of an answer to a request from ``origin`` (its ``Origin`` header), per
    ``[cors]``: ``*`` answers any origin; a list answers only its own (echoed, with ``Vary``);
    with ``credentials`` the origin is always echoed, never ``*`` (browsers refuse the pair)."""
    headers = [("Access-Control-Allow-Methods", ", ".join(cors.methods)),
               ("Access-Control-Allow-Headers", ", ".join(cors.allowed_headers))]
    if "*" in cors.origin and not cors.credentials:
        return [("Access-Control-Allow-Origin", "*"), *headers]
    headers.append(("Vary", "Origin"))
    if origin and ("*" in cors.origin or origin in cors.origin):
        headers.append(("Access-Control-Allow-Origin", origin))
        if cors.credentials:
            headers.append(("Access-Control-Allow-Credentials", "true"))
    return headers


_STATUS_LINES = {200: "200 OK", 400: "400 Bad Request", 401: "401 Unauthorized", 403: "403 Forbidden",
           404: "404 Not Found", 405: "405 Method Not Allowed", 409: "409 Conflict", 413: "413 Payload Too Large",
           415: "415 Unsupported Media Type", 422: "422 Unprocessable Entity", 429: "429 Too Many Requests",
           500: "500 Internal Server Error", 503: "503 Service Unavailable"}


def status_line(status: int) -> str:
    """The WSGI status line of an answer the API gives."""
    return _STATUS_LINES.get(status, f"{status} Error")


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


def authenticate_query(s: Services, app_id: str | None, method: str,
                       environ: dict[str, Any]) -> tuple[AppConfig, str | None]:
    """Check everything of a request's Pusher signature but its body: the app by ``auth_key``
    (404 unknown, 401 another app's), the timestamp and the signature over method, path and query.
    Returns the app and the signed ``body_md5``. Nothing here reads the body, so an unsigned
    request is refused before a byte of it is buffered."""
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
        body_md5 = verify_rest_query(secret=app.secret, method=method, path=path, query_string=query, now=s.clock())
    except ApiError:
        s.metrics.connection_error(app.id, "api_authentication_failed")
        raise
    return app, body_md5


def authenticate(s: Services, app_id: str | None, method: str, environ: dict[str, Any],
                 read_body: Callable[[], bytes]) -> tuple[AppConfig, bytes]:
    """Check a request's Pusher signature; returns the app and the body. The query is checked
    first (``authenticate_query``), and only then is the body read and checked against the
    signed ``body_md5`` (401); a disabled app gets 403."""
    app, body_md5 = authenticate_query(s, app_id, method, environ)
    body = read_body()
    try:
        verify_body_md5(body_md5, body)
    except ApiError:
        s.metrics.connection_error(app.id, "api_authentication_failed")
        raise
    if not app.enabled:
        raise ApiError(403, "app_disabled", "App is disabled")
    return app, body


def chunked_body_gate(s: Services) -> Callable[[dict[str, Any]], tuple[str, bytes] | None]:
    """The main listener's check before it reads a chunked body (``server/guard.py``): only the
    REST API under ``/apps/`` takes a body, and only a request whose query is signed gets one read;
    anything else is answered from its headers alone."""

    def gate(environ: dict[str, Any]) -> tuple[str, bytes] | None:
        if not environ.get("PATH_INFO", "").startswith("/apps/"):
            return "400 Bad Request", error_body(400, "invalid_input", "Only the REST API under /apps/ takes a body")
        try:
            authenticate_query(s, None, environ.get("REQUEST_METHOD", ""), environ)
        except ApiError as exc:
            return status_line(exc.status), error_body(exc.status, exc.slug, exc.message)
        return None

    return gate
