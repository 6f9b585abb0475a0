"""``ckptd list`` and ``ckptd show``: what the store holds, and why retention keeps it.

Read-only: neither command changes the store. ``list`` of an empty store (or job) says so and
exits 0; an unreadable manifest is printed on stderr and makes it exit with the corrupt-checkpoint
code once everything readable was listed.
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
    err,
    human_bytes,
    open_store,
    out,
    require_job,
    say,
    store_options,
)
from ckptd.config import load_config
from ckptd.errors import CorruptCheckpointError
from ckptd.format.manifest import Manifest
from ckptd.format.skeleton import iter_keys
from ckptd.policy.prune import job_facts
from ckptd.policy.retention import decide

FOLDED_MIN = 12
"""Columns that fold (job, kept by) need at least this much to stay readable."""


def table_fits(columns: list[str], rows: list[list[str]], width: int) -> bool:
    """Whether a ``list`` table of ``rows`` fits ``width`` columns without squeezing a column
    that does not fold (rich would cut it to "…" or drop the job column altogether)."""
    need = 0
    for i, col in enumerate(columns):
        natural = max([len(col), *(len(row[i]) for row in rows)])
        need += (min(natural, FOLDED_MIN) if col in ("job", "kept by") else natural) + 3
    return need - 1 <= width


def short_digest(digest: str | None) -> str:
    """The first 12 hex digits (like a short git hash), or "-" for a manifest without one."""
    return digest[:12] if digest else "-"


def summary(m: Manifest) -> dict[str, Any]:
    """The ``list --json`` record of a checkpoint."""
    metric = m.metric if m.metric is None or math.isfinite(m.metric) else str(m.metric)
    return {
        "job": m.job,
        "step": m.step,
        "created": m.created,
        "raw_bytes": m.raw_bytes,
        "stored_bytes": m.stored_bytes,
        "written_bytes": m.written_bytes,
        "ratio": round(m.stored_bytes / m.raw_bytes, 4) if m.raw_bytes else None,
        "tensors": len(m.tensors),
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
            policy = cfg.policy_for(j, store.job_info(j).get("retention"))
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
        out.print(f"no {what} under {store.root}", markup=False)
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
                    str(len(m.tensors)),
                    "-" if m.metric is None else f"{m.metric:.6g}",
                    short_digest(m.digest),
                    ", ".join(kept.get((m.job, m.step), [])) or "(prunable)",
                ]
            )
        if not table_fits(columns, rows, out.width):
            # The digest goes first on a narrow terminal (`show` and --json carry it), so
            # that job and step stay readable.
            i = columns.index("digest")
            del columns[i]
            for row in rows:
                del row[i]
        table = Table(title=f"checkpoints in {store.root}", box=box.HEAVY_HEAD, show_edge=False)
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@store_options
def show_cmd(
    job: str, step: int | str, as_json: bool, root: str | None, config: str | None
) -> None:
    """Show the tensors and state keys of checkpoint JOB STEP.

    STEP is a step number, 'latest' (the most recently committed) or 'highest'.
    """
    store = open_store(root, config)
    store.check_store()
    m = store.read_manifest(job, store.resolve_step(job, step))
    keys = iter_keys(m.skeleton)
    if as_json:
        doc = summary(m) | {
            "tensors": [
                {"path": t.path, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
                for t in m.tensors
            ],
            "keys": keys,
        }
        out.print_json(json.dumps(doc))
        return
    s = summary(m)
    out.print(
        f"{m.job} step {m.step}  created {m.created}  {len(m.tensors)} tensors  "
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
