"""docs/clients.md, run as written: every ``<!-- tested: NAME -->`` snippet is executed against a
real server, only its ports replaced by free ones (6001: the server, 3000: the auth endpoint).

The browser page runs in jsdom (tests/js/browser.js) with pusher-js's web build served for the
page's js.pusher.com script; Laravel Echo's snippets run as ES modules in Node with ``window``
being the global object (a bundler would give Echo pusher-js's web build instead of the Node
one: the same client code). Auth endpoints are the page's Node and Python ones, publishers the
page's Python and Node SDK snippets.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.procs import ROOT, ServerProcess, free_port, wait_until
from tests.support.sdk import sdk_for

DOC = ROOT / "docs" / "clients.md"
JS = ROOT / "tests" / "js"
APP = {"id": "12345", "key": "app-key", "secret": "app-secret"}
SNIPPET = re.compile(r"<!-- tested: (?P<name>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<code>.*?)\n```", re.DOTALL)


def snippets() -> dict[str, tuple[str, str]]:
    return {m["name"]: (m["lang"], m["code"]) for m in SNIPPET.finditer(DOC.read_text(encoding="utf-8"))}


def test_every_code_block_of_the_page_is_tested() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert text.count("```") == 2 * len(snippets()), "a code block without <!-- tested: NAME --> above it"
    assert set(snippets()) == {"node-auth-endpoint", "python-auth-endpoint", "browser", "node-client",
                               "echo-pusher", "echo-reverb", "python-sdk", "node-sdk"}


def test_the_compatibility_page_holds_no_untested_code() -> None:
    """docs/compatibility.md states behaviour in tables (checked by test_peer_endpoints.py and the
    tests it links); it has no code of its own that could go stale."""
    assert "```" not in (ROOT / "docs" / "compatibility.md").read_text(encoding="utf-8")


class Snippet:
    """One snippet running as its own process, output kept for assertions."""

    def __init__(self, workdir: Path, name: str, ports: dict[str, int]) -> None:
        lang, code = snippets()[name]
        for placeholder, port in (("6001", ports["server"]), ("3000", ports["auth"])):
            code = code.replace(placeholder, str(port))
        self.name = name
        self.log_path = workdir / f"{name}.log"
        if lang == "python":
            path = workdir / f"{name}.py"
            command = [sys.executable, str(path)]
        elif lang == "html":
            path = workdir / f"{name}.html"
            command = ["node", str(JS / "browser.js"), str(path), f"http://127.0.0.1:{ports['auth']}/"]
        elif "import " in code:  # an ES module written for a page: ``window`` is the global object there
            (workdir / "window.mjs").write_text("globalThis.window = globalThis;\n", encoding="utf-8")
            path = workdir / f"{name}.mjs"
            code = 'import "./window.mjs";\n' + code
            command = ["node", str(path)]
        else:
            path = workdir / f"{name}.js"
            command = ["node", str(path)]
        path.write_text(code + "\n", encoding="utf-8")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(command, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, *lines: str, timeout: float = 20) -> None:
        wait_until(lambda: all(line in self.output() for line in lines), timeout=timeout, interval=0.1,
                   message=f"{self.name} to print {lines}; it printed:\n{self.output()}")

    def finish(self, timeout: float = 20) -> str:
        """Wait for a snippet that ends by itself; it must succeed."""
        assert self.proc.wait(timeout=timeout) == 0, f"{self.name} failed:\n{self.output()}"
        return self.output()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def run(server_factory: Callable[..., ServerProcess]) -> Iterator[Callable[[str], Snippet]]:
    """``run(name)`` starts the page's snippet against a fresh server and a free auth port."""
    server = server_factory([APP])
    ports = {"server": server.port, "auth": free_port()}
    # Inside tests/js, so that ``require``/``import`` find tests/js/node_modules.
    workdir = Path(tempfile.mkdtemp(prefix=".snippets-", dir=JS))
    started: list[Snippet] = []

    def start(name: str) -> Snippet:
        snippet = Snippet(workdir, name, ports)
        started.append(snippet)
        if name.endswith("auth-endpoint"):
            wait_until(lambda: _listening(ports["auth"], snippet), timeout=20, interval=0.1,
                       message=f"{name} to listen")
        return snippet

    start.server = server  # type: ignore[attr-defined]
    yield start
    for snippet in started:
        snippet.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def _listening(port: int, snippet: Snippet) -> bool:
    assert snippet.proc.poll() is None, f"{snippet.name} exited:\n{snippet.output()}"
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_subscribed(server: ServerProcess, *channels: str) -> None:
    sdk = sdk_for(server, APP)
    wait_until(lambda: all(sdk.channel_info(c)["occupied"] for c in channels), timeout=20, interval=0.1,
               message=f"the client to subscribe to {channels}")


def test_browser_page_with_node_auth_endpoint_and_python_sdk(run: Callable[[str], Snippet]) -> None:
    run("node-auth-endpoint")
    page = run("browser")
    wait_subscribed(run.server, "orders", "private-encrypted-orders")  # type: ignore[attr-defined]
    printed = run("python-sdk").finish()
    assert "'orders'" in printed and "'private-encrypted-orders'" in printed
    page.wait_for('order {"id":1}', 'secret order {"id":2}')


def test_node_client_with_python_auth_endpoint_and_node_sdk(run: Callable[[str], Snippet]) -> None:
    run("python-auth-endpoint")
    client = run("node-client")
    wait_subscribed(run.server, "orders", "private-encrypted-orders")  # type: ignore[attr-defined]
    printed = run("node-sdk").finish()
    assert "orders" in printed and "private-encrypted-orders" in printed
    client.wait_for('order {"id":3}', 'secret order {"id":4}')


@pytest.mark.parametrize("broadcaster", ["pusher", "reverb"])
def test_laravel_echo(run: Callable[[str], Snippet], broadcaster: str) -> None:
    run("node-auth-endpoint")
    echo = run(f"echo-{broadcaster}")
    server: ServerProcess = run.server  # type: ignore[attr-defined]
    wait_subscribed(server, "orders", "private-invoices")
    # What Laravel's broadcaster sends for an OrderShipped event and for one with broadcastAs().
    sdk = sdk_for(server, APP)
    sdk.trigger("orders", "App\\Events\\OrderShipped", {"order": 9})
    sdk.trigger("private-invoices", "invoice.paid", {"id": 10})
    echo.wait_for("shipped 9", "paid 10")
