"""The main listener's settings: ``[rate_limiter]`` and ``[ssl]`` (docs/security.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from sockudo.config.coerce import build, table, unknown_key
from sockudo.core.errors import ConfigError


@dataclass(frozen=True)
class RateLimiterConfig:
    """``[rate_limiter]``, off by default as in Sockudo's shipped config. Key names follow Sockudo
    (``api_rate_limit`` / ``websocket_rate_limit`` tables; ``RATE_LIMITER_*`` variables)."""

    enabled: bool = False
    driver: str = "memory"
    max_connections_per_ip: int = 0  # open WebSockets per client IP; 0 = unlimited (not in Sockudo)
    api_max_requests: int = 100  # signed REST calls per IP per window (429 beyond)
    api_window_seconds: int = 60
    api_trust_hops: int = 0  # X-Forwarded-For entries added by proxies we trust
    websocket_max_requests: int = 20  # WebSocket upgrades per IP per window (429 beyond)
    websocket_window_seconds: int = 60
    websocket_trust_hops: int = 0


@dataclass(frozen=True)
class SslConfig:
    """``[ssl]``: TLS on the main listener, for deployments without a terminating proxy."""

    enabled: bool = False
    cert_path: str = ""  # PEM certificate (chain)
    key_path: str = ""  # PEM private key
    passphrase: str = ""  # of an encrypted key; never logged


_RATE_TABLES = {"api_rate_limit": "api_", "websocket_rate_limit": "websocket_"}


def parse_rate_limiter(raw: Mapping[str, Any], env: Mapping[str, str]) -> RateLimiterConfig:
    """The ``[rate_limiter]`` table (with Sockudo's nested rate tables), then ``RATE_LIMITER_*``."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _RATE_TABLES:
            for sub, sub_value in table(f"rate_limiter.{key}", value).items():
                if sub == "identifier":
                    continue  # Sockudo's label for logs; accepted, unused
                if sub not in ("max_requests", "window_seconds", "trust_hops"):
                    raise unknown_key(f"rate_limiter.{key}.{sub}", sub,
                                      ("max_requests", "window_seconds", "trust_hops", "identifier"))
                flat[_RATE_TABLES[key] + sub] = sub_value
        else:
            flat[key] = value
    for f in fields(RateLimiterConfig):
        var = "RATE_LIMITER_" + f.name.upper()
        if env.get(var, "") != "":
            flat[f.name] = env[var]
    config: RateLimiterConfig = build(RateLimiterConfig, flat, "rate_limiter")
    if config.driver not in ("memory", "redis"):
        raise ConfigError(f"config: rate_limiter.driver must be \"memory\" or \"redis\", got {config.driver!r}")
    for name in ("api_window_seconds", "websocket_window_seconds"):
        if getattr(config, name) < 1:
            key = name.replace("_window", "_rate_limit.window")
            raise ConfigError(f"config: rate_limiter.{key} must be at least 1")
    return config


def parse_ssl(raw: Mapping[str, Any], env: Mapping[str, str]) -> SslConfig:
    """The ``[ssl]`` table, then ``SSL_ENABLED``, ``SSL_CERT_PATH``, ``SSL_KEY_PATH``, ``SSL_PASSPHRASE``.
    An enabled listener needs both files readable, or start-up fails naming the key."""
    values = dict(raw)
    for f in fields(SslConfig):
        var = "SSL_" + f.name.upper()
        if env.get(var, "") != "":
            values[f.name] = env[var]
    config: SslConfig = build(SslConfig, values, "ssl")
    if config.enabled:
        for name in ("cert_path", "key_path"):
            path = getattr(config, name)
            if not path:
                raise ConfigError(f"config: ssl.{name} (SSL_{name.upper()}) is required when ssl.enabled is true")
            if not os.access(path, os.R_OK):
                raise ConfigError(f"config: ssl.{name} {path!r} is not a readable file")
    return config

