"""The Procfile as a Procfile platform runs it (docs/deploy.md): ``honcho start`` in the
repository, with the virtualenv's ``bin`` first on ``PATH`` (what activating it does, and what
Heroku's Python support gives every process), ``REDIS_URL`` and ``SOCKUDO_CONFIG`` set, and the
web process on the ``$PORT`` honcho hands it. Proven: ``web`` serves clients on ``$PORT``, the
``worker`` delivers a webhook the web process queued in Redis, ``push`` works the ``push``
queue, and one SIGTERM stops all three cleanly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import redis
import requests
from rq import Worker

from tests.support.procs import ROOT, RedisServer, free_port, toml_config, wait_until
from tests.support.webhooks import Receiver
from tests.support.wsraw import RawClient

APP = {"id": "12345", "key": "procfile-key", "secret": "procfile-secret"}
VENV_BIN = str(Path(sys.executable).parent)  # the interpreter running the suite has the requirements


def honcho_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOCKUDO_", "REDIS_", "PORT", "METRICS_"))}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def test_honcho_runs_web_worker_and_push(own_redis: RedisServer, receiver: Receiver) -> None:
    own_redis.start()
    honcho = shutil.which("honcho", path=honcho_env()["PATH"])
    assert honcho is not None, "honcho is in requirements-dev.txt"
    workdir = Path(tempfile.mkdtemp(prefix="sockudo-procfile-"))
    config = workdir / "sockudo.toml"
    app = {**APP, "webhooks": [{"url": receiver.url("/hook"), "event_types": ["channel_occupied"]}]}
    config.write_text(toml_config([app], webhooks={"debounce_ms": 0}), encoding="utf-8")
    port = free_port()
    log = open(workdir / "honcho.log", "wb")
    proc = subprocess.Popen(
        [honcho, "start", "--no-colour", "-f", "Procfile", "-p", str(port)], cwd=ROOT, stdout=log,
        stderr=subprocess.STDOUT,
        env=honcho_env(REDIS_URL=own_redis.url, SOCKUDO_CONFIG=str(config), METRICS_PORT=str(free_port())))

    def output() -> str:
        return (workdir / "honcho.log").read_text(encoding="utf-8", errors="replace")

    def live() -> bool:
        assert proc.poll() is None, f"honcho exited:\n{output()}"
        return requests.get(f"http://127.0.0.1:{port}/live", timeout=1).status_code == 200

    try:
        wait_until(live, timeout=60, interval=0.2, message="web to serve /live on honcho's $PORT")
        connection = redis.Redis.from_url(own_redis.url)

        def worker_queues() -> list[list[str]]:
            return sorted(w.queue_names() for w in Worker.all(connection=connection))

        wait_until(lambda: worker_queues() == [["push"], ["webhooks"]], timeout=30, interval=0.2,
                   message=f"the worker and push processes to register with Redis:\n{output()}")

        client = RawClient.connect_url(f"ws://127.0.0.1:{port}/app/{APP['key']}")
        client.send_json({"event": "pusher:subscribe", "data": {"channel": "orders"}})
        client.expect("pusher_internal:subscription_succeeded")
        wait_until(lambda: [e["name"] for e in receiver.events_at("/hook")] == ["channel_occupied"], timeout=30,
                   interval=0.1, message=f"the worker to deliver channel_occupied:\n{output()}")
        assert json.loads(receiver.at("/hook")[0].body)["events"][0]["channel"] == "orders"
        client.close()

        proc.send_signal(signal.SIGTERM)  # as a platform stopping the app, or Ctrl-C on honcho
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM, output()  # honcho's own status: stopped by SIGTERM
        text = output()
        for process in ("web.1", "worker.1", "push.1"):  # each one exited by itself, cleanly
            assert f"{process} stopped (rc=0)" in text, text
        assert "Traceback" not in text, text
    finally:
        if proc.poll() is None:  # honcho stops its processes (each in a session of its own) itself
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
