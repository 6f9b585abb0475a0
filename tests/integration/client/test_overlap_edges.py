"""Overlapped snapshots at their edges (issue 16; found by an adversarial review): optimizers
stepped under a wrapper, forwards that write weights, buffers that share a parameter's storage,
a copy thread that cannot start, and flush's timeout while a copy runs. Each test fails on the
first implementation (a hook per optimizer object, a split by storage, the job published before
it was scheduled, an unbounded flush)."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd_client
from ckptd_client import Client
from ckptd_client.slots import Slot
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import Daemon, assert_same, clean_env

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


ckptd_env = daemon_fixtures.ckptd_env
pytestmark = pytest.mark.usefixtures("ckptd_env")


def slow_copies(monkeypatch: pytest.MonkeyPatch, delay_s: float) -> None:
    copy_one = Slot.copy_one

    def slow(self: Slot, entry: Any, tensor: torch.Tensor) -> None:
        time.sleep(delay_s)
        copy_one(self, entry, tensor)

    monkeypatch.setattr(Slot, "copy_one", slow)


def fb(model: torch.nn.Module, x: torch.Tensor) -> None:
    model(x).float().square().mean().backward()


def test_a_step_under_lightnings_optimizer_wrapper_waits(
    job: str, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.core.optimizer import LightningOptimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt = LightningOptimizer(inner)  # what self.optimizers() returns in a LightningModule
    fb(model, torch.randn(4, 8))
    inner.step()
    slow_copies(monkeypatch, 0.1)
    with Client(job, socket=daemon.socket, root=daemon.root, overlap=True) as client:
        fb(model, torch.randn(4, 8))
        want = copy.deepcopy(ckptd_client.collect(model, inner, rng=False))
        client.snapshot(model, opt, step=1, rng=False)
        inner.step()  # LightningOptimizer.step() ends in inner.step(): the hook sees `inner`
        client.flush(60)
    assert_same(ckptd_client.load(job, step=1, root=daemon.root), want)


def test_accelerates_optimizer_overlaps_with_the_client_default(job: str, daemon: Daemon) -> None:
    from accelerate import Accelerator  # type: ignore[import-untyped]

    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(
        torch.nn.Linear(4, 4), torch.optim.AdamW(torch.nn.Linear(4, 4).parameters())
    )
    with Client(job, socket=daemon.socket, root=daemon.root, overlap=True) as client:
        client.snapshot(model, opt, step=1).wait(60)  # overlapped: the wrapper's optimizer
        assert client.snapshot(model, opt, step=2, overlap=True).wait(60).step == 2


def test_embedding_weights_a_forward_renormalizes_are_copied_in_the_call(
    job: str, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Embedding(16, 8, max_norm=1.0)
    with torch.no_grad():
        model.weight.mul_(5)  # rows far outside the max norm
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    slow_copies(monkeypatch, 0.2)
    with Client(job, socket=daemon.socket, root=daemon.root, overlap=True) as client:
        want = copy.deepcopy(ckptd_client.collect(model, opt, rng=False))
        client.snapshot(model, opt, step=1, rng=False)
        fb(model, torch.arange(16))  # the next forward renormalizes every row in place
        opt.step()
        client.flush(60)
    assert_same(ckptd_client.load(job, step=1, root=daemon.root), want)


class SharedStorage(torch.nn.Module):
    """Parameter and running statistic carved out of one flat storage (flat-buffer layouts)."""

    def __init__(self) -> None:
        super().__init__()
        flat = torch.zeros(16 + 4)
        self.weight = torch.nn.Parameter(flat[:16].view(4, 4))
        self.register_buffer("running", flat[16:])
        with torch.no_grad():
            self.weight.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        with torch.no_grad():
            self.running.mul_(0.9).add_(y.mean(0), alpha=0.1)  # type: ignore[operator]
        return y


def test_a_buffer_sharing_a_parameters_storage_is_copied_in_the_call(
    job: str, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = SharedStorage()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    slow_copies(monkeypatch, 0.2)
    with Client(job, socket=daemon.socket, root=daemon.root, overlap=True) as client:
        want = copy.deepcopy(ckptd_client.collect(model, opt, rng=False))
        client.snapshot(model, opt, step=1, rng=False)
        fb(model, torch.randn(8, 4))  # forward changes `running` before the copy reads it
        opt.step()
        client.flush(60)
    assert_same(ckptd_client.load(job, step=1, root=daemon.root), want)


def test_a_copy_thread_that_cannot_start_copies_in_the_call(
    job: str, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: ThreadPoolExecutor, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("can't start new thread")

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Client(job, socket=daemon.socket, root=daemon.root, overlap=True) as client:
        with monkeypatch.context() as patch:
            patch.setattr(ThreadPoolExecutor, "submit", refuse)
            try:
                pending = client.snapshot(model, opt, step=1)
            except RuntimeError:
                pending = None
        fb(model, torch.randn(2, 4))
        stepper = threading.Thread(target=opt.step, daemon=True)
        stepper.start()
        stepper.join(5)
        assert not stepper.is_alive(), "optimizer.step() hangs on a copy job that never runs"
        assert pending is not None, "snapshot() raised instead of copying in the call"
        assert pending.wait(60).step == 1


def test_a_snapshot_from_an_atexit_handler_lands(job: str, tmp_path: Path, daemon: Daemon) -> None:
    """'Save on exit' handlers: the copy thread cannot be started at interpreter shutdown."""
    script = textwrap.dedent(
        f"""
        import atexit, torch
        from ckptd_client import Client
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        client = Client({job!r}, socket={str(daemon.socket)!r}, root={str(daemon.root)!r},
                        overlap=True, spawn=False)
        def save():
            client.snapshot(model, opt, step=7).wait(60)
            client.close()
            print("SAVED")
        atexit.register(save)
        """
    )
    env = clean_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [os.environ.get("PYTHONPATH", ""), env.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "SAVED" in proc.stdout, proc.stderr[-800:]
    assert [m.step for m in ckptd_client.list_checkpoints(job, root=daemon.root)] == [7]


def test_flush_timeout_holds_while_a_copy_runs(
    job: str, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    copy_one = Slot.copy_one

    def gated(self: Slot, entry: Any, tensor: torch.Tensor) -> None:
        gate.wait(30)
        copy_one(self, entry, tensor)

    monkeypatch.setattr(Slot, "copy_one", gated)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Client(job, socket=daemon.socket, root=daemon.root, overlap=True) as client:
        pending = client.snapshot(model, opt, step=1)
        flusher = threading.Thread(target=client.flush, args=(0.0,), daemon=True)
        flusher.start()
        flusher.join(3)
        blocked = flusher.is_alive()
        gate.set()
        flusher.join(30)
        pending.wait(60)
    assert not blocked, "flush(0.0) blocked until the background copy ended"
