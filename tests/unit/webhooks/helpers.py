"""Shared by the webhook unit tests: apps and endpoints, a recording queue, a status-scripted receiver."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any

import pusher

from sockudo.config import AppConfig
from sockudo.webhooks.metrics import QueueStats
from sockudo.webhooks.model import (
    Delivery,
    RetryPolicy,
    WebhookSettings,
    build_deliveries,
    parse_endpoint,
    parse_endpoints,
)
from sockudo.webhooks.sink import WebhookSink
from tests.support.fakes import FakeClock

ROOT = Path(__file__).resolve().parents[3]


KEY, SECRET = "app-key", "app-secret"


def sdk(key: str = KEY, secret: str = SECRET) -> pusher.Pusher:
    return pusher.Pusher(app_id="1", key=key, secret=secret)


def endpoint(**overrides: Any) -> Any:
    raw = {"url": "http://hooks.example.com/in?token=s3cret", "event_types": ["channel_occupied"], **overrides}
    return parse_endpoint("webhooks[0]", raw)


def make_app(*hooks: dict[str, Any], app_id: str = "1") -> AppConfig:
    return AppConfig(id=app_id, key=KEY, secret=SECRET, webhooks=parse_endpoints("webhooks", list(hooks)))


def a_delivery(**policy: Any) -> Delivery:
    settings = WebhookSettings(retry=RetryPolicy(**policy))
    (d,) = build_deliveries("7", KEY, SECRET, [endpoint()], settings, 1000,
                            [{"name": "channel_occupied", "channel": "c"}], prefix="p:")
    return d


class RecordingQueue:
    backend = "memory"

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    def enqueue(self, deliveries: list[Delivery]) -> None:
        self.deliveries.extend(deliveries)

    def stats(self) -> QueueStats:
        return QueueStats(self.backend, "recording", {"ready": len(self.deliveries)}, 0.0)

    def events(self) -> list[dict[str, Any]]:
        return [e for d in self.deliveries for e in json.loads(d.body)["events"]]


class Occupancy:
    """The adapter's cluster-wide answers, as the sink's re-check sees them."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.members: dict[str, dict[str, Any]] = {}

    def subscriber_count(self, app_id: str, channel: str) -> int:
        return self.counts.get(channel, 0)

    def presence_members(self, app_id: str, channel: str) -> dict[str, Any]:
        return self.members.get(channel, {})


ALL_TYPES = ["channel_occupied", "channel_vacated", "member_added", "member_removed", "client_event", "cache_miss",
             "subscription_count"]


def run(sink: WebhookSink, clock: FakeClock, seconds: float = 0.0) -> None:
    sink._step()
    clock.now += seconds
    sink._step()


class Receiver:
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((self.path, dict(self.headers), body))
                self.send_response(outer.statuses.pop(0) if outer.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def local_delivery(port: int, path: str = "/hook?x=1", timeout_ms: int = 2000) -> Delivery:
    hook = parse_endpoint("w", {"url": f"http://127.0.0.1:{port}{path}", "event_types": ["channel_occupied"],
                                "headers": {"X-Custom": "1"}, "request_timeout_ms": timeout_ms})
    (d,) = build_deliveries("1", KEY, SECRET, [hook], WebhookSettings(), int(time.time() * 1000),
                            [{"name": "channel_occupied", "channel": "é"}], prefix="p:")
    return d
