"""Provider response classification and the endpoint guard."""

from __future__ import annotations

import json

import pytest

from sockudo.push import providers as p
from sockudo.push.settings import parse_settings
from tests.support import push_crypto


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("status", "reason", "outcome", "klass"),
    [
        (200, None, p.ACCEPTED, None),
        (400, "BadDeviceToken", p.REJECTED, p.DEVICE_TERMINAL),
        (410, "Unregistered", p.REJECTED, p.DEVICE_TERMINAL),
        (400, "DeviceTokenNotForTopic", p.REJECTED, p.CREDENTIAL_AUTH),
        (400, "TopicDisallowed", p.REJECTED, p.CREDENTIAL_AUTH),
        (400, "PayloadEmpty", p.REJECTED, p.CALLER_PAYLOAD),
        (413, "PayloadTooLarge", p.REJECTED, p.CALLER_PAYLOAD),
        (403, "ExpiredProviderToken", p.RETRYABLE, p.CREDENTIAL_AUTH),
        (403, "TooManyProviderTokenUpdates", p.RETRYABLE, p.CREDENTIAL_AUTH),
        (403, "InvalidProviderToken", p.REJECTED, p.CREDENTIAL_AUTH),
        (429, "TooManyRequests", p.RETRYABLE, p.PROVIDER_QUOTA),
        (500, "InternalServerError", p.RETRYABLE, p.PROVIDER_TRANSIENT),
        (503, "ServiceUnavailable", p.RETRYABLE, p.PROVIDER_TRANSIENT),
        (405, "MethodNotAllowed", p.REJECTED, p.UNKNOWN),
    ],
)
def test_apns(status: int, reason: str | None, outcome: str, klass: str | None) -> None:
    result = p.classify_apns(status, {"apns-id": "X", "retry-after": "3"}, body({"reason": reason}) if reason else b"")
    assert (result.outcome, result.failure_class) == (outcome, klass)
    if reason:
        assert result.reason == reason
    assert result.refresh_token == (reason == "ExpiredProviderToken")


def fcm_error(code: int, status: str, message: str = "", error_code: str | None = None) -> bytes:
    details = (
        [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}]
        if error_code
        else []
    )
    return body({"error": {"code": code, "status": status, "message": message, "details": details}})


@pytest.mark.parametrize(
    ("status", "payload", "outcome", "klass"),
    [
        (200, body({"name": "projects/p/messages/1"}), p.ACCEPTED, None),
        (
            404,
            fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED"),
            p.REJECTED,
            p.DEVICE_TERMINAL,
        ),
        (
            400,
            fcm_error(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                "INVALID_ARGUMENT",
            ),
            p.REJECTED,
            p.DEVICE_TERMINAL,
        ),
        (
            400,
            fcm_error(400, "INVALID_ARGUMENT", "Invalid value at 'message.data'", "INVALID_ARGUMENT"),
            p.REJECTED,
            p.CALLER_PAYLOAD,
        ),
        (
            403,
            fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH"),
            p.REJECTED,
            p.CREDENTIAL_AUTH,
        ),
        (404, fcm_error(404, "NOT_FOUND", "project not found"), p.REJECTED, p.CREDENTIAL_AUTH),
        (401, fcm_error(401, "UNAUTHENTICATED"), p.REJECTED, p.CREDENTIAL_AUTH),
        (429, fcm_error(429, "RESOURCE_EXHAUSTED", "", "QUOTA_EXCEEDED"), p.RETRYABLE, p.PROVIDER_QUOTA),
        (503, fcm_error(503, "UNAVAILABLE", "", "UNAVAILABLE"), p.RETRYABLE, p.PROVIDER_TRANSIENT),
        (418, b"", p.REJECTED, p.UNKNOWN),
    ],
)
def test_fcm(status: int, payload: bytes, outcome: str, klass: str | None) -> None:
    result = p.classify_fcm(status, {}, payload)
    assert (result.outcome, result.failure_class) == (outcome, klass)
    assert result.refresh_token == (status == 401)


@pytest.mark.parametrize(
    ("status", "outcome", "klass"),
    [
        (201, p.ACCEPTED, None),
        (404, p.REJECTED, p.DEVICE_TERMINAL),
        (410, p.REJECTED, p.DEVICE_TERMINAL),
        (413, p.REJECTED, p.CALLER_PAYLOAD),
        (429, p.RETRYABLE, p.PROVIDER_QUOTA),
        (502, p.RETRYABLE, p.PROVIDER_TRANSIENT),
        (401, p.REJECTED, p.CREDENTIAL_AUTH),
        (403, p.REJECTED, p.CREDENTIAL_AUTH),
        (418, p.REJECTED, p.UNKNOWN),
    ],
)
def test_webpush(status: int, outcome: str, klass: str | None) -> None:
    result = p.classify_webpush(status, {"location": "https://push.example/m/1", "retry-after": "5"}, b"")
    assert (result.outcome, result.failure_class) == (outcome, klass)
    if outcome == p.ACCEPTED:
        assert result.message_id == "https://push.example/m/1"
    if outcome == p.RETRYABLE:
        assert result.retry_after == "5"


def test_transport_errors_are_retryable_network_failures() -> None:
    class ConnectTimeout(Exception):
        pass

    result = p.transport_failure(ConnectTimeout())
    assert (result.outcome, result.failure_class, result.reason) == (p.RETRYABLE, p.NETWORK_TRANSPORT, "timeout")


def clients(allow: bool, answers: dict[str, list[str]]) -> p.ProviderClients:
    settings = parse_settings({"allow_insecure_endpoints": allow})
    return p.ProviderClients(settings, p.MemoryTokenCache(), resolver=lambda host: answers.get(host, []))


def test_endpoint_guard_refuses_http_local_and_private_answers() -> None:
    guard = clients(
        False, {"push.example.com": ["93.184.216.34"], "evil.example.com": ["10.0.0.5"], "v6.example.com": ["::1"]}
    )
    guard.check_target("https://push.example.com/x")
    for url in (
        "http://push.example.com/x",
        "https://127.0.0.1/x",
        "https://localhost/x",
        "https://[::1]/x",
        "https://169.254.169.254/latest",
        "https://evil.example.com/x",
        "https://v6.example.com/x",
        "https://user:pw@push.example.com/x",
    ):
        with pytest.raises(p.EndpointRefused):
            guard.check_target(url)
    clients(True, {}).check_target("http://127.0.0.1:9/x")  # the explicit test/dev switch


def test_endpoint_guard_resolves_a_public_host_once_a_minute_and_a_local_one_every_time() -> None:
    lookups: list[str] = []
    answers = {"push.example.com": ["93.184.216.34"], "evil.example.com": ["10.0.0.5"]}

    def resolve(host: str) -> list[str]:
        lookups.append(host)
        return answers[host]

    guard = p.ProviderClients(parse_settings({}), p.MemoryTokenCache(), resolver=resolve)
    for _ in range(3):
        guard.check_target("https://push.example.com/a")
        with pytest.raises(p.EndpointRefused):
            guard.check_target("https://evil.example.com/b")
    assert lookups.count("push.example.com") == 1 and lookups.count("evil.example.com") == 3
    guard._public_hosts["push.example.com"] = 0.0  # a minute later
    answers["push.example.com"] = ["127.0.0.1"]  # the name now points inside
    with pytest.raises(p.EndpointRefused):
        guard.check_target("https://push.example.com/a")
    guard.close()


def test_credential_validation() -> None:
    from sockudo.core.errors import ApiError

    with pytest.raises(ApiError, match="certificate"):
        p.validate_credentials("apns", {"p12": "MII…", "p12Password": "x"})
    with pytest.raises(ApiError, match="teamId"):
        p.validate_credentials("apns", {"keyId": "K", "privateKey": "x"})
    with pytest.raises(ApiError, match="serviceAccountJson"):
        p.validate_credentials("fcm", {})
    with pytest.raises(ApiError, match="32-byte"):
        p.validate_credentials("webpush", {"privateKey": "AAAA"})


def test_apns_provider_token_is_reused_for_50_minutes_then_refreshed() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec


    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    now = [1_700_000_000.0]
    c = p.ProviderClients(parse_settings({}), p.MemoryTokenCache(), clock=lambda: now[0])
    creds = {"teamId": "TEAM", "keyId": "KID", "privateKey": pem}
    first = c.apns_jwt(creds, "apns:x")
    now[0] += 49 * 60
    assert c.apns_jwt(creds, "apns:x") == first
    now[0] += 2 * 60
    second = c.apns_jwt(creds, "apns:x")
    assert second != first
    header, claims = push_crypto.jwt_verify(second, key.public_key())
    assert header == {"alg": "ES256", "kid": "KID"} and claims == {"iss": "TEAM", "iat": int(now[0])}
    c.close()


def test_fcm_access_token_is_cached_until_five_minutes_before_expiry() -> None:
    from tests.support.fake_push import FakeFCM

    fake = FakeFCM()
    try:
        now = [1_700_000_000.0]
        settings = parse_settings({"allow_insecure_endpoints": True})
        c = p.ProviderClients(settings, p.MemoryTokenCache(), clock=lambda: now[0])
        account = fake.service_account()
        now[0] = __import__("time").time()
        first = c.fcm_access_token(account, "fcm:x")
        assert isinstance(first, str) and fake.token_requests == 1
        now[0] += 3599 - 301  # expires_in 3599 s: still good 5 minutes before
        assert c.fcm_access_token(account, "fcm:x") == first and fake.token_requests == 1
        now[0] += 2
        assert c.fcm_access_token(account, "fcm:x") != first and fake.token_requests == 2
        c.close()
    finally:
        fake.close()


# -- one deadline per attempt, back-pressure -------------------------------------------------------


def test_a_provider_trickling_its_answer_is_cut_at_the_attempt_deadline() -> None:
    """A push service that sends its answer one byte every 50 ms never trips a per-read timeout;
    the attempt's total deadline (push.request_timeout_ms) still ends it on time, as retryable."""
    import socket
    import threading
    import time

    from cryptography.hazmat.primitives.asymmetric import ec

    from sockudo.push import crypto
    from tests.support.fake_push import web_subscription

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        for byte in b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nX-Slow: " + b"y" * 10_000:
            if stop.wait(0.05):
                break
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                break
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    vapid = ec.generate_private_key(ec.SECP256R1())
    raw = vapid.private_numbers().private_value.to_bytes(32, "big")
    creds = {"privateKey": crypto.b64url(raw), "publicKey": crypto.b64url(crypto.p256_public_raw(vapid))}
    _, p256dh, auth = web_subscription()
    device = {"recipient": {"endpoint": f"http://127.0.0.1:{port}/push/slow", "p256dh": p256dh, "auth": auth}}
    settings = parse_settings({"allow_insecure_endpoints": True, "request_timeout_ms": 400})
    clients = p.ProviderClients(settings, p.MemoryTokenCache())
    try:
        started = time.monotonic()
        result = clients.send(
            "webpush", device, {"body": {"title": "x"}, "headers": {}}, creds, p.SendContext("a", "p", "d", None, 0)
        )
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        clients.close()
        listener.close()
    assert (result.outcome, result.failure_class, result.reason) == (p.RETRYABLE, p.NETWORK_TRANSPORT, "timeout")
    assert 0.35 <= elapsed < 1.0, elapsed


def test_the_gate_pauses_on_throttling_halves_concurrency_and_grows_back() -> None:
    now = [100.0]
    gate = p.ProviderGate(8, clock=lambda: now[0])
    assert all(gate.acquire(now[0] + 1) for _ in range(8))
    gate.release(throttled=True, pause_s=2.0)
    gate.release(throttled=True, pause_s=2.0)  # the same burst's answers: halved once
    assert gate.current == 4 and gate.paused_until == 102.0
    assert gate.acquire(now[0] + 1) is False  # the pause outlasts what this delivery may wait
    now[0] = 102.5
    for _ in range(6):
        gate.release(accepted=True)
    assert gate.active == 0 and gate.current == 8  # +1 per accepted answer, up to the limit


def test_process_clients_are_reused_across_jobs_and_rebuilt_after_a_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    settings = parse_settings({})
    tokens = p.MemoryTokenCache()
    first = p.ProviderClients.for_process(settings, tokens)
    assert p.ProviderClients.for_process(settings, tokens) is first
    pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: pid + 1)  # as in a forked work-horse
    child = p.ProviderClients.for_process(settings, tokens)
    assert child is not first
    child.close()
    first.close()
