"""The stores a daemon writes to, and the jobs it has opened in them.

A user daemon writes where its client asks (an absolute root; the client has the daemon's uid); a
system daemon only to its own root. A job is opened once in a daemon's life, at its first use:
its directories are made and the tmp files a crashed writer left are swept. Clients attach to a
job through :meth:`Stores.attach`, which claims a new job for the client's uid and refuses a job
another uid owns.

Threads: the maps (root -> :class:`Store`, opened jobs) belong to the loop thread;
:meth:`Stores.attach` and :meth:`Stores.open_root` do filesystem work and run on a control thread
(``attach``) or at startup (``open_root``). A lock per job serializes the control threads' work on
one job's metadata.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptd.daemon.listen import Peer
from ckptd.errors import ProtocolError, StorePermissionError
from ckptd.format.store import Store

log = logging.getLogger("ckptd.daemon.stores")


class Stores:
    """The daemon's stores by root. ``root`` is the daemon's own (absolute); ``user``: a user
    daemon; ``on_demand``: spawned by a client, so a client that names no root writes to its own
    default rather than to ``root``."""

    def __init__(self, root: Path, *, user: bool, on_demand: bool) -> None:
        self.root = root
        self.user = user
        self.on_demand = on_demand
        self._by_root: dict[Path, Store] = {}
        self._opened_jobs: set[tuple[Path, str]] = set()
        self._job_locks: dict[tuple[Path, str], threading.Lock] = {}
        self._job_locks_lock = threading.Lock()
        self.on_first_use: Callable[[Store, str], object] | None = None
        """Called (on a control thread) when a job is opened for the first time in this
        daemon's life: its pending uploads resume."""

    def all(self) -> list[Store]:
        return list(self._by_root.values())

    def open_root(self) -> int:
        """Startup: make the daemon's root a store and sweep every job's tmp files; returns how
        many were swept. The root is marked as a store from the start, so that ``ckptd list``
        finds an empty store there (not "no store") before the first snapshot; a root that cannot
        be made stops the daemon here, with the reason, rather than failing every snapshot."""
        store = self.store_for(str(self.root), None)
        store.initialize()
        swept = 0
        for job in store.jobs():
            swept += store.sweep_tmp(job)
            self._opened_jobs.add((store.root, job))
        return swept

    def client_root(self, root: object, default_root: object) -> str:
        """The root a ``hello`` asks for. A client that names none writes to this daemon's root,
        except on a daemon a client spawned on demand: that one has no root of its own to impose,
        so the client's default (its ``./checkpoints``) applies."""
        if root is None:
            root = default_root if self.on_demand and default_root is not None else str(self.root)
        if not isinstance(root, str):
            raise ProtocolError(f"hello.root: expected a path or null, got {root!r:.80}")
        return root

    def store_for(self, root: str, peer: Peer | None) -> Store:
        """The store for a client's root (``peer`` None: the daemon's own use). A user daemon
        writes where its client asks (same uid); a system daemon only to its own root."""
        path = Path(root)
        if not path.is_absolute():
            raise StorePermissionError(f"root must be an absolute path, got {root!r}")
        if peer is not None and not self.user and path != self.root:
            raise StorePermissionError(
                f"this daemon writes checkpoints to {self.root}, not {path}; name no root (the "
                f"daemon's applies) or use root={str(self.root)!r}"
            )
        store = self._by_root.get(path)
        if store is None:
            store = self._by_root[path] = Store(path)
        return store

    def first_use(self, store: Store, job: str) -> bool:
        """True the first time a job is used in this daemon's life: the caller then passes
        ``first_use=True`` to :meth:`attach`, or calls :meth:`forget_use` if it cannot."""
        key = (store.root, job)
        if key in self._opened_jobs:
            return False
        self._opened_jobs.add(key)
        return True

    def forget_use(self, store: Store, job: str) -> None:
        """The job's first use failed: the next client of the job opens it again."""
        self._opened_jobs.discard((store.root, job))

    def attach(
        self, store: Store, job: str, uid: int, retention: dict[str, Any] | None, first_use: bool
    ) -> None:
        """Control thread: let ``uid`` write ``job`` (claiming it when nobody owns it), record the
        retention its client asked for, and on ``first_use`` open the job and sweep its tmp files.
        Reads and fsyncs ``job.json`` and makes directories."""
        with self._job_mutex(store, job):
            owner = store.job_owner(job)
            if owner is None:
                store.claim_job(job, uid)
            elif uid not in (owner, 0):
                raise StorePermissionError(
                    f"job {job!r} in {store.root} belongs to uid {owner}; uid {uid} may "
                    "not write it. Use another job name"
                )
            if retention is not None and store.job_info(job).get("retention") != retention:
                store.update_job_info(job, retention=retention)
            if first_use:
                store.open_job(job)
                swept = store.sweep_tmp(job)
                if swept:
                    log.info("%s: swept %d stale tmp file(s)", job, swept)
                if self.on_first_use is not None:
                    self.on_first_use(store, job)

    def _job_mutex(self, store: Store, job: str) -> threading.Lock:
        """A lock per job that serializes its metadata work on the control threads (two
        clients attaching to a new job at once must not both claim it)."""
        with self._job_locks_lock:
            return self._job_locks.setdefault((store.root, job), threading.Lock())
