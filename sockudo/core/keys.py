"""Storage keys built from client-chosen ids (push publish and device ids, say).

Keys join their parts with ``:``. An id that may itself contain ``:`` is encoded first, so two
different tuples of ids never join into the same key: ``%``, ``:`` and ``#`` are
percent-encoded (RFC 3986 §2.1). Ids without those characters are unchanged, so keys of such ids
read the same before and after this encoding was introduced.
"""

from __future__ import annotations

import re

_ESCAPES = {"%": "%25", ":": "%3A", "#": "%23"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}
_ESCAPED = re.compile("%25|%3A|%23")


def segment(value: str) -> str:
    """``value`` as one segment of a ``:``-joined key (contains no ``:`` or ``#``)."""
    if "%" not in value and ":" not in value and "#" not in value:
        return value
    return value.replace("%", "%25").replace(":", "%3A").replace("#", "%23")


def unsegment(value: str) -> str:
    """The id a :func:`segment` was made from."""
    return _ESCAPED.sub(lambda m: _UNESCAPES[m.group()], value) if "%" in value else value


def join(*parts: str) -> str:
    """Parts joined by ``:``, each a :func:`segment`: distinct tuples give distinct keys."""
    return ":".join(segment(part) for part in parts)
