"""Upload marks: ``<job>/uploads/<name>`` says the tier does not hold a checkpoint yet.

Names round-trip and nothing else parses as a mark; marks are created and removed durably; a
marked step is never deleted by retention, and a marked part set is never collected (on
node-local disks the bucket, not this disk, commits the step)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.config import Config, StoreConfig
from ckptd.format import fsutil
from ckptd.format.jobmeta import Upload, upload_from_name
from ckptd.format.store import Store
from ckptd.policy.prune import delete_unprotected, prune
from ckptd.policy.retention import RetentionPolicy
from ckptd_client import api

JOB = "run"
SMALL = Config(store=StoreConfig(chunk_bytes=4096, pack_bytes=1024))


def save(store: Store, step: int, **ranks: Any) -> None:
    state = {"w": torch.full((256,), float(step)), "rank": ranks.get("rank")}
    api.save(JOB, state=state, step=step, root=store, rng=False, config=SMALL, **ranks)


# ---- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upload", "name"),
    [
        (Upload(0), "step-000000000000.json"),
        (Upload(1200), "step-000000001200.json"),
        (Upload(10**12 - 1), "step-999999999999.json"),
        (Upload(1200, 0, "a1"), "step-000000001200.rank-00000.a1.json"),
        (Upload(7, 99_998, "0"), "step-000000000007.rank-99998.0.json"),
        (Upload(7, 3, "run.2_b-x"), "step-000000000007.rank-00003.run.2_b-x.json"),
        (Upload(7, 3, "x" * 128), f"step-000000000007.rank-00003.{'x' * 128}.json"),
    ],
)
def test_name_round_trip(upload: Upload, name: str) -> None:
    assert upload.name == name
    assert upload_from_name(name) == upload


@pytest.mark.parametrize(
    "name",
    [
        "",
        "step-1200.json",
        "step-000000001200",
        "step-000000001200.txt",
        "step-000000001200.json.tmp",
        ".step-000000001200.json",
        "step-0000000012x0.json",
        "step-000000001200.rank-00003.json",  # a part's mark names its attempt
        "step-000000001200.rank-3.a1.json",
        "step-000000001200.rank-0000x.a1.json",
        "step-000000001200.rank-+0003.a1.json",
        "step-000000001200.rank-00003.-a1.json",
        "step-000000001200.rank-00003.a..1.json",
        "step-000000001200.rank-00003Xa1.json",  # not the name of any Upload
        f"step-000000001200.rank-00003.{'x' * 129}.json",
        "step-000000001200.part-00003.a1.json",
        "step-000000001200.json.rank-00003.a1",
    ],
)
def test_other_names_are_not_marks(name: str) -> None:
    assert upload_from_name(name) is None


@pytest.mark.parametrize(
    "upload", [Upload(-1), Upload(10**12), Upload(1, 0, None), Upload(1, 0, "../x")]
)
def test_an_invalid_upload_has_no_name(upload: Upload) -> None:
    with pytest.raises(ValueError, match=r"^(step|attempt) must be"):
        upload.name  # noqa: B018


# ---- marks on disk ------------------------------------------------------------------------------


def test_marks_are_files_under_uploads_created_and_removed_durably(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    written: list[tuple[Path, Path]] = []
    real_sync, real_write = fsutil.fsync_dir, fsutil.durable_write

    def fsync_dir(path: Path) -> None:
        synced.append(path)
        real_sync(path)

    def durable_write(path: Path, parts: Any, *, tmp_dir: Path, **options: Any) -> None:
        written.append((path, tmp_dir))
        real_write(path, parts, tmp_dir=tmp_dir, **options)

    save(store, 3)
    monkeypatch.setattr("ckptd.format.jobmeta.fsync_dir", fsync_dir)
    monkeypatch.setattr("ckptd.format.jobmeta.durable_write", durable_write)
    job = store.real_job_dir(JOB)
    uploads = job / "uploads"

    part = Upload(5, 1, "a1")
    store.mark_upload(JOB, Upload(3))
    store.mark_upload(JOB, part)
    store.mark_upload(JOB, Upload(3))  # again: still one mark
    assert sorted(os.listdir(uploads)) == [Upload(3).name, part.name]
    assert all((uploads / n).stat().st_size == 0 for n in os.listdir(uploads))
    # Written through the durable helper (tmp in the job's tmp/), and uploads/'s entry in the
    # job directory made durable once.
    assert written == [(uploads / u.name, job / "tmp") for u in (Upload(3), part, Upload(3))]
    assert synced == [job]
    assert os.listdir(job / "tmp") == []

    assert store.marked_uploads(JOB) == [Upload(3), part]
    assert store.upload_pending(JOB, 3) and store.upload_pending(JOB, 5)
    assert not store.upload_pending(JOB, 4)

    assert store.unmark_upload(JOB, Upload(3))
    assert synced[-1] == uploads  # the removal is durable
    assert not store.unmark_upload(JOB, Upload(3))
    assert store.marked_uploads(JOB) == [part] and not store.upload_pending(JOB, 3)
    # A new Store (a restarted daemon) sees the same queue.
    assert Store(store.root).marked_uploads(JOB) == [part]


def test_a_job_never_opened_gets_its_mark(tmp_path: Path) -> None:
    """The first mark of a job nothing opened yet (as a pin of one): its directories are made."""
    fresh = Store(tmp_path / "root")
    fresh.mark_upload("new-job", Upload(3))
    assert fresh.marked_uploads("new-job") == [Upload(3)]
    assert Store(tmp_path / "root").upload_pending("new-job", 3)


def test_marked_uploads_oldest_first_and_junk_ignored(store: Store) -> None:
    save(store, 1)
    marks = [Upload(9, 1, "b"), Upload(2), Upload(9), Upload(9, 0, "b"), Upload(9, 0, "a")]
    for upload in marks:
        store.mark_upload(JOB, upload)
    uploads = store.real_job_dir(JOB) / "uploads"
    for junk in ("notes.txt", "step-000000000004.json.tmp", "step-000000000004.rank-1.a.json"):
        (uploads / junk).write_bytes(b"")
    assert store.marked_uploads(JOB) == [
        Upload(2),
        Upload(9),
        Upload(9, 0, "a"),
        Upload(9, 0, "b"),
        Upload(9, 1, "b"),
    ]
    assert store.marked_uploads("other") == []  # no job directory: no marks


# ---- retention keeps what the tier lacks --------------------------------------------------------


def test_delete_unprotected_keeps_a_step_whose_upload_is_pending(store: Store) -> None:
    for step in (1, 2, 3):
        save(store, step)
    store.mark_upload(JOB, Upload(1))
    store.mark_upload(JOB, Upload(2, 0, "a1"))  # a part's mark keeps its step too
    assert not delete_unprotected(store, JOB, 1)
    assert not delete_unprotected(store, JOB, 2)
    assert store.steps(JOB) == [1, 2, 3]

    result = prune(store, JOB, RetentionPolicy(keep_last=1))
    assert result.deleted == [] and store.steps(JOB) == [1, 2, 3]

    store.unmark_upload(JOB, Upload(1))
    assert delete_unprotected(store, JOB, 1)
    assert store.steps(JOB) == [2, 3]
    store.unmark_upload(JOB, Upload(2, 0, "a1"))
    assert prune(store, JOB, RetentionPolicy(keep_last=1)).deleted == [2]
    assert store.steps(JOB) == [3]


def test_collect_parts_keeps_a_marked_part_set(store: Store) -> None:
    # Rank 0 of 2 handed off an hour ago; rank 1 never did: collectable after 60 s.
    save(store, 5, rank=0, world_size=2, attempt="a1")
    part = store.real_job_dir(JOB) / "parts/step-000000000005/a1/rank-00000.json"
    an_hour_ago = time.time() - 3600
    os.utime(part, (an_hour_ago, an_hour_ago))

    store.mark_upload(JOB, Upload(5, 1, "a0"))  # another attempt's mark does not keep it
    assert store.collect_parts(JOB, pending_timeout_s=60, dry_run=True) != []
    store.mark_upload(JOB, Upload(5, 0, "a1"))
    assert store.collect_parts(JOB, pending_timeout_s=60, dry_run=True) == []
    assert store.collect_parts(JOB, pending_timeout_s=60) == []
    assert part.is_file()

    store.unmark_upload(JOB, Upload(5, 0, "a1"))
    collected = store.collect_parts(JOB, pending_timeout_s=60)
    assert [(s, a) for s, a, _ in collected] == [(5, "a1")]
    assert "ranks.pending_timeout" in collected[0][2]
    assert not part.exists()
