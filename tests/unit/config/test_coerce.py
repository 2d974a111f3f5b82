"""One set of value rules for every section: a boolean written ``1`` or an integer written
``2.0`` means the same in the server keys, ``[rate_limiter]``, ``[push]``, ``[webhooks]``,
``[history]``, ``[metrics]`` and the apps, in the file and in the environment."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sockudo.config import Config, load_config
from sockudo.config.coerce import suggestion, to_bool, to_float, to_int, to_optional_str, to_str_tuple
from sockudo.core.errors import ConfigError

APP = '[[app_manager.array.apps]]\nid = "1"\nkey = "k"\nsecret = "s"\n'


# (section, TOML prefix before "key = value", key, env variable, how to read the value back)
BOOLEANS: list[tuple[str, str, str, str, Callable[[Config], Any]]] = [
    ("server", "", "debug", "DEBUG", lambda c: c.debug),
    ("rate_limiter", "[rate_limiter]\n", "enabled", "RATE_LIMITER_ENABLED", lambda c: c.rate_limiter.enabled),
    ("push", "[push]\n", "allow_insecure_endpoints", "PUSH_ALLOW_INSECURE_ENDPOINTS",
     lambda c: c.push.allow_insecure_endpoints),
    ("webhooks", "[webhooks.batching]\n", "enabled", "WEBHOOK_BATCHING_ENABLED", lambda c: c.webhooks.batching_enabled),
    ("history", "[history]\n", "enabled", "HISTORY_ENABLED", lambda c: c.history.enabled),
    ("metrics", "[metrics.tcp_exporter]\n", "enabled", "METRICS_TCP_EXPORTER_ENABLED",
     lambda c: c.metrics.tcp_exporter.enabled),
    ("app", APP, "enable_client_messages", "SOCKUDO_DEFAULT_APP_ENABLE_CLIENT_MESSAGES",
     lambda c: c.apps[0].enable_client_messages),
]
WHOLE_NUMBERS: list[tuple[str, str, str, str, Callable[[Config], Any]]] = [
    ("server", "", "pong_timeout", "PONG_TIMEOUT", lambda c: c.pong_timeout),
    ("rate_limiter", "[rate_limiter]\n", "max_connections_per_ip", "RATE_LIMITER_MAX_CONNECTIONS_PER_IP",
     lambda c: c.rate_limiter.max_connections_per_ip),
    ("push", "[push]\n", "batch_size", "PUSH_BATCH_SIZE", lambda c: c.push.batch_size),
    ("webhooks", "[webhooks]\n", "debounce_ms", "WEBHOOK_DEBOUNCE_MS", lambda c: c.webhooks.debounce_ms),
    ("history", "[history]\n", "max_messages_per_channel", "HISTORY_MAX_MESSAGES_PER_CHANNEL",
     lambda c: c.history.max_messages_per_channel),
    ("metrics", "[metrics.tcp_exporter]\n", "buffer_size", "METRICS_TCP_EXPORTER_BUFFER_SIZE",
     lambda c: c.metrics.tcp_exporter.buffer_size),
    ("app", APP, "max_connections", "SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS", lambda c: c.apps[0].max_connections),
]

ACCEPTED_BOOLEANS = [(True, True), (False, False), (1, True), (0, False), ("true", True), ("FALSE", False),
                     ("yes", True), ("no", False), ("1", True), ("0", False), (" on ", True), ("off", False)]
REFUSED_BOOLEANS = [2, -1, 1.0, "maybe", "", "2"]
ACCEPTED_NUMBERS = [(2, 2), (2.0, 2), ("2", 2), (" 2 ", 2), ("2.0", 2)]
REFUSED_NUMBERS = [2.5, "2.5", True, "two", "", -3, "-3", float("inf")]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _from_file(tmp_path: Path, prefix: str, key: str, value: Any) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(f"{prefix}{key} = {_toml(value)}\n", encoding="utf-8")
    return load_config(str(path), env={})


def _ids(rows: list[tuple[str, str, str, str, Callable[[Config], Any]]]) -> list[str]:
    return [row[0] for row in rows]


@pytest.mark.parametrize(("raw", "expected"), ACCEPTED_BOOLEANS, ids=repr)
@pytest.mark.parametrize(("section", "prefix", "key", "variable", "read"), BOOLEANS, ids=_ids(BOOLEANS))
def test_every_section_reads_a_boolean_the_same_way(
    tmp_path: Path, section: str, prefix: str, key: str, variable: str, read: Callable[[Config], Any],
    raw: Any, expected: bool,
) -> None:
    assert read(_from_file(tmp_path, prefix, key, raw)) is expected
    if isinstance(raw, str) and raw.strip():
        assert read(load_config(None, env={variable: raw})) is expected


@pytest.mark.parametrize("raw", REFUSED_BOOLEANS, ids=repr)
@pytest.mark.parametrize(("section", "prefix", "key", "variable", "read"), BOOLEANS, ids=_ids(BOOLEANS))
def test_every_section_refuses_a_non_boolean_naming_the_key(
    tmp_path: Path, section: str, prefix: str, key: str, variable: str, read: Callable[[Config], Any], raw: Any,
) -> None:
    with pytest.raises(ConfigError, match="must be true or false") as info:
        _from_file(tmp_path, prefix, key, raw)
    assert key in str(info.value)
    if isinstance(raw, str) and raw:
        with pytest.raises(ConfigError, match="must be true or false") as info:
            load_config(None, env={variable: raw})
        assert key in str(info.value) or variable in str(info.value)


@pytest.mark.parametrize(("raw", "expected"), ACCEPTED_NUMBERS, ids=repr)
@pytest.mark.parametrize(("section", "prefix", "key", "variable", "read"), WHOLE_NUMBERS, ids=_ids(WHOLE_NUMBERS))
def test_every_section_reads_a_whole_number_the_same_way(
    tmp_path: Path, section: str, prefix: str, key: str, variable: str, read: Callable[[Config], Any],
    raw: Any, expected: int,
) -> None:
    value = read(_from_file(tmp_path, prefix, key, raw))
    assert value == expected and type(value) is int
    if isinstance(raw, str):
        assert read(load_config(None, env={variable: raw})) == expected


@pytest.mark.parametrize("raw", REFUSED_NUMBERS, ids=repr)
@pytest.mark.parametrize(("section", "prefix", "key", "variable", "read"), WHOLE_NUMBERS, ids=_ids(WHOLE_NUMBERS))
def test_every_section_refuses_fractions_words_and_negatives_naming_the_key(
    tmp_path: Path, section: str, prefix: str, key: str, variable: str, read: Callable[[Config], Any], raw: Any,
) -> None:
    with pytest.raises(ConfigError) as info:
        _from_file(tmp_path, prefix, key, raw)
    message = str(info.value)
    assert key in message
    assert ("must be a whole number" in message) or ("negative" in message) or ("at least" in message)
    if isinstance(raw, str) and raw:
        with pytest.raises(ConfigError) as info:
            load_config(None, env={variable: raw})
        assert key in str(info.value) or variable in str(info.value)


# -- the functions themselves ------------------------------------------------------------------


def test_minimum_and_maximum_are_named() -> None:
    assert to_int("k", "5", minimum=1, maximum=10) == 5
    with pytest.raises(ConfigError, match=r"config: k must be at least 1, got 0"):
        to_int("k", 0, minimum=1)
    with pytest.raises(ConfigError, match=r"config: k must be at most 10, got 11"):
        to_int("k", 11, minimum=1, maximum=10)
    assert to_int("k", -3, minimum=None) == -3


def test_numbers_keep_fractions_and_refuse_nan() -> None:
    assert to_float("k", "20.5") == 20.5
    assert to_float("k", 3) == 3.0
    for bad in ("nan", float("nan"), True, "x", -0.5):
        with pytest.raises(ConfigError):
            to_float("k", bad)


def test_strings_lists_and_booleans() -> None:
    assert to_optional_str("k", "") is None
    assert to_optional_str("k", 12345) == "12345"
    assert to_str_tuple("k", "a, b,,c") == ("a", "b", "c")
    assert to_str_tuple("k", ["a"]) == ("a",)
    with pytest.raises(ConfigError, match="list of strings"):
        to_str_tuple("k", [1])
    assert to_bool("k", "Yes") is True


def test_suggestion_names_the_closest_key_but_never_the_key_itself() -> None:
    assert suggestion("max_mesages", ["max_messages", "max_bytes"]) == ' (did you mean "max_messages"?)'
    assert suggestion("zzz", ["max_messages"]) == ""
    assert suggestion("port", ["port"]) == ""


@pytest.mark.parametrize("first", ["sockudo.webhooks.model", "sockudo.push.settings", "sockudo.config.listener",
                                   "sockudo.config.schema", "sockudo.config"])
def test_the_package_imports_in_any_order(first: str) -> None:
    # webhooks.model and push.settings use config.coerce while the schema uses their settings
    # classes: importing sockudo.config must not pull the schema in eagerly.
    code = f"import {first}\nfrom sockudo.config import Config, load_config\nprint(load_config(None, {{}}).port)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[3], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "6001"
