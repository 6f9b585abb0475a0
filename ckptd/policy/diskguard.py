"""The disk guard: refuse a snapshot before it could fill the filesystem.

Before accepting a snapshot the daemon estimates what it will add on disk. If the filesystem's
free space minus that estimate (and minus the estimates of snapshots already queued for the same
filesystem) would fall below ``disk.min_free_bytes`` / ``disk.min_free_percent``, the guard first
deletes what retention allows, oldest checkpoint first, across every job on that filesystem, and
collects the freed objects. If that is not enough it refuses the snapshot with
:class:`DiskFullError`; the daemon reports itself degraded until space is back. With no retention
policy configured nothing is deletable, so the guard only refuses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ckptd.errors import CkptdError, DiskFullError, NotFoundError
from ckptd.format.store import Store
from ckptd.policy.prune import delete_unprotected, job_facts
from ckptd.policy.retention import RetentionPolicy, commit_order, decide, deletable

log = logging.getLogger("ckptd.policy.diskguard")

PolicyFor = Callable[[Store, str], RetentionPolicy]
"""The retention policy of a job in a store, as configured now (``Daemon.policy_for``)."""


@dataclass(frozen=True)
class DiskConfig:
    """``[disk]``: the guard that refuses snapshots before the filesystem fills up."""

    min_free_bytes: int = 1 << 30
    min_free_percent: float = 0.0


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class DiskGuard:
    """Used from the daemon's control threads (several admissions may run at once: each is
    told the others' estimates); ``config`` may be replaced on reload. ``policy_for`` says what
    retention allows to delete; it is called on those threads (it may read a job's metadata)."""

    def __init__(self, config: DiskConfig, policy_for: PolicyFor) -> None:
        self.config = config
        self.policy_for = policy_for
        self.last_need: dict[int, int] = {}

    def device(self, path: Path) -> int:
        return _existing(path).stat().st_dev

    def space(self, path: Path) -> tuple[int, int]:
        """``(free bytes for us, bytes the guard keeps free)`` on ``path``'s filesystem."""
        st = os.statvfs(_existing(path))
        total = st.f_blocks * st.f_frsize
        threshold = max(self.config.min_free_bytes, int(total * self.config.min_free_percent / 100))
        return st.f_bavail * st.f_frsize, threshold

    def admit(
        self,
        store: Store,
        estimate: int,
        queued: Sequence[tuple[Path, int]],
        stores: Sequence[Store],
    ) -> DiskFullError | None:
        """None when the snapshot fits (after deleting what policy allows), else the refusal.

        ``queued``: (root, estimated bytes) of snapshots accepted or being admitted, counted
        when on ``store``'s filesystem. ``stores``: every store whose jobs policy may prune.
        Runs on a control thread of the daemon (statvfs, deletions)."""
        dev = self.device(store.root)
        pending = sum(size for root, size in queued if self.device(root) == dev)
        free, threshold = self.space(store.root)
        if free - estimate - pending >= threshold:
            return None
        freed = self.free_by_policy(store, estimate + pending + threshold - free, stores)
        free, threshold = self.space(store.root)
        if free - estimate - pending >= threshold:
            return None
        self.last_need[dev] = estimate + pending + threshold
        return DiskFullError(
            f"not enough space for a snapshot under {store.root}: {free} bytes free, the "
            f"snapshot needs about {estimate}"
            + (f" (+{pending} queued)" if pending else "")
            + f" and the disk guard keeps {threshold} free (disk.min_free_bytes / "
            f"disk.min_free_percent); retention freed {freed} bytes. Free space (ckptd rm, "
            "ckptd prune with a retention policy, ckptd gc) or lower the guard; snapshots are "
            "accepted again as soon as space is back"
        )

    def free_by_policy(self, store: Store, need: int, stores: Sequence[Store]) -> int:
        """Delete checkpoints no retention rule keeps, oldest first, on ``store``'s filesystem,
        until ``need`` bytes came free. Returns the bytes freed. Jobs without checkpoints have
        nothing to give and are passed over."""
        dev = self.device(store.root)
        candidates: list[tuple[str, Store, str, int]] = []
        newest: dict[tuple[Path, str], int] = {}
        for other in stores:
            if self.device(other.root) != dev:
                continue
            for job in other.jobs():
                try:
                    facts = job_facts(other, job)
                    if not facts:
                        continue
                    reasons = decide(self.policy_for(other, job), facts)
                    created = {f.step: f.created for f in facts}
                    # The job's newest is its last commit (seq); across jobs, oldest time first.
                    newest[(other.root, job)] = max(facts, key=commit_order).step
                    for step in deletable(reasons):
                        candidates.append((created[step], other, job, step))
                except CkptdError as exc:
                    log.warning("disk guard: skipping job %s: %s", job, exc)
        freed = 0
        start_free, _ = self.space(store.root)
        for _created, other, job, step in sorted(candidates, key=lambda c: (c[0], c[3])):
            try:
                if not delete_unprotected(other, job, step, newest.get((other.root, job))):
                    continue
            except NotFoundError:
                continue
            log.warning("disk guard: deleted %s step %d (no retention rule keeps it)", job, step)
            with other.job_lock(job, exclusive=True, blocking=False) as locked:
                if locked:
                    other.gc_unlocked(job)
            freed = self.space(store.root)[0] - start_free
            if freed >= need:
                break
        return max(freed, 0)

    def recovered(self, stores: Iterable[Store]) -> bool:
        """True when every filesystem that refused a snapshot has room for it again."""
        for store in stores:
            need = self.last_need.get(self.device(store.root))
            if need is not None and self.space(store.root)[0] < need:
                return False
        self.last_need.clear()
        return True
