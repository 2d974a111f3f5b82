"""The operator console (docs/console.md), driven the way an operator uses it: Debian's Chromium
through Selenium, a pusher-js client and the official Python SDK on the other side.

Also what it must refuse: a wrong or missing token, a cross-site POST, an unauthenticated event
stream; and what it must never show: an app's secret.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.cluster import node_env, wait_formed
from tests.support.metrics import metric
from tests.support.procs import RedisServer, ServerProcess, free_port, free_port_pair, wait_until
from tests.support.pusherjs import PusherJsDriver
from tests.support.sdk import sdk_for, signed
from tests.support.webhooks import KEY, SECRET, Receiver, WorkerProcess, app, webhooks
from tests.support.wsraw import RawClient

TOKEN = "console-test-token-4f1b2c7d9e"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def console_url(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.metrics_port}/console"


@pytest.fixture
def console_server(server_factory: Callable[..., ServerProcess], receiver: Receiver) -> ServerProcess:
    """One app whose channel_occupied webhook the receiver refuses for good (410): a dead letter."""
    receiver.script["/gone"] = [410]
    return server_factory([app({"url": receiver.url("/gone"), "event_types": ["channel_occupied"]})],
                          webhooks=webhooks(), console={"token": TOKEN})


def signed_in(server: ServerProcess) -> tuple[requests.Session, str]:
    """A requests session signed in to the console, and its CSRF token."""
    http = requests.Session()
    resp = http.post(console_url(server) + "/login", data={"token": TOKEN}, allow_redirects=False, timeout=5)
    assert resp.status_code == 303, resp.text
    csrf = http.get(console_url(server) + "/api/session", timeout=5).json()["csrf"]
    return http, csrf


# -- the page in a real browser ------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.fail("chromium and chromium-driver are needed (make test installs them with apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1300"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def log_rows(driver: Any) -> list[dict[str, str]]:
    """The event log as the operator sees it (newest first)."""
    script = """
      return Array.from(document.querySelectorAll('#log tr')).filter(r => !r.hidden).map(r => {
        const c = r.children;
        return {kind: c[2].textContent, channel: c[3].textContent, event: c[4].textContent,
                details: c[5].textContent};
      });"""
    rows: list[dict[str, str]] = driver.execute_script(script)
    return rows


def test_operator_watches_publishes_and_replays_a_dead_letter_in_chromium(
        console_server: ServerProcess, receiver: Receiver, pusherjs: PusherJsDriver,
        browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    server = console_server
    browser.get(console_url(server))
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "signin").click()
    wait_until(lambda: browser.find_element(By.ID, "stream-state").text == "live", timeout=10,
               message="the event stream to open")
    cookie = browser.get_cookie("sockudo_console")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # A pusher-js client connects and subscribes: the log shows both.
    client = pusherjs.connect("alice", key=KEY, port=server.port, secret=SECRET, app_id="100")
    client.wait_connected()
    client.subscribe("room")
    client.wait_subscribed("room")
    wait_until(lambda: any(r["kind"] == "connection" for r in log_rows(browser)), timeout=5,
               message="the connection in the log")
    wait_until(lambda: any(r["kind"] == "subscribed" and r["channel"] == "room" for r in log_rows(browser)),
               timeout=5, message="the subscription in the log")

    # An event published with the SDK is in the log within a second, payload included.
    sdk_for(server, {"id": "100", "key": KEY, "secret": SECRET}).trigger("room", "sdk-event", {"n": 42})
    published = time.monotonic()
    row = wait_until(lambda: next((r for r in log_rows(browser) if r["event"] == "sdk-event"), None), timeout=1.0,
                     interval=0.01, message="the SDK's event in the log within a second")
    assert row["kind"] == "api_message" and row["channel"] == "room" and '{"n":42}' in row["details"].replace(" ", "")
    assert time.monotonic() - published < 1.0

    # The event creator publishes through the REST path; the pusher-js subscriber gets it.
    browser.find_element(By.ID, "pub-channel").send_keys("room")
    browser.find_element(By.ID, "pub-event").send_keys("from-console")
    data = browser.find_element(By.ID, "pub-data")
    data.clear()
    data.send_keys('{"hello": "operator"}')
    browser.find_element(By.ID, "pub-send").click()
    got = client.wait_for({"type": "event", "channel": "room", "event": "from-console"}, timeout=5)
    assert got["data"] == {"hello": "operator"}
    wait_until(lambda: browser.find_element(By.ID, "pub-result").text == "Sent.", timeout=5)

    # The channel list shows the subscriber.
    browser.find_element(By.ID, "channels-refresh").click()
    wait_until(lambda: [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#channels tr td")][:2]
               == ["room", "1"], timeout=5, message="room with one subscriber in the channel list")

    # channel_occupied went to an endpoint that answered 410: one dead letter, replayed from the page.
    wait_until(lambda: len(receiver.at("/gone")) == 1, timeout=10, message="the refused webhook")
    first_delivery = receiver.at("/gone")[0].delivery_id
    rows = lambda: browser.find_elements(By.CSS_SELECTOR, "#dead-letters tr")  # noqa: E731

    def listed() -> bool:
        browser.find_element(By.ID, "dl-refresh").click()
        return len(rows()) == 1

    wait_until(listed, timeout=10, interval=0.2, message="the dead letter in the page")
    rows()[0].find_element(By.CSS_SELECTOR, "button.replay").click()
    wait_until(lambda: [r.status for r in receiver.at("/gone")] == [410, 200], timeout=10,
               message="the replayed delivery to arrive")
    assert receiver.at("/gone")[1].delivery_id == first_delivery  # receivers dedupe on it
    assert receiver.at("/gone")[1].events == [{"name": "channel_occupied", "channel": "room"}]
    wait_until(lambda: browser.find_element(By.ID, "dl-result").text.startswith("Replayed"), timeout=5)
    wait_until(lambda: any(r["kind"] == "webhook" and "status=delivered" in r["details"]
                           for r in log_rows(browser)), timeout=5, message="the delivery in the log")

    # Filter by channel, then pause: events wait until Resume.
    sdk = sdk_for(server, {"id": "100", "key": KEY, "secret": SECRET})
    browser.find_element(By.ID, "filter-channel").send_keys("other")
    assert log_rows(browser) == []  # nothing on a channel named like "other" yet
    sdk.trigger("other-room", "filtered-in", {})
    wait_until(lambda: [r["event"] for r in log_rows(browser)] == ["filtered-in"], timeout=5,
               message="only the filtered channel's event")
    browser.find_element(By.ID, "pause").click()
    sdk.trigger("other-room", "while-paused", {})
    wait_until(lambda: "1 waiting" in browser.find_element(By.ID, "paused-note").text, timeout=5,
               message="the paused event held")
    assert [r["event"] for r in log_rows(browser)] == ["filtered-in"]
    browser.find_element(By.ID, "pause").click()  # Resume
    wait_until(lambda: [r["event"] for r in log_rows(browser)] == ["while-paused", "filtered-in"], timeout=5)
    browser.find_element(By.ID, "filter-channel").clear()
    browser.find_element(By.ID, "filter-channel").send_keys(" ")  # an input event; blanks are ignored

    # The client leaves: a disconnection with its close code.
    client.disconnect()
    wait_until(lambda: any(r["kind"] == "disconnection" for r in log_rows(browser)), timeout=5)

    shot = tmp_path / "console.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    assert SECRET not in browser.page_source


# -- what it refuses ------------------------------------------------------------------------------


def test_wrong_or_missing_token_and_unauthenticated_reads_are_refused(console_server: ServerProcess) -> None:
    base = console_url(console_server)
    page = requests.get(base + "/", timeout=5)
    assert page.status_code == 200 and 'id="token"' in page.text and "Event log" not in page.text
    for form in ({"token": "wrong"}, {"token": ""}, {}, {"token": TOKEN[:-1]}):
        resp = requests.post(base + "/login", data=form, allow_redirects=False, timeout=5)
        assert resp.status_code == 401 and "sockudo_console" not in resp.headers.get("Set-Cookie", "")
    for path in ("/api/session", "/api/apps/100/overview", "/api/apps/100/channels", "/api/apps/100/dead-letters"):
        assert requests.get(base + path, timeout=5).status_code == 401
    # The event stream, without a session or with a made-up one.
    assert requests.get(base + "/api/apps/100/events", timeout=5, stream=True).status_code == 401
    forged = requests.get(base + "/api/apps/100/events", cookies={"sockudo_console": "forged"}, timeout=5, stream=True)
    assert forged.status_code == 401
    assert requests.post(base + "/api/apps/100/publish", json={"channel": "c", "name": "e"},
                         timeout=5).status_code == 401
    # Not on the public port.
    assert requests.get(f"{console_server.url}/console/", timeout=5).status_code == 404


def test_without_a_configured_token_one_is_made_and_printed_once(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory([app()])  # what `make run` does: no CONSOLE_TOKEN
    line = wait_until(lambda: next((ln for ln in server.log().splitlines() if "sockudo console:" in ln), None),
                      timeout=5, message="the console's address on the terminal")
    assert f"http://127.0.0.1:{server.metrics_port}/console/" in line
    token = line.split("made for this run: ", 1)[1].split(";", 1)[0]
    assert len(token) >= 32
    assert server.log().count(token) == 1  # printed once, and not in any log line
    base = console_url(server)
    assert requests.post(base + "/login", data={"token": token}, allow_redirects=False, timeout=5).status_code == 303
    other = server_factory([app()])
    assert requests.post(console_url(other) + "/login", data={"token": token}, allow_redirects=False,
                         timeout=5).status_code == 401  # a new token per start


@pytest.mark.slow
def test_with_workers_one_token_made_at_start_opens_every_workers_console(
        server_factory: Callable[..., ServerProcess], redis_url: str) -> None:
    metrics_port = free_port_pair()  # worker i has its metrics listener, and console, on metrics.port + i
    server = server_factory([app()], env=node_env(redis_url, METRICS_PORT=str(metrics_port)),
                            extra_args=["--workers", "2"])
    line = wait_until(lambda: next((ln for ln in server.log().splitlines() if "for every worker" in ln), None),
                      timeout=5, message="the workers' console token on the terminal")
    token = line.split("made for this run: ", 1)[1].split(";", 1)[0]
    assert server.log().count(token) == 1
    for port in (metrics_port, metrics_port + 1):
        login = f"http://127.0.0.1:{port}/console/login"
        wait_until(lambda login=login: requests.post(login, data={"token": token}, allow_redirects=False,
                                                     timeout=5).status_code == 303,
                   timeout=20, message=f"sign-in on the worker with metrics port {port}")


def test_a_listener_of_its_own(server_factory: Callable[..., ServerProcess]) -> None:
    port = free_port()
    server = server_factory([app()], console={"token": TOKEN, "host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}/console"
    assert requests.post(base + "/login", data={"token": TOKEN}, allow_redirects=False, timeout=5).status_code == 303
    assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 404  # the console only
    assert requests.get(console_url(server) + "/", timeout=5).status_code == 404  # not on the metrics listener
    assert "sockudo_connected" in server.metrics_text()


def test_cross_site_posts_are_refused(console_server: ServerProcess, pusherjs: PusherJsDriver) -> None:
    base = console_url(console_server)
    client = pusherjs.connect("bob", key=KEY, port=console_server.port, secret=SECRET, app_id="100")
    client.wait_connected()
    client.subscribe("csrf-room")
    client.wait_subscribed("csrf-room")
    # Signing in from another site (login CSRF).
    evil = {"Origin": "http://evil.example"}
    assert requests.post(base + "/login", data={"token": TOKEN}, headers=evil, allow_redirects=False,
                         timeout=5).status_code == 403
    http, csrf = signed_in(console_server)
    set_cookie = requests.post(base + "/login", data={"token": TOKEN}, allow_redirects=False,
                               timeout=5).headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    event: dict[str, Any] = {"channel": "csrf-room", "name": "forged", "data": {}}
    publish = base + "/api/apps/100/publish"
    assert http.post(publish, json=event, timeout=5).status_code == 403  # no CSRF token
    assert http.post(publish, json=event, headers={"X-Console-CSRF": "guess"}, timeout=5).status_code == 403
    assert http.post(publish, json=event, headers={"X-Console-CSRF": csrf, **evil}, timeout=5).status_code == 403
    assert http.post(publish, json=event, headers={"X-Console-CSRF": csrf, "Sec-Fetch-Site": "cross-site"},
                     timeout=5).status_code == 403
    assert http.post(base + "/api/apps/100/dead-letters/x/replay", timeout=5).status_code == 403
    # None of them published; the same request with the token does.
    ok = http.post(publish, json={**event, "name": "allowed"}, headers={"X-Console-CSRF": csrf}, timeout=5)
    assert ok.status_code == 200, ok.text
    got = client.wait_for(lambda e: e.get("type") == "event" and e.get("channel") == "csrf-room"
                          and not e["event"].startswith("pusher"), timeout=5)
    assert got["event"] == "allowed"  # the first app event on the socket: no refused one got through
    # The REST path's limits apply to the console too.
    too_long = http.post(publish, json={"channel": "csrf-room", "name": "x" * 500, "data": {}},
                         headers={"X-Console-CSRF": csrf}, timeout=5)
    assert too_long.status_code == 400


def test_no_secret_reaches_the_page(console_server: ServerProcess) -> None:
    http, csrf = signed_in(console_server)
    base = console_url(console_server)
    for path in ("/", "/api/session", "/api/apps/100/overview", "/api/apps/100/channels",
                 "/api/apps/100/dead-letters"):
        resp = http.get(base + path, timeout=5)
        assert resp.status_code == 200, path
        assert SECRET not in resp.text and TOKEN not in resp.text
        assert resp.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]


def sse(resp: requests.Response, timeout: float) -> Iterator[tuple[str, Any]]:
    """``(event name, parsed data)`` from a Server-Sent Events response, until ``timeout``."""
    deadline = time.monotonic() + timeout
    kind = "message"
    for raw in resp.iter_lines():
        line = raw.decode("utf-8")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, json.loads(line[6:])
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing expected arrived on the stream within {timeout}s")


@pytest.mark.slow
def test_with_redis_the_console_shows_every_node(server_factory: Callable[..., ServerProcess],
                                                 pusherjs: PusherJsDriver, own_redis: RedisServer) -> None:
    redis_server = own_redis.start()
    nodes = [server_factory([app()], start=False, env=node_env(redis_server.url), console={"token": TOKEN})
             for _ in range(2)]
    for node in nodes:
        node.start()
    wait_formed(nodes)
    a, b = nodes
    http, _ = signed_in(a)
    this_node = http.get(console_url(a) + "/api/session", timeout=5).json()["node"]
    clients = 0
    remote: list[dict[str, Any]] = []
    with http.get(console_url(a) + "/api/apps/100/events", stream=True, timeout=10) as stream:
        assert stream.status_code == 200
        # Node b learns within about a second that a console listens; until then its events
        # stay on b. On each stats tick (once a second) without b's event yet, connect one more
        # client to b, until one shows up on a's console.
        for kind, data in sse(stream, timeout=15):
            if kind == "events":
                remote += [e for e in data if e["kind"] == "connection" and e["node"] != this_node]
            if remote:
                break
            if kind == "stats":
                pusherjs.connect(f"c{clients}", key=KEY, port=b.port, secret=SECRET, app_id="100")
                clients += 1
    assert remote[0]["app"] == "100" and remote[0]["socket_id"]

    def cluster() -> dict[str, int]:
        view = http.get(console_url(a) + "/api/apps/100/overview", timeout=5).json()["cluster"]
        return {n["id"]: n["connections"] for n in view["nodes"]}

    wait_until(lambda: len(cluster()) == 2 and sum(cluster().values()) == clients, timeout=10,
               message="both nodes and b's connections in the cluster view")
    assert cluster()[this_node] == 0


def test_with_rq_workers_the_console_shows_their_deliveries(
        server_factory: Callable[..., ServerProcess], receiver: Receiver, redis_url: str,
        worker_factory: Callable[[], WorkerProcess]) -> None:
    """Deliveries happen in the worker processes; they reach the console through Redis."""
    server = server_factory([app({"url": receiver.url("/hook"), "event_types": ["channel_occupied"]})],
                            env={"REDIS_URL": redis_url}, webhooks=webhooks(), console={"token": TOKEN})
    worker_factory()
    http, _ = signed_in(server)
    with http.get(console_url(server) + "/api/apps/100/events", stream=True, timeout=10) as stream:
        assert stream.status_code == 200
        client: RawClient | None = None
        statuses: list[tuple[str, str]] = []
        # The worker asks Redis whether a console listens at most once a second: subscribe once
        # the stream is open and stats have flowed for a second (two ticks).
        ticks = 0
        for kind, data in sse(stream, timeout=20):
            if kind == "stats":
                ticks += 1
                if ticks == 2:
                    client = RawClient.connect(server, KEY)
                    client.subscribe("rq-room")
            elif kind == "events":
                statuses += [(e["status"], e["node"]) for e in data if e["kind"] == "webhook"]
                if any(status == "delivered" for status, _ in statuses):
                    break
        assert client is not None
        client.close()
    assert ("queued", http.get(console_url(server) + "/api/session", timeout=5).json()["node"]) in statuses
    delivered = [node for status, node in statuses if status == "delivered"]
    assert delivered and delivered[0].startswith("worker ")
    assert receiver.events_at("/hook") == [{"name": "channel_occupied", "channel": "rq-room"}]


def test_push_publishes_in_the_log_and_their_status_looked_up(console_server: ServerProcess) -> None:
    http, _ = signed_in(console_server)
    base = console_url(console_server)
    publish = {"publishId": "console-p1", "recipients": [{"type": "channel", "channel": "news"}],
               "payload": {"title": "hi"}}
    with http.get(base + "/api/apps/100/events", stream=True, timeout=10) as stream:
        messages = sse(stream, timeout=10)
        next(m for m in messages if m[0] == "stats")  # the stream is attached
        assert metric(console_server.metrics_text(), "sockudo_console_streams") == 1
        resp = signed(console_server, "POST", "/apps/100/push/publish", publish, app=app())
        assert resp.status_code == 202, resp.text
        pushes = next(data for kind, data in messages if kind == "events" and any(e["kind"] == "push" for e in data))
    # The page is gone: the tap detaches (nothing is recorded any more) within a stream tick.
    wait_until(lambda: metric(console_server.metrics_text(), "sockudo_console_streams") == 0, timeout=5,
               message="the closed stream to detach the tap")
    (event,) = [e for e in pushes if e["kind"] == "push"]
    assert event["publish_id"] == "console-p1" and event["status"] == "accepted"
    assert event["expected_recipients"] == 0
    status = wait_until(lambda: http.get(base + "/api/apps/100/push/console-p1", timeout=5).json().get("state")
                        == "succeeded" and http.get(base + "/api/apps/100/push/console-p1", timeout=5).json(),
                        timeout=10, message="the publish's status")
    assert status["publishId"] == "console-p1"
    assert http.get(base + "/api/apps/100/push/unknown-id", timeout=5).status_code == 404
    assert requests.get(base + "/api/apps/100/push/console-p1", timeout=5).status_code == 401
