"""Shared fixtures: an empty checkpoint root per test, and a small trained network.

No test reads the machine's system-wide config (``/etc/ckptd/ckptd.toml``): in this process every
test runs with :data:`ckptd.config.SYSTEM_CONFIG` pointed at a file that does not exist (autouse
fixture below); daemons, CLI runs and trainers started as subprocesses get ``CKPTD_CONFIG``
pointing at an empty file (``tests.integration.daemon_fixtures.clean_env``), so their lookup
never reaches ``/etc``. ``tests/integration/daemon/test_isolation.py`` checks both.

Under ``CI=true`` a test whose requirement is missing fails instead of skipping
(:mod:`tests._requirements`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptd.config
from ckptd.format.store import Store
from tests._requirements import in_ci


def pytest_report_header() -> str:
    if in_ci():
        return "CI=true: a test whose requirement is missing fails instead of skipping"
    return "CI is not true: a test whose requirement is missing skips (CI=true makes it fail)"


@pytest.fixture(autouse=True)
def no_system_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Point this process's system config path at a file that does not exist, for every test
    (tests of the lookup itself patch it again). Returns that path."""
    absent = tmp_path_factory.getbasetemp() / "no-system-config" / "ckptd.toml"
    monkeypatch.setattr(ckptd.config, "SYSTEM_CONFIG", absent)
    return absent


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty checkpoint root; CKPTD_* variables cleared and an empty XDG config home, so
    nothing leaks in from outside (the system config is kept out by ``no_system_config``)."""
    for var in ("CKPTD_ROOT", "CKPTD_CONFIG", "CKPTD_SOCKET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    path = tmp_path / "ckpt-root"
    yield path


@pytest.fixture
def store(root: Path) -> Store:
    return Store(root)


class TinyNet(torch.nn.Module):
    """Conv + BatchNorm + attention + linear: buffers, int buffers and several param shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.norm = torch.nn.BatchNorm1d(8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(x)).transpose(1, 2)
        h, _ = self.attn(h, h, h)
        out: torch.Tensor = self.head(h.mean(1))
        return out


def trained(
    steps: int = 3, seed: int = 0
) -> tuple[TinyNet, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A TinyNet after ``steps`` AdamW steps with a StepLR schedule (deterministic)."""
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(steps):
        loss = model(torch.randn(6, 4, 10)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched
