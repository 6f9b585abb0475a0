"""``python -m ckptd_client.probe``: a trainer process that measures what ``snapshot()`` costs it.

``ckptd bench`` runs this against a daemon it started, so that the snapshot is measured the way a
user's training loop sees it: from a process of its own, through the public :class:`Client`.
Usage::

    python -m ckptd_client.probe --socket S --root R --size BYTES [--tensor-bytes N] [--reps N]
                                 [--save-root DIR [--config FILE]]

It builds a state of ``--size`` bytes of random-normal float32 tensors of at most
``--tensor-bytes`` each, connects a ``Client(slots=1, spawn=False)`` to the daemon on ``--socket``
writing under ``--root``, prepares (sizes and page-faults) the slot, then runs ``--reps`` reps of
three measurements, in an order that rotates with the rep. With ``--save-root`` it first times
one blocking ``ckptd_client.save`` of the state into a store there (``save``: ``seconds``,
``stored_bytes``), configured by ``--config`` (default: the built-in defaults, not whatever
config file this environment would find):

* ``stall_s``: how long ``snapshot()`` takes to return (the training loop is blocked), and
  ``durable_s``: from that call until ``wait()`` returns (the checkpoint is committed);
* ``copy_s``: one ``copy_`` of the state into reused, pre-touched buffers (the floor of any
  snapshot's copy), in this process, so that ``stall / copy`` compares like with like;
* ``torch_save_s``: ``torch.save`` + ``fsync`` of the state to ``--root`` (a blocking checkpoint).

Before each rep every 4 KiB of the state changes, so the daemon's dedup does not make later reps
free; after each rep its checkpoint is deleted (untimed). On success it prints one JSON object on
stdout: ``bytes``, ``tensors``, ``reps``, ``samples`` (a list of seconds per measurement, one
per rep) and ``save`` (with ``--save-root``), and exits 0. A ckptd error (no daemon, a failed
snapshot) is printed as ``{"error": TYPE, "message": TEXT}``, also with exit code 0 (the caller
raises that type); anything unexpected, as a traceback and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ckptd.config import Config, load_config
from ckptd.errors import CkptdError
from ckptd.format.store import Store
from ckptd_client.api import save
from ckptd_client.client import Client

MiB = 1 << 20
TENSOR_BYTES = 32 * MiB
"""Default largest tensor (a model's parameters and optimizer moments are of that order)."""
JOB = "ckptd-bench"


def make_state(size: int, tensor_bytes: int = TENSOR_BYTES) -> dict[str, torch.Tensor]:
    """About ``size`` bytes of random-normal float32 tensors of at most ``tensor_bytes`` each
    (seeded: the same state every run)."""
    per = max(1, min(tensor_bytes, size) // 4)
    state: dict[str, torch.Tensor] = {}
    left = max(size // 4, 1)
    gen = torch.Generator().manual_seed(1)
    while left > 0:
        n = min(per, left)
        state[f"t{len(state)}"] = torch.randn(n, generator=gen)
        left -= n
    return state


def perturb(state: dict[str, torch.Tensor], rep: int) -> None:
    """Change one value in every 4 KiB of the state, so that every object of the next checkpoint
    is new: ckptd's dedup must not make later reps free (a training step changes every weight)."""
    with torch.no_grad():
        for t in state.values():
            t.view(-1)[::1024].add_(1.0 + rep)


def measure(
    socket: Path, root: Path, state: dict[str, torch.Tensor], reps: int, job: str = JOB
) -> dict[str, list[float]]:
    """The samples of each measurement (see the module docstring), ``reps`` of each."""
    samples: dict[str, list[float]] = {
        "stall_s": [],
        "durable_s": [],
        "copy_s": [],
        "torch_save_s": [],
    }
    copies = {k: torch.empty_like(t) for k, t in state.items()}
    for k, t in state.items():
        copies[k].copy_(t)  # first touch, untimed
    store = Store(root)
    with Client(job, socket=socket, root=root, spawn=False, slots=1) as client:
        # Sizes and page-faults the slot, as a training loop does once after its first step.
        client.prepare(state=state, background=False)

        def snapshot(step: int) -> None:
            t0 = time.perf_counter()
            pending = client.snapshot(state=state, step=step)
            t1 = time.perf_counter()
            pending.wait()
            t2 = time.perf_counter()
            samples["stall_s"].append(t1 - t0)
            samples["durable_s"].append(t2 - t0)
            store.delete_checkpoint(job, step)  # untimed: keep one rep on disk
            store.gc(job)

        def copy() -> None:
            t0 = time.perf_counter()
            for k, t in state.items():
                copies[k].copy_(t)
            samples["copy_s"].append(time.perf_counter() - t0)

        def torch_save() -> None:
            path = root / "torch-save.pt"
            t0 = time.perf_counter()
            with path.open("wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            samples["torch_save_s"].append(time.perf_counter() - t0)
            path.unlink()

        for rep in range(reps):
            perturb(state, rep)
            methods: list[Callable[[], None]] = [copy, partial(snapshot, rep + 1), torch_save]
            for method in methods[rep % 3 :] + methods[: rep % 3]:
                method()
    return samples


def measure_save(
    state: dict[str, torch.Tensor], root: Path, config: Config, job: str = JOB
) -> dict[str, Any]:
    """One blocking ``save`` of ``state`` into the store at ``root``: until it is committed."""
    t0 = time.perf_counter()
    result = save(job, state=state, step=0, rng=False, root=root, config=config)
    return {"seconds": time.perf_counter() - t0, "stored_bytes": result.manifest.stored_bytes}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ckptd_client.probe",
        description="Snapshot a synthetic state through a ckptd daemon; print timings as JSON.",
    )
    parser.add_argument("--socket", type=Path, required=True, help="The daemon's socket.")
    parser.add_argument("--root", type=Path, required=True, help="Checkpoint root (scratch).")
    parser.add_argument("--size", type=_positive, required=True, help="State size in bytes.")
    parser.add_argument("--tensor-bytes", type=_positive, default=TENSOR_BYTES)
    parser.add_argument("--reps", type=_positive, default=3)
    parser.add_argument("--job", default=JOB)
    parser.add_argument("--save-root", type=Path, help="Time a blocking save into this store.")
    parser.add_argument("--config", type=Path, help="The save's config file (default: none).")
    args = parser.parse_args(argv)
    state = make_state(args.size, args.tensor_bytes)
    saved: dict[str, Any] | None = None
    try:
        if args.save_root is not None:
            config = Config() if args.config is None else load_config(args.config)
            saved = measure_save(state, args.save_root, config, args.job)
        samples = measure(args.socket, args.root, state, args.reps, args.job)
    except CkptdError as exc:
        # On stdout as JSON, so that ``ckptd bench`` raises the same error type (and exits with
        # its code); exit 0: the probe ran and is reporting what it found.
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        return 0
    result: dict[str, Any] = {
        "bytes": sum(t.nbytes for t in state.values()),
        "tensors": len(state),
        "reps": args.reps,
        "samples": samples,
    }
    if saved is not None:
        result["save"] = saved
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
