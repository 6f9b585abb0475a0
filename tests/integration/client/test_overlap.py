"""Overlapped snapshots (issue 16): ``snapshot(..., overlap=True)`` returns before the parameters
and optimizer state are copied, and the next ``optimizer.step()`` waits for that copy.

The must-show: a snapshot followed at once by ``optimizer.step()`` restores to exactly the state
at the ``snapshot()`` call, bit for bit, with AdamW, BatchNorm (buffers that forward changes), a
scheduler and a GradScaler, hammered with a snapshot every step, taken both right before the
step and right after it (then the next forward changes the BatchNorm statistics first). Then the
failure paths: the arguments overlap refuses, a copy that fails, a daemon killed while the copy
runs, and what the hook and a second snapshot wait for.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd_client
from ckptd.errors import CkptdError, SnapshotFailedError
from ckptd_client import Client
from ckptd_client.slots import Slot
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import Daemon, DaemonFactory, assert_same, wait_until

daemons = daemon_fixtures.daemons
shared_daemon = daemon_fixtures.shared_daemon


@pytest.fixture
def daemon(shared_daemon: Daemon) -> Daemon:
    """One daemon for the module's tests (each uses a job of its own, see ``job``)."""
    return shared_daemon


@pytest.fixture
def job(request: pytest.FixtureRequest) -> str:
    """A job name of this test's own."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:100].strip("-.")


pytestmark = pytest.mark.usefixtures("ckptd_env")
ckptd_env = daemon_fixtures.ckptd_env


def build(seed: int = 0) -> tuple[torch.nn.Module, Any, Any, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64),
        torch.nn.BatchNorm1d(64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.BatchNorm1d(64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 4),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    return model, opt, sched, scaler


def forward_backward(model: torch.nn.Module, opt: Any, scaler: Any) -> None:
    x = torch.randn(32, 16)
    loss = model(x).square().mean()
    opt.zero_grad()
    scaler.scale(loss).backward()


def optimizer_step(opt: Any, sched: Any, scaler: Any) -> None:
    scaler.step(opt)
    scaler.update()
    sched.step()


def expected_state(model: torch.nn.Module, opt: Any, sched: Any, scaler: Any) -> Any:
    return copy.deepcopy(ckptd_client.collect(model, opt, scheduler=sched, scaler=scaler))


@pytest.mark.parametrize("copy_delay_s", [0.0, 0.04], ids=["memory-speed", "slowed-copy"])
def test_overlapped_snapshots_restore_the_state_at_the_call_bit_for_bit(
    job: str, daemon: Daemon, monkeypatch: pytest.MonkeyPatch, copy_delay_s: float
) -> None:
    """Slowed copies (a sleep before each tensor's copy) make a missing wait or a buffer copied
    late certain to show, where copies at memory speed would usually win the race anyway."""
    if copy_delay_s:
        _slow_copies(monkeypatch, copy_delay_s)
    model, opt, sched, scaler = build()
    expected: dict[int, Any] = {}
    handles = []
    with Client(job, socket=daemon.socket, root=daemon.root, overlap=True, slots=2) as client:
        for step in range(40):
            forward_backward(model, opt, scaler)
            if step % 2 == 0:  # right before the step: the step must wait for the copy
                expected[step] = expected_state(model, opt, sched, scaler)
                handles.append(
                    client.snapshot(model, opt, step=step, scheduler=sched, scaler=scaler)
                )
                optimizer_step(opt, sched, scaler)
            else:  # right after it: the next forward changes BatchNorm's statistics first
                optimizer_step(opt, sched, scaler)
                expected[step] = expected_state(model, opt, sched, scaler)
                handles.append(
                    client.snapshot(model, opt, step=step, scheduler=sched, scaler=scaler)
                )
        assert client.flush(120) == []
    for pending in handles:
        info = pending.wait(0)
        assert info.stall_s >= 0
    model.train()
    for step, want in expected.items():
        got = ckptd_client.load(job, step=step, root=daemon.root)
        assert_same(got, want, f"step {step}")
    # And it resumes: a fresh model restored from the last step equals the trained one.
    fresh, fresh_opt, fresh_sched, fresh_scaler = build(seed=7)
    ckptd_client.restore(
        fresh, fresh_opt, job=job, scheduler=fresh_sched, scaler=fresh_scaler, root=daemon.root
    )
    assert_same(
        ckptd_client.collect(
            fresh, fresh_opt, scheduler=fresh_sched, scaler=fresh_scaler, rng=False
        ),
        ckptd_client.collect(model, opt, scheduler=sched, scaler=scaler, rng=False),
    )


def test_overlap_refuses_what_it_cannot_hook(job: str, daemon: Daemon) -> None:
    model, opt, _sched, _scaler = build()
    with pytest.raises(ValueError, match="overlap must be True or False"):
        Client(job, socket=daemon.socket, root=daemon.root, overlap="yes")  # type: ignore[arg-type]
    with Client(job, socket=daemon.socket, root=daemon.root) as client:
        with pytest.raises(ValueError, match="not state="):
            client.snapshot(step=1, state={"w": torch.ones(3)}, overlap=True)
        with pytest.raises(ValueError, match="got no optimizer"):
            client.snapshot(model, step=1, overlap=True)
        with pytest.raises(ValueError, match="plain dict as the optimizer"):
            client.snapshot(model, opt.state_dict(), step=1, overlap=True)
        with pytest.raises(TypeError, match=r"needs a torch\.optim\.Optimizer"):
            client.snapshot(model, _NoHooks(), step=1, overlap=True)
        with pytest.raises(ValueError, match="overlap must be"):
            client.snapshot(model, opt, step=1, overlap=1)  # type: ignore[arg-type]
        assert client.stats["snapshots"] == 0
        # The same client still snapshots without overlap.
        client.snapshot(model, opt, step=2).wait(60)
    # A client's overlap=True default applies where it can: state= (what the framework adapters
    # hand off) and a model alone are copied before the call returns.
    with Client(job, socket=daemon.socket, root=daemon.root, overlap=True) as client:
        assert client.snapshot(step=3, state={"w": torch.ones(3)}).wait(60).step == 3
        assert client.snapshot(model, step=4).wait(60).step == 4


class _NoHooks:
    def __init__(self) -> None:
        self.param_groups: list[Any] = []
        self.state: dict[Any, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"x": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _slow_copies(monkeypatch: pytest.MonkeyPatch, delay_s: float) -> None:
    """The background copy takes at least ``delay_s`` (a seam: the copy of one tensor)."""
    copy_one = Slot.copy_one

    def slow(self: Slot, entry: Any, tensor: torch.Tensor) -> None:
        time.sleep(delay_s / 4)
        copy_one(self, entry, tensor)

    monkeypatch.setattr(Slot, "copy_one", slow)


def _broken_copy(self: Slot, entry: Any, tensor: torch.Tensor) -> None:
    """A background copy that fails (a seam: the copy of one tensor)."""
    raise RuntimeError("injected copy failure")


def test_the_step_waits_for_the_copy_and_counts_it_as_stall(
    job: str, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt, sched, scaler = build()
    forward_backward(model, opt, scaler)
    optimizer_step(opt, sched, scaler)  # Adam's moments exist: 4 weights + 4 biases + moments
    _slow_copies(monkeypatch, 0.2)
    with Client(job, socket=daemon.socket, root=daemon.root, overlap=True) as client:
        forward_backward(model, opt, scaler)
        want = expected_state(model, opt, sched, scaler)
        pending = client.snapshot(model, opt, step=1, scheduler=sched, scaler=scaler)
        call_s = pending.stall_s
        optimizer_step(opt, sched, scaler)  # waits for the copy (>= 0.2 s of sleeps)
        assert pending.stall_s >= call_s + 0.2
        assert pending.wait(60).stall_s == pending.stall_s
        # A second snapshot waits for the first one's copy before it starts.
        first = client.snapshot(model, opt, step=2, scheduler=sched, scaler=scaler)
        second = client.snapshot(model, opt, step=3, scheduler=sched, scaler=scaler)
        assert second.stall_s >= 0.2
        assert first.wait(60).step == 2 and second.wait(60).step == 3
    assert_same(ckptd_client.load(job, step=1, root=daemon.root), want)


def test_wait_copied_before_changing_weights_in_place(
    job: str, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt, sched, scaler = build()
    forward_backward(model, opt, scaler)
    optimizer_step(opt, sched, scaler)
    _slow_copies(monkeypatch, 0.2)
    with Client(job, socket=daemon.socket, root=daemon.root, overlap=True) as client:
        want = expected_state(model, opt, sched, scaler)
        pending = client.snapshot(model, opt, step=5, scheduler=sched, scaler=scaler)
        client.wait_copied()
        with torch.no_grad():
            for p in model.parameters():
                p.clamp_(-0.01, 0.01)  # manual weight clipping outside optimizer.step()
        pending.wait(60)
    assert_same(ckptd_client.load(job, step=5, root=daemon.root), want)


def test_a_copy_that_fails_fails_its_handle_and_the_next_snapshot_works(
    job: str, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt, sched, scaler = build()
    forward_backward(model, opt, scaler)
    optimizer_step(opt, sched, scaler)

    with Client(job, socket=daemon.socket, root=daemon.root, overlap=True) as client:
        with monkeypatch.context() as patch:
            patch.setattr(Slot, "copy_one", _broken_copy)
            bad = client.snapshot(model, opt, step=1)
            optimizer_step(opt, sched, scaler)  # the hook does not hang on a failed copy
            with pytest.raises(SnapshotFailedError, match="injected copy failure"):
                bad.wait(60)
        good = client.snapshot(model, opt, step=2, scheduler=sched, scaler=scaler)
        want = expected_state(model, opt, sched, scaler)
        assert good.wait(60).step == 2
    assert ckptd_client.list_checkpoints(job, root=daemon.root)[-1].step == 2
    assert_same(ckptd_client.load(job, step=2, root=daemon.root), want)


def test_strict_raises_a_background_failure_from_the_next_snapshot(
    job: str, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt, sched, scaler = build()
    forward_backward(model, opt, scaler)
    optimizer_step(opt, sched, scaler)

    with Client(job, socket=daemon.socket, root=daemon.root, overlap=True, strict=True) as client:
        with monkeypatch.context() as patch:
            patch.setattr(Slot, "copy_one", _broken_copy)
            client.snapshot(model, opt, step=1)
        with pytest.raises(SnapshotFailedError, match="injected copy failure"):
            client.snapshot(model, opt, step=2)
        assert client.snapshot(model, opt, step=3).wait(60).step == 3


def test_daemon_killed_during_the_copy(
    job: str, daemons: DaemonFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The daemon dies while the copy runs: the handle fails (it was never handed off), the
    step does not hang, and the next snapshot goes to the restarted daemon."""
    first = daemons.start()
    model, opt, sched, scaler = build()
    forward_backward(model, opt, scaler)
    optimizer_step(opt, sched, scaler)
    _slow_copies(monkeypatch, 0.8)
    with Client(
        job, socket=first.socket, root=first.root, overlap=True, spawn=False, timeout_s=10
    ) as client:
        pending = client.snapshot(model, opt, step=1)
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait(30)
        optimizer_step(opt, sched, scaler)
        with pytest.raises(CkptdError):
            pending.wait(60)
        second = daemons.start(root=first.root)
        wait_until(lambda: second.status()["pid"] == second.pid, 30, "the second daemon")
        monkeypatch.undo()
        want = expected_state(model, opt, sched, scaler)
        assert (
            client.snapshot(model, opt, step=2, scheduler=sched, scaler=scaler).wait(60).step == 2
        )
    steps = [m.step for m in ckptd_client.list_checkpoints(job, root=first.root)]
    assert steps == [2]
    assert_same(ckptd_client.load(job, step=2, root=first.root), want)


def test_close_hands_off_an_overlapped_snapshot_still_copying(
    job: str, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt, sched, scaler = build()
    forward_backward(model, opt, scaler)
    optimizer_step(opt, sched, scaler)
    _slow_copies(monkeypatch, 0.3)
    client = Client(job, socket=daemon.socket, root=daemon.root, overlap=True)
    want = expected_state(model, opt, sched, scaler)
    pending = client.snapshot(model, opt, step=9, scheduler=sched, scaler=scaler)
    client.close()
    assert pending.wait(0).step == 9
    assert_same(ckptd_client.load(job, step=9, root=daemon.root), want)
    # The hook was removed: a later step waits for nothing.
    optimizer_step(opt, sched, scaler)
