"""ckptd demo: train, snapshot every few steps, get SIGKILLed, resume, and compare.

Runs three trainer processes of the same small transformer on synthetic tokens:

1. a reference run, uninterrupted, that records its loss at every step;
2. a run that hands a snapshot to the ckptd daemon every ``--every`` steps (the daemon is started
   on demand, detached, and exits after a minute idle) and SIGKILLs itself at step ``--crash-at``,
   without waiting for its last snapshot: the daemon commits it anyway;
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
    client = ckptd_client.Client(JOB, root=args.root) if args.every else None
    start = 1
    if args.resume:
        assert client is not None
        extra = client.restore(model, opt, scheduler=sched)
        start = extra["__step__"] + 1
        losses: list[float] = extra["losses"]
        print(f"[trainer] resumed from step {extra['__step__']} ({len(losses)} losses so far)")
    else:
        torch.manual_seed(1234)
        losses = []
    if client is not None:
        client.prepare(model, opt, scheduler=sched, extra={"losses": [0.0] * args.steps})
    pending = []
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
        if client is not None and step % args.every == 0:
            handle = client.snapshot(
                model, opt, step=step, scheduler=sched, extra={"losses": losses}, metric=loss.item()
            )
            pending.append(handle)
            print(
                f"[trainer] step {step:3d} loss {loss.item():.4f}  snapshot handed off in "
                f"{handle.stall_s * 1000:.1f} ms"
            )
        if step == args.crash_at:
            print(
                f"[trainer] step {step:3d} loss {loss.item():.4f}  -- SIGKILL (simulated crash)",
                flush=True,
            )
            os.kill(os.getpid(), signal.SIGKILL)
    if client is not None:
        for handle in pending:
            info = handle.wait()
            print(
                f"[trainer] step {info.step:3d} durable: {info.stored_bytes / 1e6:.2f} MB "
                f"stored, {info.written_bytes / 1e6:.2f} MB new, "
                f"{info.persist_s * 1000:.0f} ms after hand-off"
            )
        client.close()
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
    p.add_argument("--crash-at", type=int, default=16)
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
