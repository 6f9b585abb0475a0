"""ckptd.format.skeleton with DTensors: the ``$dtensor`` tag, the local shard, refusals.

Real ``torch.distributed`` on one process (gloo, world size 1, 1-device meshes); the layouts of
bigger meshes are checked on the pure offset computation, and on two real ranks in
``tests/integration/client/test_dtensor_ranks.py``.
"""

from __future__ import annotations

import io
import json
import socket
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from ckptd.errors import ManifestError, UnsupportedStateError
from ckptd.format.skeleton import (
    DTensorInfo,
    MeshInfo,
    _shard_blocks,
    dtensor_entries,
    dtensor_layout,
    flatten,
    iter_keys,
    shard_info,
    unflatten,
)
from tests.unit.format.test_skeleton import _as_bytes, _json_roundtrip, _storage_roundtrip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def mesh() -> Iterator[DeviceMesh]:
    """A 1-device CPU mesh named ``dp`` on a gloo group of one process (this one)."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def mesh2d(mesh: DeviceMesh) -> DeviceMesh:
    return init_device_mesh("cpu", (1, 1))


def _sharded(mesh: DeviceMesh, rows: int = 3, cols: int = 4, dim: int = 0) -> DTensor:
    full = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    return distribute_tensor(full, mesh, [Shard(dim)])


DP_MESH = {"shape": [1], "names": ["dp"], "ranks": [0], "device": "cpu"}


def test_dtensor_tag_content(mesh: DeviceMesh) -> None:
    flat = flatten(
        {"w": _sharded(mesh), "r": distribute_tensor(torch.ones(2), mesh, [Replicate()])}
    )
    assert flat.skeleton == {
        "w": {
            "$dtensor": 0,
            "shape": [3, 4],
            "offsets": [0, 0],
            "placements": ["S(0)"],
            "mesh": DP_MESH,
        },
        "r": {"$dtensor": 1, "shape": [2], "offsets": [0], "placements": ["R"], "mesh": DP_MESH},
    }
    assert flat.paths == ["w", "r"]
    assert json.loads(json.dumps(flat.skeleton)) == flat.skeleton


def test_local_shard_is_stored_as_a_plain_tensor(mesh: DeviceMesh) -> None:
    value = _sharded(mesh)
    flat = flatten({"w": value})
    (stored,) = flat.tensors
    assert type(stored) is torch.Tensor
    assert stored.data_ptr() == value.to_local().data_ptr()  # no copy at flatten time
    (rebuilt,) = _storage_roundtrip(flat.tensors, flat.paths)
    assert torch.equal(_as_bytes(rebuilt), _as_bytes(value.to_local()))


def test_roundtrip_gives_the_local_shard_and_its_layout(mesh: DeviceMesh) -> None:
    value = _sharded(mesh, dim=1)
    flat = flatten({"model": OrderedDict(w=value), "n": 3})
    skeleton = _json_roundtrip(flat.skeleton)
    tensors = _storage_roundtrip(flat.tensors, flat.paths)
    state = unflatten(skeleton, tensors)
    local = state["model"]["w"]
    assert type(local) is torch.Tensor
    assert torch.equal(local, value.to_local())
    info = shard_info(local)
    assert info == dtensor_layout(value)
    assert info == DTensorInfo(
        shape=(3, 4),
        offsets=(0, 0),
        placements=("S(1)",),
        mesh=MeshInfo(shape=(1,), names=("dp",), ranks=(0,), device="cpu"),
    )
    assert dtensor_entries(skeleton) == {0: info}
    assert state["n"] == 3


def test_unflatten_leaves_the_given_tensors_alone(mesh: DeviceMesh) -> None:
    flat = flatten({"w": _sharded(mesh)})
    local = unflatten(flat.skeleton, flat.tensors)["w"]
    assert local is not flat.tensors[0]
    assert local.data_ptr() == flat.tensors[0].data_ptr()
    assert shard_info(flat.tensors[0]) is None


def test_plain_tensors_have_no_shard_info(mesh: DeviceMesh) -> None:
    flat = flatten({"t": torch.ones(2)})
    assert shard_info(unflatten(flat.skeleton, flat.tensors)["t"]) is None
    assert dtensor_entries(flat.skeleton) == {}


def test_tied_dtensors_share_one_index_and_stay_tied(mesh: DeviceMesh) -> None:
    value = _sharded(mesh)
    flat = flatten({"embed": value, "head": value})
    assert flat.skeleton["embed"] == flat.skeleton["head"]
    assert len(flat.tensors) == 1
    state = unflatten(flat.skeleton, flat.tensors)
    assert state["embed"] is state["head"]


def test_shard_and_plain_view_of_one_storage_get_separate_indices(mesh: DeviceMesh) -> None:
    value = _sharded(mesh)
    flat = flatten({"d": value, "p": value.to_local()})
    assert flat.skeleton["d"]["$dtensor"] == 0
    assert flat.skeleton["p"] == {"$tensor": 1}
    state = unflatten(flat.skeleton, flat.tensors)
    assert shard_info(state["d"]) is not None
    assert shard_info(state["p"]) is None


def test_same_local_storage_with_two_layouts_gets_two_indices(mesh: DeviceMesh) -> None:
    local = torch.arange(6.0).reshape(2, 3)
    flat = flatten(
        {
            "s": DTensor.from_local(local, mesh, [Shard(0)], run_check=False),
            "r": DTensor.from_local(local, mesh, [Replicate()], run_check=False),
        }
    )
    assert (flat.skeleton["s"]["$dtensor"], flat.skeleton["r"]["$dtensor"]) == (0, 1)
    entries = dtensor_entries(flat.skeleton)
    assert (entries[0].placements, entries[1].placements) == (("S(0)",), ("R",))


def test_parameters_and_distributed_module_state_dicts(mesh: DeviceMesh) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
    layer.bias = torch.nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Replicate()]))
    flat = flatten({"model": layer.state_dict(), "param": layer.weight})
    pairs = dict(flat.skeleton["model"]["$dict"])
    assert pairs["weight"]["placements"] == ["S(0)"]
    assert pairs["bias"]["placements"] == ["R"]
    assert flat.skeleton["param"]["$dtensor"] == pairs["weight"]["$dtensor"]  # tied to the param
    assert flat.paths == ["model.weight", "model.bias"]


def test_mesh_and_placement_spelling(mesh2d: DeviceMesh) -> None:
    value = DTensor.from_local(
        torch.arange(8.0).reshape(2, 4),
        mesh2d,
        [_StridedShard(1, split_factor=2), Shard(-1)],
        run_check=False,
    )
    node = flatten(value).skeleton
    assert node["placements"] == ["_S(1,2)", "S(1)"]
    assert node["mesh"] == {"shape": [1, 1], "names": None, "ranks": [0], "device": "cpu"}


def test_loaded_shard_keeps_its_layout_through_torch_save(mesh: DeviceMesh) -> None:
    flat = flatten({"w": _sharded(mesh)})
    local = unflatten(flat.skeleton, flat.tensors)["w"]
    buffer = io.BytesIO()
    torch.save(local, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=True)
    assert shard_info(again) == shard_info(local)


def test_iter_keys_shows_the_shard(mesh: DeviceMesh) -> None:
    assert iter_keys(flatten({"w": _sharded(mesh)}).skeleton) == [
        "w = <tensor 0: DTensor shard at offsets [0, 0] of [3, 4], (S(0))>"
    ]


# ---- refusals ----------------------------------------------------------------------------------


def test_partial_placement_is_refused_naming_the_path(mesh: DeviceMesh) -> None:
    value = DTensor.from_local(torch.ones(2), mesh, [Partial()], run_check=False)
    with pytest.raises(UnsupportedStateError, match=r"^opt\.state\.0\.g: .*Partial placement"):
        flatten({"opt": {"state": {"0": {"g": value}}}})


def test_local_tensor_that_disagrees_with_its_placements_is_refused(mesh: DeviceMesh) -> None:
    value = DTensor.from_local(
        torch.ones(2, 3), mesh, [Shard(0)], shape=torch.Size([5, 3]), stride=(3, 1)
    )
    with pytest.raises(UnsupportedStateError, match=r"^w: the DTensor's local tensor has shape"):
        flatten({"w": value})
    # The layout of a consistent DTensor of the same shape and placements is reused, the check not.
    good = distribute_tensor(torch.ones(5, 3), mesh, [Shard(0)])
    with pytest.raises(UnsupportedStateError, match=r"^b: the DTensor's local tensor has shape"):
        flatten({"a": good, "b": value})


def test_dtensor_of_another_torch_is_refused_by_name() -> None:
    # What an older torch's torch.distributed._tensor had: a class of that name ckptd does not know.
    old = type("DTensor", (torch.Tensor,), {"__module__": "torch.distributed._tensor.api"})
    value: torch.Tensor = torch.ones(2).as_subclass(old)
    with pytest.raises(
        UnsupportedStateError,
        match=r"^x: cannot store a torch\.distributed\._tensor\.api\.DTensor: ckptd",
    ):
        flatten({"x": value})


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"$dtensor": 5}, "tensor index 5 out of range"),
        ({"offsets": [0]}, "1 offsets for a 2-dimensional shape"),
        ({"placements": ["P(sum)"]}, "unknown placement 'P(sum)'"),
        ({"placements": ["S(2)"]}, "placement S(2) of a 2-dimensional tensor"),
        ({"placements": ["R", "R"]}, "2 placements for a 1-d mesh"),
        ({"offsets": [1, 0]}, "does not fit at offsets [1, 0] in global shape [3, 4]"),
        ({"shape": [3, -4]}, "expected a list of integers >= 0"),
        ({"mesh": {**DP_MESH, "ranks": [0, 1]}}, "2 mesh ranks for a mesh of shape [1]"),
        ({"mesh": {**DP_MESH, "names": "dp"}}, "expected null or one string per dimension"),
    ],
)
def test_malformed_dtensor_node(mesh: DeviceMesh, change: dict[str, Any], fragment: str) -> None:
    flat = flatten({"w": _sharded(mesh)})
    skeleton = {"w": {**flat.skeleton["w"], **change}}
    with pytest.raises(ManifestError, match=r"^skeleton at w: malformed \$dtensor") as err:
        unflatten(skeleton, flat.tensors)
    assert fragment in str(err.value)


def test_one_index_with_two_layouts_is_malformed(mesh: DeviceMesh) -> None:
    flat = flatten({"w": _sharded(mesh)})
    other = {**flat.skeleton["w"], "placements": ["R"]}
    skeleton = {"a": flat.skeleton["w"], "b": other}
    with pytest.raises(ManifestError, match="tensor 0 appears with two DTensor layouts"):
        unflatten(skeleton, flat.tensors)
    with pytest.raises(ManifestError, match="tensor 0 appears with two DTensor layouts"):
        dtensor_entries(skeleton)


def test_dtensor_entries_names_a_malformed_node(mesh: DeviceMesh) -> None:
    node = {**flatten(_sharded(mesh)).skeleton, "placements": ["X"]}
    with pytest.raises(ManifestError, match=r"malformed \$dtensor for tensor 0 .*'X'"):
        dtensor_entries([node])


# ---- layouts of bigger meshes, on the pure offset computation ----------------------------------


def test_fsdp_over_tensor_parallel_shards_are_contiguous_and_tile_the_tensor() -> None:
    """FSDP2 over TP on a 2x2 mesh: (_StridedShard(0, sf=2), Shard(0)) of 9 rows, as FSDP2
    builds it; every rank's rows are one block, where torch's offset helper says, and the four
    blocks cover the rows once."""
    placements = (_StridedShard(0, split_factor=2), Shard(0))
    covered: list[int] = []
    for coordinate in ((0, 0), (0, 1), (1, 0), (1, 1)):
        blocks = _shard_blocks((9, 3), (2, 2), coordinate, ("_S(0,2)", "S(0)"))
        assert blocks is not None
        local, offsets = _compute_local_shape_and_global_offset(
            (9, 3), (2, 2), list(coordinate), placements
        )
        assert blocks == {0: (offsets[0], local[0])}
        covered += range(offsets[0], offsets[0] + local[0])
    assert sorted(covered) == list(range(9))


def test_interleaving_strided_shard_is_not_contiguous() -> None:
    # _StridedShard(0, sf=2) alone on 2 ranks: rank 0 holds rows 0, 1, 2, 5, 6 of 9.
    assert _shard_blocks((9,), (2,), (0,), ("_S(0,2)",)) is None
    assert _shard_blocks((9,), (2,), (1,), ("_S(0,2)",)) is None


def test_plain_shards_give_one_block_per_sharded_dim() -> None:
    assert _shard_blocks((5, 6), (2, 3), (1, 2), ("S(0)", "S(1)")) == {0: (3, 2), 1: (4, 2)}
    assert _shard_blocks((1, 6), (2,), (1,), ("S(0)",)) == {0: (0, 0)}  # an empty shard
    assert _shard_blocks((4,), (2,), (1,), ("R",)) == {}
