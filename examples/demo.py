"""ckptd demo: train, checkpoint every few steps, get SIGKILLed, resume, and compare.

Runs three trainer processes of the same small transformer on synthetic tokens:

1. a reference run, uninterrupted, that records its loss at every step;
2. a run that checkpoints every ``--every`` steps and SIGKILLs itself at step ``--crash-at``;
3. a run that restores the latest checkpoint and finishes.

The resumed run's losses must equal the reference run's bit for bit (model, AdamW, LR schedule,
dropout RNG and data RNG all come back exactly). Then it prints ``ckptd list``.
Checkpoints go under ``./checkpoints`` (or ``--root``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

JOB = "demo"
VOCAB, DIM, SEQ, BATCH = 256, 64, 32, 16


def build() -> tuple[Any, Any, Any]:
    import torch

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        DIM, nhead=4, dim_feedforward=128, dropout=0.1, batch_first=True
    )
    model = torch.nn.Sequential(
        torch.nn.Embedding(VOCAB, DIM),
        torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
        torch.nn.Linear(DIM, VOCAB),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    return model, opt, sched


def train(args: argparse.Namespace) -> None:
    """The trainer process (``--worker``)."""
    import torch

    import ckptd_client

    model, opt, sched = build()
    assert isinstance(model, torch.nn.Module)
    assert isinstance(opt, torch.optim.Optimizer)
    start = 1
    if args.resume:
        extra = ckptd_client.restore(model, opt, job=JOB, scheduler=sched, root=args.root)
        start = extra["__step__"] + 1
        print(
            f"[trainer] resumed from step {extra['__step__']} "
            f"(losses so far: {len(extra['losses'])})"
        )
        losses: list[float] = extra["losses"]
    else:
        torch.manual_seed(1234)
        losses = []
    for step in range(start, args.steps + 1):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        losses.append(loss.item())
        if args.every and step % args.every == 0:
            info = ckptd_client.save(
                JOB,
                model,
                opt,
                step=step,
                scheduler=sched,
                extra={"losses": losses},
                metric=loss.item(),
                root=args.root,
            )
            print(
                f"[trainer] step {step:3d} loss {loss.item():.4f}  checkpoint committed "
                f"({info.manifest.stored_bytes / 1e6:.2f} MB stored, "
                f"{info.written_bytes / 1e6:.2f} MB new, {info.seconds * 1000:.0f} ms)"
            )
        if step == args.crash_at:
            print(
                f"[trainer] step {step:3d} loss {loss.item():.4f}  -- SIGKILL (simulated crash)",
                flush=True,
            )
            os.kill(os.getpid(), signal.SIGKILL)
    Path(args.losses).write_text(json.dumps(losses))


def run_worker(root: Path, out: Path, *flags: str) -> int:
    cmd = [sys.executable, __file__, "--worker", "--root", str(root), "--losses", str(out), *flags]
    return subprocess.run(cmd, check=False).returncode


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--root", type=Path, default=Path("checkpoints"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--crash-at", type=int, default=17)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--losses", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        train(args)
        return 0

    root = args.root.absolute()
    shutil.rmtree(root / JOB, ignore_errors=True)  # the demo's own job: start clean
    scratch = root / ".demo"
    scratch.mkdir(parents=True, exist_ok=True)
    ref, resumed = scratch / "reference.json", scratch / "resumed.json"
    steps = ["--steps", str(args.steps)]

    print(f"== 1. reference run, {args.steps} steps, no checkpoints")
    if run_worker(root, ref, *steps, "--every", "0", "--crash-at", "0") != 0:
        return 1
    print(
        f"== 2. training with a checkpoint every {args.every} steps, "
        f"crashing at step {args.crash_at}"
    )
    rc = run_worker(
        root, resumed, *steps, "--every", str(args.every), "--crash-at", str(args.crash_at)
    )
    print(f"   trainer exited with {'SIGKILL' if rc == -signal.SIGKILL else rc}")
    print("== 3. restarting: resume from the latest checkpoint")
    if (
        run_worker(root, resumed, *steps, "--every", str(args.every), "--crash-at", "0", "--resume")
        != 0
    ):
        return 1

    a, b = json.loads(ref.read_text()), json.loads(resumed.read_text())
    same = a == b
    print(
        f"== 4. loss curve of the resumed run {'==' if same else '!='} uninterrupted run "
        f"({len(b)} steps, final loss {b[-1]:.6f} vs {a[-1]:.6f})"
    )
    shutil.rmtree(scratch, ignore_errors=True)
    print("== 5. ckptd list")
    ckptd = Path(sys.executable).with_name("ckptd")
    subprocess.run([str(ckptd), "list", JOB, "--root", str(root)], check=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
