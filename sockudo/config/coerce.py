"""The one set of rules turning raw configuration values into typed ones.

Every section (the server keys, ``[rate_limiter]``/``[ssl]``, ``[push]``, ``[webhooks]``, the
apps) goes through these functions, so a value means the same thing wherever it is written.
Values come from TOML (typed), JSON (typed) or the environment (always strings):

- **booleans**: ``true``/``false``; the integers ``1``/``0``; the strings ``true``, ``false``,
  ``1``, ``0``, ``yes``, ``no``, ``on``, ``off`` (any case, surrounding blanks ignored).
- **whole numbers**: integers, integral floats (``2.0``) and strings of either (``"2"``,
  ``" 2.0 "``). ``2.5``, ``true``, ``inf`` and words are refused. Never below ``minimum``
  (0 unless the key says otherwise): ``-3`` is refused.
- **numbers** (fractions allowed): the same, fractions kept; never below ``minimum``.
- **strings**: strings, and integers written where a string is expected (an app ``id = 100``).
- **optional strings**: a string, or nothing (absent, ``null`` in JSON, or ``""``).
- **string lists**: a list of strings, or one comma-separated string (the environment's form).

Each failure is a :class:`ConfigError` whose message starts with ``config:`` and names the key.
Pure: no I/O.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, fields
from typing import Any

from sockudo.core.errors import ConfigError

TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})


def fail(key: str, requirement: str, value: Any) -> ConfigError:
    return ConfigError(f"config: {key} {requirement}, got {value!r}")


def to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise fail(key, "must be true or false", value)


def _number(key: str, value: Any, requirement: str) -> float | int:
    if isinstance(value, bool):
        raise fail(key, requirement, value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        number: float | int = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise fail(key, requirement, value) from None
    else:
        raise fail(key, requirement, value)
    if not math.isfinite(number):
        raise fail(key, requirement, value)
    return number


def _at_least(key: str, number: float | int, minimum: float | None, maximum: float | None, value: Any) -> None:
    if minimum is not None and number < minimum:
        raise fail(key, "must not be negative" if minimum == 0 else f"must be at least {minimum:g}", value)
    if maximum is not None and number > maximum:
        raise fail(key, f"must be at most {maximum:g}", value)


def to_int(key: str, value: Any, minimum: int | None = 0, maximum: int | None = None) -> int:
    """A whole number; integral floats and numeric strings included. ``minimum=None``: any sign."""
    number = _number(key, value, "must be a whole number")
    if isinstance(number, float):
        if not number.is_integer():
            raise fail(key, "must be a whole number", value)
        number = int(number)
    _at_least(key, number, minimum, maximum, value)
    return number


def to_float(key: str, value: Any, minimum: float | None = 0, maximum: float | None = None) -> float:
    number = float(_number(key, value, "must be a number"))
    _at_least(key, number, minimum, maximum, value)
    return number


def to_str(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise fail(key, "must be a string", value)


def to_optional_str(key: str, value: Any) -> str | None:
    if value is None:
        return None
    text = to_str(key, value)
    return text or None


def to_str_tuple(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"config: {key} must be a list of strings or a comma-separated string")


def node_address(key: str, value: str) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of one Redis node given as ``host:port`` or ``redis://host:port``
    (``rediss://``: TLS). Raises ConfigError naming ``key`` otherwise."""
    text = value.strip()
    tls = text.startswith("rediss://")
    rest = text.split("://", 1)[1] if "://" in text else text
    if "://" in text and not text.startswith(("redis://", "rediss://")):
        raise ConfigError(f"config: {key} entries must be host:port or redis://host:port, got {value!r}")
    rest = rest.rstrip("/").rsplit("@", 1)[-1]  # credentials belong in the password setting
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"config: {key} entries must be host:port or redis://host:port, got {value!r}")
    return host, int(port), tls


def table(key: str, value: Any) -> Mapping[str, Any]:
    """A TOML table / JSON object."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"config: {key} must be a table")
    return value


def suggestion(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean "x"?)`` for the closest known name, or nothing."""
    close = difflib.get_close_matches(name, sorted(set(candidates) - {name}), n=1, cutoff=0.75)
    return f' (did you mean "{close[0]}"?)' if close else ""


def unknown_key(path: str, name: str, candidates: Iterable[str]) -> ConfigError:
    return ConfigError(f"config: unknown key {path}{suggestion(name, candidates)}")


def check_keys(where: str, values: Mapping[str, Any], allowed: Iterable[str], hints: Iterable[str] = ()) -> None:
    """Refuse any key of ``values`` not in ``allowed``; ``where`` is the table's path (``""`` at the top).
    ``hints``: more names a "did you mean" may offer (keys another layer handles)."""
    known = set(allowed)
    for name in values:
        if name not in known:
            raise unknown_key(f"{where}.{name}" if where else name, name, known | set(hints))


# Coercers by the annotation text of a dataclass field (``from __future__ import annotations``).
_BY_ANNOTATION: dict[str, Callable[[str, Any], Any]] = {
    "bool": to_bool,
    "int": to_int,
    "float": to_float,
    "str": to_str,
    "str | None": to_optional_str,
    "tuple[str, ...]": to_str_tuple,
}


def coerce_field(key: str, annotation: Any, value: Any) -> Any:
    coercer = _BY_ANNOTATION.get(str(annotation))
    if coercer is None:
        raise ConfigError(f"config: {key} has an unsupported type")  # pragma: no cover (a schema bug)
    return coercer(key, value)


def build_values(cls: type, values: Mapping[str, Any], where: str, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Coerce ``values`` against the fields of dataclass ``cls`` (unknown keys refused).

    ``where`` is the table's path, ``""`` at the top; fields in ``skip`` are not settable here
    (nested tables the caller parses itself).
    """
    skipped = set(skip)
    known = {f.name: f for f in fields(cls) if f.name not in skipped}
    check_keys(where, values, known)
    prefix = f"{where}." if where else ""
    return {name: coerce_field(prefix + name, known[name].type, value) for name, value in values.items()}


def build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """A ``cls`` instance from raw ``values``, every other field at its default."""
    return cls(**build_values(cls, values, where))


def defaults(cls: type) -> dict[str, Any]:
    """The default value of each field of dataclass ``cls`` that has one."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out
