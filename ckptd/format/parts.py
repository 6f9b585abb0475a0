"""Multi-rank steps: each rank's part, the global commit, and collecting what never completes.

A job run by N > 1 ranks writes, per step and restart attempt, one *part* per rank,
``parts/step-<12 digits>/<attempt>/rank-<5 digits>.json``: an ordinary manifest (format version
1) of that rank's state, with its ``rank``, ``world_size`` and ``attempt``. Its objects live in the
job's one content-addressed ``objects/``, so identical replicas (DDP) are stored once. A part is
written after its objects are durable and created exclusively (``link``): a rank hands a step off
once per attempt, and two processes claiming one rank cannot both succeed.

A step is committed when its *global record* ``manifests/step-<12 digits>.json`` (format version
2) is created, exclusively (``link``). It is written by whoever completes the set (the daemon that
writes the last part; also a daemon's periodic recheck and its startup, so a committer that dies
is replaced), never by a trainer, and only after :func:`problems` finds nothing wrong: N parts,
ranks 0..N-1, one world size, every part intact (its checksum) and every object it names present
with its stored size. The record names each part with its checksum, and readers check both. So a
step is visible iff its record exists, and a record exists only when all its parts are durable.

A set that never completes is never visible. It is collected (:func:`collectable`) once

- a newer step of the same attempt was committed, or a newer attempt (attempts follow one
  another: :func:`attempt_order` orders them by their first part) committed a step, and its
  newest part is older than :data:`GRACE_S`; or
- its oldest part is older than ``pending_timeout_s`` (config ``ranks.pending_timeout``).

Each set is decided once (:func:`decide`: an exclusive ``decision`` file saying ``commit`` or
``collect``), so no set is committed and collected at once, without locks shared between nodes.
A committer also refuses a set that a newer attempt has overtaken (it handed off any part), or
that would be collectable within :data:`COMMIT_MARGIN_S`. Deleting a committed step (retention,
``ckptd rm``) first marks every set of the step *retired* (an empty file), then removes the
record, then the sets: no crash in between can make a deleted step visible again.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.errors import CkptdError, RankLayoutError
from ckptd.format.fsutil import DurableDirs, durable_write, file_identity, fsync_dir, os_error
from ckptd.format.hashing import content_hash
from ckptd.format.layout import JobDir, part_name, rank_from_name
from ckptd.format.manifest import (
    Manifest,
    PartRef,
    check_attempt,
    manifest_checksum,
    now_iso,
    parse_manifest,
    step_from_name,
)

log = logging.getLogger("ckptd.format.parts")

GRACE_S = 10.0
"""A set whose newest part is younger than this is never collected for being overtaken."""
COMMIT_MARGIN_S = 60.0
"""A committer treats a set as collectable this much earlier than the collector does (at most a
quarter of the timeout)."""
RETIRED = "retired"
"""The file that marks a set whose step is being deleted: it is never committed again."""
DECISION = "decision"
"""The file, created exclusively, that says whether a set is committed or collected."""
MAX_WORLD_SIZE = 99_999
"""Rank part files are named with 5 digits."""
_DIGEST_TAG = b"ckptd.ranks.v1\x00"


@dataclass
class PartSet:
    """The parts one attempt wrote for one step, as found on disk."""

    job: str
    step: int
    attempt: str
    path: Path
    parts: dict[int, Manifest] = field(default_factory=dict)
    checksums: dict[int, str] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)
    oldest_ns: int = 0
    newest_ns: int = 0
    retired: bool = False
    dir_mtime_ns: int = 0
    decision: str | None = None
    """``"commit"`` or ``"collect"`` once someone decided (:func:`decide`)."""

    @property
    def world_sizes(self) -> set[int]:
        return {m.world_size for m in self.parts.values()}

    @property
    def world_size(self) -> int:
        """The world size the parts claim (the largest, when they disagree)."""
        return max(self.world_sizes, default=0)

    @property
    def missing(self) -> list[int]:
        if self.world_size > MAX_WORLD_SIZE:
            return []  # refused when written; never listed in full
        return [r for r in range(self.world_size) if r not in self.parts]

    @property
    def complete(self) -> bool:
        return (
            len(self.world_sizes) == 1
            and len(self.parts) == self.world_size
            and not self.damaged
            and not self.retired
        )


def read_set(job: JobDir, step: int, attempt: str) -> PartSet:
    """The parts of ``step`` written by ``attempt`` (an empty set if there are none)."""
    path = job.part_set(step, attempt)
    out = PartSet(job.name, step, attempt, path)
    try:
        out.dir_mtime_ns = path.stat().st_mtime_ns
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise os_error(exc, "list", path) from exc
    for name in names:
        if name == RETIRED:
            out.retired = True
            continue
        if name == DECISION:
            out.decision = _read_decision(path / name)
            continue
        rank = rank_from_name(name)
        if rank is None:
            continue
        file = path / name
        try:
            st = file.stat()
            part, checksum = _parse_part(str(file), file_identity(st))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise os_error(exc, "read", file) from exc
        except CkptdError as exc:
            out.damaged.append(str(exc))
            continue
        out.oldest_ns = min(out.oldest_ns or st.st_mtime_ns, st.st_mtime_ns)
        out.newest_ns = max(out.newest_ns, st.st_mtime_ns)
        if (part.job, part.step, part.rank, part.attempt) != (job.name, step, rank, attempt):
            out.damaged.append(
                f"{file}: the part says job {part.job!r} step {part.step} rank {part.rank} "
                f"attempt {part.attempt!r}, its place says otherwise"
            )
            continue
        out.parts[rank] = part
        out.checksums[rank] = checksum
    return out


def parse_part(path: Path) -> tuple[Manifest, str]:
    """A part file and its checksum (cached while the file is the same one)."""
    return _parse_part(str(path), file_identity(path.stat()))


@functools.lru_cache(maxsize=2048)
def _parse_part(path: str, identity: tuple[int, int, int]) -> tuple[Manifest, str]:
    """A part file, parsed once per identity (parts are created once and never modified)."""
    del identity  # the cache key: a file replaced under its name is read again
    data = Path(path).read_bytes()
    return parse_manifest(data, where=path), manifest_checksum(data)


def oldest_part_ns(job: JobDir, step: int, attempt: str) -> int:
    """The mtime of the oldest part file of a set (0: none); only ``stat``s."""
    oldest = 0
    try:
        with os.scandir(job.part_set(step, attempt)) as it:
            for entry in it:
                if rank_from_name(entry.name) is not None:
                    mtime = entry.stat().st_mtime_ns
                    oldest = min(oldest or mtime, mtime)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise os_error(exc, "list", job.part_set(step, attempt)) from exc
    return oldest


def _read_decision(path: Path) -> str | None:
    try:
        text = path.read_text("ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise os_error(exc, "read", path) from exc
    return text if text in ("commit", "collect") else None


def decide(job: JobDir, pset: PartSet, decision: str) -> str | None:
    """Record, once and for all, whether ``pset`` is committed or collected: the first
    ``decide`` of a set wins (an exclusive create), every later one returns the winner's word.
    None when the set's directory is gone (it was collected or its step deleted)."""
    path = pset.path / DECISION
    try:
        durable_write(path, [decision.encode()], tmp_dir=job.tmp, exclusive=True)
    except FileExistsError:
        return _read_decision(path)
    except CkptdError:
        if not pset.path.is_dir():
            return None
        raise
    return decision


def set_keys(job: JobDir) -> list[tuple[int, str]]:
    """``(step, attempt)`` of every part set of ``job`` (directories only; nothing is read)."""
    out = []
    for step_dir in _listdir(job.parts):
        step = step_from_name(step_dir + ".json")
        if step is None:
            continue
        for attempt in _listdir(job.parts / step_dir):
            try:
                check_attempt(attempt)
            except ValueError:  # not an attempt directory ckptd writes
                continue
            out.append((step, attempt))
    return out


def list_sets(job: JobDir, keys: Iterable[tuple[int, str]] | None = None) -> list[PartSet]:
    """The part sets of ``job`` (those of ``keys``, or all), by step then attempt."""
    return [read_set(job, step, attempt) for step, attempt in keys or set_keys(job)]


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise os_error(exc, "list", path) from exc


def check_part(part: Manifest) -> None:
    """Raise :class:`RankLayoutError` unless ``part`` is a valid rank part."""
    if not 2 <= part.world_size <= MAX_WORLD_SIZE:
        raise RankLayoutError(
            f"job {part.job!r} step {part.step}: world size {part.world_size} is outside "
            f"[2, {MAX_WORLD_SIZE}] for a rank part"
        )
    if part.attempt is None:
        raise RankLayoutError(
            f"job {part.job!r} step {part.step}: a rank part needs an attempt and a world size "
            f">= 2 (got attempt {part.attempt!r}, world size {part.world_size})"
        )
    if not 0 <= part.rank < part.world_size:
        raise RankLayoutError(
            f"job {part.job!r} step {part.step}: rank {part.rank} is outside [0, "
            f"{part.world_size}); give each process a rank in that range"
        )


def write_part(job: JobDir, part: Manifest, dirs: DurableDirs) -> Path:
    """Create ``part``'s file, exclusively and durably (its objects must be durable already).

    Raises :class:`RankLayoutError` when the rank already handed this step off in this attempt,
    when the parts already there claim another world size, or when the step was retired."""
    check_part(part)
    assert part.attempt is not None
    found = read_set(job, part.step, part.attempt)
    where = f"job {part.job!r} step {part.step} (attempt {part.attempt})"
    if found.retired:
        raise RankLayoutError(f"{where} was deleted; hand off a new step instead")
    others = found.world_sizes - {part.world_size}
    if others:
        raise RankLayoutError(
            f"{where}: rank {part.rank} says world size {part.world_size}, but ranks "
            f"{sorted(r for r, m in found.parts.items() if m.world_size != part.world_size)} "
            f"of the same step said {sorted(others)}; every rank of a job must use one world size"
        )
    if part.rank in found.parts:
        raise _duplicate(where, part.rank)
    _make_dirs(job, [job.parts, found.path.parent, found.path], dirs)
    path = job.part(part.step, part.attempt, part.rank)
    try:
        durable_write(path, [part.to_json()], tmp_dir=job.tmp, exclusive=True)
    except FileExistsError:
        raise _duplicate(where, part.rank) from None
    return path


def _duplicate(where: str, rank: int) -> RankLayoutError:
    return RankLayoutError(
        f"{where}: rank {rank} already handed this step off. Each rank hands a step off once "
        "per attempt: check that no two processes use the same rank, and that a restarted job "
        "gets a new attempt (torchrun sets TORCHELASTIC_RESTART_COUNT; else pass attempt=)"
    )


def _make_dirs(job: JobDir, paths: Iterable[Path], dirs: DurableDirs) -> None:
    """Create each directory (parents first) and make its entry durable once."""
    for path in paths:
        if dirs.mkdir(path):
            fsync_dir(path.parent)
            dirs.add([path])


def problems(job: JobDir, pset: PartSet) -> list[str]:
    """Why ``pset`` cannot be committed (empty: it can): parts missing, damaged or disagreeing,
    an object a part names missing or of the wrong size."""
    where = f"job {pset.job!r} step {pset.step} (attempt {pset.attempt})"
    out = [f"{where}: {d}" for d in pset.damaged]
    if pset.retired:
        out.append(f"{where}: retired (being deleted)")
    if len(pset.world_sizes) > 1:
        out.append(f"{where}: ranks disagree on the world size: {sorted(pset.world_sizes)}")
    if pset.missing:
        out.append(f"{where}: ranks {pset.missing} of {pset.world_size} have not handed off")
    if out:
        return out
    for rank, part in sorted(pset.parts.items()):
        for digest, info in part.objects.items():
            path = job.object(digest)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                out.append(f"{where}: rank {rank}'s object {digest} is missing")
                continue
            except OSError as exc:
                out.append(f"{where}: rank {rank}'s object {digest}: {exc}")
                continue
            if size != info.stored_bytes:
                out.append(
                    f"{where}: rank {rank}'s object {digest} holds {size} bytes, "
                    f"not {info.stored_bytes}"
                )
    return out


def global_record(pset: PartSet, seq: int) -> Manifest:
    """The record that commits a complete set, numbered ``seq``."""
    parts = [pset.parts[r] for r in range(pset.world_size)]
    stored: dict[str, int] = {}
    for part in parts:
        stored.update((h, o.stored_bytes) for h, o in part.objects.items())
    digests = [p.digest for p in parts]
    digest = (
        None
        if any(d is None for d in digests)
        else content_hash(_DIGEST_TAG + b"".join(bytes.fromhex(d or "") for d in digests))
    )
    base = f"parts/{pset.path.parent.name}/{pset.attempt}"
    return Manifest(
        job=pset.job,
        step=pset.step,
        created=now_iso(),
        tensors=(),
        objects={},
        skeleton=None,
        metric=parts[0].metric,
        world_size=pset.world_size,
        seq=seq,
        digest=digest,
        attempt=pset.attempt,
        parts=tuple(
            PartRef(r, f"{base}/{part_name(r)}", pset.checksums[r], p.digest)
            for r, p in enumerate(parts)
        ),
        part_totals=(
            sum(len(p.tensors) for p in parts),
            sum(p.raw_bytes for p in parts),
            sum(stored.values()),
            sum(p.written_bytes for p in parts),
        ),
    )


def commit_margin_s(pending_timeout_s: float) -> float:
    return min(COMMIT_MARGIN_S, pending_timeout_s / 4)


def attempt_order(job: JobDir) -> dict[str, int]:
    """Per attempt, when its first part still on disk was written: attempts run one after the
    other, so a later first part is a later attempt (only ``stat``s)."""
    first: dict[str, int] = {}
    for step, attempt in set_keys(job):
        oldest = oldest_part_ns(job, step, attempt)
        if oldest:
            first[attempt] = min(first.get(attempt, oldest), oldest)
    return first


def newer(first: dict[str, int], attempt: str, than: str) -> bool:
    """Whether ``attempt`` began after ``than`` (see :func:`attempt_order`)."""
    return attempt != than and first.get(attempt, 0) > first.get(than, 0)


def collectable(
    pset: PartSet,
    records: Iterable[Manifest],
    *,
    now_ns: int,
    pending_timeout_s: float,
    first: dict[str, int],
    grace_s: float = GRACE_S,
) -> str | None:
    """Why an uncommitted set may be collected (None: keep it); see the module docstring.
    ``records`` are the job's global records; a set one of them commits is never collectable."""
    records = list(records)
    if any(r.step == pset.step and r.attempt == pset.attempt for r in records):
        return None
    if pset.retired:
        return "its step was deleted"
    if pset.decision == "collect":
        return "it was being collected"
    if pset.decision == "commit":
        # Committed (or being committed: the recheck writes its record), until a newer
        # attempt's record takes its step.
        for r in records:
            if r.step == pset.step and newer(first, str(r.attempt), pset.attempt):
                return f"attempt {r.attempt} committed step {r.step} again"
        return None
    if not pset.parts and not pset.damaged:
        return "it is empty" if now_ns - pset.dir_mtime_ns > grace_s * 1e9 else None
    if now_ns - pset.oldest_ns > pending_timeout_s * 1e9:
        return f"it waited longer than ranks.pending_timeout ({pending_timeout_s:g} s)"
    if now_ns - pset.newest_ns < grace_s * 1e9:
        return None
    for r in records:
        if r.attempt == pset.attempt and r.step > pset.step:
            return f"step {r.step} of the same attempt was committed"
        if newer(first, str(r.attempt), pset.attempt):
            return f"attempt {r.attempt}, which began after it, committed step {r.step}"
    return None


def remove_set(pset: PartSet) -> None:
    """Delete a set's directory (its step directory too once empty)."""
    try:
        shutil.rmtree(pset.path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise os_error(exc, "delete", pset.path) from exc
    try:
        pset.path.parent.rmdir()
    except OSError:
        pass  # other attempts' sets are still there
    fsync_dir(pset.path.parent if pset.path.parent.exists() else pset.path.parent.parent)


def retire(job: JobDir, step: int, attempt: str) -> PartSet:
    """Mark a set retired (durably), before its step's record is deleted."""
    path = job.part_set(step, attempt)
    if path.is_dir():
        marker = path / RETIRED
        if not marker.exists():
            durable_write(marker, [b""], tmp_dir=job.tmp)
    return read_set(job, step, attempt)


def age_s(pset: PartSet) -> float:
    """Seconds since the set's oldest part was written."""
    return max(0.0, time.time() - pset.oldest_ns / 1e9) if pset.oldest_ns else 0.0
