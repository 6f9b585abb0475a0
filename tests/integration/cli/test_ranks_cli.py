"""The operator CLI on multi-rank steps (issue 13): every command treats a step written by several
ranks as one checkpoint, and names the rank when a part is at fault.

* ``list`` / ``show`` give the world size (table and ``--json``), ``show`` lists the parts and
  ``show --rank R`` one rank's tensors;
* ``verify`` checks every part and names the rank of a missing or damaged part (exit 7);
* ``rm``, ``pin`` and ``prune`` act on whole steps: the global record and every part go together;
* ``gc`` collects the parts of a step that can never commit (overtaken by a newer commit, or older
  than ``ranks.pending_timeout``), and only those;
* ``restore`` exports one rank's part (``--rank R``) and refuses a multi-rank step without it;
* ``status`` shows the steps a daemon waits on, with the missing ranks.

Steps are written in-process with ``ckptd_client.save(..., rank=, world_size=, attempt=)`` (one
call per rank: the call that writes the last part commits the step); only ``status`` needs a
daemon. Part ages are set with ``os.utime`` rather than waited for.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import ckptd_client
from ckptd.errors import EXIT_CODES
from ckptd.format.store import Store
from ckptd_client import Client
from tests.integration import daemon_fixtures
from tests.integration.cli.test_cli import (
    CLI,
    CORRUPT,
    USAGE,
    cli,
    flip_byte,
    table_rows,
)
from tests.integration.daemon_fixtures import DaemonFactory, wait_until

daemons = daemon_fixtures.daemons
__all__ = ["cli", "daemons"]  # fixtures used by the tests below

RANK_LAYOUT = EXIT_CODES["RankLayoutError"]
WORLD = 3
ATTEMPT = "a1"


def rank_state(step: int, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s state at ``step``: a tensor every rank holds alike (stored once), one of
    its own larger than a pack (an object of its own) and a plain value."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {
        "shared": torch.arange(1000, dtype=torch.float32) + step,
        "own": torch.randn(300_000, generator=g),
        "meta": {"rank": rank, "step": step},
    }


def save_step(
    root: Path, step: int, ranks: range | list[int] = range(WORLD), job: str = "ddp"
) -> None:
    """Hand off ``step`` for each of ``ranks`` (of :data:`WORLD`), in-process."""
    for rank in ranks:
        ckptd_client.save(
            job,
            step=step,
            state=rank_state(step, rank),
            root=root,
            rank=rank,
            world_size=WORLD,
            attempt=ATTEMPT,
        )


def part_file(root: Path, step: int, rank: int, job: str = "ddp") -> Path:
    return root / job / "parts" / f"step-{step:012d}" / ATTEMPT / f"rank-{rank:05d}.json"


def objects_on_disk(root: Path, job: str = "ddp") -> set[str]:
    return {p.name for p in (root / job / "objects").glob("??/*")}


def needed_objects(root: Path, job: str = "ddp") -> set[str]:
    store = Store(root)
    out: set[str] = set()
    for step in store.steps(job):
        for part in store.step_parts(job, step):
            out.update(part.objects)
    return out


def age(paths: list[Path], seconds: float) -> None:
    """Set the mtime of ``paths`` ``seconds`` into the past (what the collection rules read)."""
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


# ---- list, show --------------------------------------------------------------------------------


def test_list_and_show_give_world_size_and_parts(root: Path, cli: CLI) -> None:
    save_step(root, 1)
    save_step(root, 2)
    ckptd_client.save("solo", step=7, state={"w": torch.ones(10)}, root=root)
    store = Store(root)
    record = store.read_manifest("ddp", 2)

    res = cli("list", "--root", root, "--json")
    assert res.code == 0, res
    docs = {(d["job"], d["step"]): d for d in json.loads(res.out)}
    assert set(docs) == {("ddp", 1), ("ddp", 2), ("solo", 7)}
    assert docs[("ddp", 2)]["world_size"] == WORLD
    assert docs[("ddp", 2)]["tensors"] == 2 * WORLD
    assert (
        docs[("ddp", 2)]["raw_bytes"]
        == record.raw_bytes
        == sum(p.raw_bytes for p in store.step_parts("ddp", 2))
    )
    assert docs[("ddp", 2)]["stored_bytes"] == record.stored_bytes
    assert docs[("ddp", 2)]["latest"] is True
    assert docs[("solo", 7)]["world_size"] == 1
    assert docs[("solo", 7)]["tensors"] == 1

    res = cli("list", "--root", root)
    assert res.code == 0, res
    header = next(line for line in res.out.splitlines() if "┃" in line)
    columns = [c.strip() for c in header.split("┃")]
    rows = {(r[0], r[1]): dict(zip(columns, r, strict=True)) for r in table_rows(res.out)}
    assert rows[("ddp", "2")]["ranks"] == "3"
    assert rows[("ddp", "2")]["tensors"] == "6"
    assert rows[("solo", "7")]["ranks"] == "1"

    res = cli("show", "ddp", "2", "--root", root, "--json")
    assert res.code == 0, res
    doc = json.loads(res.out)
    assert (doc["world_size"], doc["attempt"], doc["tensors"]) == (WORLD, ATTEMPT, 2 * WORLD)
    assert [p["rank"] for p in doc["parts"]] == list(range(WORLD))
    for p, part in zip(doc["parts"], store.step_parts("ddp", 2), strict=True):
        assert p["record"] == f"parts/step-000000000002/{ATTEMPT}/rank-{p['rank']:05d}.json"
        assert (root / "ddp" / p["record"]).is_file()
        assert (p["tensors"], p["raw_bytes"], p["digest"]) == (2, part.raw_bytes, part.digest)

    res = cli("show", "ddp", "2", "--root", root)
    assert res.code == 0, res
    assert "3 ranks (attempt a1)" in res.out
    parts = table_rows(res.out)
    assert [r[0] for r in parts] == ["0", "1", "2"]
    assert parts[1][1] == "2" and parts[1][-1].endswith("rank-00001.json")

    res = cli("show", "ddp", "latest", "--rank", "1", "--root", root, "--json")
    assert res.code == 0, res
    doc = json.loads(res.out)
    assert (doc["step"], doc["rank"], doc["world_size"]) == (2, 1, WORLD)
    assert {t["path"]: t["shape"] for t in doc["tensors"]} == {"shared": [1000], "own": [300_000]}
    assert "meta.rank = 1" in doc["keys"]
    res = cli("show", "ddp", "2", "--rank", "1", "--root", root)
    assert res.code == 0, res
    assert res.out.startswith("ddp step 2 rank 1 of 3"), res.out
    assert {r[0] for r in table_rows(res.out)} == {"shared", "own"}

    res = cli("show", "ddp", "2", "--rank", "3", "--root", root)
    assert res.code == RANK_LAYOUT and "ranks 0..2" in res.err, res
    res = cli("show", "solo", "7", "--rank", "1", "--root", root)
    assert res.code == RANK_LAYOUT and "written by one process" in res.err, res
    assert cli("show", "ddp", "2", "--rank", "-1", "--root", root).code == USAGE


# ---- verify ------------------------------------------------------------------------------------


def test_verify_names_the_rank_of_a_damaged_or_missing_part(root: Path, cli: CLI) -> None:
    for step in (1, 2, 3, 4):
        save_step(root, step)
    store = Store(root)
    flip_byte(part_file(root, 1, 1))  # step 1: rank 1's part no longer matches its record
    part_file(root, 2, 2).unlink()  # step 2: rank 2's part is gone
    own = next(t for t in store.read_part("ddp", 3, 0).tensors if t.path == "own")
    (piece,) = own.pieces
    flip_byte(store.object_path("ddp", piece.object))  # step 3: an object only rank 0 uses

    res = cli("verify", "ddp", "--root", root)
    assert res.code == CORRUPT, res
    fails = [line for line in res.out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 3, res.out
    assert fails[0].startswith("FAIL ddp step 1 rank 1: ") and "rank-00001.json" in fails[0]
    assert fails[1].startswith("FAIL ddp step 2 rank 2: ") and "missing" in fails[1]
    assert fails[2].startswith(f"FAIL ddp step 3 rank 0: object {store.root}"), fails[2]
    assert "ok   ddp step 4 (3 ranks, " in res.out
    assert f"quarantined {piece.object} (referenced by ddp step 3)" in res.out
    assert "3 of 4 checkpoint(s) failed verification" in res.err

    # What that means for the other commands: the step is damaged as a whole.
    res = cli("show", "ddp", "2", "--root", root)
    assert res.code == CORRUPT, res
    assert table_rows(res.out)[2][-1].endswith("rank-00002.json (unreadable)")
    assert "rank 2:" in res.err
    res = cli("restore", "ddp", "2", "--rank", "2", "-o", root.parent / "r2.pt", "--root", root)
    assert res.code == CORRUPT and "missing" in res.err, res
    res = cli("verify", "ddp", "4", "--root", root)
    assert res.code == 0, res


# ---- rm, pin, prune ------------------------------------------------------------------------------


def test_rm_pin_and_prune_act_on_whole_steps(root: Path, cli: CLI, tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        save_step(root, step)
    store = Store(root)

    res = cli("rm", "ddp", "1", "--yes", "--root", root)
    assert res.code == 0, res
    assert res.out == "removed ddp step 1 and its 3 rank parts\n"
    assert not store.manifest_path("ddp", 1).exists()
    assert not (root / "ddp" / "parts" / "step-000000000001").exists()
    assert store.steps("ddp") == [2, 3, 4]

    assert cli("pin", "ddp", "2", "--root", root).code == 0
    config = tmp_path / "keep1.toml"
    config.write_text("[retention]\nkeep_last = 1\n")
    res = cli("prune", "ddp", "--root", root, "--config", config)
    assert res.code == 0, res
    assert res.out.startswith("ddp: deleted steps 3, freed "), res.out
    assert store.steps("ddp") == [2, 4]
    assert sorted(p.name for p in (root / "ddp" / "parts").iterdir()) == [
        "step-000000000002",
        "step-000000000004",
    ]
    res = cli("list", "ddp", "--root", root, "--json", "--config", config)
    assert res.code == 0, res
    kept = {d["step"]: d["kept_by"] for d in json.loads(res.out)}
    assert kept == {2: ["pinned"], 4: ["newest", "last 1"]}, kept

    res = cli("gc", "ddp", "--root", root)
    assert res.code == 0, res
    assert objects_on_disk(root) == needed_objects(root)
    res = cli("verify", "ddp", "--root", root)
    assert res.code == 0, res


# ---- gc ----------------------------------------------------------------------------------------


def test_gc_collects_parts_that_can_never_commit(root: Path, cli: CLI, tmp_path: Path) -> None:
    save_step(root, 1, ranks=[0, 1])  # rank 2 never hands step 1 off ...
    save_step(root, 2)  # ... and step 2 commits
    save_step(root, 3, ranks=[0])  # step 3 waits for ranks 1 and 2
    store = Store(root)
    assert store.steps("ddp") == [2]
    step1 = [part_file(root, 1, r) for r in (0, 1)]
    before = objects_on_disk(root)

    # Just written: a rank a few seconds late must still be able to complete step 1.
    res = cli("gc", "--root", root, "--dry-run")
    assert res.code == 0 and "the parts of" not in res.out, res

    age(step1, 60)
    res = cli("gc", "ddp", "--root", root, "--dry-run")
    assert res.code == 0, res
    assert (
        "ddp: would remove the parts of step 1 (attempt a1), never committed: step 2 of the same "
        "attempt was committed"
    ) in res.out
    assert all(p.exists() for p in step1)

    res = cli("gc", "ddp", "--root", root)
    assert res.code == 0, res
    assert "ddp: removed the parts of step 1 (attempt a1)" in res.out
    # Ranks 0's and 1's own tensors, and the tensor both held alike (stored once).
    assert "ddp: removed 3 object(s)" in res.out
    assert not (root / "ddp" / "parts" / "step-000000000001").exists()
    assert part_file(root, 3, 0).exists()
    assert len(before - objects_on_disk(root)) == 3
    assert objects_on_disk(root) == needed_objects(root) | set(
        store.part_set("ddp", 3, ATTEMPT).parts[0].objects
    )

    # Step 3 was overtaken by nothing: it waits until ranks.pending_timeout (default 1 h).
    age([part_file(root, 3, 0)], 120)
    res = cli("gc", "ddp", "--root", root)
    assert res.code == 0 and "the parts of" not in res.out, res
    config = tmp_path / "timeout.toml"
    config.write_text("[ranks]\npending_timeout = 60\n")
    res = cli("gc", "ddp", "--root", root, "--config", config)
    assert res.code == 0, res
    assert (
        "ddp: removed the parts of step 3 (attempt a1), never committed: it waited longer than "
        "ranks.pending_timeout (60 s)"
    ) in res.out
    assert not (root / "ddp" / "parts" / "step-000000000003").exists()
    assert objects_on_disk(root) == needed_objects(root)

    res = cli("gc", "--root", root, "--config", config)
    assert res.out == f"nothing to collect in {store.root}: every object is referenced\n", res
    assert store.steps("ddp") == [2]


# ---- restore -----------------------------------------------------------------------------------


def test_restore_exports_one_rank(root: Path, cli: CLI, tmp_path: Path) -> None:
    save_step(root, 1)
    save_step(root, 2)
    ckptd_client.save("solo", step=7, state={"w": torch.ones(10)}, root=root)
    out = tmp_path / "r.pt"

    res = cli("restore", "ddp", "-o", out, "--root", root)
    assert res.code == RANK_LAYOUT, res
    assert (
        "job 'ddp' step 2 was written by 3 ranks; export one rank's part with --rank R" in res.err
    )
    assert not out.exists()

    res = cli("restore", "ddp", "1", "--rank", "1", "-o", out, "--root", root)
    assert res.code == 0, res
    assert res.out.startswith(f"wrote {out} (torch, ") and res.out.endswith(
        "from ddp step 1 rank 1 of 3\n"
    ), res.out
    got = torch.load(out, weights_only=True)
    want = rank_state(1, 1)
    assert torch.equal(got["own"], want["own"]) and torch.equal(got["shared"], want["shared"])
    assert got["meta"] == want["meta"]

    st = tmp_path / "r.safetensors"
    res = cli("restore", "ddp", "--rank", "2", "--format", "safetensors", "-o", st, "--root", root)
    assert res.code == 0, res
    assert torch.equal(load_file(st)["own"], rank_state(2, 2)["own"])

    res = cli("restore", "ddp", "--rank", "3", "-o", out, "--root", root)
    assert res.code == RANK_LAYOUT and "ranks 0..2" in res.err, res
    res = cli("restore", "solo", "--rank", "1", "-o", out, "--root", root)
    assert res.code == RANK_LAYOUT and "--rank 0 or no --rank" in res.err, res
    assert cli("restore", "solo", "--rank", "0", "-o", out, "--root", root).code == 0


# ---- status (a daemon) ---------------------------------------------------------------------------


def test_status_shows_steps_waiting_for_ranks(daemons: DaemonFactory, cli: CLI) -> None:
    d = daemons.start()

    def hand_off(rank: int) -> ckptd_client.CheckpointInfo:
        with Client(
            "wait",
            socket=d.socket,
            root=d.root,
            spawn=False,
            rank=rank,
            world_size=WORLD,
            attempt=ATTEMPT,
        ) as client:
            return client.snapshot(state=rank_state(5, rank), step=5, rng=False).wait(60)

    infos = [hand_off(0), hand_off(1)]
    assert [(i.rank, i.world_size, i.step_committed) for i in infos] == [
        (0, WORLD, False),
        (1, WORLD, False),
    ]
    waiting: list[dict[str, Any]] = []

    def listed() -> bool:
        nonlocal waiting
        res = cli("status", "--socket", d.socket, "--json")
        assert res.code == 0, res
        waiting = json.loads(res.out)["waiting_for_ranks"]
        return bool(waiting)

    wait_until(listed, 30, "the daemon to report the step waiting for rank 2")
    (w,) = waiting
    assert (w["job"], w["step"], w["attempt"], w["world_size"]) == ("wait", 5, ATTEMPT, WORLD)
    assert (w["ranks"], w["missing"]) == ([0, 1], [2])
    assert w["waiting_s"] >= 0 and w["waiting_since"].endswith("Z")

    res = cli("status", "--socket", d.socket)
    assert res.code == 0, res
    assert "waiting for ranks 1" in res.out
    assert "wait step 5 (attempt a1): ranks 0,1 of 3 handed off, missing 2, waiting since " in (
        res.out
    )
    assert cli("list", "wait", "--root", d.root, "--json").out.strip() == "[]"

    assert hand_off(2).step_committed
    wait_until(lambda: not listed(), 30, "the committed step to leave waiting_for_ranks")
    res = cli("list", "wait", "--root", d.root, "--json")
    assert [(x["step"], x["world_size"]) for x in json.loads(res.out)] == [(5, WORLD)]
