"""The daemon writes several jobs at once (``store.concurrent_jobs``, default 2), each job's
snapshots in hand-off order: real daemons, real clients, real files.

Orders are asserted, never durations: which commit the daemon logged first, and the commit
sequence numbers of one job's manifests.
"""

from __future__ import annotations

import re
import signal
from typing import Any

import pytest

from ckptd.format.restore import load_checkpoint, verify_manifest
from ckptd.format.store import Store
from ckptd_client import Client
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import (
    Daemon,
    DaemonFactory,
    assert_same,
    make_state,
    wait_until,
)

ckptd_env = daemon_fixtures.ckptd_env
daemons = daemon_fixtures.daemons
daemon = daemon_fixtures.daemon

pytestmark = pytest.mark.usefixtures("ckptd_env")

WAIT_S = 120.0
BIG_MIB = 256
SMALL_MIB = 1


def connect(daemon: Daemon, job: str, **kwargs: Any) -> Client:
    kwargs.setdefault("spawn", False)
    return Client(job, socket=daemon.socket, root=daemon.root, **kwargs)


def commit_order(daemon: Daemon) -> list[tuple[str, int]]:
    """``(job, step)`` of every commit, in the order the daemon logged them."""
    found = re.findall(r"writer: (\S+) step (\d+) committed", daemon.log_text())
    return [(job, int(step)) for job, step in found]


def being_written(daemon: Daemon) -> list[str]:
    return [w["job"] for w in daemon.status()["writes"]]


def verified_steps(store: Store, job: str) -> list[int]:
    steps = store.steps(job)
    for step in steps:
        assert verify_manifest(store, store.read_manifest(job, step)) == [], (job, step)
    return steps


# ---- a small job beside a big one ----------------------------------------------------------------


def test_a_small_job_commits_before_a_big_job_handed_off_first(daemon: Daemon) -> None:
    big_state, small_state = make_state(1, BIG_MIB), make_state(2, SMALL_MIB)
    with connect(daemon, "big") as big, connect(daemon, "small") as small:
        big_pending = big.snapshot(state=big_state, step=1, rng=False)
        wait_until(lambda: being_written(daemon) == ["big"], 60, "the big write to start")
        small_info = small.snapshot(state=small_state, step=1, rng=False).wait(WAIT_S)
        big_info = big_pending.wait(WAIT_S)
    assert (small_info.job, big_info.job) == ("small", "big")
    assert commit_order(daemon) == [("small", 1), ("big", 1)]
    store = Store(daemon.root)
    assert verified_steps(store, "big") == [1] and verified_steps(store, "small") == [1]
    assert_same(load_checkpoint(store, "small", 1).state, small_state)
    assert_same(load_checkpoint(store, "big", 1).state, big_state)


def test_concurrent_jobs_1_writes_one_snapshot_at_a_time_first_come_first_served(
    daemons: DaemonFactory,
) -> None:
    daemon = daemons.start(config="[store]\nconcurrent_jobs = 1\n")
    with connect(daemon, "big") as big, connect(daemon, "small") as small:
        big_pending = big.snapshot(state=make_state(1, BIG_MIB // 4), step=1, rng=False)
        wait_until(lambda: being_written(daemon) == ["big"], 60, "the big write to start")
        small_pending = small.snapshot(state=make_state(2, SMALL_MIB), step=1, rng=False)
        wait_until(lambda: daemon.status()["queue"] == 1, 60, "the small snapshot to queue")
        assert being_written(daemon) == ["big"]
        small_pending.wait(WAIT_S)
        big_pending.wait(WAIT_S)
    assert commit_order(daemon) == [("big", 1), ("small", 1)]
    assert daemon.status()["concurrent_jobs"] == 1


# ---- one job's order -----------------------------------------------------------------------------


def test_one_jobs_snapshots_commit_in_hand_off_order_beside_other_jobs(daemon: Daemon) -> None:
    """Steps handed off in an order that is not theirs (a resumed run reuses step numbers) commit
    in hand-off order, with strictly increasing commit sequence numbers, while other jobs write
    beside them."""
    steps = [5, 3, 9, 1, 7, 2, 8, 4, 6, 10, 12, 11]
    states = {step: make_state(step, 2) for step in steps}
    with (
        connect(daemon, "ordered", slots=4, on_full="block") as ordered,
        connect(daemon, "other-a", slots=2, on_full="block") as other_a,
        connect(daemon, "other-b", slots=2, on_full="block") as other_b,
    ):
        pendings, others = [], []
        for i, step in enumerate(steps):
            pendings.append(ordered.snapshot(state=states[step], step=step, rng=False))
            if i % 3 == 0:
                others.append(other_a.snapshot(state=make_state(100 + i, 8), step=i, rng=False))
                others.append(other_b.snapshot(state=make_state(200 + i, 4), step=i, rng=False))
        infos = [p.wait(WAIT_S) for p in pendings]
        for pending in others:
            pending.wait(WAIT_S)
    assert [info.step for info in infos] == steps
    store = Store(daemon.root)
    seqs = [store.read_manifest("ordered", step).seq for step in steps]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    assert store.steps_by_commit("ordered") == steps
    assert [s for job, s in commit_order(daemon) if job == "ordered"] == steps
    for step in steps:
        assert_same(load_checkpoint(store, "ordered", step).state, states[step], f"step {step}")
    assert verified_steps(store, "other-a") == [0, 3, 6, 9]
    assert verified_steps(store, "other-b") == [0, 3, 6, 9]
    st = daemon.wait_idle()
    assert st["writes"] == [] and st["writing"] is None and st["failures"] == {}


# ---- drain -------------------------------------------------------------------------------------


def test_sigterm_with_two_jobs_being_written_commits_both_and_what_is_queued(
    daemon: Daemon,
) -> None:
    states = {
        (job, step): make_state(10 * i + step, 64) for i, job in enumerate("ab") for step in (1, 2)
    }
    with connect(daemon, "a", slots=2) as a, connect(daemon, "b", slots=2) as b:
        pendings = {
            (job, step): client.snapshot(state=states[job, step], step=step, rng=False)
            for step in (1, 2)
            for job, client in (("a", a), ("b", b))
        }
        wait_until(lambda: sorted(being_written(daemon)) == ["a", "b"], 60, "both writes to run")
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(WAIT_S) == 0, daemon.log_text()
        for key, pending in pendings.items():
            info = pending.wait(10)
            assert (info.job, info.step) == key
    store = Store(daemon.root)
    for job in "ab":
        assert verified_steps(store, job) == [1, 2]
        for step in (1, 2):
            assert_same(load_checkpoint(store, job, step).state, states[job, step], f"{job}@{step}")
    assert "received SIGTERM" in daemon.log_text()
