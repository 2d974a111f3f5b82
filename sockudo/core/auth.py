"""HMAC signing and verification. Pure; all comparisons constant-time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import parse_qsl

from sockudo.core.errors import ApiError

TIMESTAMP_WINDOW_SECONDS = 600


def sign(secret: str, message: str | bytes) -> str:
    """Lowercase hex HMAC-SHA256 keyed with the app secret."""
    if isinstance(message, str):
        message = message.encode("utf-8")
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def channel_string_to_sign(socket_id: str, channel: str, channel_data: str | None = None) -> str:
    """``socket:channel`` for private channels; presence appends the raw channel_data as received."""
    if channel_data is None:
        return f"{socket_id}:{channel}"
    return f"{socket_id}:{channel}:{channel_data}"


def channel_auth(key: str, secret: str, socket_id: str, channel: str, channel_data: str | None = None) -> str:
    return f"{key}:{sign(secret, channel_string_to_sign(socket_id, channel, channel_data))}"


def verify_channel_auth(
    key: str, secret: str, socket_id: str, channel: str, auth: str, channel_data: str | None = None
) -> bool:
    """The whole ``key:hex`` string is compared, so a foreign key fails too."""
    expected = channel_auth(key, secret, socket_id, channel, channel_data)
    return hmac.compare_digest(expected.encode("utf-8"), auth.encode("utf-8"))


def user_auth(key: str, secret: str, socket_id: str, user_data: str) -> str:
    return f"{key}:{sign(secret, f'{socket_id}::user::{user_data}')}"


def verify_user_auth(key: str, secret: str, socket_id: str, user_data: str, auth: str) -> bool:
    expected = user_auth(key, secret, socket_id, user_data)
    return hmac.compare_digest(expected.encode("utf-8"), auth.encode("utf-8"))


def webhook_signature(secret: str, body: bytes) -> str:
    return sign(secret, body)


# -- REST request signing -------------------------------------------------


def query_pairs(query_string: str) -> list[tuple[str, str]]:
    """URL-decoded ``(key, value)`` pairs in order; blank values kept."""
    return parse_qsl(query_string, keep_blank_values=True)


def rest_string_to_sign(method: str, path: str, pairs: Iterable[tuple[str, str]]) -> str:
    params = sorted((k.lower(), v) for k, v in pairs if k.lower() != "auth_signature")
    query = "&".join(f"{k}={v}" for k, v in params)
    return f"{method.upper()}\n{path}\n{query}"


def rest_signature(secret: str, method: str, path: str, pairs: Iterable[tuple[str, str]]) -> str:
    return sign(secret, rest_string_to_sign(method, path, pairs))


def verify_rest_query(*, secret: str, method: str, path: str, query_string: str, now: float) -> str | None:
    """Raise ``ApiError(401)`` unless the query is signed by ``secret``; returns the signed
    ``body_md5`` (None when absent).

    Everything but the body is checked here: the timestamp window, ``body_md5`` present on every
    POST, and the signature over method, path and query (which includes ``body_md5``). So a
    request nobody signed is refused before its body is read (``verify_body_md5`` comes after).
    The caller has already matched ``auth_key`` to the app.
    """
    pairs = query_pairs(query_string)
    params = {k.lower(): v for k, v in pairs}
    timestamp = params.get("auth_timestamp", "")
    try:
        ts = int(timestamp)
    except ValueError:
        raise ApiError(401, "auth_failed", "auth_timestamp missing or not an integer") from None
    if abs(now - ts) > TIMESTAMP_WINDOW_SECONDS:
        raise ApiError(401, "auth_failed", "Timestamp expired: outside the 600 s window")
    body_md5 = params.get("body_md5")
    if method.upper() == "POST" and body_md5 is None:
        raise ApiError(401, "auth_failed", "body_md5 is required on POST")
    given = params.get("auth_signature", "")
    expected = rest_signature(secret, method, path, pairs)
    if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode()):
        raise ApiError(401, "auth_failed", "Invalid API signature")
    return body_md5


def verify_body_md5(body_md5: str | None, body: bytes) -> None:
    """Raise ``ApiError(401)`` unless the body is the one signed. ``body_md5`` is required on POST
    (``verify_rest_query``); on GET/DELETE it is accepted only when it is the MD5 of the empty
    body (the Python SDK sends it)."""
    if body_md5 is not None and not hmac.compare_digest(body_md5.encode(), hashlib.md5(body).hexdigest().encode()):
        raise ApiError(401, "auth_failed", "body_md5 does not match the body")


def verify_rest_request(
    *,
    secret: str,
    method: str,
    path: str,
    query_string: str,
    body: bytes,
    now: float,
) -> None:
    """Raise ``ApiError(401)`` unless the request (query and body) is signed by ``secret``."""
    body_md5 = verify_rest_query(secret=secret, method=method, path=path, query_string=query_string, now=now)
    verify_body_md5(body_md5, body)
