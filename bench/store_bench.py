"""Store benchmark: saving and restoring a training state with ckptd, torch.save and safetensors.

The state is a transformer language model (fp32; ~87M parameters for ``--size 1GiB``) plus its
AdamW state after one real step: ``{"model": state_dict, "optimizer": state_dict}``, about
``--size`` bytes of tensors in all (4 bytes per parameter for the weights, 8 for Adam's moments).
``--size minilm`` is the real all-MiniLM-L6-v2 with its AdamW after 30 real fine-tuning steps
(:mod:`bench.minilm`; 22.7M parameters, 273 MB).

Save methods (each writes a fresh directory, so ckptd never dedups against an earlier rep):

* ``ckptd``: ``ckptd_client.save(job, state=state, rng=False, config=Config())``: the write
  pipeline with the default codec (byte grouping + zstd), every object fsynced, then the manifest;
* ``ckptd-raw``: the same with ``Config(codec=CodecConfig(codec="raw"))``;
* ``torch.save``: ``torch.save(state, path)`` then ``fsync`` of the file;
* ``safetensors``: the state's tensors as one flat dict (``optimizer.param_groups`` as JSON in the
  metadata) written by ``safetensors.torch.save_file`` then ``fsync`` of the file.

Restore methods, each followed by reading every byte of every tensor (inside the timing; this is
what makes safetensors' lazy mmap pay for its reads) and, untimed, a bit-exact comparison with the
saved state:

* ``ckptd`` / ``ckptd-raw``: ``ckptd_client.load(job)`` (every object's BLAKE3 hash verified);
* ``torch.load``: ``torch.load(path, weights_only=True)``;
* ``safetensors``: ``safetensors.torch.load_file(path)`` (mmap backend, the default).

Restores run twice per rep: ``warm`` (the files are still in the page cache from the save) and
``cold`` (``posix_fadvise(DONTNEED)`` on every file first, so they are read from the disk; on a VM
the host may still cache them). Methods are interleaved and their order rotates each rep.

Run: ``.venv/bin/python -m bench.store_bench [--size 64MiB|256MiB|1GiB|minilm] [--reps N]
[--quick]``.

A/B of a write-pipeline change: ``--baseline-pipeline REF`` (e.g. ``HEAD``) adds the method
``ckptd@REF``: ``ckptd`` again, but saving through ``ckptd/pipeline/write.py`` as it is at git
``REF`` (loaded from ``git show`` into a module of its own; client, store, codec and reader are the
working tree's). It is interleaved with the other methods like any of them, and the per-rep ratio
of ``ckptd`` to ``ckptd@REF`` save seconds is printed. Use ``--out`` so the A/B run does not
replace the committed results.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as nnf
from safetensors.torch import load_file, save_file

import ckptd_client
import ckptd_client.api
from bench._common import (
    MB,
    REPO,
    JsonLines,
    MiB,
    Quiet,
    Repeated,
    Spread,
    add_quiet_args,
    add_run_args,
    bench_parser,
    default_out,
    drop_ckptd_env,
    log,
    markdown_table,
    mount_of,
    quiet_of,
    repeat,
    reps_of,
    rotated,
    run_info,
    scratch,
    show_cpu,
    timer,
    touch_every_byte,
)
from bench.minilm import fine_tuned
from bench.states import TransformerLM, tensors_of
from ckptd.config import Config
from ckptd.format.codec import CodecConfig
from ckptd.units import parse_size

MINILM_STEPS = 30
SIZES = {"64MiB": 64 * MiB, "256MiB": 256 * MiB, "1GiB": 1024 * MiB}
QUICK_SIZE = 4 * MiB
JOB = "bench"
State = dict[str, Any]


# ---- the state --------------------------------------------------------------------------------


def shape_for(size: int) -> tuple[int, int, int]:
    """(vocab, dim, layers) of a model whose weights + AdamW state take about ``size`` bytes."""
    params = size // 12  # 4 bytes of weight + 8 of exp_avg / exp_avg_sq per parameter
    dim = (
        768 if size >= 512 * MiB else 512 if size >= 128 * MiB else 256 if size >= 16 * MiB else 64
    )
    vocab = max(256, params // 4 // dim)  # a quarter of the parameters in the embedding
    per_layer = 12 * dim * dim + 13 * dim
    layers = max(1, round((params - vocab * dim) / per_layer))
    return vocab, dim, layers


def make_state(size: int) -> tuple[State, int]:
    """The model's and its AdamW's state dicts after one real step; and the parameter count."""
    vocab, dim, layers = shape_for(size)
    torch.manual_seed(0)
    model = TransformerLM(vocab, dim, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (2, 33))
    loss = nnf.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    opt.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in model.parameters())
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}, n_params


def minilm_state() -> tuple[State, int]:
    model, opt = fine_tuned(MINILM_STEPS)
    n_params = sum(p.numel() for p in model.parameters())
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}, n_params


def named_tensors(obj: object, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested state, with its dotted key path."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from named_tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from named_tensors(v, f"{path}.{i}" if path else str(i))


def to_flat(state: State) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state as safetensors takes it: a flat name -> tensor dict plus string metadata."""
    flat = dict(named_tensors(state))
    meta = {"param_groups": json.dumps(state["optimizer"]["param_groups"])}
    return flat, meta


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def same_state(got: object, want: object) -> bool:
    """Bit-exact equality of nested states (tensors by their bytes, other values with ==)."""
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and bit_equal(got, want)
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and set(got) == set(want)
            and all(same_state(got[k], want[k]) for k in want)
        )
    if isinstance(want, list | tuple):
        return (
            type(got) is type(want)
            and len(got) == len(want)
            and all(same_state(g, w) for g, w in zip(got, want, strict=True))
        )
    return bool(got == want)


def state_bytes(state: State) -> int:
    return sum(t.nbytes for t in tensors_of(state))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_cache(path: Path) -> None:
    """Evict the (clean, fsynced) pages of every file under ``path`` from the page cache."""
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- methods ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A way to save the state into a directory and to load it back.

    ``load`` returns what the library returns; ``expected`` maps the original state to what that
    should equal bit for bit (the state itself, or safetensors' flat dict)."""

    name: str
    save_label: str
    load_label: str
    save: Callable[[State, Path], None]
    load: Callable[[Path], object]
    expected: Callable[[State], object] = lambda state: state

    def label(self, phase: str) -> str:
        return self.save_label if phase == "save" else self.load_label


def ckptd_method(name: str, config: Config, pipeline: ModuleType | None = None) -> Method:
    """``ckptd_client.save`` / ``load``; with ``pipeline``, saving through that module's
    ``write_checkpoint`` instead of ``ckptd.pipeline.write``'s."""

    def save(state: State, d: Path) -> None:
        with ExitStack() as stack:
            if pipeline is not None:
                stack.enter_context(
                    mock.patch.object(
                        ckptd_client.api, "write_checkpoint", pipeline.write_checkpoint
                    )
                )
            ckptd_client.save(JOB, state=state, step=1, rng=False, root=d, config=config)

    def load(d: Path) -> object:
        return ckptd_client.load(JOB, root=d)

    return Method(name, f"{name} save", f"{name} load", save, load)


def torch_save(state: State, d: Path) -> None:
    path = d / "state.pt"
    torch.save(state, path)
    fsync_file(path)


def torch_load(d: Path) -> object:
    return torch.load(d / "state.pt", weights_only=True)


def st_save(state: State, d: Path) -> None:
    path = d / "state.safetensors"
    flat, meta = to_flat(state)
    save_file(flat, path, metadata=meta)
    fsync_file(path)


def st_load(d: Path) -> object:
    return load_file(d / "state.safetensors")


METHODS = [
    ckptd_method("ckptd", Config()),
    ckptd_method("ckptd-raw", Config(codec=CodecConfig(codec="raw"))),
    Method("torch", "torch.save+fsync", "torch.load", torch_save, torch_load),
    Method(
        "safetensors",
        "save_file+fsync",
        "load_file",
        st_save,
        st_load,
        lambda state: to_flat(state)[0],
    ),
]
REFERENCE = "torch"
PHASES = ("save", "restore-warm", "restore-cold")


def pipeline_at(ref: str) -> ModuleType:
    """``ckptd/pipeline/write.py`` as it is at git ``ref``, imported as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{ref}:ckptd/pipeline/write.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = f"ckptd_pipeline_at_{''.join(c if c.isalnum() else '_' for c in ref)}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    exec(compile(source, f"{ref}:ckptd/pipeline/write.py", "exec"), module.__dict__)
    return module


def add_baseline_pipeline(ref: str) -> str:
    """Add the method ``ckptd@ref`` right after ``ckptd``; return its name."""
    name = f"ckptd@{ref}"
    index = next(i for i, m in enumerate(METHODS) if m.name == "ckptd")
    METHODS.insert(index + 1, ckptd_method(name, Config(), pipeline_at(ref)))
    return name


@dataclass
class Cell:
    seconds: list[float] = field(default_factory=list)
    vs_ref: list[float] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class RepResult:
    seconds: dict[tuple[str, str], float]  # (phase, method) -> seconds
    stored: dict[str, int]  # method -> bytes on disk
    exact: dict[tuple[str, str], bool]  # (restore phase, method) -> bit-exact


def one_rep(state: State, rep: int, base: Path) -> RepResult:
    """Every method saves into a fresh directory, then every method restores warm, then cold; the
    method order rotates with ``rep``; the rep's files are deleted at its end."""
    rep_dir = Path(tempfile.mkdtemp(prefix=f"rep{rep}-", dir=base))
    result = RepResult({}, {}, {})
    try:
        order = rotated(METHODS, rep)
        for m in order:
            d = rep_dir / m.name
            d.mkdir()
            gc.collect()
            with timer() as t:
                m.save(state, d)
            result.seconds["save", m.name] = t[0]
            result.stored[m.name] = dir_bytes(d)
        for phase in ("restore-warm", "restore-cold"):
            for m in order:
                d = rep_dir / m.name
                if phase == "restore-cold":
                    drop_cache(d)
                gc.collect()
                with timer() as t:
                    loaded = m.load(d)
                    for tensor in tensors_of(loaded):
                        touch_every_byte(tensor)
                result.seconds[phase, m.name] = t[0]
                result.exact[phase, m.name] = same_state(loaded, m.expected(state))
                del loaded
    finally:
        shutil.rmtree(rep_dir)
    log(", ".join(f"{ph} {nm} {s:.2f}s" for (ph, nm), s in result.seconds.items()))
    return result


def run(
    state: State, reps: int, base: Path, warmup: bool, quiet: Quiet
) -> tuple[dict[tuple[str, str], Cell], Repeated[RepResult]]:
    done = repeat(reps, warmup, quiet, lambda rep: one_rep(state, rep, base))
    cells = {(ph, m.name): Cell() for ph in PHASES for m in METHODS}
    for r in done.reps:
        for (phase, name), s in r.seconds.items():
            cell = cells[phase, name]
            cell.seconds.append(s)
            cell.vs_ref.append(s / r.seconds[phase, REFERENCE])
            if phase == "save":
                cell.stored.append(r.stored[name])
            else:
                cell.exact.append(r.exact[phase, name])
    return cells, done


def report(
    cells: dict[tuple[str, str], Cell], raw: int, reps: int, info: dict[str, Any], out: JsonLines
) -> bool:
    rows = []
    all_exact = True
    by_name = {m.name: m for m in METHODS}
    for (phase, name), cell in cells.items():
        method, ref = by_name[name], by_name[REFERENCE]
        secs, ratio = Spread.of(cell.seconds), Spread.of(cell.vs_ref)
        stored = cell.stored[0] if cell.stored else None
        exact: bool | None = all(cell.exact) if cell.exact else None
        all_exact &= exact is not False
        rows.append(
            [
                phase,
                method.label(phase),
                secs.text(2),
                ratio.text(2),
                f"{raw / MB / secs.median:.0f}",
                f"{stored / MB:.0f}" if stored is not None else "",
                f"{stored / raw:.3f}" if stored is not None else "",
                "" if exact is None else ("yes" if exact else "NO"),
            ]
        )
        out.write(
            {
                **info,
                "kind": "store",
                "phase": phase,
                "method": name,
                "label": method.label(phase),
                "reference": ref.label(phase),
                "raw_bytes": raw,
                "seconds": secs.as_json(),
                "vs_reference": ratio.as_json(),
                "stored_bytes": stored,
                "exact": exact,
            }
        )
    print(
        f"\n### Store benchmark: {raw / MB:.0f} MB state ({info['params'] / 1e6:.1f}M params + "
        f"AdamW), median [min-max] of {reps} rep(s)\n\n"
        f"dir: {info['dir']} ({info['filesystem']}); × ref = seconds / seconds of "
        "torch.save+fsync (save) or torch.load (restore) in the same rep; MB/s = state MB / "
        "median seconds\n\n"
        f"other processes' CPU use per rep: {', '.join(map(show_cpu, info['foreign_cpu']))}"
        f" ({info['redone_reps']} rep(s) redone because of them)\n"
    )
    print(
        markdown_table(
            ["phase", "method", "seconds", "× ref", "MB/s", "stored MB", "stored/raw", "exact"],
            rows,
        )
    )
    for baseline in (m.name for m in METHODS if m.name.startswith("ckptd@")):
        new, old = cells["save", "ckptd"].seconds, cells["save", baseline].seconds
        ratio = Spread.of([n / o for n, o in zip(new, old, strict=True)])
        print(
            f"\nsave, ckptd / {baseline} (working tree / baseline pipeline) per rep: "
            f"{ratio.text(3)}; medians {Spread.of(new).text(3)} s / {Spread.of(old).text(3)} s"
        )
        out.write({**info, "kind": "pipeline_ab", "baseline": baseline, "ratio": ratio.as_json()})
    return all_exact


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument(
        "--size",
        default="1GiB",
        help="state size: 64MiB, 256MiB, 1GiB (or any), or minilm (all-MiniLM-L6-v2 + AdamW)",
    )
    add_run_args(
        ap,
        quick=f"a {QUICK_SIZE >> 20} MiB state, 1 rep",
        reps="repetitions (default 5; quick 1)",
    )
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: $TMPDIR)")
    ap.add_argument(
        "--baseline-pipeline",
        metavar="REF",
        default=None,
        help=(
            "also save through ckptd/pipeline/write.py as of git REF (method ckptd@REF), "
            "interleaved"
        ),
    )
    add_quiet_args(ap)
    args = ap.parse_args(argv)
    if args.baseline_pipeline:
        add_baseline_pipeline(args.baseline_pipeline)
    minilm = args.size == "minilm" and not args.quick
    size = (
        QUICK_SIZE
        if args.quick or minilm
        else SIZES.get(args.size) or parse_size(args.size, "--size")
    )
    reps = reps_of(args, 5)
    parent = args.dir or Path(tempfile.gettempdir())
    drop_ckptd_env()

    info = run_info("store_bench", args.quick)
    info.update(dir=str(parent.resolve()), filesystem=mount_of(parent))
    if minilm:
        log(f"fine-tuning all-MiniLM-L6-v2 for {MINILM_STEPS} AdamW steps ...")
    else:
        log(f"building a ~{size / MiB:.0f} MiB state (vocab, dim, layers = {shape_for(size)}) ...")
    with timer() as t:
        state, n_params = minilm_state() if minilm else make_state(size)
    raw = state_bytes(state)
    info.update(
        size="minilm" if minilm else size,
        params=n_params,
        state_bytes=raw,
        tensors=len(list(tensors_of(state))),
    )
    log(f"  {n_params / 1e6:.1f}M params, {raw / MB:.0f} MB of tensors, {t[0]:.1f}s")
    name = "store_bench" if args.quick else f"store_bench-{args.size}"
    out = JsonLines(args.out or default_out(name, args.quick))
    with scratch(parent, "ckptd-store-bench-") as base:
        cells, done = run(state, reps, base, not args.quick, quiet_of(args))
    info.update(
        foreign_cpu=done.foreign, redone_reps=done.redone, loadavg_end=list(os.getloadavg())
    )
    exact = report(cells, raw, reps, info, out)
    out.close()
    print(
        f"\n{n_params / 1e6:.1f}M params; restores bit-exact: {'all' if exact else 'NOT ALL'}; "
        f"results: {out.path}"
    )
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
