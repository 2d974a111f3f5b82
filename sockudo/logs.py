"""Logging setup: human-readable by default, one JSON object per line with
``LOG_OUTPUT_FORMAT=json`` (python-json-logger). Callers pass structured fields with
``extra={"app_id": …, "socket_id": …}``; secrets and payloads are never logged, and the
``RedactionFilter`` on the root handler makes sure of it whoever logs (``sockudo.redaction``).

A JSON line (docs/observability.md)::

    {"timestamp": "2026-05-01T12:00:00.123456Z", "level": "warn", "target": "sockudo.push",
     "message": "provider rejected", "app_id": "app-id", "publish_id": "pub_123",
     "provider": "apns", "error": "BadDeviceToken"}
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
import sys
from collections.abc import Iterable

from pythonjsonlogger.json import JsonFormatter

from sockudo.redaction import RedactionFilter, Redactor


def rfc3339(created: float) -> str:
    """``2026-05-01T12:00:00.123456Z`` (UTC)."""
    return _dt.datetime.fromtimestamp(created, _dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _Formatter(JsonFormatter):
    def add_fields(self, log_record, record, message_dict):  # type: ignore[no-untyped-def]
        super().add_fields(log_record, record, message_dict)
        log_record.pop("levelname", None)
        log_record.pop("name", None)
        log_record.pop("timestamp", None)
        rest = dict(log_record)
        log_record.clear()  # rebuilt in place: timestamp, level, target, message, then the fields
        log_record["timestamp"] = rfc3339(record.created)
        log_record["level"] = record.levelname.lower().replace("warning", "warn")
        log_record["target"] = record.name
        log_record.update(rest)


_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


# Line breaks (ASCII and Unicode) and other control characters: a value carrying one could
# start a forged line in the human format.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_control(text: str) -> str:
    """``text`` on one line: control characters as ``\\n``, ``\\r``, ``\\t`` or ``\\xNN`` / ``\\uNNNN``."""
    def one(match: re.Match[str]) -> str:
        char = match.group()
        code = ord(char)
        return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")

    return _CONTROL.sub(one, text)


def field_value(value: object) -> str:
    """A ``key=value`` field's value that cannot pass for another field or line: escaped, and
    quoted when empty or holding a space, ``=`` or ``"``."""
    text = escape_control(str(value))
    if not text or any(c in text for c in ' ="'):
        return '"' + text.replace('"', '\\"') + '"'
    return text


class _HumanFormatter(logging.Formatter):
    """``<time> <LEVEL> <target>: <message> key=value …`` (the event fields, as Sockudo's text format).

    Client-controlled text (an app id from a URL, a channel name) reaches messages and fields:
    both are escaped onto the one line, so no value can forge a log line or a field. A
    traceback, which the formatter adds below the line, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape_control(record.message)  # recomputed from msg % args by every format()
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [f"{k}={field_value(v)}" for k, v in record.__dict__.items() if k not in _RECORD_ATTRS]
        if not fields:
            return text
        head, sep, tail = text.partition("\n")  # fields go on the message line, before any traceback
        return f"{head} {' '.join(fields)}{sep}{tail}"


def json_formatter() -> logging.Formatter:
    # Key order of each line: timestamp, level, target, message, then the event fields.
    return _Formatter("%(timestamp)s %(levelname)s %(name)s %(message)s")


def install_redaction(redactor: Redactor) -> RedactionFilter:
    """Put one ``RedactionFilter`` on every handler that exists now (root first)."""
    flt = RedactionFilter(redactor)
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in lg.handlers:
            if not any(isinstance(f, RedactionFilter) for f in handler.filters):
                handler.addFilter(flt)
    return flt


def setup_logging(fmt: str = "human", level: str = "INFO", secrets: Iterable[str] = ()) -> RedactionFilter:
    """Configure the root handler on stderr. ``secrets`` (the apps' secrets) are redacted by value."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(_HumanFormatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper().replace("WARN", "WARNING").replace("WARNINGING", "WARNING"))
    logging.captureWarnings(True)  # warnings.warn(...) goes through the same handler and filter
    return install_redaction(Redactor(secrets))
