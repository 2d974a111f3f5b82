"""Sending one delivery attempt, deciding what happens next, and keeping dead letters.

Shared by the RQ job (``workers.webhooks``) and the server's in-process queue, so both
follow the same policy: 2xx done; retryable failures wait ``1, 2, 4 … 60`` s
until the next wait would pass the budget (≈5 min); permanent failures stop at once; a
delivery that stops without success becomes a **dead letter** with what is needed to
replay it (never the signature: a replay is signed again).

HTTP is the standard library (``http.client``): no redirects followed, no proxy settings
from the environment, keep-alive connections reused across attempts (``ConnectionPool``), and
the endpoint's timeout as one deadline for the whole attempt. Nothing here imports gevent or
RQ; under the server's and the worker's monkey-patching the sockets cooperate.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import os
import select
import socket
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from sockudo.webhooks.metrics import UNKNOWN_EVENT_TYPE, WebhookMetrics
from sockudo.webhooks.model import (
    EVENT_TYPES,
    Delivery,
    Verdict,
    classify,
    endpoint_host,
    failure_reason,
    inflight_keys,
    redact_url,
)

logger = logging.getLogger(__name__)

USER_AGENT = "sockudo-webhooks/1"
MAX_RESPONSE_BYTES = 64 * 1024

DELIVERED = "delivered"
RETRY = "retry"
DEAD = "dead"
DEFERRED = "deferred"  # no attempt: the endpoint's in-flight slots were all taken

REASON_PERMANENT = "permanent_failure"
REASON_EXHAUSTED = "retries_exhausted"
REASON_WORKER = "worker_failure"


# -- HTTP ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpResult:
    status: int | None  # None: no HTTP answer
    error: str | None  # timeout | connect | request, when status is None
    seconds: float
    retry_after_ms: int | None = None  # the answer's Retry-After (429/503), in ms


Sender = Callable[[Delivery], HttpResult]

#: Idle keep-alive connections kept per (scheme, host, port) for the next attempt.
IDLE_PER_ORIGIN = 32


class _DeadlineSocket:
    """A connected socket whose every send and receive may only use the time left until one
    deadline: a socket timeout applies per operation, so a peer trickling one byte at a time
    would otherwise stretch an attempt without end."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = math.inf  # time.monotonic() value; set per attempt

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("webhook attempt deadline passed")
        self.sock.settimeout(left)

    def sendall(self, data: bytes) -> None:
        self._arm()
        self.sock.sendall(data)

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        self._arm()
        return self.sock.recv_into(buffer, nbytes)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        self.sock.close()

    def __getattr__(self, name: str) -> Any:  # setsockopt, fileno, …
        return getattr(self.sock, name)


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket) -> None:
        self.sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self.sock.recv_into(buffer)


def _tls_handshake(context: ssl.SSLContext, raw: socket.socket, host: str, deadline: float) -> ssl.SSLSocket:
    """The TLS handshake within the deadline (non-blocking, so a trickled handshake is bounded too)."""
    tls = context.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False)
    tls.setblocking(False)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            tls.close()
            raise TimeoutError("webhook attempt deadline passed during the TLS handshake")
        try:
            tls.do_handshake()
            return tls
        except ssl.SSLWantReadError:
            select.select([tls], [], [], left)
        except ssl.SSLWantWriteError:
            select.select([], [tls], [], left)


class _Connection(http.client.HTTPConnection):
    """One keep-alive connection whose every attempt is bounded by a total deadline."""

    tls_context: ssl.SSLContext | None = None
    deadline = math.inf

    def set_deadline(self, deadline: float) -> None:
        self.deadline = deadline
        if isinstance(self.sock, _DeadlineSocket):
            self.sock.deadline = deadline

    def connect(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("webhook attempt deadline passed")
        raw = socket.create_connection((self.host, self.port), left)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls_context is not None:
            try:
                raw = _tls_handshake(self.tls_context, raw, self.host, self.deadline)
            except BaseException:
                raw.close()
                raise
        sock = _DeadlineSocket(raw)
        sock.deadline = self.deadline
        self.sock = sock


class ConnectionPool:
    """Idle keep-alive connections per origin, reused by later attempts to the same endpoint
    (this process's long-lived HTTP client: no handshake per delivery). Only a connection
    whose answer was read to its end and that the server kept open goes back."""

    def __init__(self, idle_per_origin: int = IDLE_PER_ORIGIN) -> None:
        self.idle_per_origin = idle_per_origin
        self._idle: dict[tuple[str, str, int | None], list[_Connection]] = {}
        self._pid = os.getpid()
        self._tls: ssl.SSLContext | None = None

    def take(self, scheme: str, host: str, port: int | None) -> tuple[_Connection, bool]:
        """A connection to the origin and whether it was reused."""
        if self._pid != os.getpid():  # forked: the parent's sockets are not ours
            self._idle = {}
            self._pid = os.getpid()
        idle = self._idle.get((scheme, host, port))
        if idle:
            return idle.pop(), True
        conn = _Connection(host, port or (443 if scheme == "https" else 80))
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            conn.tls_context = self._tls
        return conn, False

    def give_back(self, scheme: str, host: str, port: int | None, conn: _Connection) -> None:
        idle = self._idle.setdefault((scheme, host, port), [])
        if len(idle) < self.idle_per_origin:
            conn.set_deadline(math.inf)
            idle.append(conn)
        else:
            conn.close()

    def clear(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


_pool = ConnectionPool()


def post(delivery: Delivery, pool: ConnectionPool | None = None) -> HttpResult:
    """One POST of the delivery's exact body bytes with its headers; never raises for network
    trouble. The endpoint's timeout bounds the whole attempt — connect, TLS, sending, the
    status line, headers and body — however slowly the other side trickles bytes."""
    pool = _pool if pool is None else pool
    parts = urlsplit(delivery.url)
    body = delivery.body.encode("utf-8")
    headers = {"User-Agent": USER_AGENT}
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
    headers.update(delivery.headers)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    origin = (parts.scheme, parts.hostname or "", parts.port)
    started = time.perf_counter()
    deadline = time.monotonic() + delivery.timeout_ms / 1000.0
    while True:
        conn, reused = pool.take(*origin)
        conn.set_deadline(deadline)
        keep = False
        try:
            if conn.sock is None:
                try:
                    conn.connect()
                except TimeoutError:
                    return HttpResult(None, "timeout", time.perf_counter() - started)
                except OSError:
                    return HttpResult(None, "connect", time.perf_counter() - started)
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            response.read(MAX_RESPONSE_BYTES)
            keep = response.isclosed() and not response.will_close
            return HttpResult(response.status, None, time.perf_counter() - started,
                              _retry_after_ms(response.getheader("Retry-After")))
        except TimeoutError:
            return HttpResult(None, "timeout", time.perf_counter() - started)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            if reused:  # the server closed the idle connection first: try once on a fresh one
                continue
            return HttpResult(None, "request", time.perf_counter() - started)
        except (OSError, http.client.HTTPException):
            return HttpResult(None, "request", time.perf_counter() - started)
        finally:
            if keep:
                pool.give_back(*origin, conn)
            else:
                conn.close()


def _retry_after_ms(value: str | None) -> int | None:
    """Retry-After in delta-seconds (RFC 9110 §10.2.3); an HTTP-date is taken as "no hint"."""
    if not value or not value.strip().isdigit():
        return None
    return int(value.strip()) * 1000


# -- one attempt's outcome -------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptResult:
    outcome: str  # delivered | retry | dead | deferred
    attempt: int  # 1 for the first try
    status: int | None
    error: str | None
    seconds: float
    reason: str | None = None  # failure label (failure_reason) when not delivered
    dead_reason: str | None = None  # permanent_failure | retries_exhausted | worker_failure
    retry_in_ms: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> AttemptResult:
        return cls(**{k: raw.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]


def decide(delivery: Delivery, attempt: int, first_attempt_ms: float, now_ms: float, http: HttpResult) -> AttemptResult:
    """What to do after attempt ``attempt`` (1 = the first) given its HTTP result."""
    verdict = classify(http.status)
    if verdict is Verdict.OK:
        return AttemptResult(DELIVERED, attempt, http.status, None, http.seconds)
    reason = failure_reason(http.status, http.error)
    if verdict is Verdict.PERMANENT:
        return AttemptResult(DEAD, attempt, http.status, http.error, http.seconds, reason, REASON_PERMANENT)
    elapsed_ms = now_ms - first_attempt_ms
    delay = delivery.retry.next_delay_ms(attempt, elapsed_ms)
    if delay is None:
        return AttemptResult(DEAD, attempt, http.status, http.error, http.seconds, reason, REASON_EXHAUSTED)
    if http.retry_after_ms is not None and http.retry_after_ms > delay:
        # The endpoint asked for a slower pace (429/503 Retry-After): wait as asked, up to the
        # longest backoff, when that still fits in the retry budget (else the policy's wait).
        asked = max(delay, min(http.retry_after_ms, delivery.retry.max_backoff_ms))
        if elapsed_ms + asked <= delivery.retry.max_elapsed_time_ms:
            delay = asked
    return AttemptResult(RETRY, attempt, http.status, http.error, http.seconds, reason, retry_in_ms=delay)


def console_event(delivery: Delivery, result: AttemptResult) -> dict[str, Any]:
    """One attempt as the console's event log shows it: no body, no headers, the URL redacted."""
    return {"app": delivery.app_id, "kind": "webhook", "status": result.outcome, "http_status": result.status,
            "error": result.error, "attempt": result.attempt, "delivery_id": delivery.delivery_id,
            "events": list(delivery.event_names), "endpoint": delivery.endpoint or None,
            "url": redact_url(delivery.url)}


def log_attempt(delivery: Delivery, result: AttemptResult) -> None:
    """One line per failed attempt: app, status, attempt, delivery id. Never the body, the
    URL's path or query, headers or signatures."""
    if result.outcome == DELIVERED:
        logger.debug("webhook delivered app_id=%s delivery_id=%s attempt=%d", delivery.app_id, delivery.delivery_id,
                     result.attempt)
        return
    fields = {
        "app_id": delivery.app_id, "delivery_id": delivery.delivery_id, "attempt": result.attempt,
        "status": result.status, "error_class": result.error, "endpoint": endpoint_host(delivery.url),
        "endpoint_id": delivery.endpoint_label, "event_count": len(delivery.event_names),
        "elapsed_ms": round(result.seconds * 1000),
    }
    summary = (f"app_id={delivery.app_id} status={result.status if result.status is not None else '-'} "
               f"error={result.error or '-'} attempt={result.attempt} delivery_id={delivery.delivery_id} "
               f"endpoint={fields['endpoint']} endpoint_id={delivery.endpoint_label}")
    if result.outcome == RETRY:
        fields["retry_delay_ms"] = result.retry_in_ms
        logger.warning("webhook delivery failed, retrying in %d ms: %s", result.retry_in_ms or 0, summary, extra=fields)
    else:
        fields["reason"] = result.dead_reason
        logger.error("webhook delivery failed, dead-lettered (%s): %s", result.dead_reason, summary, extra=fields)


def event_types(delivery: Delivery) -> list[str]:
    """The delivery's event names as bounded metric labels (one entry per event)."""
    return [name if name in EVENT_TYPES else UNKNOWN_EVENT_TYPE for name in delivery.event_names] or [
        UNKNOWN_EVENT_TYPE]


def record_dead_lettered(metrics: WebhookMetrics | None, delivery: Delivery, reason: str) -> None:
    """``sockudo_webhooks_dead_lettered_total``: one per event of the delivery."""
    if metrics is None:
        return
    for name in event_types(delivery):
        metrics.dead_lettered.labels(delivery.app_id, delivery.endpoint_label, name, reason).inc()


def record_metrics(metrics: WebhookMetrics | None, delivery: Delivery, result: AttemptResult,
                   now_ms: float | None = None) -> None:
    if metrics is None:
        return
    app_id = delivery.app_id
    endpoint = delivery.endpoint_label
    if result.outcome == DEFERRED:
        metrics.deferred.labels(app_id, endpoint).inc()
        return
    if result.status is not None or result.error is not None:
        metrics.attempt_seconds.labels(app_id).observe(result.seconds)
    names = event_types(delivery)
    if result.outcome == DELIVERED:
        for name in names:
            metrics.delivered.labels(app_id, endpoint, name).inc()
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        metrics.delivery_delay_seconds.labels(app_id).observe(max(0.0, (now_ms - delivery.created_ms) / 1000))
        return
    for name in names:
        if result.reason is not None:
            metrics.failed.labels(app_id, endpoint, name, result.reason).inc()
        if result.outcome == RETRY:
            metrics.retried.labels(app_id, endpoint, name).inc()
    if result.outcome == DEAD:
        record_dead_lettered(metrics, delivery, result.dead_reason or REASON_WORKER)


# -- per-endpoint in-flight slots ------------------------------------------------------------

_ACQUIRE_LUA = """
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if not holder or (ARGV[3] ~= '' and string.sub(holder, 1, string.len(ARGV[3])) == ARGV[3]) then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    return i - 1
  end
end
return -1
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class EndpointSlots:
    """At most ``slots`` attempts in flight per endpoint, across every worker.

    An attempt holds one lease key ``{prefix}inflight:<sha1(url)>:<app id>:<endpoint id>:<slot>``
    (``inflight_keys``; ``SET NX PX``, taken by one script call over all the endpoint's slots).
    Its TTL is the attempt's longest possible run (the job timeout + slack), so a slot held by a
    killed worker frees itself; a finished attempt releases it at once (compare-and-delete:
    never someone else's slot).

    Tokens start with ``owner`` (the RQ job id): a slot still held under the same owner was
    left by this job's own earlier attempt, whose work-horse died (one job never runs twice at
    once), so it is taken over instead of blocking the job's retry until it expires."""

    def __init__(self, client: Any) -> None:
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    def acquire(self, delivery: Delivery, slots: int, token: str, ttl_ms: int, owner: str = "") -> str | None:
        """The slot key taken, or None when all ``slots`` are held. ``token`` must start with ``owner``."""
        keys = inflight_keys(delivery, max(1, slots))
        index = int(self._acquire(keys=keys, args=[token, max(1, int(ttl_ms)), owner]))
        return keys[index] if index >= 0 else None

    def release(self, key: str, token: str) -> bool:
        return bool(self._release(keys=[key], args=[token]))


# -- dead letters ------------------------------------------------------------------------------


def dead_letter_record(delivery: Delivery, reason: str, attempts: int, first_attempt_ms: float | None,
                       now_ms: float, status: int | None = None, error: str | None = None) -> dict[str, Any]:
    """Everything needed to list and replay a delivery; no signature (replays are signed again)."""
    return {
        "id": uuid.uuid4().hex,
        "delivery_id": delivery.delivery_id,
        "app_id": delivery.app_id,
        "url": delivery.url,
        "endpoint": delivery.endpoint,
        "reason": reason,
        "status": status,
        "error": error,
        "attempts": attempts,
        "events": list(delivery.event_names),
        "body": delivery.body,
        "custom_headers": [list(h) for h in delivery.custom_headers],
        "timeout_ms": delivery.timeout_ms,
        "created_ms": delivery.created_ms,
        "first_attempt_ms": int(first_attempt_ms) if first_attempt_ms is not None else None,
        "failed_ms": int(now_ms),
    }


class DeadLetters(Protocol):
    def add(self, record: dict[str, Any]) -> None: ...
    def list(self, app_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]: ...
    def get(self, record_id: str) -> dict[str, Any] | None: ...
    def remove(self, record_id: str) -> bool: ...
    def count(self) -> int: ...


class MemoryDeadLetters:
    """The embedded mode's store: lost when the process stops."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def add(self, record: dict[str, Any]) -> None:
        self._records[record["id"]] = record
        while len(self._records) > self.limit:
            self._records.popitem(last=False)

    def list(self, app_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        records = [r for r in reversed(self._records.values()) if app_id is None or r["app_id"] == app_id]
        return records[:limit]

    def get(self, record_id: str) -> dict[str, Any] | None:
        return self._records.get(record_id)

    def remove(self, record_id: str) -> bool:
        return self._records.pop(record_id, None) is not None

    def count(self) -> int:
        return len(self._records)


class RedisDeadLetters:
    """``{prefix}dead_letters`` (sorted set: id by failure time) and ``{prefix}dead_letter_data``
    (hash: id -> JSON record). The newest ``limit`` are kept."""

    def __init__(self, client: Any, prefix: str, limit: int = 10_000) -> None:
        self.client = client
        self.index_key = f"{prefix}dead_letters"
        self.data_key = f"{prefix}dead_letter_data"
        self.limit = limit

    def add(self, record: dict[str, Any]) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.data_key, record["id"], json.dumps(record, separators=(",", ":")))
        pipe.zadd(self.index_key, {record["id"]: record["failed_ms"]})
        pipe.zcard(self.index_key)
        size = pipe.execute()[-1]
        if size > self.limit:
            stale = self.client.zrange(self.index_key, 0, size - self.limit - 1)
            if stale:
                pipe = self.client.pipeline(transaction=True)
                pipe.zrem(self.index_key, *stale)
                pipe.hdel(self.data_key, *stale)
                pipe.execute()

    def list(self, app_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        start = 0
        page = max(limit, 100)
        while len(out) < limit:
            ids = self.client.zrevrange(self.index_key, start, start + page - 1)
            if not ids:
                break
            for raw in self.client.hmget(self.data_key, ids):
                if raw is None:
                    continue
                record = json.loads(raw)
                if app_id is None or record.get("app_id") == app_id:
                    out.append(record)
            start += page
        return out[:limit]

    def get(self, record_id: str) -> dict[str, Any] | None:
        raw = self.client.hget(self.data_key, record_id)
        return json.loads(raw) if raw is not None else None

    def remove(self, record_id: str) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.index_key, record_id)
        pipe.hdel(self.data_key, record_id)
        return bool(pipe.execute()[0])

    def count(self) -> int:
        return int(self.client.zcard(self.index_key))
