"""Scaling: does ckptd's snapshot stall grow with the state at the memory-copy slope, and does the
daemon's memory stay flat?

Reads the snapshot benchmark's results for the synthetic sizes (``snapshot_bench-64MiB.jsonl``,
``-256MiB``, ``-1GiB``, ``-4GiB``; the MiniLM run is a different model and is left out) and, per
size: the median copy floor and steady ckptd stall, their difference (what ckptd adds on top of the
copy), their ratio, and the daemon's peak and idle ``RssAnon`` while persisting (memory beyond the
mapped slots). Then a least-squares line ``seconds = fixed + slope x GB`` through the medians of the
floor and of ckptd, and one through the daemon's peak RssAnon.

"Stall linear at the copy slope" reads as: ckptd's slope / the floor's slope close to 1, with a
small fixed cost (state-dict collection, the layout, the hand-off round trip). "Memory flat" reads
as: the RssAnon slope is a few MiB per GB, against the GB per GB a process that copies or
serializes the state in private memory would need.

Run: ``.venv/bin/python -m bench.scaling [--results DIR] [--out PATH]``; prints a markdown table
and writes JSON lines (default ``bench/results/scaling.jsonl``). ``python -m bench.plots`` draws
``scaling.png`` from the same data.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench._common import MB, MiB, add_results_arg, bench_parser, markdown_table

SIZE_TAGS = ("64MiB", "256MiB", "1GiB", "4GiB")
GB = 1e9
# Also fit the sizes up to this: at 4 GiB the run holds ~20 GiB (state, copy buffers, two slots)
# and copies into memory that was not just used slow down for reasons outside ckptd.
SMALL_BYTES = int(1.5e9)


@dataclass(frozen=True)
class Point:
    """One state size: medians over the run's reps."""

    size: str
    state_bytes: int
    reps: int
    floor_s: float
    warm_floor_s: float | None  # median of the two copies right after the floor's (warm memory)
    stall_s: float
    durable_s: float | None
    stall_vs_floor: float  # median over reps of the per-rep ratio
    rss_anon_peak_mib: float | None
    rss_anon_idle_mib: float | None

    @property
    def gb(self) -> float:
        return self.state_bytes / GB


@dataclass(frozen=True)
class Line:
    """``y = intercept + slope * x`` by least squares, and the largest residual."""

    intercept: float
    slope: float
    max_residual: float


def fit(xs: Sequence[float], ys: Sequence[float]) -> Line:
    """Ordinary least squares through at least two points with distinct ``xs``."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError("a line needs at least two points at different sizes")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    worst = max(abs(y - (intercept + slope * x)) for x, y in zip(xs, ys, strict=True))
    return Line(intercept, slope, worst)


def read_point(path: Path) -> Point | None:
    """The point of one ``snapshot_bench-<size>.jsonl``; None if it lacks the floor or ckptd."""
    methods: dict[str, dict[str, Any]] = {}
    memory: dict[str, Any] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") == "method":
            methods[rec["method"]] = rec
        elif rec.get("kind") == "daemon_memory" and rec.get("daemon") == "default":
            memory = rec
    floor, ckptd = methods.get("floor"), methods.get("ckptd")
    if floor is None or ckptd is None or not floor.get("blocked_s") or not ckptd.get("blocked_s"):
        return None
    floor_s, stall_s = float(floor["blocked_s"]["median"]), float(ckptd["blocked_s"]["median"])
    warm = (floor.get("extra") or {}).get("warm_s")
    ratio = (ckptd.get("blocked_vs_floor") or {}).get("median")
    done = ckptd.get("done_s") or {}
    return Point(
        size=str(ckptd.get("size")),
        state_bytes=int(ckptd["state_bytes"]),
        reps=int(ckptd.get("reps") or len(ckptd["blocked_s"].get("reps", []))),
        floor_s=floor_s,
        warm_floor_s=float(warm["median"]) if warm else None,
        stall_s=stall_s,
        durable_s=float(done["median"]) if done.get("median") is not None else None,
        stall_vs_floor=float(ratio) if ratio is not None else stall_s / floor_s,
        rss_anon_peak_mib=memory["peak_rss_anon"] / MiB if memory else None,
        rss_anon_idle_mib=memory["idle_rss_anon"] / MiB if memory else None,
    )


def read_points(results: Path) -> list[Point]:
    points = []
    for tag in SIZE_TAGS:
        path = results / f"snapshot_bench-{tag}.jsonl"
        if path.exists():
            point = read_point(path)
            if point is not None:
                points.append(point)
    return sorted(points, key=lambda p: p.state_bytes)


@dataclass(frozen=True)
class Scaling:
    points: list[Point]
    floor: Line
    warm: Line | None  # through the warm copies, when every size has them
    stall: Line
    rss: Line | None

    @property
    def slope_ratio(self) -> float:
        """ckptd's slope over the copy's: the warm copy's when measured (memory bandwidth), else
        the single pass's."""
        return self.stall.slope / (self.warm or self.floor).slope


def analyse(points: Sequence[Point]) -> Scaling:
    xs = [p.gb for p in points]
    floor = fit(xs, [p.floor_s for p in points])
    warms = [p.warm_floor_s for p in points]
    warm = fit(xs, [w for w in warms if w is not None]) if None not in warms else None
    stall = fit(xs, [p.stall_s for p in points])
    with_rss = [p for p in points if p.rss_anon_peak_mib is not None]
    rss = (
        fit([p.gb for p in with_rss], [p.rss_anon_peak_mib or 0.0 for p in with_rss])
        if len({p.state_bytes for p in with_rss}) >= 2
        else None
    )
    return Scaling(list(points), floor, warm, stall, rss)


def report(s: Scaling) -> str:
    rows = [
        [
            p.size,
            f"{p.state_bytes / MB:.0f}",
            str(p.reps),
            f"{p.floor_s * 1e3:.1f}",
            "-" if p.warm_floor_s is None else f"{p.warm_floor_s * 1e3:.1f}",
            f"{p.stall_s * 1e3:.1f}",
            f"{(p.stall_s - p.floor_s) * 1e3:+.1f}",
            f"{p.stall_vs_floor:.2f}",
            "-" if p.durable_s is None else f"{p.durable_s:.2f}",
            "-" if p.rss_anon_peak_mib is None else f"{p.rss_anon_peak_mib:.0f}",
            "-" if p.rss_anon_idle_mib is None else f"{p.rss_anon_idle_mib:.0f}",
        ]
        for p in s.points
    ]
    table = markdown_table(
        [
            "size",
            "state MB",
            "reps",
            "copy floor ms",
            "warm copy ms",
            "ckptd stall ms",
            "stall - floor ms",
            "stall / floor",
            "durable s",
            "daemon peak RssAnon MiB",
            "idle MiB",
        ],
        rows,
    )
    lines = [
        table,
        "",
        f"- copy floor (one pass): {s.floor.slope * 1e3:.1f} ms per GB "
        f"({s.floor.intercept * 1e3:+.1f} ms fixed; largest residual "
        f"{s.floor.max_residual * 1e3:.1f} ms)",
        *(
            [
                f"- warm copy (memory bandwidth): {s.warm.slope * 1e3:.1f} ms per GB "
                f"({s.warm.intercept * 1e3:+.1f} ms fixed; largest residual "
                f"{s.warm.max_residual * 1e3:.1f} ms)"
            ]
            if s.warm
            else []
        ),
        f"- ckptd steady stall: {s.stall.slope * 1e3:.1f} ms per GB "
        f"({s.stall.intercept * 1e3:+.1f} ms fixed; largest residual "
        f"{s.stall.max_residual * 1e3:.1f} ms)",
        f"- stall slope / {'warm ' if s.warm else ''}copy slope: {s.slope_ratio:.2f}",
    ]
    if s.rss is not None:
        lines.append(
            f"- daemon peak RssAnon: {s.rss.slope:+.1f} MiB per GB of state "
            f"({s.rss.intercept:.0f} MiB at zero; largest residual {s.rss.max_residual:.0f} MiB)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    add_results_arg(ap)
    ap.add_argument("--out", type=Path, default=None, help="JSON lines file to write")
    args = ap.parse_args(argv)
    points = read_points(args.results)
    if len(points) < 2:
        found = ", ".join(p.size for p in points) or "none"
        print(
            f"scaling: need snapshot_bench results at two or more of {', '.join(SIZE_TAGS)} in "
            f"{args.results} (found: {found}); run bench/snapshot_bench.py --size SIZE",
            file=sys.stderr,
        )
        return 2
    s = analyse(points)
    print(f"### Scaling of the snapshot stall and the daemon's memory ({len(points)} sizes)\n")
    print(report(s))
    small = [p for p in points if p.state_bytes <= SMALL_BYTES]
    if 3 <= len(small) < len(points):
        sub = analyse(small)
        print(
            f"\nUp to {SMALL_BYTES / GB:.1f} GB only ({', '.join(p.size for p in small)}: "
            "states that leave most of the machine's memory free):\n"
        )
        print("\n".join(report(sub).splitlines()[len(small) + 3 :]))
    out: Path = args.out or args.results / "scaling.jsonl"
    with out.open("w", encoding="utf-8") as f:
        for p in s.points:
            f.write(json.dumps({"kind": "point", **asdict(p)}) + "\n")
        fits = (("floor", s.floor), ("warm", s.warm), ("stall", s.stall), ("rss_anon_peak", s.rss))
        for name, line in fits:
            if line is not None:
                f.write(json.dumps({"kind": "fit", "what": name, **asdict(line)}) + "\n")
        f.write(json.dumps({"kind": "slope_ratio", "value": s.slope_ratio}) + "\n")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
