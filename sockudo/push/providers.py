"""APNs, FCM HTTP v1 and Web Push: credentials, wire requests, response classification (spec §6.8).

The classifiers (``classify_*``) are pure functions of (status, headers, body). The senders
speak the real protocols against configurable base URLs with ``httpx`` — HTTP/2 for APNs
(prior knowledge on ``http://`` test endpoints, ALPN ``h2`` on https), HTTP/1.1 for FCM and Web
Push. Plain http and local/private hosts (including names resolving to them) are refused unless
``push.allow_insecure_endpoints`` is set (tests/dev only).

Access tokens are cached through a :class:`TokenCache` (in-process, backed by Redis when
available so every worker shares one APNs JWT and one FCM OAuth token): APNs provider tokens
are reused for 50 minutes (Apple rejects tokens older than an hour and throttles refreshes);
FCM OAuth tokens until 5 minutes before ``expires_in``.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from sockudo.push import crypto
from sockudo.push.crypto import CryptoError
from sockudo.push.model import bad, check_endpoint_url, compact, ip_is_local
from sockudo.push.settings import PushSettings

logger = logging.getLogger(__name__)

APNS_JWT_REUSE_S = 50 * 60
FCM_TOKEN_MARGIN_S = 5 * 60
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
WEBPUSH_DEFAULT_TTL_S = 2_419_200

ACCEPTED = "accepted"
REJECTED = "rejected"
RETRYABLE = "retryable"

# failure classes (spec §1.2 I)
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
    outcome: str  # accepted | rejected | retryable
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
            key = crypto.p256_private_from_raw(private)
        except CryptoError as exc:
            raise bad(f"privateKey: {exc}") from None
        public = crypto.b64url(crypto.p256_public_raw(key))
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


class ProviderClients:
    """The HTTP side of all three providers; one instance per process, connections reused."""

    def __init__(
        self,
        settings: PushSettings,
        tokens: TokenCache,
        clock: Callable[[], float] = time.time,
        resolver: Callable[[str], list[str]] | None = None,
    ) -> None:
        import httpx  # imported here so the pure modules never need it

        self.settings = settings
        self.tokens = tokens
        self.clock = clock
        self.resolver = resolver or _resolve
        timeout = httpx.Timeout(settings.request_timeout_ms / 1000, connect=settings.connect_timeout_ms / 1000)
        verify: Any = True
        if settings.ca_file:
            ctx = ssl.create_default_context()
            ctx.load_verify_locations(settings.ca_file)
            verify = ctx
        self._httpx = httpx
        # httpx logs every request URL at INFO: APNs paths and Web Push endpoints are device tokens.
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
        self.apns = httpx.Client(
            http1=False, http2=True, timeout=timeout, verify=verify, follow_redirects=False, trust_env=False
        )
        self.http = httpx.Client(timeout=timeout, verify=verify, follow_redirects=False, trust_env=False)
        self._vapid: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.apns.close()
        self.http.close()

    # -- safety --

    def check_target(self, url: str) -> None:
        """Refuse http and local/private targets (also by DNS answer) unless insecure is allowed."""
        if self.settings.allow_insecure_endpoints:
            return
        try:
            check_endpoint_url(url, allow_insecure=False, what="provider endpoint")
        except Exception as exc:
            raise EndpointRefused(str(getattr(exc, "message", exc))) from None
        host = urlsplit(url).hostname or ""
        import ipaddress

        for addr in self.resolver(host):
            try:
                if ip_is_local(ipaddress.ip_address(addr)):
                    raise EndpointRefused("provider endpoint resolves to a local or private address")
            except ValueError:
                continue

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
            if provider == "apns":
                return self._send_apns(device, rendered, credentials, ctx)
            if provider == "fcm":
                return self._send_fcm(device, rendered, credentials, ctx)
            return self._send_webpush(device, rendered, credentials, ctx)
        except EndpointRefused as exc:
            return ProviderResult(REJECTED, UNKNOWN, f"endpoint_refused: {exc}")
        except self._httpx.HTTPError as exc:
            return transport_failure(exc)
        except (OSError, ssl.SSLError) as exc:
            return transport_failure(exc)

    # APNs

    def apns_jwt(self, creds: Mapping[str, Any], cache_name: str, force: bool = False) -> str:
        now = self.clock()
        if not force:
            token = self.tokens.get(cache_name, now)
            if token is not None:
                return token
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
        for attempt in range(2):
            headers["authorization"] = f"bearer {self.apns_jwt(creds, cache_name, force=attempt > 0)}"
            resp = self.apns.post(url, content=body, headers=headers)
            result = classify_apns(resp.status_code, resp.headers, resp.content)
            if not result.refresh_token:
                break
            self.tokens.drop(cache_name)
        return result

    # FCM

    def fcm_access_token(self, account: Mapping[str, Any], cache_name: str) -> str | ProviderResult:
        now = self.clock()
        token = self.tokens.get(cache_name, now)
        if token is not None:
            return token
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
        resp = self.http.post(
            token_uri, data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
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
        message = json.loads(json.dumps(rendered["message"]))
        message["token"] = device["recipient"]["registrationToken"]
        if ctx.expires_at_ms is not None:
            remaining = max(0, int(ctx.expires_at_ms / 1000 - ctx.now))
            message.setdefault("android", {})["ttl"] = f"{remaining}s"
        body = compact({"message": message})
        cache_name = f"fcm:{ctx.app_id}:{account['client_email']}:{creds.get('version', 1)}"
        result = ProviderResult(REJECTED, UNKNOWN, "not_sent")
        for attempt in range(2):
            token = self.fcm_access_token(account, cache_name)
            if isinstance(token, ProviderResult):
                return token
            resp = self.http.post(
                url, content=body, headers={"authorization": f"Bearer {token}", "content-type": "application/json"}
            )
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
        resp = self.http.post(endpoint, content=body, headers=headers)
        return classify_webpush(resp.status_code, resp.headers, resp.content)


def _resolve(host: str) -> list[str]:
    try:
        return [str(info[4][0]) for info in socket.getaddrinfo(host, None)]
    except OSError:
        return []
