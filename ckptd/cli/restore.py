"""``ckptd restore``: export a checkpoint to a torch or safetensors file.

Every byte is verified before it is written out (:func:`ckptd.format.restore.load_checkpoint`);
``--fallback`` with ``latest`` takes the newest checkpoint that verifies. ``ckptd restore`` never
unpickles: a checkpoint stored with pickled values is refused with how to load it in Python.
``--root s3://bucket/prefix`` restores from the object-store tier with no local copy: each object
is verified as it comes in (:mod:`ckptd.tier.mirror`).

A step written by several ranks is exported one rank at a time (``--rank R``): each rank's part is
the state that rank handed off. Without ``--rank`` such a step is refused, naming its world size.
"""

from __future__ import annotations

from pathlib import Path

import click

from ckptd.cli.common import (
    STEP,
    StepCommand,
    human_bytes,
    open_store,
    out,
    progress_bar,
    rank_option,
    store_options,
)
from ckptd.errors import CorruptCheckpointError, RankLayoutError
from ckptd.format.export import export_file
from ckptd.format.restore import load_checkpoint


@click.command("restore", cls=StepCommand)
@click.argument("job")
@click.argument("step", default="latest", type=STEP)
@click.option("-o", "--output", "output", required=True, metavar="FILE", help="File to write.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["torch", "safetensors"]),
    default="torch",
    show_default=True,
)
@click.option(
    "--fallback", is_flag=True, help="With 'latest': use the newest checkpoint that verifies."
)
@rank_option("export")
@store_options
def restore_cmd(
    job: str,
    step: int | str,
    output: str,
    fmt: str,
    fallback: bool,
    rank: int | None,
    root: str | None,
    config: str | None,
) -> None:
    """Export checkpoint JOB STEP (default latest) to a torch or safetensors file.

    STEP is a step number, 'latest' (the checkpoint committed last) or 'highest'. A step
    written by several ranks needs --rank R: the file holds the state rank R handed off.
    """
    store = open_store(root, config)
    store.check_store()
    resolved: int | str = "latest" if step == "latest" else store.resolve_step(job, step)
    try:
        record = store.read_manifest(job, store.resolve_step(job, resolved))
    except CorruptCheckpointError:
        if not fallback:
            raise
        record = None  # --fallback skips the damaged latest manifest below
    if record is not None and record.is_global and rank is None:
        raise RankLayoutError(
            f"job {job!r} step {record.step} was written by {record.world_size} ranks; export "
            f"one rank's part with --rank R (0 to {record.world_size - 1}), or load the whole "
            "step at any world size in Python with ckptd_client.dcp.CkptdStorageReader"
        )
    total = 0
    if record is not None and record.is_global and rank is not None:
        try:
            total = store.read_part(job, record.step, rank, record).raw_bytes
        except CorruptCheckpointError:
            if not fallback:
                raise
    elif record is not None:
        total = record.raw_bytes
    with progress_bar(total, f"restore {job}") as advance:
        loaded = load_checkpoint(
            store, job, resolved, fallback=fallback, progress=advance, rank=rank
        )
    m = loaded.manifest
    of_rank = f" rank {m.rank} of {m.world_size}" if m.attempt is not None else ""
    size = export_file(loaded, Path(output), fmt)
    out.print(
        f"wrote {output} ({fmt}, {human_bytes(size)}) from {job} step {loaded.step}{of_rank}",
        markup=False,
    )
