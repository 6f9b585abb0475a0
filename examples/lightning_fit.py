"""Lightning with ckptd: one line in the Trainer, resuming exactly as before.

Run it from the repository root, twice: the second run resumes from ``last.ckpt``::

    .venv/bin/python examples/lightning_fit.py --steps 6
    .venv/bin/python examples/lightning_fit.py --steps 12
    .venv/bin/ckptd list lightning-example --root checkpoints

The only change to a Lightning script is ``plugins=[CkptdCheckpointIO(JOB)]``. ``ModelCheckpoint``
still decides when to save and what to keep; each save hands the checkpoint to the ckptd daemon
(spawned on demand, writing under ``./checkpoints``) and training goes on while it is written.
The ``.ckpt`` files in ``lightning-ckpt/`` are small pointers to committed checkpoints, written
once each is durable, so ``fit(ckpt_path="last")`` finds the newest one.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ckptd_client.lightning import CkptdCheckpointIO

JOB = "lightning-example"


class Regressor(lightning.LightningModule):
    def __init__(self, width: int = 32, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, width), torch.nn.GELU(), torch.nn.Linear(width, 1)
        )

    def training_step(self, batch: Any, _index: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    lightning.seed_everything(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 16), torch.randn(256, 1))
    trainer = lightning.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        plugins=[CkptdCheckpointIO(JOB)],  # the one-line change
        callbacks=[
            ModelCheckpoint(dirpath="lightning-ckpt", every_n_train_steps=2, save_last=True)
        ],
        logger=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    trainer.fit(Regressor(), loader, ckpt_path="last")
    print(f"trained to step {trainer.global_step}; see `ckptd list {JOB} --root checkpoints`")


if __name__ == "__main__":
    main()
