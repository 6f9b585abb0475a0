"""``latest`` is the checkpoint committed last, not the highest step; and a root that is not a store
says so instead of looking empty.

Every manifest carries ``seq``, the job's commit sequence number, assigned under the job's commit
lock: a run restarted from scratch (or rolled back) under the same job name resumes from its own
newest commit, not from an abandoned higher step. Manifests written before seq existed read as
seq 0 and come first, by step.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ckptd.errors import EXIT_CODES, ManifestError, NoStoreError, NotFoundError, error_from_reply
from ckptd.format.manifest import commit_seq, parse_manifest, sign_manifest
from ckptd.format.restore import FallbackWarning, load_checkpoint
from ckptd.format.skeleton import flatten
from ckptd.format.store import STORE_MARKER, Store
from ckptd.pipeline.plan import PipelineConfig, tensor_source
from ckptd.pipeline.write import WriteResult, write_checkpoint

JOB = "run"
CONFIG = PipelineConfig(chunk_bytes=64 << 10, pack_bytes=4 << 10, threads=1)


def save(store: Store, step: int, value: float = 0.0, job: str = JOB) -> WriteResult:
    state = {"w": torch.full((8,), float(step) + value), "step": step}
    flat = flatten(state)
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    return write_checkpoint(store, job, step, flat.skeleton, sources, config=CONFIG)


def loaded_value(store: Store, step: int | str = "latest") -> float:
    return float(load_checkpoint(store, JOB, step).state["w"][0])


def seqs(store: Store) -> dict[int, int]:
    return {s: store.read_manifest(JOB, s).seq for s in store.steps(JOB)}


def age(store: Store, seconds: float = 60.0) -> None:
    """Backdate every manifest file, so a Store keeps what it read of them (fresh files are
    read again at every scan)."""
    then = time.time() - seconds
    for path in (store.job_dir(JOB) / "manifests").iterdir():
        os.utime(path, (then, then))


def test_a_run_restarted_from_scratch_resumes_from_its_own_newest_commit(store: Store) -> None:
    for step in (100, 200, 300):
        save(store, step)
    for step in (10, 20):  # the job restarted from scratch under the same name
        save(store, step, value=0.5)

    assert store.resolve_step(JOB, "latest") == 20
    assert store.resolve_step(JOB, "highest") == 300
    assert store.steps_by_commit(JOB) == [100, 200, 300, 10, 20]
    assert store.steps(JOB) == [10, 20, 100, 200, 300]
    assert loaded_value(store) == 20.5
    assert loaded_value(store, "highest") == 300.0


def test_seq_counts_commits_of_the_job(store: Store) -> None:
    results = [save(store, step) for step in (5, 3, 9)]
    assert [r.manifest.seq for r in results] == [1, 2, 3]
    assert seqs(store) == {3: 2, 5: 1, 9: 3}
    assert save(store, 1, job="other").manifest.seq == 1  # per job


def test_rolling_back_replaces_the_step_and_makes_it_latest(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (1, 2, 3, 4):
        save(store, step)
    with caplog.at_level(logging.INFO, logger="ckptd.format.commits"):
        again = save(store, 2, value=0.25)

    assert again.manifest.seq == 5
    assert store.steps_by_commit(JOB) == [1, 3, 4, 2]
    assert store.resolve_step(JOB, "latest") == 2
    assert loaded_value(store) == 2.25
    replaced = [r for r in caplog.records if "replaced an earlier commit" in r.getMessage()]
    assert [r.levelno for r in replaced] == [logging.INFO]
    assert replaced[0].getMessage().startswith("run: step 2 committed again (seq 5)")


def without_seq(data: bytes) -> bytes:
    """The manifest as a ckptd without seq and digest wrote it."""
    lines = [
        line for line in data.split(b"\n") if not line.startswith((b' "seq": ', b' "digest": '))
    ]
    return sign_manifest(b"\n".join(lines))


def test_manifests_written_before_seq_come_first_by_step(store: Store) -> None:
    for step in (300, 100, 200):
        save(store, step)
    for step in (100, 200, 300):
        path = store.manifest_path(JOB, step)
        path.write_bytes(without_seq(path.read_bytes()))
    old = store.read_manifest(JOB, 300)
    assert (old.seq, old.digest) == (0, None)
    assert old.to_json() == store.manifest_path(JOB, 300).read_bytes()  # same bytes back
    assert store.resolve_step(JOB, "latest") == 300  # among old ones: the highest step

    assert save(store, 50).manifest.seq == 1
    assert store.steps_by_commit(JOB) == [100, 200, 300, 50]
    assert store.resolve_step(JOB, "latest") == 50


def test_a_manifest_with_seq_0_or_a_bad_seq_is_refused() -> None:
    data = (Path(__file__).parent / "golden" / "manifest_v1.json").read_bytes()
    for bad in (b'"seq": 0', b'"seq": -3', b'"seq": "7"', b'"seq": true'):
        edited = sign_manifest(data.replace(b'"seq": 1', bad, 1))
        with pytest.raises(ManifestError, match=r"seq must be an integer >= 1"):
            parse_manifest(edited, where="m.json")


def test_commits_from_two_stores_and_many_threads_get_distinct_increasing_seqs(
    root: Path,
) -> None:
    """Two Stores on one root stand for two processes: each has its own caches and its own
    open file description of the commit lock, as a second daemon or an in-process save has."""
    stores = [Store(root), Store(root)]
    save(stores[0], 0)
    age(stores[0])
    stores[0].steps_by_commit(JOB)  # both Stores now cache the aged manifest
    stores[1].steps_by_commit(JOB)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(6):
                save(stores[k % 2], 1 + k * 100 + i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    by_step = seqs(Store(root))
    assert sorted(by_step.values()) == list(range(1, 26))
    for k in range(4):  # each writer's own commits in the order it made them
        mine = [by_step[1 + k * 100 + i] for i in range(6)]
        assert mine == sorted(mine)


def test_a_store_sees_a_step_committed_again_by_another_store(root: Path) -> None:
    reader, writer = Store(root), Store(root)
    for step in (1, 2, 3):
        save(writer, step)
    age(reader)
    assert reader.resolve_step(JOB, "latest") == 3  # cached from here on

    save(writer, 1, value=0.5)
    assert reader.resolve_step(JOB, "latest") == 1
    age(reader)
    reader.steps_by_commit(JOB)
    writer.delete_checkpoint(JOB, 1)
    assert reader.resolve_step(JOB, "latest") == 3


def test_the_commit_lock_serializes_only_the_commit(store: Store) -> None:
    """A writer copies, hashes and writes its chunks while another holds the commit lock; only
    its manifest waits."""
    read_done = threading.Event()
    flat = flatten({"w": torch.arange(40_000, dtype=torch.float32)})
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    store.open_job(JOB)
    results: list[WriteResult] = []
    with store.commit_lock(JOB) as next_seq:
        assert next_seq == 1
        thread = threading.Thread(
            target=lambda: results.append(
                write_checkpoint(
                    store, JOB, 7, flat.skeleton, sources, config=CONFIG, on_read_done=read_done.set
                )
            )
        )
        thread.start()
        assert read_done.wait(30), "the writer did not get through its chunks"
        assert store.steps(JOB) == []
        assert len(list((store.job_dir(JOB) / "objects").glob("??/*"))) == 3
    thread.join(30)
    assert [r.manifest.seq for r in results] == [1]
    assert store.steps(JOB) == [7]


def test_commit_manifest_numbers_an_unnumbered_manifest_and_refuses_a_made_up_seq(
    store: Store,
) -> None:
    """Seq 0: numbered under the lock (what a pipeline of an older version does, e.g. the
    store bench's --baseline-pipeline). Any other seq must be the one commit_lock yielded."""
    first = save(store, 1).manifest
    store.commit_manifest(replace(first, step=2, seq=0))
    assert seqs(store) == {1: 1, 2: 2}
    with pytest.raises(ValueError, match=r"seq 9 is not the number Store\.commit_lock yielded"):
        store.commit_manifest(replace(first, step=3, seq=9))
    with store.commit_lock(JOB) as seq:
        with pytest.raises(ValueError, match=r"seq 4 is not"):
            store.commit_manifest(replace(first, step=3, seq=seq + 1))
        with pytest.raises(RuntimeError, match=r"already holds the commit lock of job 'run'"):
            store.commit_manifest(replace(first, step=3, seq=0))  # would wait for itself
    assert store.steps(JOB) == [1, 2]


# ---- damaged manifests are never silently passed over ----------------------------------------


def test_a_damaged_seq_line_does_not_hide_the_newest_checkpoint(store: Store) -> None:
    for step in (1, 2, 3):
        save(store, step)
    path = store.manifest_path(JOB, 3)
    path.write_bytes(path.read_bytes().replace(b'"seq": 3,', b'"seq": 1,', 1))  # checksum fails

    assert store.resolve_step(JOB, "latest") == 3  # placed after the step below it
    with pytest.raises(ManifestError, match="checksum mismatch"):
        load_checkpoint(store, JOB)
    with pytest.warns(FallbackWarning, match=r"restored step 2, skipping newer checkpoint"):
        assert float(load_checkpoint(store, JOB, fallback=True).state["w"][0]) == 2.0


def test_a_damaged_manifest_keeps_the_place_its_seq_line_gives(store: Store) -> None:
    for step in (5, 6):
        save(store, step)
    for step in (1, 2):  # restarted
        save(store, step)
    path = store.manifest_path(JOB, 1)
    path.write_bytes(path.read_bytes().replace(b'"rank": 0', b'"rank": 1', 1))  # checksum fails

    assert store.steps_by_commit(JOB) == [5, 6, 1, 2]
    path.write_bytes(b"garbage")
    assert store.steps_by_commit(JOB) == [1, 5, 6, 2]  # unknown seq, no lower step: first
    assert store.resolve_step(JOB, "latest") == 2


# ---- resolving steps ---------------------------------------------------------------------------


def test_step_words(store: Store) -> None:
    for step in (4, 2):
        save(store, step)
    assert store.resolve_step(JOB, "latest") == 2
    assert store.resolve_step(JOB, "highest") == 4
    assert store.resolve_step(JOB, "4") == 4
    with pytest.raises(
        NotFoundError,
        match=r"^step must be a number or 'latest', got 'newest' \('latest' is the checkpoint "
        r"committed last, 'highest' the highest step number\)$",
    ):
        store.resolve_step(JOB, "newest")
    for word in ("latest", "highest"):
        with pytest.raises(NotFoundError, match=r"job 'nope' has no checkpoints under"):
            store.resolve_step("nope", word)


def test_reading_the_commit_order_of_many_checkpoints_is_cheap(store: Store) -> None:
    for step in range(1, 41):
        save(store, step)
    age(store)
    assert store.steps_by_commit(JOB) == list(range(1, 41))
    read: list[str] = []

    def counting(data: bytes, *, where: str) -> tuple[int, int]:
        read.append(where)
        return commit_seq(data, where=where)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ckptd.format.commits.commit_seq", counting)
        assert store.resolve_step(JOB, "latest") == 40
        assert read == []  # old, unchanged manifests are only stat()ed
        save(store, 41)
        assert store.resolve_step(JOB, "latest") == 41
    assert read == [str(store.manifest_path(JOB, 41))]  # only the new one


# ---- a root that is not a store ----------------------------------------------------------------


def test_a_missing_root_is_not_an_empty_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "typo")
    message = (
        rf"^no ckptd store at {tmp_path}/typo: the directory does not exist; pass --root DIR "
        r"or set CKPTD_ROOT / store\.root$"
    )
    with pytest.raises(NoStoreError, match=message):
        store.check_store()
    with pytest.raises(NoStoreError, match=message):
        load_checkpoint(store, JOB)
    with pytest.raises(NoStoreError, match=message):
        load_checkpoint(store, JOB, fallback=True)
    assert not (tmp_path / "typo").exists()


def test_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("hi")
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        NoStoreError,
        match=rf"^{tmp_path}/home is not a ckptd store \(no \.ckptd-store marker, no job "
        r"directories\); pass --root DIR",
    ):
        Store(tmp_path / "home").check_store()
    with pytest.raises(NoStoreError, match=r"file is not a ckptd store \(not a directory\)"):
        Store(tmp_path / "file").check_store()
    with pytest.raises(NoStoreError, match=r"does not exist"):
        Store(tmp_path / "file" / "below").check_store()


def test_writes_mark_the_store_and_an_existing_job_is_a_store_without_the_marker(
    root: Path,
) -> None:
    store = Store(root)
    save(store, 1)
    marker = root / STORE_MARKER
    assert json.loads(marker.read_bytes()) == {"format": "ckptd.store", "version": 1}
    store.check_store()
    assert store.jobs() == [JOB]

    marker.unlink()  # as a version before the marker left it
    store.check_store()
    with pytest.raises(NotFoundError, match=r"job 'ghost' has no checkpoints under") as info:
        store.resolve_step("ghost", "latest")
    assert not isinstance(info.value, NoStoreError)
    save(store, 2)
    assert marker.is_file()  # the next write marks it


def test_initialize_makes_an_empty_store_and_is_idempotent(tmp_path: Path) -> None:
    store = Store(tmp_path / "a" / "b")
    assert store.initialize() == tmp_path / "a" / "b"
    store.check_store()
    first = (tmp_path / "a" / "b" / STORE_MARKER).stat()
    store.initialize()
    assert (tmp_path / "a" / "b" / STORE_MARKER).stat().st_ino == first.st_ino  # not rewritten
    assert store.jobs() == []
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == [STORE_MARKER]
    with pytest.raises(NotFoundError, match=r"job 'run' has no checkpoints under") as info:
        load_checkpoint(store, JOB)
    assert not isinstance(info.value, NoStoreError)


def test_no_store_error_has_its_own_exit_code_and_crosses_the_protocol() -> None:
    assert EXIT_CODES["NoStoreError"] == NoStoreError.exit_code == 20
    assert issubclass(NoStoreError, NotFoundError)
    error = error_from_reply("NoStoreError", "no ckptd store at /x")
    assert type(error) is NoStoreError and str(error) == "no ckptd store at /x"


def test_retention_keeps_the_latest_commit_when_the_clock_disagrees(store: Store) -> None:
    """``newest`` and ``keep_last`` follow the commit order, like ``latest``: with commit times
    out of order (a clock stepped back, two writers racing for the commit lock) retention used
    to delete the checkpoint just committed, and ``latest`` then moved to an older one."""
    from ckptd.policy.prune import prune
    from ckptd.policy.retention import policy_from_dict

    for step, created in ((100, "2026-01-01T00:00:00Z"), (200, "2099-01-01T00:00:00Z")):
        flat = flatten({"w": torch.full((8,), float(step))})
        sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
        write_checkpoint(store, JOB, step, flat.skeleton, sources, config=CONFIG, created=created)
    save(store, 150)  # committed last, stamped now: before 200's (future) time
    assert store.resolve_step(JOB, "latest") == 150

    result = prune(store, JOB, policy_from_dict({"keep_last": 1}, "retention"))

    assert store.steps(JOB) == [150, 200]  # 150: newest commit; 200: the highest step
    assert result.reasons[150] == ["newest", "last 1"]
    assert store.resolve_step(JOB, "latest") == 150
