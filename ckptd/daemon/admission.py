"""Admission: what the daemon accepts, and from whom.

* a **connection**: from the daemon's own uid, root, or a member of ``daemon.allowed_groups``,
  at most ``daemon.max_clients_per_uid`` per uid (:meth:`Admission.refuse_peer`);
* a **slot**: at most ``daemon.max_slot_bytes`` (capped by the machine's memory), at most
  ``daemon.max_slots_per_uid`` per uid, and all of a uid's slots at most twice the machine's
  memory (:meth:`Admission.slot_limit`);
* a **snapshot**: not while the daemon drains, not beyond ``daemon.max_queue`` waiting, and only
  if the disk guard finds room for what it will add on disk, once the estimates of every
  snapshot queued, being written or being admitted are counted (:meth:`Admission.admit`).

A snapshot the disk guard refuses marks the daemon *degraded* (``ckptd status``) until one passes
the guard again, or the ticker's :meth:`Admission.check_space` finds the space back.

Threads: everything here runs on the loop thread, except the disk guard (``statvfs``, and deleting
what retention allows when space is short), which runs on a control thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Collection
from concurrent.futures import Executor
from pathlib import Path

from ckptd.config import DaemonConfig
from ckptd.daemon.listen import Peer, allowed_gids, peer_allowed
from ckptd.daemon.metrics import Metrics
from ckptd.daemon.requests import Submitter, WriteRequest
from ckptd.daemon.stats import Stats
from ckptd.daemon.stores import Stores
from ckptd.daemon.writer import WriteQueue
from ckptd.errors import CkptdError, DaemonUnavailableError, ProtocolError, SnapshotFailedError
from ckptd.format.store import Store
from ckptd.policy.diskguard import DiskConfig, DiskGuard, PolicyFor

log = logging.getLogger("ckptd.daemon.admission")


class Admission:
    """The daemon's limits, applied on the loop thread (see the module docstring).

    ``connections`` is the daemon's live set of sessions (read here, never changed);
    ``memory_bytes`` the machine's memory. :meth:`reconfigure` applies a reloaded config."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        limits: DaemonConfig,
        disk: DiskConfig,
        policy_for: PolicyFor,
        socket_path: Path,
        memory_bytes: int,
        connections: Collection[Submitter],
        queue: WriteQueue,
        stores: Stores,
        stats: Stats,
        metrics: Metrics,
        control_pool: Executor,
    ) -> None:
        self.loop = loop
        self.limits = limits
        self.guard = DiskGuard(disk, policy_for)
        self.socket_path = socket_path
        self.memory_bytes = memory_bytes
        self.connections = connections
        self.queue = queue
        self.stores = stores
        self.stats = stats
        self.metrics = metrics
        self.control_pool = control_pool
        self.degraded: str | None = None
        """Why the last snapshot was refused for space, until space is back (None: fine)."""
        self._gids = allowed_gids(limits.allowed_groups)
        self._admitting_bytes: dict[Path, int] = {}
        self._space_check: asyncio.Future[bool] | None = None

    def reconfigure(self, limits: DaemonConfig, disk: DiskConfig) -> None:
        """Apply reloaded ``[daemon]`` and ``[disk]`` settings from the next request on."""
        self.limits = limits
        self._gids = allowed_gids(limits.allowed_groups)
        self.guard.config = disk

    # ---- connections and slots ---------------------------------------------------------------

    def refuse_peer(self, peer: Peer) -> str | None:
        """Why ``peer`` may not use this daemon, or None."""
        if not peer_allowed(peer, self._gids):
            groups = ", ".join(self.limits.allowed_groups) or "none configured"
            return (
                f"uid {peer.uid} may not use the ckptd daemon on {self.socket_path}: it admits "
                f"uid {os.getuid()}, root and members of daemon.allowed_groups ({groups})"
            )
        limit = self.limits.max_clients_per_uid
        if sum(c.peer.uid == peer.uid for c in self.connections) >= limit:
            return (
                f"uid {peer.uid} already has {limit} connections to the ckptd daemon on "
                f"{self.socket_path} (daemon.max_clients_per_uid); close clients you no longer "
                "use"
            )
        return None

    def slot_limit(self, uid: int, size: int) -> CkptdError | None:
        """Why a slot of ``size`` bytes may not be registered for ``uid``, or None."""
        cfg = self.limits
        cap = min(cfg.max_slot_bytes or self.memory_bytes, self.memory_bytes)
        if size > cap:
            return ProtocolError(
                f"register: a slot of {size} bytes is larger than this daemon accepts ({cap} "
                "bytes: daemon.max_slot_bytes, at most the machine's memory)"
            )
        mine = [s for c in self.connections if c.peer.uid == uid for s in c.slots.values()]
        if len(mine) >= cfg.max_slots_per_uid:
            return ProtocolError(
                f"register: uid {uid} already has {len(mine)} slots registered "
                "(daemon.max_slots_per_uid); close clients you no longer use"
            )
        total = sum(s.size for s in mine) + size
        if total > 2 * self.memory_bytes:
            return ProtocolError(
                f"register: uid {uid}'s slots would hold {total} bytes, over twice the "
                f"machine's memory ({self.memory_bytes} bytes); use fewer or smaller slots"
            )
        return None

    # ---- snapshots ---------------------------------------------------------------------------

    def estimate(self, store: Store, job: str, raw_bytes: int) -> int:
        """Bytes a snapshot will add on disk: raw size x the job's last stored/raw ratio
        (1.0 until it has one), plus object headers. Dedup is ignored: an over-estimate."""
        ratio = self.queue.ratios.get((store.root, job), 1.0)
        return int(raw_bytes * ratio) + (raw_bytes >> 20) * 64 + 4096

    def admit(
        self,
        request: WriteRequest,
        rid: int | None,
        then: Callable[[CkptdError | None], None],
    ) -> None:
        """Decide whether to accept ``request``; ``then(None)`` accepts, ``then(error)`` refuses.

        Limits are checked here, on the loop; the disk guard runs on a control thread (through
        the request's session, which reads nothing more meanwhile), with the estimates of every
        queued snapshot and every admission in progress counted against the space."""
        store, job = request.store, request.job
        if self.queue.closed:
            then(DaemonUnavailableError("ckptd is shutting down; the snapshot was not accepted"))
            return
        if len(self.queue.waiting) >= self.limits.max_queue:
            then(
                DaemonUnavailableError(
                    f"ckptd's queue is full ({len(self.queue.waiting)} snapshots waiting); the "
                    "disk is slower than the snapshot rate: snapshot less often or raise "
                    "daemon.max_queue"
                )
            )
            return
        request.estimate_bytes = estimate = self.estimate(store, job, request.raw_bytes)
        queued = [(r.store.root, r.estimate_bytes) for r in self.queue.pending()] + list(
            self._admitting_bytes.items()
        )
        stores = self.stores.all()
        self._admitting_bytes[store.root] = self._admitting_bytes.get(store.root, 0) + estimate

        def guard() -> CkptdError | None:  # control thread; an error refuses the snapshot
            try:
                return self.guard.admit(store, estimate, queued, stores)
            except CkptdError as exc:
                return exc
            except Exception as exc:
                log.exception("%s: the disk guard failed", job)
                return SnapshotFailedError(f"the disk guard failed: {exc!r:.200}")

        def decided(error: CkptdError | None) -> None:
            self._admitting_bytes[store.root] -= estimate
            if error is not None:
                self.degraded = str(error)
                self.stats.refused += 1
                self.stats.record_error(f"{job}: refused: {error}")
                self.metrics.failed(job, type(error).__name__)
                log.warning("%s: snapshot refused: %s", job, error)
            elif self.queue.closed:
                error = DaemonUnavailableError(
                    "ckptd is shutting down; the snapshot was not accepted"
                )
            else:
                self.degraded = None
            then(error)

        request.conn.blocking(rid, guard, decided)

    # ---- recovery ----------------------------------------------------------------------------

    def check_space(self) -> None:
        """While degraded, look (on a control thread, not awaited: a hung filesystem must not
        stall the caller) whether every filesystem that refused a snapshot has room again."""
        if self.degraded is None or self._space_check is not None:
            return
        self._space_check = self.loop.run_in_executor(
            self.control_pool, self.guard.recovered, self.stores.all()
        )
        self._space_check.add_done_callback(self._space_checked)

    def _space_checked(self, fut: asyncio.Future[bool]) -> None:
        self._space_check = None
        if fut.cancelled():
            return
        if fut.exception() is not None:
            log.warning("disk guard: cannot check free space: %r", fut.exception())
        elif fut.result() and self.degraded is not None:
            log.info("disk space is back above the guard; accepting snapshots again")
            self.degraded = None
