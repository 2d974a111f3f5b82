"""The metrics listeners' WSGI app (the server's, served by gevent, and a worker's, served by a
thread here): an app per path, 404 for every other path."""

from __future__ import annotations

import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

NOT_FOUND = b"404 NOT FOUND"


class MetricsListener:
    """``routes`` maps a path to a WSGI app; every other path answers 404, so a scraper pointed
    at the wrong path sees an error instead of metrics. ``route`` adds a path; a path ending in
    ``/`` also serves everything under it."""

    def __init__(self, routes: dict[str, Any] | None = None) -> None:
        self.routes: dict[str, Any] = dict(routes or {})

    def route(self, path: str, app: Any) -> None:
        self.routes[path] = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO") or "/"
        app = self.routes.get(path)
        if app is None:
            app = next((a for p, a in self.routes.items() if p.endswith("/") and path.startswith(p)), None)
        if app is None:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                             ("Content-Length", str(len(NOT_FOUND)))])
            return [NOT_FOUND]
        return app(environ, start_response)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        return None


def serve_in_thread(app: Any, host: str, port: int) -> WSGIServer:
    """Serve ``app`` on ``host:port`` from a daemon thread (for processes without gevent)."""
    server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-listener", daemon=True).start()
    return server
