"""The daemon SIGKILLed at random moments under a trainer that snapshots continuously.

A trainer subprocess snapshots a 24 MiB state that changes every step (one 8 MiB region, so
each checkpoint writes one new object and dedups two), with ``keep_last=3`` so retention and GC
run after every commit, and records each step ``wait()`` reported committed. The test SIGKILLs
the daemon after a random 0-400 ms, which lands in object writes, commits, retention and GC, and
restarts it on the same socket and root; the trainer's client (``strict=False``) reconnects by
itself. After every restart:

* ``<root>/<job>/tmp`` holds no file of a dead writer (the startup sweep ran);
* every visible checkpoint's objects exist and it verifies;
* every step reported committed is still there, unless ``keep_last=3`` allowed its deletion
  (three newer steps are visible);
* the newest visible step holds exactly the bytes its trainer handed over.

At the end the trainer stops, the queue drains and every visible step is compared bit for bit.
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from ckptd.format.store import Store
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import DaemonFactory
from tests.reliability.fixtures import (
    LoopSummary,
    SteppedState,
    check_job,
    dead_writer_files,
    loop_seconds,
    loop_timeout,
    read_steps,
    restart,
    start_trainer,
)

daemons = daemon_fixtures.daemons
pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("ckptd_env")]
ckptd_env = daemon_fixtures.ckptd_env

JOB = "killed"
SEED = 11
MBYTES = 24.0
REGIONS = 3  # 8 MiB each: store.chunk_bytes, so one new object per snapshot
KEEP_LAST = 3
CI_SECONDS = 15.0
MIN_KILLS = 3  # however slow the machine
pytestmark.append(loop_timeout(CI_SECONDS))


def test_daemon_sigkilled_at_random_moments_loses_no_committed_checkpoint(
    daemons: DaemonFactory,
) -> None:
    rng = random.Random(20261123)
    summary = LoopSummary("daemon-kill-loop")
    daemon = daemons.start()
    store = Store(daemon.root)
    expected = SteppedState(SEED, MBYTES, REGIONS)
    committed_file = daemons.base / "committed.txt"
    stop_file = daemons.base / "stop"
    trainer = start_trainer(
        "committed",
        daemon.socket,
        daemon.root,
        JOB,
        f"--seed={SEED}",
        f"--mbytes={MBYTES}",
        f"--regions={REGIONS}",
        f"--keep-last={KEEP_LAST}",
        f"--committed={committed_file}",
        f"--stop={stop_file}",
        env=daemons.env,
        out=daemons.base / "trainer.out",
    )
    kills_mid_write = 0
    try:
        trainer.wait_for("READY")
        deadline = time.monotonic() + loop_seconds(CI_SECONDS)
        while time.monotonic() < deadline or summary.kills < MIN_KILLS:
            time.sleep(rng.uniform(0.0, 0.4))
            try:
                kills_mid_write += daemon.status()["writing"] is not None
            except OSError:
                pass
            daemon.proc.send_signal(signal.SIGKILL)
            assert daemon.proc.wait(30) == -signal.SIGKILL
            summary.kills += 1
            daemon = restart(daemons, daemon)

            leftovers = dead_writer_files(store, JOB)
            if leftovers:
                summary.violate(
                    f"after restart {summary.kills}: dead writers' tmp files {leftovers[:3]}"
                )
            check = check_job(
                store,
                JOB,
                reported=read_steps(committed_file),
                keep_last=KEEP_LAST,
                expected=expected.at,
                compare=lambda steps: steps[-1:],
            )
            summary.verified += check.verified
            for v in check.violations:
                summary.violate(f"after restart {summary.kills}: {v}")
            summary.iterations += 1
            assert trainer.proc.poll() is None, trainer.errors()[-3000:]
        stop_file.touch()
        assert trainer.proc.wait(180) == 0, trainer.errors()[-3000:]
    finally:
        trainer.kill()

    daemon.wait_idle()
    out = trainer.output()
    assert "DONE" in out and "STUCK" not in out, out[-2000:]
    reported = read_steps(committed_file)
    final = check_job(store, JOB, reported=reported, keep_last=KEEP_LAST, expected=expected.at)
    summary.verified += final.verified
    summary.violations += [f"final: {v}" for v in final.violations]
    assert dead_writer_files(store, JOB) == []
    assert "Traceback" not in trainer.errors(), trainer.errors()[-3000:]
    summary.extra |= {
        "kills_mid_write": kills_mid_write,
        "steps_committed": len(reported),
        "final_visible": len(final.visible),
        "compared": final.compared,
        "trainer": out.strip().splitlines()[-1],
    }
    summary.report()
    # The loop did what it claims: kills, restarts, commits between them, and retention.
    assert summary.kills >= MIN_KILLS and len(reported) > KEEP_LAST + 1
    assert len(final.visible) == KEEP_LAST
