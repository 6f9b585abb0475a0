"""The Accelerate adapter's 2-process run (``torchrun --nproc-per-node 2 acc_ddp.py SOCKET ROOT
OUT``): accelerate wraps the model in DDP (gloo, CPU); each process trains 2 steps on its own
batches, with its own RNG seeds and its own registered object, snapshots step 2 and writes what
it holds to ``OUT/ddp-rank<r>.pt``. ``build`` and ``capture`` also serve the single process that
loads each rank's part (acc_train.py)."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ckptd_client

JOB = "acc-ddp"
STEP = 2


@dataclass
class Run:
    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    running: Any


def build() -> Run:
    from accelerate.utils import set_seed  # type: ignore[import-untyped]

    from tests.integration.adapters import acc_common as c

    set_seed(0)
    acc = c.new_accelerator()
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model, opt = acc.prepare(model, opt)
    running = c.RunningLoss()
    acc.register_for_checkpointing(running)
    return Run(acc, model, opt, running)


def capture(run: Run) -> dict[str, Any]:
    import copy

    from tests.integration.adapters import acc_common as c

    return copy.deepcopy(
        {
            "params": dict(run.accelerator.unwrap_model(run.model).state_dict()),
            "optimizer": run.optimizer.state_dict(),
            "running": run.running.state_dict(),
            "accelerator_step": run.accelerator.step,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": c.numpy_rng(),
                "python": list(random.getstate()[1]),
            },
        }
    )


def main() -> None:
    from ckptd_client import accelerate as ckacc
    from tests.integration.adapters import acc_common as c

    socket, root, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    run = build()
    acc = run.accelerator
    rank = acc.process_index
    kind = type(run.model).__name__
    torch.manual_seed(100 + rank)  # each process its own batches and RNG states
    np.random.seed(100 + rank)
    random.seed(100 + rank)
    for _ in range(STEP * 2):  # 2 optimizer steps of 2 accumulated batches
        with acc.accumulate(run.model):
            x = torch.randn(4, 4)
            loss = (run.model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
            acc.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad()
        run.running.update(loss, len(x) * random.randint(1, 9))
    client = ckptd_client.Client(JOB, socket=socket, root=root, spawn=False)
    expected = capture(run)
    handle = ckacc.snapshot(acc, client, step=STEP, extra={"rank": rank})
    info = handle.wait(timeout=60)
    client.close()
    c.save(
        {
            "state": expected,
            "wrapper": kind,
            "world_size": info.world_size,
            "distributed_type": acc.distributed_type.value,
        },
        out / f"ddp-rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
