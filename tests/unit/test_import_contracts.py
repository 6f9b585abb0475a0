"""The import contracts bite: a deliberate violation makes ``lint-imports`` fail, naming the
contract, and ``scripts/import_cycles.py`` counts a planted cycle.

Each case copies ``ckptd/`` and ``client/ckptd_client/`` into a temporary tree, adds one import
line to one module, and runs the tools on the copy (first on ``PYTHONPATH``) with the project's
own contracts (``pyproject.toml``). The real tree is checked by the test command itself
(``scripts/test`` runs ``lint-imports``); here it is the control: it passes, with 0 cycles.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def copy_tree(dest: Path) -> Path:
    shutil.copytree(REPO / "ckptd", dest / "ckptd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        REPO / "client" / "ckptd_client",
        dest / "ckptd_client",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    shutil.copytree(REPO / "scripts", dest / "scripts")
    return dest


def plant(tree: Path, module: str, line: str) -> None:
    path = tree.joinpath(*module.split(".")).with_suffix(".py")
    if not path.exists():
        path = tree.joinpath(*module.split("."), "__init__.py")
    path.write_text(path.read_text() + f"\n{line}\n")


def run(tree: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return run(tree, str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml"))


def cycles(tree: Path) -> subprocess.CompletedProcess[str]:
    # The script puts the repository it sits in first on sys.path: the copy.
    return run(tree, sys.executable, str(tree / "scripts" / "import_cycles.py"))


def test_the_tree_as_it_is_keeps_every_contract(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    got = lint(tree)
    assert got.returncode == 0, got.stdout + got.stderr
    assert "Contracts: " in got.stdout and " broken" in got.stdout
    assert "0 broken" in got.stdout
    counted = cycles(tree)
    assert counted.returncode == 0, counted.stdout + counted.stderr
    assert "0 cycle(s), 0 module(s) in a cycle" in counted.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        (
            "ckptd.format.codec",
            "import ckptd_client",
            "ckptd never imports the client library",
        ),
        (
            "ckptd.format.manifest",
            "import ckptd.daemon.lifecycle",
            "ckptd: each part imports only the parts below it",
        ),
        (
            "ckptd.policy.retention",
            "import ckptd.pipeline.write",
            "ckptd: each part imports only the parts below it",
        ),
        (
            "ckptd_client.state",
            "import ckptd.cli.main",
            "the client never imports the daemon or the CLI",
        ),
    ],
    ids=["ckptd-imports-client", "format-imports-daemon", "policy-imports-pipeline", "client-cli"],
)
def test_a_planted_violation_fails_naming_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    tree = copy_tree(tmp_path)
    plant(tree, module, line)
    got = lint(tree)
    assert got.returncode != 0, got.stdout
    broken = got.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, got.stdout


def test_a_planted_cycle_is_counted_and_breaks_the_acyclic_contract(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    # errors is the bottom layer; importing the protocol from it closes a cycle
    # (protocol imports errors).
    plant(tree, "ckptd.errors", "import ckptd.protocol")
    counted = cycles(tree)
    assert counted.returncode == 1, counted.stdout
    assert "cycle: ckptd.errors <-> ckptd.protocol" in counted.stdout
    assert "1 cycle(s), 2 module(s) in a cycle" in counted.stdout
    got = lint(tree)
    assert got.returncode != 0
    assert "no import cycles between the modules of any package" in got.stdout
