"""ckptd with torchrun: every rank of a DDP job snapshots, a daemon commits the step.

Run it (CPU, gloo) from the repository root, twice: the second run resumes where the first
stopped::

    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 examples/torchrun_ddp.py --steps 10
    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 examples/torchrun_ddp.py --steps 20
    .venv/bin/ckptd list ddp-example --root checkpoints

Each rank makes its own ``Client``: rank and world size come from the process group, and the
restart attempt from an id rank 0 broadcasts once. ``snapshot()`` copies the rank's state into
shared memory and returns without any collective; the node's daemon (spawned on demand, shared by
the node's ranks) writes the rank's part, and the step becomes visible once every rank's part is
durable. DDP replicas are identical, so their objects are stored once. ``restore()`` loads each
rank's own part of the newest step every rank committed (rank 0 picks it, one broadcast).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import ckptd_client

JOB = "ddp-example"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--root", default="checkpoints")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    client = ckptd_client.Client(JOB, root=args.root)
    try:  # every rank calls restore(): rank 0 picks the step and broadcasts it
        start = client.restore(model, opt)["__step__"] + 1
        print(f"rank {rank}: resumed from step {start - 1}", flush=True)
    except ckptd_client.NotFoundError:  # every rank alike: nothing committed yet
        start = 1
    data = torch.Generator().manual_seed(1234 + rank)
    for step in range(start, args.steps + 1):
        x = torch.randn(16, 32, generator=data)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0:
            client.snapshot(model, opt, step=step, metric=loss.item())
    client.close()  # waits for this rank's parts to be durable
    if rank == 0:
        print(f"rank 0: trained to step {args.steps}; `ckptd list {JOB} --root {args.root}`")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
