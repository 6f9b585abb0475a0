"""bench.scaling: the least-squares lines and the reading of snapshot_bench results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import scaling

MiB = 1 << 20


def write_run(
    results: Path, tag: str, state_bytes: int, floor_s: float, stall_s: float, warm: bool = False
) -> None:
    """A minimal snapshot_bench-<tag>.jsonl: the floor, ckptd, and the default daemon's memory."""

    def spread(v: float) -> dict[str, object]:
        return {"median": v, "min": v, "max": v, "reps": [v]}

    common = {"size": tag, "state_bytes": state_bytes, "reps": 1}
    records = [
        {
            **common,
            "kind": "method",
            "method": "floor",
            "blocked_s": spread(floor_s),
            "extra": {"warm_s": spread(floor_s / 2)} if warm else {},
        },
        {
            **common,
            "kind": "method",
            "method": "ckptd",
            "blocked_s": spread(stall_s),
            "blocked_vs_floor": spread(stall_s / floor_s),
            "done_s": spread(10 * stall_s),
        },
        {**common, "kind": "daemon_memory", "daemon": "raw", "peak_rss_anon": 999 * MiB},
        {
            **common,
            "kind": "daemon_memory",
            "daemon": "default",
            "peak_rss_anon": 180 * MiB,
            "idle_rss_anon": 150 * MiB,
        },
    ]
    path = results / f"snapshot_bench-{tag}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_fit_recovers_a_line_and_reports_the_worst_residual() -> None:
    line = scaling.fit([1.0, 2.0, 4.0], [0.01 + 0.07 * x for x in (1.0, 2.0, 4.0)])
    assert line.slope == pytest.approx(0.07)
    assert line.intercept == pytest.approx(0.01)
    assert line.max_residual == pytest.approx(0.0, abs=1e-12)
    bent = scaling.fit([0.0, 1.0, 2.0], [0.0, 1.0, 0.0])
    assert bent.slope == pytest.approx(0.0) and bent.max_residual == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="two points"):
        scaling.fit([1.0, 1.0], [2.0, 3.0])


def test_scaling_reads_the_synthetic_sizes_and_fits_stall_against_the_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # ckptd = copy + 5 ms at every size: the slopes are equal, the fixed cost is 5 ms.
    for tag, gb in (("64MiB", 0.067), ("256MiB", 0.268), ("1GiB", 1.07)):
        write_run(tmp_path, tag, int(gb * 1e9), 0.075 * gb, 0.075 * gb + 0.005)
    write_run(tmp_path, "minilm", int(0.273e9), 1.0, 9.0)  # another model: left out
    points = scaling.read_points(tmp_path)
    assert [p.size for p in points] == ["64MiB", "256MiB", "1GiB"]
    assert points[0].rss_anon_peak_mib == 180 and points[0].rss_anon_idle_mib == 150
    s = scaling.analyse(points)
    assert s.slope_ratio == pytest.approx(1.0)
    assert s.stall.intercept - s.floor.intercept == pytest.approx(0.005)
    assert s.rss is not None and s.rss.slope == pytest.approx(0.0)
    out = tmp_path / "scaling.jsonl"
    assert scaling.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert "stall slope / copy slope: 1.00" in capsys.readouterr().out
    kinds = [json.loads(line)["kind"] for line in out.read_text().splitlines()]
    assert kinds.count("point") == 3 and kinds.count("fit") == 3


def test_the_warm_copy_is_the_slope_reference_when_every_size_has_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The single pass is twice the warm copy at every size; ckptd follows the single pass.
    for tag, gb in (("64MiB", 0.067), ("256MiB", 0.268), ("1GiB", 1.07), ("4GiB", 4.3)):
        write_run(tmp_path, tag, int(gb * 1e9), 0.15 * gb, 0.15 * gb + 0.01, warm=True)
    s = scaling.analyse(scaling.read_points(tmp_path))
    assert s.warm is not None and s.warm.slope == pytest.approx(0.075)
    assert s.slope_ratio == pytest.approx(2.0)  # ckptd's slope over the warm copy's
    assert scaling.main(["--results", str(tmp_path), "--out", str(tmp_path / "s.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "stall slope / warm copy slope: 2.00" in out
    assert "Up to 1.5 GB only (64MiB, 256MiB, 1GiB" in out  # 4 GiB fitted apart


def test_scaling_with_fewer_than_two_sizes_says_what_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path, "1GiB", int(1.07e9), 0.08, 0.09)
    assert scaling.main(["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "found: 1GiB" in err and "snapshot_bench.py --size" in err
