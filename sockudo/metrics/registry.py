"""Prometheus metrics, created against an injected registry (no module-level globals).

Names follow Sockudo's where Sockudo has the metric; prometheus-client adds ``_total`` to
every counter (see docs/metrics.md for the mapping). Labels are bounded: ``app_id`` and the
metrics ``port``, plus a small enum where noted — never channel names, socket ids or users.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from sockudo.core.errors import PusherCode
from sockudo.core.protocol import ChannelKind
from sockudo.metrics.instruments import Counter, Gauge, Histogram

LATENCY_MS_BUCKETS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)

# Every value of the small label sets below. ``Metrics.prepare`` creates each series at 0 when
# the server starts, so ``rate()``, ``increase()`` and the shipped alert rules have data before
# the first failure (a series that appears only at its first increment hides that increment
# from ``increase()``). Values outside these sets are still counted, only not created up front.
CHANNEL_TYPES = tuple(kind.value for kind in ChannelKind)
DISCONNECT_REASONS = (
    "client_closed", "connection_lost", "protocol_error", "invalid_utf8",
    # closes the server starts on an open socket: terminated or not signed in in time, slow
    # consumer, shutdown, missed pong
    *(f"closed_{int(code)}" for code in (PusherCode.UNAUTHORIZED, PusherCode.OVER_CAPACITY,
                                         PusherCode.RECONNECT_NOW, PusherCode.PONG_TIMEOUT)),
)
CONNECTION_ERROR_TYPES = (
    "app_disabled", "origin_not_allowed", "node_over_capacity", "app_over_quota", "unsupported_protocol",
    "pong_timeout", "invalid_message_format", "message_too_large", "invalid_utf8", "protocol_error",
    "authentication_failed", "api_authentication_failed",
)
#: ``app_id="unknown"``: refusals before an app is known (the key is the client's choice).
UNKNOWN_APP = "unknown"
UNKNOWN_APP_CONNECTION_ERRORS = ("app_not_found",)
SUBSCRIPTION_ERRORS = (
    ("invalid", "invalid_channel"),
    *((kind.value, "LimitReached") for kind in ChannelKind),
    *((kind.value, "AuthError") for kind in ChannelKind if kind.needs_auth or kind is ChannelKind.SERVER_TO_USER),
    (ChannelKind.PRESENCE.value, "InvalidChannelData"),
)
PUBLISH_REJECT_REASONS = (
    "invalid_input", "invalid_channel", "event_name_too_long", "too_many_channels", "payload_too_large",
    "batch_too_large", "store_unavailable", "idempotency_store_failed",
)
CLIENT_EVENT_REJECT_REASONS = (
    "rate_limited", "disabled", "event_name_too_long", "invalid_channel", "wrong_channel_type", "payload_too_large",
    "not_subscribed",
)
APP_RATE_LIMITS = (("client_events", "websocket"),)
IP_RATE_LIMITS = (("ip_websocket_upgrades", "websocket"), ("ip_connections", "websocket"), ("ip_api", "http"))
RECOVERY_SOURCES = ("hot", "cold")
RECOVERY_FAILURE_CODES = ("stream_reset", "position_expired", "continuity_unverifiable", "persistence_unavailable")


class AppMetrics:
    """Label children bound once per app, so hot paths do no label lookups."""

    __slots__ = (
        "connected",
        "new_connections",
        "new_disconnections",
        "ws_received",
        "ws_sent",
        "bytes_received",
        "bytes_sent",
        "client_events",
        "publishes",
    )

    def __init__(self, m: Metrics, app_id: str) -> None:
        labels = (app_id, m.port)
        self.connected = m.connected.labels(*labels)
        self.new_connections = m.new_connections.labels(*labels)
        self.new_disconnections = m.new_disconnections.labels(*labels)
        self.ws_received = m.ws_messages_received.labels(*labels)
        self.ws_sent = m.ws_messages_sent.labels(*labels)
        self.bytes_received = m.socket_received_bytes.labels(*labels)
        self.bytes_sent = m.socket_transmitted_bytes.labels(*labels)
        self.client_events = m.client_events.labels(*labels)
        self.publishes = m.publishes_accepted.labels(*labels)


class ReplayBufferPressure:
    """Replay-buffer pressure per app, read from ``ReplayBuffers.pressure`` at scrape time.

    The publish path only bumps a plain integer when a full buffer drops its oldest message;
    this collector turns those integers into series when Prometheus asks.
    """

    def __init__(self, prefix: str, port: str) -> None:
        self.prefix = prefix
        self.port = port
        self.buffers: Any = None  # a ReplayBuffers, set by ``Metrics.watch_replay_buffers``

    def describe(self) -> list[Metric]:
        return []  # nothing to check for duplicates at registration: the names are ours alone

    def collect(self) -> Iterator[Metric]:
        evictions = CounterMetricFamily(
            f"{self.prefix}replay_buffer_full_evictions",
            "Messages dropped from a replay buffer because it held max_buffer_size (the recoverable "
            "window became shorter than buffer_ttl_seconds)", labels=["app_id", "port"],
        )
        fill = GaugeMetricFamily(
            f"{self.prefix}replay_buffer_max_fill_ratio",
            "The app's fullest replay buffer on this node, as a fraction of max_buffer_size (every 5 s)",
            labels=["app_id", "port"],
        )
        pressure = getattr(self.buffers, "pressure", None) or {}
        for app_id, p in list(pressure.items()):
            evictions.add_metric([app_id, self.port], p.full_evictions)
            fill.add_metric([app_id, self.port], p.max_fill_ratio)
        yield evictions
        yield fill


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, port: int | str = 9601, prefix: str = "sockudo_",
                 process: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if process:  # process_* (RSS, CPU, fds) and python_info, as operators expect on every target
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self.port = str(port)
        p = prefix
        r = self.registry
        app = ["app_id", "port"]
        self.connected = Gauge(f"{p}connected", "WebSocket connections open now", app, registry=r)
        self.new_connections = Counter(f"{p}new_connections", "WebSocket connections accepted", app, registry=r)
        self.new_disconnections = Counter(f"{p}new_disconnections", "WebSocket connections closed", app, registry=r)
        self.disconnect_reasons = Counter(
            f"{p}disconnections_by_reason",
            "Closed connections by reason (client_closed, error code, …)",
            [*app, "reason"],
            registry=r,
        )
        self.connection_errors = Counter(
            f"{p}connection_errors", "Refused or failed connections and protocol errors", [*app, "error_type"],
            registry=r
        )
        self.socket_received_bytes = Counter(
            f"{p}socket_received_bytes", "WebSocket payload bytes received", app, registry=r
        )
        self.socket_transmitted_bytes = Counter(
            f"{p}socket_transmitted_bytes", "WebSocket payload bytes queued for sending", app, registry=r
        )
        self.ws_messages_received = Counter(f"{p}ws_messages_received", "WebSocket messages received", app, registry=r)
        self.ws_messages_sent = Counter(
            f"{p}ws_messages_sent", "WebSocket messages queued for sending", app, registry=r
        )
        self.http_received_bytes = Counter(f"{p}http_received_bytes", "REST request body bytes", app, registry=r)
        self.http_transmitted_bytes = Counter(f"{p}http_transmitted_bytes", "REST response body bytes", app, registry=r)
        self.http_calls_received = Counter(f"{p}http_calls_received", "REST calls received", app, registry=r)
        ch = [*app, "channel_type"]
        self.channel_subscriptions = Counter(f"{p}channel_subscriptions", "Successful subscriptions", ch, registry=r)
        self.channel_unsubscriptions = Counter(f"{p}channel_unsubscriptions", "Unsubscriptions", ch, registry=r)
        self.subscription_errors = Counter(
            f"{p}subscription_errors", "Refused subscriptions by reason", [*ch, "reason"], registry=r
        )
        self.active_channels = Gauge(f"{p}active_channels", "Channels with a subscriber on this node", ch, registry=r)
        self.presence_joins = Counter(
            f"{p}presence_member_joins", "Presence members added (first socket of a user)", app, registry=r
        )
        self.presence_leaves = Counter(
            f"{p}presence_member_leaves", "Presence members removed (last socket of a user)", app, registry=r
        )
        self.publishes_accepted = Counter(
            f"{p}publish_accepted", "Events accepted for delivery (one per channel per publish)", app, registry=r
        )
        self.publishes_rejected = Counter(
            f"{p}publish_rejected", "REST publishes refused, by reason", [*app, "reason"], registry=r
        )
        self.client_events = Counter(
            f"{p}client_events_received", "Client events accepted and relayed", app, registry=r
        )
        self.client_events_rejected = Counter(
            f"{p}client_events_rejected", "Client events refused, by reason", [*app, "reason"], registry=r
        )
        self.rate_limit_triggered = Counter(
            f"{p}rate_limit_triggered", "Requests refused by a rate limit", [*app, "limiter_type", "request_context"],
            registry=r
        )
        self.broadcast_latency_ms = Histogram(
            f"{p}broadcast_latency_ms",
            "Time to queue a publish to every local recipient, in ms",
            [*app, "channel_type", "recipient_count_bucket"],
            buckets=LATENCY_MS_BUCKETS,
            registry=r,
        )
        self.slow_consumer_disconnects = Counter(
            f"{p}slow_consumer_disconnections", "Sockets closed with 4100 because their send queue was full", app,
            registry=r
        )
        # -- horizontal adapter (Sockudo names where they exist) --
        self.adapter_received_envelopes = Counter(
            f"{p}adapter_received_envelopes",
            "Messages from the other nodes received through Redis pub/sub (own echoes included), by kind of "
            "pub/sub channel: channel, user, control",
            ["port", "kind"], registry=r,
        )
        self.adapter_interest_timeouts = Counter(
            f"{p}adapter_interest_timeouts",
            "Subscribes acknowledged to the client before Redis confirmed the node's subscription in time",
            ["port"], registry=r,
        )
        self.adapter_uncomplete = Counter(
            f"{p}horizontal_adapter_uncomplete_promises",
            "Cross-node answers that are partial: Redis unreachable or a live node not registered (marked and logged)",
            app,
            registry=r,
        )
        self.adapter_publish_latency_ms = Histogram(
            f"{p}adapter_publish_latency_ms", "Time to hand a broadcast to Redis, from the publish call, in ms",
            ["port"], buckets=LATENCY_MS_BUCKETS, registry=r,
        )
        self.adapter_receive_latency_ms = Histogram(
            f"{p}adapter_receive_latency_ms",
            "Publish on one node to delivery on this node (wall clocks of both nodes), in ms",
            ["port"], buckets=LATENCY_MS_BUCKETS, registry=r,
        )
        self.adapter_duplicates_suppressed = Counter(
            f"{p}adapter_duplicates_suppressed", "Own broadcasts received back from Redis and skipped", ["port"],
            registry=r
        )
        self.transport_dropped = Counter(
            f"{p}horizontal_transport_messages_dropped",
            "Cross-node messages not sent (Redis unreachable or queue full)",
            ["driver"], registry=r,
        )
        self.transport_reconnections = Counter(
            f"{p}horizontal_transport_reconnections", "Reconnections to Redis after a lost connection", ["driver"],
            registry=r
        )
        self.adapter_up = Gauge(
            f"{p}adapter_connected", "1 while the cross-node adapter is connected", ["driver"], registry=r
        )
        self.cluster_nodes = Gauge(
            f"{p}cluster_nodes", "Live nodes seen through the adapter (this one included)", registry=r
        )
        self.dead_nodes_cleaned = Counter(
            f"{p}dead_nodes_cleaned", "Dead nodes whose sockets and presence this node removed", registry=r
        )
        # -- recovery, history, idempotency (Sockudo names) --
        self.history_writes = Counter(f"{p}history_writes", "Messages stored in channel history", app, registry=r)
        self.history_write_failures = Counter(
            f"{p}history_write_failures", "Messages that could not be sequenced/stored (not delivered)", app, registry=r
        )
        self.history_reads = Counter(f"{p}history_reads", "History pages read (REST and WebSocket)", app, registry=r)
        self.history_evictions = Counter(
            f"{p}history_evictions", "History entries removed by retention (count or age)", ["port"], registry=r
        )
        self.history_cursor_errors = Counter(
            f"{p}history_cursor_errors", "History reads refused for a tampered or mismatched cursor", app, registry=r
        )
        self.recovery_success = Counter(
            f"{p}history_recovery_success", "Channels recovered by sockudo:resume, by tier", [*app, "source"],
            registry=r
        )
        self.recovery_failures = Counter(
            f"{p}history_recovery_failures", "Channels that could not be recovered, by reason", [*app, "code"],
            registry=r
        )
        self.recovery_replayed = Counter(
            f"{p}recovery_replayed_messages", "Messages replayed to resuming clients", [*app, "source"], registry=r
        )
        self.recovery_buffer_misses = Counter(
            f"{p}recovery_buffer_misses", "Resume positions the replay buffer could not serve (history or not)", app,
            registry=r,
        )
        self.replay_buffer_messages = Gauge(
            f"{p}replay_buffer_messages", "Messages held in this node's replay buffers", ["port"], registry=r
        )
        self.replay_buffer_channels = Gauge(
            f"{p}replay_buffer_channels", "Channels with a replay buffer on this node", ["port"], registry=r
        )
        self.replay_buffer_pressure = ReplayBufferPressure(p, self.port)
        r.register(self.replay_buffer_pressure)
        self.idempotency_publishes = Counter(
            f"{p}idempotency_publish", "Publishes carrying an idempotency key", app, registry=r
        )
        self.idempotency_duplicates = Counter(
            f"{p}idempotency_duplicates", "Publishes answered from the idempotency cache (not delivered again)", app,
            registry=r,
        )
        self._apps: dict[str, AppMetrics] = {}

    def prepare(self, app_ids: list[str], adapter_driver: str | None = None) -> None:
        """Create every series of a known, finite label set at 0 (the apps of the configuration,
        ``app_id="unknown"`` for refusals before an app is known, and the adapter's driver)."""
        port = self.port
        # Every metric labelled by app alone (prometheus-client keeps the label names in
        # ``_labelnames``; a metric added later is covered without being listed here).
        app_labelled = [m for m in vars(self).values()
                        if isinstance(m, (Counter, Gauge, Histogram)) and m._labelnames == ("app_id", "port")]
        for app_id in app_ids:
            self.app(app_id)
            for metric in app_labelled:
                metric.labels(app_id, port)
            for reason in DISCONNECT_REASONS:
                self.disconnect_reasons.labels(app_id, port, reason)
            for error_type in CONNECTION_ERROR_TYPES:
                self.connection_errors.labels(app_id, port, error_type)
            for channel_type in CHANNEL_TYPES:
                self.channel_subscriptions.labels(app_id, port, channel_type)
                self.channel_unsubscriptions.labels(app_id, port, channel_type)
                self.active_channels.labels(app_id, port, channel_type)
            for channel_type, reason in SUBSCRIPTION_ERRORS:
                self.subscription_errors.labels(app_id, port, channel_type, reason)
            for reason in PUBLISH_REJECT_REASONS:
                self.publishes_rejected.labels(app_id, port, reason)
            for reason in CLIENT_EVENT_REJECT_REASONS:
                self.client_events_rejected.labels(app_id, port, reason)
            for limiter_type, context in APP_RATE_LIMITS:
                self.rate_limit_triggered.labels(app_id, port, limiter_type, context)
            for source in RECOVERY_SOURCES:
                self.recovery_success.labels(app_id, port, source)
                self.recovery_replayed.labels(app_id, port, source)
            for code in RECOVERY_FAILURE_CODES:
                self.recovery_failures.labels(app_id, port, code)
        for error_type in UNKNOWN_APP_CONNECTION_ERRORS:
            self.connection_errors.labels(UNKNOWN_APP, port, error_type)
        for limiter_type, context in IP_RATE_LIMITS:
            self.rate_limit_triggered.labels(UNKNOWN_APP, port, limiter_type, context)
        for metric in (self.adapter_duplicates_suppressed, self.adapter_interest_timeouts, self.history_evictions):
            metric.labels(port)
        for kind in ("channel", "user", "control"):
            self.adapter_received_envelopes.labels(port, kind)
        if adapter_driver is not None and adapter_driver != "local":
            self.adapter_up.labels(adapter_driver)
            self.transport_dropped.labels(adapter_driver)
            self.transport_reconnections.labels(adapter_driver)

    def watch_replay_buffers(self, buffers: Any) -> None:
        """Export ``buffers``' per-app pressure (full evictions, fullest buffer) at scrape time."""
        self.replay_buffer_pressure.buffers = buffers

    def app(self, app_id: str) -> AppMetrics:
        bound = self._apps.get(app_id)
        if bound is None:
            bound = self._apps[app_id] = AppMetrics(self, app_id)
        return bound

    def http_call(self, app_id: str, received_bytes: int, sent_bytes: int) -> None:
        """One REST call of an authenticated app: its request and response body sizes."""
        labels = (app_id, self.port)
        self.http_calls_received.labels(*labels).inc()
        self.http_received_bytes.labels(*labels).inc(received_bytes)
        self.http_transmitted_bytes.labels(*labels).inc(sent_bytes)

    def connection_error(self, app_id: str, error_type: str) -> None:
        self.connection_errors.labels(app_id, self.port, error_type).inc()

    def disconnected(self, app_id: str, reason: str) -> None:
        self.disconnect_reasons.labels(app_id, self.port, reason).inc()

    def subscribed(self, app_id: str, channel_type: str, new_channel: bool) -> None:
        self.channel_subscriptions.labels(app_id, self.port, channel_type).inc()
        if new_channel:
            self.active_channels.labels(app_id, self.port, channel_type).inc()

    def unsubscribed(self, app_id: str, channel_type: str, channel_gone: bool) -> None:
        self.channel_unsubscriptions.labels(app_id, self.port, channel_type).inc()
        if channel_gone:
            self.active_channels.labels(app_id, self.port, channel_type).dec()

    def subscription_error(self, app_id: str, channel_type: str, reason: str) -> None:
        self.subscription_errors.labels(app_id, self.port, channel_type, reason).inc()

    def publish_rejected(self, app_id: str, reason: str) -> None:
        self.publishes_rejected.labels(app_id, self.port, reason).inc()

    def client_event_rejected(self, app_id: str, reason: str) -> None:
        self.client_events_rejected.labels(app_id, self.port, reason).inc()

    def rate_limited(self, app_id: str, limiter_type: str, context: str) -> None:
        self.rate_limit_triggered.labels(app_id, self.port, limiter_type, context).inc()

    def broadcast_latency(self, app_id: str, channel_type: str, recipients: int, ms: float) -> None:
        if recipients <= 0:
            return
        bucket = ("xs" if recipients <= 10 else "sm" if recipients <= 100 else "md" if recipients <= 1000
                  else "lg" if recipients <= 10000 else "xl")
        self.broadcast_latency_ms.labels(app_id, self.port, channel_type, bucket).observe(ms)
