"""Uploading one committed checkpoint (or one rank's part) to the tier, and the tier's commit.

The bucket keeps the local store's invariant, *visible => complete and verified*:

1. every object the checkpoint names that the bucket lacks is put, byte for byte as the local
   file (checked against its name first: a damaged local object is never spread to the tier);
2. then the manifest, last, with a conditional create (``If-None-Match: *``). A manifest already
   there with the same bytes means an earlier attempt got that far; one with a lower commit
   sequence number is a step committed again and is replaced; any other is a conflict
   (:class:`TierConflictError`: another writer owns that prefix).

A multi-rank step is committed in the bucket, not on one node: each daemon uploads the parts of
its ranks (objects, then the part record, created exclusively), then :meth:`Uploader.try_commit`
lists the step's parts in the bucket and, once every rank's part is there and they agree, creates
the global record exclusively. Whoever completes the last part commits; a daemon that finds the
record already there is done too; one that lists too early tries again later (the daemon keeps
asking). Nodes need no shared disk: only the bucket.

Nothing here is called on a snapshot's hand-off or local-commit path: the daemon's upload thread
(:mod:`ckptd.daemon.uploads`) calls it, after the local commit.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.errors import CorruptCheckpointError, ManifestError, NotFoundError, TierError
from ckptd.format import parts as _parts
from ckptd.format.jobmeta import Upload
from ckptd.format.layout import JobDir, rank_from_name
from ckptd.format.manifest import Manifest, manifest_checksum, parse_manifest
from ckptd.format.store import Store
from ckptd.tier import keys
from ckptd.tier.remote import Remote

log = logging.getLogger("ckptd.tier.upload")


class TierConflictError(TierError):
    """The bucket holds a different checkpoint under the same key, which no retry can fix."""


@dataclass
class UploadOutcome:
    """What one :meth:`Uploader.upload` did."""

    upload: Upload
    objects_put: int = 0
    bytes_put: int = 0
    objects_present: int = 0
    gone: bool = False
    """The checkpoint is no longer on local disk (deleted, or never committed): nothing to do."""
    changed: bool = False
    """The local checkpoint was committed again while it was uploaded: upload it again."""
    record: Manifest | None = None
    """A part's step, committed in the bucket (by this call or another daemon)."""
    waiting_for: list[int] = field(default_factory=list)
    """A part's step waits for these ranks' parts in the bucket."""


class Uploader:
    """Uploads checkpoints of local stores to one tier. Thread-safe; one instance per tier.

    Every object of every checkpoint is looked up (``HEAD``) before it is skipped, never taken
    from memory, and an object found there is looked up again right before the manifest is
    created: another daemon's retention may have deleted it meanwhile, and a manifest must never
    name a missing object. A checkpoint that shares most objects with the previous one costs
    those lookups, and an upload of its new objects only."""

    def __init__(self, remote: Remote, *, concurrency: int = 8) -> None:
        self.remote = remote
        self.pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="ckptd-upload")
        self._marked_store = False

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    # ---- one checkpoint ----------------------------------------------------------------------

    def upload(
        self,
        store: Store,
        job: str,
        upload: Upload,
        *,
        on_bytes: Callable[[int], None] | None = None,
    ) -> UploadOutcome:
        """Upload ``upload`` from ``store`` (see the module docstring). Raises
        :class:`TierError` (retry later), :class:`TierConflictError` or
        :class:`CorruptCheckpointError` (retrying cannot help)."""
        out = UploadOutcome(upload)
        jd = JobDir(job, store.real_job_dir(job))
        path = (
            jd.manifest(upload.step)
            if upload.rank is None
            else jd.part(upload.step, str(upload.attempt), upload.rank)
        )
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            out.gone = True
            return out
        manifest = parse_manifest(data, where=str(path))
        if upload.rank is None and manifest.is_global:
            # Parts were uploaded by their ranks' marks; the tier's record is made from them.
            out.gone = True
            return out
        self._mark_tier()
        self._put_objects(store, job, manifest, out, on_bytes)
        if upload.rank is None:
            self._put_manifest(keys.manifest_key(job, upload.step), data, manifest)
        else:
            key = keys.part_key(job, upload.step, str(upload.attempt), upload.rank)
            if not self.remote.put_new(key, data) and self.remote.get(key) != data:
                raise TierConflictError(
                    f"{self.remote.url}/{key} holds another part for {upload}: two processes "
                    "claimed that rank in one attempt, or another daemon writes this prefix"
                )
        try:
            out.changed = path.read_bytes() != data
        except FileNotFoundError:
            out.changed = False  # deleted since: what was uploaded stays valid in the tier
        if upload.rank is not None and not out.changed:
            out.record, out.waiting_for = self.try_commit(
                job, upload.step, str(upload.attempt), manifest.world_size
            )
        return out

    def _mark_tier(self) -> None:
        """Once per Uploader: check that the endpoint is an object store (it must say that an
        object which does not exist is not there: a server that answers anything, e.g. a web
        server behind a wrong ``tier.endpoint``, would take every upload and keep nothing), then
        write ``.ckptd-store`` at the tier's root (readers find the tier by it)."""
        if self._marked_store:
            return
        probe = f"{keys.MARKER}.absent-{uuid.uuid4().hex}"
        try:
            self.remote.get(probe)
        except NotFoundError:
            pass
        else:
            raise TierError(
                f"tier {self.remote.url}: the endpoint returned an object that does not exist "
                f"({probe}): it is not an S3-compatible store; check tier.endpoint"
            )
        self.remote.put_new(keys.MARKER, b"ckptd.store\n")
        self._marked_store = True

    def _put_objects(
        self,
        store: Store,
        job: str,
        manifest: Manifest,
        out: UploadOutcome,
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        todo = list(manifest.objects)

        def one(digest: str) -> int:
            info = manifest.objects[digest]
            key = keys.object_key(job, digest)
            if self.remote.size(key) == info.stored_bytes:
                return -1
            # Never spread a damaged object: check it against its name (a header read when
            # this Store wrote or checked it; else a full decode and hash).
            if store.reusable_object(job, digest, info.raw_bytes) is None:
                raise CorruptCheckpointError(
                    f"job {job!r} step {manifest.step}: local object {digest} is damaged or "
                    "missing; it is not uploaded (run `ckptd verify` on the job)"
                )
            data = store.read_object(job, digest)
            try:
                if len(data) != info.stored_bytes:
                    raise CorruptCheckpointError(
                        f"job {job!r} step {manifest.step}: local object {digest} holds "
                        f"{len(data)} bytes, the manifest says {info.stored_bytes}"
                    )
                self.remote.put(key, data)
            finally:
                data.release()
            if on_bytes is not None:
                on_bytes(info.stored_bytes)
            return info.stored_bytes

        present = []
        for digest, sent in zip(todo, self.pool.map(one, todo), strict=True):
            if sent < 0:
                present.append(digest)
            else:
                out.objects_put += 1
                out.bytes_put += sent
        # The objects found there are looked up once more, right before the manifest: the
        # tier's retention on another node may have collected one since (an object nothing
        # names any more, older than its grace), and the manifest must not name a missing one.
        again = list(self.pool.map(one, present))
        out.objects_present = sum(1 for sent in again if sent < 0)
        for sent in again:
            if sent >= 0:
                out.objects_put += 1
                out.bytes_put += sent

    def _put_manifest(self, key: str, data: bytes, manifest: Manifest) -> None:
        if self.remote.put_new(key, data):
            return
        try:
            existing = self.remote.get(key)
        except NotFoundError:  # deleted meanwhile by the tier's retention: create it again
            if self.remote.put_new(key, data):
                return
            existing = self.remote.get(key)
        if existing == data:
            return  # an earlier upload got this far
        try:
            theirs = parse_manifest(existing, where=f"{self.remote.url}/{key}")
        except ManifestError:
            theirs = None  # damaged in the bucket: this commit replaces it
        if theirs is None or (
            not theirs.is_global and keys.tier_order(theirs) < keys.tier_order(manifest)
        ):
            self.remote.put(key, data)  # the step was committed again since
            return
        raise TierConflictError(
            f"{self.remote.url}/{key} holds another commit of step {manifest.step}, not older "
            f"than this one (created {theirs.created}, this one {manifest.created}); another "
            "daemon wrote that step since. Give each job a prefix of its own"
        )

    # ---- the multi-rank commit in the bucket ---------------------------------------------------

    def try_commit(
        self, job: str, step: int, attempt: str, world_size: int
    ) -> tuple[Manifest | None, list[int]]:
        """Commit ``step`` of ``attempt`` in the bucket once every part is there: ``(record,
        [])`` when it is committed (now or before), ``(None, missing ranks)`` while it waits.
        Raises :class:`TierConflictError` when the parts disagree or another attempt's record
        holds the step."""
        mkey = keys.manifest_key(job, step)
        try:
            existing = self.remote.get(mkey)
        except NotFoundError:
            existing = None
        if existing is not None:
            record = parse_manifest(existing, where=f"{self.remote.url}/{mkey}")
            if record.attempt == attempt:
                return record, []
            raise TierConflictError(
                f"{self.remote.url}/{mkey}: step {step} is committed in the tier by attempt "
                f"{record.attempt}, not {attempt}; this attempt's parts are not committed there"
            )
        prefix = keys.part_set_prefix(job, step, attempt)
        names = {Path(item.key).name for item in self.remote.list(prefix)}
        have = {r for r in map(rank_from_name, names) if r is not None}
        missing = [r for r in range(world_size) if r not in have]
        if missing:
            return None, missing
        pset = _parts.PartSet(job, step, attempt, JobDir(job, Path(job)).part_set(step, attempt))
        for rank in range(world_size):
            key = keys.part_key(job, step, attempt, rank)
            data = self.remote.get(key)
            pset.parts[rank] = parse_manifest(data, where=f"{self.remote.url}/{key}")
            pset.checksums[rank] = manifest_checksum(data)
        if len(pset.world_sizes) != 1 or pset.world_size != world_size:
            raise TierConflictError(
                f"{self.remote.url}/{prefix}: the parts of step {step} disagree on the world "
                f"size ({sorted(pset.world_sizes)}); the step is not committed in the tier"
            )
        # Every part was created after its objects: the set is complete and intact.
        record = _parts.global_record(pset, seq=time.time_ns() // 1_000_000)
        if self.remote.put_new(mkey, record.to_json()):
            log.info(
                "%s step %d committed in the tier %s: %d ranks (attempt %s)",
                job,
                step,
                self.remote.url,
                world_size,
                attempt,
            )
            return record, []
        return self.try_commit(job, step, attempt, world_size)  # another daemon was first
