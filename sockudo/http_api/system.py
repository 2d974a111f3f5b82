"""Unsigned operational endpoints: ``/live``, ``/up``, ``/up/{app_id}``, ``/usage`` (Sockudo's), and
``/``, ``/ready`` (soketi's), answered as those servers answer them (docs/compatibility.md)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from flask.typing import ResponseReturnValue

from sockudo.health import DRAINING, ERROR, NOT_FOUND, OK, Readiness, build_readiness
from sockudo.http_api.signing import handler, services

bp = Blueprint("system", __name__)


def _health(status: str, code: int) -> Response:
    resp = Response(status, status=code, mimetype="text/plain")
    resp.headers["X-Health-Check"] = status
    return resp


@bp.get("/live")
def live() -> ResponseReturnValue:
    return _health(OK, 200)


@bp.get("/")
def root() -> ResponseReturnValue:
    """soketi's health answer: 200 ``OK``, always (load balancers' default probe path)."""
    return Response(OK, status=200, mimetype="text/plain")


@bp.get("/ready")
def ready() -> ResponseReturnValue:
    """soketi's readiness answer: 200 ``OK``, or its 500 while the server is shutting down."""
    if handler().draining:
        return jsonify({"error": "The server is closing. Choose another server. :)", "code": 500}), 500
    return Response(OK, status=200, mimetype="text/plain")


def readiness() -> Readiness:
    """The server's readiness checks (``sockudo.health``), built on first use if the composition
    root did not build them."""
    ext = current_app.extensions["sockudo"]
    if ext.get("readiness") is None:
        ext["readiness"] = build_readiness(services())
    return ext["readiness"]  # type: ignore[no-any-return]


def _readiness() -> tuple[str, int] | None:
    """A failed readiness check, or None when ready."""
    r = readiness()
    if handler().draining:
        return DRAINING, 503
    if not services().apps.all():
        r.failed("apps")
        return ERROR, 503
    verdict = r.evaluate(draining=False)
    return None if verdict.status == OK else (verdict.status, verdict.http_status)


@bp.get("/up")
def up() -> ResponseReturnValue:
    failed = _readiness()
    return _health(*failed) if failed else _health(OK, 200)


@bp.get("/up/<app_id>")
def up_app(app_id: str) -> ResponseReturnValue:
    app = services().apps.by_id(app_id)
    if app is None:
        return _health(NOT_FOUND, 404)
    if not app.enabled:
        readiness().failed("app_disabled")
        return _health(ERROR, 503)
    failed = _readiness()
    return _health(*failed) if failed else _health(OK, 200)


@bp.get("/usage")
def usage() -> ResponseReturnValue:
    total = used = free = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        total = info.get("MemTotal", 0)
        free = info.get("MemAvailable", info.get("MemFree", 0))
        used = total - free
    except OSError:
        pass
    percent = used * 100 / total if total else 0.0  # unrounded, as Sockudo and soketi answer it
    return jsonify({"memory": {"free": free, "used": used, "total": total, "percent": percent}})
