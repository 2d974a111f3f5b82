"""The pure core stays importable without the edges (conventions: dependency direction).

gevent and Flask belong to ``sockudo.server`` and ``sockudo.http_api`` only; if the handler or
the protocol pulled them in, none of the other unit tests would be testing a sans-I/O core.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PURE_CORE = [
    "sockudo.protocol",
    "sockudo.auth",
    "sockudo.errors",
    "sockudo.config",
    "sockudo.apps",
    "sockudo.namespace",
    "sockudo.connection",
    "sockudo.adapter.local",
    "sockudo.handler",
    "sockudo.rest",
    "sockudo.wsframe",
    "sockudo.cache",
    "sockudo.lifecycle",
    "sockudo.metrics",
    "sockudo.metrics_labels",
    "sockudo.metrics_tcp",
    "sockudo.redaction",
    "sockudo.health",
    "sockudo.logs",
    "sockudo.listener",
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
