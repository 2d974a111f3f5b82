"""Storage keys built from client-chosen ids (push publish and device ids, say).

Keys join their parts with ``:``. An id that may itself contain ``:`` is encoded first, so two
different tuples of ids never join into the same key: ``%``, ``:`` and ``#`` are
percent-encoded (RFC 3986 §2.1). Ids without those characters are unchanged, so keys of such ids
read the same before and after this encoding was introduced.

:func:`tag` is the Redis Cluster hash tag of one Pusher channel (or one user): every key and the
pub/sub channel of that channel carry it, so they all live in one hash slot and a script may touch
them together.
"""

from __future__ import annotations

import functools
import hashlib
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


@functools.lru_cache(maxsize=16384)  # computed for every publish and subscribe; bounded
def tag(app_id: str, name: str) -> str:
    """The hash tag of ``name`` (a channel, a user id, or ``""`` for the app itself) in ``app_id``.

    ``{`` + 10 hex digits of SHA-1 over ``app_id NUL name`` + ``}``: the same for every key of one
    channel, never containing a brace of its own, so Redis Cluster hashes exactly the digits
    (https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags).
    """
    digest = hashlib.sha1(f"{app_id}\0{name}".encode(), usedforsecurity=False).hexdigest()
    return "{" + digest[:10] + "}"
