"""``python -m bench.webhook_receiver --port N [--delay-ms 100] [--concurrency 1000]``: a local
webhook endpoint with a real endpoint's latency. Answers every ``POST`` with 200 after
``--delay-ms`` (default 100 ms; 0 answers at once), handling at most ``--concurrency`` requests
at a time (the rest wait their turn, as in a busy server), over HTTP/1.1 keep-alive. Counts
deliveries (one per delivery id), events (the ``events`` of each body), repeats of a delivery
id, and bodies whose ``X-Pusher-Signature`` is not the HMAC-SHA256 of the body with the bench
app's secret. ``GET /stats`` returns the counts as JSON; ``POST /reset`` zeroes them.
127.0.0.1 only."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SECRET = b"bench-secret"  # bench.harness.APP_SECRET

_lock = threading.Lock()
_stats: dict[str, Any] = {"deliveries": 0, "events": 0, "duplicates": 0, "bad_signatures": 0, "first_s": None,
                          "last_s": None}
_seen: set[str] = set()
_delay_s = 0.1
_slots = threading.BoundedSemaphore(1000)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/reset":
            with _lock:
                _seen.clear()
                _stats.update({k: (None if k.endswith("_s") else 0) for k in _stats})
            self._empty()
            return
        with _slots:
            if _delay_s:
                time.sleep(_delay_s)
            self._count(body)
            self._empty()

    def _empty(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _count(self, body: bytes) -> None:
        events = len(json.loads(body).get("events", []))
        good = hmac.compare_digest(hmac.new(SECRET, body, hashlib.sha256).hexdigest(),
                                   self.headers.get("X-Pusher-Signature", ""))
        delivery = self.headers.get("X-Sockudo-Delivery-Id", "")
        now = time.time()
        with _lock:
            if delivery in _seen:
                _stats["duplicates"] += 1
            else:
                _seen.add(delivery)
                _stats["deliveries"] += 1
                _stats["events"] += events
            _stats["bad_signatures"] += 0 if good else 1
            _stats["first_s"] = _stats["first_s"] or now
            _stats["last_s"] = now

    def do_GET(self) -> None:  # noqa: N802
        with _lock:
            text = json.dumps(_stats).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    global _delay_s, _slots
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=100.0, help="answer each request after this long")
    parser.add_argument("--concurrency", type=int, default=1000, help="requests handled at once at most")
    args = parser.parse_args()
    _delay_s = max(0.0, args.delay_ms / 1000.0)
    _slots = threading.BoundedSemaphore(max(1, args.concurrency))
    ThreadingHTTPServer.request_queue_size = 1024
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
