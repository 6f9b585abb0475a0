"""Helpers shared by the benchmark scripts: statistics, markdown tables, JSON lines, run info, and
the ckptd daemons the snapshot and goodput benchmarks start."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import psutil
import torch

from ckptd.protocol import can_connect

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

    ``foreign()`` is the CPU time used by everything but this process (and its children) since
    the watch started, as a fraction of all CPUs (0: the run had the machine to itself; 0.5 on
    2 CPUs: another process kept one core busy). Linux only (/proc/stat); None elsewhere."""

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
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

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


def repeat(
    reps: int,
    warmup: bool,
    quiet: Quiet,
    body: Callable[[int], T],
    watch_type: type[CpuWatch] = CpuWatch,
) -> Repeated[T]:
    """Call ``body(rep)`` for rep 0..reps-1 (after an untimed ``body(-1)`` if ``warmup``).
    ``watch_type`` decides what counts as this bench's own CPU time (a subclass may count its
    daemons too)."""
    out: Repeated[T] = Repeated([], [])
    rep = -1 if warmup else 0
    while rep < reps:
        waited = wait_for_quiet(quiet.wait_s)
        if waited > 3:
            log(f"waited {waited:.0f}s for other processes to quieten down")
        watch = watch_type()
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


class BenchDaemon:
    """A ckptd daemon started by a benchmark: ``python -m ckptd start --user --socket S --root R
    [--config C]`` with the environment's ``CKPTD_*`` / ``NOTIFY_*`` variables removed, its output
    in ``<socket dir>/<label>.log``. The constructor returns once the socket accepts connections."""

    def __init__(self, label: str, sock: Path, root: Path, config: Path | None = None) -> None:
        self.label = label
        self.socket = sock
        self.root = root
        self.log = sock.parent / f"{label}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "NOTIFY_"))}
        cmd = [sys.executable, "-m", "ckptd", "start", "--user", "--socket", str(sock)]
        cmd += ["--root", str(root)]
        if config is not None:
            cmd += ["--config", str(config)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        while not can_connect(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = " | ".join(self.log.read_text(errors="replace").splitlines()[-5:])
                self.stop()
                raise RuntimeError(f"ckptd daemon {label} did not start: {tail}")
            time.sleep(0.05)
        self._ps = psutil.Process(self.pid)

    def status(self) -> dict[str, Any]:
        """``ckptd status --json --socket S``."""
        proc = subprocess.run(
            [sys.executable, "-m", "ckptd", "status", "--json", "--socket", str(self.socket)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        st: dict[str, Any] = json.loads(proc.stdout)
        return st

    def cpu_s(self) -> float:
        """CPU seconds the daemon has used so far (0 once it is gone)."""
        try:
            t = self._ps.cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user + t.system)

    def stop(self) -> bool:
        """``ckptd stop`` (drain and exit), then SIGTERM / SIGKILL if it lingers; True once the
        process is gone."""
        if self.proc.poll() is None:
            subprocess.run(
                [sys.executable, "-m", "ckptd", "stop", "--socket", str(self.socket)],
                cwd=REPO,
                capture_output=True,
                timeout=120,
                check=False,
            )
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                continue
        return self.proc.poll() is not None
