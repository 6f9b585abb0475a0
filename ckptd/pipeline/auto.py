"""``codec = "auto"``: per write, compress or write raw, whichever makes the checkpoint durable
sooner on this machine now; compress anyway when space is short.

The daemon's hashing and compression compete with training for the CPU. Compressing pays when the
codec, on the cores other processes leave free, outruns the disk: a write of ``raw`` bytes takes
about ``max(raw / codec_rate, raw * ratio / disk_rate)`` compressed against ``raw / disk_rate``
raw, where ``codec_rate`` is the codec's throughput per core times the free cores (at most the
pipeline's threads). The inputs are measured, cheaply and continuously:

* the disk's rate: bytes of new objects over the wall time some object write (write + fsync) was
  running, from every write the daemon makes (:attr:`WriteTimings.disk_busy_s`);
* the codec's rate per core: raw bytes encoded over the CPU time the chunk threads spent encoding
  them, from the writes that compressed (thread time: it does not depend on how busy the machine
  was);
* the job's ratio, stored over raw bytes of the objects a compressed write made;
* the free cores: the CPUs minus what other processes kept busy over the last few seconds, from
  deltas of ``/proc/stat`` and of this process's CPU time (:class:`CpuMeter`; the daemon's own
  threads are not "other").

Rates and ratios are smoothed (an exponential moving average in which a small write weighs less)
and a write that makes too little to measure (:data:`MIN_MEASURE_BYTES`) leaves them as they are.
Copying and hashing cost the same in both modes and are left out; writes running side by side
share the disk, so each measures its share of it.

:func:`decide` is the pure rule, in this order: space short (less room above the disk guard than
:data:`SHORT_SPACE_WRITES` raw writes of this size) compresses; no measurement yet (the daemon's
first write, or a job whose ratio is unknown while the codec could beat the disk) compresses, and
so measures; otherwise the faster mode wins, where leaving the job's current mode takes a gain of
:data:`SWITCH_MARGIN` (hysteresis: it does not flip on noise). A job held raw for
:data:`REPROBE_WRITES` writes compresses one to measure its ratio again, when the ratio could
change the answer. Explicit ``"bytegroup"``, ``"zstd"`` and ``"raw"`` are fixed: they are only
measured.

Threads: :class:`AutoCodec` is shared; the daemon's writer threads call :meth:`AutoCodec.choose`
before and :meth:`AutoCodec.observe` after each write, its loop calls :meth:`AutoCodec.sample_cpu`
each second and :meth:`AutoCodec.status`. One lock guards its state; none of them does disk I/O
but ``choose``'s ``space`` call (``statvfs``, on the writer thread).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import psutil

from ckptd.format.codec import CodecChoice, CodecConfig
from ckptd.pipeline.plan import PipelineConfig

Mode = Literal["compress", "raw"]
Why = Literal["configured", "space", "bootstrap", "faster", "disk-faster", "hold", "probe"]

COMPRESSOR: CodecChoice = "bytegroup"
"""The codec ``auto`` hands the encoder when it compresses: float byte grouping + zstd."""
_BYTEGROUP = ("auto", "bytegroup")
"""The names the encoder reads as byte grouping (it takes a bare ``"auto"`` that way)."""

SWITCH_MARGIN = 0.15
"""A job leaves its current mode only for the other one being this much faster (0.15: 15%)."""
SHORT_SPACE_WRITES = 4
"""Space is short when the room above the disk guard holds fewer raw writes of this size."""
REPROBE_WRITES = 50
"""A job held raw this many writes in a row compresses one to measure its ratio again."""
MIN_MEASURE_BYTES = 1 << 20
"""A write that made fewer new bytes leaves the rates as they are (too short to time)."""
SMOOTHING = 0.3
"""Weight of a new measurement in the moving averages, for a write of :data:`FULL_WEIGHT_BYTES`
or more; a smaller write weighs less (its fixed costs, an fsync, weigh more in its rate)."""
FULL_WEIGHT_BYTES = 64 << 20
CPU_WINDOW_S = 5.0
"""The free cores are measured over about this long before the decision."""
MAX_JOBS = 1024
"""Jobs whose ratio and mode are remembered (least recently written forgotten first)."""

_GB = 1e9


@dataclass(frozen=True)
class Inputs:
    """What :func:`decide` decides from (rates in bytes per second; None: not measured yet)."""

    raw_bytes: int
    disk_bytes_per_s: float | None
    codec_bytes_per_s_per_core: float | None
    ratio: float | None
    """The job's stored/raw when compressed (None: never compressed in this daemon)."""
    free_cores: float | None
    """Cores other processes left idle recently (None: unknown, taken as all usable)."""
    usable_cores: int
    """The most cores the codec can use: the pipeline's threads, at most the CPUs."""
    room_bytes: int | None = None
    """Free space above the disk guard on the root's filesystem (None: unknown)."""
    current: Mode | None = None
    """The job's mode so far (hysteresis); None: its first decision."""
    raw_streak: int = 0
    """Writes in a row the job was held raw since it last compressed."""


@dataclass(frozen=True)
class Decision:
    """One write's mode, why (a code and a sentence), and the effective rates compared (raw
    bytes made durable per second; None where not computed)."""

    mode: Mode
    why: Why
    reason: str
    compress_bytes_per_s: float | None = None
    raw_bytes_per_s: float | None = None


def decide(x: Inputs) -> Decision:
    """The mode of one write (see the module docstring for the rule and its order)."""
    if x.room_bytes is not None and x.room_bytes < SHORT_SPACE_WRITES * x.raw_bytes:
        return Decision(
            "compress",
            "space",
            f"space is short: {_gib(max(x.room_bytes, 0))} free above the disk guard, room for "
            f"fewer than {SHORT_SPACE_WRITES} raw writes of {_gib(x.raw_bytes)}",
        )
    if x.disk_bytes_per_s is None or x.codec_bytes_per_s_per_core is None:
        return Decision(
            "compress",
            "bootstrap",
            "no measurement yet: this write compresses and measures the disk and the codec",
        )
    cores = float(x.usable_cores)
    if x.free_cores is not None:
        cores = max(0.0, min(x.free_cores, cores))
    codec = x.codec_bytes_per_s_per_core * cores
    disk = x.disk_bytes_per_s
    on_cores = f"{_rate(codec)} on {cores:.1f} free core(s)"
    if x.ratio is None:
        # Whatever the ratio, compressing is no faster than the codec alone.
        if codec <= disk:
            return Decision(
                "raw",
                "disk-faster",
                f"the disk ({_rate(disk)}) outruns the codec ({on_cores}) whatever the ratio",
                codec,
                disk,
            )
        return Decision(
            "compress",
            "bootstrap",
            f"the codec ({on_cores}) could beat the disk ({_rate(disk)}): this write compresses "
            "and measures the job's ratio",
            codec,
            disk,
        )
    compress = min(codec, disk / max(x.ratio, 1e-6))
    rates = f"compressed {_rate(compress)} (codec {on_cores}, stored/raw {x.ratio:.2f})"
    vs = f"raw {_rate(disk)} (the disk)"
    margin = 1.0 + SWITCH_MARGIN if x.current is not None else 1.0
    if x.current == "raw":
        wins = compress > disk * margin
    elif x.current == "compress":
        wins = compress * margin >= disk
    else:
        wins = compress > disk
    if wins:
        if x.current == "compress" and compress <= disk:
            reason = (
                f"keeping compress: {vs} is within {SWITCH_MARGIN:.0%} of {rates}"
                if compress < disk
                else f"keeping compress: {rates} is as fast as {vs}"
            )
            return Decision("compress", "hold", reason, compress, disk)
        return Decision("compress", "faster", f"durable sooner: {rates} vs {vs}", compress, disk)
    if x.current == "raw" and compress > disk:
        why: Why = "hold"
        reason = f"keeping raw: {rates} is within {SWITCH_MARGIN:.0%} of {vs}"
    else:
        why = "disk-faster"
        reason = f"the disk outruns the codec: {vs} vs {rates}"
    if x.raw_streak >= REPROBE_WRITES and codec > disk * (1.0 + SWITCH_MARGIN):
        return Decision(
            "compress",
            "probe",
            f"raw for {x.raw_streak} writes; the ratio could change the answer: this write "
            f"compresses to measure it again ({reason})",
            compress,
            disk,
        )
    return Decision("raw", why, reason, compress, disk)


def _rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / _GB:.2f} GB/s"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


# ---- the free cores ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds at one moment: system-wide ``busy_s`` and ``total_s`` (all cores), this
    process's ``own_s``; ``at_s`` is a monotonic clock."""

    at_s: float
    busy_s: float
    total_s: float
    own_s: float


def read_cpu() -> CpuSample:
    """Now's :class:`CpuSample` (``/proc/stat`` and ``/proc/self/stat`` on Linux; no blocking)."""
    t = psutil.cpu_times()
    # Guest time is counted in user time already (Linux); idle and iowait are not busy.
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    busy = total - t.idle - getattr(t, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return CpuSample(time.monotonic(), busy, total, own.user + own.system)


class CpuMeter:
    """Free cores over the last :data:`CPU_WINDOW_S`: the CPUs minus what other processes (not
    this one) kept busy, from the samples taken by :meth:`sample` (each second, and at each
    decision). With no sample in the window it measures since the newest older one.
    ``cpus``: the machine's CPUs (what ``/proc/stat`` counts); ``usable``: those this process may
    run on (its affinity). ``read`` is the seam tests replace. Not thread-safe: :class:`AutoCodec`
    holds its lock."""

    def __init__(
        self,
        read: Callable[[], CpuSample] = read_cpu,
        *,
        cpus: int | None = None,
        usable: int | None = None,
        window_s: float = CPU_WINDOW_S,
    ) -> None:
        self.read = read
        self.cpus = cpus or psutil.cpu_count() or 1
        self.usable = min(self.cpus, usable or _usable_cpus())
        self.window_s = window_s
        self._samples: deque[CpuSample] = deque()
        self.last_free: float | None = None

    def sample(self) -> CpuSample:
        now = self.read()
        self._samples.append(now)
        while len(self._samples) > 2 and self._samples[1].at_s <= now.at_s - self.window_s:
            self._samples.popleft()
        return now

    def free_cores(self) -> float | None:
        """Sample now; the free cores since the oldest kept sample (None: too short to tell)."""
        now = self.sample()
        then = self._samples[0]
        wall = now.at_s - then.at_s
        total = now.total_s - then.total_s
        if wall < 0.05 or total <= 0:
            return self.last_free
        busy_cores = self.cpus * (now.busy_s - then.busy_s) / total
        own_cores = (now.own_s - then.own_s) / wall
        self.last_free = min(float(self.cpus), max(0.0, self.cpus - (busy_cores - own_cores)))
        return self.last_free


# ---- the daemon's chooser ----------------------------------------------------------------------


class WriteTimings(Protocol):
    """What :meth:`AutoCodec.observe` reads of a write
    (:class:`~ckptd.pipeline.write.WriteResult` has it)."""

    @property
    def written_bytes(self) -> int: ...
    @property
    def encoded_bytes(self) -> int: ...
    @property
    def encode_cpu_s(self) -> float: ...
    @property
    def disk_busy_s(self) -> float: ...


@dataclass(frozen=True)
class Choice:
    """One write's codec (``codec``, to hand the pipeline) and the decision behind it."""

    root: Path
    job: str
    codec: CodecConfig
    decision: Decision
    free_cores: float | None


@dataclass
class _Job:
    ratio: float | None = None
    mode: Mode | None = None
    raw_streak: int = 0


class AutoCodec:
    """The daemon's codec choice per write and the measurements it rests on (see the module
    docstring). ``space(root)`` returns ``(free bytes, bytes the disk guard keeps free)`` of
    ``root``'s filesystem (the daemon sets it to ``DiskGuard.space``; None: space never short).
    Thread-safe."""

    def __init__(
        self,
        *,
        space: Callable[[Path], tuple[int, int]] | None = None,
        cpu: CpuMeter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.space = space
        self.cpu = cpu or CpuMeter()
        self.clock = clock
        self._lock = threading.Lock()
        self.disk_bytes_per_s: float | None = None
        self.codec_bytes_per_s_per_core: float | None = None
        self._jobs: OrderedDict[tuple[Path, str], _Job] = OrderedDict()
        self._last: Choice | None = None
        self._last_at: float | None = None
        self._writes: dict[Mode, int] = {"compress": 0, "raw": 0}

    def sample_cpu(self) -> None:
        """Take a CPU sample (the daemon's ticker, about each second)."""
        with self._lock:
            self.cpu.sample()

    def choose(self, root: Path, job: str, raw_bytes: int, pipeline: PipelineConfig) -> Choice:
        """The codec of ``job``'s next write of ``raw_bytes`` under ``root`` with ``pipeline``."""
        configured = pipeline.codec
        room = self._room(root) if configured.codec == "auto" else None
        with self._lock:
            free = self.cpu.free_cores()
            state = self._job(root, job)
            if configured.codec != "auto":
                mode: Mode = "raw" if configured.codec == "raw" else "compress"
                decision = Decision(mode, "configured", f'codec.codec = "{configured.codec}"')
                codec = configured
            else:
                usable = min(pipeline.threads, self.cpu.usable)
                decision = decide(
                    Inputs(
                        raw_bytes=raw_bytes,
                        disk_bytes_per_s=self.disk_bytes_per_s,
                        codec_bytes_per_s_per_core=self.codec_bytes_per_s_per_core,
                        ratio=state.ratio,
                        free_cores=free,
                        usable_cores=max(1, usable),
                        room_bytes=room,
                        current=state.mode,
                        raw_streak=state.raw_streak,
                    )
                )
                codec = replace(
                    configured, codec=COMPRESSOR if decision.mode == "compress" else "raw"
                )
                if decision.why in ("faster", "disk-faster", "hold"):
                    state.mode = decision.mode
                state.raw_streak = state.raw_streak + 1 if decision.mode == "raw" else 0
            choice = Choice(root, job, codec, decision, free)
            self._last, self._last_at = choice, self.clock()
            self._writes[decision.mode] += 1
            return choice

    def observe(self, choice: Choice, result: WriteTimings) -> None:
        """Learn from the committed write ``choice`` was made for."""
        written = result.written_bytes
        encoded = result.encoded_bytes
        with self._lock:
            if written >= MIN_MEASURE_BYTES and result.disk_busy_s > 0:
                self.disk_bytes_per_s = _smooth(
                    self.disk_bytes_per_s, written / result.disk_busy_s, written
                )
            if choice.codec.codec not in _BYTEGROUP or encoded < MIN_MEASURE_BYTES:
                return
            if result.encode_cpu_s > 0:
                self.codec_bytes_per_s_per_core = _smooth(
                    self.codec_bytes_per_s_per_core, encoded / result.encode_cpu_s, encoded
                )
            state = self._job(choice.root, choice.job)
            state.ratio = _smooth(state.ratio, min(1.0, written / encoded), encoded)

    def status(self) -> dict[str, Any]:
        """For ``ckptd status``: the last choice, why, and the measurements (JSON-ready)."""
        with self._lock:
            last = self._last
            ratio = None
            if last is not None:
                state = self._jobs.get((last.root, last.job))
                ratio = state.ratio if state is not None else None
            return {
                "configured": None if last is None else self._configured(last),
                "choice": None if last is None else last.decision.mode,
                "codec": None if last is None else last.codec.codec,
                "why": None if last is None else last.decision.why,
                "reason": None if last is None else last.decision.reason,
                "job": None if last is None else last.job,
                "decided_at": self._last_at,
                "ratio": _round(ratio, 4),
                "disk_bytes_per_s": _round(self.disk_bytes_per_s, 0),
                "codec_bytes_per_s_per_core": _round(self.codec_bytes_per_s_per_core, 0),
                "free_cores": _round(self.cpu.last_free, 2),
                "cpus": self.cpu.cpus,
                "writes": dict(self._writes),
            }

    @staticmethod
    def _configured(choice: Choice) -> str:
        return "auto" if choice.decision.why != "configured" else choice.codec.codec

    def _job(self, root: Path, job: str) -> _Job:
        key = (root, job)
        state = self._jobs.get(key)
        if state is None:
            state = self._jobs[key] = _Job()
            while len(self._jobs) > MAX_JOBS:
                self._jobs.popitem(last=False)
        else:
            self._jobs.move_to_end(key)
        return state

    def _room(self, root: Path) -> int | None:
        if self.space is None:
            return None
        try:
            free, keep = self.space(root)
        except OSError:
            return None
        return free - keep


def _smooth(old: float | None, new: float, nbytes: int) -> float:
    if old is None:
        return new
    return old + SMOOTHING * min(1.0, nbytes / FULL_WEIGHT_BYTES) * (new - old)


def _round(value: float | None, digits: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
