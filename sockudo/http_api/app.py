"""Flask app factory: one blueprint per API area, one JSON error handler."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from sockudo.core.errors import ApiError
from sockudo.handler import Handler
from sockudo.http_api import channels, push, system, users
from sockudo.http_api.common import body_limit, cors_headers, error_body
from sockudo.services import Services

logger = logging.getLogger(__name__)


def create_app(services: Services, handler: Handler) -> Flask:
    app = Flask("sockudo", static_folder=None)  # no static route: nothing here is a file server
    app.config["MAX_CONTENT_LENGTH"] = body_limit(services.config)
    app.extensions["sockudo"] = {"services": services, "handler": handler}

    app.register_blueprint(system.bp)
    app.register_blueprint(push.bp)
    # POST /apps/{id}/events and /batch_events are served before Flask (fastpath.py).
    for bp in (channels.bp, users.bp):
        app.register_blueprint(bp)
    app.before_request(_before)
    app.after_request(_after)
    # One path, one meaning: no redirect from ``/a//b`` to ``/a/b`` (its Location would come
    # from the client's Host header); the listener answers such paths 404 before any check.
    app.url_map.merge_slashes = False

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Response:
        return _error(exc.status, exc.slug, exc.message, exc.headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        slugs = {400: "invalid_input", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                 415: "unsupported_media_type"}
        if status == 404 and not request.path.startswith("/apps/"):
            return Response("404 NOT FOUND", status=404, mimetype="text/plain")
        message = exc.description if status < 500 else "Internal server error"
        return _error(status, slugs.get(status, "error"), message or "")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        logger.exception("unhandled error in REST API", extra={"path": request.path})
        return _error(500, "internal_error", "Internal server error")

    return app


def _error(status: int, slug: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status, slug, message), status=status, mimetype="application/json", headers=headers)


def _before() -> None:
    g.app = None


def _after(resp: Response) -> Response:
    services: Services = _services()
    for name, value in cors_headers(services.config.cors, request.headers.get("Origin")):
        resp.headers[name] = value
    app = getattr(g, "app", None)
    if app is not None:
        services.metrics.http_call(app.id, request.content_length or 0, resp.calculate_content_length() or 0)
    return resp


def _services() -> Any:
    from flask import current_app

    return current_app.extensions["sockudo"]["services"]
