"""Gathering a training state from its objects, and putting it back.

``collect`` builds the nested dict a snapshot stores; ``apply`` loads a restored one into the
objects. RNG states cover torch (CPU, and CUDA when available), numpy's global generator and
Python's ``random``, so a resumed run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Any, Protocol

import numpy as np
import torch

STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "extra")


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
    where: str = "checkpoint",
) -> dict[str, Any]:
    """Load ``state`` (as :func:`collect` built it) into the objects; return its ``extra``."""
    if not isinstance(state, dict) or not set(state) <= set(STATE_KEYS):
        raise ValueError(
            f"{where} was taken with state=...; load it with ckptd_client.load() and apply it "
            "yourself"
        )
    for name, obj in (
        ("model", model),
        ("optimizer", optimizer),
        ("scheduler", scheduler),
        ("scaler", scaler),
    ):
        if obj is None:
            continue
        if name not in state:
            raise ValueError(f"{where} holds no {name} state (it has: {', '.join(state)})")
        obj.load_state_dict(state[name])
    if rng and "rng" in state:
        set_rng_state(state["rng"])
    extra = state.get("extra", {})
    return dict(extra) if isinstance(extra, dict) else {}
