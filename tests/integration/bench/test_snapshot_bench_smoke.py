"""``bench/snapshot_bench.py --quick`` runs, prints its table and targets, writes JSON lines and
stops the daemons it started.

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
    assert len(rows[0]) == 5
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
