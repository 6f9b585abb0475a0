"""``bench.jobs_bench --quick`` runs as its docstring says and writes its outputs.

It runs as a subprocess from the repository root (64 MiB beside 4 MiB, one rep, its own two
daemons). How fast anything is is not judged here (speed is measured in ``bench/``); the timeout
only stops a hang.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.daemon_fixtures import clean_env

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.timeout(600)  # a hang, never a speed limit


def test_jobs_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "jobs_bench.jsonl"
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.jobs_bench", "--quick", "--out", out, "--root", work],
        cwd=REPO,
        env=clean_env(tmp_path / "env"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"jobs_bench failed:\n{proc.stdout}\n{proc.stderr}"
    assert "| daemon " in proc.stdout
    assert "daemon stopped: yes" in proc.stdout
    assert "target: the small job's durable latency" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    summaries = {r["daemon"]: r for r in records if r["kind"] == "summary"}
    assert {d: r["concurrent_jobs"] for d, r in summaries.items()} == {
        "concurrent": 2,
        "serial": 1,
    }
    for r in summaries.values():
        assert r["reps"] == 1
        assert r["small_ratio"]["median"] > 0 and r["big_ratio"]["median"] > 0
        assert r["small_alone_s"]["median"] > 0
    reps = [r for r in records if r["kind"] == "rep"]
    assert len(reps) == 2 and all(r["small_handed_off_after_s"] > 0 for r in reps)
    assert all(r["quick"] and r["big_bytes"] == 64 << 20 for r in records)
    assert list(work.iterdir()) == [], "the bench left files under --root"
