"""Regression tests of the integrity review: slot ownership across timeouts and ``prepare()``,
replies matched to requests, a client that checks whom it talks to, the disk guard on an empty
job, bounded daemon resources, handles that always resolve, a loop that never waits on the
filesystem, and ``restore()`` that sees the job's in-flight snapshots.

Every test here failed on the code before the fix (the docstrings say how). Real daemons, real
sockets, real signals; the fake servers are real processes (one of them runs as another uid).
Tests that leave a daemon as they found it share one per configuration for the module
(``shared_daemon``, ``slow_daemon``), each with jobs of its own; a SIGSTOPped daemon is always
continued (``stopped``).
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd_client
from ckptd.cli.main import main as cli_main
from ckptd.errors import (
    DaemonUnavailableError,
    DiskFullError,
    ProtocolError,
    SnapshotUnconfirmedError,
    UntrustedDaemonError,
)
from ckptd.format.restore import verify_manifest
from ckptd.format.store import Store
from ckptd.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    close_fds,
    encode_message,
    recv_message,
    send_message,
)
from ckptd_client import Client
from tests._requirements import require
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import (
    Daemon,
    DaemonFactory,
    assert_same,
    make_state,
    query,
    short_tmp,
    wait_until,
)

ckptd_env = daemon_fixtures.ckptd_env
daemons = daemon_fixtures.daemons
shared_daemon = daemon_fixtures.shared_daemon

pytestmark = pytest.mark.usefixtures("ckptd_env")

NOBODY = 65534
# A daemon whose writes take long enough to observe: one write thread, zstd everywhere.
SLOW = '[store]\nthreads = 1\n[codec]\ncodec = "zstd"\nlevel = 3\n'
# A disk guard that refuses every snapshot (no disk has 1000 TiB free), with a retention policy
# for it to apply first.
FULL = '[disk]\nmin_free_bytes = "1000TiB"\n[retention]\nkeep_last = 2\n'
# Two connections and two slots per uid.
CAPPED = "[daemon]\nmax_clients_per_uid = 2\nmax_slots_per_uid = 2\n"


def connect(d: Daemon, job: str, **kwargs: Any) -> Client:
    kwargs.setdefault("spawn", False)
    return Client(job, socket=d.socket, root=d.root, **kwargs)


def verify_all(store: Store, job: str) -> list[int]:
    """Every visible checkpoint of ``job`` verifies; returns the steps."""
    steps = store.steps(job)
    for step in steps:
        problems = verify_manifest(store, store.read_manifest(job, step))
        assert problems == [], f"{job} step {step}: {problems}"
    return steps


def error_of(handle: Any) -> BaseException | None:
    """``handle.error`` read afresh (mypy would narrow it across the calls that change it)."""
    error: BaseException | None = handle.error
    return error


@pytest.fixture(scope="module")
def slow_daemon() -> Iterator[Daemon]:
    """One daemon with the ``SLOW`` configuration for the module."""
    with daemon_fixtures.daemon_factory() as factory:
        yield factory.start(config=SLOW)


@pytest.fixture(scope="module")
def full_daemon() -> Iterator[Daemon]:
    """One daemon with the ``FULL`` configuration for the module."""
    with daemon_fixtures.daemon_factory() as factory:
        yield factory.start(config=FULL)


@pytest.fixture(scope="module")
def capped_daemon() -> Iterator[Daemon]:
    """One daemon with the ``CAPPED`` configuration for the module."""
    with daemon_fixtures.daemon_factory() as factory:
        yield factory.start(config=CAPPED)


@pytest.fixture
def stopped() -> Iterator[list[int]]:
    """pids the test SIGSTOPs; every one is continued again, whatever the test did."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


# ---- 1. a timeout drops the link and its slots ----------------------------------------------


def test_a_timed_out_submit_never_lets_its_slot_be_refilled(
    slow_daemon: Daemon, stopped: list[int]
) -> None:
    """SIGSTOP the daemon so ``submit`` times out. Before the fix the client marked the slot
    free and kept the connection: the stale ``accepted`` answered the next submit, and step 2
    committed holding step 3's tensors (or, with one slot, the next snapshot blocked forever)."""
    d = slow_daemon
    store = Store(d.root)
    states = {step: make_state(700 + step, 24) for step in (1, 2, 3)}
    client = connect(d, "stale", slots=1, timeout_s=1.0)
    try:
        client.snapshot(state=states[1], step=1).wait(60)
        os.kill(d.pid, signal.SIGSTOP)
        stopped.append(d.pid)
        second = client.snapshot(state=states[2], step=2)
        assert second.done()
        assert isinstance(second.error, SnapshotUnconfirmedError), second.error
        assert "did not answer 'submit' within 1.0 s" in str(second.error)
        assert "may or may not commit it" in str(second.error)
        os.kill(d.pid, signal.SIGCONT)
        third = client.snapshot(state=states[3], step=3)  # reconnects with a fresh slot
        assert third.error is None, third.error
        assert third.wait(60).step == 3
    finally:
        client.close()
    d.wait_idle()
    steps = verify_all(store, "stale")
    assert {1, 3} <= set(steps) <= {1, 2, 3}
    for step in steps:  # whatever committed holds exactly what was handed over at that step
        got = ckptd_client.load("stale", step=step, root=d.root)
        assert_same(got, states[step], f"step {step}")


def test_a_blocked_snapshot_gives_up_on_a_hung_daemon(
    slow_daemon: Daemon, stopped: list[int]
) -> None:
    """``on_full="block"`` waits as long as the daemon is alive, but a hung (stopped) daemon that
    holds every slot is asked for its status every ``timeout_s``; with no answer the snapshot
    fails instead of stalling training forever (it used to wait until the daemon came back)."""
    d = slow_daemon
    client = connect(d, "hung", slots=1, on_full="block", timeout_s=1.0)
    try:
        first = client.snapshot(state=make_state(1201, 64), step=1)
        assert first.error is None
        os.kill(d.pid, signal.SIGSTOP)
        stopped.append(d.pid)
        second = client.snapshot(state=make_state(1202, 64), step=2)
        assert isinstance(second.error, DaemonUnavailableError), second.error
        assert "did not answer" in str(second.error)
        # Step 1 is unconfirmed, unless it committed before the daemon was stopped.
        assert first.done()
        assert error_of(first) is None or isinstance(error_of(first), SnapshotUnconfirmedError)
        os.kill(d.pid, signal.SIGCONT)
        third = client.snapshot(state=make_state(1203, 1), step=3)
        assert third.wait(60).step == 3
    finally:
        client.close()
    d.wait_idle()
    assert {1, 3} <= set(verify_all(Store(d.root), "hung"))


def test_replies_are_matched_by_id_and_a_stray_reply_breaks_the_link(tmp_path: Path) -> None:
    """A server that answers ``hello`` with a reply to another request id (a stale reply) is
    not believed: the client drops the connection instead of taking it as its answer. Before
    the fix replies were taken first-in first-out, whatever they answered."""
    sock_path = short_tmp() / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(sock_path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            msg, fds = recv_message(conn)
            close_fds(fds)
            assert msg is not None and isinstance(msg["id"], int)
            welcome = {"op": "welcome", "version": PROTOCOL_VERSION, "root": "/elsewhere"}
            send_message(conn, {**welcome, "id": msg["id"] + 1000})
            conn.recv(1)  # until the client hangs up

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        with pytest.raises(DaemonUnavailableError, match="a reply to no request"):
            Client("stray", socket=sock_path, root=tmp_path, spawn=False, timeout_s=10)
        server.join(10)
        assert not server.is_alive()
    finally:
        listener.close()
        shutil.rmtree(sock_path.parent)


# ---- 2. prepare() never frees a slot the daemon holds ---------------------------------------


def test_prepare_leaves_slots_the_daemon_still_reads(slow_daemon: Daemon) -> None:
    """With ``on_full="skip"``, ``prepare()`` used to clear ``busy`` on every slot, so the next
    snapshot overwrote the one being written: step 1 committed but failed restore."""
    d = slow_daemon
    first, second = make_state(801, 64), make_state(802, 64)
    client = connect(d, "prep", slots=1, on_full="skip")
    try:
        h1 = client.snapshot(state=first, step=1)
        assert h1.error is None
        client.prepare(state=first, background=False)
        h2 = client.snapshot(state=second, step=2)
        if not h2.skipped:  # only if the daemon had released step 1's slot meanwhile
            h2.wait(60)
        h1.wait(60)
    finally:
        client.close()
    assert verify_all(Store(d.root), "prep")[0] == 1
    assert_same(ckptd_client.load("prep", step=1, root=d.root), first)


# ---- 4. the client checks whom it talks to --------------------------------------------------

FAKE_SERVER = textwrap.dedent(
    """
    import json, os, socket, sys
    path, record = sys.argv[1], sys.argv[2]
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    os.chmod(path, 0o777)
    srv.listen(4)
    open(record + ".ready", "w").close()
    while True:
        conn, _ = srv.accept()
        while True:
            data, anc, _f, _a = conn.recvmsg(65536, 1024)
            if not data:
                break
            msg = json.loads(data)
            with open(record, "a") as f:
                f.write(json.dumps({"op": msg["op"], "fds": len(anc)}) + "\\n")
            reply = {"op": "welcome", "version": msg.get("version"), "root": "/tmp/evil"}
            if msg["op"] == "register":
                reply = {"op": "registered", "slot": msg["slot"]}
            conn.send(json.dumps({**reply, "id": msg.get("id")}).encode())
        conn.close()
    """
)


def as_nobody() -> list[str]:
    require(os.getuid() == 0, "running as root (to start a fake server as uid 65534)")
    setpriv = shutil.which("setpriv")
    require(setpriv is not None, "setpriv (util-linux) is installed")
    assert setpriv is not None
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def test_a_server_of_another_uid_gets_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fake server of another uid on a socket the client was pointed at: before the fix it
    received the memfd with the tensors, answered ``committed`` and redirected ``client.root``."""
    prefix = as_nobody()
    base = short_tmp()
    try:
        evil = base / "evil"
        evil.mkdir(mode=0o777)
        os.chown(evil, NOBODY, NOBODY)
        evil.chmod(0o777)
        record = evil / "record"
        server = subprocess.Popen(
            [*prefix, "/usr/bin/python3", "-c", FAKE_SERVER, str(evil / "s.sock"), str(record)],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            ready = evil / "record.ready"
            wait_until(ready.exists, 30, "the fake server")
            with pytest.raises(UntrustedDaemonError) as info:
                Client("victim", socket=evil / "s.sock", root=tmp_path, spawn=False)
            assert f"runs as uid {NOBODY}" in str(info.value)
            assert "refusing to hand it any state" in str(info.value)
            # Nor is it asked where the checkpoints are, or for its status or pid.
            monkeypatch.setenv("CKPTD_SOCKET", str(evil / "s.sock"))
            monkeypatch.delenv("CKPTD_ROOT", raising=False)
            with pytest.raises(UntrustedDaemonError, match=f"runs as uid {NOBODY}"):
                ckptd_client.list_checkpoints()
            for args in (["status"], ["stop", "--wait"]):
                with pytest.raises(SystemExit) as exited:
                    cli_main([*args, "--socket", str(evil / "s.sock")])
                assert exited.value.code == UntrustedDaemonError.exit_code
                assert f"runs as uid {NOBODY}" in " ".join(capsys.readouterr().err.split())
            seen = record.read_text() if record.exists() else ""
            assert seen == "", f"the fake server received: {seen}"
        finally:
            server.kill()
            server.wait(10)
    finally:
        shutil.rmtree(base)


def test_a_runtime_dir_of_another_user_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no XDG_RUNTIME_DIR the socket falls back to ``<tmp>/ckptd-<uid>``. Another user who
    created that directory first must not get the daemon's log, socket or the client's state:
    before the fix the client used it as it was (and spawned a daemon logging into it)."""
    as_nobody()
    tmp = short_tmp()
    try:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.setenv("TMPDIR", str(tmp))
        squatted = tmp / f"ckptd-{os.getuid()}"
        squatted.mkdir()
        os.chown(squatted, NOBODY, NOBODY)
        squatted.chmod(0o777)
        with pytest.raises(UntrustedDaemonError) as info:
            Client("squat", root=tmp / "root")
        assert f"{squatted} belongs to uid {NOBODY}" in str(info.value)
        assert list(squatted.iterdir()) == []
        assert squatted.stat().st_mode & 0o777 == 0o777
    finally:
        shutil.rmtree(tmp)


def test_a_symlinked_log_or_socket_dir_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spawned daemon's log is never opened through a symlink (before the fix, the client
    appended the daemon's output to whatever file the link named), and a socket directory that
    is a symlink, or writable by others, is refused."""
    base = short_tmp()
    try:
        victim = base / "victim.txt"
        victim.write_text("precious\n")
        run = base / "run"
        run.mkdir(mode=0o700)
        (run / "ckptd.log").symlink_to(victim)
        with pytest.raises(UntrustedDaemonError, match="not a symlink"):
            Client("link", socket=run / "d.sock", root=base / "root", spawn=True)
        assert victim.read_text() == "precious\n"

        (base / "elsewhere").mkdir(mode=0o700)
        (base / "linked").symlink_to(base / "elsewhere")
        with pytest.raises(UntrustedDaemonError, match="is a symlink"):
            Client("link", socket=base / "linked" / "d.sock", root=base / "root", spawn=True)
        (base / "open").mkdir()
        (base / "open").chmod(0o777)
        with pytest.raises(UntrustedDaemonError, match=r"writable by others \(mode 0777\)"):
            Client("link", socket=base / "open" / "d.sock", root=base / "root", spawn=True)
        assert not daemon_fixtures.processes_mentioning(str(base))
    finally:
        shutil.rmtree(base)


# ---- 5. the disk guard and a job with no checkpoints ----------------------------------------


def test_the_disk_guard_with_a_job_that_has_no_checkpoints(full_daemon: Daemon) -> None:
    """A brand-new job on the filesystem made the guard call ``max()`` on nothing: every submit
    that reached it got "the daemon could not handle this message" and no space was freed."""
    d = full_daemon
    root = d.root
    model = torch.nn.Linear(4, 4)
    for step in range(1, 5):
        ckptd_client.save("old", state={"w": model.weight.detach() * step}, step=step, root=root)
    with connect(d, "fresh") as client:
        handle = client.snapshot(state={"w": torch.ones(8)}, step=1)
        with pytest.raises(DiskFullError, match="not enough space for a snapshot"):
            handle.wait(30)
        assert "retention freed" in str(handle.error)
        again = client.snapshot(state={"w": torch.ones(8)}, step=2)  # still connected
        assert isinstance(again.error, DiskFullError), again.error
    assert Store(root).steps("old") == [3, 4]  # policy deletions happened; the newest stayed
    assert Store(root).steps("fresh") == []


# ---- 7. bounded daemon resources ------------------------------------------------------------


def test_a_client_that_never_reads_is_disconnected(shared_daemon: Daemon) -> None:
    """Before the fix the reply queue had no bound: a client that never read grew the daemon by
    45 MiB with 80k requests."""
    daemon = shared_daemon
    status = encode_message({"op": "status"})
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(daemon.socket))
        sock.settimeout(0.2)
        sent = 0
        disconnected = False
        for _ in range(20_000):
            try:
                sock.send(status)
                sent += 1
            except TimeoutError:
                time.sleep(0.01)  # the daemon reads as fast as it can; let it catch up
            except (BrokenPipeError, ConnectionResetError):
                disconnected = True
                break
        assert disconnected, f"still connected after {sent} unread requests"
    assert "left 1024 messages unread" in daemon.log_text()
    assert query(daemon.socket)["op"] == "status"  # everyone else is still served


def test_accept_backs_off_when_out_of_descriptors(shared_daemon: Daemon) -> None:
    """``accept()`` failing with EMFILE made the loop spin and log about 2 MB/s."""
    daemon = shared_daemon
    require(os.getuid() == 0, "running as root (to lower the daemon's open-file limit)")
    # An answer means startup is over (the socket accepts connections into its backlog before
    # the daemon has opened everything it needs, e.g. the config watcher's inotify descriptors).
    assert query(daemon.socket)["op"] == "status"
    open_fds = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    soft, hard = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (open_fds + 2, hard))
    held = []
    try:
        for _ in range(6):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(str(daemon.socket))  # queued in the backlog once accept() fails
            held.append(s)

        def refused() -> bool:
            return "cannot accept connections" in daemon.log_text()

        wait_until(refused, 30, "EMFILE")
        time.sleep(2.0)  # long enough for a spinning loop to log thousands of lines
        lines = daemon.log_text().count("cannot accept connections")
        assert lines <= 8, f"{lines} accept errors logged in about 2 s"
    finally:
        for s in held:
            s.close()
    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (soft, hard))
    wait_until(lambda: _answers(daemon.socket), 30, "the daemon to accept again")


def _answers(path: Path) -> bool:
    try:
        return bool(query(path, timeout_s=2)["op"] == "status")
    except (OSError, AssertionError):
        return False


def test_connections_per_uid_are_capped(capped_daemon: Daemon) -> None:
    d = capped_daemon
    a, b = connect(d, "cap1"), connect(d, "cap2")
    try:
        with pytest.raises(Exception, match=r"daemon\.max_clients_per_uid") as info:
            connect(d, "cap3")
        assert "already has 2 connections" in str(info.value)
    finally:
        a.close()
        b.close()
    connect(d, "cap3").close()  # room again


def _raw_hello(path: Path, root: Path, job: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(30)
    sock.connect(str(path))
    hello = {"op": "hello", "id": 1, "version": PROTOCOL_VERSION, "job": job, "root": str(root)}
    send_message(sock, hello)
    reply, fds = recv_message(sock)
    close_fds(fds)
    assert reply is not None and reply["op"] == "welcome" and reply["id"] == 1, reply
    return sock


def test_a_sparse_terabyte_slot_is_refused(shared_daemon: Daemon) -> None:
    """A sealed, sparse memfd of 1 TiB was accepted as a slot."""
    daemon = shared_daemon
    fd = os.memfd_create("huge", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 1 << 40)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        with _raw_hello(daemon.socket, daemon.root, "huge") as sock:
            send_message(sock, {"op": "register", "id": 2, "slot": 0, "size": 1 << 40}, [fd])
            reply, fds = recv_message(sock)
            close_fds(fds)
        assert reply is not None and reply["op"] == "error" and reply["id"] == 2, reply
        assert reply["type"] == "ProtocolError"
        assert "larger than this daemon accepts" in reply["message"]
        assert "daemon.max_slot_bytes" in reply["message"]
    finally:
        os.close(fd)
    assert query(daemon.socket)["op"] == "status"


def test_slots_per_uid_are_capped(capped_daemon: Daemon) -> None:
    d = capped_daemon
    reply: dict[str, Any] | None = None
    with _raw_hello(d.socket, d.root, "slots") as sock:
        for slot in range(3):
            fd = os.memfd_create("s", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, mmap.PAGESIZE)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            msg = {"op": "register", "id": 10 + slot, "slot": slot, "size": mmap.PAGESIZE}
            send_message(sock, msg, [fd])
            os.close(fd)
            reply, fds = recv_message(sock)
            close_fds(fds)
            assert reply is not None
            if slot < 2:
                assert reply["op"] == "registered", reply
        assert reply is not None and reply["op"] == "error", reply
        assert "daemon.max_slots_per_uid" in reply["message"]


def test_status_stays_bounded_with_many_jobs(daemons: DaemonFactory) -> None:
    """``status`` broke for good after a few hundred jobs (650 in the review, fewer with long
    names): ``last_commit`` was never pruned and the reply outgrew the 64 KiB message limit.
    ``status`` with a job narrows it to that job. 240 jobs: more than the daemon remembers
    (4 x ``MAX_STATUS_COMMITS``), so its own pruning runs too."""
    d = daemons.start()
    jobs = [f"j{i:04d}-" + "x" * 110 for i in range(240)]
    code = textwrap.dedent(
        """
        import sys, torch
        from ckptd_client import Client
        sock, root, *jobs = sys.argv[1:]
        for job in jobs:
            with Client(job, socket=sock, root=root, spawn=False) as c:
                c.snapshot(state={"w": torch.zeros(1)}, step=1).wait(60)
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(d.socket), str(d.root), *jobs[i::2]],
            env=daemons.env,
            stdin=subprocess.DEVNULL,
        )
        for i in range(2)
    ]
    for p in procs:
        assert p.wait(600) == 0
    status = d.status()
    assert status["commits"] == len(jobs)
    assert len(status["last_commit"]) == 50
    assert len(json.dumps(status)) < MAX_MESSAGE_BYTES // 2
    narrowed = query_status_job(d.socket, jobs[-1])
    assert [c["job"] for c in narrowed["last_commit"]] == [jobs[-1]]


def query_status_job(path: Path, job: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        send_message(sock, {"op": "status", "id": 5, "job": job})
        reply, fds = recv_message(sock)
        close_fds(fds)
    assert reply is not None and reply["op"] == "status" and reply["id"] == 5
    return reply


# ---- 8. every handle resolves after close() -------------------------------------------------


def test_close_without_waiting_resolves_every_handle(slow_daemon: Daemon) -> None:
    """After ``close(timeout=0)`` the checkpoint committed on disk, but its handle never
    resolved: ``wait()`` without a timeout blocked forever."""
    d = slow_daemon
    commits = d.wait_idle()["commits"]
    client = connect(d, "closing")
    handle = client.snapshot(state=make_state(901, 48), step=1)
    assert handle.error is None
    client.close(timeout=0)
    assert handle.done()
    try:
        handle.wait()
    except SnapshotUnconfirmedError as exc:
        assert "outcome unknown: the client closed before the daemon answered" in str(exc)
    d.wait_idle(commits=commits + 1)
    assert verify_all(Store(d.root), "closing") == [1]


# ---- 9. the loop never waits on the filesystem ----------------------------------------------


def test_a_hello_stuck_on_the_filesystem_does_not_stall_the_daemon(
    shared_daemon: Daemon,
) -> None:
    """``hello`` read and fsynced ``job.json`` on the event loop: a slow filesystem stalled
    every client's replies (and systemd's watchdog). A FIFO as ``job.json`` blocks the read
    until the test writes to it; meanwhile the daemon must keep answering."""
    d = shared_daemon
    job_dir = d.root / "stuck"
    for sub in ("objects", "manifests", "tmp"):
        (job_dir / sub).mkdir(parents=True)
    os.mkfifo(job_dir / "job.json")
    result: dict[str, Any] = {}

    def attach() -> None:
        try:
            result["client"] = connect(d, "stuck", timeout_s=120)
        except Exception as exc:
            result["error"] = exc

    t = threading.Thread(target=attach)
    t.start()
    try:
        time.sleep(0.5)  # the hello is now blocked in open() of the FIFO, on some thread
        assert query(d.socket, timeout_s=5)["op"] == "status"
        with connect(d, "other", timeout_s=10) as other:
            other.snapshot(state={"w": torch.ones(3)}, step=1).wait(30)
    finally:
        with (job_dir / "job.json").open("w") as fifo:
            fifo.write("{}")
        t.join(60)
    assert "error" not in result, result
    result["client"].close()
    (job_dir / "job.json").unlink()  # no FIFO left for the next test of this daemon to open


def test_an_admission_stuck_on_the_filesystem_does_not_stall_the_daemon(
    full_daemon: Daemon,
) -> None:
    """The disk guard read every job's retention (``job.json``) on the event loop while deciding
    whether a snapshot fits. Here it blocks on a FIFO; status and other clients go on."""
    d = full_daemon
    root = d.root
    ckptd_client.save("blocker", state={"w": torch.ones(2)}, step=1, root=root)
    with connect(d, "guarded", timeout_s=120) as client:
        (root / "blocker" / "job.json").unlink(missing_ok=True)
        os.mkfifo(root / "blocker" / "job.json")
        handles: list[Any] = []
        t = threading.Thread(
            target=lambda: handles.append(client.snapshot(state={"w": torch.ones(2)}, step=1))
        )
        t.start()
        try:
            time.sleep(0.5)
            assert t.is_alive()  # the admission waits on the FIFO
            assert query(d.socket, timeout_s=5)["op"] == "status"
        finally:
            with (root / "blocker" / "job.json").open("w") as fifo:
                fifo.write("{}")
            t.join(60)
        with pytest.raises(DiskFullError):
            handles[0].wait(30)
    (root / "blocker" / "job.json").unlink()  # no FIFO left for a later guard to open


# ---- 10. restore() waits for the job's in-flight snapshots ----------------------------------


def big_model(seed: int) -> torch.nn.Linear:
    """64 MiB of random parameters (they compress poorly): long enough to write (zstd on one
    thread) that a test can act while it is written."""
    torch.manual_seed(seed)
    return torch.nn.Linear(4096, 4096)


def test_restore_waits_for_what_the_daemon_still_commits(slow_daemon: Daemon) -> None:
    """After a trainer handed off a snapshot and died, a new trainer's ``restore()`` ran while
    the daemon was still committing it: training resumed from an older step."""
    d = slow_daemon
    model = big_model(1)
    first = connect(d, "resume")
    first.snapshot(model, step=1).wait(120)
    with torch.no_grad():
        model.weight.add_(1.0)
    handle = first.snapshot(model, step=2)
    assert handle.error is None
    first.close(timeout=0)  # the trainer is gone; the daemon owns step 2
    resumed = big_model(2)
    with connect(d, "resume") as second:
        extra = second.restore(resumed, wait_s=120)
    assert extra["__step__"] == 2
    assert torch.equal(resumed.weight, model.weight)


def test_restore_names_the_steps_still_pending_after_its_wait(slow_daemon: Daemon) -> None:
    d = slow_daemon
    first = connect(d, "late")
    first.snapshot(big_model(3), step=7)
    first.close(timeout=0)
    with connect(d, "late") as second:
        with pytest.raises(TimeoutError, match=r"still committing late step\(s\) \[7\]"):
            second.wait_for_daemon(timeout_s=0.0)
        second.wait_for_daemon(timeout_s=120)
    assert Store(d.root).steps("late") == [7]


def test_drain_of_a_closed_protocol_error(shared_daemon: Daemon) -> None:
    """``drain`` before ``hello`` is a protocol error, answered to its request id."""
    daemon = shared_daemon
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        send_message(sock, {"op": "drain", "id": 3, "timeout_s": 1})
        reply, fds = recv_message(sock)
        close_fds(fds)
    assert reply is not None and reply["id"] == 3 and reply["type"] == ProtocolError.__name__
    assert "send hello first" in reply["message"]
