"""Trainers SIGKILLed at random moments while they snapshot: what ``snapshot()`` returned for is
committed anyway.

Two trainer processes (two jobs) snapshot a 1 MiB state that changes every step, with
``strict=True``, and print ``RETURNED <step>`` (flushed) right after each ``snapshot()`` returns,
i.e. once the daemon has accepted the snapshot. The test picks one at random, SIGKILLs it after a
random 0-400 ms (during the copy into the slot, the submit round trip, between the accept and the
print, or between snapshots) and starts a new one on the same job with a fresh range of steps,
while the other keeps snapshotting. At the end the last trainers are killed too, the daemon's
queue drains (``ckptd status --json``) and every step whose RETURNED line was printed must be
committed, verify, and hold exactly the bytes its trainer handed over; so must any other step that
got committed (accepted, killed before the print).
"""

from __future__ import annotations

import random
import time

import pytest

from ckptd.format.store import Store
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import DaemonFactory
from tests.reliability.fixtures import (
    LoopSummary,
    SteppedState,
    Trainer,
    check_job,
    iter_lines,
    loop_seconds,
    loop_timeout,
    read_steps,
    start_trainer,
    wait_drained,
)

daemons = daemon_fixtures.daemons
ckptd_env = daemon_fixtures.ckptd_env
pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("ckptd_env")]

JOBS = {"trainer-a": 21, "trainer-b": 22}  # job -> seed
MBYTES = 1.0
REGIONS = 4  # 256 KiB each = store.chunk_bytes
CONFIG = '[store]\nchunk_bytes = "256KiB"\npack_bytes = "64KiB"\n'
STEPS_PER_LIFE = 100_000
CI_SECONDS = 10.0
MIN_KILLS = 4  # however slow the machine
pytestmark.append(loop_timeout(CI_SECONDS))


def test_every_snapshot_that_returned_is_committed_although_its_trainer_was_killed(
    daemons: DaemonFactory,
) -> None:
    rng = random.Random(4242)
    summary = LoopSummary("trainer-kill-loop")
    daemon = daemons.start(config=CONFIG)
    store = Store(daemon.root)
    lives = 0
    returned: dict[str, set[int]] = {job: set() for job in JOBS}
    refused: list[str] = []

    def launch(job: str) -> Trainer:
        nonlocal lives
        lives += 1
        return start_trainer(
            "returned",
            daemon.socket,
            daemon.root,
            job,
            f"--seed={JOBS[job]}",
            f"--mbytes={MBYTES}",
            f"--regions={REGIONS}",
            f"--first-step={lives * STEPS_PER_LIFE}",
            "--max-sleep-ms=40",
            env=daemons.env,
            out=daemons.base / f"{job}-{lives}.out",
        )

    def reap(job: str, trainer: Trainer) -> None:
        if trainer.proc.poll() is not None:
            summary.violate(
                f"{job} trainer exited by itself with {trainer.proc.returncode}: "
                f"{trainer.errors()[-1500:]}"
            )
        trainer.kill()
        summary.kills += 1
        returned[job].update(read_steps(trainer.out, "RETURNED "))
        refused.extend(iter_lines(trainer.output(), "REFUSED"))

    trainers = {job: launch(job) for job in JOBS}
    try:
        deadline = time.monotonic() + loop_seconds(CI_SECONDS)
        while time.monotonic() < deadline or summary.iterations < MIN_KILLS:
            job = rng.choice(sorted(JOBS))
            trainers[job].wait_for("READY")
            time.sleep(rng.uniform(0.0, 0.4))
            reap(job, trainers[job])
            trainers[job] = launch(job)
            summary.iterations += 1
        for job, trainer in trainers.items():
            trainer.wait_for("READY")
            time.sleep(rng.uniform(0.0, 0.4))
            reap(job, trainer)
    finally:
        for trainer in trainers.values():
            trainer.kill()

    status = wait_drained(daemon.socket, daemons.env)
    compared = 0
    for job, seed in JOBS.items():
        expected = SteppedState(seed, MBYTES, REGIONS)
        check = check_job(store, job, reported=returned[job], keep_last=None, expected=expected.at)
        summary.verified += check.verified
        compared += check.compared
        summary.violations += check.violations
        assert check.compared == check.verified == len(check.visible)
    total_returned = sum(map(len, returned.values()))
    summary.extra |= {
        "returned": total_returned,
        "committed": status["commits"],
        "compared": compared,
        "refused": len(refused),
        "failures": status["failures"],
    }
    summary.report()
    assert status["failures"] == {}, status["recent_errors"]
    assert summary.kills >= MIN_KILLS and total_returned >= summary.kills  # it did snapshot
