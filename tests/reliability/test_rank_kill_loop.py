"""Ranks and daemons of a multi-rank job SIGKILLed at random moments.

Four rank processes (:func:`tests.integration.ranks.trainer.loop_main`) hand off a step at a
time over two daemons on one root (ranks 0-1 to daemon A, 2-3 to daemon B), in lockstep as DDP's
collectives would keep them, each state a pure function of (rank, step, attempt): 2 MiB the same
on every rank (stored once) and 256 KiB of its own. ``ranks.pending_timeout`` is 4 s, so the
parts of steps that never complete are collected while the loop runs. After a random 0.2-1.5 s
the test SIGKILLs either

* a random rank: as torchrun would, the job restarts with a new attempt from the newest visible
  step + 1 (re-running steps the old attempt handed off in part); the killed rank is started
  again and the others switch over (the control file); the next kill waits until every rank
  handed off the new attempt's first step; or
* a random daemon, restarted at once on the same socket and root; its ranks' Clients
  (``strict=False``) reconnect by themselves and the job goes on in the same attempt.

After every kill, with the daemons and ranks still running:

* the scanner (:mod:`tests.integration.ranks.scan`) finds no global record without all its
  parts, each with its checksum and every object it names;
* every visible step (each global record, once) loads bit-identical for every rank to what that
  rank handed off in the record's attempt;
* no incomplete step is visible: every rank logged ``HANDING <attempt> <step>`` (before calling
  ``snapshot()``) for each visible step of that attempt.

At the end the job commits a step newer than any before (it recovered from the last kill), the
ranks stop, every set of parts that never committed is collected (within the timeout), no daemon
logged an error, no step of an attempt was committed twice (a global record is created once),
and the checks run once more.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ckptd.errors import CkptdError
from ckptd.format.restore import load_checkpoint
from ckptd.format.store import Store
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import REPO, Daemon, DaemonFactory, wait_until
from tests.integration.ranks.scan import scan
from tests.integration.ranks.trainer import rank_state, write_atomic
from tests.reliability.fixtures import LoopSummary, difference, loop_seconds, loop_timeout, restart

daemons = daemon_fixtures.daemons
pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("ckptd_env")]
ckptd_env = daemon_fixtures.ckptd_env

JOB = "rankloop"
WORLD = 4
SHARED_NUMEL = 1 << 19  # 2 MiB of float32, the same on every rank
OWN_NUMEL = 1 << 16  # 256 KiB, the rank's own
PENDING_TIMEOUT_S = 4
CI_SECONDS = 8.0
MIN_KILLS = 3  # however slow the machine
pytestmark.append(loop_timeout(CI_SECONDS))


@dataclass
class Job:
    """The rank processes, their daemons and what the test knows about them."""

    daemons: DaemonFactory
    config: Path
    dir: Path
    store: Store
    nodes: list[Daemon]
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    attempt: int = 1
    checked: dict[int, int] = field(default_factory=dict)
    """step -> seq of the global record already loaded and compared for every rank."""
    committed: set[tuple[int, str]] = field(default_factory=set)

    def node_of(self, rank: int) -> int:
        return rank * len(self.nodes) // WORLD

    def control(self, *, start: int = 1, stop: bool = False) -> None:
        doc = {"attempt": f"a{self.attempt}", "start": start, "stop": stop}
        write_atomic(self.dir / "control.json", json.dumps(doc))

    def start_rank(self, rank: int) -> None:
        out = self.dir / f"rank-{rank}"
        with out.with_suffix(".out").open("ab") as fout, out.with_suffix(".err").open("ab") as ferr:
            self.procs[rank] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.integration.ranks.trainer",
                    "loop",
                    f"--job={JOB}",
                    f"--root={self.store.root}",
                    f"--socket={self.nodes[self.node_of(rank)].socket}",
                    f"--rank={rank}",
                    f"--world-size={WORLD}",
                    f"--shared-numel={SHARED_NUMEL}",
                    f"--own-numel={OWN_NUMEL}",
                    f"--dir={self.dir}",
                ],
                cwd=REPO,
                env=self.daemons.env,
                stdin=subprocess.DEVNULL,
                stdout=fout,
                stderr=ferr,
            )

    def errors(self, rank: int) -> str:
        path = self.dir / f"rank-{rank}.err"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def logged(self, word: str) -> dict[int, set[tuple[str, int]]]:
        """Per rank, the (attempt, step) of every complete ``word`` line of its log."""
        out: dict[int, set[tuple[str, int]]] = {}
        for rank in range(WORLD):
            path = self.dir / f"rank-{rank}.log"
            text = path.read_text() if path.exists() else ""
            out[rank] = {
                (w[1], int(w[2]))
                for line in text.splitlines(keepends=True)
                if line.endswith("\n") and (w := line.split())[:1] == [word] and len(w) == 3
            }
        return out

    def wait_running(self, start: int) -> None:
        """Wait until every rank handed off the first step of the current attempt."""
        first = (f"a{self.attempt}", start)

        def running() -> bool:
            for rank, proc in self.procs.items():
                assert proc.poll() is None, f"rank {rank} exited: {self.errors(rank)}"
            return all(first in steps for steps in self.logged("HANDED").values())

        wait_until(running, 300, f"every rank to hand off step {start} of attempt a{self.attempt}")

    def kill_rank(self, rank: int) -> None:
        proc = self.procs[rank]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL, self.errors(rank)

    def kill_node(self, i: int) -> None:
        node = self.nodes[i]
        node.proc.send_signal(signal.SIGKILL)
        assert node.proc.wait(30) == -signal.SIGKILL
        self.nodes[i] = restart(self.daemons, node, config=self.config)

    def check(self, summary: LoopSummary, when: str) -> None:
        """The invariants of the module docstring, while everything runs."""
        found = scan(self.store.root)
        summary.violations += [f"{when}: {v}" for v in found.violations]
        handing = self.logged("HANDING")
        for step in self.store.steps(JOB):
            try:
                record = self.store.read_manifest(JOB, step)
            except CkptdError as exc:
                if step in self.store.steps(JOB):
                    summary.violate(f"{when}: step {step} is visible but unreadable: {exc}")
                continue
            assert record.attempt is not None
            self.committed.add((step, record.attempt))
            lacking = [r for r in range(WORLD) if (record.attempt, step) not in handing[r]]
            if lacking:
                summary.violate(
                    f"{when}: step {step} of attempt {record.attempt} is visible, but ranks "
                    f"{lacking} never handed it off"
                )
            if self.checked.get(step) == record.seq:
                continue
            problems = self._compare(record.step, record.attempt)
            if problems and self._still(step, record.seq):
                summary.violations += [f"{when}: {p}" for p in problems]
            elif not problems:
                self.checked[step] = record.seq
                summary.verified += 1

    def _compare(self, step: int, attempt: str) -> list[str]:
        out = []
        for rank in range(WORLD):
            want = rank_state(rank, step, attempt, shared_numel=SHARED_NUMEL, own_numel=OWN_NUMEL)
            try:
                got = load_checkpoint(self.store, JOB, step, rank=rank).state
            except CkptdError as exc:
                out.append(f"step {step} ({attempt}) rank {rank} does not load: {exc}")
                continue
            diff = difference(got, want, f"step {step} ({attempt}) rank {rank}")
            if diff is not None:
                out.append(diff)
        return out

    def _still(self, step: int, seq: int) -> bool:
        """Whether ``step``'s record is still the one numbered ``seq`` (a newer attempt's
        commit of the same step replaces it, and its parts are then collected)."""
        try:
            return self.store.read_manifest(JOB, step).seq == seq
        except CkptdError:
            return False


def test_ranks_and_daemons_sigkilled_at_random_never_show_a_half_step(
    daemons: DaemonFactory,
) -> None:
    rng = random.Random(20261313)
    summary = LoopSummary("rank-kill-loop")
    config = daemons.base / "ranks.toml"
    config.write_text(f'[ranks]\npending_timeout = "{PENDING_TIMEOUT_S}s"\n')
    a = daemons.start(socket_path=daemons.base / "a.sock", config=config)
    b = daemons.start(socket_path=daemons.base / "b.sock", root=a.root, config=config)
    job = Job(daemons, config, daemons.base / "ranks", Store(a.root), [a, b])
    job.dir.mkdir()
    job.control()
    rank_kills = daemon_kills = 0
    try:
        for rank in range(WORLD):
            job.start_rank(rank)
        job.wait_running(1)
        deadline = time.monotonic() + loop_seconds(CI_SECONDS)
        while time.monotonic() < deadline or summary.kills < MIN_KILLS:
            time.sleep(rng.uniform(0.2, 1.5))
            if rng.random() < 0.5:
                rank = rng.randrange(WORLD)
                job.kill_rank(rank)
                rank_kills += 1
                when = f"kill {summary.kills + 1} (rank {rank})"
                job.attempt += 1
                start = max(job.store.steps(JOB), default=0) + 1
                job.control(start=start)
                job.start_rank(rank)
                job.check(summary, when)
                job.wait_running(start)
            else:
                node = rng.randrange(len(job.nodes))
                job.kill_node(node)
                daemon_kills += 1
                when = f"kill {summary.kills + 1} (daemon {'AB'[node]})"
                job.check(summary, when)
            summary.kills += 1
            summary.iterations += 1
            for rank, proc in job.procs.items():
                assert proc.poll() is None, f"rank {rank} exited: {job.errors(rank)}"
        # The job recovered from the last kill: it commits a newer step.
        newest = max(job.store.steps(JOB), default=0)
        wait_until(
            lambda: max(job.store.steps(JOB), default=0) > newest, 120, "a commit after the kills"
        )
        job.control(start=0, stop=True)
        for rank, proc in job.procs.items():
            assert proc.wait(120) == 0, f"rank {rank}: {job.errors(rank)}"
    finally:
        for proc in job.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)

    # Every set of parts that never committed is collected (ranks.pending_timeout).
    def all_collected() -> bool:
        job.check(summary, "while collecting")
        return not job.store.pending_sets(JOB)

    wait_until(all_collected, PENDING_TIMEOUT_S + 60, "uncommitted parts to be collected")
    job.check(summary, "final")
    for step in job.store.steps(JOB):
        if job.checked.get(step) != job.store.read_manifest(JOB, step).seq:
            summary.violate(f"final: step {step} was never compared")

    logs = "".join(d.log_text() for d in daemons.started)
    commits = re.findall(rf"{JOB} step (\d+) committed: \d+ ranks \(attempt (\S+),", logs)
    committed = job.committed | {(int(step), attempt) for step, attempt in commits}
    for step, attempt in sorted(committed):
        times = commits.count((str(step), attempt))
        if times > 1:
            summary.violate(f"step {step} of attempt {attempt} was committed {times} times")
    for line in re.findall(r"^.* ERROR .*$", logs, re.MULTILINE)[:5]:
        summary.violate(f"a daemon logged an error: {line}")
    handed = set().union(*job.logged("HANDED").values())
    collected = len(
        re.findall(rf"{JOB} step \d+ \(attempt \S+\): parts of ranks .* collected", logs)
    )
    summary.extra |= {
        "rank_kills": rank_kills,
        "daemon_kills": daemon_kills,
        "attempts": job.attempt,
        "steps_committed": len(committed),
        "steps_never_visible": len(handed - committed),
        "parts_collected": collected,
        "visible": len(job.store.steps(JOB)),
    }
    summary.report()
    assert summary.kills >= MIN_KILLS and committed
