"""``[cors]``: the CORS headers of the HTTP API, with Sockudo's key names.

The default answers any origin (``*``) without credentials, which is what the REST API always
did: it is meant for app servers holding the app secret, and a browser cannot sign a request
without exposing that secret. A list of origins answers only those (echoing the request's
``Origin``, with ``Vary: Origin``); ``credentials = true`` adds
``Access-Control-Allow-Credentials`` (and never pairs it with ``*``, which browsers refuse).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sockudo.config.coerce import build, table
from sockudo.core.errors import ConfigError


@dataclass(frozen=True)
class CorsConfig:
    origin: tuple[str, ...] = ("*",)
    methods: tuple[str, ...] = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    allowed_headers: tuple[str, ...] = ("Content-Type", "X-Idempotency-Key")
    credentials: bool = False


def parse_cors(raw: Mapping[str, Any]) -> CorsConfig:
    """The ``[cors]`` table (``origin``, ``methods``, ``allowed_headers``, ``credentials``)."""
    config: CorsConfig = build(CorsConfig, dict(table("[cors]", raw)), "cors")
    if not config.origin:
        raise ConfigError("config: cors.origin must list at least one origin (or \"*\")")
    return config
