"""The operator console (docs/console.md): a live view of each app served on the metrics listener.

Pure parts only: the event tap the Pusher logic reports to (``tap``), the sign-in sessions and CSRF
tokens (``sessions``), the per-app history of rates (``stats``) and the cross-node relay
(``relay``, which takes its greenlets from an injected runtime). The Flask blueprint lives in
``sockudo/http_api/console.py``; the page's HTML, CSS and JavaScript in ``static/``.
"""

from sockudo.console.tap import KINDS, ConsoleEvent, EventTap, Watcher

__all__ = ["KINDS", "ConsoleEvent", "EventTap", "Watcher"]
