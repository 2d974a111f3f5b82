"""``[push]`` configuration, then environment overrides. Pure: no I/O.

Every key can be set in the TOML ``[push]`` table (``[push.retry]`` for the retry policy) or by
``PUSH_<KEY>`` / ``PUSH_RETRY_<KEY>``; Sockudo's provider variables (``APNS_ENDPOINT``,
``APNS_TOPIC``, ``FCM_ENDPOINT``, ``VAPID_CONTACT``, ``PUSH_CREDENTIAL_ENCRYPTION_KEY``) are
accepted too. An invalid value raises ConfigError naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

from sockudo.config.coerce import build_values, table
from sockudo.core.errors import ConfigError


@dataclass(frozen=True)
class PushRetryPolicy:
    """``[push.retry]``: exponential backoff with jitter, bounded by attempts and age."""

    max_attempts: int = 5  # deliveries tried at most this many times (1–100)
    initial_backoff_ms: int = 1000
    max_backoff_ms: int = 60_000
    max_elapsed_secs: int = 86_400  # no retry later than first attempt + this
    jitter_ratio_percent: int = 20
    respect_retry_after: bool = True


@dataclass(frozen=True)
class PushSettings:
    enabled: bool = True
    # "auto": RQ queue ``push`` + Redis store when Redis is configured, else in-process (not durable).
    queue_driver: str = "auto"
    queue_name: str = "push"
    redis_prefix: str = "sockudo:push:"
    # Credentials are stored encrypted with this key; without it credential writes answer 400.
    credentials_key: str | None = field(default=None, repr=False)
    # Test/dev only: allow http:// and loopback/private provider hosts and Web Push endpoints.
    allow_insecure_endpoints: bool = False
    ca_file: str | None = None  # extra CA bundle trusted for provider TLS (tests, TLS-intercepting proxies)
    apns_endpoint: str = "https://api.push.apple.com"
    apns_topic: str | None = None  # default apns-topic when the stored credential has none
    fcm_endpoint: str = "https://fcm.googleapis.com"
    vapid_contact: str = "mailto:sockudo-webpush@example.com"
    connect_timeout_ms: int = 5000
    # The whole attempt (connect + send + headers + body), however slowly the provider answers.
    request_timeout_ms: int = 10_000
    # Requests in flight at once per worker process, per provider (HTTP/2 streams for APNs and
    # FCM over TLS, pooled HTTP/1.1 connections for Web Push and plain-http endpoints).
    apns_concurrency: int = 500
    fcm_concurrency: int = 500
    webpush_concurrency: int = 100
    # A 429 / TooManyRequests pauses that provider in this process; a delivery waits this long at
    # most inside its job (then it becomes a scheduled retry that honours Retry-After).
    backpressure_max_wait_ms: int = 1000
    batch_size: int = 100  # deliveries per dispatch job (≤ 500)
    lease_ms: int = 30_000  # a started job not renewed for this long is taken over (worker crash)
    maintenance_interval_ms: int = 1000  # lease reaper / queue gauges tick
    publish_status_ttl_days: int = 30
    dead_letter_ttl_days: int = 30
    retry: PushRetryPolicy = field(default_factory=PushRetryPolicy)

    @property
    def status_ttl_s(self) -> int:
        return self.publish_status_ttl_days * 86_400


QUEUE_DRIVERS = ("auto", "redis", "memory")

_ALIASES = {  # Sockudo's variable names → key
    "PUSH_CREDENTIAL_ENCRYPTION_KEY": "credentials_key",
    "APNS_ENDPOINT": "apns_endpoint",
    "APNS_TOPIC": "apns_topic",
    "FCM_ENDPOINT": "fcm_endpoint",
    "VAPID_CONTACT": "vapid_contact",
    "PUSH_ALLOW_INSECURE_PROVIDER_ENDPOINTS": "allow_insecure_endpoints",
}


def _check_range(key: str, value: int, low: int, high: int | None = None) -> None:
    if value < low or (high is not None and value > high):
        limit = f"{low}–{high}" if high is not None else f"at least {low}"
        raise ConfigError(f"config: {key} must be {limit}, got {value}")


def _check_url(key: str, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"config: {key} must be an http(s) URL, got {value!r}")


def parse_settings(
    raw: Mapping[str, Any] | None, env: Mapping[str, str] | None = None, *, redis_configured: bool = False
) -> PushSettings:
    """The ``[push]`` table, then ``PUSH_*`` environment overrides. Raises ConfigError naming the key."""
    raw = dict(table("[push]", raw or {}))
    retry_raw = dict(table("[push.retry]", raw.pop("retry", {})))
    env = env or {}
    top_keys = [f.name for f in fields(PushSettings) if f.name != "retry"]
    for key in top_keys:
        var = f"PUSH_{key.upper()}"
        if env.get(var, "") != "":
            raw[key] = env[var]
    for var, key in _ALIASES.items():
        if env.get(var, "") != "" and f"PUSH_{key.upper()}" not in env:
            raw[key] = env[var]
    # PUSH_CREDENTIALS_KEY is the documented name; an empty one is the same as none.
    for f in fields(PushRetryPolicy):
        var = f"PUSH_RETRY_{f.name.upper()}"
        if env.get(var, "") != "":
            retry_raw[f.name] = env[var]

    values = build_values(PushSettings, raw, "push", skip=("retry",))
    retry = PushRetryPolicy(**build_values(PushRetryPolicy, retry_raw, "push.retry"))
    settings = replace(PushSettings(), retry=retry, **values)

    if settings.queue_driver not in QUEUE_DRIVERS:
        raise ConfigError(
            f"config: push.queue_driver must be one of {', '.join(QUEUE_DRIVERS)}, got {settings.queue_driver!r}"
        )
    if settings.queue_driver == "redis" and not redis_configured:
        raise ConfigError('config: push.queue_driver "redis" needs REDIS_URL (database.redis.url) or sentinels')
    _check_url("push.apns_endpoint", settings.apns_endpoint)
    _check_url("push.fcm_endpoint", settings.fcm_endpoint)
    if not settings.vapid_contact.startswith(("mailto:", "https:")):
        raise ConfigError("config: push.vapid_contact must be a mailto: or https: URI")
    if not settings.queue_name.strip():
        raise ConfigError("config: push.queue_name must not be empty")
    _check_range("push.connect_timeout_ms", settings.connect_timeout_ms, 1)
    _check_range("push.request_timeout_ms", settings.request_timeout_ms, 1)
    _check_range("push.batch_size", settings.batch_size, 1, 500)
    for name in ("apns_concurrency", "fcm_concurrency", "webpush_concurrency"):
        _check_range(f"push.{name}", getattr(settings, name), 1, 1000)
    _check_range("push.backpressure_max_wait_ms", settings.backpressure_max_wait_ms, 0, 60_000)
    _check_range("push.lease_ms", settings.lease_ms, 500)
    _check_range("push.maintenance_interval_ms", settings.maintenance_interval_ms, 50)
    _check_range("push.publish_status_ttl_days", settings.publish_status_ttl_days, 1)
    _check_range("push.dead_letter_ttl_days", settings.dead_letter_ttl_days, 1)
    r = settings.retry
    _check_range("push.retry.max_attempts", r.max_attempts, 1, 100)
    _check_range("push.retry.initial_backoff_ms", r.initial_backoff_ms, 1)
    _check_range("push.retry.max_backoff_ms", r.max_backoff_ms, r.initial_backoff_ms, 86_400_000)
    _check_range("push.retry.max_elapsed_secs", r.max_elapsed_secs, 1, 30 * 86_400)
    _check_range("push.retry.jitter_ratio_percent", r.jitter_ratio_percent, 0, 100)
    if settings.ca_file is not None and not settings.ca_file.strip():
        settings = replace(settings, ca_file=None)
    return settings


def uses_redis(settings: PushSettings, redis_configured: bool) -> bool:
    return settings.queue_driver == "redis" or (settings.queue_driver == "auto" and redis_configured)
