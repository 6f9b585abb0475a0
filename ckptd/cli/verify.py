"""``ckptd verify``: recompute every hash, and deal with the damaged objects it finds.

A damaged object is moved to ``JOB/quarantine/`` (unless ``--no-quarantine``), checked again under
the job lock right before the move (a writer may have written it again meanwhile), and every
checkpoint of the job that names it is reported: those no longer restore. Exits with the
corrupt-checkpoint code when any checkpoint fails; an empty store verifies (exit 0).

The object-store tier (``--root s3://bucket/prefix``) is verified the same way, every object as it
comes in (a damaged one is never cached); nothing is moved there (the tier is read-only here), and
each damaged or missing object is named by its key in the bucket.

A step written by several ranks is verified part by part: each rank's part must be there, be the
part the step's global record committed (its checksum), and every object it names must verify.
A failure names the rank. A step with a part missing or damaged fails as a whole: it does not
restore on every rank.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import click

from ckptd.cli.common import (
    STEP,
    StepCommand,
    cli_words,
    human_bytes,
    open_store,
    out,
    progress_bar,
    read_parts,
    require_job,
    say,
    step_objects,
    store_name,
    store_options,
)
from ckptd.errors import CkptdError, CorruptCheckpointError, FormatVersionError, NotFoundError
from ckptd.format.manifest import Manifest
from ckptd.format.restore import verify_manifest
from ckptd.format.store import Store
from ckptd.tier import keys
from ckptd.tier.mirror import TierStore


def damaged_object(store: Store, m: Manifest, problem: str) -> str | None:
    """The digest of the object a :func:`verify_manifest` failure is about, if it is about one.

    verify_manifest reports a failing object as ``object <its path> (holding ...)...``; the path
    names the digest. Failures that name no object (an unreadable file: permission, I/O) give
    None: nothing is wrong with any object's content.
    """
    for digest in m.objects:
        if problem.startswith(f"object {store.object_path(m.job, digest)} ("):
            return digest
    return None


def still_damaged(store: Store, m: Manifest, digest: str) -> bool:
    """Whether object ``digest`` of ``m`` still fails verification, checked again right before
    it is moved: a verify run can take hours, and a writer that finds an object damaged writes it
    again, after which moving it would break the checkpoints that now rely on it."""
    return bool(verify_manifest(store, only_objects(m, {digest}), threads=1))


def only_objects(m: Manifest, digests: set[str]) -> Manifest:
    """``m`` reduced to the objects ``digests`` (and the tensors' pieces in them): what
    :func:`verify_manifest` checks of it is then only those objects."""
    tensors = tuple(
        replace(t, pieces=tuple(p for p in t.pieces if p.object in digests))
        for t in m.tensors
        if any(p.object in digests for p in t.pieces)
    )
    return replace(m, tensors=tensors, objects={h: o for h, o in m.objects.items() if h in digests})


@contextmanager
def muted(logger_name: str) -> Iterator[None]:
    """Silence a library logger's warnings while the CLI reports the same events itself."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class Damage:
    """What verify found wrong with one job's objects, and what became of them."""

    digests: dict[str, Manifest] = field(default_factory=dict)
    """Each damaged object, with a checkpoint that names it."""
    referrers: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    unreadable: list[int] = field(default_factory=list)
    """Steps whose manifest could not be read while looking for referrers."""


def find_referrers(store: Store, job: str, damage: Damage) -> None:
    """Record in ``damage`` which checkpoints of ``job`` name each damaged object (a multi-rank
    step names the objects of every rank's part)."""
    damage.referrers.clear()
    damage.unreadable.clear()
    for step in store.steps(job):
        try:
            objects, unreadable = step_objects(store, store.read_manifest(job, step))
        except CkptdError:
            damage.unreadable.append(step)
            continue
        if unreadable:
            damage.unreadable.append(step)
        for digest in damage.digests.keys() & objects:
            damage.referrers[digest].append(step)


def report_damage(store: Store, job: str, damage: Damage, quarantine: bool) -> None:
    """Find every checkpoint of ``job`` that names a damaged object, move the damaged objects
    aside (unless ``quarantine`` is false) and say what that means for those checkpoints.

    Every manifest of the job is read, not only the ones verified: objects are shared between
    checkpoints, so ``verify JOB STEP`` finding one damaged also breaks older checkpoints. Moving
    a damaged object aside (``<job>/quarantine/``) makes the next snapshot of the same content
    write it again instead of trusting the damaged file, and keeps it for inspection. A missing
    object has nothing to move; an object of a newer format is not damaged and stays. The tier
    is only reported (:func:`report_tier_damage`).
    """
    if isinstance(store, TierStore):
        report_tier_damage(store, job, damage)
        return
    find_referrers(store, job, damage)
    moved: list[Path] = []
    lines: list[str] = []
    broken_steps: set[int] = set()
    for digest in sorted(damage.digests):
        steps = damage.referrers[digest]
        where = f"referenced by {job} step{'s' if len(steps) != 1 else ''} " + (
            ", ".join(map(str, steps)) or "none"
        )
        if not store.object_path(job, digest).exists():
            lines.append(f"  missing     {digest} ({where})")
            broken_steps.update(steps)
            continue
        try:
            store.object_header(job, digest)
        except FormatVersionError as exc:
            lines.append(f"  not moved   {digest}: {exc}")
            continue
        except CkptdError:
            pass  # a damaged header: as damaged as a damaged body
        m = damage.digests[digest]
        if not quarantine:
            if not still_damaged(store, m, digest):
                lines.append(f"  not moved   {digest}: it verifies now (written again meanwhile)")
                continue
            broken_steps.update(steps)
            lines.append(f"  damaged     {digest} ({where})")
            continue
        try:
            with muted("ckptd.format.store"):  # its "moved damaged object" warning: reported below
                # Checked again under the job lock, right before the move (see Store).
                dest = store.quarantine_object(
                    job, digest, still_damaged=functools.partial(still_damaged, store, m, digest)
                )
            if dest is None:
                lines.append(f"  not moved   {digest}: it verifies now (written again meanwhile)")
                continue
            broken_steps.update(steps)
            moved.append(dest)
        except NotFoundError:
            broken_steps.update(steps)  # another verify moved it first
            lines.append(f"  not moved   {digest}: already moved to quarantine (another verify?)")
            continue
        except CkptdError as exc:
            broken_steps.update(steps)
            lines.append(
                f"  not moved   {digest} ({where}): {cli_words(str(exc))}; run verify as the "
                "store's owner, or pass --no-quarantine"
            )
            continue
        lines.append(f"  quarantined {digest} ({where})")
    if moved:
        # A snapshot that deduped against a damaged object while verify waited for the job lock
        # committed before the move: it is broken too, so look again.
        find_referrers(store, job, damage)
        for dest in moved:
            broken_steps.update(damage.referrers.get(dest.name.split(".")[0], ()))
        head = f"{job}: moved {len(moved)} damaged object(s) to {moved[0].parent}"
    elif quarantine:
        head = f"{job}: objects that fail verification (nothing to move)"
    else:
        head = f"{job}: damaged objects, left in place (--no-quarantine)"
    out.print(head, markup=False)
    for line in lines:
        out.print(line, markup=False)
    if damage.unreadable:
        steps_text = ", ".join(map(str, damage.unreadable))
        out.print(
            f"  could not check steps {steps_text} (unreadable manifests or rank parts) for "
            "references to them",
            markup=False,
        )
    if broken_steps:
        steps_text = ", ".join(map(str, sorted(broken_steps)))
        out.print(
            f"  {job} step(s) {steps_text} no longer restore: delete them with `ckptd rm {job} "
            "STEP`; a new snapshot of the same content writes the object again",
            markup=False,
        )


def report_tier_damage(store: TierStore, job: str, damage: Damage) -> None:
    """:func:`report_damage` for the tier: each object that failed, by its key in the bucket,
    missing or damaged, with the checkpoints that name it. Nothing is moved (read-only here).
    Nothing damaged enters the cache, so a cached copy that fails was damaged there since: it is
    named as such (deleting it makes the next read fetch it again)."""
    find_referrers(store, job, damage)
    out.print(
        f"{job}: objects in {store.url} that fail verification (the tier is read-only here: "
        "nothing is moved)",
        markup=False,
    )
    broken_steps: set[int] = set()
    for digest in sorted(damage.digests):
        steps = damage.referrers[digest]
        key = keys.object_key(job, digest)
        where = f"referenced by {job} step{'s' if len(steps) != 1 else ''} " + (
            ", ".join(map(str, steps)) or "none"
        )
        cached = store.object_path(job, digest)
        if cached.exists():  # it verified on the way in: the cache's copy was damaged since
            out.print(
                f"  damaged     {cached}, the cached copy ({where}): delete it, and the next "
                "read fetches it from the tier again",
                markup=False,
            )
            continue
        broken_steps.update(steps)
        state = "missing" if store.remote.size(key) is None else "damaged"
        out.print(f"  {state:<11} {store.where(key)} ({where})", markup=False)
    if damage.unreadable:
        out.print(
            f"  could not check steps {', '.join(map(str, damage.unreadable))} (unreadable "
            "manifests or rank parts) for references to them",
            markup=False,
        )
    if broken_steps:
        out.print(
            f"  {job} step(s) {', '.join(map(str, sorted(broken_steps)))} do not restore from "
            "the tier: restore another step, or these from a local store that holds them",
            markup=False,
        )


@click.command("verify", cls=StepCommand)
@click.argument("job", required=False)
@click.argument("step", required=False, type=STEP)
@click.option("--threads", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option(
    "--no-quarantine",
    "no_quarantine",
    is_flag=True,
    help="Only report: leave damaged objects where they are (read-only verification).",
)
@store_options
def verify_cmd(
    job: str | None,
    step: int | str | None,
    threads: int,
    no_quarantine: bool,
    root: str | None,
    config: str | None,
) -> None:
    """Recompute every hash (of JOB STEP, JOB, or everything); non-zero on any failure.

    STEP is a step number, 'latest' (the checkpoint committed last) or 'highest'.

    Each damaged object is moved to JOB/quarantine/ (unless --no-quarantine), and every
    checkpoint that names it is reported: those no longer restore.
    """
    store = open_store(root, config)
    store.check_store()
    if job is None:
        targets = [(j, s) for j in store.jobs() for s in store.steps(j)]
    elif step is None:
        require_job(store, job)
        targets = [(job, s) for s in store.steps(job)]
    else:
        targets = [(job, store.resolve_step(job, step))]
    if not targets:
        what = "checkpoints" if job is None else f"checkpoints of job {job!r}"
        out.print(f"no {what} to verify under {store_name(store)}", markup=False)
        return
    failures = 0
    damage: dict[str, Damage] = {}
    for j, s in targets:
        try:
            record = store.read_manifest(j, s)
        except CorruptCheckpointError as exc:
            failures += 1
            say(out, "FAIL", "red", f"{j} step {s}: {cli_words(str(exc))}")
            continue
        if not verify_step(store, record, threads, damage):
            failures += 1
    for j, found in damage.items():
        report_damage(store, j, found, quarantine=not no_quarantine)
    if failures:
        raise CorruptCheckpointError(
            f"{failures} of {len(targets)} checkpoint(s) failed verification"
        )


def verify_step(store: Store, record: Manifest, threads: int, damage: dict[str, Damage]) -> bool:
    """Verify one committed step (every rank's part of a multi-rank step), print one ``ok`` line
    or a ``FAIL`` line per problem, and note damaged objects in ``damage``. True when it
    verifies.

    An object shared by several ranks' parts (DDP's identical replicas) is verified once per
    step; a rank whose part uses one that failed for an earlier rank fails too, naming it."""
    j, s = record.job, record.step
    ok = True
    checked: set[str] = set()
    failed: set[str] = set()
    for f in read_parts(store, record):
        where = f"{j} step {s}" + (f" rank {f.rank}" if record.is_global else "")
        if f.part is None:
            ok = False
            say(out, "FAIL", "red", f"{where}: {cli_words(f.problem or '')}")
            continue
        m = f.part
        todo = only_objects(m, m.objects.keys() - checked) if checked else m
        checked.update(m.objects)
        total = sum(o.raw_bytes for o in todo.objects.values())
        with progress_bar(total, f"verify {j} {s}") as advance:
            problems = verify_manifest(store, todo, threads=threads, progress=advance)
        for p in problems:
            ok = False
            say(out, "FAIL", "red", f"{where}: {cli_words(p)}")
            digest = damaged_object(store, m, p)
            if digest is not None:
                failed.add(digest)
                damage.setdefault(j, Damage()).digests.setdefault(digest, m)
        for digest in sorted((m.objects.keys() & failed) - todo.objects.keys()):
            ok = False
            say(out, "FAIL", "red", f"{where}: uses object {digest}, which failed above")
    if ok:
        ranks = f"{record.world_size} ranks, " if record.is_global else ""
        detail = f"{ranks}{len(checked)} objects, {human_bytes(record.raw_bytes)}"
        say(out, "ok  ", "green", f"{j} step {s} ({detail})")
    return ok
