"""``torch.distributed.checkpoint`` (DCP) storage for ckptd: load any step at any world size, and
save through the ckptd daemons.

Resharding is torch's: the reader describes a committed step to DCP as ``Metadata`` (which rank
holds which block of which tensor) and DCP's load planner decides what each loading rank reads.

**Reader.** :class:`CkptdStorageReader` serves ``dcp.load(state_dict, storage_reader=...)`` in
one process (no process group, or ``no_dist=True``) or in any number of ranks. ``Metadata`` is
built from ckptd's own records (:func:`build_metadata`): the step's global record names one part
per rank (a single-process checkpoint is its own only part); each part's skeleton is decoded with
placeholder tensors and flattened by DCP's own rule (``flatten_state_dict``), so the keys are the
FQNs DCP gives the state dict being loaded (``model.0.weight``, ``optimizer.state.0.exp_avg``,
``optimizer.param_groups.0.lr``). Then, per key, over the ranks that hold it:

=====================  ==========================================================================
a DTensor shard        a ``TensorStorageMetadata`` of the global shape (the ``$dtensor`` tag)
(``$dtensor``)         with one chunk per distinct block (offsets from the tag, sizes from the
                       stored local tensor); replicas of a block (``Replicate`` mesh dimensions)
                       are read from the lowest rank, empty shards are left out, and the blocks
                       must tile the tensor exactly
a plain tensor         one chunk covering the tensor, read from the lowest rank that holds it:
                       DDP replicas are identical, and a value that differs per rank (an RNG
                       state) is that rank's. Ranks that disagree on its shape or dtype make it
                       unreadable through DCP (``ckptd_client.load(..., rank=r)`` reads it)
anything else          ``BytesStorageMetadata``: the JSON value of the lowest rank holding it,
                       rebuilt (numpy arrays and tensors inside it included) and handed to the
                       planner as ``torch.save`` bytes; nothing stored is ever unpickled, and a
                       value that was stored pickled (``allow_pickle=True``) is refused
=====================  ==========================================================================

A key that cannot be served is listed as bytes and fails, naming it, only when a load asks for
it: :class:`~ckptd.errors.RankLayoutError` when its ranks disagree (a tensor on one rank and a
number on another, shards that overlap or leave holes), :class:`~ckptd.errors.UnsupportedStateError`
for a pickled value. Loading reads only the parts, and in them only the tensors, that the rank's
plan needs.

**Writer.** :class:`CkptdStorageWriter` serves ``dcp.save`` and ``dcp.async_save`` (thread or
process executor). In ``write_data`` each rank hands its items to its node's daemon with a
:class:`~ckptd_client.Client` made there (rank, world size and restart attempt from DCP's plan
exchange) and waits until its part is durable; the daemons commit the step once every rank's part
is (:mod:`ckptd.format.parts`). ``finish`` on the coordinator writes nothing: it waits until the
step is visible, so ``dcp.save`` returns (and ``async_save``'s future resolves) only for a
committed step. A rank's part is the nested state DCP's planner flattened (the planner's FQN ->
path mapping, list indices as int dict keys), with DTensor shards as ckptd's ``$dtensor`` tag and
non-tensor values as JSON: flattened by DCP's rule it gives the same FQNs as
``Client.snapshot(state=...)`` of the same state dict, so the reader above reads both with one
code path. Values DCP hands over pickled are decoded with
``torch.load(weights_only=True)``; what that or ckptd's encoding refuses fails the save with
:class:`~ckptd.errors.UnsupportedStateError` naming the key.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import time
import uuid
from bisect import bisect_right, insort
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import (
    STORAGE_TYPES,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.distributed.tensor import DTensor
from torch.futures import Future

from ckptd.errors import (
    CkptdError,
    ManifestError,
    NotFoundError,
    RankLayoutError,
    SnapshotFailedError,
    UnsupportedStateError,
)
from ckptd.format.manifest import Manifest, check_step
from ckptd.format.restore import read_tensors
from ckptd.format.skeleton import (
    JSON,
    DTensorInfo,
    dtensor_entries,
    dtensor_layout,
    dtype_from_name,
    ndarray_indices,
    unflatten,
)
from ckptd.format.store import Store, validate_job_name
from ckptd.locate import store_root
from ckptd.tier.remote import is_tier_url
from ckptd_client.api import tier_store
from ckptd_client.client import Client

ObjPath = tuple[str | int, ...]
"""Where a value sits in a nested state dict: DCP's ``OBJ_PATH`` (str keys, int list indices)."""

_TENSOR_TAGS = ("$tensor", "$dtensor", "$ndarray")
_PICKLED = "<stored pickled>"


# ---- what one rank's part holds, by FQN ----------------------------------------------------------


@dataclass(frozen=True)
class _TensorLeaf:
    """A tensor value: tensor ``index`` of the part (dtype and stored shape from the manifest);
    ``layout`` when it is a DTensor shard."""

    index: int
    dtype: str
    shape: tuple[int, ...]
    layout: DTensorInfo | None


@dataclass(frozen=True)
class _ValueLeaf:
    """A non-tensor value (DCP bytes): its skeleton ``node`` and the part's tensors it uses."""

    node: JSON
    tensors: tuple[int, ...]
    pickled: bool


_Leaf = _TensorLeaf | _ValueLeaf


@dataclass(frozen=True)
class ChunkSource:
    """Where one chunk of :class:`Metadata` is read: tensor ``index`` of rank ``rank``'s part."""

    rank: int
    index: int


@dataclass(frozen=True)
class ValueSource:
    """Where a bytes value is read: the skeleton ``node`` of rank ``rank``'s part, rebuilt with
    the part's tensors ``tensors`` (numpy arrays, tensors inside tuples)."""

    rank: int
    node: JSON
    tensors: tuple[int, ...]


@dataclass(frozen=True)
class StepSources:
    """``Metadata.storage_data`` of a step (what :meth:`CkptdStorageReader.read_data` reads):
    the source of every chunk and value, and the keys that cannot be served, with the error a
    load that asks for them raises."""

    job: str
    step: int
    world_size: int
    sources: dict[MetadataIndex, ChunkSource | ValueSource]
    refused: dict[str, CkptdError]


def _walk_tags(node: JSON, found: set[str], indices: list[int]) -> None:
    """Collect the tags in ``node`` and the tensor indices its tensor tags name."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key.startswith("$"):
                    found.add(key)
                    if key in _TENSOR_TAGS and isinstance(value, int):
                        indices.append(value)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _without_pickles(node: JSON) -> JSON:
    """``node`` with every ``$pickle`` value replaced by a marker string (never unpickled)."""
    if isinstance(node, list):
        return [_without_pickles(v) for v in node]
    if isinstance(node, dict):
        if "$pickle" in node:
            return _PICKLED
        return {k: _without_pickles(v) for k, v in node.items()}
    return node


class _Navigator:
    """Finds the skeleton node of a DCP object path (``str(key)`` per mapping level, the int
    index per list level, as ``traverse_state_dict`` builds them)."""

    def __init__(self, skeleton: JSON) -> None:
        self.skeleton = skeleton
        self._keyed: dict[int, dict[str, JSON]] = {}

    def node(self, path: ObjPath) -> JSON:
        node = self.skeleton
        for key in path:
            node = self._child(node, key, path)
        return node

    def _child(self, node: JSON, key: str | int, path: ObjPath) -> JSON:
        if isinstance(node, list) and isinstance(key, int):
            return node[key]
        if isinstance(node, dict):
            if "$dict" in node:
                keyed = self._keyed.get(id(node))
                if keyed is None:
                    keyed = {str(unflatten(k, ())): v for k, v in node["$dict"]}
                    self._keyed[id(node)] = keyed
                return keyed[str(key)]
            if not any(k.startswith("$") for k in node):
                return node[str(key)]
        raise ManifestError(f"skeleton: no value at {'.'.join(map(str, path))}")


def part_leaves(part: Manifest) -> tuple[dict[str, _Leaf], dict[str, ObjPath]]:
    """Every value of one part by the FQN DCP gives it, and each FQN's object path.

    The skeleton is decoded with placeholder tensors (meta tensors of the stored shape; empty
    arrays for numpy values) and flattened by DCP's ``flatten_state_dict``; each leaf's node is
    then found in the skeleton by its path. Raises :class:`UnsupportedStateError` when the stored
    state is not a dict (DCP loads dicts) and :class:`ManifestError` for a malformed skeleton.
    """
    skeleton = part.skeleton
    arrays = ndarray_indices(skeleton)
    placeholders = [
        torch.empty(0, dtype=torch.uint8)
        if i in arrays
        else torch.empty(t.shape, dtype=dtype_from_name(t.dtype), device="meta")
        for i, t in enumerate(part.tensors)
    ]
    state = unflatten(_without_pickles(skeleton), placeholders)
    if not isinstance(state, Mapping):
        raise UnsupportedStateError(
            f"job {part.job!r} step {part.step} (rank {part.rank}): the state is a "
            f"{type(state).__name__}, not a dict, so it has no keys torch.distributed.checkpoint "
            "can load; read it with ckptd_client.load"
        )
    flat, mapping = flatten_state_dict(dict(state))
    layouts = dtensor_entries(skeleton)
    nav = _Navigator(skeleton)
    leaves: dict[str, _Leaf] = {}
    for fqn, value in flat.items():
        node = nav.node(mapping[fqn])
        if isinstance(value, torch.Tensor):
            index = node.get("$tensor", node.get("$dtensor")) if isinstance(node, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(part.tensors):
                raise ManifestError(
                    f"job {part.job!r} step {part.step} (rank {part.rank}): skeleton node of "
                    f"{fqn} is not a tensor"
                )
            entry = part.tensors[index]
            leaves[fqn] = _TensorLeaf(index, entry.dtype, entry.shape, layouts.get(index))
        else:
            tags: set[str] = set()
            indices: list[int] = []
            _walk_tags(node, tags, indices)
            pickled = "$pickle" in tags
            leaves[fqn] = _ValueLeaf(node, tuple(sorted(set(indices))), pickled)
    return leaves, mapping


# ---- the step as DCP Metadata --------------------------------------------------------------------


def build_metadata(parts: Sequence[Manifest]) -> Metadata:
    """DCP ``Metadata`` of a step whose rank ``r`` wrote ``parts[r]`` (see the module docstring).

    ``storage_data`` is a :class:`StepSources`; ``planner_data`` maps each FQN to its object
    path, so DCP planners that rebuild a state dict from the metadata alone nest it as saved.
    """
    if not parts:
        raise ValueError("build_metadata needs at least one part")
    job, step = parts[0].job, parts[0].step
    holders: dict[str, list[tuple[int, _Leaf]]] = {}
    paths: dict[str, ObjPath] = {}
    for rank, part in enumerate(parts):
        leaves, mapping = part_leaves(part)
        for fqn, leaf in leaves.items():
            holders.setdefault(fqn, []).append((rank, leaf))
            paths.setdefault(fqn, mapping[fqn])
    described: dict[str, STORAGE_TYPES] = {}
    sources: dict[MetadataIndex, ChunkSource | ValueSource] = {}
    refused: dict[str, CkptdError] = {}
    for fqn, held in holders.items():
        where = f"job {job!r} step {step}: {fqn}"
        try:
            entry, found = _merge(where, fqn, held)
        except CkptdError as exc:
            described[fqn] = BytesStorageMetadata()  # so a load that asks for it reaches us
            refused[fqn] = exc
            continue
        described[fqn] = entry
        sources.update(found)
    return Metadata(
        state_dict_metadata=described,
        planner_data=paths,
        storage_data=StepSources(job, step, len(parts), sources, refused),
    )


def _ranks(held: Sequence[tuple[int, Any]]) -> str:
    return ", ".join(str(rank) for rank, _leaf in held)


def _merge(
    where: str, fqn: str, held: list[tuple[int, _Leaf]]
) -> tuple[STORAGE_TYPES, dict[MetadataIndex, ChunkSource | ValueSource]]:
    """One key's metadata over the ranks that hold it; raises why it cannot be served."""
    values = [(r, leaf) for r, leaf in held if isinstance(leaf, _ValueLeaf)]
    tensors = [(r, leaf) for r, leaf in held if isinstance(leaf, _TensorLeaf)]
    if values and tensors:
        raise RankLayoutError(
            f"{where} is a tensor on rank(s) {_ranks(tensors)} and another value on rank(s) "
            f"{_ranks(values)}; load it per rank with ckptd_client.load(..., rank=r)"
        )
    if values:
        rank, value = values[0]
        if value.pickled:
            raise UnsupportedStateError(
                f"{where} was stored pickled (allow_pickle=True) and CkptdStorageReader never "
                "unpickles; leave it out of the state dict you load, and read it with "
                "ckptd_client.load(..., allow_pickle=True) if you trust the checkpoint"
            )
        return BytesStorageMetadata(), {
            MetadataIndex(fqn): ValueSource(rank, value.node, value.tensors)
        }
    dtypes = {leaf.dtype for _r, leaf in tensors}
    if len(dtypes) > 1:
        shown = ", ".join(f"rank {r}: {leaf.dtype}" for r, leaf in tensors)
        raise RankLayoutError(f"{where}: the ranks hold it with different dtypes ({shown})")
    dtype = dtype_from_name(tensors[0][1].dtype)
    shards = [(r, leaf) for r, leaf in tensors if leaf.layout is not None]
    if not shards:
        shapes = {leaf.shape for _r, leaf in tensors}
        if len(shapes) > 1:
            shown = ", ".join(f"rank {r}: {list(leaf.shape)}" for r, leaf in tensors)
            raise RankLayoutError(
                f"{where} is a plain tensor (not a DTensor) of different shapes on different "
                f"ranks ({shown}), so it is neither a replica nor a described shard; load it per "
                "rank with ckptd_client.load(..., rank=r)"
            )
        rank, leaf = tensors[0]
        size = torch.Size(leaf.shape)
        offsets = torch.Size([0] * len(size))
        return TensorStorageMetadata(
            TensorProperties(dtype=dtype), size, [ChunkStorageMetadata(offsets, size)]
        ), {MetadataIndex(fqn, offsets): ChunkSource(rank, leaf.index)}
    if len(shards) != len(tensors):
        plain = [(r, leaf) for r, leaf in tensors if leaf.layout is None]
        raise RankLayoutError(
            f"{where} is a DTensor shard on rank(s) {_ranks(shards)} and a plain tensor on "
            f"rank(s) {_ranks(plain)}; load it per rank with ckptd_client.load(..., rank=r)"
        )
    return _sharded(where, fqn, dtype, shards)


def _sharded(
    where: str, fqn: str, dtype: torch.dtype, shards: list[tuple[int, _TensorLeaf]]
) -> tuple[STORAGE_TYPES, dict[MetadataIndex, ChunkSource | ValueSource]]:
    shapes = {leaf.layout.shape for _r, leaf in shards if leaf.layout is not None}
    if len(shapes) > 1:
        raise RankLayoutError(
            f"{where}: the ranks' DTensor shards disagree on the global shape "
            f"({sorted(list(s) for s in shapes)})"
        )
    shape = shapes.pop()
    blocks: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[int, int]] = {}
    for rank, leaf in shards:
        assert leaf.layout is not None
        offsets = leaf.layout.offsets
        if len(leaf.shape) != len(shape) or any(
            o + n > g for o, n, g in zip(offsets, leaf.shape, shape, strict=True)
        ):
            raise ManifestError(
                f"{where}: rank {rank}'s shard {list(leaf.shape)} does not fit at offsets "
                f"{list(offsets)} in the global shape {list(shape)}"
            )
        if math.prod(leaf.shape) == 0 and math.prod(shape) != 0:
            continue  # an empty shard of an uneven split holds nothing
        blocks.setdefault((offsets, leaf.shape), (rank, leaf.index))
    if not blocks:  # a tensor with no elements: one empty chunk keeps it loadable
        rank, leaf = shards[0]
        blocks[(tuple(0 for _ in shape), leaf.shape)] = (rank, leaf.index)
    _check_tiling(where, shape, list(blocks))
    chunks = []
    found: dict[MetadataIndex, ChunkSource | ValueSource] = {}
    for (offsets, sizes), (rank, index) in sorted(blocks.items()):
        chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        found[MetadataIndex(fqn, offsets)] = ChunkSource(rank, index)
    return TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(shape), chunks), found


def _check_tiling(
    where: str, shape: tuple[int, ...], blocks: list[tuple[tuple[int, ...], tuple[int, ...]]]
) -> None:
    """Raise unless ``blocks`` (offsets, sizes) cover the tensor exactly: DCP reads only what a
    chunk covers, so a hole would leave the target's own values in place without a word."""
    volume = sum(math.prod(sizes) for _offsets, sizes in blocks)
    overlap = _overlapping(blocks)
    if overlap is None and volume == math.prod(shape):
        return
    detail = (
        f"blocks at offsets {list(overlap[0])} and {list(overlap[1])} overlap"
        if overlap is not None
        else f"they hold {volume} of its {math.prod(shape)} elements"
    )
    raise RankLayoutError(
        f"{where}: the ranks' DTensor shards do not tile the global shape {list(shape)} "
        f"({detail}); a rank's part is missing or was written with another layout"
    )


def _overlapping(
    blocks: list[tuple[tuple[int, ...], tuple[int, ...]]],
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Offsets of two overlapping blocks, or None: a sweep along dimension 0."""
    if not blocks or not blocks[0][0]:
        return None if len(blocks) <= 1 else (blocks[0][0], blocks[1][0])
    active: list[tuple[int, int]] = []  # (end in dim 0, block number), sorted
    order = sorted(range(len(blocks)), key=lambda i: blocks[i][0])
    for i in order:
        offsets, sizes = blocks[i]
        del active[: bisect_right(active, (offsets[0], len(blocks)))]
        for _end, j in active:
            other, other_sizes = blocks[j]
            if all(
                o < p + m and p < o + n
                for o, n, p, m in zip(offsets, sizes, other, other_sizes, strict=True)
            ):
                return other, offsets
        insort(active, (offsets[0] + sizes[0], i))
    return None


def _narrow(tensor: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths, strict=True)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


# ---- checkpoint ids ------------------------------------------------------------------------------


def _step_id(value: object, *, latest: bool) -> int | str:
    """A step (int) or ``"latest"`` from a step argument or a DCP ``checkpoint_id``."""
    if latest and value == "latest":
        return "latest"
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    try:
        return check_step(value)
    except ValueError:
        raise ValueError(
            f"a ckptd step must be an integer between 0 and 10**12-1"
            f"{' or latest' if latest else ''} (as an int or a string of digits), got {value!r}"
        ) from None


# ---- the reader ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LoadStamp:
    """What each rank's local plan tells the coordinator: the step it resolved."""

    rank: int
    step: int


class CkptdStorageReader(StorageReader):
    """A DCP ``StorageReader`` for a committed ckptd step, at any world size.

    ``step`` is a step number or ``"latest"`` (the checkpoint committed last); ``root`` is the
    checkpoint root (default: as :func:`ckptd_client.load` finds it). DCP's ``checkpoint_id``
    (``dcp.load(..., checkpoint_id=...)``, which calls :meth:`reset`) is a step: an int, a
    string of digits or ``"latest"``.

    Call order (DCP's, on every rank): :meth:`reset` (only when ``dcp.load`` is given a
    ``checkpoint_id``), :meth:`read_metadata`, :meth:`set_up_storage_reader`,
    :meth:`prepare_local_plan`, :meth:`prepare_global_plan` (coordinator only), :meth:`read_data`.
    ``"latest"`` is resolved in :meth:`read_metadata`, once per load and rank; the coordinator
    checks that every rank resolved the same step (a commit landing in between fails the load
    with :class:`RankLayoutError`: load again, or name the step).

    Errors: an unknown job or step raises :class:`NotFoundError` from :meth:`read_metadata`,
    which ``dcp.load`` turns into a ``CheckpointException`` whose failure is its own
    ``AssertionError`` quoting ours ("metadata is None; global metadata read failed: job 'x' has
    no checkpoint at step 9; steps that exist: ..."). A key that cannot be served (see the module
    docstring) raises from :meth:`prepare_local_plan`, and a corrupt object
    :class:`~ckptd.errors.CorruptCheckpointError` from :meth:`read_data`, both inside DCP's
    ``CheckpointException`` (its ``failures`` map each rank to the exception itself).

    One instance serves one load at a time in one process; it holds no open files between calls.
    """

    def __init__(
        self, job: str, step: int | str = "latest", *, root: str | Path | None = None
    ) -> None:
        self.job = validate_job_name(job)
        self.step = _step_id(step, latest=True)
        # An s3:// root reads the object-store tier (ckptd.tier.mirror.TierStore).
        self.root: str | Path | None = (
            root if is_tier_url(root) else None if root is None else Path(root)
        )
        self.load_id = uuid.uuid4().hex
        self._store: Store | None = None
        self._parts: list[Manifest] = []
        self._sources: StepSources | None = None
        self._rank = 0

    def __repr__(self) -> str:
        return f"CkptdStorageReader(job={self.job!r}, step={self.step!r}, root={self.root!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_store=None, _parts=[], _sources=None)
        return state

    @property
    def checkpoint_id(self) -> str:
        """The step this reader loads, as DCP's ``checkpoint_id`` (``reset`` takes it back)."""
        return str(self.step)

    def reset(self, checkpoint_id: str | Any = None) -> None:
        """A new load begins; ``checkpoint_id``, when given, is the step to load."""
        if checkpoint_id is not None:
            self.step = _step_id(checkpoint_id, latest=True)
        self.load_id = uuid.uuid4().hex
        self._parts = []
        self._sources = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | Any) -> bool:
        """Whether ``checkpoint_id`` names a step (an int, digits, or ``"latest"``)."""
        try:
            _step_id(checkpoint_id, latest=True)
        except ValueError:
            return False
        return True

    def _open_store(self) -> Store:
        if self._store is None:
            self._store = (
                tier_store(self.root)
                if isinstance(self.root, str)
                else Store(store_root(self.root))
            )
        return self._store

    # ``**options``, not ``**kwargs``: DCP retries a failed read_metadata with ``rank=`` (for
    # per-rank metadata files) only when the signature names ``kwargs``; ckptd has none, and the
    # retry would report every error twice.
    def read_metadata(self, *args: Any, **options: Any) -> Metadata:
        """Resolve the step, read its record and every rank's part, and describe it to DCP."""
        store = self._open_store()
        step = store.resolve_step(self.job, self.step)
        record = store.read_manifest(self.job, step)
        if record.is_global:
            parts = [store.read_part(self.job, step, r, record) for r in range(record.world_size)]
        else:
            parts = [record]
        metadata = build_metadata(parts)
        self._parts = parts
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        sources = metadata.storage_data
        if not isinstance(sources, StepSources):
            raise TypeError(
                "CkptdStorageReader: the metadata was not made by its read_metadata "
                f"(storage_data is a {type(sources).__name__})"
            )
        self._sources = sources
        self._rank = int(kwargs.get("rank") or 0)

    def _step_sources(self) -> StepSources:
        if self._sources is None or not self._parts:
            raise RuntimeError(
                "CkptdStorageReader: read_metadata and set_up_storage_reader must run first "
                "(use it through torch.distributed.checkpoint.load)"
            )
        return self._sources

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Refuse keys that cannot be served (with the reason), and tell the coordinator which
        step this rank resolved."""
        sources = self._step_sources()
        for item in plan.items:
            fqn = item.storage_index.fqn
            refused = sources.refused.get(fqn)
            if refused is not None:
                raise type(refused)(str(refused))
            if item.storage_index not in sources.sources:
                raise ManifestError(
                    f"job {self.job!r} step {sources.step}: {fqn} has no stored chunk at "
                    f"offsets {list(item.storage_index.offset or ())}"
                )
        return dataclasses.replace(plan, storage_data=_LoadStamp(self._rank, sources.step))

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Check that every rank loads the same step."""
        stamps = [p.storage_data for p in plans if isinstance(p.storage_data, _LoadStamp)]
        steps = {s.step for s in stamps}
        if len(steps) > 1:
            shown = ", ".join(f"rank {s.rank}: step {s.step}" for s in stamps)
            raise RankLayoutError(
                f"job {self.job!r}: the loading ranks resolved {self.step!r} to different steps "
                f"({shown}), a step was committed meanwhile; load again, or pass the step number"
            )
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read what ``plan`` asks for, part by part (only the tensors it needs, verified), and
        hand it to ``planner``: tensors narrowed to each request's region, values as
        ``torch.save`` bytes. Parts no item needs are never read."""
        sources = self._step_sources()
        store = self._open_store()
        by_rank: dict[int, list[tuple[ReadItem, ChunkSource | ValueSource]]] = {}
        for item in plan.items:
            source = sources.sources[item.storage_index]
            by_rank.setdefault(source.rank, []).append((item, source))
        for rank, items in sorted(by_rank.items()):
            part = self._parts[rank]
            needed: set[int] = set()
            for _item, source in items:
                if isinstance(source, ChunkSource):
                    needed.add(source.index)
                else:
                    needed.update(source.tensors)
            tensors = _read_some(store, part, sorted(needed))
            for item, source in items:
                if isinstance(source, ValueSource):
                    planner.load_bytes(item, _value_bytes(part, source, tensors))
                    continue
                data = _narrow(tensors[source.index], item.storage_offsets, item.lengths)
                target = planner.resolve_tensor(item).detach()
                if target.size() != data.size():
                    raise ManifestError(
                        f"job {self.job!r} step {sources.step}: {item.storage_index.fqn}: the "
                        f"planner's target region {list(target.size())} does not match the "
                        f"stored region {list(data.size())}"
                    )
                target.copy_(data)
                planner.commit_tensor(item, target)
            del tensors
        done: Future[None] = Future()
        done.set_result(None)
        return done


def _read_some(store: Store, part: Manifest, indices: list[int]) -> dict[int, torch.Tensor]:
    """Tensors ``indices`` of ``part``, read and verified (only the objects they use)."""
    if not indices:
        return {}
    entries = tuple(part.tensors[i] for i in indices)
    objects = {p.object: part.objects[p.object] for t in entries for p in t.pieces}
    subset = dataclasses.replace(part, tensors=entries, objects=objects)
    return dict(zip(indices, read_tensors(store, subset), strict=True))


def _value_bytes(
    part: Manifest, source: ValueSource, tensors: dict[int, torch.Tensor]
) -> io.BytesIO:
    """A stored non-tensor value as the ``torch.save`` bytes DCP's planners ``torch.load``."""
    empty = torch.empty(0, dtype=torch.uint8)
    arrays = [tensors.get(i, empty) for i in range(len(part.tensors))]
    value = unflatten(source.node, arrays)
    out = io.BytesIO()
    torch.save(value, out)
    out.seek(0)
    return out


# ---- the writer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SaveStamp:
    """A rank's local plan tells the coordinator what it saves."""

    rank: int
    job: str
    step: int


@dataclass(frozen=True)
class _SaveOrder:
    """The coordinator's answer in each rank's plan: the rank's place and the save's attempt."""

    rank: int
    world_size: int
    attempt: str | None


@dataclass(frozen=True)
class PartWritten:
    """``WriteResult.storage_data``: the rank whose part holds the item, and that part's file."""

    rank: int
    path: str


class CkptdStorageWriter(StorageWriter):
    """A DCP ``StorageWriter`` that hands each rank's items to its node's ckptd daemon.

    ``job`` and ``step`` name the checkpoint (DCP's ``checkpoint_id``, given to ``dcp.save`` /
    ``async_save``, replaces the step: an int or a string of digits). ``socket`` is the rank's
    daemon and ``root`` the checkpoint root, as for :class:`~ckptd_client.Client` (defaults from
    ``CKPTD_SOCKET`` / ``CKPTD_ROOT`` / the config). ``timeout_s`` bounds each wait: for the
    daemon to make the rank's part durable, and for the step to become visible.

    Call order (DCP's): :meth:`reset` (only when given a ``checkpoint_id``), on every rank
    :meth:`set_up_storage_writer` (the rank arrives in ``**kwargs``) and
    :meth:`prepare_local_plan`, on the coordinator :meth:`prepare_global_plan` (every rank's
    step must agree; it fixes the world size and draws the save's restart attempt, a fresh id per
    save so a retried step never collides with a failed try), on every rank :meth:`write_data`,
    then :meth:`finish` on the coordinator.

    Process and thread ownership: the writer's state is plain data, so it pickles (DCP's process
    executor sends it to a checkpoint process). The :class:`~ckptd_client.Client` is made inside
    :meth:`write_data`, in the process and thread that runs it, and closed before it returns;
    nothing (socket, lock, thread) outlives the call. One save at a time per instance: a second
    ``async_save`` with the same writer must wait for the first one's future.

    ``use_collectives=False`` is refused: the ranks agree on the world size and the attempt
    through DCP's plan exchange. With ``enable_plan_caching=True`` a cached plan keeps the
    attempt of the save that made it.
    """

    def __init__(
        self,
        job: str,
        step: int,
        *,
        root: str | Path | None = None,
        socket: str | Path | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        self.job = validate_job_name(job)
        self.step = int(_step_id(step, latest=False))
        self.root = None if root is None else Path(root)
        self.socket = None if socket is None else Path(socket)
        self.timeout_s = float(timeout_s)
        self.save_id = uuid.uuid4().hex
        self._rank = 0
        self._attempt: str | None = None
        self._world_size = 1
        self._written_root: Path | None = None

    def __repr__(self) -> str:
        return (
            f"CkptdStorageWriter(job={self.job!r}, step={self.step}, root={self.root!r}, "
            f"socket={self.socket!r})"
        )

    @property
    def checkpoint_id(self) -> str:
        """The step this writer saves, as DCP's ``checkpoint_id``."""
        return str(self.step)

    def reset(self, checkpoint_id: str | Any = None) -> None:
        """A new save begins; ``checkpoint_id``, when given, is its step."""
        if checkpoint_id is not None:
            self.step = int(_step_id(checkpoint_id, latest=False))
        self.save_id = uuid.uuid4().hex

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | Any) -> bool:
        """Whether ``checkpoint_id`` names a step (an int or a string of digits)."""
        try:
            _step_id(checkpoint_id, latest=False)
        except ValueError:
            return False
        return True

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("use_collectives", True):
            raise ValueError(
                "CkptdStorageWriter needs use_collectives=True: its ranks learn the world size "
                "and the save's attempt from DCP's plan exchange"
            )
        rank = kwargs.get("rank")
        if rank is None:  # a DCP that passes no rank: the default group's
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._rank = int(rank)
        self._attempt = None
        self._world_size = 1
        self._written_root = None

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return dataclasses.replace(plan, storage_data=_SaveStamp(self._rank, self.job, self.step))

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Check that every rank saves the same job and step; give each its place."""
        stamps = [p.storage_data for p in plans if isinstance(p.storage_data, _SaveStamp)]
        if len({(s.job, s.step) for s in stamps}) > 1:
            shown = ", ".join(f"rank {s.rank}: {s.job} step {s.step}" for s in stamps)
            raise RankLayoutError(
                f"the ranks of one dcp.save name different checkpoints ({shown}); give every "
                "rank the same job and step"
            )
        world_size = len(plans)
        attempt = f"dcp-{uuid.uuid4().hex}" if world_size > 1 else None
        self._attempt, self._world_size = attempt, world_size
        return [
            dataclasses.replace(p, storage_data=_SaveOrder(rank, world_size, attempt))
            for rank, p in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Hand this rank's items to its daemon as one part; return once the part is durable."""
        order = plan.storage_data
        if not isinstance(order, _SaveOrder):
            raise RuntimeError(
                "CkptdStorageWriter.write_data: the plan did not pass through its "
                "prepare_global_plan (use it through torch.distributed.checkpoint.save)"
            )
        if order.rank != self._rank:
            raise RankLayoutError(
                f"CkptdStorageWriter: DCP says this is rank {self._rank} but the global plan "
                f"was made for rank {order.rank}"
            )
        state, sizes = rank_state(plan, planner)
        with Client(
            self.job,
            socket=self.socket,
            root=self.root,
            slots=1,
            strict=True,
            timeout_s=min(self.timeout_s, 60.0),
            rank=order.rank,
            world_size=order.world_size,
            attempt=order.attempt,
        ) as client:
            pending = client.snapshot(state=state, step=self.step, rng=False)
            try:
                info = pending.wait(timeout=self.timeout_s)
            except TimeoutError as exc:
                raise SnapshotFailedError(
                    f"{self.job} step {self.step}: rank {order.rank}'s part was not durable "
                    f"after {self.timeout_s:g} s (CkptdStorageWriter(timeout_s=...)); see "
                    "`ckptd status`"
                ) from exc
            self._written_root = Path(client.root)
        done = PartWritten(order.rank, info.path)
        results = [
            WriteResult(index=item.index, size_in_bytes=size, storage_data=done)
            for item, size in zip(plan.items, sizes, strict=True)
        ]
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Write nothing (the daemons commit the step); wait until the step is visible."""
        if self._world_size <= 1:
            return  # one process: its write_data returned once the checkpoint was committed
        root = self._written_root or store_root(self.root, socket=self.socket)
        store = Store(root)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                record = store.read_manifest(self.job, self.step)
            except NotFoundError:
                record = None
            if record is not None and record.attempt == self._attempt:
                return
            if time.monotonic() > deadline:
                raise SnapshotFailedError(
                    f"{self.job} step {self.step}: every rank's part is durable, but the step "
                    f"was not committed (attempt {self._attempt}) within {self.timeout_s:g} s; "
                    f"see `ckptd status` for steps waiting for ranks (root {root})"
                )
            time.sleep(0.02)


def rank_state(plan: SavePlan, planner: SavePlanner) -> tuple[dict[Any, Any], list[int]]:
    """The state one rank's part stores for ``plan``, and each item's size in bytes.

    Each item is resolved through the planner (``resolve_data``) and put where the planner's
    flattening took it from (its FQN -> path mapping: ``plan.planner_data``, else the planner's
    ``mappings``; list indices become int dict keys, since a rank may hold only some elements of
    a list). Without a mapping the state is flat, keyed by FQN. DTensor shards become DTensors
    again (their local data, the original's mesh and placements), stored as ckptd's ``$dtensor``
    tag; bytes items are decoded with ``torch.load(weights_only=True)``. Raises
    :class:`UnsupportedStateError` naming the FQN of a value that cannot be stored pickle-free.
    """
    mapping = plan.planner_data if isinstance(plan.planner_data, Mapping) else None
    if mapping is None:
        found = getattr(planner, "mappings", None)
        mapping = found if isinstance(found, Mapping) else {}
    state: dict[Any, Any] = {}
    sizes: list[int] = []
    for item in plan.items:
        fqn = item.index.fqn
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            if not isinstance(data, io.BytesIO):
                raise TypeError(f"{fqn}: the planner resolved a bytes item to {type(data)}")
            value: Any = _decode_value(fqn, data)
            sizes.append(len(data.getbuffer()))
        elif not isinstance(data, torch.Tensor):
            raise TypeError(f"{fqn}: the planner resolved a tensor item to {type(data)}")
        else:
            local = data.detach()
            value = _shard(fqn, item, local, planner) if item.type == WriteItemType.SHARD else local
            sizes.append(local.numel() * local.element_size())
        path = mapping.get(fqn)
        _put(state, tuple(path) if isinstance(path, tuple | list) and path else (fqn,), value, fqn)
    return state, sizes


def _put(state: dict[Any, Any], path: ObjPath, value: Any, fqn: str) -> None:
    node = state
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UnsupportedStateError(f"{fqn}: its path {path} runs through a stored value")
        node = child
    if path[-1] in node:
        raise UnsupportedStateError(
            f"{fqn}: several items for one key on this rank (a ShardedTensor with several local "
            "shards?); CkptdStorageWriter stores one value or one DTensor shard per key"
        )
    node[path[-1]] = value


def _decode_value(fqn: str, data: io.BytesIO) -> Any:
    """A value DCP serialized with ``torch.save``, loaded without running pickled code."""
    data.seek(0)
    try:
        return torch.load(data, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc)
        marker = "WeightsUnpickler error: "
        if marker in reason:
            reason = reason.split(marker, 1)[1].split(". Please", 1)[0]
        raise UnsupportedStateError(
            f"{fqn}: cannot store this value without pickle ({reason.strip()}); ckptd keeps "
            "tensors, DTensors, dict, list, tuple, str, int, float, bool and None: convert it "
            "(a numpy array with torch.from_numpy, an object to its state_dict()), or leave it "
            "out of the state dict"
        ) from exc


def _shard(fqn: str, item: WriteItem, local: torch.Tensor, planner: SavePlanner) -> Any:
    """The DTensor a SHARD item came from, around the data the planner resolved."""
    original = getattr(planner, "state_dict", None)
    value = original.get(fqn) if isinstance(original, Mapping) else None
    if not isinstance(value, DTensor):
        kind = type(value).__qualname__ if value is not None else "not found in the planner"
        raise UnsupportedStateError(
            f"{fqn}: a sharded item whose value is a {kind}, not a DTensor; CkptdStorageWriter "
            "stores DTensor shards (FSDP2, tensor parallel) with DCP's default save planner"
        )
    shard = DTensor.from_local(
        local,
        value.device_mesh,
        value.placements,
        run_check=False,
        shape=value.shape,
        stride=value.stride(),
    )
    chunk = item.tensor_data.chunk if item.tensor_data is not None else None
    layout = dtensor_layout(shard, fqn)
    if chunk is not None and (
        tuple(chunk.offsets) != layout.offsets or tuple(chunk.sizes) != tuple(local.shape)
    ):
        raise UnsupportedStateError(
            f"{fqn}: DCP's chunk (offsets {list(chunk.offsets)}, sizes {list(chunk.sizes)}) "
            f"is not the DTensor's shard ({layout.describe(local.shape)})"
        )
    return shard


__all__ = [
    "ChunkSource",
    "CkptdStorageReader",
    "CkptdStorageWriter",
    "PartWritten",
    "StepSources",
    "ValueSource",
    "build_metadata",
    "part_leaves",
    "rank_state",
]
