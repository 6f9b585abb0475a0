"""The store: a checkpoint root directory, and :class:`Store`, the one object the rest of ckptd
calls to read and write it.

The single invariant: a visible manifest only names objects that are intact and durable. Writers
therefore (1) write every new object (:meth:`Store.write_object`, fsynced, renamed) and reuse an
existing one only once its content has been verified (:meth:`Store.reusable_object`), (2) fsync
the directory of every object the manifest names that is not known durable
(:meth:`Store.make_durable`), (3) commit the manifest (:meth:`Store.commit_manifest`, written
last, numbered with the job's next commit sequence number under :meth:`Store.commit_lock`).
Deleting a checkpoint removes its manifest first; :meth:`Store.gc` then removes objects that no
manifest names.

Store keeps the job-name rule, the store marker, the job's setup and its lock here, and hands the
rest to the store's pieces, each in its module: the directory tree (:mod:`~ckptd.format.layout`),
object files (:mod:`~ckptd.format.objects`), manifests and the commit
(:mod:`~ckptd.format.commits`), pins and ``job.json`` (:mod:`~ckptd.format.jobmeta`), durable
writes, locks and tmp files (:mod:`~ckptd.format.fsutil`).

Thread safety: a Store's methods may be called from any thread. Its mutable state is what it knows
about object files (:class:`~ckptd.format.objects.ObjectState`), which directories it has made
durable and the commit sequence numbers of manifests it has read; each piece guards its own with
a lock and changes it only in its own methods. Commits of one job are serialized across threads
and processes by the job's commit lock (only the numbering and the manifest's rename); object
writes may race freely (same name => same bytes).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from ckptd.errors import (
    InvalidNameError,
    ManifestError,
    NoStoreError,
    NotFoundError,
    RankLayoutError,
    StorePermissionError,
)
from ckptd.format import parts as _parts
from ckptd.format.commits import Commits, missing_step
from ckptd.format.fsutil import (
    STALE_TMP_S,
    Buffer,
    DurableDirs,
    durable_write,
    ensure_dir,
    flock,
    fsync_dir,
    os_error,
    sweep_tmp_dir,
)
from ckptd.format.jobmeta import (
    Upload,
    mark_upload,
    marked_uploads,
    pin_step,
    pinned_steps,
    read_job_info,
    unmark_upload,
    unpin_step,
    write_job_info,
)
from ckptd.format.layout import JobDir
from ckptd.format.manifest import Manifest, ObjectInfo
from ckptd.format.objects import ObjectFiles, ObjectState, read_object, read_object_header

log = logging.getLogger("ckptd.format.store")

MAX_JOB_NAME = 128
TMP_GRACE_S = 60.0
"""GC spares tmp files younger than this: metadata writes (``job.json``, pins) do not take the
job lock."""
STORE_MARKER = ".ckptd-store"
"""The file that marks a directory as a ckptd store (not a valid job name, so never a job)."""
STORE_FORMAT = "ckptd.store"
_JOB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_job_name(name: object) -> str:
    """Return ``name`` if it is an allowed job name, else raise :class:`InvalidNameError`.

    Allowed: 1-128 characters from ``A-Z a-z 0-9 . _ -``, starting with a letter or digit, without
    ``..``. This keeps a job name a single, harmless path component.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"job name must be a string, got {type(name).__name__}")
    if not name or len(name) > MAX_JOB_NAME:
        raise InvalidNameError(
            f"job name must be 1 to {MAX_JOB_NAME} characters long, got {len(name)}"
        )
    if not _JOB_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid job name {name!r}: use letters, digits, '.', '_' and '-', starting with a "
            "letter or digit, with no '/', '..' or NUL"
        )
    return name


@dataclass(frozen=True)
class GcResult:
    """What :meth:`Store.gc` removed (or would remove, with ``dry_run``)."""

    objects: int
    bytes: int
    tmp_files: int


class Store:
    """A checkpoint root directory. Creating a Store touches nothing on disk.

    A Store remembers which object files it has verified or made durable (:class:`ObjectState`),
    so a long-lived Store (the daemon keeps one per root) checks each reused object once; a new
    Store trusts nothing it has not checked itself.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self._dirs = DurableDirs()
        self._objects = ObjectFiles(self._dirs)
        self._commits = Commits()
        self._warned: set[tuple[str, int, str]] = set()

    # ---- paths -------------------------------------------------------------------------------

    def _job(self, job: str) -> JobDir:
        return JobDir(validate_job_name(job), self.root / job)

    def _real_job(self, job: str) -> JobDir:
        """The job's directory for writing or deleting; never a symlink (it could point
        anywhere, e.g. /etc)."""
        jd = self._job(job)
        if jd.path.is_symlink():
            raise StorePermissionError(
                f"job directory {jd.path} is a symlink; ckptd never writes or deletes through "
                "symlinks. Remove it or use another job name"
            )
        return jd

    def job_dir(self, job: str) -> Path:
        return self._job(job).path

    def real_job_dir(self, job: str) -> Path:
        return self._real_job(job).path

    def manifest_path(self, job: str, step: int) -> Path:
        return self._job(job).manifest(step)

    def object_path(self, job: str, digest: str) -> Path:
        return self._job(job).object(digest)

    def tmp_dir(self, job: str) -> Path:
        return self._job(job).tmp

    # ---- setup -------------------------------------------------------------------------------

    def initialize(self) -> Path:
        """Make the root a ckptd store: create it (with its parents) and its marker file
        (:data:`STORE_MARKER`), durably. Idempotent; returns the root."""
        self._mark(ensure_dir(self.root))
        return self.root

    def _mark(self, root_created: bool) -> None:
        """Write the store marker unless it is there (and the root's own entry when the root was
        just created), so a store that was written to is recognized as one."""
        marker = self.root / STORE_MARKER
        if not root_created and os.path.lexists(marker):
            return
        body = json.dumps({"format": STORE_FORMAT, "version": 1}) + "\n"
        # A tmp file of a writer that dies here is left in the root; its name is not a job name.
        durable_write(marker, [body.encode()], tmp_dir=self.root)
        if root_created:
            fsync_dir(self.root.parent)

    def check_store(self) -> None:
        """Raise :class:`NoStoreError` unless the root is a ckptd store: a directory with the
        marker file, or (written by versions without the marker) with at least one job directory.

        Readers call this before they report "nothing there", so that a mistyped root does not
        look like an empty store.
        """
        try:
            st = self.root.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise NoStoreError(
                f"no ckptd store at {self.root}: the directory does not exist; pass --root DIR "
                "or set CKPTD_ROOT / store.root"
            ) from None
        except OSError as exc:
            raise os_error(exc, "stat", self.root) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise NoStoreError(
                f"{self.root} is not a ckptd store (not a directory); pass --root DIR or set "
                "CKPTD_ROOT / store.root"
            )
        if os.path.lexists(self.root / STORE_MARKER) or self.jobs():
            return
        raise NoStoreError(
            f"{self.root} is not a ckptd store (no {STORE_MARKER} marker, no job directories); "
            "pass --root DIR or set CKPTD_ROOT / store.root"
        )

    def open_job(self, job: str) -> Path:
        """Create the job's directories if needed (writers call this first); return the job dir.

        Also marks the root as a store (:meth:`initialize`) if it is not marked yet. Refuses a
        job directory that is a symlink, so a replaced directory is never written into.
        """
        root_created = ensure_dir(self.root)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorePermissionError(
                f"cannot write to checkpoint root {self.root}: permission denied for uid "
                f"{os.getuid()}; fix its owner or mode, or choose another root with --root / "
                "CKPTD_ROOT"
            )
        jd = self._real_job(job)
        self._mark(root_created)
        created = ensure_dir(jd.path)
        for sub in (jd.objects, jd.manifests, jd.tmp):
            created |= ensure_dir(sub)
        if created:
            fsync_dir(jd.path)
            fsync_dir(self.root)
        else:
            # Leftovers of a writer that died; old enough that no live write can own them.
            self.sweep_tmp(job, min_age_s=STALE_TMP_S)
        return jd.path

    @contextmanager
    def job_lock(self, job: str, *, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
        """Hold the job's lock: writers take it shared from their first object to their manifest,
        GC takes it exclusive, so GC never deletes an object a write in progress deduped against.
        Yields False (lock not taken) only when ``blocking=False`` and someone else holds it."""
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        with flock(self._real_job(job).job_lock, flags) as taken:
            yield taken

    # ---- pins and job metadata (see ckptd.format.jobmeta) -----------------------------------

    def pin(self, job: str, step: int) -> None:
        """Protect ``step`` from retention (the step need not exist yet: snapshot(pin=True))."""
        self.open_job(job)
        pin_step(self._job(job), step, self._dirs)

    def unpin(self, job: str, step: int) -> bool:
        """Remove a pin; False when ``step`` was not pinned."""
        return unpin_step(self._real_job(job), step)

    def pinned_steps(self, job: str) -> set[int]:
        return pinned_steps(self._job(job))

    def mark_upload(self, job: str, upload: Upload) -> None:
        """Queue ``upload`` for the tier, durably (before its local commit; see
        :class:`~ckptd.format.jobmeta.Upload`)."""
        self.open_job(job)  # as pin does: the mark is written through the job's tmp/
        mark_upload(self._real_job(job), upload, self._dirs)

    def unmark_upload(self, job: str, upload: Upload) -> bool:
        """The tier holds ``upload`` (or it is dropped): remove its mark."""
        return unmark_upload(self._real_job(job), upload)

    def marked_uploads(self, job: str) -> list[Upload]:
        """What the tier does not hold yet, oldest step first."""
        return marked_uploads(self._job(job))

    def upload_pending(self, job: str, step: int) -> bool:
        """Whether any part of ``step`` waits for the tier (retention keeps it meanwhile)."""
        return any(u.step == step for u in self.marked_uploads(job))

    def job_info(self, job: str) -> dict[str, Any]:
        """The job's ``job.json`` (owner uid, retention recorded for it); {} when absent."""
        return read_job_info(self._job(job))

    def update_job_info(self, job: str, **values: Any) -> None:
        """Merge ``values`` into ``job.json`` (durably)."""
        self.open_job(job)
        write_job_info(self._job(job), self.job_info(job) | values)

    def job_owner(self, job: str) -> int | None:
        """The uid a job belongs to: recorded in ``job.json`` by the daemon, else the owner of the
        job directory (made by an in-process writer); None when the job does not exist."""
        job_dir = self.job_dir(job)
        owner = self.job_info(job).get("owner_uid")
        if isinstance(owner, int) and not isinstance(owner, bool):
            return owner
        try:
            return job_dir.stat().st_uid
        except FileNotFoundError:
            return None

    def claim_job(self, job: str, uid: int) -> None:
        """Create ``job`` if needed and record ``uid`` as its owner (the daemon calls this)."""
        self.update_job_info(job, owner_uid=uid)

    # ---- checkpoints -------------------------------------------------------------------------

    def jobs(self) -> list[str]:
        """Names of the jobs under the root that have a manifests directory, sorted."""
        try:
            entries = sorted(self.root.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise os_error(exc, "list", self.root) from exc
        out = []
        for p in entries:
            try:
                validate_job_name(p.name)
            except InvalidNameError:
                continue
            if not p.is_symlink() and (p / "manifests").is_dir():
                out.append(p.name)
        return out

    def steps(self, job: str) -> list[int]:
        """The committed steps of ``job``, ascending. Empty if the job does not exist."""
        return self._commits.steps(self._job(job))

    def require_steps(self, job: str) -> list[int]:
        """Like :meth:`steps` but raise :class:`NotFoundError` when there is no checkpoint
        (:class:`NoStoreError` when the root is not a store at all)."""
        steps = self.steps(job)
        if not steps:
            self._no_checkpoints(job)
        return steps

    def _no_checkpoints(self, job: str) -> NoReturn:
        self.check_store()
        known = ", ".join(self.jobs()) or "none"
        raise NotFoundError(
            f"job {job!r} has no checkpoints under {self.root} (jobs there: {known})"
        )

    def steps_by_commit(self, job: str) -> list[int]:
        """The committed steps of ``job`` in commit order, oldest first (the last one is what
        ``"latest"`` means). Empty if the job does not exist.

        Ordered by commit sequence number, then step: manifests written before seq existed
        (seq 0) come first, by step. A damaged manifest (checksum fails) is placed by what its
        own seq line says or where its step puts it (right after the newest commit of a lower
        step), whichever is later, so that a damaged newest checkpoint is reported when read
        rather than silently passed over. Reads every manifest the first time; a long-lived
        Store then only stats them.
        """
        return self._commits.order(self._job(job))

    def resolve_step(self, job: str, step: int | str) -> int:
        """Turn a step number, ``"latest"`` (the checkpoint committed last,
        :meth:`steps_by_commit`) or ``"highest"`` (the highest step number) into an existing
        step, or raise NotFoundError."""
        if step == "latest":
            order = self.steps_by_commit(job)
            if not order:
                self._no_checkpoints(job)
            return order[-1]
        steps = self.require_steps(job)
        if step == "highest":
            return steps[-1]
        if isinstance(step, str):
            if not step.isdigit():
                raise NotFoundError(
                    f"step must be a number or 'latest', got {step!r} ('latest' is the "
                    "checkpoint committed last, 'highest' the highest step number)"
                )
            step = int(step)
        if step not in steps:
            raise missing_step(job, step, steps)
        return step

    def read_manifest(self, job: str, step: int) -> Manifest:
        return self._commits.read(self._job(job), step)

    @contextmanager
    def commit_lock(self, job: str) -> Iterator[int]:
        """Hold the job's commit lock and yield the next commit sequence number: 1 + the highest
        seq among the job's manifests, read under the lock (see :mod:`ckptd.format.commits`).

        A writer numbers its manifest with it and calls :meth:`commit_manifest` before leaving
        the block, so seq grows strictly in commit order across every thread and process
        committing the job (two daemons on one root, an in-process save).
        """
        with self._commits.lock(self._real_job(job)) as seq:
            yield seq

    def commit_manifest(self, manifest: Manifest) -> Path:
        """Make ``manifest`` visible: the last step of every checkpoint write.

        The caller must have made every object durable first (write_object + make_durable). A
        manifest with ``seq`` 0 is numbered here, under the job's commit lock; a writer that
        needs to know the number (the pipeline returns the committed manifest) takes
        :meth:`commit_lock` itself and commits the manifest numbered with the seq it yields,
        inside the block. A manifest of a step that exists replaces it (atomically): the newer
        commit wins.
        """
        if manifest.seq == 0:
            with self.commit_lock(manifest.job) as seq:
                return self.commit_manifest(replace(manifest, seq=seq))
        return self._commits.commit(self._job(manifest.job), manifest)

    def delete_checkpoint(self, job: str, step: int) -> None:
        """Remove a checkpoint's manifest (atomically, durably); objects stay until :meth:`gc`.

        A multi-rank step's set is marked retired first and removed after its record, so no
        crash in between can make the step visible again (:mod:`ckptd.format.parts`)."""
        jd = self._real_job(job)
        # Every set of the step, whatever the record says (it may be damaged).
        retired = [_parts.retire(jd, s, a) for s, a in _parts.set_keys(jd) if s == step]
        self._commits.delete(jd, step)
        for pset in retired:
            _parts.remove_set(pset)

    def referenced_objects(self, job: str) -> set[str]:
        """Every object named by a manifest of ``job`` or by a rank part (committed or still
        pending). Unreadable manifests and parts raise."""
        jd = self._job(job)
        refs = self._commits.referenced_objects(jd)
        for pset in _parts.list_sets(jd):
            if pset.damaged:
                raise ManifestError(
                    f"{pset.path}: " + "; ".join(pset.damaged) + " (gc deletes nothing while "
                    "a part is unreadable; remove the damaged part once understood)"
                )
            for part in pset.parts.values():
                refs.update(part.objects)
        return refs

    # ---- multi-rank steps (see ckptd.format.parts) ---------------------------------------------

    def job_kinds(self, job: str) -> set[str]:
        """What the job's checkpoints are: ``"single"`` (one process), ``"ranks"`` (multi-rank
        steps; pending parts count), both or none."""
        jd = self._job(job)
        kinds = self._commits.kinds(jd)
        if "ranks" not in kinds and _parts.set_keys(jd):
            kinds.add("ranks")
        return kinds

    def check_job_kind(self, job: str, world_size: int) -> None:
        """Refuse to mix single-process checkpoints and multi-rank steps in one job."""
        kinds = self.job_kinds(job)
        if world_size > 1 and "single" in kinds:
            raise RankLayoutError(
                f"job {job!r} under {self.root} holds single-process checkpoints; a job of "
                f"{world_size} ranks cannot write it. Use another job name (or delete the job's "
                "checkpoints)"
            )
        if world_size == 1 and "ranks" in kinds:
            raise RankLayoutError(
                f"job {job!r} under {self.root} holds multi-rank checkpoints; a single-process "
                "client cannot write it. Use another job name, or give the client its rank and "
                "world size (Client(..., rank=, world_size=))"
            )

    def write_part(self, part: Manifest) -> Path:
        """Write one rank's part of a multi-rank step (its objects must be durable already);
        see :func:`ckptd.format.parts.write_part`."""
        jd = self._real_job(part.job)
        self.check_job_kind(part.job, part.world_size)
        return _parts.write_part(jd, part, self._dirs)

    def part_set(self, job: str, step: int, attempt: str) -> _parts.PartSet:
        return _parts.read_set(self._job(job), step, attempt)

    def part_sets(self, job: str) -> list[_parts.PartSet]:
        """Every part set of the job (committed or not)."""
        return _parts.list_sets(self._job(job))

    def global_records(self, job: str) -> list[Manifest]:
        """The job's global records (damaged ones are skipped)."""
        jd = self._job(job)
        out = []
        for step in self._commits.steps(jd):
            try:
                record = self._commits.read(jd, step)
            except ManifestError:
                continue
            if record.is_global:
                out.append(record)
        return out

    def pending_sets(self, job: str) -> list[_parts.PartSet]:
        """The job's part sets that no global record commits: steps waiting for ranks."""
        jd = self._job(job)
        committed = {(r.step, r.attempt) for r in self.global_records(job)}
        keys = [k for k in _parts.set_keys(jd) if k not in committed]
        return _parts.list_sets(jd, keys) if keys else []

    def commit_step(
        self, job: str, step: int, attempt: str, *, pending_timeout_s: float
    ) -> Manifest | None:
        """Commit ``step`` of ``attempt`` if its set is complete and intact: create its global
        record exclusively. Returns the record (also when another committer created it first),
        or None when the set cannot be committed (yet, or ever: then it is collected later)."""
        jd = self._real_job(job)
        pset = _parts.read_set(jd, step, attempt)
        if not pset.complete:
            return None
        where = f"{job} step {step} (attempt {attempt}) not committed"
        found = _parts.problems(jd, pset)
        if found:
            self._warn_once((job, step, attempt), f"{where}: " + "; ".join(found))
            return None
        # First whether it is committed, then (decision, retired) whether it may be: a record
        # deleted since was retired before it went, so the checks below see that.
        records = self.global_records(job)
        for record in records:
            if record.step == step and record.attempt == attempt:
                return record
        first = _parts.attempt_order(jd)
        if pset.decision != "commit":
            margin_ns = int(_parts.commit_margin_s(pending_timeout_s) * 1e9)
            why = _parts.collectable(
                pset,
                records,
                now_ns=time.time_ns() + margin_ns,
                pending_timeout_s=pending_timeout_s,
                first=first,
                grace_s=0.0,
            ) or next(
                (
                    f"attempt {a}, which began after it, has handed off parts"
                    for a in first
                    if _parts.newer(first, a, attempt)
                ),
                None,
            )
            if why is None and _parts.decide(jd, pset, "commit") != "commit":
                why = "it is being collected"
            if why is not None:
                self._warn_once((job, step, attempt), f"{where}: {why}")
                return None
        for record in records:  # never overwrite a newer attempt's commit of this step
            if record.step == step and _parts.newer(first, str(record.attempt), attempt):
                return None
        if (pset.path / _parts.RETIRED).exists() or not pset.path.is_dir():
            return None  # its step was deleted meanwhile
        with self.commit_lock(job) as seq:
            # Again under the lock: another committer on this host may have been first.
            existing: Manifest | None = None
            if os.path.lexists(jd.manifest(step)):
                try:
                    existing = self._commits.read(jd, step)
                except ManifestError:
                    existing = None  # damaged: replaced by this commit
                if existing is not None and (
                    existing.attempt == attempt
                    or _parts.newer(first, str(existing.attempt), attempt)
                ):
                    return existing if existing.attempt == attempt else None
            record = _parts.global_record(pset, seq)
            try:
                # Exclusive when the step has no record: a committer on another node that
                # links first wins, and this one finds its record.
                self._commits.commit(jd, record, exclusive=not os.path.lexists(jd.manifest(step)))
            except FileExistsError:
                try:
                    other = self._commits.read(jd, step)
                except ManifestError:
                    return None
                return other if other.attempt == attempt else None
        log.info(
            "%s step %d committed: %d ranks (attempt %s, seq %d)",
            job,
            step,
            record.world_size,
            attempt,
            seq,
        )
        return record

    def set_status(
        self, job: str, step: int, attempt: str, *, pending_timeout_s: float
    ) -> tuple[_parts.PartSet, str | None]:
        """A set as it is now, and why it may be collected (None: it waits or is committed)."""
        jd = self._job(job)
        pset = _parts.read_set(jd, step, attempt)
        why = _parts.collectable(
            pset,
            self.global_records(job),
            now_ns=time.time_ns(),
            pending_timeout_s=pending_timeout_s,
            first=_parts.attempt_order(jd),
        )
        return pset, why

    def _warn_once(self, key: tuple[str, int, str], message: str) -> None:
        """Log a refused commit once per set (a recheck tries every second)."""
        if key in self._warned:
            return
        if len(self._warned) > 10_000:
            self._warned.clear()
        self._warned.add(key)
        log.warning("%s", message)

    def collect_parts(
        self, job: str, *, pending_timeout_s: float, dry_run: bool = False
    ) -> list[tuple[int, str, str]]:
        """Remove the part sets of ``job`` that can never be committed (see
        :func:`ckptd.format.parts.collectable`); return ``(step, attempt, why)`` of each."""
        jd = self._real_job(job)
        records = self.global_records(job)
        committed = {(r.step, r.attempt) for r in records}
        keys = [k for k in _parts.set_keys(jd) if k not in committed]
        now = time.time_ns()
        first = _parts.attempt_order(jd) if keys else {}
        # Parts the tier does not hold yet stay: on node-local disks the bucket commits the step.
        uploading = {(u.step, u.attempt) for u in marked_uploads(jd) if u.rank is not None}
        out = []
        for pset in _parts.list_sets(jd, keys) if keys else []:
            why = _parts.collectable(
                pset, records, now_ns=now, pending_timeout_s=pending_timeout_s, first=first
            )
            if why is None or (pset.step, pset.attempt) in uploading:
                continue
            undecided = pset.decision is None and not pset.retired
            if not dry_run and undecided and _parts.decide(jd, pset, "collect") != "collect":
                continue  # a committer decided first
            out.append((pset.step, pset.attempt, why))
            if not dry_run:
                _parts.remove_set(pset)
                log.info(
                    "%s step %d (attempt %s): parts of ranks %s collected: %s",
                    job,
                    pset.step,
                    pset.attempt,
                    sorted(pset.parts),
                    why,
                )
        return out

    def read_part(self, job: str, step: int, rank: int, record: Manifest | None = None) -> Manifest:
        """Rank ``rank``'s part of the committed multi-rank ``step``, checked against the global
        record (its checksum)."""
        record = record or self.read_manifest(job, step)
        if not record.is_global:
            raise RankLayoutError(
                f"job {job!r} step {step} was written by one process; it has no rank {rank}"
            )
        if not 0 <= rank < record.world_size:
            raise RankLayoutError(
                f"job {job!r} step {step} has ranks 0..{record.world_size - 1}; there is no "
                f"rank {rank}"
            )
        ref = record.parts[rank]
        path = self._job(job).path / ref.record
        try:
            part, checksum = _parts.parse_part(path)
        except FileNotFoundError:
            raise ManifestError(
                f"job {job!r} step {step}: rank {rank}'s part {path} is missing; the step is "
                "damaged: restore another step"
            ) from None
        except OSError as exc:
            raise os_error(exc, "read", path) from exc
        if checksum != ref.checksum:
            raise ManifestError(
                f"{path}: this part is not the one job {job!r} step {step} committed (checksum "
                "differs); the step is damaged: restore another step"
            )
        return part

    def step_parts(self, job: str, step: int) -> list[Manifest]:
        """Every rank's part of ``step`` (one manifest for a single-process checkpoint)."""
        record = self.read_manifest(job, step)
        if not record.is_global:
            return [record]
        return [self.read_part(job, step, r, record) for r in range(record.world_size)]

    # ---- objects (see ckptd.format.objects) --------------------------------------------------

    def has_object(self, job: str, digest: str) -> bool:
        """Whether a file exists under the object's name (its content is not checked)."""
        return self.object_path(job, digest).is_file()

    def object_header(self, job: str, digest: str) -> tuple[int, int, int, int]:
        """``(codec, elem_size, raw_len, stored_len)`` of an existing object."""
        return read_object_header(self.object_path(job, digest))

    def read_object(self, job: str, digest: str, into: bytearray | None = None) -> memoryview:
        """The object file's bytes. With ``into`` (a buffer reused by the caller, grown as
        needed) no memory is allocated per object: fresh memory costs page faults."""
        return read_object(self.object_path(job, digest), into)

    def object_state(self, job: str, digest: str) -> ObjectState | None:
        """What this Store knows about object ``digest`` (None: nothing; see ObjectState)."""
        return self._objects.state(self._job(job), digest)

    def reusable_object(self, job: str, digest: str, raw_bytes: int) -> ObjectInfo | None:
        """The job's object ``digest`` if a writer may name it in a manifest, else None (the
        writer writes it again): see :meth:`~ckptd.format.objects.ObjectFiles.reusable`."""
        return self._objects.reusable(self._job(job), digest, raw_bytes)

    def write_object(self, job: str, digest: str, parts: Iterable[Buffer]) -> tuple[int, bool]:
        """Durably write object ``digest`` (its directory fsync is left to :meth:`make_durable`).

        The caller vouches that ``parts`` encode bytes that hash to ``digest`` (the pipeline
        hashes and encodes one private copy), and must not change them until this returns.
        Returns ``(stored_bytes, new_shard)``: ``new_shard`` tells that ``objects/ab`` was made.
        """
        return self._objects.write(self._job(job), digest, parts)

    def make_durable(self, job: str, digests: Iterable[str]) -> None:
        """Make the directory entries of the objects ``digests`` durable; a writer calls this
        with every object its manifest names, after the last object write and before
        :meth:`commit_manifest`, holding the job lock (see
        :meth:`~ckptd.format.objects.ObjectFiles.make_durable`)."""
        self._objects.make_durable(self._job(job), digests)

    def forget_objects(self, job: str, digests: Iterable[str]) -> None:
        """Drop what this Store knows about the objects ``digests`` (they are being deleted)."""
        self._objects.forget(self._job(job), digests)

    def quarantine_object(
        self, job: str, digest: str, *, still_damaged: Callable[[], bool] | None = None
    ) -> Path | None:
        """Move the job's object ``digest`` (found damaged) to ``<job>/quarantine/`` and return
        its new path; ``<digest>.1``, ``.2``, ... when that name is taken there already.

        From then on no write can dedup against it: the next checkpoint with that content writes
        the object anew (:meth:`reusable_object` finds no file), which also repairs every
        checkpoint that names it. The move is a rename within the job (same filesystem), made
        durable; it takes the job lock exclusively, as GC does, so no write in progress has
        deduped against the object. GC never touches ``quarantine/``: operators delete it.
        ``still_damaged`` is called under that lock, right before the move: a verify run can
        take hours, and a writer that found the object damaged may have written it anew meanwhile
        (then moving it would break the checkpoints that now rely on it). When it returns False
        nothing is moved and the result is None.
        Raises :class:`NotFoundError` when the job has no such object.
        """
        self.object_path(job, digest)  # a bad name fails before the lock file is touched
        jd = self._real_job(job)
        with self.job_lock(job, exclusive=True):
            if still_damaged is not None and not still_damaged():
                return None
            dest = self._objects.quarantine(jd, digest)
        log.warning("%s: moved damaged object %s to %s", job, digest, dest)
        return dest

    # ---- garbage -----------------------------------------------------------------------------

    def gc(self, job: str, *, dry_run: bool = False, min_age_s: float = 0.0) -> GcResult:
        """Remove objects of ``job`` that no manifest references, and stale tmp files.

        ``min_age_s`` spares objects modified more recently than that, so GC running beside a
        writer does not delete an object the writer just wrote or deduped against before the
        writer's manifest lands. A manifest that cannot be parsed stops GC (nothing is deleted):
        its objects might still be needed once it is repaired.
        """
        with self.job_lock(job, exclusive=True):
            return self.gc_unlocked(job, dry_run=dry_run, min_age_s=min_age_s)

    def gc_unlocked(self, job: str, *, dry_run: bool = False, min_age_s: float = 0.0) -> GcResult:
        """:meth:`gc` for a caller that already holds the job lock exclusively."""
        refs = self.referenced_objects(job)
        count, size = self._objects.collect(
            self._real_job(job), refs, dry_run=dry_run, min_age_s=min_age_s
        )
        tmp_files = self.sweep_tmp(job, dry_run=dry_run, min_age_s=max(min_age_s, TMP_GRACE_S))
        return GcResult(count, size, tmp_files)

    def sweep_tmp(self, job: str, *, dry_run: bool = False, min_age_s: float = 0.0) -> int:
        """Remove leftovers in the job's tmp directory; return how many there were (see
        :func:`~ckptd.format.fsutil.sweep_tmp_dir`: live writers' files are spared)."""
        return sweep_tmp_dir(self._real_job(job).tmp, dry_run=dry_run, min_age_s=min_age_s)
