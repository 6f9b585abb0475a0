"""The checkpoint digest in the pipeline: computed from the bytes a write hashes anyway.

The digest (:mod:`ckptd.format.digest`) hashes each tensor in leaves of
:data:`~ckptd.format.digest.LEAF_BYTES`. A write computes every leaf hash from the chunks' private
copies, never from the source again nor from disk (:func:`leaf_hashes`, called by the chunk
workers): a chunk that is exactly one leaf (a large tensor's chunk with the default
``chunk_bytes``) gives the object name it already hashed; a leaf inside a chunk (a packed small
tensor) is hashed from the copy; a leaf that spans chunks (other chunk sizes) is assembled from
the copies of its pieces and hashed by the thread that completes it (:class:`SpanningLeaves`).
:func:`digest_of_leaves` then combines them. :func:`state_digest` and :func:`recompute_digest`
compute the same digest from a whole state, to compare a save or a restore with it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import torch

from ckptd.format.digest import (
    LEAF_BYTES,
    checkpoint_digest,
    compute_digest,
    leaf_count,
    leaf_hash,
    tensor_hash_of_leaves,
)
from ckptd.format.manifest import Manifest, TensorEntry
from ckptd.format.skeleton import JSON
from ckptd.pipeline.plan import Chunk, TensorSource, copy_bytes, tensor_source

LeafHash = tuple[int, int, bytes]
"""``(tensor index, leaf index, 32-byte leaf hash)``."""


def state_digest(tensors: Sequence[TensorSource], skeleton: JSON) -> str:
    """The checkpoint digest of a flattened state (what a save of it records as ``digest``)."""
    return compute_digest(((t.path, t.dtype, t.shape, t.data) for t in tensors), skeleton)


def recompute_digest(manifest: Manifest, tensors: Sequence[torch.Tensor]) -> str:
    """The checkpoint digest of ``manifest``'s skeleton and ``tensors`` (its tensors as read
    back, in manifest order, e.g. by :func:`ckptd.format.restore.read_tensors`): equal to
    ``manifest.digest`` when the data is what was saved."""
    if len(tensors) != len(manifest.tensors):
        raise ValueError(
            f"{len(tensors)} tensors given for a manifest of {len(manifest.tensors)} tensors"
        )
    sources = [tensor_source(e.path, t) for e, t in zip(manifest.tensors, tensors, strict=True)]
    return state_digest(sources, manifest.skeleton)


class SpanningLeaves:
    """Digest leaves that span chunk boundaries, assembled from the chunks' private copies.

    Each chunk copies its part of such a leaf into the leaf's buffer; the thread whose part
    completes it hashes it and drops the buffer. Only leaves with some but not all parts copied
    hold memory, about one per chunk in flight. Any worker thread may call :meth:`add`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[int, int], tuple[bytearray, list[int]]] = {}

    def add(self, index: int, k: int, size: int, at: int, part: memoryview) -> bytes | None:
        """Copy ``part`` to offset ``at`` of leaf ``k`` (``size`` bytes) of tensor ``index``;
        the leaf's hash once this completed it, else None."""
        key = (index, k)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                entry = self._open[key] = (bytearray(size), [size])
        buf, missing = entry
        copy_bytes(memoryview(buf), at, part)
        with self._lock:
            missing[0] -= len(part)
            if missing[0]:
                return None
            del self._open[key]
        return leaf_hash(buf)


def leaf_hashes(
    sizes: Sequence[int],
    chunk: Chunk,
    raw: memoryview,
    digest: str,
    spanning: SpanningLeaves,
) -> tuple[LeafHash, ...]:
    """The digest leaves this chunk completes, hashed from its private copy ``raw`` (whose
    object name is ``digest``); ``sizes`` are the byte lengths of every tensor of the write."""
    out: list[LeafHash] = []
    pos = 0
    for index, off, length in chunk.pieces:
        end = off + length
        for k in range(off // LEAF_BYTES, (end - 1) // LEAF_BYTES + 1):
            lo, hi = k * LEAF_BYTES, min((k + 1) * LEAF_BYTES, sizes[index])
            if lo >= off and hi <= end:
                if hi - lo == len(raw):
                    h = bytes.fromhex(digest)  # the chunk is this leaf: its name is the hash
                else:
                    h = leaf_hash(raw[pos + lo - off : pos + hi - off])
            else:
                a, b = max(lo, off), min(hi, end)
                done = spanning.add(index, k, hi - lo, a - lo, raw[pos + a - off : pos + b - off])
                if done is None:
                    continue
                h = done
            out.append((index, k, h))
        pos += length
    return tuple(out)


def digest_of_leaves(
    entries: Sequence[TensorEntry], leaves: Iterable[LeafHash], skeleton: JSON
) -> str:
    """The checkpoint digest from the leaf hashes the chunk workers computed (every leaf of
    every tensor of ``entries`` must be among ``leaves``)."""
    rows: list[list[bytes | None]] = [[None] * leaf_count(e.nbytes) for e in entries]
    for index, k, h in leaves:
        rows[index][k] = h
    hashes = []
    for e, row in zip(entries, rows, strict=True):
        if any(h is None for h in row):
            raise AssertionError(f"{e.path}: a leaf of the checkpoint digest was not hashed")
        hashes.append((e.path, e.dtype, e.shape, tensor_hash_of_leaves(h for h in row if h)))
    return checkpoint_digest(hashes, skeleton)
