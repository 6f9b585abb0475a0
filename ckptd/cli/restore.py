"""``ckptd restore``: export a checkpoint to a torch or safetensors file.

Every byte is verified before it is written out (:func:`ckptd.format.restore.load_checkpoint`);
``--fallback`` with ``latest`` takes the newest checkpoint that verifies. ``ckptd restore`` never
unpickles: a checkpoint stored with pickled values is refused with how to load it in Python.
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
    store_options,
)
from ckptd.errors import CorruptCheckpointError
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
@store_options
def restore_cmd(
    job: str,
    step: int | str,
    output: str,
    fmt: str,
    fallback: bool,
    root: str | None,
    config: str | None,
) -> None:
    """Export checkpoint JOB STEP (default latest) to a torch or safetensors file.

    STEP is a step number, 'latest' (the checkpoint committed last) or 'highest'.
    """
    store = open_store(root, config)
    store.check_store()
    resolved: int | str = "latest" if step == "latest" else store.resolve_step(job, step)
    try:
        total = store.read_manifest(job, store.resolve_step(job, resolved)).raw_bytes
    except CorruptCheckpointError:
        if not fallback:
            raise
        total = 0  # --fallback skips the damaged latest manifest below
    with progress_bar(total, f"restore {job}") as advance:
        loaded = load_checkpoint(store, job, resolved, fallback=fallback, progress=advance)
    size = export_file(loaded, Path(output), fmt)
    out.print(
        f"wrote {output} ({fmt}, {human_bytes(size)}) from {job} step {loaded.step}", markup=False
    )
