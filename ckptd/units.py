"""Units: byte sizes as people write them in a config file or on a command line.

A leaf module (it imports only :mod:`ckptd.errors`), so config, policy and the CLI can all parse a
size without importing one another.
"""

from __future__ import annotations

import re

from ckptd.errors import ConfigError

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)


def parse_size(value: object, key: str) -> int:
    """Parse a byte size: an integer, or a string like ``"8MiB"``, ``"1.5 GiB"``, ``"100MB"``.

    ``Ki``/``Mi``/``Gi``/``Ti`` are powers of 1024, ``K``/``M``/``G``/``T`` powers of 1000. A value
    that is neither raises :class:`~ckptd.errors.ConfigError` naming ``key``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m:
            unit = (m.group(2) or "").lower().removesuffix("b")
            power = "kmgt".index(unit[0]) + 1 if unit else 0
            factor = (1024 if unit.endswith("i") else 1000) ** power
            return int(float(m.group(1)) * factor)
    raise ConfigError(
        f'{key}: expected a size in bytes (an integer, or a string such as "8MiB"), got {value!r}'
    )


_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object, key: str) -> float:
    """Parse a duration in seconds: a number, or a string like ``"90s"``, ``"30m"``, ``"1h"``,
    ``"2d"``. Anything else (negative included) raises :class:`~ckptd.errors.ConfigError`."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        if m:
            return float(m.group(1)) * _SECONDS[(m.group(2) or "").lower()]
    raise ConfigError(
        f'{key}: expected a duration (seconds, or a string such as "30m" or "1h"), got {value!r}'
    )
