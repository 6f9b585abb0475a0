"""``codec = "auto"``: the pure rule (:func:`decide`) as a table, its hysteresis, bootstrap, space
and probe; the free cores from CPU samples; and :class:`AutoCodec` learning from writes.

CPU samples and write timings are fakes (the seams :class:`CpuMeter` and :class:`WriteTimings`
give); the daemon test in ``tests/integration/daemon/test_auto_codec_daemon.py`` runs the real ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from ckptd.format.codec import CodecConfig
from ckptd.pipeline.auto import (
    COMPRESSOR,
    MAX_JOBS,
    MIN_MEASURE_BYTES,
    REPROBE_WRITES,
    SHORT_SPACE_WRITES,
    AutoCodec,
    CpuMeter,
    CpuSample,
    Decision,
    Inputs,
    decide,
)
from ckptd.pipeline.plan import PipelineConfig

GB = 1e9
GiB = 1 << 30
MiB = 1 << 20

BASE = Inputs(
    raw_bytes=GiB,
    disk_bytes_per_s=1 * GB,
    codec_bytes_per_s_per_core=0.5 * GB,
    ratio=0.8,
    free_cores=4.0,
    usable_cores=4,
    room_bytes=100 * GiB,
)
"""A 1 GiB write: a 1 GB/s disk, a 0.5 GB/s-per-core codec, 4 free cores, stored/raw 0.8:
compressed 1.25 GB/s (the disk over the ratio) against raw 1 GB/s."""


# ---- the rule -----------------------------------------------------------------------------------

TABLE = [
    ("compressing is faster on 4 free cores", {}, "compress", "faster"),
    ("no free core: the codec has nothing to run on", {"free_cores": 0.0}, "raw", "disk-faster"),
    ("one free core: the codec (0.5) is slower than the disk", {"free_cores": 1.0}, "raw", None),
    ("a fast disk outruns 4 cores of codec", {"disk_bytes_per_s": 3 * GB}, "raw", "disk-faster"),
    (
        "a slow disk: one core of codec still beats it",
        {"disk_bytes_per_s": 0.2 * GB, "free_cores": 1.0},
        "compress",
        "faster",
    ),
    ("incompressible data: never faster", {"ratio": 1.0}, "raw", "disk-faster"),
    ("free cores unknown: taken as all usable", {"free_cores": None}, "compress", "faster"),
    (
        "free cores beyond the pipeline's threads do not count",
        {"free_cores": 16.0, "usable_cores": 1},
        "raw",
        "disk-faster",
    ),
    ("nothing measured: compress to measure", {"disk_bytes_per_s": None}, "compress", "bootstrap"),
    (
        "the codec never measured: compress to measure",
        {"codec_bytes_per_s_per_core": None, "free_cores": 0.0},
        "compress",
        "bootstrap",
    ),
    (
        "a new job whose ratio could make compressing faster: measure it",
        {"ratio": None},
        "compress",
        "bootstrap",
    ),
    (
        "a new job, but the codec alone is slower than the disk: raw whatever the ratio",
        {"ratio": None, "free_cores": 1.5},
        "raw",
        "disk-faster",
    ),
    (
        "space short: compress even with no free core",
        {"free_cores": 0.0, "room_bytes": (SHORT_SPACE_WRITES - 1) * GiB},
        "compress",
        "space",
    ),
    (
        "room for exactly the short-space count of raw writes is not short",
        {"free_cores": 0.0, "room_bytes": SHORT_SPACE_WRITES * GiB},
        "raw",
        "disk-faster",
    ),
    (
        "already below the guard: short",
        {"free_cores": 0.0, "room_bytes": -5 * GiB},
        "compress",
        "space",
    ),
    ("space unknown: decided on speed", {"free_cores": 0.0, "room_bytes": None}, "raw", None),
]


@pytest.mark.parametrize(
    ("changes", "mode", "why"),
    [pytest.param(changes, mode, why, id=name) for name, changes, mode, why in TABLE],
)
def test_decide_table(changes: dict[str, object], mode: str, why: str | None) -> None:
    d = decide(replace(BASE, **changes))  # type: ignore[arg-type]
    assert d.mode == mode, d.reason
    if why is not None:
        assert d.why == why, d.reason


def test_the_rates_compared_are_the_effective_ones() -> None:
    d = decide(BASE)
    assert d.compress_bytes_per_s == pytest.approx(1.25 * GB)  # the disk over the ratio
    assert d.raw_bytes_per_s == pytest.approx(1 * GB)
    d = decide(replace(BASE, free_cores=1.0, disk_bytes_per_s=0.8 * GB))
    assert d.compress_bytes_per_s == pytest.approx(0.5 * GB)  # the codec on one core


def test_reasons_name_the_measurements() -> None:
    assert decide(BASE).reason == (
        "durable sooner: compressed 1.25 GB/s (codec 2.00 GB/s on 4.0 free core(s), "
        "stored/raw 0.80) vs raw 1.00 GB/s (the disk)"
    )
    assert decide(replace(BASE, free_cores=0.0)).reason == (
        "the disk outruns the codec: raw 1.00 GB/s (the disk) vs compressed 0.00 GB/s "
        "(codec 0.00 GB/s on 0.0 free core(s), stored/raw 0.80)"
    )
    assert decide(replace(BASE, room_bytes=GiB)).reason == (
        "space is short: 1.0 GiB free above the disk guard, room for fewer than 4 raw writes "
        "of 1.0 GiB"
    )


# ---- hysteresis ---------------------------------------------------------------------------------


def at_gain(gain: float, current: str | None) -> Decision:
    """Decide with compressing ``gain`` times as fast as raw (the codec bound: 4 cores)."""
    return decide(
        replace(
            BASE,
            codec_bytes_per_s_per_core=gain * GB / 4,
            ratio=0.01,
            current=current,  # type: ignore[arg-type]
        )
    )


@pytest.mark.parametrize(
    ("gain", "current", "mode", "why"),
    [
        (1.01, None, "compress", "faster"),
        (0.99, None, "raw", "disk-faster"),
        (1.10, "raw", "raw", "hold"),  # 10% faster is within the margin: stay raw
        (1.20, "raw", "compress", "faster"),
        (1.00, "raw", "raw", "disk-faster"),
        (1 / 1.10, "compress", "compress", "hold"),  # raw 10% faster: stay compressed
        (1.00, "compress", "compress", "hold"),
        (1 / 1.20, "compress", "raw", "disk-faster"),
        (1.05, "compress", "compress", "faster"),
    ],
)
def test_hysteresis(gain: float, current: str | None, mode: str, why: str) -> None:
    d = at_gain(gain, current)
    assert (d.mode, d.why) == (mode, why), d.reason


def test_hold_reasons_say_what_was_kept() -> None:
    assert at_gain(1.10, "raw").reason.startswith("keeping raw: compressed 1.10 GB/s")
    assert at_gain(1 / 1.10, "compress").reason.startswith(
        "keeping compress: raw 1.00 GB/s (the disk) is within 15% of compressed 0.91 GB/s"
    )


# ---- the probe ----------------------------------------------------------------------------------


def test_a_job_held_raw_long_compresses_once_when_the_ratio_could_change_the_answer() -> None:
    poor = replace(BASE, ratio=0.95, current="raw")  # codec 2 GB/s, but 0.95 of 1 GB/s disk
    assert decide(replace(poor, raw_streak=REPROBE_WRITES - 1)).mode == "raw"
    probe = decide(replace(poor, raw_streak=REPROBE_WRITES))
    assert (probe.mode, probe.why) == ("compress", "probe")
    assert probe.reason.startswith(f"raw for {REPROBE_WRITES} writes")


def test_no_probe_when_the_codec_alone_is_slower_than_the_disk() -> None:
    starved = replace(BASE, free_cores=1.0, current="raw", raw_streak=10 * REPROBE_WRITES)
    assert decide(starved).mode == "raw"


# ---- the free cores -----------------------------------------------------------------------------


class FakeCpu:
    """A machine of ``cpus`` cores: :meth:`run` advances it by ``seconds`` with ``other`` cores
    busy in other processes and ``own`` in this one."""

    def __init__(self, cpus: int) -> None:
        self.cpus = cpus
        self.now = CpuSample(100.0, 0.0, 0.0, 0.0)

    def run(self, seconds: float, other: float, own: float = 0.0) -> None:
        n = self.now
        self.now = CpuSample(
            n.at_s + seconds,
            n.busy_s + (other + own) * seconds,
            n.total_s + self.cpus * seconds,
            n.own_s + own * seconds,
        )

    def __call__(self) -> CpuSample:
        return self.now


def test_free_cores_leave_out_the_daemons_own_cpu() -> None:
    cpu = FakeCpu(8)
    meter = CpuMeter(cpu, cpus=8)
    assert meter.free_cores() is None  # one sample: nothing to compare
    cpu.run(2.0, other=5.0, own=2.0)
    assert meter.free_cores() == pytest.approx(3.0)


def test_free_cores_look_at_the_last_window_only() -> None:
    cpu = FakeCpu(4)
    meter = CpuMeter(cpu, cpus=4, window_s=5.0)
    meter.sample()
    cpu.run(60.0, other=0.0)  # a long idle minute ...
    for _ in range(6):
        meter.sample()
        cpu.run(1.0, other=4.0)  # ... then the ticker sees training on every core
    assert meter.free_cores() == pytest.approx(0.0)


def test_free_cores_without_a_ticker_span_the_time_since_the_last_decision() -> None:
    cpu = FakeCpu(4)
    meter = CpuMeter(cpu, cpus=4, window_s=5.0)
    meter.free_cores()
    cpu.run(60.0, other=1.0)
    assert meter.free_cores() == pytest.approx(3.0)


def test_free_cores_need_a_measurable_window_and_are_clamped() -> None:
    cpu = FakeCpu(2)
    meter = CpuMeter(cpu, cpus=2)
    meter.sample()
    cpu.run(0.01, other=0.0)
    assert meter.free_cores() is None  # 10 ms: too short to tell
    cpu.run(1.0, other=3.0)  # more busy than there are cores (counters read apart): none free
    assert meter.free_cores() == 0.0


# ---- the daemon's chooser -----------------------------------------------------------------------


@dataclass(frozen=True)
class Timings:
    written_bytes: int
    encoded_bytes: int
    encode_cpu_s: float
    disk_busy_s: float


ROOT = Path("/ckpt")
AUTO = PipelineConfig(threads=4)


def wrote(auto: AutoCodec, job: str, raw: int, *, ratio: float, disk: float, codec: float) -> str:
    """Choose for a write of ``raw`` bytes of ``job``, then observe it at these rates (bytes per
    second; ``codec`` per core); return the codec it was written with."""
    choice = auto.choose(ROOT, job, raw, AUTO)
    compressed = choice.codec.codec != "raw"
    stored = int(raw * ratio) if compressed else raw
    auto.observe(
        choice,
        Timings(stored, raw, raw / codec if compressed else 0.0, stored / disk),
    )
    return choice.codec.codec


def make_auto(cpus: int = 4, **kwargs: object) -> tuple[AutoCodec, FakeCpu]:
    cpu = FakeCpu(cpus)
    meter = CpuMeter(cpu, cpus=cpus, usable=cpus)
    return AutoCodec(cpu=meter, clock=lambda: 1000.0, **kwargs), cpu  # type: ignore[arg-type]


def test_first_write_compresses_then_the_measurements_decide() -> None:
    auto, cpu = make_auto()
    assert wrote(auto, "j", 256 * MiB, ratio=0.8, disk=2 * GB, codec=0.5 * GB) == COMPRESSOR
    st = auto.status()
    assert (st["choice"], st["why"], st["configured"]) == ("compress", "bootstrap", "auto")
    assert st["disk_bytes_per_s"] == 2 * GB
    assert st["codec_bytes_per_s_per_core"] == 0.5 * GB
    assert st["ratio"] == 0.8
    # A 2 GB/s disk against 4 x 0.5 GB/s of codec at 0.8: 2.0 vs 2.0; no free core at all now.
    cpu.run(5.0, other=4.0)
    assert wrote(auto, "j", 256 * MiB, ratio=0.8, disk=2 * GB, codec=0.5 * GB) == "raw"
    st = auto.status()
    assert (st["choice"], st["why"], st["free_cores"]) == ("raw", "disk-faster", 0.0)
    assert st["writes"] == {"compress": 1, "raw": 1}
    json.dumps(st)


def test_raw_writes_measure_the_disk_but_not_the_codec() -> None:
    auto, cpu = make_auto()
    wrote(auto, "j", 256 * MiB, ratio=0.5, disk=1 * GB, codec=1 * GB)
    cpu.run(5.0, other=4.0)
    assert wrote(auto, "j", 256 * MiB, ratio=0.5, disk=4 * GB, codec=9 * GB) == "raw"
    assert auto.disk_bytes_per_s is not None and auto.disk_bytes_per_s > 1 * GB
    assert auto.codec_bytes_per_s_per_core == pytest.approx(1 * GB)
    assert auto.status()["ratio"] == 0.5


def test_small_writes_leave_the_rates_alone() -> None:
    auto, _ = make_auto()
    wrote(auto, "j", MIN_MEASURE_BYTES - 1, ratio=0.5, disk=1 * GB, codec=1 * GB)
    st = auto.status()
    assert (st["disk_bytes_per_s"], st["codec_bytes_per_s_per_core"], st["ratio"]) == (
        None,
        None,
        None,
    )


def test_noise_around_the_break_even_does_not_flip_every_write() -> None:
    auto, cpu = make_auto()
    # Compressed 4 cores x 0.25 GB/s = 1 GB/s against a disk of 1 GB/s +- 8%.
    modes = []
    for i in range(40):
        cpu.run(5.0, other=0.0)
        disk = (1.08 if i % 2 else 0.92) * GB
        modes.append(wrote(auto, "j", 256 * MiB, ratio=0.3, disk=disk, codec=0.25 * GB))
    assert len(set(modes[1:])) == 1, modes  # after the first (bootstrap) write, one mode


def test_training_taking_the_cores_switches_to_raw_and_back() -> None:
    auto, cpu = make_auto()
    seen = []
    for busy in [0.0] * 3 + [4.0] * 3 + [0.0] * 3:
        cpu.run(5.0, other=busy)
        seen.append(wrote(auto, "j", 256 * MiB, ratio=0.5, disk=1 * GB, codec=0.5 * GB))
    assert seen == [COMPRESSOR] * 3 + ["raw"] * 3 + [COMPRESSOR] * 3


def test_each_job_has_its_own_ratio() -> None:
    auto, cpu = make_auto()
    cpu.run(5.0, other=2.0)  # 2 free cores: codec 1 GB/s against a 0.5 GB/s disk
    assert wrote(auto, "floats", 256 * MiB, ratio=0.3, disk=0.5 * GB, codec=0.5 * GB) == COMPRESSOR
    assert wrote(auto, "floats", 256 * MiB, ratio=0.3, disk=0.5 * GB, codec=0.5 * GB) == COMPRESSOR
    assert wrote(auto, "noise", 256 * MiB, ratio=1.0, disk=0.5 * GB, codec=0.5 * GB) == COMPRESSOR
    assert wrote(auto, "noise", 256 * MiB, ratio=1.0, disk=0.5 * GB, codec=0.5 * GB) == "raw"
    assert wrote(auto, "floats", 256 * MiB, ratio=0.3, disk=0.5 * GB, codec=0.5 * GB) == COMPRESSOR


def test_a_probe_does_not_change_the_jobs_mode() -> None:
    auto, cpu = make_auto()
    cpu.run(5.0, other=0.0)
    wrote(auto, "j", 256 * MiB, ratio=1.0, disk=1 * GB, codec=1 * GB)  # bootstrap
    codecs = [
        wrote(auto, "j", 256 * MiB, ratio=1.0, disk=1 * GB, codec=1 * GB)
        for _ in range(2 * REPROBE_WRITES + 2)
    ]
    probes = [i for i, c in enumerate(codecs) if c != "raw"]
    assert probes == [REPROBE_WRITES, 2 * REPROBE_WRITES + 1]


def test_space_short_compresses_and_a_failing_statvfs_is_ignored() -> None:
    room = {"free": 100 * GiB}

    def space(root: Path) -> tuple[int, int]:
        assert root == ROOT
        if room["free"] < 0:
            raise OSError("stale NFS handle")
        return room["free"], GiB

    auto, cpu = make_auto(space=space)
    wrote(auto, "j", GiB, ratio=0.8, disk=2 * GB, codec=0.5 * GB)
    cpu.run(5.0, other=4.0)
    assert wrote(auto, "j", GiB, ratio=0.8, disk=2 * GB, codec=0.5 * GB) == "raw"
    room["free"] = 3 * GiB
    cpu.run(5.0, other=4.0)
    assert wrote(auto, "j", GiB, ratio=0.8, disk=2 * GB, codec=0.5 * GB) == COMPRESSOR
    assert auto.status()["why"] == "space"
    room["free"] = -1
    cpu.run(5.0, other=4.0)
    assert wrote(auto, "j", GiB, ratio=0.8, disk=2 * GB, codec=0.5 * GB) == "raw"


@pytest.mark.parametrize("fixed", ["raw", "zstd", "bytegroup"])
def test_explicit_codecs_are_fixed_and_still_measured(fixed: str) -> None:
    auto, cpu = make_auto(space=lambda _root: (0, GiB))  # space short: ignored when fixed
    config = PipelineConfig(codec=CodecConfig(codec=fixed, level=3))  # type: ignore[arg-type]
    for busy in (0.0, 4.0):
        cpu.run(5.0, other=busy)
        choice = auto.choose(ROOT, "j", 256 * MiB, config)
        assert choice.codec == config.codec
        auto.observe(choice, Timings(128 * MiB, 256 * MiB, 0.5, 0.1))
    st = auto.status()
    assert (st["configured"], st["codec"], st["why"]) == (fixed, fixed, "configured")
    assert st["reason"] == f'codec.codec = "{fixed}"'
    assert st["disk_bytes_per_s"] == round(128 * MiB / 0.1)
    # Only the compressor auto uses is timed (0.5 s of CPU for 256 MiB, twice).
    timed = st["codec_bytes_per_s_per_core"]
    assert timed == (round(512 * MiB) if fixed == "bytegroup" else None)


def test_the_level_is_kept_when_compressing() -> None:
    auto, _ = make_auto()
    choice = auto.choose(ROOT, "j", GiB, PipelineConfig(codec=CodecConfig(level=5)))
    assert choice.codec == CodecConfig(codec=COMPRESSOR, level=5)


def test_status_before_any_write_is_empty_but_complete() -> None:
    auto, _ = make_auto()
    st = auto.status()
    assert st["choice"] is None and st["reason"] is None
    assert st["cpus"] == 4 and st["writes"] == {"compress": 0, "raw": 0}
    json.dumps(st)


def test_jobs_remembered_are_bounded() -> None:
    auto, _ = make_auto()
    for i in range(MAX_JOBS + 10):
        auto.choose(ROOT, f"j{i}", MiB, AUTO)
    assert len(auto._jobs) == MAX_JOBS
