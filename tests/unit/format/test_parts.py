"""Multi-rank steps in the store: parts, the global commit, bad layouts, collection, deletion.

In-process writers (``write_checkpoint`` with ``rank``/``world_size``/``attempt``) stand for the
daemons: the format's rules do not depend on who calls them. A hypothesis state machine runs call
sequences (hand-offs in any order, duplicates, deletions, collection after time passed) and checks
after each step that no global record exists without every part it names, that every visible step
loads each rank's exact state, and that a step is visible iff every rank handed it off.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ckptd.errors import ManifestError, NotFoundError, RankLayoutError
from ckptd.format.manifest import check_attempt, parse_manifest
from ckptd.format.parts import GRACE_S, RETIRED
from ckptd.format.restore import load_checkpoint, verify_manifest
from ckptd.format.skeleton import flatten
from ckptd.format.store import Store
from ckptd.pipeline.plan import PipelineConfig, tensor_source
from ckptd.pipeline.write import WriteResult, write_checkpoint

JOB = "ranks"
TIMEOUT_S = 3600.0
CONFIG = PipelineConfig(
    threads=1, pack_bytes=8192, pending_timeout_s=TIMEOUT_S
)  # replica: own object


def state_of(attempt: str, step: int, rank: int) -> dict[str, torch.Tensor]:
    """A rank's state: a replica every rank shares (dedup) and a shard of its own."""
    seed = sum(map(ord, attempt)) * 1000 + step * 10 + rank
    return {
        "replica": torch.arange(4096, dtype=torch.float32) + step,
        "shard": torch.full((1024,), float(seed)),
    }


def hand_off(
    store: Store, step: int, rank: int, *, world: int = 3, attempt: str = "a0"
) -> WriteResult:
    flat = flatten(state_of(attempt, step, rank))
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    return write_checkpoint(
        store,
        JOB,
        step,
        flat.skeleton,
        sources,
        config=CONFIG,
        rank=rank,
        world_size=world,
        attempt=attempt,
    )


def age(path: Path, seconds: float) -> None:
    """Make every file under ``path`` look ``seconds`` old."""
    then = time.time() - seconds
    for f in [path, *path.rglob("*")]:
        os.utime(f, (then, then))


def scan(root: Path) -> list[str]:
    """Every global record whose parts or objects are not all there (empty: none)."""
    problems = []
    for record_path in root.glob("*/manifests/*.json"):
        doc = json.loads(record_path.read_bytes())
        if doc["version"] != 2:
            continue
        job_dir = record_path.parent.parent
        for ref in doc["parts"]:
            part_path = job_dir / ref["record"]
            if not part_path.exists():
                problems.append(f"{record_path}: part {part_path} missing")
                continue
            data = part_path.read_bytes()
            if ref["checksum"] not in data.decode():
                problems.append(f"{record_path}: part {part_path} has another checksum")
            part = parse_manifest(data, where=str(part_path))
            for digest in part.objects:
                if not (job_dir / "objects" / digest[:2] / digest).exists():
                    problems.append(f"{record_path}: object {digest} missing")
    return problems


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "root")


def test_a_step_is_visible_only_once_every_rank_handed_it_off(store: Store) -> None:
    assert hand_off(store, 1, 2).record is None
    assert hand_off(store, 1, 0).record is None
    assert store.steps(JOB) == []
    with pytest.raises(NotFoundError):
        load_checkpoint(store, JOB, "latest", rank=0)
    last = hand_off(store, 1, 1)
    assert last.record is not None and last.record.world_size == 3
    assert store.steps(JOB) == [1]
    record = store.read_manifest(JOB, 1)
    assert record.is_global and record.attempt == "a0"
    assert [p.rank for p in record.parts] == [0, 1, 2]
    assert record.tensor_count == 6
    assert record.raw_bytes == 3 * (4096 + 1024) * 4
    for rank in range(3):
        loaded = load_checkpoint(store, JOB, 1, rank=rank)
        assert loaded.manifest.rank == rank
        for key, value in state_of("a0", 1, rank).items():
            assert torch.equal(loaded.state[key], value)
    assert scan(store.root) == []


def test_identical_replicas_are_stored_once(store: Store) -> None:
    for rank in range(3):
        hand_off(store, 1, rank)
    replica_objects = [set(part.objects) for part in store.step_parts(JOB, 1)]
    shared = set.intersection(*replica_objects)
    assert shared, "the replica's object should be shared by every rank's part"
    files = list((store.root / JOB / "objects").rglob("*"))
    assert len([f for f in files if f.is_file()]) == len(set.union(*replica_objects))


def test_loading_without_a_rank_asks_for_one(store: Store) -> None:
    for rank in range(3):
        hand_off(store, 4, rank)
    with pytest.raises(RankLayoutError, match=r"written by 3 ranks.*pass rank= \(0\.\.2\)"):
        load_checkpoint(store, JOB, 4)
    with pytest.raises(RankLayoutError, match="there is no rank 3"):
        load_checkpoint(store, JOB, 4, rank=3)


@pytest.mark.parametrize(
    ("rank", "world", "attempt", "message"),
    [
        (3, 3, "a0", r"rank 3 is outside \[0, 3\)"),
        (0, 3, None, "needs an attempt"),
    ],
)
def test_bad_rank_layouts_write_nothing(
    store: Store, rank: int, world: int, attempt: str | None, message: str
) -> None:
    flat = flatten({"w": torch.ones(4)})
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    with pytest.raises(RankLayoutError, match=message):
        write_checkpoint(
            store, JOB, 1, flat.skeleton, sources, rank=rank, world_size=world, attempt=attempt
        )
    assert store.steps(JOB) == [] and store.part_sets(JOB) == []


def test_ranks_that_disagree_on_the_world_size_never_commit(store: Store) -> None:
    hand_off(store, 1, 0, world=2)
    with pytest.raises(RankLayoutError, match=r"says world size 3.*said \[2\]"):
        hand_off(store, 1, 1, world=3)
    assert store.steps(JOB) == []


def test_a_rank_hands_a_step_off_once_per_attempt(store: Store) -> None:
    hand_off(store, 1, 0)
    with pytest.raises(RankLayoutError, match="rank 0 already handed this step off"):
        hand_off(store, 1, 0)
    # A restart (another attempt) may hand the same step off again.
    hand_off(store, 1, 0, attempt="a1")
    assert {p.attempt for p in store.part_sets(JOB)} == {"a0", "a1"}


def test_single_process_and_multi_rank_writers_do_not_share_a_job(tmp_path: Path) -> None:
    multi = Store(tmp_path / "m")
    hand_off(multi, 1, 0)  # a pending part is enough to make the job multi-rank
    flat = flatten({"w": torch.ones(4)})
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    with pytest.raises(RankLayoutError, match="holds multi-rank checkpoints"):
        write_checkpoint(multi, JOB, 2, flat.skeleton, sources)
    single = Store(tmp_path / "s")
    write_checkpoint(single, JOB, 1, flat.skeleton, sources)
    with pytest.raises(RankLayoutError, match="holds single-process checkpoints"):
        hand_off(single, 2, 0)


def test_a_damaged_part_blocks_the_commit_and_a_replaced_one_is_refused(store: Store) -> None:
    hand_off(store, 1, 0)
    hand_off(store, 1, 1)
    part = store.root / JOB / "parts" / "step-000000000001" / "a0" / "rank-00000.json"
    part.write_bytes(part.read_bytes().replace(b'"step": 1', b'"step": 7'))
    assert hand_off(store, 1, 2).record is None
    assert store.steps(JOB) == []
    # A committed step whose part is later swapped for another file is reported damaged.
    for rank in range(3):
        hand_off(store, 2, rank)
    part2 = store.root / JOB / "parts" / "step-000000000002" / "a0" / "rank-00001.json"
    other = store.root / JOB / "parts" / "step-000000000002" / "a0" / "rank-00002.json"
    part2.write_bytes(other.read_bytes())
    with pytest.raises(ManifestError):
        load_checkpoint(store, JOB, 2, rank=1)


def test_a_missing_object_blocks_the_commit(store: Store) -> None:
    hand_off(store, 1, 0)
    hand_off(store, 1, 1)
    part = store.part_set(JOB, 1, "a0").parts[0]
    for digest in part.objects:
        (store.root / JOB / "objects" / digest[:2] / digest).unlink()
    assert hand_off(store, 1, 2).record is None
    assert store.steps(JOB) == []


def test_committing_twice_finds_the_record(store: Store) -> None:
    for rank in range(3):
        hand_off(store, 1, rank)
    first = store.read_manifest(JOB, 1)
    again = store.commit_step(JOB, 1, "a0", pending_timeout_s=TIMEOUT_S)
    assert again is not None and again.seq == first.seq
    assert store.read_manifest(JOB, 1).seq == first.seq  # not rewritten


def test_an_overtaken_incomplete_step_is_collected_after_the_grace(store: Store) -> None:
    hand_off(store, 1, 0)
    hand_off(store, 1, 1)  # rank 2 never hands step 1 off
    for rank in range(3):
        hand_off(store, 2, rank)
    step1 = store.root / JOB / "parts" / "step-000000000001"
    assert store.collect_parts(JOB, pending_timeout_s=TIMEOUT_S) == []  # still in its grace
    age(step1, GRACE_S + 5)
    collected = store.collect_parts(JOB, pending_timeout_s=TIMEOUT_S)
    assert [(s, a) for s, a, _ in collected] == [(1, "a0")]
    assert "step 2 of the same attempt was committed" in collected[0][2]
    assert not step1.exists()
    assert store.steps(JOB) == [2]
    # A late part of the collected step makes a new set, which is never committed either.
    assert hand_off(store, 1, 2).record is None
    assert store.steps(JOB) == [2]


def test_a_newer_attempt_overtakes_the_old_ones_pending_steps(store: Store) -> None:
    hand_off(store, 5, 0, attempt="a0")  # attempt a0 died before step 5 completed
    age(store.root / JOB / "parts", GRACE_S + 5)
    for rank in range(3):
        hand_off(store, 3, rank, attempt="a1")  # the restart resumed at step 3
    collected = store.collect_parts(JOB, pending_timeout_s=TIMEOUT_S)
    assert [(s, a) for s, a, _ in collected] == [(5, "a0")]
    assert "attempt a1, which began after it, committed step 3" in collected[0][2]


def test_pending_parts_wait_until_the_timeout(store: Store) -> None:
    hand_off(store, 1, 0)
    parts = store.root / JOB / "parts"
    age(parts, 100)
    assert store.collect_parts(JOB, pending_timeout_s=3600) == []
    collected = store.collect_parts(JOB, pending_timeout_s=60)
    assert "ranks.pending_timeout (60 s)" in collected[0][2]
    assert not (parts / "step-000000000001").exists()


def test_a_stale_complete_set_is_not_committed(store: Store) -> None:
    hand_off(store, 1, 0)
    hand_off(store, 1, 1)
    age(store.root / JOB / "parts", 3000)
    flat = flatten(state_of("a0", 1, 2))
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    late = write_checkpoint(
        store,
        JOB,
        1,
        flat.skeleton,
        sources,
        config=PipelineConfig(threads=1, pending_timeout_s=3600),
        rank=2,
        world_size=3,
        attempt="a0",
    )
    # 3000 s + the commit margin (60 s) is not past the timeout: committed.
    assert late.record is not None
    hand_off(store, 2, 0)
    hand_off(store, 2, 1)
    age(store.root / JOB / "parts" / "step-000000000002", 3580)
    assert store.commit_step(JOB, 2, "a0", pending_timeout_s=3600) is None


def test_gc_keeps_the_objects_of_pending_parts(store: Store) -> None:
    hand_off(store, 1, 0)
    before = {f.name for f in (store.root / JOB / "objects").rglob("*") if f.is_file()}
    assert store.gc(JOB).objects == 0
    after = {f.name for f in (store.root / JOB / "objects").rglob("*") if f.is_file()}
    assert before == after


def test_deleting_a_step_removes_its_parts_and_gc_its_objects(store: Store) -> None:
    for step in (1, 2):
        for rank in range(3):
            hand_off(store, step, rank)
    store.delete_checkpoint(JOB, 1)
    assert store.steps(JOB) == [2]
    assert not (store.root / JOB / "parts" / "step-000000000001").exists()
    result = store.gc(JOB)
    assert result.objects == 4  # step 1's replica (one object) and each rank's own shard
    assert scan(store.root) == []
    for rank in range(3):
        assert verify_manifest(store, store.read_part(JOB, 2, rank)) == []


def test_a_retired_set_is_never_committed_again(store: Store) -> None:
    for rank in range(3):
        hand_off(store, 1, rank)
    # A deletion that crashed after retiring the set but before removing the record: the step
    # is still visible and whole; once the record goes, nothing brings it back.
    set_dir = store.root / JOB / "parts" / "step-000000000001" / "a0"
    (set_dir / RETIRED).write_bytes(b"")
    assert store.collect_parts(JOB, pending_timeout_s=TIMEOUT_S) == []
    assert store.steps(JOB) == [1]
    (store.root / JOB / "manifests" / "step-000000000001.json").unlink()
    assert store.commit_step(JOB, 1, "a0", pending_timeout_s=TIMEOUT_S) is None
    assert store.steps(JOB) == []
    assert [s for s, _, _ in store.collect_parts(JOB, pending_timeout_s=TIMEOUT_S)] == [1]


@pytest.mark.parametrize("bad", ["", ".a", "a..b", "a/b", "x" * 129, "é"])
def test_attempt_ids_are_safe_directory_names(bad: str) -> None:
    with pytest.raises(ValueError, match="attempt must be"):
        check_attempt(bad)


WORLD = 3


class PartsMachine(RuleBasedStateMachine):
    """Hand-offs of a 3-rank job in any order, an attempt restarted once, deletions and
    collection after time passed; the store must never show a step that is not whole."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="ckptd-parts-"))
        self.store = Store(self.dir)
        self.attempt = "a0"
        self.a1_began: float | None = None
        self.handed: dict[tuple[str, int], set[int]] = {}

    def teardown(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    @precondition(lambda self: self.attempt == "a0")
    @rule()
    def restart(self) -> None:
        """torchrun restarts the job: attempts follow one another."""
        time.sleep(0.002)  # the new attempt's parts are younger (mtime resolution)
        self.attempt = "a1"

    @rule(step=st.integers(1, 4), rank=st.integers(0, WORLD - 1))
    def hand_off(self, step: int, rank: int) -> None:
        key = (self.attempt, step)
        try:
            hand_off(self.store, step, rank, world=WORLD, attempt=self.attempt)
        except RankLayoutError:
            # Refused only for a rank whose part of this attempt is there already.
            assert rank in self.store.part_set(JOB, step, self.attempt).parts
            return
        self.handed.setdefault(key, set()).add(rank)
        if self.attempt == "a1" and self.a1_began is None:
            self.a1_began = time.time()

    @precondition(lambda self: bool(self.store.steps(JOB)))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        step = data.draw(st.sampled_from(self.store.steps(JOB)))
        self.store.delete_checkpoint(JOB, step)

    @rule(seconds=st.sampled_from([0, GRACE_S + 1, 7200]))
    def collect(self, seconds: float) -> None:
        parts = self.dir / JOB / "parts"
        if seconds and parts.exists():
            age(parts, seconds)
        self.store.collect_parts(JOB, pending_timeout_s=TIMEOUT_S)

    @invariant()
    def no_record_without_its_parts(self) -> None:
        assert scan(self.dir) == []

    @invariant()
    def visible_steps_are_whole_and_exact(self) -> None:
        for step in self.store.steps(JOB):
            record = self.store.read_manifest(JOB, step)
            assert record.attempt is not None
            assert self.handed[(record.attempt, step)] == set(range(WORLD))
            rank = step % WORLD
            loaded = load_checkpoint(self.store, JOB, step, rank=rank)
            for key, value in state_of(record.attempt, step, rank).items():
                assert torch.equal(loaded.state[key], value)

    @invariant()
    def an_old_attempt_never_commits_after_a_new_one_began(self) -> None:
        if self.a1_began is None:
            return
        for step in self.store.steps(JOB):
            record = self.store.read_manifest(JOB, step)
            if record.attempt == "a0":
                assert record.created_datetime.timestamp() <= self.a1_began, record


TestPartsMachine = PartsMachine.TestCase
TestPartsMachine.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)


def test_retention_sizes_a_multi_rank_step_by_its_parts_objects(store: Store) -> None:
    from ckptd.policy.prune import job_facts

    for rank in range(3):
        hand_off(store, 1, rank)
    (facts,) = job_facts(store, JOB)
    parts = store.step_parts(JOB, 1)
    assert set(facts.objects) == {h for p in parts for h in p.objects}
    assert sum(facts.objects.values()) == store.read_manifest(JOB, 1).stored_bytes > 0


def test_a_set_is_committed_or_collected_never_both(store: Store) -> None:
    from ckptd.format.parts import decide

    jd = store._real_job(JOB)
    for rank in range(2):
        hand_off(store, 1, rank)
    pset = store.part_set(JOB, 1, "a0")
    # A collector decided first (it saw the set overtaken): no committer may commit it now.
    assert decide(jd, pset, "collect") == "collect"
    assert hand_off(store, 1, 2).record is None
    assert store.steps(JOB) == []
    assert decide(jd, store.part_set(JOB, 1, "a0"), "commit") == "collect"
    # The other way round: a committer's decision protects the set from the collector, and a
    # committer killed between its decision and the record is finished by the next try.
    for rank in range(3):
        hand_off(store, 2, rank, attempt="a1") if rank < 2 else None
    hand_off(store, 2, 2, attempt="a1")
    assert store.steps(JOB) == [2]
    (store.root / JOB / "manifests" / "step-000000000002.json").unlink()  # the crash
    age(store.root / JOB / "parts", 7200)
    assert store.collect_parts(JOB, pending_timeout_s=TIMEOUT_S) == [(1, "a0", ANY)]
    assert store.commit_step(JOB, 2, "a1", pending_timeout_s=TIMEOUT_S) is not None
    assert store.steps(JOB) == [2] and scan(store.root) == []


def test_a_deleted_step_never_comes_back(store: Store) -> None:
    for rank in range(3):
        hand_off(store, 1, rank)
    store.delete_checkpoint(JOB, 1)
    # A daemon still watching the step (its recheck, its restart) finds nothing to commit.
    assert store.commit_step(JOB, 1, "a0", pending_timeout_s=TIMEOUT_S) is None
    assert store.steps(JOB) == []
    # A damaged record is deleted with its sets too.
    for rank in range(3):
        hand_off(store, 2, rank)
    record = store.root / JOB / "manifests" / "step-000000000002.json"
    record.write_bytes(record.read_bytes().replace(b'"seq"', b'"seX"'))
    store.delete_checkpoint(JOB, 2)
    assert store.commit_step(JOB, 2, "a0", pending_timeout_s=TIMEOUT_S) is None
    assert store.steps(JOB) == [] and store.part_sets(JOB) == []


def test_a_late_commit_of_an_older_attempt_never_overtakes_a_newer_one(store: Store) -> None:
    hand_off(store, 5, 0, attempt="a1")
    hand_off(store, 5, 1, attempt="a1")
    age(store.root / JOB / "parts", 30)  # a1 handed off step 5, then died before rank 2 did
    hand_off(store, 1, 0, attempt="a2")  # the restart has begun
    # a1's last part arrives late (a daemon drained its queue): a1 may not commit over a2.
    late = hand_off(store, 5, 2, attempt="a1")
    assert late.record is None and store.steps(JOB) == []
    for rank in (1, 2):
        hand_off(store, 1, rank, attempt="a2")
    assert store.steps(JOB) == [1]
    age(store.root / JOB / "parts" / "step-000000000005", 60)
    collected = store.collect_parts(JOB, pending_timeout_s=TIMEOUT_S)
    assert [(s, a) for s, a, _ in collected] == [(5, "a1")]


def test_world_sizes_beyond_the_part_names_are_refused(store: Store) -> None:
    with pytest.raises(RankLayoutError, match=r"world size 100000 is outside \[2, 99999\]"):
        hand_off(store, 1, 0, world=100_000)


def test_a_record_naming_a_part_outside_its_set_is_damaged(store: Store) -> None:
    from ckptd.format.manifest import sign_manifest

    for rank in range(3):
        hand_off(store, 1, rank)
    path = store.root / JOB / "manifests" / "step-000000000001.json"
    path.write_bytes(sign_manifest(path.read_bytes().replace(b"a0/rank-00001", b"../../x", 1)))
    with pytest.raises(ManifestError, match=r"parts\[1\]\.record must be"):
        store.read_manifest(JOB, 1)
