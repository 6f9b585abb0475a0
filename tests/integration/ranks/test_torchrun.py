"""``torchrun --nproc-per-node 4`` runs a DDP job over two daemons (two "nodes" on one root).

One launch (gloo on CPU, rendezvous on 127.0.0.1) checks as much as it can, since each rank
process costs seconds of imports: ranks 0-1 hand off to daemon A and ranks 2-3 to daemon B
(:func:`~tests.integration.ranks.trainer.socket_for` of ``LOCAL_RANK``); after three snapshots

* ``ckptd list --json`` shows three steps, each with ``world_size`` 4;
* each global record names the attempt the ranks agreed on, and the scanner finds every part and
  object it names;
* DDP's replicas are stored once: every rank's model tensors name the same objects;
* every rank's part of every step loads bit-identical to what that rank handed off (its digest
  in the rank's log), and ``Client.restore`` on each rank, in the same launch, gave back exactly
  what the rank handed off at the latest step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd.cli.main import main
from ckptd.format.restore import load_checkpoint
from ckptd.format.store import Store
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import REPO, DaemonFactory
from tests.integration.ranks.scan import assert_clean
from tests.integration.ranks.trainer import state_digest

daemons = daemon_fixtures.daemons
ckptd_env = daemon_fixtures.ckptd_env
pytestmark = pytest.mark.usefixtures("ckptd_env")

JOB = "ddp"
STEPS = 3
WORLD = 4
PACK_BYTES = 1 << 20  # store.pack_bytes: larger tensors are objects of their own


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rank_lines(out: Path, rank: int, word: str) -> list[list[str]]:
    text = (out / f"rank-{rank}.log").read_text()
    return [line.split()[1:] for line in text.splitlines() if line.startswith(word + " ")]


@pytest.mark.timeout(600)
def test_torchrun_ddp_over_two_daemons_commits_every_step_and_restores_each_rank(
    daemons: DaemonFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    a = daemons.start(socket_path=daemons.base / "a.sock")
    b = daemons.start(socket_path=daemons.base / "b.sock", root=a.root)
    out = daemons.base / "ranks"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(WORLD),
        "--nnodes",
        "1",
        "--rdzv-backend",
        "static",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "--local-addr",
        "127.0.0.1",
        "--max-restarts",
        "0",
        "--monitor-interval",
        "0.2",
        "-m",
        "tests.integration.ranks.trainer",
        "ddp",
        f"--job={JOB}",
        f"--root={a.root}",
        f"--sockets={a.socket},{b.socket}",
        f"--out={out}",
        f"--steps={STEPS}",
    ]
    env = daemons.env | {"OMP_NUM_THREADS": "1"}
    launch = subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    logs = {r: (out / f"rank-{r}.log") for r in range(WORLD)}
    assert launch.returncode == 0, (
        f"torchrun exited {launch.returncode}:\n{launch.stderr[-4000:]}\n"
        + "\n".join(f"rank {r}: {p.read_text()[-500:]}" for r, p in logs.items() if p.exists())
    )

    # Each rank used its node's daemon, and each daemon wrote two ranks' parts.
    for r in range(WORLD):
        assert rank_lines(out, r, "SOCKET") == [[str(a.socket if r < 2 else b.socket)]]
    for daemon, ranks in ((a, (0, 1)), (b, (2, 3))):
        text = daemon.log_text()
        for r in ranks:
            assert f"{JOB} step {STEPS} rank {r}/{WORLD} part durable" in text, text[-3000:]

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # the CLI in-process: no second torch import
        main(["list", JOB, "--root", str(a.root), "--json"])
    listed = capsys.readouterr()
    assert exited.value.code == 0, listed.err
    entries = json.loads(listed.out)
    assert [e["step"] for e in entries] == list(range(1, STEPS + 1))
    store = Store(a.root)
    for e in entries:
        assert e["world_size"] == WORLD, e
        assert store.read_manifest(JOB, e["step"]).world_size == WORLD

    scan = assert_clean(a.root, "after the torchrun job")
    assert scan.records == STEPS and scan.parts == STEPS * WORLD

    handed = {r: {int(s): (d, att) for s, d, att in rank_lines(out, r, "HANDED")} for r in logs}
    attempts = {att for by_step in handed.values() for _, att in by_step.values()}
    assert len(attempts) == 1, f"the ranks did not share one attempt: {attempts}"
    for r in range(WORLD):
        durable = rank_lines(out, r, "DURABLE")
        assert [d[:3] for d in durable] == [[str(s), str(r), str(WORLD)] for s in handed[r]]
    for step in range(1, STEPS + 1):
        record = store.read_manifest(JOB, step)
        assert record.is_global and record.world_size == WORLD
        assert record.attempt in attempts
        parts = store.step_parts(JOB, step)
        big = [
            {t.path: [p.object for p in t.pieces] for t in part.tensors if t.nbytes > PACK_BYTES}
            for part in parts
        ]
        assert {p.split(".")[0] for p in big[0]} == {"model", "optimizer"}, big[0]
        assert all(b == big[0] for b in big), "DDP replicas should share their objects"
        for r in range(WORLD):
            state = load_checkpoint(store, JOB, step, rank=r).state
            assert state["extra"]["rank"] == r
            assert state_digest(state) == handed[r][step][0], f"step {step} rank {r} differs"

    for r in range(WORLD):
        restored = rank_lines(out, r, "RESTORED")
        assert restored == [[str(STEPS), handed[r][STEPS][0]]], (
            f"rank {r} restored {restored}, handed off {handed[r][STEPS][0]} at step {STEPS}"
        )
    assert not os.listdir(a.root / JOB / "tmp")
