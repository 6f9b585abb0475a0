"""Save a real trained network with ckptd_client.save, restore it, resume bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

import ckptd_client
from tests.conftest import trained


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    loss: torch.Tensor = model(torch.randn(6, 4, 10)).square().mean()
    opt.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    return loss.detach()


def test_restore_resumes_bit_identically(root: Path) -> None:
    model, opt, sched = trained()
    ckptd_client.save("net", model, opt, step=3, scheduler=sched, extra={"epoch": 2}, root=root)
    expected = [_step(model, opt) for _ in range(3)]

    fresh, fresh_opt, fresh_sched = trained(steps=0, seed=99)
    extra = ckptd_client.restore(fresh, fresh_opt, job="net", scheduler=fresh_sched, root=root)
    assert extra == {"epoch": 2, "__step__": 3}
    assert fresh_sched.state_dict() == sched.state_dict()
    got = [_step(fresh, fresh_opt) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
