"""Gathering a training state from its objects, and putting it back.

``collect`` builds the nested dict a snapshot stores; ``apply`` loads a restored one into the
objects. RNG states cover torch (CPU, and CUDA when available), numpy's global generator and
Python's ``random``, so a resumed run draws the same numbers as an uninterrupted one.

``apply(..., strict=False)`` loads a model whose layers changed since the checkpoint (added or
removed modules): it passes ``strict=False`` to the model's ``load_state_dict`` and reports what
torch reports, the missing and unexpected keys.

Sharded models (FSDP2, tensor parallel): each rank's checkpoint holds its local shards of the
DTensors (see :mod:`ckptd.format.skeleton`), restored as plain tensors. ``apply`` wraps each one
back into a DTensor with the layout the model's (or optimizer's) own value has at that key, after
checking that the shard is the one this rank holds there. Loading onto another layout (another
world size, mesh or placement) is resharding: ``torch.distributed.checkpoint.load`` with
``ckptd_client.dcp.CkptdStorageReader`` does it.
"""

from __future__ import annotations

import copy
import logging
import random
import sys
from typing import Any, Protocol, cast

import numpy as np
import torch

from ckptd.errors import RankLayoutError
from ckptd.format.skeleton import dtensor_layout, is_dtensor, shard_info

log = logging.getLogger("ckptd_client.state")

STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "extra")
INCOMPATIBLE_KEYS = "__incompatible_keys__"
"""The key of ``extra`` under which ``apply(..., strict=False)`` returns what the model's
``load_state_dict`` returned: for a ``torch.nn.Module``, torch's ``_IncompatibleKeys``
``(missing_keys, unexpected_keys)`` named tuple."""


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


def rng_state() -> dict[str, Any]:
    """The RNG states a resumed run needs to continue the same random sequence."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_state(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (entries that are missing are left alone)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "numpy" in states:
        np.random.set_state(states["numpy"])
    if "python" in states:
        random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _state_of(obj: Stateful | dict[str, Any]) -> Any:
    return obj if isinstance(obj, dict) else obj.state_dict()


def collect(
    model: Stateful | dict[str, Any] | None = None,
    optimizer: Stateful | dict[str, Any] | None = None,
    *,
    scheduler: Stateful | dict[str, Any] | None = None,
    scaler: Stateful | dict[str, Any] | None = None,
    rng: bool = True,
    extra: dict[str, Any] | None = None,
    state: Any = None,
) -> Any:
    """The state a snapshot stores: ``state`` itself if given, else a dict keyed by
    ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``extra`` for what was given.

    Objects with ``state_dict()`` are asked for it; plain dicts are taken as state dicts.
    """
    if state is not None:
        given = [
            n
            for n, v in (
                ("model", model),
                ("optimizer", optimizer),
                ("scheduler", scheduler),
                ("scaler", scaler),
                ("extra", extra),
            )
            if v is not None
        ]
        if given:
            raise TypeError(
                f"pass either state= or objects, not both (also got {', '.join(given)})"
            )
        return state
    out: dict[str, Any] = {}
    for name, obj in (
        ("model", model),
        ("optimizer", optimizer),
        ("scheduler", scheduler),
        ("scaler", scaler),
    ):
        if obj is not None:
            out[name] = _state_of(obj)
    if rng:
        out["rng"] = rng_state()
    if extra is not None:
        if not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
        out["extra"] = extra
    if not out:
        raise TypeError("nothing to snapshot: pass a model, an optimizer, extra=..., or state=...")
    return out


def apply(
    state: Any,
    model: Stateful | None = None,
    optimizer: Stateful | None = None,
    *,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    rng: bool = True,
    strict: bool = True,
    where: str = "checkpoint",
) -> dict[str, Any]:
    """Load ``state`` (as :func:`collect` built it) into the objects; return its ``extra``.

    ``strict`` is passed to the model's ``load_state_dict`` (only when False, so a model-like
    object whose ``load_state_dict`` takes no ``strict`` still works by default). With
    ``strict=False`` keys the checkpoint has and the model lacks are ignored and the model's own
    keys the checkpoint lacks keep their values; a WARNING names both, and the returned dict
    carries what ``load_state_dict`` returned under ``"__incompatible_keys__"`` (unless the
    checkpoint's ``extra`` has that key itself), so a caller can act on it. With the default
    ``strict=True`` the returned dict is ``extra`` alone: any mismatch raises instead.

    Every requested part is checked to be present, and a torch optimizer's parameter groups to
    match the checkpoint's, before anything is loaded: a model that gained or lost layers cannot
    take its old optimizer state, and that error leaves every object as it was.

    DTensors: where the model's ``state_dict()`` holds a DTensor (or, for a torch optimizer, where
    the saved per-parameter state is a shard and the parameter is a DTensor), the saved local
    shard is wrapped as ``DTensor.from_local`` with that value's mesh, placements, global shape and
    stride, no collective involved. The saved shard must be exactly the block this rank holds
    there: same global shape, placements and offsets (a plain tensor qualifies only when this
    rank's block is the whole tensor). Otherwise :class:`~ckptd.errors.RankLayoutError` names the
    key and both layouts, before anything is loaded; reshard with
    ``ckptd_client.dcp.CkptdStorageReader`` instead. A saved shard smaller than its tensor is
    refused the same way where the object holds a plain tensor. States without DTensors or shards
    are passed to ``load_state_dict`` as they are.
    """
    if not isinstance(state, dict) or not set(state) <= set(STATE_KEYS):
        raise ValueError(
            f"{where} was taken with state=...; load it with ckptd_client.load() and apply it "
            "yourself"
        )
    parts = [
        (name, obj)
        for name, obj in (
            ("model", model),
            ("optimizer", optimizer),
            ("scheduler", scheduler),
            ("scaler", scaler),
        )
        if obj is not None
    ]
    for name, _obj in parts:
        if name not in state:
            raise ValueError(f"{where} holds no {name} state (it has: {', '.join(state)})")
    if optimizer is not None:
        _check_optimizer_fits(state["optimizer"], optimizer, where)
    loads = {
        name: _with_dtensors(name, state[name], obj, where)
        if name in _SHARDED_PARTS
        else state[name]
        for name, obj in parts
    }
    incompatible: Any = None
    for name, obj in parts:
        if name == "model" and not strict:
            incompatible = cast(Any, obj).load_state_dict(loads[name], strict=False)
            _warn_incompatible(incompatible, where)
        else:
            obj.load_state_dict(loads[name])
    if rng and "rng" in state:
        set_rng_state(state["rng"])
    extra = state.get("extra", {})
    out = dict(extra) if isinstance(extra, dict) else {}
    if model is not None and not strict:
        out.setdefault(INCOMPATIBLE_KEYS, incompatible)
    return out


_SHARDED_PARTS = ("model", "optimizer")
"""The parts whose saved local shards :func:`apply` wraps back into DTensors."""


def _with_dtensors(name: str, saved: Any, obj: Stateful, where: str) -> Any:
    """``saved`` with every local shard (or plain tensor) whose target in ``obj`` is a DTensor
    wrapped into one of the target's layout; ``saved`` itself when there is nothing to wrap."""
    if "torch.distributed.tensor" not in sys.modules and not _holds_shards(saved):
        return saved  # no DTensor can exist in this process, and none was saved
    targets = obj.state_dict()
    if name == "optimizer":
        targets = _optimizer_targets(saved, targets, obj)
    return _wrap_like(saved, targets, name, where)


def _holds_shards(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return shard_info(value) is not None
    if isinstance(value, dict):
        return any(_holds_shards(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_shards(v) for v in value)
    return False


def _optimizer_targets(saved: Any, targets: Any, optimizer: Stateful) -> Any:
    """The optimizer's ``state_dict()``, its ``state`` keyed by the checkpoint's parameter ids,
    with the parameter itself as the target of each saved value laid out like it that the
    optimizer has no state for yet (a fresh optimizer has none: Adam's moments have their
    parameter's layout). Parameters pair up by position, as
    ``torch.optim.Optimizer.load_state_dict`` pairs them."""
    groups = getattr(optimizer, "param_groups", None)
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("state"), dict)
        and isinstance(saved.get("param_groups"), list)
        and isinstance(targets, dict)
        and isinstance(targets.get("param_groups"), list)
        and isinstance(groups, list)
    ):
        return targets
    saved_ids = [i for g in saved["param_groups"] for i in g.get("params", ())]
    current_ids = [i for g in targets["param_groups"] for i in g.get("params", ())]
    params = [p for g in groups for p in g.get("params", ())]
    current_state = targets.get("state", {})
    state: dict[Any, dict[Any, Any]] = {}
    for saved_id, current_id, param in zip(saved_ids, current_ids, params, strict=False):
        values = saved["state"].get(saved_id)
        if not isinstance(values, dict):
            continue
        have = current_state.get(current_id, {})
        state[saved_id] = {
            key: have.get(key, param)
            for key, value in values.items()
            if key in have or _has_param_layout(key, value, param)
        }
    return {**targets, "state": state}


def _has_param_layout(key: Any, value: Any, param: Any) -> bool:
    """Whether a saved per-parameter optimizer value is laid out like its parameter: a saved
    shard, or a plain tensor of a DTensor parameter's global shape (except ``step``, which torch
    optimizers keep as a plain scalar)."""
    if not isinstance(value, torch.Tensor):
        return False
    if shard_info(value) is not None:
        return True
    return key != "step" and is_dtensor(param) and value.shape == param.shape


def _wrap_like(saved: Any, target: Any, path: str, where: str) -> Any:
    if isinstance(target, torch.Tensor):
        if isinstance(saved, torch.Tensor) and not is_dtensor(saved):
            return _as_target_layout(saved, target, path, where)
        return saved
    if isinstance(saved, dict) and isinstance(target, dict):
        changed = {}
        for key, value in saved.items():
            if key in target:
                new = _wrap_like(value, target[key], f"{path}.{key}", where)
                if new is not value:
                    changed[key] = new
        if not changed:
            return saved
        out = copy.copy(saved)  # keeps the type, and an OrderedDict's _metadata
        out.update(changed)
        return out
    if (
        type(saved) in (list, tuple)
        and isinstance(target, list | tuple)
        and len(saved) == len(target)
    ):
        items = [
            _wrap_like(v, t, f"{path}.{i}", where)
            for i, (v, t) in enumerate(zip(saved, target, strict=True))
        ]
        if all(new is old for new, old in zip(items, saved, strict=True)):
            return saved
        return type(saved)(items)
    return saved


def _as_target_layout(local: torch.Tensor, target: torch.Tensor, path: str, where: str) -> Any:
    """``local`` as a DTensor of ``target``'s layout, when ``target`` is a DTensor and ``local``
    is the block this rank holds of it; ``local`` itself for a plain target."""
    info = shard_info(local)
    local_shape = tuple(local.shape)
    if not is_dtensor(target):
        if info is not None and local_shape != info.shape:
            raise RankLayoutError(
                f"{where}: {path} holds this rank's shard of a DTensor "
                f"({info.describe(local_shape)}), but the object it is loaded into holds a plain "
                f"tensor of shape {list(target.shape)} there. Nothing was loaded. Load a sharded "
                "checkpoint into an unsharded model with torch.distributed.checkpoint.load and "
                "ckptd_client.dcp.CkptdStorageReader, which reassembles the shards"
            )
        return local
    from torch.distributed.tensor import DTensor

    want = dtensor_layout(target, path)
    want_local = tuple(target.to_local().shape)  # type: ignore[attr-defined]
    if info is None:
        fits = local_shape == want.shape == want_local
    else:
        fits = local_shape == want_local and (info.shape, info.placements, info.offsets) == (
            want.shape,
            want.placements,
            want.offsets,
        )
    if not fits:
        held = (
            f"a DTensor shard with {info.describe(local_shape)}"
            if info is not None
            else f"a plain tensor of shape {list(local_shape)}"
        )
        raise RankLayoutError(
            f"{where}: {path}: the checkpoint holds {held}; on this rank it is loaded into a "
            f"DTensor with {want.describe(want_local)}. Nothing was loaded. Check that each rank "
            "restores its own checkpoint; to load onto another layout (world size, mesh, "
            "placements), reshard with torch.distributed.checkpoint.load(..., "
            "storage_reader=ckptd_client.dcp.CkptdStorageReader(...))"
        )
    with torch.no_grad():
        return DTensor.from_local(
            local,
            target.device_mesh,  # type: ignore[attr-defined]
            target.placements,  # type: ignore[attr-defined]
            shape=target.shape,
            stride=target.stride(),
            run_check=False,
        )


def _check_optimizer_fits(saved: Any, optimizer: Stateful, where: str) -> None:
    """The checks ``torch.optim.Optimizer.load_state_dict`` makes (same number of parameter
    groups, same number of parameters in each), made before the model is loaded and raised as a
    ckptd error that says what to do. Optimizers without ``param_groups`` are left to their own
    ``load_state_dict``."""
    groups = getattr(optimizer, "param_groups", None)
    saved_groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not isinstance(saved_groups, list):
        return
    have, had = _group_sizes(groups), _group_sizes(saved_groups)
    if have != had:
        # ValueError, like the check for a missing part above and like torch's own message.
        raise ValueError(
            f"{where}: its optimizer state does not fit this optimizer: parameters per group "
            f"{had} in the checkpoint, {have} in this optimizer (the model changed since the "
            "checkpoint). Nothing was loaded. Pass optimizer=None to restore only the model "
            "(with strict=False if layers were added or removed); the optimizer then starts "
            "fresh"
        )


def _group_sizes(groups: list[Any]) -> list[int]:
    return [len(g.get("params", ())) if isinstance(g, dict) else 0 for g in groups]


def _warn_incompatible(result: Any, where: str) -> None:
    missing = list(getattr(result, "missing_keys", ()))
    unexpected = list(getattr(result, "unexpected_keys", ()))
    if missing or unexpected:
        log.warning(
            "ckptd: %s loaded into the model with strict=False: %d missing key(s) (kept as "
            "the model has them): %s; %d unexpected key(s) (in the checkpoint, ignored): %s",
            where,
            len(missing),
            ", ".join(missing) or "none",
            len(unexpected),
            ", ".join(unexpected) or "none",
        )
