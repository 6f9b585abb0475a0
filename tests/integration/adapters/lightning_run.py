"""A tiny Lightning run for the adapter tests, in a process of its own.

``python -m tests.integration.adapters.lightning_run DIR MAX_STEPS [--plugin JOB] [--resume]
[--kill-after STEP]``: trains a 2-layer MLP (fixed seed, 6 batches of synthetic data per epoch,
no shuffling, Adam + StepLR) with ``ModelCheckpoint(dirpath=DIR/ckpt, every_n_train_steps=2,
save_last=True)`` for MAX_STEPS steps. ``--plugin`` checkpoints through
``CkptdCheckpointIO(JOB)`` (socket from ``CKPTD_SOCKET``); ``--resume`` passes
``ckpt_path="last"``; ``--kill-after STEP`` waits for the commits of the steps before STEP, then
SIGKILLs the process right after the plugin's save of ``last.ckpt`` at STEP returned. At the end
it writes ``DIR/final.pt`` (weights, optimizer and scheduler state, the global step); the plugin
writes ``DIR/saves.json`` (the global steps it was asked to save at, with their paths).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ckptd_client.lightning import CkptdCheckpointIO

warnings.filterwarnings("ignore")  # Lightning's advice about workers and loggers


class TinyModule(lightning.LightningModule):
    def __init__(self, width: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)
        )

    def training_step(self, batch: Any, _index: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)}


class RecordingIO(CkptdCheckpointIO):
    """The plugin, recording what Lightning asked of it (and killing the process on demand)."""

    def __init__(self, job: str, out: Path, kill_after: int | None) -> None:
        super().__init__(job, strict=True)
        self.out = out
        self.kill_after = kill_after
        self.saves: list[list[Any]] = []

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        self.saves.append([checkpoint["global_step"], str(path)])
        self.out.write_text(json.dumps(self.saves))
        if self.kill_after is None:
            return
        if checkpoint["global_step"] < self.kill_after:
            self.client.flush()  # the earlier steps' pointers are down before the kill
        elif Path(path).name == "last.ckpt":
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("max_steps", type=int)
    ap.add_argument("--plugin")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-after", type=int)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    lightning.seed_everything(7, verbose=False)
    data = torch.utils.data.TensorDataset(torch.randn(48, 8), torch.randn(48, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
    plugins: list[Any] = []
    if args.plugin:
        plugins.append(RecordingIO(args.plugin, args.dir / "saves.json", args.kill_after))
    trainer = lightning.Trainer(
        max_steps=args.max_steps,
        accelerator="cpu",
        devices=1,
        plugins=plugins,
        callbacks=[
            ModelCheckpoint(dirpath=args.dir / "ckpt", every_n_train_steps=2, save_last=True)
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.dir,
    )
    module = TinyModule()
    trainer.fit(module, loader, ckpt_path="last" if args.resume else None)
    opt = trainer.optimizers[0]
    torch.save(
        {
            "model": module.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "global_step": trainer.global_step,
        },
        args.dir / "final.pt",
    )


if __name__ == "__main__":
    main()
