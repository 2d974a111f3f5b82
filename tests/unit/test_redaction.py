"""Log redaction: secrets, signatures, tokens and encrypted payloads never reach a log
line, whichever logger logs them and through whichever path (message, args, extra fields,
exception text, stack, third-party and gevent loggers), in both output formats."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from sockudo.logs import setup_logging
from sockudo.redaction import REDACTED, Redactor, sensitive_key

SECRET = "sekrit-app-secret-42"
SIG = hmac.new(SECRET.encode(), b"1234.5678:private-orders", hashlib.sha256).hexdigest()
AUTH = f"app-key-1:{SIG}"
BEARER_TOKEN = "ya29.a0AfH6SMBx3Kq9Zt7Lp2WmN8vB4cD6eF1gH3iJ5kL7mN9oP0qR2sT4uV6wX8yZ"  # OAuth-like
APNS_TOKEN = hashlib.sha256(b"device").hexdigest() + "ab12"
FCM_TOKEN = "cI2-9kXcRZ6:APA91bF7Kx3qXr9bLmYpQwZ2sT4uV6wX8yZ0aB1cD3eF5gH7iJ9kL1mN3oP5qR7sT9uV1wX3yZ5"
WEBPUSH_TOKEN = "gAAAAABmQ2x3Yk9Hd0ZmT1pQa3FzV2V3YXRlcg0123456"
WEBPUSH = f"https://updates.push.services.mozilla.com/wpush/v2/{WEBPUSH_TOKEN}"
P256DH = "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM"
CIPHERTEXT = base64.b64encode(os.urandom(48) + b"Zz9").decode()
JWT = "eyJhbGciOiJFUzI1NiIsImtpZCI6IkFCQzEyMyJ9.eyJpc3MiOiJERUYxMjMiLCJpYXQiOjE3MDB9.MEUCIQDx7Yk2Lp9q"
PEM_BODY = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg"
PEM = f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}\n-----END PRIVATE KEY-----"

FORBIDDEN = {
    "app secret": SECRET,
    "auth signature": SIG,
    "apns device token": APNS_TOKEN,
    "fcm token (head)": FCM_TOKEN.split(":")[0],
    "fcm token (tail)": FCM_TOKEN.split(":")[1],
    "bearer token": BEARER_TOKEN,
    "web push token": WEBPUSH_TOKEN,
    "p256dh": P256DH,
    "ciphertext": CIPHERTEXT[:40],
    "jwt": JWT.split(".")[1],
    "private key": PEM_BODY,
}


def assert_clean(text: str) -> None:
    leaks = [what for what, value in FORBIDDEN.items() if value in text]
    assert not leaks, f"leaked {leaks} in:\n{text}"


@pytest.fixture
def logs() -> Iterator[Any]:
    """setup_logging as the server does; yields a function returning what was written."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    streams: dict[str, io.StringIO] = {}

    def configure(fmt: str) -> Any:
        setup_logging(fmt, "DEBUG", secrets=[SECRET, "app-secret-other"])
        stream = io.StringIO()
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        streams["out"] = stream
        return lambda: stream.getvalue()

    yield configure
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved_handlers:
        root.addHandler(h)
    root.setLevel(saved_level)
    logging.captureWarnings(False)


def log_everything() -> None:
    log = logging.getLogger("sockudo.handler")
    # message text, %-args and f-strings
    log.warning("subscribe refused: auth=%s", AUTH)
    log.info(f"app secret is {SECRET} and the body was signed with auth_signature={SIG}")
    log.info("GET /apps/1/events?auth_key=app-key-1&auth_timestamp=1&auth_signature=%s", SIG)
    log.info('client sent {"event":"pusher:subscribe","data":{"channel":"private-orders","auth":"%s"}}', AUTH)
    log.info("Authorization: Bearer %s", BEARER_TOKEN)
    log.info("apns push to https://api.push.apple.com/3/device/%s failed", APNS_TOKEN)
    log.info("fcm rejected registration %s", FCM_TOKEN)
    log.info("web push endpoint %s p256dh %s", WEBPUSH, P256DH)
    log.info('encrypted message {"nonce":"abc","ciphertext":"%s"}', CIPHERTEXT)
    log.info("apns provider jwt %s", JWT)
    log.info("credential upload %s", PEM)
    # extra fields: flat, by sensitive key, nested, lists, odd types
    log.warning("provider rejected", extra={
        "app_id": "app-1", "publish_id": "pub_123", "provider": "apns", "error": "BadDeviceToken",
        "device_token": APNS_TOKEN, "token_hash": hashlib.sha256(APNS_TOKEN.encode()).hexdigest(),
        "secret": SECRET, "auth_signature": SIG, "endpoint": WEBPUSH,
        "subscription": {"endpoint": WEBPUSH, "keys": {"p256dh": P256DH, "auth": "k" * 22}},
        "recipients": [{"transportType": "apns", "deviceToken": APNS_TOKEN}, FCM_TOKEN],
        "headers": {"Authorization": f"Bearer {BEARER_TOKEN}", "X-Pusher-Signature": SIG},
        "payload": CIPHERTEXT, "raw": CIPHERTEXT.encode(), "detail": ValueError(f"bad secret {SECRET}"),
    })
    log.info({"event": "dict message", "secret": SECRET, "auth": AUTH})
    # exception text and stack
    try:
        raise PermissionError(f"signature mismatch: expected {SIG} for secret {SECRET}")
    except PermissionError:
        log.exception("auth failed for %s", "app-1")
    try:
        raise RuntimeError(f"token {FCM_TOKEN}")
    except RuntimeError:
        log.error("push failed", exc_info=True, stack_info=True)
    # other libraries' loggers
    logging.getLogger("werkzeug").info('127.0.0.1 - - "GET /apps/1/events?auth_signature=%s HTTP/1.1" 200 -', SIG)
    logging.getLogger("flask.app").error("Exception on /apps/1/events [POST]: secret=%s", SECRET)
    logging.getLogger("rq.worker").info("job %s: webhook with signature %s", "j1", SIG)
    warnings.warn(f"deprecated credential {BEARER_TOKEN} in secret={SECRET}", stacklevel=1)


@pytest.mark.parametrize("fmt", ["json", "human"])
def test_no_secret_reaches_any_line(logs: Any, fmt: str) -> None:
    output = logs(fmt)
    log_everything()
    text = output()
    assert_clean(text)
    assert text.count(REDACTED) >= 20
    # What operators need is still there.
    for kept in ("app-1", "pub_123", "BadDeviceToken", "private-orders", "PermissionError", "auth failed for app-1"):
        assert kept in text
    if fmt == "json":
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        provider = next(line for line in lines if line["message"] == "provider rejected")
        assert list(provider)[:4] == ["timestamp", "level", "target", "message"]
        assert provider["level"] == "warn" and provider["target"] == "sockudo.handler"
        assert provider["timestamp"].endswith("Z") and "T" in provider["timestamp"]
        assert provider["token_hash"] == hashlib.sha256(APNS_TOKEN.encode()).hexdigest()  # kept on purpose
        assert provider["device_token"] == REDACTED and provider["secret"] == REDACTED
        assert provider["subscription"]["keys"]["p256dh"] == REDACTED
        failed = next(line for line in lines if line["message"] == "auth failed for app-1")
        assert "PermissionError" in failed["exc_info"] and REDACTED in failed["exc_info"]


def test_loggers_with_their_own_handlers_are_covered(logs: Any) -> None:
    stream = io.StringIO()
    own = logging.getLogger("thirdparty.client")
    own.propagate = False
    handler = logging.StreamHandler(stream)
    own.addHandler(handler)
    try:
        logs("json")  # installs the filter on handlers that exist at start-up too
        own.error("token=%s secret %s", FCM_TOKEN, SECRET)
        assert_clean(stream.getvalue())
        assert REDACTED in stream.getvalue()
    finally:
        own.removeHandler(handler)
        own.propagate = True


def test_gevent_wsgi_and_hub_errors_are_redacted(logs: Any) -> None:
    import gevent
    from gevent.pywsgi import LoggingLogAdapter

    from sockudo.server import observability

    output = logs("json")
    # What gevent's WSGIServer writes to error_log (we pass it the gevent.pywsgi logger).
    error_log = LoggingLogAdapter(observability.WSGI_ERROR_LOG, logging.ERROR)
    error_log.write(f"Traceback: bad request /apps/1/events?auth_signature={SIG}&x=1 secret {SECRET}\n")
    # An uncaught exception in a greenlet: the hub prints it (through logging, once installed).
    hub = gevent.get_hub()
    saved = hub.__dict__.get("print_exception")
    observability.log_greenlet_errors()
    try:
        g = gevent.spawn(lambda: (_ for _ in ()).throw(ValueError(f"apns token {APNS_TOKEN} secret {SECRET}")))
        g.join()
    finally:
        if saved is None:
            hub.__dict__.pop("print_exception", None)
        else:
            hub.print_exception = saved  # type: ignore[method-assign]  # gevent's hook, as observability sets it
    text = output()
    assert_clean(text)
    lines = [json.loads(line) for line in text.splitlines()]
    assert any(line["target"] == "gevent.pywsgi" for line in lines)
    assert any(line["target"] == "gevent.hub" and "ValueError" in line.get("exc_info", "") for line in lines)


def test_redactor_rules() -> None:
    r = Redactor([SECRET])
    assert r.text(f"x {SECRET} y") == f"x {REDACTED} y"
    assert r.text(f"auth_signature={SIG}&a=1") == f"auth_signature={REDACTED}&a=1"
    assert r.text(f"{AUTH}") == f"app-key-1:{REDACTED}"
    assert r.text("https://u:pw@hooks.example.com/path?q=1") == f"https://{REDACTED}@hooks.example.com/path?q=1"
    # Identifiers stay readable.
    for kept in ("channel private-orders-42", "socket 1234.5678", "publish_id pub_0f8e7d6c5b4a39281706f5e4d3c2b1a0",
                 "presence-room-abcdefghijklmnopqrstuvwxyz-0123", "error_type=authentication_failed"):
        assert r.text(kept) == kept
    assert sensitive_key("deviceToken") and sensitive_key("app_secret") and sensitive_key("X-Pusher-Signature")
    assert not sensitive_key("token_hash") and not sensitive_key("publish_id") and not sensitive_key("channel")
    # A secret configured later is redacted from then on.
    r.add_secrets(["another-secret"])
    assert r.text("another-secret") == REDACTED
    assert Redactor(["abc"]).text("abc") == "abc"  # too short to redact by value
