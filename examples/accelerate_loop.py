"""ckptd with Hugging Face Accelerate: ``snapshot`` / ``restore`` in place of ``save_state`` /
``load_state``.

Run it from the repository root, twice: the second run resumes where the first stopped::

    .venv/bin/python examples/accelerate_loop.py --epochs 3
    .venv/bin/python examples/accelerate_loop.py --epochs 6
    .venv/bin/ckptd list accelerate-example

No daemon to start and no root to name: the Client starts a per-user daemon on demand (it exits
after a minute idle) and the checkpoints go under ``./checkpoints``. The snapshot at the end of
each epoch holds what ``accelerator.save_state`` would write (model, optimizer, LR scheduler,
dataloader, registered objects, RNG states) and returns as soon as the daemon has the copy;
training goes on while the daemon writes it. With several processes (``python -m
torch.distributed.run --nproc-per-node 2 examples/accelerate_loop.py``) every process snapshots
and restores its own part, and a step is visible once every process's part is durable.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator  # type: ignore[import-untyped]
from accelerate.utils import set_seed  # type: ignore[import-untyped]

import ckptd_client
from ckptd_client import accelerate as ckacc

JOB = "accelerate-example"


class SamplesSeen:
    """Anything with ``state_dict`` / ``load_state_dict`` can be registered for checkpointing."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = state["count"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    set_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=data)
    dataset = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(2)
    )
    model, opt, sched, loader = accelerator.prepare(model, opt, sched, loader)
    seen = SamplesSeen()
    accelerator.register_for_checkpointing(seen)

    client = ckptd_client.Client(JOB, retention={"keep_last": 2})
    first_epoch = 0
    if client.list():  # every process alike: each restores its own part of the newest step
        extra = ckacc.restore(accelerator, client)
        first_epoch = extra["epoch"] + 1
        accelerator.print(f"resumed after epoch {extra['epoch']} (step {extra['__step__']})")
    step = first_epoch * len(loader)
    for epoch in range(first_epoch, args.epochs):
        for inputs, targets in loader:
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            seen.count += len(inputs)
            step += 1
        ckacc.snapshot(accelerator, client, step=step, extra={"epoch": epoch}, metric=loss.item())
        accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}, {seen.count} samples seen")
    client.close()  # waits until the snapshots are durable
    accelerator.print(f"checkpoints under {client.root}: ckptd list {JOB}")


if __name__ == "__main__":
    main()
