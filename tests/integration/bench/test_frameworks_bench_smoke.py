"""``bench.frameworks_bench --quick`` runs as bench/README.md says: the HF Trainer and Lightning,
each without checkpoints, with their own checkpoints and through ckptd's adapters, against a
daemon it starts; it prints its table, writes JSON lines, removes what it wrote and stops the
daemon.

It runs as a subprocess from the repository root (real frameworks, a 0.2M-parameter model, 4
timed steps after 4 untimed ones, a checkpoint every 2, one rep). How fast anything runs is not
judged here (speed is measured in ``bench/``); the timeout only stops a hang.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests._requirements import require
from tests.integration.daemon_fixtures import clean_env

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.timeout(600)  # a hang, never a speed limit

ROWS = {
    ("hf", "none"),
    ("hf", "own"),
    ("hf", "ckptd"),
    ("lightning", "none"),
    ("lightning", "own"),
    ("lightning", "ckptd"),
}


def test_frameworks_quick(tmp_path: Path) -> None:
    for module, extra in (("transformers", "hf"), ("lightning", "lightning")):
        require(
            importlib.util.find_spec(module) is not None,
            f"{module} is not installed (pip install 'ckptd[{extra}]'; scripts/test installs it)",
        )
    out = tmp_path / "frameworks_bench.jsonl"
    work = tmp_path / "work"
    env = clean_env(tmp_path / "env", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.frameworks_bench",
            "--quick",
            "--out",
            str(out),
            "--root",
            str(work),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"frameworks_bench failed:\n{proc.stdout}\n{proc.stderr}"
    assert "daemon stopped: yes" in proc.stdout
    assert "train_runtime" not in proc.stdout, "the HF Trainer printed its metrics"

    lines = proc.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| framework, method "))
    body = [ln for ln in lines[start + 2 :] if ln.startswith("|")]
    assert len(body) == len(ROWS), "\n".join(lines[start:])

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["framework"], r["method"]) for r in records} == ROWS
    for r in records:
        assert r["kind"] == "framework_goodput"
        assert r["quick"] is True
        assert r["steps"] == 4
        assert r["steps_per_s"]["median"] > 0
        assert r["pct_of_none"]["median"] > 0
        assert r["loop_s"]["median"] > 0
        assert r["tail_s"]["median"] >= 0
        if r["method"] == "none":  # one before each of the framework's two checkpointing runs
            assert len(r["foreign_cpu"]) == 2
            assert r["checkpoints"] == 0
            continue
        assert len(r["foreign_cpu"]) == 1
        assert r["checkpoints"] == 2  # timed steps 5-8: checkpoints at 6 and 8
        assert [len(each) for each in r["stall_each_checkpoint_s"]] == [2]
        # Each checkpoint holds the model and AdamW's two moments: 3 x 4 bytes per parameter.
        assert r["checkpoint_bytes"] >= 12 * r["params"], r
    assert list(work.iterdir()) == [], "the bench left files under --root"
