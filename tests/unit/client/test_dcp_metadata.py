"""ckptd_client.dcp without processes: DCP ``Metadata`` built from hand-built rank parts (the
seam between ckptd's records and DCP's planner), ``dcp.load`` in this process from parts written
by the pipeline, and the writer's pure pieces (ids, plans, the state a rank stores, pickling).

Skeletons here are written by hand as a rank's manifest holds them, ``$dtensor`` tags included
(docs/format.md, "Skeleton"), so no process group is needed.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultSavePlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from ckptd.errors import CorruptCheckpointError, RankLayoutError, UnsupportedStateError
from ckptd.format.manifest import Manifest, TensorEntry
from ckptd.format.skeleton import dtype_name, flatten
from ckptd.format.store import Store
from ckptd.pipeline.plan import PipelineConfig, tensor_source
from ckptd.pipeline.write import write_checkpoint
from ckptd_client.dcp import (
    ChunkSource,
    CkptdStorageReader,
    CkptdStorageWriter,
    StepSources,
    ValueSource,
    build_metadata,
    rank_state,
)

JOB = "sharded"


def shard(index: int, shape: list[int], offsets: list[int], mesh: list[int] | None = None) -> Any:
    """A ``$dtensor`` node: tensor ``index`` is the block at ``offsets`` of ``shape``."""
    mesh_shape = mesh or [2]
    placements = ["R"] * (len(mesh_shape) - 1) + ["S(0)"]
    return {
        "$dtensor": index,
        "shape": shape,
        "offsets": offsets,
        "placements": placements,
        "mesh": {
            "shape": mesh_shape,
            "names": None,
            "ranks": list(range(int(np.prod(mesh_shape)))),
            "device": "cpu",
        },
    }


def part(
    rank: int, world_size: int, skeleton: Any, tensors: list[torch.Tensor], step: int = 3
) -> Manifest:
    """Rank ``rank``'s part as the metadata builder sees it (no objects needed)."""
    entries = tuple(
        TensorEntry(f"t{i}", dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size(), ())
        for i, t in enumerate(tensors)
    )
    return Manifest(
        JOB,
        step,
        "2026-01-01T00:00:00Z",
        entries,
        {},
        skeleton,
        rank=rank,
        world_size=world_size,
        attempt="a1" if world_size > 1 else None,
    )


W = torch.arange(35, dtype=torch.float32).reshape(7, 5)
HEAD = torch.arange(7, dtype=torch.float32).reshape(1, 7) + 100


def fsdp_parts() -> list[tuple[Any, list[torch.Tensor]]]:
    """Two ranks' skeletons and tensors: ``model.w`` split 4 + 3 rows, ``model.head`` 1 + 0,
    a replicated bias, a step counter, rank-local values, optimizer-style param groups."""
    bias = torch.tensor([0.5, -0.5])
    out = []
    for rank, (rows, head_rows) in enumerate(
        ((slice(0, 4), slice(0, 1)), (slice(4, 7), slice(1, 1)))
    ):
        w, head = W[rows].clone(), HEAD[head_rows].clone()
        skeleton = {
            "model": {
                "w": shard(0, [7, 5], [rows.start, 0]),
                "head": shard(1, [1, 7], [head_rows.start, 0]),
                "bias": {"$tensor": 2},
            },
            "optimizer": {
                "state": {"$dict": [[0, {"step": {"$tensor": 3}}]], "ordered": False},
                "param_groups": [{"lr": 0.1, "betas": {"$tuple": [0.9, 0.999]}, "params": [0]}],
            },
            "rng": {"seed": {"$tuple": ["MT", {"$ndarray": 4}, rank]}},
            "extra": {"epoch": 7, "name": f"rank-{rank}"},
        }
        tensors = [w, head, bias, torch.tensor(3.0), torch.arange(3, dtype=torch.int32) + rank]
        out.append((skeleton, tensors))
    return out


def metadata_of(parts: list[tuple[Any, list[torch.Tensor]]]) -> Any:
    world = len(parts)
    return build_metadata([part(r, world, s, t) for r, (s, t) in enumerate(parts)])


# ---- Metadata from parts -------------------------------------------------------------------------


def test_shards_of_two_ranks_are_chunks_of_one_global_tensor() -> None:
    md = metadata_of(fsdp_parts())
    w = md.state_dict_metadata["model.w"]
    assert isinstance(w, TensorStorageMetadata)
    assert (w.size, w.properties.dtype) == (torch.Size([7, 5]), torch.float32)
    assert w.chunks == [
        ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4, 5])),
        ChunkStorageMetadata(torch.Size([4, 0]), torch.Size([3, 5])),
    ]
    head = md.state_dict_metadata["model.head"]
    assert isinstance(head, TensorStorageMetadata)
    # rank 1's shard of the one-row tensor is empty (torch puts it at offset 1): no chunk.
    assert head.chunks == [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([1, 7]))]
    sources = md.storage_data
    assert isinstance(sources, StepSources)
    assert (sources.job, sources.step, sources.world_size) == (JOB, 3, 2)
    assert sources.sources[MetadataIndex("model.w", [0, 0])] == ChunkSource(0, 0)
    assert sources.sources[MetadataIndex("model.w", [4, 0])] == ChunkSource(1, 0)
    assert sources.refused == {}


def test_plain_tensors_and_values_come_from_the_lowest_rank_holding_them() -> None:
    parts = fsdp_parts()
    parts[1][0]["model"]["only_one"] = {"$tensor": 5}
    parts[1][1].append(torch.ones(2, 2))
    md = metadata_of(parts)
    sources = md.storage_data
    bias = md.state_dict_metadata["model.bias"]
    assert isinstance(bias, TensorStorageMetadata)
    assert bias.chunks == [ChunkStorageMetadata(torch.Size([0]), torch.Size([2]))]
    assert sources.sources[MetadataIndex("model.bias", [0])] == ChunkSource(0, 2)
    assert sources.sources[MetadataIndex("model.only_one", [0, 0])] == ChunkSource(1, 5)
    step = md.state_dict_metadata["optimizer.state.0.step"]
    assert isinstance(step, TensorStorageMetadata) and step.size == torch.Size([])
    for key in ("extra.name", "rng.seed", "optimizer.param_groups.0.betas"):
        assert isinstance(md.state_dict_metadata[key], BytesStorageMetadata), key
    name = sources.sources[MetadataIndex("extra.name")]
    assert name == ValueSource(0, "rank-0", ())
    seed = sources.sources[MetadataIndex("rng.seed")]
    assert isinstance(seed, ValueSource) and seed.tensors == (4,)
    # DCP's flattening rules: an int dict key becomes "0", a list index stays an int.
    assert md.planner_data["optimizer.state.0.step"] == ("optimizer", "state", "0", "step")
    assert md.planner_data["optimizer.param_groups.0.lr"] == ("optimizer", "param_groups", 0, "lr")
    assert md.planner_data["optimizer.param_groups.0.params"] == (
        "optimizer",
        "param_groups",
        0,
        "params",
    )


def test_replicated_blocks_are_read_once_from_the_lowest_rank() -> None:
    """A 2 x 2 mesh (Replicate, Shard(0)): ranks 0 and 2 hold rows 0-3, ranks 1 and 3 rows 4-6."""
    parts = []
    for rank in range(4):
        rows = slice(0, 4) if rank % 2 == 0 else slice(4, 7)
        skeleton = {"w": shard(0, [7, 5], [rows.start, 0], mesh=[2, 2])}
        parts.append((skeleton, [W[rows].clone()]))
    md = metadata_of(parts)
    w = md.state_dict_metadata["w"]
    assert isinstance(w, TensorStorageMetadata) and len(w.chunks) == 2
    assert md.storage_data.sources[MetadataIndex("w", [0, 0])] == ChunkSource(0, 0)
    assert md.storage_data.sources[MetadataIndex("w", [4, 0])] == ChunkSource(1, 0)


def test_a_single_process_checkpoint_is_its_own_only_part() -> None:
    skeleton = {"w": {"$tensor": 0}, "tied": {"$tensor": 0}, "note": None}
    md = metadata_of([(skeleton, [W])])
    assert md.storage_data.world_size == 1
    assert md.storage_data.sources[MetadataIndex("tied", [0, 0])] == ChunkSource(0, 0)
    assert isinstance(md.state_dict_metadata["note"], BytesStorageMetadata)


def refused_of(parts: list[tuple[Any, list[torch.Tensor]]]) -> dict[str, Exception]:
    md = metadata_of(parts)
    refused: dict[str, Exception] = md.storage_data.refused
    for key in refused:
        assert isinstance(md.state_dict_metadata[key], BytesStorageMetadata), key
        assert not any(index.fqn == key for index in md.storage_data.sources), key
    return refused


def test_keys_the_ranks_disagree_on_are_refused_with_the_reason() -> None:
    parts = fsdp_parts()
    parts[0][0]["x"] = {"$tensor": 5}
    parts[0][1].append(torch.zeros(3))
    parts[1][0]["x"] = {"$tensor": 5}
    parts[1][1].append(torch.zeros(4))
    parts[0][0]["mixed"] = {"$tensor": 6}
    parts[0][1].append(torch.zeros(1))
    parts[1][0]["mixed"] = 2.5
    parts[0][0]["wide"] = {"$tensor": 7}
    parts[0][1].append(torch.zeros(1, dtype=torch.float64))
    parts[1][0]["wide"] = {"$tensor": 5}
    parts[0][0]["opaque"] = {"$pickle": "gAROLg=="}
    refused = refused_of(parts)
    assert set(refused) == {"x", "mixed", "wide", "opaque"}
    assert isinstance(refused["x"], RankLayoutError)
    assert str(refused["x"]) == (
        "job 'sharded' step 3: x is a plain tensor (not a DTensor) of different shapes on "
        "different ranks (rank 0: [3], rank 1: [4]), so it is neither a replica nor a described "
        "shard; load it per rank with ckptd_client.load(..., rank=r)"
    )
    assert str(refused["mixed"]).startswith(
        "job 'sharded' step 3: mixed is a tensor on rank(s) 0 and another value on rank(s) 1"
    )
    assert "different dtypes (rank 0: float64, rank 1: float32)" in str(refused["wide"])
    assert isinstance(refused["opaque"], UnsupportedStateError)
    assert "stored pickled" in str(refused["opaque"])


def test_shards_that_do_not_tile_the_tensor_are_refused() -> None:
    gap = [
        ({"w": shard(0, [7, 5], [0, 0])}, [W[:3].clone()]),
        ({"w": shard(0, [7, 5], [4, 0])}, [W[4:].clone()]),
    ]
    message = str(refused_of(gap)["w"])
    assert message == (
        "job 'sharded' step 3: w: the ranks' DTensor shards do not tile the global shape [7, 5] "
        "(they hold 30 of its 35 elements); a rank's part is missing or was written with another "
        "layout"
    )
    overlap = [
        ({"w": shard(0, [7, 5], [0, 0])}, [W[:4].clone()]),
        ({"w": shard(0, [7, 5], [3, 0])}, [W[3:].clone()]),
    ]
    assert "blocks at offsets [0, 0] and [3, 0] overlap" in str(refused_of(overlap)["w"])


def test_a_state_that_is_not_a_dict_is_refused() -> None:
    with pytest.raises(UnsupportedStateError, match="the state is a list, not a dict"):
        metadata_of([([{"$tensor": 0}], [W])])


# ---- the reader's plans --------------------------------------------------------------------------


def ready_reader(parts: list[tuple[Any, list[torch.Tensor]]], rank: int = 0) -> Any:
    """A reader set up as DCP sets it up, on hand-built metadata."""
    world = len(parts)
    manifests = [part(r, world, s, t) for r, (s, t) in enumerate(parts)]
    reader = CkptdStorageReader(JOB, 3, root="/nonexistent")
    md = build_metadata(manifests)
    reader._parts = manifests
    reader.set_up_storage_reader(md, rank == 0, rank=rank, use_collectives=True)
    return reader, md


def test_a_load_that_asks_for_a_refused_key_fails_naming_it() -> None:
    parts = fsdp_parts()
    parts[0][0]["opaque"] = {"$pickle": "gAROLg=="}
    reader, md = ready_reader(parts)
    fine = create_default_local_load_plan({"model.w": torch.zeros(7, 5)}, md)
    assert reader.prepare_local_plan(fine).storage_data.step == 3
    asked = create_default_local_load_plan({"opaque": 1}, md)
    with pytest.raises(UnsupportedStateError, match="opaque was stored pickled"):
        reader.prepare_local_plan(asked)


def test_ranks_that_resolved_latest_to_different_steps_are_stopped() -> None:
    reader, _md = ready_reader(fsdp_parts())
    plans = [reader.prepare_local_plan(LoadPlan([])) for _ in range(2)]
    plans[1].storage_data = type(plans[1].storage_data)(1, 4)
    with pytest.raises(RankLayoutError, match=r"rank 0: step 3, rank 1: step 4"):
        reader.prepare_global_plan(plans)


@pytest.mark.parametrize(
    ("given", "valid"),
    [(3, True), ("12", True), ("latest", True), (-1, False), ("x", False), (True, False)],
)
def test_checkpoint_ids_are_steps(given: object, valid: bool) -> None:
    assert CkptdStorageReader.validate_checkpoint_id(given) is valid
    assert CkptdStorageWriter.validate_checkpoint_id(given) is (valid and given != "latest")
    reader = CkptdStorageReader(JOB)
    if valid:
        reader.reset(given)
        assert reader.checkpoint_id == str(given)
    else:
        with pytest.raises(ValueError, match="a ckptd step must be an integer"):
            reader.reset(given)


# ---- dcp.load from parts on disk -----------------------------------------------------------------


def write_parts(store: Store, parts: list[tuple[Any, list[torch.Tensor]]], step: int = 3) -> None:
    world = len(parts)
    for rank, (skeleton, tensors) in enumerate(parts):
        sources = [tensor_source(f"t{i}", t) for i, t in enumerate(tensors)]
        write_checkpoint(
            store,
            JOB,
            step,
            skeleton,
            sources,
            config=PipelineConfig(threads=1),
            rank=rank,
            world_size=world,
            attempt="a1" if world > 1 else None,
        )


def load(state: dict[str, Any], root: Path, step: int | str = "latest") -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_load(state, storage_reader=CkptdStorageReader(JOB, step, root=root))
    return state


def test_one_process_loads_the_global_values_of_two_ranks(store: Store, root: Path) -> None:
    write_parts(store, fsdp_parts())
    assert store.read_manifest(JOB, 3).world_size == 2
    state: dict[str, Any] = {
        "model": {"w": torch.zeros(7, 5), "head": torch.zeros(1, 7), "bias": torch.zeros(2)},
        "optimizer": {
            "state": {0: {"step": torch.tensor(0.0)}},
            "param_groups": [{"lr": 1.0, "betas": (0, 0), "params": []}],
        },
        "rng": {"seed": None},
        "extra": {"epoch": 0, "name": ""},
    }
    load(state, root)
    assert torch.equal(state["model"]["w"], W)
    assert torch.equal(state["model"]["head"], HEAD)
    assert torch.equal(state["model"]["bias"], torch.tensor([0.5, -0.5]))
    assert state["optimizer"]["state"][0]["step"].item() == 3.0
    assert state["optimizer"]["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}]
    name, array, rank = state["rng"]["seed"]
    assert (name, rank) == ("MT", 0) and array.tolist() == [0, 1, 2]
    assert isinstance(array, np.ndarray)
    assert state["extra"] == {"epoch": 7, "name": "rank-0"}


def test_parts_no_read_needs_are_not_read(store: Store, root: Path) -> None:
    parts = fsdp_parts()
    parts[1][0]["model"]["only_one"] = {"$tensor": 5}
    parts[1][1].append(torch.full((2, 2), 4.0))
    write_parts(store, parts)
    rank_0_only = set(store.read_part(JOB, 3, 0).objects) - set(store.read_part(JOB, 3, 1).objects)
    assert rank_0_only
    for digest in rank_0_only:
        store.object_path(JOB, digest).unlink()
    state = load({"model": {"only_one": torch.zeros(2, 2)}}, root)
    assert torch.equal(state["model"]["only_one"], torch.full((2, 2), 4.0))
    with pytest.raises(CheckpointException) as caught:
        load({"model": {"w": torch.zeros(7, 5)}}, root)  # rows 0-3 are in rank 0's part
    [(error, _trace)] = caught.value.failures.values()
    assert isinstance(error, CorruptCheckpointError), error


def test_a_corrupt_object_fails_the_load(store: Store, root: Path) -> None:
    write_parts(store, fsdp_parts())
    for digest in store.read_part(JOB, 3, 1).objects:
        path = store.object_path(JOB, digest)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.chmod(0o644)
        path.write_bytes(bytes(data))
    with pytest.raises(CheckpointException) as caught:
        load({"model": {"w": torch.zeros(7, 5)}}, root)
    [(error, _trace)] = caught.value.failures.values()
    assert isinstance(error, CorruptCheckpointError), error
    assert "(holding tensor t0) is corrupt" in str(error), error


# ---- the writer's pieces -------------------------------------------------------------------------


def planned(state: dict[str, Any]) -> tuple[SavePlan, DefaultSavePlanner]:
    """DCP's save planning of ``state`` in one process, through the writer's plan hooks."""
    planner = DefaultSavePlanner()
    planner.set_up_planner(state, is_coordinator=True)
    writer = CkptdStorageWriter(JOB, 5, root="/nonexistent")
    writer.set_up_storage_writer(True, rank=0, use_collectives=True)
    local = writer.prepare_local_plan(planner.create_local_plan())
    plans, _metadata = planner.create_global_plan([local])
    [final] = writer.prepare_global_plan(plans)
    return planner.finish_plan(final), planner


def test_a_rank_stores_the_state_dict_nested_as_dcp_flattened_it() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.25)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "extra": {"n": [1, 2]}}
    plan, planner = planned(state)
    stored, sizes = rank_state(plan, planner)
    assert list(stored) == ["model", "optimizer", "extra"]
    assert torch.equal(stored["model"]["weight"], model.weight.detach())
    assert set(stored["optimizer"]["state"]["0"]) == {"step", "exp_avg", "exp_avg_sq"}
    assert stored["optimizer"]["param_groups"][0]["lr"] == 0.25  # int key 0, not a list
    assert stored["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert stored["extra"] == {"n": [1, 2]}
    assert sizes[0] == 6 * 4
    # What the reader sees of it: the keys DCP gives the same state dict.
    flat = flatten(stored)
    md = build_metadata([part(0, 1, flat.skeleton, flat.tensors)])
    _, keys = planner.create_global_plan([planner.create_local_plan()])
    assert set(md.state_dict_metadata) == set(keys.state_dict_metadata)
    snapshot = flatten(state)  # what Client.snapshot(state=...) would store
    same = build_metadata([part(0, 1, snapshot.skeleton, snapshot.tensors)])
    assert set(same.state_dict_metadata) == set(md.state_dict_metadata)


class Opaque:
    """A value only pickle can store."""


def test_a_value_only_pickle_can_store_is_refused_by_key() -> None:
    plan, planner = planned({"w": torch.ones(1), "extra": {"odd": Opaque()}})
    with pytest.raises(UnsupportedStateError) as caught:
        rank_state(plan, planner)
    assert str(caught.value).startswith(
        "extra.odd: cannot store this value without pickle (Unsupported global: GLOBAL "
        "tests.unit.client.test_dcp_metadata.Opaque was not an allowed global by default); "
    )


def test_the_writer_pickles_and_checks_its_plans() -> None:
    writer = CkptdStorageWriter(JOB, 5, root="/r", socket="/s.sock")
    writer.set_up_storage_writer(True, rank=0, use_collectives=True)
    writer.prepare_global_plan([writer.prepare_local_plan(SavePlan([])) for _ in range(2)])
    copy = pickle.loads(pickle.dumps(writer))
    assert (copy.job, copy.step, copy.root, copy.socket) == (JOB, 5, Path("/r"), Path("/s.sock"))
    assert copy.storage_meta() == writer.storage_meta()
    writer.reset(7)
    assert writer.checkpoint_id == "7"
    with pytest.raises(ValueError, match="use_collectives=True"):
        writer.set_up_storage_writer(True, rank=0, use_collectives=False)
    other = CkptdStorageWriter(JOB, 6)
    other.set_up_storage_writer(False, rank=1)
    plans = [writer.prepare_local_plan(SavePlan([])), other.prepare_local_plan(SavePlan([]))]
    with pytest.raises(RankLayoutError, match="rank 0: sharded step 7, rank 1: sharded step 6"):
        writer.prepare_global_plan(plans)
    reader = CkptdStorageReader(JOB, root="/r")
    assert pickle.loads(pickle.dumps(reader)).checkpoint_id == "latest"
