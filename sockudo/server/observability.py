"""Observability wiring for the composition root (gevent side): the metrics WSGI app with the
constant labels, the TCP metrics exporter, readiness, and gevent's own error output routed
through logging (so JSON format and redaction apply to it too). docs/observability.md."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import gevent
from prometheus_client import make_wsgi_app

from sockudo.config import Config
from sockudo.health import build_readiness
from sockudo.metrics.labels import ConstantLabels, constant_labels
from sockudo.metrics.listener import MetricsListener
from sockudo.metrics.tcp.exporter import TcpExporter
from sockudo.server.runtime import GeventRuntime
from sockudo.services import Services

if TYPE_CHECKING:
    from flask import Flask

logger = logging.getLogger(__name__)

WSGI_ERROR_LOG = logging.getLogger("gevent.pywsgi")  # pass as WSGIServer(error_log=...)


def metrics_app(config: Config, registry: Any) -> MetricsListener:
    """``GET /metrics``: the registry with ``environment, region, node, adapter`` on every series;
    404 elsewhere."""
    return MetricsListener({"/metrics": make_wsgi_app(ConstantLabels(registry, constant_labels(config)))})


def start_tcp_exporter(config: Config, registry: Any) -> TcpExporter | None:
    """``[metrics.tcp_exporter]``; a bind failure is a warning and Prometheus carries on."""
    tcp = config.metrics.tcp_exporter
    if not tcp.enabled:
        return None
    exporter = TcpExporter(registry, GeventRuntime(), tcp.host, tcp.port, tcp.buffer_size,
                           labels=constant_labels(config), prefix=config.metrics.prefix)
    try:
        port = exporter.start()
    except OSError as exc:
        logger.warning("TCP metrics exporter not started: %s", exc, extra={"host": tcp.host, "port": tcp.port})
        return None
    logger.info("TCP metrics exporter listening", extra={"host": tcp.host, "port": port,
                                                         "buffer_size": tcp.buffer_size})
    return exporter


def log_greenlet_errors() -> None:
    """Uncaught greenlet errors go to the ``gevent.hub`` logger instead of raw stderr."""
    hub = gevent.get_hub()
    hub_logger = logging.getLogger("gevent.hub")

    def print_exception(context: Any, t: Any, v: Any, tb: Any) -> None:
        try:
            where = context if isinstance(context, str) else hub.format_context(context)
        except Exception:
            where = repr(context)
        hub_logger.error("uncaught error in a greenlet: %s", where, exc_info=(t, v, tb) if v is not None else None)

    hub.print_exception = print_exception  # type: ignore[method-assign]  # gevent's hook for this


def attach(config: Config, services: Services, flask: Flask) -> TcpExporter | None:
    """Called by ``Server.start``: readiness (metrics exist before the first probe), gevent's
    errors into logging, and the TCP exporter (returned, for ``Server.shutdown`` to stop)."""
    ext = flask.extensions["sockudo"]
    if ext.get("readiness") is None:
        ext["readiness"] = build_readiness(services)
    log_greenlet_errors()
    return start_tcp_exporter(config, services.metrics.registry)
