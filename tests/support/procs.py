"""Real processes for integration tests: free ports, a throwaway redis-server, the server.

Tests wait for conditions with a deadline (``wait_until``), never for fixed sleeps.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import requests
from redis.backoff import NoBackoff
from redis.retry import Retry

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """A free port whose successor is free too."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def unreachable_redis() -> redis.Redis:
    """A real client of a port nobody listens on: every command fails at once with a connection
    error (no retries), as when Redis is down."""
    return redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))


def wait_until(condition: Callable[..., Any], timeout: float = 10.0, interval: float = 0.02, message: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds.

    ``condition`` is called without arguments (typed ``...`` so that a lambda may bind a loop
    variable as a default: ``lambda node=node: ...``)."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # a condition may fail while the thing it polls starts up
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {message or condition}{detail}")
        time.sleep(interval)


def rss_kb(pid: int) -> int:
    """A process's resident set size in KiB (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


class RssPeak:
    """The highest RSS (KiB) of a process, sampled every 10 ms by a thread: transient growth
    that is freed again before a test could look counts too. ``reset()`` starts over from now."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = self.peak = rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, rss_kb(self.pid))
            except (OSError, AssertionError):
                return  # the process is gone

    def reset(self) -> None:
        self.peak = rss_kb(self.pid)

    def grown(self) -> int:
        """KiB the peak is above the baseline (taken when this was created)."""
        self.peak = max(self.peak, rss_kb(self.pid))
        return self.peak - self.baseline

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def toml_config(apps: list[dict[str, Any]], **top: Any) -> str:
    """A config file: top-level keys, ``[section]`` dicts, then ``[[app_manager.array.apps]]``."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items() if not isinstance(v, dict)]
    for k, v in top.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
    for app in apps:
        lines.append("[[app_manager.array.apps]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in app.items())
    return "\n".join(lines) + "\n"


class ServerProcess:
    """``python -m sockudo`` on free ports, with its log kept for assertions."""

    def __init__(self, apps: list[dict[str, Any]] | None = None, env: dict[str, str] | None = None,
                 config_text: str | None = None, extra_args: list[str] | None = None,
                 config_name: str = "sockudo.toml", root: Path | None = None, **top: Any) -> None:
        self.extra_args = list(extra_args or [])  # e.g. ["--workers", "2"]
        self.root = root or ROOT  # the source tree ``python -m sockudo`` runs from (a benchmark's baseline)
        self.port = free_port()
        self.metrics_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="sockudo-test-")
        self.config_path = os.path.join(self.dir, config_name)  # a ".json" name: the file is JSON
        if config_text is None:
            metrics = dict(top.pop("metrics", {}))
            metrics.setdefault("port", self.metrics_port)
            config_text = toml_config(apps or [], port=self.port, metrics=metrics, **top)
        with open(self.config_path, "w", encoding="utf-8") as fh:
            fh.write(config_text)
        self.log_path = os.path.join(self.dir, "server.log")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKUDO_")}
        self.env.update({"PYTHONUNBUFFERED": "1", "PORT": str(self.port), "METRICS_PORT": str(self.metrics_port)})
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> ServerProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sockudo", "--config", self.config_path, *self.extra_args],
            cwd=self.root, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        if wait:
            wait_until(self._ready, timeout=20, message=f"server on port {self.port} to answer /live")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        return requests.get(self.url + "/live", timeout=1).status_code == 200

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def metrics_text(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer:
    """A throwaway ``redis-server`` on a free port, no persistence — unless ``data_dir`` is
    given: then it keeps an append-only file there (fsync on every write), so a stop and a
    start come back with the data, as a production Redis restarting does.

    ``extra_args`` are appended to the command line (e.g. ``["--replicaof", "127.0.0.1", "6379"]``);
    ``port`` pins the port (default: a free one). ``restart()`` comes back on the SAME port.
    """

    def __init__(self, extra_args: list[str] | None = None, port: int | None = None,
                 data_dir: str | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.extra_args = list(extra_args or []) + (["--requirepass", password] if password else [])
        self.data_dir = data_dir
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run `make test`, which installs it")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *self._persistence(),
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, password=self.password)
        wait_until(client.ping, timeout=10, message="redis-server to answer PING")
        client.close()
        return self

    def _persistence(self) -> list[str]:
        if self.data_dir is None:
            return ["--appendonly", "no"]
        return ["--appendonly", "yes", "--appendfsync", "always", "--dir", self.data_dir]

    def start_again(self) -> RedisServer:
        """Start after ``stop()`` on the same port (with ``data_dir``: with the same data)."""
        wait_until(lambda: _port_free(self.port), timeout=10, message=f"port {self.port} to be free again")
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: the abrupt death of the instance (no shutdown, no goodbye to clients)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> RedisServer:
        """Stop, then start again on the same port (fresh and empty unless ``data_dir``)."""
        self.stop()
        return self.start_again()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
