"""The operator console on the server (docs/console.md): its access token, its Flask app mounted
on the metrics listener (or on a listener of its own), and, with the Redis adapter, the relay
that brings every node's events to every open console."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

from gevent.pywsgi import WSGIServer

from sockudo.config import Config
from sockudo.console.metrics import ConsoleCollector
from sockudo.console.relay import ConsoleRelay, console_channel
from sockudo.console.service import Console
from sockudo.console.sessions import Sessions, generate_token
from sockudo.console.tap import EventTap
from sockudo.http_api.console import create_console_app
from sockudo.metrics.listener import MetricsListener
from sockudo.server import observability
from sockudo.server.runtime import Event, GeventRuntime

logger = logging.getLogger(__name__)


def build_tap(node_id: str) -> EventTap:
    return EventTap(node_id, Event)


def access_token(config: Config) -> tuple[str, bool]:
    """The configured token, or a new random one (and True: it must be shown to the operator)."""
    if config.console.token:
        return config.console.token, False
    return generate_token(), True


def announce(url: str, token: str | None) -> None:
    """Printed once on the terminal (not logged: log pipelines keep what they get)."""
    line = f"sockudo console: {url}/"
    if token is not None:
        line += f"  (access token, made for this run: {token}; set CONSOLE_TOKEN to choose one)"
    print(line, file=sys.stderr, flush=True)


@dataclass
class ConsoleServer:
    app: Any  # the console's WSGI app
    path: str
    console: Console
    relay: ConsoleRelay | None = None
    http: WSGIServer | None = None  # its own listener, when [console] host/port are set

    def mount(self, listener: MetricsListener) -> MetricsListener:
        """The console under ``path`` on ``listener`` (the metrics listener's app, or its own)."""
        listener.route(self.path, self.app)
        listener.route(self.path + "/", self.app)
        return listener

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        if self.http is not None:
            self.http.stop(timeout=1.0)
        for watcher in list(self.console.tap.watchers):
            self.console.tap.unwatch(watcher)  # open event streams end


def start(config: Config, services: Any) -> ConsoleServer | None:
    """Builds the console; starts its own listener when it has one (else the caller mounts it on
    the metrics listener). None when disabled or when it has nowhere to be served."""
    cfg = config.console
    if not cfg.enabled:
        return None
    if not cfg.port and not config.metrics.enabled:
        logger.warning("console not started: it is served by the metrics listener, which is disabled "
                       "(set console.host and console.port to give it its own)")
        return None
    token, generated = access_token(config)
    console = Console(services, services.tap, GeventRuntime())
    app = create_console_app(console, Sessions(token), cfg.path)
    served = ConsoleServer(app, cfg.path, console)
    try:
        services.metrics.registry.register(ConsoleCollector(services.tap, config.metrics.prefix))
    except ValueError:  # registered already (a restart in one process)
        pass
    host, port = (cfg.host, cfg.port) if cfg.port else (config.metrics.host, config.metrics.port)
    if cfg.port:
        try:
            served.http = WSGIServer((cfg.host, cfg.port), served.mount(MetricsListener()), log=None,
                                     error_log=observability.WSGI_ERROR_LOG)
            served.http.start()
        except OSError as exc:
            logger.warning("console listener not started: %s", exc, extra={"host": cfg.host, "port": cfg.port})
            return None
    if config.adapter_driver == "redis":
        from redis.exceptions import RedisError

        from sockudo.redis import RedisClients

        client = (services.redis or RedisClients(config)).shared  # the process's pool; the pub/sub takes one
        served.relay = ConsoleRelay(services.tap, client, console_channel(config.redis_prefix), GeventRuntime(),
                                    failures=(RedisError, OSError))
        served.relay.start()
    shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    if config.log_format == "human" or sys.stderr.isatty():
        announce(f"http://{shown}:{port}{cfg.path}", token if generated else None)
    elif generated:
        # JSON logs go to collectors, where a plain line (and a secret) has no place.
        logger.warning("console access token made for this run is not shown with JSON logs; set CONSOLE_TOKEN "
                       "to sign in", extra={"path": cfg.path})
    logger.info("console enabled", extra={"host": host, "port": port, "path": cfg.path,
                                          "sign_in": "token made at start-up" if generated else "configured token"})
    return served

