"""The on-disk store: layout, object files, the manifest commit, deletion, GC and tmp sweeping.

Layout under the root (see ``docs/format.md``)::

    <root>/.ckptd-store                       marks the directory as a store (see check_store)
    <root>/<job>/objects/ab/<blake3 hex>      immutable chunk objects, shared between checkpoints
    <root>/<job>/manifests/step-000000001200.json   a checkpoint; it exists iff this file exists
    <root>/<job>/quarantine/<blake3 hex>      damaged objects moved aside (never read, never GCed)
    <root>/<job>/tmp/                         in-flight files; anything here is garbage once no
                                              writer runs (swept by :meth:`Store.sweep_tmp`)

The single invariant: a visible manifest only names objects that are intact and durable. Writers
therefore (1) write every new object (:meth:`Store.write_object`, fsynced, renamed) and reuse an
existing one only once its content has been verified (:meth:`Store.reusable_object`), (2) fsync
the directory of every object the manifest names that is not known durable
(:meth:`Store.make_durable`), (3) commit the manifest (:meth:`Store.commit_manifest`, written
last, numbered with the job's next commit sequence number under :meth:`Store.commit_lock`).
Deleting a checkpoint removes its manifest first; :meth:`Store.gc` then removes objects that no
manifest names.

Thread safety: a Store's methods may be called from any thread. Its mutable state is what it
knows about object files (:class:`ObjectState`, per ``(job, digest)``), which directories it has
made durable and the commit sequence numbers of manifests it has read; all are guarded by one lock
and driven only by the Store's own methods. Commits of one job are serialized across threads and
processes by the job's commit lock (only the numbering and the manifest's rename); object writes
may race freely (same name => same bytes).
"""

from __future__ import annotations

import bisect
import enum
import fcntl
import io
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from ckptd.errors import (
    CorruptCheckpointError,
    FormatVersionError,
    InvalidNameError,
    ManifestError,
    NoStoreError,
    NotFoundError,
    StorePermissionError,
)
from ckptd.format.codec import CODEC_NAMES, HEADER, decode, read_header
from ckptd.format.fsutil import (
    Buffer,
    durable_write,
    ensure_dir,
    fsync_dir,
    os_error,
    tmp_writer,
    writer_alive,
)
from ckptd.format.hashing import check_hash_name, content_hash
from ckptd.format.manifest import (
    FORMAT_VERSION,
    Manifest,
    ObjectInfo,
    check_step,
    claimed_seq,
    commit_seq,
    manifest_name,
    parse_manifest,
    step_from_name,
)

log = logging.getLogger("ckptd.format.store")

MAX_JOB_NAME = 128
STALE_TMP_S = 3600.0
TMP_GRACE_S = 60.0
"""A tmp file this old is a dead writer's leftover (swept when a writer opens the job)."""
STORE_MARKER = ".ckptd-store"
"""The file that marks a directory as a ckptd store (not a valid job name, so never a job)."""
STORE_FORMAT = "ckptd.store"
_RACY_NS = 10**8
"""A manifest modified less than this long ago is read again at every scan: a file replacing it
within the same timestamp tick (Linux stamps files with a clock of 1-10 ms resolution) could reuse
its inode number and size and look unchanged. Once a file is older, any replacement has a later
mtime. :data:`_RACY_COARSE_NS` applies to whole-second mtimes (filesystems that store seconds)."""
_RACY_COARSE_NS = 3 * 10**9
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


class ObjectState(enum.Enum):
    """What a Store knows about one object file of a job (:meth:`Store.object_state`).

    Not known (``None``): the Store has neither written nor checked it, so it trusts neither its
    content nor its directory entry. ``VERIFIED``: its content matches its name, because this
    Store wrote it from bytes it hashed (:meth:`Store.write_object`) or decoded and hashed it
    (:meth:`Store.reusable_object`); its directory entry may not be durable yet. ``DURABLE``:
    verified, and :meth:`Store.make_durable` has since fsynced its directory.

    Transitions, all made by the Store: not known -> VERIFIED (written, or checked and intact);
    VERIFIED -> DURABLE (make_durable); any -> VERIFIED (the file was written again);
    any -> not known (:meth:`Store.forget_objects`, which GC calls for what it deletes, or a
    check that finds the file damaged). A file found replaced (another inode, size or mtime than
    the one written or checked) is checked again as if it were not known.
    """

    VERIFIED = "verified"
    DURABLE = "durable"


@dataclass(frozen=True)
class _Known:
    """An object file this Store vouches for: ``identity`` is its (inode, size, mtime_ns)."""

    identity: tuple[int, int, int]
    state: ObjectState


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class _Commit:
    """The commit sequence number of one manifest file, as far as it can be known.

    ``seq``: verified by the manifest's checksum (0: written before seq existed); None when the
    manifest is damaged or unreadable as a manifest. ``claimed``: what the seq line of a damaged
    manifest says (unverified; None if there is none).
    """

    seq: int | None
    claimed: int | None = None


_local = threading.local()


def _scratch(name: str, size: int) -> bytearray:
    """A buffer of at least ``size`` bytes owned by the calling thread and reused by its next
    call with the same ``name`` (fresh memory costs page faults). Grown by replacement, so a
    view of the old buffer that is still alive never blocks the growth."""
    buf: bytearray | None = getattr(_local, name, None)
    if buf is None or len(buf) < size:
        buf = bytearray(size)
        setattr(_local, name, buf)
    return buf


def _read_all(f: io.FileIO, size: int, into: bytearray | None) -> memoryview:
    """Up to ``size`` bytes of ``f`` from its position, in ``into`` (grown as needed) or new
    memory. Shorter only when the file is."""
    if into is None:
        into = bytearray(size)
    elif len(into) < size:
        into.extend(bytes(size - len(into)))
    view = memoryview(into)[:size]
    got = 0
    while got < size:
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return view[:got]


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
        self._known_lock = threading.Lock()
        self._thread = threading.local()
        self._known: dict[tuple[str, str], _Known] = {}
        self._durable_dirs: set[Path] = set()
        """Directories whose entry in their parent this Store has fsynced (shards, ``pins/``)."""
        self._commits: dict[str, dict[str, tuple[int, tuple[int, int, int], _Commit]]] = {}
        """Per job, per manifest file name: its step, identity and commit sequence number, kept
        for files old enough (:data:`_RACY_NS`; manifest files are replaced, never modified)."""

    # ---- paths -------------------------------------------------------------------------------

    def job_dir(self, job: str) -> Path:
        return self.root / validate_job_name(job)

    def manifest_path(self, job: str, step: int) -> Path:
        return self.job_dir(job) / "manifests" / manifest_name(check_step(step))

    def object_path(self, job: str, digest: str) -> Path:
        check_hash_name(digest)
        return self.job_dir(job) / "objects" / digest[:2] / digest

    def tmp_dir(self, job: str) -> Path:
        return self.job_dir(job) / "tmp"

    # ---- setup -------------------------------------------------------------------------------

    def real_job_dir(self, job: str) -> Path:
        """The job's directory for writing or deleting; never a symlink (it could point
        anywhere, e.g. /etc)."""
        job_dir = self.job_dir(job)
        if job_dir.is_symlink():
            raise StorePermissionError(
                f"job directory {job_dir} is a symlink; ckptd never writes or deletes through "
                "symlinks. Remove it or use another job name"
            )
        return job_dir

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
        body = json.dumps({"format": STORE_FORMAT, "version": FORMAT_VERSION}) + "\n"
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
        job_dir = self.real_job_dir(job)
        self._mark(root_created)
        created = ensure_dir(job_dir)
        for sub in ("objects", "manifests", "tmp"):
            created |= ensure_dir(job_dir / sub)
        if created:
            fsync_dir(job_dir)
            fsync_dir(self.root)
        else:
            # Leftovers of a writer that died; old enough that no live write can own them.
            self.sweep_tmp(job, min_age_s=STALE_TMP_S)
        return job_dir

    @contextmanager
    def job_lock(self, job: str, *, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
        """Hold the job's lock: writers take it shared from their first object to their manifest,
        GC takes it exclusive, so GC never deletes an object a write in progress deduped against.
        Yields False (lock not taken) only when ``blocking=False`` and someone else holds it."""
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        with self._flock(job, "lock", flags) as taken:
            yield taken

    @contextmanager
    def _flock(self, job: str, name: str, flags: int) -> Iterator[bool]:
        """``flock`` the job's lock file ``name`` (created if missing, never through a symlink)
        for the duration of the block. Yields False when ``LOCK_NB`` is in ``flags`` and
        someone else holds it."""
        path = self.real_job_dir(job) / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise os_error(exc, "open lock", path) from exc
        try:
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    # ---- pins ----------------------------------------------------------------------------

    def pin(self, job: str, step: int) -> None:
        """Protect ``step`` from retention (the step need not exist yet: snapshot(pin=True))."""
        job_dir = self.open_job(job)
        pins = job_dir / "pins"
        created = ensure_dir(pins)
        with self._known_lock:
            known = pins in self._durable_dirs and not created
        if not known:
            # pins/ may be new, or left by a pin() that died before this fsync.
            fsync_dir(job_dir)
            with self._known_lock:
                self._durable_dirs.add(pins)
        durable_write(pins / manifest_name(check_step(step)), [b""], tmp_dir=self.tmp_dir(job))

    def unpin(self, job: str, step: int) -> bool:
        """Remove a pin; False when ``step`` was not pinned."""
        path = self.real_job_dir(job) / "pins" / manifest_name(check_step(step))
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise os_error(exc, "delete", path) from exc
        fsync_dir(path.parent)
        return True

    def pinned_steps(self, job: str) -> set[int]:
        pins = self.job_dir(job) / "pins"
        try:
            names = os.listdir(pins)
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise os_error(exc, "list", pins) from exc
        return {s for s in map(step_from_name, names) if s is not None}

    # ---- job metadata --------------------------------------------------------------------

    def job_info(self, job: str) -> dict[str, Any]:
        """The job's ``job.json`` (owner uid, retention recorded for it); {} when absent."""
        path = self.job_dir(job) / "job.json"
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{path}: damaged ({exc!r}); fix or delete it") from exc
        if not isinstance(doc, dict):
            raise ManifestError(f"{path}: damaged (not a JSON object); fix or delete it")
        return doc

    def update_job_info(self, job: str, **values: Any) -> None:
        """Merge ``values`` into ``job.json`` (durably)."""
        job_dir = self.open_job(job)
        doc = self.job_info(job) | values
        body = json.dumps(doc, sort_keys=True).encode() + b"\n"
        durable_write(job_dir / "job.json", [body], tmp_dir=job_dir / "tmp")

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

    # ---- listing -----------------------------------------------------------------------------

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
        try:
            names = os.listdir(self.job_dir(job) / "manifests")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise os_error(exc, "list", self.job_dir(job) / "manifests") from exc
        return sorted(s for s in map(step_from_name, names) if s is not None)

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
        commits = self._manifest_commits(job)
        verified = sorted((step, c.seq) for step, c in commits.items() if c.seq is not None)
        verified_steps = [step for step, _ in verified]
        keys: dict[int, tuple[int, int]] = {}
        for step, c in commits.items():
            if c.seq is not None:
                keys[step] = (c.seq, step)
                continue
            below = bisect.bisect_left(verified_steps, step)
            estimate = verified[below - 1][1] if below else 0
            keys[step] = (max(estimate, c.claimed or 0), step)
        return sorted(keys, key=keys.__getitem__)

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
            raise NotFoundError(
                f"job {job!r} has no checkpoint at step {step}; steps that exist: "
                f"{_format_steps(steps)}"
            )
        return step

    def read_manifest(self, job: str, step: int) -> Manifest:
        path = self.manifest_path(job, step)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(
                f"job {job!r} has no checkpoint at step {step}; steps that exist: "
                f"{_format_steps(self.steps(job))}"
            ) from None
        except OSError as exc:
            raise os_error(exc, "read", path) from exc
        manifest = parse_manifest(data, where=str(path))
        if manifest.job != job or manifest.step != step:
            raise ManifestError(
                f"{path}: manifest says job {manifest.job!r} step {manifest.step}, "
                f"but its file name says job {job!r} step {step}"
            )
        return manifest

    # ---- objects -----------------------------------------------------------------------------

    def has_object(self, job: str, digest: str) -> bool:
        """Whether a file exists under the object's name (its content is not checked)."""
        return self.object_path(job, digest).is_file()

    def object_header(self, job: str, digest: str) -> tuple[int, int, int, int]:
        """``(codec, elem_size, raw_len, stored_len)`` of an existing object."""
        path = self.object_path(job, digest)
        try:
            with path.open("rb") as f:
                head = f.read(HEADER.size)
                stored = os.fstat(f.fileno()).st_size
        except OSError as exc:
            raise os_error(exc, "read", path) from exc
        codec, elem_size, raw_len = read_header(head, where=str(path))
        return codec, elem_size, raw_len, stored

    def object_state(self, job: str, digest: str) -> ObjectState | None:
        """What this Store knows about object ``digest`` (None: nothing; see ObjectState)."""
        with self._known_lock:
            known = self._known.get((job, digest))
        return None if known is None else known.state

    def reusable_object(self, job: str, digest: str, raw_bytes: int) -> ObjectInfo | None:
        """The job's object ``digest`` if a writer may name it in a manifest, else None.

        None when there is no such file, or when its content does not decode to ``raw_bytes``
        bytes that hash to ``digest`` (damaged, truncated, or written from bytes that changed
        while they were read): the caller writes the object again, replacing the file. The first
        check of a file reads, decodes and hashes it (on per-thread buffers that the calling
        thread keeps for its next check); afterwards, while the file keeps its inode, size and
        mtime, this Store only reads its header. Raises :class:`FormatVersionError` for an object
        of a newer format and a StoreIOError / StorePermissionError when it cannot be read.
        """
        path = self.object_path(job, digest)
        key = (job, digest)
        try:
            with path.open("rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                identity = _identity(st)
                with self._known_lock:
                    known = self._known.get(key)
                if known is not None and known.identity == identity:
                    head = f.read(HEADER.size)
                    data = None
                else:
                    data = _read_all(f, st.st_size, _scratch("file", st.st_size))
                    head = data
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise os_error(exc, "read", path) from exc
        where = f"object {path}"
        try:
            codec, _elem, raw_len = read_header(head, where=where)
            if raw_len != raw_bytes:
                raise CorruptCheckpointError(
                    f"{where}: holds {raw_len} raw bytes, its chunk has {raw_bytes}"
                )
            if data is not None:
                out = memoryview(_scratch("raw", raw_bytes))[:raw_bytes]
                decode(data, out, where=where)
                if content_hash(out) != digest:
                    raise CorruptCheckpointError(f"{where}: its content does not hash to its name")
        except CorruptCheckpointError as exc:
            log.warning("%s; writing it again", exc)
            with self._known_lock:
                if self._known.get(key) is known:
                    self._known.pop(key, None)
            return None
        if data is not None:
            with self._known_lock:
                current = self._known.get(key)
                if current is None or current.identity != identity:
                    self._known[key] = _Known(identity, ObjectState.VERIFIED)
        return ObjectInfo(raw_bytes, st.st_size, CODEC_NAMES[codec])

    def write_object(self, job: str, digest: str, parts: Iterable[Buffer]) -> tuple[int, bool]:
        """Durably write object ``digest`` (its directory fsync is left to :meth:`make_durable`).

        The caller vouches that ``parts`` encode bytes that hash to ``digest`` (the pipeline
        hashes and encodes one private copy), and must not change them until this returns; the
        Store records the file as VERIFIED. Returns ``(stored_bytes, new_shard)``; ``new_shard``
        tells that the ``objects/ab`` directory was created.
        """
        path = self.object_path(job, digest)
        new_shard = ensure_dir(path.parent)
        if new_shard:
            with self._known_lock:
                self._durable_dirs.discard(path.parent)
        size = durable_write(path, parts, tmp_dir=self.tmp_dir(job), sync_dir=False)
        try:
            identity = _identity(path.stat())
        except OSError as exc:
            raise os_error(exc, "stat", path) from exc
        with self._known_lock:
            self._known[job, digest] = _Known(identity, ObjectState.VERIFIED)
        return size, new_shard

    def sync_objects(self, job: str, shards: Iterable[str], objects_dir_changed: bool) -> None:
        """fsync the object shard directories ``shards`` (``"ab"``), and ``objects/`` itself when
        ``objects_dir_changed``. Records nothing: writers call :meth:`make_durable`."""
        base = self.job_dir(job) / "objects"
        for shard in sorted(set(shards)):
            fsync_dir(base / shard)
        if objects_dir_changed:
            fsync_dir(base)

    def make_durable(self, job: str, digests: Iterable[str]) -> None:
        """Make the directory entries of the objects ``digests`` durable; a writer calls this
        with every object its manifest names, after the last object write and before
        :meth:`commit_manifest`.

        fsyncs, once each, every shard directory holding an object that is not DURABLE to this
        Store, and ``objects/`` when one of those shard directories is not known durable in it
        (new, or never fsynced by this Store). An object this Store did not write or make durable
        itself (e.g. one left by a writer killed before its directory fsync) counts as not
        durable. The caller holds the job lock (shared), so none of them is deleted meanwhile.
        """
        with self._known_lock:
            seen = {d: self._known.get((job, d)) for d in set(digests)}
            pending = {
                d: known
                for d, known in seen.items()
                if known is None or known.state is not ObjectState.DURABLE
            }
            shards = sorted({d[:2] for d in pending})
            base = self.job_dir(job) / "objects"
            new_dirs = any(base / shard not in self._durable_dirs for shard in shards)
        self.sync_objects(job, shards, new_dirs)
        with self._known_lock:
            self._durable_dirs.update(base / shard for shard in shards)
            for d, known in pending.items():
                # Only the file that was fsynced: a concurrent rewrite stays VERIFIED.
                if known is not None and self._known.get((job, d)) is known:
                    self._known[job, d] = replace(known, state=ObjectState.DURABLE)

    def forget_objects(self, job: str, digests: Iterable[str]) -> None:
        """Drop what this Store knows about the objects ``digests`` (they are being deleted)."""
        with self._known_lock:
            for d in digests:
                self._known.pop((job, d), None)

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
        source = self.object_path(job, digest)
        job_dir = self.real_job_dir(job)
        quarantine = job_dir / "quarantine"
        with self.job_lock(job, exclusive=True):
            if still_damaged is not None and not still_damaged():
                return None
            created = ensure_dir(quarantine)
            with self._known_lock:
                known = quarantine in self._durable_dirs and not created
            if not known:
                fsync_dir(job_dir)
                with self._known_lock:
                    self._durable_dirs.add(quarantine)
            dest = quarantine / digest
            n = 0
            while os.path.lexists(dest):
                n += 1
                dest = quarantine / f"{digest}.{n}"
            self.forget_objects(job, [digest])
            try:
                source.rename(dest)
            except FileNotFoundError:
                raise NotFoundError(
                    f"job {job!r} has no object {digest} ({source} does not exist): nothing to "
                    "quarantine"
                ) from None
            except OSError as exc:
                raise os_error(exc, "move to quarantine", source) from exc
            fsync_dir(quarantine)
            fsync_dir(source.parent)
        log.warning("%s: moved damaged object %s to %s", job, digest, dest)
        return dest

    def read_object(self, job: str, digest: str, into: bytearray | None = None) -> memoryview:
        """The object file's bytes. With ``into`` (a buffer reused by the caller, grown as
        needed) no memory is allocated per object: fresh memory costs page faults."""
        path = self.object_path(job, digest)
        try:
            with path.open("rb", buffering=0) as f:
                return _read_all(f, os.fstat(f.fileno()).st_size, into)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise CorruptCheckpointError(f"missing object {path}") from exc
            raise os_error(exc, "read", path) from exc

    # ---- commit and delete ---------------------------------------------------------------------

    @contextmanager
    def commit_lock(self, job: str) -> Iterator[int]:
        """Hold the job's commit lock and yield the next commit sequence number: 1 + the highest
        seq among the job's manifests, read under the lock.

        A writer numbers its manifest with it and calls :meth:`commit_manifest` before leaving
        the block, so seq grows strictly in commit order across every thread and process
        committing the job (two daemons on one root, an in-process save). The lock is its own
        file (``commit.lock``), not the job lock that writers hold shared for the whole write and
        GC exclusive: only the numbering and the manifest's rename are serialized, never the
        object writes of concurrent checkpoints.
        """
        if any(held_job == job for held_job, _ in self._held_commit_locks()):
            # flock on a second descriptor of the same file would wait for this thread forever.
            raise RuntimeError(f"this thread already holds the commit lock of job {job!r}")
        with self._flock(job, "commit.lock", fcntl.LOCK_EX):
            # A damaged manifest's claimed seq counts too: never reuse a number a commit may hold.
            top = max(
                (
                    c.seq if c.seq is not None else c.claimed or 0
                    for c in self._manifest_commits(job).values()
                ),
                default=0,
            )
            held: list[tuple[str, int]] = self._held_commit_locks()
            held.append((job, top + 1))
            try:
                yield top + 1
            finally:
                held.pop()

    def _held_commit_locks(self) -> list[tuple[str, int]]:
        """``(job, seq)`` of the commit locks the calling thread holds in this Store."""
        held: list[tuple[str, int]] | None = getattr(self._thread, "commit_locks", None)
        if held is None:
            held = self._thread.commit_locks = []
        return held

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
        if (manifest.job, manifest.seq) not in self._held_commit_locks():
            raise ValueError(
                f"job {manifest.job!r} step {manifest.step}: seq {manifest.seq} is not the number "
                "Store.commit_lock yielded to this thread; commit inside that block, or pass "
                "seq 0 to have the manifest numbered here"
            )
        path = self.manifest_path(manifest.job, manifest.step)
        replaced = os.path.lexists(path)
        durable_write(path, [manifest.to_json()], tmp_dir=self.tmp_dir(manifest.job))
        if replaced:
            log.info(
                "%s: step %d committed again (seq %d); it replaced an earlier commit of that step",
                manifest.job,
                manifest.step,
                manifest.seq,
            )
        return path

    def _manifest_commits(self, job: str) -> dict[int, _Commit]:
        """Per step, the commit sequence number of the job's manifest (see :class:`_Commit`).

        Each manifest is read once (its checksum verified, see :func:`commit_seq`); a file is
        read again when its inode, size or mtime change, or while it is younger than
        :data:`_RACY_NS`. A scan of unchanged files costs one ``fstatat`` per manifest.
        """
        directory = self.job_dir(job) / "manifests"
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise os_error(exc, "list", directory) from exc
        with self._known_lock:
            cached = self._commits.get(job, {})
        now = time.time_ns()
        out: dict[int, _Commit] = {}
        keep: dict[str, tuple[int, tuple[int, int, int], _Commit]] = {}
        try:
            for entry in os.scandir(dir_fd):
                name = entry.name
                try:
                    hit = cached.get(name)
                    if hit is not None and hit[1] == _identity(entry.stat()):
                        out[hit[0]] = hit[2]
                        keep[name] = hit
                        continue
                    step = step_from_name(name)
                    if step is None:
                        continue
                    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
                    with os.fdopen(fd, "rb") as f:
                        st = os.fstat(fd)  # the identity of the bytes read
                        data = f.read()
                except FileNotFoundError:
                    continue  # deleted since the listing
                except OSError as exc:
                    raise os_error(exc, "read", directory / name) from exc
                where = str(directory / name)
                try:
                    found, seq = commit_seq(data, where=where)
                    commit = _Commit(seq) if found == step else _Commit(None, claimed_seq(data))
                except (ManifestError, FormatVersionError):
                    commit = _Commit(None, claimed_seq(data))
                out[step] = commit
                racy = _RACY_COARSE_NS if st.st_mtime_ns % 10**9 == 0 else _RACY_NS
                if now - st.st_mtime_ns > racy:
                    keep[name] = (step, _identity(st), commit)
        except OSError as exc:
            raise os_error(exc, "list", directory) from exc
        finally:
            os.close(dir_fd)
        with self._known_lock:
            self._commits[job] = keep
        return out

    def delete_checkpoint(self, job: str, step: int) -> None:
        """Remove a checkpoint's manifest (atomically, durably); objects stay until :meth:`gc`."""
        path = self.real_job_dir(job) / "manifests" / manifest_name(check_step(step))
        try:
            path.unlink()
        except FileNotFoundError:
            raise NotFoundError(
                f"job {job!r} has no checkpoint at step {step}; steps that exist: "
                f"{_format_steps(self.steps(job))}"
            ) from None
        except OSError as exc:
            raise os_error(exc, "delete", path) from exc
        fsync_dir(path.parent)

    def referenced_objects(self, job: str) -> set[str]:
        """Every object named by a manifest of ``job``. Unreadable manifests raise."""
        refs: set[str] = set()
        for step in self.steps(job):
            refs.update(self.read_manifest(job, step).objects)
        return refs

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
        base = self.real_job_dir(job) / "objects"
        now = time.time()
        count = size = 0
        touched: set[Path] = set()
        deleted: list[str] = []
        try:
            for shard in sorted(base.glob("??")):
                for obj in sorted(shard.iterdir()):
                    if obj.name in refs:
                        continue
                    try:
                        st = obj.stat()
                    except FileNotFoundError:
                        continue
                    if now - st.st_mtime < min_age_s:
                        continue
                    count += 1
                    size += st.st_size
                    if not dry_run:
                        deleted.append(obj.name)
                        try:
                            obj.unlink()
                        except FileNotFoundError:
                            continue
                        except OSError as exc:
                            raise os_error(exc, "delete", obj) from exc
                        touched.add(shard)
        finally:
            self.forget_objects(job, deleted)
        for shard in touched:
            fsync_dir(shard)
        # Metadata writes (job.json, pins) do not take the job lock: spare fresh tmp files.
        tmp_files = self.sweep_tmp(job, dry_run=dry_run, min_age_s=max(min_age_s, TMP_GRACE_S))
        return GcResult(count, size, tmp_files)

    def sweep_tmp(self, job: str, *, dry_run: bool = False, min_age_s: float = 0.0) -> int:
        """Remove leftovers in the job's tmp directory; return how many there were.

        A file whose writer (pid@host in its name) is a live process on this host, or is on
        another host, is spared until it is :data:`STALE_TMP_S` old; so is anything younger than
        ``min_age_s``. Files of dead writers and unrecognised files go.
        """
        tmp = self.real_job_dir(job) / "tmp"
        if not tmp.is_dir() or tmp.is_symlink():
            return 0
        now = time.time()
        count = 0
        for entry in tmp.iterdir():
            try:
                age = now - entry.lstat().st_mtime
                if age < min_age_s:
                    continue
                writer = tmp_writer(entry.name)
                if writer is not None and age < STALE_TMP_S and writer_alive(*writer):
                    continue
                count += 1
                if dry_run:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise os_error(exc, "delete", entry) from exc
        return count


def _format_steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) > 12:
        head = ", ".join(map(str, steps[:5]))
        tail = ", ".join(map(str, steps[-5:]))
        return f"{head}, ... ({len(steps) - 10} more) ..., {tail}"
    return ", ".join(map(str, steps))
