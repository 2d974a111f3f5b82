"""``python -m bench.webhook_receiver --port N``: a local webhook endpoint for the ``webhooks``
scenario (issue 4). Answers every ``POST`` with 200 and counts deliveries (one per request),
events (the ``events`` of each body), repeats of a delivery id, and bodies whose
``X-Pusher-Signature`` is not the HMAC-SHA256 of the body with the bench app's secret.
``GET /stats`` returns the counts as JSON. 127.0.0.1 only."""

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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
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
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

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
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
