"""``python -m sockudo metrics tail``: a live view of the TCP metrics exporter.

Connects to ``[metrics.tcp_exporter]`` (``--host``/``--port``, else the config's, else
127.0.0.1:5000) and prints every event as it arrives: the metadata lines (``# type name
description``) first, then one line per metric operation. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import os
import sys

from sockudo.config import load_config
from sockudo.core.errors import ConfigError
from sockudo.metrics.tcp.wire import tail


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sockudo metrics", description="metrics tools")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tail", help="print the TCP metrics exporter's events as they arrive")
    t.add_argument("--config", help="TOML config file, for [metrics.tcp_exporter] host/port (default: $SOCKUDO_CONFIG)")
    t.add_argument("--host", help="exporter address (default: the config's, else 127.0.0.1)")
    t.add_argument("--port", type=int, help="exporter port (default: the config's, else 5000)")
    t.add_argument("--count", type=int, help="exit after this many events")
    args = parser.parse_args(argv)
    host, port = "127.0.0.1", 5000
    config_path = args.config or os.environ.get("SOCKUDO_CONFIG")
    if config_path or args.host is None or args.port is None:
        try:
            tcp = load_config(config_path or None).metrics.tcp_exporter
            host, port = tcp.host, tcp.port
        except ConfigError as exc:
            print(f"sockudo: {exc}", file=sys.stderr)
            return 2
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return tail(args.host or host, args.port or port, sys.stdout, count=args.count)
