"""Symlinked job directories and path-traversing job names.

A job directory replaced by a symlink to another directory (here a job of another store, standing
in for ``/etc``: it holds manifests, objects, a garbage object, a stale tmp file, a pin, a
``job.json`` with a retention policy and a ``passwd``) must never be written or deleted through:

* the daemon refuses the job at ``hello`` (``StorePermissionError``), and a job swapped for such a
  symlink while its client is connected fails its next snapshot with ``StorePermissionError``;
* ``ckptd rm`` / ``gc`` / ``prune`` / ``pin`` / ``unpin`` on it refuse (or find nothing) and
  leave every file of the target as it was, byte for byte, with nothing added.

Job names that would leave the root (``../x``, ``a/b``, ``..``, NUL, ...) are refused at ``hello``
with an ``error`` reply, and nothing is created for them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

import ckptd_client
from ckptd.cli.main import main
from ckptd.errors import EXIT_CODES, StorePermissionError
from ckptd.format.store import Store
from ckptd.protocol import PROTOCOL_VERSION, close_fds, recv_message, send_message
from ckptd_client import Client
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import Daemon, DaemonFactory

daemons = daemon_fixtures.daemons
daemon = daemon_fixtures.daemon
shared_daemon = daemon_fixtures.shared_daemon
ckptd_env = daemon_fixtures.ckptd_env
pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("ckptd_env")]

REFUSALS = {
    EXIT_CODES["StorePermissionError"],
    EXIT_CODES["NotFoundError"],
    EXIT_CODES["NothingToDoError"],
}
GARBAGE = "ab" + "0" * 62


def make_target(root: Path, job: str) -> Path:
    """A job directory of another store (for ``job``, so its manifests name ``job``), with
    something for every command to destroy."""
    for step in (1, 2, 3):
        state = {"w": torch.full((256,), float(step))}
        ckptd_client.save(job, state=state, step=step, root=root)
    store = Store(root)
    store.pin(job, 1)
    store.update_job_info(job, retention={"keep_last": 1})
    target = store.job_dir(job)
    (target / "objects" / "ab").mkdir(exist_ok=True)
    (target / "objects" / "ab" / GARBAGE).write_bytes(b"unreferenced")
    stale = target / "tmp" / "left-by-a-crash.tmp"
    stale.write_bytes(b"stale")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    (target / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return target


def tree(path: Path) -> dict[str, str]:
    """Every file and directory under ``path`` (not following symlinks) and its content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames:
            out[os.path.relpath(Path(dirpath, name), path)] = "dir"
        for name in filenames:
            p = Path(dirpath, name)
            out[os.path.relpath(p, path)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:
        code = 0
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_symlinked_job_directory_is_never_written_or_deleted_through(
    daemon: Daemon, daemons: DaemonFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    root = daemon.root
    root.mkdir(parents=True, exist_ok=True)
    targets, before = {}, {}
    for job in ("evil", "swapped"):
        make_target(daemons.base / "pristine", job)
        targets[job] = daemons.base / "elsewhere" / job

    def reset_target(job: str) -> None:
        shutil.rmtree(targets[job], ignore_errors=True)
        # copy2 keeps modification times: the stale tmp file stays two hours old
        shutil.copytree(daemons.base / "pristine" / job, targets[job], symlinks=True)
        before[job] = tree(targets[job])

    for job in targets:
        reset_target(job)
    evil = root / "evil"
    evil.symlink_to(targets["evil"], target_is_directory=True)
    refused = f"job directory {evil} is a symlink; ckptd never writes or deletes through symlinks"

    # The daemon: refused at hello, with or without a retention policy to record.
    for retention in (None, {"keep_last": 2}):
        with pytest.raises(StorePermissionError) as info:
            Client("evil", socket=daemon.socket, root=root, spawn=False, retention=retention)
        assert refused in str(info.value)

    # A job swapped for a symlink under a connected client: its next snapshot fails.
    with Client("swapped", socket=daemon.socket, root=root, spawn=False) as client:
        assert client.snapshot(state={"w": torch.ones(64)}, step=1).wait(60).step == 1
        (root / "swapped").rename(root / "swapped-real")
        (root / "swapped").symlink_to(targets["swapped"], target_is_directory=True)
        handle = client.snapshot(state={"w": torch.zeros(64)}, step=2)
        with pytest.raises(StorePermissionError) as info:
            handle.wait(60)
        assert f"job directory {root / 'swapped'} is a symlink" in str(info.value)
    daemon.wait_idle()
    assert all(tree(targets[job]) == before[job] for job in targets)

    # The CLI: every command that writes or deletes refuses the job, or finds nothing in it.
    problems = []
    for job in ("evil", "swapped"):
        for args in (
            ("rm", job, "2", "--yes"),
            ("gc", job),
            ("prune", job),
            ("pin", job, "3"),
            ("unpin", job, "1"),
        ):
            code, out = cli(capsys, *args, "--root", root)
            was, now = before[job], tree(targets[job])
            if now != was or code not in REFUSALS:
                changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
                what = f"changed the target: {changed}" if changed else f"exited {code}"
                problems.append(f"ckptd {' '.join(args)} {what} ({out.strip()[-160:]!r})")
                reset_target(job)
    for every in ("gc", "prune"):  # every job: a symlinked one is not a job
        code, out = cli(capsys, every, "--root", root)
        for job, target in targets.items():
            if tree(target) != before[job]:
                problems.append(f"ckptd {every} changed {job}'s target ({out[-160:]!r})")
                reset_target(job)
    assert not problems, "\n".join(problems)


def hello(daemon: Daemon, job: object) -> dict[str, object] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        send_message(
            sock,
            {
                "op": "hello",
                "version": PROTOCOL_VERSION,
                "job": job,
                "root": str(daemon.root),
                "pid": os.getpid(),
            },
        )
        reply, fds = recv_message(sock)
        close_fds(fds)
        after, fds = recv_message(sock)
        close_fds(fds)
    assert after is None, f"the daemon kept the connection open after {reply}"
    return reply


@pytest.mark.parametrize(
    ("job", "fragment"),
    [
        ("../x", "hello.job: invalid job name '../x'"),
        ("a/b", "hello.job: invalid job name 'a/b'"),
        ("..", "hello.job: invalid job name '..'"),
        ("a\x00b", "hello.job: invalid job name 'a\\x00b'"),
        ("../../../../tmp/x", "hello.job: invalid job name '../../../../tmp/x'"),
        ("/abs", "hello.job: invalid job name '/abs'"),
        ("", "hello.job: job name must be 1 to 128 characters long, got 0"),
        ("x" * 129, "hello.job: job name must be 1 to 128 characters long, got 129"),
        (7, "hello.job: job name must be a string, got int"),
    ],
)
def test_job_names_that_leave_the_root_are_refused_at_hello(
    shared_daemon: Daemon, job: object, fragment: str
) -> None:
    base = shared_daemon.root.parent
    before = sorted(p.name for p in base.iterdir())
    reply = hello(shared_daemon, job)
    assert reply is not None and reply["op"] == "error", reply
    assert reply["type"] == "ProtocolError"
    assert fragment in str(reply["message"]), reply
    assert sorted(p.name for p in base.iterdir()) == before
    assert not shared_daemon.root.exists() or Store(shared_daemon.root).jobs() == []
    assert shared_daemon.proc.poll() is None
