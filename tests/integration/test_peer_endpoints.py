"""Requests that soketi and Sockudo answer and that load balancers, probes and dashboards written
for them send (docs/compatibility.md): soketi's ``GET /`` and ``GET /ready``, Sockudo's
``/up/{app_id}`` and ``/usage``, answered as those servers answer them."""

from __future__ import annotations

import signal
from collections.abc import Callable

import requests

from tests.support.procs import ServerProcess, wait_until
from tests.support.wsraw import RawClient

APP = {"id": "920", "key": "peer-key", "secret": "peer-secret"}


def test_root_and_ready_answer_ok_as_soketi(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory([APP])
    for path in ("/", "/ready"):
        resp = requests.get(server.url + path, timeout=5)
        assert (resp.status_code, resp.text) == (200, "OK"), path
        assert resp.headers["Content-Type"].startswith("text/plain")
    assert requests.head(server.url + "/", timeout=5).status_code == 200
    assert requests.post(server.url + "/", timeout=5).status_code == 405


def test_ready_answers_soketis_500_while_the_server_drains(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory([APP], shutdown_grace_period=8)
    # A client that never answers the server's close keeps the server draining for a while.
    stubborn = RawClient.connect(server, APP["key"])
    try:
        server.signal(signal.SIGTERM)
        answers: list[requests.Response] = []

        def refused() -> bool:
            answers.append(requests.get(server.url + "/ready", timeout=5))
            return answers[-1].status_code == 500

        wait_until(refused, timeout=10, interval=0.05, message="/ready to answer 500 while draining")
        resp = answers[-1]
        assert resp.json() == {"error": "The server is closing. Choose another server. :)", "code": 500}
        assert requests.get(server.url + "/up", timeout=5).text == "DRAINING"
        assert requests.get(server.url + "/", timeout=5).status_code == 200  # soketi's / stays OK
    finally:
        stubborn.ws.close()


def test_up_for_an_app_and_usage_answer_as_sockudo(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory([APP])
    ok = requests.get(f"{server.url}/up/{APP['id']}", timeout=5)
    assert (ok.status_code, ok.text, ok.headers["X-Health-Check"]) == (200, "OK", "OK")
    missing = requests.get(f"{server.url}/up/nope", timeout=5)
    assert (missing.status_code, missing.text, missing.headers["X-Health-Check"]) == (404, "NOT_FOUND", "NOT_FOUND")
    memory = requests.get(server.url + "/usage", timeout=5).json()["memory"]
    assert set(memory) == {"free", "used", "total", "percent"}
    assert memory["total"] > 0 and memory["used"] + memory["free"] == memory["total"]
    assert abs(memory["percent"] - memory["used"] * 100 / memory["total"]) < 1e-9  # not rounded
