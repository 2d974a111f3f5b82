"""Logging setup: human-readable by default, one JSON object per line with
``LOG_OUTPUT_FORMAT=json`` (python-json-logger). Callers pass structured fields with
``extra={"app_id": …, "socket_id": …}``; secrets and payloads are never logged."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter


class _Formatter(JsonFormatter):
    def add_fields(self, log_record, record, message_dict):  # type: ignore[no-untyped-def]
        super().add_fields(log_record, record, message_dict)
        log_record["level"] = record.levelname.lower().replace("warning", "warn")
        log_record["target"] = record.name
        log_record.pop("levelname", None)
        log_record.pop("name", None)


def setup_logging(fmt: str = "human", level: str = "INFO") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", rename_fields={"asctime": "timestamp"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper().replace("WARN", "WARNING").replace("WARNINGING", "WARNING"))
