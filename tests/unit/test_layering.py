"""The pure core stays importable without the edges (conventions: dependency direction).

gevent and Flask belong to ``sockudo.server`` and ``sockudo.http_api`` only; if the handler or
the protocol pulled them in, none of the other unit tests would be testing a sans-I/O core.
"""

from __future__ import annotations

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
    "sockudo.apps",
    "sockudo.adapter.local",
    "sockudo.services",
    "sockudo.handler",
    "sockudo.rest",
    "sockudo.publisher",
    "sockudo.cache",
    "sockudo.webhooks.lifecycle",
    "sockudo.webhooks.model",
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
