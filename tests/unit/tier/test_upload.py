"""Uploader over an in-memory Remote: objects before the manifest, the manifest created once,
dedup against the bucket, damaged local objects never spread, conflicts refused, and the
multi-rank commit made in the bucket from the ranks' parts.

Checkpoints are real ones (``ckptd_client.api.save`` to a local store, small chunks so each
tensor is an object of its own); the uploader reads them through a fresh :class:`Store`, as the
daemon's upload thread does after a restart (nothing known about the files yet)."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.config import Config, StoreConfig
from ckptd.errors import CorruptCheckpointError, TierError
from ckptd.format.jobmeta import Upload
from ckptd.format.manifest import Manifest, manifest_checksum, parse_manifest
from ckptd.format.store import Store
from ckptd.tier import keys
from ckptd.tier.remote import Data, Remote
from ckptd.tier.upload import TierConflictError, Uploader
from ckptd_client import api
from tests.unit.tier.memory_remote import MemoryRemote

JOB = "run"
RANKS = "ranks"
ATTEMPT = "a1"
SMALL = Config(store=StoreConfig(chunk_bytes=4096, pack_bytes=1024))
"""Every 4 KiB tensor is an object of its own."""


def state_of(seed: int) -> dict[str, Any]:
    """Three 4 KiB tensors: ``shared`` is the same in every state, the others depend on ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "shared": torch.randn(1024, generator=torch.Generator().manual_seed(0)),
        "w": torch.randn(1024, generator=g),
        "b": torch.randn(1024, generator=g),
        "meta": {"seed": seed},
    }


def save(root: Path, job: str, step: int, seed: int, **ranks: Any) -> None:
    api.save(job, state=state_of(seed), step=step, root=root, rng=False, config=SMALL, **ranks)


def save_part(root: Path, rank: int, *, world_size: int = 2, attempt: str = ATTEMPT) -> None:
    save(root, RANKS, 5, 10 + rank, rank=rank, world_size=world_size, attempt=attempt)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Job ``run`` steps 1 and 2 (sharing one object); job ``ranks`` step 5 by 2 ranks."""
    path = tmp_path_factory.mktemp("upload") / "store"
    save(path, JOB, 1, seed=1)
    save(path, JOB, 2, seed=2)
    for rank in (0, 1):
        save_part(path, rank)
    return path


@pytest.fixture
def local(template: Path, root: Path) -> Store:
    """A copy of ``template`` of this test's own (tests damage and re-commit it)."""
    shutil.copytree(template, root)
    return Store(root)


@pytest.fixture
def remote() -> MemoryRemote:
    return MemoryRemote("s3://bucket/team")


@pytest.fixture
def uploader(remote: MemoryRemote) -> Iterator[Uploader]:
    up = Uploader(remote, concurrency=4)
    yield up
    up.close()


def object_keys(m: Manifest) -> set[str]:
    return {keys.object_key(m.job, d) for d in m.objects}


def local_bytes(store: Store, key: str) -> bytes:
    return (store.root / key).read_bytes()


def test_memory_remote_is_a_remote(remote: MemoryRemote) -> None:
    as_remote: Remote = remote  # checked by mypy: the test double keeps the interface
    assert as_remote.put_new("a/b", b"1") and not as_remote.put_new("a/b", b"2")
    as_remote.put("a/bc/d", b"22")
    assert remote.get("a/b") == b"1" and remote.size("a/bc/d") == 2 and remote.size("a") is None
    assert list(remote.list("a/b")) == []  # a directory prefix: "a/b" is a file, "a/bc" not in it
    assert [x.key for x in remote.list("a")] == ["a/b", "a/bc/d"]
    assert [x.key for x in remote.list("a/bc")] == ["a/bc/d"]
    assert remote.dirs("") == ["a"] and remote.dirs("a") == ["bc"]
    remote.fail("get", nth=2)
    remote.get("a/b")
    with pytest.raises(TierError, match="injected fault: get 'a/b'"):
        remote.get("a/b")
    assert remote.get("a/b") == b"1"  # one failure only


# ---- one checkpoint -----------------------------------------------------------------------------


def test_objects_are_put_before_the_manifest_which_is_created_exclusively(
    local: Store, remote: MemoryRemote, uploader: Uploader
) -> None:
    m = local.read_manifest(JOB, 1)
    assert len(m.objects) == 3
    sent: list[int] = []
    out = uploader.upload(local, JOB, Upload(1), on_bytes=sent.append)
    mkey = keys.manifest_key(JOB, 1)
    written = remote.written()
    assert written[-1] == mkey and written.count(mkey) == 1
    assert set(written[:-1]) == object_keys(m) | {keys.MARKER}
    assert remote.ops("put_new").count(mkey) == 1 and mkey not in remote.ops("put")
    # Byte for byte as the local store has them.
    for key in object_keys(m) | {mkey}:
        assert remote.blobs[key][0] == local_bytes(local, key)
    stored = sum(o.stored_bytes for o in m.objects.values())
    assert (out.objects_put, out.objects_present, out.bytes_put) == (3, 0, stored)
    assert sum(sent) == stored and not out.gone and not out.changed


def test_a_failed_object_put_leaves_no_manifest_and_a_retry_completes(
    local: Store, remote: MemoryRemote
) -> None:
    m = local.read_manifest(JOB, 1)
    mkey = keys.manifest_key(JOB, 1)
    remote.fail("put", nth=2)
    up = Uploader(remote, concurrency=1)
    try:
        with pytest.raises(TierError, match="injected fault: put"):
            up.upload(local, JOB, Upload(1))
        up.pool.submit(lambda: None).result()  # one worker: every put it started is over
        assert mkey not in remote.blobs
        after_failure = set(remote.blobs)
        assert 1 <= len(after_failure & object_keys(m)) < 3
        out = up.upload(local, JOB, Upload(1))
    finally:
        up.close()
    assert remote.written()[-1] == mkey
    assert remote.blobs[mkey][0] == local_bytes(local, mkey)
    # Each object was written once, by whichever attempt got it there.
    assert Counter(k for k in remote.written() if k in object_keys(m)) == dict.fromkeys(
        object_keys(m), 1
    )
    assert out.objects_put == len(object_keys(m) - after_failure)
    assert out.objects_put + out.objects_present == 3


def test_objects_already_in_the_bucket_with_their_size_are_not_put_again(
    local: Store, remote: MemoryRemote, uploader: Uploader
) -> None:
    uploader.upload(local, JOB, Upload(1))
    m = local.read_manifest(JOB, 1)
    truncated = sorted(object_keys(m))[0]
    remote.put(truncated, remote.blobs[truncated][0][:-1])
    before = len(remote.written())
    # A new uploader (a restarted daemon) knows nothing: it looks each object up.
    fresh = Uploader(remote)
    try:
        out = fresh.upload(local, JOB, Upload(1))
    finally:
        fresh.close()
    assert remote.written()[before:] == [truncated]  # the one of the wrong size only
    assert remote.blobs[truncated][0] == local_bytes(local, truncated)
    assert (out.objects_put, out.objects_present) == (1, 2)
    assert out.bytes_put == m.objects[truncated.rsplit("/", 1)[1]].stored_bytes


def test_the_next_checkpoint_puts_only_its_new_objects(
    local: Store, remote: MemoryRemote, uploader: Uploader
) -> None:
    uploader.upload(local, JOB, Upload(1))
    m1, m2 = local.read_manifest(JOB, 1), local.read_manifest(JOB, 2)
    new = {keys.object_key(JOB, d) for d in set(m2.objects) - set(m1.objects)}
    assert len(new) == 2 and len(m2.objects) == 3  # "shared" is one object of both
    before, looked_up = len(remote.written()), len(remote.ops("size"))
    sent: list[int] = []
    out = uploader.upload(local, JOB, Upload(2), on_bytes=sent.append)
    assert set(remote.written()[before:-1]) == new
    assert remote.written()[-1] == keys.manifest_key(JOB, 2)
    assert (out.objects_put, out.objects_present) == (2, 1)
    assert out.bytes_put == sum(m2.objects[k.rsplit("/", 1)[1]].stored_bytes for k in new)
    assert sum(sent) == out.bytes_put
    # The shared object was looked up in the bucket, not taken from memory.
    assert set(remote.ops("size")[looked_up:]) == object_keys(m2)


def test_an_object_deleted_from_the_bucket_since_is_put_again(
    local: Store, remote: MemoryRemote, uploader: Uploader
) -> None:
    """Another daemon's retention may delete an object this uploader saw: a manifest must never
    name a missing object."""
    uploader.upload(local, JOB, Upload(1))
    m1, m2 = local.read_manifest(JOB, 1), local.read_manifest(JOB, 2)
    shared = keys.object_key(JOB, (set(m1.objects) & set(m2.objects)).pop())
    remote.delete([shared])
    out = uploader.upload(local, JOB, Upload(2))
    assert out.objects_put == 3 and object_keys(m2) <= set(remote.blobs)
    assert remote.get(shared) == local_bytes(local, shared)


def test_an_object_deleted_while_the_upload_runs_is_put_again_before_the_manifest(
    local: Store,
) -> None:
    """Another node's retention collects a shared object after this upload found it there and
    before its manifest: it is looked up again, and put again."""
    remote = MemoryRemote()
    Uploader(remote, concurrency=1).upload(local, JOB, Upload(1))
    m1, m2 = local.read_manifest(JOB, 1), local.read_manifest(JOB, 2)
    shared = keys.object_key(JOB, (set(m1.objects) & set(m2.objects)).pop())

    class CollectedMeanwhile(MemoryRemote):
        looked = 0

        def size(self, key: str) -> int | None:
            found = super().size(key)
            if key == shared:
                self.looked += 1
                if self.looked == 1:
                    self.delete([shared])  # right after the first look
            return found

    racing = CollectedMeanwhile()
    racing.blobs.update(remote.blobs)
    out = Uploader(racing, concurrency=1).upload(local, JOB, Upload(2))
    assert racing.looked == 2
    assert object_keys(m2) <= set(racing.blobs)
    assert racing.get(shared) == local_bytes(local, shared)
    assert racing.written()[-1] == keys.manifest_key(JOB, 2)
    assert out.objects_put == 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_damaged_local_object_is_never_uploaded(
    local: Store, remote: MemoryRemote, uploader: Uploader, damage: str
) -> None:
    m = local.read_manifest(JOB, 1)
    digest = sorted(m.objects)[1]
    path = local.object_path(JOB, digest)
    data = path.read_bytes()
    if damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.unlink()
    fresh = Store(local.root)  # knows nothing of the files: checks each one in full
    with pytest.raises(CorruptCheckpointError, match=f"local object {digest} is damaged"):
        uploader.upload(fresh, JOB, Upload(1))
    assert keys.manifest_key(JOB, 1) not in remote.blobs
    assert keys.object_key(JOB, digest) not in remote.blobs


def test_an_upload_run_again_changes_nothing(
    local: Store, remote: MemoryRemote, uploader: Uploader
) -> None:
    uploader.upload(local, JOB, Upload(1))
    before = remote.snapshot()
    count = len(remote.written())
    out = uploader.upload(local, JOB, Upload(1))
    assert remote.snapshot() == before and len(remote.written()) == count
    assert (out.objects_put, out.objects_present, out.bytes_put) == (0, 3, 0)


def test_a_step_committed_again_replaces_the_bucket_manifest(
    local: Store, remote: MemoryRemote, uploader: Uploader
) -> None:
    uploader.upload(local, JOB, Upload(1))
    mkey = keys.manifest_key(JOB, 1)
    old = parse_manifest(remote.get(mkey), where=mkey)
    save(local.root, JOB, 1, seed=7)  # the same step, committed again: a higher seq
    new = local.read_manifest(JOB, 1)
    assert new.seq > old.seq
    out = uploader.upload(local, JOB, Upload(1))
    assert remote.get(mkey) == local_bytes(local, mkey)
    assert object_keys(new) <= set(remote.blobs)
    assert out.objects_put == 2  # "shared" was there
    assert remote.written()[-1] == mkey


def test_a_bucket_manifest_that_does_not_parse_is_replaced(
    local: Store, remote: MemoryRemote, uploader: Uploader
) -> None:
    mkey = keys.manifest_key(JOB, 1)
    remote.put(mkey, b'{"format": "ckptd"')
    uploader.upload(local, JOB, Upload(1))
    assert remote.get(mkey) == local_bytes(local, mkey)


@pytest.mark.parametrize("theirs", ["higher-seq", "same-seq", "multi-rank-record"])
def test_another_commit_of_the_step_in_the_bucket_is_a_conflict(
    local: Store, remote: MemoryRemote, uploader: Uploader, theirs: str
) -> None:
    uploader.upload(local, JOB, Upload(1))  # objects there already: only the manifest differs
    mkey = keys.manifest_key(JOB, 1)
    mine = local.read_manifest(JOB, 1)
    if theirs == "higher-seq":
        foreign = replace(mine, seq=mine.seq + 10).to_json()
    elif theirs == "same-seq":
        foreign = replace(mine, metric=0.5).to_json()
    else:
        foreign = local.manifest_path(RANKS, 5).read_bytes()
    remote.put(mkey, foreign)
    before = remote.snapshot()
    count = len(remote.written())
    with pytest.raises(TierConflictError, match=f"s3://bucket/team/{mkey} holds another commit"):
        uploader.upload(local, JOB, Upload(1))
    assert remote.snapshot() == before and len(remote.written()) == count


def test_changed_while_uploading_is_reported(local: Store) -> None:
    """The step is committed again while its manifest is being created: upload it again."""
    mkey = keys.manifest_key(JOB, 1)

    class Recommitting(MemoryRemote):
        recommitted = False

        def put_new(self, key: str, data: Data) -> bool:
            created = super().put_new(key, data)
            if key == mkey and not self.recommitted:
                self.recommitted = True
                save(local.root, JOB, 1, seed=8)
            return created

    remote = Recommitting()
    up = Uploader(remote)
    try:
        out = up.upload(local, JOB, Upload(1))
        assert out.changed
        assert remote.get(mkey) != local_bytes(local, mkey)
        again = up.upload(local, JOB, Upload(1))
        assert not again.changed and remote.get(mkey) == local_bytes(local, mkey)
    finally:
        up.close()


# ---- gone ---------------------------------------------------------------------------------------


def test_a_mark_whose_checkpoint_was_deleted_locally_is_gone(
    local: Store, remote: MemoryRemote, uploader: Uploader
) -> None:
    local.mark_upload(JOB, Upload(1))
    local.delete_checkpoint(JOB, 1)
    out = uploader.upload(local, JOB, Upload(1))
    assert out.gone and out.objects_put == 0
    # A part never written, and a multi-rank step's record (its parts carry the upload), too.
    assert uploader.upload(local, RANKS, Upload(5, 0, "a0")).gone
    assert uploader.upload(local, RANKS, Upload(5)).gone
    assert remote.written() == []


# ---- multi-rank: the commit in the bucket -------------------------------------------------------


def test_the_last_part_commits_the_step_in_the_bucket(
    local: Store, remote: MemoryRemote, uploader: Uploader
) -> None:
    mkey = keys.manifest_key(RANKS, 5)
    first = uploader.upload(local, RANKS, Upload(5, 0, ATTEMPT))
    assert first.record is None and first.waiting_for == [1]
    assert mkey not in remote.blobs
    pkeys = [keys.part_key(RANKS, 5, ATTEMPT, r) for r in (0, 1)]
    assert remote.get(pkeys[0]) == local_bytes(local, pkeys[0])

    second = uploader.upload(local, RANKS, Upload(5, 1, ATTEMPT))
    record = second.record
    assert record is not None and second.waiting_for == []
    assert record.is_global and record.world_size == 2 and record.attempt == ATTEMPT
    assert parse_manifest(remote.get(mkey), where=mkey) == record
    for rank, ref in enumerate(record.parts):
        assert ref.rank == rank
        assert keys.record_key(RANKS, ref.record) == pkeys[rank]
        assert ref.checksum == manifest_checksum(remote.get(pkeys[rank]))
        assert ref.checksum == manifest_checksum(local_bytes(local, pkeys[rank]))
    # Visible last: after both parts and every object they name.
    written = remote.written()
    objs = set().union(*(object_keys(local.read_part(RANKS, 5, r)) for r in (0, 1)))
    assert objs <= set(written[: written.index(mkey)]) and set(pkeys) <= set(written)
    assert written[-1] == mkey

    count = len(remote.written())
    assert uploader.try_commit(RANKS, 5, ATTEMPT, 2) == (record, [])
    assert len(remote.written()) == count


def test_parts_that_disagree_on_the_world_size_are_a_conflict(
    local: Store, remote: MemoryRemote, uploader: Uploader, tmp_path: Path
) -> None:
    other = tmp_path / "other-node"
    save_part(other, 1, world_size=3)
    uploader.upload(Store(other), RANKS, Upload(5, 1, ATTEMPT))
    with pytest.raises(TierConflictError, match=r"disagree on the world size \(\[2, 3\]\)"):
        uploader.upload(local, RANKS, Upload(5, 0, ATTEMPT))
    assert keys.manifest_key(RANKS, 5) not in remote.blobs


def test_a_record_of_another_attempt_is_a_conflict(
    local: Store, remote: MemoryRemote, uploader: Uploader, tmp_path: Path
) -> None:
    other = tmp_path / "earlier-attempt"
    for rank in (0, 1):
        save_part(other, rank, attempt="a0")
    earlier = Store(other)
    uploader.upload(earlier, RANKS, Upload(5, 0, "a0"))
    record = uploader.upload(earlier, RANKS, Upload(5, 1, "a0")).record
    assert record is not None
    mkey = keys.manifest_key(RANKS, 5)
    before = remote.get(mkey)
    with pytest.raises(TierConflictError, match="committed in the tier by attempt a0, not a1"):
        uploader.upload(local, RANKS, Upload(5, 0, ATTEMPT))
    with pytest.raises(TierConflictError, match="by attempt a0"):
        uploader.try_commit(RANKS, 5, ATTEMPT, 2)
    assert remote.get(mkey) == before


def test_another_part_under_the_same_rank_is_a_conflict(
    local: Store, remote: MemoryRemote, uploader: Uploader
) -> None:
    pkey = keys.part_key(RANKS, 5, ATTEMPT, 0)
    remote.put(pkey, local_bytes(local, keys.part_key(RANKS, 5, ATTEMPT, 1)))
    with pytest.raises(TierConflictError, match="holds another part"):
        uploader.upload(local, RANKS, Upload(5, 0, ATTEMPT))
    assert remote.get(pkey) == local_bytes(local, keys.part_key(RANKS, 5, ATTEMPT, 1))
    assert keys.manifest_key(RANKS, 5) not in remote.blobs


def test_an_endpoint_that_answers_anything_is_refused_before_anything_is_put(
    local: Store,
) -> None:
    """A web server behind a wrong tier.endpoint answers 200 to every request: it must not be
    taken for a store that keeps what is put (the marks would go, nothing kept)."""

    class AnswersAnything(MemoryRemote):
        def get(self, key: str) -> bytes:
            return b"<html>welcome</html>"

    remote = AnswersAnything()
    with pytest.raises(TierError, match=r"not an S3-compatible store; check tier\.endpoint"):
        Uploader(remote, concurrency=1).upload(local, JOB, Upload(1))
    assert remote.written() == []
