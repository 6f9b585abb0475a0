"""Rank processes of the multi-rank tests: ``python -m tests.integration.ranks.trainer MODE ...``.

Each writes what it did line by line with a flush (a test reads it even after SIGKILLing it):

``ddp``    a ``torchrun`` worker: a tiny ``nn.Sequential`` under DDP (gloo, CPU), the rank's
           daemon chosen from ``LOCAL_RANK`` (ranks of the first half of a node use the first
           socket, ...). It trains and snapshots ``--steps`` steps, logging ``HANDED step digest
           attempt`` (:func:`state_digest` of exactly what it handed off) and ``DURABLE step rank
           world_size step_committed``; waits until every step is committed; then restores the
           latest step into a fresh model and optimizer (``Client.restore``) and logs ``RESTORED
           step digest`` of what it got back.
``serve``  one rank driven by commands on stdin: ``snap K`` hands off
           :func:`rank_state` of step K and prints ``HANDED K`` once ``snapshot()`` returned,
           ``wait K`` prints ``DURABLE K <step_committed>`` once its part is durable, ``exit``.
``loop``   one rank of the kill loop (:mod:`tests.reliability.test_rank_kill_loop`): follows a
           control file (attempt, first step, stop), keeps in step with the other ranks through
           their progress files (as DDP's collectives would: no rank hands off a step before
           every rank of its attempt handed off the one before), and logs ``HANDING attempt
           step`` before each ``snapshot()`` and ``HANDED attempt step`` after it.

States are pure functions of (rank, step, attempt) (:func:`rank_state`), so a test can rebuild
what any rank handed off.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import zlib
from collections import deque
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptd.errors import CkptdError
from ckptd_client import Client, PendingSnapshot

# ---- states --------------------------------------------------------------------------------


@cache
def _base(numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(1234))


def rank_state(
    rank: int, step: int, attempt: str, *, shared_numel: int, own_numel: int
) -> dict[str, Any]:
    """What ``rank`` hands off at ``step`` in ``attempt``: ``shared`` is the same on every rank
    (a DDP replica: stored once), ``own`` is the rank's own and differs between attempts, so a
    step mixed from two attempts or ranks never compares equal."""
    seed = zlib.crc32(f"{attempt}/{rank}/{step}".encode())
    own = torch.randn(own_numel, generator=torch.Generator().manual_seed(seed))
    return {
        "shared": _base(shared_numel) + float(step),
        "own": own,
        "meta": {"rank": rank, "step": step, "attempt": attempt},
    }


def state_digest(obj: Any) -> str:
    """A hash of a nested state: keys in order, container types, and every tensor's dtype,
    shape and bytes; equal digests mean bit-identical states."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}:".encode() + obj.tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key, value in obj.items():
            h.update(f"{type(key).__name__}={key!r}:".encode())
            _feed(h, value)
    elif isinstance(obj, list | tuple):
        h.update(f"{type(obj).__name__}{len(obj)}:".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"{type(obj).__name__}={obj!r};".encode())


def socket_for(sockets: list[str], local_rank: int, local_world: int) -> str:
    """The daemon of a node-local rank: the sockets split the node's ranks into equal blocks."""
    return sockets[local_rank * len(sockets) // local_world]


class Log:
    """Appends lines to a file, flushed each."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", buffering=1)

    def __call__(self, *words: object) -> None:
        self.file.write(" ".join(map(str, words)) + "\n")
        self.file.flush()


# ---- ddp (under torchrun) --------------------------------------------------------------------


def ddp_main(a: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ckptd.format.store import Store
    from ckptd_client.state import collect

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    local = int(os.environ["LOCAL_RANK"])
    sock = socket_for(a.sockets.split(","), local, int(os.environ["LOCAL_WORLD_SIZE"]))
    log = Log(Path(a.out) / f"rank-{rank}.log")
    log("SOCKET", sock)

    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        # The middle weight (1.25 MiB) is larger than store.pack_bytes: an object of its own,
        # the same on every rank (as is its momentum buffer), so stored once.
        net = torch.nn.Sequential(
            torch.nn.Linear(8, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 640),
            torch.nn.ReLU(),
            torch.nn.Linear(640, 4),
        )
        return net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    model, opt = build(0)
    ddp = DistributedDataParallel(model)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    client = Client(a.job, socket=sock, root=a.root, spawn=False, strict=True)
    handles: list[PendingSnapshot] = []
    for step in range(1, a.steps + 1):
        x, y = torch.randn(16, 8, generator=data), torch.randn(16, 4, generator=data)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        # DDP all-reduces the gradients: every rank keeps the same weights.
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        extra = {"rank": rank, "loss": loss.detach().clone(), "batch": x}
        digest = state_digest(collect(model, opt, extra=extra, rng=True))
        handles.append(client.snapshot(model, opt, step=step, extra=extra))
        log("HANDED", step, digest, client.ranks.attempt)
    for handle in handles:
        info = handle.wait(120)
        log("DURABLE", info.step, info.rank, info.world_size, info.step_committed)
    # Ranks are seconds apart at most; the last part's daemon (or a recheck) commits each step.
    store = Store(client.root)
    deadline = time.monotonic() + 120
    while store.steps(a.job) != list(range(1, a.steps + 1)):
        if time.monotonic() > deadline:
            raise SystemExit(f"steps not all committed: {store.steps(a.job)}")
        time.sleep(0.1)
    dist.barrier()
    fresh, fresh_opt = build(1)
    extra = client.restore(fresh, fresh_opt)
    log(
        "RESTORED",
        extra.pop("__step__"),
        state_digest(collect(fresh, fresh_opt, extra=extra, rng=True)),
    )
    client.close()
    dist.barrier()
    dist.destroy_process_group()


# ---- serve (commands on stdin) ---------------------------------------------------------------


def serve_main(a: argparse.Namespace) -> None:
    client = Client(
        a.job,
        socket=a.socket,
        root=a.root,
        spawn=False,
        strict=True,
        rank=a.rank,
        world_size=a.world_size,
        attempt=a.attempt,
    )
    handles: dict[int, PendingSnapshot] = {}
    print("READY", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["snap"]:
            step = int(words[1])
            state = rank_state(
                a.rank, step, a.attempt, shared_numel=a.shared_numel, own_numel=a.own_numel
            )
            handles[step] = client.snapshot(state=state, step=step, rng=False)
            print("HANDED", step, flush=True)
        elif words[:1] == ["wait"]:
            info = handles[int(words[1])].wait(120)
            print("DURABLE", info.step, info.step_committed, flush=True)
        elif words[:1] == ["exit"]:
            break
    client.close()


# ---- loop (the kill loop's ranks) ------------------------------------------------------------


def read_control(path: Path) -> dict[str, Any]:
    """The kill loop's control file: ``{"attempt": str, "start": int, "stop": bool}``."""
    while True:
        try:
            doc = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.01)  # not written yet (it is replaced atomically)
            continue
        assert isinstance(doc, dict)
        return doc


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _progress(dirpath: Path, rank: int) -> tuple[str, int] | None:
    try:
        attempt, step = (dirpath / f"rank-{rank}.at").read_text().split()
    except (FileNotFoundError, ValueError):
        return None
    return attempt, int(step)


def loop_main(a: argparse.Namespace) -> None:
    """See the module docstring. A rank waits at each step until every rank of its attempt has
    reached the step before (a collective's barrier), and re-reads the control file while it
    waits: a new attempt (the test killed a rank and restarts the job) switches it over."""
    dirpath = Path(a.dir)
    control = dirpath / "control.json"
    log = Log(dirpath / f"rank-{a.rank}.log")
    client: Client | None = None
    attempt = ""
    step = 0
    pending: deque[PendingSnapshot] = deque()
    while True:
        ctl = read_control(control)
        if ctl["stop"]:
            break
        if ctl["attempt"] != attempt:
            if client is not None:
                client.close(timeout=5)
            attempt, step = ctl["attempt"], int(ctl["start"])
            pending.clear()
            client = _loop_client(a, attempt)
            log("ATTEMPT", attempt, step)
            write_atomic(dirpath / f"rank-{a.rank}.at", f"{attempt} {step - 1}\n")  # joined
        assert client is not None
        if not _everyone_at(dirpath, a.world_size, attempt, step - 1):
            time.sleep(0.005)
            continue
        state = rank_state(
            a.rank, step, attempt, shared_numel=a.shared_numel, own_numel=a.own_numel
        )
        log("HANDING", attempt, step)
        handle = client.snapshot(state=state, step=step, rng=False)
        log("HANDED", attempt, step)
        write_atomic(dirpath / f"rank-{a.rank}.at", f"{attempt} {step}\n")
        pending.append(handle)
        step += 1
        if handle.done() and handle.error is not None:
            time.sleep(0.25)  # its daemon is down: the next snapshot reconnects
        while pending and (pending[0].done() or len(pending) > 2):
            _settle(pending.popleft())
    if client is not None:
        client.close(timeout=10)
    log("STOPPED")


def _loop_client(a: argparse.Namespace, attempt: str) -> Client:
    """A Client for ``attempt``, once the rank's daemon answers (the test restarts it)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return Client(
                a.job,
                socket=a.socket,
                root=a.root,
                spawn=False,
                strict=False,
                slots=2,
                timeout_s=10,
                rank=a.rank,
                world_size=a.world_size,
                attempt=attempt,
            )
        except CkptdError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _everyone_at(dirpath: Path, world_size: int, attempt: str, step: int) -> bool:
    """Whether every rank has handed off ``step`` of ``attempt`` (or joined the attempt, for the
    step before its first)."""
    for rank in range(world_size):
        at = _progress(dirpath, rank)
        if at is None or at[0] != attempt or at[1] < step:
            return False
    return True


def _settle(handle: PendingSnapshot) -> None:
    try:
        handle.wait(30)
    except (CkptdError, TimeoutError):
        pass  # its daemon was killed: the step may or may not commit


# ---- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.integration.ranks.trainer")
    sub = p.add_subparsers(dest="mode", required=True)
    ddp = sub.add_parser("ddp")
    ddp.add_argument("--job", required=True)
    ddp.add_argument("--root", required=True)
    ddp.add_argument("--sockets", required=True, help="comma-separated, one per daemon")
    ddp.add_argument("--out", required=True)
    ddp.add_argument("--steps", type=int, default=3)
    for name in ("serve", "loop"):
        q = sub.add_parser(name)
        q.add_argument("--job", required=True)
        q.add_argument("--root", required=True)
        q.add_argument("--socket", required=True)
        q.add_argument("--rank", type=int, required=True)
        q.add_argument("--world-size", type=int, required=True)
        q.add_argument("--shared-numel", type=int, default=1 << 16)
        q.add_argument("--own-numel", type=int, default=1 << 14)
    sub.choices["serve"].add_argument("--attempt", required=True)
    sub.choices["loop"].add_argument("--dir", required=True)
    a = p.parse_args(argv)
    {"ddp": ddp_main, "serve": serve_main, "loop": loop_main}[a.mode](a)


if __name__ == "__main__":
    main()
