"""What the write queue carries: a client's slots, and the snapshots accepted from them.

A :class:`Slot` is one segment of a client's ring (a sealed memfd), mapped read-only in the
daemon. A :class:`WriteRequest` is one snapshot accepted from a slot, waiting in the queue or
going through the pipeline (beside the writes of other jobs).

Ownership of a slot: the session that registered it owns it and closes it. From an accepted (or
being admitted) ``submit`` until the pipeline has read it, ``busy_seq`` names the request reading
it and the session must not close it; a session that closes or unregisters it meanwhile marks it
``retired`` instead, and whoever ends the read closes it. That is how a snapshot survives its
trainer. Every field is loop-thread state, except the mapping itself, which a commit thread reads
while the request is being written.

A request answers to its :class:`Submitter`, the client session it came from (implemented by
:class:`ckptd.daemon.session.Connection`); the admission and the writer use it only through that
interface.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ckptd.daemon.listen import Peer
from ckptd.errors import ProtocolError
from ckptd.format.store import Store
from ckptd.protocol import Layout, Message

log = logging.getLogger("ckptd.daemon.requests")

T = TypeVar("T")

_REQUIRED_SEALS = fcntl.F_SEAL_SHRINK


@dataclass
class Slot:
    """A client's shared-memory segment, mapped read-only in the daemon."""

    id: int
    fd: int
    size: int
    mm: mmap.mmap
    busy_seq: int | None = None
    retired: bool = False

    @classmethod
    def map(cls, slot_id: int, fd: int, size: int) -> Slot:
        """Map a client's memfd read-only as slot ``slot_id`` of ``size`` bytes, on a duplicate
        of ``fd`` (the caller still closes ``fd``). The memfd must be sealed against shrinking
        (nobody can truncate it under a reader) and hold at least ``size`` bytes."""
        dup = os.dup(fd)
        try:
            try:
                seals = fcntl.fcntl(dup, fcntl.F_GET_SEALS)
            except OSError as exc:
                raise ProtocolError("register: the fd is not a sealable memfd") from exc
            if seals & _REQUIRED_SEALS != _REQUIRED_SEALS:
                raise ProtocolError("register: the memfd must be sealed against shrinking")
            actual = os.fstat(dup).st_size
            if actual < size:
                raise ProtocolError(f"register: memfd holds {actual} bytes, fewer than {size}")
            try:
                mm = mmap.mmap(dup, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            except (OSError, ValueError) as exc:
                raise ProtocolError(f"register: cannot map the memfd read-only ({exc})") from exc
        except BaseException:
            os.close(dup)
            raise
        return cls(slot_id, dup, size, mm)

    def retire(self) -> None:
        """Its session lets go of it: close it now, or, while a request reads it, mark it
        ``retired`` for whoever ends that read to close."""
        if self.busy_seq is None:
            self.close()
        else:
            self.retired = True

    def close(self) -> None:
        try:
            try:
                self.mm.close()
            except BufferError:
                # A view of the mapping is still referenced (e.g. by a traceback cycle):
                # collect cycles and retry; if it is still pinned, let the mmap die with it.
                gc.collect()
                try:
                    self.mm.close()
                except BufferError:
                    log.warning("slot %d: mapping still referenced; it is freed later", self.id)
        finally:
            os.close(self.fd)


class Submitter(Protocol):
    """The client session a request came from, as the admission and the writer see it.

    Loop thread only. Once ``closed``, ``send`` and ``reply`` drop what they are given."""

    peer: Peer
    slots: dict[int, Slot]
    """The slots it has registered, by id."""
    closed: bool

    def send(self, msg: Message) -> None:
        """Send an event (``committed``, ``failed``, ``released``): it carries no request id."""

    def reply(self, rid: int | None, msg: Message) -> None:
        """Answer request ``rid`` (None: the request carried no id)."""

    def blocking(self, rid: int | None, work: Callable[[], T], then: Callable[[T], None]) -> None:
        """Run ``work()`` on a control thread, then ``then(result)`` on the loop; the session
        reads nothing more until then, and an exception answers ``rid`` with an error."""

    def release(self, request: WriteRequest) -> None:
        """The pipeline has read ``request``'s slot: the client may reuse it."""


@dataclass
class WriteRequest:
    """A snapshot accepted from a client, waiting for (or going through) the pipeline."""

    conn: Submitter
    seq: int
    slot: Slot
    store: Store
    job: str
    step: int
    layout: Layout
    metric: float | None
    raw_bytes: int
    accepted_at: float
    estimate_bytes: int = 0
    pin: bool = False
    rank: int = 0
    world_size: int = 1
    attempt: str | None = None
    """The rank part this is, of a multi-rank job (world_size > 1)."""
    tier: bool = True
    """Upload it to the job's tier, if it has one (``Client(tier=False)`` opts out)."""
    done: bool = False
    """True once the slot was handed back (``released``); set by the writer, once."""
    started_at: float | None = None
    """Loop time its write started (None while it waits in the queue)."""
