"""Configuration: code defaults, then a TOML or JSON file (this server's layout or Sockudo's),
then environment variables; read once at start-up into frozen dataclasses (docs/configuration.md).

- :mod:`~sockudo.config.schema`: the dataclasses and their defaults;
- :mod:`~sockudo.config.coerce`: the one set of value rules every section uses;
- :mod:`~sockudo.config.loader`: reading, ``${VAR}`` interpolation, environment, validation;
- :mod:`~sockudo.config.sockudo_keys`: Sockudo's keys and what each does here;
- :mod:`~sockudo.config.listener`: ``[rate_limiter]`` and ``[ssl]``;
- :mod:`~sockudo.config.console`: ``[console]`` (docs/console.md).
- :mod:`~sockudo.config.cors`: ``[cors]``, the HTTP API's CORS headers.

The names below are imported on first use: ``sockudo.webhooks.model`` and
``sockudo.push.settings`` use :mod:`sockudo.config.coerce` while the schema uses their
settings classes, so importing this package must not import the schema eagerly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sockudo.config.console import ConsoleConfig, parse_console
    from sockudo.config.cors import CorsConfig, parse_cors
    from sockudo.config.listener import RateLimiterConfig, SslConfig, parse_rate_limiter, parse_ssl
    from sockudo.config.loader import interpolate, load_config, parse_app, read_document
    from sockudo.config.schema import (
        DEFAULT_APP_ID,
        DEFAULT_APP_KEY,
        DEFAULT_APP_SECRET,
        FEATURE_SECTIONS,
        AppConfig,
        Config,
        HistoryConfig,
        IdempotencyConfig,
        MetricsConfig,
        RecoveryConfig,
        TcpExporterConfig,
        builtin_default_app,
    )

_EXPORTS = {
    "ConsoleConfig": "console",
    "CorsConfig": "cors",
    "parse_cors": "cors",
    "parse_console": "console",
    "RateLimiterConfig": "listener",
    "SslConfig": "listener",
    "parse_rate_limiter": "listener",
    "parse_ssl": "listener",
    "interpolate": "loader",
    "load_config": "loader",
    "parse_app": "loader",
    "read_document": "loader",
    "DEFAULT_APP_ID": "schema",
    "DEFAULT_APP_KEY": "schema",
    "DEFAULT_APP_SECRET": "schema",
    "FEATURE_SECTIONS": "schema",
    "AppConfig": "schema",
    "Config": "schema",
    "HistoryConfig": "schema",
    "IdempotencyConfig": "schema",
    "MetricsConfig": "schema",
    "RecoveryConfig": "schema",
    "TcpExporterConfig": "schema",
    "builtin_default_app": "schema",
}

__all__ = [
    "AppConfig",
    "Config",
    "ConsoleConfig",
    "DEFAULT_APP_ID",
    "DEFAULT_APP_KEY",
    "DEFAULT_APP_SECRET",
    "FEATURE_SECTIONS",
    "HistoryConfig",
    "IdempotencyConfig",
    "MetricsConfig",
    "RateLimiterConfig",
    "RecoveryConfig",
    "SslConfig",
    "TcpExporterConfig",
    "builtin_default_app",
    "interpolate",
    "load_config",
    "parse_app",
    "parse_console",
    "CorsConfig",
    "parse_cors",
    "parse_rate_limiter",
    "parse_ssl",
    "read_document",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sockudo.config.{module}"), name)
    globals()[name] = value
    return value
