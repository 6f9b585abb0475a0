"""Failure paths of real daemons that no other test reaches: what the caller gets, and that
nothing committed is lost.

* one daemon per socket: a second ``ckptd start`` on a served socket is refused; two trainers
  that spawn a daemon at the same moment end up sharing one;
* the queue-full refusal (``daemon.max_queue``), made deterministic by holding the job's lock
  exclusively (as GC does) so the writer waits with one snapshot in hand;
* a system daemon (``ckptd start`` without ``--user``): only its own root, its socket modes;
* an exception no ckptd code expects, raised inside the write pipeline by a seam
  (:mod:`tests.integration.faulty_ckptd`), reaches the client as ``SnapshotFailedError``;
* a damaged ``job.json``; a protocol version the daemon does not speak;
* ``ckptd restore`` export errors (the file side of the CLI, run in-process like every command
  here that needs no daemon).

The tests that leave a default daemon serving share one for the module (``shared_daemon``),
each with a job of its own.

Write faults (EROFS, EDQUOT) are injected with libfiu in
``tests/reliability/test_fault_injection.py``. Client reply timeouts, hung daemons and lost
connections are tested with the client code that handles them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd_client
from ckptd.cli.main import main
from ckptd.errors import (
    EXIT_CODES,
    DaemonUnavailableError,
    ManifestError,
    SnapshotFailedError,
    StoreIOError,
    StorePermissionError,
)
from ckptd.format.export import export_file
from ckptd.format.restore import load_checkpoint, verify_manifest
from ckptd.format.store import Store
from ckptd.protocol import PROTOCOL_VERSION, can_connect, recv_message, send_message
from ckptd_client import Client
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import (
    REPO,
    Daemon,
    DaemonFactory,
    assert_same,
    pid_alive,
    processes_mentioning,
    query,
    run_ckptd,
    wait_until,
)
from tests.integration.faulty_ckptd import FAULT_MARKER, FAULT_MESSAGE

ckptd_env = daemon_fixtures.ckptd_env
daemons = daemon_fixtures.daemons
shared_daemon = daemon_fixtures.shared_daemon
pytestmark = pytest.mark.usefixtures("ckptd_env")

JOB = "fp"
WAIT_S = 60.0


def connect(daemon: Daemon, job: str = JOB, **kwargs: Any) -> Client:
    """A client of ``daemon`` that never spawns a daemon of its own."""
    return Client(job, socket=daemon.socket, root=daemon.root, spawn=False, **kwargs)


def state(step: int) -> dict[str, Any]:
    return {"w": torch.full((4096,), float(step)), "step": step}


def assert_committed(root: Path, job: str, steps: list[int]) -> None:
    """Exactly ``steps`` are visible; each verifies and holds what :func:`state` gave it."""
    store = Store(root)
    assert store.steps(job) == steps
    for step in steps:
        assert verify_manifest(store, store.read_manifest(job, step)) == [], f"step {step}"
        assert_same(load_checkpoint(store, job, step).state, state(step), f"step {step}")


def one_line(text: str) -> str:
    """``text`` with runs of whitespace collapsed (rich wraps long error lines)."""
    return " ".join(text.split())


# ---- one daemon per socket ----------------------------------------------------------------------


def test_a_second_daemon_on_a_served_socket_is_refused(
    shared_daemon: Daemon, daemons: DaemonFactory
) -> None:
    daemon, job = shared_daemon, "second"
    other_root = daemons.base / "other-root"
    proc = run_ckptd(
        "start", "--user", "--socket", daemon.socket, "--root", other_root, env=daemons.env
    )
    err = one_line(proc.stderr)
    assert proc.returncode == EXIT_CODES["DaemonUnavailableError"], (proc.stdout, err)
    assert f"error: another ckptd is already serving {daemon.socket}" in err
    assert f"stop it first (ckptd stop --socket {daemon.socket}) or choose another --socket" in err
    assert "Traceback" not in err
    # The first daemon still owns the socket file and serves on it.
    assert daemon.status()["pid"] == daemon.pid
    with connect(daemon, job) as client:
        assert client.snapshot(state=state(1), step=1, rng=False).wait(WAIT_S).step == 1
    assert_committed(daemon.root, job, [1])


SPAWNING_TRAINER = """
import json, sys, time
from pathlib import Path
import torch
from ckptd_client import Client
from tests.integration.daemon_fixtures import query

sock, root, job, ready, go = sys.argv[1:6]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
with Client(job, socket=sock, root=root, strict=True, spawn=True) as client:
    info = client.snapshot(state={"w": torch.full((256,), 7.0)}, step=1, rng=False).wait(120)
    pid = query(Path(sock))["pid"]
print(json.dumps({"job": job, "step": info.step, "daemon": pid}), flush=True)
"""


def exited(pid: int) -> Callable[[], bool]:
    return lambda: not pid_alive(pid)


def test_two_trainers_spawning_at_once_share_one_daemon(daemons: DaemonFactory) -> None:
    sock = daemons.base / "spawn" / "s.sock"
    root = daemons.default_root
    go = daemons.base / "go"
    jobs = ("left", "right")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SPAWNING_TRAINER, sock, root, job, daemons.base / job, go],
            cwd=REPO,
            env=daemons.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in jobs
    ]
    spawned: list[int] = []
    try:
        wait_until(
            lambda: all((daemons.base / job).exists() for job in jobs),
            120,
            "both trainers to import torch and ckptd_client",
        )
        go.touch()  # both call Client(...) now, with no daemon on the socket
        results = [p.communicate(timeout=180) for p in procs]
        for job, p, (out, err) in zip(jobs, procs, results, strict=True):
            assert p.returncode == 0, (job, out, err)
        reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
        assert [r["job"] for r in reports] == list(jobs)
        assert all(r["step"] == 1 for r in reports)
        pids = {r["daemon"] for r in reports}

        def live() -> list[int]:
            return [
                pid
                for pid, cmd in processes_mentioning(str(sock))
                if " start " in f" {cmd} " and pid_alive(pid)
            ]

        spawned = live()
        assert len(pids) == 1, f"the trainers talked to different daemons: {reports}"
        # A loser may still be importing when the trainers finish (its spawner returned as
        # soon as the winner answered); it exits once it finds the socket served.
        wait_until(lambda: live() == list(pids), 60, f"only daemon {pids} to serve {sock}")
        for job in jobs:
            store = Store(root)
            assert store.steps(job) == [1]
            assert verify_manifest(store, store.read_manifest(job, 1)) == []
        log = (sock.parent / "ckptd.log").read_text(errors="replace")
        # If both spawned one, the second was told the socket is served, and said so.
        losers = log.count("another ckptd is already serving")
        assert losers <= 1, log
        print(f"\n[spawn race] daemons spawned: {1 + losers}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        if can_connect(sock):
            query(sock, "stop")  # the op `ckptd stop` sends
        for pid in spawned:
            wait_until(exited(pid), 60, f"spawned daemon {pid} to exit")


# ---- queue full ---------------------------------------------------------------------------------


def test_a_full_queue_refuses_the_snapshot_with_daemon_unavailable(daemons: DaemonFactory) -> None:
    """``max_queue = 1``: one snapshot being written, one queued, the next is refused. The writer
    is held at the job's lock, which the test takes exclusively (as GC does)."""
    daemon = daemons.start(config="[daemon]\nmax_queue = 1\n")
    store = Store(daemon.root)
    with connect(daemon, slots=3) as client:
        with store.job_lock(JOB, exclusive=True) as locked:
            assert locked
            writing = client.snapshot(state=state(1), step=1, rng=False)
            wait_until(
                lambda: daemon.status()["writing"] == {"job": JOB, "step": 1},
                WAIT_S,
                "step 1 to be taken by the writer",
            )
            queued = client.snapshot(state=state(2), step=2, rng=False)
            assert daemon.status()["queue"] == 1
            refused = client.snapshot(state=state(3), step=3, rng=False)
            assert refused.done()
            assert isinstance(refused.error, DaemonUnavailableError)
            with pytest.raises(DaemonUnavailableError) as info:
                refused.wait(0)
            message = str(info.value)
            assert message.startswith("ckptd's queue is full (1 snapshots waiting)"), message
            assert "snapshot less often or raise daemon.max_queue" in message
            assert not writing.done() and not queued.done()
            assert store.steps(JOB) == []
        # The lock is released: both accepted snapshots commit, in order; the queue has room.
        assert writing.wait(WAIT_S).step == 1
        assert queued.wait(WAIT_S).step == 2
        assert client.snapshot(state=state(4), step=4, rng=False).wait(WAIT_S).step == 4
    daemon.wait_idle()
    assert_committed(daemon.root, JOB, [1, 2, 4])
    assert daemon.proc.poll() is None


# ---- a system daemon ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "dir_mode", "sock_mode"),
    [(True, 0o700, 0o600), (False, 0o750, 0o660)],
    ids=["user", "system"],
)
def test_socket_and_directory_modes_of_a_directory_the_daemon_creates(
    daemons: DaemonFactory, user: bool, dir_mode: int, sock_mode: int
) -> None:
    sock = daemons.base / "fresh" / "run" / "d.sock"
    assert not sock.parent.exists()
    daemon = daemons.start(socket_path=sock, user=user)
    assert daemon.status()["mode"] == ("user" if user else "system")
    st = sock.parent.stat()
    assert (oct(st.st_mode & 0o7777), st.st_uid) == (oct(dir_mode), os.getuid())
    st = sock.stat()
    assert (oct(st.st_mode & 0o7777), st.st_uid) == (oct(sock_mode), os.getuid())


def test_a_system_daemon_writes_only_to_its_own_root(daemons: DaemonFactory) -> None:
    daemon = daemons.start(user=False)
    elsewhere = daemons.base / "elsewhere"
    with pytest.raises(StorePermissionError) as info:
        Client(JOB, socket=daemon.socket, root=elsewhere, spawn=False)
    message = str(info.value)
    assert message.startswith(f"this daemon writes checkpoints to {daemon.root}, not {elsewhere}")
    assert f"use root={str(daemon.root)!r}" in message
    assert not elsewhere.exists()

    # A relative root is refused before it is compared (raw hello: Client makes roots absolute).
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket))
        hello = {"op": "hello", "id": 1, "version": PROTOCOL_VERSION, "job": JOB, "root": "rel"}
        send_message(sock, hello | {"pid": os.getpid()})
        reply, _ = recv_message(sock)
    assert reply is not None and reply["op"] == "error", reply
    assert reply["type"] == "StorePermissionError"
    assert "root must be an absolute path, got 'rel'" in reply["message"]

    # Its own root works, and the daemon kept serving through the refusals.
    with Client(JOB, socket=daemon.socket, root=daemon.root, spawn=False) as client:
        assert client.snapshot(state=state(1), step=1, rng=False).wait(WAIT_S).step == 1
    assert_committed(daemon.root, JOB, [1])
    assert daemon.proc.poll() is None


# ---- an unexpected exception in the write path ---------------------------------------------------


def faulty_state() -> dict[str, torch.Tensor]:
    """One uint8 tensor whose bytes start with the seam's marker: its chunk fails to encode."""
    data = bytearray(FAULT_MARKER + bytes(4096))
    return {"w": torch.frombuffer(data, dtype=torch.uint8).clone()}


def test_an_unexpected_exception_in_the_write_path_is_a_snapshot_failed_error(
    daemons: DaemonFactory,
) -> None:
    daemons.expect_traceback(FAULT_MESSAGE)  # the daemon logs the unexpected exception in full
    daemon = daemons.start(module="tests.integration.faulty_ckptd")
    store = Store(daemon.root)
    with connect(daemon) as client:
        assert client.snapshot(state=state(1), step=1, rng=False).wait(WAIT_S).step == 1
        handle = client.snapshot(state=faulty_state(), step=2, rng=False)
        with pytest.raises(SnapshotFailedError) as info:
            handle.wait(WAIT_S)
        assert str(info.value) == f"internal error: RuntimeError({FAULT_MESSAGE!r})"
        assert handle.error is info.value
        # The daemon carries on: the next snapshot commits.
        assert client.snapshot(state=state(3), step=3, rng=False).wait(WAIT_S).step == 3
    st = daemon.wait_idle()
    assert_committed(daemon.root, JOB, [1, 3])
    assert sorted(p.name for p in store.tmp_dir(JOB).iterdir()) == []
    assert st["failures"] == {"SnapshotFailedError": 1}
    assert any(f"{JOB} step 2: internal error: RuntimeError(" in e for e in st["recent_errors"])
    assert f"{JOB} step 2: unexpected error" in daemon.log_text()
    assert daemon.proc.poll() is None


def test_a_retention_error_after_the_commit_never_fails_the_snapshot(
    shared_daemon: Daemon,
) -> None:
    """``Daemon._retain`` promises that retention never fails the commit; here retention cannot
    list the pins (``<job>/pins`` is a file). It once let the error through: the committed step
    was reported to the client as failed."""
    daemon, job = shared_daemon, "retention"
    with connect(daemon, job) as client:
        assert client.snapshot(state=state(1), step=1, rng=False).wait(WAIT_S).step == 1
        pins = Store(daemon.root).job_dir(job) / "pins"
        pins.write_bytes(b"not a directory")
        handle = client.snapshot(state=state(2), step=2, rng=False)
        try:
            info = handle.wait(WAIT_S)
        finally:
            daemon.wait_idle()
            # Committed either way: the manifest is visible and verifies.
            assert_committed(daemon.root, job, [1, 2])
    assert info.step == 2
    assert f"{job}: retention not applied" in daemon.log_text()
    pins.unlink()
    pins.mkdir()  # the job whole again: a later test of this daemon lists the whole root


def test_a_pins_path_that_is_not_a_directory_fails_a_pinned_snapshot_naming_it(
    shared_daemon: Daemon,
) -> None:
    """It once failed with 'internal error: NotADirectoryError(20, ...)', naming no path."""
    daemon, job = shared_daemon, "pins"
    with connect(daemon, job) as client:
        assert client.snapshot(state=state(1), step=1, rng=False).wait(WAIT_S).step == 1
        pins = Store(daemon.root).job_dir(job) / "pins"
        pins.write_bytes(b"not a directory")
        handle = client.snapshot(state=state(2), step=2, rng=False, pin=True)
        try:
            with pytest.raises(StoreIOError) as info:
                handle.wait(WAIT_S)
        finally:
            daemon.wait_idle()
            assert Store(daemon.root).steps(job) == [1]
    assert str(pins) in str(info.value)
    pins.unlink()
    pins.mkdir()  # the job whole again: a later test of this daemon lists the whole root


# ---- the operator CLI, in-process -------------------------------------------------------------

CLI = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CLI:
    """Run ``ckptd ARGS`` in-process; return its exit code, stdout and stderr (one line each)."""
    monkeypatch.setenv("COLUMNS", "160")

    def run(*args: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        code = info.value.code
        assert isinstance(code, int), f"exit code {code!r}"
        return code, one_line(captured.out), one_line(captured.err)

    return run


# ---- a damaged job.json -------------------------------------------------------------------------

GARBAGE = b"\x89PNG\r\n\x1a\n\x00\xff not json {"


def test_a_damaged_job_json_is_a_clear_error_and_loses_no_checkpoint(
    shared_daemon: Daemon, cli: CLI
) -> None:
    daemon, job = shared_daemon, "damaged"
    store = Store(daemon.root)
    job_json = store.job_dir(job) / "job.json"
    with connect(daemon, job) as client:
        assert client.snapshot(state=state(1), step=1, rng=False).wait(WAIT_S).step == 1
        assert json.loads(job_json.read_bytes())["owner_uid"] == os.getuid()
        job_json.write_bytes(GARBAGE)
        # A client already attached keeps committing; retention, which reads job.json, says why
        # it was not applied.
        assert client.snapshot(state=state(2), step=2, rng=False).wait(WAIT_S).step == 2
    st = daemon.wait_idle()
    assert any(
        f"{job}: retention: {job_json}: damaged" in e and "fix or delete it" in e
        for e in st["recent_errors"]
    ), st["recent_errors"]

    # A new client of the job is refused with the file and what to do.
    with pytest.raises(ManifestError) as info:
        connect(daemon, job)
    assert str(info.value).startswith(f"{job_json}: damaged (")
    assert str(info.value).endswith("fix or delete it")

    # The operator CLI names it too (exit 7, corrupt).
    for args in (("list",), ("list", job), ("prune", job)):
        code, out, err = cli(*args, "--root", daemon.root)
        assert code == EXIT_CODES["CorruptCheckpointError"], (args, out, err)
        assert f"error: {job_json}: damaged (" in err, (args, err)

    # Nothing committed was lost, the daemon serves other jobs, and the job's checkpoints
    # still verify and restore.
    code, out, err = cli("verify", job, "--root", daemon.root)
    assert code == 0, (out, err)
    assert_committed(daemon.root, job, [1, 2])
    with connect(daemon, "bystander") as client:
        assert client.snapshot(state=state(1), step=1, rng=False).wait(WAIT_S).step == 1
    assert daemon.proc.poll() is None


# ---- protocol version -----------------------------------------------------------------------


def test_a_client_of_another_protocol_version_is_told_both_versions(
    shared_daemon: Daemon,
) -> None:
    daemon, job = shared_daemon, "version"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket))
        hello = {"op": "hello", "id": 1, "version": 999, "job": job, "root": str(daemon.root)}
        send_message(sock, hello | {"pid": os.getpid()})
        reply, _ = recv_message(sock)
        assert reply is not None and reply["op"] == "error", reply
        assert reply["type"] == "ProtocolError"
        message = reply["message"]
        assert "999" in message
        assert re.search(rf"\b{PROTOCOL_VERSION}\b", message.replace("999", "")), message
        assert recv_message(sock)[0] is None  # and it hung up
    assert not Store(daemon.root).job_dir(job).exists()  # refused before anything was created
    with connect(daemon, job) as client:  # the current version is served
        assert client.snapshot(state=state(1), step=1, rng=False).wait(WAIT_S).step == 1
    assert daemon.proc.poll() is None


# ---- export errors (``ckptd restore``) -----------------------------------------------------------


def exports(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_export_to_an_existing_file_replaces_it_whole(cli: CLI, tmp_path: Path) -> None:
    """An existing destination file is replaced atomically (tmp file, rename), never partly."""
    root = tmp_path / "root"
    ckptd_client.save(JOB, state=state(3), step=3, rng=False, root=root)
    out = tmp_path / "exports" / "out.pt"
    out.parent.mkdir()
    out.write_bytes(b"an older export")
    code, stdout, err = cli("restore", JOB, "-o", out, "--root", root)
    assert code == 0, err
    assert stdout.startswith(f"wrote {out} (torch, ")
    assert_same(torch.load(out, weights_only=True), state(3))
    assert exports(out.parent) == ["out.pt"]  # no tmp file left


def test_export_onto_a_directory_is_an_io_error_and_leaves_it_alone(
    cli: CLI, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    ckptd_client.save(JOB, state=state(3), step=3, rng=False, root=root)
    out = tmp_path / "exports" / "a-directory"
    out.mkdir(parents=True)
    (out / "keep").write_text("untouched")
    for fmt in ("torch", "safetensors"):
        code, stdout, err = cli("restore", JOB, "-o", out, "--format", fmt, "--root", root)
        assert code == EXIT_CODES["StoreIOError"], (fmt, stdout, err)
        assert f"error: cannot write {out}: Is a directory (errno 21)" in err
        assert stdout == ""
        assert exports(out.parent) == ["a-directory"]  # no tmp file left beside it
        assert exports(out) == ["keep"]


def test_safetensors_export_of_two_tensors_on_one_key_path_is_refused(
    cli: CLI, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    clash = {"a.b": torch.ones(2), "a": {"b": torch.zeros(3)}}
    ckptd_client.save(JOB, state=clash, step=1, rng=False, root=root)
    out = tmp_path / "exports" / "out.safetensors"
    out.parent.mkdir()
    code, stdout, err = cli("restore", JOB, "-o", out, "--format", "safetensors", "--root", root)
    assert code == EXIT_CODES["CkptdError"], (stdout, err)
    assert "error: two tensors share the key path 'a.b'; export with --format torch" in err
    assert exports(out.parent) == []
    # The suggested format works.
    code, _, err = cli("restore", JOB, "-o", out.with_suffix(".pt"), "--root", root)
    assert code == 0, err
    assert_same(torch.load(out.with_suffix(".pt"), weights_only=True), clash)


def test_safetensors_export_without_the_package_says_what_to_install(
    cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    ckptd_client.save(JOB, state=state(1), step=1, rng=False, root=root)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors... fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    out = tmp_path / "exports" / "out.safetensors"
    out.parent.mkdir()
    code, stdout, err = cli("restore", JOB, "-o", out, "--format", "safetensors", "--root", root)
    assert code == EXIT_CODES["CkptdError"], (stdout, err)
    assert (
        "error: --format safetensors needs the safetensors package: pip install "
        "'ckptd[safetensors]'" in err
    )
    assert exports(out.parent) == []


def test_export_file_rejects_an_unknown_format_before_writing(tmp_path: Path) -> None:
    """The CLI's --format choice is checked by click (test_cli); the function checks too."""
    root = tmp_path / "root"
    ckptd_client.save(JOB, state=state(1), step=1, rng=False, root=root)
    loaded = load_checkpoint(Store(root), JOB, 1)
    out = tmp_path / "exports" / "out.zip"
    out.parent.mkdir()
    with pytest.raises(ValueError, match=r"^unknown export format 'zip'$"):
        export_file(loaded, out, "zip")
    assert exports(out.parent) == []
