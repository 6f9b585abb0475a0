"""What a test needs from the machine, and what happens when it is missing.

``scripts/test`` (what CI runs) installs everything some tests drive: systemd (``systemd-analyze``),
util-linux (``setpriv``), fiu-utils (``fiu-run`` / ``fiu-ctrl``), and the venv's bench extras
(zipnn, the MiniLM weights). It runs as root, which the disk guard (a size-limited tmpfs) and the
other-uid tests need (those reach this checkout through a mirror when other users cannot enter
it, as in CI's clone under a ``mktemp -d`` directory: :mod:`tests._other_uid`). On a developer's
machine any of these may be missing and the test skips; under ``CI=true`` a missing requirement
is a failure naming what is missing, so a green CI run means every one of these tests ran.

Every test that depends on the machine calls :func:`require` (or :func:`missing`); none calls
``pytest.skip`` or ``skipif`` directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

CI_ENV = "CI"


def in_ci() -> bool:
    """``CI=true`` (or ``1`` / ``yes``, any case), as CI services set it."""
    return os.environ.get(CI_ENV, "").strip().lower() in ("true", "1", "yes")


def missing(what: str) -> NoReturn:
    """Skip the test because ``what`` (a sentence naming the missing thing) does not hold; under
    ``CI=true`` fail it instead, with the same sentence."""
    if in_ci():
        pytest.fail(
            f"{what} (CI=true: scripts/test provides this, so the test must run, not skip)",
            pytrace=False,
        )
    pytest.skip(what)


def require(condition: bool, what: str) -> None:
    """:func:`missing` unless ``condition``; ``what`` says what is missing when it is not."""
    if not condition:
        missing(what)


def first_blocked(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that other users cannot enter (no ``o+x``);
    None when every one is traversable."""
    for parent in [path, *path.parents][::-1]:
        try:
            mode = parent.stat().st_mode
        except OSError:
            continue
        if parent.is_dir() and not mode & 0o001:
            return parent
    return None


def blocked_for_others(path: Path) -> str:
    """Why other users cannot reach ``path``: the first directory on the way that they cannot
    enter (no ``o+x``), as a clause to append to a requirement; "" when every one is traversable."""
    parent = first_blocked(path)
    if parent is None:
        return ""
    mode = parent.stat().st_mode
    return (
        f"; {parent} (mode {mode & 0o7777:04o}) is not traversable by other users, so "
        f"nothing under it is: check out (or move) the repository where other users can "
        f"reach it, or `chmod o+x {parent}`"
    )
