"""What the console page reads and does, free of Flask and gevent.

Reads: the apps, each app's channels (cluster-wide subscriber counts) and presence members, the
cluster's nodes with their connections, the per-app chart samples. Actions: publish an event
(through ``rest.trigger``, the REST API's own path, so the app's limits, history and webhooks
apply), list and replay webhook dead letters, look up a push publish's status.

Nothing returned here carries an app secret, a signature, a webhook's custom headers or a
device token: views are built field by field.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sockudo.console.stats import StatsHistory
from sockudo.console.tap import EventTap

logger = logging.getLogger(__name__)

SAMPLE_INTERVAL_SECONDS = 1.0
MAX_CHANNELS_LISTED = 1000
MAX_MEMBERS_LISTED = 1000
MAX_DEAD_LETTERS_LISTED = 100


class ConsoleError(Exception):
    """An action the console refuses: ``status`` is the HTTP status for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Console:
    def __init__(self, services: Any, tap: EventTap, runtime: Any, stats: StatsHistory | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.services = services
        self.tap = tap
        self.runtime = runtime
        self.stats = stats or StatsHistory()
        self.clock = clock
        self._sampling = False

    # -- the sampler: runs while a page is open -----------------------------------------

    def page_opened(self) -> None:
        if not self._sampling:
            self._sampling = True
            self.runtime.spawn(self._sample_loop)

    def _sample_loop(self) -> None:
        try:
            while self.tap.watchers:
                self.sample()
                self.runtime.sleep(SAMPLE_INTERVAL_SECONDS)
        finally:
            self._sampling = False

    def sample(self) -> None:
        counts = self.tap.take_message_counts()
        now_ms = int(self.clock() * 1000)
        adapter = self.services.adapter
        apps = self.services.apps.all()
        for app in apps:
            # Cluster-wide counts; with Redis away the adapter answers with this node's (it logs that).
            self.stats.add(app.id, now_ms, adapter.socket_count(app.id), len(adapter.channels(app.id)),
                           counts.get(app.id, 0))
        self.stats.forget({a.id for a in apps})

    # -- reads -----------------------------------------------------------------------

    def apps(self) -> list[dict[str, Any]]:
        return [{"id": a.id, "key": a.key, "enabled": a.enabled, "webhooks": len(a.webhooks),
                 "client_events": a.enable_client_messages} for a in self.services.apps.all()]

    def app(self, app_id: str) -> Any:
        app = self.services.apps.by_id(app_id)
        if app is None:
            raise ConsoleError(404, f"no app {app_id}")
        return app

    def overview(self, app_id: str) -> dict[str, Any]:
        self.app(app_id)
        return {"app": app_id, "samples": self.stats.series(app_id), "cluster": self.cluster(app_id),
                "dropped": self.tap.dropped}

    def channels(self, app_id: str) -> dict[str, Any]:
        self.app(app_id)
        counts, complete = self.services.adapter.channels_checked(app_id)
        names = sorted(counts)[:MAX_CHANNELS_LISTED]
        return {"channels": [{"name": n, "subscribers": counts[n], "presence": n.startswith("presence-")}
                             for n in names],
                "total": len(counts), "complete": complete}

    def members(self, app_id: str, channel: str) -> dict[str, Any]:
        self.app(app_id)
        if not channel.startswith("presence-"):
            raise ConsoleError(400, "members are listed for presence channels only")
        members, complete = self.services.adapter.presence_members_checked(app_id, channel)
        ids = sorted(members)[:MAX_MEMBERS_LISTED]
        return {"channel": channel, "members": [{"user_id": u, "user_info": members[u]} for u in ids],
                "count": len(members), "complete": complete}

    def cluster(self, app_id: str) -> dict[str, Any]:
        """The live nodes with their connections of ``app_id`` (one node without Redis)."""
        adapter = self.services.adapter
        node_id = self.tap.node_id
        per_node = getattr(adapter, "node_connections", None)
        if per_node is not None:
            nodes = per_node([app_id])
        else:
            nodes = {node_id: adapter.socket_count(app_id)}
        return {"this_node": node_id, "driver": self.services.config.adapter_driver,
                "nodes": [{"id": n, "connections": c} for n, c in sorted(nodes.items())]}

    # -- actions -----------------------------------------------------------------------

    def publish(self, app_id: str, body: Any) -> dict[str, Any]:
        """The event creator: ``{"channel" or "channels", "name", "data"}`` as the REST API takes it."""
        from sockudo import rest  # the REST API's own path: its limits, history and webhooks apply
        from sockudo.core.errors import ApiError

        app = self.app(app_id)
        if not app.enabled:
            raise ConsoleError(403, "app is disabled")
        if not isinstance(body, dict):
            raise ConsoleError(400, "the event must be a JSON object")
        event = {k: body[k] for k in ("name", "channel", "channels", "data") if k in body}
        try:
            return rest.trigger(self.services, app, event, None)
        except ApiError as exc:
            raise ConsoleError(exc.status, exc.message) from None

    def _webhook_queue(self) -> Any:
        sink = self.services.events
        queue = getattr(sink, "queue", None)
        if queue is None or getattr(queue, "dead_letters", None) is None:
            raise ConsoleError(404, "webhooks are not enabled on this server")
        return queue

    def dead_letters(self, app_id: str) -> dict[str, Any]:
        from sockudo.webhooks.model import redact_url

        self.app(app_id)
        letters = self._webhook_queue().dead_letters
        records = letters.list(app_id, limit=MAX_DEAD_LETTERS_LISTED)
        view = [{"id": r["id"], "delivery_id": r.get("delivery_id"), "endpoint": r.get("endpoint"),
                 "url": redact_url(str(r.get("url", ""))),
                 "reason": r.get("reason"), "status": r.get("status"), "error": r.get("error"),
                 "attempts": r.get("attempts"), "events": list(r.get("events", [])),
                 "failed_ms": r.get("failed_ms")} for r in records]
        return {"dead_letters": view, "stored": letters.count()}

    def replay_dead_letter(self, app_id: str, letter_id: str) -> dict[str, Any]:
        from sockudo.webhooks.queue import replay_dead_letter

        app = self.app(app_id)
        queue = self._webhook_queue()
        record = queue.dead_letters.get(letter_id)
        if record is None or record.get("app_id") != app_id:
            raise ConsoleError(404, f"no dead letter {letter_id}")
        config = self.services.config
        delivery = replay_dead_letter(queue, record, app.key, app.secret, config.webhooks,
                                      f"{config.redis_prefix}webhooks:", int(self.clock() * 1000))
        self.tap.record(app_id, "webhook", status="replayed", delivery_id=delivery.delivery_id,
                        events=list(delivery.event_names))
        return {"replayed": letter_id, "delivery_id": delivery.delivery_id}

    def push_status(self, app_id: str, publish_id: str) -> dict[str, Any]:
        from sockudo.core.errors import ApiError

        self.app(app_id)
        push = self.services.push
        if push is None:
            raise ConsoleError(404, "push notifications are not enabled on this server")
        try:
            status: dict[str, Any] = _without_tokens(push.status(app_id, publish_id))
            return status
        except ApiError as exc:
            raise ConsoleError(exc.status, exc.message) from None


def _without_tokens(value: Any) -> Any:
    """A status view never needs a device token; strip any field that could hold one."""
    if isinstance(value, dict):
        return {k: _without_tokens(v) for k, v in value.items() if "token" not in k.lower()}
    if isinstance(value, list):
        return [_without_tokens(v) for v in value]
    return value

