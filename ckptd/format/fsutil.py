"""The one durable-write helper, and the mapping of OS errors to ckptd errors.

Every file ckptd makes visible goes through :func:`durable_write`: write to a fresh file in a tmp
directory on the same filesystem, fsync it, ``os.replace`` it onto its name, and (unless the caller
batches it) fsync the destination directory so the rename itself survives a power cut. On any error
the tmp file is removed and nothing appears under the destination name.

An fsync that fails is never retried on the same data: after a failed fsync the kernel may have
dropped the dirty pages, so a second fsync can "succeed" without the data being on disk. The whole
write fails and the caller starts again from its own copy.
"""

from __future__ import annotations

import errno
import os
import socket
import uuid
from collections.abc import Iterable
from pathlib import Path

from ckptd.errors import CkptdError, DiskFullError, StoreIOError, StorePermissionError

Buffer = bytes | bytearray | memoryview

WRITER_TAG = f"w{os.getpid()}@{socket.gethostname().replace('.', '_')[:64]}"
"""Part of every tmp file name: who writes it (pid@host), so a sweep spares live writers."""


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
    dest: Path, parts: Iterable[Buffer], *, tmp_dir: Path, sync_dir: bool = True, mode: int = 0o644
) -> int:
    """Atomically and durably write the concatenation of ``parts`` to ``dest``; return its size.

    ``tmp_dir`` must be on the same filesystem as ``dest``. With ``sync_dir=False`` the caller
    promises to :func:`fsync_dir` ``dest.parent`` before relying on the file (batching many
    object writes into one directory fsync).
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
        step = "rename into place"
        os.replace(tmp, dest)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
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
