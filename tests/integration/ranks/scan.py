"""The scanner run after every kill: no global record is visible without all its parts.

It reads the store's files directly, as a reader on another node would, and holds every global
record (``<job>/manifests/step-<12>.json`` of format version 2) to what the design promises
(:mod:`ckptd.format.parts`):

* the record is intact (its checksum) and names ranks ``0..world_size-1``, once each, at their
  places ``parts/step-<12>/<attempt>/rank-<5>.json``;
* each part file exists, carries the checksum the record names, is intact, and says the same job,
  step, rank, world size and attempt;
* every object each part names exists with the stored size the part gives.

A record that changes or disappears while it is being checked (a newer attempt's commit replaced
it, or a deletion) is checked again rather than reported: the invariant is about what a reader
can see at one moment, and such a record was not visible any more.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.errors import CkptdError
from ckptd.format.layout import part_name
from ckptd.format.manifest import Manifest, parse_manifest, step_from_name


@dataclass
class Scan:
    """What :func:`scan` found: ``violations`` (empty: the invariant holds) and counts."""

    records: int = 0
    parts: int = 0
    objects: int = 0
    violations: list[str] = field(default_factory=list)


def scan(root: Path, retries: int = 3) -> Scan:
    """Check every global record of every job under ``root`` (see the module docstring)."""
    out = Scan()
    for job_dir in _jobs(root):
        for name in _listdir(job_dir / "manifests"):
            if step_from_name(name) is None:
                continue
            path = job_dir / "manifests" / name
            for _ in range(retries):
                data = _read(path)
                if data is None or _version(data) == 1:
                    break  # gone, or a single-process checkpoint
                problems, parts, objects = _check_record(job_dir, path, data)
                if problems and _read(path) != data:
                    continue  # replaced or deleted while checked: look again
                out.records += 1
                out.parts += parts
                out.objects += objects
                out.violations += problems
                break
    return out


def assert_clean(root: Path, when: str) -> Scan:
    """:func:`scan` ``root`` and fail naming ``when`` (e.g. "after killing rank 1") on any
    violation."""
    found = scan(root)
    shown = "\n  ".join(found.violations[:10])
    assert not found.violations, f"{when}: a global record is visible without its parts:\n  {shown}"
    return found


def _check_record(job_dir: Path, path: Path, data: bytes) -> tuple[list[str], int, int]:
    """Problems of one global record, and how many parts and objects were checked."""
    try:
        record = parse_manifest(data, where=str(path))
    except CkptdError as exc:
        return [f"{path}: damaged record: {exc}"], 0, 0
    where = f"{path} (step {record.step}, attempt {record.attempt})"
    problems = []
    ranks = [p.rank for p in record.parts]
    if record.attempt is None or record.world_size < 2:
        problems.append(f"{where}: attempt {record.attempt!r}, world size {record.world_size}")
    if ranks != list(range(record.world_size)):
        problems.append(f"{where}: names ranks {ranks}, not 0..{record.world_size - 1}")
    parts = objects = 0
    for ref in record.parts:
        place = f"parts/step-{record.step:012d}/{record.attempt}/{part_name(ref.rank)}"
        if ref.record != place:
            problems.append(f"{where}: rank {ref.rank}'s part is named {ref.record}, not {place}")
        part_path = job_dir / ref.record
        part_data = _read(part_path)
        if part_data is None:
            problems.append(f"{where}: rank {ref.rank}'s part {part_path} is missing")
            continue
        checksum = _checksum(part_data)
        if checksum != ref.checksum:
            problems.append(
                f"{where}: rank {ref.rank}'s part has checksum {checksum}, the record names "
                f"{ref.checksum}"
            )
        try:
            part = parse_manifest(part_data, where=str(part_path))
        except CkptdError as exc:
            problems.append(f"{where}: rank {ref.rank}'s part is damaged: {exc}")
            continue
        parts += 1
        said = (part.job, part.step, part.rank, part.world_size, part.attempt)
        want = (record.job, record.step, ref.rank, record.world_size, record.attempt)
        if said != want:
            problems.append(f"{where}: rank {ref.rank}'s part says {said}, not {want}")
        objects += len(part.objects)
        problems += _missing_objects(job_dir, part, f"{where}: rank {ref.rank}'s object")
    return problems, parts, objects


def _missing_objects(job_dir: Path, part: Manifest, where: str) -> list[str]:
    out = []
    for digest, info in part.objects.items():
        obj = job_dir / "objects" / digest[:2] / digest
        try:
            size = obj.stat().st_size
        except FileNotFoundError:
            out.append(f"{where} {digest} is missing")
            continue
        if size != info.stored_bytes:
            out.append(f"{where} {digest} holds {size} bytes, not {info.stored_bytes}")
    return out


def _version(data: bytes) -> object:
    try:
        doc = json.loads(data)
    except ValueError:
        return None  # damaged: checked (and reported) as a record
    return doc.get("version") if isinstance(doc, dict) else None


def _checksum(data: bytes) -> object:
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc.get("checksum") if isinstance(doc, dict) else None


def _jobs(root: Path) -> list[Path]:
    return [root / n for n in _listdir(root) if (root / n / "manifests").is_dir()]


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
