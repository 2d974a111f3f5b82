"""Security properties of a real server (docs/security.md):

- TLS on the listener (``[ssl]``): ``wss://`` with websocket-client and an ``https`` REST call,
  against a self-signed certificate made here with ``cryptography``; a client that never starts
  the TLS handshake is dropped;
- secrets never leave: with a distinctive app secret, auth failures, bad input and errors are
  exercised, then the log (at DEBUG), ``/metrics`` and every response body are searched for it;
- app isolation on two nodes joined through Redis: two apps using the same channel names and
  user ids never see each other's events, counts, member lists or terminations;
- every ``/apps/…`` and ``/users/…`` route (enumerated from the Flask URL map, so a new route is
  covered automatically) refuses unsigned and mis-signed calls, and the only unsigned routes are
  the documented operational ones.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.cluster import metrics_at, node_env, start_all, wait_formed
from tests.support.procs import RedisServer, ServerProcess, wait_until
from tests.support.sdk import sdk_for, signed_url
from tests.support.wsraw import RawClient

SECRET = "zq-SECRET-7f3a9c41-never-print-me"
APP: dict[str, Any] = {"id": "100", "key": "sec-key", "secret": SECRET, "enable_client_messages": True,
                       "enable_user_authentication": False}


# -- TLS ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost."""
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_server(certificate: tuple[Path, Path]) -> Iterator[ServerProcess]:
    cert_path, key_path = certificate
    server = ServerProcess([APP], env={"SSL_ENABLED": "true", "SSL_CERT_PATH": str(cert_path)},
                           ssl={"key_path": str(key_path)}, http_api={"header_timeout_seconds": 1.5},
                           shutdown_grace_period=2)
    server.start(wait=False)
    wait_until(lambda: _https_live(server, cert_path), timeout=20, message="the TLS listener")
    yield server
    server.stop()


def _https_live(server: ServerProcess, cert_path: Path) -> bool:
    if server.proc is not None and server.proc.poll() is not None:
        raise RuntimeError(server.log())
    return requests.get(f"https://127.0.0.1:{server.port}/live", verify=str(cert_path), timeout=2).status_code == 200


def test_wss_and_https_on_the_same_listener(tls_server, certificate):
    cert_path, _ = certificate
    base = f"https://127.0.0.1:{tls_server.port}"
    ws = websocket.create_connection(f"wss://127.0.0.1:{tls_server.port}/app/{APP['key']}?protocol=7",
                                     sslopt={"ca_certs": str(cert_path)}, timeout=5)
    try:
        established = json.loads(ws.recv())
        assert established["event"] == "pusher:connection_established"
        ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "tls-channel"}}))
        assert json.loads(ws.recv())["event"] == "pusher_internal:subscription_succeeded"
        for i in range(3):  # several, so both the inline send and the writer greenlet are used
            body = json.dumps({"name": "over-tls", "channel": "tls-channel", "data": f"d{i}"}).encode()
            path = f"/apps/{APP['id']}/events"
            resp = requests.post(signed_url(base, "POST", path, APP, body), data=body, verify=str(cert_path),
                                 headers={"Content-Type": "application/json"}, timeout=5)
            assert resp.status_code == 200, resp.text
        assert [json.loads(ws.recv())["data"] for _ in range(3)] == ["d0", "d1", "d2"]
        ws.ping(b"tls")  # control frames through TLS as well
        ws.send(json.dumps({"event": "pusher:ping", "data": {}}))
        assert json.loads(ws.recv())["event"] == "pusher:pong"
        ws.close(status=1000)  # the close handshake completes through TLS
    finally:
        ws.shutdown()
    info = requests.get(signed_url(base, "GET", f"/apps/{APP['id']}/channels", APP), verify=str(cert_path), timeout=5)
    wait_until(lambda: requests.get(signed_url(base, "GET", f"/apps/{APP['id']}/channels", APP),
                                    verify=str(cert_path), timeout=5).json() == {"channels": {}}, timeout=5)
    assert info.status_code == 200


def test_a_close_the_server_starts_completes_over_tls(tls_server, certificate):
    """The server closes (here: 4009 for a terminated user), the client answers with its close
    frame, and the server reads that answer through TLS (a half-close would have dropped the TLS
    layer and turned the answer into a protocol error)."""
    cert_path, _ = certificate
    ws = websocket.create_connection(f"wss://127.0.0.1:{tls_server.port}/app/{APP['key']}?protocol=7",
                                     sslopt={"ca_certs": str(cert_path)}, timeout=5)
    try:
        socket_id = json.loads(json.loads(ws.recv())["data"])["socket_id"]
        user_data = '{"id":"tls-user"}'
        auth = hmac.new(SECRET.encode(), f"{socket_id}::user::{user_data}".encode(), hashlib.sha256).hexdigest()
        signin = {"auth": f"{APP['key']}:{auth}", "user_data": user_data}
        ws.send(json.dumps({"event": "pusher:signin", "data": signin}))
        assert json.loads(ws.recv())["event"] == "pusher:signin_success"
        path = f"/apps/{APP['id']}/users/tls-user/terminate_connections"
        base = f"https://127.0.0.1:{tls_server.port}"
        assert requests.post(signed_url(base, "POST", path, APP, b"{}"), data=b"{}", verify=str(cert_path),
                             headers={"Content-Type": "application/json"}, timeout=5).status_code == 200
        assert json.loads(ws.recv())["data"]["code"] == 4009
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 4009
        ws.send_close(status=4009)
    finally:
        ws.shutdown()

    def reasons() -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for family in text_string_to_metric_families(tls_server.metrics_text()):
            for sample in family.samples:
                if sample.name in ("sockudo_disconnections_by_reason_total", "sockudo_connection_errors_total"):
                    key = sample.labels.get("reason") or sample.labels.get("error_type", "")
                    out[key] = out.get(key, 0) + sample.value
        return out

    wait_until(lambda: reasons().get("closed_4009"), timeout=5, message="the close to complete")
    assert not reasons().get("protocol_error"), reasons()


def test_a_refused_connection_over_tls_still_gets_its_code(tls_server, certificate):
    cert_path, _ = certificate
    ws = websocket.create_connection(f"wss://127.0.0.1:{tls_server.port}/app/no-such-key",
                                     sslopt={"ca_certs": str(cert_path)}, timeout=5)
    try:
        frame = json.loads(ws.recv())
        assert frame["event"] == "pusher:error" and frame["data"]["code"] == 4001
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 4001
    finally:
        ws.shutdown()


def test_plaintext_and_stalled_handshakes_are_dropped(tls_server, certificate):
    cert_path, _ = certificate
    with pytest.raises(requests.exceptions.ConnectionError):  # no plaintext service on a TLS port
        requests.get(f"http://127.0.0.1:{tls_server.port}/live", timeout=5)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as sock:  # says nothing at all
        assert sock.recv(1) == b""
    assert time.monotonic() - started < 1.5 + 3
    assert _https_live(tls_server, cert_path)
    assert "Traceback" not in tls_server.log()


def test_a_certificate_that_does_not_load_stops_start_up(tmp_path: Path, certificate):
    cert_path, _ = certificate
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("not a key")
    server = ServerProcess([APP], ssl={"enabled": True, "cert_path": str(cert_path), "key_path": str(bad_key)})
    try:
        server.start(wait=False)
        assert server.proc is not None and server.proc.wait(timeout=20) != 0
        assert "cannot start" in server.log() and SECRET not in server.log()
    finally:
        server.stop()
    missing = ServerProcess([APP], ssl={"enabled": True, "cert_path": str(cert_path)})
    try:
        missing.start(wait=False)
        assert missing.proc is not None and missing.proc.wait(timeout=20) == 2
        assert "ssl.key_path" in missing.log()
    finally:
        missing.stop()


# -- secrets stay secret ------------------------------------------------------------------------------


def test_the_secret_appears_in_no_log_metric_or_error(server_factory: Callable[..., ServerProcess]):
    server = server_factory([APP], env={"LOG_LEVEL": "DEBUG"})
    sdk = sdk_for(server, APP)
    bodies: list[str] = []

    def record(resp: requests.Response) -> requests.Response:
        bodies.append(resp.text)
        bodies.extend(f"{k}: {v}" for k, v in resp.headers.items())
        return resp

    path = f"/apps/{APP['id']}/events"
    good = json.dumps({"name": "e", "channel": "c", "data": "x"}).encode()
    record(requests.post(signed_url(server.url, "POST", path, APP, good), data=good,
                         headers={"Content-Type": "application/json"}, timeout=5))
    record(requests.post(signed_url(server.url, "POST", path, APP, good, secret="wrong"), data=good,
                         headers={"Content-Type": "application/json"}, timeout=5))
    bad = b'{"name": "e", "channel": "c", "data": "' + b"x" * 20_000 + b'"}'
    record(requests.post(signed_url(server.url, "POST", path, APP, bad), data=bad,
                         headers={"Content-Type": "application/json"}, timeout=5))
    record(requests.post(signed_url(server.url, "POST", path, APP, b"{not json"), data=b"{not json",
                         headers={"Content-Type": "application/json"}, timeout=5))
    record(requests.get(signed_url(server.url, "GET", f"/apps/{APP['id']}/channels/x%20y", APP), timeout=5))
    record(requests.get(f"{server.url}/apps/{APP['id']}/channels?auth_key={APP['key']}&auth_timestamp=1", timeout=5))
    record(requests.get(server.url + "/nope", timeout=5))

    client = RawClient.connect(server, APP["key"])
    try:
        for data in ({"channel": "private-s", "auth": f"{APP['key']}:{'0' * 64}"},
                     {"channel": "presence-s", "auth": sdk.authenticate("presence-s", "1.1", {"user_id": "u"})["auth"],
                      "channel_data": '{"user_id":"u"}'},
                     {"channel": "private-s", **sdk.authenticate("private-s", client.socket_id)}):
            client.send_json({"event": "pusher:subscribe", "data": data})
        client.send_json({"event": "pusher:signin", "data": {"auth": f"{APP['key']}:{'1' * 64}",
                                                             "user_data": '{"id":"u"}'}})
        client.send_text("{not json")
        client.ping_pong()
        while True:  # every frame the client got, errors included
            try:
                bodies.append(client.recv_text(timeout=0.3))
            except TimeoutError:
                break
    finally:
        client.close()
    RawClient.open(server, "unknown-key").close()

    sources = {"log": server.log(), "metrics": server.metrics_text(), "responses": "\n".join(bodies)}
    assert "Invalid API signature" in sources["responses"]  # the failures really happened
    for name, text in sources.items():
        assert SECRET not in text, f"the app secret appears in the {name}"
        assert SECRET.encode().hex() not in text
    # Nor the signatures clients sent (a valid one is a replayable credential within its window).
    assert not re.search(rf"{APP['key']}:[0-9a-f]{{64}}", sources["log"]), "a channel signature was logged"
    assert not re.search(r"auth_signature=[0-9a-f]{64}", sources["log"]), "a request signature was logged"


# -- app isolation ------------------------------------------------------------------------------------

APP_A: dict[str, Any] = {"id": "100", "key": "iso-a", "secret": "iso-a-secret", "enable_client_messages": True}
APP_B: dict[str, Any] = {"id": "200", "key": "iso-b", "secret": "iso-b-secret", "enable_client_messages": True}


@pytest.fixture
def two_nodes(server_factory: Callable[..., ServerProcess], redis_server: RedisServer) -> list[ServerProcess]:
    import redis as redis_lib

    redis_lib.Redis(port=redis_server.port, db=6).flushdb()
    env = node_env(f"redis://127.0.0.1:{redis_server.port}/6")
    nodes = [server_factory([APP_A, APP_B], start=False, env=env, shutdown_grace_period=2) for _ in range(2)]
    start_all(nodes)
    wait_formed(nodes)
    return nodes


def test_apps_sharing_channel_and_user_names_never_see_each_other(two_nodes):
    node1, node2 = two_nodes
    sdk_a, sdk_b = sdk_for(node1, APP_A), sdk_for(node2, APP_B)
    clients: list[RawClient] = []

    def join(node: ServerProcess, app: dict[str, Any], user: str) -> RawClient:
        sdk = sdk_for(node, app)
        client = RawClient.connect(node, app["key"])
        clients.append(client)
        client.subscribe("chat")
        client.subscribe("private-room", sdk.authenticate("private-room", client.socket_id))
        client.subscribe("presence-room", sdk.authenticate("presence-room", client.socket_id, {"user_id": user}))
        return client

    try:
        a1, a2 = join(node1, APP_A, "u1"), join(node2, APP_A, "u3")
        b1, b2 = join(node2, APP_B, "u1"), join(node1, APP_B, "u2")
        for node in (node1, node2):
            wait_until(lambda node=node: sorted(u["id"] for u in sdk_for(node, APP_A).users_info("presence-room")
                                                ["users"]) == ["u1", "u3"], timeout=10)
            assert sorted(u["id"] for u in sdk_for(node, APP_B).users_info("presence-room")["users"]) == ["u1", "u2"]
            assert sdk_for(node, APP_A).channel_info("chat", ["subscription_count"])["subscription_count"] == 2
            assert sdk_for(node, APP_B).channel_info("presence-room", ["user_count"])["user_count"] == 2
            assert set(sdk_for(node, APP_A).channels_info()["channels"]) == {"chat", "private-room", "presence-room"}

        sdk_a.trigger("chat", "only-a", "a")
        a1.send_json({"event": "client-from-a", "channel": "private-room", "data": {"x": 1}})
        sdk_b.trigger("chat", "only-b", "b")
        for client in (a1, a2):
            assert client.expect("only-a")["data"] == "a"
        assert a2.expect("client-from-a")["data"] == {"x": 1}
        for client in (b1, b2):
            assert client.expect("only-b")["data"] == "b"  # and nothing of A's before it
        sdk_a.trigger("chat", "marker-a", "m")
        sdk_b.trigger("chat", "marker-b", "m")
        for client, own in ((a1, "marker-a"), (a2, "marker-a"), (b1, "marker-b"), (b2, "marker-b")):
            frames = []
            frame = client.recv()
            while frame.get("event") != own:
                frames.append(frame)
                frame = client.recv()
            assert not any(f.get("event", "").startswith(("only-", "client-", "marker-")) for f in frames), frames
            assert not any(f.get("event") == "pusher_internal:member_added" for f in frames), frames

        # terminating app A's u1 leaves app B's u1 connected
        sdk_a.terminate_user_connections("u1")
        a1.expect_error_then_close(4009)
        b1.ping_pong()
        wait_until(lambda: sorted(u["id"] for u in sdk_a.users_info("presence-room")["users"]) == ["u3"], timeout=10)
        assert sorted(u["id"] for u in sdk_b.users_info("presence-room")["users"]) == ["u1", "u2"]
        # a signature made with app B's secret does not open app A's channels
        intruder = RawClient.connect(node1, APP_A["key"])
        clients.append(intruder)
        forged = sdk_b.authenticate("private-room", intruder.socket_id)
        intruder.send_json({"event": "pusher:subscribe", "data": {"channel": "private-room", **forged}})
        assert intruder.expect("pusher:error")["data"]["code"] == 4009
    finally:
        for client in clients:
            client.close()
    for node in (node1, node2):
        assert "Traceback" not in node.log()


# -- operator endpoints require signatures -----------------------------------------------------------

#: The routes that answer without a signature, on purpose: health and usage (soketi's
#: ``/`` and ``/ready`` included), plus the WebSocket path (authenticated per channel). Anything
#: else unsigned is a finding.
UNSIGNED_ROUTES = {"/", "/ready", "/live", "/up", "/up/<app_id>", "/usage"}


def rest_routes() -> list[tuple[str, str]]:
    """Every (method, rule) the REST app serves, from the real URL map, plus the publish routes
    served before Flask."""
    from sockudo.http_api import create_app, fastpath
    from tests.support.fakes import World

    world = World()
    app = create_app(world.services, world.handler)
    routes = list(fastpath.ROUTES)
    for rule in app.url_map.iter_rules():
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append((method, rule.rule))
    return routes


def concrete(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", lambda m: {"app_id": "100"}.get(m.group(1), "x"), rule)


def test_only_the_documented_routes_answer_without_a_signature():
    unsigned = {rule for _, rule in rest_routes() if not rule.startswith(("/apps/", "/users/"))}
    assert unsigned <= UNSIGNED_ROUTES, f"unsigned routes nobody documented: {unsigned - UNSIGNED_ROUTES}"


def test_every_signed_route_refuses_unsigned_and_mis_signed_calls(server_factory: Callable[..., ServerProcess]):
    server = server_factory([APP])
    signed = [(m, r) for m, r in rest_routes() if r.startswith(("/apps/", "/users/"))]
    assert len(signed) >= 25, signed  # events, channels, history, users, push …
    for method, rule in signed:
        path = concrete(rule)
        headers = {"Content-Type": "application/json"}
        body = b"{}"
        unsigned = requests.request(method, server.url + path, data=body, headers=headers, timeout=5)
        assert unsigned.status_code == 400, (method, path, unsigned.status_code, unsigned.text)
        no_signature = requests.request(method, f"{server.url}{path}?auth_key={APP['key']}&auth_timestamp="
                                        f"{int(time.time())}&auth_version=1.0&body_md5="
                                        f"{hashlib.md5(body).hexdigest()}", data=body, headers=headers, timeout=5)
        assert no_signature.status_code == 401, (method, path, no_signature.status_code, no_signature.text)
        forged = requests.request(method, signed_url(server.url, method, path, APP, body, secret="guess"),
                                  data=body, headers=headers, timeout=5)
        assert forged.status_code == 401, (method, path, forged.status_code, forged.text)
        # a correctly signed request replayed after the 600 s window
        stale = requests.request(method, signed_url(server.url, method, path, APP, body, age=601), data=body,
                                 headers=headers, timeout=5)
        assert stale.status_code == 401 and "Timestamp" in stale.json()["error"], (method, path, stale.text)
    assert "Traceback" not in server.log()
    assert metrics_at(server.metrics_port)  # the metrics listener is a separate port, read-only
