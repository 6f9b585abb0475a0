"""Pickle-free encoding of a nested training state: tensors out, everything else into JSON.

:func:`flatten` walks a state (``model.state_dict()``, ``optimizer.state_dict()``, schedulers,
``GradScaler``, RNG states, a user's ``extra`` dict, ...) and returns a *skeleton*, a JSON value in
which each tensor is replaced by ``{"$tensor": i}``, plus the list of distinct tensors. Values JSON
cannot hold exactly are tagged:

==================  ==============================================================
``{"$tensor": i}``  tensor *i*; the same tensor object (or a view of the same storage with the
                    same offset, shape, strides and dtype) appearing twice gets the same *i*, so
                    tied weights stay tied on restore
``{"$ndarray": i}`` a numpy array stored as tensor *i*
``{"$dtensor": i, "shape": [..], "offsets": [..], "placements": [..], "mesh": {..}}``
                    a ``torch.distributed.tensor.DTensor``: tensor *i* is this rank's local
                    shard (``to_local()``); ``shape`` is the global shape, ``offsets`` where the
                    shard starts in it (per dimension), ``placements`` one of ``"R"``
                    (replicate), ``"S(d)"`` (shard dim *d*), ``"_S(d,k)"`` (strided shard, split
                    factor *k*) per mesh dimension, ``mesh`` ``{"shape": [..], "names": [..] |
                    null, "ranks": [..], "device": "cpu"}`` (ranks in row-major mesh order).
                    See :class:`DTensorInfo`
``{"$tuple": [..]}``, ``{"$size": [..]}``  tuple, ``torch.Size``
``{"$dict": [[k, v], ..], "ordered": bool, "meta": ..}``  a dict whose keys are not all plain
                    strings (optimizer state is keyed by int), or an ``OrderedDict`` (``meta``
                    holds a module state dict's ``_metadata``)
``{"$float": "nan" | "inf" | "-inf"}``  non-finite floats
``{"$bytes": base64}``, ``{"$dtype": name}``, ``{"$device": name}``
``{"$np": dtype, "value": v}``  a numpy scalar
``{"$pickle": base64}``  any other value, only when the caller opted in with ``allow_pickle``
==================  ==============================================================

Plain dicts with string keys, lists, str, int, float, bool and None are stored as themselves.
Anything else is refused with :class:`UnsupportedStateError` naming its key path and type.

DTensors (FSDP2, tensor parallel) are stored per rank, pickle-free and without a process group:
each rank's skeleton holds its own shard and where it sits in the global tensor, which is what a
reader needs to put it back on the same layout (:func:`unflatten` returns the local shard,
:func:`shard_info` its layout) or to reshard it (:func:`dtensor_entries`, for DCP metadata). A
shard is one contiguous block of the global tensor: ``Partial`` placements (unreduced values, not
a piece of the tensor) and strided shards whose rows are not contiguous are refused. A tensor
index is either a plain tensor or a DTensor shard of exactly one layout: the same local storage
seen as a plain tensor and as a shard gets two indices (the chunks on disk are shared anyway).
"""

from __future__ import annotations

import base64
import functools
import math
import pickle
import re
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckptd.errors import ManifestError, UnsupportedStateError

JSON = Any
"""A value made of dict[str, JSON], list[JSON], str, int, float, bool and None."""

_MAX_DEPTH = 200


@dataclass(frozen=True)
class Flattened:
    """The result of :func:`flatten`: ``tensors[i]`` is what ``{"$tensor": i}`` refers to and
    ``paths[i]`` the dotted key path where it first appeared (``optimizer.state.0.exp_avg``)."""

    skeleton: JSON
    tensors: list[torch.Tensor]
    paths: list[str]


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


# ---- DTensor layouts ---------------------------------------------------------------------------

_PLACEMENT = re.compile(r"R|S\((\d+)\)|_S\((\d+),(\d+)\)")
_SHARD_ATTR = "_ckptd_dtensor"
"""The attribute :func:`unflatten` sets on a local shard it returns: the layout as JSON (plain
dicts and lists, so ``torch.save`` / ``torch.load(weights_only=True)`` of the tensor still work)."""


@dataclass(frozen=True)
class MeshInfo:
    """The device mesh a DTensor lives on: ``shape`` (devices per mesh dimension), ``names``
    (``mesh_dim_names``, or None), ``ranks`` (the global rank of each device, row-major, as
    ``DeviceMesh.mesh.flatten()``) and ``device`` (``device_type``: ``"cpu"``, ``"cuda"``)."""

    shape: tuple[int, ...]
    names: tuple[str, ...] | None
    ranks: tuple[int, ...]
    device: str


@dataclass(frozen=True)
class DTensorInfo:
    """Where one rank's local shard sits in a DTensor: what a ``{"$dtensor": i, ...}`` node holds.

    ``shape`` is the global shape; ``offsets`` the global index of the shard's first element per
    dimension (torch's ``compute_local_shape_and_global_offset``: for an empty shard, the global
    size of the sharded dimension); ``placements`` one name per mesh dimension: ``"R"``
    (replicate), ``"S(d)"`` (shard tensor dimension *d*), ``"_S(d,k)"`` (strided shard of
    dimension *d*, split factor *k*, as FSDP2 over tensor parallel makes). The shard's own shape
    is the stored tensor's shape (the manifest's ``tensors[i].shape``); the shard covers
    ``offsets[d] .. offsets[d] + local_shape[d]`` in every dimension *d*.
    """

    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    placements: tuple[str, ...]
    mesh: MeshInfo

    def to_json(self) -> dict[str, JSON]:
        """The node's fields after ``"$dtensor"``, as the skeleton stores them."""
        return {
            "shape": list(self.shape),
            "offsets": list(self.offsets),
            "placements": list(self.placements),
            "mesh": {
                "shape": list(self.mesh.shape),
                "names": None if self.mesh.names is None else list(self.mesh.names),
                "ranks": list(self.mesh.ranks),
                "device": self.mesh.device,
            },
        }

    @classmethod
    def from_json(cls, node: dict[str, JSON]) -> DTensorInfo:
        """Parse and check a ``$dtensor`` node; ValueError / TypeError / KeyError when malformed."""
        shape = _int_list(node["shape"], "shape", 0)
        offsets = _int_list(node["offsets"], "offsets", 0)
        placements = node["placements"]
        mesh = node["mesh"]
        if not isinstance(placements, list) or not isinstance(mesh, dict):
            raise TypeError("placements must be a list and mesh an object")
        mesh_shape = _int_list(mesh["shape"], "mesh.shape", 1)
        ranks = _int_list(mesh["ranks"], "mesh.ranks", 0)
        names = mesh["names"]
        device = mesh["device"]
        if len(offsets) != len(shape):
            raise ValueError(f"{len(offsets)} offsets for a {len(shape)}-dimensional shape")
        if len(placements) != len(mesh_shape):
            raise ValueError(f"{len(placements)} placements for a {len(mesh_shape)}-d mesh")
        if len(ranks) != math.prod(mesh_shape):
            raise ValueError(f"{len(ranks)} mesh ranks for a mesh of shape {mesh_shape}")
        if names is not None and (
            not isinstance(names, list)
            or len(names) != len(mesh_shape)
            or not all(isinstance(n, str) for n in names)
        ):
            raise ValueError(f"mesh.names {names!r}: expected null or one string per dimension")
        if not isinstance(device, str):
            raise TypeError(f"mesh.device {device!r} is not a string")
        for name in placements:
            dim = _placement_dim(name)
            if dim is not None and dim >= len(shape):
                raise ValueError(f"placement {name} of a {len(shape)}-dimensional tensor")
        return cls(
            shape=tuple(shape),
            offsets=tuple(offsets),
            placements=tuple(placements),
            mesh=MeshInfo(
                tuple(mesh_shape), None if names is None else tuple(names), tuple(ranks), device
            ),
        )

    def describe(self, local_shape: Sequence[int]) -> str:
        """One line for error messages: global shape, placements, mesh, this rank's block."""
        names = f" {list(self.mesh.names)}" if self.mesh.names else ""
        return (
            f"global shape {list(self.shape)}, placements ({', '.join(self.placements)}) on mesh "
            f"{list(self.mesh.shape)}{names}, local shard {list(local_shape)} at offsets "
            f"{list(self.offsets)}"
        )


def _int_list(value: JSON, name: str, least: int) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= least for v in value
    ):
        raise ValueError(f"{name} {value!r}: expected a list of integers >= {least}")
    return value


def _placement_dim(name: JSON) -> int | None:
    """The tensor dimension a placement name shards (None for ``"R"``); ValueError if no name."""
    match = _PLACEMENT.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"unknown placement {name!r} (known: R, S(d), _S(d,k))")
    dim = match.group(1) or match.group(2)
    return None if dim is None else int(dim)


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (a Parameter wrapping one
    included). Never imports ``torch.distributed``: no DTensor exists before something did."""
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return cls is not None and isinstance(value, cls)


def dtensor_layout(value: torch.Tensor, path: str = "") -> DTensorInfo:
    """The layout of this rank's shard of the DTensor ``value`` (see :class:`DTensorInfo`).

    Needs no collective: the mesh coordinate of this rank and torch's own offset computation
    (``compute_local_shape_and_global_offset``, so uneven shards are placed right). Raises
    :class:`UnsupportedStateError` naming ``path`` when the shard is not one contiguous block of
    the global tensor: ``Partial`` placements (unreduced values), a strided shard that interleaves
    rows, a rank outside the DTensor's mesh, or a local tensor whose shape disagrees with the
    placements (a ``DTensor.from_local`` given the wrong ``shape``).
    """
    info, want = _layout_of(value, path)
    _check_local_shape(tuple(value.to_local().shape), info, want, path)  # type: ignore[attr-defined]
    return info


_LayoutCache = dict[tuple[object, ...], tuple[DTensorInfo, tuple[int, ...]]]


def _cached_layout(
    value: torch.Tensor, local: torch.Tensor, path: str, cache: _LayoutCache
) -> DTensorInfo:
    """:func:`dtensor_layout` of ``value`` (whose local tensor is ``local``), computed once per
    mesh object, global shape and placements (all a layout depends on; a model's parameters and
    their optimizer states share a few of them)."""
    dt: Any = value
    key = (id(dt.device_mesh), tuple(dt.shape), tuple(dt.placements))
    found = cache.get(key)
    if found is None:
        found = cache[key] = _layout_of(value, path)
    _check_local_shape(tuple(local.shape), *found, path)
    return found[0]


def _layout_of(value: torch.Tensor, path: str) -> tuple[DTensorInfo, tuple[int, ...]]:
    """The layout of ``value`` on this rank and the local shape its placements give."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(value, DTensor):
        raise TypeError(f"{path or '<root>'}: expected a DTensor, got {type(value).__qualname__}")
    where = path or "<root>"
    mesh = value.device_mesh
    ranks = tuple(int(r) for r in mesh.mesh.flatten().tolist())
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else "?"
        raise UnsupportedStateError(
            f"{where}: this rank ({rank}) is not in the DTensor's device mesh (ranks "
            f"{list(ranks)}), so it holds no shard of it; leave the value out of this rank's state"
        )
    placements = tuple(_placement_name(p, value.ndim, where) for p in value.placements)
    shape = tuple(int(n) for n in value.shape)
    local_shape, offsets = compute_local_shape_and_global_offset(
        value.shape, mesh, value.placements
    )
    local_shape = tuple(int(n) for n in local_shape)
    info = DTensorInfo(
        shape=shape,
        offsets=tuple(int(o) for o in offsets),
        placements=placements,
        mesh=MeshInfo(
            tuple(int(n) for n in mesh.shape),
            None if mesh.mesh_dim_names is None else tuple(mesh.mesh_dim_names),
            ranks,
            mesh.device_type,
        ),
    )
    if any(p.startswith("_S(") for p in placements):
        blocks = _shard_blocks(shape, info.mesh.shape, tuple(coordinate), placements)
        if blocks is None or any(
            n and (first, n) != (info.offsets[d], local_shape[d])
            for d, (first, n) in blocks.items()
        ):
            raise UnsupportedStateError(
                f"{where}: this rank's shard of the DTensor ({info.describe(local_shape)}) is not "
                f"one contiguous block of the global tensor (or this torch, "
                f"{torch.__version__}, does not let ckptd check it); redistribute it to Shard / "
                "Replicate placements before the snapshot, or save it with "
                "torch.distributed.checkpoint"
            )
    return info, local_shape


def _check_local_shape(
    have: tuple[int, ...], info: DTensorInfo, want: tuple[int, ...], path: str
) -> None:
    if have != want:
        raise UnsupportedStateError(
            f"{path or '<root>'}: the DTensor's local tensor has shape {list(have)} but its "
            f"placements give this rank a shard of {list(want)} ({info.describe(want)}); it was "
            "built inconsistently (DTensor.from_local with a wrong shape=?)"
        )


def _placement_name(placement: object, ndim: int, where: str) -> str:
    from torch.distributed.tensor import placement_types as pt

    strided = getattr(pt, "_StridedShard", None)
    if isinstance(placement, pt.Replicate):
        return "R"
    if strided is not None and isinstance(placement, strided):  # before Shard: once a subclass
        return f"_S({placement.dim % max(ndim, 1)},{placement.split_factor})"
    if isinstance(placement, pt.Shard):
        return f"S({placement.dim % max(ndim, 1)})"
    if isinstance(placement, pt.Partial):
        raise UnsupportedStateError(
            f"{where}: the DTensor has a Partial placement ({placement}): its local values are "
            "unreduced contributions, not a piece of the tensor, and a state dict should not hold "
            "them; reduce it first (dt.redistribute(placements=[Replicate()] * mesh.ndim) or "
            "dt.full_tensor())"
        )
    raise UnsupportedStateError(
        f"{where}: DTensor placement {placement!r} ({type(placement).__qualname__}) is not "
        "supported: ckptd stores Shard, Replicate and contiguous strided shards; redistribute "
        "it before the snapshot"
    )


@functools.lru_cache(maxsize=4096)
def _shard_blocks(
    shape: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    coordinate: tuple[int, ...],
    placements: tuple[str, ...],
) -> dict[int, tuple[int, int]] | None:
    """``{dim: (first global index, length)}`` of this rank's shard in every sharded dimension,
    or None when some dimension's indices are not contiguous or torch's (private) per-placement
    offsets cannot be computed. Follows ``_compute_local_shape_and_global_offset``: placements
    apply left to right, each one picks indices out of what the ones before it left."""
    try:
        from torch.distributed.tensor.placement_types import (
            Shard,
            _StridedShard,
            _StridedShardOffsetMode,
        )

        sizes = list(shape)
        rows: dict[int, list[int]] = {}
        for mesh_dim, name in enumerate(placements):
            match = _PLACEMENT.fullmatch(name)
            assert match is not None
            if name == "R":
                continue
            num, rank = mesh_shape[mesh_dim], coordinate[mesh_dim]
            local: list[int]
            if match.group(2) is not None:
                dim = int(match.group(2))
                size, picked = _StridedShard(
                    dim, split_factor=int(match.group(3))
                )._local_shard_size_and_offset(
                    sizes[dim], num, rank, offset_mode=_StridedShardOffsetMode.ALL
                )
                local = [int(i) for i in picked] if isinstance(picked, list) else []
            else:
                dim = int(match.group(1))
                size, start = Shard(dim)._local_shard_size_and_offset(sizes[dim], num, rank)
                local = list(range(int(start), int(start) + int(size)))
            if len(local) != size:
                return None
            before = rows.get(dim)
            rows[dim] = local if before is None else [before[i] for i in local]
            sizes[dim] = int(size)
    except (ImportError, AttributeError, TypeError, IndexError):
        return None
    blocks: dict[int, tuple[int, int]] = {}
    for dim, indices in rows.items():
        if indices and indices != list(range(indices[0], indices[0] + len(indices))):
            return None
        blocks[dim] = (indices[0] if indices else 0, len(indices))
    return blocks


def shard_info(tensor: torch.Tensor) -> DTensorInfo | None:
    """The layout a tensor returned by :func:`unflatten` for a ``$dtensor`` node was saved with
    (this rank's shard of a DTensor), or None for any other tensor."""
    node = getattr(tensor, _SHARD_ATTR, None)
    return DTensorInfo.from_json(node) if isinstance(node, dict) else None


def dtensor_entries(skeleton: JSON) -> dict[int, DTensorInfo]:
    """Tensor index -> layout of every ``$dtensor`` node in ``skeleton``, by index.

    What a reader needs to describe a rank's shards to ``torch.distributed.checkpoint``: tensor
    *i* (its dtype and local shape in the manifest's ``tensors[i]``) is the block at
    ``offsets`` of a tensor of global ``shape``. Several nodes may share an index (tied weights);
    they then have the same layout. Raises :class:`ManifestError` for a malformed node, an index
    that is not an integer, or one index with two layouts.
    """
    found: dict[int, DTensorInfo] = {}
    stack: list[JSON] = [skeleton]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "$dtensor" in node:
                index = node["$dtensor"]
                if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                    raise ManifestError(f"skeleton: $dtensor index {index!r} is not an index")
                try:
                    info = DTensorInfo.from_json(node)
                except (KeyError, TypeError, ValueError) as exc:
                    raise ManifestError(
                        f"skeleton: malformed $dtensor for tensor {index} ({exc})"
                    ) from exc
                if found.setdefault(index, info) != info:
                    raise ManifestError(
                        f"skeleton: tensor {index} appears with two DTensor layouts: "
                        f"{found[index]} and {info}"
                    )
                continue
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return dict(sorted(found.items()))


def _all_ints(values: list[Any] | tuple[Any, ...]) -> bool:
    """Whether every item is a plain ``int`` (not a bool): such a sequence encodes as itself."""
    return len(values) > 8 and all(type(v) is int for v in values)


def flatten(state: object, *, allow_pickle: bool = False) -> Flattened:
    """Split ``state`` into a JSON skeleton and its distinct tensors (see the module docstring).

    A DTensor is stored as this rank's local shard with its layout (``{"$dtensor": i, ...}``).

    Raises :class:`UnsupportedStateError` naming the key path of the first value that cannot be
    stored without pickle (unless ``allow_pickle``), of a tensor that cannot be stored (sparse,
    quantized, meta; a DTensor whose shard is not a contiguous block, see
    :func:`dtensor_layout`), or of a reference cycle.
    """
    tensors: list[torch.Tensor] = []
    paths: list[str] = []
    seen: dict[tuple[object, ...], int] = {}
    active: set[int] = set()
    layouts: _LayoutCache = {}

    def add_tensor(t: torch.Tensor, path: str, layout: DTensorInfo | None = None) -> int:
        if t.layout != torch.strided:
            raise UnsupportedStateError(
                f"{path or '<root>'}: {t.layout} tensors are not supported; "
                "convert it with .to_dense() before the snapshot"
            )
        if t.is_quantized or t.device.type == "meta":
            kind = "quantized" if t.is_quantized else "meta-device"
            raise UnsupportedStateError(f"{path or '<root>'}: {kind} tensors cannot be stored")
        key = (
            t.device,
            t.dtype,
            t.untyped_storage().data_ptr() if t.numel() else id(t),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.is_conj(),
            t.is_neg(),
            layout,  # an index is a plain tensor or a shard of one layout, never both
        )
        index = seen.get(key)
        if index is None:
            index = seen[key] = len(tensors)
            tensors.append(t)
            paths.append(path or "<root>")
        return index

    def enc(value: object, path: str, depth: int) -> JSON:
        if depth > _MAX_DEPTH:
            raise UnsupportedStateError(f"{path}: state nested deeper than {_MAX_DEPTH} levels")
        cls = type(value)  # exact types first: what state dicts are made of, without subclasses
        if cls is str:
            _check_utf8(value, path)  # type: ignore[arg-type]
            return value
        if cls is torch.Tensor or cls is torch.nn.Parameter:
            return {"$tensor": add_tensor(value, path)}  # type: ignore[arg-type]
        if cls is int or cls is bool or value is None:
            return value
        if isinstance(value, np.generic):  # before int/float: np.float64 subclasses float
            item = value.item()
            if isinstance(item, np.generic | bytes) or value.dtype.kind in "OSUVMm":
                raise UnsupportedStateError(
                    f"{path or '<root>'}: numpy scalars of dtype {value.dtype} cannot be stored "
                    "without pickle; convert it to a Python number"
                )
            return {"$np": value.dtype.str, "value": enc(item, path, depth + 1)}
        if isinstance(value, str):
            _check_utf8(value, path)
            return value
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return _enc_float(float(value))
        if isinstance(value, torch.Tensor):
            if is_dtensor(value):
                return enc_dtensor(value, path)
            if cls.__name__ == "DTensor":
                raise UnsupportedStateError(
                    f"{path or '<root>'}: cannot store a {cls.__module__}.DTensor: ckptd stores "
                    "torch.distributed.tensor.DTensor (torch >= 2.5); upgrade torch, or store "
                    "dt.to_local() / dt.full_tensor()"
                )
            return {"$tensor": add_tensor(value, path)}
        if isinstance(value, np.ndarray):
            return {"$ndarray": add_tensor(_ndarray_to_tensor(value, path), path)}
        if isinstance(value, torch.dtype):
            return {"$dtype": dtype_name(value)}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if isinstance(value, bytes):
            return {"$bytes": base64.b64encode(value).decode("ascii")}
        if isinstance(value, list | tuple | dict):
            if id(value) in active:
                raise UnsupportedStateError(f"{path or '<root>'}: the state contains a cycle")
            active.add(id(value))
            try:
                return enc_container(value, path, depth)
            finally:
                active.discard(id(value))
        if allow_pickle:
            return {"$pickle": base64.b64encode(pickle.dumps(value)).decode("ascii")}
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise UnsupportedStateError(
            f"{path or '<root>'}: cannot store a value of type {kind} without pickle; convert it "
            "to tensors or plain values (dict, list, tuple, str, int, float, bool, None), or pass "
            "allow_pickle=True (restore then needs allow_pickle=True as well)"
        )

    def enc_key(key: object, path: str, depth: int) -> JSON:
        if type(key) is int:  # an optimizer's parameter ids, every snapshot: no path to build
            return key
        return enc(key, _join(path, f"<key {key!r}>"), depth + 1)

    def enc_dtensor(value: torch.Tensor, path: str) -> JSON:
        with torch.no_grad():  # the local tensor itself, not an autograd view of it
            local: torch.Tensor = value.to_local()  # type: ignore[attr-defined]
        layout = _cached_layout(value, local, path, layouts)
        return {"$dtensor": add_tensor(local, path, layout), **layout.to_json()}

    def enc_container(
        value: list[Any] | tuple[Any, ...] | dict[Any, Any], path: str, depth: int
    ) -> JSON:
        if type(value) is list:
            if _all_ints(value):
                return list(value)
            return [enc(v, _join(path, i), depth + 1) for i, v in enumerate(value)]
        if type(value) is torch.Size:
            return {"$size": [int(v) for v in value]}
        if type(value) is tuple:
            if _all_ints(value):  # Python's RNG state: 625 ints, encoded every snapshot
                return {"$tuple": list(value)}
            return {"$tuple": [enc(v, _join(path, i), depth + 1) for i, v in enumerate(value)]}
        if type(value) is dict and all(isinstance(k, str) and not k.startswith("$") for k in value):
            for k in value:
                _check_utf8(k, _join(path, k))
            return {k: enc(v, _join(path, k), depth + 1) for k, v in value.items()}
        if type(value) in (dict, OrderedDict):
            assert isinstance(value, dict)
            out: dict[str, JSON] = {
                "$dict": [
                    [enc_key(k, path, depth), enc(v, _join(path, k), depth + 1)]
                    for k, v in value.items()
                ],
                "ordered": type(value) is OrderedDict,
            }
            meta = getattr(value, "_metadata", None)
            if meta is not None:
                out["meta"] = enc(meta, _join(path, "_metadata"), depth + 1)
            return out
        if allow_pickle:
            return {"$pickle": base64.b64encode(pickle.dumps(value)).decode("ascii")}
        raise UnsupportedStateError(
            f"{path or '<root>'}: cannot store a {type(value).__qualname__} (a subclass of "
            f"{type(value).__mro__[1].__qualname__}) without pickle; convert it to a plain "
            "dict/list/tuple, or pass allow_pickle=True"
        )

    skeleton = enc(state, "", 0)
    return Flattened(skeleton, tensors, paths)


def unflatten(
    skeleton: JSON, tensors: Sequence[torch.Tensor], *, allow_pickle: bool = False
) -> Any:
    """Rebuild the state :func:`flatten` took apart. ``tensors[i]`` replaces ``{"$tensor": i}``.

    A ``{"$dtensor": i, ...}`` node becomes this rank's local shard, a plain tensor: no process
    group is needed to read. It is a view of ``tensors[i]`` (one per index, so tied shards stay
    tied; ``tensors`` themselves are left untouched) whose layout :func:`shard_info` returns,
    which ``ckptd_client.state.apply`` uses to wrap it back into a DTensor.

    Raises :class:`ManifestError` for a malformed skeleton (a ``$dtensor`` node whose shard does
    not fit its global shape included) and :class:`UnsupportedStateError` for a pickled value when
    ``allow_pickle`` is False.
    """
    shards: dict[int, tuple[DTensorInfo, torch.Tensor]] = {}

    def dec(node: JSON, path: str) -> Any:
        if node is None or isinstance(node, str | bool | int | float):
            return node
        if isinstance(node, list):
            return [dec(v, _join(path, i)) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise ManifestError(f"skeleton at {path or '<root>'}: unexpected {type(node).__name__}")
        tag = next((k for k in node if k.startswith("$")), None)
        if tag is None:
            return {k: dec(v, _join(path, k)) for k, v in node.items()}
        arg = node[tag]
        try:
            return _decode_tag(tag, arg, node, path, dec, tensors, allow_pickle, shards)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ManifestError(f"skeleton at {path or '<root>'}: malformed {tag} ({exc})") from exc

    return dec(skeleton, "")


def _decode_tag(
    tag: str,
    arg: JSON,
    node: dict[str, JSON],
    path: str,
    dec: Any,
    tensors: Sequence[torch.Tensor],
    allow_pickle: bool,
    shards: dict[int, tuple[DTensorInfo, torch.Tensor]],
) -> Any:
    if tag == "$tensor":
        return tensors[_index(arg, len(tensors))]
    if tag == "$dtensor":
        return _local_shard(_index(arg, len(tensors)), DTensorInfo.from_json(node), tensors, shards)
    if tag == "$ndarray":
        return tensors[_index(arg, len(tensors))].cpu().numpy()
    if tag == "$tuple":
        return tuple(dec(v, _join(path, i)) for i, v in enumerate(arg))
    if tag == "$size":
        return torch.Size(int(v) for v in arg)
    if tag == "$dict":
        pairs = [(_hashable(dec(k, path)), dec(v, _join(path, k))) for k, v in arg]
        out: dict[Any, Any] = OrderedDict(pairs) if node.get("ordered") else dict(pairs)
        if "meta" in node:
            out._metadata = dec(node["meta"], _join(path, "_metadata"))  # type: ignore[attr-defined]
        return out
    if tag == "$float":
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[arg]
    if tag == "$bytes":
        return base64.b64decode(arg, validate=True)
    if tag == "$dtype":
        return dtype_from_name(arg)
    if tag == "$device":
        return torch.device(arg)
    if tag == "$np":
        return np.dtype(arg).type(dec(node["value"], path))
    if tag == "$pickle":
        if not allow_pickle:
            raise UnsupportedStateError(
                f"{path or '<root>'}: this value was stored pickled; pass allow_pickle=True to "
                "load it (only for checkpoints you trust)"
            )
        return pickle.loads(base64.b64decode(arg, validate=True))
    raise ManifestError(
        f"skeleton at {path or '<root>'}: unknown tag {tag!r}; a newer ckptd wrote it"
    )


def _local_shard(
    index: int,
    info: DTensorInfo,
    tensors: Sequence[torch.Tensor],
    shards: dict[int, tuple[DTensorInfo, torch.Tensor]],
) -> torch.Tensor:
    known = shards.get(index)
    if known is not None:
        if known[0] != info:
            raise ValueError(f"tensor {index} appears with two DTensor layouts")
        return known[1]
    local = tensors[index]
    shape = tuple(local.shape)
    if len(shape) != len(info.shape) or any(
        o + n > g for o, n, g in zip(info.offsets, shape, info.shape, strict=True)
    ):
        raise ValueError(
            f"tensor {index} of shape {list(shape)} does not fit at offsets "
            f"{list(info.offsets)} in global shape {list(info.shape)}"
        )
    shard = local.view_as(local)
    setattr(shard, _SHARD_ATTR, info.to_json())
    shards[index] = (info, shard)
    return shard


def _index(arg: JSON, n: int) -> int:
    if not isinstance(arg, int) or isinstance(arg, bool) or not 0 <= arg < n:
        raise IndexError(f"tensor index {arg!r} out of range 0..{n - 1}")
    return arg


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        raise TypeError("a dict key decoded to a list")
    return key


def _check_utf8(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsupportedStateError(
            f"{path or '<root>'}: the string {value!r:.60} is not valid Unicode ({exc.reason}); "
            "store it as bytes"
        ) from exc


def _enc_float(value: float) -> JSON:
    if math.isfinite(value):
        return value
    return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


def _ndarray_to_tensor(array: np.ndarray, path: str) -> torch.Tensor:
    if array.dtype.hasobject or array.dtype.byteorder == ">" or array.dtype.kind in "USVMm":
        raise UnsupportedStateError(
            f"{path or '<root>'}: numpy arrays of dtype {array.dtype} cannot be stored; "
            "use a numeric dtype in native byte order"
        )
    contiguous = np.ascontiguousarray(array).reshape(array.shape)  # keeps 0-d arrays 0-d
    if not contiguous.flags.writeable:
        contiguous = contiguous.copy()  # torch warns on read-only arrays
    try:
        return torch.from_numpy(contiguous)
    except TypeError as exc:
        raise UnsupportedStateError(
            f"{path or '<root>'}: numpy dtype {array.dtype}: {exc}"
        ) from exc


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest name of a torch dtype: ``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; :class:`ManifestError` when this torch lacks the dtype."""
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise ManifestError(
            f"unknown dtype {name!r}: written by a torch with a dtype this one "
            f"({torch.__version__}) "
            "lacks; restore with a newer torch"
        )
    return value


def iter_keys(skeleton: JSON, prefix: str = "") -> list[str]:
    """Dotted key paths of the skeleton's leaves (tensors shown as ``<tensor i>``), for display."""
    out: list[str] = []

    def scalars(items: list[JSON]) -> bool:
        return len(items) > 8 and all(not isinstance(v, list | dict) for v in items)

    def walk(node: JSON, path: str) -> None:
        if isinstance(node, list):
            if scalars(node):
                out.append(f"{path or '<root>'} = list of {len(node)} values")
                return
            for i, v in enumerate(node):
                walk(v, _join(path, i))
        elif isinstance(node, dict):
            tag = next((k for k in node if k.startswith("$")), None)
            if tag is None:
                for k, v in node.items():
                    walk(v, _join(path, k))
            elif tag == "$dict":
                for k, v in node["$dict"]:
                    walk(v, _join(path, k if not isinstance(k, dict) else "<key>"))
            elif tag == "$tuple":
                if scalars(node["$tuple"]):
                    out.append(f"{path or '<root>'} = tuple of {len(node['$tuple'])} values")
                    return
                for i, v in enumerate(node["$tuple"]):
                    walk(v, _join(path, i))
            elif tag in ("$tensor", "$ndarray"):
                out.append(f"{path or '<root>'} = <tensor {node[tag]}>")
            elif tag == "$dtensor":
                placements = ", ".join(str(p) for p in node.get("placements", ()))
                out.append(
                    f"{path or '<root>'} = <tensor {node[tag]}: DTensor shard at offsets "
                    f"{node.get('offsets')} of {node.get('shape')}, ({placements})>"
                )
            else:
                out.append(f"{path or '<root>'} = {tag[1:]}")
        else:
            out.append(f"{path or '<root>'} = {node!r}")

    walk(skeleton, prefix)
    return out


def ndarray_indices(skeleton: JSON) -> set[int]:
    """Indices of the tensors that hold numpy arrays (``{"$ndarray": i}`` in the skeleton): a
    reader that moves tensors (``map_location``) leaves those alone, as ``torch.load`` does."""
    found: set[int] = set()
    stack: list[JSON] = [skeleton]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            index = node.get("$ndarray")
            if isinstance(index, int):
                found.add(index)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found
