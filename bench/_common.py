"""What the benchmark scripts share: their command-line options, statistics, markdown tables, JSON
lines and run info, scratch directories, how busy the machine was, and the ckptd daemons they
start (:class:`BenchDaemon`, a :class:`ckptd.launch.DaemonProcess`).

Every script runs in one thread of its own process; a script that starts daemons stops them (its
``finally``), and a daemon that does not start is stopped before the error reaches the script."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import psutil
import torch

from ckptd.launch import DaemonProcess, private_env, start_args

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 1_000_000
MiB = 1 << 20


@dataclass(frozen=True)
class Spread:
    """Median, minimum and maximum of repeated measurements (and the values themselves)."""

    median: float
    low: float
    high: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values), tuple(values))

    def as_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "reps": list(self.values)}

    def text(self, digits: int = 0, scale: float = 1.0) -> str:
        """``median [min-max]`` with ``digits`` decimals, values multiplied by ``scale``."""
        m, lo, hi = (v * scale for v in (self.median, self.low, self.high))
        if len(self.values) == 1:
            return f"{m:.{digits}f}"
        return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def rotated(items: Sequence[T], k: int) -> list[T]:
    """``items`` rotated left by ``k``: each repetition starts with a different method."""
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def run_info(bench: str, quick: bool) -> dict[str, Any]:
    """What a result line needs to be read later: when, where, on what, and how loaded."""
    return {
        "bench": bench,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": quick,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


class JsonLines:
    """Write one JSON object per line to ``path`` (the file is replaced by each run)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def default_out(name: str, quick: bool) -> Path:
    """``bench/results/<name>.jsonl`` (``<name>-quick.jsonl`` for --quick runs)."""
    return RESULTS_DIR / f"{name}{'-quick' if quick else ''}.jsonl"


def write_records(path: Path, info: dict[str, Any], records: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` with one JSON line per record, each preceded by the run's ``info``."""
    out = JsonLines(path)
    try:
        for record in records:
            out.write({**info, **record})
    finally:
        out.close()


@contextmanager
def scratch(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory ``<parent>/<prefix>XXXXXXXX`` (``parent`` made if missing), removed with
    everything in it when the block ends."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def mount_of(path: Path) -> str:
    """``device on mountpoint type fstype`` of the filesystem holding ``path``."""
    best = ("?", "/", "?")
    real = str(path.resolve())
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "?"
    for line in lines:
        dev, mnt, fstype, *_ = line.split()
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best[1]):
            best = (dev, mnt, fstype)
    return f"{best[0]} on {best[1]} type {best[2]}"


def settle() -> None:
    """Between timed runs: collect garbage and flush the filesystem (writes, deletes, discards),
    so that no run pays for the previous one's clean-up."""
    gc.collect()
    os.sync()


@contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` holds the elapsed wall seconds."""
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


def touch_every_byte(t: torch.Tensor) -> int:
    """Read every byte of ``t`` (an int64 sum of its bytes, wrapping): forces lazy/mmapped
    storage to be materialised. Cheap when the bytes are resident (several GB/s)."""
    raw = t.detach().reshape(-1).view(torch.uint8) if t.numel() else None
    if raw is None:
        return 0
    whole = raw.numel() // 8 * 8
    total = 0
    if whole:
        total += int(raw[:whole].view(torch.int64).sum())
    if whole != raw.numel():
        total += int(raw[whole:].sum())
    return total


class CpuWatch:
    """How busy the machine was with *other* processes while a run was going.

    ``foreign()`` is the CPU time used by everything but this process and its children (the
    daemons it started, live or exited) since the watch started, as a fraction of all CPUs (0:
    the run had the machine to itself; 0.5 on 2 CPUs: another process kept one core busy). Linux
    only (/proc/stat); None elsewhere."""

    def __init__(self) -> None:
        self._start = (time.perf_counter(), self._busy(), self._own())

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        values = [int(v) for v in fields[:8]]
        idle = values[3] + values[4]  # idle + iowait
        return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        me = psutil.Process()
        t = me.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in me.children(recursive=True):
            try:
                c = child.cpu_times()
            except psutil.Error:
                continue
            total += c.user + c.system
        return float(total)

    def foreign(self) -> float | None:
        wall0, busy0, own0 = self._start
        busy = self._busy()
        if busy is None or busy0 is None:
            return None
        wall = time.perf_counter() - wall0
        other = (busy - busy0) - (self._own() - own0)
        return max(0.0, other / (wall * (os.cpu_count() or 1)))


def wait_for_quiet(max_wait_s: float, threshold: float = 0.10, window_s: float = 2.0) -> float:
    """Sleep until other processes used less than ``threshold`` of the CPUs over a ``window_s``
    window, for at most ``max_wait_s`` seconds (0: do not wait). Returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        watch = CpuWatch()
        time.sleep(window_s)
        busy = watch.foreign()
        if busy is None or busy < threshold:
            break
    return time.perf_counter() - start


@dataclass(frozen=True)
class Quiet:
    """How a run copes with other processes: before each rep wait up to ``wait_s`` for the CPUs
    to quieten down; redo a rep (up to ``max_redos`` times in all) when other processes used more
    than ``max_foreign`` of the CPUs during it."""

    wait_s: float = 0.0
    max_foreign: float = 1.0
    max_redos: int = 5


@dataclass
class Repeated(Generic[T]):
    """The kept reps (warm-up and redone ones dropped) and the share of the CPUs other processes
    used during each kept rep."""

    reps: list[T]
    foreign: list[float | None]
    redone: int = 0


def repeat(reps: int, warmup: bool, quiet: Quiet, body: Callable[[int], T]) -> Repeated[T]:
    """Call ``body(rep)`` for rep 0..reps-1 (after an untimed ``body(-1)`` if ``warmup``)."""
    out: Repeated[T] = Repeated([], [])
    rep = -1 if warmup else 0
    while rep < reps:
        waited = wait_for_quiet(quiet.wait_s)
        if waited > 3:
            log(f"waited {waited:.0f}s for other processes to quieten down")
        watch = CpuWatch()
        result = body(rep)
        busy = watch.foreign()
        if rep < 0:
            log(f"warm-up rep done (other processes' CPU: {show_cpu(busy)})")
        elif busy is not None and busy > quiet.max_foreign and out.redone < quiet.max_redos:
            out.redone += 1
            log(f"rep {rep + 1}: other processes used {busy:.0%} of the CPUs; doing it again")
            continue
        else:
            out.reps.append(result)
            out.foreign.append(busy)
            log(f"rep {rep + 1}/{reps} done (other processes' CPU: {show_cpu(busy)})")
        rep += 1
    return out


# ---- the command line --------------------------------------------------------------------------


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's parser, described by the first paragraph of its docstring ``doc``."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)


def add_run_args(ap: argparse.ArgumentParser, *, quick: str, reps: str) -> None:
    """The options of every measuring script: ``--quick`` (a smoke run; ``quick`` says what it
    runs), ``--reps`` (``reps`` gives the defaults; see :func:`reps_of`) and ``--out``."""
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--reps", type=int, default=None, help=reps)
    ap.add_argument("--out", type=Path, default=None, help="JSON lines file")


def reps_of(args: argparse.Namespace, full: int, quick: int = 1) -> int:
    """``--reps``, else ``quick`` for a --quick run and ``full`` otherwise."""
    if args.reps is not None:
        return int(args.reps)
    return quick if args.quick else full


def add_results_arg(ap: argparse.ArgumentParser) -> None:
    """``--results``: where the scripts that read results find the JSON lines."""
    ap.add_argument("--results", type=Path, default=RESULTS_DIR, help="where the JSON lines are")


def drop_ckptd_env() -> None:
    """Remove every ``CKPTD_*`` variable from this process's environment: a bench's clients and
    stores name their socket and root, and no variable of the caller's redirects them or names
    their config."""
    for var in [k for k in os.environ if k.startswith("CKPTD_")]:
        del os.environ[var]


def add_quiet_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each rep, wait up to S seconds for other processes to use <10%% of the CPUs",
    )
    ap.add_argument(
        "--max-foreign",
        type=float,
        default=1.0,
        metavar="F",
        help="redo a rep (at most 5 times per run) if other processes used more than this "
        "fraction of the CPUs during it (e.g. 0.15)",
    )


def quiet_of(args: argparse.Namespace) -> Quiet:
    return Quiet(wait_s=args.quiet_wait, max_foreign=args.max_foreign)


def show_cpu(fraction: float | None) -> str:
    return "?" if fraction is None else f"{fraction:.0%}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- daemons -----------------------------------------------------------------------------------


STOP_TIMEOUT_S = 60.0
"""How long a bench daemon may drain (a large state's last write) before it is SIGKILLed."""


class BenchDaemon:
    """A ckptd daemon a benchmark starts and stops: a :class:`ckptd.launch.DaemonProcess` running
    ``start --user --socket S --root R [--config C]`` from ``cwd`` in ``env`` (default: this
    process's :func:`ckptd.launch.private_env`), its output in ``<socket dir>/<label>.log``.

    The constructor returns once the socket accepts connections; a daemon that exits or does not
    answer is stopped and :class:`ckptd.errors.DaemonUnavailableError` names its log's last
    lines. The script that built it calls :meth:`stop`."""

    def __init__(
        self,
        label: str,
        sock: Path,
        root: Path,
        config: Path | None = None,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.label = label
        self.socket = sock
        self.root = root
        self.log = sock.parent / f"{label}.log"
        self.process = DaemonProcess(
            sock,
            start_args(sock, root, config),
            log=self.log,
            env=private_env() if env is None else env,
            cwd=cwd,
        )
        self.pid = self.process.pid
        try:
            self.process.wait_ready(what=label)
        except BaseException:
            self.process.stop()
            raise

    def status(self) -> dict[str, Any]:
        """``ckptd status --json --socket S``."""
        proc = subprocess.run(
            [sys.executable, "-m", "ckptd", "status", "--json", "--socket", str(self.socket)],
            cwd=REPO,
            env=private_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        st: dict[str, Any] = json.loads(proc.stdout)
        return st

    def stop(self) -> bool:
        """SIGTERM (the daemon drains and exits), SIGKILL if it lingers past
        :data:`STOP_TIMEOUT_S`; True when it drained and exited by itself (exit code 0)."""
        return self.process.stop(STOP_TIMEOUT_S) == 0
