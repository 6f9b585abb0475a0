"""``bench/ranks_bench.py --quick --ranks 2`` runs one real ``torchrun`` launch of 2 ranks (gloo on
127.0.0.1) against 2 daemons over one root, prints its table, writes JSON lines, removes its
scratch directory and stops the daemons it started.

It runs as a subprocess from the repository root, the way bench/README.md tells people to run
it, on a 4 MiB state per rank and 1 rep. How fast anything runs is not judged here (speed is
measured in ``bench/``); the timeout only stops a hang.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon_fixtures import clean_env, pid_alive

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.timeout(600)  # a hang, never a speed limit

LABELS = ("ckptd snapshot", "dcp.async_save", "dcp.async_save, async staging", "dcp.save")


def _table(stdout: str, first_header: str) -> tuple[list[str], list[list[str]]]:
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
    tmp = tmp_path_factory.mktemp("ranks-bench")
    out = tmp / "ranks.jsonl"
    env = clean_env(tmp / "env")  # no CKPTD_*, no user or system config
    proc = subprocess.run(
        [
            sys.executable,
            "bench/ranks_bench.py",
            "--quick",
            "--ranks",
            "2",
            "--out",
            str(out),
            "--root",
            str(tmp / "root"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"ranks_bench failed:\n{proc.stdout}\n{proc.stderr}"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # The bench made its scratch directory (store and dcp files) under --root and removed it.
    assert list((tmp / "root").iterdir()) == []
    return proc.stdout, records


def test_table(run: tuple[str, list[dict[str, Any]]]) -> None:
    stdout, _ = run
    header, rows = _table(stdout, "ranks")
    assert header[3:] == [
        "stall per rank s",
        "stall x dcp.async_save",
        "to global commit s",
        "commit x dcp.async_save",
    ]
    assert [r[2] for r in rows] == list(LABELS)
    assert {r[0] for r in rows} == {"2"}
    by_label = {r[2]: r for r in rows}
    assert by_label["dcp.async_save"][4] == "1.00" and by_label["dcp.async_save"][6] == "1.00"
    for label in LABELS:
        stall = float(by_label[label][3].split()[0])  # median [min-max] over the ranks
        commit = float(by_label[label][5])  # one rep
        assert stall > 0 and commit > 0, by_label[label]
    assert "ckptd, 2 ranks, quick: " in stdout
    assert "daemons stopped: yes" in stdout


def test_json_lines(run: tuple[str, list[dict[str, Any]]]) -> None:
    _, records = run
    assert all(r["quick"] is True and r["bench"] == "ranks_bench" for r in records)
    methods = {r["method"]: r for r in records if r["kind"] == "method"}
    assert set(methods) == {"ckptd", "dcp.async", "dcp.async-staging", "dcp.save"}
    ckptd = methods["ckptd"]
    assert ckptd["world_size"] == 2 and len(ckptd["per_rank_stall_s"]) == 2
    # The global record appears only once both ranks' parts are durable.
    assert ckptd["commit_s"]["median"] > 0
    assert ckptd["written_bytes_per_step"]["median"] > 0  # the rep wrote new data
    assert methods["dcp.async"]["stall_vs_ref"]["median"] == 1.0
    # dcp.save blocks until the checkpoint is complete: its stall is its commit.
    save = methods["dcp.save"]
    assert save["stall_s"]["max"] >= save["commit_s"]["min"] - 0.05
    run_rec = next(r for r in records if r["kind"] == "run")
    assert run_rec["reps"] == 1 and run_rec["world_size"] == 2


def test_daemons_stopped(run: tuple[str, list[dict[str, Any]]]) -> None:
    _, records = run
    final = next(r for r in records if r["kind"] == "daemons")["daemons"]
    assert set(final) == {"A", "B"}
    for name, st in final.items():
        assert st["stopped"] is True, f"daemon {name} was not stopped"
        assert not pid_alive(int(st["pid"])), f"daemon {name} (pid {st['pid']}) still runs"
