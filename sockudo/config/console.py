"""``[console]``: the operator console (docs/console.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from sockudo.config.coerce import build, table
from sockudo.core.errors import ConfigError

RESERVED_PATHS = ("/metrics",)
MIN_TOKEN_LENGTH = 16  # a configured token is the console's only lock: no short, guessable ones


@dataclass(frozen=True)
class ConsoleConfig:
    enabled: bool = True
    # Empty host and port 0: served by the metrics listener ([metrics] host/port), which is
    # meant to stay internal. Set both to give the console a listener of its own.
    host: str = ""
    port: int = 0
    path: str = "/console"
    # The access token (CONSOLE_TOKEN). Empty: the server makes one at start-up and prints it
    # once on the terminal. Never logged, never shown by repr().
    token: str = field(default="", repr=False)


def parse_console(raw: Mapping[str, Any], env: Mapping[str, str]) -> ConsoleConfig:
    """The ``[console]`` table, then ``CONSOLE_ENABLED``, ``CONSOLE_HOST``, ``CONSOLE_PORT``,
    ``CONSOLE_PATH``, ``CONSOLE_TOKEN``."""
    values = dict(table("[console]", raw))
    for f in fields(ConsoleConfig):
        var = "CONSOLE_" + f.name.upper()
        if env.get(var, "") != "":
            values[f.name] = env[var]
    config: ConsoleConfig = build(ConsoleConfig, values, "console")
    path = "/" + config.path.strip().strip("/")
    if path == "/" or path in RESERVED_PATHS or any(c in path for c in "?#% "):
        raise ConfigError(f"config: console.path must be a path such as /console, got {config.path!r}")
    if not 0 <= config.port < 65536:
        raise ConfigError(f"config: console.port must be 0 (the metrics listener) or 1-65535, got {config.port}")
    if bool(config.host) != bool(config.port):
        raise ConfigError("config: console.host and console.port go together (both empty/0: the metrics listener)")
    token = config.token.strip()
    if token and len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"config: console.token (CONSOLE_TOKEN) must be at least {MIN_TOKEN_LENGTH} characters "
                          "(or unset: a random one is made at start-up)")
    return ConsoleConfig(config.enabled, config.host, config.port, path, token)
