"""Eight clients snapshotting as fast as they can against a daemon whose write path is the
bottleneck.

libfiu injects failures, not latency, so the disk is made "slow" the other way round: the root is
on a tmpfs (no device to wait for), the daemon has one store thread and a 64 MiB in-flight budget,
and each client hands over 16 MiB states of which one 8 MiB region changes per step. The daemon
can commit only a fraction of what the clients offer; the clients' two-slot rings fill and block.
For a bounded time (CI: 15 s) every client snapshots in a loop, then flushes and exits. Checked:

* no deadlock: every client process finishes, and the daemon's queue drains;
* bounded memory: the daemon's RssAnon (sampled every 100 ms) stays below its idle value plus
  twice the in-flight budget plus 128 MiB (the slots are shared memory, not anonymous);
* every checkpoint a client was told is committed is still there unless ``keep_last=2`` allowed
  its deletion, every visible checkpoint verifies, the newest holds exactly what was handed over;
* no job starves: each client's commits are at least half the mean.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

import pytest

from ckptd.format.store import Store
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import DaemonFactory
from tests.reliability import fixtures
from tests.reliability.fixtures import (
    LoopSummary,
    MemorySampler,
    SteppedState,
    check_job,
    loop_seconds,
    loop_timeout,
    proc_status_kb,
    read_steps,
    start_trainer,
    wait_drained,
)

daemons = daemon_fixtures.daemons
ckptd_env = daemon_fixtures.ckptd_env
shm_base = fixtures.shm_base
pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("ckptd_env")]

CLIENTS = 8
MBYTES = 16.0
REGIONS = 2  # 8 MiB each = store.chunk_bytes
KEEP_LAST = 2
INFLIGHT_MIB = 64
CONFIG = f'[store]\nthreads = 1\nmax_inflight_bytes = "{INFLIGHT_MIB}MiB"\n'
CI_SECONDS = 15.0
pytestmark.append(loop_timeout(CI_SECONDS))


def test_eight_clients_against_a_slow_write_path(daemons: DaemonFactory, shm_base: Path) -> None:
    summary = LoopSummary("load")
    daemon = daemons.start(root=shm_base / "root", config=CONFIG)
    store = Store(daemon.root)
    seconds = loop_seconds(CI_SECONDS)
    go = daemons.base / "go"
    jobs = [f"load-{i}" for i in range(CLIENTS)]
    trainers = [
        start_trainer(
            "load",
            daemon.socket,
            daemon.root,
            job,
            f"--seed={100 + i}",
            f"--mbytes={MBYTES}",
            f"--regions={REGIONS}",
            f"--keep-last={KEEP_LAST}",
            f"--committed={daemons.base / f'{job}.committed'}",
            f"--go={go}",
            f"--seconds={seconds}",
            env=daemons.env,
            out=daemons.base / f"{job}.out",
        )
        for i, job in enumerate(jobs)
    ]
    try:
        for trainer in trainers:
            trainer.wait_for("READY", timeout_s=300)
        idle_kb = proc_status_kb(daemon.pid, "RssAnon")
        with MemorySampler(daemon.pid) as memory:
            go.touch()
            started = time.monotonic()
            for job, trainer in zip(jobs, trainers, strict=True):
                left = seconds + 300 - (time.monotonic() - started)
                try:
                    code = trainer.proc.wait(max(1.0, left))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{job} did not finish within {seconds + 300:.0f} s: deadlock?")
                assert code == 0, f"{job} exited {code}: {trainer.errors()[-3000:]}"
            status = wait_drained(daemon.socket, daemons.env)
    finally:
        for trainer in trainers:
            trainer.kill()

    commits = {}
    for job, seed_, trainer in zip(jobs, range(100, 100 + CLIENTS), trainers, strict=True):
        out = trainer.output()
        assert "DONE" in out and "STUCK" not in out, out[-1000:]
        summary.iterations += int(out.split("snapshots=")[1].split()[0])
        reported = read_steps(daemons.base / f"{job}.committed")
        commits[job] = len(reported)
        expected = SteppedState(seed_, MBYTES, REGIONS)
        check = check_job(
            store,
            job,
            reported=reported,
            keep_last=KEEP_LAST,
            expected=expected.at,
            compare=lambda steps: steps[-1:],
        )
        summary.verified += check.verified
        summary.violations += check.violations
        if len(check.visible) > KEEP_LAST:
            summary.violate(f"{job}: retention left {check.visible} (keep_last={KEEP_LAST})")
        assert "Traceback" not in trainer.errors(), trainer.errors()[-3000:]

    mean = statistics.mean(commits.values())
    starved = {job: n for job, n in commits.items() if n < 0.5 * mean}
    if starved:
        summary.violate(f"jobs starved (< 50% of the mean {mean:.1f} commits): {starved}")
    limit_kb = idle_kb + 2 * (INFLIGHT_MIB << 10) + (128 << 10)
    if memory.peak_kb > limit_kb:
        summary.violate(f"daemon RssAnon peaked at {memory.peak_kb} kB, over {limit_kb} kB")
    summary.extra |= {
        "commits": status["commits"],
        "per_client": ",".join(str(commits[j]) for j in jobs),
        "idle_rss_anon_mib": idle_kb >> 10,
        "peak_rss_anon_mib": memory.peak_kb >> 10,
        "rss_samples": memory.samples,
        "blocked": status["blocked"],
        "failures": status["failures"],
    }
    summary.report()
    assert status["failures"] == {}, status["recent_errors"]
    assert status["blocked"] > 0  # the write path was the bottleneck: the rings filled
    assert min(commits.values()) >= KEEP_LAST + 1  # so retention ran for every job
