"""Where a store keeps things: the directory tree under its root (see ``docs/format.md``)::

    <root>/.ckptd-store                       marks the directory as a store (Store.check_store)
    <root>/<job>/objects/ab/<blake3 hex>      immutable chunk objects, shared between checkpoints
    <root>/<job>/manifests/step-000000001200.json   a checkpoint; it exists iff this file exists
    <root>/<job>/quarantine/<blake3 hex>      damaged objects moved aside (never read, never GCed)
    <root>/<job>/pins/step-000000001200.json  an empty file: retention keeps that step
    <root>/<job>/parts/step-000000001200/<attempt>/rank-00003.json   one rank's part of a
                                              multi-rank step (the global record is its manifest)
    <root>/<job>/uploads/step-000000001200.json   a committed checkpoint the tier still lacks
                                              (``...rank-00003.<attempt>.json``: one rank's part)
    <root>/<job>/job.json                     the job's owner and settings recorded for it
    <root>/<job>/lock, commit.lock            the job lock and the commit lock (flock)
    <root>/<job>/tmp/                         in-flight files; anything here is garbage once no
                                              writer runs (swept by Store.sweep_tmp)

:class:`JobDir` names the paths of one job. Only :class:`~ckptd.format.store.Store` builds one,
after it has checked the job name (:func:`~ckptd.format.store.validate_job_name`), so a JobDir's
name is always a single, harmless path component.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ckptd.format.hashing import check_hash_name
from ckptd.format.manifest import check_attempt, check_step, manifest_name


@dataclass(frozen=True)
class JobDir:
    """The directory of job ``name``, ``path`` (``<root>/<name>``), and the paths inside it."""

    name: str
    path: Path

    @property
    def objects(self) -> Path:
        return self.path / "objects"

    @property
    def manifests(self) -> Path:
        return self.path / "manifests"

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def pins(self) -> Path:
        return self.path / "pins"

    @property
    def quarantine(self) -> Path:
        return self.path / "quarantine"

    @property
    def uploads(self) -> Path:
        return self.path / "uploads"

    @property
    def info(self) -> Path:
        return self.path / "job.json"

    @property
    def job_lock(self) -> Path:
        return self.path / "lock"

    @property
    def commit_lock(self) -> Path:
        return self.path / "commit.lock"

    def object(self, digest: str) -> Path:
        """The object named ``digest`` (checked: a manifest's names come from disk)."""
        check_hash_name(digest)
        return self.objects / digest[:2] / digest

    def manifest(self, step: int) -> Path:
        return self.manifests / manifest_name(check_step(step))

    def pin(self, step: int) -> Path:
        return self.pins / manifest_name(check_step(step))

    @property
    def parts(self) -> Path:
        return self.path / "parts"

    def part_set(self, step: int, attempt: str) -> Path:
        """The directory of one multi-rank step's parts written by restart attempt ``attempt``."""
        return (
            self.parts / manifest_name(check_step(step))[: -len(".json")] / check_attempt(attempt)
        )

    def part(self, step: int, attempt: str, rank: int) -> Path:
        return self.part_set(step, attempt) / part_name(rank)


def part_name(rank: int) -> str:
    """File name of rank ``rank``'s part: fixed width so names sort by rank."""
    return f"rank-{rank:05d}.json"


def rank_from_name(name: str) -> int | None:
    """Inverse of :func:`part_name`; None for any other file name."""
    if not (name.startswith("rank-") and name.endswith(".json")):
        return None
    digits = name[5:-5]
    if len(digits) != 5 or not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)
