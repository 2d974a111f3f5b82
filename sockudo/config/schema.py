"""The configuration's shape: frozen dataclasses with the built-in defaults.

Built once at start-up by :mod:`sockudo.config.loader` and passed down; nothing changes them
afterwards. Key names follow Sockudo's ``config.toml`` where Sockudo has the setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sockudo.config.console import ConsoleConfig
from sockudo.config.cors import CorsConfig
from sockudo.config.listener import RateLimiterConfig, SslConfig
from sockudo.push.settings import PushSettings
from sockudo.webhooks.model import WebhookEndpoint, WebhookSettings

DEFAULT_APP_ID = "app-id"
DEFAULT_APP_KEY = "app-key"
DEFAULT_APP_SECRET = "app-secret"


@dataclass(frozen=True)
class RecoveryConfig:
    """``[connection_recovery]``: the per-channel replay buffer for ``?protocol=2``."""

    enabled: bool = False
    buffer_ttl_seconds: int = 120
    max_buffer_size: int = 100


@dataclass(frozen=True)
class HistoryConfig:
    """``[history]``: durable per-channel history (Redis Streams, or memory)."""

    enabled: bool = False
    retention_window_seconds: int = 86400
    max_messages_per_channel: int = 1000
    max_page_size: int = 100


@dataclass(frozen=True)
class IdempotencyConfig:
    """``[idempotency]``: repeated publishes with one key are delivered once."""

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
    """One tenant. Unset limits fall back to Pusher's defaults."""

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
    webhooks: tuple[WebhookEndpoint, ...] = ()  # validated at load (sockudo.webhooks.model)
    # Per-app overrides of the feature sections, resolved against the globals at load time.
    connection_recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    idempotency: IdempotencyConfig = field(default_factory=IdempotencyConfig)
    feature_overrides: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class TcpExporterConfig:
    """``[metrics.tcp_exporter]``: metric operations streamed over TCP as protobuf."""

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
    # "redis" when REDIS_URL or sentinels are set, "redis-cluster" when REDIS_CLUSTER_NODES is, unless
    # ADAPTER_DRIVER says otherwise
    adapter_driver: str = "local"
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
    # Redis Cluster seed nodes ("host:port", or redis:// / rediss:// URLs of one node each): the adapter
    # and the stores use the cluster; password and TLS as for sentinels (redis_password, redis_tls).
    redis_cluster_nodes: tuple[str, ...] = ()
    # The Redis of the RQ queues (webhooks, push) and the state their workers share; default: the
    # standalone/Sentinel Redis above. RQ needs one Redis: it cannot use the cluster.
    queue_redis_url: str | None = None
    requests_timeout_ms: int = 2000  # cross-node query deadline
    heartbeat_interval: float = 5.0  # seconds between node heartbeats
    node_timeout: float = 15.0  # a node silent this long is dead; its sockets are cleaned up
    log_format: str = "human"
    log_level: str = "INFO"
    node_id: str | None = None
    health_check_timeout_ms: int = 2000  # each readiness check of /up is bounded by this
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    connection_recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    idempotency: IdempotencyConfig = field(default_factory=IdempotencyConfig)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)  # [webhooks]
    push: PushSettings = field(default_factory=PushSettings)  # [push] (docs/push.md)
    rate_limiter: RateLimiterConfig = field(default_factory=RateLimiterConfig)  # [rate_limiter] (docs/security.md)
    ssl: SslConfig = field(default_factory=SslConfig)  # [ssl]
    console: ConsoleConfig = field(default_factory=ConsoleConfig)  # [console] (docs/console.md)
    cors: CorsConfig = field(default_factory=CorsConfig)  # [cors]: the HTTP API's CORS headers
    apps: tuple[AppConfig, ...] = ()
    # Settings of the file that have no effect here (Sockudo's NATS adapter, delta compression, …),
    # one line each, for the server to log once logging is set up.
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)


def builtin_default_app() -> AppConfig:
    """The app ``make run`` serves with no configuration at all."""
    return AppConfig(
        id=DEFAULT_APP_ID,
        key=DEFAULT_APP_KEY,
        secret=DEFAULT_APP_SECRET,
        enable_client_messages=True,
    )
