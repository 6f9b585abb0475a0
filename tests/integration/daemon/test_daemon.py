"""The ckptd daemon and its client, end to end: real ``ckptd start`` processes, real Unix
SEQPACKET sockets, memfd slots, signals, SIGKILLed trainers and daemons.

Every daemon runs in its own short ``/tmp/ckXXXXXXXX`` directory (see ``daemon_fixtures``); the
fixtures stop it afterwards and fail the test if any daemon or trainer process survives. Tests
that neither stop, kill, reconfigure nor count the whole daemon share one for the module
(``shared_daemon``), each with jobs of its own; the others start their own.
"""

from __future__ import annotations

import copy
import fcntl
import grp
import json
import mmap
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd_client
from ckptd.errors import (
    DaemonUnavailableError,
    SnapshotSkippedError,
    StorePermissionError,
)
from ckptd.format.restore import load_checkpoint, verify_manifest
from ckptd.format.skeleton import flatten
from ckptd.format.store import Store
from ckptd.protocol import (
    PROTOCOL_VERSION,
    LayoutEntry,
    close_fds,
    encode_layout,
    recv_message,
    send_message,
)
from ckptd_client import Client, spawn
from tests import _other_uid
from tests.conftest import trained
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import (
    CKPTD,
    REPO,
    Daemon,
    DaemonFactory,
    assert_same,
    clean_env,
    cli_status_json,
    fd_count,
    fd_targets,
    make_state,
    memfd_maps,
    pid_alive,
    processes_mentioning,
    query,
    run_ckptd,
    status_json,
    wait_until,
)

# The fixtures, registered in this module under their own names.
ckptd_env = daemon_fixtures.ckptd_env
daemons = daemon_fixtures.daemons
daemon = daemon_fixtures.daemon
shared_daemon = daemon_fixtures.shared_daemon

pytestmark = pytest.mark.usefixtures("ckptd_env")

NOBODY = 65534


def connect(daemon: Daemon, job: str, **kwargs: Any) -> Client:
    """A client of ``daemon`` that never spawns a daemon of its own."""
    kwargs.setdefault("spawn", False)
    return Client(job, socket=daemon.socket, root=daemon.root, **kwargs)


def verify_job(store: Store, job: str) -> list[int]:
    """Assert every visible checkpoint of ``job`` verifies; return its steps."""
    steps = store.steps(job)
    for step in steps:
        manifest = store.read_manifest(job, step)
        assert manifest.job == job and manifest.step == step
        assert verify_manifest(store, manifest) == [], f"{job} step {step} does not verify"
    return steps


def run_trainer(code: str, *args: object, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start a trainer subprocess running ``code`` (importing from the repo)."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout_s: float = 120.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, out, err


# ---- 1. round trip ------------------------------------------------------------------------------


def test_round_trip_model_optimizer_scheduler_is_bit_identical(shared_daemon: Daemon) -> None:
    daemon = shared_daemon
    model, opt, sched = trained(steps=3, seed=1)
    expected_rng = ckptd_client.rng_state()
    with connect(daemon, "rt", strict=True) as client:
        handle = client.snapshot(
            model, opt, step=3, scheduler=sched, extra={"epoch": 2, "tag": "x"}, metric=0.25
        )
        info = handle.wait(timeout=60)
        listed = client.list()
    assert handle.done() and not handle.skipped and handle.error is None
    assert handle.stall_s > 0

    store = Store(daemon.root)
    assert info.job == "rt" and info.step == 3
    assert info.raw_bytes > 0 and info.stored_bytes > 0
    assert info.written_bytes > 0  # a first checkpoint writes new objects
    assert info.persist_s >= 0 and info.stall_s >= 0
    assert Path(info.path) == store.manifest_path("rt", 3) and Path(info.path).is_file()
    manifest = store.read_manifest("rt", 3)
    assert manifest.raw_bytes == info.raw_bytes and manifest.stored_bytes == info.stored_bytes
    assert manifest.metric == 0.25
    assert [m.step for m in listed] == [3]
    assert verify_manifest(store, manifest) == []

    state = ckptd_client.load("rt", 3, root=daemon.root)
    assert list(state) == ["model", "optimizer", "scheduler", "rng", "extra"]
    assert_same(state["model"], model.state_dict(), "model")
    assert_same(state["optimizer"], opt.state_dict(), "optimizer")
    assert_same(state["scheduler"], sched.state_dict(), "scheduler")
    assert_same(state["rng"], expected_rng, "rng")
    assert state["extra"] == {"epoch": 2, "tag": "x"}

    fresh, fresh_opt, fresh_sched = trained(steps=0, seed=99)
    extra = ckptd_client.restore(
        fresh, fresh_opt, job="rt", scheduler=fresh_sched, root=daemon.root
    )
    assert extra == {"epoch": 2, "tag": "x", "__step__": 3}
    assert_same(fresh.state_dict(), model.state_dict(), "restored model")
    assert_same(fresh_opt.state_dict(), opt.state_dict(), "restored optimizer")
    assert_same(fresh_sched.state_dict(), sched.state_dict(), "restored scheduler")


# ---- 2. staging contract ------------------------------------------------------------------------


def test_tensors_mutated_right_after_snapshot_returns_do_not_leak_into_the_checkpoint(
    shared_daemon: Daemon,
) -> None:
    daemon = shared_daemon
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 1024), torch.nn.BatchNorm1d(1024), torch.nn.Linear(1024, 512)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, 1024)).square().mean().backward()
    opt.step()
    expected = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})

    with connect(daemon, "staging", strict=True) as client:
        handle = client.snapshot(model, opt, step=1, rng=False)
        with torch.no_grad():  # the very next statement after snapshot() returns
            for t in model.state_dict().values():
                t.add_(1)
            for per_param in opt.state.values():
                for value in per_param.values():
                    if isinstance(value, torch.Tensor):
                        value.add_(1)
        mutated_while_pending = not handle.done()
        handle.wait(timeout=60)

    state = ckptd_client.load("staging", 1, root=daemon.root)
    assert_same(state["model"], expected["model"], "model")
    assert_same(state["optimizer"], expected["optimizer"], "optimizer")
    now = model.state_dict()["0.weight"]
    assert not torch.equal(state["model"]["0.weight"], now)  # the mutation did happen
    assert torch.equal(state["model"]["0.weight"] + 1, now)
    # ~8 MB takes the daemon a while: the mutation raced a write that was still in progress.
    assert mutated_while_pending


def test_one_slot_reused_for_states_whose_layout_changes(shared_daemon: Daemon) -> None:
    """The client caches typed views into a slot by (offset, dtype, shape): every snapshot of a
    state whose tensors change dtype or shape at the same offsets must still come back exact."""
    daemon = shared_daemon
    states: list[dict[str, Any]] = [
        {"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(8, 8)},
        {"a": torch.arange(64, dtype=torch.int32), "b": torch.ones(8, 8)},  # dtype at offset 0
        {"a": torch.arange(64, dtype=torch.float32).view(8, 8), "b": torch.ones(8, 8)},  # shape
        {"a": torch.arange(32, dtype=torch.float64), "b": torch.full((4, 16), 2.0)},
        {"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(8, 8)},  # back to the first
    ]
    with connect(daemon, "relayout", slots=1, strict=True) as client:
        for step, state in enumerate(states):
            client.snapshot(state=state, step=step, rng=False).wait(timeout=60)
    for step, state in enumerate(states):
        got = ckptd_client.load("relayout", step, root=daemon.root)
        assert_same(got, state, f"step {step}")


def thread_nices(pid: int) -> dict[int, int]:
    """tid -> nice value of every thread of ``pid`` (field 19 of /proc/PID/task/TID/stat)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue  # the thread ended
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        out[int(task.name)] = int(fields[16])
    return out


@pytest.mark.parametrize("nice", [10, 0])
def test_write_threads_run_below_the_control_plane(daemons: DaemonFactory, nice: int) -> None:
    daemon = daemons.start(config=f"[daemon]\nworker_nice = {nice}\n[store]\nthreads = 3\n")
    with connect(daemon, "nice", strict=True) as client:
        # 40 MiB: five 8 MiB chunks, so every one of the 3 write threads gets started.
        client.snapshot(state=make_state(1, 40), step=1, rng=False).wait(timeout=60)
        nices = thread_nices(daemon.pid)
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the daemon inherits the test's nice value
    assert nices[daemon.pid] == base  # the main thread: the control plane, accepting snapshots
    lowered = min(19, base + nice)
    assert sorted(nices.values()).count(lowered) >= (3 if nice else len(nices))
    if nice and lowered != base:
        assert set(nices.values()) == {base, lowered}
    assert ckptd_client.load("nice", 1, root=daemon.root)["meta"]["seed"] == 1


# ---- 3. a trainer SIGKILLed right after snapshot() ---------------------------------------------

CRASHING_TRAINER = """
import os, signal, sys
from ckptd_client import Client
from tests.integration.daemon_fixtures import make_state

sock, root, job, seed, mbytes, step = sys.argv[1:7]
state = make_state(int(seed), float(mbytes))
client = Client(job, socket=sock, root=root, spawn=False, strict=True)
handle = client.snapshot(state=state, step=int(step))
print(f"accepted step {step} stall {handle.stall_s:.3f}", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_snapshot_survives_its_trainer_being_sigkilled(
    shared_daemon: Daemon, daemons: DaemonFactory
) -> None:
    daemon = shared_daemon
    before = daemon.wait_idle()
    log_start = len(daemon.log_text())
    proc = run_trainer(
        CRASHING_TRAINER, daemon.socket, daemon.root, "crash", 7, 64, 42, env=daemons.env
    )
    code, out, err = finish(proc)
    assert code == -signal.SIGKILL, (out, err)
    assert "accepted step 42" in out

    st = daemon.wait_idle(commits=before["commits"] + 1, timeout_s=120)
    assert st["commits"] == before["commits"] + 1 and st["failures"] == before["failures"]
    assert st["clients"] == []
    store = Store(daemon.root)
    assert verify_job(store, "crash") == [42]
    loaded = load_checkpoint(store, "crash", 42)
    assert_same(loaded.state, make_state(7, 64))
    assert loaded.manifest.raw_bytes >= 64 << 20
    # The premise: the daemon saw the trainer go away before the checkpoint was durable.
    log = daemon.log_text()[log_start:]
    assert log.index("crash (pid") < log.index("disconnected") < log.index("step 42 committed")


# ---- 4. drain on SIGTERM ------------------------------------------------------------------------


def test_sigterm_drains_every_accepted_snapshot_and_exits_zero(daemon: Daemon) -> None:
    states = {(c, s): make_state(100 * c + s, 32) for c in range(3) for s in (1, 2)}
    clients = [connect(daemon, f"drain{c}", slots=2, strict=True) for c in range(3)]
    late = connect(daemon, "late")
    try:
        handles = {
            (c, s): clients[c].snapshot(state=states[c, s], step=s)
            for c in range(3)
            for s in (1, 2)
        }
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: daemon.status()["stopping"], 10, "the daemon to start draining")
        st = daemon.status()
        assert st["queue"] + (st["writing"] is not None) >= 1, st  # still draining
        refused = late.snapshot(state={"w": torch.ones(3)}, step=1)
        assert daemon.proc.wait(60) == 0, daemon.log_text()
        for (c, s), handle in handles.items():
            info = handle.wait(timeout=10)
            assert (info.job, info.step) == (f"drain{c}", s)
    finally:
        for client in [*clients, late]:
            client.close()

    assert refused.done() and isinstance(refused.error, DaemonUnavailableError)
    assert "shutting down" in str(refused.error)
    with pytest.raises(DaemonUnavailableError, match="shutting down"):
        refused.wait(0)
    assert not daemon.socket.exists()
    store = Store(daemon.root)
    for c in range(3):
        assert verify_job(store, f"drain{c}") == [1, 2]
        for s in (1, 2):
            assert_same(load_checkpoint(store, f"drain{c}", s).state, states[c, s], f"drain{c}@{s}")
    assert store.steps("late") == []
    assert re.search(r"draining [1-6] queued snapshot\(s\): received SIGTERM", daemon.log_text())


# ---- 5. SIGKILL of the daemon mid-write --------------------------------------------------------


def test_daemon_sigkilled_mid_write_then_restarted(daemon: Daemon, daemons: DaemonFactory) -> None:
    store = Store(daemon.root)
    states = [make_state(500 + i, 96) for i in range(3)]
    client = connect(daemon, "killed", slots=3)
    idle = connect(daemon, "bystander")
    try:
        handles = [client.snapshot(state=s, step=i + 1) for i, s in enumerate(states)]
        assert all(h.error is None for h in handles)
        st = daemon.status()
        assert st["writing"] is not None and st["writing"]["job"] == "killed", st
        assert not handles[-1].done()
        daemon.proc.kill()
        assert daemon.proc.wait(10) == -signal.SIGKILL

        lost = 0
        for h in handles:
            try:
                h.wait(timeout=30)
            except DaemonUnavailableError as exc:
                lost += 1
                assert str(daemon.socket) in str(exc)
                assert f"step {h.step}" in str(exc)
        assert lost >= 1
        with pytest.raises(DaemonUnavailableError, match=str(daemon.socket)):
            handles[-1].wait(0)

        # While no daemon runs: snapshot() does not raise (strict=False), the handle carries it.
        down = client.snapshot(state={"w": torch.ones(2)}, step=50)
        assert down.done() and isinstance(down.error, DaemonUnavailableError)
        assert str(daemon.socket) in str(down.error)

        tmp = store.tmp_dir("killed")
        (tmp / "stale-left-by-test").write_bytes(b"stale")
        assert list(tmp.iterdir())
        restarted = daemons.start(socket_path=daemon.socket, root=daemon.root)
        assert list(tmp.iterdir()) == []
        assert "swept" in restarted.log_text()
        visible = verify_job(store, "killed")
        assert set(visible) <= {1, 2, 3}
        for step in visible:
            assert_same(load_checkpoint(store, "killed", step).state, states[step - 1])

        again = client.snapshot(state=states[0], step=60)  # reconnects on the same Client
        assert again.wait(timeout=60).step == 60
        other = idle.snapshot(state={"w": torch.zeros(2)}, step=1)  # link lost, reconnects
        assert other.wait(timeout=60).step == 1
        assert client.stats["failed"] >= 1
    finally:
        client.close()
        idle.close()
    assert restarted.status()["commits"] == 2


LIVE_WRITER = """
import sys
from ckptd.format.hashing import content_hash
from ckptd.format.store import Store

root, job = sys.argv[1:3]
store = Store(root)
store.open_job(job)
data = bytes(range(256)) * 4096
digest = content_hash(data)


def parts():
    yield data[: len(data) // 2]
    print("writing", flush=True)
    sys.stdin.readline()  # hold the object write open until the test says go
    yield data[len(data) // 2 :]


try:
    store.write_object(job, digest, parts())
    print("written", digest, flush=True)
except Exception as exc:
    print("failed", type(exc).__name__, exc, flush=True)
"""


def test_first_client_of_a_job_leaves_a_live_writers_tmp_files_alone(
    shared_daemon: Daemon, daemons: DaemonFactory
) -> None:
    """Another writer of the same job (an in-process ``ckptd_client.save``, a daemon on another
    host of a shared root) is in the middle of an object write when a client attaches to that
    job for the first time in the daemon's life: its tmp file is not a crash leftover."""
    daemon = shared_daemon
    store = Store(daemon.root)
    writer = subprocess.Popen(
        [sys.executable, "-c", LIVE_WRITER, str(daemon.root), "shared"],
        cwd=REPO,
        env=daemons.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().strip() == "writing", writer.stderr
        in_flight = list(store.tmp_dir("shared").iterdir())
        assert len(in_flight) == 1 and in_flight[0].name.endswith(".tmp")
        with connect(daemon, "shared", strict=True) as client:  # first hello for this job
            info = client.snapshot(state={"w": torch.ones(3)}, step=1).wait(timeout=60)
        assert info.step == 1
        writer.stdin.write("go\n")
        writer.stdin.flush()
        out, err = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
    assert writer.returncode == 0, err
    assert out.startswith("written"), f"the live writer's object write broke: {out.strip()}"
    assert store.has_object("shared", out.split()[1])
    assert "swept" not in daemon.log_text()


# ---- 6. no daemon: spawn=False, and the embedded spawn -------------------------------------------


def test_no_daemon_and_spawn_false_names_the_socket(daemons: DaemonFactory) -> None:
    sock = daemons.base / "none" / "x.sock"
    with pytest.raises(DaemonUnavailableError) as info:
        Client("nodaemon", socket=sock, root=daemons.default_root, spawn=False)
    message = str(info.value)
    assert f"no ckptd daemon answers on {sock}" in message
    assert "No such file or directory" in message
    assert "spawn=True" in message
    assert not sock.parent.exists()  # nothing was started


def test_client_spawns_a_detached_daemon_when_none_runs(
    daemons: DaemonFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = daemons.base / "emb" / "s.sock"
    root = daemons.default_root
    with Client("embedded", socket=sock, root=root, spawn=True) as client:
        info = client.snapshot(state={"w": torch.arange(10.0)}, step=4).wait(timeout=60)
        assert info.step == 4
        st = cli_status_json(sock, capsys)
    pid = st["pid"]
    try:
        assert st["socket"] == str(sock) and st["root"] == str(root) and st["mode"] == "user"
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--idle-exit") :][:2] == [b"--idle-exit", b"60"]
        assert os.getsid(pid) == pid != os.getsid(0)  # its own session: detached
        assert (sock.parent / "ckptd.log").is_file()
        assert_same(ckptd_client.load("embedded", 4, root=root), {"w": torch.arange(10.0)})
    finally:
        os.kill(pid, signal.SIGTERM)
        spawned = [p for p in spawn.spawned if p.pid == pid]
        for proc in spawned:
            assert proc.proc.wait(30) == 0
            spawn.spawned.remove(proc)
        wait_until(lambda: not pid_alive(pid), 30, f"spawned daemon {pid} to exit")
    assert len(spawned) == 1
    assert not sock.exists()


def test_a_spawn_that_cannot_start_is_a_daemon_unavailable_error(
    daemons: DaemonFactory,
) -> None:
    blocked = daemons.base / "blocked"
    blocked.write_text("a file where the socket directory should be")
    sock = blocked / "s.sock"
    with pytest.raises(DaemonUnavailableError) as info:
        Client("spawnfail", socket=sock, root=daemons.default_root, spawn=True)
    assert str(sock) in str(info.value)


def test_snapshot_never_raises_when_the_daemon_cannot_be_respawned(
    daemon: Daemon,
) -> None:
    """strict=False: daemon trouble stays on the handle, including a failed re-spawn."""
    client = Client("respawn", socket=daemon.socket, root=daemon.root, spawn=True)
    try:
        assert client.snapshot(state={"w": torch.ones(2)}, step=1).wait(timeout=60).step == 1
        daemon.proc.kill()
        assert daemon.proc.wait(10) == -signal.SIGKILL
        shutil.rmtree(daemon.socket.parent)  # the runtime dir is gone and its name taken
        daemon.socket.parent.write_text("not a directory")
        handle = client.snapshot(state={"w": torch.ones(2)}, step=2)
        assert handle.done() and isinstance(handle.error, DaemonUnavailableError)
        assert str(daemon.socket) in str(handle.error)
    finally:
        client.close()


# ---- 7. two jobs from two processes ------------------------------------------------------------

TRAINER = """
import sys
from ckptd_client import Client
from tests.integration.daemon_fixtures import make_state

sock, root, job, seed, steps = sys.argv[1:6]
with Client(job, socket=sock, root=root, spawn=False, strict=True) as client:
    handles = [
        client.snapshot(state=make_state(int(seed) + int(s), 4), step=int(s))
        for s in steps.split(",")
    ]
    for h in handles:
        h.wait(120)
print("done", job, flush=True)
"""


def test_two_jobs_from_two_processes_commit_separately(
    shared_daemon: Daemon, daemons: DaemonFactory
) -> None:
    daemon = shared_daemon
    before = daemon.wait_idle()
    jobs_before = set(Store(daemon.root).jobs())
    jobs = {"alpha": (1000, [1, 3, 5, 7]), "beta": (2000, [2, 4, 6, 8])}
    procs = [
        run_trainer(
            TRAINER,
            daemon.socket,
            daemon.root,
            job,
            seed,
            ",".join(map(str, steps)),
            env=daemons.env,
        )
        for job, (seed, steps) in jobs.items()
    ]
    results = [finish(p) for p in procs]
    for (job, _), (code, out, err) in zip(jobs.items(), results, strict=True):
        assert code == 0, (job, out, err)
        assert f"done {job}" in out

    store = Store(daemon.root)
    assert sorted(set(store.jobs()) - jobs_before) == ["alpha", "beta"]
    for job, (seed, steps) in jobs.items():
        assert verify_job(store, job) == steps
        for step in steps:
            loaded = load_checkpoint(store, job, step)
            assert loaded.manifest.job == job
            assert_same(loaded.state, make_state(seed + step, 4), f"{job}@{step}")
    st = daemon.wait_idle(commits=before["commits"] + 8)
    assert st["commits"] == before["commits"] + 8
    # last_commit: each job's latest commit, the most recent first
    assert {c["job"] for c in st["last_commit"][:2]} == {"alpha", "beta"}


# ---- 8. another uid --------------------------------------------------------------------------

NOBODY_CLIENT = """
import json, socket, sys
import torch
from ckptd.errors import CkptdError
from ckptd_client import Client

sock_path, root = sys.argv[1], sys.argv[2]
out = {}
probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    probe.connect(sock_path)
    out["connect"] = "connected"
except OSError as exc:
    out["connect"] = type(exc).__name__
finally:
    probe.close()
for job in sys.argv[3:]:
    try:
        with Client(job, socket=sock_path, root=root, spawn=False, strict=True, timeout_s=20) as c:
            c.snapshot(state={"w": torch.ones(4)}, step=1).wait(60)
        out[job] = ["ok", ""]
    except CkptdError as exc:
        out[job] = [type(exc).__name__, str(exc)]
print(json.dumps(out))
"""

# The session's way to run this checkout's programs as another uid (a mirror of the checkout
# when other users cannot reach it: see tests._other_uid).
other_uid = _other_uid.other_uid


@pytest.fixture(scope="module")
def nobody(request: pytest.FixtureRequest) -> None:
    """Skip unless this runs as root with setpriv, and uid 65534 can import ckptd_client (a
    failure instead of a skip under CI=true)."""
    from tests._requirements import require

    require(os.geteuid() == 0, "needs root, to run a client as uid 65534 with setpriv")
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    other: _other_uid.OtherUid = request.getfixturevalue("other_uid")
    why = other.cannot_import("ckptd_client")
    require(not why, why)


def nobody_env(daemons: DaemonFactory) -> dict[str, str]:
    """No config from outside (CKPTD_CONFIG names an empty file), this checkout importable."""
    return _other_uid.active().env(
        HOME=str(daemons.base),
        XDG_CONFIG_HOME=str(daemons.base / "xdg-nobody"),
        COLUMNS="160",
    )


def as_nobody(daemons: DaemonFactory, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``args`` as uid/gid 65534 with no supplementary groups (``sys.executable`` and
    ``CKPTD`` from the session's mirror when there is one)."""
    return subprocess.run(
        [*_other_uid.active().prefix, *map(str, args)],
        env=nobody_env(daemons),
        cwd=daemons.base,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def client_as_nobody(daemons: DaemonFactory, daemon: Daemon, *jobs: str) -> dict[str, Any]:
    """Connect to ``daemon`` as uid 65534: a raw connect, then a Client per job (snapshot +
    wait). Returns ``{"connect": "connected" | <OSError type>, job: [error type | "ok", msg]}``."""
    proc = as_nobody(
        daemons, sys.executable, "-c", NOBODY_CLIENT, daemon.socket, daemon.root, *jobs
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(doc, dict)
    return doc


def open_up(sock: Path) -> None:
    """Let every uid reach the socket (the daemon made it 0600 in a 0700 directory)."""
    sock.parent.chmod(0o777)
    sock.chmod(0o666)


def close_down(sock: Path) -> None:
    """The modes the daemon gave its socket and the directory it created: 0600 in 0700."""
    sock.parent.chmod(0o700)
    sock.chmod(0o600)


@pytest.fixture(scope="module")
def allowing_nobody(nobody: None) -> Iterator[Daemon]:
    """A daemon whose config admits uid 65534's group, for the module; each test opens its
    socket up to everyone (:func:`open_up`) or closes it down (:func:`close_down`) as it needs."""
    group = grp.getgrgid(NOBODY).gr_name
    with daemon_fixtures.daemon_factory() as factory:
        yield factory.start(
            socket_path=factory.base / "allowing" / "s.sock",
            root=factory.base / "allowing-root",
            config=f'[daemon]\nallowed_groups = ["{group}"]\n',
        )


@pytest.mark.usefixtures("nobody")
def test_other_uid_cannot_reach_a_user_daemon(
    shared_daemon: Daemon, daemons: DaemonFactory
) -> None:
    daemon = shared_daemon
    assert daemon.socket.stat().st_mode & 0o777 == 0o600
    assert daemon.socket.parent.stat().st_mode & 0o777 == 0o700
    got = client_as_nobody(daemons, daemon, "nobodyjob")
    assert got["connect"] == "PermissionError"
    kind, message = got["nobodyjob"]
    assert kind == DaemonUnavailableError.__name__
    assert f"no ckptd daemon answers on {daemon.socket}" in message
    assert "Permission denied" in message
    assert "nobodyjob" not in Store(daemon.root).jobs()


@pytest.mark.usefixtures("nobody")
def test_other_uid_cannot_write_a_job_created_by_root(
    allowing_nobody: Daemon, daemons: DaemonFactory
) -> None:
    shared = allowing_nobody
    open_up(shared.socket)
    with connect(shared, "rootjob", strict=True) as client:
        client.snapshot(state={"w": torch.zeros(4)}, step=1).wait(timeout=60)
    got = client_as_nobody(daemons, shared, "rootjob", "nobodyjob")
    assert got["connect"] == "connected"
    kind, message = got["rootjob"]
    assert kind == StorePermissionError.__name__, got
    assert f"job 'rootjob' in {shared.root} belongs to uid 0; uid {NOBODY} may not write" in message
    assert got["nobodyjob"] == ["ok", ""], got  # a job of its own is fine
    store = Store(shared.root)
    assert store.steps("rootjob") == [1] and store.steps("nobodyjob") == [1]
    assert store.job_owner("rootjob") == 0 and store.job_owner("nobodyjob") == NOBODY
    with connect(shared, "nobodyjob", strict=True) as client:  # root may write nobody's job
        client.snapshot(state={"w": torch.ones(1)}, step=2).wait(timeout=60)
    assert store.steps("nobodyjob") == [1, 2]


@pytest.mark.usefixtures("nobody")
def test_other_uid_outside_allowed_groups_is_told_why(
    daemon: Daemon, daemons: DaemonFactory
) -> None:
    """The socket is reachable (0666 in a 0777 dir) but the daemon admits only its own uid, root
    and daemon.allowed_groups: the refused client must learn that, not see a broken pipe."""
    open_up(daemon.socket)
    got = client_as_nobody(daemons, daemon, "nobodyjob")
    assert got["connect"] == "connected"  # the kernel lets it in; the daemon then refuses it
    assert any(f"refused uid {NOBODY}" in e for e in daemon.status()["recent_errors"])
    assert Store(daemon.root).steps("nobodyjob") == []
    kind, message = got["nobodyjob"]
    assert kind == StorePermissionError.__name__, got
    assert f"uid {NOBODY}" in message and "allowed_groups" in message, got


@pytest.mark.usefixtures("nobody")
def test_cli_status_and_stop_as_other_uid_fail_cleanly(
    allowing_nobody: Daemon, daemons: DaemonFactory
) -> None:
    """``ckptd status`` on a socket nobody may not reach, and ``ckptd stop`` by a client the
    daemon admits but may not stop it: each error with its own type and exit code."""
    daemon = allowing_nobody
    close_down(daemon.socket)
    private = as_nobody(daemons, CKPTD, "status", "--json", "--socket", daemon.socket)
    open_up(daemon.socket)
    stop = as_nobody(daemons, CKPTD, "stop", "--socket", daemon.socket)
    assert daemon.proc.poll() is None and not daemon.status()["stopping"]  # still serving
    problems = []
    if private.returncode != DaemonUnavailableError.exit_code or "Traceback" in private.stderr:
        problems.append(f"status on a 0700 socket dir: exit {private.returncode}\n{private.stderr}")
    elif f"{daemon.socket}" not in private.stderr or "Permission denied" not in private.stderr:
        problems.append(f"status on a 0700 socket dir: {private.stderr}")
    if stop.returncode != StorePermissionError.exit_code or "Traceback" in stop.stderr:
        problems.append(f"stop by uid {NOBODY}: exit {stop.returncode}\n{stop.stderr}")
    elif f"uid {NOBODY} may not stop this daemon" not in stop.stderr or "{" in stop.stderr:
        problems.append(f"stop by uid {NOBODY}: {stop.stderr}")
    assert not problems, "\n\n".join(problems)


# ---- 9. garbage on the socket -------------------------------------------------------------------

GARBAGE_JOB = "garbage"
META_OFFSET = 4096
SLOT_BYTES = 1 << 16


def raw_connect(daemon: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(10)
    sock.connect(str(daemon.socket))
    return sock


def reply_of(sock: socket.socket) -> dict[str, Any] | None:
    msg, fds = recv_message(sock)
    close_fds(fds)
    return msg


def hello(
    sock: socket.socket,
    daemon: Daemon,
    version: object = PROTOCOL_VERSION,
    job: str = GARBAGE_JOB,
) -> None:
    msg = {"op": "hello", "version": version, "job": job, "root": str(daemon.root)}
    send_message(sock, msg | {"pid": os.getpid()})
    if version == PROTOCOL_VERSION:
        reply = reply_of(sock)
        assert reply is not None and reply["op"] == "welcome", reply


SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def memfd(size: int, *, seals: int | None, content: Sequence[tuple[int, bytes]] = ()) -> int:
    """A memfd of ``size`` bytes holding ``content``, sealed with ``seals`` (None: created without
    MFD_ALLOW_SEALING, so it can never be sealed)."""
    flags = os.MFD_CLOEXEC | (0 if seals is None else os.MFD_ALLOW_SEALING)
    fd = os.memfd_create("ckptd-test", flags)
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as mm:
        for offset, data in content:
            mm[offset : offset + len(data)] = data
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def send_with_fd(sock: socket.socket, msg: dict[str, Any], fd: int) -> None:
    """Send ``msg`` with ``fd`` attached (SCM_RIGHTS), then close our copy."""
    try:
        send_message(sock, msg, [fd])
    finally:
        os.close(fd)


def register(sock: socket.socket, fd: int, size: int = SLOT_BYTES) -> None:
    send_with_fd(sock, {"op": "register", "slot": 0, "size": size}, fd)


def f32(path: str, n: int, offset: int) -> LayoutEntry:
    return LayoutEntry(path, "float32", (n,), offset, 4 * n)


def submit_layout(
    sock: socket.socket, daemon: Daemon, entries: list[LayoutEntry], **override: Any
) -> None:
    """hello, register a sealed memfd holding ``entries``' layout at META_OFFSET, then submit
    (with the fields in ``override`` replaced)."""
    hello(sock, daemon)
    meta = encode_layout({"w": {"$tensor": 0}}, entries)
    register(sock, memfd(SLOT_BYTES, seals=SEALS, content=[(META_OFFSET, meta)]))
    reply = reply_of(sock)
    assert reply == {"op": "registered", "slot": 0}, reply
    msg = {
        "op": "submit",
        "seq": 1,
        "slot": 0,
        "step": 1,
        "meta_offset": META_OFFSET,
        "meta_length": len(meta),
        "metric": None,
    }
    send_message(sock, msg | override)


def g_not_json(s: socket.socket, d: Daemon) -> None:
    s.sendall(b"\xff{not json")


def g_no_op(s: socket.socket, d: Daemon) -> None:
    s.sendall(b'{"version": 1, "job": "x"}')


def g_oversized(s: socket.socket, d: Daemon) -> None:
    s.sendall(b'{"op":"status","pad":"' + b"x" * (70 << 10) + b'"}')


def g_wrong_version(s: socket.socket, d: Daemon) -> None:
    hello(s, d, version=99)


def g_before_hello(s: socket.socket, d: Daemon) -> None:
    send_message(s, {"op": "submit", "seq": 1})


def g_unknown_op(s: socket.socket, d: Daemon) -> None:
    hello(s, d)
    send_message(s, {"op": "frobnicate"})


def g_register_without_fd(s: socket.socket, d: Daemon) -> None:
    hello(s, d)
    send_message(s, {"op": "register", "slot": 0, "size": 4096})


def g_unsealed(s: socket.socket, d: Daemon) -> None:
    hello(s, d)
    register(s, memfd(SLOT_BYTES, seals=0))


def g_unsealable(s: socket.socket, d: Daemon) -> None:
    hello(s, d)
    register(s, memfd(SLOT_BYTES, seals=None))


def g_regular_file(s: socket.socket, d: Daemon) -> None:
    hello(s, d)
    register(s, os.open(d.log, os.O_RDONLY | os.O_CLOEXEC))


def g_memfd_too_small(s: socket.socket, d: Daemon) -> None:
    hello(s, d)
    register(s, memfd(4096, seals=SEALS), size=1 << 20)


def g_fd_on_submit(s: socket.socket, d: Daemon) -> None:
    hello(s, d)
    send_with_fd(s, {"op": "submit", "seq": 1}, memfd(4096, seals=SEALS))


Garbage = Callable[[socket.socket, Daemon], None]

GARBAGE: dict[str, tuple[Garbage, str]] = {
    "not-json": (g_not_json, "message is not JSON"),
    "json-without-op": (g_no_op, "message is not a JSON object with a string 'op'"),
    "oversized": (g_oversized, "message or its file descriptors were truncated"),
    "wrong-version": (
        g_wrong_version,
        f"client speaks ckptd protocol 99, this daemon speaks {PROTOCOL_VERSION};",
    ),
    "before-hello": (g_before_hello, "submit: send hello first"),
    "unknown-op": (g_unknown_op, "unknown op 'frobnicate'"),
    "register-without-fd": (
        g_register_without_fd,
        "register: expected exactly 1 file descriptor, got 0",
    ),
    "memfd-not-sealed": (g_unsealed, "register: the memfd must be sealed against shrinking"),
    "memfd-unsealable": (g_unsealable, "register: the memfd must be sealed against shrinking"),
    "fd-not-a-memfd": (g_regular_file, "register: the fd is not a sealable memfd"),
    "memfd-smaller-than-claimed": (
        g_memfd_too_small,
        "register: memfd holds 4096 bytes, fewer than 1048576",
    ),
    "fd-on-submit": (g_fd_on_submit, "submit: unexpected file descriptors"),
    "offset-out-of-range": (
        lambda s, d: submit_layout(s, d, [f32("w", 16, META_OFFSET - 32)]),
        "layout.tensors[0] (w): bytes [4064, 4128) lie outside the slot's data area [0, 4096)",
    ),
    "negative-offset": (
        lambda s, d: submit_layout(s, d, [f32("w", 16, -64)]),
        "layout.tensors[0] (w): offset and nbytes must be integers >= 0",
    ),
    "overlapping-layout": (
        lambda s, d: submit_layout(s, d, [f32("a", 16, 0), f32("b", 16, 32)]),
        "slot layout: tensors 'a' and 'b' overlap",
    ),
    "negative-shape": (
        lambda s, d: submit_layout(s, d, [LayoutEntry("w", "float32", (-4,), 0, 16)]),
        "layout.tensors[0] (w): shape must be non-negative integers: [-4]",
    ),
    "unknown-dtype": (
        lambda s, d: submit_layout(s, d, [LayoutEntry("w", "float99", (4,), 0, 16)]),
        "layout.tensors[0] (w): unknown dtype 'float99'",
    ),
    "nbytes-mismatch": (
        lambda s, d: submit_layout(s, d, [LayoutEntry("w", "float32", (4,), 0, 15)]),
        "layout.tensors[0] (w): nbytes 15 does not match float32[4]",
    ),
    "layout-outside-slot": (
        lambda s, d: submit_layout(s, d, [f32("w", 4, 0)], meta_offset=SLOT_BYTES - 8),
        "is outside the 65536-byte slot",
    ),
    "layout-not-json": (
        lambda s, d: submit_layout(s, d, [f32("w", 4, 0)], meta_length=3),
        "slot layout is not JSON",
    ),
    "unknown-slot": (
        lambda s, d: submit_layout(s, d, [f32("w", 4, 0)], slot=7),
        "submit: unknown slot 7",
    ),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_gets_an_error_and_a_closed_connection(shared_daemon: Daemon, case: str) -> None:
    send_garbage, fragment = GARBAGE[case]
    with raw_connect(shared_daemon) as sock:
        send_garbage(sock, shared_daemon)
        reply = reply_of(sock)
        assert reply is not None and reply["op"] == "error", reply
        assert reply["type"] == "ProtocolError", reply
        assert fragment in reply["message"]
        assert reply_of(sock) is None  # and the daemon hung up
    assert shared_daemon.proc.poll() is None
    # The daemon keeps serving everyone else.
    with connect(shared_daemon, "bystander", strict=True) as client:
        step = 1 + len(client.list())
        info = client.snapshot(state={"w": torch.full((8,), float(step))}, step=step).wait(60)
    assert info.step == step
    assert Store(shared_daemon.root).steps(GARBAGE_JOB) == []


def test_a_hand_crafted_valid_submit_is_committed(shared_daemon: Daemon) -> None:
    """The control for the garbage cases: the same crafting with a correct layout works."""
    data = torch.arange(16, dtype=torch.float32)
    flat = flatten({"w": data})
    meta = encode_layout(flat.skeleton, [f32("w", 16, 0)])
    with raw_connect(shared_daemon) as sock:
        hello(sock, shared_daemon, job="crafted")
        fd = memfd(
            SLOT_BYTES, seals=SEALS, content=[(0, data.numpy().tobytes()), (META_OFFSET, meta)]
        )
        register(sock, fd)
        assert reply_of(sock) == {"op": "registered", "slot": 0}
        send_message(
            sock,
            {
                "op": "submit",
                "seq": 9,
                "slot": 0,
                "step": 77,
                "meta_offset": META_OFFSET,
                "meta_length": len(meta),
                "metric": "nan",
            },
        )
        replies = [reply_of(sock) for _ in range(3)]
    ops = [str(r["op"]) if r else "EOF" for r in replies]
    assert ops[0] == "accepted" and sorted(ops[1:]) == ["committed", "released"], replies
    assert Store(shared_daemon.root).steps("crafted") == [77]
    assert_same(ckptd_client.load("crafted", 77, root=shared_daemon.root), {"w": data})


# ---- 10. no fd / mapping growth ---------------------------------------------------------------


def test_a_hundred_snapshots_leak_no_fds_or_mappings(shared_daemon: Daemon) -> None:
    daemon = shared_daemon
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    me = os.getpid()

    def counts() -> tuple[int, int, int, int]:
        return (
            fd_count(daemon.pid),
            len(memfd_maps(daemon.pid)),
            fd_count(me),
            len(memfd_maps(me, "memfd:ckptd-leaks-")),
        )

    with connect(daemon, "leaks", slots=2, strict=True) as client:

        def run(steps: range) -> None:
            handles = []
            for step in steps:
                with torch.no_grad():
                    model.weight.add_(0.5)
                handles.append(client.snapshot(model, step=step, rng=False))
            assert client.flush(timeout=120) == []
            assert all(h.error is None for h in handles)
            daemon.wait_idle()
            time.sleep(0.3)  # let the daemon close the status connections

        run(range(1, 11))
        after_10 = counts()
        daemon_fds_10, client_fds_10 = fd_targets(daemon.pid), fd_targets(me)
        run(range(11, 101))
        deadline = time.monotonic() + 10
        while (after_100 := counts()) != after_10 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert after_100 == after_10, (
            after_10,
            after_100,
            sorted(set(fd_targets(daemon.pid)) ^ set(daemon_fds_10)),
            sorted(set(fd_targets(me)) ^ set(client_fds_10)),
        )
        assert after_10[1] == 2 and after_10[3] == 2  # one mapping per slot, each side
        assert client.stats["snapshots"] == 100 and client.stats["failed"] == 0
    assert Store(daemon.root).steps("leaks") == list(range(1, 101))


# ---- 11. a full ring: skip and block ---------------------------------------------------------


def test_full_ring_skips_or_blocks(
    shared_daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = shared_daemon
    before = daemon.wait_idle()
    big = make_state(11, 128)
    with connect(daemon, "skipper", slots=1, on_full="skip") as client:
        first = client.snapshot(state=big, step=1)
        second = client.snapshot(state=big, step=2)
        assert not first.skipped
        assert second.skipped and second.done()
        with pytest.raises(SnapshotSkippedError, match="skipper step 2 was skipped"):
            second.wait(0)
        assert "on_full='skip'" in str(second.error)
        assert first.wait(timeout=120).step == 1
        assert client.stats["skipped"] == 1 and client.stats["blocked"] == 0
    skipped = before["skipped"] + 1
    wait_until(lambda: daemon.status()["skipped"] == skipped, 10, "status to count the skip")
    assert cli_status_json(daemon.socket, capsys)["skipped"] == skipped
    assert Store(daemon.root).steps("skipper") == [1]

    with connect(daemon, "blocker", slots=1, on_full="block") as client:
        first = client.snapshot(state=big, step=1)
        second = client.snapshot(state=big, step=2)
        assert not second.skipped
        assert client.stats["blocked"] == 1 and client.stats["blocked_s"] > 0
        assert second.stall_s >= client.stats["blocked_s"]
        assert [first.wait(120).step, second.wait(120).step] == [1, 2]
    status = daemon.status()
    assert status["skipped"] == skipped
    assert status["blocked"] == before["blocked"] + 1  # counted by the daemon too
    assert status["blocked_s"] > before["blocked_s"]


# ---- 12. status and stop ----------------------------------------------------------------------


def test_status_json_and_stop(daemon: Daemon, daemons: DaemonFactory) -> None:
    with connect(daemon, "stat", strict=True) as client:
        client.snapshot(state={"w": torch.ones(5)}, step=5).wait(timeout=60)
        st = status_json(daemon.socket, daemons.env)
        assert st["pid"] == daemon.pid
        assert st["socket"] == str(daemon.socket) and st["root"] == str(daemon.root)
        assert st["mode"] == "user" and st["stopping"] is False
        assert st["clients"] == [
            {"job": "stat", "pid": os.getpid(), "uid": os.getuid(), "slots": 1}
        ]
        assert st["queue"] == 0 and st["writing"] is None and st["inflight_bytes"] == 0
        assert st["commits"] == 1 and st["failures"] == {} and st["skipped"] == 0
        [last] = st["last_commit"]
        assert (last["job"], last["step"], last["root"]) == ("stat", 5, str(daemon.root))
        assert abs(last["at"] - time.time()) < 60

        pending = client.snapshot(state=make_state(12, 32), step=6)
        stop = run_ckptd("stop", "--socket", daemon.socket, env=daemons.env)
        assert stop.returncode == 0, (stop.stdout, stop.stderr)
        assert "ckptd is draining and will exit" in stop.stdout
        assert daemon.proc.wait(60) == 0, daemon.log_text()
        assert pending.wait(timeout=10).step == 6
    assert Store(daemon.root).steps("stat") == [5, 6]
    assert not daemon.socket.exists()
    after = run_ckptd("status", "--json", "--socket", daemon.socket, env=daemons.env)
    assert after.returncode == DaemonUnavailableError.exit_code
    assert f"no ckptd daemon answers on {daemon.socket}" in after.stderr.replace("\n", "")


# ---- 13. the README demo -----------------------------------------------------------------------


@pytest.mark.slow
def test_readme_demo_runs(daemons: DaemonFactory) -> None:
    # The per-user default socket (nothing names one), so the demo's client spawns the daemon.
    runtime = daemons.base / "demo-run"
    runtime.mkdir(mode=0o700)
    sock = runtime / "ckptd" / "ckptd.sock"
    env = clean_env(daemons.base, XDG_RUNTIME_DIR=str(runtime))
    # The demo's own flags, at a smaller scale than its defaults (30 steps, every 5, crash at
    # 16): the same three runs, a SIGKILL between two checkpoints and six commits.
    demo = [sys.executable, str(REPO / "examples" / "demo.py"), "--root", str(daemons.default_root)]
    proc = subprocess.run(
        [*demo, "--steps", "12", "--every", "2", "--crash-at", "7"],
        cwd=daemons.base,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    try:
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
        assert "trainer exited with SIGKILL" in proc.stdout
        assert "== 4. loss curve of the resumed run == uninterrupted run" in proc.stdout
        st = query(sock)
        assert st["socket"] == str(sock) and st["commits"] >= 6
    finally:
        if sock.exists():
            pid = query(sock)["pid"]
            query(sock, "stop")
            wait_until(lambda: not pid_alive(pid), 60, f"demo daemon {pid} to exit")
    assert processes_mentioning(str(sock)) == []
