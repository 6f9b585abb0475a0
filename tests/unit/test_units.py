"""ckptd.units: sizes as config and the command line write them."""

from __future__ import annotations

import pytest

from ckptd.errors import ConfigError
from ckptd.units import parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8MiB", 8 << 20),
        ("1.5 GiB", 3 << 29),
        ("100MB", 100_000_000),
        ("64KiB", 64 << 10),
        ("64 kib", 64 << 10),
        ("2T", 2 * 10**12),
        ("2TiB", 2 << 40),
        ("1K", 1000),
        ("1Ki", 1024),
        ("512B", 512),
        ("512", 512),
        (" 7 MiB ", 7 << 20),
        ("0.5KiB", 512),
    ],
)
def test_size_strings(text: str, expected: int) -> None:
    assert parse_size(text, "k") == expected


def test_size_integers_pass_through() -> None:
    assert parse_size(4096, "k") == 4096


@pytest.mark.parametrize(
    "value", ["8 MiBs", "1e3", "-1", "", "MiB", "8 PiB", "8 Mi B", True, 1.5, None, [8]]
)
def test_bad_sizes(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^store\.x: expected a size in bytes"):
        parse_size(value, "store.x")
