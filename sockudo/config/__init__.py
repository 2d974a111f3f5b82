"""Configuration: code defaults, then a TOML file, then environment variables (spec §8.2).

Read once at start-up into frozen dataclasses and passed down. Key names follow Sockudo's
``config.toml`` so a Sockudo config file mostly carries over. Any invalid value fails
start-up with a message naming the key; the server never starts half-configured.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from sockudo.config.listener import RateLimiterConfig, SslConfig, parse_rate_limiter, parse_ssl
from sockudo.core.errors import ConfigError
from sockudo.push.settings import PushSettings
from sockudo.push.settings import parse_settings as parse_push_settings
from sockudo.webhooks.model import WebhookEndpoint, WebhookSettings, parse_endpoints, parse_settings

logger = logging.getLogger(__name__)

DEFAULT_APP_ID = "app-id"
DEFAULT_APP_KEY = "app-key"
DEFAULT_APP_SECRET = "app-secret"


@dataclass(frozen=True)
class RecoveryConfig:
    """``[connection_recovery]`` (spec §7.3): the per-channel replay buffer for ``?protocol=2``."""

    enabled: bool = False
    buffer_ttl_seconds: int = 120
    max_buffer_size: int = 100


@dataclass(frozen=True)
class HistoryConfig:
    """``[history]`` (spec §7.6): durable per-channel history (Redis Streams, or memory)."""

    enabled: bool = False
    retention_window_seconds: int = 86400
    max_messages_per_channel: int = 1000
    max_page_size: int = 100


@dataclass(frozen=True)
class IdempotencyConfig:
    """``[idempotency]`` (spec §7.5): repeated publishes with one key are delivered once."""

    enabled: bool = True
    ttl_seconds: int = 120
    max_key_length: int = 128


FEATURE_SECTIONS = {
    "connection_recovery": RecoveryConfig,
    "history": HistoryConfig,
    "idempotency": IdempotencyConfig,
}


@dataclass(frozen=True)
class AppConfig:
    """One tenant. Unset limits fall back to Pusher's defaults (spec §8.1)."""

    id: str
    key: str
    secret: str
    enabled: bool = True
    max_connections: int = 0  # 0 = unlimited
    enable_client_messages: bool = False
    max_client_events_per_second: int = 10  # per connection; 0 = off
    max_presence_members_per_channel: int = 100
    max_channels_per_connection: int = 100  # subscriptions one socket may hold; 0 = unlimited. Over it: 4300
    max_presence_member_size_in_kb: float = 2
    max_channel_name_length: int = 200
    max_event_name_length: int = 200
    max_event_payload_in_kb: float = 10
    max_event_channels_at_once: int = 100
    max_event_batch_size: int = 10
    enable_user_authentication: bool = False
    enable_watchlist_events: bool = False
    enable_subscription_count: bool = False
    allowed_origins: tuple[str, ...] = ()
    webhooks: tuple[WebhookEndpoint, ...] = ()  # validated at load (sockudo/webhooks.py)
    # Per-app overrides of the feature sections, resolved against the globals at load time.
    connection_recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    idempotency: IdempotencyConfig = field(default_factory=IdempotencyConfig)
    feature_overrides: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class TcpExporterConfig:
    """``[metrics.tcp_exporter]`` (spec §1.3): metric operations streamed over TCP as protobuf."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 5000
    buffer_size: int = 1024  # events held per stage before samples are dropped (>= 1; never unbounded)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = 9601
    prefix: str = "sockudo_"
    # Constant labels on every series (docs/observability.md). ``node`` falls back to
    # ``node_id`` (NODE_ID), then the host name; never a random id (restarts would add series).
    environment: str = "default"
    region: str = "default"
    node: str | None = None
    tcp_exporter: TcpExporterConfig = field(default_factory=TcpExporterConfig)


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 6001
    debug: bool = False
    activity_timeout: int = 120
    pong_timeout: int = 30
    user_authentication_timeout: int = 3600
    websocket_max_payload_kb: int = 64
    max_connections: int = 0  # node-wide; 0 = unlimited
    websocket_max_messages: int = 1000  # outbound frames queued per socket before 4100
    websocket_max_buffer_bytes: int = 1 << 20  # outbound bytes queued per socket before 4100
    websocket_max_fragments: int = 1024  # frames one inbound message may be split into (more: close 1009)
    request_limit_in_mb: float = 10
    # Slow-loris protection of the HTTP side (0 = off): the request line and headers must arrive
    # within the first, a request body within the second; lifted once a WebSocket is established.
    http_header_timeout: float = 10.0
    http_body_timeout: float = 30.0
    shutdown_grace_period: int = 10
    adapter_driver: str = "local"  # "redis" when REDIS_URL is set, unless ADAPTER_DRIVER says otherwise
    redis_url: str | None = None
    redis_prefix: str = "sockudo_adapter:"
    redis_sentinels: tuple[str, ...] = ()  # "host:port" of each sentinel
    redis_sentinel_master: str = "mymaster"
    # With sentinels (a URL carries its own): the master's password, database and TLS; and the
    # sentinels' own password. Never logged.
    redis_password: str | None = None
    redis_db: int = 0
    redis_tls: bool = False
    redis_sentinel_password: str | None = None
    requests_timeout_ms: int = 2000  # cross-node query deadline
    heartbeat_interval: float = 5.0  # seconds between node heartbeats
    node_timeout: float = 15.0  # a node silent this long is dead; its sockets are cleaned up
    log_format: str = "human"
    log_level: str = "INFO"
    node_id: str | None = None
    health_check_timeout_ms: int = 2000  # each readiness check of /up is bounded by this (spec §3)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    connection_recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    idempotency: IdempotencyConfig = field(default_factory=IdempotencyConfig)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)  # [webhooks]
    push: PushSettings = field(default_factory=PushSettings)  # [push] (sockudo/push/settings.py)
    rate_limiter: RateLimiterConfig = field(default_factory=RateLimiterConfig)  # [rate_limiter] (sockudo/listener.py)
    ssl: SslConfig = field(default_factory=SslConfig)  # [ssl]
    apps: tuple[AppConfig, ...] = ()


def builtin_default_app() -> AppConfig:
    """The app ``make run`` serves with no configuration at all."""
    return AppConfig(
        id=DEFAULT_APP_ID,
        key=DEFAULT_APP_KEY,
        secret=DEFAULT_APP_SECRET,
        enable_client_messages=True,
    )


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


# -- value coercion (numbers may be strings, as in Sockudo) --------------------


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"config: {key} must be true or false, got {value!r}")


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"config: {key} must be a whole number, got {value!r}")
    try:
        number = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config: {key} must be a whole number, got {value!r}") from None
    if isinstance(value, float) and value != number:
        raise ConfigError(f"config: {key} must be a whole number, got {value!r}")
    if number < 0:
        raise ConfigError(f"config: {key} must not be negative, got {value!r}")
    return number


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"config: {key} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config: {key} must be a number, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"config: {key} must not be negative, got {value!r}")
    return number


def _to_str(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"config: {key} must be a string, got {value!r}")
    return str(value)


def _to_str_tuple(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"config: {key} must be a list of strings or a comma-separated string")


def _to_webhooks(key: str, value: Any) -> tuple[WebhookEndpoint, ...]:
    return parse_endpoints(key, value)


_COERCE = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    ann = str(annotation)
    if ann == "tuple[str, ...]":
        return _to_str_tuple(key, value)
    if ann.startswith("tuple[WebhookEndpoint"):
        return _to_webhooks(key, value)
    if ann == "str | None":
        return None if value is None else _to_str(key, value)
    for typ, fn in _COERCE.items():
        if ann == typ.__name__:
            return fn(key, value)
    raise ConfigError(f"config: {key} has an unsupported type")  # pragma: no cover


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"config: unknown key {where}{name}")
        kwargs[name] = _coerce(f"{where}{name}", known[name].type, value)
    return cls(**kwargs)


# -- apps ---------------------------------------------------------------------


def parse_app(raw: Mapping[str, Any], where: str) -> AppConfig:
    """An app table, flat or with Sockudo's nested ``policy.{limits,features,…}`` sections."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: {where} must be a table")
    flat = {k: v for k, v in raw.items() if k != "policy"}
    policy = raw.get("policy", {})
    if not isinstance(policy, Mapping):
        raise ConfigError(f"config: {where}.policy must be a table")
    for section in policy.values():
        if isinstance(section, Mapping):
            flat.update(section)
    for required in ("id", "key", "secret"):
        if required not in flat or str(flat[required]).strip() in ("", "None"):
            raise ConfigError(f"config: {where}.{required} is required")
    overrides: dict[str, Any] = {}
    for name in FEATURE_SECTIONS:
        if name in flat:
            value = flat.pop(name)
            if not isinstance(value, Mapping):
                raise ConfigError(f"config: {where}.{name} must be a table")
            overrides[name] = dict(value)
    app: AppConfig = _build(AppConfig, flat, f"{where}.")
    return replace(app, feature_overrides=overrides) if overrides else app


def _resolve_features(app: AppConfig, config: Config) -> AppConfig:
    """An app's feature sections: the global section with the app's overrides on top."""
    values: dict[str, Any] = {}
    for name, cls in FEATURE_SECTIONS.items():
        base = getattr(config, name)
        override = app.feature_overrides.get(name)
        if override:
            merged = {f.name: getattr(base, f.name) for f in fields(cls)}
            merged.update(override)
            values[name] = _build(cls, merged, f"app {app.id!r} {name}.")
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


# -- loading ------------------------------------------------------------------

# Top-level scalar keys and the Config field each maps to.
_TOP_LEVEL = {
    "host": "host",
    "port": "port",
    "debug": "debug",
    "activity_timeout": "activity_timeout",
    "pong_timeout": "pong_timeout",
    "user_authentication_timeout": "user_authentication_timeout",
    "websocket_max_payload_kb": "websocket_max_payload_kb",
    "max_connections": "max_connections",
    "shutdown_grace_period": "shutdown_grace_period",
    "node_id": "node_id",
    "health_check_timeout_ms": "health_check_timeout_ms",
}

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

_SECTIONS = {"websocket", "app_manager", "metrics", "http_api", "adapter", "database", "logging", "webhooks", "push",
             "rate_limiter", "ssl",
             *FEATURE_SECTIONS}


def _from_toml(data: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten the TOML document into Config keyword values (strings still raw)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
        elif key not in _SECTIONS:
            raise ConfigError(f"config: unknown key {key}")

    def section(name: str) -> Mapping[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, Mapping):
            raise ConfigError(f"config: [{name}] must be a table")
        return value

    def take(sec: Mapping[str, Any], prefix: str, mapping: Mapping[str, str]) -> None:
        for key, value in sec.items():
            if key not in mapping:
                raise ConfigError(f"config: unknown key {prefix}.{key}")
            out[mapping[key]] = value

    take(section("websocket"), "websocket", {"max_messages": "websocket_max_messages",
                                              "max_buffer_bytes": "websocket_max_buffer_bytes",
                                              "max_fragments": "websocket_max_fragments",
                                              "max_payload_kb": "websocket_max_payload_kb"})
    take(section("http_api"), "http_api", {"request_limit_in_mb": "request_limit_in_mb",
                                            "header_timeout_seconds": "http_header_timeout",
                                            "body_timeout_seconds": "http_body_timeout"})
    take(section("logging"), "logging", {"format": "log_format", "level": "log_level"})
    adapter = dict(section("adapter"))
    adapter_redis = adapter.pop("redis", {})
    if not isinstance(adapter_redis, Mapping):
        raise ConfigError("config: [adapter.redis] must be a table")
    take(adapter, "adapter", {"driver": "adapter_driver"})
    take(adapter_redis, "adapter.redis", {
        "prefix": "redis_prefix",
        "requests_timeout": "requests_timeout_ms",
        "heartbeat_interval": "heartbeat_interval",
        "node_timeout": "node_timeout",
    })
    database = section("database")
    redis = database.get("redis", {})
    if not isinstance(redis, Mapping):
        raise ConfigError("config: [database.redis] must be a table")
    take(redis, "database.redis", {
        "url": "redis_url",
        "sentinels": "redis_sentinels",
        "sentinel_master": "redis_sentinel_master",
        "password": "redis_password",
        "db": "redis_db",
        "tls": "redis_tls",
        "sentinel_password": "redis_sentinel_password",
    })

    metrics = dict(section("metrics"))
    driver = metrics.pop("driver", "prometheus")
    if driver != "prometheus":
        raise ConfigError(f"config: metrics.driver must be \"prometheus\", got {driver!r}")
    prometheus = metrics.pop("prometheus", {})
    if not isinstance(prometheus, Mapping):
        raise ConfigError("config: [metrics.prometheus] must be a table")
    for key, value in prometheus.items():
        if key != "prefix":
            raise ConfigError(f"config: unknown key metrics.prometheus.{key}")
        metrics["prefix"] = value  # Sockudo's spelling of metrics.prefix
    out["metrics"] = metrics
    out["webhooks"] = dict(section("webhooks"))
    out["push"] = dict(section("push"))
    out["rate_limiter"] = dict(section("rate_limiter"))
    out["ssl"] = dict(section("ssl"))
    for name in FEATURE_SECTIONS:
        out[name] = dict(section(name))

    manager = section("app_manager")
    driver = manager.get("driver", "memory")
    if driver != "memory":
        raise ConfigError(f"config: app_manager.driver {driver!r} is not supported (use \"memory\")")
    array = manager.get("array", {})
    if not isinstance(array, Mapping):
        raise ConfigError("config: [app_manager.array] must be a table")
    apps = array.get("apps", [])
    if not isinstance(apps, list):
        raise ConfigError("config: app_manager.array.apps must be a list of tables")
    out["apps"] = tuple(parse_app(a, f"app_manager.array.apps[{i}]") for i, a in enumerate(apps))
    return out


def _default_app_from_env(env: Mapping[str, str], base: AppConfig | None) -> AppConfig | None:
    """``SOCKUDO_DEFAULT_APP_*`` (§8.2). Returns the app to use, or None when env says nothing."""
    prefix = "SOCKUDO_DEFAULT_APP_"
    present = {k[len(prefix):].lower(): v for k, v in env.items() if k.startswith(prefix)}
    if not present:
        return None
    values: dict[str, Any] = {}
    settable = {f.name for f in fields(AppConfig)} - {"webhooks", "feature_overrides", *FEATURE_SECTIONS}
    for name, value in present.items():
        if name not in settable:
            # Sockudo's .env files carry variables we do not implement: say so, don't refuse to start.
            logger.warning("ignoring unsupported environment variable %s%s", prefix, name.upper())
            continue
        values[name] = value
    start = base or builtin_default_app()
    merged = {f.name: getattr(start, f.name) for f in fields(AppConfig)}
    # Coerce field by field: a per-field variable alone (no _ID/_KEY/_SECRET) must not need
    # a whole AppConfig (building one raised TypeError for the missing id/key/secret).
    known = {f.name: f for f in fields(AppConfig)}
    for name, value in values.items():
        merged[name] = _coerce(f"{prefix}{name.upper()}", known[name].type, value)
    return AppConfig(**merged)


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the Config: defaults → TOML file → environment. Raises ConfigError naming the key."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
        try:
            document = tomllib.loads(interpolate(text, env))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
        raw = _from_toml(document)

    for var, name in _ENV.items():
        if var in env and env[var] != "":
            raw[name] = env[var]
    metrics_raw = dict(raw.pop("metrics", {}))
    for var, name in _METRICS_ENV.items():
        if var in env and env[var] != "":
            metrics_raw[name] = env[var]

    feature_raw = {name: dict(raw.pop(name, {})) for name in FEATURE_SECTIONS}
    for name, cls in FEATURE_SECTIONS.items():
        env_prefix = name.upper() + "_"
        for f in fields(cls):
            var = env_prefix + f.name.upper()
            if env.get(var, "") != "":
                feature_raw[name][f.name] = env[var]
    features = {name: _build(cls, feature_raw[name], f"{name}.") for name, cls in FEATURE_SECTIONS.items()}
    webhooks_raw = raw.pop("webhooks", {})
    push_raw = raw.pop("push", {})
    listener = {"rate_limiter": parse_rate_limiter(raw.pop("rate_limiter", {}), env),
                "ssl": parse_ssl(raw.pop("ssl", {}), env)}
    apps: tuple[AppConfig, ...] = raw.pop("apps", ())
    if "adapter_driver" not in raw and (raw.get("redis_url") or raw.get("redis_sentinels")):
        raw["adapter_driver"] = "redis"  # REDIS_URL alone turns scale-out on
    config: Config = _build(Config, raw, "")
    tcp_raw = metrics_raw.pop("tcp_exporter", {})
    if not isinstance(tcp_raw, Mapping):
        raise ConfigError("config: [metrics.tcp_exporter] must be a table")
    tcp_raw = dict(tcp_raw)
    for var, name in _TCP_EXPORTER_ENV.items():
        if var in env and env[var] != "":
            tcp_raw[name] = env[var]
    metrics: MetricsConfig = _build(MetricsConfig, metrics_raw, "metrics.")
    metrics = replace(metrics, tcp_exporter=_build(TcpExporterConfig, tcp_raw, "metrics.tcp_exporter."))

    if any(k in env for k in ("SOCKUDO_DEFAULT_APP_ID", "SOCKUDO_DEFAULT_APP_KEY", "SOCKUDO_DEFAULT_APP_SECRET")):
        # An app from the environment replaces the file's apps (Sockudo's rule).
        apps = (_default_app_from_env(env, None) or builtin_default_app(),)
    elif not apps:
        apps = (_default_app_from_env(env, None) or builtin_default_app(),)
    else:
        override = _default_app_from_env(env, apps[0])
        if override is not None:
            apps = (override, *apps[1:])
    if env.get("SOCKUDO_DEFAULT_APP_ENABLED", "").strip().lower() == "false":
        apps = ()  # Sockudo's rule: this variable clears every app

    config = replace(config, metrics=metrics, webhooks=parse_settings(webhooks_raw, env), **features, **listener)
    limiter = config.rate_limiter
    if limiter.enabled and limiter.driver == "redis" and not (config.redis_url or config.redis_sentinels):
        raise ConfigError("config: rate_limiter.driver = \"redis\" needs Redis (REDIS_URL, REDIS_SENTINELS or "
                          "[database.redis] url)")
    redis_configured = bool(config.redis_url or config.redis_sentinels)
    config = replace(config, push=parse_push_settings(push_raw, env, redis_configured=redis_configured))
    apps = tuple(_resolve_features(app, config) for app in apps)
    for app in apps:
        for required in ("id", "key", "secret"):
            if not getattr(app, required).strip():
                raise ConfigError(f"config: app {required} must not be empty (SOCKUDO_DEFAULT_APP_{required.upper()})")
    _check_apps(apps)
    config = replace(config, apps=apps)
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
    if config.adapter_driver not in ("local", "redis"):
        raise ConfigError(f"config: adapter.driver must be \"local\" or \"redis\", got {config.adapter_driver!r}")
    if config.adapter_driver == "redis" and not (config.redis_url or config.redis_sentinels):
        raise ConfigError("config: adapter.driver \"redis\" needs REDIS_URL (database.redis.url) or database.redis.sentinels")
    if config.redis_url and not config.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("config: database.redis.url (REDIS_URL) must start with redis://, rediss:// or unix://")
    for entry in config.redis_sentinels:
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"config: database.redis.sentinels entries must be host:port, got {entry!r}")
    if config.heartbeat_interval <= 0 or config.node_timeout <= config.heartbeat_interval:
        raise ConfigError("config: adapter.redis.node_timeout must be larger than heartbeat_interval (> 0)")
    if config.log_format not in ("human", "json"):
        raise ConfigError(f"config: logging.format (LOG_OUTPUT_FORMAT) must be \"human\" or \"json\", got {config.log_format!r}")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"):
        raise ConfigError(f"config: logging.level (LOG_LEVEL) is not a log level: {config.log_level!r}")
    if config.websocket_max_messages < 1:
        raise ConfigError("config: websocket.max_messages must be at least 1")
    if config.websocket_max_buffer_bytes < 65536:
        raise ConfigError("config: websocket.max_buffer_bytes must be at least 65536")
    if config.websocket_max_fragments < 1:
        raise ConfigError("config: websocket.max_fragments must be at least 1")
    if config.webhooks.queue_driver == "redis" and not (config.redis_url or config.redis_sentinels):
        raise ConfigError("config: webhooks.queue_driver \"redis\" needs REDIS_URL (database.redis.url) or sentinels")
