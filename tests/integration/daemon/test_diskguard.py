"""The disk guard, retention and pins end to end: real ``ckptd start`` daemons whose root is a
48 MiB tmpfs, real clients, the ``ckptd`` command line in-process (the same code as the
installed console script, which ``tests/integration/cli/test_cli.py`` and
``tests/integration/daemon/test_daemon.py`` run, without a second interpreter's 2-3 s a call).

Every daemon runs with ``[disk] min_free_bytes = "4MiB"`` from a ``--config`` file. States are
random bytes (stored raw: the codec cannot shrink them), so a 6 MiB snapshot takes 6 MiB of the
tmpfs and the filesystem's free space is fully predictable.

Needs root (to mount the tmpfs): skipped otherwise, a failure under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.cli.main import main
from ckptd.errors import EXIT_CODES, DiskFullError
from ckptd.format.restore import verify_manifest
from ckptd.format.store import Store
from ckptd_client import Client
from tests._requirements import missing, require
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import (
    Daemon,
    DaemonFactory,
    clean_env,
    memfd_maps,
    short_tmp,
    wait_until,
)

ckptd_env = daemon_fixtures.ckptd_env
pytestmark = pytest.mark.usefixtures("ckptd_env")

MiB = 1 << 20
TMPFS_MIB = 48
GUARD_BYTES = 4 * MiB
GUARD = '[disk]\nmin_free_bytes = "4MiB"\n'
WAIT_S = 120.0


# ---- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def tmpfs_daemons() -> Iterator[DaemonFactory]:
    """A daemon factory whose default root is a fresh 48 MiB tmpfs (unmounted afterwards)."""
    require(os.geteuid() == 0, "mounting a size-limited tmpfs needs root")
    base = short_tmp()
    factory = DaemonFactory(base, clean_env(base))
    mountpoint = factory.default_root
    mountpoint.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        missing(f"cannot mount a tmpfs on {mountpoint}: {mount.stderr.strip()}")
    try:
        yield factory
    finally:
        try:
            factory.stop_all()  # nothing may hold the mount when it is unmounted
        finally:
            umount = subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
            if umount.returncode != 0:
                subprocess.run(["umount", "-l", str(mountpoint)], check=False)
            factory.cleanup()


def start(factory: DaemonFactory, config: str) -> tuple[Daemon, Path]:
    """A daemon on the tmpfs root with ``config`` (passed with --config); returns the file."""
    path = factory.base / f"guard-{len(factory.started)}.toml"
    path.write_text(config)
    return factory.start("--config", str(path)), path


def connect(daemon: Daemon, job: str, **kwargs: Any) -> Client:
    return Client(job, socket=daemon.socket, root=daemon.root, spawn=False, **kwargs)


def random_state(seed: int, mib: float) -> dict[str, torch.Tensor]:
    """``mib`` MiB of random bytes: incompressible, so stored at full size."""
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randint(0, 256, (int(mib * MiB),), dtype=torch.uint8, generator=gen)}


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def verify_job(store: Store, job: str) -> list[int]:
    """Assert every checkpoint of ``job`` verifies; return its steps."""
    steps = store.steps(job)
    for step in steps:
        assert verify_manifest(store, store.read_manifest(job, step)) == [], f"{job} step {step}"
    return steps


def object_files(store: Store, job: str) -> set[str]:
    return {p.name for p in (store.job_dir(job) / "objects").glob("??/*")}


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


CLI = Callable[..., Result]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CLI:
    """Run ``ckptd ARGS`` in-process; return its exit code, stdout and stderr."""
    monkeypatch.setenv("COLUMNS", "160")

    def run(*args: str | Path | int) -> Result:
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        code = info.value.code
        assert isinstance(code, int), f"exit code {code!r}"
        return Result(code, captured.out, captured.err)

    return run


def ok(result: Result) -> str:
    assert result.code == 0, result
    return result.out


def kept_by(cli: CLI, job: str, root: Path, config: Path) -> dict[int, list[str]]:
    """``ckptd list JOB --json``: step -> the rules keeping it."""
    docs = json.loads(ok(cli("list", job, "--json", "--root", root, "--config", config)))
    return {int(doc["step"]): doc["kept_by"] for doc in docs}


# ---- no retention policy: the guard refuses, the daemon degrades and recovers -------------------


def test_full_disk_without_policy_refuses_snapshots_then_recovers(
    tmpfs_daemons: DaemonFactory, cli: CLI
) -> None:
    daemon, _config = start(tmpfs_daemons, GUARD)
    store = Store(daemon.root)
    committed: list[int] = []
    refused: list[int] = []
    messages: list[str] = []
    with connect(daemon, "fill") as client:
        step = 0
        while len(refused) < 2:
            step += 1
            assert step <= 12, f"the disk guard never refused (committed {committed})"
            pending = client.snapshot(state=random_state(step, 6), step=step, rng=False)
            try:
                pending.wait(WAIT_S)
            except DiskFullError as exc:
                assert type(exc) is DiskFullError
                refused.append(step)
                messages.append(str(exc))
            else:
                committed.append(step)
            # never below the guard's threshold, whatever was accepted
            assert free_bytes(daemon.root) >= GUARD_BYTES

        # 48 MiB, 6 MiB each, 4 MiB kept free: a handful commit, then every snapshot is refused.
        assert len(committed) >= 4
        assert committed == list(range(1, len(committed) + 1))
        assert refused == [len(committed) + 1, len(committed) + 2]
        for message in messages:
            assert message.startswith(f"not enough space for a snapshot under {daemon.root}: ")
            assert f"the disk guard keeps {GUARD_BYTES} free (disk.min_free_bytes" in message
            assert "retention freed 0 bytes" in message
        assert daemon.proc.poll() is None, "the daemon died"
        status = json.loads(ok(cli("status", "--json", "--socket", daemon.socket)))
        assert status["degraded"] is not None
        assert status["degraded"].startswith(f"not enough space for a snapshot under {daemon.root}")
        assert status["commits"] == len(committed)
        assert status["failures"] == {}
        assert verify_job(store, "fill") == committed

        # Free space by hand: remove the two oldest checkpoints and collect their objects.
        for old in committed[:2]:
            assert f"removed fill step {old}" in ok(
                cli("rm", "fill", old, "--yes", "--root", daemon.root)
            )
        assert daemon.status()["degraded"] is not None  # removing manifests frees nothing yet
        assert "fill: removed 2 object(s)" in ok(cli("gc", "fill", "--root", daemon.root))
        # The daemon re-checks the free space about once a second, without any new snapshot.
        wait_until(
            lambda: daemon.status()["degraded"] is None, 30, "the daemon to leave degraded state"
        )
        info = client.snapshot(state=random_state(100, 6), step=100, rng=False).wait(WAIT_S)
        assert info.step == 100
    assert verify_job(store, "fill") == [*committed[2:], 100]
    assert daemon.status()["degraded"] is None
    assert tmpfs_daemons.stop(daemon) == 0


# ---- keep_last: retention keeps the disk from filling -------------------------------------------


def test_keep_last_deletes_old_steps_so_every_snapshot_commits(
    tmpfs_daemons: DaemonFactory, cli: CLI
) -> None:
    daemon, config = start(tmpfs_daemons, GUARD + "[retention]\nkeep_last = 2\n")
    store = Store(daemon.root)
    steps = list(range(1, 13))  # 72 MiB of snapshots through a 48 MiB filesystem
    with connect(daemon, "roll") as client:
        for step in steps:
            info = client.snapshot(state=random_state(step, 6), step=step, rng=False).wait(WAIT_S)
            assert info.step == step
            # pruned (and collected) before the commit is reported
            assert store.steps("roll") == steps[max(0, step - 2) : step]
            assert object_files(store, "roll") == store.referenced_objects("roll")
            assert free_bytes(daemon.root) >= 30 * MiB
    status = json.loads(ok(cli("status", "--json", "--socket", daemon.socket)))
    assert status["degraded"] is None
    assert status["commits"] == len(steps)
    assert status["failures"] == {}
    assert verify_job(store, "roll") == [11, 12]
    assert kept_by(cli, "roll", daemon.root, config) == {11: ["last 2"], 12: ["newest", "last 2"]}
    table = ok(cli("list", "roll", "--root", daemon.root, "--config", config))
    assert "newest, last 2" in table
    assert "(prunable)" not in table


# ---- a real ENOSPC: the estimate was wrong -------------------------------------------------------


def test_enospc_during_a_write_fails_cleanly_and_the_next_snapshot_commits(
    tmpfs_daemons: DaemonFactory,
) -> None:
    """The daemon estimates a snapshot's size from the job's last stored/raw ratio. After a
    state of zeros (ratio about 0) it accepts 48 MiB of random bytes on a 48 MiB filesystem
    with about 40 MiB free: the write itself runs into ENOSPC."""
    daemon, _config = start(tmpfs_daemons, GUARD)
    store = Store(daemon.root)
    with connect(daemon, "nospc") as client:
        client.snapshot(state=random_state(1, 8), step=1, rng=False).wait(WAIT_S)
        zeros = {"w": torch.zeros(16 * MiB, dtype=torch.uint8)}
        info = client.snapshot(state=zeros, step=2, rng=False).wait(WAIT_S)
        assert info.stored_bytes < MiB  # the ratio the next estimate is based on
        before = object_files(store, "nospc")
        pending = client.snapshot(state=random_state(3, TMPFS_MIB), step=3, rng=False)
        with pytest.raises(DiskFullError) as failure:
            pending.wait(WAIT_S)
        assert failure.type is DiskFullError
        message = str(failure.value)
        assert "No space left on device" in message
        assert str(store.job_dir("nospc")) in message
        assert "free space on that filesystem" in message

        assert sorted(p.name for p in store.tmp_dir("nospc").iterdir()) == []
        assert verify_job(store, "nospc") == [1, 2]
        # the failed write's objects were collected again
        assert object_files(store, "nospc") == before == store.referenced_objects("nospc")
        assert free_bytes(daemon.root) > 30 * MiB
        status = daemon.status()
        assert status["failures"] == {"DiskFullError": 1}
        assert any("No space left on device" in e for e in status["recent_errors"])
        assert daemon.proc.poll() is None

        info = client.snapshot(state=random_state(4, 8), step=4, rng=False).wait(WAIT_S)
        assert info.step == 4
    assert verify_job(store, "nospc") == [1, 2, 4]
    # The client is gone: the daemon forgets it and unmaps its slots (the failed snapshot's too).
    wait_until(lambda: daemon.status()["clients"] == [], 10, "the daemon to drop the client")
    wait_until(lambda: memfd_maps(daemon.pid) == [], 10, "the daemon to unmap the slots")
    assert tmpfs_daemons.stop(daemon) == 0


def test_failed_pinned_snapshot_leaves_no_pin_behind(tmpfs_daemons: DaemonFactory) -> None:
    """snapshot(pin=True) pins the step before writing it. When the write fails, the pin must go
    too: otherwise a later, unpinned snapshot of that step (a retry, or the same step reached
    again after resuming from an older checkpoint) is silently kept forever."""
    daemon, _config = start(tmpfs_daemons, GUARD)
    store = Store(daemon.root)
    with connect(daemon, "pinfail", retention={"keep_last": 1}) as client:
        zeros = {"w": torch.zeros(16 * MiB, dtype=torch.uint8)}
        client.snapshot(state=zeros, step=1, rng=False).wait(WAIT_S)  # ratio ~0: see above
        big = random_state(2, TMPFS_MIB)
        with pytest.raises(DiskFullError, match="No space left on device"):
            client.snapshot(state=big, step=2, rng=False, pin=True).wait(WAIT_S)
        assert store.steps("pinfail") == [1]
        # the trainer retries step 2 without a pin, then moves on
        client.snapshot(state=random_state(2, 1), step=2, rng=False).wait(WAIT_S)
        client.snapshot(state=random_state(3, 1), step=3, rng=False).wait(WAIT_S)
    assert store.pinned_steps("pinfail") == set()
    assert verify_job(store, "pinfail") == [3]


# ---- pins ----------------------------------------------------------------------------------------


def test_pin_survives_keep_last_until_unpinned_and_pruned(
    tmpfs_daemons: DaemonFactory, cli: CLI
) -> None:
    daemon, config = start(tmpfs_daemons, GUARD)  # the policy comes from the client
    store = Store(daemon.root)
    root = daemon.root
    with connect(daemon, "pins", retention={"keep_last": 1}) as client:
        client.snapshot(state=random_state(1, 1), step=1, rng=False, pin=True).wait(WAIT_S)
        for step in (2, 3, 4):
            client.snapshot(state=random_state(step, 1), step=step, rng=False).wait(WAIT_S)
    assert verify_job(store, "pins") == [1, 4]
    assert store.pinned_steps("pins") == {1}
    assert kept_by(cli, "pins", root, config) == {1: ["pinned"], 4: ["newest", "last 1"]}

    # Everything is kept: nothing to prune, dry run or not.
    for extra in (["--dry-run"], []):
        out = ok(cli("prune", "pins", *extra, "--root", root))
        assert (
            out == "nothing to prune in job 'pins': every checkpoint is kept by a retention rule\n"
        )

    assert "unpinned pins step 1" in ok(cli("unpin", "pins", "1", "--root", root))
    assert kept_by(cli, "pins", root, config) == {1: [], 4: ["newest", "last 1"]}
    objects = object_files(store, "pins")

    out = ok(cli("prune", "pins", "--dry-run", "--root", root))
    assert "pins: would delete steps 1 (policy: keep_last=1)" in out
    assert store.steps("pins") == [1, 4]
    assert object_files(store, "pins") == objects

    out = ok(cli("prune", "pins", "--root", root))
    assert "pins: deleted steps 1, freed 1.0 MiB (policy: keep_last=1)" in out
    assert verify_job(store, "pins") == [4]
    assert object_files(store, "pins") == store.referenced_objects("pins")

    result = cli("unpin", "pins", "1", "--root", root)  # step 1 is gone: pruned, not pinned
    assert result.code == EXIT_CODES["NotFoundError"], result
    assert "job 'pins' has neither a checkpoint nor a pin at step 1" in result.err

    # A pin set by the operator protects step 4 from the next commits' pruning.
    assert "pinned pins step 4" in ok(cli("pin", "pins", "4", "--root", root))
    with connect(daemon, "pins", retention={"keep_last": 1}) as client:
        client.snapshot(state=random_state(5, 1), step=5, rng=False).wait(WAIT_S)
        client.snapshot(state=random_state(6, 1), step=6, rng=False).wait(WAIT_S)
    assert verify_job(store, "pins") == [4, 6]
    assert kept_by(cli, "pins", root, config) == {4: ["pinned"], 6: ["newest", "last 1"]}


# ---- the guard deletes what retention allows before refusing ------------------------------------


def test_guard_deletes_unpinned_checkpoints_before_refusing(
    tmpfs_daemons: DaemonFactory, cli: CLI
) -> None:
    """Pinned checkpoints fill the disk under keep_last=1; the guard refuses a snapshot while
    everything is pinned, and makes room for it (oldest first) once some are unpinned."""
    daemon, _config = start(tmpfs_daemons, GUARD + "[retention]\nkeep_last = 1\n")
    store = Store(daemon.root)
    root = daemon.root
    with connect(daemon, "guard") as client:
        for step in range(1, 7):
            client.snapshot(state=random_state(step, 6), step=step, rng=False, pin=True).wait(
                WAIT_S
            )
        client.snapshot(state=random_state(7, 6), step=7, rng=False).wait(WAIT_S)
        assert store.steps("guard") == [1, 2, 3, 4, 5, 6, 7]  # all pinned but the newest

        # Nothing may be deleted: refused.
        pending = client.snapshot(state=random_state(8, 6), step=8, rng=False)
        with pytest.raises(DiskFullError, match="retention freed 0 bytes") as refusal:
            pending.wait(WAIT_S)
        assert refusal.type is DiskFullError
        assert store.steps("guard") == [1, 2, 3, 4, 5, 6, 7]
        assert daemon.status()["degraded"] is not None

        for step in (1, 2):
            assert f"unpinned guard step {step}" in ok(cli("unpin", "guard", step, "--root", root))
        # Now the guard deletes the oldest unpinned checkpoint to admit the snapshot.
        info = client.snapshot(state=random_state(8, 6), step=8, rng=False).wait(WAIT_S)
        assert info.step == 8
    assert "disk guard: deleted guard step 1 (no retention rule keeps it)" in daemon.log_text()
    assert "disk guard: deleted guard step 2" not in daemon.log_text()  # 1 was enough
    # then the commit's own pruning removed step 2 and the no longer newest step 7
    assert verify_job(store, "guard") == [3, 4, 5, 6, 8]
    assert store.pinned_steps("guard") == {3, 4, 5, 6}
    assert object_files(store, "guard") == store.referenced_objects("guard")
    assert daemon.status()["degraded"] is None
    assert free_bytes(root) >= GUARD_BYTES


def test_resuming_from_an_older_step_keeps_the_new_checkpoints(
    tmpfs_daemons: DaemonFactory,
) -> None:
    """Training diverged after step 100 (pinned); the run is resumed from it. keep_last must keep
    the checkpoints written since, not delete each one right after reporting it committed
    because the abandoned step 200 has a higher number."""
    daemon, _config = start(tmpfs_daemons, GUARD + "[retention]\nkeep_last = 1\n")
    store = Store(daemon.root)
    with connect(daemon, "resume") as client:
        client.snapshot(state=random_state(100, 1), step=100, rng=False, pin=True).wait(WAIT_S)
        client.snapshot(state=random_state(200, 1), step=200, rng=False).wait(WAIT_S)
        # resumed from step 100
        info = client.snapshot(state=random_state(110, 1), step=110, rng=False).wait(WAIT_S)
        assert info.step == 110
        assert 110 in store.steps("resume"), "a checkpoint reported committed was deleted"
        client.snapshot(state=random_state(120, 1), step=120, rng=False).wait(WAIT_S)
    assert 120 in verify_job(store, "resume")
