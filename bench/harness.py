"""The moving parts every scenario uses: servers under test, /proc sampling, the Node
client pools and the REST publishers."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sockudo.core.auth import rest_signature
from tests.support.procs import RedisServer, ServerProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
LOADGEN = BENCH / "loadgen.js"
RESTLOAD = BENCH / "restload.js"
NODE_MODULES = ROOT / "tests" / "js" / "node_modules"
CLK_TCK = os.sysconf("SC_CLK_TCK")

APP_ID = "12345"
APP_KEY = "bench-key"
APP_SECRET = "bench-secret"


def extract_tree(rev: str) -> Path:
    """The source tree of git revision ``rev`` in a temporary directory: a benchmark runs an
    older revision's processes from there as its baseline, side by side with the current tree."""
    out = Path(tempfile.mkdtemp(prefix="bench-base-"))
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    tar = out / "tree.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as fh:
        fh.extractall(out, filter="data")
    tar.unlink()
    return out


# -- /proc ---------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes (not their children), in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            # the command name may hold spaces; fields after its closing paren are fixed
            fields = fh.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """All CPUs' non-idle time so far (from /proc/stat), in seconds."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def wait_for_quiet(max_wait: float = 20.0, busy_cores: float = 0.3, sample: float = 1.0) -> float | None:
    """Wait (bounded) until the machine is nearly idle, so other work on a shared box skews a
    run less; returns the busy cores of the last sample (None when not asked to wait)."""
    if max_wait <= 0:
        return None
    deadline = time.monotonic() + max_wait
    while True:
        before = machine_busy_seconds()
        time.sleep(sample)
        busy = (machine_busy_seconds() - before) / sample
        if busy <= busy_cores or time.monotonic() >= deadline:
            return round(busy, 2)


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as fh:
                out.extend(int(x) for x in fh.read().split())
        except FileNotFoundError:
            pass
    return out


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; children (servers, Node) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class CpuMeter:
    """Server CPU and wall time between ``start()`` and ``stop()``."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.cpu = 0.0
        self.wall = 0.0
        self.machine_busy = 0.0
        self.by_pid: dict[int, float] = {}

    def start(self) -> CpuMeter:
        self._cpu0 = cpu_seconds(self.pids)
        self._by_pid0 = {pid: cpu_seconds([pid]) for pid in self.pids}
        self._machine0 = machine_busy_seconds()
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> CpuMeter:
        self.wall = time.perf_counter() - self._t0
        self.cpu = cpu_seconds(self.pids) - self._cpu0
        self.by_pid = {pid: round(cpu_seconds([pid]) - self._by_pid0[pid], 3) for pid in self.pids}
        # Busy cores on the whole machine (server + load generator + anything else running).
        self.machine_busy = (machine_busy_seconds() - self._machine0) / self.wall if self.wall else 0.0
        return self


# -- servers under test ----------------------------------------------------------


@dataclass
class Target:
    """How clients and publishers reach one running server."""

    kind: str  # "sockudo", "bare", "flask-socketio", "sockudo-2w"
    label: str
    port: int
    proto: str  # "pusher" | "eio"
    pids: list[int] = field(default_factory=list)  # the processes whose CPU/RSS is the server's
    signed: bool = False
    protocol: int = 7  # the Pusher protocol version clients ask for (2: Sockudo's protocol 2)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


class _ScriptServer:
    """A baseline script on a free port."""

    def __init__(self, script: str, args: list[str]) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="sockudo-bench-")
        self.log_path = os.path.join(self.dir, "server.log")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"bench.baselines.{script}", "--port", str(self.port), *args],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_until(self._ready, timeout=20, message=f"{script} on port {self.port}")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"baseline exited with {self.proc.returncode}:\n{self.log()}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", "/live")
            return conn.getresponse().status == 200
        finally:
            conn.close()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def flask_socketio_available() -> bool:
    try:
        import flask_socketio  # noqa: F401
    except ImportError:
        return False
    return True


class RunningServer:
    """Start one server under test; ``target`` says how to reach and measure it.
    ``tcp_nodelay``: the baselines set TCP_NODELAY on accepted sockets, as Sockudo always does
    (the REST scenario, whose Node client cannot dodge the Nagle/delayed-ACK stall)."""

    def __init__(self, kind: str, tcp_nodelay: bool = False) -> None:
        self.kind = kind
        self._script_args = ["--tcp-nodelay"] if tcp_nodelay else []
        self._sockudo: ServerProcess | None = None
        self._script: _ScriptServer | None = None
        self._redis: RedisServer | None = None
        self.target: Target

    def __enter__(self) -> RunningServer:
        try:
            self._start()
        except BaseException:
            self.__exit__()  # a failed start must not leave servers (or Redis) behind
            raise
        return self

    def _start(self) -> None:
        apps = [{"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET}]
        if self.kind == "sockudo":
            self._sockudo = ServerProcess(apps=apps)
            self._sockudo.start()
            pid = self._sockudo.proc.pid  # type: ignore[union-attr]
            self.target = Target("sockudo", "sockudo", self._sockudo.port, "pusher", [pid], signed=True)
        elif self.kind == "sockudo-2w":
            self._redis = RedisServer()
            self._redis.start()
            self._sockudo = ServerProcess(apps=apps, env={"REDIS_URL": self._redis.url},
                                          extra_args=["--workers", "2"])
            self._sockudo.start()
            parent = self._sockudo.proc.pid  # type: ignore[union-attr]
            workers = wait_until(lambda: len(child_pids(parent)) == 2 and child_pids(parent), timeout=20,
                                 message="two worker processes")
            # both workers must be listening before clients connect, or SO_REUSEPORT sends all to one
            time.sleep(1.5)
            self.target = Target("sockudo-2w", "sockudo --workers 2", self._sockudo.port, "pusher",
                                 [parent, *workers], signed=True)
            self.redis_pid = self._redis.proc.pid  # type: ignore[union-attr]
        elif self.kind == "bare":
            self._script = _ScriptServer("bare_gevent", self._script_args)
            self.target = Target("bare", "bare gevent-websocket", self._script.port, "pusher", [self._script.proc.pid])
        elif self.kind == "bare-encode":
            self._script = _ScriptServer("bare_gevent", ["--per-socket-encode", *self._script_args])
            self.target = Target("bare-encode", "bare (ws.send per socket)", self._script.port, "pusher",
                                 [self._script.proc.pid])
        elif self.kind == "flask-socketio":
            self._script = _ScriptServer("flask_socketio", self._script_args)
            self.target = Target("flask-socketio", "Flask-SocketIO", self._script.port, "eio", [self._script.proc.pid])
        else:
            raise ValueError(self.kind)

    def log(self) -> str:
        if self._sockudo is not None:
            return self._sockudo.log()
        return self._script.log() if self._script is not None else ""

    def __exit__(self, *exc: object) -> None:
        if self._sockudo is not None:
            self._sockudo.stop()
        if self._script is not None:
            self._script.stop()
        if self._redis is not None:
            self._redis.stop()


# -- Node client pools ---------------------------------------------------------------


class NodePool:
    """One ``loadgen.js`` process holding ``n`` clients; JSON lines both ways."""

    def __init__(self, target: Target, n: int, channels: dict[str, Any], offset: int = 0,
                 local_addresses: list[str] | None = None, inflight: int = 100) -> None:
        self.n = n
        cfg = {
            "url": target.ws_url, "proto": target.proto, "app_key": APP_KEY, "app_secret": APP_SECRET, "n": n,
            "protocol": target.protocol,
            "channels": channels, "offset": offset, "inflight": inflight,
            "local_addresses": local_addresses or [],
        }
        env = {**os.environ, "NODE_PATH": str(NODE_MODULES)}
        self.proc = subprocess.Popen(
            ["node", str(LOADGEN), json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=sys.stderr, env=env, cwd=BENCH,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.count = 0  # latest progress report
        self.progress = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            msg = json.loads(raw)
            if msg.get("ev") == "progress":
                with self.progress:
                    self.count = msg["count"]
                    self.progress.notify_all()
            else:
                self.events.put(msg)
        with self.progress:
            self.progress.notify_all()
        self.events.put({"ev": "exited"})

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"load generator: no {name!r} within {timeout}s")
            msg = self.events.get(timeout=remaining)
            if msg.get("ev") == name:
                return msg
            if msg.get("ev") == "exited":
                raise RuntimeError("load generator exited")

    def command(self, reply: str, timeout: float = 30, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.wait_event(reply, timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("closed", timeout=10, cmd="close")
            except (TimeoutError, RuntimeError, BrokenPipeError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Pools:
    """Several ``NodePool`` processes acting as one client population."""

    def __init__(self, target: Target, n: int, procs: int, channels: dict[str, Any],
                 local_addresses: list[str] | None = None, inflight: int = 100) -> None:
        procs = max(1, min(procs, n))
        sizes = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        self.pools: list[NodePool] = []
        offset = 0
        for size in sizes:
            self.pools.append(NodePool(target, size, channels, offset, local_addresses, inflight))
            offset += size
        self.n = n

    @classmethod
    def merge(cls, parts: list[Pools]) -> Pools:
        """One population made of several (e.g. clients on different server nodes)."""
        merged = cls.__new__(cls)
        merged.pools = [p for part in parts for p in part.pools]
        merged.n = sum(part.n for part in parts)
        return merged

    def __enter__(self) -> Pools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [p.proc.pid for p in self.pools]

    def connect(self, timeout: float) -> dict[str, Any]:
        for p in self.pools:
            p.send(cmd="connect")
        replies = [p.wait_event("connected", timeout) for p in self.pools]
        errors = [e for r in replies for e in r.get("errors", [])]
        return {
            "ok": sum(r["ok"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "established_ms": max(r["established_ms"] for r in replies),
            "subscribed_ms": max(r["subscribed_ms"] for r in replies),
            "errors": errors[:5],
        }

    def broadcast(self, reply: str, timeout: float = 30, **cmd: Any) -> list[dict[str, Any]]:
        for p in self.pools:
            p.send(**cmd)
        return [p.wait_event(reply, timeout) for p in self.pools]

    def reset_count(self) -> None:
        self.broadcast("ok", cmd="count")
        for p in self.pools:
            with p.progress:
                p.count = 0

    def delivered_publishes(self) -> int:
        """Publishes that every pool has seen (roughly: count / pool size, the minimum)."""
        return min(p.count // p.n for p in self.pools)

    def wait_delivered(self, publishes: int, timeout: float) -> bool:
        """Block until every pool has counted ``publishes`` full rounds."""
        deadline = time.monotonic() + timeout
        for p in self.pools:
            with p.progress:
                while p.count < publishes * p.n:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or p.proc.poll() is not None:
                        return False
                    p.progress.wait(remaining)
        return True

    def stats(self, latencies: bool = False) -> dict[str, Any]:
        replies = self.broadcast("stats", cmd="stats", latencies=latencies)
        out: dict[str, Any] = {
            "count": sum(r["count"] for r in replies),
            "open": sum(r["open"] for r in replies),
            "bad": sum(r["bad"] for r in replies),
            "closed_early": sum(r["closed_early"] for r in replies),
            "errors": [e for r in replies for e in r["errors"]][:5],
        }
        if latencies:
            out["latencies"] = [x for r in replies for x in r["latencies"]]
        return out

    def close(self) -> None:
        threads = [threading.Thread(target=p.close) for p in self.pools]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


# -- REST publishers -------------------------------------------------------------------


class Publisher:
    """Publishes to one server: Pusher-signed ``POST /apps/{id}/events`` for Sockudo, a plain
    ``POST /publish`` for the baselines. ``fresh=True`` opens a new HTTP connection per
    publish (the baseline broadcaster's shape); otherwise one keep-alive connection."""

    def __init__(self, target: Target, fresh: bool = False, quickack: bool = True) -> None:
        self.target = target
        self.fresh = fresh
        # gevent's pywsgi writes the response headers and body in two send()s on a socket
        # without TCP_NODELAY: Nagle holds the body until the client ACKs the headers, which
        # Linux delays ~40 ms on a warm keep-alive connection. TCP_QUICKACK before each read
        # makes the client ACK at once, so a keep-alive publisher measures the server, not
        # that stall (the REST scenario reports the stall separately, without this).
        self.quickack = quickack and not fresh
        self.path = f"/apps/{APP_ID}/events" if target.signed else "/publish"
        self._conn: http.client.HTTPConnection | None = None
        self._signed_for: tuple[int, bytes] | None = None
        self._signed_query = ""

    def _url(self, body: bytes) -> str:
        if not self.target.signed:
            return self.path
        ts = int(time.time())
        if self._signed_for != (ts, body):
            # The signature covers the timestamp and the body's MD5; a load generator may reuse
            # it for identical bodies within the same second.
            pairs = [("auth_key", APP_KEY), ("auth_timestamp", str(ts)), ("auth_version", "1.0"),
                     ("body_md5", hashlib.md5(body).hexdigest())]
            sig = rest_signature(APP_SECRET, "POST", self.path, pairs)
            self._signed_query = "&".join(f"{k}={v}" for k, v in pairs) + f"&auth_signature={sig}"
            self._signed_for = (ts, body)
        return f"{self.path}?{self._signed_query}"

    def publish(self, channel: str, data: str, name: str = "bench") -> int:
        body = json.dumps({"name": name, "channel": channel, "data": data}, separators=(",", ":")).encode()
        url = self._url(body)
        headers = {"Content-Type": "application/json"}
        for attempt in (0, 1):
            conn = self._conn
            if conn is None or self.fresh:
                conn = http.client.HTTPConnection("127.0.0.1", self.target.port, timeout=30)
                conn.connect()
                # http.client writes headers and body separately; without TCP_NODELAY, Nagle plus
                # the server's delayed ACK stalls every keep-alive request by ~40 ms. (requests,
                # which the Pusher SDK uses, sets it too.)
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.fresh:
                    headers["Connection"] = "close"
            try:
                conn.request("POST", url, body, headers)
                if self.quickack:
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                self._conn = None
                if attempt:
                    raise
                continue
            if self.fresh:
                conn.close()
            else:
                self._conn = conn
            return status
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class RestLoad:
    """``restload.js``: one Node process holding ``connections`` keep-alive HTTP connections,
    each with one publish in flight (closed loop), signed the Pusher way for Sockudo and a
    plain ``POST /publish`` for the baselines. ``start()`` returns once every connection has
    completed a warm-up publish; ``go()`` runs ``seconds`` and returns the Node side's counts."""

    def __init__(self, target: Target, body: bytes, connections: int, seconds: float) -> None:
        self.seconds = seconds
        cfg = {
            "port": target.port, "path": f"/apps/{APP_ID}/events" if target.signed else "/publish",
            "signed": target.signed, "app_key": APP_KEY, "app_secret": APP_SECRET,
            "body": body.decode(), "connections": connections, "seconds": seconds,
        }
        self.proc = subprocess.Popen(
            ["node", str(RESTLOAD), json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=sys.stderr, cwd=BENCH,
        )
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(json.loads(raw))
        self._lines.put({"ev": "exited"})

    def _wait(self, name: str, timeout: float) -> dict[str, Any]:
        msg = self._lines.get(timeout=timeout)
        if msg.get("ev") != name:
            raise RuntimeError(f"restload.js: expected {name!r}, got {msg}")
        return msg

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 30) -> dict[str, Any]:
        return self._wait("ready", timeout)

    def go(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        return self._wait("done", self.seconds + 30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def percentiles(samples: list[float], points: tuple[float, ...] = (50, 95, 99)) -> dict[str, float | None]:
    if not samples:
        return {f"p{int(p)}": None for p in points}
    ordered = sorted(samples)
    out: dict[str, float | None] = {}
    for p in points:
        index = min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))
        out[f"p{int(p)}"] = round(ordered[index], 3)
    out["max"] = round(ordered[-1], 3)
    return out
