"""The main listener's settings: ``[rate_limiter]`` and ``[ssl]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

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


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config: {key} must be true or false, got {value!r}")
    if kind is int:
        try:
            number = int(str(value).strip()) if not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or number < 0:
            raise ConfigError(f"config: {key} must be a whole number >= 0, got {value!r}")
        return number
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"config: {key} must be a string, got {value!r}")
    return str(value)


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    known = {f.name: f.type for f in fields(cls)}
    kinds = {"bool": bool, "int": int, "str": str}
    out = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"config: unknown key {where}{name}")
        out[name] = _coerce(f"{where}{name}", value, kinds[str(known[name])])
    return cls(**out)


def parse_rate_limiter(raw: Mapping[str, Any], env: Mapping[str, str]) -> RateLimiterConfig:
    """The ``[rate_limiter]`` table (with Sockudo's nested rate tables), then ``RATE_LIMITER_*``."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _RATE_TABLES:
            if not isinstance(value, Mapping):
                raise ConfigError(f"config: [rate_limiter.{key}] must be a table")
            for sub, sub_value in value.items():
                if sub == "identifier":
                    continue  # Sockudo's label for logs; accepted, unused
                if sub not in ("max_requests", "window_seconds", "trust_hops"):
                    raise ConfigError(f"config: unknown key rate_limiter.{key}.{sub}")
                flat[_RATE_TABLES[key] + sub] = sub_value
        else:
            flat[key] = value
    for f in fields(RateLimiterConfig):
        var = "RATE_LIMITER_" + f.name.upper()
        if env.get(var, "") != "":
            flat[f.name] = env[var]
    config: RateLimiterConfig = _build(RateLimiterConfig, flat, "rate_limiter.")
    if config.driver not in ("memory", "redis"):
        raise ConfigError(f"config: rate_limiter.driver must be \"memory\" or \"redis\", got {config.driver!r}")
    for name in ("api_window_seconds", "websocket_window_seconds"):
        if getattr(config, name) < 1:
            raise ConfigError(f"config: rate_limiter.{name.replace('_window', '_rate_limit.window')} must be at least 1")
    return config


def parse_ssl(raw: Mapping[str, Any], env: Mapping[str, str]) -> SslConfig:
    """The ``[ssl]`` table, then ``SSL_ENABLED``, ``SSL_CERT_PATH``, ``SSL_KEY_PATH``, ``SSL_PASSPHRASE``.
    An enabled listener needs both files readable, or start-up fails naming the key."""
    values = dict(raw)
    for f in fields(SslConfig):
        var = "SSL_" + f.name.upper()
        if env.get(var, "") != "":
            values[f.name] = env[var]
    config: SslConfig = _build(SslConfig, values, "ssl.")
    if config.enabled:
        for name in ("cert_path", "key_path"):
            path = getattr(config, name)
            if not path:
                raise ConfigError(f"config: ssl.{name} (SSL_{name.upper()}) is required when ssl.enabled is true")
            if not os.access(path, os.R_OK):
                raise ConfigError(f"config: ssl.{name} {path!r} is not a readable file")
    return config

