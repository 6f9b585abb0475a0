"""Object files: a job's immutable, content-addressed chunks, and what one Store knows about them.

An object is named by the BLAKE3 hash of its raw bytes and lives at ``<job>/objects/ab/<hex>``
(:mod:`ckptd.format.layout`), as :mod:`ckptd.format.codec` encodes it. A visible manifest only
names objects that are intact and durable, so a writer (1) writes every new object
(:meth:`ObjectFiles.write`: fsynced and renamed, its directory's fsync left for later) and reuses
an existing one only once its content has been verified (:meth:`ObjectFiles.reusable`), then (2)
before its manifest commits, fsyncs the directory of every object the manifest names that is not
known durable (:meth:`ObjectFiles.make_durable`). GC deletes the objects no manifest names
(:meth:`ObjectFiles.collect`); an object found damaged is moved aside to ``<job>/quarantine/``
(:meth:`ObjectFiles.quarantine`).

Thread safety: ObjectFiles' methods may be called from any thread, and object writes may race
freely (same name => same bytes). Its mutable state, what it knows about each object file it wrote
or checked (:class:`ObjectState`), is guarded by one lock and changed only by its own methods.
Deleting or moving an object needs the job lock held exclusively, which the caller (the Store)
takes: writers hold it shared from their first object to their manifest, so no write in progress
has deduped against an object that goes.
"""

from __future__ import annotations

import enum
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ckptd.errors import CorruptCheckpointError, NotFoundError
from ckptd.format.codec import CODEC_NAMES, HEADER, RAW, decode, decode_into, read_header
from ckptd.format.fsutil import (
    Buffer,
    DurableDirs,
    durable_write,
    ensure_dir,
    file_identity,
    fsync_dir,
    os_error,
)
from ckptd.format.hashing import content_hash
from ckptd.format.layout import JobDir
from ckptd.format.manifest import ObjectInfo

log = logging.getLogger("ckptd.format.objects")


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


def read_object(path: Path, into: bytearray | None = None) -> memoryview:
    """The bytes of the object file ``path``, in ``into`` (grown as needed) if given."""
    try:
        with path.open("rb", buffering=0) as f:
            return _read_all(f, os.fstat(f.fileno()).st_size, into)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise CorruptCheckpointError(f"missing object {path}") from exc
        raise os_error(exc, "read", path) from exc


def _readinto_all(f: io.FileIO, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def decode_object_file(
    path: Path,
    pieces: Sequence[memoryview],
    *,
    stored_bytes: int,
    where: str,
    scratch: Callable[[int], bytearray],
) -> None:
    """Decode the object file ``path`` into ``pieces`` (as :func:`ckptd.format.codec.decode_into`).

    A raw object is read straight into the pieces (no copy through memory of its own); an encoded
    one is read into ``scratch(size)``, a buffer the caller reuses across objects. Raises
    :class:`CorruptCheckpointError` when the file is missing, is not ``stored_bytes`` long, or does
    not decode (with the messages of :func:`read_object` and ``decode_into``, naming ``where``
    where they name the object), and a StoreIOError / StorePermissionError when it cannot be read.
    The caller still verifies the hash.
    """
    try:
        with path.open("rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != stored_bytes:
                kind = "truncated object" if size < stored_bytes else "object too long"
                raise CorruptCheckpointError(
                    f"{where}: {kind} ({size} bytes on disk, the manifest says {stored_bytes})"
                )
            head = bytearray(min(size, HEADER.size))
            got = _readinto_all(f, memoryview(head))
            if got == HEADER.size:
                codec, _elem_size, raw_len = read_header(memoryview(head), where=where)
                if (
                    codec == RAW
                    and raw_len == sum(len(p) for p in pieces)
                    and size == HEADER.size + raw_len
                ):
                    for piece in pieces:
                        n = _readinto_all(f, piece)
                        got += n
                        if n != len(piece):
                            raise CorruptCheckpointError(
                                f"{where}: truncated object ({got} bytes read, the manifest "
                                f"says {stored_bytes})"
                            )
                    return
            buf = scratch(size)
            buf[:got] = head[:got]
            if got == len(head):
                got += _readinto_all(f, memoryview(buf)[got:size])
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"missing object {path}") from exc
    except OSError as exc:
        raise os_error(exc, "read", path) from exc
    decode_into(memoryview(buf)[:got], pieces, where=where)


def advise_willneed(path: Path) -> None:
    """Ask the kernel to start reading ``path`` into the page cache (and return at once), so a
    later read finds it there; best effort: a file that cannot be opened is left alone."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_object_header(path: Path) -> tuple[int, int, int, int]:
    """``(codec, elem_size, raw_len, stored_len)`` of the object file ``path``."""
    try:
        with path.open("rb") as f:
            head = f.read(HEADER.size)
            stored = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise os_error(exc, "read", path) from exc
    codec, elem_size, raw_len = read_header(head, where=str(path))
    return codec, elem_size, raw_len, stored


class ObjectFiles:
    """The object files of one Store's jobs and what that Store knows about them: a long-lived
    Store (the daemon keeps one per root) checks each reused object once; a new one trusts
    nothing it has not checked itself. ``dirs`` is the Store's record of durable directories."""

    def __init__(self, dirs: DurableDirs) -> None:
        self._dirs = dirs
        self._lock = threading.Lock()
        self._known: dict[tuple[str, str], _Known] = {}

    def state(self, job: JobDir, digest: str) -> ObjectState | None:
        with self._lock:
            known = self._known.get((job.name, digest))
        return None if known is None else known.state

    def reusable(self, job: JobDir, digest: str, raw_bytes: int) -> ObjectInfo | None:
        """The job's object ``digest`` if a writer may name it in a manifest, else None.

        None when there is no such file, or when its content does not decode to ``raw_bytes``
        bytes that hash to ``digest`` (damaged, truncated, or written from bytes that changed
        while they were read): the caller writes the object again, replacing the file. The first
        check of a file reads, decodes and hashes it (on per-thread buffers that the calling
        thread keeps for its next check); afterwards, while the file keeps its inode, size and
        mtime, only its header is read. Raises :class:`FormatVersionError` for an object of a
        newer format and a StoreIOError / StorePermissionError when it cannot be read.
        """
        path = job.object(digest)
        key = (job.name, digest)
        try:
            with path.open("rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                identity = file_identity(st)
                with self._lock:
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
            with self._lock:
                if self._known.get(key) is known:
                    self._known.pop(key, None)
            return None
        if data is not None:
            with self._lock:
                current = self._known.get(key)
                if current is None or current.identity != identity:
                    self._known[key] = _Known(identity, ObjectState.VERIFIED)
        return ObjectInfo(raw_bytes, st.st_size, CODEC_NAMES[codec])

    def write(self, job: JobDir, digest: str, parts: Iterable[Buffer]) -> tuple[int, bool]:
        """Durably write object ``digest`` from ``parts`` (see :meth:`Store.write_object`) and
        record it VERIFIED."""
        path = job.object(digest)
        new_shard = ensure_dir(path.parent)
        if new_shard:
            self._dirs.discard(path.parent)
        size = durable_write(path, parts, tmp_dir=job.tmp, sync_dir=False)
        try:
            identity = file_identity(path.stat())
        except OSError as exc:
            raise os_error(exc, "stat", path) from exc
        with self._lock:
            self._known[job.name, digest] = _Known(identity, ObjectState.VERIFIED)
        return size, new_shard

    def make_durable(self, job: JobDir, digests: Iterable[str]) -> None:
        """fsync, once each, every shard directory holding one of the objects ``digests`` that
        is not DURABLE, and ``objects/`` when one of those shard directories is not known durable
        in it (new, or never fsynced by this Store); then record them DURABLE. An object this
        Store did not write or make durable itself (e.g. one left by a writer killed before its
        directory fsync) counts as not durable. The caller holds the job lock (shared), so none
        of them is deleted meanwhile."""
        with self._lock:
            seen = {d: self._known.get((job.name, d)) for d in set(digests)}
        pending = {
            d: known
            for d, known in seen.items()
            if known is None or known.state is not ObjectState.DURABLE
        }
        shards = [job.objects / shard for shard in sorted({d[:2] for d in pending})]
        new_dirs = any(shard not in self._dirs for shard in shards)
        for shard in shards:
            fsync_dir(shard)
        if new_dirs:
            fsync_dir(job.objects)
        self._dirs.add(shards)
        with self._lock:
            for d, known in pending.items():
                # Only the file that was fsynced: a concurrent rewrite stays VERIFIED.
                if known is not None and self._known.get((job.name, d)) is known:
                    self._known[job.name, d] = replace(known, state=ObjectState.DURABLE)

    def forget(self, job: JobDir, digests: Iterable[str]) -> None:
        """Drop what is known about the objects ``digests`` (they are being deleted or moved)."""
        with self._lock:
            for d in digests:
                self._known.pop((job.name, d), None)

    def quarantine(self, job: JobDir, digest: str) -> Path:
        """Move the object ``digest`` to ``<job>/quarantine/`` (``<digest>.1``, ``.2``, ... when
        that name is taken there already), durably, and return its new path. The caller holds
        the job lock exclusively. Raises :class:`NotFoundError` when there is no such object."""
        source = job.object(digest)
        if self._dirs.mkdir(job.quarantine):
            fsync_dir(job.path)
            self._dirs.add([job.quarantine])
        dest = job.quarantine / digest
        n = 0
        while os.path.lexists(dest):
            n += 1
            dest = job.quarantine / f"{digest}.{n}"
        self.forget(job, [digest])
        try:
            source.rename(dest)
        except FileNotFoundError:
            raise NotFoundError(
                f"job {job.name!r} has no object {digest} ({source} does not exist): nothing to "
                "quarantine"
            ) from None
        except OSError as exc:
            raise os_error(exc, "move to quarantine", source) from exc
        fsync_dir(job.quarantine)
        fsync_dir(source.parent)
        return dest

    def collect(
        self, job: JobDir, referenced: set[str], *, dry_run: bool, min_age_s: float
    ) -> tuple[int, int]:
        """Delete the job's objects not in ``referenced`` and not modified within ``min_age_s``
        (none with ``dry_run``), durably; return how many and their stored bytes. The caller
        holds the job lock exclusively."""
        now = time.time()
        count = size = 0
        touched: set[Path] = set()
        deleted: list[str] = []
        try:
            for shard in sorted(job.objects.glob("??")):
                for obj in sorted(shard.iterdir()):
                    if obj.name in referenced:
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
            self.forget(job, deleted)
        for shard in touched:
            fsync_dir(shard)
        return count, size
