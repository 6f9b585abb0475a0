"""``ckptd list`` and ``ckptd show``: what the store holds, and why retention keeps it.

Read-only: neither command changes the store. ``list`` of an empty store (or job) says so and
exits 0; an unreadable manifest is printed on stderr and makes it exit with the corrupt-checkpoint
code once everything readable was listed.

A step written by several ranks is one checkpoint: ``list`` gives its world size and its totals
over every rank (from its global record, without reading the parts); ``show`` lists its parts,
and ``show --rank R`` one rank's tensors. Steps still waiting for ranks are not checkpoints (they
are not visible): ``ckptd status`` shows them.
"""

from __future__ import annotations

import json
import math
from typing import Any

import click
from rich import box
from rich.table import Table
from rich.text import Text

from ckptd.cli.common import (
    STEP,
    StepCommand,
    cli_words,
    err,
    human_bytes,
    open_store,
    out,
    rank_option,
    read_parts,
    require_job,
    say,
    store_name,
    store_options,
)
from ckptd.config import Config, load_config
from ckptd.errors import CorruptCheckpointError, RankLayoutError
from ckptd.format.manifest import Manifest
from ckptd.format.skeleton import iter_keys
from ckptd.format.store import Store
from ckptd.policy.prune import job_facts
from ckptd.policy.retention import RetentionPolicy, decide
from ckptd.tier.mirror import TierStore

FOLDED_MIN = 12
"""Columns that fold (job, kept by) need at least this much to stay readable."""
NARROW_DROPS = ("digest", "ratio", "tensors", "metric", "created")
"""The columns left out, in this order, while a ``list`` table does not fit the terminal (``show``
and ``--json`` carry them), so that job, step and what keeps each checkpoint stay readable."""


def table_fits(columns: list[str], rows: list[list[str]], width: int) -> bool:
    """Whether a ``list`` table of ``rows`` fits ``width`` columns without squeezing a column
    that does not fold (rich would cut it to "…" or drop the job column altogether)."""
    need = 0
    for i, col in enumerate(columns):
        natural = max([len(col), *(len(row[i]) for row in rows)])
        need += (min(natural, FOLDED_MIN) if col in ("job", "kept by") else natural) + 3
    return need - 1 <= width


def drop_column(columns: list[str], rows: list[list[str]], name: str) -> None:
    i = columns.index(name)
    del columns[i]
    for row in rows:
        del row[i]


def short_digest(digest: str | None) -> str:
    """The first 12 hex digits (like a short git hash), or "-" for a manifest without one."""
    return digest[:12] if digest else "-"


def retention_of(cfg: Config, store: Store, job: str) -> RetentionPolicy:
    """The retention that applies to ``job`` in ``store``: a local store's (the config's, then
    what the job's client recorded), or for the tier the tier's own ``[tier.retention]`` when the
    config's tier for the job is that URL (else no policy: nothing prunes it from here)."""
    if isinstance(store, TierStore):
        tier = cfg.tier_for(job)
        return tier.retention if tier is not None and tier.url == store.url else RetentionPolicy()
    return cfg.policy_for(job, store.job_info(job).get("retention"))


def summary(m: Manifest) -> dict[str, Any]:
    """The ``list --json`` record of a checkpoint (of a multi-rank step: its totals over every
    rank, from its global record)."""
    metric = m.metric if m.metric is None or math.isfinite(m.metric) else str(m.metric)
    written = m.part_totals[3] if m.is_global else m.written_bytes
    return {
        "job": m.job,
        "step": m.step,
        "created": m.created,
        "world_size": m.world_size,
        "raw_bytes": m.raw_bytes,
        "stored_bytes": m.stored_bytes,
        "written_bytes": written,
        "ratio": round(m.stored_bytes / m.raw_bytes, 4) if m.raw_bytes else None,
        "tensors": m.tensor_count,
        "metric": metric,
        "digest": m.digest,
    }


@click.command("list")
@click.argument("job", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array for scripts.")
@store_options
def list_cmd(job: str | None, as_json: bool, root: str | None, config: str | None) -> None:
    """List checkpoints (of JOB, or of every job).

    The step committed last is marked "(latest)" when it is not the highest step (a run resumed
    from an earlier checkpoint); `--json` marks it with "latest": true in every case.
    """
    cfg = load_config(config)  # for the retention policies
    store = open_store(root, config)
    store.check_store()
    if job is not None:
        require_job(store, job)
    jobs = [job] if job else store.jobs()
    manifests = []
    broken = []
    kept: dict[tuple[str, int], list[str]] = {}
    latest: dict[str, int] = {}
    for j in jobs:
        steps = store.steps(j)
        readable = True
        for step in steps:
            try:
                manifests.append(store.read_manifest(j, step))
            except CorruptCheckpointError as exc:
                broken.append(str(exc))
                readable = False
        if readable and steps:  # retention and commit order need every manifest of the job
            policy = retention_of(cfg, store, j)
            for step, why in decide(policy, job_facts(store, j)).items():
                kept[(j, step)] = why
            latest[j] = store.resolve_step(j, "latest")
    if as_json:
        docs = [
            summary(m)
            | {"latest": latest.get(m.job) == m.step, "kept_by": kept.get((m.job, m.step), [])}
            for m in manifests
        ]
        out.print_json(json.dumps(docs))
    elif not manifests and not broken:
        what = "checkpoints" if job is None else f"checkpoints of job {job!r}"
        out.print(f"no {what} under {store_name(store)}", markup=False)
    else:
        highest = {m.job: m.step for m in manifests}  # manifests come in step order
        columns = [
            "job",
            "step",
            "created",
            "raw",
            "stored",
            "ratio",
            "tensors",
            "ranks",
            "metric",
            "digest",
            "kept by",
        ]
        rows = []
        for m in manifests:
            s = summary(m)
            mark = " (latest)" if latest.get(m.job) == m.step != highest[m.job] else ""
            rows.append(
                [
                    m.job,
                    f"{m.step}{mark}",
                    m.created.replace("T", " ")[:16],
                    human_bytes(m.raw_bytes),
                    human_bytes(m.stored_bytes),
                    f"{s['ratio']:.3f}" if s["ratio"] is not None else "-",
                    str(m.tensor_count),
                    str(m.world_size),
                    "-" if m.metric is None else f"{m.metric:.6g}",
                    short_digest(m.digest),
                    ", ".join(kept.get((m.job, m.step), [])) or "(prunable)",
                ]
            )
        if all(m.world_size == 1 for m in manifests):
            drop_column(columns, rows, "ranks")  # only where some step has several ranks
        for col in NARROW_DROPS:
            if table_fits(columns, rows, out.width):
                break
            drop_column(columns, rows, col)
        table = Table(
            title=f"checkpoints in {store_name(store)}", box=box.HEAVY_HEAD, show_edge=False
        )
        for col in columns:
            # Values never shrink (rich would blank them); job names and "kept by" fold instead.
            fold = col in ("job", "kept by")
            table.add_column(
                col,
                justify="left" if col in ("job", "created", "digest", "kept by") else "right",
                no_wrap=not fold,
                overflow="fold" if fold else "ellipsis",
            )
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        out.print(table)
    for msg in broken:
        say(err, "unreadable manifest:", "red", msg)
    if broken:
        raise CorruptCheckpointError(f"{len(broken)} manifest(s) could not be read")


@click.command("show", cls=StepCommand)
@click.argument("job")
@click.argument("step", type=STEP)
@rank_option("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@store_options
def show_cmd(
    job: str,
    step: int | str,
    rank: int | None,
    as_json: bool,
    root: str | None,
    config: str | None,
) -> None:
    """Show the tensors and state keys of checkpoint JOB STEP.

    STEP is a step number, 'latest' (the most recently committed) or 'highest'. A step written
    by several ranks shows its parts (one per rank); --rank R shows rank R's tensors and keys.
    """
    store = open_store(root, config)
    store.check_store()
    m = store.read_manifest(job, store.resolve_step(job, step))
    if m.is_global and rank is None:
        show_parts(store, m, as_json)
        return
    if rank is not None:
        if not m.is_global and rank != 0:
            raise RankLayoutError(
                f"job {job!r} step {m.step} was written by one process; it has no rank {rank} "
                "(show it without --rank)"
            )
        if m.is_global:
            m = store.read_part(job, m.step, rank, m)
    keys = iter_keys(m.skeleton)
    if as_json:
        doc = summary(m)
        if m.attempt is not None:
            doc |= {"rank": m.rank, "attempt": m.attempt}
        doc |= {
            "tensors": [
                {"path": t.path, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
                for t in m.tensors
            ],
            "keys": keys,
        }
        out.print_json(json.dumps(doc))
        return
    s = summary(m)
    of_rank = f" rank {m.rank} of {m.world_size}" if m.attempt is not None else ""
    out.print(
        f"{m.job} step {m.step}{of_rank}  created {m.created}  {len(m.tensors)} tensors  "
        f"raw {human_bytes(m.raw_bytes)}  stored {human_bytes(m.stored_bytes)} "
        f"(ratio {s['ratio']})  metric {s['metric']}",
        markup=False,
    )
    out.print(f"digest {m.digest or '- (written before checkpoints had one)'}", markup=False)
    table = Table()
    for col in ("path", "dtype", "shape", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for t in m.tensors:
        table.add_row(Text(t.path), t.dtype, Text(str(list(t.shape))), human_bytes(t.nbytes))
    out.print(table)
    out.print("[bold]state keys[/]")
    for k in keys:
        out.print(f"  {k}", markup=False)


def show_parts(store: Store, m: Manifest, as_json: bool) -> None:
    """``ckptd show`` of a multi-rank step: its totals and one line per rank's part. A part
    that is missing or damaged is shown as such, and makes the command exit with the
    corrupt-checkpoint code (the step no longer restores: ``ckptd verify`` checks its bytes)."""
    found = read_parts(store, m)
    if as_json:
        parts: list[dict[str, Any]] = []
        for f in found:
            doc: dict[str, Any] = {"rank": f.rank, "record": f.record}
            if f.part is None:
                doc["problem"] = f.problem
            else:
                doc |= {
                    "tensors": len(f.part.tensors),
                    "raw_bytes": f.part.raw_bytes,
                    "stored_bytes": f.part.stored_bytes,
                    "digest": f.part.digest,
                }
            parts.append(doc)
        out.print_json(json.dumps(summary(m) | {"attempt": m.attempt, "parts": parts}))
    else:
        s = summary(m)
        out.print(
            f"{m.job} step {m.step}  created {m.created}  {m.world_size} ranks (attempt "
            f"{m.attempt})  {m.tensor_count} tensors  raw {human_bytes(m.raw_bytes)}  stored "
            f"{human_bytes(m.stored_bytes)} (ratio {s['ratio']})  metric {s['metric']}",
            markup=False,
        )
        out.print(f"digest {m.digest or '-'}", markup=False)
        table = Table()
        for col in ("rank", "tensors", "raw", "stored", "part"):
            table.add_column(col, justify="left" if col == "part" else "right")
        for f in found:
            if f.part is None:
                table.add_row(str(f.rank), "-", "-", "-", Text(f"{f.record} (unreadable)"))
            else:
                table.add_row(
                    str(f.rank),
                    str(len(f.part.tensors)),
                    human_bytes(f.part.raw_bytes),
                    human_bytes(f.part.stored_bytes),
                    Text(f.record),
                )
        out.print(table)
        out.print(
            f"one rank's tensors and keys: ckptd show {m.job} {m.step} --rank R", markup=False
        )
    bad = [f for f in found if f.part is None]
    for f in bad:
        say(err, f"rank {f.rank}:", "red", cli_words(f.problem or ""))
    if bad:
        raise CorruptCheckpointError(
            f"job {m.job!r} step {m.step}: the part(s) of rank(s) "
            f"{', '.join(str(f.rank) for f in bad)} cannot be read; the step does not restore"
        )
