"""Loading: code defaults, then a TOML (or JSON) file, then environment variables.

The file may be this server's own layout or Sockudo's (``config.toml`` or its JSON form):
:mod:`sockudo.config.sockudo_keys` maps Sockudo's keys first and says which have no effect
here. Every value goes through :mod:`sockudo.config.coerce`. Any invalid value fails start-up
with a message naming the key; the server never starts half-configured.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

from sockudo.config.coerce import (
    build,
    build_values,
    check_keys,
    coerce_field,
    node_address,
    table,
    to_str,
    unknown_key,
)
from sockudo.config.console import parse_console
from sockudo.config.cors import parse_cors
from sockudo.config.listener import parse_rate_limiter, parse_ssl
from sockudo.config.schema import (
    FEATURE_SECTIONS,
    AppConfig,
    Config,
    MetricsConfig,
    TcpExporterConfig,
    builtin_default_app,
)
from sockudo.config.sockudo_keys import TABLES, translate
from sockudo.core.errors import ConfigError
from sockudo.push.settings import parse_settings as parse_push_settings
from sockudo.webhooks.model import parse_endpoints, parse_settings

logger = logging.getLogger(__name__)

# -- ${VAR} interpolation ------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Substitute ``${VAR}`` and ``${VAR:-default}``; an unset variable without default is fatal."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"config: environment variable ${{{name}}} is not set and has no default")

    # Whole-line comments are left alone, so a commented-out ${VAR} is not required.
    return "".join(
        line if line.lstrip().startswith("#") else _VAR.sub(sub, line) for line in text.splitlines(keepends=True)
    )


def _without_nulls(value: Any) -> Any:
    """JSON ``null`` means "not set", as an absent key does."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def read_document(path: str, env: Mapping[str, str]) -> dict[str, Any]:
    """The file's tables after ``${VAR}`` interpolation: JSON for a ``.json`` path, else TOML."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = interpolate(fh.read(), env)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    if path.endswith(".json"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise ConfigError(f"config: {path} must hold a JSON object")
        return dict(_without_nulls(document))
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None


# -- apps ---------------------------------------------------------------------

_POLICY_FLATTENED = ("limits", "features", "channels")
_APP_FIELDS = {f.name: f for f in fields(AppConfig)}
_APP_SCALARS = set(_APP_FIELDS) - {"webhooks", "feature_overrides", *FEATURE_SECTIONS}


def parse_app(raw: Any, where: str, base: Mapping[str, Any] | None = None) -> AppConfig:
    """An app table, flat or with Sockudo's nested ``policy.{limits,features,channels,…}`` tables
    (nested values win). ``base``: field values to start from (the global app defaults)."""
    raw = table(where, raw)
    flat = {k: v for k, v in raw.items() if k != "policy"}
    policy = table(f"{where}.policy", raw.get("policy", {}))
    for name, section in policy.items():
        if name in _POLICY_FLATTENED:
            flat.update(table(f"{where}.policy.{name}", section))
        elif name == "webhooks" or name in FEATURE_SECTIONS:
            flat[name] = section
        else:
            raise unknown_key(f"{where}.policy.{name}", name, (*_POLICY_FLATTENED, "webhooks", *FEATURE_SECTIONS))
    for required in ("id", "key", "secret"):
        if required not in flat or str(flat[required]).strip() in ("", "None"):
            raise ConfigError(f"config: {where}.{required} is required")
    overrides: dict[str, Any] = {}
    for name in FEATURE_SECTIONS:
        if name in flat:
            overrides[name] = dict(table(f"{where}.{name}", flat.pop(name)))
    webhooks = parse_endpoints(f"{where}.webhooks", flat.pop("webhooks")) if "webhooks" in flat else ()
    check_keys(where, flat, _APP_SCALARS)
    values = dict(base or {})
    values.update(build_values(AppConfig, flat, where))
    return AppConfig(**values, webhooks=webhooks, feature_overrides=overrides)


def _resolve_features(app: AppConfig, config: Config) -> AppConfig:
    """An app's feature sections: the global section with the app's overrides on top."""
    values: dict[str, Any] = {}
    for name, cls in FEATURE_SECTIONS.items():
        base = getattr(config, name)
        override = app.feature_overrides.get(name)
        if override:
            merged = {f.name: getattr(base, f.name) for f in fields(cls)}
            merged.update(override)
            values[name] = build(cls, merged, f"app {app.id!r} {name}")
        else:
            values[name] = base
    return replace(app, **values)


def _check_apps(apps: tuple[AppConfig, ...]) -> None:
    seen_ids: set[str] = set()
    seen_keys: set[str] = set()
    for app in apps:
        if app.id in seen_ids:
            raise ConfigError(f"config: app id {app.id!r} is defined twice")
        if app.key in seen_keys:
            raise ConfigError(f"config: app key {app.key!r} is defined twice (app {app.id!r})")
        seen_ids.add(app.id)
        seen_keys.add(app.key)


# -- the file's layout ----------------------------------------------------------

# Config field -> the key naming it in the file (and in error messages).
_TOP_LEVEL = ("host", "port", "debug", "activity_timeout", "pong_timeout", "user_authentication_timeout",
              "websocket_max_payload_kb", "max_connections", "shutdown_grace_period", "node_id",
              "health_check_timeout_ms")
_SECTION_KEYS: dict[str, dict[str, str]] = {  # section -> {key: Config field}
    "websocket": {"max_messages": "websocket_max_messages", "max_buffer_bytes": "websocket_max_buffer_bytes",
                  "max_fragments": "websocket_max_fragments", "max_payload_kb": "websocket_max_payload_kb"},
    "http_api": {"request_limit_in_mb": "request_limit_in_mb", "header_timeout_seconds": "http_header_timeout",
                 "body_timeout_seconds": "http_body_timeout"},
    "logging": {"format": "log_format", "level": "log_level"},
    "adapter": {"driver": "adapter_driver"},
    "adapter.redis": {"prefix": "redis_prefix", "requests_timeout": "requests_timeout_ms",
                      "heartbeat_interval": "heartbeat_interval", "node_timeout": "node_timeout"},
    "database.redis": {"url": "redis_url", "sentinels": "redis_sentinels", "sentinel_master": "redis_sentinel_master",
                       "password": "redis_password", "db": "redis_db", "tls": "redis_tls",
                       "sentinel_password": "redis_sentinel_password", "cluster_nodes": "redis_cluster_nodes",
                       "queue_url": "queue_redis_url"},
}
FIELD_KEYS: dict[str, str] = {name: name for name in _TOP_LEVEL}
for _table_path, _keys in _SECTION_KEYS.items():
    FIELD_KEYS.update({field_name: f"{_table_path}.{key}" for key, field_name in _keys.items()})
FIELD_KEYS["websocket_max_payload_kb"] = "websocket.max_payload_kb"  # also top-level websocket_max_payload_kb

# Environment variables and the Config field each overrides.
_ENV = {
    "HOST": "host",
    "PORT": "port",
    "DEBUG": "debug",
    "ACTIVITY_TIMEOUT": "activity_timeout",
    "PONG_TIMEOUT": "pong_timeout",
    "USER_AUTHENTICATION_TIMEOUT": "user_authentication_timeout",
    "WEBSOCKET_MAX_PAYLOAD_KB": "websocket_max_payload_kb",
    "WEBSOCKET_MAX_MESSAGES": "websocket_max_messages",
    "WEBSOCKET_MAX_BUFFER_BYTES": "websocket_max_buffer_bytes",
    "WEBSOCKET_MAX_FRAGMENTS": "websocket_max_fragments",
    "SOCKUDO_MAX_CONNECTIONS": "max_connections",
    "SHUTDOWN_GRACE_PERIOD": "shutdown_grace_period",
    "HTTP_API_REQUEST_LIMIT_IN_MB": "request_limit_in_mb",
    "HTTP_API_HEADER_TIMEOUT_SECONDS": "http_header_timeout",
    "HTTP_API_BODY_TIMEOUT_SECONDS": "http_body_timeout",
    "ADAPTER_DRIVER": "adapter_driver",
    "REDIS_URL": "redis_url",
    "REDIS_PREFIX": "redis_prefix",
    "REDIS_SENTINELS": "redis_sentinels",
    "REDIS_SENTINEL_MASTER": "redis_sentinel_master",
    "REDIS_PASSWORD": "redis_password",
    "REDIS_DB": "redis_db",
    "REDIS_TLS": "redis_tls",
    "REDIS_SENTINEL_PASSWORD": "redis_sentinel_password",
    "REDIS_CLUSTER_NODES": "redis_cluster_nodes",
    "QUEUE_REDIS_URL": "queue_redis_url",
    "ADAPTER_REQUESTS_TIMEOUT_MS": "requests_timeout_ms",
    "ADAPTER_HEARTBEAT_INTERVAL": "heartbeat_interval",
    "ADAPTER_NODE_TIMEOUT": "node_timeout",
    "LOG_OUTPUT_FORMAT": "log_format",
    "LOG_LEVEL": "log_level",
    "NODE_ID": "node_id",
    "HEALTH_CHECK_TIMEOUT_MS": "health_check_timeout_ms",
}

_METRICS_ENV = {
    "METRICS_PROMETHEUS_PREFIX": "prefix",
    "METRICS_ENABLED": "enabled",
    "METRICS_HOST": "host",
    "METRICS_PORT": "port",
    "METRICS_PREFIX": "prefix",
    "SOCKUDO_ENVIRONMENT": "environment",
    "SOCKUDO_REGION": "region",
    "SOCKUDO_NODE": "node",
}

_TCP_EXPORTER_ENV = {
    "METRICS_TCP_EXPORTER_ENABLED": "enabled",
    "METRICS_TCP_EXPORTER_HOST": "host",
    "METRICS_TCP_EXPORTER_PORT": "port",
    "METRICS_TCP_EXPORTER_BUFFER_SIZE": "buffer_size",
}

_SECTIONS = ("websocket", "app_manager", "metrics", "http_api", "adapter", "database", "logging", "webhooks", "push",
             "rate_limiter", "ssl", "console", "cors", *FEATURE_SECTIONS)


def _section(data: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    node: Mapping[str, Any] = data
    for part in path.split("."):
        node = table(f"[{path}]", node.get(part, {}))
    return node


def _from_document(data: Mapping[str, Any], app_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten this server's layout into Config keyword values (still raw)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _TOP_LEVEL:
            out[key] = value
        elif key not in _SECTIONS:
            raise unknown_key(key, key, (*_TOP_LEVEL, *_SECTIONS, *TABLES[""]))

    for path, mapping in _SECTION_KEYS.items():
        values = dict(_section(data, path))
        if path == "adapter":
            values.pop("redis", None)
        check_keys(path, values, mapping, TABLES.get(path, ()))
        out.update({mapping[key]: value for key, value in values.items()})
    check_keys("database", _section(data, "database"), ("redis",))

    metrics = dict(_section(data, "metrics"))
    driver = metrics.pop("driver", "prometheus")
    if driver != "prometheus":
        raise ConfigError(f"config: metrics.driver must be \"prometheus\", got {driver!r}")
    prometheus = dict(_section(data, "metrics.prometheus"))
    metrics.pop("prometheus", None)
    check_keys("metrics.prometheus", prometheus, ("prefix",))
    if "prefix" in prometheus:
        metrics["prefix"] = prometheus["prefix"]  # Sockudo's spelling of metrics.prefix
    out["metrics"] = metrics
    for name in ("webhooks", "push", "rate_limiter", "ssl", "console", "cors", *FEATURE_SECTIONS):
        out[name] = dict(_section(data, name))

    manager = _section(data, "app_manager")
    check_keys("app_manager", manager, ("driver", "array"))
    driver = to_str("app_manager.driver", manager.get("driver", "memory"))
    if driver != "memory":
        raise ConfigError(f"config: app_manager.driver {driver!r} is not supported (use \"memory\")")
    array = _section(data, "app_manager.array")
    check_keys("app_manager.array", array, ("apps",))
    apps = array.get("apps", [])
    if not isinstance(apps, list):
        raise ConfigError("config: app_manager.array.apps must be a list of tables")
    out["apps"] = tuple(parse_app(a, f"app_manager.array.apps[{i}]", app_defaults) for i, a in enumerate(apps))
    return out


def _app_defaults(raw: Mapping[str, tuple[Any, str]]) -> dict[str, Any]:
    """Sockudo's global limits ([presence], [event_limits], [channel_limits]) as app field values."""
    return {name: coerce_field(where, _APP_FIELDS[name].type, value) for name, (value, where) in raw.items()}


def _default_app_from_env(env: Mapping[str, str], base: AppConfig) -> AppConfig | None:
    """``SOCKUDO_DEFAULT_APP_*`` applied to ``base``, or None when the environment says nothing."""
    prefix = "SOCKUDO_DEFAULT_APP_"
    present = {k[len(prefix):].lower(): v for k, v in env.items() if k.startswith(prefix)}
    if not present:
        return None
    values: dict[str, Any] = {}
    for name, value in present.items():
        if name not in _APP_SCALARS:
            # Sockudo's .env files carry variables we do not implement: say so, don't refuse to start.
            logger.warning("ignoring unsupported environment variable %s%s", prefix, name.upper())
            continue
        values[name] = coerce_field(f"{prefix}{name.upper()}", _APP_FIELDS[name].type, value)
    return replace(base, **values)


def _env_values(env: Mapping[str, str], variables: Mapping[str, str]) -> dict[str, str]:
    return {name: env[var] for var, name in variables.items() if env.get(var, "") != ""}


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the Config: defaults → file → environment. Raises ConfigError naming the key.
    The file's settings that have no effect here are in ``Config.warnings`` (not logged here:
    the caller logs them once its logging is set up)."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    app_defaults: dict[str, Any] = {}
    warnings: tuple[str, ...] = ()
    if path is not None:
        translated = translate(read_document(path, env), env)
        warnings = tuple(translated.warnings)
        app_defaults = _app_defaults(translated.app_defaults)
        raw = _from_document(translated.document, app_defaults)

    display = dict(FIELD_KEYS)
    for var, name in _ENV.items():
        if env.get(var, "") != "":
            raw[name] = env[var]
            display[name] = f"{FIELD_KEYS[name]} ({var})"
    metrics_raw = dict(raw.pop("metrics", {}))
    metrics_raw.update(_env_values(env, _METRICS_ENV))

    feature_raw = {name: dict(raw.pop(name, {})) for name in FEATURE_SECTIONS}
    for name, cls in FEATURE_SECTIONS.items():
        feature_raw[name].update(_env_values(env, {f"{name.upper()}_{f.name.upper()}": f.name for f in fields(cls)}))
    features = {name: build(cls, feature_raw[name], name) for name, cls in FEATURE_SECTIONS.items()}
    webhooks_raw = raw.pop("webhooks", {})
    push_raw = raw.pop("push", {})
    rate_limiter = parse_rate_limiter(raw.pop("rate_limiter", {}), env)
    ssl = parse_ssl(raw.pop("ssl", {}), env)
    console = parse_console(raw.pop("console", {}), env)
    cors = parse_cors(raw.pop("cors", {}))
    apps: tuple[AppConfig, ...] = raw.pop("apps", ())
    if "adapter_driver" not in raw and raw.get("redis_cluster_nodes"):
        raw["adapter_driver"] = "redis-cluster"  # cluster nodes turn scale-out on, over the cluster
    elif "adapter_driver" not in raw and (raw.get("redis_url") or raw.get("redis_sentinels")):
        raw["adapter_driver"] = "redis"  # REDIS_URL alone turns scale-out on
    known = {f.name: f for f in fields(Config)}
    config = Config(**{name: coerce_field(display[name], known[name].type, value) for name, value in raw.items()})
    if config.debug and "log_level" not in raw:
        config = replace(config, log_level="DEBUG")  # Sockudo's meaning of debug = true
    tcp_raw = dict(table("[metrics.tcp_exporter]", metrics_raw.pop("tcp_exporter", {})))
    tcp_raw.update(_env_values(env, _TCP_EXPORTER_ENV))
    metrics: MetricsConfig = build(MetricsConfig, metrics_raw, "metrics")
    metrics = replace(metrics, tcp_exporter=build(TcpExporterConfig, tcp_raw, "metrics.tcp_exporter"))

    builtin = replace(builtin_default_app(), **app_defaults)
    if any(k in env for k in ("SOCKUDO_DEFAULT_APP_ID", "SOCKUDO_DEFAULT_APP_KEY", "SOCKUDO_DEFAULT_APP_SECRET")):
        # An app from the environment replaces the file's apps (Sockudo's rule).
        apps = (_default_app_from_env(env, builtin) or builtin,)
    elif not apps:
        apps = (_default_app_from_env(env, builtin) or builtin,)
    else:
        override = _default_app_from_env(env, apps[0])
        if override is not None:
            apps = (override, *apps[1:])
    if env.get("SOCKUDO_DEFAULT_APP_ENABLED", "").strip().lower() == "false":
        apps = ()  # Sockudo's rule: this variable clears every app

    config = replace(config, metrics=metrics, webhooks=parse_settings(webhooks_raw, env),
                     connection_recovery=features["connection_recovery"], history=features["history"],
                     idempotency=features["idempotency"], rate_limiter=rate_limiter, ssl=ssl, console=console,
                     cors=cors)
    limiter = config.rate_limiter
    if limiter.enabled and limiter.driver == "redis" and not (
            config.redis_url or config.redis_sentinels or config.adapter_driver == "redis-cluster"):
        raise ConfigError("config: rate_limiter.driver = \"redis\" needs Redis (REDIS_URL, REDIS_SENTINELS, "
                          "REDIS_CLUSTER_NODES or [database.redis] url)")
    config = replace(config, push=parse_push_settings(push_raw, env, redis_configured=queue_redis_configured(config)))
    apps = tuple(_resolve_features(app, config) for app in apps)
    for app in apps:
        for required in ("id", "key", "secret"):
            if not getattr(app, required).strip():
                raise ConfigError(f"config: app {required} must not be empty (SOCKUDO_DEFAULT_APP_{required.upper()})")
    _check_apps(apps)
    config = replace(config, apps=apps, warnings=warnings)
    _validate(config)
    return config


_FEATURE_MINIMUM_ONE = {
    "connection_recovery": ("buffer_ttl_seconds", "max_buffer_size"),
    "history": ("retention_window_seconds", "max_page_size"),
    "idempotency": ("ttl_seconds", "max_key_length"),
}


def _validate(config: Config) -> None:
    if not 0 < config.port < 65536:
        raise ConfigError(f"config: port must be 1-65535, got {config.port}")
    if config.metrics.enabled and not 0 < config.metrics.port < 65536:
        raise ConfigError(f"config: metrics.port must be 1-65535, got {config.metrics.port}")
    tcp = config.metrics.tcp_exporter
    if tcp.enabled and not 0 < tcp.port < 65536:
        raise ConfigError(f"config: metrics.tcp_exporter.port must be 1-65535, got {tcp.port}")
    if tcp.buffer_size < 1:
        raise ConfigError("config: metrics.tcp_exporter.buffer_size must be at least 1 (buffering is always bounded)")
    if config.health_check_timeout_ms < 1:
        raise ConfigError("config: health_check_timeout_ms (HEALTH_CHECK_TIMEOUT_MS) must be at least 1")
    if config.activity_timeout < 1:
        raise ConfigError("config: activity_timeout must be at least 1 second")
    # A zero TTL, window or page size would silently disable the feature (Redis even refuses
    # EX 0, so every keyed publish would be a 503): checked globally and per app.
    for where, holder in [("", config), *((f"app {a.id!r} ", a) for a in config.apps)]:
        for section, names in _FEATURE_MINIMUM_ONE.items():
            for name in names:
                if getattr(getattr(holder, section), name) < 1:
                    raise ConfigError(f"config: {where}{section}.{name} must be at least 1")
    if config.adapter_driver not in ("local", "redis", "redis-cluster"):
        raise ConfigError("config: adapter.driver must be \"local\", \"redis\" or \"redis-cluster\", "
                          f"got {config.adapter_driver!r}")
    if config.adapter_driver == "redis" and not (config.redis_url or config.redis_sentinels):
        raise ConfigError("config: adapter.driver \"redis\" needs a Redis address: REDIS_URL, database.redis.url, "
                          "database.redis.host/port or database.redis.sentinels")
    if config.adapter_driver == "redis-cluster" and not config.redis_cluster_nodes:
        raise ConfigError("config: adapter.driver \"redis-cluster\" needs the cluster's nodes: REDIS_CLUSTER_NODES "
                          "or database.redis.cluster_nodes (host:port each)")
    for key, url in (("database.redis.url (REDIS_URL)", config.redis_url),
                     ("database.redis.queue_url (QUEUE_REDIS_URL)", config.queue_redis_url)):
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"config: {key} must start with redis://, rediss:// or unix://")
    for entry in config.redis_cluster_nodes:
        node_address("database.redis.cluster_nodes (REDIS_CLUSTER_NODES)", entry)
    for entry in config.redis_sentinels:
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"config: database.redis.sentinels entries must be host:port, got {entry!r}")
    if config.heartbeat_interval <= 0 or config.node_timeout <= config.heartbeat_interval:
        raise ConfigError("config: adapter.redis.node_timeout must be larger than heartbeat_interval (> 0)")
    if config.log_format not in ("human", "json"):
        raise ConfigError("config: logging.format (LOG_OUTPUT_FORMAT) must be \"human\" or \"json\", "
                          f"got {config.log_format!r}")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"):
        raise ConfigError(f"config: logging.level (LOG_LEVEL) is not a log level: {config.log_level!r}")
    if config.websocket_max_messages < 1:
        raise ConfigError("config: websocket.max_messages must be at least 1")
    if config.websocket_max_buffer_bytes < 65536:
        raise ConfigError("config: websocket.max_buffer_bytes must be at least 65536")
    if config.websocket_max_fragments < 1:
        raise ConfigError("config: websocket.max_fragments must be at least 1")
    if config.webhooks.queue_driver == "redis" and not queue_redis_configured(config):
        raise ConfigError("config: webhooks.queue_driver \"redis\" needs one Redis for RQ: QUEUE_REDIS_URL "
                          "(database.redis.queue_url), REDIS_URL (database.redis.url) or sentinels")


def queue_redis_configured(config: Config) -> bool:
    """Whether the RQ queues (webhooks, push) have a Redis: QUEUE_REDIS_URL, else the standalone or
    Sentinel Redis (never the cluster: RQ needs one Redis)."""
    return bool(config.queue_redis_url or config.redis_url or config.redis_sentinels)
