"""Push jobs, enqueued by the server as ``workers.push.plan`` / ``workers.push.dispatch`` with a job
record id. Run them with ``python -m workers push`` (or plain
``rq worker --with-scheduler push``); the worker reads the same configuration as the server
(``SOCKUDO_CONFIG`` / ``--config`` and the environment: Redis, ``[push]``, the credentials key).

Each job is idempotent: deliveries are claimed and settled in the store, so RQ or the lease
reaper may run a job again after a crash without double counting. In the pooled worker (the
default of ``python -m workers``) jobs run in the worker's own process and count their metrics
in its registry; under a forking worker the job's metric operations are left in
``job.meta["sockudo_push_metrics"]`` for the worker's main process to count (forked work-horses
share no registry).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from rq import get_current_job

from sockudo.push.metrics import RecordingMetrics

logger = logging.getLogger(__name__)

METRICS_META = "sockudo_push_metrics"

_service: Any = None
_metrics: RecordingMetrics | None = None
_config: Any = None
_direct_metrics: Any = None  # the pooled worker's PushMetrics (see preload)
_executor: Any = None  # the pooled worker's executors for the sends (see preload)


def preload(metrics: Any = None, executor: Any = None) -> None:
    """Called in the worker's main process, before any job. It builds this process's push
    composition (and the TLS contexts), so a worker that forks a work-horse per job hands it
    ready-made instead of paying imports, configuration and CA loading on every job, and a
    worker that runs jobs in its own process reuses it (and the provider connections) for all
    of them. Opens no connection: the Redis pool connects on first use (redis-py starts a fresh
    pool in a forked child), and the provider clients are made per process on first use.

    A worker that runs the jobs in its own process (the pool) passes its ``metrics``
    (``PushMetrics``: counted directly, not carried home in each job's meta) and its
    ``executor`` for the provider clients' sends (greenlet pools)."""
    global _config, _direct_metrics, _executor
    _direct_metrics, _executor = metrics, executor
    import h2.connection  # noqa: F401

    import sockudo.push.providers  # noqa: F401
    import sockudo.push.redis_store  # noqa: F401
    from sockudo.config import load_config
    from sockudo.core.errors import ConfigError

    try:
        _config = load_config(os.environ.get("SOCKUDO_CONFIG") or None)
    except ConfigError:
        _config = None  # reported by the job that needs it
        return
    from sockudo.push.providers import tls_context

    for alpn in ("h2", "http/1.1"):  # loading the CA store once
        tls_context(_config.push.ca_file, alpn)
    try:
        service()
    except RuntimeError:
        pass  # push disabled or no Redis: reported by the job that needs it


def service() -> Any:
    """The push composition for this process, built once from the server's configuration and
    reused by every job (see :func:`preload`); its dispatcher makes the provider clients once
    per process id, so a forked work-horse never uses its parent's sockets."""
    global _service, _metrics
    if _service is None:
        from sockudo.config import load_config
        from sockudo.push.service import build_push

        config = _config or load_config(os.environ.get("SOCKUDO_CONFIG") or None)
        from sockudo.redis import queue_configured

        if not queue_configured(config):
            raise RuntimeError("push workers need Redis (QUEUE_REDIS_URL, REDIS_URL or the config's [database.redis])")
        if _direct_metrics is None:
            _metrics = RecordingMetrics()
        metrics = _direct_metrics if _direct_metrics is not None else _metrics
        _service = build_push(config, metrics, executor=_executor)
        if _service is None:
            raise RuntimeError("push is disabled in the configuration ([push] enabled = false)")
    return _service


def _run(batch_id: str) -> dict[str, Any]:
    svc = service()
    try:
        svc.dispatcher.run(batch_id)
    finally:
        job = get_current_job()
        if job is not None and _metrics is not None:
            ops = _metrics.take()
            if ops:
                job.meta[METRICS_META] = ops
                try:
                    job.save_meta()
                except Exception:  # metrics must not fail a job whose deliveries are settled
                    logger.warning("could not save push metrics to the job")
    return {"batch": batch_id}


def plan(batch_id: str) -> dict[str, Any]:
    """Expand a publish into per-device deliveries and enqueue the dispatch batches."""
    return _run(batch_id)


def dispatch(batch_id: str) -> dict[str, Any]:
    """Send one batch of deliveries (or one retry / replay)."""
    return _run(batch_id)

