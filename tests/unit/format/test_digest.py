"""The checkpoint digest: one hash of the tensors and the state, whatever chunking and codec.

Defined in ``docs/format.md``; :func:`spec_digest` below recomputes it from that text alone (plain
blake3 and struct, no ckptd code), so a change of the definition cannot pass unnoticed. The
pipeline computes it without an extra pass over large tensors with the default configuration
(each 8 MiB chunk is a leaf: its object name is the leaf hash), and from the chunks' private copies
for other chunk sizes, including leaves that span chunks.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
import torch

from ckptd.format import digest as digest_module
from ckptd.format.codec import CodecConfig
from ckptd.format.digest import LEAF_BYTES, compute_digest
from ckptd.format.manifest import parse_manifest
from ckptd.format.restore import read_tensors
from ckptd.format.skeleton import JSON, flatten
from ckptd.format.store import Store
from ckptd.pipeline import digest as pipeline_digest
from ckptd.pipeline import write as pipeline_module
from ckptd.pipeline.digest import recompute_digest, state_digest
from ckptd.pipeline.plan import PipelineConfig, TensorSource, tensor_source
from ckptd.pipeline.write import WriteResult, write_checkpoint

JOB = "dig"
MiB = 1 << 20
GOLDEN = Path(__file__).parent / "golden" / "manifest_v1.json"


def spec_digest(tensors: Sequence[tuple[str, str, Sequence[int], bytes]], skeleton: JSON) -> str:
    """The digest as docs/format.md defines it, written from the text alone."""

    def u64(n: int) -> bytes:
        return struct.pack("<Q", n)

    def string(s: str) -> bytes:
        return u64(len(s.encode("utf-8"))) + s.encode("utf-8")

    body = [b"ckptd.digest.v1\0", u64(len(tensors))]
    for path, dtype, shape, data in tensors:
        leaves = [data[i : i + 8 * MiB] for i in range(0, len(data), 8 * MiB)]
        tensor = blake3.blake3(b"".join(blake3.blake3(leaf).digest() for leaf in leaves))
        body += [string(path), string(dtype), u64(len(shape)), *map(u64, shape), tensor.digest()]
    canonical = json.dumps(
        skeleton, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
    body += [u64(len(canonical)), canonical]
    return str(blake3.blake3(b"".join(body)).hexdigest())


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_golden_digest_follows_the_documented_definition() -> None:
    """The golden manifest's digest, recomputed from its state (test_manifest._golden_state)."""
    manifest = parse_manifest(GOLDEN.read_bytes(), where=str(GOLDEN))
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4
    data = [
        raw(weight),
        raw(torch.tensor([0.5, -1.0], dtype=torch.bfloat16)),
        raw(torch.tensor([True, False, True])),
        raw(torch.tensor([3, 1, 2], dtype=torch.int64)),
        raw(torch.tensor(3.0)),
        raw(torch.zeros(2, 3)),
    ]
    entries = [(t.path, t.dtype, t.shape, d) for t, d in zip(manifest.tensors, data, strict=True)]
    assert manifest.digest == spec_digest(entries, manifest.skeleton)
    assert manifest.digest == compute_digest(entries, manifest.skeleton)


def big_state(seed: int = 0) -> dict[str, Any]:
    """Leaves of every kind: a tensor of two full leaves and a partial one (17 MiB + 4 bytes), one
    of 9 MiB (small enough to be packed when pack_bytes is large), two identical 3 MiB tensors
    (identical chunks in one write), small tensors of several dtypes and an empty one."""
    gen = torch.Generator().manual_seed(seed)
    twin = torch.randn(3 * MiB // 4, generator=gen)
    return {
        "model": OrderedDict(
            [
                ("big", torch.randn((17 * MiB + 4) // 4, generator=gen)),
                ("mid", torch.randn(9 * MiB // 4, generator=gen).to(torch.bfloat16).view(-1, 8)),
                ("twin_a", twin),
                ("twin_b", twin.clone()),
                ("bias", torch.randn(37, generator=gen)),
                ("mask", torch.rand(13, generator=gen) > 0.5),
                ("idx", torch.randint(0, 9, (5, 3), generator=gen)),
                ("empty", torch.empty(0, 4)),
            ]
        ),
        "extra": {"epoch": 3, "lr": 0.01, "name": "é", "rng": np.arange(6, dtype=np.uint32)},
    }


def flat_sources(state: Any) -> tuple[JSON, list[TensorSource]]:
    flat = flatten(state)
    return flat.skeleton, [
        tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)
    ]


def save(store: Store, step: int, state: Any, config: PipelineConfig) -> WriteResult:
    skeleton, sources = flat_sources(state)
    return write_checkpoint(store, JOB, step, skeleton, sources, config=config, metric=step / 7)


CONFIGS = {
    "default": PipelineConfig(threads=2),
    "small-chunks": PipelineConfig(chunk_bytes=256 << 10, pack_bytes=0, threads=2),
    "odd-chunks": PipelineConfig(chunk_bytes=3 * MiB + 8, pack_bytes=2 * MiB, threads=2),
    "leaf-multiple": PipelineConfig(
        chunk_bytes=16 * MiB, pack_bytes=10 * MiB, threads=2, codec=CodecConfig(codec="raw")
    ),
}


def test_digest_is_independent_of_chunking_codec_step_and_time(root: Path) -> None:
    state = big_state()
    skeleton, sources = flat_sources(state)
    expected = state_digest(sources, skeleton)
    assert expected == spec_digest(
        [(s.path, s.dtype, s.shape, bytes(s.data)) for s in sources], skeleton
    )
    for step, (name, config) in enumerate(CONFIGS.items(), start=1):
        store = Store(root / name)
        first = save(store, step, state, config)
        again = save(store, step + 100, state, config)  # dedups everything
        assert again.new_objects == 0, name
        on_disk = store.read_manifest(JOB, step)
        assert first.manifest.digest == again.manifest.digest == on_disk.digest == expected, name
        assert first.manifest.created != again.manifest.created
        loaded = read_tensors(store, on_disk)
        assert recompute_digest(on_disk, loaded) == expected, name


def test_leaves_spanning_chunks_are_hashed_from_the_private_copies(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source changes right after each chunk is copied (as a trainer writing its shared
    memory would): the digest still describes exactly the stored bytes."""
    state = {"w": torch.randn((LEAF_BYTES + 3 * 4096) // 4, generator=torch.Generator())}
    skeleton, sources = flat_sources(state)
    real_copy = pipeline_module._private_copy

    def copy_then_scribble(tensors: Sequence[TensorSource], chunk: Any) -> memoryview:
        view = real_copy(tensors, chunk)
        for index, off, length in chunk.pieces:
            np.frombuffer(tensors[index].data, np.uint8)[off : off + length] ^= 0xFF
        return view

    monkeypatch.setattr(pipeline_module, "_private_copy", copy_then_scribble)
    config = PipelineConfig(chunk_bytes=3 * MiB, pack_bytes=0, threads=3)
    result = write_checkpoint(store, JOB, 1, skeleton, sources, config=config)

    stored = read_tensors(store, result.manifest)
    assert raw(stored[0]) != raw(state["w"])  # the source was scribbled over after each copy
    assert result.manifest.digest == recompute_digest(result.manifest, stored)


def test_digest_changes_with_the_state(store: Store) -> None:
    def digest(state: Any) -> str:
        skeleton, sources = flat_sources(state)
        return state_digest(sources, skeleton)

    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    base: dict[str, Any] = {"w": w, "x": {"epoch": 1}}
    reference = digest(base)
    changed = w.clone()
    changed[2, 3] += 1
    variants = [
        {**base, "w": changed},  # one element
        {**base, "w": w.reshape(4, 3)},  # same bytes, other shape
        {**base, "w": w.view(torch.int32)},  # same bytes, other dtype
        {"v": w, "x": base["x"]},  # other path
        {**base, "x": {"epoch": 2}},  # the skeleton is part of the state
    ]
    digests = [digest(v) for v in variants]
    assert reference not in digests
    assert len(set(digests)) == len(digests)
    a, b = torch.zeros(2), torch.ones(2)
    assert digest(OrderedDict(a=a, b=b)) != digest(OrderedDict(b=b, a=a))  # tensor order
    # Keys of plain dicts are hashed sorted: their order alone does not change the digest.
    assert digest({"x": {"epoch": 1, "lr": 0.5}, "w": w}) == digest(
        {"w": w, "x": {"lr": 0.5, "epoch": 1}}
    )
    assert save(store, 5, base, CONFIGS["default"]).manifest.digest == reference


def test_manifest_repr_is_short() -> None:
    manifest = parse_manifest(GOLDEN.read_bytes(), where=str(GOLDEN))
    text = repr(manifest)
    assert text == (
        "Manifest(job='golden', step=1200, seq=1, created='2026-01-01T00:00:00.000000Z', "
        f"tensors=6, raw_bytes=83, digest='{manifest.digest[:12] if manifest.digest else ''}...')"
    )
    assert "skeleton" not in text and len(text) < 200
    old = replace(manifest, seq=0, digest=None)
    assert repr(old).endswith(
        "seq=0, created='2026-01-01T00:00:00.000000Z', tensors=6, raw_bytes=83, digest=None)"
    )


def test_default_config_hashes_no_leaf_of_a_large_tensor_again(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default chunk size each chunk of a large tensor is one leaf: the object name the
    pipeline computed is the leaf hash. Only packed small tensors are hashed on their own."""
    hashed: list[int] = []
    real_leaf_hash = digest_module.leaf_hash

    def counting(data: bytes | bytearray | memoryview) -> bytes:
        hashed.append(len(data))
        return real_leaf_hash(data)

    monkeypatch.setattr(pipeline_digest, "leaf_hash", counting)
    gen = torch.Generator().manual_seed(3)
    state = {
        "big": torch.randn((17 * MiB + 4) // 4, generator=gen),
        "alone": torch.randn(3 * MiB // 4, generator=gen),  # > pack_bytes: one chunk, one leaf
        "small": [torch.randn(10, generator=gen) for _ in range(3)],
    }
    result = save(store, 1, state, CONFIGS["default"])

    assert sorted(hashed) == [40, 40, 40]
    skeleton, sources = flat_sources(state)
    assert result.manifest.digest == state_digest(sources, skeleton)
