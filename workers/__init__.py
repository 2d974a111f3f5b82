"""RQ job functions and the worker process (``python -m workers``).

Importable without gevent: the server enqueues jobs here by dotted path
(``workers.webhooks.deliver``) and never imports this package.
"""
