"""``Client``: hand snapshots to the ckptd daemon through shared memory.

``snapshot()`` copies the state once into a *slot* (a sealed memfd shared with the daemon, see
:mod:`ckptd_client.slots`), sends a small ``submit`` message over the :mod:`~ckptd_client.link`
and returns as soon as the daemon has accepted it. From then on the daemon owns the copy: it
hashes, compresses and commits it even if this process dies a moment later. The returned
:class:`~ckptd_client.pending.PendingSnapshot` reports when the checkpoint is durable. With no
daemon on the per-user socket, the client starts one (:mod:`ckptd_client.spawn`).

Thread safety: one trainer thread calls ``snapshot`` / ``prepare`` / ``flush`` / ``close`` (calls
are serialized by a lock if several threads do). The link's reader thread only updates slot
states and settles :class:`PendingSnapshot` handles.

Daemon failures never raise out of ``snapshot()`` unless ``strict=True``: they are logged as
warnings and carried by the returned handle (``wait()`` raises them). Errors in the state itself
(:class:`UnsupportedStateError`, bad arguments) always raise: they are bugs to fix, not outages.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ckptd.config import DEFAULT_ROOT, SYSTEM_SOCKET, configured_root, load_config, locate_socket
from ckptd.errors import (
    CkptdError,
    DaemonNoAnswerError,
    DaemonUnavailableError,
    NotFoundError,
    ProtocolError,
    RankLayoutError,
    SnapshotFailedError,
    SnapshotSkippedError,
    SnapshotUnconfirmedError,
    UntrustedDaemonError,
)
from ckptd.format.restore import MapLocation
from ckptd.format.skeleton import flatten
from ckptd.format.store import Store, validate_job_name
from ckptd.policy.retention import policy_from_dict, policy_to_dict
from ckptd.protocol import (
    PROTOCOL_VERSION,
    LayoutEntry,
    Message,
    encode_layout,
    metric_to_wire,
)
from ckptd.tier.mirror import tier_store
from ckptd.tier.remote import TierSettings, parse_url
from ckptd_client.api import list_checkpoints, restore
from ckptd_client.link import LOST_OP, Link, error_from
from ckptd_client.overlap import (
    CopyJob,
    StepGuard,
    forward_written,
    guarded_views,
    split,
    stepping_optimizer,
)
from ckptd_client.pending import (
    CheckpointInfo,
    CheckpointSummary,
    Outstanding,
    PendingSnapshot,
    wait_all,
)
from ckptd_client.ranks import Ranks, agree_on_step, detect
from ckptd_client.slots import PAGE_BYTES, LayoutCache, Ring, Slot, layout, slot_size
from ckptd_client.spawn import spawn_daemon
from ckptd_client.state import Stateful, collect

log = logging.getLogger("ckptd_client.client")

OnFull = Literal["block", "skip"]


@dataclass(frozen=True)
class _Submit:
    """What a submit carries besides the slot: the caller's arguments and when the call began."""

    metric: float | None
    pin: bool
    started: float


def _can_overlap(optimizer: object, state: object) -> bool:
    return state is None and stepping_optimizer(optimizer) is not None


def _check_overlap(optimizer: object, state: object) -> None:
    """Refuse ``overlap=True`` where no optimizer step could wait for the copy."""
    if state is not None:
        raise ValueError(
            "overlap=True needs the model and optimizer objects, not state=: the copy is waited "
            "for in the optimizer's step, and with state= there is no step to hook. Pass the "
            "objects, or overlap=False"
        )
    if optimizer is None or isinstance(optimizer, dict):
        got = "no optimizer" if optimizer is None else "a plain dict as the optimizer"
        raise ValueError(
            f"overlap=True needs the optimizer object (its step waits for the copy of the "
            f"parameters and its state); got {got}. Pass the optimizer, or overlap=False"
        )


class Client:
    """A training process's handle on the ckptd daemon, for one job.

    ``socket``: the daemon socket (default: ``CKPTD_SOCKET``, ``daemon.socket`` in the config, the
    system socket if present, else the per-user socket). ``root``: where checkpoints go (default:
    ``CKPTD_ROOT``, ``store.root``; with none of them, where the daemon writes, and
    ``./checkpoints`` with a daemon this client spawned; see :mod:`ckptd.locate`). After the
    connection, ``self.root`` is the root the daemon writes this job to. ``slots``:
    shared-memory buffers in the ring; with ``slots=2`` one snapshot can be written while the
    next is copied. ``on_full``: when every slot is still being read, ``"block"`` waits (the wait
    counts as stall) and ``"skip"`` drops the snapshot (the handle says so). ``spawn``: start a
    per-user daemon when none answers; the default is yes only for the per-user socket nobody
    named (a socket given as ``socket=``, ``CKPTD_SOCKET`` or ``daemon.socket`` means that
    daemon: it not answering is a :class:`DaemonUnavailableError`). ``strict``: raise daemon
    failures from ``snapshot()`` instead of logging them.

    Multi-rank jobs (``torchrun``): ``rank`` / ``world_size`` default to ``torch.distributed``
    when it is initialized, else to the ``RANK`` / ``WORLD_SIZE`` environment, else rank 0 of 1;
    ``attempt`` (what keeps restarts apart) to ``CKPTD_ATTEMPT``, an id rank 0 broadcasts when a
    process group is initialized (one collective, here), or torchrun's run id and restart count
    (:mod:`ckptd_client.ranks`). Every rank calls ``snapshot()`` with its own state, with no
    collective; each rank's daemon makes its part durable and the step is committed by a daemon
    once every rank's part is. To checkpoint from rank 0 only, pass ``rank=0, world_size=1`` on
    rank 0 (and make no Client elsewhere).

    ``overlap``: the default of :meth:`snapshot`'s ``overlap`` (copy the parameters and the
    optimizer's state while the next iteration computes; ``optimizer.step()`` waits for it).

    ``tier``: when the daemon has an object-store tier for the job (``[tier]`` in its config),
    its checkpoints are uploaded after each local commit; ``tier=False`` keeps this client's
    snapshots local. :meth:`restore` reads from the tier when the newest checkpoint is not on
    local disk.
    """

    def __init__(
        self,
        job: str,
        *,
        socket: str | Path | None = None,
        root: str | Path | None = None,
        slots: int = 2,
        on_full: OnFull = "block",
        spawn: bool | None = None,
        strict: bool = False,
        allow_pickle: bool = False,
        retention: dict[str, Any] | None = None,
        timeout_s: float = 60.0,
        rank: int | None = None,
        world_size: int | None = None,
        attempt: str | None = None,
        tier: bool = True,
        overlap: bool = False,
    ) -> None:
        self.job = validate_job_name(job)
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
        self.overlap = overlap
        if not isinstance(tier, bool):
            raise ValueError(f"tier must be True or False, got {tier!r}")
        self.tier = tier
        self._tier_info: dict[str, Any] | None = None
        """The job's object-store tier as the daemon named it (``welcome``), or None."""
        self.ranks: Ranks = detect(rank, world_size, attempt)
        self._handed: set[int] = set()  # steps this rank handed off in this attempt
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        if on_full not in ("block", "skip"):
            raise ValueError(f"on_full must be 'block' or 'skip', got {on_full!r}")
        config = load_config()
        asked = configured_root(root, config)
        self._asked_root = None if asked is None else asked.absolute()
        # The embedded default, fixed now (a later chdir must not move it); until the daemon
        # answers, self.root is the root a daemon spawned by this client writes to.
        self._default_root = DEFAULT_ROOT.absolute()
        self.root = self._asked_root or self._default_root
        self.socket_path, self._socket_source = locate_socket(socket, config)
        if spawn is None:
            spawn = self._socket_source == "default" and self.socket_path != SYSTEM_SOCKET
        self.spawn = spawn
        self.n_slots = slots
        self.on_full = on_full
        self.strict = strict
        self.allow_pickle = allow_pickle
        self.retention = None
        if retention is not None:
            self.retention = policy_to_dict(policy_from_dict(retention, "retention"))
        self.timeout_s = timeout_s
        self.stats = {"snapshots": 0, "skipped": 0, "blocked": 0, "blocked_s": 0.0, "failed": 0}
        self._ring = Ring()
        self._call = threading.RLock()
        self._next_slot_id = 0
        self._outstanding = Outstanding()
        self._seq = 0
        self._submitting: int | None = None  # the submit waiting for accepted / refused
        self._link: Link | None = None
        self._closed = False
        self._stream: torch.cuda.Stream | None = None  # CUDA copies into slots, made on first use
        self._prepare_thread: threading.Thread | None = None
        self._last_wait_s = 0.0
        self._layouts = LayoutCache()
        self._guard = StepGuard()
        self._worker: ThreadPoolExecutor | None = None  # the copy thread of overlapped snapshots
        self._background: Future[None] | None = None  # the last overlapped snapshot's copy
        self._copy: CopyJob | None = None
        self._background_error: CkptdError | None = None  # raised by the next call (strict)
        self._copy_thread: int | None = None  # the copy thread's ident (its callbacks settle)
        self._connect()

    # ---- connection ----------------------------------------------------------------------

    def _connect(self) -> Link:
        try:
            link = Link(self.socket_path, self.timeout_s, self._on_event, self._ring.answered)
        except UntrustedDaemonError:
            raise
        except OSError as exc:
            if not self.spawn:
                named = {
                    "socket=": "the socket= argument",
                    "CKPTD_SOCKET": "CKPTD_SOCKET",
                    "daemon.socket": "daemon.socket in the config",
                    "system": "the system daemon's socket",
                }.get(self._socket_source, "default (the per-user socket)")
                raise DaemonUnavailableError(
                    f"no ckptd daemon answers on {self.socket_path} ({exc.strerror or exc}), "
                    f"named by {named}. Start that daemon (`ckptd start --socket "
                    f"{self.socket_path}`, or `systemctl start ckptd`), correct the path, or "
                    "let the client start a private one with Client(..., spawn=True)"
                ) from exc
            try:
                spawn_daemon(self.socket_path, self._asked_root or self._default_root)
                link = Link(self.socket_path, self.timeout_s, self._on_event, self._ring.answered)
            except OSError as spawn_exc:
                raise DaemonUnavailableError(
                    f"no ckptd daemon answers on {self.socket_path} and none could be started "
                    f"there: {spawn_exc.strerror or spawn_exc} ({spawn_exc.filename or ''}); "
                    "start one yourself (`ckptd start --user --socket ...`) or pass another "
                    "socket="
                ) from spawn_exc
        try:
            welcome = link.request(
                {
                    "op": "hello",
                    "version": PROTOCOL_VERSION,
                    "job": self.job,
                    "root": None if self._asked_root is None else str(self._asked_root),
                    "default_root": str(self._default_root),
                    "pid": os.getpid(),
                    "retention": self.retention,
                    "rank": self.ranks.rank,
                    "world_size": self.ranks.world_size,
                    "attempt": self.ranks.attempt,
                }
            )
        except BaseException:
            link.close()
            raise
        if welcome.get("version") != PROTOCOL_VERSION:
            link.close()
            raise ProtocolError(
                f"daemon speaks protocol {welcome.get('version')!r}, this client "
                f"{PROTOCOL_VERSION}; install matching ckptd versions"
            )
        self.root = Path(str(welcome.get("root", self.root)))
        tier = welcome.get("tier")
        self._tier_info = (
            tier if isinstance(tier, dict) and isinstance(tier.get("url"), str) else None
        )
        # From now on this client's root is this one, also after a reconnect to another daemon
        # (a restarted service, or one spawned on demand meanwhile): a run's checkpoints stay in
        # one place, or the reconnect fails saying why.
        self._asked_root = self.root
        self._link = link
        return link

    def _ensure_link(self) -> Link:
        """The live connection, reconnecting (with a fresh, empty ring) after a lost one.
        Trainer thread, under the call lock."""
        link = self._link
        if link is None or link.lost:
            if link is not None:
                link.close()
                self._link = None
            self._ring.abandon()
            self._wait_copied()
            self._ring.close_abandoned()
            link = self._connect()
        return link

    def _on_event(self, link: Link, msg: Message) -> None:
        """Reader thread: ``released`` / ``committed`` / ``failed`` / lost, of ``link``."""
        op = msg["op"]
        if op == "released":
            if not self._ring.answered(msg):
                log.warning("ckptd: the daemon released a slot it did not hold: %s", msg)
                link.lost_reason = "the daemon released a slot it did not hold"
                link.break_link()
            return
        if op in ("committed", "failed"):
            pending = self._outstanding.pop(int(msg.get("seq", -1)), link)
            if pending is None:
                return
            if op == "committed":
                pending._resolve(
                    CheckpointInfo(
                        self.job,
                        int(msg["step"]),
                        str(msg["path"]),
                        int(msg["raw_bytes"]),
                        int(msg["stored_bytes"]),
                        int(msg["written_bytes"]),
                        pending.stall_s,
                        float(msg["persist_s"]),
                        self.ranks.rank,
                        self.ranks.world_size,
                        bool(msg.get("step_committed", True)),
                    )
                )
            else:
                self.stats["failed"] += 1
                error = error_from(msg)
                log.warning("ckptd: %s step %d failed: %s", self.job, pending.step, error)
                pending._reject(error)
            return
        if op == LOST_OP:
            if link is self._link:
                self._ring.abandon()
            # The submit still waiting for its answer is failed by the snapshot() that sent it.
            unconfirmed = self._outstanding.take(link, keep=self._submitting)
            for pending in unconfirmed:
                pending._reject(
                    SnapshotUnconfirmedError(
                        f"the connection to ckptd at {self.socket_path} was lost "
                        f"({link.lost_reason}) after the daemon accepted {self.job} step "
                        f"{pending.step} and before it reported the commit; the daemon normally "
                        f"still commits it (check `ckptd list {self.job}`)"
                    )
                )
            if unconfirmed and not self._closed:
                log.warning(
                    "ckptd: connection lost with %d snapshot(s) unconfirmed: %s",
                    len(unconfirmed),
                    link.lost_reason,
                )

    # ---- slots ---------------------------------------------------------------------------

    def _new_slot(self, link: Link, need: int, pin: bool) -> Slot:
        """A new slot of at least ``need`` bytes, registered with the daemon, in FILLING."""
        size = slot_size(need)
        slot = Slot(self._next_slot_id, size, self.job)
        self._next_slot_id += 1
        try:
            slot.prefault()
            if pin:
                slot.pin()
            link.request({"op": "register", "slot": slot.id, "size": size}, [slot.fd])
        except BaseException:
            slot.close()
            raise
        self._ring.add(slot)
        return slot

    def _acquire(self, link: Link, need: int, pin: bool, *, wait: bool) -> Slot | None:
        """A slot of at least ``need`` bytes, now FILLING and owned by the caller; None when
        every slot is held by the daemon and ``wait`` is false. A free slot that is too small is
        replaced by a bigger one. Trainer thread, under the call lock.

        Waiting for the daemon to release a slot is unbounded while the daemon is alive (a large
        write may take long); every ``timeout_s`` of waiting the daemon is asked for its status,
        and one that does not answer breaks the link (:class:`DaemonUnavailableError`)."""
        waited = 0.0
        ring = self._ring
        victim: Slot | None = None
        fit: Slot | None = None
        while True:
            since_ping = 0.0
            with ring.cond:
                while since_ping < link.timeout_s:
                    if link.lost:
                        raise DaemonUnavailableError(
                            f"the connection to ckptd at {self.socket_path} was lost: "
                            f"{link.lost_reason}"
                        )
                    free = ring.free()
                    fit = next((s for s in free if s.size >= need), None)
                    if fit is not None:
                        ring.take(fit)
                        if pin and not fit.pinned:
                            fit.pin()  # made for CPU state: CUDA copies into it would block
                        break
                    if free or len(ring.slots) < self.n_slots:
                        victim = free[0] if free else None
                        if victim is not None:
                            ring.take_out(victim)
                        break
                    if not wait:
                        return None
                    started = time.perf_counter()
                    ring.cond.wait(timeout=min(1.0, link.timeout_s))
                    elapsed = time.perf_counter() - started
                    waited += elapsed
                    since_ping += elapsed
                else:
                    fit = None
                    victim = None
                    since_ping = -1.0  # waited timeout_s: is the daemon still alive?
            if since_ping >= 0:
                break
            link.request({"op": "status", "job": self.job})  # raises when it does not answer
        self._last_wait_s = waited
        if waited:
            self.stats["blocked"] += 1
            self.stats["blocked_s"] += waited
            log.info("ckptd: snapshot waited %.3f s for a free slot", waited)
        if fit is not None:
            return fit
        if victim is not None:  # too small: replace it with a bigger one
            try:
                link.request({"op": "unregister", "slot": victim.id})
            finally:
                victim.close()
        return self._new_slot(link, need, pin)

    def _fill(
        self,
        slot: Slot,
        entries: list[LayoutEntry],
        tensors: Sequence[torch.Tensor],
        meta_offset: int,
        meta: bytes,
    ) -> None:
        slot.fill(entries, tensors, meta_offset, meta, self._copy_stream(tensors))

    def _copy_stream(self, tensors: Sequence[torch.Tensor]) -> torch.cuda.Stream | None:
        """The CUDA stream copies into slots run on, made on the device of the first CUDA
        tensor (None for a state without CUDA tensors)."""
        if self._stream is None:
            first = next((t for t in tensors if t.is_cuda), None)
            if first is None:
                return None
            self._stream = torch.cuda.Stream(device=first.device)  # type: ignore[no-untyped-call]
        return self._stream

    # ---- public API ----------------------------------------------------------------------

    def prepare(
        self,
        model: Stateful | dict[str, Any] | None = None,
        optimizer: Stateful | dict[str, Any] | None = None,
        *,
        scheduler: Stateful | dict[str, Any] | None = None,
        scaler: Stateful | dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        rng: bool = True,
        state: Any = None,
        headroom: float = 0.0,
        background: bool = True,
    ) -> threading.Thread | None:
        """Size and pre-fault every slot for this state, off the training loop.

        The first snapshot otherwise pays the page faults of fresh shared memory (about ten times
        the cost of the copy itself). Call it once the state has its final shape, e.g. after the
        first optimizer step (Adam's moments do not exist before), or pass ``headroom`` (0.5 =
        50% more) to size for state that will appear. Slots the daemon is still reading are left
        alone (never waited for). Returns the background thread (join it to wait), or None with
        ``background=False``.
        """
        flat = flatten(
            collect(
                model,
                optimizer,
                scheduler=scheduler,
                scaler=scaler,
                rng=rng,
                extra=extra,
                state=state,
            ),
            allow_pickle=self.allow_pickle,
        )
        entries, data_end = layout(flat.paths, flat.tensors)
        meta = encode_layout(flat.skeleton, entries)
        need = int((data_end + len(meta)) * (1 + headroom)) + 2 * PAGE_BYTES
        pin = any(t.is_cuda for t in flat.tensors)

        def work() -> None:
            with self._call:
                if self._closed:
                    return
                link = self._ensure_link()
                taken: list[Slot] = []
                try:
                    for _ in range(self.n_slots):
                        slot = self._acquire(link, need, pin, wait=False)
                        if slot is None:
                            break
                        taken.append(slot)
                finally:
                    for slot in taken:
                        self._ring.give_back(slot)

        if not background:
            work()
            return None
        thread = threading.Thread(target=self._guarded(work), name="ckptd-prepare", daemon=True)
        self._prepare_thread = thread
        thread.start()
        return thread

    @staticmethod
    def _guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except CkptdError as exc:
                log.warning("ckptd: prepare failed: %s", exc)

        return run

    def snapshot(
        self,
        model: Stateful | dict[str, Any] | None = None,
        optimizer: Stateful | dict[str, Any] | None = None,
        *,
        step: int,
        scheduler: Stateful | dict[str, Any] | None = None,
        scaler: Stateful | dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        metric: float | None = None,
        rng: bool = True,
        state: Any = None,
        pin: bool = False,
        overlap: bool | None = None,
    ) -> PendingSnapshot:
        """Copy the state into shared memory, hand it to the daemon and return.

        ``pin=True`` protects the checkpoint from retention (``ckptd unpin`` releases it).

        Returns once the daemon has *accepted* the snapshot: from then on it is committed even if
        this process is killed. The tensors may be mutated as soon as this returns. When the
        daemon does not answer within ``timeout_s`` the connection is dropped with every slot on
        it (the daemon may still read them; they are never refilled), the handle fails with
        :class:`SnapshotUnconfirmedError`, and the next call reconnects with fresh slots.

        ``overlap=True`` (default: the client's ``overlap``) returns before the parameters and
        the optimizer's state are copied: they are copied in the background while the next
        iteration computes, and ``optimizer.step()`` waits for that copy (see
        :mod:`ckptd_client.overlap` for the contract). Buffers, scheduler, scaler, RNG and
        ``extra`` are copied before it returns. A client's ``overlap=True`` default applies
        where it can: a snapshot of ``state=`` (the framework adapters take those) or without an
        optimizer object is copied before the call returns. The hand-off follows the copy, so
        the daemon owns the snapshot once the copy is over, not when this returns; a failure of
        that hand-off is carried by the handle (``strict=True`` raises it from the next
        ``snapshot()``). ``stall_s`` counts this call and the step's wait. An explicit
        ``overlap=True`` needs the optimizer object: with ``state=``, no optimizer or a plain dict
        as the optimizer there is no step to wait in, and it raises :class:`ValueError`.
        """
        started = time.perf_counter()
        if self._closed:
            raise RuntimeError("snapshot() on a closed ckptd Client")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10**12:
            raise ValueError(f"step must be an integer in [0, 10**12), got {step!r}")
        if overlap is None:  # the client's default, where there is an optimizer step to hook
            overlap = self.overlap and _can_overlap(optimizer, state)
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True, False or None, got {overlap!r}")
        if overlap:
            _check_overlap(optimizer, state)
            self._guard.attach(optimizer)
        self._settle_background()  # a second snapshot first waits for the previous copy
        failed, self._background_error = self._background_error, None
        if failed is not None:
            raise failed
        flat = flatten(
            collect(
                model,
                optimizer,
                scheduler=scheduler,
                scaler=scaler,
                rng=rng,
                extra=extra,
                state=state,
            ),
            allow_pickle=self.allow_pickle,
        )
        entries, data_end, encoded = self._layouts.get(flat.paths, flat.tensors)
        meta = encode_layout(flat.skeleton, entries, encoded)
        pending = PendingSnapshot(self.job, step)
        with self._call:
            if self.ranks.multi and step in self._handed:
                raise RankLayoutError(
                    f"{self.job} step {step}: rank {self.ranks.rank} already handed this step "
                    f"off in attempt {self.ranks.attempt}; each rank hands a step off once per "
                    "attempt"
                )
            self.stats["snapshots"] += 1
            try:
                self._hand_off(
                    pending,
                    flat.tensors,
                    entries,
                    data_end,
                    meta,
                    _Submit(metric, pin, started),
                    optimizer if overlap else None,
                    model,
                )
                if self.ranks.multi and not pending.skipped:
                    self._handed.add(step)
            except CkptdError as exc:
                self.stats["failed"] += 1
                pending._reject(exc)
                if self.strict:
                    raise
                log.warning("ckptd: snapshot of %s step %d failed: %s", self.job, step, exc)
        pending.stall_s = time.perf_counter() - started
        return pending

    def _hand_off(
        self,
        pending: PendingSnapshot,
        tensors: Sequence[torch.Tensor],
        entries: list[LayoutEntry],
        meta_offset: int,
        meta: bytes,
        submit: _Submit,
        optimizer: Any,
        model: Any = None,
    ) -> None:
        """Fill a slot and submit it (trainer thread, under the call lock); with an
        ``optimizer`` (overlap), fill what it does not guard and leave the rest and the submit
        to the background thread. Raises the :class:`CkptdError` that failed the hand-off."""
        step = pending.step
        link = self._ensure_link()
        slot = self._acquire(
            link,
            meta_offset + len(meta),
            any(t.is_cuda for t in tensors),
            wait=self.on_full == "block",
        )
        if slot is None:
            pending.skipped = True
            self.stats["skipped"] += 1
            link.send({"op": "skipped", "step": step})
            log.warning("ckptd: every slot busy, snapshot of step %d skipped", step)
            pending._reject(
                SnapshotSkippedError(
                    f"{self.job} step {step} was skipped: all {self.n_slots} slot(s) were "
                    "still being written (on_full='skip'); snapshot less often or add slots"
                )
            )
            return
        try:
            if optimizer is None:
                self._fill(slot, entries, tensors, meta_offset, meta)
            else:
                job = self._fill_now(
                    slot, entries, tensors, meta_offset, meta, optimizer, pending, model
                )
        except BaseException:
            if self._stream is not None:
                self._stream.synchronize()  # no copy still lands in a slot given back
            self._ring.give_back(slot)
            raise
        pending.stall_s = time.perf_counter() - submit.started
        if optimizer is None:
            self._submit(pending, link, slot, meta_offset, len(meta), submit)
            return
        args = (job, link, meta_offset, len(meta), submit)
        try:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(
                    1, thread_name_prefix="ckptd-copy", initializer=self._on_copy_thread
                )
            background = self._worker.submit(self._copy_and_submit, *args)
        except RuntimeError:
            # No copy thread (interpreter shutdown: a save in an atexit handler; no thread can
            # be started): copy and hand off in the call, as overlap=False would.
            self._copy_and_submit(*args)
            return
        # Published once the copy is sure to run: a job nobody copies would hang the step.
        self._guard.start(job)
        self._copy = job
        self._background = background

    def _fill_now(
        self,
        slot: Slot,
        entries: list[LayoutEntry],
        tensors: Sequence[torch.Tensor],
        meta_offset: int,
        meta: bytes,
        optimizer: Any,
        pending: PendingSnapshot,
        model: Any = None,
    ) -> CopyJob:
        """Copy what the optimizer's step does not guard, and the layout; enqueue the guarded
        CUDA copies on the copy stream; return the job that copies the guarded host tensors."""
        guarded = guarded_views(optimizer)
        now, later = split(entries, tensors, guarded, forward_written(model))
        stream = self._copy_stream(tensors)
        # CUDA tensors on another device than the copy stream's are copied now (synchronously).
        device_later = [
            i for i in later if stream is not None and tensors[i].device == stream.device
        ]
        host_later = [i for i in later if not tensors[i].is_cuda]
        now = sorted(set(now) | (set(later) - set(device_later) - set(host_later)))
        enqueued = slot.copy_in([entries[i] for i in now], [tensors[i] for i in now], stream)
        slot.write_meta(meta_offset, meta)
        event = None
        if stream is not None and (enqueued or device_later):
            # Forward may change the buffers next: it waits for their copies (no host sync).
            torch.cuda.current_stream(stream.device).wait_stream(stream)
            for i in device_later:
                tensors[i].record_stream(stream)  # not reused before the copy, even if freed
            slot.copy_in(
                [entries[i] for i in device_later], [tensors[i] for i in device_later], stream
            )
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        return CopyJob(
            slot,
            [(entries[i], tensors[i]) for i in host_later],
            guarded,
            pending,
            event=event,
            device=None if stream is None else stream.device,
        )

    def _copy_and_submit(
        self, job: CopyJob, link: Link, meta_offset: int, meta_length: int, submit: _Submit
    ) -> None:
        """The background half of an overlapped snapshot (copy thread): copy the guarded
        tensors, then submit. Never raises: a failure settles the handle (its done-callbacks run
        on this thread, after the call lock is released)."""
        job.run()
        try:
            job.wait_device()
        except BaseException as exc:
            job.error = job.error or exc
        pending = job.pending
        error: CkptdError | None = None
        with self._call:
            try:
                if job.error is not None:
                    self._ring.give_back(job.slot)
                    raise SnapshotFailedError(
                        f"{self.job} step {pending.step}: the background copy of the "
                        f"parameters and optimizer state failed: {job.error!r:.300}"
                    ) from job.error
                self._submit(pending, link, job.slot, meta_offset, meta_length, submit)
            except Exception as exc:
                error = (
                    exc
                    if isinstance(exc, CkptdError)
                    else SnapshotFailedError(f"{self.job} step {pending.step}: {exc!r:.300}")
                )
                self.stats["failed"] += 1
                self._handed.discard(pending.step)
                if self.strict:
                    self._background_error = error
        if error is not None:
            log.warning(
                "ckptd: overlapped snapshot of %s step %d failed: %s", self.job, pending.step, error
            )
            pending._reject(error)

    def _on_copy_thread(self) -> None:
        self._copy_thread = threading.get_ident()

    def _settle_background(self, timeout: float | None = None) -> bool:
        """Wait (up to ``timeout``) until the last overlapped snapshot is copied and handed off
        (trainer thread, not under the call lock: the copy thread takes it to submit). False
        when it still runs."""
        background = self._background
        if background is not None and threading.get_ident() != self._copy_thread:
            try:
                background.result(timeout)
            except TimeoutError:
                return False
            self._background = None
            self._copy = None
        return True

    def _wait_copied(self) -> None:
        """Wait until no background copy writes into a slot (under the call lock, before slots
        are unmapped)."""
        job = self._copy
        if job is not None:
            job.copied.wait()
            try:
                job.wait_device()
            except RuntimeError:
                pass  # the copy thread reports it

    def wait_copied(self) -> None:
        """Wait until the last ``overlap=True`` snapshot is copied and handed off. Call it before
        changing parameters or optimizer state in place other than through ``optimizer.step()``
        (clipping or projecting weights, ``load_state_dict``)."""
        self._settle_background()

    def _submit(
        self,
        pending: PendingSnapshot,
        link: Link,
        slot: Slot,
        meta_offset: int,
        meta_length: int,
        submit: _Submit,
    ) -> None:
        """Submit a filled slot (under the call lock). Raises the :class:`CkptdError` that
        failed it."""
        step = pending.step
        self._seq += 1
        seq = self._seq
        self._outstanding.add(seq, link, pending)
        self._ring.submitting(slot, seq)
        self._submitting = seq
        try:
            reply = link.request(
                {
                    "op": "submit",
                    "seq": seq,
                    "slot": slot.id,
                    "step": step,
                    "meta_offset": meta_offset,
                    "meta_length": meta_length,
                    "metric": metric_to_wire(
                        None if submit.metric is None else float(submit.metric)
                    ),
                    "stall_s": pending.stall_s,
                    "pin": bool(submit.pin),
                    "tier": self.tier,
                    "blocked_s": self._last_wait_s,
                }
            )
        except DaemonNoAnswerError as exc:
            # The daemon may have accepted it: the slot left the ring with the link.
            self._outstanding.discard(seq)
            raise SnapshotUnconfirmedError(
                f"{self.job} step {step}: {exc}; the daemon may or may not commit it (check "
                f"`ckptd list {self.job}`)"
            ) from exc
        except BaseException:
            self._outstanding.discard(seq)
            raise
        finally:
            self._submitting = None
        if reply["op"] == "refused":  # the ring already took the slot back
            self._outstanding.discard(seq)
            raise error_from(reply)

    def flush(self, timeout: float | None = None) -> list[PendingSnapshot]:
        """Wait until every accepted snapshot is committed or failed; return those still pending
        when ``timeout`` runs out (empty when all are done). Failures stay on their handles."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self._copy
        if not self._settle_background(timeout):
            assert job is not None
            return [job.pending, *self._outstanding.handles()]
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return wait_all(self._outstanding.handles(), left)

    def close(self, timeout: float | None = 60.0) -> None:
        """Wait (up to ``timeout``) for outstanding snapshots, then disconnect and free the slots.

        Snapshots still being written are committed by the daemon anyway. Every handle is
        resolved when this returns: a snapshot whose outcome the daemon had not reported by then
        fails with :class:`SnapshotUnconfirmedError` ("unknown").
        """
        if self._closed:
            return
        self.flush(timeout)
        self._guard.close()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        with self._call:
            self._closed = True
            unanswered = self._outstanding.take()
            if self._link is not None:
                self._link.close()
                self._link = None
            self._ring.abandon()
            self._ring.close_abandoned()
        for pending in unanswered:
            pending._reject(
                SnapshotUnconfirmedError(
                    f"{self.job} step {pending.step}: outcome unknown: the client closed before "
                    f"the daemon answered; the daemon normally still commits it (check "
                    f"`ckptd list {self.job}`)"
                )
            )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_daemon(self, timeout_s: float = 60.0) -> None:
        """Wait until the daemon holds no accepted, uncommitted snapshot of this job, from this
        process or any other (e.g. one handed off by a trainer that was then killed).

        Raises :class:`TimeoutError` naming the steps still pending after ``timeout_s``, and
        :class:`DaemonUnavailableError` when no daemon answers."""
        self._settle_background()
        with self._call:
            if self._closed:
                raise RuntimeError("wait_for_daemon() on a closed ckptd Client")
            link = self._ensure_link()
            saved = link.timeout_s
            link.timeout_s = timeout_s + max(saved, 5.0)
            try:
                reply = link.request({"op": "drain", "timeout_s": float(timeout_s)})
            finally:
                link.timeout_s = saved
        steps = reply.get("pending") or []
        if steps:
            raise TimeoutError(
                f"ckptd is still committing {self.job} step(s) {steps} after {timeout_s} s; "
                "restoring now would resume from an older checkpoint. Wait longer "
                "(restore(..., wait_s=...)) or see `ckptd status`"
            )

    def restore(
        self,
        model: Stateful | None,
        optimizer: Stateful | None = None,
        *,
        step: int | str = "latest",
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        map_location: MapLocation = None,
        fallback: bool = False,
        rng: bool = True,
        strict: bool = True,
        wait_s: float = 60.0,
    ) -> dict[str, Any]:
        """:func:`ckptd_client.restore` for this client's job and root.

        First waits (up to ``wait_s``, see :meth:`wait_for_daemon`) until the daemon has
        committed every snapshot of this job it accepted, so that ``"latest"`` is the newest
        hand-off, also after a trainer was killed and restarted."""
        if fallback and self.ranks.multi:
            raise ValueError(
                "fallback=True is for single-process jobs: the ranks of a job must restore the "
                "same step; pass step= to restore an older one"
            )
        source: Store = Store(self.root)
        if not (self.ranks.multi and step in ("latest", "highest")):
            self._wait_before_restore(wait_s)
            source, step = self._restore_source(step)
        else:
            # Every rank must restore the same step: rank 0's choice, when a process group says
            # so; without one each rank reads the newest step that every rank committed. Every
            # rank reaches the collectives, also after an error (else the others would wait in
            # them until the process group's timeout).
            store = source
            found, seq, error = -1, 0, None
            try:
                self._wait_before_restore(wait_s)
                source, step = self._restore_source(step)
                store = source
                found = store.resolve_step(self.job, step)
                seq = store.read_manifest(self.job, found).seq
            except NotFoundError:
                pass
            except Exception as exc:  # raised below, once every rank has met
                error = exc
            agreed, agreed_seq, failed = agree_on_step(found, seq, error is not None, self.ranks)
            if error is not None:
                raise error
            if failed:
                raise RankLayoutError(
                    f"job {self.job!r}: another rank could not find the step to restore (see "
                    "its error); this rank restores nothing either"
                )
            if agreed < 0:
                store.resolve_step(self.job, step)  # raises the error that says why
                raise NotFoundError(
                    f"job {self.job!r}: rank 0 found no checkpoint to restore under {self.root}"
                )
            if store.read_manifest(self.job, agreed).seq != agreed_seq:
                raise RankLayoutError(
                    f"job {self.job!r} step {agreed} was committed again while the ranks chose "
                    "it; restore again"
                )
            step = agreed
        return restore(
            model,
            optimizer,
            job=self.job,
            step=step,
            scheduler=scheduler,
            scaler=scaler,
            root=source,
            map_location=map_location,
            fallback=fallback,
            rng=rng,
            strict=strict,
            rank=self.ranks.rank,
            world_size=self.ranks.world_size,
        )

    def _restore_source(self, step: int | str) -> tuple[Store, int | str]:
        """Where :meth:`restore` reads ``step``, and the step to read there: this client's root,
        or the job's tier when the checkpoint asked for is not on local disk (a fresh node after
        a failure, or a rank whose node keeps only its own parts) and the tier has it. A
        ``"latest"`` of the tier is taken when it is newer (created later) than the local one.
        The tier's step is returned as a number, the one the WARNING names."""
        local = Store(self.root)
        info = self._tier_info
        if info is None or not self.tier:
            return local, step
        try:
            mine = local.steps(self.job)
        except CkptdError:
            mine = []
        numbered = isinstance(step, int) or (isinstance(step, str) and step.isdigit())
        if numbered and int(step) in mine:
            return local, step
        try:
            remote = tier_store(
                info["url"],
                settings=TierSettings(
                    parse_url(info["url"]), endpoint=info.get("endpoint"), region=info.get("region")
                ),
            )
            if numbered and int(step) not in remote.steps(self.job):
                return local, step
            chosen = int(step) if numbered else remote.resolve_step(self.job, step)
            if not numbered and mine and chosen not in mine:
                here = local.resolve_step(self.job, step)
                newer_here = (
                    here > chosen
                    if step == "highest"
                    else local.read_manifest(self.job, here).created
                    > remote.read_manifest(self.job, chosen).created
                )
                if newer_here:
                    return local, step
        except NotFoundError:
            return local, step  # the tier holds nothing of the job (or not that step)
        except CkptdError as exc:
            log.warning(
                "ckptd: job %r: the tier %s cannot be read (%s); restoring from local disk",
                self.job,
                info["url"],
                exc,
            )
            return local, step
        if chosen in mine:
            return local, step
        log.warning(
            "ckptd: job %r: step %d is not on local disk (%s holds %s); restoring it from the "
            "tier %s",
            self.job,
            chosen,
            self.root,
            f"steps up to {mine[-1]}" if mine else "none of its checkpoints",
            info["url"],
        )
        return remote, chosen

    def _wait_before_restore(self, wait_s: float) -> None:
        try:
            if not self._closed:
                self.wait_for_daemon(wait_s)
        except DaemonUnavailableError as exc:
            # A daemon that is gone holds nothing in flight: what is on disk is all there is.
            log.warning("ckptd: restoring without asking the daemon about pending commits: %s", exc)

    def list(self) -> list[CheckpointSummary]:
        """This job's checkpoints in commit order (the last one is ``latest``), as summaries;
        ``ckptd_client.list_checkpoints`` returns whole manifests."""
        manifests = sorted(
            list_checkpoints(self.job, root=self.root), key=lambda m: (m.seq, m.step)
        )
        return [
            CheckpointSummary(
                job=m.job,
                step=m.step,
                created=m.created,
                seq=m.seq,
                digest=m.digest,
                raw_bytes=m.raw_bytes,
                stored_bytes=m.stored_bytes,
                metric=m.metric,
                latest=i == len(manifests) - 1,
                world_size=m.world_size,
            )
            for i, m in enumerate(manifests)
        ]
