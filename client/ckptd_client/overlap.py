"""Overlapped snapshots: the copy of parameters and optimizer state runs while the next iteration
computes, and the next ``optimizer.step()`` waits for it.

In a training loop only ``optimizer.step()`` changes the parameters and the optimizer's
per-parameter state (Adam's moments and step counts): forward and backward read them, and write
gradients, activations and buffers. ``Client.snapshot(..., overlap=True)`` therefore splits the
state's tensors in two (:func:`split`):

* *guarded* tensors, each one a parameter of the optimizer or a tensor of its ``state`` (the same
  view, not merely the same storage): copied on a background thread (CPU tensors) or enqueued on
  a side stream (CUDA tensors) after the call returns;
* everything else, copied before the call returns: buffers (BatchNorm running statistics change in
  forward), the scheduler, scaler, RNG and ``extra``, parameters the optimizer does not hold, and
  parameters a forward writes (embeddings with ``max_norm``, renormalized in place).

A global step pre-hook (:class:`StepGuard`) runs before the step of every torch optimizer (the
one the snapshot named, the one a wrapper such as Lightning's or Accelerate's steps underneath, a
second optimizer sharing parameters with it) and waits for the guarded copy when that optimizer
holds a tensor the copy still has to read: on the CPU it waits for the copy thread; on CUDA it
makes the current stream wait on the copy's event, with no host synchronization. The checkpoint
is then the state at the ``snapshot()`` call, bit for bit.

What breaks that contract: changing a parameter or an optimizer state tensor in place other than
through ``optimizer.step()`` before the next step (manual weight clipping or projection under
``torch.no_grad()``, ``load_state_dict`` on the model or optimizer, an EMA written into the
parameters), and a step that runs no Python ``step()`` (a replayed CUDA graph of a captured
step). Call :meth:`ckptd_client.Client.wait_copied` first in such loops.

Thread safety: a :class:`CopyJob` is filled by one background thread and waited for by any
thread; :class:`StepGuard` is shared by the trainer thread (which sets the job) and the hook
(which runs on whatever thread calls ``optimizer.step()``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ckptd.format.skeleton import is_dtensor
from ckptd.protocol import LayoutEntry
from ckptd_client.pending import PendingSnapshot
from ckptd_client.slots import Slot

ViewKey = tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype]


def _view_key(t: torch.Tensor) -> ViewKey | None:
    """Which bytes ``t`` is: its storage's address, offset, shape, strides and dtype (a DTensor:
    its local shard's, which is what a snapshot stores); None when its storage cannot be named."""
    if is_dtensor(t):
        t = t.to_local()  # type: ignore[attr-defined]
    try:
        ptr = int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if ptr == 0:
        return None
    return ptr, int(t.storage_offset()), tuple(t.shape), tuple(t.stride()), t.dtype


def guarded_views(optimizer: Any) -> set[ViewKey]:
    """The tensors ``optimizer.step()`` writes, as views: its parameters and its state's
    tensors. A tensor that only shares a storage with one of them (a buffer carved out of the
    same flat allocation) is not among them: it may change before the step."""
    keys: set[ViewKey | None] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(p, torch.Tensor):
                keys.add(_view_key(p))
    for values in optimizer.state.values():
        if isinstance(values, dict):
            for v in values.values():
                if isinstance(v, torch.Tensor):
                    keys.add(_view_key(v))
    keys.discard(None)
    return keys  # type: ignore[return-value]


def split(
    entries: Sequence[LayoutEntry],
    tensors: Sequence[torch.Tensor],
    guarded: set[ViewKey],
    written: set[ViewKey] = frozenset(),  # type: ignore[assignment]
) -> tuple[list[int], list[int]]:
    """Indices of the tensors to copy now and of those the step guards (copied later): a tensor
    is copied later only when it *is* one the step writes and nothing else writes
    (``written``: parameters a forward changes in place)."""
    now: list[int] = []
    later: list[int] = []
    for i, t in enumerate(tensors):
        key = _view_key(t)
        if entries[i].nbytes and key in guarded and key not in written:
            later.append(i)
        else:
            now.append(i)
    return now, later


def forward_written(model: Any) -> set[ViewKey]:
    """Parameters a forward changes in place: the weights of embeddings with ``max_norm``
    (renormalized in place, rows looked up at each forward)."""
    modules = getattr(model, "modules", None)
    if modules is None:
        return set()
    keys = {
        _view_key(m.weight)
        for m in modules()
        if isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag) and m.max_norm is not None
    }
    keys.discard(None)
    return keys  # type: ignore[return-value]


def stepping_optimizer(optimizer: Any) -> Any:
    """The torch optimizer whose ``step()`` runs torch's step pre-hooks: ``optimizer`` itself,
    or the one a wrapper holds as ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``, which never run ``Optimizer.__init__``); None when
    there is none (a step no hook can see)."""
    for _ in range(4):
        if isinstance(optimizer, torch.optim.Optimizer) and (
            "_optimizer_step_pre_hooks" in vars(optimizer)
        ):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None


@dataclass(eq=False)
class CopyJob:
    """One overlapped snapshot's guarded copy into its slot.

    ``host`` pairs are copied by :meth:`run` on the background thread; CUDA tensors were enqueued
    on the copy stream by the call, and ``event`` marks their end. ``copied`` is set when the
    host copy is over (also after a failure, which ``error`` then holds)."""

    slot: Slot
    host: list[tuple[LayoutEntry, torch.Tensor]]
    guarded: set[ViewKey]
    pending: PendingSnapshot
    event: Any = None  # torch.cuda.Event when CUDA copies were enqueued
    device: Any = None  # the CUDA device of the copy stream
    copied: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self) -> None:
        """Copy the host tensors (background thread)."""
        try:
            for entry, tensor in self.host:
                self.slot.copy_one(entry, tensor)
        except BaseException as exc:
            self.error = exc
        finally:
            self.host = []  # drop the references to the training state
            self.copied.set()

    def wait_device(self) -> None:
        """Until the CUDA copies are over (background thread, before the submit)."""
        if self.event is not None:
            self.event.synchronize()


class StepGuard:
    """The step pre-hook a client puts on every torch optimizer, and the copy job it waits for.

    One global hook (``register_optimizer_step_pre_hook``), registered by
    the first overlapped snapshot and removed by :meth:`close`: it runs before the step of any
    optimizer, the one the snapshot named, the one a wrapper (Lightning, Accelerate, SAM) steps
    underneath, or a second optimizer that shares parameters with it. It waits for the job when
    that optimizer holds a parameter the job still has to copy; the time it waits is added to
    that snapshot's ``stall_s``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: CopyJob | None = None
        self._global: Any = None

    def attach(self, optimizer: Any) -> None:
        """Hook every optimizer's step (once). Raises :class:`TypeError` when ``optimizer``'s
        step runs no torch step hooks (not a torch optimizer, nor a wrapper of one)."""
        if stepping_optimizer(optimizer) is None:
            raise TypeError(
                f"overlap=True needs a torch.optim.Optimizer (its step pre-hook waits for "
                f"the copy), or a wrapper of one as .optimizer; got "
                f"{type(optimizer).__name__}. Pass overlap=False"
            )
        with self._lock:
            if self._global is None:  # removed by close()
                self._global = register_optimizer_step_pre_hook(self._before_step)

    def start(self, job: CopyJob) -> None:
        with self._lock:
            self._job = job

    def _before_step(self, optimizer: Any, _args: Any, _kwargs: Any) -> None:
        with self._lock:
            job = self._job
        if job is None or not _steps_any(optimizer, job.guarded):
            return
        started = time.perf_counter()
        job.copied.wait()
        if job.event is not None:
            torch.cuda.current_stream(job.device).wait_event(job.event)
        with self._lock:
            if self._job is job:
                self._job = None
        job.pending.stall_s += time.perf_counter() - started

    def close(self) -> None:
        with self._lock:
            self._job = None
            hook, self._global = self._global, None
        if hook is not None:
            hook.remove()


def _steps_any(optimizer: Any, guarded: set[ViewKey]) -> bool:
    """Whether ``optimizer`` holds a parameter among ``guarded`` (its step would write it)."""
    for group in getattr(optimizer, "param_groups", ()):
        for p in group["params"]:
            if isinstance(p, torch.Tensor) and _view_key(p) in guarded:
                return True
    return False
