"""``bench.goodput_bench --quick`` and ``bench.plots`` run as the README says and write their
outputs.

Both run as subprocesses from the repository root: the goodput smoke run (a 0.2M-parameter model,
6 steps, one rep of each method, its own daemon), then the plots. How fast they run is not judged
here (speed is measured in ``bench/``); the timeout only stops a hang.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.daemon_fixtures import clean_env

REPO = Path(__file__).resolve().parents[3]
METHODS = {"none", "ckptd", "ckptd-overlap", "ckptd-nice0", "torch.save", "dcp.async", "dcp.save"}
pytestmark = pytest.mark.timeout(900)  # a hang, never a speed limit


def _run(args: list[str], env_dir: Path) -> subprocess.CompletedProcess[str]:
    env = clean_env(env_dir, MPLBACKEND="Agg")  # no CKPTD_*, no user or system config
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_goodput_quick_and_plots(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    out = results / "goodput_bench.jsonl"
    work = tmp_path / "work"
    env_dir = tmp_path / "env"
    gp = _run(["bench.goodput_bench", "--quick", "--out", str(out), "--root", str(work)], env_dir)
    assert "| method " in gp.stdout
    assert "daemon stopped: yes" in gp.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    goodput = [r for r in records if r.get("kind") == "goodput"]
    assert {r["method"] for r in goodput} == METHODS
    for r in goodput:
        assert r["steps_per_s"]["median"] > 0
        assert r["pct_of_none"]["median"] > 0
        if r["method"] != "none":
            assert r["checkpoints"] == 3  # steps 2, 4, 6
            assert r["stall_s"]["median"] > 0
            assert r["tail_s"]["median"] >= 0
    assert list(work.iterdir()) == [], "the bench left files under --root"
    # each ckptd method against dcp.async_save, rep by rep
    versus = {r["method"]: r for r in records if r.get("kind") == "versus"}
    assert set(versus) == {"ckptd", "ckptd-overlap", "ckptd-nice0"}
    for r in versus.values():
        assert r["reference"] == "dcp.async" and r["reps"] == 1
        assert r["pct_of_none_ratio"]["median"] > 0 and 0 <= r["ahead_reps"] <= 1
    assert "- ckptd-overlap / dcp.async (% of none, per rep): " in gp.stdout
    overlap = next(r for r in goodput if r["method"] == "ckptd-overlap")
    assert overlap["label"] == "ckptd Client(overlap=True).snapshot"
    assert overlap["extra"]["client_stall_s"]["median"] > 0

    # the size plots need store/snapshot results: the committed ones (bench/results/)
    committed = [
        src
        for src in sorted((REPO / "bench" / "results").glob("store_bench-*.jsonl"))
        if not src.stem.endswith("-quick")
    ]
    assert committed, "bench/results/ holds no store_bench-<size>.jsonl"
    for src in committed:
        shutil.copy(src, results / src.name)
    pngs = tmp_path / "png"
    _run(["bench.plots", "--results", str(results), "--out", str(pngs)], env_dir)
    for name in ("goodput.png", "stall_vs_size.png", "durable_vs_size.png"):
        assert (pngs / name).stat().st_size > 10_000, name
