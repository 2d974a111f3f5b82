"""Request validation and payload rendering for the push API. Pure: no I/O.

Casing: request bodies use the camelCase of Sockudo's push API
(https://sockudo.io/docs/server/push-notifications/: ``publishId``,
``notBeforeMs`` …); snake_case
``publish_id`` is accepted as an alias and ``sync`` is accepted and ignored (publishing is always
asynchronous). Recipient objects use Sockudo's snake_case inner fields (``device_id``,
``client_id``) and camelCase is accepted too. Responses are camelCase, except list envelopes
(``items``, ``next_cursor``, ``has_more``, as Sockudo's) and the publish response, which carries
``publish_id`` beside ``publishId`` for clients that read the snake_case name.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sockudo.core.errors import ApiError
from sockudo.push.crypto import CryptoError, b64url_decode, p256_public_from_raw, sha256_hex

PROVIDERS = ("apns", "fcm", "webpush")
TRANSPORTS = {"apns": "apns", "gcm": "fcm", "fcm": "fcm", "web": "webpush"}
UNSUPPORTED_TRANSPORTS = ("hms", "wns", "realtime")
FORM_FACTORS = ("phone", "tablet", "desktop", "tv", "car", "watch", "embedded", "other")
PLATFORMS = ("android", "ios", "browser", "windows", "macos", "watchos", "tvos", "other")
RECIPIENT_KINDS = ("device", "client", "channel")
SPEC_ONLY_KINDS = ("recipient", "registeredTopic", "userTopic", "providerTopic", "providerCondition", "indexedFilter")
APNS_PUSH_TYPES = (
    "alert",
    "background",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "liveactivity",
    "location",
    "pushtotalk",
    "widgets",
    "controls",
)
PAYLOAD_LIMITS = {"apns": 4096, "fcm": 4096, "webpush": 4096}
MAX_RECIPIENTS = 1024
CLIENT_SCOPE_PREFIX = "__sockudo_client_scope__:"
_ID = re.compile(r"^[A-Za-z0-9_.:@=+\-]{1,128}$")


def bad(message: str) -> ApiError:
    return ApiError(400, "invalid_input", message)


def provider_name(value: Any) -> str:
    """``webPush`` (Sockudo's spelling) and ``webpush`` both mean Web Push."""
    if not isinstance(value, str):
        raise bad("provider must be a string")
    name = {"webPush": "webpush", "gcm": "fcm"}.get(value, value).lower()
    if name not in PROVIDERS:
        raise bad(f"unsupported provider {value!r} (supported: apns, fcm, webpush)")
    return name


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()


def _str(body: Mapping[str, Any], key: str, *, required: bool = False, max_bytes: int = 1024) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise bad(f"{key} is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise bad(f"{key} must be a non-empty string")
    if len(value.encode()) > max_bytes:
        raise bad(f"{key} exceeds {max_bytes} bytes")
    return value


def _int_ms(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad(f"{key} must be a non-negative integer (milliseconds since the epoch)")
    return value


def _object(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad(f"{key} must be a JSON object")
    return value


# -- endpoint safety -------------------------------------------------------------------------


def host_is_local(host: str) -> bool:
    """Loopback, private, link-local, unspecified or reserved addresses; ``localhost``/``.local`` names."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost") or host.endswith(".local"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip_is_local(ip)


def ip_is_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified or ip.is_reserved or ip.is_multicast


def check_endpoint_url(url: str, *, allow_insecure: bool, what: str = "endpoint") -> None:
    """https only, no userinfo, no local hosts — unless the test/dev switch allows it."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port
    except ValueError:
        raise bad(f"{what} is not a valid URL") from None
    if parts.scheme not in ("https", "http") or not host:
        raise bad(f"{what} must be an https URL")
    if parts.username is not None or parts.password is not None:
        raise bad(f"{what} must not contain credentials")
    if allow_insecure:
        return
    if parts.scheme != "https":
        raise bad(f"{what} must use https")
    if host_is_local(host):
        raise bad(f"{what} must not point at a local or private host")


# -- devices ---------------------------------------------------------------------------------


def parse_recipient(raw: Any, *, allow_insecure: bool) -> dict[str, str]:
    recipient = _object(raw, "push.recipient")
    transport = recipient.get("transportType")
    if transport in UNSUPPORTED_TRANSPORTS:
        raise bad(f"transportType {transport!r} is not supported (supported: apns, gcm, web)")
    if transport not in TRANSPORTS:
        raise bad("push.recipient.transportType must be one of apns, gcm, web")
    if transport == "apns":
        token = recipient.get("deviceToken")
        if not isinstance(token, str) or not re.fullmatch(r"[0-9a-fA-F]{32,400}", token) or len(token) % 2:
            raise bad("push.recipient.deviceToken must be the APNs device token in hex")
        return {"transportType": "apns", "deviceToken": token.lower()}
    if transport in ("gcm", "fcm"):
        token = recipient.get("registrationToken")
        if not isinstance(token, str) or not re.fullmatch(r"[^\s]{1,4096}", token):
            raise bad("push.recipient.registrationToken must be the FCM registration token")
        return {"transportType": "gcm", "registrationToken": token}
    endpoint, p256dh, auth = recipient.get("endpoint"), recipient.get("p256dh"), recipient.get("auth")
    if not isinstance(endpoint, str) or len(endpoint) > 2048:
        raise bad("push.recipient.endpoint must be the subscription's URL")
    check_endpoint_url(endpoint, allow_insecure=allow_insecure, what="push.recipient.endpoint")
    try:
        p256_public_from_raw(b64url_decode(p256dh if isinstance(p256dh, str) else ""))
    except CryptoError:
        raise bad("push.recipient.p256dh must be an uncompressed P-256 public key, base64url") from None
    try:
        auth_ok = isinstance(auth, str) and len(b64url_decode(auth)) == 16
    except CryptoError:
        auth_ok = False
    if not auth_ok:
        raise bad("push.recipient.auth must be a 16-byte secret, base64url")
    return {"transportType": "web", "endpoint": endpoint, "p256dh": p256dh, "auth": auth}  # type: ignore[dict-item]


def recipient_token(recipient: Mapping[str, str]) -> str:
    return recipient.get("deviceToken") or recipient.get("registrationToken") or recipient.get("endpoint") or ""


def token_hash(recipient: Mapping[str, str]) -> str:
    return sha256_hex(recipient_token(recipient))


def parse_device(app_id: str, body: Any, *, now_ms: int, allow_insecure: bool) -> dict[str, Any]:
    """A device registration body → the stored device record."""
    body = _object(body, "body")
    device_id = _str(body, "id", required=True, max_bytes=256)
    assert device_id is not None
    if device_id.startswith(CLIENT_SCOPE_PREFIX):
        raise bad(f"device id may not start with {CLIENT_SCOPE_PREFIX}")
    if body.get("appId") is not None and body.get("appId") != app_id:
        raise bad("appId does not match the app in the path")
    form_factor = body.get("formFactor", "other")
    if form_factor not in FORM_FACTORS:
        raise bad(f"formFactor must be one of {', '.join(FORM_FACTORS)}")
    platform = body.get("platform")
    if platform not in PLATFORMS:
        raise bad(f"platform must be one of {', '.join(PLATFORMS)}")
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict) or len(compact(metadata)) > 4096:
        raise bad("metadata must be a JSON object of at most 4096 bytes")
    push = _object(body.get("push"), "push")
    recipient = parse_recipient(push.get("recipient"), allow_insecure=allow_insecure)
    last_active = _int_ms(body, "lastActiveAtMs")
    device = {
        "id": device_id,
        "appId": app_id,
        "clientId": _str(body, "clientId", max_bytes=256),
        "formFactor": form_factor,
        "platform": platform,
        "metadata": metadata,
        "timezone": _str(body, "timezone", max_bytes=64),
        "locale": _str(body, "locale", max_bytes=64),
        "lastActiveAtMs": last_active,
        "provider": TRANSPORTS[recipient["transportType"]],
        "recipient": recipient,
        "tokenHash": token_hash(recipient),
        "pushState": "ACTIVE",
        "pushFailureCount": 0,
        "createdAtMs": now_ms,
        "updatedAtMs": now_ms,
    }
    return device


_COMPARED = ("clientId", "formFactor", "platform", "metadata", "timezone", "locale", "lastActiveAtMs", "recipient")


def device_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return any(old.get(k) != new.get(k) for k in _COMPARED)


def device_view(device: Mapping[str, Any]) -> dict[str, Any]:
    """What the API shows of a device: never the token itself."""
    return {
        "appId": device["appId"],
        "id": device["id"],
        "clientId": device.get("clientId"),
        "formFactor": device.get("formFactor"),
        "platform": device.get("platform"),
        "timezone": device.get("timezone"),
        "locale": device.get("locale"),
        "metadata": device.get("metadata") or {},
        "lastActiveAtMs": device.get("lastActiveAtMs"),
        "pushState": device.get("pushState", "ACTIVE"),
        "pushFailureCount": device.get("pushFailureCount", 0),
        "recipient": {
            "transportType": device["recipient"]["transportType"],
            "provider": device["provider"],
            "tokenHash": device["tokenHash"],
        },
        "createdAtMs": device.get("createdAtMs"),
        "updatedAtMs": device.get("updatedAtMs"),
    }


def parse_channel(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_\-=@,.;#:]{1,200}", value):
        raise bad("channel must be a valid channel name (1–200 of A-Z a-z 0-9 _ - = @ , . ; # :)")
    return value


# -- publish ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishRequest:
    publish_id: str
    caller_publish_id: bool
    recipients: tuple[tuple[str, str], ...]  # (kind, value), kind ∈ device|client|channel
    rendered: dict[str, dict[str, Any]]  # provider → {"body": …, "headers": {…}} / FCM {"message": …}
    used_override: dict[str, bool]
    not_before_ms: int | None
    expires_at_ms: int | None
    intent_hash: str


_PAYLOAD_KEYS = (
    "title",
    "body",
    "icon",
    "image",
    "sound",
    "badge",
    "collapseKey",
    "templateData",
    "data",
    "templateId",
)
_PUBLISH_KEYS = (
    "publishId",
    "publish_id",
    "recipients",
    "payload",
    "providerOverrides",
    "sync",
    "notBeforeMs",
    "expiresAtMs",
    "not_before_ms",
    "expires_at_ms",
)


def _recipient(raw: Any, index: int) -> tuple[str, str]:
    where = f"recipients[{index}]"
    if not isinstance(raw, dict):
        raise bad(f"{where} must be an object with a type")
    kind = raw.get("type")
    if kind in SPEC_ONLY_KINDS:
        raise bad(f"{where}: recipient type {kind!r} is not supported (supported: device, client, channel)")
    if kind not in RECIPIENT_KINDS:
        raise bad(f"{where}: unknown recipient type {kind!r} (supported: device, client, channel)")
    if kind == "device":
        value = raw.get("device_id", raw.get("deviceId"))
        if not isinstance(value, str) or not value:
            raise bad(f"{where}: device recipients need device_id")
    elif kind == "client":
        value = raw.get("client_id", raw.get("clientId"))
        if not isinstance(value, str) or not value:
            raise bad(f"{where}: client recipients need client_id")
    else:
        value = parse_channel(raw.get("channel"))
    return kind, value


def _data_strings(data: Mapping[str, Any]) -> dict[str, str]:
    """FCM ``data`` values must be strings: non-strings are sent as their JSON text."""
    return {str(k): v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in data.items()}


def _parse_payload(raw: Any) -> dict[str, Any]:
    payload = _object(raw, "payload")
    for key in payload:
        if key not in _PAYLOAD_KEYS:
            raise bad(
                f"payload.{key} is not a payload field (title, body, icon, image, sound, badge, collapseKey, "
                "templateData)"
            )
    if payload.get("templateId") is not None:
        raise bad("payload.templateId: templates are not supported by this server")
    out: dict[str, Any] = {}
    for key, limit in (("title", 256), ("body", 4096), ("sound", 256), ("collapseKey", 64)):
        value = payload.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise bad(f"payload.{key} must be a string")
        if len(value.encode()) > limit:
            raise bad(f"payload.{key} exceeds {limit} bytes")
        out[key] = value
    for key in ("icon", "image"):
        value = payload.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or len(value.encode()) > 2048 or not value.startswith("https://"):
            raise bad(f"payload.{key} must be an https URL of at most 2048 bytes")
        out[key] = value
    if payload.get("badge") is not None:
        if isinstance(payload["badge"], bool) or not isinstance(payload["badge"], int) or payload["badge"] < 0:
            raise bad("payload.badge must be a non-negative integer")
        out["badge"] = payload["badge"]
    data = payload.get("templateData", payload.get("data"))
    if data is not None:
        data = _object(data, "payload.templateData")
        if len(compact(data)) > 8192:
            raise bad("payload.templateData exceeds 8192 bytes")
        out["templateData"] = data
    if not any(k in out for k in ("title", "body", "templateData")):
        raise bad("payload needs a title, a body or templateData")
    return out


def render(
    payload: Mapping[str, Any], overrides: Mapping[str, dict[str, Any]], expires_at_ms: int | None
) -> tuple[dict[str, dict[str, Any]], dict[str, bool]]:
    """The provider payloads; an override replaces a provider's mapping."""
    data = payload.get("templateData") or {}
    alert = {k: payload[k] for k in ("title", "body") if k in payload}
    # APNs
    aps: dict[str, Any] = {}
    if alert:
        aps["alert"] = alert
    if "sound" in payload:
        aps["sound"] = payload["sound"]
    if "badge" in payload:
        aps["badge"] = payload["badge"]
    apns_body: dict[str, Any] = {"aps": aps}
    if data:
        apns_body["data"] = data
    apns_headers: dict[str, str] = {
        "apns-push-type": "alert" if alert else "background",
        "apns-priority": "10" if alert else "5",
    }
    if "collapseKey" in payload:
        apns_headers["apns-collapse-id"] = payload["collapseKey"]
    if expires_at_ms is not None:
        apns_headers["apns-expiration"] = str(expires_at_ms // 1000)
    # FCM
    message: dict[str, Any] = {}
    notification = dict(alert)
    if "image" in payload or "icon" in payload:
        notification["image"] = payload.get("image", payload.get("icon"))
    if notification:
        message["notification"] = notification
    if data:
        message["data"] = _data_strings(data)
    android: dict[str, Any] = {}
    if "collapseKey" in payload:
        android["collapse_key"] = payload["collapseKey"]
    android_notification = {k: payload[k] for k in ("sound",) if k in payload}
    if android_notification:
        android["notification"] = android_notification
    if android:
        message["android"] = android
    # Web Push
    web_notification = {k: payload[k] for k in ("title", "body", "icon", "image", "badge") if k in payload}
    web_body: dict[str, Any] = {}
    if web_notification:
        web_body["notification"] = web_notification
    if data:
        web_body["data"] = data
    web_headers: dict[str, str] = {"urgency": "normal"}
    if "collapseKey" in payload:
        web_headers["topic"] = payload["collapseKey"]

    rendered: dict[str, dict[str, Any]] = {
        "apns": {"body": apns_body, "headers": apns_headers},
        "fcm": {"message": message},
        "webpush": {"body": web_body, "headers": web_headers},
    }
    used = {p: False for p in PROVIDERS}
    for provider, override in overrides.items():
        used[provider] = True
        override = dict(override)
        headers = override.pop("headers", None)
        if provider == "fcm":
            if headers is not None:
                raise bad("providerOverrides[fcm].payload.headers is not supported")
            rendered["fcm"] = {"message": override}
            continue
        merged_headers = dict(rendered[provider]["headers"])
        if headers is not None:
            headers = _object(headers, f"providerOverrides[{provider}].payload.headers")
            for name, value in headers.items():
                if not isinstance(value, (str, int)) or isinstance(value, bool):
                    raise bad(f"providerOverrides[{provider}] header {name!r} must be a string")
                merged_headers[str(name).lower()] = str(value)
        rendered[provider] = {"body": override, "headers": merged_headers}
    push_type = rendered["apns"]["headers"].get("apns-push-type")
    if push_type not in APNS_PUSH_TYPES:
        raise bad(f"apns-push-type must be one of {', '.join(APNS_PUSH_TYPES)}")
    if rendered["apns"]["headers"].get("apns-priority") not in ("1", "5", "10"):
        raise bad("apns-priority must be 1, 5 or 10")
    allowed = {
        "apns": ("apns-push-type", "apns-priority", "apns-collapse-id", "apns-expiration", "apns-topic"),
        "webpush": ("ttl", "urgency", "topic"),
    }
    for provider, names in allowed.items():
        for name in rendered[provider]["headers"]:
            if name not in names:
                raise bad(f"providerOverrides[{provider}]: header {name!r} is not allowed ({', '.join(names)})")
    if rendered["webpush"]["headers"].get("urgency") not in ("very-low", "low", "normal", "high"):
        raise bad("Web Push urgency must be very-low, low, normal or high")
    topic = rendered["webpush"]["headers"].get("topic")
    if topic is not None and not re.fullmatch(r"[A-Za-z0-9_\-]{1,32}", topic):
        raise bad("Web Push topic (collapseKey) must be 1–32 URL-safe base64 characters")
    for provider in PROVIDERS:
        size = len(compact(payload_body(provider, rendered[provider])))
        if size > PAYLOAD_LIMITS[provider]:
            raise bad(f"{provider} payload exceeds {PAYLOAD_LIMITS[provider]} bytes ({size} bytes rendered)")
    return rendered, used


def payload_body(provider: str, rendered: Mapping[str, Any]) -> Any:
    return rendered["message"] if provider == "fcm" else rendered["body"]


def parse_publish(body: Any, *, now_ms: int) -> PublishRequest:
    body = _object(body, "body")
    for key in body:
        if key not in _PUBLISH_KEYS:
            raise bad(f"{key} is not a publish field")
    pid_camel, pid_snake = body.get("publishId"), body.get("publish_id")
    if pid_camel is not None and pid_snake is not None and pid_camel != pid_snake:
        raise bad("publishId and publish_id disagree")
    publish_id = pid_camel if pid_camel is not None else pid_snake
    caller = publish_id is not None
    if caller and (not isinstance(publish_id, str) or not _ID.fullmatch(publish_id)):
        raise bad("publishId must be 1–128 characters of A-Z a-z 0-9 _ . : @ = + -")
    if "sync" in body and not isinstance(body["sync"], bool):
        raise bad("sync must be true or false")
    recipients_raw = body.get("recipients")
    if not isinstance(recipients_raw, list) or not recipients_raw:
        raise bad("recipients must be a non-empty list")
    if len(recipients_raw) > MAX_RECIPIENTS:
        raise bad(f"at most {MAX_RECIPIENTS} recipients per publish")
    recipients = tuple(dict.fromkeys(_recipient(r, i) for i, r in enumerate(recipients_raw)))
    payload = _parse_payload(body.get("payload"))
    overrides: dict[str, dict[str, Any]] = {}
    raw_overrides = body.get("providerOverrides") or []
    if not isinstance(raw_overrides, list):
        raise bad("providerOverrides must be a list")
    for i, item in enumerate(raw_overrides):
        item = _object(item, f"providerOverrides[{i}]")
        provider = provider_name(item.get("provider"))
        override = _object(item.get("payload"), f"providerOverrides[{i}].payload")
        if len(compact(override)) > 4096:
            raise bad(f"providerOverrides[{i}].payload exceeds 4096 bytes")
        if provider in overrides:
            raise bad(f"providerOverrides: {provider} is given twice")
        overrides[provider] = override
    not_before = _int_ms(body, "notBeforeMs") if "notBeforeMs" in body else _int_ms(body, "not_before_ms")
    expires_at = _int_ms(body, "expiresAtMs") if "expiresAtMs" in body else _int_ms(body, "expires_at_ms")
    if expires_at is not None and expires_at <= now_ms:
        raise bad("expiresAtMs is in the past")
    if not_before is not None and expires_at is not None and not_before >= expires_at:
        raise bad("notBeforeMs must be before expiresAtMs")
    rendered, used = render(payload, overrides, expires_at)
    intent = sha256_hex(
        compact(
            {
                "recipients": recipients,
                "payload": payload,
                "overrides": overrides,
                "notBeforeMs": not_before,
                "expiresAtMs": expires_at,
            }
        )
    )
    return PublishRequest(
        publish_id=publish_id if caller else "pub_" + uuid.uuid4().hex,
        caller_publish_id=caller,
        recipients=recipients,
        rendered=rendered,
        used_override=used,
        not_before_ms=not_before,
        expires_at_ms=expires_at,
        intent_hash=intent,
    )


def rendered_view(request: PublishRequest) -> list[dict[str, Any]]:
    return [
        {"provider": p, "payload": payload_body(p, request.rendered[p]), "usedOverride": request.used_override[p]}
        for p in PROVIDERS
    ]
