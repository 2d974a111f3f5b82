"""RQ job functions and the worker process (``python -m workers``).

The job modules (``workers.webhooks``, ``workers.push``) import without gevent: the server
enqueues them by dotted path (``workers.webhooks.deliver``) and never imports this package, and
a plain ``rq worker`` can run them. The worker process (``workers.worker``) is gevent's.
"""

DEFAULT_CONCURRENCY = 100  # jobs a pool worker runs at once (--concurrency, WORKER_CONCURRENCY)
