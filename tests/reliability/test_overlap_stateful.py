"""Any training loop around overlapped snapshots against a real daemon: a hypothesis state
machine over ``Client.snapshot(..., overlap=True)`` and the optimizer step that waits for it.

The claim (issue 16): a snapshot restores to exactly the state at the ``snapshot()`` call, bit for
bit, whatever the loop does next within the contract: forward (BatchNorm statistics change),
backward, ``optimizer.step()`` (waits for the copy of the parameters and optimizer state), a
second snapshot (waits for the first copy), in-place edits of what the call copied before it
returned, in-place edits of parameters after ``wait_copied()``; and every handle settles, no slot
is left held, no step hangs.

Model. One daemon per test, reused by every example; each example is a fresh job with unique,
increasing steps, a fresh network and a ``Client`` (the initialize rule draws ``slots`` in
{1, 2}, ``on_full``, the client's ``overlap`` default, the optimizer and whether a GradScaler
is used, and how slow the background copy is). The network holds what the split into "copy now"
and "copy in the background" must get right: BatchNorm buffers, weights tied between two
modules, a bfloat16 parameter, a non-contiguous (transposed) parameter and so non-contiguous
optimizer state, a frozen parameter the optimizer holds, a parameter no optimizer holds, and an
auxiliary head stepped by a second optimizer whose state goes in ``extra``. The main optimizer
is AdamW (state updated in place) or a momentum optimizer whose step *replaces* its state
tensors; a StepLR schedule always, a GradScaler sometimes. What was handed at each step is a
deep copy of the state taken just before the ``snapshot()`` call. Rules:

* ``iteration``: forward/backward, then the step, with a snapshot before it, after it, both or
  neither; with a GradScaler, the gradients may hold an inf, so ``scaler.step`` skips
  ``optimizer.step()`` and the hook never runs;
* ``snapshots_in_a_row``: two or three snapshots, no step between them;
* ``snapshot_then``: a snapshot and at once one more call, which meets a slowed copy still
  running: forward, the step, the edits below, ``wait_copied()``, another snapshot, ``flush(0)``,
  a dropped connection, a daemon restart, or ``close(0)`` and a new client;
* ``forward_backward`` / ``optimizer_step``: the halves of an iteration on their own;
* ``edit_what_was_copied_now``: right after a snapshot, without waiting, change the BatchNorm
  buffers, the parameter no optimizer holds, and step the second optimizer;
* ``edit_after_wait_copied``: ``wait_copied()``, then clip the parameters and scale the main
  optimizer's state in place;
* ``wait``, ``flush``, ``let_time_pass``;
* ``drop_link``: the client's connection breaks (the daemon sees a disconnect, the next call
  reconnects), also while a copy runs;
* ``restart_daemon``: SIGKILL and restart the daemon (at most once per example);
* ``reopen``: close the client (with a short timeout) and open another.

Every call that could hang (``snapshot``, the step, ``wait_copied``, ``flush``, ``close``) runs
with a bound (:data:`HANG_S`); one that does not return ends the run. After every rule: the
ring holds at most ``slots`` slots, and none is FILLING or SUBMITTED unless a background copy is
still in flight; a settled handle's error is one a lost connection or a skip explains; a
committed handle's step is on disk and loads bit-identical to what was handed then. Teardown of
each example: ``close(timeout=None)`` settles every handle, frees every slot and removes the
step hooks (a step after it waits for nothing); once the daemon is idle every step on disk
loads bit-identical to what was handed, and no handle that failed for another reason than an
unknown outcome left a checkpoint.

The background copy is slowed in some examples (a seam: a sleep before each tensor's copy in
``Slot.copy_one``), so that the step, a second snapshot or a lost connection meet a copy still
running. Sizing: rounds of :data:`EXAMPLES_PER_ROUND` examples, seeded with the round's number,
until :func:`~tests.reliability.fixtures.loop_seconds` (CI: :data:`CI_SECONDS`) runs out, and
on (at most :data:`MAX_ROUNDS`) until a step waited for a copy and an overlapped snapshot
committed. The summary line counts what met a running copy (``*_while_copying``).
Violations are collected with the rules that led to them, as in ``test_client_stateful``: with
real processes an example does not replay exactly, so hypothesis neither shrinks nor re-runs.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, cast

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
)
from hypothesis.stateful import (
    run_state_machine_as_test as run_machine,
)

import ckptd_client
from ckptd.errors import (
    CkptdError,
    DaemonUnavailableError,
    SnapshotSkippedError,
    SnapshotUnconfirmedError,
)
from ckptd.format.store import Store
from ckptd_client import Client, PendingSnapshot
from ckptd_client.client import OnFull
from ckptd_client.slots import Slot, SlotState
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import Daemon, DaemonFactory, wait_until
from tests.reliability.fixtures import LoopSummary, difference, loop_seconds, loop_timeout

daemons = daemon_fixtures.daemons
ckptd_env = daemon_fixtures.ckptd_env
pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("ckptd_env")]

CI_SECONDS = 25.0
pytestmark.append(loop_timeout(CI_SECONDS))
EXAMPLES_PER_ROUND = 4
STEPS_PER_EXAMPLE = 20
MAX_ROUNDS = 10
"""Rounds run past the budget, at most, until a step has waited for a copy and an overlapped
snapshot was compared (what this test is for)."""
COPY_DELAYS_S = (0.0, 0.001, 0.005)
"""The sleep before each tensor's background copy (the seam); 0 copies at memory speed."""
HANG_S = 30.0
"""A call that has not returned after this long is a hang."""
ALLOWED_ERRORS = (SnapshotUnconfirmedError, DaemonUnavailableError, SnapshotSkippedError)
"""What a handle may fail with here: a lost connection or restarted daemon, or a skip."""

T = TypeVar("T")


# ---- the training loop -------------------------------------------------------------------------


class Net(torch.nn.Module):
    """A small network with every kind of tensor the split into "copy now" and "copy in the
    background" must place right (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        hidden = torch.nn.Linear(16, 16)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), hidden
        )
        self.tied = torch.nn.Linear(16, 16, bias=False)
        self.tied.weight = hidden.weight  # one parameter under two names
        self.scale = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
        self.proj = torch.nn.Parameter(torch.randn(8, 16).t())  # (16, 8), not contiguous
        self.frozen = torch.nn.Parameter(torch.randn(16), requires_grad=False)
        self.free = torch.nn.Parameter(torch.randn(16))  # in no optimizer
        self.aux = torch.nn.Linear(16, 4)  # stepped by the second optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.tied(self.body(x))
        out: torch.Tensor = (h * self.scale.float() + self.frozen + self.free) @ self.proj
        return out

    def main_parameters(self) -> list[torch.nn.Parameter]:
        held = {id(self.free)} | {id(p) for p in self.aux.parameters()}
        return [p for p in self.parameters() if id(p) not in held]


class ReplacingMomentum(torch.optim.Optimizer):
    """Momentum SGD whose step *replaces* its state tensors with new ones (``state["m"] = ...``)
    instead of updating them in place, as some optimizers do."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                m = state.get("m")
                state["m"] = p.grad.clone() if m is None else m * 0.9 + p.grad
                state["count"] = state.get("count", torch.tensor(0)) + 1
                p.sub_(state["m"].to(p.dtype), alpha=group["lr"])


@dataclass
class Loop:
    """One example's training objects."""

    model: Net
    opt: torch.optim.Optimizer
    opt_aux: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    has_grads: bool = False

    @classmethod
    def build(cls, seed_: int, optimizer: str, use_scaler: bool) -> Loop:
        torch.manual_seed(seed_)
        model = Net()
        params = model.main_parameters()
        opt: torch.optim.Optimizer = (
            torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
            if optimizer == "adamw"
            else ReplacingMomentum(params)
        )
        opt_aux = torch.optim.SGD(model.aux.parameters(), lr=1e-2, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        scaler = (
            torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
            if use_scaler
            else None
        )
        return cls(model, opt, opt_aux, sched, scaler)

    def extra(self, step: int) -> dict[str, Any]:
        return {"opt_aux": self.opt_aux.state_dict(), "step": step}

    def expected(self, step: int) -> Any:
        """What a snapshot of ``step`` taken now must restore to (a deep copy)."""
        return copy.deepcopy(
            ckptd_client.collect(
                self.model,
                self.opt,
                scheduler=self.sched,
                scaler=self.scaler,
                extra=self.extra(step),
            )
        )

    def forward_backward(self) -> None:
        """Forward (BatchNorm's statistics change) and backward; gradients only."""
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        loss = self.model(torch.randn(16, 8)).square().mean()
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        self.has_grads = True

    def poison(self) -> None:
        """An inf in a gradient: ``scaler.step`` then skips ``optimizer.step()``."""
        first = self.model.body[0]
        assert isinstance(first, torch.nn.Linear) and first.weight.grad is not None
        grad = first.weight.grad
        grad.view(-1)[0] = math.inf

    def step(self) -> None:
        """``optimizer.step()`` (through the scaler, which skips it on inf gradients), then the
        schedule unless the step was skipped (the scale dropped)."""
        if self.scaler is None:
            self.opt.step()
            self.sched.step()
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.scaler.get_scale() >= scale:
                self.sched.step()
        self.has_grads = False

    def edit_what_was_copied_now(self) -> None:
        """Changes the call copied before it returned, so they need no wait: BatchNorm's
        buffers, the parameter no optimizer holds, and a step of the second optimizer."""
        bn = self.model.body[1]
        assert isinstance(bn, torch.nn.BatchNorm1d) and bn.running_mean is not None
        with torch.no_grad():
            bn.running_mean.add_(1.0)
            self.model.free.mul_(-1.0)
        self.opt_aux.zero_grad(set_to_none=True)
        self.model.aux(torch.randn(4, 16)).square().mean().backward()
        self.opt_aux.step()

    def edit_in_place(self) -> None:
        """Manual weight clipping and a state rescale outside ``optimizer.step()``: only after
        ``wait_copied()``."""
        with torch.no_grad():
            for p in self.model.main_parameters():
                p.clamp_(-0.5, 0.5)
            for state in self.opt.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        value.mul_(0.5)


# ---- one test's run ----------------------------------------------------------------------------


class HungError(Exception):
    """A bounded call did not return: the example cannot go on."""


@dataclass
class Run:
    """What the examples of one test share: the daemon (replaced by a restart), the counters and
    what was handed."""

    daemons: DaemonFactory
    daemon: Daemon
    summary: LoopSummary
    copy_delay_s: list[float] = field(default_factory=lambda: [0.0])
    """The seam's current sleep per tensor (set by each example)."""
    handed: dict[str, dict[int, Any]] = field(default_factory=dict)
    """job -> step -> the state handed to ``snapshot()`` (a deep copy taken before the call)."""
    checked: dict[str, set[int]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    cases: int = 0
    rule_steps: int = 0
    hung: bool = False

    @property
    def store(self) -> Store:
        return Store(self.daemon.root)

    def check_steps(self, job: str, violate: Callable[[str], None]) -> set[int]:
        """Compare every visible step of ``job`` not compared before with what was handed;
        return the visible steps."""
        visible = set(self.store.steps(job))
        handed = self.handed.get(job, {})
        done = self.checked.setdefault(job, set())
        for step in sorted(visible - done):
            done.add(step)
            if step not in handed:
                violate(f"step {step} is on disk, but was never handed over")
                continue
            try:
                got = ckptd_client.load(job, step=step, root=self.daemon.root)
            except CkptdError as exc:
                violate(f"step {step} does not load: {type(exc).__name__}: {exc}")
                continue
            diff = difference(got, handed[step], f"{job}@{step}")
            if diff is not None:
                violate(f"step {step} is not the state at its snapshot() call: {diff}")
            self.summary.verified += 1
        return visible

    def settle(self) -> None:
        """Until nothing is queued or written, and the commit count held over two polls."""
        previous = None
        while True:
            commits = int(self.daemon.wait_idle()["commits"])
            if commits == previous:
                return
            previous = commits
            time.sleep(0.1)


@dataclass
class Record:
    """A handle ``snapshot()`` returned."""

    step: int
    handle: PendingSnapshot
    overlap: bool | None
    client: int


class OverlapMachine(RuleBasedStateMachine):
    """One job, one training loop, one client at a time (see the module docstring). Subclassed
    per test with :attr:`RUN` set: hypothesis builds machines with no arguments."""

    RUN: ClassVar[Run]

    def __init__(self) -> None:
        super().__init__()
        self.run = run = self.RUN
        run.cases += 1
        self.job = f"ov-{run.cases:05d}"
        self.handed = run.handed.setdefault(self.job, {})
        self.trace: list[str] = []
        self.reported: set[str] = set()
        self.loop: Loop | None = None
        self.client: Client | None = None
        self.clients: list[Client] = []
        self.records: list[Record] = []
        self.next_step = 0
        self.config = ""
        self.restarted = False

    # ---- bookkeeping -------------------------------------------------------------------------

    def note(self, what: str) -> None:
        self.trace.append(what)
        self.run.rule_steps += 1

    def violate(self, what: str, key: str | None = None) -> None:
        key = key or what
        if key in self.reported:
            return
        self.reported.add(key)
        self.run.summary.violate(
            f"{self.job} ({self.config}): {what}\n    after: {' ; '.join(self.trace)}"
        )

    def unexpected(self, call: str, exc: BaseException) -> None:
        tail = "".join(traceback.format_exception(exc)[-3:]).strip().replace("\n", " | ")
        self.violate(f"{call} raised {type(exc).__name__}: {exc} ({tail[-600:]})")

    def bounded(self, what: str, call: Callable[[], T]) -> T:
        """``call()`` on a helper thread, waited for up to :data:`HANG_S`: a hang is recorded
        and ends the example (:class:`HungError`) instead of the whole test run."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = call()
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"overlap-sm-{what}", daemon=True)
        thread.start()
        thread.join(HANG_S)
        if thread.is_alive():
            self.violate(f"{what} has not returned after {HANG_S} s")
            self.run.hung = True
            raise HungError(what)
        if "error" in box:
            raise box["error"]
        return cast(T, box.get("value"))

    @property
    def current(self) -> Client:
        assert self.client is not None, "the initialize rule opens the first client"
        return self.client

    @property
    def training(self) -> Loop:
        assert self.loop is not None, "the initialize rule builds the loop"
        return self.loop

    def copying(self) -> bool:
        background = self.current._background
        return background is not None and not background.done()

    # ---- rules -------------------------------------------------------------------------------

    @initialize(
        slots=st.sampled_from([1, 2]),
        on_full=st.sampled_from(["block", "skip"]),
        overlap=st.booleans(),
        optimizer=st.sampled_from(["adamw", "replacing"]),
        use_scaler=st.booleans(),
        copy_delay_s=st.sampled_from(COPY_DELAYS_S),
    )
    def start(
        self,
        slots: int,
        on_full: OnFull,
        overlap: bool,
        optimizer: str,
        use_scaler: bool,
        copy_delay_s: float,
    ) -> None:
        self.slots, self.on_full, self.overlap = slots, on_full, overlap
        self.config = (
            f"slots={slots} on_full={on_full} overlap={overlap} optimizer={optimizer} "
            f"scaler={use_scaler} copy_delay={copy_delay_s}"
        )
        self.run.copy_delay_s[0] = copy_delay_s
        self.loop = Loop.build(self.run.cases, optimizer, use_scaler)
        self.note("start")
        self.client = self.connect()

    def connect(self) -> Client:
        client = Client(
            self.job,
            socket=self.run.daemon.socket,
            root=self.run.daemon.root,
            spawn=False,
            slots=self.slots,
            on_full=self.on_full,
            overlap=self.overlap,
            timeout_s=10.0,
        )
        self.clients.append(client)
        return client

    def snapshot(self, overlap: bool | None) -> None:
        """Snapshot the next step, the expected state taken just before the call."""
        loop = self.training
        self.next_step += 1
        step = self.next_step
        self.handed[step] = loop.expected(step)
        self.run.counts["snapshots"] += 1
        try:
            handle = self.bounded(
                f"snapshot({step})",
                lambda: self.current.snapshot(
                    loop.model,
                    loop.opt,
                    step=step,
                    scheduler=loop.sched,
                    scaler=loop.scaler,
                    extra=loop.extra(step),
                    overlap=overlap,
                ),
            )
        except HungError:
            raise
        except Exception as exc:
            self.unexpected(f"snapshot(step={step}, overlap={overlap})", exc)
            return
        if self.copying():
            self.run.counts["returned_while_copying"] += 1
        self.records.append(Record(step, handle, overlap, len(self.clients) - 1))

    def optimizer_step_now(self) -> None:
        """The step (``scaler.step`` with a scaler), bounded; counts a wait for a copy."""
        pending = [r.handle for r in self.records if not r.handle.done()]
        before = [h.stall_s for h in pending]
        self.bounded("optimizer.step()", self.training.step)
        if any(h.stall_s > b for h, b in zip(pending, before, strict=True)):
            self.run.counts["step_waited_for_a_copy"] += 1

    @rule(
        when=st.sampled_from(["none", "before_step", "after_step", "both"]),
        overlap=st.sampled_from([None, True, False]),
        inf=st.booleans(),
    )
    def iteration(self, when: str, overlap: bool | None, inf: bool) -> None:
        loop = self.training
        skip = inf and loop.scaler is not None
        self.note(f"iteration(snapshot {when}, overlap={overlap}{', inf' if skip else ''})")
        loop.forward_backward()
        if when in ("before_step", "both"):
            self.snapshot(overlap)
        if skip:
            loop.poison()
            self.run.counts["skipped_steps"] += 1
        self.optimizer_step_now()
        if when in ("after_step", "both"):
            self.snapshot(overlap)

    @rule(n=st.integers(2, 3), overlap=st.sampled_from([None, True, False]))
    def snapshots_in_a_row(self, n: int, overlap: bool | None) -> None:
        self.note(f"{n} snapshots in a row (overlap={overlap})")
        for _ in range(n):
            self.snapshot(overlap)

    @rule(
        overlap=st.sampled_from([None, True]),
        then=st.sampled_from(
            [
                "forward",
                "step",
                "edit_now",
                "wait_copied_edit",
                "snapshot",
                "flush0",
                "drop",
                "restart",
                "reopen",
            ]
        ),
    )
    def snapshot_then(self, overlap: bool | None, then: str) -> None:
        """A snapshot and at once one more call, which meets the copy still running when it is
        slowed."""
        self.note(f"snapshot(overlap={overlap}) then {then}")
        loop = self.training
        if then == "step" and not loop.has_grads:
            loop.forward_backward()
        self.snapshot(overlap)
        if self.copying():
            self.run.counts[f"{then}_while_copying"] += 1
        if then == "forward":
            loop.forward_backward()
        elif then == "step":
            self.optimizer_step_now()
        elif then == "edit_now":
            loop.edit_what_was_copied_now()
        elif then == "wait_copied_edit":
            self.wait_copied_and_edit()
        elif then == "snapshot":
            self.snapshot(overlap)
        elif then == "flush0":
            self.flush_now(0.0)
        elif then == "drop":
            self.drop()
        elif then == "restart" and not self.restarted:
            self.restart()
        elif then == "reopen":
            self.close_current(0.0)
            self.client = self.connect()

    @rule()
    def forward_backward(self) -> None:
        self.note("forward/backward")
        self.training.forward_backward()

    @precondition(lambda self: self.loop is not None and self.loop.has_grads)
    @rule()
    def optimizer_step(self) -> None:
        self.note("step")
        self.optimizer_step_now()

    @rule()
    def edit_what_was_copied_now(self) -> None:
        self.note("edit buffers, the unoptimized parameter, step the second optimizer")
        self.training.edit_what_was_copied_now()

    @rule()
    def edit_after_wait_copied(self) -> None:
        self.note("wait_copied+clip weights, scale optimizer state")
        self.wait_copied_and_edit()

    def wait_copied_and_edit(self) -> None:
        try:
            self.bounded("wait_copied()", self.current.wait_copied)
        except HungError:
            raise
        except Exception as exc:
            self.unexpected("wait_copied()", exc)
            return
        if self.copying():
            self.violate("wait_copied() returned while the copy still runs")
        self.training.edit_in_place()

    @precondition(lambda self: bool(self.records))
    @rule(data=st.data(), timeout=st.sampled_from([0.0, 0.5]))
    def wait(self, data: st.DataObject, timeout: float) -> None:
        record = self.records[data.draw(st.integers(0, len(self.records) - 1), label="handle")]
        self.note(f"wait({record.step}, {timeout:g})")
        try:
            info = record.handle.wait(timeout)
        except (TimeoutError, *ALLOWED_ERRORS):
            return  # the invariant checks the error and what it means for the disk
        except Exception as exc:
            self.unexpected(f"wait() of step {record.step}", exc)
            return
        if info.step != record.step:
            self.violate(f"wait() of step {record.step} returned {info}")

    @rule(timeout=st.sampled_from([0.0, 0.5, HANG_S / 2]))
    def flush(self, timeout: float) -> None:
        self.note(f"flush({timeout:g})")
        self.flush_now(timeout)

    def flush_now(self, timeout: float) -> None:
        try:
            left = self.bounded("flush()", lambda: self.current.flush(timeout))
        except HungError:
            raise
        except Exception as exc:
            self.unexpected("flush()", exc)
            return
        if left:
            return
        index = len(self.clients) - 1
        for record in self.records:
            if record.client == index and not record.handle.done():
                self.violate(
                    f"flush({timeout:g}) returned nothing pending, yet step {record.step} is "
                    "unsettled",
                    key=f"flush {record.step}",
                )

    @rule()
    def drop_link(self) -> None:
        """The connection breaks (the next call reconnects); maybe while a copy runs."""
        self.note("drop the connection")
        self.drop()

    def drop(self) -> None:
        link = self.current._link
        if link is None:
            return
        link.break_link()
        self.run.counts["drops"] += 1

    @precondition(lambda self: not self.restarted)
    @rule()
    def restart_daemon(self) -> None:
        """SIGKILL the daemon and start another on the same socket and root."""
        self.note("SIGKILL+restart the daemon")
        self.restart()

    def restart(self) -> None:
        self.restarted = True
        old = self.run.daemon
        os.kill(old.pid, signal.SIGKILL)
        old.proc.wait(30)
        new = self.run.daemons.start(root=old.root)
        wait_until(lambda: new.status()["pid"] == new.pid, 30, "the restarted daemon")
        self.run.daemon = new
        self.run.counts["restarts"] += 1

    @rule(close_timeout=st.sampled_from([0.0, 0.3]))
    def reopen(self, close_timeout: float) -> None:
        self.note(f"close({close_timeout:g})+reopen")
        self.close_current(close_timeout)
        self.client = self.connect()
        self.run.counts["reopens"] += 1

    @rule(seconds=st.sampled_from([0.01, 0.1]))
    def let_time_pass(self, seconds: float) -> None:
        self.note(f"sleep({seconds:g})")
        time.sleep(seconds)

    # ---- invariants --------------------------------------------------------------------------

    @invariant()
    def ring_is_sound(self) -> None:
        if self.client is None:
            return
        client = self.current
        ring = client._ring
        with ring.cond:
            states = [s.state for s in ring.slots]
        if len(states) > client.n_slots:
            self.violate(f"the ring holds {len(states)} slots, more than slots={client.n_slots}")
        held = [s for s in states if s in (SlotState.FILLING, SlotState.SUBMITTED)]
        if held and not self.copying():
            self.violate(
                f"no copy runs, yet slot(s) are {[s.value for s in held]}: a leak",
                key="ring leak",
            )

    @invariant()
    def settled_handles_are_sound(self) -> None:
        # The settled handles first, then the disk: a commit reported later is not listed yet.
        settled = [r for r in self.records if r.handle.done()]
        visible: set[int] | None = None
        for record in settled:
            error = record.handle.error
            if error is not None and not isinstance(error, ALLOWED_ERRORS):
                self.violate(
                    f"step {record.step} failed with {type(error).__name__}: {error}",
                    key=f"error {record.step}",
                )
            if isinstance(error, SnapshotSkippedError) and self.on_full != "skip":
                self.violate(f"step {record.step} skipped: {error}", key=f"skip {record.step}")
            if error is None:
                if visible is None:
                    visible = self.run.check_steps(self.job, self.violate)
                if record.step not in visible:
                    self.violate(
                        f"step {record.step} resolved as committed but is not on disk",
                        key=f"missing {record.step}",
                    )

    # ---- teardown ----------------------------------------------------------------------------

    def close_current(self, timeout: float | None) -> None:
        client = self.current
        index = self.clients.index(client)
        try:
            self.bounded(f"close(timeout={timeout})", lambda: client.close(timeout=timeout))
        except HungError:
            raise
        except Exception as exc:
            self.unexpected(f"close(timeout={timeout})", exc)
        for record in self.records:
            if record.client == index and not record.handle.done():
                self.violate(
                    f"close(timeout={timeout}) returned with step {record.step} unsettled",
                    key=f"unsettled {record.step}",
                )
        if client._ring.slots or client._ring.abandoned:
            self.violate("close() left slots mapped", key="close slots")
        if client._guard._global is not None or client._guard._job is not None:
            self.violate("close() left a step hook or a copy job behind", key="close hooks")

    def teardown(self) -> None:
        if self.run.hung or self.client is None:
            return
        try:
            self.finish()
        except HungError:
            pass
        except Exception as exc:
            self.unexpected("teardown", exc)

    def finish(self) -> None:
        self.close_current(None)
        # The loop goes on after close(): the step waits for nothing any more.
        self.training.forward_backward()
        self.bounded("optimizer.step() after close()", self.training.step)
        self.run.settle()
        visible = self.run.check_steps(self.job, self.violate)
        counts = self.run.counts
        for record in self.records:
            error = record.handle.error
            on_disk = record.step in visible
            kind = (
                "overlap" if record.overlap or (record.overlap is None and self.overlap) else "sync"
            )
            if error is None:
                counts[f"committed_{kind}"] += 1
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


def late_violation(summary: LoopSummary, job: str, what: str) -> None:
    summary.violate(f"final sweep: {job}: {what}")


def machine_for(run: Run) -> type[OverlapMachine]:
    return type("OverlapMachine", (OverlapMachine,), {"RUN": run})


# ---- the test ----------------------------------------------------------------------------------


@pytest.fixture
def thread_errors() -> Iterator[list[str]]:
    """Uncaught exceptions in any thread (the copy thread, the link's reader), as text."""
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


def slowed_copies(monkeypatch: pytest.MonkeyPatch, delay_s: list[float]) -> None:
    """The seam: each background copy of a tensor first sleeps ``delay_s[0]`` seconds."""
    copy_one = Slot.copy_one

    def slow(self: Slot, entry: Any, tensor: torch.Tensor) -> None:
        if delay_s[0]:
            time.sleep(delay_s[0])
        copy_one(self, entry, tensor)

    monkeypatch.setattr(Slot, "copy_one", slow)


def test_overlapped_snapshots_restore_the_state_at_the_call_in_any_loop(
    daemons: DaemonFactory, monkeypatch: pytest.MonkeyPatch, thread_errors: list[str]
) -> None:
    summary = LoopSummary("overlap-stateful")
    run = Run(daemons, daemons.start(), summary)
    slowed_copies(monkeypatch, run.copy_delay_s)
    machine = machine_for(run)
    deadline = time.monotonic() + loop_seconds(CI_SECONDS)
    rounds = 0
    counts = run.counts
    while not run.hung and (
        rounds == 0
        or time.monotonic() < deadline
        or (
            (counts["step_waited_for_a_copy"] == 0 or counts["committed_overlap"] == 0)
            and rounds < MAX_ROUNDS
        )
    ):
        rounds += 1
        try:
            run_machine(
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
        except HungError:
            break  # recorded as a violation; the client's threads are stuck
    run.settle()
    for job in sorted(run.handed):
        run.check_steps(job, functools.partial(late_violation, summary, job))
    summary.violations += thread_errors
    summary.iterations = run.cases
    summary.extra |= {
        "rounds": rounds,
        "rule_steps": run.rule_steps,
        **dict(sorted(counts.items())),
    }
    summary.report()
    # The run did what it claims: overlapped snapshots committed and compared, steps that
    # waited for a copy.
    assert counts["committed_overlap"] > 0 and counts["step_waited_for_a_copy"] > 0
