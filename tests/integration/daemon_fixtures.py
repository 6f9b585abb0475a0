"""Fixtures and helpers for the daemon integration tests: real ``ckptd start`` processes on real
Unix sockets in short ``/tmp`` directories, status queries over the wire, deterministic states
and bit-exact comparisons.

A test module registers the fixtures it uses by assigning them to module globals of the same
name (``daemons = daemon_fixtures.daemons``).

Every daemon here is a :class:`ckptd.launch.DaemonProcess`, the one way ckptd starts a daemon:
it is ready when a connection to its socket succeeds, not when the socket file exists, and it is
stopped with SIGTERM (it drains), then SIGKILL. Socket paths must stay below 108 bytes
(``sun_path``), so every daemon lives under a fresh ``/tmp/ckXXXXXXXX`` directory (pytest's
``tmp_path`` is far too long). Each factory stops its daemons on teardown and fails the test if
any process that mentions its directory on the command line is still alive: no daemon, spawned
daemon or trainer may outlive its test; nor may a daemon log show a traceback the test did not
announce.

Every environment here (:func:`clean_env`) names an empty config file in ``CKPTD_CONFIG`` and
holds an empty user config, so no daemon, trainer or CLI run of a test reads the machine's
``/etc/ckptd/ckptd.toml``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ckptd.launch import DaemonProcess, private_env, start_args
from ckptd.protocol import close_fds, recv_message, send_message

STOP_TIMEOUT_S = 60.0
"""How long a stopped daemon may drain on a loaded CI machine before it is SIGKILLed."""
REPO = Path(__file__).resolve().parents[2]
CKPTD = Path(sys.executable).parent / "ckptd"


# ---- environment -------------------------------------------------------------------------------


def empty_config(base: Path) -> Path:
    """``<base>/config/empty.toml``, an empty config file (created if missing), in a directory of
    its own: a daemon watches its config file's directory, and nothing else changes there."""
    path = base / "config" / "empty.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def empty_config_home(base: Path) -> Path:
    """``<base>/xdg-config``, an XDG config home whose ``ckptd/ckptd.toml`` is an empty file: a
    process that drops ``CKPTD_CONFIG`` (the bench scripts' daemons do) still stops its config
    lookup there, before ``/etc/ckptd/ckptd.toml``."""
    home = base / "xdg-config"
    (home / "ckptd").mkdir(parents=True, exist_ok=True)
    (home / "ckptd" / "ckptd.toml").touch()
    return home


def clean_env(base: Path, **extra: str) -> dict[str, str]:
    """The environment for daemons, trainers, benchmark scripts and CLI runs: a daemon's private
    one (:func:`ckptd.launch.private_env`: no CKPTD_* from outside, none of systemd's variables)
    without pytest's; ``CKPTD_CONFIG`` set to an empty file and an XDG config home holding an
    empty user config, so the config lookup never reaches a real user's config or the machine's
    ``/etc/ckptd/ckptd.toml`` (an explicit ``--config`` still wins); the repo importable
    (``tests.integration...``). Creates the two empty files under ``base``."""
    env = {k: v for k, v in private_env().items() if not k.startswith("PYTEST_")}
    env["CKPTD_CONFIG"] = str(empty_config(base))
    env["XDG_CONFIG_HOME"] = str(empty_config_home(base))
    path = env.get("PYTHONPATH", "").split(os.pathsep)
    if str(REPO) not in path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), *path]))
    env["COLUMNS"] = "160"
    env.update(extra)
    return env


def short_tmp() -> Path:
    """A fresh directory directly under /tmp, traversable by every user (mode 0755)."""
    path = Path(tempfile.mkdtemp(prefix="ck", dir="/tmp"))
    path.chmod(0o755)
    return path


# ---- talking to a daemon -----------------------------------------------------------------------


def query(path: Path, op: str = "status", timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one bare ``op`` (status / stop) over a fresh connection; return the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        send_message(sock, {"op": op})
        reply, fds = recv_message(sock)
        close_fds(fds)
    assert reply is not None, f"daemon on {path} closed the connection on {op!r}"
    return reply


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def run_ckptd(*args: str | Path, env: dict[str, str], timeout_s: float = 120.0) -> Any:
    """Run the installed ``ckptd`` console script; return the CompletedProcess (text)."""
    return subprocess.run(
        [str(CKPTD), *map(str, args)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_mentioning(marker: str) -> list[tuple[int, str]]:
    """Live processes (other than this one) whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        cmd = " ".join(a.decode(errors="replace") for a in argv if a)
        if marker in cmd and pid_alive(int(entry.name)):
            found.append((int(entry.name), cmd))
    return found


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{fd} -> {Path(f'/proc/{pid}/fd/{fd}').readlink()}")
        except OSError:
            continue
    return out


def memfd_maps(pid: int, name: str = "memfd:") -> list[str]:
    """Lines of ``/proc/PID/maps`` that map a memfd (optionally of a given name prefix)."""
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if name in line]


# ---- daemons -----------------------------------------------------------------------------------


@dataclass
class Daemon:
    """A ``ckptd start`` process (``--user`` unless started with ``user=False``) started by a
    :class:`DaemonFactory`: ``process`` serves ``socket`` on the store ``root``, its output in
    ``log``. The factory stops it; a test may signal ``proc`` itself."""

    process: DaemonProcess
    root: Path
    log: Path

    @property
    def socket(self) -> Path:
        return self.process.socket

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.process.proc

    @property
    def pid(self) -> int:
        return self.process.pid

    def status(self) -> dict[str, Any]:
        return query(self.socket, "status")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def idle(self) -> bool:
        st = self.status()
        return st["queue"] == 0 and st["writing"] is None

    def wait_idle(self, commits: int | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
        """Poll status until nothing is queued or being written (and ``commits`` reached)."""
        last: dict[str, Any] = {}

        def ready() -> bool:
            nonlocal last
            last = self.status()
            return (
                last["queue"] == 0
                and last["writing"] is None
                and (commits is None or last["commits"] >= commits)
            )

        wait_until(ready, timeout_s, f"daemon {self.pid} to go idle (last status {last})")
        return last


@dataclass
class DaemonFactory:
    """Starts daemons under one short tmp dir; on cleanup stops them and checks for strays.

    Cleanup also fails the test when a daemon log under the directory shows a traceback, unless
    the test announced it with :meth:`expect_traceback` (a fault it injected on purpose).
    """

    base: Path
    env: dict[str, str]
    started: list[Daemon] = field(default_factory=list)
    expected_tracebacks: list[str] = field(default_factory=list)

    def expect_traceback(self, marker: str) -> None:
        """A traceback in a daemon log that contains ``marker`` is expected, not a crash."""
        self.expected_tracebacks.append(marker)

    @property
    def default_socket(self) -> Path:
        return self.base / "run" / "d.sock"

    @property
    def default_root(self) -> Path:
        return self.base / "root"

    def start(
        self,
        *extra: str,
        socket_path: Path | None = None,
        root: Path | None = None,
        config: str | Path | None = None,
        user: bool = True,
        module: str = "ckptd",
    ) -> Daemon:
        """Start a daemon (:func:`ckptd.launch.start_args` with ``extra`` last) and wait until
        its socket accepts a connection; a daemon that exits or does not answer first raises
        :class:`ckptd.errors.DaemonUnavailableError` with the end of its log. ``config`` is a
        config file, or TOML text that is written to one. ``user=False`` starts a system daemon
        (no ``--user``); ``module`` runs ``python -m MODULE start ...`` instead of ``ckptd`` (a
        test's wrapper that injects a fault, then runs ckptd's CLI)."""
        n = len(self.started)
        sock = socket_path or self.default_socket
        store_root = root or self.default_root
        assert len(str(sock).encode()) < 108, f"socket path too long: {sock}"
        if isinstance(config, str):
            text, config = config, self.base / f"ckptd-{n}.toml"
            config.write_text(text)
        log = self.base / f"daemon-{n}.log"
        args = start_args(sock, store_root, config, *extra, user=user)
        process = DaemonProcess(sock, args, log=log, env=self.env, cwd=self.base, module=module)
        daemon = Daemon(process, store_root, log)
        self.started.append(daemon)
        process.wait_ready()
        return daemon

    def stop(self, daemon: Daemon, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Stop ``daemon`` (:meth:`ckptd.launch.DaemonProcess.stop`: SIGTERM, SIGKILL after
        ``timeout_s``); return its exit code (negative: the signal)."""
        return daemon.process.stop(timeout_s)

    def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every daemon still running as :meth:`stop` does, side by side: each gets its one
        SIGTERM (drain and exit) before the first is waited for; one still running ``timeout_s``
        after that is SIGKILLed. A KeyboardInterrupt while waiting kills them all at once and is
        passed on."""
        running = [d.proc for d in self.started if d.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        try:
            for proc in running:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        except KeyboardInterrupt:
            for proc in running:
                proc.kill()
                proc.wait()
            raise

    def cleanup(self) -> None:
        self.stop_all()
        marker = str(self.base)
        strays = processes_mentioning(marker)
        for pid, _cmd in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Daemon logs (started here, or spawned by a client: <socket dir>/ckptd.log) must not
        # show an unexpected exception, even when every assertion of the test held.
        expected = self.expected_tracebacks
        crashes = {
            str(log): crash
            for log in sorted(self.base.rglob("*.log"))
            if (crash := unexpected_traceback(log.read_text(errors="replace"), expected))
        }
        shutil.rmtree(self.base, ignore_errors=True)
        assert not strays, f"processes left running after the test: {strays}"
        assert not crashes, f"daemon logs show exceptions: {crashes}"


def unexpected_traceback(text: str, expected: list[str]) -> str:
    """The first traceback in a log ``text`` that contains none of the ``expected`` markers
    (its first 3000 characters), or "" when there is none."""
    chained = ("During handling of the above exception", "The above exception was the direct")
    reports: list[str] = []
    for block in text.split("Traceback")[1:]:
        # A block runs to the next traceback, so its exception line is in it; a chained
        # exception's blocks form one report.
        last_line = reports[-1].rstrip().rsplit("\n", 1)[-1] if reports else ""
        if last_line.startswith(chained):
            reports[-1] += "Traceback" + block
        else:
            reports.append("Traceback" + block)
    for report in reports:
        if not any(marker in report for marker in expected):
            return report[:3000]
    return ""


@contextmanager
def daemon_factory() -> Iterator[DaemonFactory]:
    """A factory in a fresh short tmp dir with :func:`clean_env`, cleaned up and checked when the
    block ends."""
    base = short_tmp()
    factory = DaemonFactory(base, clean_env(base))
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def daemons() -> Iterator[DaemonFactory]:
    """A daemon factory for one test (its own short tmp dir, cleaned up and checked)."""
    with daemon_factory() as factory:
        yield factory


@pytest.fixture
def daemon(daemons: DaemonFactory) -> Daemon:
    """One running user daemon: socket ``<tmp>/run/d.sock``, root ``<tmp>/root``."""
    return daemons.start()


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[Daemon]:
    """One daemon for a whole module (tests that do not stop or kill it)."""
    with daemon_factory() as factory:
        yield factory.start()


@pytest.fixture
def ckptd_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In-process clients must not pick up CKPTD_* or a user or system config from outside (use
    it with ``pytestmark = pytest.mark.usefixtures("ckptd_env")``): ``CKPTD_CONFIG`` names an
    empty file, so a daemon such a client spawns (it inherits this environment) reads no other
    config either."""
    for var in ("CKPTD_ROOT", "CKPTD_SOCKET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CKPTD_CONFIG", str(empty_config(tmp_path)))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(empty_config_home(tmp_path)))


# ---- states ------------------------------------------------------------------------------------


def make_state(seed: int, mbytes: float) -> dict[str, Any]:
    """A deterministic state of about ``mbytes`` MiB (mostly one float32 tensor) with several
    dtypes and plain values; the same ``seed`` gives the same bytes in every process."""
    g = torch.Generator().manual_seed(seed)
    n = max(1024, math.ceil(mbytes * (1 << 20) / 4 / 1024) * 1024)
    return {
        "big": torch.randn(n // 1024, 1024, generator=g),
        "half": torch.randn(3, 333, generator=g).to(torch.bfloat16),
        "ints": torch.randint(-(2**40), 2**40, (257,), generator=g, dtype=torch.int64),
        "mask": torch.rand(77, generator=g) > 0.5,
        "scalar": torch.tensor(float(seed)),
        "empty": torch.empty(0, 5),
        "meta": {"seed": seed, "name": f"state-{seed}", "lr": [1e-3, None, True]},
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bit-exact comparison (NaNs and -0.0 included)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def assert_same(got: Any, want: Any, where: str = "state") -> None:
    """Recursively assert ``got`` equals ``want``: tensors and arrays bit for bit, with the same
    dtype and shape; containers with the same keys/types; other values with ``==``."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__}, not a tensor"
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{where}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.equal(bits(got), bits(want)), f"{where}: tensor bytes differ"
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{where}: {type(got).__name__}, not an ndarray"
        assert got.dtype == want.dtype and got.shape == want.shape, f"{where}: dtype/shape"
        assert got.tobytes() == want.tobytes(), f"{where}: array bytes differ"
    elif isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: {type(got).__name__}, not a dict"
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, list | tuple):
        assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), f"{where}: {got!r} != nan"
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


def status_json(socket_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """``ckptd status --json --socket S`` through the real console script."""
    proc = run_ckptd("status", "--json", "--socket", socket_path, env=env)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict)
    return doc


def cli_status_json(socket_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """``ckptd status --json --socket S`` run by the CLI's ``main`` in this process (no second
    interpreter and torch import; :func:`status_json` runs the installed console script)."""
    from ckptd.cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["status", "--json", "--socket", str(socket_path)])
    captured = capsys.readouterr()
    assert exited.value.code == 0, (captured.out, captured.err)
    doc = json.loads(captured.out)
    assert isinstance(doc, dict)
    return doc
