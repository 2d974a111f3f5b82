"""Talking to a server as an app's backend does: the official Python SDK, and raw signed requests
(for what the SDK cannot send: wrong signatures, odd bodies, extra headers)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from typing import Any
from urllib.parse import urlencode

import pusher
import requests

from tests.support.procs import ServerProcess
from tests.support.wsraw import RawClient

# Numeric ids: the Python SDK only accepts ^[0-9]+$ app ids.
APP: dict[str, Any] = {"id": "100", "key": "app-key-1", "secret": "app-secret-1", "enable_client_messages": True}


def sdk_for(server: ServerProcess, app: dict[str, Any] = APP) -> pusher.Pusher:
    """The official Python server SDK pointed at ``server``."""
    return pusher.Pusher(app_id=app["id"], key=app["key"], secret=app["secret"], host="127.0.0.1",
                         port=server.port, ssl=False, timeout=10)


def signed_url(base: str, method: str, path: str, app: dict[str, Any] = APP, body: bytes = b"",
               params: dict[str, str] | None = None, secret: str | None = None, age: int = 0) -> str:
    """``base + path`` with Pusher's auth query: key, timestamp (``age`` seconds old), version,
    ``body_md5`` on POST, and the HMAC-SHA256 signature over the lower-cased, sorted parameters."""
    query = {k: str(v) for k, v in (params or {}).items()}
    query.update(auth_key=app["key"], auth_timestamp=str(int(time.time()) - age), auth_version="1.0")
    if method == "POST":
        query["body_md5"] = hashlib.md5(body).hexdigest()
    to_sign = "\n".join(
        [method, path, "&".join(f"{k.lower()}={v}" for k, v in sorted(query.items(), key=lambda kv: kv[0].lower()))]
    )
    query["auth_signature"] = hmac.new((secret or app["secret"]).encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{base}{path}?{urlencode(query)}"


def signed(
    server: ServerProcess,
    method: str,
    path: str,
    body: Any = None,
    params: dict[str, str] | None = None,
    app: dict[str, Any] = APP,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    secret: str | None = None,
    send_instead: bytes | None = None,
) -> requests.Response:
    """A signed REST request; ``raw`` signs exact bytes, ``send_instead`` sends other bytes than it signed."""
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    url = signed_url(server.url, method, path, app, data, params, secret)
    all_headers = {"Content-Type": "application/json"} if method == "POST" else {}
    all_headers.update(headers or {})
    if send_instead is not None:
        data = send_instead
    return requests.request(method, url, data=data or None, headers=all_headers, timeout=10)


#: The channel of the module-wide ``watcher`` (tests/integration/conftest.py).
WATCH = "still-alive-watch"
_markers = itertools.count()


def assert_still_delivering(sdk: pusher.Pusher, watcher: RawClient) -> None:
    """A good publish still reaches the module's long-lived subscriber (bad input disturbed no one)."""
    marker = f"alive-{next(_markers)}"
    sdk.trigger(WATCH, "still-alive", marker)
    frame = watcher.expect(lambda f: f.get("event") == "still-alive" and f.get("data") == marker, timeout=5)
    assert frame["channel"] == WATCH
