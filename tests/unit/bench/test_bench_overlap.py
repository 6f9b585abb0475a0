"""The paired arithmetic of the issue-16 benches, on hand-made measurements: the loop bench's
per-rep medians and ratios to the copy floor and its targets (:mod:`bench.overlap_bench`), the
snapshot bench's fixed cost (:func:`bench.snapshot_bench.fixed_cost`) and the goodput bench's
rep-by-rep comparison with ``dcp.async_save`` (:func:`bench.goodput_bench.versus`)."""

from __future__ import annotations

import pytest

from bench import goodput_bench, overlap_bench, snapshot_bench
from bench.overlap_bench import CKPTD_OVERLAP, FLOOR, Pair
from bench.snapshot_bench import Sample


def pair(
    method: str, call_s: float, added_s: float, *, hook_s: float = 0.0, fwd_bwd_s: float = 1.0
) -> Pair:
    plain_s = fwd_bwd_s + 0.5
    return Pair(
        method=method,
        snapshot_first=False,
        plain_s=plain_s,
        with_s=plain_s + added_s,
        call_s=call_s,
        hook_s=hook_s,
        plain_fwd_bwd_s=fwd_bwd_s,
        plain_step_s=0.5,
        with_fwd_bwd_s=fwd_bwd_s,
        with_step_s=0.5 + hook_s,
        foreign=0.0,
    )


# Two reps: rep 0's floor copies take 0.10 s (median of 0.08, 0.10, 0.30), rep 1's 0.20 s.
REPS = [
    {
        FLOOR: [pair(FLOOR, 0.08, 0.09), pair(FLOOR, 0.10, 0.11), pair(FLOOR, 0.30, 0.12)],
        CKPTD_OVERLAP: [pair(CKPTD_OVERLAP, 0.004, 0.02, hook_s=0.01)] * 3,
    },
    {
        FLOOR: [pair(FLOOR, 0.20, 0.2)],
        CKPTD_OVERLAP: [
            pair(CKPTD_OVERLAP, 0.002, 0.01, hook_s=0.0),
            pair(CKPTD_OVERLAP, 0.006, 0.05, hook_s=0.02),
        ],
    },
]


def test_added_is_with_minus_plain() -> None:
    assert pair(FLOOR, 0.1, 0.25).added_s == pytest.approx(0.25)


def test_per_rep_takes_the_median_over_a_reps_pairs() -> None:
    assert overlap_bench.per_rep(REPS, FLOOR, "call_s") == pytest.approx([0.10, 0.20])
    assert overlap_bench.per_rep(REPS, CKPTD_OVERLAP, "hook_s") == pytest.approx([0.01, 0.01])


def test_ratios_are_to_the_same_reps_floor() -> None:
    assert overlap_bench.vs_floor(REPS, CKPTD_OVERLAP, "call_s") == pytest.approx([0.04, 0.02])
    assert overlap_bench.vs_floor(REPS, CKPTD_OVERLAP, "added_s") == pytest.approx([0.2, 0.15])
    assert (
        overlap_bench.vs_floor([{CKPTD_OVERLAP: REPS[0][CKPTD_OVERLAP]}], CKPTD_OVERLAP, "call_s")
        == []
    )


@pytest.mark.parametrize(
    ("fwd_bwd_s", "applies"),
    [(1.0, True), (0.01, False)],  # forward + backward longer / shorter than the 0.1-0.2 s copy
)
def test_report_targets(fwd_bwd_s: float, applies: bool) -> None:
    reps = [
        {
            name: [
                pair(p.method, p.call_s, p.added_s, hook_s=p.hook_s, fwd_bwd_s=fwd_bwd_s)
                for p in ps
            ]
            for name, ps in r.items()
        }
        for r in REPS
    ]
    text, records = overlap_bench.report([FLOOR, CKPTD_OVERLAP], {}, reps)
    targets = {r["name"]: r for r in records if r["kind"] == "target"}
    call = targets["overlap snapshot() call / copy floor"]
    assert call["value"] == pytest.approx(0.03) and call["met"] and call["applies"]
    added = targets["overlap loop added time / copy floor"]
    assert added["value"] == pytest.approx(0.175) and added["met"]
    assert added["applies"] is applies
    assert ("did not take longer than the copy" in text) is not applies
    overlap = next(r for r in records if r.get("method") == CKPTD_OVERLAP)
    assert overlap["stall_s"]["reps"] == pytest.approx([0.014, 0.014])  # call + hook wait
    # pair() puts the whole added time outside forward + backward and the step's own work
    assert overlap["fwd_bwd_added_s"]["reps"] == pytest.approx([0.0, 0.0])
    assert overlap["step_added_s"]["reps"] == pytest.approx([0.0, 0.0])
    assert "Where the added time went" in text


def test_fixed_cost_is_blocked_minus_the_same_reps_floor() -> None:
    reps = [
        {"floor": Sample(0.010, None), "ckptd": Sample(0.013, 0.1)},
        {"floor": Sample(0.020, None), "ckptd": Sample(0.021, 0.1)},
        {"ckptd": Sample(0.5, 0.9)},  # no floor in this rep: not paired, left out
    ]
    fixed = snapshot_bench.fixed_cost(reps, "ckptd")
    assert fixed is not None
    assert fixed.values == pytest.approx((0.003, 0.001))
    assert snapshot_bench.fixed_cost(reps, "dcp.save") is None


def run(method: str, rep: int, loop_s: float, ref_loop_s: float) -> goodput_bench.Run:
    ref = goodput_bench.Run("none", rep, 60, ref_loop_s, 0.0, 0, 0.0, 0.0)
    return goodput_bench.Run(method, rep, 60, loop_s, 0.1, 6, 0.5, 0.0, ref=ref)


def test_versus_divides_percentages_of_none_rep_by_rep() -> None:
    runs = [
        run("ckptd-overlap", 0, 10.0, 9.0),  # 90% of none
        run("dcp.async", 0, 12.0, 9.0),  # 75%
        run("ckptd-overlap", 1, 10.0, 10.0),  # 100%
        run("dcp.async", 1, 8.0, 7.2),  # 90%
        run("ckptd-overlap", 2, 10.0, 10.0),  # rep 2 has no dcp run: left out
    ]
    ratio = goodput_bench.versus(runs, "ckptd-overlap", "dcp.async")
    assert ratio is not None
    assert ratio.values == pytest.approx((0.9 / 0.75, 1.0 / 0.9))
    assert goodput_bench.versus(runs, "ckptd", "dcp.async") is None
