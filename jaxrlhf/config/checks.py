"""Checks shared by the config sections: each failure is a one-line `ConfigError` naming the dotted key."""

from __future__ import annotations

import contextvars

# False while the planner reads a config: it needs each model's config.json, not the data files.
CHECK_DATA_FILES = contextvars.ContextVar("check_data_files", default=True)


class ConfigError(ValueError):
    """A bad configuration; the message is one line that names the offending key or file."""


def require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {problem}")


def at_least(section: object, key: str, minimum: float, *names: str) -> None:
    """Each named field of `section` (found at dotted `key`) must be >= minimum."""
    for name in names:
        value = getattr(section, name)
        require(value >= minimum, f"{key}.{name}" if key else name, f"must be >= {minimum}, got {value}")


def is_non_negative_number(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False
