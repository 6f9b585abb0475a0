"""What a snapshot hands back: a :class:`PendingSnapshot` until the daemon reports, then a
:class:`CheckpointInfo` (or the daemon's error); and the client's table of them.

Ownership: the :class:`~ckptd_client.Client` that made a handle is the only one that resolves
or rejects it (``_resolve`` / ``_reject``, not for users); a handle is settled once and never
changes after. Users wait on it from any thread. :class:`Outstanding` is the client's table of
the handles the daemon has not reported on yet, each with the connection its submit went out on.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ckptd.errors import CkptdError
from ckptd_client.link import Link

log = logging.getLogger("ckptd_client.pending")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as reported by the daemon (bytes and seconds)."""

    job: str
    step: int
    path: str
    raw_bytes: int
    stored_bytes: int
    written_bytes: int
    stall_s: float
    persist_s: float
    rank: int = 0
    world_size: int = 1
    step_committed: bool = True
    """For a rank of a multi-rank job the info says the rank's part is durable; this is True
    when the step was committed by the time this part was (by this write or another daemon's),
    False while other ranks' parts were still missing (a daemon commits it once they land)."""


@dataclass(frozen=True)
class CheckpointSummary:
    """A committed checkpoint as :meth:`Client.list` shows it: the manifest without its tensors
    and state. ``seq`` orders commits (0 for checkpoints written before ckptd recorded it);
    ``digest`` is the content hash of the tensors and state (None for those older ones)."""

    job: str
    step: int
    created: str
    seq: int
    digest: str | None
    raw_bytes: int
    stored_bytes: int
    metric: float | None
    latest: bool
    world_size: int = 1


class PendingSnapshot:
    """A snapshot handed to the daemon. ``wait()`` returns its :class:`CheckpointInfo` once it is
    durable, or raises the daemon's error (or :class:`SnapshotSkippedError` when it was skipped)."""

    def __init__(self, job: str, step: int) -> None:
        self.job = job
        self.step = step
        self.stall_s = 0.0
        self.skipped = False
        self._done = threading.Event()
        self._info: CheckpointInfo | None = None
        self._error: CkptdError | None = None
        self._settle = threading.Lock()  # orders settling against add_done_callback
        self._settled = False  # outcome set; done() follows once the callbacks ran
        self._callbacks: list[Callable[[PendingSnapshot], None]] = []

    def add_done_callback(self, fn: Callable[[PendingSnapshot], None]) -> None:
        """Call ``fn(self)`` once the handle is settled (committed, failed or skipped): right
        away when it already is, else on the client thread that settles it, before ``done()``
        turns true (so ``wait()`` and ``Client.flush()`` return after it ran). ``fn`` must be
        quick and must not call the Client (it runs on its connection's reader thread, or on the
        copy thread for an ``overlap=True`` snapshot whose copy or hand-off failed); an exception
        it raises is logged."""
        with self._settle:
            if not self._settled:
                self._callbacks.append(fn)
                return
        self._call(fn)

    def _call(self, fn: Callable[[PendingSnapshot], None]) -> None:
        try:
            fn(self)
        except Exception:
            log.exception("ckptd: a done-callback of %r failed", self)

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def error(self) -> CkptdError | None:
        """The failure, once done (None while pending or when committed)."""
        return self._error

    def wait(self, timeout: float | None = None) -> CheckpointInfo:
        if not self._done.wait(timeout):
            raise TimeoutError(
                f"{self.job} step {self.step} not committed within {timeout} s; it is still "
                "queued or being written (see `ckptd status`)"
            )
        if self._error is not None:
            raise self._error
        assert self._info is not None
        return dataclasses.replace(self._info, stall_s=self.stall_s)

    def _resolve(self, info: CheckpointInfo) -> None:
        with self._settle:
            self._info = info
            self._settled = True
            callbacks, self._callbacks = self._callbacks, []
        self._finish(callbacks)

    def _reject(self, error: CkptdError) -> None:
        with self._settle:
            if self._settled:
                return
            self._error = error
            self._settled = True
            callbacks, self._callbacks = self._callbacks, []
        self._finish(callbacks)

    def _finish(self, callbacks: list[Callable[[PendingSnapshot], None]]) -> None:
        try:
            for fn in callbacks:
                self._call(fn)
        finally:
            self._done.set()  # also after a BaseException from a callback: waiters wake

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else ("done" if self.done() else "pending")
        if self._error is not None:
            state = f"failed: {type(self._error).__name__}"
        return f"<PendingSnapshot {self.job} step {self.step} {state}>"


def wait_all(handles: Iterable[PendingSnapshot], timeout: float | None) -> list[PendingSnapshot]:
    """Wait until every handle is settled or ``timeout`` (seconds, for them all) runs out;
    return those still pending."""
    handles = list(handles)
    deadline = None if timeout is None else time.monotonic() + timeout
    for pending in handles:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        pending._done.wait(left)
    return [p for p in handles if not p.done()]


class Outstanding:
    """A client's handles whose outcome the daemon has not reported yet, by submit ``seq``,
    each with the :class:`Link` its submit went out on.

    Thread safety: its own lock. The trainer thread adds a handle just before its submit and
    discards it when the submit fails; the link's reader thread pops it when the daemon reports
    the outcome, and takes every handle of a link that is lost.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_seq: dict[int, tuple[Link, PendingSnapshot]] = {}

    def handles(self) -> list[PendingSnapshot]:
        with self._lock:
            return [p for _link, p in self._by_seq.values()]

    def add(self, seq: int, link: Link, pending: PendingSnapshot) -> None:
        with self._lock:
            self._by_seq[seq] = (link, pending)

    def discard(self, seq: int) -> None:
        with self._lock:
            self._by_seq.pop(seq, None)

    def pop(self, seq: int, link: Link) -> PendingSnapshot | None:
        """Remove submit ``seq``'s handle; return it when ``link`` sent that submit."""
        with self._lock:
            entry = self._by_seq.pop(seq, None)
        return entry[1] if entry is not None and entry[0] is link else None

    def take(self, link: Link | None = None, keep: int | None = None) -> list[PendingSnapshot]:
        """Remove and return, in submit order, the handles of ``link`` (of every link: None),
        except the one of submit ``keep``."""
        with self._lock:
            gone = sorted(
                seq
                for seq, (lk, _p) in self._by_seq.items()
                if (link is None or lk is link) and seq != keep
            )
            return [self._by_seq.pop(seq)[1] for seq in gone]
