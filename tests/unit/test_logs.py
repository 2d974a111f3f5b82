"""The human log format keeps every record on its line: client text cannot forge a line or a field."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from sockudo.logs import escape_control, field_value, setup_logging


@pytest.fixture
def human() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    setup_logging("human", "DEBUG")
    stream = io.StringIO()
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    yield stream
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved_handlers:
        root.addHandler(h)
    root.setLevel(saved_level)
    logging.captureWarnings(False)


FORGED = "2026-01-01 00:00:00,000 ERROR sockudo.admin: forged"


def test_a_newline_in_a_message_or_a_field_stays_on_the_line(human: io.StringIO) -> None:
    log = logging.getLogger("sockudo.test")
    log.warning("unknown app %s", "100\n" + FORGED, extra={"channel": "c\r\n" + FORGED, "app_id": "1\u2028x"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("with a traceback", extra={"path": "/apps/1\n" + FORGED})
    lines = human.getvalue().splitlines()
    assert not any(line.startswith("2026-01-01") for line in lines), lines
    first = lines[0]
    assert "unknown app 100\\n2026-01-01" in first and 'channel="c\\r\\n2026-01-01' in first
    assert "app_id=1\\u2028x" in first
    assert any(line.startswith("Traceback") for line in lines)  # a traceback keeps its own lines


def test_field_values_cannot_pass_for_another_field() -> None:
    assert field_value("x app_id=200") == '"x app_id=200"'
    assert field_value('a"b') == '"a\\"b"' and field_value("") == '""'
    assert field_value("plain-value_1") == "plain-value_1" and field_value(42) == "42"
    assert escape_control("a\tb\x00c\x7f") == "a\\tb\\x00c\\x7f"


def test_the_json_format_was_already_one_line_per_record() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        setup_logging("json", "DEBUG")
        stream = io.StringIO()
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("sockudo.test").warning("x", extra={"channel": "c\n" + FORGED})
        (line,) = stream.getvalue().splitlines()
        assert json.loads(line)["channel"] == "c\n" + FORGED
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
        logging.captureWarnings(False)
