"""Write pipeline + restore against a real store in a tmp dir: bit-exact round trips, chunking and
packing, dedup, corruption detection, fallback, crash safety, GC, tmp sweeping and job names."""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from ckptd.errors import (
    CorruptCheckpointError,
    DiskFullError,
    InvalidNameError,
    ManifestError,
    NotFoundError,
    StorePermissionError,
    UnsupportedStateError,
)
from ckptd.format.codec import CodecConfig
from ckptd.format.fsutil import STALE_TMP_S, Buffer
from ckptd.format.restore import (
    FallbackWarning,
    Loaded,
    load_checkpoint,
    read_tensors,
    verify_manifest,
)
from ckptd.format.skeleton import dtype_name, flatten
from ckptd.format.store import MAX_JOB_NAME, TMP_GRACE_S, Store, validate_job_name
from ckptd.pipeline import write as pipeline_module
from ckptd.pipeline.plan import PipelineConfig, tensor_source
from ckptd.pipeline.write import WriteResult, write_checkpoint
from tests.conftest import trained

KiB = 1 << 10
SMALL = PipelineConfig(chunk_bytes=64 * KiB, pack_bytes=4 * KiB, threads=2)
"""Small sizes so that a few hundred KiB of state is both split and packed."""


E = TypeVar("E", bound=BaseException)


@contextmanager
def raises_exactly(cls: type[E], match: str | None = None) -> Iterator[pytest.ExceptionInfo[E]]:
    """pytest.raises that also refuses subclasses (ManifestError is a CorruptCheckpointError)."""
    with pytest.raises(cls, match=match) as info:
        yield info
    assert info.type is cls, f"expected exactly {cls.__name__}, got {info.type.__name__}"


_QUANTIZED = {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"}
TENSOR_DTYPES = sorted(
    (
        v
        for v in vars(torch).values()
        if isinstance(v, torch.dtype) and dtype_name(v) not in _QUANTIZED
    ),
    key=str,
)


def save(
    store: Store,
    job: str,
    step: int,
    state: Any,
    *,
    config: PipelineConfig = SMALL,
    allow_pickle: bool = False,
    metric: float | None = None,
) -> WriteResult:
    flat = flatten(state, allow_pickle=allow_pickle)
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    return write_checkpoint(store, job, step, flat.skeleton, sources, config=config, metric=metric)


def load(store: Store, job: str, step: int | str = "latest", **kw: Any) -> Any:
    return load_checkpoint(store, job, step, **kw).state


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(expected: torch.Tensor, got: torch.Tensor) -> None:
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert torch.equal(as_bytes(got), as_bytes(expected))


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Arbitrary bytes viewed as ``dtype`` (NaNs with payloads, subnormals, ...)."""
    itemsize = dtype.itemsize
    n = 1
    for d in shape:
        n *= d
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def object_files(store: Store, job: str) -> dict[str, bytes]:
    base = store.job_dir(job) / "objects"
    return {p.name: p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def tmp_files(store: Store, job: str) -> list[str]:
    return sorted(p.name for p in store.tmp_dir(job).iterdir())


def object_of(store: Store, job: str, step: int, tensor_path: str, piece: int = 0) -> Path:
    manifest = store.read_manifest(job, step)
    (entry,) = [t for t in manifest.tensors if t.path == tensor_path]
    return store.object_path(job, entry.pieces[piece].object)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# ---- bit-identical round trips ----------------------------------------------------------------


def test_non_contiguous_views_zero_dim_and_empty(store: Store) -> None:
    base = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    state = {
        "base": base,
        "transposed": base.t(),
        "stepped": base[::2, ::3],
        "row": base[1],
        "rows": base[2:5],
        "column": base[:, 7],
        "expanded": torch.arange(3.0).expand(4, 3),
        "zero_dim": torch.tensor(3.5, dtype=torch.float64),
        "zero_dim_int": torch.tensor(-7),
        "empty": torch.empty(0, 5),
        "empty_i64": torch.zeros(0, dtype=torch.int64),
        "neg": torch._neg_view(torch.ones(3)),
    }
    assert not state["transposed"].is_contiguous()
    assert not state["stepped"].is_contiguous()
    save(store, "views", 1, state)
    got = load(store, "views")
    assert list(got) == list(state)
    for key, tensor in state.items():
        assert_bit_identical(tensor, got[key])
    assert torch.equal(got["neg"], -torch.ones(3))
    # Views are stored by value: restoring gives independent tensors with the same bytes.
    got["base"][1].zero_()
    assert torch.equal(got["row"], base[1])


def test_every_dtype_bit_identical(store: Store) -> None:
    state: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(TENSOR_DTYPES):
        name = dtype_name(dtype)
        state[f"{name}.small"] = random_tensor(dtype, (3, 5), seed=i)  # packed
        state[f"{name}.odd"] = random_tensor(dtype, (7,), seed=100 + i)  # odd length
        state[f"{name}.big"] = random_tensor(dtype, (9 * KiB // dtype.itemsize + 3,), seed=200 + i)
        state[f"{name}.scalar"] = random_tensor(dtype, (), seed=300 + i)
    save(store, "dtypes", 1, state)
    got = load(store, "dtypes")
    for key, tensor in state.items():
        assert_bit_identical(tensor, got[key])


@pytest.mark.parametrize("codec", ["auto", "zstd", "raw"])
def test_trained_model_roundtrip_with_each_codec(store: Store, codec: Any) -> None:
    model, opt, sched = trained()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "sched": sched.state_dict(),
    }
    config = PipelineConfig(chunk_bytes=64 * KiB, pack_bytes=4 * KiB, codec=CodecConfig(codec))
    result = save(store, "net", 3, state, config=config)
    got = load(store, "net")
    for key, tensor in state["model"].items():
        assert_bit_identical(tensor, got["model"][key])
    for pid, entry in state["optimizer"]["state"].items():
        for key, value in entry.items():
            assert_bit_identical(value, got["optimizer"]["state"][pid][key])
    assert got["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert got["sched"] == state["sched"]
    codecs = {o.codec for o in result.manifest.objects.values()}
    if codec == "raw":
        assert codecs == {"raw"}
    elif codec == "zstd":
        assert "bytegroup+zstd" not in codecs
    else:
        assert "bytegroup+zstd" in codecs


def test_tensor_bigger_than_chunk_is_split(store: Store) -> None:
    big = torch.randn(50_000, generator=torch.Generator().manual_seed(1))  # 200,000 bytes
    result = save(store, "big", 1, {"big": big, "bias": torch.ones(3)})
    entry = result.manifest.tensors[0]
    assert [p.length for p in entry.pieces] == [65536, 65536, 65536, 3392]
    assert all(p.offset == 0 for p in entry.pieces)
    assert len({p.object for p in entry.pieces}) == 4
    assert len(result.manifest.objects) == 5
    assert len(object_files(store, "big")) == 5
    got = load(store, "big")
    assert_bit_identical(big, got["big"])
    assert_bit_identical(torch.ones(3), got["bias"])


def test_hundreds_of_small_tensors_are_packed(store: Store) -> None:
    gen = torch.Generator().manual_seed(2)
    state = {
        **{f"f{i}": torch.randn(50, generator=gen) for i in range(400)},  # 400 x 200 B
        **{f"i{i}": torch.arange(i, i + 10) for i in range(300)},  # 300 x 80 B
    }
    result = save(store, "many", 1, state)
    # float32: 80,000 bytes in 64 KiB packs -> 2 objects; int64: 24,000 bytes -> 1 object.
    assert len(result.manifest.objects) == 3
    assert result.new_objects == 3
    assert len(object_files(store, "many")) == 3
    assert result.manifest.tensors[1].pieces[0].offset == 200
    got = load(store, "many")
    assert list(got) == list(state)
    for key, tensor in state.items():
        assert_bit_identical(tensor, got[key])


def test_tied_weights_stay_tied(store: Store) -> None:
    w = torch.randn(16, 8)
    result = save(store, "tied", 1, {"embed": w, "head": w, "other": w.clone()})
    assert len(result.manifest.tensors) == 2
    got = load(store, "tied")
    assert got["embed"] is got["head"]
    assert got["other"] is not got["embed"]


def test_conjugate_view_is_restored_conjugated(store: Store) -> None:
    """BUG (ckptd/format/skeleton.py flatten.add_tensor): see test_skeleton; through the store
    too."""
    z = torch.randn(4, dtype=torch.complex64)
    save(store, "conj", 1, {"z": z, "zc": z.conj()})
    got = load(store, "conj")
    assert torch.equal(got["zc"], z.conj().resolve_conj())


def test_metric_and_created_are_recorded(store: Store) -> None:
    result = save(store, "m", 7, {"t": torch.ones(1)}, metric=0.5)
    manifest = store.read_manifest("m", 7)
    assert manifest == result.manifest
    assert manifest.metric == 0.5
    assert manifest.created.endswith("Z")


def test_allow_pickle_through_the_store(store: Store) -> None:
    save(store, "pkl", 1, {"seen": {1, 2}}, allow_pickle=True)
    assert load(store, "pkl", allow_pickle=True) == {"seen": {1, 2}}
    with pytest.raises(UnsupportedStateError, match=r"^seen: this value was stored pickled"):
        load(store, "pkl")


def test_map_location(store: Store) -> None:
    save(store, "dev", 1, {"t": torch.arange(4)})
    got = load(store, "dev", map_location="meta")
    assert got["t"].device.type == "meta"


# ---- dedup -------------------------------------------------------------------------------------


def test_unchanged_weights_write_nothing(store: Store) -> None:
    model, opt, _ = trained()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    first = save(store, "dedup", 1, state)
    assert first.written_bytes > 0
    assert first.written_bytes == sum(len(b) for b in object_files(store, "dedup").values())
    before = object_files(store, "dedup")

    second = save(store, "dedup", 2, state)
    assert second.written_bytes == 0
    assert second.new_objects == 0
    assert second.reused_objects == len(second.manifest.objects) == len(first.manifest.objects)
    assert second.manifest.written_bytes == 0
    assert object_files(store, "dedup") == before
    assert json.loads(second.path.read_bytes())["totals"]["written_bytes"] == 0


def test_one_changed_tensor_writes_only_its_objects(store: Store) -> None:
    gen = torch.Generator().manual_seed(3)
    state = {"a": torch.randn(40_000, generator=gen), "b": torch.randn(40_000, generator=gen)}
    save(store, "delta", 1, state)
    before = set(object_files(store, "delta"))
    state["b"] = state["b"].clone()
    state["b"][0] += 1  # first chunk of b changes, the other two stay
    result = save(store, "delta", 2, state)
    after = set(object_files(store, "delta"))
    assert result.new_objects == 1
    assert len(after - before) == 1
    assert result.reused_objects == len(result.manifest.objects) - 1
    assert_bit_identical(state["b"], load(store, "delta", 2)["b"])


def test_identical_chunks_in_one_checkpoint_are_counted_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BUG (pipeline/write.py write_checkpoint/_write_chunk): two chunks of one checkpoint with
    the same content (a zero tensor bigger than chunk_bytes, two identical buffers) can both miss
    the dedup check and both be written; written_bytes then counts the object twice and
    reused_objects goes negative. The seam below forces that interleaving: both chunks' hashes
    are done before either asks the store whether the object can be reused."""
    barrier = threading.Barrier(2, timeout=5)
    real_hash = pipeline_module.content_hash  # type: ignore[attr-defined]

    def hash_in_lockstep(data: Any) -> str:
        digest = real_hash(data)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        return digest

    monkeypatch.setattr(pipeline_module, "content_hash", hash_in_lockstep)
    zeros = torch.zeros(2 * 64 * KiB // 4)  # two identical 64 KiB chunks
    result = save(store, "zeros", 1, {"m": zeros})
    on_disk = object_files(store, "zeros")
    assert len(on_disk) == 1
    assert result.new_objects == 1
    assert result.reused_objects == 0
    assert result.written_bytes == sum(len(b) for b in on_disk.values())
    assert result.manifest.written_bytes == result.written_bytes


# ---- corruption --------------------------------------------------------------------------------


def _two_tensor_checkpoint(store: Store, job: str = "c", step: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    state = {
        # random bytes do not compress: raw objects, so a flipped payload byte decodes fine and
        # only the hash check can catch it
        "model.a": random_tensor(torch.uint8, (20_000,), seed=step),
        "model.b": torch.randn(6_000, generator=gen),
    }
    save(store, job, step, state)
    return state


def test_flipped_byte_is_caught_by_the_hash(store: Store) -> None:
    _two_tensor_checkpoint(store)
    path = object_of(store, "c", 1, "model.a")
    assert path.read_bytes()[4] == 0  # raw codec
    flip_byte(path, 16 + 12_345)
    with raises_exactly(
        CorruptCheckpointError,
        match=rf"^object {path} \(holding tensor model\.a\) is corrupt: its content hashes to "
        rf"[0-9a-f]{{16}}\.\.\., not its name; job 'c' step 1 cannot be restored bit-exactly",
    ):
        load(store, "c")


def test_flipped_byte_in_a_compressed_object(store: Store) -> None:
    _two_tensor_checkpoint(store)
    path = object_of(store, "c", 1, "model.b")
    assert path.read_bytes()[4] == 2  # byte-grouped floats
    flip_byte(path, path.stat().st_size - 10)
    with raises_exactly(
        CorruptCheckpointError, match=rf"^object {path} \(holding tensor model\.b\)"
    ):
        load(store, "c")


def test_flipped_byte_in_a_packed_object_names_all_its_tensors(store: Store) -> None:
    state = {f"layer{i}.bias": random_tensor(torch.uint8, (100,), seed=i) for i in range(6)}
    save(store, "pack", 1, state)
    path = object_of(store, "pack", 1, "layer3.bias")
    flip_byte(path, 16 + 5)
    with raises_exactly(
        CorruptCheckpointError,
        match=r"\(holding tensors layer0\.bias, layer1\.bias, layer2\.bias, layer3\.bias and 2 "
        r"more\) is corrupt",
    ):
        load(store, "pack")


def test_truncated_object(store: Store) -> None:
    _two_tensor_checkpoint(store)
    path = object_of(store, "c", 1, "model.a")
    path.write_bytes(path.read_bytes()[:-100])
    with raises_exactly(
        CorruptCheckpointError,
        match=rf"^object {path} \(holding tensor model\.a\): truncated object "
        r"\(19916 bytes on disk, the manifest says 20016\)",
    ):
        load(store, "c")


def test_object_truncated_to_nothing(store: Store) -> None:
    _two_tensor_checkpoint(store)
    path = object_of(store, "c", 1, "model.b")
    path.write_bytes(b"")
    with raises_exactly(CorruptCheckpointError, match=r"model\.b\): truncated object \(0 bytes"):
        load(store, "c")


def test_missing_object(store: Store) -> None:
    _two_tensor_checkpoint(store)
    path = object_of(store, "c", 1, "model.b")
    path.unlink()
    with raises_exactly(
        CorruptCheckpointError,
        match=rf"^object {path} \(holding tensor model\.b\): missing object {path}$",
    ):
        load(store, "c")


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],
        lambda b: b.replace(b'"ckptd.manifest"', b'"something.else"'),
        lambda b: b.replace(b'"nbytes": 20000', b'"nbytes": 20001'),
        lambda b: b"",
    ],
    ids=["truncated", "format", "nbytes", "empty"],
)
def test_malformed_manifest(store: Store, damage: Any) -> None:
    _two_tensor_checkpoint(store)
    path = store.manifest_path("c", 1)
    path.write_bytes(damage(path.read_bytes()))
    with raises_exactly(ManifestError, match=rf"^{path}: "):
        load(store, "c")


def test_manifest_renamed_to_another_step(store: Store) -> None:
    _two_tensor_checkpoint(store)
    store.manifest_path("c", 1).rename(store.manifest_path("c", 2))
    with raises_exactly(
        ManifestError,
        match=r"manifest says job 'c' step 1, but its file name says job 'c' step 2",
    ):
        load(store, "c", 2)


def test_verify_manifest_reports_one_message_per_bad_object(store: Store) -> None:
    state = {f"t{i}": random_tensor(torch.uint8, (5_000,), seed=i) for i in range(4)}
    result = save(store, "v", 1, state)
    manifest = result.manifest
    assert verify_manifest(store, manifest) == []
    flipped = object_of(store, "v", 1, "t0")
    missing = object_of(store, "v", 1, "t2")
    flip_byte(flipped, 100)
    missing.unlink()
    messages = verify_manifest(store, manifest)
    assert len(messages) == 2
    assert sum(str(flipped) in m and "is corrupt" in m for m in messages) == 1
    assert sum(str(missing) in m and "missing object" in m for m in messages) == 1
    assert not any("t1" in m or "t3" in m for m in messages)


def test_verify_progress_counts_raw_bytes(store: Store) -> None:
    result = save(store, "p", 1, {"a": torch.zeros(5000), "b": torch.ones(3)})
    seen: list[int] = []
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            seen.append(n)

    assert verify_manifest(store, result.manifest, progress=progress) == []
    assert sum(seen) == result.manifest.raw_bytes
    tensors = read_tensors(store, result.manifest, threads=1)
    assert [t.shape for t in tensors] == [torch.Size([5000]), torch.Size([3])]


# ---- fallback ----------------------------------------------------------------------------------


def test_fallback_skips_a_corrupt_latest(store: Store) -> None:
    first = _two_tensor_checkpoint(store, step=1)
    _two_tensor_checkpoint(store, step=2)
    flip_byte(object_of(store, "c", 2, "model.a"), 16 + 1)
    with raises_exactly(CorruptCheckpointError):
        load(store, "c")  # without fallback: an error, never older data
    with pytest.warns(
        FallbackWarning,
        match=r"job 'c': restored step 1, skipping newer checkpoint\(s\) that do not verify: "
        r"step 2: object .* is corrupt",
    ):
        loaded: Loaded = load_checkpoint(store, "c", "latest", fallback=True)
    assert loaded.step == 1
    assert_bit_identical(first["model.a"], loaded.state["model.a"])


def test_fallback_skips_a_malformed_latest_manifest(store: Store) -> None:
    _two_tensor_checkpoint(store, step=1)
    _two_tensor_checkpoint(store, step=2)
    _two_tensor_checkpoint(store, step=3)
    store.manifest_path("c", 3).write_bytes(b"{")
    object_of(store, "c", 2, "model.b").unlink()
    with pytest.warns(
        FallbackWarning,
        match=r"restored step 1, .*step 3: .*not valid JSON.*; step 2: .*missing object",
    ):
        loaded = load_checkpoint(store, "c", fallback=True)
    assert loaded.step == 1


def test_fallback_raises_when_nothing_verifies(store: Store) -> None:
    _two_tensor_checkpoint(store, step=1)
    _two_tensor_checkpoint(store, step=2)
    for step in (1, 2):
        flip_byte(object_of(store, "c", step, "model.a"), 16)
    with raises_exactly(
        CorruptCheckpointError,
        match=r"^job 'c': none of its 2 checkpoint\(s\) verifies: step 2: .*; step 1: ",
    ):
        load(store, "c", fallback=True)


def test_fallback_without_damage_warns_nothing(store: Store) -> None:
    _two_tensor_checkpoint(store, step=1)
    _two_tensor_checkpoint(store, step=2)
    # -W error turns any warning into a failure here
    assert load_checkpoint(store, "c", fallback=True).step == 2


def test_fallback_does_not_apply_to_an_explicit_step(store: Store) -> None:
    _two_tensor_checkpoint(store, step=1)
    _two_tensor_checkpoint(store, step=2)
    flip_byte(object_of(store, "c", 2, "model.a"), 16)
    with raises_exactly(CorruptCheckpointError, match="is corrupt"):
        load(store, "c", 2, fallback=True)


# ---- failures while writing --------------------------------------------------------------------


def _state_with_chunks(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return {f"w{i}": torch.randn(10_000, generator=gen) for i in range(n)}  # one object each


def test_disk_full_on_the_nth_object_commits_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _two_tensor_checkpoint(store, "c", 1)
    calls = 0
    lock = threading.Lock()
    real_write = Store.write_object

    def failing_write(
        self: Store, job: str, digest: str, parts: Iterable[Buffer]
    ) -> tuple[int, bool]:
        nonlocal calls
        with lock:
            calls += 1
            fail = calls == 3
        if fail:
            raise DiskFullError(f"cannot write {digest}: No space left on device")
        return real_write(self, job, digest, parts)

    monkeypatch.setattr(Store, "write_object", failing_write)
    done: list[bool] = []
    flat = flatten(_state_with_chunks(6))
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    with pytest.raises(DiskFullError, match="No space left on device"):
        write_checkpoint(
            store,
            "c",
            2,
            flat.skeleton,
            sources,
            config=SMALL,
            on_read_done=lambda: done.append(True),
        )
    assert done == [True]  # the caller's buffers are released even on failure
    assert store.steps("c") == [1]
    assert not store.manifest_path("c", 2).exists()
    assert tmp_files(store, "c") == []
    monkeypatch.undo()
    assert verify_manifest(store, store.read_manifest("c", 1)) == []
    load(store, "c")


def test_enospc_mid_file_removes_the_tmp_file(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure happens inside durable_write, after its tmp file exists."""
    _two_tensor_checkpoint(store, "c", 1)
    before = object_files(store, "c")
    real_write = Store.write_object
    seen_tmp: list[list[str]] = []

    def parts_then_enospc(parts: Iterable[Buffer], self: Store, job: str) -> Iterator[Buffer]:
        for part in parts:
            yield part
            seen_tmp.append(tmp_files(self, job))
            raise OSError(errno.ENOSPC, "No space left on device")

    def write_object(
        self: Store, job: str, digest: str, parts: Iterable[Buffer]
    ) -> tuple[int, bool]:
        return real_write(self, job, digest, parts_then_enospc(parts, self, job))

    monkeypatch.setattr(Store, "write_object", write_object)
    with pytest.raises(
        DiskFullError, match=r"^cannot write .*objects/.*: No space left on device; free space"
    ):
        save(store, "c", 2, _state_with_chunks(3))
    assert seen_tmp and all(len(names) >= 1 for names in seen_tmp)  # a tmp file did exist
    assert tmp_files(store, "c") == []
    assert store.steps("c") == [1]
    assert object_files(store, "c") == before
    monkeypatch.undo()
    assert verify_manifest(store, store.read_manifest("c", 1)) == []


def test_failed_manifest_commit_leaves_no_manifest(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _two_tensor_checkpoint(store, "c", 1)

    def no_room(self: Store, manifest: Any) -> Path:
        raise DiskFullError("cannot write manifest: No space left on device")

    monkeypatch.setattr(Store, "commit_manifest", no_room)
    with pytest.raises(DiskFullError):
        save(store, "c", 2, _state_with_chunks(2))
    monkeypatch.undo()
    assert store.steps("c") == [1]
    # The orphaned objects are garbage: GC removes exactly them.
    assert store.gc("c").objects == 2
    assert verify_manifest(store, store.read_manifest("c", 1)) == []


def test_wrong_byte_count_is_refused_before_touching_disk(store: Store) -> None:
    src = tensor_source("w", torch.zeros(4))
    bad = type(src)("w", "float32", (5,), src.data)
    with pytest.raises(ValueError, match=r"^w: 16 bytes given for float32\[5\]"):
        write_checkpoint(store, "j", 1, {"w": {"$tensor": 0}}, [bad])
    assert not store.root.exists()


# ---- GC and tmp sweeping -----------------------------------------------------------------------


def test_gc_removes_only_unreferenced_objects(store: Store) -> None:
    gen = torch.Generator().manual_seed(5)
    shared = torch.randn(10_000, generator=gen)
    one = save(store, "g", 1, {"shared": shared, "only1": torch.randn(10_000, generator=gen)})
    two = save(store, "g", 2, {"shared": shared, "only2": torch.randn(10_000, generator=gen)})
    only1 = set(one.manifest.objects) - set(two.manifest.objects)
    assert len(only1) == 1

    assert store.gc("g").objects == 0  # everything is referenced
    store.delete_checkpoint("g", 1)
    files = object_files(store, "g")
    dry = store.gc("g", dry_run=True)
    assert (dry.objects, dry.bytes) == (1, len(files[next(iter(only1))]))
    assert object_files(store, "g") == files

    result = store.gc("g")
    assert (result.objects, result.bytes) == (dry.objects, dry.bytes)
    remaining = object_files(store, "g")
    assert set(remaining) == set(two.manifest.objects)
    assert all(remaining[h] == files[h] for h in remaining)
    assert verify_manifest(store, store.read_manifest("g", 2)) == []


def test_gc_spares_recent_unreferenced_objects(store: Store) -> None:
    save(store, "g", 1, {"a": torch.randn(3000), "b": torch.randn(3000)})
    manifest = store.read_manifest("g", 1)
    store.delete_checkpoint("g", 1)
    paths = [store.object_path("g", h) for h in sorted(manifest.objects)]
    old = paths[0].stat().st_mtime - 2 * STALE_TMP_S
    os.utime(paths[0], (old, old))
    result = store.gc("g", min_age_s=STALE_TMP_S)
    assert result.objects == 1
    assert not paths[0].exists()
    assert paths[1].exists()


def test_gc_stops_on_an_unreadable_manifest(store: Store) -> None:
    _two_tensor_checkpoint(store, "c", 1)
    _two_tensor_checkpoint(store, "c", 2)
    before = object_files(store, "c")
    store.manifest_path("c", 2).write_bytes(b"not json")
    with raises_exactly(ManifestError, match="not valid JSON"):
        store.gc("c")
    assert object_files(store, "c") == before


def test_delete_missing_checkpoint(store: Store) -> None:
    _two_tensor_checkpoint(store, "c", 1)
    with pytest.raises(
        NotFoundError, match=r"job 'c' has no checkpoint at step 9; steps that exist: 1$"
    ):
        store.delete_checkpoint("c", 9)


def test_sweep_tmp(store: Store) -> None:
    store.open_job("s")
    tmp = store.tmp_dir("s")
    (tmp / "a.tmp").write_bytes(b"x")
    (tmp / "b.tmp").write_bytes(b"y")
    (tmp / "dir").mkdir()
    (tmp / "dir" / "inner").write_bytes(b"z")
    assert store.sweep_tmp("s", dry_run=True) == 3
    assert len(tmp_files(store, "s")) == 3
    assert store.sweep_tmp("s") == 3
    assert tmp_files(store, "s") == []
    assert store.sweep_tmp("s") == 0
    assert store.sweep_tmp("no-such-job") == 0


def test_sweep_tmp_respects_age_and_open_job_sweeps_stale_files(store: Store) -> None:
    store.open_job("s")
    tmp = store.tmp_dir("s")
    stale, fresh = tmp / "stale.tmp", tmp / "fresh.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = fresh.stat().st_mtime - 2 * STALE_TMP_S
    os.utime(stale, (old, old))
    store.open_job("s")  # a writer opening the job removes only leftovers older than an hour
    assert tmp_files(store, "s") == ["fresh.tmp"]
    assert store.sweep_tmp("s", min_age_s=STALE_TMP_S) == 0
    assert store.sweep_tmp("s") == 1


def test_gc_also_sweeps_old_tmp_files(store: Store) -> None:
    _two_tensor_checkpoint(store, "c", 1)
    old_file, fresh_file = store.tmp_dir("c") / "old.tmp", store.tmp_dir("c") / "fresh.tmp"
    old_file.write_bytes(b"x")
    fresh_file.write_bytes(b"y")
    old = fresh_file.stat().st_mtime - 2 * TMP_GRACE_S
    os.utime(old_file, (old, old))
    # GC spares tmp files younger than TMP_GRACE_S: a metadata write may own them.
    assert store.gc("c").tmp_files == 1
    assert tmp_files(store, "c") == ["fresh.tmp"]


def test_successful_write_leaves_no_tmp_files(store: Store) -> None:
    _two_tensor_checkpoint(store, "c", 1)
    assert tmp_files(store, "c") == []
    names = {p.name for p in store.job_dir("c").iterdir()}
    assert {"manifests", "objects", "tmp"} <= names
    assert not [p for p in store.job_dir("c").rglob("*") if p.name.endswith(".tmp")]


# ---- names, symlinks, missing steps ------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a/b",
        "/abs",
        "..",
        "a..b",
        "../up",
        "a\x00b",
        "x" * (MAX_JOB_NAME + 1),
        "",
        ".hidden",
        "-x",
        "a b",
        "a\n",
    ],
    ids=[
        "slash",
        "absolute",
        "dotdot",
        "inner-dotdot",
        "up",
        "nul",
        "129",
        "empty",
        "dot",
        "dash",
        "space",
        "newline",
    ],
)
def test_invalid_job_names(store: Store, name: str) -> None:
    with pytest.raises(InvalidNameError, match="job name"):
        validate_job_name(name)
    with pytest.raises(InvalidNameError):
        save(store, name, 1, {"t": torch.ones(1)})
    assert not store.root.exists()


def test_job_name_length_messages() -> None:
    with pytest.raises(InvalidNameError, match=r"must be 1 to 128 characters long, got 129"):
        validate_job_name("x" * 129)
    with pytest.raises(
        InvalidNameError, match=r"invalid job name 'a\\x00b'.*no '/', '\.\.' or NUL"
    ):
        validate_job_name("a\x00b")
    with pytest.raises(InvalidNameError, match="job name must be a string, got int"):
        validate_job_name(5)


def test_longest_job_name_is_accepted(store: Store) -> None:
    name = "j" * MAX_JOB_NAME
    assert validate_job_name(name) == name
    save(store, name, 1, {"t": torch.ones(1)})
    assert store.jobs() == [name]
    assert torch.equal(load(store, name)["t"], torch.ones(1))


def test_symlinked_job_directory_is_refused(store: Store, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store.root.mkdir(parents=True)
    (store.root / "evil").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(
        StorePermissionError,
        match=r"job directory .*evil is a symlink; ckptd never writes or deletes through symlinks",
    ):
        save(store, "evil", 1, {"t": torch.ones(1)})
    assert list(elsewhere.iterdir()) == []
    assert store.jobs() == []


def test_missing_step_lists_existing_steps(store: Store) -> None:
    for step in (100, 200, 300):
        save(store, "s", step, {"t": torch.full((2,), float(step))})
    with pytest.raises(
        NotFoundError,
        match=r"^job 's' has no checkpoint at step 150; steps that exist: 100, 200, 300$",
    ):
        load(store, "s", 150)
    with pytest.raises(NotFoundError, match=r"steps that exist: 100, 200, 300$"):
        store.read_manifest("s", 150)
    with pytest.raises(NotFoundError, match=r"step must be a number or 'latest', got 'newest'"):
        load(store, "s", "newest")
    assert torch.equal(load(store, "s", "200")["t"], torch.full((2,), 200.0))
    assert torch.equal(load(store, "s")["t"], torch.full((2,), 300.0))


def test_missing_job(store: Store) -> None:
    save(store, "exists", 1, {"t": torch.ones(1)})
    with pytest.raises(
        NotFoundError, match=r"^job 'nope' has no checkpoints under .* \(jobs there: exists\)$"
    ):
        load(store, "nope")
    with pytest.raises(NotFoundError, match=r"jobs there: exists"):
        load(store, "nope", fallback=True)


def test_many_steps_are_abbreviated(store: Store) -> None:
    for step in range(1, 16):
        save(store, "s", step, {"t": torch.ones(1)})
    with pytest.raises(
        NotFoundError,
        match=r"steps that exist: 1, 2, 3, 4, 5, \.\.\. \(5 more\) \.\.\., 11, 12, 13, 14, 15$",
    ):
        load(store, "s", 99)
