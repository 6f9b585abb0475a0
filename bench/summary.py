"""The README's benchmark tables, from the JSON lines in ``bench/results/``.

Every table in the README's benchmark sections is printed by this script from the result files
the benchmarks wrote, so the README can be regenerated (and checked) instead of copied by hand:

* goodput (``goodput_bench.jsonl``): steps/s as % of the loop without checkpoints, stall per
  checkpoint, time from the loop's end to the last durable checkpoint;
* snapshot by size (``snapshot_bench-<size>.jsonl``): copy floor, ckptd's steady stall, the best
  ``dcp.async_save`` stall, ``torch.save`` + fsync, durable latency, the daemon's peak RssAnon;
* the whole snapshot table for one size (``--size``, default 1GiB);
* fixed cost per snapshot (``snapshot_bench-{demo,64MiB}.jsonl``): the steady stall minus the
  copy floor of the same rep, against the 2 ms target;
* the loop (``overlap_bench-1GiB.jsonl``): what one snapshot adds to a training iteration, with
  ``overlap=True``, today's path, ``dcp.async_save`` and the copy floor;
* store (``store_bench-<size>.jsonl``): saves and restores;
* codec (``codec_bench.jsonl``);
* multi-rank (``ranks_bench.jsonl``): stall per rank and time to the global commit beside
  ``dcp.async_save``, as :mod:`bench.ranks_bench` prints it;
* the targets of the store and daemon issues, met or missed;
* the figures the README states in prose (:func:`prose`): the scaling paragraph (the fits of
  :mod:`bench.scaling` through the snapshot runs), the stall ratios by size and what ckptd adds
  to the copy.

``bench/README.md`` shows the tables as printed here (and :mod:`bench.scaling`'s table and fits);
the README shows the same tables and the prose; ``tests/unit/bench/test_bench_summary.py``
checks both.

Run: ``.venv/bin/python -m bench.summary [--results DIR] [--size 1GiB]``.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import scaling
from bench._common import MB, MiB, add_results_arg, bench_parser, markdown_table

SNAPSHOT_SIZES = ("64MiB", "256MiB", "minilm", "1GiB", "4GiB")
DCP_ASYNC = ("dcp.async-default", "dcp.async-reused", "dcp.async-process")
TARGET_SIZES = ("1GiB", "4GiB")
"""The sizes the issues' stall, latency and memory targets are set for."""
FIXED_COST_SIZES = ("demo", "64MiB")
"""The sizes the fixed-cost target (steady stall - copy floor <= 2 ms) is set for."""
FIXED_COST_LIMIT_S = 0.002
Record = dict[str, Any]


def read(path: Path) -> list[Record]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def spread(s: Record | None, digits: int = 3) -> str:
    if not s:
        return "—"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def med(s: Record | None) -> float | None:
    return None if not s else float(s["median"])


def fmt(v: float | None, digits: int = 3, suffix: str = "") -> str:
    return "—" if v is None else f"{v:.{digits}f}{suffix}"


def goodput(results: Path) -> str | None:
    recs = [r for r in read(results / "goodput_bench.jsonl") if r.get("kind") == "goodput"]
    if not recs:
        return None
    first = recs[0]
    rows = [
        [
            r["label"],
            "100 (reference)" if r["method"] == "none" else spread(r["pct_of_none"], 1),
            "—" if r["method"] == "none" else spread(r["stall_per_checkpoint_s"]),
            "—" if r["method"] == "none" else fmt(med(r["tail_s"]), 2),
        ]
        for r in recs
    ]
    shares = [f for r in recs for f in r.get("foreign_cpu") or [] if f is not None]
    head = (
        f"{first['params'] / 1e6:.1f}M-parameter transformer LM, "
        f"{first['state_bytes'] / MB:.0f} MB of model + AdamW state, a checkpoint every "
        f"{first['every']} of {first['steps']} steps, "
        f"median [min-max] of {first['reps']} reps (--reps {first['reps']}), each method's run "
        "paired with a no-checkpoint run right before it; other processes used at most "
        f"{max(shares, default=0):.0%} of the CPUs in any run"
    )
    return (
        head
        + "\n\n"
        + markdown_table(
            ["method", "steps/s, % of no checkpoints", "stall s / checkpoint", "end → durable s"],
            rows,
        )
    )


@dataclass
class SnapshotRun:
    """One ``snapshot_bench-<size>.jsonl``: its method rows, the default daemon's memory record
    and its target records."""

    methods: dict[str, Record] = field(default_factory=dict)
    memory: Record | None = None
    targets: list[Record] = field(default_factory=list)


def snapshot_runs(results: Path) -> dict[str, SnapshotRun]:
    runs: dict[str, SnapshotRun] = {}
    for tag in SNAPSHOT_SIZES:
        recs = read(results / f"snapshot_bench-{tag}.jsonl")
        if not recs:
            continue
        run = runs[tag] = SnapshotRun()
        for r in recs:
            if r.get("kind") == "method":
                run.methods[r["method"]] = r
            elif r.get("kind") == "daemon_memory" and r.get("daemon") == "default":
                run.memory = r
            elif r.get("kind") == "target":
                run.targets.append(r)
    return runs


def best_dcp_async(run: SnapshotRun) -> Record | None:
    present = [run.methods[m] for m in DCP_ASYNC if m in run.methods]
    return min(present, key=lambda r: r["blocked_s"]["median"]) if present else None


def snapshot_by_size(results: Path) -> str | None:
    runs = snapshot_runs(results)
    rows = []
    for tag, run in runs.items():
        m = run.methods
        floor, ckptd, torch_save = m.get("floor"), m.get("ckptd"), m.get("torch.save")
        if not (floor and ckptd and torch_save):
            continue
        dcp = best_dcp_async(run)
        mem = run.memory
        name = "MiniLM-L6 + AdamW" if tag == "minilm" else tag
        rows.append(
            [
                f"{name} ({ckptd['state_bytes'] / MB:.0f} MB, {ckptd['reps']} reps)",
                fmt(med(floor["blocked_s"])),
                f"**{fmt(med(ckptd['blocked_s']))}** ({fmt(med(ckptd['blocked_vs_floor']), 2)}x)",
                "—"
                if dcp is None
                else f"{fmt(med(dcp['blocked_s']))} ({fmt(med(dcp['blocked_vs_floor']), 2)}x)",
                fmt(med(torch_save["blocked_s"])),
                f"{fmt(med(ckptd['done_s']), 2)} ({fmt(med(ckptd['done_vs_torch_save']), 2)}x)",
                "—" if mem is None else f"{mem['peak_rss_anon'] / MiB:.0f}",
            ]
        )
    if not rows:
        return None
    return markdown_table(
        [
            "state",
            "copy floor s",
            "ckptd stall s (x floor)",
            "best dcp.async_save stall s (x floor)",
            "torch.save+fsync s",
            "ckptd durable s (x torch.save)",
            "daemon peak RssAnon MiB",
        ],
        rows,
    )


def snapshot_full(results: Path, size: str) -> str | None:
    run = snapshot_runs(results).get(size)
    if not run or not run.methods:
        return None
    rows = []
    for r in run.methods.values():
        rows.append(
            [
                r["label"],
                spread(r["blocked_s"]),
                fmt(med(r["blocked_vs_floor"]), 2),
                spread(r["done_s"], 2),
                fmt(med(r["done_vs_torch_save"]), 2),
            ]
        )
    any_rec = next(iter(run.methods.values()))
    head = (
        f"{any_rec['params'] / 1e6:.1f}M parameters + AdamW, {any_rec['state_bytes'] / MB:.0f} MB, "
        f"{any_rec['tensors']} tensors; median [min-max] of {any_rec['reps']} reps"
    )
    table = markdown_table(
        ["method", "blocked s", "x copy floor", "durable s", "x torch.save+fsync"], rows
    )
    return head + "\n\n" + table


def fixed_cost(results: Path) -> str | None:
    """The steady ckptd stall minus the copy floor, per rep (paired), at the fixed-cost sizes.
    Older result files have no ``blocked_minus_floor_s``: it is then taken from the per-rep
    values of the two methods' ``blocked_s`` (both ran in every rep, in rep order)."""
    rows = []
    for tag in FIXED_COST_SIZES:
        methods = {
            r["method"]: r
            for r in read(results / f"snapshot_bench-{tag}.jsonl")
            if r.get("kind") == "method"
        }
        floor, ckptd = methods.get("floor"), methods.get("ckptd")
        if not (floor and ckptd):
            continue
        fixed = ckptd.get("blocked_minus_floor_s")
        values = (
            fixed["reps"]
            if fixed
            else [
                c - f
                for c, f in zip(ckptd["blocked_s"]["reps"], floor["blocked_s"]["reps"], strict=True)
            ]
        )
        median = statistics.median(values)
        name = "README demo" if tag == "demo" else tag
        rows.append(
            [
                f"{name} ({ckptd['state_bytes'] / MB:.1f} MB, {len(values)} reps)",
                f"{floor['blocked_s']['median'] * 1e3:.2f}",
                f"{ckptd['blocked_s']['median'] * 1e3:.2f}",
                f"{median * 1e3:.1f} [{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}]",
                "met" if median <= FIXED_COST_LIMIT_S else "**missed**",
            ]
        )
    if not rows:
        return None
    return markdown_table(
        [
            "state",
            "copy floor ms",
            "ckptd steady stall ms",
            "fixed cost ms (stall - floor, per rep)",
            f"<= {FIXED_COST_LIMIT_S * 1e3:g} ms",
        ],
        rows,
    )


def loop(results: Path, size: str = "1GiB") -> str | None:
    """The loop bench at ``size``: call, hook wait and loop added time per method."""
    recs = read(results / f"overlap_bench-{size}.jsonl")
    methods = [r for r in recs if r.get("kind") == "method"]
    info = next((r for r in recs if r.get("kind") == "loop"), None)
    if not methods or info is None:
        return None
    rows = [
        [
            r["label"],
            spread(r["call_s"]),
            fmt(med(r["call_vs_floor"]), 2),
            spread(r["hook_wait_s"]),
            spread(r["added_s"]),
            fmt(med(r["added_vs_floor"]), 2),
        ]
        for r in methods
    ]
    first = methods[0]
    head = (
        f"{first['params'] / 1e6:.1f}M parameters + AdamW, {first['state_bytes'] / MB:.0f} MB, "
        f"trained at batch {first['batch']} x {first['seq']} tokens on "
        f"{info['compute_threads']} torch threads (the overlapped copy: the client's one "
        f"thread); an iteration {fmt(med(info['iteration_s']), 2)} s, forward + backward "
        f"{fmt(med(info['fwd_bwd_s']), 2)} s = {fmt(med(info['fwd_bwd_vs_floor']), 1)}x the "
        f"copy floor; median [min-max] of {first['reps']} reps of {first['pairs']} pairs; ratios "
        "per rep to the same rep's copy floor"
    )
    table = markdown_table(
        [
            "method",
            "snapshot() call s",
            "call x copy floor",
            "hook wait s",
            "loop added s",
            "added x copy floor",
        ],
        rows,
    )
    return head + "\n\n" + table


def store(results: Path, size: str) -> str | None:
    recs = [r for r in read(results / f"store_bench-{size}.jsonl") if r.get("kind") == "store"]
    if not recs:
        return None
    rows = [
        [
            r["phase"],
            r["label"],
            spread(r["seconds"], 2),
            fmt(med(r.get("vs_reference")), 2),
            "" if not r.get("stored_bytes") else f"{r['stored_bytes'] / r['raw_bytes']:.3f}",
        ]
        for r in recs
    ]
    head = (
        f"{recs[0]['params'] / 1e6:.1f}M parameters + AdamW, {recs[0]['raw_bytes'] / MB:.0f} MB; "
        "x ref: per rep, to torch.save+fsync (saves) or torch.load (restores) of the same rep"
    )
    table = markdown_table(["phase", "method", "seconds", "x ref", "stored/raw"], rows)
    return head + "\n\n" + table


def codec(results: Path) -> str | None:
    recs = [r for r in read(results / "codec_bench.jsonl") if r.get("kind") == "codec"]
    if not recs:
        return None
    rows = [
        [
            r["dataset"],
            r["method"],
            f"{r['ratio']:.3f}",
            spread(r["compress_mbps"], 0),
            spread(r["decompress_mbps"], 0),
        ]
        for r in recs
    ]
    return markdown_table(
        ["data", "method", "stored/raw", "compress MB/s", "decompress MB/s"], rows
    )


def ranks(results: Path) -> str | None:
    from bench import ranks_bench  # torch.distributed.checkpoint: only when it is printed

    recs = read(results / "ranks_bench.jsonl")
    return ranks_bench.table(recs) if any(r.get("kind") == "method" for r in recs) else None


def targets(results: Path) -> str | None:
    rows = []
    runs = snapshot_runs(results)
    for tag in TARGET_SIZES:
        run = runs.get(tag)
        for t in run.targets if run else []:
            if not t.get("applies", True):
                continue
            unit = " MiB" if "MiB" in t["name"] else "x"
            op = ">=" if "/ steady stall" in t["name"] else "<="
            rows.append(
                [
                    f"{t['name']} ({tag})",
                    f"{op} {t['limit']:g}{unit}",
                    f"{t['value']:.2f}{unit}",
                    "met" if t["met"] else "**missed**",
                ]
            )
    for t in read(results / "codec_bench.jsonl"):
        if t.get("kind") == "target":
            ratio = t["metric"] == "stored/raw"
            op = "<=" if ratio else ">="
            rows.append(
                [
                    f"codec {t['metric']}, {t['dataset']}",
                    f"{op} {t['goal']:g}",
                    f"{t['value']:.3f}" if ratio else f"{t['value']:.0f}",
                    "met" if t["met"] else "**missed**",
                ]
            )
    if not rows:
        return None
    return markdown_table(["target", "goal", "measured", ""], rows)


def size_words(tag: str) -> str:
    """A size tag as prose: ``"64MiB"`` -> ``"64 MiB"``."""
    for unit in ("GiB", "MiB"):
        if tag.endswith(unit):
            return f"{tag[: -len(unit)]} {unit}"
    return tag


def times(value: float) -> str:
    """A ratio as the README writes it: ``22x`` from 10 up, ``7.0x`` below."""
    return f"{value:.0f}x" if value >= 10 else f"{value:.1f}x"


def span(values: Sequence[float], unit: str) -> str:
    """``"212-235 MiB"`` (or one value when they round alike)."""
    lo, hi = f"{min(values):.0f}", f"{max(values):.0f}"
    return f"{lo} {unit}" if lo == hi else f"{lo}-{hi} {unit}"


FLAT_MIB_PER_GB = 10.0
"""The daemon's memory is called flat when its fitted slope is within this many MiB per GB."""

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def added_ms(results: Path) -> tuple[float, float] | None:
    """What ckptd adds to the copy per snapshot, in ms, up to ``scaling.SMALL_BYTES``: from the
    smallest measured ``stall - floor`` to the larger of the largest one and the fitted fixed cost
    (the stall's intercept minus the warm copy's)."""
    small = [p for p in scaling.read_points(results) if p.state_bytes <= scaling.SMALL_BYTES]
    if len(small) < 2:
        return None
    fit = scaling.analyse(small)
    measured = [(p.stall_s - p.floor_s) * 1e3 for p in small]
    fixed = (fit.stall.intercept - (fit.warm or fit.floor).intercept) * 1e3
    return min(measured), max(*measured, fixed)


def scaling_prose(results: Path) -> str | None:
    """The README's **Scaling** paragraph, every figure from the snapshot runs."""
    points = scaling.read_points(results)
    small = [p for p in points if p.state_bytes <= scaling.SMALL_BYTES]
    added = added_ms(results)
    if len(small) < 2 or len(small) == len(points) or added is None:
        return None
    fit_small, fit_all = scaling.analyse(small), scaling.analyse(points)
    peaks = [p.rss_anon_peak_mib for p in points if p.rss_anon_peak_mib is not None]
    idles = [p.rss_anon_idle_mib for p in points if p.rss_anon_idle_mib is not None]
    big = points[-1]
    run = snapshot_runs(results).get(big.size)
    slots = next(iter(run.methods.values())).get("slots") if run and run.methods else None
    if fit_small.warm is None or fit_all.rss is None or big.warm_floor_s is None or not slots:
        return None
    rss_slope = fit_all.rss.slope
    flat = "flat at" if abs(rss_slope) <= FLAT_MIB_PER_GB else "at"
    big_words = size_words(big.size)
    return (
        "**Scaling** (`python -m bench.scaling`, least squares through the medians above): up to "
        f"{size_words(small[-1].size)} the steady stall grows at **{fit_small.slope_ratio:.2f}x "
        f"the slope of a warm `copy_`** ({fit_small.stall.slope * 1e3:.0f} vs "
        f"{fit_small.warm.slope * 1e3:.0f} ms per GB) on top of a fixed "
        f"~{(fit_small.stall.intercept - fit_small.warm.intercept) * 1e3:.0f} ms per snapshot "
        "(state-dict collection, the layout, the submit round trip), and the daemon's peak "
        f"memory beyond the mapped slots stays **{flat} {span(peaks, 'MiB')}** from "
        f"{size_words(points[0].size)} to {big_words} ({rss_slope:.1f} MiB per GB of state; "
        f"{span(idles, 'MiB')} idle). At {big_words} the run holds ~20 GiB of this 23 GiB VM "
        f"(state, copy buffers, {COUNT_WORDS.get(int(slots), str(slots))} {big_words} slots) "
        "and every copy into memory that was not just used slows down: a single `copy_` into "
        f"the same reused buffers took {big.floor_s:.2f} s against {big.warm_floor_s:.2f} s for "
        f"the two passes right after it, and ckptd's copy into its slot {big.stall_s:.2f} s."
    )


def stall_prose(results: Path, size: str = "1GiB") -> str | None:
    """The README's sentences on the stall target: the committed run's ratio at ``size``, what
    ckptd adds to the copy, the ratio by size, and torch.save + fsync over the stall."""
    runs = snapshot_runs(results)
    run = runs.get(size)
    added = added_ms(results)
    if run is None or "ckptd" not in run.methods or added is None:
        return None
    ckptd = run.methods["ckptd"]
    warm = next(
        (
            r
            for r in read(results / f"snapshot_bench-{size}.jsonl")
            if r.get("kind") == "stall_vs_warm_copy"
        ),
        None,
    )
    ratios = [
        f"{med(r.methods['ckptd']['blocked_vs_floor']):.1f}x at {size_words(tag)}"
        for tag, r in runs.items()
        if tag in scaling.SIZE_TAGS
        and "ckptd" in r.methods
        and r.methods["ckptd"]["state_bytes"] <= scaling.SMALL_BYTES
    ]
    over = {
        tag: t
        for tag, r in runs.items()
        for t in r.targets
        if tag in TARGET_SIZES and t["name"] == "torch.save+fsync / steady stall"
    }
    if warm is None or size not in over or len(over) < 2 or len(ratios) < 2:
        return None
    others = [f"{times(t['value'])} at {size_words(tag)}" for tag, t in over.items() if tag != size]
    lo, hi = added
    return (
        f"Runs of the same bench on the same day measured the steady stall at "
        f"{med(ckptd['blocked_vs_floor']):.2f}x (committed, {med(ckptd['blocked_s']):.3f} s; "
        f"{warm['value']['median']:.2f}x the warm copy)\n\n"
        f"What ckptd adds to the copy is ~{lo:.0f}-{hi:.0f} ms per snapshot whatever the size (the "
        f"fit above), so the ratio falls with size: {', '.join(ratios)}. `torch.save` + fsync / "
        f"stall is {times(over[size]['value'])} at {size_words(size)} "
        f"(>= {over[size]['limit']:g}x) and {' and '.join(others)}\n\n"
        f"Each snapshot costs ~{lo:.0f}-{hi:.0f} ms beyond the copy itself"
    )


def prose(results: Path) -> str | None:
    """Every piece of README prose whose figures come from the results, one per paragraph (each
    appears in the README as printed, modulo line breaks)."""
    pieces = [scaling_prose(results), stall_prose(results)]
    if any(p is None for p in pieces):
        return None
    return "\n\n".join(p for p in pieces if p)


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    add_results_arg(ap)
    ap.add_argument("--size", default="1GiB", help="size of the full snapshot and store tables")
    args = ap.parse_args(argv)
    results: Path = args.results
    sections = [
        ("Goodput (`python -m bench.goodput_bench --reps N`)", goodput(results)),
        (
            "Snapshot by state size (`bench/snapshot_bench.py --size SIZE`)",
            snapshot_by_size(results),
        ),
        (
            f"Snapshot, {args.size} (`bench/snapshot_bench.py --size {args.size}`)",
            snapshot_full(results, args.size),
        ),
        (
            "Fixed cost per snapshot (`bench/snapshot_bench.py --size demo` and `--size 64MiB`)",
            fixed_cost(results),
        ),
        ("Loop, 1GiB (`python -m bench.overlap_bench --size 1GiB`)", loop(results)),
        (
            f"Store, {args.size} (`python -m bench.store_bench --size {args.size}`)",
            store(results, args.size),
        ),
        (
            "Store, MiniLM-L6 + AdamW (`python -m bench.store_bench --size minilm`)",
            store(results, "minilm"),
        ),
        ("Codec (`python -m bench.codec_bench`)", codec(results)),
        ("Multi-rank (`python -m bench.ranks_bench`)", ranks(results)),
        ("Targets", targets(results)),
        ("Figures in the README's prose", prose(results)),
    ]
    shown = 0
    for title, body in sections:
        if body is None:
            print(f"({title}: no results in {results})\n", file=sys.stderr)
            continue
        print(f"#### {title}\n\n{body}\n")
        shown += 1
    return 0 if shown else 2


if __name__ == "__main__":
    sys.exit(main())
