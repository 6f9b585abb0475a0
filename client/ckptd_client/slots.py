"""The client's shared-memory slots, and the ring that records who owns each one.

A :class:`Slot` is one sealed memfd segment: mapped read-write here, registered once with the
daemon (which maps it read-only), filled with one snapshot at a time. The :class:`Ring` holds a
client's slots and is the one place a slot's :class:`SlotState` changes::

    FREE -> FILLING (trainer) -> SUBMITTED (trainer) -> DAEMON (accepted) -> FREE (released)
            FILLING -> FREE (given back unfilled)       SUBMITTED -> FREE (refused)

The trainer thread moves a slot out of FREE and into SUBMITTED; only the daemon's answers, applied
by the link's reader thread, move it on from there. A lost connection abandons every slot at once.
"""

from __future__ import annotations

import enum
import fcntl
import math
import mmap
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch

from ckptd.format.skeleton import dtype_name
from ckptd.protocol import LayoutEntry, Message, align, encode_entries

PAGE_BYTES = mmap.PAGESIZE
SLOT_ROUND_BYTES = 1 << 20
"""Slot sizes are multiples of this, so a state that grows a little reuses its slots."""
_MADV_POPULATE_WRITE = 23
_MAX_VIEWS = 1 << 16  # cached slot views before the cache is dropped (a layout that keeps changing)


def _host_bytes(t: torch.Tensor) -> np.ndarray | None:
    """The bytes of a contiguous CPU tensor as a flat ``uint8`` array sharing its memory; None
    for any other tensor (copied with ``copy_`` instead)."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.is_conj() or t.is_neg():
        return None
    try:
        return t.detach().reshape(-1).view(torch.uint8).numpy()
    except (RuntimeError, TypeError):
        return None


def slot_size(need: int) -> int:
    """The size of a new slot for ``need`` bytes: at least one :data:`SLOT_ROUND_BYTES`."""
    rounded = (need + SLOT_ROUND_BYTES - 1) // SLOT_ROUND_BYTES * SLOT_ROUND_BYTES
    return max(SLOT_ROUND_BYTES, rounded)


def layout(paths: Sequence[str], tensors: Sequence[torch.Tensor]) -> tuple[list[LayoutEntry], int]:
    """Where each tensor goes in a slot (aligned offsets, in order), and the end of the data:
    the offset of the encoded layout that follows it."""
    entries = []
    cursor = 0
    for path, t in zip(paths, tensors, strict=True):
        nbytes = t.numel() * t.element_size()
        entries.append(LayoutEntry(path, dtype_name(t.dtype), tuple(t.shape), cursor, nbytes))
        cursor = align(cursor + nbytes)
    return entries, cursor


class LayoutCache:
    """The layout of the last state laid out, kept for the next snapshot of the same layout.

    A training loop snapshots the same tensors (paths, dtypes, shapes) every time: then the
    entries and their encoding are reused and only the skeleton is encoded again (its values,
    such as the learning rate or the RNG state, change). Any change of a path, dtype or shape
    lays the state out anew."""

    def __init__(self) -> None:
        self._key: tuple[tuple[str, torch.dtype, torch.Size], ...] | None = None
        self._entries: list[LayoutEntry] = []
        self._data_end = 0
        self._encoded = b""

    def get(
        self, paths: Sequence[str], tensors: Sequence[torch.Tensor]
    ) -> tuple[list[LayoutEntry], int, bytes]:
        """``layout(paths, tensors)`` and :func:`~ckptd.protocol.encode_entries` of it."""
        key = tuple(zip(paths, (t.dtype for t in tensors), (t.shape for t in tensors), strict=True))
        if key != self._key:
            entries, data_end = layout(paths, tensors)
            self._entries, self._data_end = entries, data_end
            self._encoded = encode_entries(entries)
            self._key = key
        return self._entries, self._data_end, self._encoded


class SlotState(enum.Enum):
    """Who owns a slot's bytes. Only the trainer thread moves a slot out of ``FREE`` and into
    ``SUBMITTED``; only the daemon's answers move it on from there (see :class:`Ring`)."""

    FREE = "free"
    """In the ring; the next snapshot may fill it."""
    FILLING = "filling"
    """Taken by ``snapshot()`` / ``prepare()`` on the trainer thread; the daemon never reads it."""
    SUBMITTED = "submitted"
    """``submit`` was sent and not yet answered: the daemon may read it at any moment."""
    DAEMON = "daemon"
    """Accepted: the daemon reads it until it reports ``released``."""


class Slot:
    """A sealed memfd of ``size`` bytes mapped read-write here and read-only in the daemon.

    Born FILLING (its creator fills it or gives it to the ring). ``state`` and ``seq`` are changed
    only by the :class:`Ring` it belongs to; the bytes only by the thread that holds it FILLING.
    """

    def __init__(self, slot_id: int, size: int, job: str) -> None:
        self.id = slot_id
        self.size = size
        self.state = SlotState.FILLING
        self.seq: int | None = None  # the submit whose bytes the daemon reads (SUBMITTED, DAEMON)
        self.fd = os.memfd_create(f"ckptd-{job}-{slot_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(
                self.fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
            )
            self.mm = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.bytes = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.pinned = False
        # Typed views into the slot by (offset, dtype, shape): a training loop snapshots the same
        # layout every time, so after the first snapshot no view is made again.
        self._views: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The slot's bytes at ``offset`` as a ``dtype`` tensor of ``shape``."""
        key = (offset, dtype, shape)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            nbytes = math.prod(shape) * dtype.itemsize
            view = self.bytes[offset : offset + nbytes].view(dtype).view(shape)
            self._views[key] = view
        return view

    def fill(
        self,
        entries: Sequence[LayoutEntry],
        tensors: Sequence[torch.Tensor],
        meta_offset: int,
        meta: bytes,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        """Copy each tensor to its entry, and the encoded layout ``meta`` to ``meta_offset``.

        Every byte is in the slot when this returns. CUDA tensors are copied ``non_blocking`` on
        ``stream`` (required when there are any), which first waits for the current stream."""
        if self.copy_in(entries, tensors, stream):
            assert stream is not None
            stream.synchronize()
        self.write_meta(meta_offset, meta)

    def copy_in(
        self,
        entries: Sequence[LayoutEntry],
        tensors: Sequence[torch.Tensor],
        stream: torch.cuda.Stream | None = None,
    ) -> bool:
        """Copy each CPU tensor to its entry now, and enqueue each CUDA tensor's copy
        ``non_blocking`` on ``stream`` (required when there are any; it first waits for the
        current stream of its device). A CUDA tensor on another device than the stream's is
        copied now, synchronously. True when CUDA copies were enqueued: the caller synchronizes."""
        cuda = any(t.is_cuda for t in tensors)
        if cuda:
            assert stream is not None, "CUDA tensors need a copy stream"
            stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.no_grad():
            for e, t in zip(entries, tensors, strict=True):
                if e.nbytes == 0:
                    continue
                dst = self.view(e.offset, t.dtype, e.shape)
                if t.is_cuda and stream is not None and t.device == stream.device:
                    with torch.cuda.stream(stream):
                        dst.copy_(t, non_blocking=True)
                else:  # CPU, or CUDA on another device: copied now, after its device's work
                    dst.copy_(t)
        return cuda

    def copy_one(self, entry: LayoutEntry, tensor: torch.Tensor) -> None:
        """Copy one CPU tensor to its entry on this thread alone (no intra-op threads: a
        background copy must not take the cores the training loop computes on). A contiguous
        tensor is one ``memcpy`` that releases the GIL."""
        if entry.nbytes == 0:
            return
        dst = self.view(entry.offset, tensor.dtype, entry.shape)
        src = _host_bytes(tensor)
        if src is not None:
            np.copyto(_host_bytes(dst), src)  # type: ignore[arg-type]
            return
        with torch.no_grad():
            dst.copy_(tensor)

    def write_meta(self, meta_offset: int, meta: bytes) -> None:
        self.mm[meta_offset : meta_offset + len(meta)] = meta

    def prefault(self) -> None:
        """Touch every page now so snapshots copy at memory speed, not page-fault speed."""
        try:
            self.mm.madvise(_MADV_POPULATE_WRITE)
        except (OSError, ValueError):
            self.bytes[::PAGE_BYTES].zero_()

    def pin(self) -> None:
        """Register the slot as pinned memory so CUDA copies into it run asynchronously."""
        if not self.pinned and torch.cuda.is_available():
            cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            rc = cudart.cudaHostRegister(self.bytes.data_ptr(), self.size, 0)
            self.pinned = int(rc) == 0

    def close(self) -> None:
        """Unmap and close this side. The daemon's own mapping (if any) stays valid."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(  # type: ignore[no-untyped-call]
                self.bytes.data_ptr()
            )
            self.pinned = False
        self._views.clear()
        del self.bytes
        self.mm.close()
        os.close(self.fd)


class Ring:
    """The client's slots and the one place their :class:`SlotState` changes.

    Thread safety: every method takes ``cond``'s lock (a caller may hold it already to wait on
    ``cond``, which is notified whenever a slot becomes FREE or the ring is abandoned). The
    trainer thread (under the client's call lock) takes, fills, submits and gives back slots; the
    link's reader thread applies the daemon's answers. When the connection is lost,
    :meth:`abandon` takes *every* slot out of the ring at once: a slot whose fate is unknown is
    never filled again. Abandoned slots are closed (unmapped on this side) later, on the trainer
    thread, which may still be copying into one.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.slots: list[Slot] = []
        self.abandoned: list[Slot] = []

    def _move(self, slot: Slot, expect: SlotState, to: SlotState) -> None:
        if slot.state is not expect:
            raise AssertionError(f"slot {slot.id}: {slot.state.value} -> {to.value}")
        slot.state = to
        if to is SlotState.FREE:
            slot.seq = None
            self.cond.notify_all()

    def free(self) -> list[Slot]:
        with self.cond:
            return [s for s in self.slots if s.state is SlotState.FREE]

    def take(self, slot: Slot) -> None:
        """FREE -> FILLING (trainer)."""
        with self.cond:
            self._move(slot, SlotState.FREE, SlotState.FILLING)

    def take_out(self, slot: Slot) -> None:
        """FREE -> FILLING and out of the ring (trainer): a slot too small for the next fill,
        which the caller unregisters and closes."""
        with self.cond:
            self._move(slot, SlotState.FREE, SlotState.FILLING)
            self.slots.remove(slot)

    def add(self, slot: Slot) -> None:
        """A new slot (born FILLING) joins the ring (trainer)."""
        with self.cond:
            self.slots.append(slot)

    def give_back(self, slot: Slot) -> None:
        """FILLING -> FREE (trainer): the daemon never saw this fill. A slot abandoned meanwhile
        stays abandoned."""
        with self.cond:
            if slot in self.slots:
                self._move(slot, SlotState.FILLING, SlotState.FREE)

    def submitting(self, slot: Slot, seq: int) -> None:
        """FILLING -> SUBMITTED (trainer), just before ``submit`` ``seq`` is sent."""
        with self.cond:
            self._move(slot, SlotState.FILLING, SlotState.SUBMITTED)
            slot.seq = seq

    def answered(self, msg: Message) -> bool:
        """Apply the daemon's ``accepted`` / ``refused`` / ``released`` (reader thread). False
        when it names no slot in the state it implies: a protocol violation."""
        op = msg["op"]
        seq = msg.get("seq")
        with self.cond:
            for slot in self.slots:
                if slot.seq is None or slot.seq != seq:
                    continue
                if op == "accepted" and slot.state is SlotState.SUBMITTED:
                    self._move(slot, SlotState.SUBMITTED, SlotState.DAEMON)
                    return True
                if op == "refused" and slot.state is SlotState.SUBMITTED:
                    self._move(slot, SlotState.SUBMITTED, SlotState.FREE)
                    return True
                if (
                    op == "released"
                    and slot.state is SlotState.DAEMON
                    and slot.id == msg.get("slot")
                ):
                    self._move(slot, SlotState.DAEMON, SlotState.FREE)
                    return True
                return False
            return False

    def abandon(self) -> None:
        """The connection is gone: no slot of it may be filled again (reader or trainer)."""
        with self.cond:
            self.abandoned.extend(self.slots)
            self.slots = []
            self.cond.notify_all()

    def close_abandoned(self) -> None:
        """Unmap abandoned slots (trainer thread only, when no fill is in progress)."""
        with self.cond:
            slots, self.abandoned = self.abandoned, []
        for slot in slots:
            slot.close()
