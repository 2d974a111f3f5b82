"""Sockudo's configuration keys, and what each does here.

A Sockudo user brings Sockudo's ``config.toml`` (or its JSON form). Every section and key that
Sockudo's configuration has (its ``ServerOptions`` and app structures) is listed in
:data:`CATALOGUE` with one of three effects:

- ``same``: the key exists here with the same name and meaning;
- ``renamed``: applied here under another key (``ours``), sometimes converted (milliseconds to
  seconds, ``host``/``port`` to a URL, a global limit to every app's default);
- ``ignored``: this server has no such setting (NATS, Kafka, SQL app managers, delta
  compression, …). Start-up logs one warning naming the key and why, unless its value is what
  this server does anyway (``inert``), for example ``enabled = false`` of a feature it lacks or
  the settings of a driver that is not selected.

:func:`translate` turns a Sockudo-style document into this server's own layout before the
section parsers see it. Keys this server has and Sockudo doesn't pass through unchanged; a key
neither knows stays an error, with a "did you mean" hint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from sockudo.config.coerce import node_address, table, to_bool, to_float, to_int, to_str, unknown_key
from sockudo.core.errors import ConfigError

SAME = "same"
RENAMED = "renamed"
IGNORED = "ignored"

#: ``[[app_manager.array.apps]]`` entries, in catalogue paths.
APP = "app_manager.array.apps[]"


@dataclass(frozen=True)
class SockudoKey:
    path: str  # dotted; ``[]`` marks the entries of an array of tables
    effect: str  # SAME, RENAMED or IGNORED
    ours: str = ""  # RENAMED: the key it is applied as ("app default: …" for app fields)
    note: str = ""  # IGNORED: why it has no effect here; RENAMED: how it is converted
    inert: tuple[Any, ...] = ()  # IGNORED: values that need no warning (this server does that anyway)
    keys: tuple[str, ...] = ()  # IGNORED table: the keys Sockudo has in it (others are errors)
    # IGNORED: the key only matters when this holds (its driver is selected); else no warning.
    when: Callable[[Mapping[str, Any]], bool] | None = field(default=None, compare=False, repr=False)
    apply: str = ""  # RENAMED with its own conversion: the translator method that applies it


CATALOGUE: dict[str, SockudoKey] = {}


def _add(entry: SockudoKey) -> None:
    assert entry.path not in CATALOGUE, entry.path
    CATALOGUE[entry.path] = entry


def same(paths: str) -> None:
    for path in paths.split():
        _add(SockudoKey(path, SAME))


def renamed(path: str, ours: str, note: str = "", apply: str = "") -> None:
    _add(SockudoKey(path, RENAMED, ours=ours, note=note, apply=apply))


def ignored(path: str, note: str, inert: tuple[Any, ...] = (), keys: str = "",
            when: Callable[[Mapping[str, Any]], bool] | None = None) -> None:
    _add(SockudoKey(path, IGNORED, note=note, inert=inert, keys=tuple(keys.split()), when=when))


def _get(root: Mapping[str, Any], path: str, default: Any = None) -> Any:
    node: Any = root
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _driver_is(path: str, *names: str) -> Callable[[Mapping[str, Any]], bool]:
    def selected(root: Mapping[str, Any]) -> bool:
        value = _get(root, path)
        return isinstance(value, str) and value.strip().lower() in names

    return selected


def _any(*tests: Callable[[Mapping[str, Any]], bool]) -> Callable[[Mapping[str, Any]], bool]:
    return lambda root: any(test(root) for test in tests)


ONE_TRANSPORT = "this server scales out over Redis only (adapter.driver = \"redis\" or \"redis-cluster\")"
NO_SQL = "apps come from this file or SOCKUDO_DEFAULT_APP_* here; there is no database app manager"

# -- top level ---------------------------------------------------------------------------

same("debug host port shutdown_grace_period websocket_max_payload_kb max_connections user_authentication_timeout "
     "activity_timeout health_check_timeout_ms")
ignored("mode", "no development/production switch here; every check applies in both")
ignored("server_role", "every process serves WebSockets and the HTTP API (no API-only role)", inert=("default",))
ignored("path_prefix", "WebSockets are served at /app/{key} and the HTTP API at /apps/… (Sockudo does not "
        "apply a prefix either)", inert=("/", ""))
renamed("instance.process_id", "node_id")

# -- [adapter] ---------------------------------------------------------------------------

renamed("adapter.driver", "adapter.driver", "\"local\", \"redis\" and \"redis-cluster\" as is; any other driver: "
        "a warning, then \"redis\" if Redis is configured, else \"local\"", apply="adapter_driver")
same("adapter.redis.requests_timeout adapter.redis.prefix")
renamed("adapter.redis.redis_pub_options", "database.redis.url", "its url (and redis_sub_options' url) "
        "becomes the Redis URL; other client options have no effect", apply="redis_client_options")
renamed("adapter.redis.redis_sub_options", "database.redis.url", "as redis_pub_options",
        apply="redis_client_options")
ignored("adapter.redis.cluster_mode", "use adapter.driver = \"redis-cluster\" with [adapter.cluster] nodes",
        inert=(False,))
#: Sockudo's message brokers (as adapters and as queues) and their keys.
_BROKERS = {
    "nats": "servers prefix request_timeout_ms username password token connection_timeout_ms nodes_number "
            "discovery_max_wait_ms discovery_idle_wait_ms subscription_capacity client_capacity max_reconnects "
            "presence_sync_chunk_size no_echo",
    "pulsar": "url prefix request_timeout_ms token nodes_number",
    "rabbitmq": "url prefix request_timeout_ms connection_timeout_ms nodes_number",
    "google_pubsub": "project_id prefix request_timeout_ms emulator_host nodes_number",
    "kafka": "brokers prefix request_timeout_ms security_protocol sasl_mechanism sasl_username sasl_password "
             "nodes_number",
    "iggy": "connection_string username password consumer_name stream topic_prefix queue_topic_prefix "
            "consumer_group_prefix request_timeout_ms poll_interval_ms poll_batch_size partitions_count "
            "partition_id auto_create start_from_latest nodes_number",
}
for _name, _keys in _BROKERS.items():
    _driver = {"google_pubsub": "google-pubsub"}.get(_name, _name)
    ignored(f"adapter.{_name}", f"the {_name} adapter is not available: {ONE_TRANSPORT}", keys=_keys,
            when=_driver_is("adapter.driver", _driver))
renamed("adapter.cluster", "database.redis.cluster_nodes", "with adapter.driver = \"redis-cluster\": nodes become "
        "database.redis.cluster_nodes, prefix adapter.redis.prefix, request_timeout_ms "
        "adapter.redis.requests_timeout, tls database.redis.tls; pub/sub is always sharded", apply="adapter_cluster")
ignored("adapter.buffer_multiplier_per_cpu", "a tuning knob of Sockudo's Rust adapter")
ignored("adapter.enable_socket_counting", "sockets are always counted here", inert=(True,))
ignored("adapter.fallback_to_local", "while Redis is down each node always keeps serving its own sockets",
        inert=(True,))
ignored("adapter.aggregate_counts",
        "counts are always exact (each node writes its share to Redis; readers sum the live nodes' shares)",
        inert=(False,))
ignored("adapter.fast_presence_transitions", "presence transitions are always announced once, cluster-wide",
        inert=(False,))
for _where in ("adapter.cluster_health", "cluster_health"):
    ignored(f"{_where}.enabled", "with the Redis adapter nodes always send heartbeats and clean up dead nodes",
            inert=(True,))
    renamed(f"{_where}.heartbeat_interval_ms", "adapter.redis.heartbeat_interval", "milliseconds to seconds",
            apply="milliseconds")
    renamed(f"{_where}.node_timeout_ms", "adapter.redis.node_timeout", "milliseconds to seconds",
            apply="milliseconds")
    ignored(f"{_where}.cleanup_interval_ms", "dead nodes are looked for on every heartbeat")

# -- [app_manager] and the apps -----------------------------------------------------------

renamed("app_manager.driver", "app_manager.driver", "\"memory\" as is; a database driver: a warning, and the "
        "apps of this file or SOCKUDO_DEFAULT_APP_* are served", apply="app_manager_driver")
ignored("app_manager.cache", "apps are held in memory; there is nothing to cache", keys="enabled ttl",
        inert=(False,))
ignored("app_manager.scylladb", NO_SQL, keys="nodes keyspace table_name username password replication_class "
        "replication_factor", when=_driver_is("app_manager.driver", "scylladb", "scylla"))
same(f"{APP}.id {APP}.key {APP}.secret {APP}.enabled")
_LIMITS = ("max_connections max_client_events_per_second max_presence_members_per_channel "
           "max_presence_member_size_in_kb max_channel_name_length max_event_channels_at_once max_event_name_length "
           "max_event_payload_in_kb max_event_batch_size")
_FEATURES = "enable_client_messages enable_user_authentication enable_watchlist_events"
for _where in (f"{APP}.policy.limits", f"{APP}.policy.features", f"{APP}.policy.channels", APP):
    if _where.endswith("limits") or _where == APP:
        same(" ".join(f"{_where}.{k}" for k in _LIMITS.split()))
        ignored(f"{_where}.max_backend_events_per_second", "HTTP API publishes are limited per IP by [rate_limiter]")
        ignored(f"{_where}.max_read_requests_per_second", "HTTP API reads are limited per IP by [rate_limiter]")
        ignored(f"{_where}.decay_seconds", "client events are counted per second", inert=(1,))
        ignored(f"{_where}.terminate_on_limit", "an event over the client-event limit is refused with 4301 "
                "and the connection stays open", inert=(False,))
        ignored(f"{_where}.message_rate_limit", "inbound messages are bounded by the client-event limit and the "
                "message size, not counted per window", keys="enabled max_attempts decay_seconds terminate_on_limit")
    if _where.endswith("features") or _where == APP:
        same(" ".join(f"{_where}.{k}" for k in _FEATURES.split()))
    if _where.endswith("channels") or _where == APP:
        same(f"{_where}.allowed_origins")
        ignored(f"{_where}.annotations_enabled", "message annotations are not implemented", inert=(False,))
        ignored(f"{_where}.channel_delta_compression", "delta compression is not implemented")
        ignored(f"{_where}.channel_namespaces", "channel namespaces (name patterns, per-namespace history and "
                "client permissions) are not implemented", inert=([],))
for _where in (f"{APP}.policy", APP):
    renamed(f"{_where}.webhooks", f"{APP}.webhooks", "entries with a url as is; AWS Lambda entries: a warning, "
            "and they are left out", apply="webhooks")
    same(f"{_where}.idempotency.enabled {_where}.idempotency.ttl_seconds")
    same(" ".join(f"{_where}.connection_recovery.{k}" for k in ("enabled", "buffer_ttl_seconds", "max_buffer_size")))
same(" ".join(f"{APP}.policy.history.{k}" for k in ("enabled", "retention_window_seconds", "max_messages_per_channel")))
ignored(f"{APP}.policy.history.rewind_enabled", "there is no rewind on subscribe; read the history API",
        inert=(False,))
ignored(f"{APP}.policy.history.max_bytes_per_channel", "history is bounded by age and message count")
ignored(f"{APP}.policy.presence_history", "presence history is not implemented",
        keys="enabled retention_window_seconds max_events_per_channel max_bytes_per_channel", inert=(False,))

# -- [cache], [queue], [database] ---------------------------------------------------------

renamed("cache.driver", "(automatic)", "cache-channel payloads are kept in Redis with the Redis adapter, "
        "else in memory; \"memory\" and \"redis\" need no setting, others: a warning", apply="cache_driver")
ignored("cache.redis", "the cache uses the adapter's Redis connection", keys="prefix url_override cluster_mode",
        when=_driver_is("cache.driver", "redis", "redis-cluster"))
ignored("cache.memory", "cache-channel payloads expire after one hour and expired ones are swept; there is "
        "no separate TTL, sweep interval or capacity",
        keys="ttl cleanup_interval max_capacity", when=_driver_is("cache.driver", "memory"))
renamed("queue.driver", "webhooks.queue_driver", "\"memory\" and \"redis\" as is (\"none\" as \"memory\"); "
        "a broker: a warning, and the automatic choice", apply="queue_driver")
ignored("queue.reliability", "webhook jobs are retried by [webhooks.retry] and RQ",
        keys="max_attempts retry_base_delay_ms retry_max_delay_ms retry_jitter lease_duration_ms "
             "lease_renew_interval_ms stalled_batch_size worker_poll_interval_ms worker_prefetch shutdown_timeout_ms "
             "completed_retention failed_retention event_retention deduplication_ttl_ms memory_capacity max_batch_size")
renamed("queue.redis", "database.redis.queue_url", "url_override becomes database.redis.queue_url (the Redis of "
        "the RQ queues); the other keys have no effect: webhook jobs use RQ's own keys and concurrency is the "
        "number of workers you run", apply="queue_redis")
for _name, _keys in {
    "redis_cluster": "concurrency prefix nodes request_timeout_ms",
    **_BROKERS,
    "sqs": "region queue_url_prefix visibility_timeout endpoint_url max_messages wait_time_seconds concurrency fifo "
           "message_group_id",
    "sns": "region topic_arn endpoint_url",
}.items():
    _driver = {"google_pubsub": "google-pubsub", "redis_cluster": "redis-cluster"}.get(_name, _name)
    ignored(f"queue.{_name}", "webhook jobs are queued in memory or in Redis (RQ) only", keys=_keys,
            when=_driver_is("queue.driver", _driver))
renamed("database.redis.host", "database.redis.url", "host, port, db, username and password become the URL "
        "when a Redis driver is selected", apply="redis_part")
for _name in ("port", "db", "username", "password"):
    renamed(f"database.redis.{_name}", "database.redis.url", "as host", apply="redis_part")
renamed("database.redis.sentinels", "database.redis.sentinels", "{host, port} tables become \"host:port\"",
        apply="sentinels")
renamed("database.redis.name", "database.redis.sentinel_master")
same("database.redis.sentinel_password")
ignored("database.redis.sentinel_username", "sentinels are reached with a password only")
ignored("database.redis.key_prefix", "Redis keys use adapter.redis.prefix and fixed sockudo: prefixes")
renamed("database.redis.master_tls", "database.redis.tls", "enabled becomes tls; certificate options have "
        "no effect (the system CAs are trusted)", apply="master_tls")
ignored("database.redis.sentinel_tls", "sentinels are reached without TLS",
        keys="enabled accept_invalid_certs acceptInvalidCerts ca_path client_cert_path client_key_path", inert=(False,))
renamed("database.redis.cluster", "database.redis.cluster_nodes", "nodes become database.redis.cluster_nodes, "
        "password database.redis.password, use_tls database.redis.tls; a username has no effect",
        apply="redis_cluster")
renamed("database.redis.cluster_nodes", "database.redis.cluster_nodes", "{host, port} tables and redis:// URLs "
        "become \"host:port\"", apply="cluster_nodes")
_SQL = "host port username password database table_name connection_pool_size pool_min pool_max cache_ttl " \
       "cache_cleanup_interval cache_max_capacity"
_uses = {
    "mysql": ("mysql",),
    "postgres": ("pgsql", "postgres", "postgresql"),
    "dynamodb": ("dynamodb",),
    "surrealdb": ("surreal", "surrealdb"),
    "scylladb": ("scylladb", "scylla"),
}
for _name, _keys in {
    "mysql": _SQL,
    "postgres": _SQL,
    "dynamodb": "region table_name endpoint_url aws_access_key_id aws_secret_access_key aws_profile_name",
    "surrealdb": "url namespace database username password table_name cache_ttl cache_max_capacity",
    "scylladb": "nodes keyspace table_name username password replication_class replication_factor",
}.items():
    ignored(f"database.{_name}", NO_SQL + "; history is kept in Redis or memory", keys=_keys,
            when=_any(_driver_is("app_manager.driver", *_uses[_name]), _driver_is("history.backend", _name),
                      _driver_is("versioned_messages.driver", _name)))
ignored("database_pooling", "there are no database connections to pool", keys="enabled min max", inert=(False,))

# -- the global defaults of app limits ------------------------------------------------------

renamed("presence.max_members_per_channel", "app default: max_presence_members_per_channel", apply="app_default")
renamed("presence.max_member_size_in_kb", "app default: max_presence_member_size_in_kb", apply="app_default")
ignored("presence.update_rate_limit_per_member_per_second", "presence updates are not rate limited separately")
ignored("presence.ungraceful_timeout_seconds", "member_removed is sent as soon as a member's last socket is gone "
        "(webhooks debounce it by webhooks.debounce_ms)", inert=(0,))
ignored("presence.v2_ungraceful_timeout_seconds", "there is no presence lease for protocol-2 clients")
renamed("event_limits.max_channels_at_once", "app default: max_event_channels_at_once", apply="app_default")
renamed("event_limits.max_name_length", "app default: max_event_name_length", apply="app_default")
renamed("event_limits.max_payload_in_kb", "app default: max_event_payload_in_kb", apply="app_default")
renamed("event_limits.max_batch_size", "app default: max_event_batch_size", apply="app_default")
renamed("channel_limits.max_name_length", "app default: max_channel_name_length", apply="app_default")
ignored("channel_limits.cache_ttl", "a cache channel keeps its last event for one hour (3600 s)", inert=(3600,))

# -- listener, HTTP API, TLS, CORS, logging, metrics -----------------------------------------

same("http_api.request_limit_in_mb")
ignored("http_api.accept_traffic", "the process does not shed traffic by memory use", keys="memory_threshold")
ignored("http_api.usage_enabled", "/usage is always served", inert=(True,))
same("ssl.enabled ssl.cert_path ssl.key_path ssl.passphrase")
ignored("ssl.ca_path", "client certificates are not requested")
ignored("ssl.redirect_http", "there is no plain-HTTP redirect listener", inert=(False,))
ignored("ssl.http_port", "there is no plain-HTTP redirect listener",
        when=lambda root: _get(root, "ssl.redirect_http") is True)
same("rate_limiter.enabled")
renamed("rate_limiter.driver", "rate_limiter.driver", "\"memory\" and \"redis\" as is; \"redis-cluster\" as "
        "\"redis\" (the adapter's Redis or cluster); \"none\": a warning, and counting in memory",
        apply="rate_limiter_driver")
for _name in ("api_rate_limit", "websocket_rate_limit"):
    same(" ".join(f"rate_limiter.{_name}.{k}" for k in ("max_requests", "window_seconds", "identifier", "trust_hops")))
ignored("rate_limiter.redis", "the Redis rate limiter uses the adapter's Redis connection and prefix",
        keys="prefix url_override cluster_mode", when=_driver_is("rate_limiter.driver", "redis"))
same("cors.credentials cors.origin cors.methods cors.allowed_headers")
ignored("logging.colors_enabled", "human log lines are never coloured", inert=(False,))
ignored("logging.include_target", "human log lines always include the logger name", inert=(True,))
same("metrics.enabled metrics.driver metrics.host metrics.port metrics.prometheus.prefix")
same("metrics.tcp_exporter.enabled metrics.tcp_exporter.host metrics.tcp_exporter.port "
     "metrics.tcp_exporter.buffer_size")
ignored("unix_socket", "the server listens on TCP only", keys="enabled path permission_mode", inert=(False,))
ignored("cleanup", "a disconnect is cleaned up in the socket's own greenlet; there is no cleanup queue",
        keys="queue_buffer_size batch_size batch_timeout_ms worker_threads max_retry_attempts async_enabled "
             "fallback_to_sync")

# -- [websocket] ---------------------------------------------------------------------------

same("websocket.max_messages")
renamed("websocket.max_bytes", "websocket.max_buffer_bytes")
ignored("websocket.disconnect_on_buffer_full", "a full outbound buffer always closes the socket with 4100; "
        "messages are never dropped", inert=(True,))
ignored("websocket.max_message_size", "inbound messages are bounded by websocket_max_payload_kb")
ignored("websocket.max_frame_size", "inbound frames are bounded by websocket_max_payload_kb")
ignored("websocket.write_buffer_size", "writes go straight to the kernel's socket buffer")
ignored("websocket.max_backpressure", "the outbound buffer is bounded by websocket.max_messages and max_bytes")
ignored("websocket.auto_ping", "WebSocket pings are always answered; the server pings with pusher:ping after "
        "activity_timeout", inert=(True,))
ignored("websocket.ping_interval", "the server pings with pusher:ping after activity_timeout of silence")
ignored("websocket.idle_timeout", "a socket silent for activity_timeout + pong_timeout is closed")
ignored("websocket.compression", "permessage-deflate is not offered", inert=("disabled",))

# -- [webhooks] ----------------------------------------------------------------------------

same("webhooks.request_timeout_ms webhooks.batching.enabled webhooks.batching.duration webhooks.batching.size")
same(" ".join(f"webhooks.retry.{k}" for k in ("enabled", "max_attempts", "max_elapsed_time_ms", "initial_backoff_ms",
                                              "max_backoff_ms")))

# -- [connection_recovery], [history], [idempotency] ---------------------------------------

same("connection_recovery.enabled connection_recovery.buffer_ttl_seconds connection_recovery.max_buffer_size")
same("history.enabled history.retention_window_seconds history.max_page_size history.max_messages_per_channel")
ignored("history.rewind_enabled", "there is no rewind on subscribe; read the history API", inert=(False,))
ignored("history.backend", "history is kept in Redis Streams with the Redis adapter, else in memory",
        inert=("memory",))
ignored("history.max_bytes_per_channel", "history is bounded by age and message count")
ignored("history.writer_shards", "history is written in the publish's own Redis call")
ignored("history.writer_queue_capacity", "history is written in the publish's own Redis call")
ignored("history.purge_interval_seconds", "history is trimmed on every write")
ignored("history.purge_batch_size", "history is trimmed on every write")
ignored("history.max_purge_per_tick", "history is trimmed on every write")
for _name in ("postgres", "mysql", "dynamodb", "surrealdb", "scylladb"):
    ignored(f"history.{_name}", "history is kept in Redis Streams or memory", keys="table_prefix write_timeout_ms",
            when=_driver_is("history.backend", _name))
same("idempotency.enabled idempotency.ttl_seconds idempotency.max_key_length")

# -- Sockudo features this server does not have ---------------------------------------------

ignored("presence_history", "presence history is not implemented",
        keys="enabled retention_window_seconds max_page_size max_events_per_channel max_bytes_per_channel",
        inert=(False,))
ignored("delta_compression", "delta compression is not implemented",
        keys="enabled algorithm full_message_interval min_message_size max_state_age_secs "
             "max_channel_states_per_socket max_conflation_states_per_channel conflation_key_path "
             "cluster_coordination coordination_backend omit_delta_algorithm", inert=(False,))
ignored("tag_filtering", "tag filtering is not implemented", keys="enabled enable_tags", inert=(False,))
ignored("ephemeral", "extras.ephemeral messages are not implemented", keys="enabled", inert=(False,))
ignored("echo_control", "echo control is not implemented: a publisher's own socket receives its message unless "
        "it passes socket_id", keys="enabled default_echo_messages", inert=(False,))
ignored("event_name_filtering", "per-subscription event filters are not implemented",
        keys="enabled max_events_per_filter max_event_name_length", inert=(False,))
ignored("versioned_messages", "versioned messages are not implemented",
        keys="enabled driver max_page_size retention_window_seconds purge_interval_seconds purge_batch_size "
             "max_purge_per_tick", inert=(False,))
ignored("annotations", "message annotations are not implemented", keys="enabled", inert=(False,))
ignored("ai_transport", "the AI transport is not implemented",
        keys="enabled channels max_accumulated_message_bytes max_appends_per_message "
             "max_open_streaming_messages_per_channel max_transport_value_bytes max_steer_codec_message_ids_bytes "
             "rollup", inert=(False,))
ignored("ably_compat", "the Ably protocol is not implemented",
        keys="enabled realtime_admission attach_timeout_ms keys max_token_ttl_ms token_request_timestamp_skew_ms "
             "nonce_ttl_seconds stats_fixture_ingest_enabled stats_queue_capacity stats_flush_interval_ms "
             "stats_retention_seconds stats_max_scan_entries stats_cas_retries", inert=(False,))
ignored("push_rules", "channel push rules are not implemented; publish pushes through the push API", inert=([],))

# -- [push] ---------------------------------------------------------------------------------

same("push.publish_status_ttl_days")
renamed("push.queue_driver", "push.queue_driver", "\"memory\" and \"redis\" as is; others: a warning, and the "
        "automatic choice", apply="push_queue_driver")
ignored("push.storage_driver", "push state is kept where push.queue_driver puts it (Redis or memory)",
        inert=("memory", "redis"))
ignored("push.allow_memory_drivers", "the in-memory push queue is always allowed (it is not durable)",
        inert=(True, False))
ignored("push.fcm_enabled", "FCM is always available", inert=(True,))
ignored("push.apns_enabled", "APNs is always available", inert=(True,))
ignored("push.webpush_enabled", "Web Push is always available", inert=(True,))
ignored("push.hms_enabled", "Huawei Push Kit is not implemented", inert=(False,))
ignored("push.wns_enabled", "Windows Notification Service is not implemented", inert=(False,))
for _name in ("fcm", "apns", "webpush", "hms", "wns"):
    ignored(f"push.{_name}_credential_ref", "credentials are uploaded through the push API, stored encrypted")
for _name in ("accept_worker_count", "planner_worker_count", "shard_worker_count", "dispatch_worker_count",
              "feedback_worker_count", "retry_worker_count"):
    ignored(f"push.{_name}", "push jobs are run by the RQ workers you start (python -m workers)")
ignored("push.dispatch_max_outbound_requests", "a dispatch job sends at most push.batch_size deliveries")
ignored("push.queue_partition_count", "one RQ queue (push.queue_name) holds every push job")
ignored("push.channel_shard_count", "channel recipients are planned in one job")
ignored("push.fanout_fast_threshold", "recipients are split into jobs of push.batch_size")
ignored("push.fanout_shard_size", "recipients are split into jobs of push.batch_size")
ignored("push.fanout_sync_threshold", "publishes are always accepted asynchronously (202)", inert=(0,))
ignored("push.backpressure_lag_threshold_secs", "admission is not throttled by queue age")
ignored("push.stale_device_max_age_days", "devices are removed when a provider reports them gone")
renamed("push.credential_encryption_key", "push.credentials_key", "\"env://NAME\" reads variable NAME",
        apply="credentials_key")
ignored("push.kms_key_ref", "the credential key comes from push.credentials_key (PUSH_CREDENTIALS_KEY)")
ignored("push.vault_secret_ref", "the credential key comes from push.credentials_key (PUSH_CREDENTIALS_KEY)")
ignored("push.dry_run", "there is no dry-run mode", inert=(False,))
ignored("push.analytics_enabled", "push analytics are not implemented; see the push metrics", inert=(False,))
ignored("push.analytics_retention_days", "push analytics are not implemented",
        when=lambda root: _get(root, "push.analytics_enabled") is True)
ignored("push.scheduler_interval_secs", "scheduled pushes are not implemented")
ignored("push.repair_interval_secs", "stuck jobs are taken over after push.lease_ms")
ignored("push.repair_min_age_secs", "stuck jobs are taken over after push.lease_ms")
ignored("push.repair_batch_size", "stuck jobs are taken over after push.lease_ms")
ignored("push.cleanup_interval_secs", "push records expire by TTL in Redis")
ignored("push.cleanup_batch_size", "push records expire by TTL in Redis")
ignored("push.cleanup_max_deleted_per_tick", "push records expire by TTL in Redis")
same("push.retry.max_attempts push.retry.initial_backoff_ms push.retry.max_backoff_ms push.retry.max_elapsed_secs "
     "push.retry.jitter_ratio_percent push.retry.respect_retry_after")
renamed("push.retry.jitter", "push.retry.jitter_ratio_percent", "false becomes 0", apply="jitter")
ignored("push.circuit_breaker", "there is no provider circuit breaker; retries back off",
        keys="failure_threshold cooldown_secs half_open_max_inflight")
ignored("push.default_quotas", "there are no per-app push quotas",
        keys="acceptance_rps delivery_quota_daily fanout_max inflight_max")
ignored("push.payload_redaction", "payloads are never logged here",
        keys="redact_payload redact_template_data redact_provider_overrides allow_debug_payload_logging")

del _name, _keys, _where, _driver


def table_keys() -> dict[str, set[str]]:
    """Every table path in the catalogue and the keys Sockudo has in it."""
    tables: dict[str, set[str]] = {}
    for path in CATALOGUE:
        parent, _, name = path.rpartition(".")
        tables.setdefault(parent, set()).add(name)
        while parent:
            grand, _, name = parent.rpartition(".")
            tables.setdefault(grand, set()).add(name.removesuffix("[]"))
            parent = grand
    return tables


TABLES = table_keys()

#: Tables whose other keys this server's own section parsers check (they hold keys of ours too).
NATIVE_TABLES = frozenset({
    "", "adapter", "adapter.redis", "database", "database.redis", "websocket", "http_api", "logging", "metrics",
    "metrics.prometheus", "metrics.tcp_exporter", "webhooks", "webhooks.batching", "webhooks.retry", "push", "cors",
    "push.retry", "rate_limiter", "rate_limiter.api_rate_limit", "rate_limiter.websocket_rate_limit", "ssl",
    "connection_recovery", "history", "idempotency", "app_manager", "app_manager.array", APP, f"{APP}.policy",
    f"{APP}.policy.limits", f"{APP}.policy.features", f"{APP}.policy.channels", f"{APP}.policy.history",
    f"{APP}.policy.idempotency", f"{APP}.policy.connection_recovery", f"{APP}.idempotency",
    f"{APP}.connection_recovery", f"{APP}.history",
})

# The Redis drivers that make [database.redis] matter.
_REDIS_DRIVERS = (("adapter.driver", ("redis",)), ("queue.driver", ("redis",)), ("cache.driver", ("redis",)),
                  ("rate_limiter.driver", ("redis",)), ("push.queue_driver", ("redis",)))


@dataclass
class Translated:
    """A document in this server's own layout, and what the translation found."""

    document: dict[str, Any]
    # AppConfig field -> (raw value, the key it came from): defaults for every app.
    app_defaults: dict[str, tuple[Any, str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)



def _host_port(where: str, table: Mapping[str, Any], default_port: int) -> str:
    """A ``{host, port}`` table of a node list as ``"host:port"``."""
    for key in table:
        if key not in ("host", "port"):
            raise unknown_key(f"{where}.{key}", key, ("host", "port"))
    host = to_str(f"{where}.host", table.get("host", "127.0.0.1"))
    return f"{host}:{to_int(f'{where}.port', table.get('port', default_port), 1, 65535)}"

class _Translator:
    def __init__(self, root: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.root = root
        self.env = env
        self.result = Translated(document={})
        self.moves: list[tuple[str, Any, str]] = []  # (our path, value, the key it came from)
        self.redis_parts: dict[str, Any] = {}

    # -- walking ---------------------------------------------------------------------------

    def walk(self, values: Mapping[str, Any], pattern: str, shown: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in values.items():
            path = f"{pattern}.{name}" if pattern else name
            where = f"{shown}.{name}" if shown else name
            entry = CATALOGUE.get(path)
            if entry is not None:
                self.apply(entry, value, where, out, name)
            elif path in TABLES and isinstance(value, Mapping):
                inner = self.walk(value, path, where)
                if inner or path in NATIVE_TABLES:  # a Sockudo-only table is gone once translated
                    out[name] = inner
            elif path in TABLES and path not in NATIVE_TABLES:
                raise ConfigError(f"config: {where} must be a table")
            elif f"{path}[]" in TABLES and isinstance(value, list):
                out[name] = [self.walk(table(f"{where}[{i}]", item), f"{path}[]", f"{where}[{i}]")
                             for i, item in enumerate(value)]
            elif pattern in NATIVE_TABLES:
                out[name] = value  # a key of ours: its section parser checks it
            else:
                raise unknown_key(where, name, TABLES.get(pattern, ()))
        return out

    def warn(self, where: str, note: str) -> None:
        self.result.warnings.append(f"config: {where} has no effect here: {note}")

    def apply(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        if entry.effect == SAME:
            out[name] = value
        elif entry.effect == RENAMED:
            if entry.apply:
                getattr(self, f"_{entry.apply}")(entry, value, where, out, name)
            else:
                self.moves.append((entry.ours, value, where))
        else:
            self.ignore(entry, value, where)

    def ignore(self, entry: SockudoKey, value: Any, where: str) -> None:
        if entry.keys:
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                shown = f"{where}[{i}]" if isinstance(value, list) else where
                if isinstance(item, Mapping):
                    for key in item:
                        if key not in entry.keys:
                            raise unknown_key(f"{shown}.{key}", key, entry.keys)
        if entry.when is not None and not entry.when(self.root):
            return
        if isinstance(value, Mapping) and value.get("enabled") is False and False in entry.inert:
            return  # a feature this server lacks, switched off
        if value in entry.inert or (isinstance(value, Mapping | list) and not value):
            return
        self.warn(where, entry.note)

    # -- conversions -----------------------------------------------------------------------

    def _app_default(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        self.result.app_defaults[entry.ours.removeprefix("app default: ")] = (value, where)

    def _milliseconds(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        self.moves.append((entry.ours, to_float(where, value) / 1000, where))

    def _adapter_driver(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        driver = to_str(where, value).strip().lower()
        if driver in ("local", "redis", "redis-cluster"):
            out[name] = driver
        else:
            self.warn(f"{where} = {driver!r}", ONE_TRANSPORT + "; the adapter is \"redis\" when Redis is "
                      "configured, else \"local\" (one process)")

    def _app_manager_driver(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        driver = to_str(where, value).strip().lower()
        if driver == "memory":
            out[name] = driver
        else:
            self.warn(f"{where} = {driver!r}", NO_SQL)

    def _cache_driver(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        driver = to_str(where, value).strip().lower()
        if driver not in ("memory", "redis", "redis-cluster"):
            self.warn(f"{where} = {driver!r}", entry.note)

    def _queue_driver(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        driver = to_str(where, value).strip().lower()
        if driver in ("memory", "redis"):
            self.moves.append(("webhooks.queue_driver", driver, where))
        elif driver == "none":
            self.moves.append(("webhooks.queue_driver", "memory", where))
        else:
            self.warn(f"{where} = {driver!r}", "webhook jobs are queued in memory or in Redis (RQ) only; "
                      "the queue is Redis when Redis is configured, else memory")

    def _rate_limiter_driver(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any],
                             name: str) -> None:
        driver = to_str(where, value).strip().lower()
        if driver in ("memory", "redis", "redis-cluster"):
            out[name] = "redis" if driver == "redis-cluster" else driver
        else:
            self.warn(f"{where} = {driver!r}", "the limits are counted in this process's memory, or in Redis with "
                      "driver = \"redis\"")

    def _push_queue_driver(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        driver = to_str(where, value).strip().lower()
        if driver in ("memory", "redis", "auto"):
            out[name] = driver
        else:
            self.warn(f"{where} = {driver!r}", "push jobs are queued in Redis (RQ) or in memory only; "
                      "Redis when Redis is configured, else memory")

    def _credentials_key(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        text = to_str(where, value)
        if text.startswith("env://"):
            variable = text.removeprefix("env://")
            if not self.env.get(variable):
                raise ConfigError(f"config: {where} reads environment variable {variable}, which is not set")
            text = self.env[variable]
        self.moves.append(("push.credentials_key", text, where))

    def _jitter(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        if not to_bool(where, value):
            self.moves.append(("push.retry.jitter_ratio_percent", 0, where))

    def _webhooks(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        if not isinstance(value, list):
            out[name] = value  # the webhook parser names the error
            return
        kept = []
        for i, item in enumerate(value):
            lambda_only = isinstance(item, Mapping) and not item.get("url")
            if lambda_only and (item.get("lambda") or item.get("lambda_function")):
                self.warn(f"{where}[{i}]", "AWS Lambda webhooks are not implemented; give the entry a url")
                continue
            kept.append(item)
        out[name] = kept

    def _redis_client_options(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any],
                              name: str) -> None:
        for key, option in table(where, value).items():
            if key == "url":
                self.redis_parts.setdefault("client_url", to_str(f"{where}.url", option))
            else:
                self.warn(f"{where}.{key}", "Redis client options other than url are not supported")

    def _redis_part(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        self.redis_parts[name] = value

    def _sentinels(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        if not isinstance(value, list):
            out[name] = value
            return
        entries: list[Any] = []
        for i, item in enumerate(value):
            if isinstance(item, Mapping):
                entries.append(_host_port(f"{where}[{i}]", item, 26379))
            else:
                entries.append(item)
        out[name] = entries

    def _node_list(self, where: str, value: Any) -> list[str]:
        """Cluster nodes as "host:port" strings (``rediss://`` ones also turn TLS on)."""
        if not isinstance(value, list):
            raise ConfigError(f"config: {where} must be a list of \"host:port\" strings or {{host, port}} tables")
        nodes: list[str] = []
        for i, item in enumerate(value):
            if isinstance(item, Mapping):
                nodes.append(_host_port(f"{where}[{i}]", item, 6379))
            else:
                host, port, tls = node_address(f"{where}[{i}]", to_str(f"{where}[{i}]", item))
                nodes.append(f"{host}:{port}")
                if tls and not any(move[0] == "database.redis.tls" for move in self.moves):
                    self.moves.append(("database.redis.tls", True, f"{where}[{i}]"))
        return nodes

    def _cluster_nodes(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        if isinstance(value, str):
            out[name] = value  # our own comma-separated form; the loader checks it
            return
        nodes = self._node_list(where, value)
        if nodes:
            out[name] = nodes

    def _redis_cluster(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        allowed = ("nodes", "username", "password", "use_tls", "useTLS")
        for key, option in table(where, value).items():
            shown = f"{where}.{key}"
            if key == "nodes":
                nodes = self._node_list(shown, option)
                if nodes:
                    self.moves.append(("database.redis.cluster_nodes", nodes, shown))
            elif key == "password":
                if option:
                    self.moves.append(("database.redis.password", option, shown))
            elif key in ("use_tls", "useTLS"):
                if to_bool(shown, option):
                    self.moves.append(("database.redis.tls", True, shown))
            elif key == "username":
                if option:
                    self.warn(shown, "the cluster is reached with a password only")
            else:
                raise unknown_key(shown, key, allowed)

    def _adapter_cluster(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        allowed = ("nodes", "prefix", "request_timeout_ms", "use_connection_manager", "use_sharded_pubsub", "tls")
        options = table(where, value)
        for key in options:
            if key not in allowed:
                raise unknown_key(f"{where}.{key}", key, allowed)
        if not _driver_is("adapter.driver", "redis-cluster")(self.root):
            return  # the settings of a driver that is not selected
        for key, option in options.items():
            shown = f"{where}.{key}"
            if key == "nodes":
                nodes = self._node_list(shown, option)
                if nodes:
                    self.moves.append(("database.redis.cluster_nodes", nodes, shown))
            elif key == "prefix":
                self.moves.append(("adapter.redis.prefix", option, shown))
            elif key == "request_timeout_ms":
                self.moves.append(("adapter.redis.requests_timeout", option, shown))
            elif key == "tls":
                if isinstance(option, Mapping):
                    if option.get("enabled"):
                        self.moves.append(("database.redis.tls", True, shown))
                elif to_bool(shown, option):
                    self.moves.append(("database.redis.tls", True, shown))
            elif key == "use_sharded_pubsub" and option is False:
                self.warn(shown, "the Redis Cluster adapter always uses sharded pub/sub (SSUBSCRIBE)")

    def _queue_redis(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        allowed = ("concurrency", "prefix", "url_override", "cluster_mode", "response_timeout_ms")
        for key, option in table(where, value).items():
            shown = f"{where}.{key}"
            if key not in allowed:
                raise unknown_key(shown, key, allowed)
            if key == "url_override" and option:
                self.moves.append(("database.redis.queue_url", to_str(shown, option), shown))
            elif key == "cluster_mode" and option is True:
                self.warn(shown, "RQ needs one Redis (its queues and registries change together in MULTI and "
                          "Lua): give the queues their own Redis with url_override or QUEUE_REDIS_URL")

    def _master_tls(self, entry: SockudoKey, value: Any, where: str, out: dict[str, Any], name: str) -> None:
        options = table(where, value)
        for key, option in options.items():
            if key == "enabled":
                out["tls"] = option
            elif key in ("accept_invalid_certs", "acceptInvalidCerts", "ca_path", "client_cert_path",
                         "client_key_path"):
                if option not in (None, False, ""):
                    self.warn(f"{where}.{key}", entry.note)
            else:
                raise unknown_key(f"{where}.{key}", key, ("enabled", "accept_invalid_certs", "ca_path",
                                                          "client_cert_path", "client_key_path"))

    # -- finishing -------------------------------------------------------------------------

    def redis_selected(self) -> bool:
        return any(_driver_is(path, *names)(self.root) for path, names in _REDIS_DRIVERS)

    def finish(self, document: dict[str, Any]) -> None:
        parts = self.redis_parts
        database = document.setdefault("database", {})
        redis = database.setdefault("redis", {}) if isinstance(database, dict) else {}
        url = parts.pop("client_url", None)
        if parts and redis.get("sentinels"):
            for key in ("password", "db"):  # the master's, behind the sentinels
                if key in parts:
                    redis.setdefault(key, parts.pop(key))
        if parts and (redis.get("url") or redis.get("sentinels")):
            given = "database.redis.url" if redis.get("url") else "database.redis.sentinels"
            self.result.warnings.append(f"config: database.redis.{'/'.join(sorted(parts))} is overridden by {given}")
        elif parts:
            if self.redis_selected():
                url = url or self.redis_url(parts)
            else:
                self.warn("database.redis." + "/".join(sorted(parts)), "no Redis driver is selected "
                          "(adapter, queue, cache, rate_limiter or push.queue_driver \"redis\")")
        if url and not redis.get("url"):
            redis["url"] = url
        if isinstance(database, dict) and not redis:
            database.pop("redis", None)
        if isinstance(database, dict) and not database:
            document.pop("database", None)
        for ours, value, source in self.moves:
            target = document
            *parents, last = ours.split(".")
            for part in parents:
                target = target.setdefault(part, {})
            if last in target:
                self.result.warnings.append(f"config: {source} is overridden by {ours}")
                continue
            target[last] = value

    def redis_url(self, parts: Mapping[str, Any]) -> str:
        host = to_str("database.redis.host", parts.get("host", "127.0.0.1"))
        port = to_int("database.redis.port", parts.get("port", 6379), 1, 65535)
        db = to_int("database.redis.db", parts.get("db", 0))
        username = parts.get("username") or ""
        password = parts.get("password") or ""
        auth = ""
        if username or password:
            auth = quote(to_str("database.redis.username", username), safe="")
            auth += ":" + quote(to_str("database.redis.password", password), safe="") if password else ""
            auth += "@"
        return f"redis://{auth}{host}:{port}/{db}"


def translate(document: Mapping[str, Any], env: Mapping[str, str]) -> Translated:
    """This server's layout of a (possibly Sockudo-style) document. Raises ConfigError for a key
    neither knows; the warnings are for the caller to log."""
    translator = _Translator(document, env)
    out = translator.walk(document, "", "")
    translator.finish(out)
    translator.result.document = out
    return translator.result


def covering(path: str) -> SockudoKey | None:
    """The catalogue entry deciding what Sockudo key ``path`` does here: its own, or that of the
    ignored or converted table it lies in. None for a table that only holds other keys."""
    entry = CATALOGUE.get(path) or CATALOGUE.get(path.removesuffix("[]"))
    while entry is None and "." in path:
        path = path.rpartition(".")[0]
        ancestor = CATALOGUE.get(path) or CATALOGUE.get(path.removesuffix("[]"))
        if ancestor is not None and (ancestor.effect == IGNORED or ancestor.apply):
            return ancestor
    return entry
