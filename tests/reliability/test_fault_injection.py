"""fsync and write failures injected into a live daemon with libfiu (``fiu-utils``).

The daemon runs under libfiu's POSIX preload (what ``fiu-run -x`` sets up); ``fiu-ctrl`` turns
``posix/io/sync/fsync`` (EIO, ``failinfo=5``) and ``posix/io/rw/write`` (ENOSPC,
``failinfo=28``) on around one snapshot and off again; a read-only filesystem (EROFS) and a
quota (EDQUOT) are injected the same way, on write and on fsync. Each failed snapshot's
``wait()`` raises the matching error (``StoreIOError``, ``DiskFullError``,
``StorePermissionError``) naming the file and the operation, the checkpoint never becomes
visible, the failure shows in ``ckptd status --json`` (``failures``, ``recent_errors``), every
earlier checkpoint still verifies and the next snapshot commits.

fsync is never retried on the same data (after a failed fsync the kernel may have dropped the
dirty pages, so a second one can "succeed" with nothing on disk). A ``onetime`` failure point
fails only the first call: had the daemon retried, the retry would have succeeded and the
checkpoint committed. So a one-time failure must still fail the snapshot, leave no tmp file and
no manifest, then or later.

Write failures are injected ``onetime`` only: every write() of the process fails while the
point is on, the daemon's log lines included, and a logging error would be written as a
traceback once the point is off. The daemon logs at ``warning`` here, so nothing is logged
between turning the point on and the first object write.

libfiu cannot add latency, only failures; the load test uses a tmpfs root and one store thread
to make the write path the bottleneck instead.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.errors import CkptdError, DiskFullError, StoreIOError, StorePermissionError
from ckptd.format.restore import load_checkpoint, verify_manifest
from ckptd.format.store import Store
from ckptd_client import Client
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import Daemon, DaemonFactory, clean_env, status_json
from tests.reliability import fixtures
from tests.reliability.fixtures import Fiu, LoopSummary, SteppedState, difference

ckptd_env = daemon_fixtures.ckptd_env
pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("ckptd_env")]
fiu_daemons = fixtures.fiu_daemons

JOB = "faulty"
CONFIG = '[daemon]\nlog_level = "warning"\n[store]\nchunk_bytes = "1MiB"\n'
STATE = SteppedState(31, 4.0, 4)  # 1 MiB regions: two new objects per snapshot
FSYNC = "posix/io/sync/fsync"
WRITE = "posix/io/rw/write"
OBJECT = r"\S+/faulty/objects/[0-9a-f]{2}/[0-9a-f]{64}"


def connect(daemon: Daemon) -> Client:
    return Client(JOB, socket=daemon.socket, root=daemon.root, spawn=False, strict=False)


def tmp_files(store: Store) -> list[str]:
    return sorted(p.name for p in store.tmp_dir(JOB).iterdir())


def assert_committed(store: Store, steps: list[int]) -> None:
    """Exactly ``steps`` are visible; each verifies and holds what was handed over."""
    assert store.steps(JOB) == steps
    for step in steps:
        assert verify_manifest(store, store.read_manifest(JOB, step)) == []
        got = load_checkpoint(store, JOB, step).state
        assert difference(got, STATE.at(step), f"step {step}") is None


def failure_status(factory: DaemonFactory, daemon: Daemon) -> dict[str, Any]:
    return status_json(daemon.socket, clean_env(factory.base))


def test_fsync_eio_fails_the_snapshot_names_the_file_and_is_never_retried(
    fiu_daemons: tuple[DaemonFactory, Fiu],
) -> None:
    factory, fiu = fiu_daemons
    daemon = factory.start(config=CONFIG)
    store = Store(daemon.root)
    with connect(daemon) as client:
        assert client.snapshot(state=STATE.at(1), step=1).wait(60).step == 1

        # EIO on every fsync for the duration of one snapshot.
        fiu.ctrl(daemon.pid, f"enable name={FSYNC},failinfo=5")
        try:
            persistent = client.snapshot(state=STATE.at(2), step=2)
            with pytest.raises(StoreIOError) as failed:
                persistent.wait(60)
        finally:
            fiu.ctrl(daemon.pid, f"disable name={FSYNC}")
        assert re.fullmatch(
            f"cannot fsync {OBJECT}: Input/output error \\(errno 5\\)", str(failed.value)
        ), failed.value

        # EIO on the next fsync only: a retry would succeed, so this must fail too.
        fiu.ctrl(daemon.pid, f"enable name={FSYNC},failinfo=5,onetime")
        once = client.snapshot(state=STATE.at(3), step=3)
        with pytest.raises(StoreIOError) as failed_once:
            once.wait(60)
        assert re.fullmatch(
            f"cannot fsync {OBJECT}: Input/output error \\(errno 5\\)", str(failed_once.value)
        ), failed_once.value
        fiu.ctrl(daemon.pid, f"disable name={FSYNC}", check=False)  # fired: already off

        daemon.wait_idle()
        assert tmp_files(store) == []
        assert store.steps(JOB) == [1]
        assert client.snapshot(state=STATE.at(4), step=4).wait(60).step == 4
        assert client.snapshot(state=STATE.at(5), step=5).wait(60).step == 5
    daemon.wait_idle()
    assert_committed(store, [1, 4, 5])  # 2 and 3 never appeared, then or later
    assert tmp_files(store) == []

    st = failure_status(factory, daemon)
    assert st["failures"] == {"StoreIOError": 2}
    assert st["commits"] == 3
    errors = "\n".join(st["recent_errors"])
    for step in (2, 3):
        assert re.search(f"{JOB} step {step}: cannot fsync {OBJECT}: Input/output error", errors)


def test_write_enospc_fails_the_snapshot_with_disk_full_and_the_next_one_commits(
    fiu_daemons: tuple[DaemonFactory, Fiu],
) -> None:
    factory, fiu = fiu_daemons
    daemon = factory.start(config=CONFIG)
    store = Store(daemon.root)
    with connect(daemon) as client:
        assert client.snapshot(state=STATE.at(1), step=1).wait(60).step == 1
        fiu.ctrl(daemon.pid, f"enable name={WRITE},failinfo=28,onetime")
        try:
            handle = client.snapshot(state=STATE.at(2), step=2)
            with pytest.raises(DiskFullError) as failed:
                handle.wait(60)
        finally:
            fiu.ctrl(daemon.pid, f"disable name={WRITE}", check=False)
        assert re.fullmatch(
            f"cannot write {OBJECT}: No space left on device; free space on that filesystem "
            r"\(ckptd rm / gc, or a retention policy\) or move the root",
            str(failed.value),
        ), failed.value
        daemon.wait_idle()
        assert tmp_files(store) == []
        assert client.snapshot(state=STATE.at(3), step=3).wait(60).step == 3
    daemon.wait_idle()
    assert_committed(store, [1, 3])
    assert tmp_files(store) == []

    st = failure_status(factory, daemon)
    assert st["failures"] == {"DiskFullError": 1}
    assert st["commits"] == 2
    assert any(
        re.search(f"{JOB} step 2: cannot write {OBJECT}: No space left on device", e)
        for e in st["recent_errors"]
    ), st["recent_errors"]


READ_ONLY = (
    rf"Read-only file system \(running as uid {os.getuid()}\); fix the directory's owner or mode, "
    r"or choose another root with --root / CKPTD_ROOT"
)
QUOTA = (
    r"Disk quota exceeded; free space on that filesystem \(ckptd rm / gc, or a retention "
    r"policy\) or move the root"
)


@pytest.mark.parametrize(
    ("point", "code", "error", "message"),
    [
        pytest.param(WRITE, errno.EROFS, StorePermissionError, READ_ONLY, id="write-EROFS"),
        pytest.param(FSYNC, errno.EROFS, StorePermissionError, READ_ONLY, id="fsync-EROFS"),
        pytest.param(WRITE, errno.EDQUOT, DiskFullError, QUOTA, id="write-EDQUOT"),
        pytest.param(FSYNC, errno.EDQUOT, DiskFullError, QUOTA, id="fsync-EDQUOT"),
    ],
)
def test_read_only_and_quota_errors_fail_the_snapshot_and_lose_nothing(
    fiu_daemons: tuple[DaemonFactory, Fiu],
    point: str,
    code: int,
    error: type[CkptdError],
    message: str,
) -> None:
    """A filesystem that turned read-only (EROFS) is a permission error, a quota (EDQUOT) is a
    full disk: one snapshot fails with it, naming the object and the operation; the committed
    checkpoint before it still verifies and the next one commits."""
    factory, fiu = fiu_daemons
    daemon = factory.start(config=CONFIG)
    store = Store(daemon.root)
    operation = "write" if point == WRITE else "fsync"
    with connect(daemon) as client:
        assert client.snapshot(state=STATE.at(1), step=1).wait(60).step == 1
        fiu.ctrl(daemon.pid, f"enable name={point},failinfo={code},onetime")
        try:
            handle = client.snapshot(state=STATE.at(2), step=2)
            with pytest.raises(error) as failed:
                handle.wait(60)
        finally:
            fiu.ctrl(daemon.pid, f"disable name={point}", check=False)  # fired: already off
        assert re.fullmatch(f"cannot {operation} {OBJECT}: {message}", str(failed.value)), (
            failed.value
        )
        daemon.wait_idle()
        assert tmp_files(store) == []
        assert client.snapshot(state=STATE.at(3), step=3).wait(60).step == 3
    daemon.wait_idle()
    assert_committed(store, [1, 3])  # 1 intact, 2 never visible, 3 committed after the fault
    assert tmp_files(store) == []

    st = failure_status(factory, daemon)
    assert st["failures"] == {error.__name__: 1}
    assert st["commits"] == 2
    assert any(
        re.search(f"{JOB} step 2: cannot {operation} {OBJECT}: {message}", e)
        for e in st["recent_errors"]
    ), st["recent_errors"]


def test_a_failed_fsync_never_leaves_a_failed_checkpoint_visible(
    fiu_daemons: tuple[DaemonFactory, Fiu],
) -> None:
    """A snapshot whose objects all exist already (dedup) does exactly two fsyncs: the manifest's
    tmp file, then, after the rename, the ``manifests`` directory. With each fsync failing at
    random (p = 0.5) some snapshots fail at the first, some at the second, some commit. Whatever
    failed must not be visible: the daemon told the trainer it is not a checkpoint."""
    factory, fiu = fiu_daemons
    daemon = factory.start(config=CONFIG)
    store = Store(daemon.root)
    summary = LoopSummary("fsync-failures")
    fixed = {"w": torch.arange(1 << 18, dtype=torch.float32)}
    outcomes: dict[str, int] = {"committed": 0, "file fsync": 0, "directory fsync": 0}
    with connect(daemon) as client:
        assert client.snapshot(state=fixed, step=1).wait(60).step == 1
        for step in range(2, 200):
            fiu.ctrl(daemon.pid, f"enable_random name={FSYNC},failinfo=5,probability=0.5")
            try:
                handle = client.snapshot(state=fixed, step=step)
                try:
                    handle.wait(60)
                except StoreIOError as exc:
                    error: StoreIOError | None = exc
                else:
                    error = None
            finally:
                fiu.ctrl(daemon.pid, f"disable name={FSYNC}")
            summary.iterations += 1
            visible = step in store.steps(JOB)
            if error is None:
                outcomes["committed"] += 1
                if not visible:
                    summary.violate(f"step {step} was reported committed but is not visible")
                continue
            message = str(error)
            manifest = store.manifest_path(JOB, step)
            if message.startswith(f"cannot fsync directory {manifest.parent}: "):
                outcomes["directory fsync"] += 1
            elif message.startswith(f"cannot fsync {manifest}: "):
                outcomes["file fsync"] += 1
            else:
                summary.violate(f"step {step}: unexpected failure {message!r}")
            if visible:
                summary.violate(
                    f"step {step} failed ({message}) but {Path(manifest).name} is visible"
                )
            if outcomes["directory fsync"] >= 3 and outcomes["file fsync"] >= 3:
                break
    daemon.wait_idle()
    assert tmp_files(store) == []
    for step in store.steps(JOB):
        assert verify_manifest(store, store.read_manifest(JOB, step)) == []
        summary.verified += 1
    st = failure_status(factory, daemon)
    summary.extra |= {k.replace(" ", "_"): v for k, v in outcomes.items()}
    summary.extra["status_failures"] = st["failures"]
    summary.report()
    assert outcomes["directory fsync"] >= 1 and outcomes["file fsync"] >= 1, outcomes
    assert st["failures"] == {"StoreIOError": outcomes["directory fsync"] + outcomes["file fsync"]}
