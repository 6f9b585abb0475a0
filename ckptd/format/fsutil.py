"""Filesystem primitives of the store: the one durable-write helper and its tmp files, directory
durability, file locks, and the mapping of OS errors to ckptd errors.

Every file ckptd makes visible goes through :func:`durable_write`: write to a fresh file in a tmp
directory on the same filesystem, fsync it, ``os.replace`` it onto its name, and (unless the caller
batches it) fsync the destination directory so the rename itself survives a power cut. On any error
the tmp file is removed and nothing appears under the destination name.

An fsync that fails is never retried on the same data: after a failed fsync the kernel may have
dropped the dirty pages, so a second fsync can "succeed" without the data being on disk. The whole
write fails and the caller starts again from its own copy.

A tmp file's name says who writes it (:data:`WRITER_TAG`, pid@host); :func:`sweep_tmp_dir` removes
the ones whose writer is gone. :class:`DurableDirs` records which directories a Store has made
durable in their parent, so each parent is fsynced once for them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ckptd.errors import CkptdError, DiskFullError, StoreIOError, StorePermissionError

Buffer = bytes | bytearray | memoryview

WRITER_TAG = f"w{os.getpid()}@{socket.gethostname().replace('.', '_')[:64]}"
"""Part of every tmp file name: who writes it (pid@host), so a sweep spares live writers."""
STALE_TMP_S = 3600.0
"""A tmp file this old is a dead writer's leftover, whoever its writer is (swept when a writer
opens the job)."""


def tmp_writer(name: str) -> tuple[int, str] | None:
    """``(pid, host)`` of the writer of a tmp file named by :func:`durable_write`, else None."""
    for part in name.split("."):
        if part.startswith("w") and "@" in part:
            pid, _, host = part[1:].partition("@")
            if pid.isascii() and pid.isdigit():
                return int(pid), host
    return None


def writer_alive(pid: int, host: str) -> bool:
    """True when ``pid`` on ``host`` may still be writing (other hosts: assume so)."""
    if host != WRITER_TAG.partition("@")[2]:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_tmp_dir(tmp: Path, *, dry_run: bool = False, min_age_s: float = 0.0) -> int:
    """Remove leftovers in the tmp directory ``tmp``; return how many there were.

    A file whose writer (pid@host in its name) is a live process on this host, or is on another
    host, is spared until it is :data:`STALE_TMP_S` old; so is anything younger than
    ``min_age_s``. Files of dead writers and unrecognised files go. Never follows a symlink.
    """
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


def os_error(exc: OSError, action: str, path: Path | str) -> CkptdError:
    """Translate ``exc`` raised while doing ``action`` on ``path`` into the matching ckptd error."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"cannot {action} {path}: {reason}; free space on that filesystem (ckptd rm / gc, "
            "or a retention policy) or move the root"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorePermissionError(
            f"cannot {action} {path}: {reason} (running as uid {os.getuid()}); fix the "
            "directory's owner or mode, or choose another root with --root / CKPTD_ROOT"
        )
    return StoreIOError(f"cannot {action} {path}: {reason} (errno {exc.errno})")


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise os_error(exc, "open directory", path) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise os_error(exc, "fsync directory", path) from exc
    finally:
        os.close(fd)


def _write_all(fd: int, parts: Iterable[Buffer]) -> None:
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            written = os.write(fd, view)
            view = view[written:]


def durable_write(
    dest: Path,
    parts: Iterable[Buffer],
    *,
    tmp_dir: Path,
    sync_dir: bool = True,
    mode: int = 0o644,
    exclusive: bool = False,
) -> int:
    """Atomically and durably write the concatenation of ``parts`` to ``dest``; return its size.

    ``tmp_dir`` must be on the same filesystem as ``dest``. With ``sync_dir=False`` the caller
    promises to :func:`fsync_dir` ``dest.parent`` before relying on the file (batching many
    object writes into one directory fsync). With ``exclusive=True`` the file is created only if
    ``dest`` does not exist (``link``, atomic also on NFS), else :class:`FileExistsError` is raised
    and nothing changes.
    """
    tmp = tmp_dir / f"{dest.name}.{WRITER_TAG}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise os_error(exc, "create", tmp) from exc
    step = "write"
    try:
        try:
            _write_all(fd, parts)
            step = "fsync"
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if exclusive:
            step = "link into place"
            os.link(tmp, dest)
            tmp.unlink()
        else:
            step = "rename into place"
            os.replace(tmp, dest)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, FileExistsError) and exclusive:
            raise
        if isinstance(exc, OSError):
            raise os_error(exc, step, dest) from exc
        raise
    if sync_dir:
        try:
            fsync_dir(dest.parent)
        except BaseException:
            # The rename may not be durable: take the file back so a failed write never
            # leaves it visible (a manifest reported failed must not appear).
            dest.unlink(missing_ok=True)
            raise
    return size


def ensure_dir(path: Path) -> bool:
    """Create ``path`` (and parents) if missing; return True when something was created."""
    if path.is_dir():
        return False
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, "create directory", path) from exc
    return True


class DurableDirs:
    """Directories whose entry in their parent its owner, a Store, has made durable (it fsynced
    the parent), so that it does so once per directory.

    A directory that exists is not necessarily durable: a writer killed between its ``mkdir`` and
    the parent's fsync leaves one behind. Thread safety: any thread may call any method.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirs: set[Path] = set()

    def __contains__(self, path: Path) -> bool:
        with self._lock:
            return path in self._dirs

    def add(self, paths: Iterable[Path]) -> None:
        with self._lock:
            self._dirs.update(paths)

    def discard(self, path: Path) -> None:
        """Forget ``path`` (it was just created again: its new entry is not durable)."""
        with self._lock:
            self._dirs.discard(path)

    def mkdir(self, path: Path) -> bool:
        """Create the directory ``path`` if it is missing. True when its entry in its parent is
        not known durable (it is new, or was left by a writer that died before the parent's
        fsync): the caller then fsyncs the parent and records it (:meth:`add`)."""
        created = ensure_dir(path)
        return created or path not in self


def file_identity(st: os.stat_result) -> tuple[int, int, int]:
    """``(inode, size, mtime_ns)``: a file replaced under its name, or rewritten, gets another
    one (except within one timestamp tick: see the callers)."""
    return st.st_ino, st.st_size, st.st_mtime_ns


@contextmanager
def flock(path: Path, flags: int) -> Iterator[bool]:
    """``flock`` the lock file ``path`` (created if missing, never through a symlink) for the
    duration of the block. Yields False when ``LOCK_NB`` is in ``flags`` and someone else holds
    it."""
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
