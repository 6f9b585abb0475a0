"""``ckptd rm``, ``gc``, ``pin``, ``unpin`` and ``prune``: the commands that change a store.

Each change is made by a :class:`~ckptd.format.store.Store` operation; retention decides what
``prune`` deletes (:func:`ckptd.policy.prune.prune`, then GC). ``gc`` and ``prune`` with nothing
to do say so and exit 0 (cron stays quiet). ``rm`` asks on a terminal and, without one, deletes
only with ``--yes``.

Each acts on whole checkpoints: deleting a step written by several ranks removes its global record
and every rank's part (:meth:`~ckptd.format.store.Store.delete_checkpoint`), a pin protects the
whole step. ``gc`` also removes the parts of multi-rank steps that can never commit
(:meth:`~ckptd.format.store.Store.collect_parts`, with ``ranks.pending_timeout`` from the config).
"""

from __future__ import annotations

import sys

import click

from ckptd.cli.common import (
    STEP,
    StepCommand,
    err,
    human_bytes,
    open_store,
    out,
    require_job,
    stdin_is_terminal,
    store_options,
)
from ckptd.config import load_config
from ckptd.errors import CorruptCheckpointError, NotFoundError
from ckptd.format.store import validate_job_name
from ckptd.policy.prune import prune


@click.command("rm", cls=StepCommand)
@click.argument("job")
@click.argument("step", type=STEP)
@click.option(
    "-y",
    "--yes",
    is_flag=True,
    help="Delete without asking (required when stdin is not a terminal).",
)
@store_options
def rm_cmd(job: str, step: int | str, yes: bool, root: str | None, config: str | None) -> None:
    """Delete checkpoint JOB STEP (its manifest; run `gc` to free unshared objects).

    A step written by several ranks is deleted whole: its global record and every rank's part.
    STEP is a step number, 'latest' (the checkpoint committed last) or 'highest'. Asks for
    confirmation on a terminal. Without a terminal (a script, cron) it deletes only with
    --yes, and otherwise refuses (exit 2): a script must not hang on a question nobody sees, nor
    delete without having said so.
    """
    store = open_store(root, config)
    store.check_store()
    resolved = store.resolve_step(job, step)
    try:
        record = store.read_manifest(job, resolved)
        world_size = record.world_size if record.is_global else 1
    except CorruptCheckpointError:
        world_size = 1  # a damaged manifest is deleted all the same
    parts = f" and its {world_size} rank parts" if world_size > 1 else ""
    if not yes:
        what = f"{job} step {resolved}" + (f" ({step})" if isinstance(step, str) else "")
        if not stdin_is_terminal():
            raise click.UsageError(
                f"not deleting {what}: ckptd rm asks before deleting, and stdin is not a "
                "terminal; pass --yes (-y) to delete without asking",
                ctx=click.get_current_context(),
            )
        if not click.confirm(f"Delete checkpoint {what}{parts}?", default=False, err=True):
            err.print(f"not deleted: {what}", markup=False)
            sys.exit(1)
    store.delete_checkpoint(job, resolved)
    out.print(f"removed {job} step {resolved}{parts}", markup=False)


@click.command("gc")
@click.argument("job", required=False)
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@store_options
def gc_cmd(job: str | None, dry_run: bool, root: str | None, config: str | None) -> None:
    """Remove objects no manifest references, and the parts of multi-rank steps that can never
    commit (of JOB, or of every job).

    A step's parts are collected once a newer step of the job committed (10 s after its last
    part), or when its first part is older than ranks.pending_timeout. Nothing to collect is
    not an error (exit 0): run it from cron as often as you like.
    """
    cfg = load_config(config)  # for ranks.pending_timeout
    store = open_store(root, config)
    store.check_store()
    if job is not None:
        require_job(store, job)
    jobs = [job] if job else store.jobs()
    total_objects = total_bytes = total_tmp = total_sets = 0
    verb = "would remove" if dry_run else "removed"
    for j in jobs:
        collected = store.collect_parts(
            j, pending_timeout_s=cfg.ranks.pending_timeout_s, dry_run=dry_run
        )
        total_sets += len(collected)
        for step, attempt, why in collected:
            out.print(
                f"{j}: {verb} the parts of step {step} (attempt {attempt}), never committed: {why}",
                markup=False,
            )
        res = store.gc(j, dry_run=dry_run)
        total_objects += res.objects
        total_bytes += res.bytes
        total_tmp += res.tmp_files
        if res.objects or res.tmp_files:
            what = f"{res.objects} object(s), {human_bytes(res.bytes)}, {res.tmp_files} tmp file(s)"
            out.print(f"{j}: {verb} {what}", markup=False)
    if dry_run and total_sets:
        out.print(
            "(the objects that only those parts name are counted once the parts are removed)",
            markup=False,
        )
    if not total_objects and not total_tmp and not total_sets:
        where = store.root if job is None else f"job {job!r}"
        out.print(f"nothing to collect in {where}: every object is referenced", markup=False)


@click.command("pin", cls=StepCommand)
@click.argument("job")
@click.argument("step", type=STEP)
@store_options
def pin_cmd(job: str, step: int | str, root: str | None, config: str | None) -> None:
    """Protect checkpoint JOB STEP from retention and the disk guard.

    STEP is a step number, 'latest' (the checkpoint committed last) or 'highest'.
    """
    store = open_store(root, config)
    store.check_store()
    resolved = store.resolve_step(job, step)
    store.pin(job, resolved)
    out.print(f"pinned {job} step {resolved}", markup=False)


@click.command("unpin", cls=StepCommand)
@click.argument("job")
@click.argument("step", type=STEP)
@store_options
def unpin_cmd(job: str, step: int | str, root: str | None, config: str | None) -> None:
    """Release a pin; retention may delete the checkpoint again.

    A checkpoint that is not pinned stays so (exit 0). A step that is neither pinned nor a
    checkpoint is a NotFoundError: most likely a typo.
    """
    store = open_store(root, config)
    store.check_store()
    validate_job_name(job)
    resolved = store.resolve_step(job, step) if isinstance(step, str) else step
    if store.unpin(job, resolved):
        out.print(f"unpinned {job} step {resolved}", markup=False)
        return
    pinned = ", ".join(map(str, sorted(store.pinned_steps(job)))) or "none"
    if resolved in store.steps(job):
        out.print(f"{job} step {resolved} was not pinned (pinned steps: {pinned})", markup=False)
        return
    existing = ", ".join(map(str, store.steps(job))) or "none"
    raise NotFoundError(
        f"job {job!r} has neither a checkpoint nor a pin at step {resolved} under {store.root} "
        f"(steps: {existing}; pinned steps: {pinned})"
    )


@click.command("prune")
@click.argument("job", required=False)
@click.option("--dry-run", is_flag=True, help="Show what retention would delete, delete nothing.")
@store_options
def prune_cmd(job: str | None, dry_run: bool, root: str | None, config: str | None) -> None:
    """Apply retention now (of JOB, or of every job): delete what no rule keeps, then GC.

    Nothing to prune is not an error (exit 0): run it from cron as often as you like.
    """
    cfg = load_config(config)  # for the retention policies
    store = open_store(root, config)
    store.check_store()
    if job is not None:
        require_job(store, job)
    jobs = [job] if job else store.jobs()
    total = 0
    for j in jobs:
        policy = cfg.policy_for(j, store.job_info(j).get("retention"))
        res = prune(store, j, policy, dry_run=dry_run)
        total += len(res.deleted)
        verb = "would delete" if dry_run else "deleted"
        if res.deleted:
            freed = f", freed {human_bytes(res.gc.bytes)}" if res.gc else ""
            out.print(
                f"{j}: {verb} steps {', '.join(map(str, res.deleted))}{freed} "
                f"(policy: {policy.describe()})",
                markup=False,
            )
    if not total:
        where = store.root if job is None else f"job {job!r}"
        out.print(
            f"nothing to prune in {where}: every checkpoint is kept by a retention rule",
            markup=False,
        )
