"""A real Prometheus (Debian's ``prometheus`` package; ``make test`` installs it) on loopback,
with a generated config: short scrape/evaluation intervals, the given targets and rule files."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import requests

from .procs import ROOT, free_port, wait_until

DASHBOARD = ROOT / "conf" / "grafana" / "sockudo.json"
ALERTS = ROOT / "conf" / "prometheus" / "alerts.yml"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; run `make test`, which installs Debian's prometheus package")
    return path


def fast_rules(source: Path, destination: Path, for_window: str = "3s") -> Path:
    """A test copy of the alert rules with every ``for:`` shortened (the expressions unchanged)."""
    text = re.sub(r"(?m)^(\s*)for: \S+$", rf"\1for: {for_window}", source.read_text(encoding="utf-8"))
    destination.write_text(text, encoding="utf-8")
    return destination


class PrometheusServer:
    def __init__(self, targets: dict[str, list[str]], rule_files: list[Path] | None = None,
                 interval: str = "1s") -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sockudo-prometheus-"))
        self.targets = targets
        self.rule_files = rule_files or []
        self.interval = interval
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> str:
        lines = ["global:", f"  scrape_interval: {self.interval}", f"  evaluation_interval: {self.interval}",
                 f"  scrape_timeout: {self.interval}"]
        if self.rule_files:
            lines.append("rule_files:")
            lines.extend(f"  - {path}" for path in self.rule_files)
        lines.append("scrape_configs:")
        for job, addresses in self.targets.items():
            lines += [f"  - job_name: {job}", "    static_configs:", "      - targets:"]
            lines.extend(f"          - {address}" for address in addresses)
        return "\n".join(lines) + "\n"

    def start(self) -> PrometheusServer:
        config = self.dir / "prometheus.yml"
        config.write_text(self._config(), encoding="utf-8")
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir,
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{(self.dir / 'prometheus.log').read_text()}")
            return requests.get(self.url + "/-/ready", timeout=1).status_code == 200

        wait_until(ready, timeout=30, interval=0.1, message="prometheus to be ready")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the HTTP API

    def api(self, path: str, **params: Any) -> Any:
        resp = requests.get(self.url + "/api/v1/" + path, params=params, timeout=5)
        body = resp.json()
        assert body.get("status") == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def series_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def metadata_names(self) -> set[str]:
        """Metric families Prometheus has seen HELP/TYPE for (including families with no series yet)."""
        return set(self.api("metadata"))

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        expected = sum(len(v) for v in self.targets.values())
        return len(active) == expected and all(t["health"] == "up" for t in active)

    def alert_state(self, name: str) -> str | None:
        """``firing``, ``pending`` or None (inactive) for the alert called ``name``."""
        states = {a["state"] for a in self.api("alerts")["alerts"] if a["labels"].get("alertname") == name}
        return "firing" if "firing" in states else "pending" if "pending" in states else None
