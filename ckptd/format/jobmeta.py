"""A job's small metadata files: pins (steps retention must keep), upload marks (checkpoints the
object-store tier does not hold yet) and ``job.json``.

A pin is an empty file ``<job>/pins/step-<12 digits>.json``; it may name a step that has no
checkpoint yet (``snapshot(pin=True)`` pins before the commit). ``job.json`` is a JSON object: the
job's owner uid and what the daemon recorded for it (retention). Both are written durably
(:func:`~ckptd.format.fsutil.durable_write`) and without the job lock, which is why GC spares fresh
tmp files. The job's directories exist before anything here writes (``Store.open_job``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.errors import ManifestError
from ckptd.format.fsutil import DurableDirs, durable_write, fsync_dir, os_error
from ckptd.format.layout import JobDir
from ckptd.format.manifest import STEP_DIGITS, check_attempt, check_step, step_from_name


def _create_flag(path: Path, job: JobDir, dirs: DurableDirs) -> None:
    """Create the empty file ``path`` durably, and its directory (in the job directory) durably
    if this Store (``dirs``) has not."""
    if dirs.mkdir(path.parent):
        # The directory may be new, or left by a writer that died before this fsync.
        fsync_dir(job.path)
        dirs.add([path.parent])
    durable_write(path, [b""], tmp_dir=job.tmp)


def _remove_flag(path: Path) -> bool:
    """Remove ``path``, durably; False when there was none."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise os_error(exc, "delete", path) from exc
    fsync_dir(path.parent)
    return True


def _names(directory: Path) -> list[str]:
    """The names in ``directory``; none when it does not exist."""
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise os_error(exc, "list", directory) from exc


def pin_step(job: JobDir, step: int, dirs: DurableDirs) -> None:
    """Create the pin of ``step``, and ``pins/`` durably if this Store (``dirs``) has not."""
    _create_flag(job.pin(step), job, dirs)


def unpin_step(job: JobDir, step: int) -> bool:
    """Remove the pin of ``step``, durably; False when there was none."""
    return _remove_flag(job.pin(step))


def pinned_steps(job: JobDir) -> set[int]:
    return {s for s in map(step_from_name, _names(job.pins)) if s is not None}


@dataclass(frozen=True)
class Upload:
    """A checkpoint the tier does not hold yet: a step (``rank`` None), or one rank's part of a
    multi-rank step written by ``attempt``. Its mark, ``uploads/<name>``, is created durably
    before the local commit and removed once the tier holds it: the upload queue survives a
    crash, and retention keeps the step meanwhile."""

    step: int
    rank: int | None = None
    attempt: str | None = None

    @property
    def name(self) -> str:
        base = f"step-{check_step(self.step):0{STEP_DIGITS}d}"
        if self.rank is None:
            return base + ".json"
        return f"{base}.rank-{self.rank:05d}.{check_attempt(self.attempt)}.json"

    def __str__(self) -> str:
        if self.rank is None:
            return f"step {self.step}"
        return f"step {self.step} rank {self.rank} (attempt {self.attempt})"


def upload_from_name(name: str) -> Upload | None:
    """Inverse of :attr:`Upload.name`; None for any other file name."""
    step = step_from_name(name[: 5 + STEP_DIGITS] + ".json")
    if step is None or not name.endswith(".json"):
        return None
    rest = name[5 + STEP_DIGITS : -len(".json")]
    if not rest:
        return Upload(step)
    digits, attempt = rest[len(".rank-") : len(".rank-") + 5], rest[len(".rank-") + 6 :]
    if not rest.startswith(".rank-") or not (digits.isascii() and digits.isdigit()):
        return None
    try:
        found = Upload(step, int(digits), check_attempt(attempt))
    except ValueError:
        return None
    return found if found.name == name else None  # only the names this module writes


def mark_upload(job: JobDir, upload: Upload, dirs: DurableDirs) -> None:
    """Create the mark of ``upload``, and ``uploads/`` durably if this Store has not."""
    _create_flag(job.uploads / upload.name, job, dirs)


def unmark_upload(job: JobDir, upload: Upload) -> bool:
    """Remove the mark of ``upload``, durably; False when there was none."""
    return _remove_flag(job.uploads / upload.name)


def marked_uploads(job: JobDir) -> list[Upload]:
    """The job's upload marks, oldest step first."""
    found = [u for u in map(upload_from_name, _names(job.uploads)) if u is not None]
    return sorted(found, key=lambda u: (u.step, -1 if u.rank is None else u.rank, u.attempt or ""))


def read_job_info(job: JobDir) -> dict[str, Any]:
    """The job's ``job.json``; {} when absent; :class:`ManifestError` when damaged."""
    path = job.info
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: damaged ({exc!r}); fix or delete it") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: damaged (not a JSON object); fix or delete it")
    return doc


def write_job_info(job: JobDir, doc: dict[str, Any]) -> None:
    """Replace the job's ``job.json`` with ``doc``, durably."""
    body = json.dumps(doc, sort_keys=True).encode() + b"\n"
    durable_write(job.info, [body], tmp_dir=job.tmp)
