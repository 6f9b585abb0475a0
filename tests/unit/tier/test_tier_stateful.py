"""The upload queue, local retention and the tier's retention, driven by a hypothesis state machine
over a real local :class:`Store` and an in-memory bucket with fault injection.

The machine plays the daemon without its threads. The writer marks a step, commits it
(``ckptd_client.api.save``) and hands it to the queue (:meth:`Uploads.add`), as
:mod:`ckptd.daemon.writer` does. The upload thread's work is the real ``Uploads._one`` (upload,
the tier's retention with the ``keep_last`` a run draws, the mark removed), called
synchronously on the entry a rule draws, with an uploader of one worker, so the Nth bucket call
is the same in every run. Faults: the Nth call of an op fails (the store is down mid-upload,
also inside the tier's retention); the daemon dies at the Nth call or between an upload and
its mark's removal (every later call fails; then every in-memory object is forgotten: new
:class:`Store`, :class:`Uploads` and :class:`Uploader` on the same disk and bucket, the queue
recovered from the marks); the writer commits the step being uploaded again at the Nth call of
the upload. Between uploads: local retention (``keep_last=1``), deleting a local step as the
disk guard does (:func:`delete_unprotected`), and the tier's retention with ``grace_s=0``.

``grace_s=0`` is the adversarial setting: every object no manifest names is collected at once,
also the objects an upload that failed put before its manifest, so the next attempt finds none
of them (it looks each one up, never trusting memory). It is safe only because no upload to the
prefix is in flight meanwhile, which holds for one daemon (its retention runs on its upload
thread) and is what the machine does; another node uploading to the same prefix needs the
grace.

After every rule: every manifest in the bucket names only objects the bucket holds, with the
stored size, that decode and hash to their names (the bucket never shows a broken checkpoint),
and its bytes are those of a commit of that step made locally; a marked step is committed
locally; the queue holds exactly the marks; a step committed locally and not marked is in the
bucket with its local bytes, or was, until the tier's retention deleted it. At the end (and in
the ``drain`` rule) every mark is uploaded with no faults and the queue must empty with no error
other than the injected ones.

Tests at the end of the module reproduce, deterministically, the races and sequences the
machine found: a step committed again during its upload or its unmark, a step removed and
committed again, a fresh node's commits.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ckptd.config import Config, StoreConfig, TierConfig
from ckptd.daemon.metrics import Metrics
from ckptd.daemon.uploads import Uploads, _Entry, _TierState
from ckptd.errors import TierError
from ckptd.format.codec import decode
from ckptd.format.hashing import content_hash
from ckptd.format.jobmeta import Upload
from ckptd.format.manifest import parse_manifest
from ckptd.format.store import Store
from ckptd.policy.prune import delete_unprotected, job_facts, prune
from ckptd.policy.retention import RetentionPolicy, commit_order
from ckptd.tier import keys
from ckptd.tier.mirror import TierStore
from ckptd.tier.prune import prune_tier
from ckptd.tier.remote import Data, Listed, TierSettings, parse_url
from ckptd.tier.upload import Uploader, UploadOutcome
from ckptd_client import api
from tests.unit.tier.memory_remote import MemoryRemote

JOB = "sm"
URL = "s3://bucket/sm"
SETTINGS = TierSettings(parse_url(URL), concurrency=1)
"""One upload worker: the Nth bucket call of an upload is the same call in every run."""
STORE = StoreConfig(chunk_bytes=4096, pack_bytes=1024)
"""Every 2 KiB tensor is an object of its own."""


def daemon_config(keep_last: int) -> Config:
    """The daemon's config: the tier, whose retention (applied after each upload) keeps
    ``keep_last`` steps."""
    tier = TierConfig(SETTINGS, retention=RetentionPolicy(keep_last=keep_last))
    return Config(store=STORE, tier=tier)


LOCAL_POLICY = RetentionPolicy(keep_last=1)
TIER_POLICY = RetentionPolicy(keep_last=2)

TMPFS = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
"""Where the machine's stores go: a tmpfs where there is one (the machine tests the order of
calls, not durability, and fsync on a tmpfs costs nothing: twice the examples in the time)."""

POOL = [torch.randn(512, generator=torch.Generator().manual_seed(i)) for i in range(6)]
"""Tensors that steps share (each one object, deduplicated in the store and in the bucket)."""


class SimulatedCrashError(Exception):
    """Raised where the daemon dies: nothing after it runs."""


def state_of(picks: Sequence[int], fresh: int | None) -> dict[str, Any]:
    state: dict[str, Any] = {f"p{i}": POOL[i] for i in picks}
    if fresh is not None:
        state["fresh"] = torch.randn(512, generator=torch.Generator().manual_seed(1000 + fresh))
    return state


class HookedRemote(MemoryRemote):
    """A :class:`MemoryRemote` that runs a hook before its Nth next call (any op): another
    thread's turn at that point of an upload, or the daemon's death (:meth:`crash`: every call
    fails from then on, until :attr:`dead` is reset). It keeps every version of each manifest
    key: the bytes written, None for a deletion. Writes are stamped a second in the past, so
    that retention with no grace finds every object older than its cutoff."""

    def __init__(self) -> None:
        super().__init__(URL, clock=lambda: time.time() - 1.0)
        self.history: dict[str, list[bytes | None]] = {}
        self.dead = False
        self._hook: tuple[int, Callable[[], None], bool] | None = None
        self._hook_lock = threading.Lock()

    def at_call(self, nth: int, hook: Callable[[], None], *, in_upload: bool = False) -> None:
        """Run ``hook`` before the ``nth`` next call; ``in_upload``: only if that call is made by
        :meth:`Uploader.upload` (disarmed when it returns)."""
        with self._hook_lock:
            self._hook = (nth, hook, in_upload)

    def clear_hook(self, *, in_upload_only: bool = False) -> bool:
        """Disarm the hook (with ``in_upload_only``, only such a hook); True when one was
        armed."""
        with self._hook_lock:
            armed = self._hook is not None and (self._hook[2] or not in_upload_only)
            if armed:
                self._hook = None
        return armed

    def crash(self) -> None:
        self.dead = True
        raise SimulatedCrashError("the daemon died here")

    def _tick(self) -> None:
        if self.dead:
            raise SimulatedCrashError("the daemon is dead")
        with self._hook_lock:
            if self._hook is None:
                return
            n, hook, in_upload = self._hook
            self._hook = (n - 1, hook, in_upload) if n > 1 else None
        if n == 1:
            hook()

    def _record(self, key: str, data: bytes | None) -> None:
        if keys.manifest_step(JOB, key) is not None:
            self.history.setdefault(key, []).append(data)

    def get(self, key: str) -> bytes:
        self._tick()
        return super().get(key)

    def put(self, key: str, data: Data) -> None:
        self._tick()
        super().put(key, data)
        self._record(key, bytes(data))

    def put_new(self, key: str, data: Data) -> bool:
        self._tick()
        created = super().put_new(key, data)
        if created:
            self._record(key, bytes(data))
        return created

    def size(self, key: str) -> int | None:
        self._tick()
        return super().size(key)

    def list(self, prefix: str) -> Iterator[Listed]:
        self._tick()
        return super().list(prefix)

    def delete(self, keys: Sequence[str]) -> None:
        self._tick()
        try:
            super().delete(keys)
        finally:
            for key in keys:
                if key not in self.blobs:
                    self._record(key, None)


class HookedUploader(Uploader):
    """An :class:`Uploader` over a :class:`HookedRemote` that runs ``after`` once an upload
    returned, before the upload thread acts on the outcome, and keeps the last outcome."""

    def __init__(self, remote: HookedRemote) -> None:
        super().__init__(remote, concurrency=1)
        self.hooked = remote
        self.after: Callable[[], object] | None = None
        self.outcome: UploadOutcome | None = None

    def upload(
        self,
        store: Store,
        job: str,
        upload: Upload,
        *,
        on_bytes: Callable[[int], None] | None = None,
    ) -> UploadOutcome:
        self.outcome = None
        out = super().upload(store, job, upload, on_bytes=on_bytes)
        self.outcome = out
        self.hooked.clear_hook(in_upload_only=True)
        hook, self.after = self.after, None
        if hook is not None:
            hook()
        return out


class Daemon:
    """What the daemon holds in memory for one local root and the tier: its :class:`Store`,
    :class:`Uploads` (the queue) and :class:`Uploader`. A crash forgets all of it."""

    def __init__(
        self, root: Path, remote: HookedRemote, errors: list[str], *, keep_last: int = 3
    ) -> None:
        self.root = root
        self.store = Store(root)
        self.config = daemon_config(keep_last)
        self.uploads = Uploads(self.config, metrics=Metrics(), on_error=errors.append)
        self.uploader = HookedUploader(remote)
        # The tier's state as Uploads._state makes it, with this bucket in place of S3.
        tier = self.config.tier
        assert tier is not None
        self.uploads._tiers[URL] = _TierState(tier, self.uploader)
        # The job's first use in this daemon's life (Stores.attach): open it, resume its marks.
        self.store.open_job(JOB)
        self.uploads.recover_job(self.store, JOB)

    @property
    def tier(self) -> _TierState:
        return self.uploads._tiers[URL]

    def entries(self) -> dict[Upload, tuple[tuple[str, str, Upload], _Entry]]:
        return {key[2]: (key, entry) for key, entry in self.uploads._entries.items()}

    def commit(self, step: int, picks: Sequence[int], fresh: int | None) -> bytes:
        """The writer: mark, commit, queue (:mod:`ckptd.daemon.writer`). Returns the manifest."""
        upload = self.uploads.upload_for(JOB, step, rank=0, world_size=1, attempt=None)
        assert upload == Upload(step)
        self.uploads.begin(self.store, JOB, upload)
        self.store.mark_upload(JOB, upload)
        state = state_of(picks, fresh)
        api.save(JOB, state=state, step=step, root=self.root, rng=False, config=self.config)
        data = self.store.manifest_path(JOB, step).read_bytes()
        self.uploads.add(self.store, JOB, upload)
        return data

    def upload(self, upload: Upload) -> None:
        """The upload thread's work on ``upload``'s entry (raises what ``_one`` lets through)."""
        key, entry = self.entries()[upload]
        self.uploads._one(key, entry, self.tier)

    def settle(self) -> None:
        """Wait for the puts a failed upload left queued on the worker (they go on, as in the
        daemon, after ``upload`` raised)."""
        self.uploader.pool.submit(lambda: None).result()

    def die(self) -> None:
        """The process is gone: the puts queued on its worker are cancelled."""
        self.uploads.close()
        self.uploader.close()


def drain(daemon: Daemon) -> None:
    """Upload every queued entry, oldest step first, until the queue is empty (no faults)."""
    for _ in range(4 * len(daemon.entries()) + 4):
        queued = sorted(daemon.entries(), key=lambda u: u.step)
        if not queued:
            return
        daemon.upload(queued[0])
    raise AssertionError(f"the queue does not drain: {sorted(daemon.entries(), key=str)}")


def in_bucket(remote: MemoryRemote, step: int) -> bytes | None:
    found = remote.blobs.get(keys.manifest_key(JOB, step))
    return None if found is None else found[0]


def check_bucket(remote: MemoryRemote) -> dict[int, bytes]:
    """Every manifest in the bucket names objects it holds, of the stored size, that decode
    and hash to their names. Returns step -> manifest bytes."""
    blobs = remote.snapshot()
    found = {}
    for key, data in blobs.items():
        step = keys.manifest_step(JOB, key)
        if step is None:
            continue
        m = parse_manifest(data, where=key)
        assert (m.job, m.step) == (JOB, step), f"{key} holds job {m.job!r} step {m.step}"
        for digest, info in m.objects.items():
            okey = keys.object_key(JOB, digest)
            assert okey in blobs, f"the bucket shows step {step}, but not its object {okey}"
            obj = blobs[okey]
            assert len(obj) == info.stored_bytes, f"{okey}: {len(obj)} != {info.stored_bytes}"
            raw = bytearray(info.raw_bytes)
            decode(obj, memoryview(raw), where=okey)
            assert content_hash(raw) == digest, f"{okey} does not hash to its name"
        found[step] = data
    return found


def sometimes(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``strategy`` one time in three, else None (shrinks to None)."""
    return st.integers(0, 2).flatmap(lambda n: strategy if n == 2 else st.none())


faults = sometimes(
    st.tuples(
        st.sampled_from(["size", "put", "put_new", "get", "list", "delete"]),
        st.integers(1, 3),
        st.integers(1, 2),
    )
)
"""(op, nth, times): the nth next call of op and the times - 1 after it fail (TierError)."""
hooks = sometimes(
    st.tuples(st.sampled_from(["writer", "crash"]), st.integers(1, 10)) | st.just(("crash", 0))
)
"""At the nth bucket call from now: the writer commits the step being uploaded again, or the
daemon dies; ``("crash", 0)``: the daemon dies once the upload returned, before its mark is
removed."""


class TierMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="cktier", dir=TMPFS))
        self.remote = HookedRemote()
        self.errors: list[str] = []
        self.keep_last = 3
        self.daemon = self._boot()
        self.commits: dict[int, set[bytes]] = {}
        """Every manifest committed locally, per step."""
        self.next_step = 1
        self.fresh = 0

    def _boot(self) -> Daemon:
        return Daemon(self.dir / "root", self.remote, self.errors, keep_last=self.keep_last)

    @property
    def store(self) -> Store:
        return self.daemon.store

    def teardown(self) -> None:
        deleted = sum(v.count(None) for v in self.remote.history.values())
        event(f"run: steps deleted from the bucket {min(deleted, 3)}")
        try:
            if sys.exc_info()[0] is None:  # the run passed so far: the queue must drain
                self.drain()
        finally:
            self.daemon.die()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _local(self) -> list[int]:
        return self.store.steps(JOB)

    def _marked(self) -> set[int]:
        return {u.step for u in self.store.marked_uploads(JOB)}

    def _commit(self, step: int, picks: Sequence[int], fresh: bool) -> None:
        seed = None
        if fresh:
            seed, self.fresh = self.fresh, self.fresh + 1
        data = self.daemon.commit(step, picks, seed)
        self.commits.setdefault(step, set()).add(data)

    # ---- the writer ----------------------------------------------------------------------------

    @initialize(keep_last=st.integers(1, 3), n=st.integers(1, 3))
    def first_steps(self, keep_last: int, n: int) -> None:
        """The daemon's tier retention (``keep_last`` steps after each upload), and the first
        ``n`` steps."""
        self.daemon.die()
        self.keep_last = keep_last
        self.daemon = self._boot()
        for _ in range(n):
            self.commit_new_step([0, 1], fresh=True, gap=1)

    @rule(
        picks=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=3, unique=True),
        fresh=st.booleans(),
        gap=st.integers(1, 2),
    )
    def commit_new_step(self, picks: list[int], fresh: bool, gap: int) -> None:
        step, self.next_step = self.next_step, self.next_step + gap
        self._commit(step, picks, fresh)

    @precondition(lambda self: self.next_step > 1)
    @rule(
        data=st.data(),
        picks=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=3, unique=True),
        fresh=st.booleans(),
    )
    def commit_earlier_step(self, data: st.DataObject, picks: list[int], fresh: bool) -> None:
        """A step committed again (a higher seq), or a step below the highest one, committed by
        a run resumed from an older checkpoint."""
        step = data.draw(st.integers(1, self.next_step - 1), label="step")
        self._commit(step, picks, fresh)

    # ---- the upload thread ---------------------------------------------------------------------

    @precondition(lambda self: bool(self.daemon.uploads._entries))
    @rule(
        data=st.data(),
        fault=faults,
        hook=hooks,
        picks=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=2, unique=True),
    )
    def upload(
        self,
        data: st.DataObject,
        fault: tuple[str, int, int] | None,
        hook: tuple[str, int] | None,
        picks: list[int],
    ) -> None:
        queued = sorted(self.daemon.entries(), key=lambda u: u.step)
        upload = data.draw(st.sampled_from(queued), label="upload")
        step = upload.step
        daemon = self.daemon
        if fault is not None:
            op, nth, times = fault
            self.remote.fail(op, nth, times=times)
        if hook == ("crash", 0):
            daemon.uploader.after = self.remote.crash
        elif hook is not None:
            what, nth = hook
            if what == "writer":
                # At any call, the tier's retention after the upload included.
                self.remote.at_call(nth, partial(self._commit, step, picks, True))
            else:
                self.remote.at_call(nth, self.remote.crash)
        failures = daemon.tier.failures
        protect = self._marked() - {step}  # pending uploads, but the one running now
        versions = {k: len(v) for k, v in self.remote.history.items()}
        try:
            daemon.upload(upload)
        except SimulatedCrashError:
            pass
        # Puts the worker still had queued run now (after a failure they go on, as in the
        # daemon; after a death they fail): the hook and faults act on them the same every run.
        daemon.settle()
        self.remote.clear_faults()
        if self.remote.clear_hook():
            event("upload: the hook did not run")
        daemon.uploader.after = None
        if self.remote.dead:
            event("upload: crashed")
            self._restart()
            return
        deleted = {
            keys.manifest_step(JOB, k)
            for k, v in self.remote.history.items()
            if None in v[versions.get(k, 0) :]
        }
        assert not deleted & protect, "the tier's retention deleted a step whose upload is pending"
        out = daemon.uploader.outcome
        if out is not None:
            event("upload: " + ("gone" if out.gone else "changed" if out.changed else "done"))
        if daemon.tier.failures > failures:
            event("upload: the tier failed")
            assert upload in daemon.entries() and step in self._marked()
        elif step in self._local() and step not in self._marked():
            # Uploaded (and perhaps deleted by the tier's retention right after).
            mkey = keys.manifest_key(JOB, step)
            local = self.store.manifest_path(JOB, step).read_bytes()
            assert self.remote.blobs.get(mkey, (local,))[0] == local

    @precondition(lambda self: bool(self.daemon.uploads._entries))
    @rule()
    def upload_next(self) -> None:
        """The entry the upload thread takes next (``Uploads._next``: by due time, then age),
        with no fault."""
        entries = self.daemon.uploads._entries.items()
        key, entry = min(entries, key=lambda kv: (kv[1].due, kv[1].added))
        self.daemon.uploads._one(key, entry, self.daemon.tier)
        event("upload next: " + ("queued" if key in self.daemon.uploads._entries else "done"))

    def _restart(self) -> None:
        self.daemon.die()
        self.remote.dead = False
        self.daemon = self._boot()

    @precondition(lambda self: bool(self.daemon.uploads._entries))
    @rule()
    def drain(self) -> None:
        """Upload every mark with no faults: the queue empties, with no conflict or damage
        reported."""
        self.remote.clear_faults()
        drain(self.daemon)
        assert self.store.marked_uploads(JOB) == []
        unexpected = [e for e in self.errors if "injected fault" not in e]
        assert unexpected == []
        self.local_steps_are_in_the_bucket()

    @rule()
    def crash(self) -> None:
        """Between uploads: a new daemon on the same disk and bucket resumes every mark."""
        marks = set(self.store.marked_uploads(JOB))
        self._restart()
        assert set(self.daemon.entries()) == marks

    # ---- retention -----------------------------------------------------------------------------

    @precondition(lambda self: bool(self.commits))
    @rule()
    def local_retention(self) -> None:
        marked = self._marked()
        before = self._local()
        result = prune(self.store, JOB, LOCAL_POLICY)
        event(f"local retention: kept a pending step {bool(marked & set(before))}")
        assert not set(result.deleted) & marked, "a step whose upload is pending was deleted"
        assert self._local() == [s for s in before if s not in result.deleted]

    @precondition(lambda self: bool(self.commits))
    @rule(data=st.data(), collect=st.booleans())
    def delete_local_step(self, data: st.DataObject, collect: bool) -> None:
        """What the disk guard does: delete a step unless protected, then collect its objects."""
        steps = self._local()
        if not steps:
            return
        step = data.draw(st.sampled_from(steps), label="step")
        newest = max(job_facts(self.store, JOB), key=commit_order).step
        protected = step in (steps[-1], newest) or step in self._marked()
        assert delete_unprotected(self.store, JOB, step, newest) is not protected
        assert (step in self._local()) is protected
        if collect:
            self.store.gc(JOB)

    @rule(fault=faults)
    def tier_retention(self, fault: tuple[str, int, int] | None) -> None:
        """The tier's retention with no grace (see the module docstring); the store may fail in
        the middle of it."""
        protect = self._marked()
        before = check_bucket(self.remote)
        if fault is not None:
            self.remote.fail(fault[0], fault[1], times=fault[2])
        try:
            result = prune_tier(self.remote, JOB, TIER_POLICY, grace_s=0, protect=protect)
        except TierError as exc:
            assert fault is not None and "injected fault" in str(exc)
            return
        finally:
            self.remote.clear_faults()
        after = check_bucket(self.remote)
        event(f"tier retention: deleted {len(result.deleted)} steps")
        event(f"tier retention: collected objects {result.objects_deleted > 0}")
        assert set(after) == set(before) - set(result.deleted)
        assert not set(result.deleted) & protect
        if before:
            order = {s: parse_manifest(d, where=str(s)) for s, d in before.items()}
            newest = max(order, key=lambda s: (order[s].seq, order[s].created, s))
            assert newest in after, "the newest commit was deleted"
            assert max(before) in after, "the highest step was deleted"

    # ---- invariants ----------------------------------------------------------------------------

    @invariant()
    def bucket_never_shows_a_broken_or_invented_checkpoint(self) -> None:
        for step, data in check_bucket(self.remote).items():
            assert data in self.commits.get(step, set()), f"step {step}: not a local commit"

    @invariant()
    def marked_steps_are_committed_locally(self) -> None:
        assert self._marked() <= set(self._local())

    @invariant()
    def the_queue_holds_the_marks(self) -> None:
        assert set(self.daemon.entries()) == set(self.store.marked_uploads(JOB))

    @invariant()
    def unmarked_local_steps_are_in_the_bucket(self) -> None:
        self.local_steps_are_in_the_bucket()

    def local_steps_are_in_the_bucket(self) -> None:
        """A local step not marked is in the bucket with its bytes, or was until the tier's
        retention deleted it."""
        marked = self._marked()
        for step in self._local():
            if step in marked:
                continue
            local = self.store.manifest_path(JOB, step).read_bytes()
            mkey = keys.manifest_key(JOB, step)
            there = self.remote.blobs.get(mkey)
            if there is not None:
                assert there[0] == local, f"step {step}: the bucket holds another commit"
            else:
                assert local in self.remote.history.get(mkey, []), (
                    f"step {step} is committed locally, not marked, and never was in the bucket"
                )


TierMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # explaining a failure takes minutes
)
TestTierMachine = TierMachine.TestCase


# ---- what the machine does not draw: sequences the code mishandles ------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    node = Daemon(tmp_path / "root", HookedRemote(), [])
    yield node
    node.die()


def test_a_step_committed_again_before_its_unmark_is_uploaded(daemon: Daemon) -> None:
    """The writer commits step 1 again once its upload returned, while the upload thread runs
    the tier's retention (before it drops the mark): the new commit must reach the bucket."""
    daemon.commit(1, [0], None)
    daemon.uploader.after = lambda: daemon.commit(1, [1], None)
    daemon.upload(Upload(1))
    local = daemon.store.manifest_path(JOB, 1).read_bytes()
    drain(daemon)
    assert in_bucket(daemon.uploader.hooked, 1) == local


def test_a_step_committed_again_while_its_upload_reads_it_is_uploaded(daemon: Daemon) -> None:
    """The upload has read step 2's manifest; before it looks at the objects the writer commits
    step 2 again and its retention (keep_last=1) deletes step 1 and collects the objects nothing
    references any more, among them one of the commit being uploaded."""
    remote = daemon.uploader.hooked
    daemon.commit(1, [0], None)
    drain(daemon)
    daemon.commit(2, [0], 1)

    def writer() -> None:
        daemon.commit(2, [1], None)
        assert prune(daemon.store, JOB, LOCAL_POLICY).deleted == [1]

    remote.at_call(1, writer, in_upload=True)
    daemon.upload(Upload(2))
    local = daemon.store.manifest_path(JOB, 2).read_bytes()
    drain(daemon)
    assert in_bucket(remote, 2) == local


def test_a_step_removed_and_committed_again_replaces_it_in_the_bucket(daemon: Daemon) -> None:
    """Roll back: `ckptd rm` the latest step (a loss spike), resume from the one before it, and
    save the same step number again."""
    remote = daemon.uploader.hooked
    for step in (1, 2):
        daemon.commit(step, [step], None)
    drain(daemon)
    daemon.store.delete_checkpoint(JOB, 2)  # ckptd rm
    daemon.commit(2, [3], None)
    local = daemon.store.manifest_path(JOB, 2).read_bytes()
    drain(daemon)
    assert in_bucket(remote, 2) == local


def test_a_fresh_nodes_commits_are_the_newest_in_the_bucket(tmp_path: Path) -> None:
    """Node 1 uploads steps 1-3 and dies with its disk; node 2, on a fresh local root (it
    restored step 3 from the tier), saves steps 4 and 5."""
    remote = HookedRemote()
    nodes = [Daemon(tmp_path / name, remote, []) for name in ("node1", "node2")]
    try:
        for step in (1, 2, 3):
            nodes[0].commit(step, [step], None)
        drain(nodes[0])
        for step in (4, 5):
            nodes[1].commit(step, [step], None)
            drain(nodes[1])
        tier = TierStore(remote, tmp_path / "cache")
        assert tier.resolve_step(JOB, "latest") == 5
        assert sorted(check_bucket(remote)) == [3, 4, 5]  # the tier's keep_last=3
    finally:
        for node in nodes:
            node.die()
