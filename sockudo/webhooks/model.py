"""Webhooks in Pusher's format: configuration, filters, batching, signing, retry policy
(https://pusher.com/docs/channels/server_api/webhooks/).

Pure: no gevent, no Flask, no RQ, no sockets. The services that queue and send deliveries
(``webhook_sink``, ``webhook_delivery``, ``workers.webhooks``) are built on these pieces.

An **endpoint** is one entry of an app's ``webhooks`` list. Entries that share a URL are still
separate endpoints (each gets the events its own types and filter select, with its own
headers, retries and dead letters); only an entry configured identically to an earlier one is
folded into it (``duplicate_endpoints``, warned about at start-up). An endpoint is named by
``endpoint_id``: its index in the list and a short hash of its configuration.

A **delivery** is one signed HTTP request: the events of one batch that one endpoint asked
for, as ``{"time_ms": …, "events": […]}``. It carries an ``X-Sockudo-Delivery-Id`` that stays
the same across retries and replays, so receivers can drop duplicates (delivery is
at-least-once). The signature is computed when the delivery is built, so queued jobs never
carry the app secret.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from sockudo.config.coerce import check_keys, table, to_bool, to_int, to_str
from sockudo.core.auth import webhook_signature
from sockudo.core.errors import ConfigError

# -- wire names ------------------------------------------------------

CHANNEL_OCCUPIED = "channel_occupied"
CHANNEL_VACATED = "channel_vacated"
MEMBER_ADDED = "member_added"
MEMBER_REMOVED = "member_removed"
CLIENT_EVENT = "client_event"
CACHE_MISS = "cache_miss"
SUBSCRIPTION_COUNT = "subscription_count"

EVENT_TYPES = frozenset(
    {CHANNEL_OCCUPIED, CHANNEL_VACATED, MEMBER_ADDED, MEMBER_REMOVED, CLIENT_EVENT, CACHE_MISS, SUBSCRIPTION_COUNT}
)

# A debounced "leave" event and the "join" that cancels it when it comes back in time.
DEBOUNCED = {CHANNEL_VACATED: CHANNEL_OCCUPIED, MEMBER_REMOVED: MEMBER_ADDED}
CANCELS = {join: leave for leave, join in DEBOUNCED.items()}

HEADER_KEY = "X-Pusher-Key"
HEADER_SIGNATURE = "X-Pusher-Signature"
HEADER_DELIVERY_ID = "X-Sockudo-Delivery-Id"
CONTENT_TYPE = "application/json"
# Headers the server sets itself; a configured header may not replace them.
RESERVED_HEADERS = frozenset(
    h.lower() for h in ("Content-Type", "Content-Length", "Host", "Connection", "Transfer-Encoding",
                        HEADER_KEY, HEADER_SIGNATURE, HEADER_DELIVERY_ID)
)

RQ_QUEUE = "webhooks"
RQ_JOB = "workers.webhooks.deliver"  # enqueued by dotted path: sockudo never imports workers
# Keys outside the configurable prefix, shared by every worker: one lease per running job.
LEASE_KEY = "sockudo_webhooks:lease:{job_id}"
REAPER_LOCK_KEY = "sockudo_webhooks:reaper:{queue}"
# Under the delivery's prefix ({redis prefix}webhooks:): one key per attempt in flight to an endpoint.
INFLIGHT_KEY = "{prefix}inflight:{endpoint}:{slot}"
# The endpoint of a delivery queued by a server from before endpoints had ids (metrics label).
UNKNOWN_ENDPOINT = "unknown"
PAYLOAD_VERSION = 1


# -- global settings ([webhooks]) ------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff from ``initial_backoff_ms``, doubling, capped at ``max_backoff_ms``,
    until the next wait would pass ``max_elapsed_time_ms`` since the first attempt."""

    enabled: bool = True
    max_attempts: int | None = None  # None: limited by time only
    max_elapsed_time_ms: int = 300_000
    initial_backoff_ms: int = 1000
    max_backoff_ms: int = 60_000

    def delay_ms(self, failed_attempts: int) -> int:
        """Wait before the next attempt after ``failed_attempts`` (≥ 1) failures: 1, 2, 4, … s, capped."""
        exponent = min(max(failed_attempts - 1, 0), 40)
        return int(min(self.initial_backoff_ms * (2 ** exponent), self.max_backoff_ms))

    def next_delay_ms(self, failed_attempts: int, elapsed_ms: float) -> int | None:
        """The wait before retrying, or None when the policy says stop."""
        if not self.enabled:
            return None
        if self.max_attempts is not None and failed_attempts >= self.max_attempts:
            return None
        delay = self.delay_ms(failed_attempts)
        if elapsed_ms + delay > self.max_elapsed_time_ms:
            return None
        return delay

    def schedule_ms(self) -> list[int]:
        """Every wait of a delivery that always fails instantly: the planned retry schedule."""
        waits: list[int] = []
        elapsed = 0
        while True:
            delay = self.next_delay_ms(len(waits) + 1, elapsed)
            if delay is None or len(waits) >= 1000:
                return waits
            waits.append(delay)
            elapsed += delay

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "max_attempts": self.max_attempts,
                "max_elapsed_time_ms": self.max_elapsed_time_ms, "initial_backoff_ms": self.initial_backoff_ms,
                "max_backoff_ms": self.max_backoff_ms}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RetryPolicy:
        return cls(enabled=bool(raw.get("enabled", True)), max_attempts=raw.get("max_attempts"),
                   max_elapsed_time_ms=int(raw.get("max_elapsed_time_ms", 300_000)),
                   initial_backoff_ms=int(raw.get("initial_backoff_ms", 1000)),
                   max_backoff_ms=int(raw.get("max_backoff_ms", 60_000)))


QUEUE_DRIVERS = ("auto", "redis", "memory")


@dataclass(frozen=True)
class WebhookSettings:
    request_timeout_ms: int = 10_000
    batching_enabled: bool = True
    batching_duration_ms: int = 50
    batching_size: int = 100
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # channel_vacated / member_removed wait this long and are dropped if the channel or
    # member is back by then (Sockudo's default: 3 s). 0 sends them at once.
    debounce_ms: int = 3000
    # "auto": RQ on Redis when Redis is configured, else the in-process queue.
    queue_driver: str = "auto"
    dead_letter_limit: int = 10_000  # newest kept in Redis
    # Attempts one endpoint (URL) may have in flight at once across all RQ workers; 0 = "auto":
    # half the workers listening on the queue, at least 1 (docs/webhooks.md, "Slow endpoints").
    max_concurrent_per_endpoint: int = 0


_RETRY_KEYS = ("enabled", "max_attempts", "max_elapsed_time_ms", "initial_backoff_ms", "max_backoff_ms")

# Environment variables: (section path, key).
SETTINGS_ENV = {
    "WEBHOOK_REQUEST_TIMEOUT_MS": ("", "request_timeout_ms"),
    "WEBHOOK_DEBOUNCE_MS": ("", "debounce_ms"),
    "WEBHOOK_QUEUE_DRIVER": ("", "queue_driver"),
    "WEBHOOK_DEAD_LETTER_LIMIT": ("", "dead_letter_limit"),
    "WEBHOOK_MAX_CONCURRENT_PER_ENDPOINT": ("", "max_concurrent_per_endpoint"),
    "WEBHOOK_BATCHING_ENABLED": ("batching", "enabled"),
    "WEBHOOK_BATCHING_DURATION": ("batching", "duration"),
    "WEBHOOK_BATCHING_SIZE": ("batching", "size"),
    "WEBHOOK_RETRY_ENABLED": ("retry", "enabled"),
    "WEBHOOK_RETRY_MAX_ATTEMPTS": ("retry", "max_attempts"),
    "WEBHOOK_RETRY_MAX_ELAPSED_TIME_MS": ("retry", "max_elapsed_time_ms"),
    "WEBHOOK_RETRY_INITIAL_BACKOFF_MS": ("retry", "initial_backoff_ms"),
    "WEBHOOK_RETRY_MAX_BACKOFF_MS": ("retry", "max_backoff_ms"),
}


def parse_retry(where: str, raw: Mapping[str, Any], base: RetryPolicy) -> RetryPolicy:
    check_keys(where, raw, _RETRY_KEYS)
    values: dict[str, Any] = {}
    if "enabled" in raw:
        values["enabled"] = to_bool(f"{where}.enabled", raw["enabled"])
    if "max_attempts" in raw:
        value = raw["max_attempts"]
        values["max_attempts"] = None if value in (None, "", 0, "0") else to_int(f"{where}.max_attempts", value, 1)
    for key in ("max_elapsed_time_ms", "initial_backoff_ms", "max_backoff_ms"):
        if key in raw:
            values[key] = to_int(f"{where}.{key}", raw[key], 0 if key == "max_elapsed_time_ms" else 1)
    policy = replace(base, **values)
    if policy.max_backoff_ms < policy.initial_backoff_ms:
        raise ConfigError(f"config: {where}.max_backoff_ms must be at least initial_backoff_ms")
    return policy


def parse_settings(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> WebhookSettings:
    """The ``[webhooks]`` table, then ``WEBHOOK_*`` environment overrides. Raises ConfigError naming the key."""
    raw = table("[webhooks]", raw)
    merged: dict[str, Any] = {k: v for k, v in raw.items() if k not in ("batching", "retry")}
    batching = dict(table("webhooks.batching", raw.get("batching", {})))
    retry = dict(table("webhooks.retry", raw.get("retry", {})))
    for var, (section, key) in SETTINGS_ENV.items():
        if env is not None and env.get(var, "") != "":
            {"": merged, "batching": batching, "retry": retry}[section][key] = env[var]
    check_keys("webhooks", merged, ("request_timeout_ms", "debounce_ms", "queue_driver", "dead_letter_limit",
                                     "max_concurrent_per_endpoint"))
    check_keys("webhooks.batching", batching, ("enabled", "duration", "size"))
    settings = WebhookSettings()
    values: dict[str, Any] = {}
    if "request_timeout_ms" in merged:
        values["request_timeout_ms"] = to_int("webhooks.request_timeout_ms", merged["request_timeout_ms"], 1)
    if "debounce_ms" in merged:
        values["debounce_ms"] = to_int("webhooks.debounce_ms", merged["debounce_ms"], 0)
    if "dead_letter_limit" in merged:
        values["dead_letter_limit"] = to_int("webhooks.dead_letter_limit", merged["dead_letter_limit"], 1)
    if "max_concurrent_per_endpoint" in merged:
        value = merged["max_concurrent_per_endpoint"]
        if isinstance(value, str) and value.strip().lower() == "auto":
            value = 0
        values["max_concurrent_per_endpoint"] = to_int("webhooks.max_concurrent_per_endpoint", value, 0)
    if "queue_driver" in merged:
        driver = to_str("webhooks.queue_driver", merged["queue_driver"]).strip().lower()
        if driver not in QUEUE_DRIVERS:
            choices = ", ".join(QUEUE_DRIVERS)
            raise ConfigError(f"config: webhooks.queue_driver must be one of {choices}, got {driver!r}")
        values["queue_driver"] = driver
    if "enabled" in batching:
        values["batching_enabled"] = to_bool("webhooks.batching.enabled", batching["enabled"])
    if "duration" in batching:
        values["batching_duration_ms"] = to_int("webhooks.batching.duration", batching["duration"], 1)
    if "size" in batching:
        values["batching_size"] = to_int("webhooks.batching.size", batching["size"], 1)
    values["retry"] = parse_retry("webhooks.retry", retry, settings.retry)
    return replace(settings, **values)


# -- per-app endpoints (webhooks = [{url, event_types, filter, headers}]) ---------------


@dataclass(frozen=True)
class ChannelFilter:
    """Every given constraint must hold. Events without a channel test as ``""``."""

    prefix: str | None = None
    suffix: str | None = None
    pattern: re.Pattern[str] | None = None
    namespaces: tuple[str, ...] = ()

    def matches(self, channel: str) -> bool:
        if self.prefix is not None and not channel.startswith(self.prefix):
            return False
        if self.suffix is not None and not channel.endswith(self.suffix):
            return False
        if self.pattern is not None and self.pattern.search(channel) is None:
            return False
        if self.namespaces and channel_namespace(channel) not in self.namespaces:
            return False
        return True


_TYPE_PREFIXES = ("private-encrypted-cache-", "private-encrypted-", "private-cache-", "presence-cache-",
                  "private-", "presence-", "cache-")


def channel_namespace(channel: str) -> str:
    """Text before the first ``:`` once the channel-type prefix is stripped (Sockudo's rule)."""
    for prefix in _TYPE_PREFIXES:
        if channel.startswith(prefix):
            channel = channel[len(prefix):]
            break
    return channel.split(":", 1)[0] if ":" in channel else ""


@dataclass(frozen=True)
class WebhookEndpoint:
    url: str
    event_types: frozenset[str]
    filter: ChannelFilter = ChannelFilter()
    headers: tuple[tuple[str, str], ...] = ()
    request_timeout_ms: int | None = None  # None: the global [webhooks] value
    retry: tuple[tuple[str, Any], ...] | None = None  # validated subset of [webhooks.retry]; None: global

    def wants(self, event: Mapping[str, Any]) -> bool:
        channel = event.get("channel")
        if event.get("name") not in self.event_types:
            return False
        return self.filter.matches(channel if isinstance(channel, str) else "")

    def timeout_ms(self, settings: WebhookSettings) -> int:
        return self.request_timeout_ms if self.request_timeout_ms is not None else settings.request_timeout_ms

    def retry_policy(self, settings: WebhookSettings) -> RetryPolicy:
        return settings.retry if not self.retry else parse_retry("webhook.retry", dict(self.retry), settings.retry)


_ENDPOINT_KEYS = ("url", "event_types", "filter", "headers", "request_timeout_ms", "retry")
_FILTER_KEYS = ("channel_prefix", "channel_suffix", "channel_pattern", "channel_namespace", "channel_namespaces")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_endpoint(where: str, raw: Any) -> WebhookEndpoint:
    entry = table(where, raw)
    if "lambda" in entry or "lambda_function" in entry:
        raise ConfigError(f"config: {where}: AWS Lambda webhooks are not supported (use url)")
    check_keys(where, entry, _ENDPOINT_KEYS)
    if "url" not in entry:
        raise ConfigError(f"config: {where}.url is required")
    url = to_str(f"{where}.url", entry["url"]).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"config: {where}.url must be an http:// or https:// URL")
    types = entry.get("event_types")
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",") if t.strip()]
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise ConfigError(f"config: {where}.event_types must be a non-empty list of event names")
    for name in types:
        if name not in EVENT_TYPES:
            raise ConfigError(
                f"config: {where}.event_types: unknown event type {name!r} (known: {', '.join(sorted(EVENT_TYPES))})"
            )
    flt = table(f"{where}.filter", entry.get("filter", {}))
    check_keys(f"{where}.filter", flt, _FILTER_KEYS)
    pattern = None
    if flt.get("channel_pattern") is not None:
        source = to_str(f"{where}.filter.channel_pattern", flt["channel_pattern"])
        try:
            pattern = re.compile(source)
        except re.error as exc:
            raise ConfigError(
                f"config: {where}.filter.channel_pattern is not a valid regular expression: {exc}"
            ) from None
    namespaces: list[str] = []
    if flt.get("channel_namespace") is not None:
        namespaces.append(to_str(f"{where}.filter.channel_namespace", flt["channel_namespace"]))
    if flt.get("channel_namespaces") is not None:
        value = flt["channel_namespaces"]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config: {where}.filter.channel_namespaces must be a list of strings")
        namespaces.extend(value)
    def optional(key: str) -> str | None:
        return to_str(f"{where}.filter.{key}", flt[key]) if flt.get(key) is not None else None

    channel_filter = ChannelFilter(
        prefix=optional("channel_prefix"),
        suffix=optional("channel_suffix"),
        pattern=pattern,
        namespaces=tuple(namespaces),
    )
    headers_raw = table(f"{where}.headers", entry.get("headers", {}))
    headers: list[tuple[str, str]] = []
    for name, value in headers_raw.items():
        if not _HEADER_NAME.match(name):
            raise ConfigError(f"config: {where}.headers: {name!r} is not a valid header name")
        if name.lower() in RESERVED_HEADERS:
            raise ConfigError(f"config: {where}.headers: {name} is set by the server and cannot be configured")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"config: {where}.headers.{name} must be a string")
        text = str(value)
        if "\r" in text or "\n" in text:
            raise ConfigError(f"config: {where}.headers.{name} must not contain line breaks")
        headers.append((name, text))
    timeout = None
    if entry.get("request_timeout_ms") is not None:
        timeout = to_int(f"{where}.request_timeout_ms", entry["request_timeout_ms"], 1)
    retry = None
    if entry.get("retry") is not None:
        retry_table = dict(table(f"{where}.retry", entry["retry"]))
        parse_retry(f"{where}.retry", retry_table, RetryPolicy())  # validate now, merge with the global later
        retry = tuple(sorted(retry_table.items()))
    return WebhookEndpoint(url=url, event_types=frozenset(types), filter=channel_filter, headers=tuple(headers),
                           request_timeout_ms=timeout, retry=retry)


def parse_endpoints(where: str, value: Any) -> tuple[WebhookEndpoint, ...]:
    """An app's ``webhooks`` list. Invalid entries fail start-up with the key named."""
    if isinstance(value, tuple) and all(isinstance(v, WebhookEndpoint) for v in value):
        return value
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config: {where} must be a list of tables")
    return tuple(parse_endpoint(f"{where}[{i}]", item) for i, item in enumerate(value))


def endpoint_id(index: int, endpoint: WebhookEndpoint) -> str:
    """The entry's stable short name, ``<index>-<8 hex>``: its position in the app's ``webhooks``
    list and a hash of what it selects and where it posts, so a changed entry gets a new name.
    Used in metric labels, dead letters and in-flight slots: bounded by the config, and it reveals
    neither the URL nor header values (they can hold credentials)."""
    flt = endpoint.filter
    shape = [endpoint.url, sorted(endpoint.event_types), flt.prefix, flt.suffix,
             flt.pattern.pattern if flt.pattern is not None else None, list(flt.namespaces),
             sorted(name.lower() for name, _ in endpoint.headers), endpoint.request_timeout_ms,
             [list(item) for item in endpoint.retry or ()]]
    digest = hashlib.sha1(json.dumps(shape, separators=(",", ":"), default=str).encode("utf-8")).hexdigest()
    return f"{index}-{digest[:8]}"


def _identity(endpoint: WebhookEndpoint) -> tuple[Any, ...]:
    """Everything that makes two entries behave differently (header names compare case-insensitively)."""
    headers = tuple(sorted((name.lower(), value) for name, value in endpoint.headers))
    return (endpoint.url, endpoint.event_types, endpoint.filter, headers, endpoint.request_timeout_ms,
            endpoint.retry)


@lru_cache(maxsize=1024)
def _distinct(endpoints: tuple[WebhookEndpoint, ...]) -> tuple[tuple[tuple[str, WebhookEndpoint], ...],
                                                               tuple[tuple[int, int], ...]]:
    kept: list[tuple[str, WebhookEndpoint]] = []
    duplicates: list[tuple[int, int]] = []
    first: dict[tuple[Any, ...], int] = {}
    for index, endpoint in enumerate(endpoints):
        key = _identity(endpoint)
        if key in first:
            duplicates.append((index, first[key]))
            continue
        first[key] = index
        kept.append((endpoint_id(index, endpoint), endpoint))
    return tuple(kept), tuple(duplicates)


def distinct_endpoints(endpoints: Sequence[WebhookEndpoint]) -> tuple[tuple[str, WebhookEndpoint], ...]:
    """``(endpoint_id, endpoint)`` for every entry, in order, except those identical to an earlier one."""
    return _distinct(tuple(endpoints))[0]


def duplicate_endpoints(endpoints: Sequence[WebhookEndpoint]) -> tuple[tuple[int, int], ...]:
    """``(index, index of the earlier identical entry)`` for each entry folded into an earlier one."""
    return _distinct(tuple(endpoints))[1]


def wanted_event_types(endpoints: Iterable[WebhookEndpoint]) -> frozenset[str]:
    """Event names any endpoint asks for, plus the joins that cancel a debounced leave."""
    names: set[str] = set()
    for endpoint in endpoints:
        names |= endpoint.event_types
    names |= {DEBOUNCED[n] for n in names if n in DEBOUNCED}
    return frozenset(names)


def normalize_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """Complete an event to Pusher's shape: ``cache_miss`` carries ``data: "{}"``."""
    out = dict(event)
    if out.get("name") == CACHE_MISS:
        out.setdefault("data", "{}")
    return out


# -- batching -------------------------------------------------------------


@dataclass
class Batch:
    app_id: str
    time_ms: int  # creation time of the first event (Sockudo: the minimum)
    events: list[dict[str, Any]]
    due: float  # monotonic-ish clock seconds when the window closes


class Batcher:
    """Collects events per app for ``duration`` ms or until ``size`` events, whichever first.
    With batching off every event is its own batch. The caller owns the clock."""

    def __init__(self, enabled: bool, duration_ms: int, size: int) -> None:
        self.enabled = enabled
        self.duration = duration_ms / 1000.0
        self.size = size
        self._open: dict[str, Batch] = {}

    def add(self, app_id: str, event: dict[str, Any], time_ms: int, now: float) -> list[Batch]:
        if not self.enabled:
            return [Batch(app_id, time_ms, [event], now)]
        batch = self._open.get(app_id)
        if batch is None:
            batch = self._open[app_id] = Batch(app_id, time_ms, [], now + self.duration)
        batch.events.append(event)
        batch.time_ms = min(batch.time_ms, time_ms)
        if len(batch.events) >= self.size:
            del self._open[app_id]
            return [batch]
        return []

    def due(self, now: float) -> list[Batch]:
        ready = [b for b in self._open.values() if b.due <= now]
        for batch in ready:
            del self._open[batch.app_id]
        return ready

    def next_due(self) -> float | None:
        return min((b.due for b in self._open.values()), default=None)

    def drain(self) -> list[Batch]:
        ready = list(self._open.values())
        self._open.clear()
        return ready

    def __len__(self) -> int:
        return sum(len(b.events) for b in self._open.values())


# -- deliveries: body, signature, headers ---------------------------------------------


def encode_body(time_ms: int, events: list[dict[str, Any]]) -> str:
    """``{"time_ms", "events"}`` in that order, compact; the signature covers these exact bytes."""
    return json.dumps({"time_ms": time_ms, "events": events}, separators=(",", ":"), ensure_ascii=False)


def signed_headers(app_key: str, secret: str, body: str, delivery_id: str) -> list[tuple[str, str]]:
    return [
        ("Content-Type", CONTENT_TYPE),
        (HEADER_KEY, app_key),
        (HEADER_SIGNATURE, webhook_signature(secret, body.encode("utf-8"))),
        (HEADER_DELIVERY_ID, delivery_id),
    ]


def new_delivery_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Delivery:
    """One signed request to one endpoint; what a queue job carries (never the secret)."""

    delivery_id: str
    app_id: str
    url: str
    body: str
    headers: tuple[tuple[str, str], ...]  # signed headers first, then the configured ones
    custom_headers: tuple[tuple[str, str], ...]
    event_names: tuple[str, ...]
    created_ms: int
    timeout_ms: int
    retry: RetryPolicy
    prefix: str = "sockudo_adapter:webhooks:"  # where dead letters (and in-flight slots) go
    dead_letter_limit: int = 10_000
    max_concurrent: int = 0  # attempts in flight per endpoint; 0: auto (see WebhookSettings)
    endpoint: str = ""  # endpoint_id of the entry; "" in jobs queued before entries had ids

    @property
    def job_timeout_s(self) -> int:
        """RQ's hard limit for one attempt: the HTTP timeout plus slack for connect/teardown."""
        return -(-self.timeout_ms // 1000) + 2

    @property
    def lease_ms(self) -> int:
        """How long a running attempt's lease lives; past it, with the job still 'started',
        its worker is dead (the attempt cannot legitimately run longer than job_timeout_s)."""
        return self.job_timeout_s * 1000 + 2000

    def to_payload(self) -> dict[str, Any]:
        return {
            "v": PAYLOAD_VERSION,
            "delivery_id": self.delivery_id,
            "app_id": self.app_id,
            "url": self.url,
            "body": self.body,
            "headers": [list(h) for h in self.headers],
            "custom_headers": [list(h) for h in self.custom_headers],
            "events": list(self.event_names),
            "created_ms": self.created_ms,
            "timeout_ms": self.timeout_ms,
            "retry": self.retry.to_dict(),
            "prefix": self.prefix,
            "dead_letter_limit": self.dead_letter_limit,
            "max_concurrent": self.max_concurrent,
            "endpoint": self.endpoint,
        }

    @classmethod
    def from_payload(cls, raw: Mapping[str, Any]) -> Delivery:
        return cls(
            delivery_id=str(raw["delivery_id"]),
            app_id=str(raw["app_id"]),
            url=str(raw["url"]),
            body=str(raw["body"]),
            headers=tuple((str(k), str(v)) for k, v in raw["headers"]),
            custom_headers=tuple((str(k), str(v)) for k, v in raw.get("custom_headers", ())),
            event_names=tuple(str(n) for n in raw.get("events", ())),
            created_ms=int(raw.get("created_ms", 0)),
            timeout_ms=int(raw.get("timeout_ms", 10_000)),
            retry=RetryPolicy.from_dict(raw.get("retry", {})),
            prefix=str(raw.get("prefix", "sockudo_adapter:webhooks:")),
            dead_letter_limit=int(raw.get("dead_letter_limit", 10_000)),
            max_concurrent=int(raw.get("max_concurrent") or 0),  # absent in jobs queued before the cap existed
            endpoint=str(raw.get("endpoint") or ""),  # absent in jobs queued before entries had ids
        )

    @property
    def endpoint_label(self) -> str:
        """The ``endpoint`` metric label: the entry's id, or ``unknown`` for a job from an older server."""
        return self.endpoint or UNKNOWN_ENDPOINT


def url_digest(url: str) -> str:
    """A Redis-key-safe name for a URL that does not reveal it (paths can hold secrets)."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()


def inflight_keys(delivery: Delivery, slots: int) -> list[str]:
    """The ``slots`` lease keys of the delivery's endpoint; holding one = an attempt in flight.
    Each entry has its own slots (``<sha1(url)>:<app id>:<endpoint id>``); a job queued by an
    older server, without an endpoint id, uses the URL's slots (``<sha1(url)>``) as it did."""
    endpoint = url_digest(delivery.url)
    if delivery.endpoint:
        endpoint = f"{endpoint}:{delivery.app_id}:{delivery.endpoint}"
    return [INFLIGHT_KEY.format(prefix=delivery.prefix, endpoint=endpoint, slot=i) for i in range(slots)]


def build_deliveries(
    app_id: str,
    app_key: str,
    secret: str,
    endpoints: Sequence[WebhookEndpoint],
    settings: WebhookSettings,
    time_ms: int,
    events: list[dict[str, Any]],
    prefix: str = "sockudo_adapter:webhooks:",
    new_id: Callable[[], str] = new_delivery_id,
) -> list[Delivery]:
    """One delivery per endpoint (configured entry) that wants at least one of ``events``, with
    only those events. Entries sharing a URL each get their own delivery; an entry identical to
    an earlier one is skipped (``duplicate_endpoints``)."""
    deliveries = []
    for entry_id, endpoint in distinct_endpoints(endpoints):
        selected = [e for e in events if endpoint.wants(e)]
        if not selected:
            continue
        body = encode_body(time_ms, selected)
        delivery_id = new_id()
        deliveries.append(Delivery(
            delivery_id=delivery_id,
            app_id=app_id,
            url=endpoint.url,
            body=body,
            headers=tuple(signed_headers(app_key, secret, body, delivery_id)) + endpoint.headers,
            custom_headers=endpoint.headers,
            event_names=tuple(str(e["name"]) for e in selected),
            created_ms=time_ms,
            timeout_ms=endpoint.timeout_ms(settings),
            retry=endpoint.retry_policy(settings),
            prefix=prefix,
            dead_letter_limit=settings.dead_letter_limit,
            max_concurrent=settings.max_concurrent_per_endpoint,
            endpoint=entry_id,
        ))
    return deliveries


def resign(record: Mapping[str, Any], app_key: str, secret: str, time_ms: int, settings: WebhookSettings,
           prefix: str) -> Delivery:
    """A dead letter made deliverable again: same events, same delivery id (receivers dedupe on it),
    a fresh ``time_ms`` (SDK validators refuse bodies older than 5 minutes), signed with the
    secret from today's config, a fresh retry budget."""
    original = json.loads(record["body"])
    body = encode_body(time_ms, list(original.get("events", [])))
    delivery_id = str(record["delivery_id"])
    custom = tuple((str(k), str(v)) for k, v in record.get("custom_headers", ()))
    return Delivery(
        delivery_id=delivery_id,
        app_id=str(record["app_id"]),
        url=str(record["url"]),
        body=body,
        headers=tuple(signed_headers(app_key, secret, body, delivery_id)) + custom,
        custom_headers=custom,
        event_names=tuple(record.get("events", ())),
        created_ms=time_ms,
        timeout_ms=int(record.get("timeout_ms", settings.request_timeout_ms)),
        retry=settings.retry,
        prefix=prefix,
        dead_letter_limit=settings.dead_letter_limit,
        max_concurrent=settings.max_concurrent_per_endpoint,
        endpoint=str(record.get("endpoint") or ""),  # absent in dead letters from before entries had ids
    )


# -- outcomes ----------------------------------------------------------------

RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})


class Verdict(Enum):
    OK = "ok"
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


def classify(status: int | None) -> Verdict:
    """2xx ok; 5xx, 408, 409, 425, 429 and no answer at all (timeout, connection error) retryable;
    anything else (other 4xx, 3xx: redirects are not followed) permanent."""
    if status is None:
        return Verdict.RETRYABLE
    if 200 <= status < 300:
        return Verdict.OK
    if status >= 500 or status in RETRYABLE_STATUSES:
        return Verdict.RETRYABLE
    return Verdict.PERMANENT


def failure_reason(status: int | None, error: str | None) -> str:
    """A bounded label for metrics and logs: ``timeout``, ``connect``, ``request``, ``http_5xx``, ``http_404``…"""
    if status is None:
        return error or "request"
    if status >= 500:
        return "http_5xx"
    return f"http_{status}"


def endpoint_host(url: str) -> str:
    """What a log line may say about an endpoint: scheme and host only (paths and queries can hold secrets)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def redact_url(url: str) -> str:
    """For operators (the dead-letter CLI): no user info, no query string."""
    parts = urlsplit(url)
    return endpoint_host(url) + parts.path + ("?…" if parts.query else "")
