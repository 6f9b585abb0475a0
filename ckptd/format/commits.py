"""A job's committed checkpoints: its manifests, their commit order, and the commit itself.

A checkpoint exists iff its manifest ``<job>/manifests/step-<12 digits>.json`` exists; it is
written last, after every object it names is durable (:mod:`ckptd.format.objects`). Each manifest
carries the job's commit sequence number ``seq``, which orders checkpoints by commit ("latest" is
the checkpoint committed last, whatever its step). A writer takes the job's commit lock
(:meth:`Commits.lock`), which yields 1 + the highest seq among the job's manifests, numbers its
manifest with it and commits it inside the block (:meth:`Commits.commit`), so seq grows strictly in
commit order across every thread and process committing the job. The lock is its own file
(``commit.lock``), not the job lock that writers hold shared for the whole write and GC exclusive:
only the numbering and the manifest's rename are serialized, never the object writes of concurrent
checkpoints.

Thread safety: Commits' methods may be called from any thread. Its mutable state is what it has
read of each manifest file (step, identity and seq: read once, then only stat()ed), guarded by one
lock, and, per thread, the commit locks that thread holds.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ckptd.errors import FormatVersionError, ManifestError, NotFoundError
from ckptd.format.fsutil import durable_write, file_identity, flock, fsync_dir, os_error
from ckptd.format.layout import JobDir
from ckptd.format.manifest import (
    Manifest,
    claimed_seq,
    commit_seq,
    parse_manifest,
    step_from_name,
)

log = logging.getLogger("ckptd.format.commits")

_RACY_NS = 10**8
"""A manifest modified less than this long ago is read again at every scan: a file replacing it
within the same timestamp tick (Linux stamps files with a clock of 1-10 ms resolution) could reuse
its inode number and size and look unchanged. Once a file is older, any replacement has a later
mtime. :data:`_RACY_COARSE_NS` applies to whole-second mtimes (filesystems that store seconds)."""
_RACY_COARSE_NS = 3 * 10**9


_GLOBAL_HEAD = b'{\n "format": "ckptd.manifest",\n "version": 2,'


@dataclass(frozen=True)
class _Commit:
    """The commit sequence number of one manifest file, as far as it can be known.

    ``seq``: verified by the manifest's checksum (0: written before seq existed); None when the
    manifest is damaged or unreadable as a manifest. ``claimed``: what the seq line of a damaged
    manifest says (unverified; None if there is none).
    """

    seq: int | None
    claimed: int | None = None
    ranks: bool = False
    """The manifest is the global record of a multi-rank step (format version 2)."""


def missing_step(job: str, step: int, steps: list[int]) -> NotFoundError:
    """The error for a step that ``job`` has no checkpoint at; ``steps`` are the ones it has."""
    return NotFoundError(
        f"job {job!r} has no checkpoint at step {step}; steps that exist: {_format_steps(steps)}"
    )


def _format_steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) > 12:
        head = ", ".join(map(str, steps[:5]))
        tail = ", ".join(map(str, steps[-5:]))
        return f"{head}, ... ({len(steps) - 10} more) ..., {tail}"
    return ", ".join(map(str, steps))


class Commits:
    """The manifests of one Store's jobs: listing, reading, commit order and the commit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread = threading.local()
        self._seen: dict[str, dict[str, tuple[int, tuple[int, int, int], _Commit]]] = {}
        """Per job, per manifest file name: its step, identity and commit sequence number, kept
        for files old enough (:data:`_RACY_NS`; manifest files are replaced, never modified)."""

    def steps(self, job: JobDir) -> list[int]:
        """The committed steps of ``job``, ascending. Empty if the job does not exist."""
        try:
            names = os.listdir(job.manifests)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise os_error(exc, "list", job.manifests) from exc
        return sorted(s for s in map(step_from_name, names) if s is not None)

    def read(self, job: JobDir, step: int) -> Manifest:
        path = job.manifest(step)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise missing_step(job.name, step, self.steps(job)) from None
        except OSError as exc:
            raise os_error(exc, "read", path) from exc
        manifest = parse_manifest(data, where=str(path))
        if manifest.job != job.name or manifest.step != step:
            raise ManifestError(
                f"{path}: manifest says job {manifest.job!r} step {manifest.step}, "
                f"but its file name says job {job.name!r} step {step}"
            )
        return manifest

    def referenced_objects(self, job: JobDir) -> set[str]:
        """Every object named by a manifest of ``job``. Unreadable manifests raise."""
        refs: set[str] = set()
        for step in self.steps(job):
            refs.update(self.read(job, step).objects)
        return refs

    def kinds(self, job: JobDir) -> set[str]:
        """``"ranks"`` if the job holds the global record of a multi-rank step, ``"single"`` if
        it holds a single-process checkpoint (both, one or none; damaged manifests count as
        neither)."""
        return {
            "ranks" if c.ranks else "single"
            for c in self._commits(job).values()
            if c.seq is not None
        }

    def order(self, job: JobDir) -> list[int]:
        """The committed steps of ``job`` in commit order, oldest first; see
        :meth:`Store.steps_by_commit`."""
        commits = self._commits(job)
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

    @contextmanager
    def lock(self, job: JobDir) -> Iterator[int]:
        """Hold the job's commit lock and yield the next commit sequence number: 1 + the highest
        seq among the job's manifests, read under the lock. ``job`` is not a symlink."""
        if any(held_job == job.name for held_job, _ in self._held()):
            # flock on a second descriptor of the same file would wait for this thread forever.
            raise RuntimeError(f"this thread already holds the commit lock of job {job.name!r}")
        with flock(job.commit_lock, fcntl.LOCK_EX):
            # A damaged manifest's claimed seq counts too: never reuse a number a commit may hold.
            top = max(
                (
                    c.seq if c.seq is not None else c.claimed or 0
                    for c in self._commits(job).values()
                ),
                default=0,
            )
            held = self._held()
            held.append((job.name, top + 1))
            try:
                yield top + 1
            finally:
                held.pop()

    def commit(self, job: JobDir, manifest: Manifest, *, exclusive: bool = False) -> Path:
        """Write ``manifest``, numbered with the seq :meth:`lock` yielded to this thread, under
        its name (durably: tmp, fsync, rename, fsync the directory); a manifest of a step that
        exists is replaced, unless ``exclusive``: then :class:`FileExistsError` is raised and
        nothing changes. Returns its path."""
        if (manifest.job, manifest.seq) not in self._held():
            raise ValueError(
                f"job {manifest.job!r} step {manifest.step}: seq {manifest.seq} is not the number "
                "Store.commit_lock yielded to this thread; commit inside that block, or pass "
                "seq 0 to have the manifest numbered here"
            )
        path = job.manifest(manifest.step)
        replaced = os.path.lexists(path)
        durable_write(path, [manifest.to_json()], tmp_dir=job.tmp, exclusive=exclusive)
        if replaced:
            log.info(
                "%s: step %d committed again (seq %d); it replaced an earlier commit of that step",
                manifest.job,
                manifest.step,
                manifest.seq,
            )
        return path

    def delete(self, job: JobDir, step: int) -> None:
        """Remove the manifest of ``step`` (atomically, durably). ``job`` is not a symlink."""
        path = job.manifest(step)
        try:
            path.unlink()
        except FileNotFoundError:
            raise missing_step(job.name, step, self.steps(job)) from None
        except OSError as exc:
            raise os_error(exc, "delete", path) from exc
        fsync_dir(path.parent)

    def _held(self) -> list[tuple[str, int]]:
        """``(job, seq)`` of the commit locks the calling thread holds."""
        held: list[tuple[str, int]] | None = getattr(self._thread, "commit_locks", None)
        if held is None:
            held = self._thread.commit_locks = []
        return held

    def _commits(self, job: JobDir) -> dict[int, _Commit]:
        """Per step, the commit sequence number of the job's manifest (see :class:`_Commit`).

        Each manifest is read once (its checksum verified, see :func:`commit_seq`); a file is
        read again when its inode, size or mtime change, or while it is younger than
        :data:`_RACY_NS`. A scan of unchanged files costs one ``fstatat`` per manifest.
        """
        directory = job.manifests
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise os_error(exc, "list", directory) from exc
        with self._lock:
            cached = self._seen.get(job.name, {})
        now = time.time_ns()
        out: dict[int, _Commit] = {}
        keep: dict[str, tuple[int, tuple[int, int, int], _Commit]] = {}
        try:
            for entry in os.scandir(dir_fd):
                name = entry.name
                try:
                    hit = cached.get(name)
                    if hit is not None and hit[1] == file_identity(entry.stat()):
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
                    ranks = data.startswith(_GLOBAL_HEAD)
                    commit = (
                        _Commit(seq, ranks=ranks)
                        if found == step
                        else _Commit(None, claimed_seq(data))
                    )
                except (ManifestError, FormatVersionError):
                    commit = _Commit(None, claimed_seq(data))
                out[step] = commit
                racy = _RACY_COARSE_NS if st.st_mtime_ns % 10**9 == 0 else _RACY_NS
                if now - st.st_mtime_ns > racy:
                    keep[name] = (step, file_identity(st), commit)
        except OSError as exc:
            raise os_error(exc, "list", directory) from exc
        finally:
            os.close(dir_fd)
        with self._lock:
            self._seen[job.name] = keep
        return out
