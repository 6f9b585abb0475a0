"""Checkpoint a Hugging Face ``Trainer`` through ckptd, then resume from a ckptd checkpoint.

    .venv/bin/python examples/hf_trainer.py

No root and no socket are given, so the client starts a per-user ckptd daemon on demand (it
exits after a minute idle) and the checkpoints go to ``./checkpoints`` (job ``hf-example``;
``ckptd list hf-example`` shows them). The first run trains a tiny GPT-2 for 6 steps; at every
``save_steps`` the callback hands a snapshot to the daemon instead of letting the Trainer write a
``checkpoint-N`` folder, and ``save_total_limit=3`` becomes ckptd's ``keep_last=3``. The second
run writes the newest step out as a checkpoint folder (``materialize``) and resumes from it with
the Trainer's own ``resume_from_checkpoint``, up to step 10.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

import ckptd_client
from ckptd_client.hf import CkptdCallback, materialize

JOB = "hf-example"


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token sequences, each its own label (a language-modelling toy)."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_trainer(output_dir: Path, max_steps: int) -> Trainer:
    set_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=2,
        save_total_limit=3,
        logging_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    return Trainer(
        GPT2LMHeadModel(config), args, train_dataset=Tokens(), callbacks=[CkptdCallback(JOB)]
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        output_dir = Path(tmp) / "run"
        make_trainer(output_dir, max_steps=6).train()  # waits for its snapshots at the end
        folders = sorted(p.name for p in output_dir.glob("checkpoint-*"))
        steps = [m.step for m in ckptd_client.list_checkpoints(JOB)]
        print(f"first run: ckptd steps {steps}, checkpoint folders {folders}")

        path = materialize(JOB, Path(tmp) / "export")  # the step committed last
        print(f"materialized {path.name}: {sorted(p.name for p in path.iterdir())}")
        trainer = make_trainer(output_dir, max_steps=10)
        trainer.train(resume_from_checkpoint=str(path))
        steps = [m.step for m in ckptd_client.list_checkpoints(JOB)]
        print(f"resumed from {path.name} to step {trainer.state.global_step}; ckptd steps {steps}")


if __name__ == "__main__":
    main()
