"""``bench/snapshot_bench.py --quick`` (and ``--size demo``) and ``bench/overlap_bench.py --quick``
run, print their tables and targets, write JSON lines and stop the daemons they started.

It runs as a subprocess from the repository root, the way the README tells people to run it, on a
4 MiB state. How fast it runs is not judged here (speed is measured in ``bench/``); the timeout
only stops a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon_fixtures import clean_env

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.timeout(600)  # a hang, never a speed limit


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; only its parent's wait() is missing.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("snapshot-bench")
    out = tmp / "snapshot.jsonl"
    env = clean_env(tmp / "env")  # no CKPTD_*, no user or system config
    proc = subprocess.run(
        [
            sys.executable,
            "bench/snapshot_bench.py",
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
    assert proc.returncode == 0, f"snapshot_bench failed:\n{proc.stdout}\n{proc.stderr}"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # The bench made its scratch directory under --root and removed it.
    assert list((tmp / "root").iterdir()) == []
    return proc.stdout, records


def test_table(run: tuple[str, list[dict[str, Any]]]) -> None:
    stdout, _ = run
    rows = _table_rows(stdout, "method")
    labels = [r[0] for r in rows]
    for must in (
        "copy_ into reused buffers (floor)",
        "ckptd snapshot, first (no prepare)",
        "ckptd snapshot, prepared (steady)",
        "torch.save+fsync",
        "dcp.save",
    ):
        assert must in labels, f"no table row {must!r} in {labels}"
    assert len(rows[0]) == 6
    floor = rows[labels.index("copy_ into reused buffers (floor)")]
    assert floor[2] == "—" and floor[3] == "1.00"
    steady = rows[labels.index("ckptd snapshot, prepared (steady)")]
    assert float(steady[1]) > 0 and float(steady[2]) >= float(steady[1])
    assert "daemon memory while persisting" in stdout
    assert "Targets:" in stdout and "durable latency / torch.save+fsync" in stdout
    assert "daemons stopped: yes" in stdout


def test_json_lines(run: tuple[str, list[dict[str, Any]]]) -> None:
    _, records = run
    methods = {r["method"]: r for r in records if r["kind"] == "method"}
    assert {"floor", "ckptd-first", "ckptd", "torch.save", "dcp.save"} <= set(methods)
    ckptd = methods["ckptd"]
    assert ckptd["blocked_s"]["median"] > 0
    assert ckptd["done_s"]["median"] >= ckptd["blocked_s"]["median"]
    assert ckptd["extra"]["written_bytes"]["median"] > 0  # each rep wrote new data
    assert methods["floor"]["done_s"] is None
    mem = [r for r in records if r["kind"] == "daemon_memory" and r["daemon"] == "default"]
    assert mem and mem[0]["peak_rss_anon"] > 0 and mem[0]["peak_vmrss"] >= mem[0]["peak_rss_anon"]
    targets = {r["name"] for r in records if r["kind"] == "target"}
    assert "durable latency / torch.save+fsync" in targets
    assert all(r["quick"] is True and r["state_bytes"] > 0 for r in records)


def test_daemons_stopped(run: tuple[str, list[dict[str, Any]]]) -> None:
    _, records = run
    final = next(r for r in records if r["kind"] == "daemons")["daemons"]
    assert final, "no daemon recorded"
    for name, st in final.items():
        assert st["stopped"] is True, f"daemon {name} was not stopped"
        assert st["commits"] >= 1
        assert not _pid_alive(int(st["pid"])), f"daemon {name} (pid {st['pid']}) still runs"


def test_fixed_cost(run: tuple[str, list[dict[str, Any]]]) -> None:
    """Every method but the floor has a fixed cost (blocked - floor) column and record; the
    steady ckptd snapshot's is checked against the 2 ms target."""
    stdout, records = run
    rows = _table_rows(stdout, "method")
    labels = [r[0] for r in rows]
    assert rows[labels.index("copy_ into reused buffers (floor)")][4] == "—"
    float(rows[labels.index("ckptd snapshot, prepared (steady)")][4])
    methods = {r["method"]: r for r in records if r["kind"] == "method"}
    assert methods["ckptd"]["blocked_minus_floor_s"]["reps"]
    fixed = [r for r in records if r["kind"] == "fixed_cost"]
    assert len(fixed) == 1 and fixed[0]["method"] == "ckptd"
    assert fixed[0]["limit_s"] == 0.002 and fixed[0]["applies"] is False  # quick is not a target
    assert "fixed cost (steady stall - copy floor, paired per rep)" in stdout


def _bench(tmp: Path, *args: str) -> tuple[str, list[dict[str, Any]]]:
    """Run ``python <args> --out F --root R`` from the repository root; its stdout and records."""
    out = tmp / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, *args, "--out", str(out), "--root", str(tmp / "root")],
        cwd=REPO,
        env=clean_env(tmp / "env"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    assert list((tmp / "root").iterdir()) == []
    return proc.stdout, [json.loads(line) for line in out.read_text().splitlines()]


def test_demo_size(tmp_path: Path) -> None:
    """``--size demo``: the README demo's state (model, AdamW, scheduler, extra), 1.2 MB."""
    stdout, records = _bench(
        tmp_path,
        "bench/snapshot_bench.py",
        "--size",
        "demo",
        "--reps",
        "1",
        "--skip",
        "dcp.async-process,ckptd-raw,dcp.async-default,dcp.save",
    )
    assert "### Snapshot benchmark: 1.2 MB state" in stdout
    fixed = next(r for r in records if r["kind"] == "fixed_cost")
    assert fixed["applies"] is True and fixed["size"] == "demo"
    assert 1_100_000 < fixed["state_bytes"] < 1_300_000
    assert "daemons stopped: yes" in stdout


def test_overlap_bench_quick(tmp_path: Path) -> None:
    """``bench.overlap_bench --quick``: the loop bench's table, targets and JSON lines; its
    daemon stopped."""
    stdout, records = _bench(tmp_path, "bench/overlap_bench.py", "--quick")
    rows = _table_rows(stdout, "method")
    labels = [r[0] for r in rows]
    assert labels == [
        "copy_ into reused buffers (floor)",
        "the same copy on a thread, step waits (overlapped floor)",
        "ckptd snapshot, overlap=False (today's path)",
        "ckptd snapshot, overlap=True",
        "dcp.async_save, thread, reused DefaultStager",
    ]
    assert all(len(r) == 6 for r in rows)
    assert rows[0][2] == "1.00"  # the floor's call over itself
    methods = {r["method"]: r for r in records if r["kind"] == "method"}
    for name, rec in methods.items():
        assert rec["call_s"]["median"] > 0, name
        assert len(rec["pair_samples"]) == 1 and len(rec["pair_samples"][0]) == 1  # 1 rep, 1 pair
        assert rec["pairs"] == 1 and rec["reps"] == 1
        pair = rec["pair_samples"][0][0]
        assert pair["plain_s"] > 0 and pair["with_s"] > pair["call_s"]
    assert methods["floor"]["hook_wait_s"]["median"] == 0
    assert methods["floor-overlap"]["hook_wait_s"]["median"] >= 0
    assert methods["ckptd-overlap"]["hook_wait_s"]["median"] >= 0
    loop = next(r for r in records if r["kind"] == "loop")
    assert loop["compute_threads"] >= 1 and loop["fwd_bwd_s"]["median"] > 0
    targets = {r["name"] for r in records if r["kind"] == "target"}
    assert targets == {
        "overlap snapshot() call / copy floor",
        "overlap loop added time / copy floor",
    }
    assert "daemon stopped: yes" in stdout
    assert all(r["quick"] is True and r["daemon_stopped"] is True for r in records)
