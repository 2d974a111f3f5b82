"""The publish hot path: ``POST /apps/{id}/events`` and ``/batch_events`` as plain WSGI.

Publishing is the one REST call sent thousands of times a second, and Flask's request
context, routing and response machinery cost more than the publish itself (profiled: ~40 %
of a publish). These two routes do exactly what their Flask views do — the same signature
check (``signing.authenticate``), the same ``rest`` functions, the same error body, CORS
headers and metrics — without Flask. Every other route stays in Flask.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from sockudo import rest
from sockudo.core.errors import ApiError
from sockudo.core.protocol import dumps, loads
from sockudo.http_api.signing import authenticate
from sockudo.services import Services

logger = logging.getLogger(__name__)

_ROUTE = re.compile(r"\A/apps/([^/]+)/(events|batch_events)\Z")
_STATUS = {200: "200 OK", 400: "400 Bad Request", 401: "401 Unauthorized", 403: "403 Forbidden",
           404: "404 Not Found", 409: "409 Conflict", 413: "413 Payload Too Large",
           415: "415 Unsupported Media Type", 422: "422 Unprocessable Entity", 429: "429 Too Many Requests",
           500: "500 Internal Server Error", 503: "503 Service Unavailable"}
_CORS = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "Content-Type, X-Idempotency-Key"),
]


def match(environ: dict[str, Any]) -> tuple[str, str] | None:
    """``(app_id, route)`` when this request is a publish the fast path serves."""
    if environ.get("REQUEST_METHOD") != "POST" or not environ.get("CONTENT_LENGTH"):
        return None  # chunked or odd requests take the general (Flask) path
    found = _ROUTE.match(environ.get("PATH_INFO", ""))
    return (found.group(1), found.group(2)) if found else None


def serve(services: Services, environ: dict[str, Any], start_response: Callable[..., Any],
          app_id: str, route: str) -> Iterable[bytes]:
    app = None
    received = 0
    try:
        limit = int(services.config.request_limit_in_mb * 1024 * 1024)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise ApiError(400, "invalid_input", "Bad Content-Length") from None
        if length > limit:
            raise ApiError(413, "payload_too_large", "Request body is too large")
        body = environ["wsgi.input"].read(length) if length else b""
        received = len(body)
        app = authenticate(services, app_id, "POST", environ, body)
        content_type = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
        try:
            data = loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            data = None
        if data is None:
            raise ApiError(400, "invalid_input", "Body is not valid JSON")
        idempotency_key = environ.get("HTTP_X_IDEMPOTENCY_KEY")
        if route == "events":
            result = rest.trigger(services, app, data, idempotency_key)
        else:
            result = rest.trigger_batch(services, app, data, idempotency_key)
        status, payload, extra = 200, dumps(result).encode() + b"\n", []
    except ApiError as exc:
        status = exc.status
        payload = dumps({"error": exc.message, "code": exc.slug, "status": exc.status}).encode() + b"\n"
        extra = list(exc.headers.items())
    except Exception:  # the edge: a bug becomes a generic 500, never a dropped connection
        logger.exception("unhandled error in the publish fast path", extra={"app_id": app_id})
        status, extra = 500, []
        payload = dumps({"error": "Internal server error", "code": "internal_error", "status": 500}).encode() + b"\n"
    if app is not None:
        labels = (app.id, services.metrics.port)
        services.metrics.http_calls_received.labels(*labels).inc()
        services.metrics.http_received_bytes.labels(*labels).inc(received)
        services.metrics.http_transmitted_bytes.labels(*labels).inc(len(payload))
    start_response(_STATUS.get(status, f"{status} Error"), [
        ("Content-Type", "application/json"), ("Content-Length", str(len(payload))), *_CORS, *extra,
    ])
    return [payload]
