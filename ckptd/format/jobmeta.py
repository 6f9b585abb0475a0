"""A job's small metadata files: pins (steps retention must keep) and ``job.json``.

A pin is an empty file ``<job>/pins/step-<12 digits>.json``; it may name a step that has no
checkpoint yet (``snapshot(pin=True)`` pins before the commit). ``job.json`` is a JSON object: the
job's owner uid and what the daemon recorded for it (retention). Both are written durably
(:func:`~ckptd.format.fsutil.durable_write`) and without the job lock, which is why GC spares fresh
tmp files. The job's directories exist before anything here writes (``Store.open_job``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from ckptd.errors import ManifestError
from ckptd.format.fsutil import DurableDirs, durable_write, fsync_dir, os_error
from ckptd.format.layout import JobDir
from ckptd.format.manifest import step_from_name


def pin_step(job: JobDir, step: int, dirs: DurableDirs) -> None:
    """Create the pin of ``step``, and ``pins/`` durably if this Store (``dirs``) has not."""
    if dirs.mkdir(job.pins):
        # pins/ may be new, or left by a pin that died before this fsync.
        fsync_dir(job.path)
        dirs.add([job.pins])
    durable_write(job.pin(step), [b""], tmp_dir=job.tmp)


def unpin_step(job: JobDir, step: int) -> bool:
    """Remove the pin of ``step``, durably; False when there was none."""
    path = job.pin(step)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise os_error(exc, "delete", path) from exc
    fsync_dir(path.parent)
    return True


def pinned_steps(job: JobDir) -> set[int]:
    try:
        names = os.listdir(job.pins)
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise os_error(exc, "list", job.pins) from exc
    return {s for s in map(step_from_name, names) if s is not None}


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
