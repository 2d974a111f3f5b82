"""``[console]`` (sockudo/config/console.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sockudo.config import load_config
from sockudo.core.errors import ConfigError


def test_on_the_metrics_listener_by_default_with_a_token_made_at_start() -> None:
    console = load_config(None, {}).console
    assert (console.enabled, console.host, console.port, console.path, console.token) == (True, "", 0, "/console", "")


def test_toml_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "sockudo.toml"
    path.write_text('[console]\nenabled = true\nhost = "127.0.0.1"\nport = 9700\npath = "ops/console/"\n'
                    'token = "from-the-file-0123"\n')
    console = load_config(str(path), {}).console
    assert (console.host, console.port, console.path, console.token) == ("127.0.0.1", 9700, "/ops/console",
                                                                         "from-the-file-0123")
    console = load_config(str(path), {"CONSOLE_TOKEN": "from-the-env-0123", "CONSOLE_ENABLED": "false"}).console
    assert console.token == "from-the-env-0123" and not console.enabled


def test_the_token_never_shows_in_repr() -> None:
    assert "s3cret-s3cret-s3cret" not in repr(load_config(None, {"CONSOLE_TOKEN": "s3cret-s3cret-s3cret"}))


@pytest.mark.parametrize("env", [
    {"CONSOLE_PATH": "/"},
    {"CONSOLE_PATH": "/metrics"},
    {"CONSOLE_PATH": "/a b"},
    {"CONSOLE_PORT": "70000", "CONSOLE_HOST": "127.0.0.1"},
    {"CONSOLE_PORT": "9700"},  # a port without a host
    {"CONSOLE_ENABLED": "maybe"},
    {"CONSOLE_TOKEN": "short"},
])
def test_bad_values_are_refused_naming_the_key(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="console"):
        load_config(None, env)
