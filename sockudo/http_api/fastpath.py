"""The publish routes, ``/apps/{id}/events`` and ``/apps/{id}/batch_events``, as plain WSGI.

Publishing is the one REST call sent thousands of times a second, and Flask's request
context, routing and response machinery cost more than the publish itself (profiled: ~40 %
of a publish; docs/performance.md). So these two routes are served here, and only here, before
Flask, with the same signature check, CORS headers, error body and JSON parsing (``common``) and
HTTP counters (``Metrics.http_call``) as every Flask route.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from sockudo import rest
from sockudo.core.errors import ApiError
from sockudo.http_api.common import (
    authenticate,
    body_limit,
    cors_headers,
    error_body,
    json_bytes,
    parse_json_body,
    status_line,
)
from sockudo.services import Services

logger = logging.getLogger(__name__)

#: The routes served here, as Flask would spell them (for tests and route listings).
ROUTES = (("POST", "/apps/<app_id>/events"), ("POST", "/apps/<app_id>/batch_events"))

_ROUTE = re.compile(r"\A/apps/([^/]+)/(events|batch_events)\Z")
_ALLOW = ("Allow", "OPTIONS, POST")


def match(environ: dict[str, Any]) -> tuple[str, str] | None:
    """``(app_id, route)`` when the request's path is one of the publish routes (any method)."""
    found = _ROUTE.match(environ.get("PATH_INFO", ""))
    return (found.group(1), found.group(2)) if found else None


def serve(services: Services, environ: dict[str, Any], start_response: Callable[..., Any],
          app_id: str, route: str) -> Iterable[bytes]:
    method = environ.get("REQUEST_METHOD")
    if method != "POST":
        return _not_a_publish(method, start_response, cors_headers(services.config.cors, environ.get("HTTP_ORIGIN")))
    app = None
    received = 0
    try:
        app, body = authenticate(services, app_id, "POST", environ,
                                 lambda: _read_body(environ, body_limit(services.config)))
        received = len(body)
        data = parse_json_body(environ.get("CONTENT_TYPE", ""), body)
        idempotency_key = environ.get("HTTP_X_IDEMPOTENCY_KEY")
        if route == "events":
            result = rest.trigger(services, app, data, idempotency_key)
        else:
            result = rest.trigger_batch(services, app, data, idempotency_key)
        status, payload, extra = 200, json_bytes(result), []
    except ApiError as exc:
        status, payload, extra = exc.status, error_body(exc.status, exc.slug, exc.message), list(exc.headers.items())
    except Exception:  # the edge: a bug becomes a generic 500, never a dropped connection
        logger.exception("unhandled error in the publish fast path", extra={"app_id": app_id})
        status, payload, extra = 500, error_body(500, "internal_error", "Internal server error"), []
    if app is not None:
        services.metrics.http_call(app.id, received, len(payload))
    start_response(status_line(status), [
        ("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
        *cors_headers(services.config.cors, environ.get("HTTP_ORIGIN")), *extra,
    ])
    return [payload]


def _read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The request body, as werkzeug reads it: ``Content-Length`` bytes, else the server-terminated
    stream (chunked), else nothing; 413 beyond ``limit``."""
    stream = environ["wsgi.input"]
    declared = environ.get("CONTENT_LENGTH")
    if declared:
        try:
            length = int(declared)
        except ValueError:
            raise ApiError(400, "invalid_input", "Bad Content-Length") from None
        if length > limit:
            raise ApiError(413, "payload_too_large", "Request body is too large")
        body: bytes = stream.read(length) if length > 0 else b""
        return body
    if not environ.get("wsgi.input_terminated"):
        return b""
    body = stream.read(limit + 1)
    if len(body) > limit:
        raise ApiError(413, "payload_too_large", "Request body is too large")
    return body


def _not_a_publish(method: str | None, start_response: Callable[..., Any],
                   cors: list[tuple[str, str]]) -> Iterable[bytes]:
    """OPTIONS (a CORS preflight) gets the allowed methods; any other method 405, as Flask answers."""
    if method == "OPTIONS":
        start_response("200 OK", [("Content-Length", "0"), _ALLOW, *cors])
        return [b""]
    payload = error_body(405, "method_not_allowed", "The method is not allowed for the requested URL.")
    start_response(status_line(405), [("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
                                  _ALLOW, *cors])
    return [payload]
