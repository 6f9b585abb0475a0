"""An object's bytes always match its name, and a manifest only names durable objects.

Integrity: the pipeline hashes and encodes one private copy of each chunk, so a source that changes
while it is read (another process writing the shared memory) cannot produce an object whose bytes
are not its name; and an object already on disk is verified (decoded and hashed) before its first
reuse, so a damaged one is rewritten, never reused.

Durability: before a manifest is committed, every shard directory holding one of its objects that
this Store has not itself made durable is fsynced (once), and ``objects/`` with it; ``pins/`` is
fsynced into the job directory when it is created.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckptd.format.codec import HEADER, CodecChoice, CodecConfig, decode, encode
from ckptd.format.fsutil import fsync_dir as real_fsync_dir
from ckptd.format.hashing import content_hash
from ckptd.format.manifest import Manifest
from ckptd.format.objects import ObjectState
from ckptd.format.restore import read_tensors, verify_manifest
from ckptd.format.store import Store
from ckptd.pipeline.plan import PipelineConfig, TensorSource
from ckptd.pipeline.write import WriteResult, write_checkpoint

JOB = "integrity"
KiB = 1 << 10
CHUNK = 64 * KiB
ONE_CHUNK_EACH = PipelineConfig(chunk_bytes=CHUNK, pack_bytes=0, threads=2)
"""Every tensor of at most CHUNK bytes is exactly one object (no packing)."""


def float_bytes(n_floats: int, seed: int) -> bytearray:
    gen = torch.Generator().manual_seed(seed)
    return bytearray(torch.randn(n_floats, generator=gen).numpy().tobytes())


def sources_of(named: dict[str, bytearray]) -> list[TensorSource]:
    return [
        TensorSource(name, "float32", (len(data) // 4,), memoryview(data))
        for name, data in named.items()
    ]


def write(
    store: Store,
    step: int,
    named: dict[str, bytearray],
    config: PipelineConfig = ONE_CHUNK_EACH,
) -> WriteResult:
    sources = sources_of(named)
    skeleton = {name: {"$tensor": i} for i, name in enumerate(named)}
    return write_checkpoint(store, JOB, step, skeleton, sources, config=config)


def assert_verifies(store: Store, step: int) -> Manifest:
    manifest = store.read_manifest(JOB, step)
    assert verify_manifest(store, manifest) == []
    return manifest


def object_paths(store: Store) -> list[Path]:
    return sorted((store.job_dir(JOB) / "objects").glob("??/*"))


# ---- item 3: a torn read never names the wrong bytes -------------------------------------------


@pytest.mark.parametrize("codec", ["auto", "raw"])
def test_source_rewritten_right_after_hashing_still_commits_matching_objects(
    store: Store, monkeypatch: pytest.MonkeyPatch, codec: CodecChoice
) -> None:
    """The trainer's process writes the shared memory while a chunk is between its hash and its
    encode (the seam: the pipeline's hash function scribbles over the source once it has hashed
    the first chunk). The committed object must hold the bytes its name was computed from."""
    data = float_bytes(3 * CHUNK // 4, seed=1)  # three chunks of one tensor
    original = bytes(data)
    scribbled = False

    def hash_then_scribble(buf: bytes | bytearray | memoryview) -> str:
        nonlocal scribbled
        digest = content_hash(buf)
        if not scribbled:
            scribbled = True
            data[:] = bytes(b ^ 0xFF for b in data)
        return digest

    monkeypatch.setattr("ckptd.pipeline.write.content_hash", hash_then_scribble)
    config = PipelineConfig(
        chunk_bytes=CHUNK, pack_bytes=0, threads=1, codec=CodecConfig(codec=codec)
    )
    write(store, 1, {"w": data}, config)

    manifest = assert_verifies(store, 1)
    first = manifest.tensors[0].pieces[0]
    (restored,) = read_tensors(store, manifest)
    got = restored.reshape(-1).view(torch.uint8).numpy().tobytes()
    assert got[: first.length] == original[: first.length]


def flip_payload_byte(path: Path) -> None:
    """Flip one payload byte in place: same length, same header."""
    body = bytearray(path.read_bytes())
    body[HEADER.size + (len(body) - HEADER.size) // 2] ^= 0x01
    path.write_bytes(bytes(body))


@pytest.mark.parametrize("codec", ["raw", "auto"])
def test_damaged_object_with_an_intact_header_is_rewritten_not_reused(
    root: Path, codec: CodecChoice
) -> None:
    config = PipelineConfig(
        chunk_bytes=CHUNK, pack_bytes=0, threads=2, codec=CodecConfig(codec=codec)
    )
    named = {"a": float_bytes(CHUNK // 4, seed=2), "b": float_bytes(CHUNK // 4, seed=3)}
    write(Store(root), 1, named, config)
    victim = object_paths(Store(root))[0]
    flip_payload_byte(victim)

    # A new Store, as after a daemon restart: it has never seen these objects.
    store = Store(root)
    result = write(store, 2, named, config)

    assert_verifies(store, 2)
    assert result.new_objects == 1  # the damaged one, rewritten; the other one reused
    assert result.reused_objects == 1
    assert_verifies(store, 1)  # same name, same bytes: the rewrite repaired step 1 too


# ---- item 6: a manifest only names durable objects ---------------------------------------------


Event = tuple[str, Path | None]


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Event]]:
    """Every directory fsync the Store makes and every manifest commit, in order."""
    seen: list[Event] = []
    real_commit = Store.commit_manifest

    def fsync_dir(path: Path) -> None:
        seen.append(("fsync", path))
        real_fsync_dir(path)

    def commit_manifest(self: Store, manifest: Manifest) -> Path:
        seen.append(("commit", None))
        return real_commit(self, manifest)

    for piece in ("store", "objects", "commits", "jobmeta"):  # the modules that make up a Store
        monkeypatch.setattr(f"ckptd.format.{piece}.fsync_dir", fsync_dir)
    monkeypatch.setattr(Store, "commit_manifest", commit_manifest)
    yield seen


def fsyncs_before_commit(events: list[Event]) -> list[Path]:
    commit = events.index(("commit", None))
    return [path for kind, path in events[:commit] if kind == "fsync" and path is not None]


def leave_unsynced_object(root: Path, data: bytearray) -> str:
    """What a writer killed between its object writes and its directory fsyncs leaves behind: an
    object renamed into place whose directory entry was never fsynced."""
    killed = Store(root)
    killed.open_job(JOB)
    raw = memoryview(data)
    digest = content_hash(raw)
    encoded = encode(raw, elem_size=4, is_float=True, config=CodecConfig())
    killed.write_object(JOB, digest, encoded.parts)
    return digest


def test_reused_object_left_unsynced_by_a_dead_writer_is_synced_before_commit(
    root: Path, events: list[Event]
) -> None:
    data = float_bytes(CHUNK // 4, seed=4)
    digest = leave_unsynced_object(root, data)
    events.clear()

    store = Store(root)
    result = write(store, 1, {"w": data})

    assert result.reused_objects == 1 and result.new_objects == 0
    synced = fsyncs_before_commit(events)
    objects = store.job_dir(JOB) / "objects"
    assert objects / digest[:2] in synced
    assert objects in synced  # this Store never saw the shard directory made durable either
    assert_verifies(store, 1)


def test_pin_fsyncs_the_job_directory_after_creating_pins(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.open_job(JOB)
    pins = store.job_dir(JOB) / "pins"
    seen: list[tuple[Path, bool]] = []

    def fsync_dir(path: Path) -> None:
        seen.append((path, pins.is_dir()))
        real_fsync_dir(path)

    monkeypatch.setattr("ckptd.format.jobmeta.fsync_dir", fsync_dir)
    store.pin(JOB, 7)

    assert (store.job_dir(JOB), True) in seen
    assert store.pinned_steps(JOB) == {7}


def same_shard_tensors(count: int) -> dict[str, bytearray]:
    """``count`` one-object tensors whose objects all land in one shard directory."""
    by_shard: dict[str, list[bytearray]] = collections.defaultdict(list)
    for seed in itertools.count():
        data = bytearray(seed.to_bytes(8, "little") * 16)
        group = by_shard[content_hash(data)[:2]]
        group.append(data)
        if len(group) == count:
            return {f"t{i}": d for i, d in enumerate(group)}
    raise AssertionError("unreachable")


def test_each_directory_is_fsynced_once_per_commit(store: Store, events: list[Event]) -> None:
    named = same_shard_tensors(4)
    result = write(store, 1, named)

    assert result.new_objects == 4
    (shard,) = {digest[:2] for digest in result.manifest.objects}
    counts = collections.Counter(fsyncs_before_commit(events))
    assert counts[store.job_dir(JOB) / "objects" / shard] == 1
    assert max(counts.values()) == 1, counts


# ---- what a Store knows: ObjectState transitions -----------------------------------------------


def only_digest(result: WriteResult) -> str:
    (digest,) = result.manifest.objects
    return digest


def test_written_object_is_verified_then_durable_once_committed(
    store: Store, events: list[Event]
) -> None:
    data = float_bytes(CHUNK // 4, seed=5)
    real_commit = Store.commit_manifest
    states_at_commit: list[ObjectState | None] = []

    def commit_manifest(self: Store, manifest: Manifest) -> Path:
        (digest,) = manifest.objects
        states_at_commit.append(self.object_state(JOB, digest))
        return real_commit(self, manifest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Store, "commit_manifest", commit_manifest)
        digest = only_digest(write(store, 1, {"w": data}))
    assert states_at_commit == [ObjectState.DURABLE]
    assert store.object_state(JOB, digest) is ObjectState.DURABLE

    events.clear()
    result = write(store, 2, {"w": data})  # reuses it: nothing left to fsync
    assert result.reused_objects == 1
    assert fsyncs_before_commit(events) == []


def test_reused_object_is_verified_once_per_store(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    named = {"a": float_bytes(CHUNK // 4, seed=6), "b": float_bytes(CHUNK // 4, seed=7)}
    write(Store(root), 1, named)
    store = Store(root)
    assert [store.object_state(JOB, p.name) for p in object_paths(store)] == [None, None]
    decoded: list[str] = []
    real_decode = decode

    def counting_decode(data: bytes | memoryview, out: memoryview, *, where: str) -> None:
        decoded.append(where)
        real_decode(data, out, where=where)

    monkeypatch.setattr("ckptd.format.objects.decode", counting_decode)
    write(store, 2, named)
    assert len(decoded) == 2
    assert {store.object_state(JOB, p.name) for p in object_paths(store)} == {ObjectState.DURABLE}
    write(store, 3, named)
    write(store, 4, named)
    assert len(decoded) == 2  # later reuses only read the header


def test_object_replaced_behind_the_stores_back_is_checked_again(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A long-lived Store (the daemon's) trusts a file only while it keeps the inode, size and
    mtime it had when the Store wrote or checked it."""
    data = float_bytes(CHUNK // 4, seed=8)
    digest = only_digest(write(store, 1, {"w": data}))
    path = store.object_path(JOB, digest)
    flip_payload_byte(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    with caplog.at_level(logging.WARNING, logger="ckptd.format.objects"):
        result = write(store, 2, {"w": data})

    assert result.new_objects == 1
    assert "does not hash to its name; writing it again" in caplog.text
    assert_verifies(store, 2)


def test_gc_forgets_the_objects_it_deletes(store: Store) -> None:
    data = float_bytes(CHUNK // 4, seed=9)
    digest = only_digest(write(store, 1, {"w": data}))
    keep = only_digest(write(store, 2, {"w": float_bytes(CHUNK // 4, seed=10)}))
    store.delete_checkpoint(JOB, 1)

    assert store.gc(JOB).objects == 1
    assert store.object_state(JOB, digest) is None
    assert store.object_state(JOB, keep) is ObjectState.DURABLE
    assert write(store, 3, {"w": data}).new_objects == 1


def test_forget_objects_makes_the_next_commit_sync_again(store: Store, events: list[Event]) -> None:
    data = float_bytes(CHUNK // 4, seed=11)
    digest = only_digest(write(store, 1, {"w": data}))
    store.forget_objects(JOB, [digest])
    events.clear()

    write(store, 2, {"w": data})

    assert store.job_dir(JOB) / "objects" / digest[:2] in fsyncs_before_commit(events)
    assert store.object_state(JOB, digest) is ObjectState.DURABLE


def test_second_pin_does_not_fsync_the_job_directory_again(
    store: Store, events: list[Event]
) -> None:
    store.pin(JOB, 1)
    events.clear()
    store.pin(JOB, 2)
    assert ("fsync", store.job_dir(JOB)) not in events
    assert store.pinned_steps(JOB) == {1, 2}
