"""What the Accelerate adapter's scripts share: the tiny training setup, its loop and a dump of
every piece of state a resumed run needs.

The setup draws from every RNG a resume must restore: dropout (torch), label noise (numpy), a loss
scale (Python ``random``) and the shuffle order (the dataloader's own ``torch.Generator``, which
accelerate's ``save_state`` does not save). Gradients accumulate over 2 batches with
``sync_with_dataloader=False``, so ``accelerator.step`` keeps counting across epochs; a
``GradScaler`` set on the accelerator before ``prepare`` stands in for the one
``mixed_precision="fp16"`` makes on a GPU (accelerate makes none on the CPU), and a registered
object counts the samples seen and keeps a running loss.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator  # type: ignore[import-untyped]
from accelerate.utils import GradientAccumulationPlugin, set_seed  # type: ignore[import-untyped]

BATCHES_PER_EPOCH = 5
BATCH = 6
EPOCHS = 4
SNAPSHOT_AFTER_EPOCHS = 2


class RunningLoss:
    """A registered object (``accelerator.register_for_checkpointing``): samples seen, and an
    exponential average of the loss as a tensor."""

    def __init__(self) -> None:
        self.seen = 0
        self.average = torch.zeros(())

    def update(self, loss: torch.Tensor, samples: int) -> None:
        self.seen += samples
        self.average = 0.9 * self.average + 0.1 * loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "average": self.average.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.average = state["average"].clone()


class Flaky:
    """A registered object whose next ``load_state_dict`` can be made to fail: ``fail_with``
    set, the load calls it (to see what the restore loaded before), keeps what it returned in
    ``seen_at_failure`` and raises; the load after that (the restore putting it back) works."""

    def __init__(self) -> None:
        self.value = torch.zeros(3)
        self.fail_with: Callable[[], Any] | None = None
        self.seen_at_failure: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.fail_with is not None:
            self.seen_at_failure, self.fail_with = self.fail_with(), None
            raise RuntimeError("injected load failure")
        self.value = state["value"].clone()


def new_accelerator() -> Accelerator:
    return Accelerator(
        cpu=True,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=2, sync_with_dataloader=False
        ),
    )


@dataclass
class Run:
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    loader: Any
    shuffle: torch.Generator
    running: RunningLoss


def build(
    *,
    register: bool = True,
    width: int = 16,
    optimizer: Callable[[Any], Any] | None = None,
    scheduler: Callable[[Any], Any] | None = None,
) -> Run:
    """A fresh accelerator with everything prepared (and the running loss registered unless
    ``register=False``), seeded as every script seeds it. ``optimizer(params)`` and
    ``scheduler(optimizer)`` replace AdamW and StepLR."""
    set_seed(0)
    acc = new_accelerator()
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, width), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(width, 1)
    )
    opt = (optimizer or partial(torch.optim.AdamW, lr=0.05))(model.parameters())
    sched = (scheduler or partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.7))(opt)
    data = torch.Generator().manual_seed(11)
    n = BATCHES_PER_EPOCH * BATCH
    dataset = torch.utils.data.TensorDataset(
        torch.randn(n, 4, generator=data), torch.randn(n, 1, generator=data)
    )
    shuffle = torch.Generator().manual_seed(7)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=shuffle)
    model, opt, sched, loader = acc.prepare(model, opt, sched, loader)
    running = RunningLoss()
    if register:
        acc.register_for_checkpointing(running)
    return Run(acc, model, opt, sched, loader, shuffle, running)


def train(run: Run, epochs: range) -> list[str]:
    """Train ``epochs``; return each batch's loss as ``float.hex`` (bit-exact comparison)."""
    acc = run.accelerator
    losses = []
    for _epoch in epochs:
        for x, y in run.loader:
            with acc.accumulate(run.model):
                noise = torch.from_numpy(np.random.normal(0.0, 0.1, size=tuple(y.shape)))
                scale = random.uniform(0.5, 1.5)
                pred = run.model(x)
                loss = torch.nn.functional.mse_loss(pred, y + noise.to(y.dtype)) * scale
                acc.backward(loss)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad()
            run.running.update(loss, len(x))
            losses.append(float(loss.item()).hex())
    return losses


def numpy_rng() -> list[Any]:
    state: tuple[str, Any, int, int, float] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    kind, keys, pos, has_gauss, cached = state
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def capture(run: Run) -> dict[str, Any]:
    """A copy of every piece of state a resume must bring back (``torch.save``-able, loadable
    with ``weights_only=True``)."""
    acc = run.accelerator
    return copy.deepcopy(
        {
            "params": dict(acc.unwrap_model(run.model).state_dict()),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": acc.scaler.state_dict(),
            "shuffle_generator": run.shuffle.get_state(),
            "loader_iteration": run.loader.iteration,
            "running": run.running.state_dict(),
            "accelerator_step": acc.step,
            "save_iteration": acc.save_iteration,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": numpy_rng(),
                "python": list(random.getstate()[1]),
            },
        }
    )


def save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
