"""The WebSocket connection loop: upgrade checks, the reader, and the hand-off to the handler.

This is one of the three edges where exceptions are caught: whatever goes wrong while
handling a frame becomes a ``pusher:error`` (or a close code), never a dead process.
"""

from __future__ import annotations

import logging
import socket
from typing import Any
from urllib.parse import parse_qs

from sockudo.core import protocol
from sockudo.core.connection import Connection
from sockudo.core.errors import PusherCode, PusherError
from sockudo.core.wsframe import (
    CLOSE_INVALID_PAYLOAD,
    OP_BINARY,
    OP_CLOSE,
    OP_TEXT,
    FrameProtocolError,
    FrameReader,
    MessageTooBig,
    encode_close,
    encode_text,
    reply_close_code,
)
from sockudo.handler import Handler
from sockudo.server import runtime
from sockudo.server.guard import is_tls
from sockudo.server.transport import WsTransport

logger = logging.getLogger(__name__)

APP_PATH_PREFIX = "/app/"


def protocol_version(environ: dict[str, Any]) -> int | None:
    """``?protocol=`` as an int (missing → 7); None when not numeric (HTTP 400)."""
    values = parse_qs(environ.get("QUERY_STRING", "")).get("protocol")
    if not values:
        return 7
    try:
        return int(values[0])
    except ValueError:
        return None


class ConnectionRegistry:
    """This node's open connections, for the shared liveness timer and shutdown."""

    def __init__(self) -> None:
        self.connections: dict[str, Connection] = {}


def _refuse(sock: socket.socket, exc: PusherError) -> None:
    """Handshake refusal: ``pusher:error`` then close with the same code."""
    try:
        sock.sendall(encode_text(protocol.error_frame(exc.code, exc.message)) + encode_close(exc.code, exc.message))
        if not is_tls(sock):  # a TLS socket loses its TLS layer on shutdown (guard.is_tls)
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def serve_websocket(environ: dict[str, Any], handler: Handler, registry: ConnectionRegistry) -> None:
    ws = environ["wsgi.websocket"]
    wsgi_handler = ws.handler
    sock: socket.socket = wsgi_handler.socket
    read = runtime.fair(wsgi_handler.rfile.read)  # a client streaming tiny frames must not hold the process
    config = handler.config
    app_key = environ.get("PATH_INFO", "")[len(APP_PATH_PREFIX):].strip("/")
    requested = protocol_version(environ)
    version = 7 if requested is None else requested  # non-numeric was refused (400) before the upgrade

    try:
        app = handler.admit(app_key, environ.get("HTTP_ORIGIN"), version)
    except PusherError as exc:
        _refuse(sock, exc)
        ws.closed = True  # stop gevent-websocket from sending its own close frame
        return

    metrics = handler.metrics
    transport = WsTransport(
        sock, config.websocket_max_messages,
        on_slow_consumer=lambda: metrics.slow_consumer_disconnects.labels(app.id, metrics.port).inc(),
        v2=version == 2, max_bytes=config.websocket_max_buffer_bytes,
    )
    conn = handler.open(app, transport, version)
    registry.connections[conn.socket_id] = conn
    reason: str | None = None

    def on_ping(payload: bytes) -> None:
        handler.touch(conn)
        transport.send_pong(payload)

    reader = FrameReader(read, config.websocket_max_payload_kb * 1024, on_ping=on_ping,
                         on_pong=lambda _: handler.touch(conn), max_fragments=config.websocket_max_fragments)
    try:
        while not transport.dead:
            try:
                opcode, payload = reader.read_message()
            except MessageTooBig as exc:
                handler.touch(conn)
                metrics.connection_error(app.id, "message_too_large")
                conn.send_text(protocol.error_frame(PusherCode.GENERIC, str(exc)))
                continue
            if opcode == OP_TEXT:
                try:
                    text = payload.decode("utf-8")
                except UnicodeDecodeError:
                    metrics.connection_error(app.id, "invalid_utf8")
                    reason = "invalid_utf8"
                    transport.close(CLOSE_INVALID_PAYLOAD, "Invalid UTF-8")
                    break
                try:
                    handler.message(conn, text)
                except Exception:  # the edge: a bug in one frame must not kill the socket
                    logger.exception("error handling a frame", extra={"app_id": app.id, "socket_id": conn.socket_id})
                    conn.send_text(protocol.error_frame(PusherCode.GENERIC, "Internal server error"))
            elif opcode == OP_BINARY:
                handler.binary_message(conn)
            elif opcode == OP_CLOSE:
                if transport.closing:
                    reason = f"closed_{transport.close_code}"  # the client answered our close
                else:
                    reason = "client_closed"
                    transport.close(reply_close_code(payload), "")
                break
    except FrameProtocolError as exc:
        reason = "protocol_error"
        metrics.connection_error(app.id, "protocol_error")
        transport.close(exc.close_code, exc.reason)
    except (EOFError, OSError, ValueError):
        reason = f"closed_{transport.close_code}" if transport.closing else "connection_lost"
    finally:
        if reason is None:
            reason = f"closed_{transport.close_code}" if transport.closing else "connection_lost"
        registry.connections.pop(conn.socket_id, None)
        try:
            handler.close(conn, reason)
        except Exception:
            logger.exception("error cleaning up a connection", extra={"app_id": app.id, "socket_id": conn.socket_id})
        if transport.closing and not transport.dead:
            transport.join_writer(timeout=5.0)
        transport.stop()
        ws.closed = True
