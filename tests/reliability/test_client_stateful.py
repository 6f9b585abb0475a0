"""Any sequence of client calls against a real daemon that is paused at random: a hypothesis
state machine over :class:`~ckptd_client.Client`.

The claim: no sequence of client calls can commit a checkpoint that fails verify. More: every
committed checkpoint of the job holds exactly the state handed to ``snapshot()`` for that step,
bit for bit, although the trainer mutates every tensor as soon as ``snapshot()`` returns; a
snapshot the daemon accepted is committed; and every handle resolves.

Model. One daemon per test (one write thread, zstd: a write overlaps the next snapshots), reused
by every example; each example is a fresh job with unique, increasing steps, and a ``Client``
with ``slots`` in {1, 2}, ``on_full`` in {"block", "skip"} and ``timeout_s`` in {0.5, 1.0} (the
initialize rule). Rules:

* ``snapshot``: one to three snapshots in a row, each of the next step and a deterministic state
  of 2-6 MiB whose bytes depend on the step (its size varies, so slots get replaced); every
  tensor (and the plain values) is mutated right after ``snapshot()`` returns, as the staging
  contract allows. ``snapshot()`` itself must never raise (``strict=False``);
* ``snapshot_while_paused``: optionally let the daemon finish what it holds, SIGSTOP it,
  snapshot (the ``submit`` times out, or a ``register``, or every slot is held and it waits or
  skips), SIGCONT, and at once up to two more snapshots, which race the daemon reading what the
  paused one submitted (before the fix, a timed-out submit's slot was refilled here);
* ``pause`` / ``resume``: SIGSTOP and SIGCONT as separate steps, so any rule can run against a
  stopped daemon. A watchdog continues it after :data:`WATCHDOG_S` (``on_full="block"`` with
  every slot held waits for the daemon, however long it is stopped);
* ``prepare``: in the background (joined now or at the end) or not; ``background=False`` may
  raise :class:`DaemonUnavailableError` (only) when the daemon does not answer;
* ``wait`` on any handle with a small timeout, and ``flush`` with a small timeout;
* ``reopen``: ``close(timeout=0 or 0.3)``, then a new ``Client`` for the same job, which the
  later rules use (connecting to a stopped daemon may fail with
  :class:`DaemonUnavailableError`; the daemon is then continued and the connect retried);
* ``wait_for_daemon`` (daemon not stopped): afterwards every snapshot the daemon accepted is on
  disk, and the latest checkpoint loads as what was handed at its step;
* ``let_time_pass``: a short sleep, so the daemon's answers interleave differently.

After every rule: a resolved handle's error is ``None`` or one of
:class:`SnapshotUnconfirmedError`, :class:`DaemonUnavailableError`,
:class:`SnapshotSkippedError` (skips only with ``on_full="skip"``); a handle that resolved as
committed has its step on disk; ``wait()`` that returned a ``CheckpointInfo`` names that step and
the step is on disk; ``flush()`` that returns nothing pending and ``close()`` leave no handle of
that client unresolved.

Teardown of each example: the daemon is continued, prepare threads joined, the client closed with
``close(timeout=None)`` and the daemon left to go idle; then every step visible in the store
verifies (``verify_manifest``) and loads bit-identical to what was handed at that step (never a
step nobody handed over); every handle is resolved; a handle accepted by the daemon (``snapshot()``
returned it without error) or resolved as committed is on disk; one that failed with anything but
:class:`SnapshotUnconfirmedError` ("may or may not commit") is not. No retention is set, so
nothing is deleted. At the end every job is checked once more: a submit the daemon read after its
client had given up on it may commit late.

Sizing: rounds of :data:`EXAMPLES_PER_ROUND` examples of at most :data:`STEPS_PER_EXAMPLE` rules,
each round seeded with its number, until :func:`~tests.reliability.fixtures.loop_seconds` (CI:
:data:`CI_SECONDS`) runs out, and on until some ``submit`` has timed out. Violations are
collected (with the rules that led to them) rather than raised: with real processes a failing
example does not replay exactly, so hypothesis could neither shrink nor re-run it. The summary
line counts cases, rule steps and violations.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import ckptd_client
from ckptd.errors import (
    CkptdError,
    DaemonUnavailableError,
    SnapshotSkippedError,
    SnapshotUnconfirmedError,
)
from ckptd.format.restore import verify_manifest
from ckptd.format.store import Store
from ckptd_client import Client, PendingSnapshot
from ckptd_client.client import OnFull
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import Daemon, DaemonFactory, make_state
from tests.reliability.fixtures import LoopSummary, difference, loop_seconds, loop_timeout

daemons = daemon_fixtures.daemons
ckptd_env = daemon_fixtures.ckptd_env
pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("ckptd_env")]

CI_SECONDS = 20.0
pytestmark.append(loop_timeout(CI_SECONDS))
EXAMPLES_PER_ROUND = 4
MAX_ROUNDS = 50
"""Rounds run past the budget, at most, until some ``submit`` has timed out."""
STEPS_PER_EXAMPLE = 8
SLOW = '[store]\nthreads = 1\n[codec]\ncodec = "zstd"\nlevel = 3\n'
"""One write thread, zstd everywhere: a few MiB take long enough to write that the next snapshots
find their slots still held by the daemon."""
MBYTES = (2.0, 4.0, 6.0)
TIMEOUTS_S = (0.5, 1.0)
WATCHDOG_S = 2.0
"""The longest the daemon stays stopped."""
QUIET_S = 10.0
"""How long ``snapshot_while_paused(quiet=True)`` waits for the outstanding snapshots."""
CONNECT_ATTEMPTS = 3
JOIN_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 60.0
ALLOWED_ERRORS = (SnapshotUnconfirmedError, DaemonUnavailableError, SnapshotSkippedError)


# ---- the state handed over -------------------------------------------------------------------


def mutate(state: dict[str, Any]) -> None:
    """Change every byte-carrying value of a :func:`make_state` state in place, as a training
    step would right after ``snapshot()`` returned: every tensor element changes its bits (the
    sign of a float, every bit of an int, a bool's value), and the plain values change."""
    with torch.no_grad():
        state["big"].neg_()
        state["half"].neg_()
        state["ints"].bitwise_not_()
        state["mask"].logical_not_()
        state["scalar"].neg_()
    state["meta"]["seed"] = -1
    state["meta"]["lr"].append("mutated")


def expected(handed: tuple[int, float]) -> dict[str, Any]:
    """The state handed at a step, rebuilt from its (seed, MiB)."""
    return make_state(*handed)


_PREPARE_STATES: dict[float, dict[str, Any]] = {}


def prepare_state(mbytes: float) -> dict[str, Any]:
    """A state of the shape ``snapshot`` hands over at that size (only its layout matters)."""
    state = _PREPARE_STATES.get(mbytes)
    if state is None:
        state = _PREPARE_STATES[mbytes] = make_state(0, mbytes)
    return state


# ---- one test's run --------------------------------------------------------------------------


@dataclass
class Run:
    """What the examples of one test share: the daemon, the counters and what was handed."""

    daemon: Daemon
    summary: LoopSummary
    handed: dict[str, dict[int, tuple[int, float]]] = field(default_factory=dict)
    """job -> step -> (seed, MiB) of the state handed to ``snapshot()``."""
    checked: dict[str, set[int]] = field(default_factory=dict)
    """job -> steps already verified and compared."""
    counts: Counter[str] = field(default_factory=Counter)
    cases: int = 0
    rule_steps: int = 0

    @property
    def store(self) -> Store:
        return Store(self.daemon.root)

    def check_steps(self, job: str, violate: Callable[[str], None]) -> list[int]:
        """Verify and compare every visible step of ``job`` not checked before, reporting what
        is wrong to ``violate``; return the visible steps."""
        store = self.store
        visible = store.steps(job)
        handed = self.handed.get(job, {})
        done = self.checked.setdefault(job, set())
        for step in visible:
            if step in done:
                continue
            done.add(step)
            if step not in handed:
                violate(f"step {step} is on disk, but was never handed over")
                continue
            try:
                problems = verify_manifest(store, store.read_manifest(job, step))
            except CkptdError as exc:
                problems = [f"{type(exc).__name__}: {exc}"]
            if problems:
                violate(f"step {step} fails verify: {'; '.join(problems[:2])}")
                continue
            self.summary.verified += 1
            try:
                got = ckptd_client.load(job, step=step, root=self.daemon.root)
            except CkptdError as exc:
                violate(f"step {step} verifies but does not load: {type(exc).__name__}: {exc}")
                continue
            diff = difference(got, expected(handed[step]), f"{job}@{step}")
            if diff is not None:
                violate(f"step {step} holds other bytes than were handed over: {diff}")
            self.counts["compared"] += 1
        return visible


def settle(daemon: Daemon) -> None:
    """Until nothing is queued or being written and the commit and failure counts held over two
    polls (a submit the daemon reads after its client gave up may still be admitted)."""
    previous: tuple[int, int] | None = None
    while True:
        status = daemon.wait_idle()
        key = (int(status["commits"]), sum(status["failures"].values()))
        if key == previous:
            return
        previous = key
        time.sleep(0.2)


@dataclass
class Record:
    """A handle ``snapshot()`` returned, and what the model knows about it."""

    step: int
    handle: PendingSnapshot
    accepted: bool
    """``snapshot()`` returned it without an error: the daemon answered ``accepted``."""
    client: int
    """Which of the example's clients made it (0 = the first)."""


class ClientMachine(RuleBasedStateMachine):
    """One job, one daemon, a sequence of client calls (see the module docstring). Subclassed
    per test with :attr:`RUN` set (:func:`machine_for`): hypothesis builds machines with no
    arguments."""

    RUN: ClassVar[Run]

    def __init__(self) -> None:
        super().__init__()
        self.run = run = self.RUN
        run.cases += 1
        self.job = f"sm-{run.cases:05d}"
        self.seed_base = run.cases * 100_000
        self.handed = run.handed.setdefault(self.job, {})
        self.trace: list[str] = []
        self.reported: set[str] = set()
        self.client: Client | None = None
        self.clients: list[Client] = []
        self.records: list[Record] = []
        self.threads: list[threading.Thread] = []
        self.next_step = 0
        self.last_mbytes = MBYTES[0]
        self.slots = 1
        self.on_full: OnFull = "block"
        self.timeout_s = 1.0
        self.lock = threading.Lock()
        self.paused = False
        self.watchdog: threading.Timer | None = None

    # ---- bookkeeping -----------------------------------------------------------------------

    def note(self, what: str) -> None:
        self.trace.append(what)
        self.run.rule_steps += 1

    def violate(self, what: str, key: str | None = None) -> None:
        """Record a violation once per ``key`` (default: the text), with the rules so far."""
        key = key or what
        if key in self.reported:
            return
        self.reported.add(key)
        config = f"slots={self.slots} on_full={self.on_full} timeout_s={self.timeout_s}"
        self.run.summary.violate(
            f"{self.job} ({config}): {what}\n    after: {' ; '.join(self.trace)}"
        )

    def unexpected(self, call: str, exc: BaseException) -> None:
        tail = "".join(traceback.format_exception(exc)[-3:]).strip().replace("\n", " | ")
        self.violate(f"{call} raised {type(exc).__name__}: {exc} ({tail[-600:]})")

    @property
    def current(self) -> Client:
        assert self.client is not None, "the initialize rule opens the first client"
        return self.client

    def on_disk(self) -> set[int]:
        return set(self.run.store.steps(self.job))

    # ---- the daemon ------------------------------------------------------------------------

    def pause(self) -> None:
        with self.lock:
            os.kill(self.run.daemon.pid, signal.SIGSTOP)
            self.paused = True
            self.run.counts["sigstops"] += 1
            self.watchdog = threading.Timer(WATCHDOG_S, self._watchdog)
            self.watchdog.daemon = True
            self.watchdog.start()

    def resume(self) -> None:
        """SIGCONT (always sent: continuing a running process does nothing)."""
        with self.lock:
            if self.watchdog is not None:
                self.watchdog.cancel()
                self.watchdog = None
            os.kill(self.run.daemon.pid, signal.SIGCONT)
            self.paused = False

    def _watchdog(self) -> None:
        with self.lock:
            if self.paused:
                os.kill(self.run.daemon.pid, signal.SIGCONT)
                self.paused = False
                self.run.counts["watchdog_sigconts"] += 1

    def connect(self) -> Client:
        """A new Client for the job; a stopped daemon cannot answer ``hello``, so on
        :class:`DaemonUnavailableError` the daemon is continued and the connect retried."""
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                client = Client(
                    self.job,
                    socket=self.run.daemon.socket,
                    root=self.run.daemon.root,
                    spawn=False,
                    slots=self.slots,
                    on_full=self.on_full,
                    timeout_s=self.timeout_s,
                )
            except DaemonUnavailableError as exc:
                self.run.counts["connect_failed"] += 1
                if attempt == CONNECT_ATTEMPTS:
                    self.violate(f"no connection after {attempt} attempts: {exc}")
                    raise
                self.resume()
                continue
            self.clients.append(client)
            return client
        raise AssertionError("unreachable")

    # ---- rules -----------------------------------------------------------------------------

    @initialize(
        slots=st.sampled_from([1, 2]),
        on_full=st.sampled_from(["block", "skip"]),
        timeout_s=st.sampled_from(TIMEOUTS_S),
    )
    def open_client(self, slots: int, on_full: OnFull, timeout_s: float) -> None:
        self.slots, self.on_full, self.timeout_s = slots, on_full, timeout_s
        self.note("open")
        self.client = self.connect()

    def hand_over(self, mbytes: float | None) -> None:
        """Snapshot the next step (``mbytes`` None: the size of the last one), then mutate."""
        mbytes = self.last_mbytes if mbytes is None else mbytes
        self.last_mbytes = mbytes
        self.next_step += 1
        step = self.next_step
        self.handed[step] = (self.seed_base + step, mbytes)
        state = make_state(*self.handed[step])
        self.run.counts["snapshots"] += 1
        try:
            handle = self.current.snapshot(state=state, step=step)
        except Exception as exc:
            self.unexpected(f"snapshot(step={step})", exc)
            return
        mutate(state)
        error = handle.error
        self.records.append(Record(step, handle, error is None, len(self.clients) - 1))
        if error is None:
            self.run.counts["accepted"] += 1
            return
        self.run.counts[f"returned_{type(error).__name__}"] += 1
        unanswered = re.search(r"did not answer '(\w+)'", str(error))
        if unanswered is not None:
            self.run.counts[f"timeouts_{unanswered.group(1)}"] += 1

    @rule(sizes=st.lists(st.sampled_from(MBYTES), min_size=1, max_size=3))
    def snapshot(self, sizes: list[float]) -> None:
        """One to three snapshots in a row: the later ones find their slots still held."""
        first = self.next_step + 1
        mib = "/".join(f"{m:g}" for m in sizes)
        self.note(f"snapshot({first}..{first + len(sizes) - 1}, {mib} MiB)")
        for mbytes in sizes:
            self.hand_over(mbytes)

    @precondition(lambda self: not self.paused)
    @rule(
        mbytes=st.sampled_from([None, *MBYTES]),
        quiet=st.booleans(),
        after=st.lists(st.sampled_from([None, *MBYTES]), max_size=2),
    )
    def snapshot_while_paused(
        self, mbytes: float | None, quiet: bool, after: list[float | None]
    ) -> None:
        """SIGSTOP, a snapshot, SIGCONT, and at once up to two more, which race the daemon
        reading what the paused one submitted. ``quiet``: first let the daemon finish what it
        holds, so that the ``submit`` (not a ``register``) is what times out; a size of None is
        the last snapshot's, so that a free slot fits."""
        sizes = "/".join("same" if m is None else f"{m:g}" for m in after)
        self.note(
            f"{'flush+' if quiet else ''}SIGSTOP+snapshot({self.next_step + 1}, "
            f"{'same' if mbytes is None else f'{mbytes:g}'} MiB)+SIGCONT"
            + (f"+snapshot({sizes} MiB)" if after else "")
        )
        if quiet:
            try:
                self.current.flush(QUIET_S)
            except Exception as exc:
                self.unexpected("flush()", exc)
        self.pause()
        try:
            self.hand_over(mbytes)
        finally:
            self.resume()
        for size in after:
            self.hand_over(size)

    @precondition(lambda self: not self.paused)
    @rule()
    def pause_daemon(self) -> None:
        self.note("SIGSTOP")
        self.pause()

    @precondition(lambda self: self.paused)
    @rule()
    def resume_daemon(self) -> None:
        self.note("SIGCONT")
        self.resume()

    @rule(
        mbytes=st.sampled_from(MBYTES),
        background=st.booleans(),
        join=st.booleans(),
        headroom=st.sampled_from([0.0, 0.5]),
    )
    def prepare(self, mbytes: float, background: bool, join: bool, headroom: float) -> None:
        mode = ("background, joined" if join else "background") if background else "foreground"
        self.note(f"prepare({mbytes:g} MiB, {mode}, headroom={headroom:g})")
        self.run.counts["prepares"] += 1
        try:
            thread = self.current.prepare(
                state=prepare_state(mbytes), headroom=headroom, background=background
            )
        except DaemonUnavailableError:
            self.run.counts["prepare_unavailable"] += 1
            return
        except Exception as exc:
            self.unexpected("prepare()", exc)
            return
        if thread is None:
            return
        if join:
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():
                self.violate(f"prepare()'s thread still runs after {JOIN_TIMEOUT_S} s")
        else:
            self.threads.append(thread)

    @precondition(lambda self: bool(self.records))
    @rule(data=st.data(), timeout=st.sampled_from([0.0, 0.05, 0.5]))
    def wait(self, data: st.DataObject, timeout: float) -> None:
        record = self.records[data.draw(st.integers(0, len(self.records) - 1), label="handle")]
        self.note(f"wait({record.step}, {timeout:g})")
        try:
            info = record.handle.wait(timeout)
        except TimeoutError:
            self.run.counts["wait_timeouts"] += 1
            return
        except ALLOWED_ERRORS:
            return  # the invariant checks the type and what it means for the disk
        except Exception as exc:
            self.unexpected(f"wait() of step {record.step}", exc)
            return
        if info.step != record.step or info.job != self.job:
            self.violate(f"wait() of {self.job} step {record.step} returned {info}")
        if record.step not in self.on_disk():
            self.violate(f"wait() returned a CheckpointInfo for step {record.step}, not on disk")

    @rule(timeout=st.sampled_from([0.0, 0.2, 1.0]))
    def flush(self, timeout: float) -> None:
        self.note(f"flush({timeout:g})")
        try:
            left = self.current.flush(timeout)
        except Exception as exc:
            self.unexpected("flush()", exc)
            return
        if left:
            return
        index = len(self.clients) - 1
        for record in self.records:  # nothing left: every handle of this client is resolved
            if record.client == index and not record.handle.done():
                self.violate(
                    f"flush({timeout:g}) returned nothing pending, yet step {record.step} is "
                    "unresolved",
                    key=f"flush {record.step}",
                )

    @rule(close_timeout=st.sampled_from([0.0, 0.3]))
    def reopen(self, close_timeout: float) -> None:
        self.note(f"close({close_timeout:g})+reopen")
        self.close_current(close_timeout)
        self.run.counts["reopens"] += 1
        self.client = self.connect()

    @precondition(lambda self: not self.paused)
    @rule()
    def wait_for_daemon(self) -> None:
        self.note("wait_for_daemon")
        try:
            self.current.wait_for_daemon(DRAIN_TIMEOUT_S)
        except Exception as exc:
            self.unexpected("wait_for_daemon()", exc)
            return
        self.run.counts["drains"] += 1
        visible = self.on_disk()
        for record in self.records:
            if record.accepted and record.step not in visible:
                self.violate(
                    f"wait_for_daemon() returned, but step {record.step}, which the daemon "
                    f"accepted, is not on disk (visible: {sorted(visible)})"
                )
        if visible:
            latest = max(visible)
            try:
                got = ckptd_client.load(self.job, root=self.run.daemon.root)
            except CkptdError as exc:
                self.unexpected("load(latest)", exc)
                return
            diff = difference(got, expected(self.handed[latest]), f"{self.job}@latest")
            if diff is not None:
                self.violate(f"the latest checkpoint (step {latest}) holds other bytes: {diff}")

    @rule(seconds=st.sampled_from([0.05, 0.3]))
    def let_time_pass(self, seconds: float) -> None:
        self.note(f"sleep({seconds:g})")
        time.sleep(seconds)

    # ---- invariants ------------------------------------------------------------------------

    def close_current(self, timeout: float | None) -> None:
        client = self.current
        index = self.clients.index(client)
        try:
            client.close(timeout=timeout)
        except Exception as exc:
            self.unexpected(f"close(timeout={timeout})", exc)
        self.run.counts["blocked_waits"] += int(client.stats["blocked"])
        for record in self.records:
            if record.client == index and not record.handle.done():
                self.violate(
                    f"close(timeout={timeout}) returned with step {record.step} unresolved",
                    key=f"unresolved {record.step}",
                )

    @invariant()
    def resolved_handles_are_sound(self) -> None:
        visible: set[int] | None = None
        for record in self.records:
            handle = record.handle
            if not handle.done():
                continue
            error = handle.error
            if error is not None and not isinstance(error, ALLOWED_ERRORS):
                self.violate(
                    f"step {record.step} failed with {type(error).__name__}: {error}",
                    key=f"error {record.step}",
                )
            if isinstance(error, SnapshotSkippedError) and (
                self.on_full != "skip" or not handle.skipped
            ):
                self.violate(f"step {record.step} skipped: {error}", key=f"skip {record.step}")
            if error is None:
                visible = self.on_disk() if visible is None else visible
                if record.step not in visible:
                    self.violate(
                        f"step {record.step} resolved as committed but is not on disk",
                        key=f"missing {record.step}",
                    )

    # ---- teardown --------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            self.finish()
        except Exception as exc:
            self.unexpected("teardown", exc)
        finally:
            self.resume()

    def finish(self) -> None:
        self.resume()
        for thread in self.threads:
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():
                self.violate(f"prepare()'s thread still runs after {JOIN_TIMEOUT_S} s")
        if self.client is None:
            return
        self.close_current(None)
        settle(self.run.daemon)
        visible = set(self.run.check_steps(self.job, self.violate))
        counts = self.run.counts
        for record in self.records:
            error = record.handle.error
            on_disk = record.step in visible
            if not record.handle.done():
                self.violate(f"step {record.step} unresolved after close(timeout=None)")
            elif error is None:
                counts["committed"] += 1
                if not on_disk:
                    self.violate(f"step {record.step} resolved as committed but is not on disk")
            elif isinstance(error, SnapshotUnconfirmedError):
                counts["unconfirmed_on_disk" if on_disk else "unconfirmed_not_on_disk"] += 1
            elif on_disk:
                self.violate(
                    f"step {record.step} failed with {type(error).__name__} ({error}), yet it "
                    "was committed"
                )
            else:
                counts[f"failed_{type(error).__name__}"] += 1
            if record.accepted and not on_disk:
                self.violate(f"step {record.step} was accepted by the daemon but never committed")
        self.run.check_steps(self.job, self.violate)  # steps committed while the above ran


def late_violation(summary: LoopSummary, job: str, what: str) -> None:
    summary.violate(f"final sweep: {job}: {what}")


def machine_for(run: Run) -> type[ClientMachine]:
    return type("ClientMachine", (ClientMachine,), {"RUN": run})


# ---- the test ----------------------------------------------------------------------------------


@pytest.fixture
def thread_errors() -> Iterator[list[str]]:
    """Uncaught exceptions in any thread (the client's reader, prepare threads), as text."""
    errors: list[str] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "?"
        errors.append(f"uncaught {args.exc_type.__name__} in thread {name}: {args.exc_value}")

    threading.excepthook = hook
    try:
        yield errors
    finally:
        threading.excepthook = previous


def test_no_sequence_of_client_calls_commits_a_wrong_checkpoint(
    daemons: DaemonFactory, thread_errors: list[str]
) -> None:
    summary = LoopSummary("client-stateful")
    run = Run(daemons.start(config=SLOW), summary)
    machine = machine_for(run)
    deadline = time.monotonic() + loop_seconds(CI_SECONDS)
    rounds = 0
    try:
        # Past the budget until a submit timed out at least once (the case this test is for).
        while (
            rounds == 0
            or time.monotonic() < deadline
            or (run.counts["timeouts_submit"] == 0 and rounds < MAX_ROUNDS)
        ):
            rounds += 1
            run_state_machine_as_test(
                seed(rounds)(machine),
                settings=settings(
                    max_examples=EXAMPLES_PER_ROUND,
                    stateful_step_count=STEPS_PER_EXAMPLE,
                    deadline=None,
                    database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                ),
            )
    finally:
        os.kill(run.daemon.pid, signal.SIGCONT)
    settle(run.daemon)
    late = run.counts["compared"]
    for job in sorted(run.handed):
        run.check_steps(job, functools.partial(late_violation, summary, job))
    summary.violations += thread_errors
    summary.iterations = run.cases
    summary.extra |= {
        "rounds": rounds,
        "cases": run.cases,
        "rule_steps": run.rule_steps,
        "compared": run.counts["compared"],
        "late_commits": run.counts["compared"] - late,
        **{k: v for k, v in sorted(run.counts.items()) if k != "compared"},
    }
    summary.report()
    # The run did what it claims: snapshots committed and compared, and submits that timed out.
    assert summary.verified > 0 and run.counts["timeouts_submit"] > 0
