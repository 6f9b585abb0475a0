"""Gathering a training state from its objects, and putting it back.

``collect`` builds the nested dict a snapshot stores; ``apply`` loads a restored one into the
objects. RNG states cover torch (CPU, and CUDA when available), numpy's global generator and
Python's ``random``, so a resumed run draws the same numbers as an uninterrupted one.

``apply(..., strict=False)`` loads a model whose layers changed since the checkpoint (added or
removed modules): it passes ``strict=False`` to the model's ``load_state_dict`` and reports what
torch reports, the missing and unexpected keys.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Protocol, cast

import numpy as np
import torch

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
    incompatible: Any = None
    for name, obj in parts:
        if name == "model" and not strict:
            incompatible = cast(Any, obj).load_state_dict(state[name], strict=False)
            _warn_incompatible(incompatible, where)
        else:
            obj.load_state_dict(state[name])
    if rng and "rng" in state:
        set_rng_state(state["rng"])
    extra = state.get("extra", {})
    out = dict(extra) if isinstance(extra, dict) else {}
    if model is not None and not strict:
        out.setdefault(INCOMPATIBLE_KEYS, incompatible)
    return out


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
