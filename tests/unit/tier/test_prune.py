"""The tier's own retention against an in-memory bucket: manifests first (never the newest commit,
the highest step or a protected one), then the deleted steps' part records, then objects nothing
references and older than the grace period; foreign keys are never touched, a damaged manifest or
part stops the job, and a checkpoint committed while pruning keeps its objects.

Checkpoints are real ones (``ckptd_client.save`` to a local store), copied to the bucket byte for
byte as the uploader does (objects first, manifests last)."""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.errors import NotFoundError, TierError
from ckptd.format.manifest import parse_manifest
from ckptd.format.store import Store
from ckptd.policy.retention import RetentionPolicy
from ckptd.tier import keys
from ckptd.tier.prune import TierPruneResult, prune_tier
from ckptd.tier.remote import Data, Listed, TierUrl, parse_url
from ckptd_client import api

JOB = "run"
URL = "s3://bucket/tier"
OLD_S = 2 * 3600.0
"""How long ago the bucket's keys were written, unless a test says otherwise: past the grace."""


class MemoryRemote:
    """A :class:`~ckptd.tier.remote.Remote` in memory. Each write is stamped ``age_s`` seconds
    in the past. The other writer of a race is played by hooks: ``on_list[prefix](n)`` runs when
    the ``n``-th listing of ``prefix`` starts, ``on_delete[key]()`` right after ``key`` is first
    deleted. Every call is logged."""

    def __init__(self, url: str = URL) -> None:
        self.url: TierUrl = parse_url(url)
        self.blobs: dict[str, tuple[bytes, float]] = {}
        self.calls: builtins.list[tuple[str, str]] = []
        self.age_s = OLD_S
        self.on_list: dict[str, Callable[[int], None]] = {}
        self._listings: dict[str, int] = {}
        self.on_delete: dict[str, Callable[[], None]] = {}

    def get(self, key: str) -> bytes:
        self.calls.append(("get", key))
        if key not in self.blobs:
            raise NotFoundError(f"{self.url}/{key} is not in the tier")
        return self.blobs[key][0]

    def put(self, key: str, data: Data) -> None:
        self.blobs[key] = (bytes(data), float(int(time.time() - self.age_s)))

    def put_new(self, key: str, data: Data) -> bool:
        if key in self.blobs:
            return False
        self.put(key, data)
        return True

    def size(self, key: str) -> int | None:
        return len(self.blobs[key][0]) if key in self.blobs else None

    def list(self, prefix: str) -> Iterator[Listed]:
        self.calls.append(("list", prefix))
        self._listings[prefix] = self._listings.get(prefix, 0) + 1
        hook = self.on_list.get(prefix)
        if hook is not None:
            hook(self._listings[prefix])
        head = prefix.rstrip("/") + "/" if prefix else ""
        for key in sorted(self.blobs):
            if key.startswith(head) and key in self.blobs:
                data, mtime = self.blobs[key]
                yield Listed(key, len(data), mtime)

    def dirs(self, prefix: str) -> builtins.list[str]:
        raise AssertionError("retention never lists directories")

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.calls.append(("delete", key))
            self.blobs.pop(key, None)
            hook = self.on_delete.pop(key, None)
            if hook is not None:
                hook()

    def check(self) -> None:
        pass

    def deleted(self) -> builtins.list[str]:
        return [k for op, k in self.calls if op == "delete"]


def upload(root: Path, remote: MemoryRemote, job: str = JOB) -> None:
    """Copy ``job``'s tree of a local store to the bucket as the uploader does: objects, part
    records, then manifests; keys already there stay as they are (the uploader skips them)."""
    base = root / job
    files = [
        p
        for p in sorted(base.rglob("*"))
        if p.is_file()
        and (
            p.parent.parent.name == "objects"
            or p.parent.name == "manifests"
            or ("parts" in p.relative_to(base).parts and p.name.startswith("rank-"))
        )
    ]
    for path in sorted(files, key=lambda p: p.parent.name == "manifests"):
        remote.put_new(path.relative_to(root).as_posix(), path.read_bytes())


def state_of(step: int) -> dict[str, Any]:
    """One tensor every step shares and one of its own (one object each)."""
    g = torch.Generator().manual_seed(step)
    return {"fixed": torch.arange(256.0), "own": torch.randn(128, generator=g)}


def object_keys(store: Store, job: str, *steps: int) -> set[str]:
    """The bucket keys of every object the steps use (a multi-rank step's: its parts')."""
    return {
        keys.object_key(job, digest)
        for step in steps
        for part in store.step_parts(job, step)
        for digest in part.objects
    }


def steps_in(remote: MemoryRemote, job: str = JOB) -> list[int]:
    found = (keys.manifest_step(job, k) for k in remote.blobs)
    return sorted(s for s in found if s is not None)


def whole(remote: MemoryRemote, store: Store, job: str = JOB) -> bool:
    """Every step in the bucket has its parts and objects there."""
    steps = steps_in(remote, job)
    parts = {
        keys.record_key(job, ref.record)
        for step in steps
        for ref in store.read_manifest(job, step).parts
    }
    return parts <= remote.blobs.keys() and object_keys(store, job, *steps) <= remote.blobs.keys()


@pytest.fixture
def remote() -> MemoryRemote:
    return MemoryRemote()


@pytest.fixture
def saved(root: Path, remote: MemoryRemote) -> Store:
    """Job ``run``: steps 1..4 committed in order, each with its metric, in the bucket."""
    for step, metric in zip((1, 2, 3, 4), (0.5, 0.1, 0.9, 0.7), strict=True):
        api.save(JOB, state=state_of(step), step=step, metric=metric, root=root, rng=False)
    upload(root, remote)
    return Store(root)


def test_keep_last_deletes_manifests_then_the_objects_only_they_used(
    remote: MemoryRemote, saved: Store
) -> None:
    before = set(remote.blobs)
    result = prune_tier(remote, JOB, RetentionPolicy(keep_last=2))
    assert result.reasons == {4: ["newest", "last 2"], 3: ["last 2"], 2: [], 1: []}
    assert result.deleted == [1, 2] and steps_in(remote) == [3, 4]
    freed = object_keys(saved, JOB, 1, 2) - object_keys(saved, JOB, 3, 4)
    assert len(freed) == 2  # each deleted step's own tensor; the shared one stays
    gone = {keys.manifest_key(JOB, 1), keys.manifest_key(JOB, 2)} | freed
    assert before - set(remote.blobs) == gone
    assert result.objects_deleted == 2
    assert result.bytes_deleted == sum((saved.root / k).stat().st_size for k in freed)
    assert whole(remote, saved)
    # Manifests first, then objects; no object is ever read.
    order = remote.deleted()
    assert order[:2] == [keys.manifest_key(JOB, 1), keys.manifest_key(JOB, 2)]
    assert not any("/objects/" in k for op, k in remote.calls if op == "get")
    # Nothing left to do: a second run deletes nothing.
    again = prune_tier(remote, JOB, RetentionPolicy(keep_last=2))
    assert (again.deleted, again.objects_deleted, again.bytes_deleted) == ([], 0, 0)


def test_dry_run_reports_what_a_run_deletes_and_changes_nothing(
    remote: MemoryRemote, saved: Store
) -> None:
    before = dict(remote.blobs)
    dry = prune_tier(remote, JOB, RetentionPolicy(keep_last=2), dry_run=True)
    assert remote.blobs == before and remote.deleted() == []
    real = prune_tier(remote, JOB, RetentionPolicy(keep_last=2))
    assert dry == real and real.objects_deleted == 2


def test_keep_best_keeps_the_best_metrics_and_the_newest(
    remote: MemoryRemote, saved: Store
) -> None:
    result = prune_tier(remote, JOB, RetentionPolicy(keep_best=2, mode="max"))
    assert result.reasons == {
        4: ["newest", "best 2 (max metric)"],
        3: ["best 2 (max metric)"],
        2: [],
        1: [],
    }
    assert steps_in(remote) == [3, 4]
    result = prune_tier(remote, JOB, RetentionPolicy(keep_best=1, mode="min"))
    assert result.reasons == {4: ["newest", "best 1 (min metric)"], 3: []}
    assert steps_in(remote) == [4] and whole(remote, saved)


def test_the_newest_commit_and_the_highest_step_are_never_deleted(
    root: Path, remote: MemoryRemote
) -> None:
    # A run resumed from step 3 after step 9: step 4 is its newest commit, 9 the highest step.
    for step in (3, 9, 4):
        api.save(JOB, state=state_of(step), step=step, root=root, rng=False)
    upload(root, remote)
    result = prune_tier(remote, JOB, RetentionPolicy(keep_every=1000))
    assert result.reasons == {4: ["newest"], 9: ["highest step"], 3: []}
    assert result.deleted == [3] and steps_in(remote) == [4, 9]
    assert whole(remote, Store(root))


def test_protected_steps_stay_with_their_objects(remote: MemoryRemote, saved: Store) -> None:
    result = prune_tier(remote, JOB, RetentionPolicy(keep_last=1), protect={2, 77})
    assert result.reasons == {4: ["newest", "last 1"], 3: [], 2: ["protected"], 1: []}
    assert result.deleted == [1, 3] and steps_in(remote) == [2, 4]
    assert whole(remote, saved)


def test_objects_younger_than_the_grace_period_stay_until_it_passes(
    root: Path, remote: MemoryRemote
) -> None:
    remote.age_s = 60.0  # uploaded a minute ago
    for step in (1, 2):
        api.save(JOB, state=state_of(step), step=step, root=root, rng=False)
    upload(root, remote)
    result = prune_tier(remote, JOB, RetentionPolicy(keep_last=1))
    assert result.deleted == [1] and result.objects_deleted == 0
    step1_only = object_keys(Store(root), JOB, 1) - object_keys(Store(root), JOB, 2)
    assert len(step1_only) == 1 and step1_only <= remote.blobs.keys()
    result = prune_tier(remote, JOB, RetentionPolicy(keep_last=1), grace_s=30.0)
    assert result.objects_deleted == 1 and not step1_only & remote.blobs.keys()
    with pytest.raises(ValueError, match="grace_s must be >= 0"):
        prune_tier(remote, JOB, RetentionPolicy(keep_last=1), grace_s=-1.0)


def test_keys_ckptd_did_not_write_are_never_deleted(
    root: Path, remote: MemoryRemote, saved: Store
) -> None:
    digest = next(iter(saved.read_manifest(JOB, 1).objects))
    other_fan_out = ("00" if digest[:2] != "00" else "01") + digest[2:]
    api.save("other", state=state_of(1), step=1, root=root, rng=False)
    upload(root, remote, "other")
    foreign = [
        f"{JOB}/objects/notes.txt",
        f"{JOB}/objects/ab/{other_fan_out}",
        f"{JOB}/objects/{digest[:2]}/{digest}.bak",
        f"{JOB}/objects/{digest[:2]}/{digest[:-1]}",
        f"{JOB}/manifests/step-1.json",
        f"{JOB}/manifests/notes.json",
        f"{JOB}/parts/step-000000000001/a1/notes.json",
        f"{JOB}/parts/step-000000000001/a1/rank-1.json",
        f"{JOB}/README",
        "other.txt",
    ]
    for key in foreign:
        remote.put(key, b"not ckptd's")
    other = {k for k in remote.blobs if k.startswith("other/")}
    result = prune_tier(remote, JOB, RetentionPolicy(keep_last=1))
    assert result.deleted == [1, 2, 3] and result.objects_deleted == 3
    assert set(foreign) | other <= remote.blobs.keys()
    assert not any(k.startswith("other/") or k in foreign for k in remote.deleted())


def test_a_damaged_manifest_stops_the_job_naming_its_key(
    remote: MemoryRemote, saved: Store
) -> None:
    key = keys.manifest_key(JOB, 2)
    data = remote.blobs[key][0]
    remote.put(key, data.replace(b'"step": 2', b'"step": 7'))
    before = dict(remote.blobs)
    with pytest.raises(TierError, match=f"{URL}/{key}: checksum mismatch") as info:
        prune_tier(remote, JOB, RetentionPolicy(keep_last=1))
    assert "retention of job 'run' is stopped" in str(info.value)
    assert remote.blobs == before
    # A whole manifest under another step's key is no better.
    remote.put(key, remote.blobs[keys.manifest_key(JOB, 1)][0])
    with pytest.raises(TierError, match=f"{key} holds a checkpoint of job 'run' step 1, not what"):
        prune_tier(remote, JOB, RetentionPolicy(keep_last=1))
    assert remote.deleted() == []


@pytest.fixture
def ranks(root: Path, remote: MemoryRemote) -> Store:
    """Job ``run``, 2 ranks: a set of attempt a0 for step 5 that never committed (rank 0 only),
    then attempt a1 committing steps 5 and 6, and waiting for rank 1 at step 7."""
    for attempt, step, rank in (
        ("a0", 5, 0),
        ("a1", 5, 0),
        ("a1", 5, 1),
        ("a1", 6, 0),
        ("a1", 6, 1),
        ("a1", 7, 0),
    ):
        seed = 100 * step + 10 * rank + (attempt == "a1")
        api.save(
            JOB,
            state=state_of(seed),
            step=step,
            root=root,
            rng=False,
            rank=rank,
            world_size=2,
            attempt=attempt,
        )
    upload(root, remote)
    assert Store(root).steps(JOB) == [5, 6]
    return Store(root)


def part_objects(store: Store, key: str) -> set[str]:
    """The object keys the part record at ``key`` (a local path relative to the root) uses."""
    part = parse_manifest((store.root / key).read_bytes(), where=key)
    return {keys.object_key(JOB, h) for h in part.objects}


def test_a_multi_rank_step_goes_with_its_parts_and_their_objects(
    remote: MemoryRemote, ranks: Store
) -> None:
    own = [keys.part_key(JOB, 5, "a1", r) for r in (0, 1)]
    stale = keys.part_key(JOB, 5, "a0", 0)
    waiting = keys.part_key(JOB, 7, "a1", 0)
    kept = object_keys(ranks, JOB, 6) | part_objects(ranks, waiting)
    freed = object_keys(ranks, JOB, 5) - kept | part_objects(ranks, stale) - kept
    assert len(freed) == 3  # step 5's two own tensors and the a0 part's; "fixed" is shared
    result = prune_tier(remote, JOB, RetentionPolicy(keep_last=1))
    assert result.reasons == {6: ["newest", "last 1"], 5: []}
    assert result.deleted == [5] and steps_in(remote) == [6]
    # The record, then its set and the stale set of another attempt of the step, then objects.
    assert remote.deleted()[:4] == [keys.manifest_key(JOB, 5), stale, *own]
    assert result.objects_deleted == 3 and set(remote.deleted()[4:]) == freed
    # Step 7 waits for rank 1: its part stays, and the objects it uses.
    assert waiting in remote.blobs and kept <= remote.blobs.keys() and whole(remote, ranks)


def test_a_damaged_part_record_stops_the_job(remote: MemoryRemote, ranks: Store) -> None:
    key = keys.part_key(JOB, 7, "a1", 0)
    remote.put(key, remote.blobs[key][0][:-20])
    with pytest.raises(TierError, match=f"stopped: {URL}/{key}: not valid JSON"):
        prune_tier(remote, JOB, RetentionPolicy(keep_last=1))
    assert remote.deleted() == []


def test_objects_of_a_checkpoint_committed_while_pruning_are_kept(
    remote: MemoryRemote, saved: Store
) -> None:
    # The uploader creates step 1 again (its manifest deleted meanwhile) while objects are
    # listed: step 1's objects are unreferenced when GC starts, and must stay.
    step1 = keys.manifest_key(JOB, 1)
    data = remote.blobs[step1][0]

    def create_again(listing: int) -> None:
        if listing == 1:
            remote.put(step1, data)

    remote.on_list[keys.objects_prefix(JOB)] = create_again
    result = prune_tier(remote, JOB, RetentionPolicy(keep_last=2))
    assert result.deleted == [1, 2] and steps_in(remote) == [1, 3, 4]
    assert result.objects_deleted == 1 and whole(remote, saved)


def test_a_step_committed_again_before_its_deletion_is_kept(
    remote: MemoryRemote, saved: Store
) -> None:
    # Step 1 is written again after it was read, before the listing that precedes deletion.
    step1 = keys.manifest_key(JOB, 1)
    data = remote.blobs[step1][0]

    def commit_again(listing: int) -> None:
        if listing == 2:
            remote.age_s = 0.0
            remote.put(step1, data)
            remote.age_s = OLD_S

    remote.on_list[keys.manifests_prefix(JOB)] = commit_again
    result = prune_tier(remote, JOB, RetentionPolicy(keep_last=2))
    assert result.deleted == [2] and steps_in(remote) == [1, 3, 4] and whole(remote, saved)


def test_a_step_left_highest_by_another_deleter_is_kept(remote: MemoryRemote, saved: Store) -> None:
    # Someone else deletes steps 3 and 4 after they were read: step 2 is now the highest.
    def delete_newer(listing: int) -> None:
        if listing == 2:
            remote.delete([keys.manifest_key(JOB, 3), keys.manifest_key(JOB, 4)])

    remote.on_list[keys.manifests_prefix(JOB)] = delete_newer
    result = prune_tier(remote, JOB, RetentionPolicy(keep_last=2))
    assert result.deleted == [1] and steps_in(remote) == [2] and whole(remote, saved)


def test_a_global_record_created_again_while_its_parts_go_is_deleted(
    remote: MemoryRemote, ranks: Store
) -> None:
    # Another node listed step 5's parts before they went and creates its record again.
    record = keys.manifest_key(JOB, 5)
    data = remote.blobs[record][0]
    remote.on_delete[record] = lambda: remote.put(record, data)
    result = prune_tier(remote, JOB, RetentionPolicy(keep_last=1))
    assert result.deleted == [5] and steps_in(remote) == [6]
    assert remote.deleted().count(record) == 2 and whole(remote, ranks)


def test_without_a_policy_everything_is_kept(remote: MemoryRemote, saved: Store) -> None:
    before = dict(remote.blobs)
    result = prune_tier(remote, JOB, RetentionPolicy(), grace_s=0.0)
    everything = ["no policy"]
    assert result == TierPruneResult(
        JOB, {4: ["newest", *everything], 3: everything, 2: everything, 1: everything}, [], 0, 0
    )
    assert remote.blobs == before
