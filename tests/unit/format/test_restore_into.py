"""Restoring straight into the destination tensors: ``codec.decode_into`` over split destinations,
``read_tensors`` decoding every object where its bytes are used (chunks of large tensors, packs of
small ones, deduped chunks, partial uses), raw objects read straight from their files, read-ahead,
and every path refusing a damaged object with a CorruptCheckpointError that names it."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.errors import CorruptCheckpointError
from ckptd.format import restore
from ckptd.format.codec import (
    BYTEGROUP,
    HEADER,
    MAGIC,
    RAW,
    ZSTD,
    CodecChoice,
    CodecConfig,
    decode,
    decode_into,
    encode,
)
from ckptd.format.manifest import Manifest, Piece, TensorEntry
from ckptd.format.restore import load_checkpoint, read_tensors, verify_manifest
from ckptd.format.skeleton import flatten
from ckptd.format.store import Store
from ckptd.pipeline.plan import PipelineConfig, tensor_source
from ckptd.pipeline.write import WriteResult, write_checkpoint

KiB = 1 << 10
SMALL = PipelineConfig(chunk_bytes=64 * KiB, pack_bytes=16 * KiB, threads=2)
"""Chunks of 64 KiB and packs of tensors up to 16 KiB: a few hundred KiB of state is both."""
CODECS: list[CodecChoice] = ["auto", "zstd", "raw"]
WHERE = "object objects/ab/abcd (holding tensor model.w)"
WHERE_RE = re.escape(WHERE)

E = TypeVar("E", bound=BaseException)


@contextmanager
def raises_exactly(cls: type[E], match: str | None = None) -> Iterator[pytest.ExceptionInfo[E]]:
    """pytest.raises that also refuses subclasses (ManifestError is a CorruptCheckpointError)."""
    with pytest.raises(cls, match=match) as info:
        yield info
    assert info.type is cls, f"expected exactly {cls.__name__}, got {info.type.__name__}"


def save(
    store: Store, job: str, state: Any, *, codec: CodecChoice = "auto", step: int = 1
) -> WriteResult:
    flat = flatten(state)
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    config = replace(SMALL, codec=CodecConfig(codec=codec))
    return write_checkpoint(store, job, step, flat.skeleton, sources, config=config)


def as_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b""


def assert_same(expected: Any, got: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape)
        assert as_bytes(got) == as_bytes(expected)
    else:
        assert isinstance(got, dict) and list(got) == list(expected)
        for key, value in expected.items():
            assert_same(value, got[key])


def weights(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Trained-weight-like floats: byte grouping compresses their exponent plane."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen) * 0.02).to(dtype)


def noise(n: int, seed: int) -> torch.Tensor:
    """Incompressible bytes: stored raw by every codec."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)


def stale(lengths: list[int]) -> list[memoryview]:
    """Destinations holding a byte no decoder writes by chance everywhere."""
    return [memoryview(bytearray(b"\xa5" * n)) for n in lengths]


def encoded(raw: bytes, *, elem_size: int, is_float: bool, codec: CodecChoice) -> bytes:
    enc = encode(
        memoryview(raw), elem_size=elem_size, is_float=is_float, config=CodecConfig(codec=codec)
    )
    return b"".join(bytes(p) for p in enc.parts)


def split(total: int, lengths: list[int]) -> list[int]:
    """``lengths`` cut to add up to ``total``, the last one taking the rest."""
    out: list[int] = []
    for n in lengths:
        if sum(out) + n >= total:
            break
        out.append(n)
    return [*out, total - sum(out)]


# ---- codec.decode_into --------------------------------------------------------------------------

ELEMENTS = 40_000  # 160 KB of float32: several pieces of either side of the scatter threshold


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "cuts",
    [
        [],  # one piece
        [64 * KiB] * 3,  # large pieces: planes scattered straight into each
        [400] * 50 + [2000] * 20,  # small pieces: decoded together, then copied out
        [40, 120_000, 4, 8, 12, 20_000],  # small, large, small runs
        [3, 5, 7, 1001],  # pieces that split elements
    ],
    ids=["whole", "large", "small", "mixed", "unaligned"],
)
def test_decode_into_pieces_equals_decode(codec: CodecChoice, cuts: list[int]) -> None:
    raw = as_bytes(weights(ELEMENTS, seed=1))
    data = encoded(raw, elem_size=4, is_float=True, codec=codec)
    assert data[4] == {"auto": BYTEGROUP, "zstd": ZSTD, "raw": RAW}[codec]
    pieces = stale(split(len(raw), cuts))
    decode_into(data, pieces, where=WHERE)
    assert b"".join(bytes(p) for p in pieces) == raw
    whole = memoryview(bytearray(len(raw)))
    decode(data, whole, where=WHERE)
    assert bytes(whole) == raw


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float64, torch.complex64, torch.complex128]
)
def test_decode_into_byte_groups_of_every_float_width(dtype: torch.dtype) -> None:
    component = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
    raw = as_bytes(weights(30_000, seed=2, dtype=component))
    elem = component.itemsize
    data = encoded(raw, elem_size=elem, is_float=True, codec="auto")
    assert data[4] == BYTEGROUP
    pieces = stale(split(len(raw), [elem * 5, elem * 9_000, elem, elem * 3, elem * 7_000]))
    decode_into(data, pieces, where=WHERE)
    assert b"".join(bytes(p) for p in pieces) == raw


@settings(max_examples=60, deadline=None)
@given(
    raw=st.binary(min_size=1, max_size=3000),
    cuts=st.lists(st.integers(min_value=1, max_value=700), max_size=8),
    codec=st.sampled_from(CODECS),
    elem_size=st.sampled_from([1, 2, 4, 8]),
)
def test_decode_into_any_split_of_any_bytes(
    raw: bytes, cuts: list[int], codec: CodecChoice, elem_size: int
) -> None:
    raw = raw[: len(raw) // elem_size * elem_size] or bytes(elem_size)
    data = encoded(raw, elem_size=elem_size, is_float=elem_size > 1, codec=codec)
    pieces = stale(split(len(raw), cuts))
    decode_into(data, pieces, where=WHERE)
    assert b"".join(bytes(p) for p in pieces) == raw


def test_decode_into_pieces_of_the_wrong_total_length() -> None:
    raw = as_bytes(weights(1000, seed=3))
    data = encoded(raw, elem_size=4, is_float=True, codec="auto")
    with raises_exactly(
        CorruptCheckpointError,
        match=rf"^{WHERE_RE}: object holds 4000 raw bytes but the manifest expects 3996$",
    ):
        decode_into(data, stale([2000, 1996]), where=WHERE)


@pytest.mark.parametrize("codec", CODECS)
def test_decode_into_a_truncated_object(codec: CodecChoice) -> None:
    raw = as_bytes(weights(ELEMENTS, seed=4))
    data = encoded(raw, elem_size=4, is_float=True, codec=codec)
    with raises_exactly(CorruptCheckpointError, match=rf"^{WHERE_RE}: "):
        decode_into(data[:-50], stale(split(len(raw), [400] * 10 + [64 * KiB])), where=WHERE)


def test_copy_bytes_large_and_small() -> None:
    from ckptd.format.codec import copy_bytes

    for n in (10, 1 << 20):
        src = bytes(range(256)) * (n // 256 + 1)
        dst = memoryview(bytearray(n))
        copy_bytes(dst, src[:n])
        assert bytes(dst) == src[:n]


# ---- read_tensors: where every object lands ----------------------------------------------------


def every_kind_of_tensor() -> dict[str, torch.Tensor]:
    base = weights(64, seed=9).reshape(8, 8)
    return {
        "big.f32": weights(100_000, seed=1),  # 400 KB: 7 chunks of 64 KiB
        "big.bf16": weights(70_000, seed=2, dtype=torch.bfloat16),  # 140 KB: 3 chunks
        "big.u8": noise(150_000, seed=3),  # raw chunks
        **{f"bias{i}": weights(300 + i, seed=10 + i) for i in range(40)},  # packed fp32
        **{f"step{i}": torch.tensor(float(i)) for i in range(5)},  # 0-d, packed
        "mask": torch.rand(3000, generator=torch.Generator().manual_seed(5)) > 0.5,  # bool
        "c64": torch.randn(500, dtype=torch.complex64, generator=torch.Generator().manual_seed(6)),
        "f64": torch.randn(700, dtype=torch.float64, generator=torch.Generator().manual_seed(7)),
        "i64": torch.arange(2000),
        "u8": noise(5000, seed=8),
        "empty": torch.empty(0, 3),
        "empty.bf16": torch.empty(0, dtype=torch.bfloat16),
        "transposed": base.t(),  # non-contiguous
        "strided": base[::2, 1::3],
        "conj": torch.randn(40, dtype=torch.complex64).conj(),
    }


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("threads", [1, 3])
def test_every_kind_of_tensor_round_trips_bit_exactly(
    store: Store, codec: CodecChoice, threads: int
) -> None:
    state = every_kind_of_tensor()
    result = save(store, "all", state, codec=codec)
    codecs = {o.codec for o in result.manifest.objects.values()}
    assert (
        codecs
        == {
            "auto": {"bytegroup+zstd", "zstd", "raw"},
            "zstd": {"zstd", "raw"},
            "raw": {"raw"},
        }[codec]
    )
    assert_same(state, load_checkpoint(store, "all", threads=threads).state)


def test_every_object_a_writer_makes_is_decoded_in_place(store: Store) -> None:
    result = save(store, "all", every_kind_of_tensor())
    tasks = restore._tasks(result.manifest)
    assert len(tasks) == len(result.manifest.objects)
    packs = [t for t in tasks if len(t.uses) > 1]
    chunks = [t for t in tasks if len(t.uses) == 1]
    assert packs and chunks
    assert all(t.tiling is not None and not t.duplicates for t in tasks)


def test_restored_tensors_own_their_memory(store: Store) -> None:
    state = {f"b{i}": weights(100, seed=i) for i in range(10)}
    save(store, "own", state)
    got = load_checkpoint(store, "own").state
    pointers = {t.untyped_storage().data_ptr() for t in got.values()}
    assert len(pointers) == len(state)
    got["b3"].add_(1)
    assert_same(state["b4"], got["b4"])


def test_identical_chunks_deduped_to_one_object_restore_into_both_tensors(store: Store) -> None:
    a = weights(40_000, seed=1)  # 160 KB: 3 chunks
    state = {"a": a, "b": a.clone(), "c": weights(40_000, seed=2)}
    result = save(store, "dup", state)
    tasks = restore._tasks(result.manifest)
    duplicated = [t for t in tasks if t.duplicates]
    assert len(duplicated) == 3  # each chunk of a is also a chunk of b
    got = load_checkpoint(store, "dup").state
    assert_same(state, got)
    assert got["a"].data_ptr() != got["b"].data_ptr()


def test_identical_chunks_within_one_tensor_restore_into_each_place(store: Store) -> None:
    state = {"zeros": torch.zeros(60_000), "w": weights(10, seed=1)}  # 240 KB: 3 equal chunks
    result = save(store, "zeros", state)
    (entry,) = [t for t in result.manifest.tensors if t.path == "zeros"]
    assert len({p.object for p in entry.pieces[:3]}) == 1
    assert_same(state, load_checkpoint(store, "zeros").state)


def only_tensors(manifest: Manifest, keep: set[str]) -> Manifest:
    """The manifest as a reader of a subset of its tensors builds it (ckptd_client.dcp)."""
    tensors = tuple(t for t in manifest.tensors if t.path in keep)
    objects = {p.object: manifest.objects[p.object] for t in tensors for p in t.pieces}
    return replace(manifest, tensors=tensors, objects=objects)


def test_a_subset_of_a_pack_is_read_through_scratch(store: Store) -> None:
    state = {f"bias{i}": weights(200 + i, seed=i) for i in range(20)}
    result = save(store, "sub", state)
    keep = {"bias3", "bias11", "bias12"}
    subset = only_tensors(result.manifest, keep)
    tasks = restore._tasks(subset)
    assert [t.tiling for t in tasks] == [None]
    got = read_tensors(store, subset)
    for entry, tensor in zip(subset.tensors, got, strict=True):
        assert_same(state[entry.path], tensor)


def test_a_tensor_made_of_parts_of_objects(store: Store) -> None:
    """A hand-made manifest whose tensor takes a middle slice of one object and the head of
    another (no writer does this; the format allows it)."""
    state = {"a": noise(100_000, seed=1), "b": noise(100_000, seed=2)}
    result = save(store, "parts", state, codec="raw")
    m = result.manifest
    first, second = m.tensors[0].pieces[0], m.tensors[1].pieces[1]
    pieces = (Piece(first.object, 1000, 5000), Piece(second.object, 0, 3000))
    entry = TensorEntry("mixed", "uint8", (8000,), 8000, pieces)
    manifest = replace(m, tensors=(entry,), objects={p.object: m.objects[p.object] for p in pieces})
    (got,) = read_tensors(store, manifest)
    b_from = 65536  # b's second piece starts at its second 64 KiB chunk
    want = as_bytes(state["a"])[1000:6000] + as_bytes(state["b"])[b_from : b_from + 3000]
    assert as_bytes(got) == want


def test_progress_counts_every_objects_raw_bytes_once(store: Store) -> None:
    result = save(store, "p", every_kind_of_tensor())
    seen: list[int] = []
    read_tensors(store, result.manifest, threads=2, progress=seen.append)
    assert sum(seen) == sum(o.raw_bytes for o in result.manifest.objects.values())
    assert len(seen) == len(result.manifest.objects)


class ThroughReadObject(Store):
    """A store read through ``read_object`` (as the tier's is, which fetches objects first)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads = 0

    def read_object(self, job: str, digest: str, into: bytearray | None = None) -> memoryview:
        self.reads += 1
        return super().read_object(job, digest, into)


def test_a_store_that_overrides_read_object_is_read_through_it(root: Path) -> None:
    state = every_kind_of_tensor()
    result = save(Store(root), "t", state)
    through = ThroughReadObject(root)
    assert_same(state, load_checkpoint(through, "t").state)
    assert through.reads == len(result.manifest.objects)


def test_read_ahead_asks_for_each_file_once_in_order(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[Path] = []
    monkeypatch.setattr(restore, "advise_willneed", asked.append)
    monkeypatch.setattr(restore, "READAHEAD_BYTES", 100 * KiB)
    result = save(store, "ra", every_kind_of_tensor())
    read_tensors(store, result.manifest, threads=1)
    tasks = restore._tasks(result.manifest)
    assert asked == [store.object_path("ra", t.digest) for t in tasks]


# ---- damaged objects in every path -------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def object_holding(store: Store, job: str, path: str, piece: int = 0) -> Path:
    manifest = store.read_manifest(job, 1)
    (entry,) = [t for t in manifest.tensors if t.path == path]
    return store.object_path(job, entry.pieces[piece].object)


DAMAGE_STATE = {
    "chunked.f32": weights(50_000, seed=1),  # bytegroup chunks
    "chunked.u8": noise(100_000, seed=2),  # raw chunks
    "chunked.i64": torch.arange(20_000),  # zstd chunks
    **{f"packed.f32.{i}": weights(500, seed=10 + i) for i in range(6)},  # bytegroup pack
    **{f"packed.u8.{i}": noise(1000, seed=20 + i) for i in range(6)},  # raw pack
    **{f"packed.i64.{i}": torch.arange(i, i + 300) for i in range(6)},  # zstd pack
}


@pytest.mark.parametrize(
    ("tensor", "codec", "names"),
    [
        ("chunked.f32", BYTEGROUP, r"tensor chunked\.f32"),
        ("chunked.u8", RAW, r"tensor chunked\.u8"),
        ("chunked.i64", ZSTD, r"tensor chunked\.i64"),
        ("packed.f32.2", BYTEGROUP, r"tensors packed\.f32\.0, packed\.f32\.1, .* and 2 more"),
        ("packed.u8.2", RAW, r"tensors packed\.u8\.0, packed\.u8\.1, .* and 2 more"),
        ("packed.i64.2", ZSTD, r"tensors packed\.i64\.0, packed\.i64\.1, .* and 2 more"),
    ],
)
@pytest.mark.parametrize("where", ["payload", "last byte"])
def test_a_flipped_byte_in_every_path_is_refused(
    store: Store, tensor: str, codec: int, names: str, where: str
) -> None:
    save(store, "bad", DAMAGE_STATE)
    path = object_holding(store, "bad", tensor)
    assert path.read_bytes()[4] == codec
    size = path.stat().st_size
    flip_byte(path, HEADER.size + 40 if where == "payload" else size - 1)
    with raises_exactly(CorruptCheckpointError, match=rf"^object {path} \(holding {names}\)"):
        load_checkpoint(store, "bad")
    with raises_exactly(CorruptCheckpointError, match=rf"^object {path} \(holding {names}\)"):
        load_checkpoint(store, "bad", threads=1)
    (message,) = verify_manifest(store, store.read_manifest("bad", 1))
    assert message.startswith(f"object {path} (holding ")


@pytest.mark.parametrize("tensor", ["chunked.f32", "chunked.u8", "packed.u8.0", "packed.i64.0"])
def test_a_truncated_object_in_every_path_is_refused(store: Store, tensor: str) -> None:
    save(store, "cut", DAMAGE_STATE)
    path = object_holding(store, "cut", tensor)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with raises_exactly(
        CorruptCheckpointError,
        match=rf"^object {path} \(holding tensors? .*\): truncated object \({len(data) - 7} "
        rf"bytes on disk, the manifest says {len(data)}\)$",
    ):
        load_checkpoint(store, "cut")


def test_a_raw_header_promising_more_than_the_file_holds(store: Store) -> None:
    """A raw object whose file has the manifest's length but whose header claims more raw
    bytes: not read straight into the tensor, refused by the decoder."""
    save(store, "hdr", DAMAGE_STATE)
    path = object_holding(store, "hdr", "chunked.u8")
    data = bytearray(path.read_bytes())
    _magic, codec, _elem, _res, raw_len = HEADER.unpack_from(data)
    assert codec == RAW
    struct.pack_into("<Q", data, 8, raw_len + 8)
    path.write_bytes(bytes(data))
    with raises_exactly(
        CorruptCheckpointError,
        match=rf"^object {path} \(holding tensor chunked\.u8\): object holds {raw_len + 8} raw "
        rf"bytes but the manifest expects {raw_len}$",
    ):
        load_checkpoint(store, "hdr")


def test_a_file_that_is_not_an_object(store: Store) -> None:
    save(store, "magic", DAMAGE_STATE)
    path = object_holding(store, "magic", "chunked.u8")
    data = bytearray(path.read_bytes())
    data[:4] = b"XXXX"
    path.write_bytes(bytes(data))
    assert MAGIC != b"XXXX"
    with raises_exactly(CorruptCheckpointError, match=r"not a ckptd object \(bad magic"):
        load_checkpoint(store, "magic")


def test_a_missing_object(store: Store) -> None:
    save(store, "gone", DAMAGE_STATE)
    path = object_holding(store, "gone", "packed.f32.0")
    path.unlink()
    with raises_exactly(
        CorruptCheckpointError,
        match=rf"^object {path} \(holding tensors packed\.f32\.0, .*\): missing object {path}$",
    ):
        load_checkpoint(store, "gone")


def test_damage_seen_through_read_object_is_refused(root: Path) -> None:
    save(Store(root), "t", DAMAGE_STATE)
    path = object_holding(Store(root), "t", "chunked.u8")
    flip_byte(path, HEADER.size + 100)
    with raises_exactly(CorruptCheckpointError, match=rf"^object {path} .* is corrupt"):
        load_checkpoint(ThroughReadObject(root), "t")


def test_the_first_damaged_object_in_order_is_named(store: Store) -> None:
    save(store, "two", DAMAGE_STATE)
    first = object_holding(store, "two", "chunked.f32", piece=1)
    later = object_holding(store, "two", "packed.u8.0")
    flip_byte(first, HEADER.size + 10)
    flip_byte(later, HEADER.size + 10)
    for threads in (1, 2, 4):
        with raises_exactly(CorruptCheckpointError, match=rf"^object {first} "):
            read_tensors(store, store.read_manifest("two", 1), threads=threads)


def test_default_threads_is_at_least_one() -> None:
    assert 1 <= restore.default_threads() <= 8


def test_numpy_arrays_come_back_as_numpy(store: Store) -> None:
    arr = np.arange(5000, dtype=np.float32)
    state = {"w": weights(1000, seed=1), "arr": arr}
    flat = flatten(state)
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    write_checkpoint(store, "np", 1, flat.skeleton, sources, config=SMALL)
    got = load_checkpoint(store, "np", map_location="meta").state
    assert isinstance(got["arr"], np.ndarray)
    assert np.array_equal(got["arr"], arr)
    assert got["w"].device.type == "meta"
