"""``python -m workers``: an RQ worker for the ``webhooks`` queue (``rq worker --with-scheduler``
semantics) that runs up to ``--concurrency`` jobs at once in one gevent-patched process, with
webhook metrics and prompt recovery of jobs left by crashed workers.

    python -m workers [--url redis://…] [--config sockudo.toml] [--metrics-port 9602] [--concurrency 100] [queue …]

Redis comes from ``--url``, else the server's queue Redis: ``QUEUE_REDIS_URL``, else ``REDIS_URL`` /
``REDIS_SENTINELS`` or the config file's ``[database.redis]``. Plain ``rq worker --with-scheduler webhooks``
also delivers; see docs/webhooks.md for what it lacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sockudo.webhooks.model import RQ_QUEUE  # pure: imports no socket, ssl, redis or rq
from workers import DEFAULT_CONCURRENCY

# ``python -m workers`` monkey-patches (in ``__main__`` below, for the pool) before redis, rq and
# ssl are imported, inside ``main``; importing this module patches nothing.


def pooled(args: argparse.Namespace) -> bool:
    """Every queue (webhooks, push) runs in the pool: jobs in the worker's own long-lived process,
    so its modules, configuration and provider connections serve every job. ``--fork`` forces
    RQ's forking worker (one work-horse process per job)."""
    return not args.fork


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workers", description="Webhook delivery worker (RQ)")
    parser.add_argument("queues", nargs="*", default=[RQ_QUEUE], help=f"queues to work on (default: {RQ_QUEUE})")
    parser.add_argument("--url", help="Redis URL (default: $QUEUE_REDIS_URL, else $REDIS_URL, else the config's "
                                      "[database.redis])")
    parser.add_argument("--config", help="sockudo TOML config, for Redis settings (default: $SOCKUDO_CONFIG)")
    parser.add_argument("--name", help="worker name (default: RQ's)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on this port (default: $WORKER_METRICS_PORT; unset: off)")
    parser.add_argument("--metrics-host", default=os.environ.get("WORKER_METRICS_HOST", "0.0.0.0"))
    parser.add_argument("--reap-interval", type=float, default=None,
                        help="seconds between sweeps for jobs left by dead workers (default: "
                             "$WEBHOOK_REAP_INTERVAL_MS/1000, else 5; 0 turns it off)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help=f"jobs run at once in this process (default: $WORKER_CONCURRENCY, else "
                             f"{DEFAULT_CONCURRENCY})")
    parser.add_argument("--fork", action="store_true",
                        help="RQ's forking worker (one work-horse process per job) instead of the pool")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .worker import run_worker

    args = _parser().parse_args(argv)

    from sockudo.config import load_config
    from sockudo.core.errors import ConfigError
    from sockudo.logs import setup_logging

    if args.config:  # job functions (e.g. workers.push) read the same configuration
        os.environ.setdefault("SOCKUDO_CONFIG", args.config)
    try:
        config = load_config(args.config or os.environ.get("SOCKUDO_CONFIG") or None)
    except ConfigError as exc:
        print(f"workers: {exc}", file=sys.stderr)
        return 2
    # App secrets are redacted by value, as in the server (jobs carry signed bodies; RQ logs job args).
    setup_logging(config.log_format, config.log_level, secrets=[app.secret for app in config.apps])

    if args.url:
        import redis

        connection = redis.Redis.from_url(args.url)
    else:
        from sockudo.redis import RedisClients, queue_configured

        if not queue_configured(config):
            print("workers: no Redis configured (use --url, QUEUE_REDIS_URL, REDIS_URL or [database.redis] url)",
                  file=sys.stderr)
            return 2
        connection = RedisClients(config).queue

    metrics_port = args.metrics_port
    if metrics_port is None and os.environ.get("WORKER_METRICS_PORT"):
        metrics_port = int(os.environ["WORKER_METRICS_PORT"])
    reap_interval = args.reap_interval
    if reap_interval is None:
        reap_interval = float(os.environ.get("WEBHOOK_REAP_INTERVAL_MS") or 5000) / 1000.0

    concurrency = args.concurrency
    if concurrency is None:
        concurrency = int(os.environ.get("WORKER_CONCURRENCY") or DEFAULT_CONCURRENCY)
    if concurrency < 1:
        print("workers: --concurrency must be at least 1", file=sys.stderr)
        return 2

    from sockudo.metrics.labels import constant_labels

    try:
        run_worker(connection, args.queues, name=args.name, metrics_port=metrics_port, metrics_host=args.metrics_host,
                   reap_interval=reap_interval, burst=args.burst, logging_level=config.log_level.upper(),
                   prefix=config.metrics.prefix, labels={**constant_labels(config), "adapter": "redis"},
                   apps=config.apps, concurrency=concurrency, pooled=pooled(args))
    except OSError as exc:
        logging.getLogger("workers").error("worker stopped: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    if pooled(_parser().parse_known_args()[0]):
        from gevent import monkey

        monkey.patch_all()  # first: the sockets, SSL, threads and sleeps of everything imported later cooperate
    sys.exit(main())
