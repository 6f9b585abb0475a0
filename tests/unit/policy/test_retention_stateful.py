"""Retention, pins, prune, GC and crashed writes against a real :class:`Store`, driven by a
hypothesis state machine.

The machine commits checkpoints built from a small pool of tensors (so objects are shared between
checkpoints and deduplicated), pins and unpins steps (also steps not written yet, as
``snapshot(pin=True)`` does), changes the policy, prunes, collects garbage and "crashes" writers:
a :class:`CrashingStore` (the only fault-injection seam) fails ``write_object`` after N objects and
leaves a half-written tmp file behind, as a writer killed at that point would.

After every step: the newest committed step exists; every pinned committed step exists; every
manifest's objects exist and verify; the store holds exactly the steps the model expects.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ckptd.format.fsutil import STALE_TMP_S, Buffer
from ckptd.format.restore import verify_manifest
from ckptd.format.skeleton import flatten
from ckptd.format.store import TMP_GRACE_S, Store
from ckptd.pipeline.plan import PipelineConfig, tensor_source
from ckptd.pipeline.write import write_checkpoint
from ckptd.policy.prune import delete_unprotected, job_facts, prune
from ckptd.policy.retention import RetentionPolicy, decide, deletable

JOB = "sm"
KiB = 1024
CONFIG = PipelineConfig(chunk_bytes=2 * KiB, pack_bytes=512, threads=2)
"""Tiny chunks: a 3 KiB tensor is split in two objects, 256-byte ones are packed together."""

POOL_SIZES = (256, 256, 1 * KiB, 1 * KiB, 3 * KiB, 3 * KiB)


def random_bytes(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)


POOL = [random_bytes(n, 1000 + i) for i, n in enumerate(POOL_SIZES)]


class SimulatedCrashError(Exception):
    """What the seam raises in place of the writer dying."""


class CrashingStore(Store):
    """A Store whose ``write_object`` fails after ``fail_after`` objects, leaving the tmp file a
    writer killed mid-object would leave (aged by ``age_s`` seconds)."""

    def __init__(self, root: Path, fail_after: int, age_s: float) -> None:
        super().__init__(root)
        self.fail_after = fail_after
        self.age_s = age_s
        self.calls = 0
        self._lock = threading.Lock()

    def write_object(self, job: str, digest: str, parts: Iterable[Buffer]) -> tuple[int, bool]:
        with self._lock:
            self.calls += 1
            n = self.calls
        if n > self.fail_after:
            leftover = self.tmp_dir(job) / f"{digest}.crash{n}.tmp"
            leftover.write_bytes(b"half an object")
            if self.age_s:
                then = time.time() - self.age_s
                os.utime(leftover, (then, then))
            raise SimulatedCrashError(f"writer died while writing object {digest[:12]}")
        return super().write_object(job, digest, parts)


def state_of(picks: list[int], fresh: list[int]) -> dict[str, torch.Tensor]:
    state = {f"pool{i}": POOL[i] for i in picks}
    for k, seed in enumerate(fresh):
        state[f"fresh{k}"] = random_bytes(1 * KiB, seed)
    return state


def write(store: Store, step: int, state: dict[str, torch.Tensor], metric: float | None) -> None:
    flat = flatten(state)
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    write_checkpoint(store, JOB, step, flat.skeleton, sources, metric=metric, config=CONFIG)


def object_files(store: Store) -> set[str]:
    base = store.job_dir(JOB) / "objects"
    return {p.name for p in base.glob("??/*")} if base.is_dir() else set()


def tmp_ages(store: Store) -> list[float]:
    tmp = store.tmp_dir(JOB)
    now = time.time()
    return [now - p.lstat().st_mtime for p in tmp.iterdir()] if tmp.is_dir() else []


optional = st.none().__or__
policies = st.builds(
    RetentionPolicy,
    keep_last=optional(st.integers(1, 3)),
    keep_every=optional(st.integers(2, 5)),
    keep_best=optional(st.integers(1, 2)),
    mode=st.sampled_from(["min", "max"]),
    max_bytes=optional(st.integers(1 * KiB, 16 * KiB)),
)
metric_values = st.none() | st.floats(-10, 10) | st.sampled_from([float("nan"), float("inf")])


class RetentionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ckret"))
        self.store = Store(self.dir / "root")
        self.policy = RetentionPolicy()
        self.committed: set[int] = set()
        self.pinned: set[int] = set()
        self.next_step = 1
        self.newest: int | None = None
        self.fresh_seed = 0

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _fresh(self, n: int) -> list[int]:
        seeds = list(range(self.fresh_seed, self.fresh_seed + n))
        self.fresh_seed += n
        return seeds

    # ---- rules -------------------------------------------------------------------------------

    @rule(
        picks=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=4, unique=True),
        fresh=st.integers(0, 2),
        metric=metric_values,
        gap=st.integers(1, 3),
    )
    def commit(self, picks: list[int], fresh: int, metric: float | None, gap: int) -> None:
        step = self.next_step
        self.next_step += gap
        write(self.store, step, state_of(picks, self._fresh(fresh)), metric)
        self.committed.add(step)
        self.newest = step
        # A writer opening the job sweeps what dead writers left long ago.
        assert all(age < STALE_TMP_S for age in tmp_ages(self.store))

    @rule(fail_after=st.integers(0, 2), aged=st.booleans(), picks=st.lists(st.integers(0, 5)))
    def crash(self, fail_after: int, aged: bool, picks: list[int]) -> None:
        """A write that dies after ``fail_after`` new objects: nothing becomes visible."""
        step = self.next_step
        self.next_step += 1
        crashing = CrashingStore(self.store.root, fail_after, 2 * STALE_TMP_S if aged else 0.0)
        before = self.store.steps(JOB)
        with pytest.raises(SimulatedCrashError):
            # three fresh 1 KiB tensors: at least three new objects, so the seam always fires
            write(crashing, step, state_of(sorted(set(picks)), self._fresh(3)), 1.0)
        assert not self.store.manifest_path(JOB, step).exists()
        assert self.store.steps(JOB) == before
        assert self.store.tmp_dir(JOB).is_dir() and any(self.store.tmp_dir(JOB).iterdir())

    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        candidates = sorted(self.committed | {self.next_step})
        step = data.draw(st.sampled_from(candidates), label="pin step")
        if step == self.next_step:
            self.next_step += 1  # pinned before it is written, like snapshot(pin=True)
            self.store.pin(JOB, step)
            write(self.store, step, state_of([0], self._fresh(1)), None)
            self.committed.add(step)
            self.newest = step
        else:
            self.store.pin(JOB, step)
        self.pinned.add(step)
        assert step in self.store.pinned_steps(JOB)

    @precondition(lambda self: bool(self.pinned) or bool(self.committed))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        step = data.draw(st.sampled_from(sorted(self.pinned | self.committed)), label="unpin")
        assert self.store.unpin(JOB, step) == (step in self.pinned)
        self.pinned.discard(step)
        assert step not in self.store.pinned_steps(JOB)

    @rule(policy=policies)
    def set_policy(self, policy: RetentionPolicy) -> None:
        self.policy = policy

    @precondition(lambda self: bool(self.committed))
    @rule(dry_run=st.booleans(), limit=st.none() | st.integers(1, 3))
    def prune(self, dry_run: bool, limit: int | None) -> None:
        before = self.store.steps(JOB)
        reasons = decide(self.policy, job_facts(self.store, JOB))
        victims = deletable(reasons)
        result = prune(self.store, JOB, self.policy, dry_run=dry_run, limit=limit)
        assert result.reasons == reasons
        assert result.deleted == victims[:limit]
        for step in result.deleted:
            assert reasons[step] == [], f"step {step} kept by {reasons[step]} was deleted"
            assert step != self.newest and step not in self.pinned
        after = self.store.steps(JOB)
        if dry_run:
            assert after == before
            assert result.gc is None
        else:
            assert after == [s for s in before if s not in result.deleted]
            self.committed -= set(result.deleted)
        for step, why in reasons.items():
            if why:
                assert step in after, f"step {step} kept by {why} is gone"

    @precondition(lambda self: bool(self.committed))
    @rule()
    def gc(self) -> None:
        self.store.gc(JOB)
        # Everything unreferenced is gone; so is every tmp file older than the grace period.
        assert object_files(self.store) == self.store.referenced_objects(JOB)
        assert all(age < TMP_GRACE_S for age in tmp_ages(self.store))

    @precondition(lambda self: bool(self.committed))
    @rule()
    def restart(self) -> None:
        """What the daemon does at startup: sweep every tmp leftover."""
        self.store.sweep_tmp(JOB)
        assert tmp_ages(self.store) == []

    @precondition(lambda self: self.newest is not None)
    @rule(data=st.data())
    def delete_protected(self, data: st.DataObject) -> None:
        assert self.newest is not None
        protected = sorted({self.newest} | (self.pinned & self.committed))
        step = data.draw(st.sampled_from(protected), label="protected step")
        assert delete_unprotected(self.store, JOB, step) is False
        assert step in self.store.steps(JOB)

    # ---- invariants ----------------------------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        assert self.store.steps(JOB) == sorted(self.committed)

    @invariant()
    def newest_and_pinned_survive(self) -> None:
        steps = set(self.store.steps(JOB))
        if self.newest is not None:
            assert self.newest in steps
        assert self.pinned & self.committed <= steps
        assert self.store.pinned_steps(JOB) == self.pinned

    @invariant()
    def every_checkpoint_verifies(self) -> None:
        objects = object_files(self.store)
        for step in self.store.steps(JOB):
            manifest = self.store.read_manifest(JOB, step)
            missing = set(manifest.objects) - objects
            assert not missing, f"step {step} lost objects {sorted(missing)}"
            assert verify_manifest(self.store, manifest) == [], f"step {step} does not verify"


def test_pin_before_the_job_exists(tmp_path: Path) -> None:
    """ "The step need not exist yet" -- nor the job: pin() writes through ``<job>/tmp``, so it
    must create the job first (it raised StoreIOError, ENOENT, before e04a4f8)."""
    store = Store(tmp_path / "root")
    store.pin(JOB, 1)
    assert store.pinned_steps(JOB) == {1}
    write(store, 1, state_of([0], [7]), None)
    reasons = prune(store, JOB, RetentionPolicy(keep_last=1)).reasons
    assert reasons == {1: ["newest", "pinned", "last 1"]}


RetentionMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRetentionMachine = RetentionMachine.TestCase
