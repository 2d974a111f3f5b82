"""``--workers N``: N server processes on one port (SO_REUSEPORT), joined through Redis.

The parent only starts, watches and stops its children; each child is a full server with its
own node id and its own metrics listener on ``metrics.port + index`` (documented in
docs/configuration.md: one scrape target per process).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from sockudo.config import Config

logger = logging.getLogger(__name__)

RESTART_DELAY = 1.0


def _child_args(argv: list[str]) -> list[str]:
    """The parent's arguments without --workers (children run one worker each)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return out


def _console_token(config: Config) -> dict[str, str]:
    """One console token for every worker process (each has its own console on its metrics
    port): made here when none is configured, and printed once."""
    if not config.console.enabled or config.console.token:
        return {}
    from sockudo.console.sessions import generate_token

    if config.log_format != "human" and not sys.stderr.isatty():
        return {}  # not shown with JSON logs: each worker then says to set CONSOLE_TOKEN
    token = generate_token()
    print(f"sockudo console: access token for every worker, made for this run: {token}; "
          "set CONSOLE_TOKEN to choose one", file=sys.stderr, flush=True)
    return {"CONSOLE_TOKEN": token}


def supervise(workers: int, argv: list[str], config: Config) -> int:
    args = [sys.executable, "-m", "sockudo", *_child_args(argv)]
    stopping = False
    console_env = _console_token(config)

    def start(index: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.update({
            "SOCKUDO_REUSE_PORT": "1",
            "WEB_CONCURRENCY": "1",
            "SOCKUDO_WORKER_INDEX": str(index),
            "METRICS_PORT": str(config.metrics.port + index),
            "METRICS_TCP_EXPORTER_PORT": str(config.metrics.tcp_exporter.port + index),  # one exporter each
            "PORT": str(config.port),
            "HOST": config.host,
            **console_env,
        })
        return subprocess.Popen(args, env=env)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    procs = [start(i) for i in range(workers)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("started worker processes", extra={"workers": workers, "pids": [p.pid for p in procs]})
    while not stopping:
        for index, proc in enumerate(procs):
            code = proc.poll()
            if code is not None and not stopping:
                logger.error("worker exited; restarting it", extra={"worker": index, "exit_code": code})
                time.sleep(RESTART_DELAY)
                procs[index] = start(index)
        time.sleep(0.2)
    deadline = time.monotonic() + config.shutdown_grace_period + 5
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return 0
