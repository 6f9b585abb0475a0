"""Overlapped snapshots: the copy of parameters and optimizer state runs while the next iteration
computes, and the next ``optimizer.step()`` waits for it.

In a training loop only ``optimizer.step()`` changes the parameters and the optimizer's
per-parameter state (Adam's moments and step counts): forward and backward read them, and write
gradients, activations and buffers. ``Client.snapshot(..., overlap=True)`` therefore splits the
state's tensors in two (:func:`split`):

* *guarded* tensors, whose storage is a parameter of the optimizer or a tensor of its ``state``:
  copied on a background thread (CPU tensors) or enqueued on a side stream (CUDA tensors) after
  the call returns;
* everything else, copied before the call returns: buffers (BatchNorm running statistics change in
  forward), the scheduler, scaler, RNG and ``extra``, and parameters the optimizer does not hold.

A step pre-hook on the optimizer (:class:`StepGuard`) waits for the guarded copy before the
optimizer changes anything: on the CPU it waits for the copy thread; on CUDA it makes the current
stream wait on the copy's event, with no host synchronization. The checkpoint is then the state at
the ``snapshot()`` call, bit for bit.

What breaks that contract: changing a parameter or an optimizer state tensor in place other than
through ``optimizer.step()`` before the next step (manual weight clipping or projection under
``torch.no_grad()``, ``load_state_dict`` on the model or optimizer, an EMA written into the
parameters). Call :meth:`ckptd_client.Client.wait_copied` first in such loops.

Thread safety: a :class:`CopyJob` is filled by one background thread and waited for by any
thread; :class:`StepGuard` is shared by the trainer thread (which sets the job) and the hooks
(which run on whatever thread calls ``optimizer.step()``).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptd.protocol import LayoutEntry
from ckptd_client.pending import PendingSnapshot
from ckptd_client.slots import Slot


def _storage_ptr(t: torch.Tensor) -> int:
    """The address of ``t``'s storage (0 when it has none that can be named: empty, DTensor)."""
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):
        return 0


def guarded_storages(optimizer: Any) -> set[int]:
    """The storages ``optimizer.step()`` writes: its parameters and its state's tensors."""
    ptrs: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(p, torch.Tensor):
                ptrs.add(_storage_ptr(p))
    for values in optimizer.state.values():
        if isinstance(values, dict):
            for v in values.values():
                if isinstance(v, torch.Tensor):
                    ptrs.add(_storage_ptr(v))
    ptrs.discard(0)
    return ptrs


def split(
    entries: Sequence[LayoutEntry], tensors: Sequence[torch.Tensor], guarded: set[int]
) -> tuple[list[int], list[int]]:
    """Indices of the tensors to copy now and of those the step guards (copied later)."""
    now: list[int] = []
    later: list[int] = []
    for i, t in enumerate(tensors):
        if entries[i].nbytes and _storage_ptr(t) in guarded:
            later.append(i)
        else:
            now.append(i)
    return now, later


@dataclass(eq=False)
class CopyJob:
    """One overlapped snapshot's guarded copy into its slot.

    ``host`` pairs are copied by :meth:`run` on the background thread; CUDA tensors were enqueued
    on the copy stream by the call, and ``event`` marks their end. ``copied`` is set when the
    host copy is over (also after a failure, which ``error`` then holds)."""

    slot: Slot
    host: list[tuple[LayoutEntry, torch.Tensor]]
    optimizer: Any
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
    """The step pre-hooks a client put on optimizers, and the copy job they wait for.

    One hook per optimizer, registered the first time a snapshot names it and removed by
    :meth:`close`. A hook waits only for a job taken from its own optimizer; the time it waits is
    added to that snapshot's ``stall_s``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: CopyJob | None = None
        self._hooks: dict[int, tuple[weakref.ref[Any], Any]] = {}

    def attach(self, optimizer: Any) -> None:
        """Hook ``optimizer`` (once). Raises :class:`TypeError` for an object with no step
        pre-hooks."""
        with self._lock:
            held = self._hooks.get(id(optimizer))
            if held is not None and held[0]() is optimizer:
                return
            register: Callable[..., Any] | None = getattr(optimizer, "register_step_pre_hook", None)
            if register is None:
                raise TypeError(
                    f"overlap=True needs a torch.optim.Optimizer (its step pre-hook waits for "
                    f"the copy); got {type(optimizer).__name__}. Pass overlap=False"
                )
            handle = register(self._before_step)
            self._hooks[id(optimizer)] = (weakref.ref(optimizer), handle)

    def start(self, job: CopyJob) -> None:
        with self._lock:
            self._job = job

    def _before_step(self, optimizer: Any, _args: Any, _kwargs: Any) -> None:
        with self._lock:
            job = self._job
        if job is None or job.optimizer is not optimizer:
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
            hooks, self._hooks = list(self._hooks.values()), {}
            self._job = None
        for _ref, handle in hooks:
            handle.remove()
