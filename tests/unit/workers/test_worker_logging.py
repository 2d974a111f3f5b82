"""``python -m workers`` sets up logging as the server does: the configured apps' secrets are
redacted by value from every log line the worker (or a job, or RQ) writes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import workers.worker
from sockudo.redaction import REDACTED
from tests.support.procs import toml_config
from workers.__main__ import main

SECRET = "plain-words-worker-secret-Qz7"  # nothing but its value marks it as a secret


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved_handlers:
        root.addHandler(h)
    root.setLevel(saved_level)
    logging.captureWarnings(False)


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_a_worker_logging_an_app_secret_never_prints_it(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    config = tmp_path / "sockudo.toml"
    config.write_text(toml_config([{"id": "1", "key": "worker-key", "secret": SECRET}]))
    monkeypatch.setenv("LOG_OUTPUT_FORMAT", fmt)
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    ran: list[str] = []

    def fake_run_worker(connection: Any, queues: list[str], **kwargs: Any) -> bool:
        # What a job, RQ's "job started" line (it prints the job's arguments) or an error might say.
        log = logging.getLogger("workers.webhooks")
        log.warning("signing with %s", SECRET)
        logging.getLogger("rq.worker").info("webhooks: workers.webhooks.deliver({'secret': '%s'})", SECRET)
        log.error("delivery failed", extra={"app_id": "1", "error": f"bad secret {SECRET}"})
        ran.extend(queues)
        return True

    monkeypatch.setattr(workers.worker, "run_worker", fake_run_worker)
    assert main(["--url", "redis://127.0.0.1:1/0", "--config", str(config), "webhooks"]) == 0
    assert ran == ["webhooks"]
    err = capsys.readouterr().err
    assert "signing with" in err and "delivery failed" in err
    assert SECRET not in err
    assert err.count(REDACTED) >= 3
