"""The main path as users run it (issue 11, items 1-3): an operator's daemon plus the README's
loop with no root, sockets in shared directories, and no silent private daemon on a typo.

1. the daemon never changes the mode of a directory it did not create (a sticky, world-writable
   directory keeps its mode through start, stop and a client's spawn);
2. a client given no root writes where the daemon writes, and ``ckptd list`` /
   ``ckptd_client.load`` find those checkpoints from any working directory;
3. a socket someone named means that daemon: it not answering is an error naming it, and only
   the per-user default socket spawns a daemon (with one log line saying where it writes).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptd_client
from ckptd.cli.main import main
from ckptd.errors import ConfigError, DaemonUnavailableError, StorePermissionError
from ckptd.format.store import Store
from ckptd.protocol import can_connect
from ckptd_client import Client, spawn
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import (
    DaemonFactory,
    assert_same,
    clean_env,
    pid_alive,
    processes_mentioning,
    query,
    run_ckptd,
    wait_until,
)

ckptd_env = daemon_fixtures.ckptd_env
daemons = daemon_fixtures.daemons
pytestmark = pytest.mark.usefixtures("ckptd_env")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode) | (os.lstat(path).st_mode & stat.S_ISVTX)


def stop_spawned(sock: Path) -> None:
    """Stop the daemon a client spawned on ``sock`` and reap it."""
    pid = query(sock)["pid"]
    query(sock, "stop")
    for proc in [p for p in spawn.spawned if p.pid == pid]:
        assert proc.proc.wait(30) == 0
        spawn.spawned.remove(proc)
    wait_until(lambda: not pid_alive(pid), 30, f"spawned daemon {pid} to exit")


# ---- 1. directories the daemon did not create ---------------------------------------------------


def test_a_shared_sticky_directory_keeps_its_mode_through_start_stop_and_spawn(
    daemons: DaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix ``ckptd start --socket /tmp-like/x.sock`` chmodded the shared directory
    to 0700 (0750 for a system daemon), locking every other user out of it for good."""
    shared = daemons.base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    for user, sock_mode in ((True, 0o600), (False, 0o660)):
        d = daemons.start(socket_path=shared / f"{'u' if user else 's'}.sock", user=user)
        assert mode(shared) == 0o1777
        assert mode(d.socket) == sock_mode  # the socket's own mode keeps others out
        with Client("sticky", socket=d.socket, root=d.root, spawn=False) as client:
            client.snapshot(state={"w": torch.ones(3)}, step=1).wait(timeout=60)
        assert daemons.stop(d) == 0
        assert mode(shared) == 0o1777

    # A client spawning on the per-user default socket under a shared TMPDIR creates its own
    # private directory inside and leaves the shared one alone.
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(shared))
    sock = shared / f"ckptd-{os.getuid()}" / "ckptd.sock"
    try:
        with Client("spawned", root=daemons.default_root) as client:
            client.snapshot(state={"w": torch.ones(3)}, step=1).wait(timeout=60)
            assert client.socket_path == sock
        assert mode(sock.parent) == 0o700 and mode(sock) == 0o600
    finally:
        if can_connect(sock):
            stop_spawned(sock)
    assert mode(shared) == 0o1777


def test_existing_directories_are_used_as_they_are_or_refused_when_anyone_may_replace_the_socket(
    daemons: DaemonFactory,
) -> None:
    mine = daemons.base / "mine"
    mine.mkdir(mode=0o755)
    mine.chmod(0o755)
    d = daemons.start(socket_path=mine / "d.sock")
    assert mode(mine) == 0o755  # not narrowed to 0700 (before the fix it was)
    assert daemons.stop(d) == 0
    assert mode(mine) == 0o755

    fresh = daemons.base / "fresh" / "deeper"
    d = daemons.start(socket_path=fresh / "d.sock", user=False)
    assert mode(fresh) == 0o750  # created by the daemon: the documented mode
    assert daemons.stop(d) == 0

    open_dir = daemons.base / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    proc = run_ckptd(
        "start", "--user", "--socket", open_dir / "d.sock", "--root", daemons.default_root,
        env=daemons.env,
    )  # fmt: skip
    assert proc.returncode == ConfigError.exit_code, proc.stderr
    assert "writable by everyone without the sticky bit" in proc.stderr
    assert mode(open_dir) == 0o777
    assert not (open_dir / "d.sock").exists()


# ---- 2. the root follows the daemon --------------------------------------------------------------

README_LOOP = """
import sys
import torch
import ckptd_client

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
client = ckptd_client.Client("my-run", retention={"keep_last": 3, "keep_every": 1000})
extra = client.restore(model, opt, scheduler=sched) if client.list() else {"__step__": 0}
start = extra["__step__"]
for step in range(start + 1, start + 7):
    loss = model(torch.randn(4, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    if step % 2 == 0:
        client.snapshot(model, opt, step=step, scheduler=sched, metric=float(loss))
client.close()
print("ROOT", client.root)
torch.save(model.state_dict(), sys.argv[1])
"""


# Runs a script as on a machine where the shipped unit is installed: the system socket
# (``/run/ckptd/ckptd.sock``, not writable for a test) is the given path. Nothing in the
# environment names a socket or a root.
AS_INSTALLED = """
import pathlib, runpy, sys
import ckptd.config
ckptd.config.SYSTEM_SOCKET = pathlib.Path(sys.argv.pop(1))
sys.argv[0] = sys.argv.pop(1)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def as_installed(
    system_socket: Path, *args: str | Path, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", AS_INSTALLED, str(system_socket), *map(str, args)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_readme_loop_with_no_root_writes_where_an_operators_daemon_writes(
    daemons: DaemonFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A daemon started as the shipped unit starts it (system mode, ``--config``, ``--root``,
    ``--socket`` on the system socket). Before the fix the loop sent ``<cwd>/checkpoints`` and
    the daemon refused it (StorePermissionError), and ``ckptd list`` looked in the current
    directory. The trainers run as processes of their own; ``ckptd list`` runs in this process,
    from another working directory, with the same system socket and nothing in the environment
    naming a socket or a root."""
    config = tmp_path / "etc-ckptd.toml"
    config.write_text("")
    d = daemons.start("--config", str(config), user=False)
    env = clean_env(daemons.base)  # no CKPTD_SOCKET, no CKPTD_ROOT
    assert not any(k in env for k in ("CKPTD_SOCKET", "CKPTD_ROOT"))
    trainer_dir, elsewhere = tmp_path / "trainer", tmp_path / "elsewhere"
    trainer_dir.mkdir()
    elsewhere.mkdir()
    script = tmp_path / "loop.py"
    script.write_text(README_LOOP)
    for run in (1, 2):  # the second run resumes from the first one's latest checkpoint
        proc = as_installed(
            d.socket, script, tmp_path / f"model-{run}.pt", cwd=trainer_dir, env=env
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"ROOT {d.root}" in proc.stdout
    assert not (trainer_dir / "checkpoints").exists()
    steps = sorted(int(p.name[5:17]) for p in (d.root / "my-run" / "manifests").iterdir())
    assert steps == [8, 10, 12]  # run 2 went on from step 6; keep_last 3

    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr("ckptd.config.SYSTEM_SOCKET", d.socket)

    def ckptd_list(*args: str) -> tuple[int | str | None, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(["list", *args])
        out, err = capsys.readouterr()
        return exited.value.code, out, err

    code, out, err = ckptd_list("my-run", "--json")
    assert code == 0, err
    assert [c["step"] for c in json.loads(out)] == [8, 10, 12]

    state = ckptd_client.load("my-run")
    assert_same(state["model"], torch.load(tmp_path / "model-2.pt"), "model")
    assert [m.step for m in ckptd_client.list_checkpoints("my-run")] == [8, 10, 12]

    # Only a root the caller asked for is checked against the system daemon's.
    with pytest.raises(StorePermissionError, match="name no root"):
        Client("my-run", root=tmp_path / "mine", spawn=False)

    # The service stopped: readers refuse to guess rather than read ./checkpoints.
    ckptd_client.save("decoy", state={"w": torch.ones(1)}, step=1, root=elsewhere / "checkpoints")
    assert daemons.stop(d) == 0
    d.socket.touch()  # a stale socket file, as after a crash
    code, out, err = ckptd_list()
    assert code == DaemonUnavailableError.exit_code, (out, err)
    assert f"no ckptd daemon answers on {d.socket}" in " ".join(err.split())
    with pytest.raises(DaemonUnavailableError, match="name the root"):
        ckptd_client.list_checkpoints()


def test_a_named_socket_that_does_not_answer_never_makes_readers_use_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CKPTD_SOCKET`` names a daemon that is not running and ``./checkpoints`` holds a store:
    ``ckptd gc`` / ``list`` and ``load`` must not quietly act on that other store."""
    monkeypatch.chdir(tmp_path)
    ckptd_client.save("decoy", state={"w": torch.ones(1)}, step=1, root=tmp_path / "checkpoints")
    monkeypatch.setenv("CKPTD_SOCKET", str(tmp_path / "typo" / "ckptd.sock"))
    for call in (ckptd_client.list_checkpoints, lambda: ckptd_client.load("decoy")):
        with pytest.raises(DaemonUnavailableError, match="named by CKPTD_SOCKET"):
            call()
    monkeypatch.delenv("CKPTD_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))  # the default socket: no daemon
    assert [m.step for m in ckptd_client.list_checkpoints("decoy")] == [1]


def test_a_client_of_a_spawned_daemon_writes_under_its_own_working_directory(
    daemons: DaemonFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A daemon spawned on demand has no root of its own to impose: a second trainer (another
    working directory, no root) joining it writes to its own ``./checkpoints``, and the spawn
    is announced in one log line naming the socket and the root."""
    runtime = daemons.base / "xdg"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    sock = runtime / "ckptd" / "ckptd.sock"
    try:
        with caplog.at_level(logging.WARNING, logger="ckptd_client"):
            a = Client("a")
        spawned = [r.getMessage() for r in caplog.records if "started one" in r.getMessage()]
        assert len(spawned) == 1, caplog.text
        assert str(sock) in spawned[0] and str(first / "checkpoints") in spawned[0]
        monkeypatch.chdir(second)
        with Client("b") as b:
            b.snapshot(state={"w": torch.ones(2)}, step=1).wait(timeout=60)
        with a:
            a.snapshot(state={"w": torch.zeros(2)}, step=1).wait(timeout=60)
        assert a.root == first / "checkpoints" and b.root == second / "checkpoints"
        assert (second / "checkpoints" / "b").is_dir() and (first / "checkpoints" / "a").is_dir()
        assert query(a.socket_path)["on_demand"] is True
    finally:
        if can_connect(sock):
            stop_spawned(sock)


# ---- 3. a socket someone named means that daemon ------------------------------------------------


@pytest.mark.parametrize("how", ["argument", "CKPTD_SOCKET", "config"])
def test_a_named_socket_that_does_not_answer_is_an_error_not_a_private_daemon(
    how: str, daemons: DaemonFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix ``Client(..., socket="/run/typo.sock")`` silently spawned a private daemon
    writing to ./checkpoints."""
    typo = daemons.base / "typo" / "ckptd.sock"
    monkeypatch.chdir(tmp_path)
    kwargs: dict[str, object] = {}
    if how == "argument":
        kwargs["socket"] = typo
    elif how == "CKPTD_SOCKET":
        monkeypatch.setenv("CKPTD_SOCKET", str(typo))
    else:
        config = tmp_path / "ckptd.toml"
        config.write_text(f'[daemon]\nsocket = "{typo}"\n')
        monkeypatch.setenv("CKPTD_CONFIG", str(config))
    named = {"argument": "socket= argument", "CKPTD_SOCKET": "CKPTD_SOCKET", "config": "config"}
    with pytest.raises(DaemonUnavailableError, match=named[how]) as info:
        Client("typo", **kwargs)  # type: ignore[arg-type]
    assert str(typo) in str(info.value)
    assert not typo.parent.exists()  # nothing was started there
    assert not (tmp_path / "checkpoints").exists()
    assert processes_mentioning(str(typo)) == []


def test_spawn_true_still_starts_a_daemon_on_a_named_socket(daemons: DaemonFactory) -> None:
    sock = daemons.base / "named" / "d.sock"
    try:
        with Client("named", socket=sock, root=daemons.default_root, spawn=True) as client:
            client.snapshot(state={"w": torch.ones(2)}, step=1).wait(timeout=60)
    finally:
        if can_connect(sock):
            stop_spawned(sock)
    assert not sock.exists()


def test_a_reconnect_keeps_the_root_the_client_got_first(
    daemons: DaemonFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-user service (a daemon with its own --root on the default socket) restarts; the
    client's next snapshot spawns a daemon on demand. Without pinning, ``root: null`` then went
    to the spawned daemon's default, ./checkpoints, and the run's history was split in two."""
    runtime = daemons.base / "xdg"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.chdir(tmp_path)
    service_root = daemons.base / "service-root"
    d = daemons.start(socket_path=runtime / "ckptd" / "ckptd.sock", root=service_root)
    with Client("pinned") as client:
        assert client.root == service_root
        client.snapshot(state={"w": torch.ones(2)}, step=1).wait(timeout=60)
        assert daemons.stop(d) == 0
        try:
            client.snapshot(state={"w": torch.ones(2)}, step=2).wait(timeout=60)
        finally:
            if can_connect(d.socket):
                stop_spawned(d.socket)
    assert client.root == service_root
    assert Store(service_root).steps("pinned") == [1, 2]
    assert not (tmp_path / "checkpoints").exists()
