"""``python -m sockudo``: the command-line entry point.

gevent's monkey-patching happens here, first, and nowhere else.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402

from sockudo.config import load_config  # noqa: E402
from sockudo.core.errors import ConfigError  # noqa: E402
from sockudo.logs import setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    command = sys.argv[1:] if argv is None else argv
    if command[:1] == ["webhooks"]:  # python -m sockudo webhooks dead-letters list|replay
        from sockudo.cli.webhooks import main as webhooks_main

        return webhooks_main(command[1:])
    if command[:1] == ["metrics"]:  # python -m sockudo metrics tail [--host H] [--port P]
        from sockudo.cli.metrics import main as metrics_main

        return metrics_main(command[1:])
    parser = argparse.ArgumentParser(
        prog="python -m sockudo", description="Pusher-compatible realtime server",
        epilog="Also: python -m sockudo webhooks dead-letters list|replay [--config FILE] [--id ID]; "
               "python -m sockudo metrics tail [--host H] [--port P]",
    )
    parser.add_argument("--config", help="TOML config file (default: $SOCKUDO_CONFIG, else built-in defaults)")
    parser.add_argument("--host", help="listen address (overrides config and HOST)")
    parser.add_argument("--port", type=int, help="listen port (overrides config and PORT)")
    parser.add_argument(
        "--workers", type=int,
        help="server processes sharing the port (SO_REUSEPORT), joined through Redis (default: $WEB_CONCURRENCY or 1)",
    )
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config or os.environ.get("SOCKUDO_CONFIG") or None)
        if args.host:
            config = replace(config, host=args.host)
        if args.port:
            config = replace(config, port=args.port)
        workers = args.workers if args.workers is not None else int(os.environ.get("WEB_CONCURRENCY", "1") or "1")
    except ValueError:
        print("sockudo: WEB_CONCURRENCY must be a whole number", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"sockudo: {exc}", file=sys.stderr)
        return 2

    setup_logging(config.log_format, config.log_level, secrets=[app.secret for app in config.apps])
    for warning in config.warnings:  # settings of the file that have no effect here, one line each
        logging.getLogger("sockudo.config").warning("%s", warning)
    if workers > 1:
        if config.adapter_driver != "redis":
            print(
                f"sockudo: --workers {workers} needs the Redis adapter so the processes act as one server; "
                "set REDIS_URL (or [adapter] driver = \"redis\"), or run one worker",
                file=sys.stderr,
            )
            return 2
        from sockudo.server.supervisor import supervise

        return supervise(workers, argv if argv is not None else sys.argv[1:], config)
    from sockudo.server.main import Server

    try:
        Server(config).serve_forever()
    except OSError as exc:
        logging.getLogger("sockudo").error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
