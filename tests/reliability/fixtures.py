"""Helpers and fixtures of the reliability suite.

Daemons are the integration suite's: :class:`~tests.integration.daemon_fixtures.DaemonFactory`
starts real ``ckptd start --user`` processes in short ``/tmp/ckXXXXXXXX`` directories and, on
teardown, fails the test if a process survives or a daemon log shows a traceback. A test module
registers the fixtures it uses by assigning them to module globals of the same name.

What this module adds:

* loop budgets (:func:`loop_seconds`: a CI default, or ``CKPTD_RELIABILITY_SECONDS``) and the
  one-line summary every loop prints (:class:`LoopSummary`);
* :class:`SteppedState`, a deterministic state whose bytes are a pure function of the step, so
  any committed step can be compared bit for bit with what its trainer handed over;
* store checks run against a live or a dead daemon (:func:`check_job`, :func:`dead_writer_files`);
* trainer subprocesses (:mod:`tests.reliability.trainers`) with their output in files;
* memory sampling of a process (RssAnon);
* libfiu (``fiu-run`` / ``fiu-ctrl``): the preload environment and remote control.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.errors import CkptdError, NotFoundError
from ckptd.format.fsutil import tmp_writer, writer_alive
from ckptd.format.restore import load_checkpoint, verify_manifest
from ckptd.format.store import Store
from tests._requirements import missing, require
from tests.integration.daemon_fixtures import (
    REPO,
    Daemon,
    DaemonFactory,
    assert_same,
    clean_env,
    daemon_factory,
    pid_alive,
    short_tmp,
    status_json,
)

SECONDS_ENV = "CKPTD_RELIABILITY_SECONDS"

# ---- budgets and summaries -------------------------------------------------------------------


def loop_seconds(ci_default: float) -> float:
    """How long a loop runs: ``CKPTD_RELIABILITY_SECONDS`` when set, else its CI default."""
    raw = os.environ.get(SECONDS_ENV, "").strip()
    if not raw:
        return ci_default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SECONDS_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{SECONDS_ENV} must be > 0, got {raw!r}")
    return value


def loop_timeout(ci_default: float) -> pytest.MarkDecorator:
    """A pytest-timeout mark that leaves a loop of :func:`loop_seconds` room to finish."""
    return pytest.mark.timeout(max(300.0, 3 * loop_seconds(ci_default) + 300.0))


def budget_is_overridden() -> bool:
    return bool(os.environ.get(SECONDS_ENV, "").strip())


@dataclass
class LoopSummary:
    """Counters of one loop; :meth:`report` prints the summary line and fails on violations."""

    name: str
    iterations: int = 0
    kills: int = 0
    verified: int = 0
    violations: list[str] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    def violate(self, text: str) -> None:
        self.violations.append(text)

    def line(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.extra.items())
        return (
            f"[reliability] {self.name}: iterations={self.iterations} kills={self.kills} "
            f"checkpoints_verified={self.verified} violations={len(self.violations)}{extra}"
        )

    def report(self) -> None:
        print(f"\n{self.line()}", flush=True)
        shown = "\n  ".join(self.violations[:20])
        more = f"\n  ... and {len(self.violations) - 20} more" if len(self.violations) > 20 else ""
        assert not self.violations, f"{self.line()}\n  {shown}{more}"


# ---- deterministic states --------------------------------------------------------------------


class SteppedState:
    """A state of ``regions`` equal parts of one float32 tensor (``mbytes`` MiB in all): at step
    ``s`` region ``s % regions`` is the base plus ``s`` and the others are the base. Every step's
    bytes are a pure function of (seed, step), so a test can rebuild what any step held; and with
    regions aligned to ``store.chunk_bytes`` each snapshot writes one new object and dedups the
    rest, so retention and GC have shared objects to get right."""

    def __init__(self, seed: int, mbytes: float, regions: int) -> None:
        n = int(mbytes * (1 << 20)) // 4
        if n % regions:
            raise ValueError(f"{mbytes} MiB of float32 does not split into {regions} regions")
        self.seed = seed
        self.regions = regions
        self.region = n // regions
        self.base = torch.randn(n, generator=torch.Generator().manual_seed(seed))

    def at(self, step: int) -> dict[str, Any]:
        w = self.base.clone()
        r = step % self.regions
        w[r * self.region : (r + 1) * self.region] += float(step)
        return {
            "w": w,
            "step": torch.tensor(step, dtype=torch.int64),
            "meta": {"seed": self.seed, "step": step},
        }


def difference(got: Any, want: Any, where: str) -> str | None:
    """None when ``got`` is bit-identical to ``want``; else what differs."""
    try:
        assert_same(got, want, where)
    except AssertionError as exc:
        return str(exc).splitlines()[0]
    return None


# ---- store checks ----------------------------------------------------------------------------


@dataclass
class JobCheck:
    verified: int = 0
    compared: int = 0
    violations: list[str] = field(default_factory=list)
    visible: list[int] = field(default_factory=list)


def check_job(
    store: Store,
    job: str,
    *,
    reported: Collection[int],
    keep_last: int | None,
    expected: Callable[[int], Any] | None = None,
    compare: Callable[[list[int]], Collection[int]] = lambda steps: steps,
) -> JobCheck:
    """Check ``job`` while a daemon may be writing, retaining and collecting it:

    * every visible checkpoint's objects exist and it verifies (a checkpoint that retention
      deletes while it is being checked is skipped, not counted);
    * every step in ``reported`` (committed, as the trainer was told) is still visible, unless
      the policy allows its deletion: with ``keep_last=K`` a step may go only once K newer ones
      are visible (steps only grow in these tests);
    * with ``expected``, the steps ``compare(visible)`` picks load bit-identical to
      ``expected(step)``.
    """
    result = JobCheck()
    visible = store.steps(job)
    to_compare = set(compare(visible)) if expected is not None else set()
    for step in visible:
        try:
            manifest = store.read_manifest(job, step)
            missing = [d for d in manifest.objects if not store.has_object(job, d)]
            problems = verify_manifest(store, manifest)
        except NotFoundError:
            continue  # deleted by retention since the listing
        except CkptdError as exc:
            problems, missing = [f"{type(exc).__name__}: {exc}"], []
        if missing or problems:
            if step in store.steps(job):
                what = f"objects missing: {missing[:3]}" if missing else "; ".join(problems[:2])
                result.violations.append(f"{job} step {step} is visible but broken: {what}")
            continue
        result.verified += 1
        if step in to_compare and expected is not None:
            try:
                state = load_checkpoint(store, job, step).state
            except CkptdError as exc:
                if step in store.steps(job):
                    result.violations.append(f"{job} step {step} verified but does not load: {exc}")
                continue  # else: deleted by retention (its objects collected) while loading
            diff = difference(state, expected(step), f"{job}@{step}")
            result.compared += 1
            if diff is not None:
                result.violations.append(f"{job} step {step} holds other bytes: {diff}")
    now = store.steps(job)
    result.visible = now
    for step in sorted(reported):
        if step in now:
            continue
        newer = [s for s in now if s > step]
        if keep_last is None or len(newer) < keep_last:
            result.violations.append(
                f"{job} step {step} was reported committed but is gone, and retention "
                f"(keep_last={keep_last}) does not allow it: visible steps {now[-8:]}"
            )
    return result


def dead_writer_files(store: Store, job: str) -> list[str]:
    """Files in ``<root>/<job>/tmp`` that no live writer owns (a crash's leftovers)."""
    tmp = store.tmp_dir(job)
    try:
        names = sorted(os.listdir(tmp))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        writer = tmp_writer(name)
        if writer is None or not writer_alive(*writer):
            out.append(name)
    return out


def read_steps(path: Path, prefix: str = "") -> list[int]:
    """Integers from the lines of ``path`` that start with ``prefix`` (a partial last line, of a
    writer killed mid-write, is ignored)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    steps = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n") or not line.startswith(prefix):
            continue
        word = line[len(prefix) :].split()
        if word and word[0].isdigit():
            steps.append(int(word[0]))
    return steps


def wait_drained(
    socket_path: Path, env: dict[str, str], timeout_s: float = 180.0
) -> dict[str, Any]:
    """Poll ``ckptd status --json`` until nothing is queued or being written and the commit
    count stayed put over two polls (a dead client's last message may still be in flight)."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    previous = None
    while time.monotonic() < deadline:
        last = status_json(socket_path, env)
        settled = last["queue"] == 0 and last["writing"] is None
        key = (last["commits"], sum(last["failures"].values()))
        if settled and key == previous:
            return last
        previous = key if settled else None
        time.sleep(0.5)
    raise AssertionError(f"the daemon's queue did not drain within {timeout_s} s: {last}")


# ---- processes ---------------------------------------------------------------------------------


@dataclass
class Trainer:
    """A trainer subprocess (:mod:`tests.reliability.trainers`), its output in files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def errors(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def wait_for(self, text: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"trainer exited with {self.proc.returncode} before printing {text!r}:\n"
                    f"{self.output()[-2000:]}\n{self.errors()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"trainer did not print {text!r} within {timeout_s} s")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


def start_trainer(mode: str, *args: object, env: dict[str, str], out: Path) -> Trainer:
    """Run ``python -m tests.reliability.trainers MODE ARGS``; stdout to ``out``, stderr to
    ``out`` with the suffix ``.err`` (not ``.log``: the factory scans ``*.log`` for daemon
    tracebacks, and a trainer's expected warnings are not the daemon's)."""
    err = out.with_suffix(".err")
    with out.open("ab") as fout, err.open("ab") as ferr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.trainers", mode, *map(str, args)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fout,
            stderr=ferr,
        )
    return Trainer(proc, out, err)


def proc_status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``RssAnon``, ``VmRSS``, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {key}")


class MemorySampler:
    """Samples a process's RssAnon every ``period_s`` in a thread; ``peak_kb`` is the maximum."""

    def __init__(self, pid: int, period_s: float = 0.1) -> None:
        self.pid = pid
        self.period_s = period_s
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kb = max(self.peak_kb, proc_status_kb(self.pid, "RssAnon"))
                self.samples += 1
            except (OSError, KeyError):
                return
            self._stop.wait(self.period_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def restart(daemons: DaemonFactory, daemon: Daemon, **kwargs: Any) -> Daemon:
    """A new daemon on the same socket and root (the old one must be dead)."""
    assert not pid_alive(daemon.pid), f"daemon {daemon.pid} is still running"
    return daemons.start(socket_path=daemon.socket, root=daemon.root, **kwargs)


# ---- libfiu --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fiu:
    """libfiu's POSIX preload for a daemon, and ``fiu-ctrl`` to flip failure points in it.

    ``fiu-run -x`` does nothing but export ``LD_PRELOAD`` (its run and POSIX preload libraries),
    ``FIU_CTRL_FIFO`` (the remote-control prefix) and ``FIU_ENABLE``, then exec the program;
    :meth:`env` builds the same environment for ``DaemonFactory``, whose command line is fixed.
    """

    lib_dir: Path
    fifo_prefix: Path

    def env(self, base: dict[str, str]) -> dict[str, str]:
        preload = f"{self.lib_dir / 'fiu_run_preload.so'} {self.lib_dir / 'fiu_posix_preload.so'}"
        return base | {
            "LD_PRELOAD": preload,
            "FIU_CTRL_FIFO": str(self.fifo_prefix),
            "FIU_ENABLE": "",
        }

    def ctrl(self, pid: int, *commands: str, check: bool = True) -> str:
        """Run ``fiu-ctrl -c CMD ... PID``; return what it said (nothing on success). With
        ``check``, fail unless every command reached the process and succeeded."""
        args = ["fiu-ctrl", "-f", str(self.fifo_prefix)]
        for command in commands:
            args += ["-c", command]
        proc = subprocess.run(
            [*args, str(pid)], capture_output=True, text=True, timeout=30, check=False
        )
        said = (proc.stdout + proc.stderr).strip()
        if check:
            assert proc.returncode == 0 and not said, f"{' '.join(args)} {pid}: {said}"
        return said


FIU_PROBE = """
import errno, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
try:
    os.fsync(fd)
except OSError as exc:
    print(errno.errorcode[exc.errno])
else:
    print("no failure")
"""


@cache
def fiu_lib_dir() -> Path | str:
    """The directory of libfiu's preload libraries, or why libfiu cannot be used here."""
    fiu_run = shutil.which("fiu-run")
    if fiu_run is None or shutil.which("fiu-ctrl") is None:
        return (
            "fiu-utils is not installed (fiu-run / fiu-ctrl and libfiu's POSIX preload inject "
            "the fsync and write failures); install it with `apt-get install fiu-utils`"
        )
    m = re.search(r'^PLIBPATH="([^"]+)"', Path(fiu_run).read_text(), re.MULTILINE)
    lib_dir = Path(m.group(1) if m else "/usr/lib/fiu")
    for lib in ("fiu_run_preload.so", "fiu_posix_preload.so"):
        if not (lib_dir / lib).is_file():
            return f"libfiu's preload library {lib_dir / lib} is missing"
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run(
            [
                fiu_run,
                "-x",
                "-f",
                "",
                "-c",
                "enable name=posix/io/sync/fsync,failinfo=5",
                sys.executable,
                "-c",
                FIU_PROBE,
                str(Path(tmp) / "probe"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    if probe.stdout.strip() != "EIO":
        return (
            "libfiu's preload does not inject failures here (a probe fsync under fiu-run gave "
            f"{probe.stdout.strip() or probe.stderr.strip()[-200:]!r})"
        )
    return lib_dir


@pytest.fixture
def fiu_daemons() -> Iterator[tuple[DaemonFactory, Fiu]]:
    """A daemon factory whose daemons run under libfiu's POSIX preload (remote-controlled with
    ``fiu-ctrl``); skips when fiu-utils is not installed (fails under ``CI=true``). Its ``env``
    is the daemons' env, with the preload: run CLI commands with ``clean_env(factory.base)``."""
    lib_dir = fiu_lib_dir()
    if isinstance(lib_dir, str):
        missing(lib_dir)
    base = short_tmp()
    fiu = Fiu(lib_dir, base / "fiu")
    factory = DaemonFactory(base, fiu.env(clean_env(base)))
    try:
        yield factory, fiu
    finally:
        factory.cleanup()


@pytest.fixture(scope="module")
def module_daemons() -> Iterator[DaemonFactory]:
    """A daemon factory for a whole module (one long-running daemon, restarted only when a test
    finds it wedged), cleaned up and checked like ``daemons``."""
    with daemon_factory() as factory:
        yield factory


@pytest.fixture
def shm_base() -> Iterator[Path]:
    """A fresh directory on a tmpfs (``/dev/shm``), removed afterwards; skips without one (fails
    under ``CI=true``)."""
    shm = Path("/dev/shm")
    require(
        shm.is_dir() and os.access(shm, os.W_OK),
        "no writable tmpfs at /dev/shm for the checkpoint root",
    )
    path = Path(tempfile.mkdtemp(prefix="ckptd-rel-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def kill_all(trainers: Collection[Trainer]) -> None:
    for trainer in trainers:
        trainer.kill()


def iter_lines(text: str, prefix: str) -> Iterator[str]:
    for line in text.splitlines():
        if line.startswith(prefix):
            yield line
