"""Ranks and daemons SIGKILLed around a multi-rank step's hand-off.

A job of 4 ranks over two daemons on one root (ranks 0-1 use daemon A, ranks 2-3 daemon B). To
keep these tests cheap the ranks run without torchrun, with explicit ``rank=``, ``world_size=``
and ``attempt=``: the rank that is killed is a process of its own
(:func:`~tests.integration.ranks.trainer.serve_main`, driven over stdin), the others are
Clients in the test process, each on its own connection. The scanner
(:mod:`~tests.integration.ranks.scan`) runs after every kill.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

import pytest

from ckptd.errors import CkptdError
from ckptd.format.restore import load_checkpoint
from ckptd.format.store import Store
from ckptd_client import Client, PendingSnapshot
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import (
    REPO,
    Daemon,
    DaemonFactory,
    assert_same,
    wait_until,
)
from tests.integration.ranks.scan import assert_clean
from tests.integration.ranks.trainer import rank_state

daemons = daemon_fixtures.daemons
ckptd_env = daemon_fixtures.ckptd_env
pytestmark = pytest.mark.usefixtures("ckptd_env")

JOB = "ranks"
WORLD = 4
SHARED_NUMEL = 1 << 16  # 256 KiB, the same on every rank
OWN_NUMEL = 1 << 14


def sockets_of(a: Daemon, b: Daemon) -> list[Path]:
    return [a.socket, a.socket, b.socket, b.socket]


def state(rank: int, step: int, attempt: str, own_numel: int = OWN_NUMEL) -> dict[str, Any]:
    return rank_state(rank, step, attempt, shared_numel=SHARED_NUMEL, own_numel=own_numel)


@contextmanager
def rank_clients(
    sockets: list[Path], root: Path, attempt: str, ranks: list[int]
) -> Iterator[dict[int, Client]]:
    """In-process Clients for ``ranks`` (each its own connection), closed at the end."""
    with ExitStack() as stack:
        yield {
            r: stack.enter_context(
                Client(
                    JOB,
                    socket=sockets[r],
                    root=root,
                    spawn=False,
                    strict=False,
                    timeout_s=20,
                    rank=r,
                    world_size=WORLD,
                    attempt=attempt,
                )
            )
            for r in ranks
        }


class RankProcess:
    """A rank in a process of its own (``trainer serve``): commands on stdin, replies in a file."""

    def __init__(self, base: Path, env: dict[str, str], sock: Path, rank: int, attempt: str):
        self.out = base / f"rank-{rank}-{attempt}.out"
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.integration.ranks.trainer",
                    "serve",
                    f"--job={JOB}",
                    f"--root={base / 'root'}",
                    f"--socket={sock}",
                    f"--rank={rank}",
                    f"--world-size={WORLD}",
                    f"--attempt={attempt}",
                    f"--shared-numel={SHARED_NUMEL}",
                    f"--own-numel={OWN_NUMEL}",
                ],
                cwd=REPO,
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def send(self, line: str) -> None:
        self.stdin.write(line.encode() + b"\n")
        self.stdin.flush()

    def wait_for(self, line: str, timeout_s: float = 120.0) -> None:
        """Wait until the process printed a line that starts with ``line``."""

        def said() -> bool:
            assert self.proc.poll() is None, f"rank exited: {self.out.read_text()[-3000:]}"
            return any(s.startswith(line) for s in self.out.read_text().splitlines())

        wait_until(said, timeout_s, f"{line!r} from the rank process")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.stdin.close()


def hand_off(clients: dict[int, Client], step: int, attempt: str, **kw: Any) -> list[Any]:
    return [
        c.snapshot(state=state(r, step, attempt, **kw), step=step, rng=False)
        for r, c in clients.items()
    ]


def check_step(store: Store, step: int, attempt: str, ranks: range = range(WORLD)) -> None:
    """``step`` is committed by ``attempt`` and every rank's part loads bit-identical."""
    record = store.read_manifest(JOB, step)
    assert record.is_global and record.attempt == attempt and record.world_size == WORLD
    for r in ranks:
        got = load_checkpoint(store, JOB, step, rank=r).state
        assert_same(got, state(r, step, attempt), f"step {step} rank {r}")


def waiting_for(daemon: Daemon, step: int) -> list[dict[str, Any]]:
    return [w for w in daemon.status()["waiting_for_ranks"] if w["step"] == step]


@pytest.mark.timeout(300)
def test_rank_killed_after_hand_off_commits_and_rank_killed_before_never_shows(
    daemons: DaemonFactory,
) -> None:
    """Rank 3 (its own process, on daemon B) hands off step 2 and is SIGKILLed as soon as
    ``snapshot()`` returned: step 2 still commits, written and committed by the daemons alone.
    Being dead, it never hands off step 3, which ranks 0-2 did: step 3 is never visible, and
    with ``ranks.pending_timeout = "4s"`` its parts are collected. A restart (a new attempt)
    re-runs step 3, which commits with the new attempt's states only."""
    config = '[ranks]\npending_timeout = "4s"\n'
    a = daemons.start(socket_path=daemons.base / "a.sock", config=config)
    b = daemons.start(socket_path=daemons.base / "b.sock", root=a.root, config=config)
    sockets = sockets_of(a, b)
    store = Store(a.root)
    victim = RankProcess(daemons.base, daemons.env, sockets[3], 3, "t1")
    try:
        victim.wait_for("READY")
        with rank_clients(sockets, a.root, "t1", [0, 1, 2]) as clients:
            for step in (1, 2):
                handles = hand_off(clients, step, "t1")
                for h in handles:
                    info = h.wait(60)
                    assert not info.step_committed  # rank 3 has not handed it off yet
                victim.send(f"snap {step}")
                victim.wait_for(f"HANDED {step}", 60)
                if step == 2:
                    victim.kill()
                    assert victim.proc.returncode == -signal.SIGKILL
                    assert_clean(a.root, "right after killing rank 3")
                else:
                    victim.send(f"wait {step}")
                    victim.wait_for(f"DURABLE {step}", 60)
            wait_until(lambda: 2 in store.steps(JOB), 60, "step 2 to commit without rank 3")
            assert_clean(a.root, "after step 2 committed")
            check_step(store, 1, "t1")
            check_step(store, 2, "t1")

            for h in hand_off(clients, 3, "t1"):
                h.wait(60)
            # Both daemons wrote parts of step 3 and see rank 3 missing; neither commits it.
            for daemon in (a, b):

                def waiting_shown(d: Daemon = daemon) -> bool:
                    return bool(waiting_for(d, 3))

                wait_until(waiting_shown, 30, "step 3 waiting for a rank")
                (waiting,) = waiting_for(daemon, 3)
                assert waiting["missing"] == [3] and waiting["ranks"] == [0, 1, 2]
            assert 3 not in store.steps(JOB)
            assert_clean(a.root, "with step 3 waiting for rank 3")

        # The restart: a new attempt re-runs step 3 on every rank (rank 3 is a new process in
        # a real job; here a Client like the others) and commits it.
        with rank_clients(sockets, a.root, "t2", list(range(WORLD))) as clients:
            infos = [h.wait(60) for h in hand_off(clients, 3, "t2")]
            assert any(i.step_committed for i in infos) or 3 in store.steps(JOB)
        wait_until(lambda: 3 in store.steps(JOB), 30, "step 3 of attempt t2 to commit")
        check_step(store, 3, "t2")

        # Attempt t1's parts of step 3 go once ranks.pending_timeout has passed; nothing
        # committed is collected.
        def collected() -> bool:
            assert_clean(a.root, "while step 3 of t1 waits to be collected")
            return (3, "t1") not in {(p.step, p.attempt) for p in store.part_sets(JOB)}

        wait_until(collected, 60, "the parts of step 3 (attempt t1) to be collected")
        sets = {(p.step, p.attempt): sorted(p.parts) for p in store.part_sets(JOB)}
        assert sets == {(1, "t1"): [0, 1, 2, 3], (2, "t1"): [0, 1, 2, 3], (3, "t2"): [0, 1, 2, 3]}
        assert "parts of ranks [0, 1, 2] collected" in a.log_text() + b.log_text()
        assert store.steps(JOB) == [1, 2, 3]
        for step, attempt in ((1, "t1"), (2, "t1"), (3, "t2")):
            check_step(store, step, attempt)
    finally:
        victim.kill()


@pytest.mark.timeout(300)
def test_daemon_killed_after_every_rank_handed_off_leaves_the_step_whole_or_invisible(
    daemons: DaemonFactory,
) -> None:
    """Every rank hands step k off, then a daemon is SIGKILLed: at once (its parts are most
    likely lost), once its own ranks' parts are durable (the other daemon, still writing bigger
    parts, completes the step), or after a random delay; then it is restarted on the same socket
    and root. The step is then either committed, with every rank's state intact, or never
    visible; the scanner, run over and over from the kill until the outcome is settled, never
    sees it half visible. The Clients reconnect by themselves and the next step commits."""
    a = daemons.start(socket_path=daemons.base / "a.sock")
    b = daemons.start(socket_path=daemons.base / "b.sock", root=a.root)
    sockets = sockets_of(a, b)
    store = Store(a.root)
    rng = random.Random(1313)
    big = 4 << 20  # ranks 0-1 hand off 16 MiB each: daemon A writes for a while
    outcomes = []
    with rank_clients(sockets, a.root, "t1", list(range(WORLD))) as clients:

        def at_once(handles: list[PendingSnapshot]) -> None:
            pass

        def once_b_parts_durable(handles: list[PendingSnapshot]) -> None:
            for h in handles[2:]:
                h.wait(60)

        def after_a_while(handles: list[PendingSnapshot]) -> None:
            time.sleep(rng.uniform(0.0, 0.3))

        rounds: list[tuple[str, Callable[[list[PendingSnapshot]], None]]] = [
            ("b", at_once),
            ("b", once_b_parts_durable),
            ("a", after_a_while),
        ]
        for step, (which, before_kill) in enumerate(rounds, start=1):
            handles = [
                clients[r].snapshot(
                    state=state(r, step, "t1", big if r < 2 else OWN_NUMEL), step=step, rng=False
                )
                for r in range(WORLD)
            ]
            before_kill(handles)
            victim = a if which == "a" else b
            victim.proc.send_signal(signal.SIGKILL)
            assert victim.proc.wait(30) == -signal.SIGKILL
            assert_clean(a.root, f"step {step}: daemon {which} killed")
            restarted = daemons.start(socket_path=victim.socket, root=victim.root)
            if which == "a":
                a = restarted
            else:
                b = restarted
            outcome = settle(store, step, handles)
            outcomes.append(outcome)
            if outcome == "committed":
                check_step_sizes(store, step, big)
            else:
                assert step not in store.steps(JOB)
        # Every client reconnects, and a step handed off now commits.
        after = len(rounds) + 1
        for h in hand_off(clients, after, "t1"):
            h.wait(60)
        wait_until(lambda: after in store.steps(JOB), 30, f"step {after} to commit")
        check_step(store, after, "t1")
    assert_clean(a.root, "at the end")
    print(f"\n[ranks] daemon kills after hand-off: outcomes {outcomes}")


def check_step_sizes(store: Store, step: int, big: int) -> None:
    """``step`` holds what every rank handed off (ranks 0-1 the big states)."""
    record = store.read_manifest(JOB, step)
    assert record.is_global and record.world_size == WORLD
    for r in range(WORLD):
        got = load_checkpoint(store, JOB, step, rank=r).state
        assert_same(got, state(r, step, "t1", big if r < 2 else OWN_NUMEL), f"step {step} rank {r}")


def settle(store: Store, step: int, handles: list[PendingSnapshot]) -> str:
    """Wait until ``step``'s fate is sealed, scanning all along: "committed", or "never" (a
    part is missing and no rank's hand-off is still being written)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert_clean(store.root, f"step {step} after the daemon kill")
        if step in store.steps(JOB):
            return "committed"
        if all(h.done() for h in handles):
            durable = sum(1 for h in handles if _durable(h))
            pset = store.part_set(JOB, step, "t1")
            if durable < WORLD and len(pset.parts) < WORLD:
                # The lost hand-offs are gone for good; give each daemon a recheck
                # (coordinator.RECHECK_S) to get it wrong.
                time.sleep(1.5)
                assert_clean(store.root, f"step {step}, settled")
                assert step not in store.steps(JOB), "a step with a lost part became visible"
                return "never"
        time.sleep(0.05)
    raise AssertionError(f"step {step}: neither committed nor missing a part after 60 s")


def _durable(handle: PendingSnapshot) -> bool:
    try:
        handle.wait(0)
    except (CkptdError, TimeoutError):
        return False
    return True
