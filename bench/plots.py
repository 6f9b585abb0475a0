"""Plots of the benchmark results (matplotlib, Agg backend): reads the JSON lines in
``bench/results/`` and writes PNGs next to them.

* ``stall_vs_size.png``: how long the caller is blocked per checkpoint, against the state size:
  ``snapshot_bench-<size>.jsonl`` (``blocked_s``) and the blocking saves of
  ``store_bench-<size>.jsonl`` (blocked = the whole save);
* ``durable_vs_size.png``: seconds until the checkpoint is durable (``done_s`` of the snapshot
  bench; the save seconds of the store bench);
* ``scaling.png``: the steady ckptd stall and the copy floor against the state size on linear
  axes, with their least-squares lines, and the daemon's peak memory beyond the mapped slots
  (``RssAnon``) against a private copy of the state (:mod:`bench.scaling`);
* ``goodput.png``: training throughput with each checkpointing method as % of the loop without
  checkpoints (``goodput_bench.jsonl``), median with min-max bars.

Lines are medians over reps, with the min-max range shaded. ``*-quick.jsonl`` files (smoke runs)
are ignored. A plot whose data is missing is skipped with a printed reason.

Run: ``.venv/bin/python -m bench.plots [--results DIR] [--out DIR]``.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from bench._common import add_results_arg, bench_parser
from bench.scaling import SMALL_BYTES, Scaling, analyse, read_points

MB = 1_000_000


@dataclass
class Series:
    """One line: (state MB, median, min, max) points, sorted by size."""

    label: str
    points: list[tuple[float, float, float, float]] = field(default_factory=list)

    def add(self, size_mb: float, spread: dict[str, Any]) -> None:
        self.points.append((size_mb, spread["median"], spread["min"], spread["max"]))
        self.points.sort()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def result_files(results: Path, prefix: str) -> list[Path]:
    """The synthetic-size results: not the smoke runs (``-quick``), not the MiniLM model."""
    return sorted(
        p for p in results.glob(f"{prefix}-*.jsonl") if not p.stem.endswith(("-quick", "-minilm"))
    )


def size_series(results: Path, metric: str) -> dict[str, Series]:
    """``metric`` "stall" or "durable": one series per method, over the sizes present."""
    series: dict[str, Series] = {}
    for path in result_files(results, "snapshot_bench"):
        for rec in read_jsonl(path):
            if rec.get("kind") != "method":
                continue
            spread = rec.get("blocked_s") if metric == "stall" else rec.get("done_s")
            size = rec.get("state_bytes")
            if not spread or not size:
                continue
            label = f"snapshot_bench: {rec.get('label', rec['method'])}"
            series.setdefault(label, Series(label)).add(size / MB, spread)
    for path in result_files(results, "store_bench"):
        for rec in read_jsonl(path):
            if rec.get("kind") != "store" or rec.get("phase") != "save":
                continue
            size = rec.get("state_bytes") or rec.get("raw_bytes")
            if not size or not rec.get("seconds"):
                continue
            label = f"store_bench: {rec.get('label', rec['method'])} (blocking)"
            series.setdefault(label, Series(label)).add(size / MB, rec["seconds"])
    return series


def minor_labels(axis: Any) -> FuncFormatter:
    """Label every minor tick of a log axis spanning up to ~1.5 decades, else only 2x and 5x."""

    def fmt(v: float, _pos: int | None) -> str:
        lo, hi = axis.get_view_interval()
        few = lo > 0 and hi / lo <= 30
        return f"{v:g}" if few or f"{v:.0e}"[0] in "25" else ""

    return FuncFormatter(fmt)


def plot_vs_size(series: dict[str, Series], title: str, ylabel: str, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    markers = "osD^v<>ph*"
    for i, s in enumerate(sorted(series.values(), key=lambda s: s.label)):
        xs = [p[0] for p in s.points]
        med = [p[1] for p in s.points]
        lo = [p[2] for p in s.points]
        hi = [p[3] for p in s.points]
        style = "--" if s.label.startswith("store_bench") else "-"
        (line,) = ax.plot(xs, med, style, marker=markers[i % len(markers)], label=s.label)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.10, linewidth=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(minor_labels(axis))
    ax.set_xlabel("state size (MB, log)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_scaling(s: Scaling, out: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=110)
    xs = [p.gb for p in s.points]
    top = max(xs) * 1.05
    # Lines through the sizes that leave memory free (when there are enough), extrapolated: the
    # larger sizes show how far memory pressure takes them off the line.
    small = [p for p in s.points if p.state_bytes <= SMALL_BYTES]
    fitted = analyse(small) if 3 <= len(small) < len(s.points) else s
    span = "<= 1.5 GB" if fitted is not s else "all sizes"
    series = [("copy_, one pass (floor)", [p.floor_s for p in s.points], fitted.floor, "o")]
    if fitted.warm is not None:
        warm = [p.warm_floor_s or 0.0 for p in s.points]
        series.append(("copy_, warm (memory bandwidth)", warm, fitted.warm, "^"))
    series.append(("ckptd snapshot(), steady", [p.stall_s for p in s.points], fitted.stall, "s"))
    for label, ys, line, marker in series:
        (dots,) = left.plot(xs, [y * 1e3 for y in ys], marker, label=label)
        left.plot(
            [0, top],
            [line.intercept * 1e3, (line.intercept + line.slope * top) * 1e3],
            "-",
            color=dots.get_color(),
            alpha=0.6,
            label=f"fit {span}: {line.slope * 1e3:.0f} ms/GB {line.intercept * 1e3:+.0f} ms",
        )
    left.set_xlabel("state size (GB)")
    left.set_ylabel("ms blocked (median)")
    ref = "warm copy" if fitted.warm is not None else "copy"
    left.set_title(f"Stall vs size: ckptd slope / {ref} slope {fitted.slope_ratio:.2f} ({span})")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    rss = [(p.gb, p.rss_anon_peak_mib, p.rss_anon_idle_mib) for p in s.points]
    right.plot(
        [x for x, peak, _ in rss if peak is not None],
        [peak for _, peak, _ in rss if peak is not None],
        "s-",
        label="daemon peak RssAnon while persisting",
    )
    right.plot(
        [x for x, _, idle in rss if idle is not None],
        [idle for _, _, idle in rss if idle is not None],
        "o:",
        label="daemon idle RssAnon",
    )
    right.plot([0, top], [0, top * 1e9 / (1 << 20)], "--", color="grey", label="a private copy")
    right.set_xlabel("state size (GB)")
    right.set_ylabel("MiB")
    right.set_title("Daemon memory beyond the mapped slots")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_goodput(records: list[dict[str, Any]], out: Path) -> None:
    recs = [r for r in records if r.get("kind") == "goodput"]
    labels = [r["label"] for r in recs]
    med = [r["pct_of_none"]["median"] for r in recs]
    err = [
        [m - r["pct_of_none"]["min"] for m, r in zip(med, recs, strict=True)],
        [r["pct_of_none"]["max"] - m for m, r in zip(med, recs, strict=True)],
    ]
    first = recs[0]
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    colors = ["#999999" if r["method"] == "none" else "#3b75af" for r in recs]
    colors = ["#d6604d" if r["method"] == "ckptd" else c for r, c in zip(recs, colors, strict=True)]
    bars = ax.barh(labels, med, xerr=err, color=colors, capsize=4)
    for bar, m in zip(bars, med, strict=True):  # inside the bar, clear of the error bars
        y = bar.get_y() + bar.get_height() / 2
        ax.text(2, y, f"{m:.1f}%", va="center", color="white", fontsize=10, fontweight="bold")
    ax.invert_yaxis()
    ax.set_xlim(0, max(110.0, max(r["pct_of_none"]["max"] for r in recs) + 12))
    ax.axvline(100, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel("training steps/s, % of the loop without checkpoints (median, min-max bars)")
    state_mb = first.get("state_bytes", 0) / MB
    shares = [f for r in recs for f in r.get("foreign_cpu") or [] if f is not None]
    busy = statistics.median(shares) if shares else None
    ax.set_title(
        f"Goodput: {state_mb:.0f} MB state, checkpoint every {first.get('every', '?')} of "
        f"{first.get('steps', '?')} steps, {first.get('reps', '?')} rep(s)"
        + (f"\nother processes used {busy:.0%} of the CPUs (median over runs)" if busy else "")
    )
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    add_results_arg(ap)
    ap.add_argument("--out", type=Path, default=None, help="where PNGs go (default: --results)")
    args = ap.parse_args(argv)
    results: Path = args.results
    out: Path = args.out or results
    out.mkdir(parents=True, exist_ok=True)
    written = []

    for metric, name, title, ylabel in (
        (
            "stall",
            "stall_vs_size.png",
            "Caller blocked per checkpoint vs state size",
            "seconds blocked (median, min-max shaded; log)",
        ),
        (
            "durable",
            "durable_vs_size.png",
            "Time until the checkpoint is durable vs state size",
            "seconds until durable (median, min-max shaded; log)",
        ),
    ):
        series = size_series(results, metric)
        if not series:
            print(f"{name}: skipped: no snapshot_bench-*.jsonl or store_bench-*.jsonl in {results}")
            continue
        plot_vs_size(series, title, ylabel, out / name)
        written.append(out / name)

    points = read_points(results)
    if len(points) < 2:
        print(f"scaling.png: skipped: snapshot_bench results at fewer than 2 sizes in {results}")
    else:
        plot_scaling(analyse(points), out / "scaling.png")
        written.append(out / "scaling.png")

    goodput = results / "goodput_bench.jsonl"
    if not goodput.exists():
        print(f"goodput.png: skipped: {goodput} does not exist (run bench.goodput_bench)")
    elif not any(r.get("kind") == "goodput" for r in read_jsonl(goodput)):
        print(f"goodput.png: skipped: no goodput records in {goodput}")
    else:
        plot_goodput(read_jsonl(goodput), out / "goodput.png")
        written.append(out / "goodput.png")

    for p in written:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
