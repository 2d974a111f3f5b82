"""Flask app factory: one blueprint per API area, one JSON error handler (spec §5)."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from sockudo.core.errors import ApiError
from sockudo.handler import Handler
from sockudo.http_api import channels, events, push, system, users
from sockudo.services import Services

logger = logging.getLogger(__name__)


def create_app(services: Services, handler: Handler) -> Flask:
    app = Flask("sockudo", static_folder=None)  # no static route: nothing here is a file server
    app.config["MAX_CONTENT_LENGTH"] = int(services.config.request_limit_in_mb * 1024 * 1024)
    app.extensions["sockudo"] = {"services": services, "handler": handler}

    app.register_blueprint(system.bp)
    app.register_blueprint(push.bp)
    for bp in (events.bp, channels.bp, users.bp):
        app.register_blueprint(bp)
    app.before_request(_before)
    app.after_request(_after)
    # One path, one meaning: no redirect from ``/a//b`` to ``/a/b`` (its Location would come
    # from the client's Host header); the listener answers such paths 404 before any check.
    app.url_map.merge_slashes = False

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Response:
        resp = jsonify({"error": exc.message, "code": exc.slug, "status": exc.status})
        resp.status_code = exc.status
        for key, value in exc.headers.items():
            resp.headers[key] = value
        return resp

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        slugs = {400: "invalid_input", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                 415: "unsupported_media_type"}
        if status == 404 and not request.path.startswith("/apps/"):
            return Response("404 NOT FOUND", status=404, mimetype="text/plain")
        message = exc.description if status < 500 else "Internal server error"
        resp = jsonify({"error": message, "code": slugs.get(status, "error"), "status": status})
        resp.status_code = status
        return resp

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        logger.exception("unhandled error in REST API", extra={"path": request.path})
        resp = jsonify({"error": "Internal server error", "code": "internal_error", "status": 500})
        resp.status_code = 500
        return resp

    return app


def _before() -> None:
    g.app = None


def _after(resp: Response) -> Response:
    resp.headers["Access-Control-Allow-Origin"] = "*"
    resp.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
    resp.headers["Access-Control-Allow-Headers"] = "Content-Type, X-Idempotency-Key"
    app = getattr(g, "app", None)
    if app is not None:
        services: Services = _services()
        labels = (app.id, services.metrics.port)
        services.metrics.http_calls_received.labels(*labels).inc()
        services.metrics.http_received_bytes.labels(*labels).inc(request.content_length or 0)
        services.metrics.http_transmitted_bytes.labels(*labels).inc(resp.calculate_content_length() or 0)
    return resp


def _services() -> Any:
    from flask import current_app

    return current_app.extensions["sockudo"]["services"]
