"""``bench.goodput_bench --quick`` and ``bench.plots`` run as the README says and write their
outputs.

Both run as subprocesses from the repository root: the goodput smoke run (a 0.2M-parameter model,
6 steps, one rep of each method, its own daemon) takes ~15 s on the 2-core CI machine, the plots a
few seconds (a hard limit of 90 s in all).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 90
METHODS = {"none", "ckptd", "ckptd-nice0", "torch.save", "dcp.async", "dcp.save"}


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_goodput_quick_and_plots(tmp_path: Path) -> None:
    start = time.monotonic()
    results = tmp_path / "results"
    results.mkdir()
    out = results / "goodput_bench.jsonl"
    work = tmp_path / "work"
    gp = _run(["bench.goodput_bench", "--quick", "--out", str(out), "--root", str(work)], TIMEOUT_S)
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

    # the size plots need store/snapshot results: use the committed ones when present
    for src in sorted((REPO / "bench" / "results").glob("store_bench-*.jsonl")):
        if not src.stem.endswith("-quick"):
            shutil.copy(src, results / src.name)
    have_sizes = any(results.glob("store_bench-*.jsonl"))
    pngs = tmp_path / "png"
    left = TIMEOUT_S - (time.monotonic() - start)
    plots = _run(["bench.plots", "--results", str(results), "--out", str(pngs)], max(left, 10))
    assert (pngs / "goodput.png").stat().st_size > 10_000
    for name in ("stall_vs_size.png", "durable_vs_size.png"):
        if have_sizes:
            assert (pngs / name).stat().st_size > 10_000
        else:
            assert f"{name}: skipped" in plots.stdout
    assert time.monotonic() - start < TIMEOUT_S
