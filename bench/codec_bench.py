"""Codec benchmark: ckptd's codec vs plain zstd-1 vs zipnn on the same float data, in one run.

Data sets (all lossless, every round trip checked bit for bit):

* ``minilm-fp32``: the floating-point tensors of all-MiniLM-L6-v2 (22.7M params; the one int64
  buffer, ``embeddings.position_ids``, 4 KiB, is left out so every codec sees the same float data);
* ``minilm-bf16``: the same tensors cast to bfloat16;
* ``adam-exp_avg`` / ``adam-exp_avg_sq``: AdamW's moment estimates after fine-tuning MiniLM's
  weights for ``--steps`` real steps (a BERT forward written out over the weights, masked-token
  loss through the tied word embeddings plus a pooler loss, synthetic Zipf-distributed tokens).

Methods, all with 2 threads:

* ``ckptd``: :func:`ckptd.format.codec.encode` / :func:`ckptd.format.codec.decode` over the chunks
  the write pipeline would make (:func:`ckptd.pipeline.plan.plan_chunks`, 8 MiB chunks, small
  tensors packed by dtype) on a 2-thread pool, default :class:`CodecConfig`; decode writes into
  pre-touched buffers;
* ``zstd-1``: python-zstandard level 1 (no checksum) on the same chunks and pool; decompression
  streams into the same pre-touched buffers (``stream_reader().readinto``);
* ``zipnn``: ``zipnn.ZipNN(bytearray_dtype=<dtype>, threads=2)`` (all other arguments default) on
  the whole data set as one bytearray (zipnn chunks and threads internally). Its byte-input API
  needs the dtype: the default is ``"bfloat16"``, so fp32 data must say ``"float32"``. zipnn
  reorders its input in place, so every repetition compresses a fresh copy (made untimed);
  decompression returns a new bytearray (its allocation is in the timing).

Run: ``.venv/bin/python -m bench.codec_bench [--quick] [--reps N] [--out PATH]``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zstandard

from bench._common import (
    MB,
    JsonLines,
    MiB,
    Quiet,
    Repeated,
    Spread,
    add_quiet_args,
    add_run_args,
    bench_parser,
    default_out,
    log,
    markdown_table,
    quiet_of,
    repeat,
    reps_of,
    rotated,
    run_info,
    show_cpu,
    timer,
)
from bench.minilm import fine_tuned, minilm_weights
from ckptd.format.codec import CodecConfig, Encoded, decode, encode
from ckptd.pipeline.plan import PipelineConfig, plan_chunks, tensor_source

THREADS = 2
TARGET_RATIO = {"minilm-fp32": 0.83, "minilm-bf16": 0.69}
TARGET_COMPRESS_MBPS = 700.0
TARGET_DECOMPRESS_MBPS = 1500.0
# --quick: one transformer layer's tensors (about 7 MB fp32) instead of the whole model.
QUICK_PREFIX = "encoder.layer.0."

NamedTensors = list[tuple[str, torch.Tensor]]


# ---- data -------------------------------------------------------------------------------------


def adam_state(
    weights: dict[str, torch.Tensor], steps: int, batch: int, seq: int
) -> tuple[NamedTensors, NamedTensors]:
    """Fine-tune the float weights with AdamW; return (exp_avg, exp_avg_sq) in weight order."""
    model, opt = fine_tuned(steps, batch, seq, weights)
    state = [(n, opt.state[p]) for n, p in model.params.items()]
    avg = [(n, s["exp_avg"].detach()) for n, s in state]
    sq = [(n, s["exp_avg_sq"].detach()) for n, s in state]
    return avg, sq


# ---- chunks -----------------------------------------------------------------------------------


@dataclass
class Chunk:
    """One pipeline chunk: its raw bytes, and a pre-touched buffer of that size to decode into."""

    raw: memoryview
    elem_size: int
    is_float: bool
    out: memoryview


@dataclass
class DataSet:
    name: str
    dtype: torch.dtype
    tensors: NamedTensors
    chunks: list[Chunk] = field(default_factory=list)
    whole: bytes = b""

    @property
    def raw_bytes(self) -> int:
        return len(self.whole)


def make_dataset(name: str, tensors: NamedTensors) -> DataSet:
    dtypes = {t.dtype for _, t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"{name}: one dtype expected, got {dtypes}")
    dtype = dtypes.pop()
    sources = [tensor_source(n, t) for n, t in tensors]
    chunks = []
    for plan in plan_chunks(sources, PipelineConfig()):
        if len(plan.pieces) == 1:
            i, off, length = plan.pieces[0]
            raw = sources[i].data[off : off + length]
        else:
            raw = memoryview(b"".join(sources[i].data[o : o + n] for i, o, n in plan.pieces))
        out = memoryview(bytearray(raw))  # a copy: pre-touched, so decoding pays no page faults
        chunks.append(Chunk(raw, dtype.itemsize, dtype.is_floating_point, out))
    whole = b"".join(s.data for s in sources)
    return DataSet(name, dtype, tensors, chunks, whole)


def same(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bool:
    x, y = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    return x.shape == y.shape and bool(np.array_equal(x, y))


# ---- methods ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rep:
    stored_bytes: int
    compress_s: float
    decompress_s: float
    exact: bool


class Method:
    name = ""

    def run(self, data: DataSet, pool: ThreadPoolExecutor) -> Rep:
        raise NotImplementedError


class CkptdCodec(Method):
    name = "ckptd"

    def __init__(self) -> None:
        self.config = CodecConfig()

    def run(self, data: DataSet, pool: ThreadPoolExecutor) -> Rep:
        cfg = self.config

        def enc(c: Chunk) -> Encoded:
            return encode(c.raw, elem_size=c.elem_size, is_float=c.is_float, config=cfg)

        with timer() as tc:
            encoded = list(pool.map(enc, data.chunks))
        blobs = [b"".join(e.parts) for e in encoded]  # what the store reads back from a file
        for c in data.chunks:
            c.out[0] = c.raw[0] ^ 0xFF  # stale: the decoder must write every byte

        def dec(item: tuple[bytes, Chunk]) -> None:
            decode(item[0], item[1].out, where="bench")

        with timer() as td:
            list(pool.map(dec, zip(blobs, data.chunks, strict=True)))
        exact = all(same(c.out, c.raw) for c in data.chunks)
        return Rep(sum(e.stored_bytes for e in encoded), tc[0], td[0], exact)


class Zstd1(Method):
    name = "zstd-1"

    def __init__(self) -> None:
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if comp is None:
            comp = self._local.c = zstandard.ZstdCompressor(level=1, write_checksum=False)
        return comp

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d: zstandard.ZstdDecompressor | None = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def run(self, data: DataSet, pool: ThreadPoolExecutor) -> Rep:
        def comp(c: Chunk) -> bytes:
            return self._compressor().compress(c.raw)

        with timer() as tc:
            frames = list(pool.map(comp, data.chunks))
        for c in data.chunks:
            c.out[0] = c.raw[0] ^ 0xFF

        def dec(item: tuple[bytes, Chunk]) -> None:
            frame, c = item
            with self._decompressor().stream_reader(frame) as reader:
                filled = 0
                while filled < len(c.out):
                    n = reader.readinto(c.out[filled:])
                    if n == 0:
                        raise ValueError("zstd frame ended early")
                    filled += n

        with timer() as td:
            list(pool.map(dec, zip(frames, data.chunks, strict=True)))
        exact = all(same(c.out, c.raw) for c in data.chunks)
        return Rep(sum(map(len, frames)), tc[0], td[0], exact)


class ZipNN(Method):
    name = "zipnn"

    def __init__(self, module: Any) -> None:
        self.module = module

    def run(self, data: DataSet, pool: ThreadPoolExecutor) -> Rep:
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[data.dtype]
        zipper = self.module.ZipNN(bytearray_dtype=dtype, threads=THREADS)
        unzipper = self.module.ZipNN(bytearray_dtype=dtype, threads=THREADS)
        victim = bytearray(data.whole)  # zipnn reorders its input in place
        with timer() as tc:
            packed = zipper.compress(victim)
        del victim
        with timer() as td:
            plain = unzipper.decompress(packed)
        return Rep(len(packed), tc[0], td[0], same(plain, data.whole))


def load_zipnn() -> tuple[Any, str]:
    """The zipnn module (or None) and a note saying why it is missing."""
    try:
        return importlib.import_module("zipnn"), ""
    except Exception as exc:  # ImportError, or a broken native extension
        return None, f"zipnn not importable ({type(exc).__name__}: {exc})"


# ---- run --------------------------------------------------------------------------------------


@dataclass
class Result:
    dataset: DataSet
    method: str
    reps: list[Rep] = field(default_factory=list)
    compress_vs_zstd: list[float] = field(default_factory=list)
    decompress_vs_zstd: list[float] = field(default_factory=list)

    def ratio(self) -> float:
        return self.reps[0].stored_bytes / self.dataset.raw_bytes

    def speeds(self, attr: Callable[[Rep], float]) -> Spread:
        return Spread.of([self.dataset.raw_bytes / MB / attr(r) for r in self.reps])

    @property
    def exact(self) -> bool:
        return all(r.exact for r in self.reps) and len({r.stored_bytes for r in self.reps}) == 1


def build_datasets(quick: bool, steps: int) -> list[DataSet]:
    weights = minilm_weights()
    if quick:
        steps = min(steps, 2)
        batch, seq = 2, 16
    else:
        batch, seq = 8, 64
    log(f"fine-tuning MiniLM for {steps} AdamW steps (batch {batch}x{seq}) ...")
    with timer() as t:
        avg, sq = adam_state(weights, steps, batch, seq)
    log(f"  {t[0]:.1f}s")
    floats = [(n, w) for n, w in weights.items() if w.is_floating_point()]

    def keep(named: NamedTensors) -> NamedTensors:
        return [(n, t) for n, t in named if not quick or n.startswith(QUICK_PREFIX)]

    return [
        make_dataset("minilm-fp32", keep(floats)),
        make_dataset("minilm-bf16", keep([(n, w.to(torch.bfloat16)) for n, w in floats])),
        make_dataset("adam-exp_avg", keep(avg)),
        make_dataset("adam-exp_avg_sq", keep(sq)),
    ]


def run(
    datasets: Sequence[DataSet], methods: Sequence[Method], reps: int, warmup: bool, quiet: Quiet
) -> tuple[list[Result], Repeated[dict[tuple[str, str], Rep]]]:
    """Every method on every data set, ``reps`` times (after one untimed warm-up rep if asked);
    the order of the methods rotates each rep."""
    with ThreadPoolExecutor(THREADS, thread_name_prefix="bench") as pool:

        def one_rep(rep: int) -> dict[tuple[str, str], Rep]:
            return {
                (data.name, method.name): method.run(data, pool)
                for data in datasets
                for method in rotated(methods, rep)
            }

        done = repeat(reps, warmup, quiet, one_rep)
    results = {(d.name, m.name): Result(d, m.name) for d in datasets for m in methods}
    for timed in done.reps:
        for (dataset, name), r in timed.items():
            ref = timed[dataset, "zstd-1"]
            res = results[dataset, name]
            res.reps.append(r)
            res.compress_vs_zstd.append(ref.compress_s / r.compress_s)
            res.decompress_vs_zstd.append(ref.decompress_s / r.decompress_s)
    return list(results.values()), done


def report(results: Sequence[Result], reps: int, info: dict[str, Any], out: JsonLines) -> bool:
    rows = []
    for r in results:
        comp, decomp = r.speeds(lambda x: x.compress_s), r.speeds(lambda x: x.decompress_s)
        cvz, dvz = Spread.of(r.compress_vs_zstd), Spread.of(r.decompress_vs_zstd)
        rows.append(
            [
                r.dataset.name,
                r.method,
                f"{r.dataset.raw_bytes / MB:.1f}",
                f"{r.ratio():.4f}",
                comp.text(),
                decomp.text(),
                f"{cvz.median:.2f}",
                f"{dvz.median:.2f}",
                "yes" if r.exact else "NO",
            ]
        )
        out.write(
            {
                **info,
                "kind": "codec",
                "dataset": r.dataset.name,
                "dtype": str(r.dataset.dtype).removeprefix("torch."),
                "method": r.method,
                "threads": THREADS,
                "chunks": len(r.dataset.chunks),
                "raw_bytes": r.dataset.raw_bytes,
                "stored_bytes": r.reps[0].stored_bytes,
                "ratio": r.ratio(),
                "compress_mbps": comp.as_json(),
                "decompress_mbps": decomp.as_json(),
                "compress_vs_zstd1": cvz.as_json(),
                "decompress_vs_zstd1": dvz.as_json(),
                "exact": r.exact,
            }
        )
    print(
        f"\n### Codec benchmark ({THREADS} threads, median [min-max] of {reps} rep(s); "
        "MB = 10^6 bytes)\n\n"
        f"other processes' CPU use per rep: {', '.join(map(show_cpu, info['foreign_cpu']))}"
        f" ({info['redone_reps']} rep(s) redone because of them)\n"
    )
    print(
        markdown_table(
            [
                "data set",
                "method",
                "raw MB",
                "stored/raw",
                "compress MB/s",
                "decompress MB/s",
                "comp. × zstd-1",
                "decomp. × zstd-1",
                "exact",
            ],
            rows,
        )
    )
    print("\n### ckptd targets\n")
    target_rows = []
    for r in results:
        if r.method != "ckptd":
            continue
        checks: list[tuple[str, float, float, bool]] = []
        if r.dataset.name in TARGET_RATIO:
            goal = TARGET_RATIO[r.dataset.name]
            checks.append(("stored/raw", r.ratio(), goal, r.ratio() <= goal))
        c_mbps = r.speeds(lambda x: x.compress_s).median
        d_mbps = r.speeds(lambda x: x.decompress_s).median
        checks.append(
            ("compress MB/s", c_mbps, TARGET_COMPRESS_MBPS, c_mbps >= TARGET_COMPRESS_MBPS)
        )
        checks.append(
            ("decompress MB/s", d_mbps, TARGET_DECOMPRESS_MBPS, d_mbps >= TARGET_DECOMPRESS_MBPS)
        )
        for what, got, goal, ok in checks:
            cmp = "<=" if what == "stored/raw" else ">="
            shown = f"{got:.4f}" if what == "stored/raw" else f"{got:.0f}"
            margin = (goal - got) / goal if what == "stored/raw" else (got - goal) / goal
            target_rows.append(
                [
                    r.dataset.name,
                    what,
                    f"{cmp} {goal:g}",
                    shown,
                    f"{margin:+.1%}",
                    "met" if ok else "MISSED",
                ]
            )
            out.write(
                {
                    **info,
                    "kind": "target",
                    "dataset": r.dataset.name,
                    "metric": what,
                    "goal": goal,
                    "value": got,
                    "met": ok,
                }
            )
    print(markdown_table(["data set", "metric", "target", "median", "margin", ""], target_rows))
    return all(r.exact for r in results)


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    add_run_args(
        ap,
        quick="one layer's tensors, 2 steps, 1 rep",
        reps="repetitions (default 5; quick 1)",
    )
    ap.add_argument("--steps", type=int, default=30, help="AdamW steps for the optimizer state")
    ap.add_argument("--no-zipnn", action="store_true", help="leave zipnn out")
    add_quiet_args(ap)
    args = ap.parse_args(argv)
    reps = reps_of(args, 5)
    info = run_info("codec_bench", args.quick)
    out = JsonLines(args.out or default_out("codec_bench", args.quick))

    methods: list[Method] = [CkptdCodec(), Zstd1()]
    zipnn_module, why = (None, "--no-zipnn given") if args.no_zipnn else load_zipnn()
    if zipnn_module is not None:
        methods.append(ZipNN(zipnn_module))
        info["zipnn"] = importlib.metadata.version("zipnn")
    else:
        print(f"zipnn: skipped: {why}")
        info["zipnn"] = None
        out.write({**info, "kind": "skipped", "method": "zipnn", "reason": why})

    datasets = build_datasets(args.quick, args.steps)
    for d in datasets:
        log(f"{d.name}: {d.raw_bytes / MiB:.1f} MiB in {len(d.chunks)} chunk(s)")
    results, done = run(datasets, methods, reps, not args.quick, quiet_of(args))
    info.update(
        foreign_cpu=done.foreign, redone_reps=done.redone, loadavg_end=list(os.getloadavg())
    )
    exact = report(results, reps, info, out)
    out.close()
    print(f"\nround trips bit-exact: {'all' if exact else 'NOT ALL'}; results: {out.path}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
