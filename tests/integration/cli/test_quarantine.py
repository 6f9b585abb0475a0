"""A corrupt object is never reused once found: ``Store.quarantine_object`` moves it aside.

The case that motivated it: a long-lived Store (the daemon's, or a trainer's in-process saves)
checks an object once, then trusts it while its inode, size and mtime stay the same. Bytes that rot
in place keep all three, so a later checkpoint of the same content deduplicated against the rotten
object and was committed born corrupt. ``ckptd verify`` finds the damage; moving the object to
``<job>/quarantine/`` makes the next write of that content create the object again. Real pipeline,
real restore; each test runs in well under a second.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckptd.errors import NotFoundError
from ckptd.format.codec import HEADER
from ckptd.format.fsutil import fsync_dir as real_fsync_dir
from ckptd.format.objects import ObjectState
from ckptd.format.restore import load_checkpoint, verify_manifest
from ckptd.format.skeleton import flatten
from ckptd.format.store import Store
from ckptd.pipeline.plan import PipelineConfig, tensor_source
from ckptd.pipeline.write import WriteResult, write_checkpoint

JOB = "rot"
KiB = 1 << 10
CONFIG = PipelineConfig(chunk_bytes=64 * KiB, pack_bytes=4 * KiB, threads=2)
"""Small chunks: the 256 KiB weight is four objects, the small tensors one packed object."""


def state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {
        "weight": torch.randn(64 * KiB, generator=gen),
        "bias": torch.randn(16, generator=gen),
        "step": torch.tensor(3),
    }


def save(store: Store, step: int, value: dict[str, torch.Tensor]) -> WriteResult:
    flat = flatten(value)
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    return write_checkpoint(store, JOB, step, flat.skeleton, sources, config=CONFIG)


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape
        assert raw_bytes(got[key]) == raw_bytes(tensor), key


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def rot_in_place(path: Path) -> None:
    """Change payload bytes in the middle of the file, keeping its inode, size and mtime."""
    st = path.stat()
    fd = os.open(path, os.O_RDWR)
    try:
        middle = HEADER.size + (st.st_size - HEADER.size) // 2
        old = os.pread(fd, 8, middle)
        os.pwrite(fd, bytes(b ^ 0x5A for b in old), middle)
    finally:
        os.close(fd)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
    )


def test_object_rotten_in_place_is_quarantined_and_the_next_write_recreates_it(
    store: Store,
) -> None:
    want = state()
    save(store, 1, want)
    second = save(store, 2, want)
    assert second.new_objects == 0  # step 2 dedups everything: the Store vouches for the objects
    victim = sorted(second.manifest.objects)[0]
    assert store.object_state(JOB, victim) is ObjectState.DURABLE
    path = store.object_path(JOB, victim)
    rot_in_place(path)

    failures = verify_manifest(store, store.read_manifest(JOB, 2))
    assert len(failures) == 1
    assert str(path) in failures[0] and "is corrupt" in failures[0]

    moved = quarantine(store, victim)
    assert moved == store.job_dir(JOB) / "quarantine" / victim
    assert not path.exists()
    assert store.object_state(JOB, victim) is None
    store.delete_checkpoint(JOB, 1)
    store.delete_checkpoint(JOB, 2)

    third = save(store, 3, want)

    assert third.new_objects == 1  # the quarantined object, written again
    assert verify_manifest(store, third.manifest) == []
    assert_bit_exact(load_checkpoint(store, JOB, 3).state, want)
    assert moved.is_file()  # the evidence stays until an operator removes it


def quarantine(store: Store, digest: str) -> Path:
    dest = store.quarantine_object(JOB, digest)
    assert dest is not None
    return dest


def test_an_object_written_anew_before_the_move_stays(store: Store) -> None:
    """The damage is checked again under the job lock: an object a writer repaired after verify
    found it damaged (verify can take hours) is not moved, or its new checkpoints would break."""
    digest = sorted(save(store, 1, state()).manifest.objects)[0]
    assert store.quarantine_object(JOB, digest, still_damaged=lambda: False) is None
    assert store.has_object(JOB, digest)
    assert not (store.job_dir(JOB) / "quarantine").exists()


def test_a_second_quarantine_of_the_same_name_keeps_both(store: Store) -> None:
    want = state()
    digest = sorted(save(store, 1, want).manifest.objects)[0]
    first = quarantine(store, digest)
    save(store, 2, want)  # writes it again
    second = quarantine(store, digest)

    assert first.name == digest
    assert second.name == f"{digest}.1"
    assert first.is_file() and second.is_file()
    assert not store.has_object(JOB, digest)


def test_gc_never_touches_quarantine(store: Store) -> None:
    want = state()
    digest = sorted(save(store, 1, want).manifest.objects)[0]
    moved = quarantine(store, digest)
    store.delete_checkpoint(JOB, 1)
    old = moved.stat().st_mtime - 7200
    os.utime(moved, (old, old))

    dry = store.gc(JOB, dry_run=True)
    result = store.gc(JOB)

    assert result.objects == dry.objects == 5  # every object left in objects/, not the moved one
    assert moved.is_file()
    assert list((store.job_dir(JOB) / "objects").glob("??/*")) == []


def test_quarantine_of_a_missing_object(store: Store) -> None:
    digest = sorted(save(store, 1, state()).manifest.objects)[0]
    store.quarantine_object(JOB, digest)
    with pytest.raises(NotFoundError, match=rf"job 'rot' has no object {digest} \(.*\): nothing"):
        store.quarantine_object(JOB, digest)


def test_object_moved_away_behind_a_stores_back_is_written_again(root: Path) -> None:
    """The daemon's Store vouches for an object (cached as durable); another process (``ckptd
    verify``) moves it away: the daemon's next write of that content must create it again."""
    want = state()
    daemon_store = Store(root)
    digest = sorted(save(daemon_store, 1, want).manifest.objects)[0]
    assert daemon_store.object_state(JOB, digest) is ObjectState.DURABLE

    Store(root).quarantine_object(JOB, digest)
    result = save(daemon_store, 2, want)

    assert result.new_objects == 1
    assert daemon_store.object_state(JOB, digest) is ObjectState.DURABLE
    assert verify_manifest(daemon_store, result.manifest) == []
    assert verify_manifest(daemon_store, daemon_store.read_manifest(JOB, 1)) == []  # repaired


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    seen: list[Path] = []

    def fsync_dir(path: Path) -> None:
        seen.append(path)
        real_fsync_dir(path)

    monkeypatch.setattr("ckptd.format.objects.fsync_dir", fsync_dir)
    yield seen


def test_quarantine_is_durable(store: Store, fsyncs: list[Path]) -> None:
    digest = sorted(save(store, 1, state()).manifest.objects)[0]
    fsyncs.clear()
    store.quarantine_object(JOB, digest)
    job_dir = store.job_dir(JOB)
    # quarantine/ made durable in the job directory, then both ends of the rename.
    assert fsyncs == [job_dir, job_dir / "quarantine", job_dir / "objects" / digest[:2]]
