"""What a write is given and how it is cut: the tensors (:class:`TensorSource`), the pipeline's
sizes (:class:`PipelineConfig`) and the chunks (:func:`plan_chunks`).

A chunk is a large tensor's piece of at most ``chunk_bytes``, or several tensors of at most
``pack_bytes`` each, of one dtype, packed together up to ``chunk_bytes``. The plan is a pure
function of the tensors' sizes and dtypes, so equal states give equal chunks and dedup works
across checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ckptd.format.codec import CodecConfig
from ckptd.format.skeleton import dtype_name

GIL_FREE_COPY_BYTES = 256 << 10
"""Pieces this large are copied by numpy, which releases the GIL (a memoryview slice assignment
holds it); smaller ones by slice assignment, which costs ~0.25 us a piece against ~2 us."""


@dataclass(frozen=True)
class PipelineConfig:
    """Sizes and parallelism of the write pipeline (units in the names)."""

    chunk_bytes: int = 8 << 20
    pack_bytes: int = 1 << 20
    threads: int = 4
    max_inflight_bytes: int = 256 << 20
    """Bytes of chunks being worked on at once, across every write running beside it (each
    chunk is counted at 3x its size: copy, planes, encoded output)."""
    codec: CodecConfig = field(default_factory=CodecConfig)
    pending_timeout_s: float = 3600.0
    """``ranks.pending_timeout``: how long the parts of a multi-rank step that never completes
    are kept (see :mod:`ckptd.format.parts`)."""
    concurrent_jobs: int = 2
    """``store.concurrent_jobs``: snapshots the daemon writes at once, each of another job or
    rank (one job's snapshots are written one at a time, in hand-off order). Each runs on up to
    ``threads`` threads of its own, and they share ``max_inflight_bytes`` (each holds at most
    ``max_inflight_bytes / concurrent_jobs``); see
    :class:`~ckptd.pipeline.write.InflightBudget`."""


@dataclass(frozen=True)
class TensorSource:
    """One tensor handed to the pipeline: ``data`` is its C-order bytes (``nbytes`` long)."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview


def tensor_source(path: str, tensor: torch.Tensor) -> TensorSource:
    """Describe ``tensor`` for the pipeline, copying only if it is not CPU-contiguous already.

    The returned view keeps the (possibly copied) tensor alive.
    """
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return TensorSource(path, dtype_name(t.dtype), tuple(t.shape), flat.numpy().data)


@dataclass
class Chunk:
    """One object's worth of bytes: ``pieces`` are (tensor index, offset in tensor, length), in
    the order they are concatenated; ``nbytes`` their total."""

    dtype: str
    pieces: list[tuple[int, int, int]]
    nbytes: int = 0


def plan_chunks(tensors: Sequence[TensorSource], config: PipelineConfig) -> list[Chunk]:
    """Split large tensors into chunks and pack small ones by dtype (deterministic)."""
    chunks: list[Chunk] = []
    open_packs: dict[str, Chunk] = {}
    for index, t in enumerate(tensors):
        n = len(t.data)
        if n == 0:
            continue
        if n > config.pack_bytes:
            step = max(config.chunk_bytes - config.chunk_bytes % 8, 8)
            for off in range(0, n, step):
                length = min(step, n - off)
                chunks.append(Chunk(t.dtype, [(index, off, length)], length))
            continue
        pack = open_packs.get(t.dtype)
        if pack is None or pack.nbytes + n > config.chunk_bytes:
            pack = open_packs[t.dtype] = Chunk(t.dtype, [])
            chunks.append(pack)
        pack.pieces.append((index, 0, n))
        pack.nbytes += n
    return chunks


def copy_bytes(dst: memoryview, at: int, src: memoryview) -> None:
    """Copy ``src`` (a piece of a source, or of a chunk's copy) to offset ``at`` of the writable
    ``dst``, releasing the GIL when it is large (:data:`GIL_FREE_COPY_BYTES`)."""
    n = len(src)
    if n >= GIL_FREE_COPY_BYTES:
        np.copyto(np.frombuffer(dst, np.uint8, n, at), np.frombuffer(src, np.uint8))
    else:
        dst[at : at + n] = src
