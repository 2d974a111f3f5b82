"""The composition root: builds the services, then runs the listeners until told to stop."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

from gevent.pywsgi import WSGIServer

from sockudo.adapter import LocalAdapter
from sockudo.apps import AppStore
from sockudo.cache import MemoryCache
from sockudo.config import Config
from sockudo.handler import Handler
from sockudo.http_api import create_app, fastpath
from sockudo.http_api.common import chunked_body_gate
from sockudo.metrics.registry import Metrics
from sockudo.metrics.tcp.exporter import TcpExporter
from sockudo.redis import CLUSTER_DRIVER, RedisClients, queue_configured
from sockudo.server import console, observability, runtime
from sockudo.server.guard import Guard, GuardedHandler, main_server
from sockudo.server.websocket import APP_PATH_PREFIX, ConnectionRegistry, protocol_version, serve_websocket
from sockudo.services import Services
from sockudo.webhooks.sink import build_webhook_sink

if TYPE_CHECKING:
    from sockudo.push.service import PushService

logger = logging.getLogger(__name__)

SHUTDOWN_TAIL_SECONDS = 3.0  # of the grace period, kept for flushing webhooks and leaving the cluster
STARTUP_ADAPTER_WAIT_SECONDS = 3.0


class _QuietHandler(GuardedHandler):
    """gevent's per-request access log is noise at our volume (and would log query
    strings, which carry auth signatures)."""

    def log_request(self) -> None:
        return None

    def handle(self) -> None:
        # Without TCP_NODELAY a keep-alive REST client waits ~40 ms per request (headers and
        # body go out in two writes and meet delayed ACKs); WebSocket frames want it too.
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        super().handle()


def build_services(config: Config) -> Services:
    metrics = Metrics(port=config.metrics.port, prefix=config.metrics.prefix, process=True)
    metrics.prepare([app.id for app in config.apps], config.adapter_driver)
    adapter: Any
    extras: dict[str, Any] = {}
    cache: Any = MemoryCache(time.time)
    clients = RedisClients(config)
    extras["redis"] = clients
    if config.adapter_driver in ("redis", CLUSTER_DRIVER):
        from sockudo.adapter.redis import RedisAdapter
        from sockudo.cache import RedisCache
        from sockudo.history.idempotency import RedisIdempotency
        from sockudo.history.store import RedisSequencer

        client = clients.shared
        adapter = RedisAdapter(config, metrics, runtime.GeventRuntime(), node_id=config.node_id, client=client)
        # Shared state must be cluster-wide: serials/history, idempotency keys and
        # cache-channel payloads live in Redis, under their own prefix.
        extras["sequencer"] = RedisSequencer(client, prefix="sockudo:")
        extras["idempotency"] = RedisIdempotency(client, prefix="sockudo:")
        cache = RedisCache(client, prefix="sockudo:")
    else:
        adapter = LocalAdapter()
    tap = console.build_tap(getattr(adapter, "node_id", None) or config.node_id or socket.gethostname())
    extras["tap"] = tap
    webhooks = build_webhook_sink(config, metrics.registry, runtime.GeventRuntime(), adapter, clients, tap=tap)
    if webhooks is not None:
        extras["events"] = webhooks
    from sockudo.push.service import build_push

    extras["push"] = build_push(config, registry=metrics.registry,
                                client=clients.queue if queue_configured(config) else None)
    if extras["push"] is not None:
        from sockudo.push.metrics import PushQueueCollector

        metrics.registry.register(PushQueueCollector(extras["push"].queue_stats))
    services = Services(
        config=config,
        apps=AppStore(config.apps),
        adapter=adapter,
        cache=cache,
        metrics=metrics,
        **extras,
    )
    adapter.on_remote_message = services.publisher.record_remote
    return services


def listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """The main listener; with ``reuse_port`` several processes share one port (--workers)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Server:
    def __init__(self, config: Config, services: Services | None = None) -> None:
        self.config = config
        self.services = services or build_services(config)
        self.handler = Handler(self.services)
        self.registry = ConnectionRegistry()
        self.flask = create_app(self.services, self.handler)
        self.services.adapter.set_listener(self.handler)
        self.http: WSGIServer | None = None
        self.metrics_http: WSGIServer | None = None
        self.console: console.ConsoleServer | None = None
        self.tcp_exporter: TcpExporter | None = None
        self.stopped = runtime.Event()

    # -- WSGI entry: WebSocket upgrades to the handler, everything else to Flask --

    def _pre_start_hook(self, wsgi_handler: Any) -> bool:
        """Returns True to refuse the upgrade and answer with plain HTTP instead."""
        env = wsgi_handler.environ
        return (not env.get("PATH_INFO", "").startswith(APP_PATH_PREFIX) or self.handler.draining
                or protocol_version(env) is None)

    def wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("wsgi.websocket") is not None:
            serve_websocket(environ, self.handler, self.registry)
            return []
        path = environ.get("PATH_INFO", "")
        if path.startswith(APP_PATH_PREFIX):
            if self.handler.draining:
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"Server is shutting down"]
            if protocol_version(environ) is None:
                start_response("400 Bad Request", [("Content-Type", "text/plain")])
                return [b"protocol must be a number"]
            start_response("426 Upgrade Required", [("Content-Type", "text/plain"), ("Upgrade", "websocket")])
            return [b"WebSocket upgrade required"]
        publish = fastpath.match(environ)
        if publish is not None:
            return fastpath.serve(self.services, environ, start_response, *publish)
        return self.flask(environ, start_response)

    # -- background work --

    def _push_maintenance_loop(self, push: PushService) -> None:
        """Push jobs whose worker died are re-enqueued once their lease lapses (sockudo/push)."""
        interval = push.settings.maintenance_interval_ms / 1000
        while True:
            runtime.sleep(interval)
            try:
                push.tick()
            except Exception as exc:
                logger.warning("push maintenance failed: %s", exc)

    def _housekeeping_loop(self) -> None:
        """Retention and buffer expiry, once in a while (one greenlet for the whole node)."""
        s = self.services
        while True:
            runtime.sleep(5.0)
            try:
                apps = s.apps.all()
                s.buffers.sweep({a.id: a.connection_recovery for a in apps}, int(time.time() * 1000))
                s.metrics.replay_buffer_messages.labels(s.metrics.port).set(s.buffers.size())
                s.metrics.replay_buffer_channels.labels(s.metrics.port).set(len(s.buffers.channels))
                assert s.sequencer is not None
                s.sequencer.sweep(apps)
                purged = s.sequencer.take_purged()
                if purged:
                    s.metrics.history_evictions.labels(s.metrics.port).inc(purged)
            except Exception:
                logger.exception("housekeeping failed")

    def _liveness_loop(self) -> None:
        cfg = self.config
        interval = max(0.25, min(5.0, cfg.activity_timeout / 4, cfg.pong_timeout / 4))
        while True:
            runtime.sleep(interval)
            now = time.time()
            for conn in list(self.registry.connections.values()):
                try:
                    self.handler.check_liveness(conn, now)
                except Exception:
                    logger.exception("liveness check failed", extra={"socket_id": conn.socket_id})

    # -- lifecycle --

    def start(self) -> None:
        cfg = self.config
        adapter = self.services.adapter
        adapter.start()
        # Give Redis a moment before taking sockets: decisions made before the adapter is
        # connected are node-local (a second channel_occupied, a duplicate member_added).
        # If Redis is down we go on after this, degraded, and /up says so.
        if not adapter.wait_connected(STARTUP_ADAPTER_WAIT_SECONDS):
            logger.warning("starting without redis; cross-node delivery begins once it is reachable")
        reuse_port = os.environ.get("SOCKUDO_REUSE_PORT") == "1"
        metrics = self.services.metrics
        limiter_redis = None
        if cfg.rate_limiter.enabled and cfg.rate_limiter.driver == "redis":
            # Short timeouts: a rate-limit check must not hold a request for long when Redis
            # hangs (it falls back to per-process counting instead).
            limiter_redis = (self.services.redis or RedisClients(cfg)).fast
        guard = Guard(cfg, on_limited=lambda kind, context: metrics.rate_limited("unknown", kind, context),
                      redis_client=limiter_redis)
        guard.body_gate = chunked_body_gate(self.services)
        # Timeouts, per-IP limits and TLS of the main listener: sockudo/server/guard.py.
        self.http = main_server(cfg, listen_socket(cfg.host, cfg.port, reuse_port), self.wsgi, guard,
                                handler_class=_QuietHandler, log=None, error_log=observability.WSGI_ERROR_LOG)
        self.http.pre_start_hook = self._pre_start_hook
        self.http.start()
        # The operator console (docs/console.md): on the metrics listener unless it has its own.
        self.console = console.start(cfg, self.services)
        metrics_wsgi = observability.metrics_app(cfg, self.services.metrics.registry)
        if self.console is not None and self.console.http is None:
            self.console.mount(metrics_wsgi)
        if cfg.metrics.enabled:
            try:
                self.metrics_http = WSGIServer(
                    (cfg.metrics.host, cfg.metrics.port), metrics_wsgi,
                    log=None, error_log=observability.WSGI_ERROR_LOG,
                )
                self.metrics_http.start()
            except OSError as exc:
                logger.warning("metrics listener not started: %s", exc, extra={"port": cfg.metrics.port})
                self.metrics_http = None
        # readiness, gevent errors into logging, TCP metrics exporter
        self.tcp_exporter = observability.attach(cfg, self.services, self.flask)
        runtime.spawn(self._liveness_loop)
        runtime.spawn(self._housekeeping_loop)
        if self.services.push is not None:
            runtime.spawn(self._push_maintenance_loop, self.services.push)
        self.services.events.start()
        logger.info(
            "sockudo listening",
            extra={"host": cfg.host, "port": self.http.server_port, "adapter": cfg.adapter_driver,
                   "metrics_port": cfg.metrics.port if self.metrics_http else None,
                   "apps": [a.id for a in self.services.apps.all()]},
        )

    def shutdown(self) -> None:
        """Graceful stop: refuse new sockets, tell clients to reconnect now (4200), wait."""
        if self.handler.draining:
            return
        self.handler.draining = True
        logger.info("shutting down", extra={"connections": len(self.registry.connections)})
        for conn in list(self.registry.connections.values()):
            self.handler.shutdown(conn)
        # The whole stop fits in the grace period: the sockets get most of it, the rest is for
        # handing webhooks to the queue and leaving the cluster, each bounded by what is left.
        grace = float(self.config.shutdown_grace_period)
        end = time.monotonic() + grace
        sockets_until = end - min(SHUTDOWN_TAIL_SECONDS, grace * 0.25)
        while self.registry.connections and time.monotonic() < sockets_until:
            runtime.sleep(0.05)

        def left(share: float = 1.0) -> float:
            return max(0.05, (end - time.monotonic()) * share)

        self.services.events.stop(timeout=left(0.4))  # pending debounces, batches and the enqueue backlog (webhooks)
        self.services.adapter.stop(timeout=left(0.6))
        if self.http is not None:
            self.http.stop(timeout=min(1.0, left(0.5)))
        if self.console is not None:
            self.console.stop()  # ends open event streams, which would hold the metrics listener's stop
        if self.metrics_http is not None:
            self.metrics_http.stop(timeout=min(1.0, left()))
        if self.tcp_exporter is not None:
            self.tcp_exporter.stop()
            self.tcp_exporter = None
        self.stopped.set()

    def serve_forever(self) -> None:
        self.start()
        import gevent

        for sig in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(sig, lambda: runtime.spawn(self.shutdown))
        self.stopped.wait()
