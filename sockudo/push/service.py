"""The push API's logic, without Flask: devices, subscriptions, credentials,
admission of publishes, status, dead letters; plus the maintenance tick (lease reaper).

``build_push`` is the composition used by the server (and, with ``for_worker=True``, by RQ jobs):
Redis store + RQ queue ``push`` when Redis is configured, else memory store + in-process queue.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from sockudo.core import keys
from sockudo.core.errors import ApiError
from sockudo.push import model
from sockudo.push import status as st
from sockudo.push.crypto import seal
from sockudo.push.dispatcher import Dispatcher, credential_aad
from sockudo.push.metrics import PushMetrics, RecordingMetrics
from sockudo.push.providers import Executors, validate_credentials
from sockudo.push.settings import PushSettings, uses_redis

logger = logging.getLogger("sockudo_push")
audit = logging.getLogger("sockudo_push_audit")

MAX_BATCH_PUBLISH = 100


def encode_cursor(value: str | int | None) -> str | None:
    if value is None:
        return None
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str | None) -> Any:
    if not cursor:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError):
        raise model.bad("cursor is not valid") from None


def parse_limit(value: str | None) -> int:
    if value is None or value == "":
        return 100
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise model.bad("limit must be 1–1000")
    return int(value)


def unavailable(reason: str) -> ApiError:
    return ApiError(503, "service_unavailable", f"push admission unavailable: {reason}")


class PushService:
    def __init__(
        self,
        settings: PushSettings,
        store: Any,
        queue: Any,
        dispatcher: Dispatcher,
        metrics: PushMetrics | RecordingMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.clock = clock

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- devices --

    def register_device(self, app_id: str, body: Any) -> dict[str, Any]:
        device = model.parse_device(
            app_id, body, now_ms=self.now_ms(), allow_insecure=self.settings.allow_insecure_endpoints
        )
        change = self.store.put_device(app_id, device, model.device_changed)
        stored = self.store.get_device(app_id, device["id"]) or device
        logger.info(
            "push device registered",
            extra={
                "app_id": app_id,
                "device_id": device["id"],
                "provider": device["provider"],
                "token_hash": device["tokenHash"],
                "change": change,
            },
        )
        return {"change": change, "tokenHash": device["tokenHash"], "device": model.device_view(stored)}

    def get_device(self, app_id: str, device_id: str) -> dict[str, Any]:
        device = self.store.get_device(app_id, device_id)
        if device is None:
            raise ApiError(404, "not_found", "device not found")
        return model.device_view(device)

    def list_devices(self, app_id: str, args: Mapping[str, str]) -> dict[str, Any]:
        limit = parse_limit(args.get("limit"))
        after = decode_cursor(args.get("cursor"))
        items, next_after = self.store.list_devices(app_id, after, limit, args.get("clientId") or None)
        return {
            "items": [model.device_view(d) for d in items],
            "next_cursor": encode_cursor(next_after),
            "has_more": next_after is not None,
        }

    def delete_device(self, app_id: str, device_id: str) -> None:
        if not self.store.delete_device(app_id, device_id):
            raise ApiError(404, "not_found", "device not found")

    def delete_client_devices(self, app_id: str, client_id: str | None) -> dict[str, Any]:
        if not client_id:
            raise model.bad("clientId is required to delete registrations in bulk")
        return {"deleted": self.store.delete_client_devices(app_id, client_id), "consistency": "eventual"}

    # -- channel subscriptions --

    def subscribe(self, app_id: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise model.bad("body must be a JSON object")
        channel = model.parse_channel(body.get("channel"))
        device_id = body.get("deviceId")
        if body.get("clientId") is not None and device_id is None:
            raise model.bad("client-scoped subscriptions are not supported; subscribe each device (deviceId)")
        if not isinstance(device_id, str) or not device_id:
            raise model.bad("deviceId is required")
        if not self.store.subscribe(app_id, channel, device_id):
            raise ApiError(404, "not_found", "device not found")
        return _subscription_view(app_id, channel, device_id, self.store.get_device(app_id, device_id))

    def list_subscriptions(self, app_id: str, args: Mapping[str, str]) -> dict[str, Any]:
        limit = parse_limit(args.get("limit"))
        after = decode_cursor(args.get("cursor"))
        channel = args.get("channel") or None
        if channel is not None:
            model.parse_channel(channel)
        pairs, next_after = self.store.list_subscriptions(app_id, channel, args.get("deviceId") or None, after, limit)
        devices = self.store.get_devices(app_id, [d for _, d in pairs]) if pairs else []
        return {
            "items": [_subscription_view(app_id, c, d, device) for (c, d), device in zip(pairs, devices, strict=True)],
            "next_cursor": encode_cursor(next_after),
            "has_more": next_after is not None,
        }

    def unsubscribe(self, app_id: str, args: Mapping[str, str]) -> dict[str, Any]:
        channel, device_id = args.get("channel") or None, args.get("deviceId") or None
        if channel is None and device_id is None:
            raise model.bad("channel or deviceId is required")
        if channel is not None:
            model.parse_channel(channel)
        return {"deleted": self.store.unsubscribe(app_id, channel, device_id)}

    def list_channels(self, app_id: str, args: Mapping[str, str]) -> dict[str, Any]:
        limit = parse_limit(args.get("limit"))
        names, next_after = self.store.list_channels(app_id, decode_cursor(args.get("cursor")), limit)
        return {"items": names, "next_cursor": encode_cursor(next_after), "has_more": next_after is not None}

    # -- credentials (write-only) --

    def put_credentials(self, app_id: str, provider: str, body: Any) -> dict[str, Any]:
        provider = model.provider_name(provider)
        if not self.settings.credentials_key:
            raise model.bad("credentials cannot be stored: PUSH_CREDENTIALS_KEY (push.credentials_key) is not set")
        material = validate_credentials(provider, body)
        sealed = seal(self.settings.credentials_key, json.dumps(material).encode(), credential_aad(app_id, provider))
        version = self.store.put_credential(app_id, provider, sealed, self.now_ms())
        self.metrics.inc("sockudo_push_credential_writes", {"provider": provider, "app": app_id})
        audit.info(
            "push credentials written",
            extra={"app_id": app_id, "action": "credentialWrite", "subject": f"{provider}:v{version}"},
        )
        return {"appId": app_id, "credentialId": provider, "provider": provider, "version": version}

    def list_credentials(self, app_id: str) -> dict[str, Any]:
        items = []
        for provider in model.PROVIDERS:
            entry = self.store.get_credential(app_id, provider)
            if entry is not None:
                items.append(
                    {
                        "appId": app_id,
                        "credentialId": provider,
                        "provider": provider,
                        "version": entry["version"],
                        "updatedAtMs": entry["updatedAtMs"],
                    }
                )
        return {"items": items}

    # -- publish --

    def _recipients(self, app_id: str, recipients: tuple[tuple[str, str], ...]) -> tuple[int, set[str]]:
        expected = 0
        providers: set[str] = set()
        for kind, value in recipients:
            if kind == "device":
                device = self.store.get_device(app_id, value)
                if device is not None:
                    expected += 1
                    providers.add(device["provider"])
            elif kind == "client":
                ids = self.store.client_devices(app_id, value)
                expected += len(ids)
                providers.update(d["provider"] for d in self.store.get_devices(app_id, ids) if d)
            else:
                expected += self.store.channel_count(app_id, value)
                providers.update(self.store.channel_providers(app_id, value))
        return expected, providers

    def publish(self, app_id: str, body: Any) -> dict[str, Any]:
        started = time.perf_counter()
        now = self.now_ms()
        try:
            request = model.parse_publish(body, now_ms=now)
        except ApiError:
            self.metrics.inc("sockudo_push_publish_rejected", {"app": app_id, "reason": "invalid_input"})
            raise
        try:
            expected, providers = self._recipients(app_id, request.recipients)
            self._check_credentials(app_id, providers)
        except ApiError:
            self.metrics.inc("sockudo_push_publish_rejected", {"app": app_id, "reason": "service_unavailable"})
            raise
        except Exception as exc:
            self.metrics.inc("sockudo_push_publish_rejected", {"app": app_id, "reason": "service_unavailable"})
            raise unavailable("push store unreachable") from exc
        plan_id = keys.join(app_id, request.publish_id, "plan")
        record = st.new_record(
            app_id,
            request.publish_id,
            intent_hash=request.intent_hash,
            expected=expected,
            now_ms=now,
            not_before_ms=request.not_before_ms,
            expires_at_ms=request.expires_at_ms,
        )
        plan = {
            "recipients": [list(r) for r in request.recipients],
            "rendered": request.rendered,
            "notBeforeMs": request.not_before_ms,
            "expiresAtMs": request.expires_at_ms,
        }
        try:
            plan_job = (
                plan_id,
                {"kind": "plan", "app": app_id, "pid": request.publish_id, "dueMs": now},
                now + self.settings.lease_ms,
            )
            existing = self.store.create_status(
                app_id, request.publish_id, record, plan, self.settings.status_ttl_s, plan_job
            )
        except Exception as exc:
            self.metrics.inc("sockudo_push_publish_rejected", {"app": app_id, "reason": "service_unavailable"})
            raise unavailable("push store unreachable") from exc
        if existing is not None:
            if existing.get("intentHash") != request.intent_hash:
                self.metrics.inc("sockudo_push_publish_rejected", {"app": app_id, "reason": "conflict"})
                raise ApiError(
                    409, "conflict", f"publishId {request.publish_id!r} was already used with a different request"
                )
            self.metrics.inc("sockudo_push_duplicate_suppressed", {"app": app_id})
            return self._accepted(request, existing, duplicate=True)
        self.dispatcher.enqueue(plan_id, plan_job[1])
        elapsed = time.perf_counter() - started
        self.metrics.inc("sockudo_push_publish_accepted", {"app": app_id, "result": "accepted"})
        self.metrics.observe("sockudo_push_publish_acceptance_duration_seconds", {"app": app_id}, elapsed)
        self.metrics.observe("sockudo_push_fanout_size", {"app": app_id}, expected)
        logger.info(
            "push accepted",
            extra={
                "app_id": app_id,
                "publish_id": request.publish_id,
                "expected_recipients": expected,
                "not_before_ms": request.not_before_ms,
                "expires_at_ms": request.expires_at_ms,
            },
        )
        return self._accepted(request, record, duplicate=False)

    def _check_credentials(self, app_id: str, providers: set[str]) -> None:
        missing = []
        for provider in sorted(providers):
            if self.store.get_credential(app_id, provider) is None:
                missing.append(provider)
        if missing:
            raise unavailable(
                f"no {', '.join(missing)} credentials for app {app_id} "
                f"(POST /apps/{app_id}/push/credentials/{missing[0]})"
            )
        if providers and not self.settings.credentials_key:
            raise unavailable("PUSH_CREDENTIALS_KEY is not configured, stored credentials cannot be read")

    def _accepted(self, request: model.PublishRequest, record: Mapping[str, Any], *, duplicate: bool) -> dict[str, Any]:
        state = str(record.get("state") or st.QUEUED)
        response: dict[str, Any] = {
            "publishId": request.publish_id,
            "publish_id": request.publish_id,
            "status": "accepted" if state == st.QUEUED else state,
            "expectedRecipients": int(record.get("expectedRecipients") or 0),
            "fanoutRegime": record.get("fanoutRegime") or "fastPath",
            "renderedPayloads": model.rendered_view(request),
        }
        if duplicate:
            response["duplicate"] = True
        return response

    def batch_publish(self, app_id: str, body: Any) -> dict[str, Any]:
        items = body.get("items") if isinstance(body, dict) else body
        if not isinstance(items, list) or not items:
            raise model.bad("body must be a non-empty list of publish requests")
        if len(items) > MAX_BATCH_PUBLISH:
            raise model.bad(f"at most {MAX_BATCH_PUBLISH} publishes per batch")
        for i, item in enumerate(items):  # validate all first: a bad item fails the batch before any is accepted
            try:
                model.parse_publish(item, now_ms=self.now_ms())
            except ApiError as exc:
                raise model.bad(f"items[{i}]: {exc.message}") from None
        return {"items": [self.publish(app_id, item) for item in items]}

    # -- status --

    def status(self, app_id: str, publish_id: str) -> dict[str, Any]:
        record = self.store.get_status(app_id, publish_id)
        if record is None:
            raise ApiError(404, "not_found", "no publish with this id (or its record has expired)")
        undelivered, duplicates = self.store.status_detail(app_id, publish_id)
        # Deliveries are keyed by the device id as a key segment (sockudo/core/keys.py): show the id.
        undelivered = [{**item, "deviceId": keys.unsegment(item["deviceId"])} for item in undelivered]
        duplicates = [keys.unsegment(key) for key in duplicates]
        return st.public_view(record, undelivered=undelivered, possible_duplicates=duplicates)

    # -- dead letters --

    def list_dead_letters(self, app_id: str, args: Mapping[str, str]) -> dict[str, Any]:
        limit = parse_limit(args.get("limit"))
        bounds: list[int | None] = []
        for key in ("sinceMs", "untilMs"):
            value = args.get(key)
            if value in (None, ""):
                bounds.append(None)
            elif not str(value).isdigit():
                raise model.bad(f"{key} must be milliseconds since the epoch")
            else:
                bounds.append(int(value))
        if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
            raise model.bad("sinceMs must not be after untilMs")
        provider = model.provider_name(args["provider"]) if args.get("provider") else None
        offset = decode_cursor(args.get("cursor")) or 0
        if not isinstance(offset, int) or offset < 0:
            raise model.bad("cursor is not valid")
        items, more = self.store.list_dead_letters(app_id, bounds[0], bounds[1], provider, offset, limit)
        return {"items": items, "next_cursor": encode_cursor(offset + len(items)) if more else None, "has_more": more}

    def replay_dead_letter(self, app_id: str, letter_id: str) -> dict[str, Any]:
        letter = self.store.get_dead_letter(app_id, letter_id)
        if letter is None:
            raise ApiError(404, "not_found", "dead letter not found")
        if not letter.get("replayable") or letter.get("replayState") in ("queued", "succeeded"):
            raise model.bad(f"dead letter is not replayable (replayState: {letter.get('replayState')})")
        device = self.store.get_device(app_id, letter["key"])
        if device is None:
            self.store.update_dead_letter(app_id, letter_id, {"replayable": False, "replayReason": "device_not_found"})
            raise model.bad("dead letter is not replayable: the device no longer exists")
        if self.store.get_plan(app_id, letter["publishId"]) is None:
            raise model.bad("dead letter is not replayable: the publish record has expired")
        count = int(letter.get("replayCount") or 0) + 1
        self.store.update_dead_letter(app_id, letter_id, {"replayState": "queued", "replayCount": count})
        self.store.bump(app_id, letter["publishId"], "replayed")
        self.dispatcher.submit(
            keys.join(app_id, letter["publishId"], "replay", letter_id, str(count)),
            {
                "kind": "dispatch",
                "app": app_id,
                "pid": letter["publishId"],
                "dueMs": self.now_ms(),
                "items": [[letter["key"], 1, device["provider"], letter_id]],
            },
        )
        self.metrics.inc(
            "sockudo_queue_dead_letter_replayed", {"backend": self.queue.backend, "queue": self.settings.queue_name}
        )
        audit.info(
            "push dead letter replayed", extra={"app_id": app_id, "action": "deadLetterReplay", "subject": letter_id}
        )
        return {"deadLetterId": letter_id, "replayed": True, "publishId": letter["publishId"], "replayCount": count}

    # -- maintenance --

    def tick(self) -> None:
        if self.store.durable:
            self.dispatcher.reap()

    def queue_stats(self) -> dict[str, tuple[int, float]]:
        return dict(self.store.lease_stats(self.now_ms()))


def build_push(
    config: Any,
    metrics: PushMetrics | RecordingMetrics | None = None,
    *,
    registry: Any = None,
    client: Any = None,
    executor: Executors | None = None,
) -> PushService | None:
    """Compose push from the config; None when ``[push] enabled = false``. ``executor`` makes
    the provider clients' per-provider executors (default: thread pools; the pooled worker
    passes greenlet pools)."""
    settings: PushSettings = config.push
    if not settings.enabled:
        return None
    if metrics is None:
        from prometheus_client import CollectorRegistry

        metrics = PushMetrics(registry if registry is not None else CollectorRegistry())
        metrics.prepare([app.id for app in config.apps])
    from sockudo.push.providers import MemoryTokenCache, ProviderClients, RedisTokenCache
    from sockudo.redis import RedisClients, queue_configured

    queue: Any
    if uses_redis(settings, queue_configured(config)):
        from sockudo.push.queue import RqPushQueue
        from sockudo.push.redis_store import RedisStore

        if client is None:
            client = RedisClients(config).queue  # the queue's Redis: RQ needs one Redis, not the cluster
        conflict_metrics = metrics

        def on_conflict(component: str) -> None:
            conflict_metrics.inc("sockudo_push_status_cas_conflicts", {"component": component})

        store: Any = RedisStore(
            client,
            settings.redis_prefix,
            settings.status_ttl_s,
            on_conflict,
            delivery_ttl_s=settings.retry.max_elapsed_secs + 2 * 86_400,
        )
        queue = RqPushQueue(client, settings.queue_name)
        tokens: Any = RedisTokenCache(client, settings.redis_prefix, settings.credentials_key)
    else:
        from sockudo.push.queue import InProcessQueue
        from sockudo.push.store import MemoryStore

        store = MemoryStore()
        tokens = MemoryTokenCache()
        queue = None
    dispatcher = Dispatcher(
        settings, store, queue, lambda: ProviderClients.for_process(settings, tokens, executor), metrics
    )
    if queue is None:
        queue = InProcessQueue(dispatcher.run)
        dispatcher.queue = queue
    return PushService(settings, store, queue, dispatcher, metrics)


def _subscription_view(app_id: str, channel: str, device_id: str, device: Mapping[str, Any] | None) -> dict[str, Any]:
    """A channel subscription as the API shows it: the device's client id,
    provider and token hash beside the channel — never the token."""
    device = device or {}
    return {
        "appId": app_id,
        "channel": channel,
        "deviceId": device_id,
        "clientId": device.get("clientId"),
        "provider": device.get("provider"),
        "tokenHash": device.get("tokenHash"),
    }
