"""Where the tier keeps things: the bucket holds a store's tree under the tier's prefix.

The keys are the paths of a local store relative to its root (:mod:`ckptd.format.layout`), so a
bucket reads like a store and a store's file names are its keys::

    .ckptd-store                                 written once: the prefix holds a ckptd tier
    <job>/objects/ab/<blake3 hex>                objects, byte for byte as the local store has them
    <job>/manifests/step-000000001200.json       a checkpoint; uploaded last, created exclusively
    <job>/parts/step-000000001200/<attempt>/rank-00003.json   one rank's part of a multi-rank step

Only keys of these shapes are ever written or deleted by ckptd (:func:`object_digest`,
:func:`manifest_step`): anything else in the bucket is not ckptd's and is left alone.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from ckptd.errors import ManifestError
from ckptd.format.hashing import check_hash_name
from ckptd.format.layout import JobDir, rank_from_name
from ckptd.format.manifest import Manifest, step_from_name
from ckptd.format.store import STORE_MARKER, validate_job_name

MARKER = STORE_MARKER


def tier_order(manifest: Manifest) -> tuple[str, int, int]:
    """Sort key of a checkpoint in the tier, oldest commit first: its creation time (UTC, to the
    microsecond), then ``seq``, then the step. Several daemons commit to one bucket (a fresh
    node after a failure, several nodes), each numbering ``seq`` from its own disk, so their
    ``seq`` are not comparable and the tier orders commits by time (keep clocks in sync)."""
    return (manifest.created, manifest.seq, manifest.step)


def _job(job: str) -> JobDir:
    return JobDir(validate_job_name(job), Path(job))


def _key(path: Path) -> str:
    return PurePosixPath(path).as_posix()


def object_key(job: str, digest: str) -> str:
    return _key(_job(job).object(digest))


def manifest_key(job: str, step: int) -> str:
    return _key(_job(job).manifest(step))


def manifests_prefix(job: str) -> str:
    return _key(_job(job).manifests)


def objects_prefix(job: str) -> str:
    return _key(_job(job).objects)


def part_key(job: str, step: int, attempt: str, rank: int) -> str:
    return _key(_job(job).part(step, attempt, rank))


def part_set_prefix(job: str, step: int, attempt: str) -> str:
    return _key(_job(job).part_set(step, attempt))


def parts_prefix(job: str) -> str:
    return _key(_job(job).parts)


def record_key(job: str, record: str) -> str:
    """The key of a part a global record names (``parts/step-.../<attempt>/rank-00003.json``,
    relative to the job)."""
    key = f"{validate_job_name(job)}/{record}"
    pieces = PurePosixPath(record).parts
    if len(pieces) != 4 or pieces[0] != "parts" or rank_from_name(pieces[3]) is None:
        raise ValueError(f"not a part record path: {record!r}")
    return key


def object_digest(job: str, key: str) -> str | None:
    """The digest of ``key`` if it is an object key of ``job`` as ckptd writes them, else None."""
    pieces = key.split("/")  # not a path: "a//b" or "a/./b" are other keys
    if len(pieces) != 4 or pieces[0] != job or pieces[1] != "objects":
        return None
    digest = pieces[3]
    try:
        check_hash_name(digest)
    except ManifestError:
        return None
    return digest if pieces[2] == digest[:2] else None


def manifest_step(job: str, key: str) -> int | None:
    """The step of ``key`` if it is a manifest key of ``job``, else None."""
    pieces = key.split("/")
    if len(pieces) != 3 or pieces[0] != job or pieces[1] != "manifests":
        return None
    return step_from_name(pieces[2])
