"""APNs, FCM HTTP v1 and Web Push: credentials, wire requests, response classification.

The classifiers (``classify_*``) are pure functions of (status, headers, body). The senders
speak the real protocols against configurable base URLs: HTTP/2 for APNs (ALPN ``h2`` on https,
prior knowledge on ``http://`` test endpoints) and for FCM on https, with our small client on
``h2`` (``h2client.py``); our lean keep-alive HTTP/1.1 client (``http1.py``) for Web Push, the
OAuth token endpoint and plain-http FCM endpoints. Plain http and
local/private hosts (including names resolving to them) are refused unless
``push.allow_insecure_endpoints`` is set (tests/dev only).

One :class:`ProviderClients` lives per worker process (rebuilt after a fork, see
:meth:`ProviderClients.for_process`): its connections are reused by every job. ``submit`` runs
a send on the provider's thread pool (``push.<provider>_concurrency`` requests in flight at
most; HTTP/2 requests share one connection as streams, up to the server's stream limit). Each
attempt has one total deadline (``push.request_timeout_ms``) enforced on every socket read and
write (:class:`DeadlineBackend`), so a provider trickling bytes cannot hold a request longer. A
provider's back-pressure (429, APNs ``TooManyRequests``) pauses that provider for its
``Retry-After`` and halves its concurrency (:class:`ProviderGate`); concurrency grows back by
one per accepted request.

Access tokens are cached through a :class:`TokenCache` (in-process, backed by Redis when
available so every worker shares one APNs JWT and one FCM OAuth token): APNs provider tokens
are reused for 50 minutes (Apple rejects tokens older than an hour and throttles refreshes);
FCM OAuth tokens until 5 minutes before ``expires_in``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

from sockudo.push import crypto
from sockudo.push.crypto import CryptoError
from sockudo.push.h2client import H2Client, H2Expired, H2Response
from sockudo.push.http1 import BadHeader, Http1Client, Http1Response
from sockudo.push.model import bad, check_endpoint_url, compact, ip_is_local
from sockudo.push.settings import PushSettings

logger = logging.getLogger(__name__)

APNS_JWT_REUSE_S = 50 * 60
PUBLIC_HOST_TTL_S = 60.0  # a provider host's DNS answer checked for local addresses is trusted this long
PUBLIC_HOSTS_MAX = 10_000  # bound on remembered hosts (Web Push endpoints name many push services)
FCM_TOKEN_MARGIN_S = 5 * 60
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
WEBPUSH_DEFAULT_TTL_S = 2_419_200

ACCEPTED = "accepted"
REJECTED = "rejected"
RETRYABLE = "retryable"
EXPIRED = "expired"  # not sent: the push's expiresAtMs passed before the request went out

# failure classes
DEVICE_TERMINAL = "device_terminal"
PROVIDER_TRANSIENT = "provider_transient"
PROVIDER_QUOTA = "provider_quota"
CREDENTIAL_AUTH = "credential_auth"
CALLER_PAYLOAD = "caller_payload"
NETWORK_TRANSPORT = "network_transport"
UNKNOWN = "unknown"
FAILURE_CLASSES = (DEVICE_TERMINAL, PROVIDER_TRANSIENT, PROVIDER_QUOTA, CREDENTIAL_AUTH, CALLER_PAYLOAD,
                   NETWORK_TRANSPORT, UNKNOWN)


@dataclass(frozen=True)
class ProviderResult:
    outcome: str  # accepted | rejected | retryable | expired
    failure_class: str | None = None
    reason: str = ""
    retry_after: str | None = None  # the raw Retry-After header
    message_id: str | None = None
    status: int | None = None
    refresh_token: bool = False  # drop the cached access token and resend once


# -- credentials -----------------------------------------------------------------------------


def validate_credentials(provider: str, body: Any) -> dict[str, Any]:
    """A credential write body → the material to store (checked by loading the keys)."""
    if not isinstance(body, dict):
        raise bad("body must be a JSON object")
    if provider == "apns":
        if any(body.get(k) for k in ("p12", "pem", "p12Password")):
            raise bad(
                "APNs certificate (p12/pem) authentication is not supported; use token auth (teamId, keyId, privateKey)"
            )
        for key in ("teamId", "keyId", "privateKey"):
            if not isinstance(body.get(key), str) or not body[key].strip():
                raise bad(f"{key} is required for APNs token authentication")
        try:
            crypto.load_ec_private_pem(body["privateKey"])
        except CryptoError as exc:
            raise bad(f"privateKey: {exc}") from None
        topic = body.get("topic")
        if topic is not None and (not isinstance(topic, str) or not topic.strip()):
            raise bad("topic must be the app's bundle id")
        return {"teamId": body["teamId"], "keyId": body["keyId"], "privateKey": body["privateKey"], "topic": topic}
    if provider == "fcm":
        account = body.get("serviceAccountJson")
        if isinstance(account, str):
            try:
                account = json.loads(account)
            except ValueError:
                raise bad("serviceAccountJson is not JSON") from None
        if not isinstance(account, dict):
            raise bad("serviceAccountJson (the Google service-account key) is required")
        for key in ("project_id", "client_email", "private_key"):
            if not isinstance(account.get(key), str) or not account[key]:
                raise bad(f"serviceAccountJson.{key} is required")
        try:
            crypto.load_rsa_private_pem(account["private_key"])
        except CryptoError as exc:
            raise bad(f"serviceAccountJson.private_key: {exc}") from None
        token_uri = account.get("token_uri") or DEFAULT_TOKEN_URI
        if not isinstance(token_uri, str) or urlsplit(token_uri).scheme not in ("http", "https"):
            raise bad("serviceAccountJson.token_uri must be an https URL")
        return {
            "serviceAccount": {k: account[k] for k in ("project_id", "client_email", "private_key")}
            | {"private_key_id": account.get("private_key_id"), "token_uri": token_uri}
        }
    if provider == "webpush":
        private = body.get("privateKey")
        if not isinstance(private, str):
            raise bad("privateKey (the VAPID private key, raw 32-byte P-256 scalar base64url) is required")
        try:
            vapid_key = crypto.p256_private_from_raw(private)
        except CryptoError as exc:
            raise bad(f"privateKey: {exc}") from None
        public = crypto.b64url(crypto.p256_public_raw(vapid_key))
        given = body.get("publicKey")
        if given is not None and given.rstrip("=") != public:
            raise bad("publicKey does not match privateKey")
        subject = body.get("subject")
        if subject is not None and (not isinstance(subject, str) or not subject.startswith(("mailto:", "https:"))):
            raise bad("subject must be a mailto: or https: URI")
        return {"privateKey": private, "publicKey": public, "subject": subject}
    raise bad(f"unsupported provider {provider!r} (supported: apns, fcm, webpush)")


# -- classification (pure) ---------------------------------------------------------------------


def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8")) if body else None
    except (ValueError, UnicodeDecodeError):
        return None


APNS_TOPIC_ERRORS = (
    "BadCertificateEnvironment",
    "BadTopic",
    "DeviceTokenNotForTopic",
    "TopicDisallowed",
    "BadCertificate",
)


def classify_apns(status: int, headers: Mapping[str, str], body: bytes) -> ProviderResult:
    if status == 200:
        return ProviderResult(ACCEPTED, message_id=headers.get("apns-id"), status=status)
    data = _json(body)
    reason = str(data.get("reason")) if isinstance(data, dict) and data.get("reason") else f"http_{status}"
    retry_after = headers.get("retry-after")
    if status == 410 or (status == 400 and reason == "BadDeviceToken"):
        return ProviderResult(REJECTED, DEVICE_TERMINAL, reason, status=status)
    if status == 400 and reason in APNS_TOPIC_ERRORS:
        return ProviderResult(REJECTED, CREDENTIAL_AUTH, reason, status=status)
    if status in (400, 413):
        return ProviderResult(REJECTED, CALLER_PAYLOAD, reason, status=status)
    if status == 403 and reason == "ExpiredProviderToken":
        return ProviderResult(RETRYABLE, CREDENTIAL_AUTH, reason, status=status, refresh_token=True)
    if status == 403 and reason == "TooManyProviderTokenUpdates":
        return ProviderResult(RETRYABLE, CREDENTIAL_AUTH, reason, retry_after, status=status)
    if status in (401, 403):
        return ProviderResult(REJECTED, CREDENTIAL_AUTH, reason, status=status)
    if status == 429:
        return ProviderResult(RETRYABLE, PROVIDER_QUOTA, reason, retry_after, status=status)
    if status in (500, 502, 503, 504):
        return ProviderResult(RETRYABLE, PROVIDER_TRANSIENT, reason, retry_after, status=status)
    return ProviderResult(REJECTED, UNKNOWN, reason, status=status)


def _fcm_error(data: Any) -> tuple[str, str, str]:
    """(status, errorCode, message) of a google.rpc error body."""
    if not isinstance(data, dict) or not isinstance(data.get("error"), dict):
        return "", "", ""
    err = data["error"]
    code = ""
    for detail in err.get("details") or []:
        if isinstance(detail, dict) and detail.get("errorCode"):
            code = str(detail["errorCode"])
    return str(err.get("status") or ""), code, str(err.get("message") or "")


def classify_fcm(status: int, headers: Mapping[str, str], body: bytes) -> ProviderResult:
    data = _json(body)
    if 200 <= status < 300:
        name = data.get("name") if isinstance(data, dict) else None
        return ProviderResult(ACCEPTED, message_id=name, status=status)
    err_status, code, message = _fcm_error(data)
    reason = code or err_status or f"http_{status}"
    text = body.decode("utf-8", "replace")
    retry_after = headers.get("retry-after")
    if "UNREGISTERED" in text or "REGISTRATION-TOKEN-NOT-REGISTERED" in text:
        return ProviderResult(REJECTED, DEVICE_TERMINAL, "UNREGISTERED", status=status)
    if (code == "INVALID_ARGUMENT" or err_status == "INVALID_ARGUMENT") and "registration token" in message.lower():
        return ProviderResult(REJECTED, DEVICE_TERMINAL, "INVALID_REGISTRATION_TOKEN", status=status)
    if code == "SENDER_ID_MISMATCH" or status == 404 or err_status == "NOT_FOUND":
        return ProviderResult(REJECTED, CREDENTIAL_AUTH, code or "project_mismatch", status=status)
    if status in (400, 413):
        return ProviderResult(REJECTED, CALLER_PAYLOAD, reason, status=status)
    if status in (401, 403):
        return ProviderResult(REJECTED, CREDENTIAL_AUTH, reason, status=status, refresh_token=True)
    if status == 429:
        return ProviderResult(RETRYABLE, PROVIDER_QUOTA, code or "QUOTA_EXCEEDED", retry_after, status=status)
    if status in (500, 502, 503, 504):
        return ProviderResult(RETRYABLE, PROVIDER_TRANSIENT, reason, retry_after, status=status)
    return ProviderResult(REJECTED, UNKNOWN, reason, status=status)


def classify_webpush(status: int, headers: Mapping[str, str], body: bytes) -> ProviderResult:
    if status in (200, 201, 202):
        return ProviderResult(ACCEPTED, message_id=headers.get("location"), status=status)
    reason = f"http_{status}"
    retry_after = headers.get("retry-after")
    if status in (404, 410):
        return ProviderResult(REJECTED, DEVICE_TERMINAL, reason, status=status)
    if status in (400, 413):
        return ProviderResult(REJECTED, CALLER_PAYLOAD, "payload_too_large" if status == 413 else reason, status=status)
    if status == 429:
        return ProviderResult(RETRYABLE, PROVIDER_QUOTA, reason, retry_after, status=status)
    if status >= 500:
        return ProviderResult(RETRYABLE, PROVIDER_TRANSIENT, reason, retry_after, status=status)
    if status in (401, 403):
        return ProviderResult(REJECTED, CREDENTIAL_AUTH, reason, status=status)
    return ProviderResult(REJECTED, UNKNOWN, reason, status=status)


def transport_failure(exc: BaseException) -> ProviderResult:
    name = type(exc).__name__
    reason = "timeout" if "Timeout" in name else "connect" if "Connect" in name else "transport"
    return ProviderResult(RETRYABLE, NETWORK_TRANSPORT, reason)


# -- token cache -------------------------------------------------------------------------------


class TokenCache(Protocol):
    def get(self, name: str, now: float) -> str | None: ...

    def put(self, name: str, value: str, expires_at: float) -> None: ...

    def drop(self, name: str) -> None: ...


class MemoryTokenCache:
    def __init__(self) -> None:
        self._items: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, name: str, now: float) -> str | None:
        with self._lock:
            item = self._items.get(name)
        return item[0] if item and item[1] > now else None

    def put(self, name: str, value: str, expires_at: float) -> None:
        with self._lock:
            self._items[name] = (value, expires_at)

    def drop(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)


class RedisTokenCache:
    """Shared by every worker: one APNs JWT and one FCM token per credential, sealed at rest."""

    def __init__(self, client: Any, prefix: str, secret: str | None) -> None:
        self.client = client
        self.prefix = prefix + "token:"
        self.secret = secret
        self.local = MemoryTokenCache()

    def get(self, name: str, now: float) -> str | None:
        value = self.local.get(name, now)
        if value is not None or self.secret is None:
            return value
        raw = self.client.get(self.prefix + name)
        if raw is None:
            return None
        try:
            doc = json.loads(crypto.unseal(self.secret, raw.decode(), name))
        except (CryptoError, ValueError):
            return None
        if doc["exp"] <= now:
            return None
        self.local.put(name, doc["v"], doc["exp"])
        return str(doc["v"])

    def put(self, name: str, value: str, expires_at: float) -> None:
        self.local.put(name, value, expires_at)
        if self.secret is None:
            return
        ttl = max(1, int(expires_at - time.time()))
        sealed = crypto.seal(self.secret, json.dumps({"v": value, "exp": expires_at}).encode(), name)
        self.client.set(self.prefix + name, sealed, ex=ttl)

    def drop(self, name: str) -> None:
        self.local.drop(name)
        self.client.delete(self.prefix + name)


# -- one deadline per attempt ------------------------------------------------------------------

_deadline = threading.local()


@contextmanager
def attempt_deadline(seconds: float) -> Iterator[None]:
    """Every socket operation of this thread's request inside the block shares one deadline."""
    previous = getattr(_deadline, "at", None)
    _deadline.at = time.monotonic() + seconds
    try:
        yield
    finally:
        _deadline.at = previous


class ProviderGate:
    """Back-pressure of one provider in this process: a pause (``Retry-After``) and an adaptive
    concurrency cap — halved by a throttled answer (at most once per :data:`THROTTLE_WINDOW_S`,
    as the answers to one burst arrive together), +1 per accepted answer, up to ``limit``."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.current = limit
        self.active = 0
        self.paused_until = 0.0
        self.cut_until = 0.0
        self.clock = clock
        self.cond = threading.Condition()

    def acquire(self, give_up_at: float) -> bool:
        """Wait for a slot and the end of a pause. False when the pause runs past ``give_up_at``
        (waiting for a slot alone is never given up: the sender is only slower)."""
        with self.cond:
            while True:
                now = self.clock()
                if now >= self.paused_until and self.active < self.current:
                    self.active += 1
                    return True
                if self.paused_until > max(now, give_up_at):
                    return False
                wait = self.paused_until - now if now < self.paused_until else 1.0
                self.cond.wait(max(0.001, wait))

    def release(self, throttled: bool = False, pause_s: float = 0.0, accepted: bool = False) -> None:
        with self.cond:
            self.active -= 1
            now = self.clock()
            if throttled:
                if now >= self.cut_until:
                    self.current = max(1, self.current // 2)
                    self.cut_until = now + THROTTLE_WINDOW_S
                self.paused_until = max(self.paused_until, now + pause_s)
            elif accepted and self.current < self.limit:
                self.current += 1
            self.cond.notify_all()


THROTTLE_WINDOW_S = 0.2
THROTTLE_PAUSE_S = 0.5  # a 429 without Retry-After pauses the provider this long (doubled each time, ≤ the max wait)


# -- sending -----------------------------------------------------------------------------------


@dataclass
class SendContext:
    app_id: str
    publish_id: str
    device_id: str
    expires_at_ms: int | None
    now: float


class EndpointRefused(Exception):
    pass


class Executor(Protocol):
    """What runs the sends: ``concurrent.futures.Executor``'s ``submit`` and ``shutdown``; the
    pending answer needs only ``add_done_callback`` and ``result`` (see the dispatcher's
    ``Pending``)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Any: ...

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...


#: ``(provider, concurrency) -> Executor``: the provider's pool of senders.
Executors = Callable[[str, int], Executor]


def _thread_pool(name: str, limit: int) -> Executor:
    return ThreadPoolExecutor(limit, thread_name_prefix=f"push-{name}")


class ProviderClients:
    """The HTTP side of all three providers; one instance per process, connections reused."""

    _process: dict[tuple[int, int], ProviderClients] = {}
    _process_lock = threading.Lock()

    @classmethod
    def for_process(
        cls, settings: PushSettings, tokens: TokenCache, executor: Executors | None = None
    ) -> ProviderClients:
        """This process's clients for these settings: made once, reused by every job; a forked
        child (RQ's work-horse) makes its own (sockets are never shared across a fork)."""
        key = (os.getpid(), id(settings))
        with cls._process_lock:
            clients = cls._process.get(key)
            if clients is None:
                for stale in [k for k in cls._process if k[0] != key[0]]:
                    del cls._process[stale]  # inherited from the parent: not ours to close
                clients = cls._process[key] = cls(settings, tokens, executor=executor)
            return clients

    def __init__(
        self,
        settings: PushSettings,
        tokens: TokenCache,
        clock: Callable[[], float] = time.time,
        resolver: Callable[[str], list[str]] | None = None,
        executor: Executors | None = None,
    ) -> None:
        self.settings = settings
        self._executor = executor or _thread_pool
        self.tokens = tokens
        self.clock = clock
        self.resolver = resolver or _resolve
        total = settings.request_timeout_ms / 1000
        connect = min(total, settings.connect_timeout_ms / 1000)
        # APNs, and FCM on https: our own HTTP/2 client (see h2client.py), one connection per
        # origin shared by every sending thread. Web Push, the OAuth token endpoint and plain-http
        # FCM endpoints (tests): pooled HTTP/1.1 keep-alive connections (http1.py).
        self.h2 = H2Client(tls_context(settings.ca_file, "h2"), connect)
        self.http = Http1Client(tls_context(settings.ca_file, "http/1.1"), connect,
                                idle_per_origin=max(settings.webpush_concurrency, settings.fcm_concurrency))
        self.limits = {
            "apns": settings.apns_concurrency,
            "fcm": settings.fcm_concurrency,
            "webpush": settings.webpush_concurrency,
        }
        self.gates = {name: ProviderGate(limit) for name, limit in self.limits.items()}
        self._pools: dict[str, Executor] = {}
        self._vapid: dict[str, tuple[str, float]] = {}
        self._public_hosts: dict[str, float] = {}  # host → until when it is known to resolve to public addresses
        self._lock = threading.Lock()
        self._token_locks: dict[str, threading.Lock] = {}

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self.h2.close()
        self.http.close()

    def submit(
        self,
        provider: str,
        device: Mapping[str, Any],
        rendered: Mapping[str, Any],
        credentials: Mapping[str, Any],
        ctx: SendContext,
    ) -> Any:
        """Run :meth:`send_paced` on the provider's executor (at most its concurrency at once)."""
        name = provider if provider in self.limits else "webpush"
        with self._lock:
            pool = self._pools.get(name)
            if pool is None:
                pool = self._pools[name] = self._executor(name, self.limits[name])
        return pool.submit(self.send_paced, provider, device, rendered, credentials, ctx)

    def send_paced(
        self,
        provider: str,
        device: Mapping[str, Any],
        rendered: Mapping[str, Any],
        credentials: Mapping[str, Any],
        ctx: SendContext,
    ) -> ProviderResult:
        """:meth:`send` under the provider's gate. A throttled answer pauses the provider and is
        sent again here while the wait fits in ``push.backpressure_max_wait_ms``; else it is
        returned (the dispatcher schedules a retry honouring ``Retry-After``)."""
        gate = self.gates.get(provider) or self.gates["webpush"]
        give_up_at = time.monotonic() + self.settings.backpressure_max_wait_ms / 1000
        pause = THROTTLE_PAUSE_S
        while True:
            if not gate.acquire(give_up_at):
                return ProviderResult(RETRYABLE, PROVIDER_QUOTA, "backpressure", str(_retry_in(gate)))
            result = ProviderResult(REJECTED, UNKNOWN, "not_sent")
            throttled = False
            try:
                result = self.send(provider, device, rendered, credentials, ctx)
                throttled = result.failure_class == PROVIDER_QUOTA
                if throttled:
                    asked = _retry_after_s(result.retry_after, self.clock())
                    pause = asked if asked is not None else pause
            finally:
                gate.release(throttled, pause if throttled else 0.0, result.outcome == ACCEPTED)
            if not throttled or time.monotonic() + pause > give_up_at:
                return result
            if _retry_after_s(result.retry_after, self.clock()) is None:
                pause *= 2

    # -- safety --

    def check_target(self, url: str) -> None:
        """Refuse http and local/private targets (also by DNS answer) unless insecure is allowed.
        A host found to resolve to public addresses only is not resolved again for
        :data:`PUBLIC_HOST_TTL_S` (a DNS lookup per request would cost more than the request)."""
        if self.settings.allow_insecure_endpoints:
            return
        try:
            check_endpoint_url(url, allow_insecure=False, what="provider endpoint")
        except Exception as exc:
            raise EndpointRefused(str(getattr(exc, "message", exc))) from None
        host = urlsplit(url).hostname or ""
        now = time.monotonic()
        if self._public_hosts.get(host, 0.0) > now:
            return
        import ipaddress

        for addr in self.resolver(host):
            try:
                if ip_is_local(ipaddress.ip_address(addr)):
                    raise EndpointRefused("provider endpoint resolves to a local or private address")
            except ValueError:
                continue
        if len(self._public_hosts) >= PUBLIC_HOSTS_MAX:
            self._public_hosts.clear()
        self._public_hosts[host] = now + PUBLIC_HOST_TTL_S

    # -- dispatch --

    def send(
        self,
        provider: str,
        device: Mapping[str, Any],
        rendered: Mapping[str, Any],
        credentials: Mapping[str, Any],
        ctx: SendContext,
    ) -> ProviderResult:
        try:
            with attempt_deadline(self.settings.request_timeout_ms / 1000):
                if provider == "apns":
                    return self._send_apns(device, rendered, credentials, ctx)
                if provider == "fcm":
                    return self._send_fcm(device, rendered, credentials, ctx)
                return self._send_webpush(device, rendered, credentials, ctx)
        except EndpointRefused as exc:
            return ProviderResult(REJECTED, UNKNOWN, f"endpoint_refused: {exc}")
        except H2Expired:
            return ProviderResult(EXPIRED, reason="expired")  # not sent: its expiresAtMs passed
        except BadHeader:
            return ProviderResult(REJECTED, CALLER_PAYLOAD, "bad_header")
        except (OSError, ssl.SSLError) as exc:
            return transport_failure(exc)

    # APNs

    def _token_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._token_locks.setdefault(name, threading.Lock())

    def apns_jwt(self, creds: Mapping[str, Any], cache_name: str, force: bool = False) -> str:
        now = self.clock()
        if not force:
            token = self.tokens.get(cache_name, now)
            if token is not None:
                return token
        with self._token_lock(cache_name):  # concurrent sends make one token, not one each
            if not force:
                token = self.tokens.get(cache_name, self.clock())
                if token is not None:
                    return token
            return self._new_apns_jwt(creds, cache_name, now)

    def _new_apns_jwt(self, creds: Mapping[str, Any], cache_name: str, now: float) -> str:
        key = crypto.load_ec_private_pem(creds["privateKey"])
        token = crypto.jwt_es256({"kid": creds["keyId"]}, {"iss": creds["teamId"], "iat": int(now)}, key)
        self.tokens.put(cache_name, token, now + APNS_JWT_REUSE_S)
        return token

    def _send_apns(
        self, device: Mapping[str, Any], rendered: Mapping[str, Any], creds: Mapping[str, Any], ctx: SendContext
    ) -> ProviderResult:
        base = self.settings.apns_endpoint.rstrip("/")
        token = device["recipient"]["deviceToken"]
        url = f"{base}/3/device/{token}"
        self.check_target(base)
        topic = rendered["headers"].get("apns-topic") or creds.get("topic") or self.settings.apns_topic
        if not topic:
            return ProviderResult(REJECTED, CREDENTIAL_AUTH, "apns_topic_missing")
        cache_name = f"apns:{ctx.app_id}:{creds['teamId']}:{creds['keyId']}:{creds.get('version', 1)}"
        body = compact(rendered["body"])
        headers = {k: v for k, v in rendered["headers"].items() if k != "apns-topic"}
        headers.update(
            {
                "apns-topic": topic,
                "apns-id": str(
                    uuid.uuid5(uuid.NAMESPACE_URL, f"sockudo:{ctx.app_id}:{ctx.publish_id}:{ctx.device_id}")
                ),
                "content-type": "application/json",
            }
        )
        result = ProviderResult(REJECTED, UNKNOWN, "not_sent")
        for _ in range(2):
            token = self.apns_jwt(creds, cache_name)
            headers["authorization"] = f"bearer {token}"
            resp = self.h2.post(
                url,
                content=body,
                headers=headers,
                timeout=_time_left(self.settings),
                not_after=_not_after(ctx),
                unique=(":path", "apns-id"),
            )
            result = classify_apns(resp.status_code, resp.headers, resp.content)
            if not result.refresh_token:
                break
            with self._token_lock(cache_name):  # concurrent streams replace an expired token once
                if self.tokens.get(cache_name, self.clock()) == token:
                    self.tokens.drop(cache_name)
        return result

    # FCM

    def fcm_access_token(self, account: Mapping[str, Any], cache_name: str) -> str | ProviderResult:
        token = self.tokens.get(cache_name, self.clock())
        if token is not None:
            return token
        with self._token_lock(cache_name):  # concurrent sends fetch one token, not one each
            token = self.tokens.get(cache_name, self.clock())
            if token is not None:
                return token
            return self._fetch_fcm_token(account, cache_name)

    def _fetch_fcm_token(self, account: Mapping[str, Any], cache_name: str) -> str | ProviderResult:
        now = self.clock()
        token_uri = account.get("token_uri") or DEFAULT_TOKEN_URI
        self.check_target(token_uri)
        key = crypto.load_rsa_private_pem(account["private_key"])
        header = {"typ": "JWT"}
        if account.get("private_key_id"):
            header["kid"] = account["private_key_id"]
        assertion = crypto.jwt_rs256(
            header,
            {
                "iss": account["client_email"],
                "scope": FCM_SCOPE,
                "aud": token_uri,
                "iat": int(now),
                "exp": int(now) + 3600,
            },
            key,
        )
        form = urlencode({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion})
        resp = self.http.post(
            token_uri,
            content=form.encode("ascii"),
            headers={"content-type": "application/x-www-form-urlencoded"},
            timeout=_time_left(self.settings),
        )
        if resp.status_code >= 500 or resp.status_code == 429:
            return ProviderResult(
                RETRYABLE,
                PROVIDER_TRANSIENT,
                f"oauth_http_{resp.status_code}",
                resp.headers.get("retry-after"),
                status=resp.status_code,
            )
        data = _json(resp.content)
        if resp.status_code != 200 or not isinstance(data, dict) or not data.get("access_token"):
            reason = (
                data.get("error") if isinstance(data, dict) and data.get("error") else f"oauth_http_{resp.status_code}"
            )
            return ProviderResult(REJECTED, CREDENTIAL_AUTH, f"oauth_{reason}", status=resp.status_code)
        lifetime = int(data.get("expires_in") or 3600)
        self.tokens.put(cache_name, str(data["access_token"]), now + max(1, lifetime - FCM_TOKEN_MARGIN_S))
        return str(data["access_token"])

    def _send_fcm(
        self, device: Mapping[str, Any], rendered: Mapping[str, Any], creds: Mapping[str, Any], ctx: SendContext
    ) -> ProviderResult:
        account = creds["serviceAccount"]
        base = self.settings.fcm_endpoint.rstrip("/")
        url = f"{base}/v1/projects/{quote(account['project_id'], safe='')}/messages:send"
        self.check_target(base)
        message = dict(rendered["message"])  # a shallow copy: only these two keys change per device
        message["token"] = device["recipient"]["registrationToken"]
        if ctx.expires_at_ms is not None:
            remaining = max(0, int(ctx.expires_at_ms / 1000 - ctx.now))
            message["android"] = {**(message.get("android") or {}), "ttl": f"{remaining}s"}
        body = compact({"message": message})
        cache_name = f"fcm:{ctx.app_id}:{account['client_email']}:{creds.get('version', 1)}"
        result = ProviderResult(REJECTED, UNKNOWN, "not_sent")
        for attempt in range(2):
            token = self.fcm_access_token(account, cache_name)
            if isinstance(token, ProviderResult):
                return token
            headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
            resp: H2Response | Http1Response
            if url.startswith("https:"):
                resp = self.h2.post(
                    url, content=body, headers=headers, timeout=_time_left(self.settings), not_after=_not_after(ctx)
                )
            else:
                _check_expiry(ctx)
                resp = self.http.post(url, content=body, headers=headers, timeout=_time_left(self.settings))
            result = classify_fcm(resp.status_code, resp.headers, resp.content)
            if not result.refresh_token or attempt > 0:
                break
            self.tokens.drop(cache_name)  # 401/403: a fresh token, then one more try
        return result

    # Web Push

    def vapid_header(self, audience: str, creds: Mapping[str, Any]) -> str:
        now = self.clock()
        name = f"{creds['publicKey']}:{audience}"
        with self._lock:
            cached = self._vapid.get(name)
        if cached and cached[1] > now:
            return cached[0]
        key = crypto.p256_private_from_raw(creds["privateKey"])
        subject = creds.get("subject") or self.settings.vapid_contact
        header = crypto.vapid_authorization(audience, subject, key, now)
        with self._lock:
            self._vapid[name] = (header, now + 3600)  # tokens live 12 h; re-sign hourly
        return header

    def _send_webpush(
        self, device: Mapping[str, Any], rendered: Mapping[str, Any], creds: Mapping[str, Any], ctx: SendContext
    ) -> ProviderResult:
        recipient = device["recipient"]
        endpoint = recipient["endpoint"]
        self.check_target(endpoint)
        parts = urlsplit(endpoint)
        audience = f"{parts.scheme}://{parts.netloc}"
        body = crypto.webpush_encrypt(compact(rendered["body"]), recipient["p256dh"], recipient["auth"])
        headers = {
            "authorization": self.vapid_header(audience, creds),
            "content-encoding": "aes128gcm",
            "content-type": "application/octet-stream",
        }
        wp = rendered["headers"]
        ttl = wp.get("ttl")
        if ttl is None:
            ttl = (
                max(0, int(ctx.expires_at_ms / 1000 - ctx.now))
                if ctx.expires_at_ms is not None
                else WEBPUSH_DEFAULT_TTL_S
            )
        headers["ttl"] = str(ttl)
        if wp.get("urgency"):
            headers["urgency"] = wp["urgency"]
        if wp.get("topic"):
            headers["topic"] = wp["topic"]
        _check_expiry(ctx)
        resp = self.http.post(endpoint, content=body, headers=headers, timeout=_time_left(self.settings))
        return classify_webpush(resp.status_code, resp.headers, resp.content)


_tls_contexts: dict[tuple[str | None, str], ssl.SSLContext] = {}
_tls_lock = threading.Lock()


def tls_context(ca_file: str | None, alpn: str) -> ssl.SSLContext:
    """The TLS client context for provider connections (system CAs plus ``push.ca_file``),
    made once per process — loading the CA store takes tens of milliseconds. A worker's main
    process makes it before forking (``workers.push.preload``), so work-horses inherit it.
    One per ALPN protocol (``h2`` for the HTTP/2 client, ``http/1.1`` for the other)."""
    key = (ca_file, alpn)
    with _tls_lock:
        ctx = _tls_contexts.get(key)
        if ctx is None:
            ctx = ssl.create_default_context()
            if ca_file:
                ctx.load_verify_locations(ca_file)
            ctx.set_alpn_protocols([alpn])
            _tls_contexts[key] = ctx
        return ctx


def _not_after(ctx: SendContext) -> float | None:
    return ctx.expires_at_ms / 1000 if ctx.expires_at_ms is not None else None


def _check_expiry(ctx: SendContext) -> None:
    """Right before a request goes out: a push is never sent after its ``expiresAtMs``."""
    if ctx.expires_at_ms is not None and time.time() * 1000 >= ctx.expires_at_ms:
        raise H2Expired("the push expired before it was sent")


def _time_left(settings: PushSettings) -> float:
    """Seconds left of this thread's attempt deadline (the whole timeout outside one)."""
    at = getattr(_deadline, "at", None)
    if at is None:
        return settings.request_timeout_ms / 1000
    return max(0.0, float(at) - time.monotonic())


def _retry_after_s(header: str | None, now: float) -> float | None:
    from sockudo.push.retry import parse_retry_after

    delay_ms = parse_retry_after(header, int(now * 1000))
    return None if delay_ms is None else delay_ms / 1000


def _retry_in(gate: ProviderGate) -> int:
    """Whole seconds until the gate's pause ends (a Retry-After for the scheduled retry)."""
    return max(1, int(gate.paused_until - gate.clock() + 0.999))


def _resolve(host: str) -> list[str]:
    try:
        return [str(info[4][0]) for info in socket.getaddrinfo(host, None)]
    except OSError:
        return []
