"""The checkpoint digest: one hash of a checkpoint's tensors and skeleton.

It identifies what was saved, independently of how it was stored: chunking, codec, step, creation
time and metric are not part of it, so two saves of the same state have the same digest and a
restore can be checked against the save it came from. A manifest records it as ``digest``
(:mod:`ckptd.format.manifest`); the write pipeline computes it from the bytes it hashes anyway
(:mod:`ckptd.pipeline.digest`). The definition, which other implementations follow, is in
``docs/format.md``: each tensor's bytes are hashed in leaves of :data:`LEAF_BYTES`
(:func:`leaf_hash`), a tensor's hash is the hash of its leaf hashes (:func:`tensor_hash`), and
:func:`checkpoint_digest` hashes every tensor's path, dtype, shape and hash with the skeleton.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence

import blake3

from ckptd.format.skeleton import JSON

LEAF_BYTES = 8 << 20
"""Tensor bytes are hashed in leaves of this size (the default ``chunk_bytes``, so a chunk of a
large tensor written with the default configuration is exactly one leaf and its object name is
the leaf's hash)."""
DIGEST_DOMAIN = b"ckptd.digest.v1\0"
"""Prefix of the hashed encoding: the digest's definition and version (``docs/format.md``)."""
_U64 = struct.Struct("<Q")

TensorHash = tuple[str, str, Sequence[int], bytes]
"""``(path, dtype, shape, tensor hash)`` of one tensor, in manifest order."""


def leaf_count(nbytes: int) -> int:
    """How many leaves a tensor of ``nbytes`` bytes has (an empty tensor has none)."""
    return -(-nbytes // LEAF_BYTES)


def leaf_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The BLAKE3-256 digest (32 bytes) of one leaf."""
    return blake3.blake3(data).digest()


def tensor_hash_of_leaves(leaves: Iterable[bytes]) -> bytes:
    """BLAKE3 of the concatenated 32-byte leaf digests of one tensor, in order."""
    h = blake3.blake3()
    for leaf in leaves:
        h.update(leaf)
    return h.digest()


def tensor_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The tensor hash of a tensor's raw C-order bytes ``data``."""
    view = memoryview(data).cast("B")
    return tensor_hash_of_leaves(
        leaf_hash(view[off : off + LEAF_BYTES]) for off in range(0, len(view), LEAF_BYTES)
    )


def skeleton_bytes(skeleton: JSON) -> bytes:
    """The skeleton's canonical JSON, as the digest hashes it: sorted keys, no whitespace,
    non-ASCII characters as themselves, UTF-8 (Python's ``json.dumps(skeleton, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False, allow_nan=False)``)."""
    text = json.dumps(
        skeleton, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode()


def checkpoint_digest(tensors: Iterable[TensorHash], skeleton: JSON) -> str:
    """The checkpoint digest (lowercase hex) from each tensor's hash and the skeleton.

    BLAKE3 of: :data:`DIGEST_DOMAIN`, the number of tensors (u64), then per tensor its path and
    dtype (each a u64 byte length and UTF-8), its number of dimensions and each dimension (u64)
    and its 32-byte tensor hash; then the skeleton's canonical JSON (u64 length and bytes). All
    integers little-endian. Step, created time, metric, chunking and codec are not part of it.
    """
    items = list(tensors)
    h = blake3.blake3(DIGEST_DOMAIN)
    h.update(_U64.pack(len(items)))
    for path, dtype, shape, th in items:
        if len(th) != 32:
            raise ValueError(f"{path}: a tensor hash has 32 bytes, got {len(th)}")
        for text in (path, dtype):
            raw = text.encode()
            h.update(_U64.pack(len(raw)))
            h.update(raw)
        h.update(_U64.pack(len(shape)))
        for dim in shape:
            h.update(_U64.pack(dim))
        h.update(th)
    body = skeleton_bytes(skeleton)
    h.update(_U64.pack(len(body)))
    h.update(body)
    return h.hexdigest()


def compute_digest(
    tensors: Iterable[tuple[str, str, Sequence[int], bytes | bytearray | memoryview]],
    skeleton: JSON,
) -> str:
    """The checkpoint digest recomputed from the data: ``(path, dtype, shape, raw C-order
    bytes)`` of every tensor in manifest order, and the skeleton. Equal to a manifest's
    ``digest`` when its tensors and skeleton are what was saved."""
    return checkpoint_digest(
        ((path, dtype, shape, tensor_hash(data)) for path, dtype, shape, data in tensors),
        skeleton,
    )
