"""The operator console's HTTP side (docs/console.md): its own small Flask app, mounted on the
metrics listener under ``[console] path`` (``/console``).

Pages and assets are files shipped in ``sockudo/console/static/`` (no build step, no CDN).
Everything under ``<path>/api/`` needs a signed-in session (cookie); every POST also needs the
session's CSRF token in ``X-Console-CSRF`` and, when the browser sends one, a same-origin
``Origin``. The event log is a Server-Sent Events stream of the console's event tap.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, g, jsonify, redirect, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from sockudo.console.service import Console, ConsoleError
from sockudo.console.sessions import Session, Sessions, Throttled
from sockudo.console.tap import KINDS, TooManyWatchers, Watcher

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "console" / "static"
COOKIE = "sockudo_console"
CSRF_HEADER = "X-Console-CSRF"
STREAM_WAIT_SECONDS = 1.0  # the stream sends stats (and notices a closed page) at least this often
STREAM_BATCH = 500
# Between two writes the stream waits this long, so a busy app costs each open page at most ten
# writes a second (events arriving meanwhile go out together) instead of one per event.
STREAM_MIN_INTERVAL = 0.1

SECURITY_HEADERS = {
    # Only our own files; no inline script, no framing (clickjacking), no form posts elsewhere.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make a browser send "Origin: null"
    "Cache-Control": "no-store",
}


def create_console_app(console: Console, sessions: Sessions, path: str = "/console") -> Flask:
    path = "/" + path.strip("/")
    app = Flask("sockudo.console", static_folder=str(STATIC_DIR), static_url_path=f"{path}/static")
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.extensions["console"] = {"console": console, "sessions": sessions, "path": path}

    @app.before_request
    def load_session() -> ResponseReturnValue | None:
        g.session = sessions.get(request.cookies.get(COOKIE))
        return None

    @app.after_request
    def headers(resp: Response) -> Response:
        for key, value in SECURITY_HEADERS.items():
            resp.headers.setdefault(key, value)
        return resp

    @app.errorhandler(ConsoleError)
    def console_error(exc: ConsoleError) -> Response:
        return _error(exc.status, exc.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _error(exc.code or 500, exc.description or "error")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        logger.exception("unhandled error in the console", extra={"path": request.path})
        return _error(500, "Internal server error")

    # -- pages ----------------------------------------------------------------------

    @app.get(path)
    @app.get(path + "/")
    def index() -> ResponseReturnValue:
        if g.session is None:
            return _page("login.html", path)
        return _page("console.html", path)

    @app.post(path + "/login")
    def login() -> ResponseReturnValue:
        if not _same_origin():
            return _error(403, "cross-site sign-in refused")
        try:
            session = sessions.sign_in(request.form.get("token"))
        except Throttled:
            return _page("login.html", path, status=429, error="Too many wrong tokens; try again in a minute.")
        if session is None:
            logger.warning("console sign-in refused", extra={"remote_addr": request.remote_addr})
            return _page("login.html", path, status=401, error="Wrong token.")
        resp = redirect(path + "/", code=303)
        resp.set_cookie(COOKIE, session.id, httponly=True, samesite="Strict", path=path,
                        secure=request.scheme == "https", max_age=int(sessions.ttl))
        return resp

    @app.post(path + "/logout")
    def logout() -> ResponseReturnValue:
        _require_action()
        sessions.sign_out(request.cookies.get(COOKIE))
        resp = jsonify({"signed_out": True})
        resp.delete_cookie(COOKIE, path=path)
        return resp

    # -- reads ----------------------------------------------------------------------

    @app.get(path + "/api/session")
    def session_info() -> ResponseReturnValue:
        session = _require_session()
        return jsonify({"csrf": session.csrf, "apps": console.apps(), "node": console.tap.node_id,
                        "kinds": list(KINDS)})

    @app.get(path + "/api/apps/<app_id>/overview")
    def overview(app_id: str) -> ResponseReturnValue:
        _require_session()
        return jsonify(console.overview(app_id))

    @app.get(path + "/api/apps/<app_id>/channels")
    def channels(app_id: str) -> ResponseReturnValue:
        _require_session()
        return jsonify(console.channels(app_id))

    @app.get(path + "/api/apps/<app_id>/channels/<channel>/members")
    def members(app_id: str, channel: str) -> ResponseReturnValue:
        _require_session()
        return jsonify(console.members(app_id, channel))

    @app.get(path + "/api/apps/<app_id>/dead-letters")
    def dead_letters(app_id: str) -> ResponseReturnValue:
        _require_session()
        return jsonify(console.dead_letters(app_id))

    @app.get(path + "/api/apps/<app_id>/push/<publish_id>")
    def push_status(app_id: str, publish_id: str) -> ResponseReturnValue:
        _require_session()
        return jsonify(console.push_status(app_id, publish_id))

    @app.get(path + "/api/apps/<app_id>/events")
    def events(app_id: str) -> ResponseReturnValue:
        _require_session()
        console.app(app_id)
        try:
            watcher = console.tap.watch(app_id)
        except TooManyWatchers as exc:
            return _error(503, str(exc))
        console.page_opened()
        resp = Response(_stream(console, watcher, app_id), mimetype="text/event-stream")
        resp.headers["X-Accel-Buffering"] = "no"  # a proxy in front must not hold the stream
        return resp

    # -- actions ----------------------------------------------------------------------

    @app.post(path + "/api/apps/<app_id>/publish")
    def publish(app_id: str) -> ResponseReturnValue:
        _require_action()
        body = request.get_json(silent=True)
        return jsonify(console.publish(app_id, body))

    @app.post(path + "/api/apps/<app_id>/dead-letters/<letter_id>/replay")
    def replay(app_id: str, letter_id: str) -> ResponseReturnValue:
        _require_action()
        return jsonify(console.replay_dead_letter(app_id, letter_id))

    return app


def _error(status: int, message: str) -> Response:
    resp = jsonify({"error": message, "status": status})
    resp.status_code = status
    return resp


def _page(name: str, path: str, status: int = 200, error: str = "") -> Response:
    html = (STATIC_DIR / name).read_text(encoding="utf-8")
    html = html.replace("{{path}}", path).replace("{{error}}", error)
    return Response(html, status=status, mimetype="text/html")


def _require_session() -> Session:
    session: Session | None = g.session
    if session is None:
        raise ConsoleError(401, "sign in to the console first")
    return session


def _same_origin() -> bool:
    """A browser names the page a request comes from; refuse any other site. (A request
    without ``Origin`` is not from a cross-site page: browsers send it on every cross-site POST.)"""
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.netloc}" == f"{request.scheme}://{request.host}"


def _require_action() -> Session:
    """Every state-changing request: a session, the same site, and the session's CSRF token."""
    session = _require_session()
    sessions: Sessions = _ext()["sessions"]
    if not _same_origin() or not sessions.csrf_ok(session, request.headers.get(CSRF_HEADER)):
        raise ConsoleError(403, "missing or wrong CSRF token")
    return session


def _ext() -> dict[str, Any]:
    from flask import current_app

    ext: dict[str, Any] = current_app.extensions["console"]
    return ext


def _stream(console: Console, watcher: Watcher, app_id: str) -> Iterator[str]:
    """The event log: ``events`` messages (a JSON array each, at most ten a second) as they
    happen and a ``stats`` message about once a second (latest sample, events this page lost)."""
    tap = console.tap
    try:
        yield "retry: 2000\n\n"
        last_stats = 0.0
        while not watcher.closed:
            batch = watcher.take(STREAM_BATCH, timeout=STREAM_WAIT_SECONDS)
            out = []
            if batch:
                out.append("event: events\ndata: " + json.dumps(batch, separators=(",", ":"), default=str) + "\n\n")
            now = time.monotonic()
            if now - last_stats >= STREAM_WAIT_SECONDS:
                last_stats = now
                stats = {"sample": console.stats.latest(app_id), "dropped": watcher.dropped}
                out.append("event: stats\ndata: " + json.dumps(stats, separators=(",", ":")) + "\n\n")
            if out:
                yield "".join(out)
                console.runtime.sleep(STREAM_MIN_INTERVAL)
    finally:
        tap.unwatch(watcher)
