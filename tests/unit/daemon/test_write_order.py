"""Which accepted snapshot the daemon writes next (:func:`ckptd.daemon.writer.pick_next`): one
write per lane (root, job, rank) in hand-off order, round robin between jobs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from ckptd.daemon.writer import JobKey, Lane, pick_next

ROOT = Path("/r")


def lane(job: str, rank: int = 0) -> Lane:
    return (ROOT, job, rank)


def run(
    handed_off: list[Lane], concurrent: int, served: dict[JobKey, int] | None = None
) -> list[list[str]]:
    """Start writes as the queue does with ``concurrent`` at once, finishing all the writes in
    progress before starting more; the names (``job`` or ``job/rank``) of each round."""
    waiting = list(handed_off)
    turns = itertools.count()
    served = dict(served or {})
    rounds = []
    while waiting:
        busy: list[Lane] = []
        while len(busy) < concurrent:
            index = pick_next(waiting, busy, served)
            if index is None:
                break
            chosen = waiting.pop(index)
            served[chosen[:2]] = next(turns)
            busy.append(chosen)
        assert busy, "nothing could start"
        rounds.append([b[1] + (f"/{b[2]}" if b[2] else "") for b in busy])
    return rounds


def test_one_at_a_time_takes_jobs_in_turn() -> None:
    order = run([lane("a"), lane("a"), lane("a"), lane("b"), lane("c"), lane("b")], 1)
    assert order == [["a"], ["b"], ["c"], ["a"], ["b"], ["a"]]


def test_a_jobs_snapshots_never_run_side_by_side() -> None:
    assert run([lane("a"), lane("a"), lane("b")], 2) == [["a", "b"], ["a"]]
    assert run([lane("a"), lane("a"), lane("a")], 3) == [["a"], ["a"], ["a"]]


def test_ranks_of_one_job_are_lanes_of_their_own() -> None:
    handed_off = [lane("j", 0), lane("j", 1), lane("j", 0), lane("k")]
    assert run(handed_off, 3) == [["j", "k", "j/1"], ["j"]]


def test_a_job_never_served_goes_before_one_served_and_ties_keep_hand_off_order() -> None:
    served = {(ROOT, "a"): 5}
    assert run([lane("a"), lane("c"), lane("b")], 1, served) == [["c"], ["b"], ["a"]]


def test_roots_keep_jobs_of_the_same_name_apart() -> None:
    other: Lane = (Path("/other"), "a", 0)
    assert pick_next([lane("a"), other], [lane("a")], {}) == 1


@pytest.mark.parametrize("concurrent", [1, 2, 4])
def test_every_lane_keeps_its_hand_off_order(concurrent: int) -> None:
    handed_off = [lane(job, rank) for job, rank in itertools.product("abc", (0, 1))] * 3
    tagged = list(enumerate(handed_off))
    waiting = list(tagged)
    started: list[int] = []
    served: dict[JobKey, int] = {}
    turns = itertools.count()
    while waiting:
        busy: list[Lane] = []
        while len(busy) < concurrent:
            index = pick_next([w[1] for w in waiting], busy, served)
            if index is None:
                break
            n, chosen = waiting.pop(index)
            served[chosen[:2]] = next(turns)
            busy.append(chosen)
            started.append(n)
    for one in set(handed_off):
        mine = [n for n in started if handed_off[n] == one]
        assert mine == sorted(mine)
