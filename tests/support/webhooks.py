"""Webhook test helpers: a scripted, latency-injecting HTTP receiver and a ``python -m workers`` process."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pusher
import requests

from tests.support.metrics import metric
from tests.support.procs import ROOT, ServerProcess, free_port, wait_until

KEY, SECRET, APP_ID = "app-key-1", "app-secret-1", "100"
ALL_TYPES = ["channel_occupied", "channel_vacated", "member_added", "member_removed", "client_event", "cache_miss",
             "subscription_count"]
FAST: dict[str, Any] = {  # short windows so the module stays fast
    "debounce_ms": 300,
    "batching": {"enabled": True, "duration": 50, "size": 100},
    "retry": {"initial_backoff_ms": 100, "max_backoff_ms": 400, "max_elapsed_time_ms": 20000},
}
SDK = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: str
    status: int | None = None  # None: never answered (hung, or its sender died)
    at: float = 0.0  # time.monotonic() when the request arrived
    ended: float | None = None  # when the handler was done with it (answered, or the sender hung up)

    @property
    def delivery_id(self) -> str:
        return self.headers["X-Sockudo-Delivery-Id"]

    @property
    def events(self) -> list[dict[str, Any]]:
        return json.loads(self.body)["events"]


@dataclass
class Receiver:
    """``script[path]`` answers in order (an int status, ``"hang"``, or ``"trickle"``: one byte of
    a never-ending answer every ``trickle_every`` seconds until the sender hangs up), then 200.
    Every answer comes ``delay`` seconds after the request (a real endpoint's latency), and at
    most ``max_concurrent`` requests are handled at once (others wait their turn, as in a busy
    server). It dedupes like a careful receiver: ``processed`` counts each delivery id once, on
    its first 2xx."""

    port: int = 0
    script: dict[str, list[int | str]] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)
    processed: dict[str, Received] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    delay: float = 0.0
    max_concurrent: int = 1000
    trickle_every: float = 0.2

    def start(self) -> Receiver:
        outer = self
        slots = threading.BoundedSemaphore(self.max_concurrent)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints

            def do_POST(self) -> None:  # noqa: N802
                with slots:
                    self._answer()

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                path = self.path.split("?", 1)[0]
                got = Received(path, dict(self.headers), body, at=time.monotonic())
                outer.requests.append(got)
                steps = outer.script.get(path)
                action = steps.pop(0) if steps else 200
                try:
                    if action == "hang":
                        outer.release.wait(60)
                        self.close_connection = True
                        return  # no answer at all
                    if action == "trickle":
                        self.close_connection = True
                        self._trickle()
                        return
                    if outer.delay:
                        time.sleep(outer.delay)
                    got.status = int(action)
                    if 200 <= got.status < 300:
                        outer.processed.setdefault(got.delivery_id, got)
                    try:
                        self.send_response(got.status)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    except OSError:
                        self.close_connection = True
                finally:
                    got.ended = time.monotonic()

            def _trickle(self) -> None:
                answer = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"z" * 100_000
                for i in range(len(answer)):
                    if outer.release.wait(outer.trickle_every):
                        return
                    try:
                        self.wfile.write(answer[i:i + 1])
                        self.wfile.flush()
                    except OSError:
                        return  # the sender gave up

            def log_message(self, *args: Any) -> None:
                return None

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                return None  # a sender that hangs up (a timeout, a killed worker) is part of the tests

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in list(self.requests) if r.path == path]

    def events_at(self, path: str, answered: bool = True) -> list[dict[str, Any]]:
        return [e for r in self.at(path) if not answered or r.status == 200 for e in r.events]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class WorkerProcess:
    """``python -m workers`` in its own process group (``kill -9`` takes the whole worker)."""

    def __init__(self, redis_url: str | None, concurrency: int | None = None, queues: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.redis_url = redis_url  # --url; None: the worker picks its Redis from ``env`` as in production
        self.concurrency = concurrency  # job slots (--concurrency); default: the worker's
        self.queues = queues  # default: the worker's (webhooks)
        self.extra_env = dict(env or {})  # e.g. SOCKUDO_CONFIG, for the apps of a server's config
        self.metrics_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="sockudo-worker-")
        self.log_path = os.path.join(self.dir, "worker.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SOCKUDO_", "REDIS_", "WEBHOOK_", "QUEUE_REDIS_"))}
        env.update({"PYTHONUNBUFFERED": "1", "WEBHOOK_REAP_INTERVAL_MS": "300", **self.extra_env})
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers", *self.queues, *(["--url", self.redis_url] if self.redis_url else []),
             "--metrics-port",
             str(self.metrics_port), *(["--concurrency", str(self.concurrency)] if self.concurrency else [])],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_until(self._ready, timeout=20, message="worker metrics endpoint")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=1).status_code == 200

    def metrics_text(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return metric(self.metrics_text(), name, **(labels or {}))

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def children(self) -> list[int]:
        """The worker's child processes, if any."""
        assert self.proc is not None
        found: list[int] = []
        pending = [self.proc.pid]
        while pending:
            pid = pending.pop()
            for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
                try:
                    with open(f"/proc/{pid}/task/{task}/children") as fh:
                        kids = [int(k) for k in fh.read().split()]
                except OSError:
                    continue
                found.extend(kids)
                pending.extend(kids)
        return found

    def kill9(self) -> None:
        """``kill -9`` of the whole worker (its jobs, scheduler and reaper are greenlets of one
        process): the jobs in flight are abandoned mid-request, with nobody left to notice."""
        assert self.proc is not None
        for pid in [self.proc.pid, *self.children()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def stays_false(condition: Callable[[], Any], seconds: float, message: str, interval: float = 0.05) -> None:
    """Assert ``condition`` stays falsy for ``seconds`` (a bounded "nothing arrives" window)."""
    deadline = time.monotonic() + seconds
    while True:
        got = condition()
        assert not got, f"{message}: {got!r}"
        if time.monotonic() >= deadline:
            return
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def app(*hooks: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": APP_ID, "key": KEY, "secret": SECRET, "enable_client_messages": True, "webhooks": list(hooks),
            **extra}


def webhooks(**overrides: Any) -> dict[str, Any]:
    settings = {**FAST, **overrides}
    if "retry" in overrides:
        settings["retry"] = {**FAST["retry"], **overrides["retry"]}
    return settings


def assert_signed(request: Received) -> dict[str, Any]:
    body = SDK.validate_webhook(request.headers["X-Pusher-Key"], request.headers["X-Pusher-Signature"], request.body)
    assert body is not None, f"the SDK refused the webhook at {request.path}: {request.headers} {request.body}"
    assert request.headers["Content-Type"] == "application/json"
    return body


def cli(server: ServerProcess, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sockudo", "webhooks", "dead-letters", *args,
                           "--config", server.config_path], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=30)


def dead_letters(server: ServerProcess, env: dict[str, str]) -> list[dict[str, Any]]:
    out = cli(server, "list", "--json", env=env)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
