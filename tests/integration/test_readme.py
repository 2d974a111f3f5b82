"""The README's first steps, as a newcomer runs them: ``make run`` (through the Makefile, not
``python -m sockudo``), pusher-js connected with the README's options to the built-in app, and
an event published with the Python SDK (``SOCKUDO_DEFAULT_APP_ID=12345``, as the README says)
and with the Node SDK against the default ``app-id``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import pusher
import pytest
import requests

from tests.support.procs import ROOT, free_port, wait_until
from tests.support.pusherjs import PusherJsDriver

NODE_SDK_TRIGGER = """
const Pusher = require("pusher");
const [port, channel, event, data] = process.argv.slice(1);
new Pusher({appId: "app-id", key: "app-key", secret: "app-secret", host: "127.0.0.1", port, useTLS: false})
  .trigger(channel, event, JSON.parse(data))
  .then((r) => process.exit(r.status === 200 ? 0 : 1), (e) => { console.error(e); process.exit(1); });
"""


class MakeRun:
    """``make run`` in the repository, in its own process group, on free ports."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SOCKUDO_", "REDIS_", "PORT"))}
        self.proc = subprocess.Popen(
            ["make", "--no-print-directory", "run"], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            env={**clean, "PORT": str(self.port), "METRICS_PORT": str(free_port()), **env}, start_new_session=True)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_live(self) -> None:
        def live() -> bool:
            assert self.proc.poll() is None, f"make run exited:\n{self.output()}"
            return requests.get(f"http://127.0.0.1:{self.port}/live", timeout=1).status_code == 200

        wait_until(live, timeout=60, interval=0.2, message="make run to serve /live")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture
def make_run() -> Iterator[Callable[..., MakeRun]]:
    started: list[MakeRun] = []

    def start(**env: str) -> MakeRun:
        run = MakeRun(env)
        started.append(run)
        run.wait_live()
        return run

    yield start
    for run in started:
        run.stop()


def readme_client(js: PusherJsDriver, port: int, name: str):
    # The README's options: cluster (required by pusher-js), wsHost/wsPort, ws only, no stats.
    client = js.connect(name, key="app-key", port=port)
    client.wait_connected()
    client.subscribe("my-channel")
    client.wait_event("my-channel", "pusher:subscription_succeeded")
    return client


def test_make_run_then_pusher_js_receives_from_the_python_sdk(make_run, pusherjs) -> None:
    server = make_run(SOCKUDO_DEFAULT_APP_ID="12345")
    client = readme_client(pusherjs, server.port, "readme-python")
    sdk = pusher.Pusher(app_id="12345", key="app-key", secret="app-secret", host="127.0.0.1", port=server.port,
                        ssl=False)
    sdk.trigger("my-channel", "my-event", {"message": "hello"})
    assert client.wait_event("my-channel", "my-event")["data"] == {"message": "hello"}


def test_make_run_default_app_with_the_node_sdk(make_run, pusherjs) -> None:
    server = make_run()
    client = readme_client(pusherjs, server.port, "readme-node")
    done = subprocess.run(["node", "-e", NODE_SDK_TRIGGER, str(server.port), "my-channel", "my-event",
                           json.dumps({"message": "from node"})],
                          cwd=os.path.join(ROOT, "tests", "js"), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert client.wait_event("my-channel", "my-event")["data"] == {"message": "from node"}
