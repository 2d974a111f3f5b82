"""The pure core stays importable without the edges (conventions: dependency direction).

gevent and Flask belong to ``sockudo.server`` and ``sockudo.http_api`` only; if the handler or
the protocol pulled them in, none of the other unit tests would be testing a sans-I/O core.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PURE_CORE = [
    "sockudo.core.protocol",
    "sockudo.core.auth",
    "sockudo.core.errors",
    "sockudo.core.wsframe",
    "sockudo.core.namespace",
    "sockudo.core.connection",
    "sockudo.config",
    "sockudo.config.coerce",
    "sockudo.config.schema",
    "sockudo.config.loader",
    "sockudo.config.sockudo_keys",
    "sockudo.config.listener",
    "sockudo.config.console",
    "sockudo.apps",
    "sockudo.adapter.local",
    "sockudo.services",
    "sockudo.handler",
    "sockudo.rest",
    "sockudo.publisher",
    "sockudo.cache",
    "sockudo.webhooks.lifecycle",
    "sockudo.webhooks.model",
    "sockudo.metrics.instruments",
    "sockudo.metrics.registry",
    "sockudo.metrics.labels",
    "sockudo.metrics.tcp.wire",
    "sockudo.metrics.tcp.exporter",
    "sockudo.redaction",
    "sockudo.health",
    "sockudo.logs",
    "sockudo.ratelimit.memory",
    "sockudo.history.store",
    "sockudo.history.recovery",
    "sockudo.console.tap",
    "sockudo.console.sessions",
    "sockudo.console.stats",
    "sockudo.console.service",
    "sockudo.console.relay",
    "sockudo.console.metrics",
]
ROOT = Path(__file__).resolve().parents[2]
EDGES = ("gevent", "geventwebsocket", "flask", "werkzeug")


def test_pure_core_imports_no_gevent_or_flask() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in PURE_CORE)
        + f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({EDGES!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_job_modules_import_without_gevent_and_sockudo_never_imports_workers() -> None:
    """The job functions also run under a plain ``rq worker``; only the worker process
    (``workers.worker``, ``python -m workers``) is gevent's."""
    code = ("import sys, workers.webhooks, workers.push, sockudo.webhooks.model, sockudo.webhooks.delivery;"
            "print('gevent' in sys.modules or 'flask' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    def imported(path: Path) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
        return names

    for path in (ROOT / "sockudo").rglob("*.py"):
        assert "workers" not in imported(path), f"{path} imports workers"
    for path in (ROOT / "sockudo" / "webhooks").glob("*.py"):
        assert not imported(path) & {"gevent", "flask", "geventwebsocket"}, path.name
    assert not imported(ROOT / "sockudo" / "webhooks" / "model.py") & {"rq", "redis", "http", "socket"}
