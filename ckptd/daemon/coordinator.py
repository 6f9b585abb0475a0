"""The daemon's side of multi-rank commits: steps this daemon wrote a part of and that are not
committed yet, rechecked until they are.

The rank part that completes a step normally commits it in the same write
(:meth:`~ckptd.format.store.Store.commit_step`). A part whose step was still missing ranks is
*watched*: every :data:`RECHECK_S` the writer thread tries to commit each watched step again, so
the step is committed even when the daemon that wrote the last part died before its commit, or
did not see this daemon's part (a shared filesystem's directory cache). At startup the daemon
watches every uncommitted step under its root, so a commit a crash interrupted is finished.
Any daemon may commit any complete step: the commit needs no trainer and no election, only the
records on disk (:mod:`ckptd.format.parts`).

Threads: :meth:`Coordinator.watch`, :meth:`recover` and :meth:`recheck` run on the write
queue's coordinator thread, which owns the watched steps; writes hand their steps to it (a recheck
may run beside a write: committing a step is safe against other committers, by the commit lock and
the exclusive create of the record). :attr:`waiting` is replaced whole by that thread and read by
the loop thread (``ckptd status``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.errors import CkptdError
from ckptd.format.manifest import Manifest
from ckptd.format.parts import age_s
from ckptd.format.store import Store

log = logging.getLogger("ckptd.daemon.coordinator")

RECHECK_S = 1.0
"""How often watched steps are checked again."""
MAX_WAITING_SHOWN = 50


@dataclass(frozen=True)
class _Key:
    root: Path
    job: str
    step: int
    attempt: str


class Coordinator:
    """Watched multi-rank steps (see the module docstring)."""

    def __init__(self, pending_timeout_s: float) -> None:
        self.pending_timeout_s = pending_timeout_s
        self._watched: dict[_Key, Store] = {}
        self.waiting: list[dict[str, Any]] = []
        """Steps waiting for ranks, as ``ckptd status`` shows them."""

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, store: Store, job: str, step: int, attempt: str) -> None:
        self._watched[_Key(store.root, job, step, attempt)] = store

    def recover(self, store: Store) -> int:
        """Watch every uncommitted step under ``store``'s root; return how many."""
        found = 0
        try:
            jobs = store.jobs()
        except CkptdError as exc:
            log.warning(
                "cannot look for uncommitted multi-rank steps under %s: %s", store.root, exc
            )
            return 0
        for job in jobs:
            try:
                pending = store.pending_sets(job)
            except CkptdError as exc:
                log.warning("%s: cannot read its pending parts: %s", job, exc)
                continue
            for pset in pending:
                self.watch(store, job, pset.step, pset.attempt)
                found += 1
        if found:
            log.info("watching %d uncommitted multi-rank step(s) under %s", found, store.root)
        return found

    def recheck(self) -> list[Manifest]:
        """Try to commit every watched step; forget those committed or collectable. Returns the
        global records committed (or found committed) now."""
        committed = []
        waiting = []
        for key, store in list(self._watched.items()):
            try:
                record = store.commit_step(
                    key.job, key.step, key.attempt, pending_timeout_s=self.pending_timeout_s
                )
                if record is not None:
                    committed.append(record)
                    del self._watched[key]
                    continue
                pset, why = store.set_status(
                    key.job, key.step, key.attempt, pending_timeout_s=self.pending_timeout_s
                )
                if why is not None or not (pset.parts or pset.damaged):
                    del self._watched[key]
                    if why is not None and pset.parts:
                        store.collect_parts(key.job, pending_timeout_s=self.pending_timeout_s)
                    continue
            except CkptdError as exc:
                log.warning("%s step %d: cannot check its parts: %s", key.job, key.step, exc)
                continue
            waiting.append(
                {
                    "root": str(key.root),
                    "job": key.job,
                    "step": key.step,
                    "attempt": key.attempt,
                    "world_size": pset.world_size,
                    "ranks": sorted(pset.parts),
                    "missing": pset.missing,
                    "waiting_s": round(age_s(pset), 3),
                    "problems": pset.damaged[:3],
                }
            )
        waiting.sort(key=lambda w: (w["job"], w["step"]))
        self.waiting = waiting[:MAX_WAITING_SHOWN]
        return committed
