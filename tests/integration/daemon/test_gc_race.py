"""GC racing concurrent writers of the same job.

Writers deduplicate against objects that already exist (the same pool tensors in every
checkpoint) while a reaper deletes old manifests and runs :meth:`Store.gc` over and over. The job
lock (writers shared, GC exclusive) must keep GC from deleting an object a write in progress
deduplicated against: afterwards every manifest verifies. A second test SIGKILLs a writer process
in the middle of an object write, while it holds the lock, and checks that GC neither deadlocks
nor loses anything, and that the dead writer left only garbage GC and a sweep remove.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from ckptd.errors import NotFoundError
from ckptd.format.codec import decode
from ckptd.format.hashing import content_hash
from ckptd.format.restore import verify_manifest
from ckptd.format.skeleton import flatten
from ckptd.format.store import Store
from ckptd.pipeline.plan import PipelineConfig, tensor_source
from ckptd.pipeline.write import write_checkpoint
from tests.integration.daemon_fixtures import REPO, clean_env, wait_until

JOB = "race"
KiB = 1024
CHUNK = 64 * KiB
CONFIG = PipelineConfig(chunk_bytes=CHUNK, pack_bytes=0, threads=2)
"""Every tensor of CHUNK bytes is exactly one object."""
POOL_SIZE = 8
WRITERS = 3
CHECKPOINTS_PER_WRITER = 20
KEEP = 2


def pool_tensor(i: int) -> torch.Tensor:
    """Tensor ``i`` of the shared pool (the same bytes in every process)."""
    gen = torch.Generator().manual_seed(7000 + i)
    return torch.randint(0, 256, (CHUNK,), dtype=torch.uint8, generator=gen)


def fresh_tensor(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100_000 + seed)
    return torch.randint(0, 256, (CHUNK,), dtype=torch.uint8, generator=gen)


def write(store: Store, step: int, state: dict[str, torch.Tensor]) -> None:
    flat = flatten(state)
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    write_checkpoint(store, JOB, step, flat.skeleton, sources, config=CONFIG)


def verify_all(store: Store) -> list[int]:
    """Assert every visible checkpoint verifies; return the steps."""
    steps = store.steps(JOB)
    for step in steps:
        problems = verify_manifest(store, store.read_manifest(JOB, step))
        assert problems == [], f"step {step}: {problems}"
    return steps


def object_files(store: Store) -> dict[str, Path]:
    return {p.name: p for p in (store.job_dir(JOB) / "objects").glob("??/*")}


def assert_objects_intact(store: Store) -> None:
    """Every object file under objects/ is complete: it decodes and hashes to its name."""
    for digest, path in object_files(store).items():
        _codec, _elem, raw_len, _stored = store.object_header(JOB, digest)
        out = memoryview(bytearray(raw_len))
        decode(path.read_bytes(), out, where=str(path))
        assert content_hash(out) == digest, f"{path} does not hash to its name"


class Race:
    """Writer threads and one reaper thread; failures are collected, not lost in threads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.errors: list[BaseException] = []
        self.writers_done = threading.Event()
        self.gc_rounds = 0
        self.deleted = 0
        self.verified = 0

    def guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                self.errors.append(exc)

        return run

    def writer(self, w: int, first_step: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(w)
            for i in range(CHECKPOINTS_PER_WRITER):
                step = first_step + w + WRITERS * i
                picks = rng.sample(range(POOL_SIZE), 3)
                state = {f"p{k}": pool_tensor(k) for k in picks}
                state["own"] = fresh_tensor(step)
                write(self.store, step, state)

        return self.guarded(run)

    def reaper(self) -> None:
        """Delete all but the newest KEEP manifests, GC, verify what is left; repeat until the
        writers are done, then once more."""
        last_round = False
        while not last_round:
            last_round = self.writers_done.is_set()
            for step in self.store.steps(JOB)[:-KEEP]:
                try:
                    self.store.delete_checkpoint(JOB, step)
                    self.deleted += 1
                except NotFoundError:
                    pass
            self.store.gc(JOB)
            self.gc_rounds += 1
            # Only this thread deletes manifests: whatever is listed now must verify now.
            for step in self.store.steps(JOB):
                manifest = self.store.read_manifest(JOB, step)
                assert verify_manifest(self.store, manifest) == [], f"step {step} after GC"
                self.verified += 1

    def run(self, first_step: int = 1, during: Callable[[], None] | None = None) -> None:
        self.store.open_job(JOB)
        writers = [
            threading.Thread(target=self.writer(w, first_step), name=f"writer-{w}")
            for w in range(WRITERS)
        ]
        reaper = threading.Thread(target=self.guarded(self.reaper), name="reaper")
        for t in [*writers, reaper]:
            t.start()
        try:
            if during is not None:
                during()
        finally:
            for t in writers:
                t.join(120)
            self.writers_done.set()
            reaper.join(120)
        assert not any(t.is_alive() for t in [*writers, reaper]), "a thread hung"
        if self.errors:
            raise self.errors[0]


def test_gc_racing_deduplicating_writers_loses_nothing(store: Store) -> None:
    # Seed the pool so that the very first writes already dedup against existing objects.
    write(store, 0, {f"p{k}": pool_tensor(k) for k in range(POOL_SIZE)})
    race = Race(store)
    race.run(first_step=1)
    assert race.gc_rounds >= 1
    assert race.deleted > 0
    steps = verify_all(store)
    assert steps[-1] == WRITERS * CHECKPOINTS_PER_WRITER  # the last write of the last writer
    assert len(steps) >= KEEP
    store.gc(JOB)
    verify_all(store)
    assert set(object_files(store)) == store.referenced_objects(JOB)
    assert list(store.tmp_dir(JOB).iterdir()) == []


CHILD = r"""
import sys, threading, time
from pathlib import Path
from ckptd.format.store import Store
from tests.integration.daemon.test_gc_race import JOB, fresh_tensor, pool_tensor, write

root, marker, step = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

class HangingStore(Store):
    # Writes two objects, then hangs inside the third (its tmp file half written).
    calls = 0
    lock = threading.Lock()

    def write_object(self, job, digest, parts):
        with HangingStore.lock:
            HangingStore.calls += 1
            n = HangingStore.calls
        if n < 3:
            return super().write_object(job, digest, parts)
        return super().write_object(job, digest, self.hang_after_first(parts))

    @staticmethod
    def hang_after_first(parts):
        for part in parts:
            yield part
            marker.write_text("mid-write")
            time.sleep(3600)

state = {f"p{k}": pool_tensor(k) for k in range(4)}
state.update({f"new{k}": fresh_tensor(step * 10 + k) for k in range(3)})
write(HangingStore(root), step, state)
print("the write finished; it should have hung", flush=True)
"""

CHILD_STEP = 10_000


def child_state() -> dict[str, torch.Tensor]:
    state = {f"p{k}": pool_tensor(k) for k in range(4)}
    state.update({f"new{k}": fresh_tensor(CHILD_STEP * 10 + k) for k in range(3)})
    return state


def test_writer_sigkilled_mid_write_while_gc_races(store: Store) -> None:
    write(store, 0, {f"p{k}": pool_tensor(k) for k in range(POOL_SIZE)})
    marker = store.root.parent / "marker"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(store.root), str(marker), str(CHILD_STEP)],
        cwd=REPO,
        env=clean_env(store.root.parent),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: marker.exists() or child.poll() is not None, 120, "the writer to hang")
        assert child.poll() is None, child.communicate()
        tmp = list(store.tmp_dir(JOB).iterdir())
        # One per pipeline thread that reached a third object (2 threads: one or two hang).
        assert 1 <= len(tmp) <= 2 and all(p.name.endswith(".tmp") for p in tmp), tmp
        # The hung writer holds the job lock shared: GC cannot start ...
        with store.job_lock(JOB, exclusive=True, blocking=False) as locked:
            assert locked is False
        # ... while other writers can still commit.
        write(store, 1, {"p0": pool_tensor(0), "own": fresh_tensor(1)})

        def kill_once_racing() -> None:
            wait_until(lambda: store.steps(JOB)[-1] >= 5, 120, "writers to get going")
            child.send_signal(signal.SIGKILL)
            child.wait(30)

        race = Race(store)
        race.run(first_step=2, during=kill_once_racing)
    finally:
        if child.poll() is None:
            child.kill()
        out, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, (out, err)
    # The dead writer's lock went with it.
    with store.job_lock(JOB, exclusive=True, blocking=False) as locked:
        assert locked is True
    assert CHILD_STEP not in store.steps(JOB)
    verify_all(store)
    assert_objects_intact(store)  # no half-written object ever got its final name
    store.gc(JOB)
    assert set(object_files(store)) == store.referenced_objects(JOB)
    # Nothing but its half-written tmp file is left in tmp (younger than GC's grace period, it
    # may still be there); the sweep a daemon does at startup removes it.
    assert {p.name for p in store.tmp_dir(JOB).iterdir()} <= {p.name for p in tmp}
    store.sweep_tmp(JOB)
    assert list(store.tmp_dir(JOB).iterdir()) == []
    # The same state written again commits and verifies.
    write(store, CHILD_STEP, child_state())
    assert verify_all(store)[-1] == CHILD_STEP
