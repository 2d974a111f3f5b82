"""Log redaction: no secret reaches a log line, whoever logs it.

``RedactionFilter`` sits on the root handler (``sockudo.logs.setup_logging``), so every record
that propagates there — ours, Flask's, werkzeug's, gevent's, RQ's — passes through it before
any formatter runs. It rewrites the record in place:

- the message (``msg % args`` is rendered first, then redacted; ``args`` cleared),
- every extra field: by **key** (``secret``, ``signature``, ``token``, ``authorization``,
  ``password``, ``cookie``, ``credentials``, ``p256dh``, ``endpoint``, ``ciphertext``, ``payload``,
  ``body``, ``data`` …, except names ending in ``_hash``/``_id``/``_count`` …) and by **value**,
  recursively through dicts and lists,
- the exception text and stack (formatted here and redacted; ``exc_info`` is then cleared so no
  formatter can render the raw traceback again).

By value it removes: the configured app secrets (known at start-up), ``auth_signature=…`` and
any ``<sensitive key>=…`` / ``"<sensitive key>": "…"`` pair, Pusher auth strings ``key:<hex64>``,
hex runs of 64+ characters (HMAC signatures, APNs device tokens), ``Bearer``/``Basic``
credentials, JWTs, PEM private keys, URL userinfo, long opaque path segments (Web Push
endpoints, APNs ``/3/device/…``) and any long base64-like run mixing upper case, lower case and
digits (FCM/HMS tokens, encrypted payloads). What it leaves: ids, channel names, publish ids,
socket ids, ``token_hash`` fields (hex SHA-256 is how push logs refer to a token).
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 4  # shorter configured secrets are not redacted by value (they would eat words)

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

_SENSITIVE_WORD = (
    r"secret|password|passwd|passphrase|signature|token|tokens|authorization|auth|cookie|credential|credentials"
    r"|p256dh|endpoint|ciphertext|nonce|payload|body|data|bearer|apikey|privatekey|channeluri|uri|jwt|dsn"
)
_SENSITIVE_WORDS = frozenset(_SENSITIVE_WORD.split("|"))
_SAFE_LAST_WORDS = frozenset({"hash", "id", "ids", "count", "size", "bytes", "length", "type", "kind", "class",
                              "status", "ms", "seconds", "enabled", "failures", "errors", "total", "version",
                              "timestamp", "md5"})
_HEX = re.compile(r"[0-9a-fA-F]{64}")
_KEY_PAIRS = re.compile(r"(private|api|access|secret|signing|auth|master)[_-]?key$", re.I)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

# key=value and "key": "value" pairs whose key looks sensitive; the key is checked in Python.
_PAIR_QUOTED = re.compile(
    r"""(?P<key>[A-Za-z][A-Za-z0-9_.-]{0,63})(?P<q1>["']?)(?P<sep>\s*[:=]\s*)"""
    r"""(?P<q>["'])(?P<val>(?:\\.|(?!(?P=q)).)*)(?P=q)"""
)
_PAIR_BARE = re.compile(r"""(?P<key>[A-Za-z][A-Za-z0-9_.-]{0,63})(?P<sep>=|:[ \t]*)(?P<val>[^\s"'&,;})\]]+)""")
_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S)
_AUTH_SCHEME = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]{6,}", re.I)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_PUSHER_AUTH = re.compile(r"\b([A-Za-z0-9_.-]+):[0-9a-fA-F]{64}\b")
_HEX_RUN = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64,}(?![0-9a-fA-F])")
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]+")
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_LONG_SEGMENT = re.compile(r"(?<=/)[A-Za-z0-9_~.%+=:-]{24,}")
_OPAQUE = re.compile(r"[A-Za-z0-9_+/=:-]{32,}")


def _words(key: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", _CAMEL.sub("_", key).lower()) if w]


def sensitive_key(key: str) -> bool:
    """Whether a field called ``key`` holds something that must never be logged."""
    words = _words(key)
    if not words or words[-1] in _SAFE_LAST_WORDS:
        return False
    if _KEY_PAIRS.search(key.replace("-", "_")):
        return True
    return any(w in _SENSITIVE_WORDS for w in words) or "".join(words) in _SENSITIVE_WORDS


def _opaque(match: re.Match[str]) -> str:
    run = match.group(0)
    has = (any(c.islower() for c in run), any(c.isupper() for c in run), any(c.isdigit() for c in run))
    return REDACTED if all(has) else run


def _url(match: re.Match[str]) -> str:
    url = _USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", match.group(0))
    scheme, sep, rest = url.partition("://")
    path, q, query = rest.partition("?")
    host, slash, tail = path.partition("/")
    tail = _LONG_SEGMENT.sub(REDACTED, "/" + tail)[1:] if tail else tail
    return scheme + sep + host + slash + tail + q + query


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self._secret_re: re.Pattern[str] | None = None
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        known = set(self._secrets)
        known.update(s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LENGTH)
        self._secrets = sorted(known, key=len, reverse=True)
        self._secret_re = re.compile("|".join(re.escape(s) for s in self._secrets)) if self._secrets else None

    def text(self, text: str) -> str:
        if not text:
            return text
        if self._secret_re is not None:
            text = self._secret_re.sub(REDACTED, text)
        text = _PEM.sub(REDACTED, text)
        text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
        text = _JWT.sub(REDACTED, text)
        text = _URL.sub(_url, text)
        text = _PAIR_QUOTED.sub(self._pair_quoted, text)
        text = _PAIR_BARE.sub(self._pair_bare, text)
        text = _PUSHER_AUTH.sub(lambda m: f"{m.group(1)}:{REDACTED}", text)
        text = _HEX_RUN.sub(REDACTED, text)
        return _OPAQUE.sub(_opaque, text)

    @staticmethod
    def _pair_quoted(m: re.Match[str]) -> str:
        if not sensitive_key(m.group("key")) or m.group("val") == REDACTED:
            return m.group(0)
        q = m.group("q")
        return f"{m.group('key')}{m.group('q1')}{m.group('sep')}{q}{REDACTED}{q}"

    @staticmethod
    def _pair_bare(m: re.Match[str]) -> str:
        if not sensitive_key(m.group("key")) or m.group("val").startswith(REDACTED[:-1]):
            return m.group(0)
        return f"{m.group('key')}{m.group('sep')}{REDACTED}"

    def value(self, value: Any, key: str | None = None, depth: int = 0) -> Any:
        """A field's value, redacted by its key and its content (recursively)."""
        if key is not None and sensitive_key(key) and value not in (None, "", True, False):
            return REDACTED
        if isinstance(value, str):
            if key is not None and _words(key)[-1:] == ["hash"] and _HEX.fullmatch(value):
                return value  # token_hash: a SHA-256 is how push logs name a token
            return self.text(value)
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if depth > 8:
            return REDACTED
        if isinstance(value, Mapping):
            return {self.text(str(k)): self.value(v, str(k), depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self.value(v, None, depth + 1) for v in value]
        if isinstance(value, bytes):
            return REDACTED  # raw bytes are payloads
        return self.text(str(value))


class RedactionFilter(logging.Filter):
    """Rewrites each record so that no formatter can print a secret (see module docstring)."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def filter(self, record: logging.LogRecord) -> bool:
        r = self.redactor
        if isinstance(record.msg, Mapping) and not record.args:
            record.msg = r.value(record.msg)
        else:
            try:
                message = record.getMessage()
            except Exception:  # a bad format string still must not leak its arguments
                message = str(record.msg)
            record.msg = r.text(message)
            record.args = None
        for key in [k for k in record.__dict__ if k not in _STANDARD_ATTRS]:
            record.__dict__[key] = r.value(record.__dict__[key], key)
        if record.exc_info:
            if record.exc_info[0] is not None:
                record.exc_text = r.text("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = r.text(record.exc_text)
        if record.stack_info:
            record.stack_info = r.text(record.stack_info)
        return True
