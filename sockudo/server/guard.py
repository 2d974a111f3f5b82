"""The main listener, hardened (gevent side; docs/security.md):

- **slow-loris**: the request line and headers must arrive within ``http_header_timeout``
  seconds (a total deadline, so one byte per second does not keep a greenlet forever), a
  request body within ``http_body_timeout``; a TLS handshake within the header timeout. None of
  this applies once a WebSocket is established (liveness is the activity timer's job then);
- **per-IP limits** from ``[rate_limiter]`` (``sockudo/listener.py``): WebSocket upgrades and
  signed REST calls per window, open WebSockets at once; over a limit: HTTP 429;
- **TLS** from ``[ssl]``: the same listener speaks HTTPS and ``wss://``;
- **one path, one meaning**: a path with an empty (``//``) or dot (``.``, ``..``) segment is
  answered 404 before any limit or view (the per-IP REST limit keys on the canonical ``/apps/``);
- **unambiguous framing** (RFC 9112 §6): differing ``Content-Length`` values, or one beside
  ``Transfer-Encoding``, are 400; a transfer coding other than ``chunked`` is 501; a chunked body
  is read here, up to ``request_limit_in_mb`` (413 beyond), and handed on with its length;
- **bounded headers**: the header block is read up to ``MAX_HEADER_BYTES`` (431 beyond); an
  established WebSocket keeps its request's headers for its whole life;
- **quiet client errors**: a bad WebSocket handshake is a 400 (426 for an unknown version), more
  than 100 header lines a 400, and a client that leaves before the end of its body is logged at
  DEBUG, never as an error.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer
from geventwebsocket.handler import WebSocketHandler

from sockudo.config import Config
from sockudo.http_api.common import error_body
from sockudo.ratelimit.memory import ConnectionCounter, RateLimiter, client_ip
from sockudo.server import runtime

logger = logging.getLogger(__name__)

_BAD_REQUEST_RESPONSE = (b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: 11\r\n\r\nBad request")
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: 15\r\n\r\nRequest timeout")


#: The bytes of one request's header lines (the request line has gevent's own 8 KiB limit). Python's
#: parser alone allows 100 lines of 64 KiB, and a WebSocket keeps its headers while it is open.
MAX_HEADER_BYTES = 64 * 1024


class HeaderTimeout(TimeoutError):
    """The request line and headers did not arrive in time (an ``OSError``: gevent's request
    loop treats it like a dropped connection)."""


class BodyTimeout(BaseException):
    """The body did not arrive in time. A ``BaseException`` so that Flask's error handler
    cannot turn it into a 500; the handler answers 408 instead."""


class ClientLeft(BaseException):
    """The client closed the connection before the end of its body: an ordinary event (logged
    at DEBUG), not an error of ours. A ``BaseException`` for the same reason as ``BodyTimeout``."""


class FramingError(ValueError):
    """Headers that frame the body ambiguously (a ``ValueError``: gevent answers before reading
    anything further; ``GuardedHandler._handle_client_error`` picks the status)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _HeaderBudget:
    """The request's reader while its header lines are parsed: at most ``budget`` bytes, then 431."""

    __slots__ = ("fp", "left")

    def __init__(self, fp: Any, budget: int) -> None:
        self.fp = fp
        self.left = budget

    def readline(self, limit: int = -1) -> bytes:
        cap = self.left + 1 if limit is None or limit < 0 else min(limit, self.left + 1)
        line: bytes = self.fp.readline(cap)
        self.left -= len(line)
        if self.left < 0:
            raise FramingError("431", "request header fields too large")
        return line


def check_framing(headers: Any) -> None:
    """Refuse a request whose body length could be read two ways (RFC 9112 §6.1, §6.3): two
    different ``Content-Length`` values, a ``Content-Length`` beside a ``Transfer-Encoding``, or a
    transfer coding other than ``chunked``. Identical repeated lengths collapse into one."""
    lengths = [value.strip() for header in headers.get_all("Content-Length") or [] for value in header.split(",")]
    codings = [value.strip().lower() for header in headers.get_all("Transfer-Encoding") or []
               for value in header.split(",") if value.strip()]
    if lengths:
        if codings:
            raise FramingError("400", "Content-Length and Transfer-Encoding together")
        if len(set(lengths)) > 1:
            raise FramingError("400", "conflicting Content-Length headers")
        if not lengths[0].isdigit() or not lengths[0].isascii():
            raise FramingError("400", "invalid Content-Length")
        if len(headers.get_all("Content-Length")) > 1 or "," in headers["Content-Length"]:
            del headers["Content-Length"]
            headers["Content-Length"] = lengths[0]
    if codings and codings != ["chunked"]:
        raise FramingError("501", "only the chunked transfer coding is supported")


def canonical_path(path: str) -> bool:
    """True for a path with one spelling: absolute, without empty (``//``) or dot segments."""
    if not path.startswith("/") or "//" in path:
        return False
    return not any(segment in (".", "..") for segment in path.split("/"))


Refusal = tuple[str, list[tuple[str, str]], str]  # status, extra headers, message


def websocket_handshake_problem(environ: dict[str, Any], http_version: str) -> Refusal | None:
    """Why an upgrade request cannot be accepted (RFC 6455 §4.2.1, §4.4), as ``(status, extra
    headers, message)``; None when it can."""
    if http_version != "HTTP/1.1":
        return "400 Bad Request", [], "WebSocket upgrades need HTTP/1.1"
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        return "426 Upgrade Required", [("Sec-WebSocket-Version", "13")], "Unsupported WebSocket version"
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        return "400 Bad Request", [], "Sec-WebSocket-Key must be 16 bytes in base64"
    return None


class Guard:
    """The listener's per-IP state, shared by every request of this process."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 on_limited: Callable[[str, str], None] | None = None, redis_client: Any = None) -> None:
        rl = config.rate_limiter
        self.enabled = rl.enabled
        self.header_timeout = config.http_header_timeout
        self.body_timeout = config.http_body_timeout
        self.body_limit = int(config.request_limit_in_mb * 1024 * 1024)
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
        #: Checked before a chunked body is read: ``(status line, JSON body)`` to refuse the request
        #: without reading it (an unsigned REST call), None to read it. Set by the composition root.
        self.body_gate: Callable[[dict[str, Any]], tuple[str, bytes] | None] = lambda _environ: None


class _BodyReader:
    """The request body's reader: every read must finish by ``deadline`` (monotonic; ``inf``:
    no deadline), and the end of the stream before the end of the body is ``ClientLeft``. Reads
    yield to the other greenlets now and then (``runtime.fair``)."""

    __slots__ = ("rfile", "deadline", "whole", "_read", "_readline")

    def __init__(self, rfile: Any, deadline: float) -> None:
        self.rfile = rfile
        self.deadline = deadline
        self.whole = False  # one timer covers the whole body (``whole_body``)
        self._read = runtime.fair(rfile.read)
        self._readline = runtime.fair(rfile.readline)

    def _call(self, fn: Callable[..., bytes], *args: Any) -> bytes:
        if self.whole or self.deadline == math.inf:
            return fn(*args)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise BodyTimeout()
        with gevent.Timeout(remaining, BodyTimeout()):
            return fn(*args)

    @contextmanager
    def whole_body(self) -> Iterator[None]:
        """One deadline timer for a whole body read: gevent's chunked reader reads a byte at a
        time, and a timer armed per read cost ~4 us a byte."""
        if self.deadline == math.inf:
            yield
            return
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise BodyTimeout()
        self.whole = True
        try:
            with gevent.Timeout(remaining, BodyTimeout()):
                yield
        finally:
            self.whole = False

    def read(self, *args: Any) -> bytes:
        data = self._call(self._read, *args)
        if args and args[0] is not None and args[0] > 0 and len(data) < args[0]:
            raise ClientLeft()  # a buffered read returns less than asked only at the end of the stream
        return data

    def readline(self, *args: Any) -> bytes:
        line = self._call(self._readline, *args)
        limit = args[0] if args and args[0] is not None and args[0] > 0 else None
        if not line.endswith(b"\n") and (limit is None or len(line) < limit):
            raise ClientLeft()
        return line


def _is_upgrade(environ: dict[str, Any]) -> bool:
    return str(environ.get("HTTP_UPGRADE", "")).lower() == "websocket"


class GuardedHandler(WebSocketHandler):
    """gevent-websocket's handler with the timeouts and per-IP limits applied."""

    _header_timer: Any = None
    _fair_slice: runtime.FairSlice | None = None

    @property
    def guard(self) -> Guard:
        return self.server.guard  # type: ignore[no-any-return]

    # -- slow-loris: the header deadline --

    def read_requestline(self) -> str:
        # Let the others run between two requests of one connection: pipelined requests are
        # already there to read, so answering them never switched greenlets (20,000 of them held
        # the process for seconds).
        if self._fair_slice is None:
            self._fair_slice = runtime.FairSlice()
        self._fair_slice.check()
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
        if isinstance(ex, FramingError):
            logger.debug("request refused: %s", ex.message, extra={"client": self.client_address})
            reason = {"400": "Bad Request", "431": "Request Header Fields Too Large",
                      "501": "Not Implemented"}[ex.status]
            body = ex.message.encode()
            return ex.status, (f"HTTP/1.1 {ex.status} {reason}\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        if isinstance(ex, (ValueError, OSError, http.client.HTTPException)):
            # A malformed request line, header or chunk, or more than 100 header lines: the
            # client's error, answered 400 and logged at DEBUG (gevent logs it at ERROR with a
            # traceback, so any client could fill the error log).
            logger.debug("malformed request refused: %r", ex, extra={"client": self.client_address})
            return "400", _BAD_REQUEST_RESPONSE
        return super()._handle_client_error(ex)

    # -- framing --

    def MessageClass(self, fp: Any, *args: Any) -> Any:  # noqa: N802 (gevent's name)
        headers = super().MessageClass(_HeaderBudget(fp, MAX_HEADER_BYTES), *args)
        if not headers.status:  # a line too long is gevent's 400 already
            check_framing(headers)
        return headers

    # -- slow-loris: the body deadline --

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        if getattr(self, "wsgi_input", None) is not None:
            # The body's reader only: an established WebSocket reads frames from the handler's
            # own rfile, so neither the deadline nor the end-of-body check applies to it.
            timeout = self.guard.body_timeout
            deadline = time.monotonic() + timeout if timeout else math.inf
            self.wsgi_input.rfile = _BodyReader(self.wsgi_input.rfile, deadline)
        return environ

    def handle_error(self, t: Any, v: Any, tb: Any) -> None:
        if isinstance(v, ClientLeft):
            logger.debug("client left before the end of its request body",
                         extra={"client": self.client_address, "path": self.environ.get("PATH_INFO", "")})
            self.close_connection = True
            return
        if isinstance(v, BodyTimeout):
            logger.debug("request body too slow; connection dropped", extra={"client": self.client_address})
            self.close_connection = True
            if not self.response_length and not self.headers_sent:
                try:
                    self.start_response("408 Request Timeout",
                                        [("Content-Type", "text/plain"), ("Connection", "close")])
                    self.write(b"Request timeout")
                except OSError:
                    pass
            return
        super().handle_error(t, v, tb)

    # -- per-IP limits --

    def run_application(self) -> None:
        guard = self.guard
        environ = self.environ
        path = environ.get("PATH_INFO", "")
        if not canonical_path(path):
            # Before every check: a second spelling of a route must not skip the limits below
            # (nor get Werkzeug's redirect, whose Location is built from the client's Host).
            return self._respond("404 Not Found", b'{"error":"Not found","code":"not_found","status":404}\n')
        if not guard.enabled:
            return self._run()
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
                return self._run()
            finally:
                guard.connections.release(ip)
        if path.startswith(("/apps/", "/users/")):
            ip = client_ip(remote, environ.get("HTTP_X_FORWARDED_FOR"), guard.api_hops)
            allowed, remaining, reset = guard.api.hit(ip)
            if not allowed:
                guard.on_limited("ip_api", "http")
                return self._refuse(reset, "Too many requests from this address", api=True,
                                    limit=guard.api.max_requests)
        return self._run()

    def _run(self) -> None:
        """The application, with a chunked body first read whole (bounded) and handed on with
        its length: what follows sees one kind of body, and the limit holds for both kinds."""
        environ = self.environ
        if getattr(self.wsgi_input, "chunked_input", False):
            refusal = self.guard.body_gate(environ)
            if refusal is not None:  # refused on its query alone: not a byte of the body is read
                return self._respond(*refusal)
            limit = self.guard.body_limit
            reader = self.wsgi_input.rfile
            with reader.whole_body() if isinstance(reader, _BodyReader) else nullcontext():
                body = environ["wsgi.input"].read(limit + 1)
            if len(body) > limit:
                return self._respond("413 Payload Too Large",
                                     error_body(413, "payload_too_large", "Request body is too large"))
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            environ.pop("HTTP_TRANSFER_ENCODING", None)
        super().run_application()

    def upgrade_websocket(self) -> Any:
        """gevent-websocket answers a bad handshake with a text body it cannot write (a 500 and
        a traceback): check the handshake here and answer it ourselves."""
        environ = self.environ
        if (environ.get("REQUEST_METHOD") == "GET" and _is_upgrade(environ)
                and "upgrade" in environ.get("HTTP_CONNECTION", "").lower()):
            problem = websocket_handshake_problem(environ, self.request_version)
            if problem is not None:
                status, headers, message = problem
                logger.debug("WebSocket handshake refused: %s", message, extra={"client": self.client_address})
                self.close_connection = True
                self.start_response(status, [*headers, ("Content-Type", "text/plain"), ("Connection", "close")])
                return [message.encode()]
        return super().upgrade_websocket()

    def _respond(self, status: str, body: bytes, content_type: str = "application/json") -> None:
        """Answer without running the application (and without upgrading); closes the connection."""

        def answer(_environ: dict[str, Any], start_response: Any) -> list[bytes]:
            start_response(status, [("Content-Type", content_type), ("Connection", "close")])
            return [body]

        self.close_connection = True
        self.application = answer
        WSGIHandler.run_application(self)

    def _refuse(self, reset: float, message: str, api: bool = False, limit: int = 0) -> None:
        """429 without running the application (and without upgrading)."""
        retry = str(max(1, int(reset + 0.999)))

        def too_many(_environ: dict[str, Any], start_response: Any) -> list[bytes]:
            headers = [("Retry-After", retry), ("Connection", "close")]
            if api:  # Sockudo's headers on the REST API
                body = error_body(429, "rate_limited", message)
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

    #: geventwebsocket's handler asks this before upgrading: True refuses the upgrade (plain HTTP).
    pre_start_hook: Callable[[Any], bool] | None = None

    def __init__(self, listener: Any, application: Any, guard: Guard, **kwargs: Any) -> None:
        self.guard = guard
        self.tls_context: ssl.SSLContext | None = kwargs.get("ssl_context")
        kwargs.setdefault("handler_class", GuardedHandler)
        super().__init__(listener, application, **kwargs)

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> Any:
        timeout = self.guard.header_timeout or None
        client_socket.settimeout(timeout)
        try:
            assert self.tls_context is not None  # gevent calls this only on a TLS listener
            tls_socket = self.tls_context.wrap_socket(client_socket, server_side=True)
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


def main_server(config: Config, listener: socket.socket, application: Any, guard: Guard,
                **kwargs: Any) -> GuardedServer:
    """The main listener's server: plain, or TLS when ``[ssl] enabled``."""
    if config.ssl.enabled:
        kwargs["ssl_context"] = ssl_context(config)
    return GuardedServer(listener, application, guard, **kwargs)


def is_tls(sock: Any) -> bool:
    """TLS sockets must not be half-closed: gevent's ``SSLSocket.shutdown`` drops the TLS layer,
    and the reader would then parse the peer's encrypted bytes as WebSocket frames."""
    return isinstance(sock, ssl.SSLSocket) or type(sock).__name__ == "SSLSocket"
