"""Applying retention: delete what no rule keeps, then collect the freed objects.

The policy (:mod:`ckptd.policy.retention`) decides; this module only acts. Order, for every job:
read the manifests, ask :func:`decide`, delete the manifests no rule keeps (oldest first, each
removal atomic), then GC objects no manifest references. The newest checkpoint and pinned ones are
never deleted (the policy always keeps them, and :func:`prune` checks again before each deletion).
A manifest that cannot be read stops pruning of that job: what it references is unknown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ckptd.errors import NotFoundError
from ckptd.format.store import GcResult, Store
from ckptd.policy.retention import CheckpointFacts, RetentionPolicy, commit_order, decide, deletable

log = logging.getLogger("ckptd.policy.prune")


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune` decided (``reasons``: step -> rules keeping it) and did."""

    job: str
    reasons: dict[int, list[str]]
    deleted: list[int]
    gc: GcResult | None


def job_facts(store: Store, job: str) -> list[CheckpointFacts]:
    """Retention facts of every checkpoint of ``job`` (raises if a manifest or a multi-rank
    step's part is unreadable)."""
    pins = store.pinned_steps(job)
    facts = []
    for step in store.steps(job):
        m = store.read_manifest(job, step)
        # A multi-rank step's objects are its parts' (shared ones once).
        parts = store.step_parts(job, step) if m.is_global else [m]
        objects = {h: o.stored_bytes for p in parts for h, o in p.objects.items()}
        facts.append(CheckpointFacts(step, m.metric, step in pins, objects, m.created, m.seq))
    return facts


def delete_unprotected(store: Store, job: str, step: int, newest: int | None = None) -> bool:
    """Delete checkpoint ``step`` unless it is the job's highest step, its most recently
    committed one (``newest``, as retention saw it), pinned, or not yet uploaded to the tier;
    checked again right before deleting, whatever a policy said. False when it was protected."""
    steps = store.steps(job)
    if not steps or step in (steps[-1], newest) or step in store.pinned_steps(job):
        return False
    if store.upload_pending(job, step):
        log.info("%s: step %d kept: its upload to the tier is pending", job, step)
        return False
    store.delete_checkpoint(job, step)
    return True


def prune(
    store: Store,
    job: str,
    policy: RetentionPolicy,
    *,
    dry_run: bool = False,
    limit: int | None = None,
    gc_blocking: bool = True,
) -> PruneResult:
    """Delete the checkpoints of ``job`` that ``policy`` does not keep (at most ``limit`` of
    them, oldest first), then GC. With ``gc_blocking=False`` GC is skipped when a writer holds
    the job (it runs at the next prune)."""
    facts = job_facts(store, job)
    reasons = decide(policy, facts)
    newest = max(facts, key=commit_order).step if facts else None
    victims = deletable(reasons)
    if limit is not None:
        victims = victims[:limit]
    if dry_run:
        return PruneResult(job, reasons, victims, None)
    deleted, gc = delete_and_collect(
        store, job, victims, newest, why="no retention rule keeps it", gc_blocking=gc_blocking
    )
    return PruneResult(job, reasons, deleted, gc)


def delete_and_collect(
    store: Store,
    job: str,
    steps: list[int],
    newest: int | None,
    *,
    why: str,
    gc_blocking: bool = True,
) -> tuple[list[int], GcResult | None]:
    """Delete each of ``steps`` that :func:`delete_unprotected` lets go (``why`` goes to the
    log), then GC the job when something was deleted; return the deleted steps and the GC."""
    deleted = []
    for step in steps:
        try:
            if not delete_unprotected(store, job, step, newest):
                continue
        except NotFoundError:
            continue  # deleted meanwhile (the disk guard, an operator)
        deleted.append(step)
        log.info("%s: deleted step %d (%s)", job, step, why)
    gc = None
    if deleted:
        with store.job_lock(job, exclusive=True, blocking=gc_blocking) as locked:
            if locked:
                gc = store.gc_unlocked(job)
    return deleted, gc
