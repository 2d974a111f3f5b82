"""The main listener, hardened (gevent side; docs/security.md):

- **slow-loris**: the request line and headers must arrive within ``http_header_timeout``
  seconds (a total deadline, so one byte per second does not keep a greenlet forever), a
  request body within ``http_body_timeout``; a TLS handshake within the header timeout. None of
  this applies once a WebSocket is established (liveness is the activity timer's job then);
- **per-IP limits** from ``[rate_limiter]`` (``sockudo/listener.py``): WebSocket upgrades and
  signed REST calls per window, open WebSockets at once; over a limit: HTTP 429;
- **TLS** from ``[ssl]``: the same listener speaks HTTPS and ``wss://``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer
from geventwebsocket.handler import WebSocketHandler

from sockudo.config import Config
from sockudo.ratelimit.memory import ConnectionCounter, RateLimiter, client_ip

logger = logging.getLogger(__name__)

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: 15\r\n\r\nRequest timeout")


class HeaderTimeout(TimeoutError):
    """The request line and headers did not arrive in time (an ``OSError``: gevent's request
    loop treats it like a dropped connection)."""


class BodyTimeout(BaseException):
    """The body did not arrive in time. A ``BaseException`` so that Flask's error handler
    cannot turn it into a 500; the handler answers 408 instead."""


class Guard:
    """The listener's per-IP state, shared by every request of this process."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 on_limited: Callable[[str, str], None] | None = None, redis_client: Any = None) -> None:
        rl = config.rate_limiter
        self.enabled = rl.enabled
        self.header_timeout = config.http_header_timeout
        self.body_timeout = config.http_body_timeout
        self.api: Any
        self.upgrades: Any
        if rl.enabled and rl.driver == "redis" and redis_client is not None:
            # Windows shared by every node (sockudo/rate_limit_redis.py); open connections per
            # address stay per process (they end with the process that holds them).
            from sockudo.ratelimit.redis import RedisRateLimiter

            prefix = config.redis_prefix
            self.api = RedisRateLimiter(redis_client, prefix, "api", rl.api_max_requests, rl.api_window_seconds)
            self.upgrades = RedisRateLimiter(redis_client, prefix, "websocket", rl.websocket_max_requests,
                                             rl.websocket_window_seconds)
        else:
            self.api = RateLimiter(rl.api_max_requests, rl.api_window_seconds, clock)
            self.upgrades = RateLimiter(rl.websocket_max_requests, rl.websocket_window_seconds, clock)
        self.api_hops = rl.api_trust_hops
        self.ws_hops = rl.websocket_trust_hops
        self.connections = ConnectionCounter(rl.max_connections_per_ip)
        self.on_limited = on_limited or (lambda _kind, _context: None)


class _DeadlineReader:
    """The request body's reader: every read must finish by ``deadline`` (monotonic)."""

    __slots__ = ("rfile", "deadline")

    def __init__(self, rfile: Any, deadline: float) -> None:
        self.rfile = rfile
        self.deadline = deadline

    def _call(self, fn: Callable[..., bytes], *args: Any) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise BodyTimeout()
        with gevent.Timeout(remaining, BodyTimeout()):
            return fn(*args)

    def read(self, *args: Any) -> bytes:
        return self._call(self.rfile.read, *args)

    def readline(self, *args: Any) -> bytes:
        return self._call(self.rfile.readline, *args)


def _is_upgrade(environ: dict[str, Any]) -> bool:
    return environ.get("HTTP_UPGRADE", "").lower() == "websocket"


class GuardedHandler(WebSocketHandler):
    """gevent-websocket's handler with the timeouts and per-IP limits applied."""

    _header_timer: Any = None

    @property
    def guard(self) -> Guard:
        return self.server.guard  # type: ignore[no-any-return]

    # -- slow-loris: the header deadline --

    def read_requestline(self) -> str:
        timeout = self.guard.header_timeout
        if timeout:
            self._header_timer = gevent.Timeout.start_new(timeout, HeaderTimeout("request header timeout"))
        line: str = super().read_requestline()
        if not line:
            self._cancel_header_timer()
        return line

    def read_request(self, raw_requestline: str) -> bool:
        try:
            return bool(super().read_request(raw_requestline))
        finally:
            self._cancel_header_timer()

    def handle_one_request(self) -> Any:
        try:
            return super().handle_one_request()
        finally:
            self._cancel_header_timer()  # a request line over the limit (414) never reaches read_request

    def _cancel_header_timer(self) -> None:
        timer, self._header_timer = self._header_timer, None
        if timer is not None:
            timer.close()

    def _handle_client_error(self, ex: BaseException) -> Any:
        if isinstance(ex, HeaderTimeout):
            logger.debug("request headers too slow; connection dropped", extra={"client": self.client_address})
            return "408", _TIMEOUT_RESPONSE
        return super()._handle_client_error(ex)

    # -- slow-loris: the body deadline --

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        timeout = self.guard.body_timeout
        if timeout and not _is_upgrade(environ) and getattr(self, "wsgi_input", None) is not None:
            self.wsgi_input.rfile = _DeadlineReader(self.wsgi_input.rfile, time.monotonic() + timeout)
        return environ

    def handle_error(self, t: Any, v: Any, tb: Any) -> None:
        if isinstance(v, BodyTimeout):
            logger.debug("request body too slow; connection dropped", extra={"client": self.client_address})
            self.close_connection = True
            if not self.response_length and not self.headers_sent:
                try:
                    self.start_response("408 Request Timeout", [("Content-Type", "text/plain"), ("Connection", "close")])
                    self.write(b"Request timeout")
                except OSError:
                    pass
            return
        super().handle_error(t, v, tb)

    # -- per-IP limits --

    def run_application(self) -> None:
        guard = self.guard
        environ = self.environ
        if not guard.enabled:
            return super().run_application()
        path = environ.get("PATH_INFO", "")
        remote = environ.get("REMOTE_ADDR", "")
        if path.startswith("/app/") and _is_upgrade(environ):
            ip = client_ip(remote, environ.get("HTTP_X_FORWARDED_FOR"), guard.ws_hops)
            allowed, _, reset = guard.upgrades.hit(ip)
            if not allowed:
                guard.on_limited("ip_websocket_upgrades", "websocket")
                return self._refuse(reset, "Too many connection attempts from this address")
            if not guard.connections.acquire(ip):
                guard.on_limited("ip_connections", "websocket")
                return self._refuse(1, "Too many open connections from this address")
            try:
                return super().run_application()
            finally:
                guard.connections.release(ip)
        if path.startswith(("/apps/", "/users/")):
            ip = client_ip(remote, environ.get("HTTP_X_FORWARDED_FOR"), guard.api_hops)
            allowed, remaining, reset = guard.api.hit(ip)
            if not allowed:
                guard.on_limited("ip_api", "http")
                return self._refuse(reset, "Too many requests from this address", api=True,
                                    limit=guard.api.max_requests)
        return super().run_application()

    def _refuse(self, reset: float, message: str, api: bool = False, limit: int = 0) -> None:
        """429 without running the application (and without upgrading)."""
        retry = str(max(1, int(reset + 0.999)))

        def too_many(_environ: dict[str, Any], start_response: Any) -> list[bytes]:
            headers = [("Retry-After", retry), ("Connection", "close")]
            if api:  # Sockudo's headers on the REST API (spec §5.1)
                body = ('{"error":"%s","code":"rate_limited","status":429}' % message).encode()
                headers += [("Content-Type", "application/json"), ("X-RateLimit-Limit", str(limit)),
                            ("X-RateLimit-Remaining", "0"), ("X-RateLimit-Reset", str(int(time.time()) + int(retry)))]
            else:
                body = message.encode()
                headers.append(("Content-Type", "text/plain"))
            start_response("429 Too Many Requests", headers)
            return [body]

        self.close_connection = True
        self.application = too_many
        WSGIHandler.run_application(self)


class GuardedServer(WSGIServer):
    """The WSGI server of the main listener; with ``[ssl]`` enabled it terminates TLS, and a
    client that does not finish the TLS handshake within the header timeout is dropped."""

    def __init__(self, listener: Any, application: Any, guard: Guard, **kwargs: Any) -> None:
        self.guard = guard
        kwargs.setdefault("handler_class", GuardedHandler)
        super().__init__(listener, application, **kwargs)

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> Any:
        timeout = self.guard.header_timeout or None
        client_socket.settimeout(timeout)
        try:
            tls_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except (OSError, ValueError) as exc:  # handshake failed, timed out, or the peer left
            logger.debug("TLS handshake failed: %s", exc, extra={"client": address})
            client_socket.close()
            return None
        tls_socket.settimeout(None)  # from here the header deadline (then the WebSocket) governs
        try:
            return self.handle(tls_socket, address)
        finally:
            tls_socket.close()


def ssl_context(config: Config) -> ssl.SSLContext:
    """A server-side TLS context from ``[ssl]`` (TLS 1.2+). Raises ``OSError`` (``ssl.SSLError``)
    when the files cannot be loaded, so start-up fails with that message."""
    from gevent import ssl as gssl

    context = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = gssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.ssl.cert_path, config.ssl.key_path, password=config.ssl.passphrase or None)
    return context


def main_server(config: Config, listener: socket.socket, application: Any, guard: Guard, **kwargs: Any) -> GuardedServer:
    """The main listener's server: plain, or TLS when ``[ssl] enabled``."""
    if config.ssl.enabled:
        kwargs["ssl_context"] = ssl_context(config)
    return GuardedServer(listener, application, guard, **kwargs)


def is_tls(sock: Any) -> bool:
    """TLS sockets must not be half-closed: gevent's ``SSLSocket.shutdown`` drops the TLS layer,
    and the reader would then parse the peer's encrypted bytes as WebSocket frames."""
    return isinstance(sock, ssl.SSLSocket) or type(sock).__name__ == "SSLSocket"
