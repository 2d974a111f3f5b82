"""``python -m sockudo webhooks dead-letters list|replay``: look at and resend dead letters.

Dead letters live in Redis (``{redis prefix}webhooks:dead_letters``); in the embedded mode
(no Redis) they are in the server's memory and this command cannot see them.

``replay`` signs each body again with the app's secret from today's config (so a rotated
secret is fine), refreshes ``time_ms`` (SDK validators refuse bodies older than 5 minutes),
keeps the delivery id (receivers dedupe on it), and enqueues it with a fresh retry budget.
The dead letter is removed once the delivery is enqueued; if it fails again, a new one is
written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

from sockudo.config import Config, load_config
from sockudo.core.errors import ConfigError
from sockudo.webhooks.model import redact_url
from sockudo.webhooks.queue import replay_dead_letter


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sockudo webhooks", description="Webhook dead letters")
    sub = parser.add_subparsers(dest="group", required=True)
    dead = sub.add_parser("dead-letters", help="list or replay dead letters")
    actions = dead.add_subparsers(dest="action", required=True)
    for name, text in (("list", "list dead letters, newest first"), ("replay", "enqueue dead letters again")):
        p = actions.add_parser(name, help=text)
        p.add_argument("--config", help="TOML config file (default: $SOCKUDO_CONFIG)")
        p.add_argument("--app", help="only this app id")
        p.add_argument("--id", action="append", dest="ids", help="only this dead letter id (repeatable)")
        if name == "list":
            p.add_argument("--limit", type=int, default=100)
            p.add_argument("--json", action="store_true", help="one JSON object per line (body included)")
        else:
            p.add_argument("--all", action="store_true", help="replay every dead letter (of --app, if given)")
    return parser


def _store(config: Config) -> Any:
    from sockudo.redis import RedisClients
    from sockudo.webhooks.queue import RqQueue

    return RqQueue(RedisClients(config).queue, f"{config.redis_prefix}webhooks:",
                   dead_letter_limit=config.webhooks.dead_letter_limit)


def _when(ms: Any) -> str:
    if not isinstance(ms, (int, float)):
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config or os.environ.get("SOCKUDO_CONFIG") or None)
    except ConfigError as exc:
        print(f"sockudo: {exc}", file=sys.stderr)
        return 2
    from sockudo.redis import queue_configured

    if not queue_configured(config):
        print("sockudo: dead letters are kept in Redis; without REDIS_URL (embedded mode) they live in the "
              "server's memory and are not reachable from here", file=sys.stderr)
        return 2
    queue = _store(config)
    letters = queue.dead_letters
    if args.ids:
        records = [r for r in (letters.get(i) for i in args.ids) if r is not None]
        missing = set(args.ids) - {r["id"] for r in records}
        for record_id in sorted(missing):
            print(f"sockudo: no dead letter {record_id}", file=sys.stderr)
        if args.app:
            records = [r for r in records if r["app_id"] == args.app]
    else:
        records = letters.list(args.app, limit=args.limit if args.action == "list" else 1_000_000)

    if args.action == "list":
        for r in records:
            if args.json:
                print(json.dumps(r, separators=(",", ":")))
            else:
                status = r.get("status") if r.get("status") is not None else (r.get("error") or "-")
                print(f"{r['id']}  app={r['app_id']}  failed={_when(r.get('failed_ms'))}  reason={r['reason']}  "
                      f"status={status}  attempts={r.get('attempts')}  events={','.join(r.get('events', []))}  "
                      f"delivery_id={r['delivery_id']}  endpoint={r.get('endpoint') or '-'}  "
                      f"url={redact_url(r['url'])}")
        if not args.json:
            print(f"{len(records)} dead letter(s) shown, {letters.count()} stored", file=sys.stderr)
        return 0

    if not args.ids and not args.all:
        print("sockudo: replay needs --id ID (repeatable) or --all", file=sys.stderr)
        return 2
    apps = {a.id: a for a in config.apps}
    replayed = failed = 0
    for record in records:
        app = apps.get(record["app_id"])
        if app is None:
            print(f"sockudo: {record['id']}: app {record['app_id']!r} is not in the config; skipped", file=sys.stderr)
            failed += 1
            continue
        delivery = replay_dead_letter(queue, record, app.key, app.secret, config.webhooks,
                                      f"{config.redis_prefix}webhooks:", int(time.time() * 1000))
        replayed += 1
        print(f"replayed {record['id']} (delivery_id={delivery.delivery_id}, app={delivery.app_id})")
    print(f"{replayed} replayed, {failed} skipped", file=sys.stderr)
    return 0 if failed == 0 else 1
