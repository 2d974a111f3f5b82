"""The stack's ceiling: a bare gevent-websocket broadcaster with no Pusher logic.

    python -m bench.baselines.bare_gevent --port 7001 [--per-socket-encode]

It speaks just enough of the Pusher handshake for the same clients to drive it: every
WebSocket gets a ``pusher:connection_established`` frame; any ``pusher:subscribe`` joins the
one room (and is acknowledged, so clients know they are in); ``pusher:unsubscribe`` leaves
it. ``POST /publish`` with ``{"channel": ..., "data": ...}`` encodes one Pusher frame and
writes the same pre-encoded WebSocket bytes to every socket in a plain loop
(``--per-socket-encode``: ``ws.send(text)`` per socket instead, which frames it each time).
No signing, no metrics, no per-socket queue: the least work a gevent server can do.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import struct  # noqa: E402

from gevent.lock import RLock  # noqa: E402

from bench.baselines.common import arguments, serve  # noqa: E402

ESTABLISHED = json.dumps(
    {"event": "pusher:connection_established", "data": json.dumps({"socket_id": "1.1", "activity_timeout": 120})}
)

room: set = set()
# One writer at a time: broadcasts and acks from different greenlets must never write one
# gevent socket at once (ConcurrentObjectUseError); a plain loop under one lock is the ceiling.
write_lock = RLock()


def ws_frame(text: str) -> bytes:
    payload = text.encode("utf-8")
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


def serve_socket(ws) -> None:
    with write_lock:
        ws.send(ESTABLISHED)
    joined = False
    try:
        while True:
            msg = ws.receive()
            if msg is None:
                break
            if "pusher:subscribe" in msg:
                channel = json.loads(msg)["data"]["channel"]
                room.add(ws)
                joined = True
                with write_lock:
                    ws.raw_write(ws_frame(json.dumps(
                        {"event": "pusher_internal:subscription_succeeded", "channel": channel, "data": "{}"})))
            elif "pusher:unsubscribe" in msg:
                pass  # the one room: a client that churns channels stays in it
            elif "pusher:ping" in msg:
                with write_lock:
                    ws.send('{"event":"pusher:pong","data":"{}"}')
    except Exception:
        pass
    finally:
        if joined:
            room.discard(ws)


def broadcast(body: bytes, per_socket_encode: bool) -> int:
    msg = json.loads(body)
    text = json.dumps({"event": msg.get("name", "bench"), "channel": msg["channel"], "data": msg["data"]},
                      separators=(",", ":"))
    sent = 0
    with write_lock:
        if per_socket_encode:
            for ws in list(room):
                try:
                    ws.send(text)
                    sent += 1
                except Exception:
                    room.discard(ws)
        else:
            frame = ws_frame(text)
            for ws in list(room):
                try:
                    ws.raw_write(frame)
                    sent += 1
                except Exception:
                    room.discard(ws)
    return sent


def make_app(per_socket_encode: bool):
    def app(environ, start_response):
        ws = environ.get("wsgi.websocket")
        if ws is not None:
            serve_socket(ws)
            return []
        path = environ.get("PATH_INFO", "")
        if path == "/publish" and environ["REQUEST_METHOD"] == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            sent = broadcast(environ["wsgi.input"].read(length), per_socket_encode)
            body = b'{"sent":%d}' % sent
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/live":
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
            return [b"OK"]
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return [b""]

    return app


def main() -> None:
    args = arguments(("--per-socket-encode", {"action": "store_true"}))
    serve(make_app(args.per_socket_encode), args)


if __name__ == "__main__":
    main()
