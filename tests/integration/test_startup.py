"""Starting ``python -m sockudo`` for real: bad configuration fails fast and loudly, no
configuration serves the built-in app, and the port variables and flags are honoured.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pusher
import pytest
import requests

from tests.support.procs import ROOT, free_port, wait_until
from tests.support.wsraw import RawClient


class Proc:
    """A ``python -m sockudo`` process with its own args and environment."""

    def __init__(self, args: list[str], env: dict[str, str], workdir: str) -> None:
        self.stdout_path = os.path.join(workdir, "stdout.log")
        self.stderr_path = os.path.join(workdir, "stderr.log")
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "sockudo", *args], cwd=ROOT, env=env,
                                     stdout=self._out, stderr=self._err)

    def stderr(self) -> str:
        return Path(self.stderr_path).read_text(errors="replace")

    def output(self) -> str:
        return Path(self.stdout_path).read_text(errors="replace") + self.stderr()

    def wait_live(self, port: int) -> None:
        def live() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            return requests.get(f"http://127.0.0.1:{port}/live", timeout=1).status_code == 200

        wait_until(live, timeout=20, message=f"/live on port {port}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        self._err.close()


@pytest.fixture
def workdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="sockudo-startup-") as d:
        yield d


@pytest.fixture
def launch(workdir: str) -> Iterator[Callable[..., Proc]]:
    """Start processes with a clean environment: no SOCKUDO_*, PORT or HOST leaking in."""
    started: list[Proc] = []
    stripped = ("PORT", "HOST", "METRICS_PORT", "ACTIVITY_TIMEOUT", "DEBUG")

    def start(args: list[str] | None = None, env: dict[str, str] | None = None) -> Proc:
        base = {k: v for k, v in os.environ.items() if not k.startswith("SOCKUDO_") and k not in stripped}
        base["PYTHONUNBUFFERED"] = "1"
        base.setdefault("METRICS_PORT", str(free_port()))
        base.update(env or {})
        proc = Proc(args or [], base, workdir)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def write_config(workdir: str, text: str) -> str:
    path = os.path.join(workdir, "sockudo.toml")
    Path(path).write_text(text, encoding="utf-8")
    return path


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


# -- invalid configuration ------------------------------------------------------------


@pytest.mark.parametrize(("config", "named"), [
    ('port = "abc"\n', "config: port"),
    ("port = {port}\nbogus_setting = 1\n", "bogus_setting"),
    ("port = {port}\n[websocket]\nmax_payload_kbb = 3\n", "websocket.max_payload_kbb"),
    ('port = {port}\n[[app_manager.array.apps]]\nid = "1"\nkey = "${{SOCKUDO_TEST_UNSET_VAR}}"\nsecret = "s"\n',
     "SOCKUDO_TEST_UNSET_VAR"),
    ('port = {port}\n[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "s"\nmax_connections = "lots"\n',
     "max_connections"),
    ("port = {port}\nactivity_timeout = \n", "TOML"),
], ids=["port-not-a-number", "unknown-key", "unknown-section-key", "unset-variable", "bad-app-limit",
        "toml-syntax"])
def test_invalid_config_exits_nonzero_naming_the_key(launch, workdir, config, named):
    port = free_port()
    metrics_port = free_port()
    path = write_config(workdir, config.format(port=port))

    proc = launch(["--config", path], env={"METRICS_PORT": str(metrics_port)})
    try:
        code = proc.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server kept running with an invalid config:\n{proc.output()}")

    assert code != 0
    assert named in proc.stderr(), proc.stderr()
    assert "Traceback" not in proc.stderr(), proc.stderr()
    assert port_closed(port) and port_closed(metrics_port)


def test_invalid_port_env_exits_nonzero(launch):
    proc = launch(env={"PORT": "abc"})
    assert proc.proc.wait(timeout=10) != 0
    assert "port" in proc.stderr() and "abc" in proc.stderr(), proc.stderr()


def test_missing_config_file_exits_nonzero(launch, workdir):
    proc = launch(["--config", os.path.join(workdir, "nope.toml")], env={"PORT": str(free_port())})
    assert proc.proc.wait(timeout=10) != 0
    assert "nope.toml" in proc.stderr(), proc.stderr()


# -- no configuration at all ------------------------------------------------------------


def test_no_config_serves_the_builtin_app(launch):
    port = free_port()
    proc = launch(env={"PORT": str(port)})
    proc.wait_live(port)

    client = RawClient.connect_url(f"ws://127.0.0.1:{port}/app/app-key?protocol=7")
    try:
        assert client.socket_id
        client.ping_pong()
    finally:
        client.close()
    up = requests.get(f"http://127.0.0.1:{port}/up/app-id", timeout=5)
    assert up.status_code == 200 and up.headers["X-Health-Check"] == "OK"


def test_default_app_id_from_env_lets_the_python_sdk_trigger(launch):
    port = free_port()
    proc = launch(env={"PORT": str(port), "SOCKUDO_DEFAULT_APP_ID": "12345"})
    proc.wait_live(port)

    client = RawClient.connect_url(f"ws://127.0.0.1:{port}/app/app-key?protocol=7")
    try:
        client.subscribe("startup-default")
        sdk = pusher.Pusher(app_id="12345", key="app-key", secret="app-secret", host="127.0.0.1", port=port,
                            ssl=False, timeout=10)
        sdk.trigger("startup-default", "hello", "world")
        assert client.recv() == {"event": "hello", "channel": "startup-default", "data": "world"}
    finally:
        client.close()


# -- ports ----------------------------------------------------------------------------


def test_port_env_is_honoured(launch, workdir):
    port = free_port()
    path = write_config(workdir, "activity_timeout = 60\n")  # a config without a port
    proc = launch(["--config", path], env={"PORT": str(port)})
    proc.wait_live(port)
    client = RawClient.connect_url(f"ws://127.0.0.1:{port}/app/app-key")
    try:
        assert client.activity_timeout == 60
    finally:
        client.close()


def test_port_flag_beats_env_and_config(launch, workdir):
    env_port, file_port, flag_port = free_port(), free_port(), free_port()
    path = write_config(workdir, f"port = {file_port}\n")
    proc = launch(["--config", path, "--port", str(flag_port)], env={"PORT": str(env_port)})
    proc.wait_live(flag_port)
    assert port_closed(env_port) and port_closed(file_port)


def test_metrics_port_serves_prometheus_text(launch):
    port, metrics_port = free_port(), free_port()
    proc = launch(env={"PORT": str(port), "METRICS_PORT": str(metrics_port)})
    proc.wait_live(port)
    client = RawClient.connect_url(f"ws://127.0.0.1:{port}/app/app-key")
    try:
        def connected_line() -> str | None:
            resp = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)
            assert resp.status_code == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            lines = [ln for ln in resp.text.splitlines() if ln.startswith("sockudo_connected{")]
            return next((ln for ln in lines if 'app_id="app-id"' in ln and ln.endswith(" 1.0")), None)

        wait_until(connected_line, timeout=5, message="sockudo_connected 1 for app-id on /metrics")
    finally:
        client.close()
    # The metrics listener is not the API: no /metrics on the main port.
    assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 404
