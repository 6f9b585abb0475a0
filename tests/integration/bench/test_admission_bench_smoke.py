"""``bench/admission_bench.py --quick`` runs against the working tree and its default baseline
(the commit before the integrity fix: the old protocol, its own client), prints its table, writes
JSON lines, removes its scratch directory and stops every daemon it started.

It runs as a subprocess from the repository root, the way the README tells people to run it, on
3 jobs x 5 checkpoints, 5 snapshots per cell, 1 rep. How fast anything runs is not judged here
(speed is measured in ``bench/``); the timeout only stops a hang.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.admission_bench import BASELINE, FIGURES
from tests._requirements import require
from tests.integration.daemon_fixtures import clean_env, pid_alive

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.timeout(600)  # a hang, never a speed limit

REPS, SNAPSHOTS = 1, 5
CELLS = {(code, mode) for code in ("old", "new") for mode in ("guard", "common")}


def _has_baseline() -> bool:
    git = shutil.which("git")
    if git is None:
        return False
    probe = [git, "-C", str(REPO), "rev-parse", "--verify", f"{BASELINE}^{{commit}}"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def _table_rows(stdout: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and body rows of the markdown table whose first header is given."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} "))
    assert set(lines[start + 1]) <= {"|", "-"}, "no separator line under the table header"
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return header, rows


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    require(
        _has_baseline(), f"git, and a checkout holding commit {BASELINE} (the bench's old code)"
    )
    tmp = tmp_path_factory.mktemp("admission-bench")
    out, scratch = tmp / "admission.jsonl", tmp / "scratch"
    scratch.mkdir()
    env = clean_env(tmp / "env")  # no CKPTD_*, no user or system config
    args = ["--quick", "--reps", str(REPS), "--out", str(out), "--dir", str(scratch)]
    proc = subprocess.run(
        [sys.executable, "bench/admission_bench.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"admission_bench failed:\n{proc.stdout}\n{proc.stderr}"
    assert list(scratch.iterdir()) == [], "the bench left its scratch directory behind"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return proc.stdout, records


def test_table(run: tuple[str, list[dict[str, Any]]]) -> None:
    stdout, _ = run
    header, rows = _table_rows(stdout, "figure (ms)")
    assert header == ["figure (ms)", "old", "new", "old / new"]
    assert [r[0] for r in rows] == [name for name, _, _ in FIGURES]
    assert all(cell not in ("", "?") for row in rows for cell in row[1:]), rows
    assert f"old: {BASELINE} (" in stdout and "new: working tree" in stdout
    assert "daemons stopped: yes" in stdout


def test_cells(run: tuple[str, list[dict[str, Any]]]) -> None:
    _, records = run
    cells = [r for r in records if r["kind"] == "cell"]
    assert sorted((r["rep"], r["code"], r["mode"]) for r in cells) == sorted(
        (rep, code, mode) for rep in range(REPS) for code, mode in CELLS
    )
    for cell in cells:
        want = "DiskFullError" if cell["mode"] == "guard" else "committed"
        assert cell["outcomes"] == [want] * SNAPSHOTS, cell
        assert len(cell["admission_s"]) == SNAPSHOTS
        assert cell["status_probes"] >= 1 and cell["idle_probes"] >= 1
        assert cell["quick"] is True and cell["jobs"] == 3 and cell["checkpoints"] == 5


def test_figures(run: tuple[str, list[dict[str, Any]]]) -> None:
    _, records = run
    figures = {r["name"]: r for r in records if r["kind"] == "figure"}
    assert list(figures) == [name for name, _, _ in FIGURES]
    for fig in figures.values():
        assert len(fig["old"]["reps"]) == len(fig["new"]["reps"]) == REPS
        assert len(fig["ratio_old_over_new"]["reps"]) == REPS


def test_daemons_stopped_and_the_guard_read_every_job(
    run: tuple[str, list[dict[str, Any]]],
) -> None:
    _, records = run
    daemons = records[0]["daemons"]
    assert set(daemons) == {f"{code}-{mode}" for code, mode in CELLS}
    for label, st in daemons.items():
        assert st["stopped"] is True, f"daemon {label} was not stopped"
        assert not pid_alive(int(st["pid"])), f"daemon {label} (pid {st['pid']}) still runs"
        assert st["guard_skipped_job"] == 0 and st["tracebacks"] == 0, (label, st)
        # Each cell also takes one untimed snapshot first.
        refused = REPS * (SNAPSHOTS + 1) if label.endswith("guard") else 0
        assert st["refused"] == refused, (label, st)
