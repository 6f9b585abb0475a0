"""tests._requirements: a missing requirement skips, and fails under CI=true, naming itself."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests._requirements import blocked_for_others, in_ci, missing, require


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_ci_true_turns_a_missing_requirement_into_a_failure(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci()
    require(True, "never reported")
    with pytest.raises(pytest.fail.Exception) as failed:
        require(False, "fiu-utils is not installed")
    assert str(failed.value).startswith("fiu-utils is not installed (CI=true: scripts/test")
    with pytest.raises(pytest.fail.Exception):
        missing("systemd-analyze is missing")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_outside_ci_a_missing_requirement_skips(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception) as skipped:
        require(False, "setpriv (util-linux) is not installed")
    assert str(skipped.value) == "setpriv (util-linux) is not installed"


def test_blocked_for_others_names_the_first_directory_they_cannot_enter() -> None:
    base = Path(tempfile.mkdtemp(prefix="ckreq", dir="/tmp"))  # pytest's tmp dirs are private
    try:
        base.chmod(0o755)
        outer = Path(tempfile.mkdtemp(dir=base))  # mode 0700, as `mktemp -d` makes it
        inner = outer / "repo" / ".venv"
        inner.mkdir(parents=True)
        why = blocked_for_others(inner)
        assert why.startswith(f"; {outer} (mode 0700) is not traversable by other users"), why
        assert why.endswith(f"`chmod o+x {outer}`")
        outer.chmod(0o755)
        assert blocked_for_others(inner) == ""
    finally:
        shutil.rmtree(base)
