"""The tier's own retention (``[tier.retention]``): delete the checkpoints in the bucket that no
rule keeps, then the objects nothing references any more.

Retention decides (:func:`~ckptd.policy.retention.decide`, the rules a local store applies); this
module reads the facts from the bucket and acts. For one job, in this order:

1. Read every manifest (``<job>/manifests/step-*.json``) and every part record
   (``<job>/parts/step-*/<attempt>/rank-*.json``) in the bucket. One that cannot be read (damaged,
   of a newer format, naming another job or step than its key) stops the job's pruning with a
   :class:`~ckptd.errors.TierError` naming its key: what it references is unknown, so no object
   could safely be collected.
2. Delete the manifests no rule keeps, oldest step first. The most recently committed checkpoint,
   the highest step and the ``protect``-ed steps are never deleted, whatever the policy says;
   this is checked again against a fresh listing right before deleting, and a step committed
   again since it was read is kept. Pins do not exist in the bucket: the caller passes what must
   stay (local pins, steps whose upload is pending) as ``protect``.
3. Delete the part records of the deleted steps: the set a deleted global record names, and any
   other set of that step whose parts are all older than ``grace_s``. Part sets of other steps
   are left alone, committed or not: an uncommitted one may be waiting for a rank.
4. Collect objects: an object is deleted only if no remaining manifest or part record (committed
   or not) names it and it is older than ``grace_s``, since an upload in flight puts its objects
   before its manifest or part record. Ages come from the server's ``Last-Modified`` against this
   host's clock, so the clocks may differ by much less than ``grace_s`` only. The references are
   listed again before each batch of deletions, so a checkpoint committed meanwhile keeps its
   objects.

Only keys of the shapes ckptd writes (:mod:`ckptd.tier.keys`) are ever deleted; anything else in
the bucket is not ckptd's and is left alone. Memory: every listing is streamed and no object is
read; what is held is one small record per manifest and part record (the objects it names).

Concurrency: the daemon calls :func:`prune_tier` on its upload thread, so its own uploads never
run meanwhile. Another daemon uploading to the same prefix (the other nodes of a multi-rank job)
is covered for the objects it puts (``grace_s``) and for what it commits before a batch of
deletions; an object that is unreferenced, older than ``grace_s`` and that such an upload
decides to reuse (its ``HEAD`` found it) in the moment before it is deleted is not: S3 gives no
lock that would close that window.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from ckptd.errors import FormatVersionError, ManifestError, NotFoundError, TierError
from ckptd.format.layout import rank_from_name
from ckptd.format.manifest import check_attempt, parse_manifest, step_from_name
from ckptd.policy.retention import (
    CheckpointFacts,
    RetentionPolicy,
    commit_order,
    decide,
    deletable,
)
from ckptd.tier import keys
from ckptd.tier.remote import Listed, Remote

log = logging.getLogger("ckptd.tier.prune")

DELETE_BATCH = 1000
"""Objects collected per ``DELETE`` request (the S3 maximum); the references are listed again
before each batch."""

PROTECTED = "protected"
"""The reason that keeps a step the caller passed in ``protect``."""


@dataclass(frozen=True)
class TierPruneResult:
    """What :func:`prune_tier` decided and did for ``job``.

    ``reasons``: step -> the rules keeping it (empty: no rule keeps it). ``deleted``: the steps
    deleted, oldest first. ``objects_deleted`` / ``bytes_deleted``: the objects collected and
    their size in the bucket (manifests and part records not counted). With ``dry_run`` these
    are what would be deleted, and nothing is."""

    job: str
    reasons: dict[int, list[str]]
    deleted: list[int]
    objects_deleted: int
    bytes_deleted: int


Stamp = tuple[int, float]
"""``(size, mtime)`` of a key as listed: a key whose stamp changed was written again."""


@dataclass(frozen=True)
class _Record:
    """A manifest or part record read from the bucket: what retention and GC need of it."""

    key: str
    stamp: Stamp
    step: int
    objects: dict[str, int]
    """object digest -> stored bytes (empty for a global record: its objects are its parts')"""
    metric: float | None = None
    created: str = ""
    seq: int = 0
    attempt: str | None = None
    part_keys: tuple[str, ...] = ()
    """The keys of the parts a global record names."""

    @property
    def mtime(self) -> float:
        return self.stamp[1]


def prune_tier(
    remote: Remote,
    job: str,
    policy: RetentionPolicy,
    *,
    grace_s: float = 3600.0,
    dry_run: bool = False,
    protect: Collection[int] = (),
) -> TierPruneResult:
    """Apply ``policy`` to ``job`` in the bucket behind ``remote`` (see the module docstring).

    ``grace_s``: seconds an unreferenced object (or an uncommitted part set of a deleted step)
    is left alone after it was written. ``protect``: steps that must stay. Raises
    :class:`TierError` when the bucket cannot be read or written, or holds a manifest or part
    record that cannot be read (nothing more is deleted then)."""
    if grace_s < 0:
        raise ValueError(f"grace_s must be >= 0 seconds, got {grace_s!r}")
    cutoff = time.time() - grace_s
    manifests = {r.step: r for r in _read_all(remote, job, _manifest_keys(remote, job))}
    parts = {r.key: r for r in _read_all(remote, job, _part_keys(remote, job))}

    facts = [_facts(m, parts) for m in manifests.values()]
    reasons = decide(policy, facts)
    protected = set(protect)
    for step, why in reasons.items():
        if step in protected:
            why.append(PROTECTED)
    newest = max(facts, key=commit_order).step if facts else None
    victims = [s for s in deletable(reasons) if s not in protected and s != newest]

    if dry_run:
        deleted = victims
    else:
        deleted = _delete_manifests(remote, job, [manifests[s] for s in victims])
    gone = {manifests[s].key for s in deleted}
    doomed = [k for s in deleted for k in _doomed_parts(manifests[s], parts.values(), cutoff)]
    if not dry_run and doomed:
        remote.delete(doomed)
        _delete_resurrected(remote, job, [manifests[s] for s in deleted if manifests[s].part_keys])
    gone.update(doomed)

    refs = _References(remote, job)
    for record in (*manifests.values(), *parts.values()):
        if record.key not in gone:
            refs.add(record)
    objects, size = _collect(remote, job, refs, cutoff, dry_run=dry_run)
    if objects:
        log.info(
            "%s: %s %d unreferenced objects (%d bytes) from the tier %s",
            job,
            "would collect" if dry_run else "collected",
            objects,
            size,
            remote.url,
        )
    return TierPruneResult(job, reasons, deleted, objects, size)


# ---- reading the bucket ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    """A manifest key (``attempt`` None) or part record key, as listed."""

    item: Listed
    step: int
    attempt: str | None = None
    rank: int = 0

    @property
    def stamp(self) -> Stamp:
        return (self.item.size, self.item.mtime)


def _manifest_keys(remote: Remote, job: str) -> Iterator[_Found]:
    """Every manifest key of ``job`` (foreign keys skipped)."""
    for item in remote.list(keys.manifests_prefix(job)):
        step = keys.manifest_step(job, item.key)
        if step is not None:
            yield _Found(item, step)


def _part_keys(remote: Remote, job: str) -> Iterator[_Found]:
    """Every part record key of ``job`` (foreign keys skipped)."""
    for item in remote.list(keys.parts_prefix(job)):
        found = _part_of(job, item.key)
        if found is not None:
            yield _Found(item, *found)


def _part_of(job: str, key: str) -> tuple[int, str, int] | None:
    """``(step, attempt, rank)`` if ``key`` is a part record key of ``job`` as ckptd writes them
    (``<job>/parts/step-<12 digits>/<attempt>/rank-<5 digits>.json``), else None."""
    pieces = PurePosixPath(key).parts
    if len(pieces) != 5 or pieces[0] != job or pieces[1] != "parts":
        return None
    step, rank = step_from_name(pieces[2] + ".json"), rank_from_name(pieces[4])
    try:
        attempt = check_attempt(pieces[3])
    except ValueError:
        return None
    if step is None or rank is None or keys.part_key(job, step, attempt, rank) != key:
        return None
    return step, attempt, rank


def _read_all(remote: Remote, job: str, found: Iterable[_Found]) -> Iterator[_Record]:
    """The records at ``found`` (those deleted since they were listed left out)."""
    for f in found:
        record = _read(remote, job, f)
        if record is not None:
            yield record


def _read(remote: Remote, job: str, found: _Found) -> _Record | None:
    """The manifest or part record at ``found``; None when it was deleted since it was listed."""
    key = found.item.key
    where = f"{remote.url}/{key}"
    try:
        data = remote.get(key)
    except NotFoundError:
        return None
    try:
        m = parse_manifest(data, where=where)
    except (ManifestError, FormatVersionError) as exc:
        raise _stopped(job, key, remote, str(exc)) from exc
    if found.attempt is None:
        meant: tuple[object, ...] = (job, found.step)
        said: tuple[object, ...] = (m.job, m.step)
    else:
        meant = (job, found.step, found.attempt, found.rank, False)
        said = (m.job, m.step, m.attempt, m.rank, m.is_global)
    if said != meant:
        what = "a global record of" if m.is_global else "a checkpoint of"
        what += f" job {m.job!r} step {m.step}"
        if found.attempt is not None and not m.is_global:
            what = f"the part of job {m.job!r} step {m.step} attempt {m.attempt} rank {m.rank}"
        raise _stopped(job, key, remote, f"{where} holds {what}, not what its key names")
    return _Record(
        key=key,
        stamp=found.stamp,
        step=found.step,
        objects={h: o.stored_bytes for h, o in m.objects.items()},
        metric=m.metric,
        created=m.created,
        seq=m.seq,
        attempt=m.attempt,
        part_keys=tuple(keys.record_key(job, p.record) for p in m.parts),
    )


def _stopped(job: str, key: str, remote: Remote, why: str) -> TierError:
    return TierError(
        f"the tier's retention of job {job!r} is stopped: {why}. What it references is "
        f"unknown, so nothing is deleted; replace or delete {remote.url}/{key}"
    )


def _facts(m: _Record, parts: Mapping[str, _Record]) -> CheckpointFacts:
    """Retention facts of a checkpoint: a multi-rank step's objects are its parts'."""
    objects = dict(m.objects)
    for key in m.part_keys:
        part = parts.get(key)
        if part is not None:
            objects.update(part.objects)
    # seq 0: retention's commit order is then the creation time (see keys.tier_order).
    return CheckpointFacts(m.step, m.metric, False, objects, m.created, 0)


# ---- deleting ----------------------------------------------------------------------------------


def _delete_manifests(remote: Remote, job: str, victims: list[_Record]) -> list[int]:
    """Delete the victims' manifests that a fresh listing shows unchanged and not the highest
    step (another writer may have deleted the steps above them); return their steps."""
    if not victims:
        return []
    now = {f.step: f.stamp for f in _manifest_keys(remote, job)}
    highest = max(now, default=None)
    deleted = []
    for m in victims:
        if m.step == highest:
            continue
        if now.get(m.step) != m.stamp:
            if m.step in now:
                log.info("%s: step %d kept: it was committed again in the tier", job, m.step)
            continue
        deleted.append(m)
    if deleted:
        remote.delete([m.key for m in deleted])
    for m in deleted:
        log.info("%s: deleted step %d from the tier %s", job, m.step, remote.url)
    return [m.step for m in deleted]


def _doomed_parts(victim: _Record, parts: Iterable[_Record], cutoff: float) -> list[str]:
    """The part records to delete with ``victim``'s step: its own set, and the other sets of the
    step whose parts are all older than ``cutoff``."""
    sets: dict[str | None, list[_Record]] = {}
    for part in parts:
        if part.step == victim.step:
            sets.setdefault(part.attempt, []).append(part)
    doomed = []
    for attempt, members in sets.items():
        own = bool(victim.part_keys) and attempt == victim.attempt
        if own or all(p.mtime < cutoff for p in members):
            doomed += [p.key for p in members]
    return sorted(doomed)


def _delete_resurrected(remote: Remote, job: str, records: list[_Record]) -> None:
    """A daemon that listed a step's parts before they were deleted may have created its
    global record again, naming parts now gone: delete such a record (same attempt) again."""
    for m in records:
        try:
            data = remote.get(m.key)
        except NotFoundError:
            continue
        try:
            again = parse_manifest(data, where=f"{remote.url}/{m.key}")
        except (ManifestError, FormatVersionError):
            continue  # not ours to judge here: the next prune stops on it, naming it
        if again.attempt == m.attempt:
            log.warning("%s: step %d was committed again while deleted; deleting it", job, m.step)
            remote.delete([m.key])


# ---- collecting objects ------------------------------------------------------------------------


@dataclass
class _References:
    """The objects the job's remaining manifests and part records name."""

    remote: Remote
    job: str
    digests: set[str] = field(default_factory=set)
    known: dict[str, Stamp] = field(default_factory=dict)

    def add(self, record: _Record) -> None:
        self.digests.update(record.objects)
        self.known[record.key] = record.stamp

    def refresh(self) -> None:
        """Add the objects of the manifests and part records written (or written again) since
        they were read."""
        found = (*_manifest_keys(self.remote, self.job), *_part_keys(self.remote, self.job))
        fresh = [f for f in found if self.known.get(f.item.key) != f.stamp]
        for record in _read_all(self.remote, self.job, fresh):
            self.add(record)


def _collect(
    remote: Remote, job: str, refs: _References, cutoff: float, *, dry_run: bool
) -> tuple[int, int]:
    """Delete (count, with ``dry_run``) the objects of ``job`` that nothing references and that
    are older than ``cutoff``; return how many and their bytes."""
    count = size = 0
    batch: list[tuple[str, str, int]] = []

    def flush() -> None:
        nonlocal count, size
        if not batch:
            return
        if not dry_run:
            refs.refresh()
        unused = [(key, n) for key, digest, n in batch if digest not in refs.digests]
        batch.clear()
        if unused and not dry_run:
            remote.delete([key for key, _ in unused])
        count += len(unused)
        size += sum(n for _, n in unused)

    for item in remote.list(keys.objects_prefix(job)):
        digest = keys.object_digest(job, item.key)
        if digest is None or digest in refs.digests or not item.mtime < cutoff:
            continue
        batch.append((item.key, digest, item.size))
        if len(batch) >= DELETE_BATCH:
            flush()
    flush()
    return count, size
