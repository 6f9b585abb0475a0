"""Which rank this process is, of how many, and which restart attempt: for multi-rank jobs.

:func:`detect` answers from, in order: what the caller passed, ``torch.distributed`` when it is
initialized, the ``RANK`` / ``WORLD_SIZE`` environment that ``torchrun`` sets, else rank 0 of 1.

The *attempt* keeps torchrun restarts apart: a restarted job re-runs steps its previous attempt
may have handed off partly, and each rank hands a step off once per attempt. It comes from, in
order: ``attempt=``, ``CKPTD_ATTEMPT``, ``TORCHELASTIC_RUN_ID`` + ``TORCHELASTIC_RESTART_COUNT``
(unless the run id is torchrun's default ``none``, which every launch shares), and a random id
that rank 0 draws and broadcasts when ``torch.distributed`` is initialized (one collective, when
the Client is made: every rank must make its Client; a restart makes a new process group, hence
a new attempt). With none of them a job of several ranks cannot tell its attempts apart, and
:func:`detect` asks for ``attempt=``.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from dataclasses import dataclass

import torch

from ckptd.errors import RankLayoutError
from ckptd.format.manifest import check_attempt
from ckptd.protocol import MAX_WORLD_SIZE

log = logging.getLogger("ckptd_client.ranks")


@dataclass(frozen=True)
class Ranks:
    """This process's place in its job: ``rank`` of ``world_size``, in restart ``attempt``
    (None for a single process)."""

    rank: int = 0
    world_size: int = 1
    attempt: str | None = None

    @property
    def multi(self) -> bool:
        return self.world_size > 1


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise RankLayoutError(f"{name}={value!r} in the environment is not an integer") from None


def current_rank() -> tuple[int, int] | None:
    """``(rank, world_size)`` from torch.distributed or the environment; None if neither says."""
    if _dist_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is not None and world is not None:
        return rank, world
    return None


def detect(
    rank: int | None = None, world_size: int | None = None, attempt: str | None = None
) -> Ranks:
    """This process's :class:`Ranks` (see the module docstring). Raises
    :class:`RankLayoutError` for a rank outside ``[0, world_size)``, only one of ``rank`` and
    ``world_size`` given, or a multi-rank job without a way to tell attempts apart."""
    if (rank is None) != (world_size is None):
        raise RankLayoutError(
            f"give both rank= and world_size= or neither (got rank={rank!r}, "
            f"world_size={world_size!r})"
        )
    if rank is None or world_size is None:
        found = current_rank()
        rank, world_size = found if found is not None else (0, 1)
    for name, value in (("rank", rank), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise RankLayoutError(f"{name} must be an integer, got {value!r}")
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise RankLayoutError(f"world_size must be in [1, {MAX_WORLD_SIZE}], got {world_size}")
    if not 0 <= rank < world_size:
        raise RankLayoutError(
            f"rank {rank} is outside [0, {world_size}): each of the job's world_size processes "
            "needs its own rank in that range"
        )
    if world_size == 1:
        return Ranks()
    return Ranks(rank, world_size, _attempt(attempt, world_size))


def _attempt(attempt: str | None, world_size: int) -> str:
    given = attempt if attempt is not None else os.environ.get("CKPTD_ATTEMPT") or None
    if given is not None:
        try:
            return check_attempt(given)
        except ValueError as exc:
            source = "attempt=" if attempt is not None else "CKPTD_ATTEMPT"
            raise RankLayoutError(f"{source}: {exc}") from None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":  # "none": torchrun's default, the same for every launch
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return check_attempt(_safe(f"{run_id}.r{restart}"))
    if _dist_ready() and torch.distributed.get_world_size() == world_size:
        return _broadcast_attempt()
    raise RankLayoutError(
        f"a job of {world_size} ranks needs a restart attempt id that every rank shares, and "
        "none was found (no torch.distributed process group, no torchrun environment): pass "
        "attempt= (the same on every rank, new for each run) or set CKPTD_ATTEMPT"
    )


def _broadcast_attempt() -> str:
    """Rank 0 draws a random id and broadcasts it to every rank of the default group."""
    backend = torch.distributed.get_backend()
    device = torch.device("cpu")
    if backend == "nccl":  # untested here (no GPU): NCCL broadcasts device tensors
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.zeros(2, dtype=torch.int64, device=device)
    if torch.distributed.get_rank() == 0:
        value[0] = int.from_bytes(secrets.token_bytes(7), "little")
        value[1] = int.from_bytes(secrets.token_bytes(7), "little")
    torch.distributed.broadcast(value, src=0)
    a, b = (int(v) for v in value.cpu().tolist())
    return f"pg-{a:014x}{b:014x}"


def _safe(text: str) -> str:
    """``text`` as an attempt id: unsupported characters become ``_``, at most 128 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).replace("..", "_.")
    if not cleaned[:1].isalnum():
        cleaned = "a" + cleaned
    return cleaned[:128]


def agree_on_step(step: int, seq: int, failed: bool, ranks: Ranks) -> tuple[int, int, bool]:
    """Rank 0's ``(step, seq)`` and whether any rank ``failed``, when a process group of this
    job's size is initialized (one broadcast, one all-reduce); else this rank's own values (every
    rank then resolved the step from the store on its own)."""
    if not ranks.multi or not _dist_ready():
        return step, seq, failed
    if torch.distributed.get_world_size() != ranks.world_size:
        return step, seq, failed
    device = torch.device("cpu")
    if torch.distributed.get_backend() == "nccl":  # untested here (no GPU)
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([step, seq], dtype=torch.int64, device=device)
    torch.distributed.broadcast(value, src=0)
    flag = torch.tensor([1 if failed else 0], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    agreed_step, agreed_seq = (int(v) for v in value.cpu().tolist())
    return agreed_step, agreed_seq, bool(flag.item())
