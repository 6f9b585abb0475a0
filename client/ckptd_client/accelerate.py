"""Hugging Face Accelerate through ckptd: ``snapshot(accelerator, client, step=...)`` instead of
``accelerator.save_state(dir)``, ``restore(accelerator, client)`` instead of
``accelerator.load_state(dir)``.

What is stored is what ``save_state`` writes (accelerate 1.16, ``checkpointing.py``), taken from
the objects ``accelerator.prepare`` and ``register_for_checkpointing`` gave the accelerator, in
the order they were given:

==========================  ======================================================================
``models``                  each prepared model's state dict, *unwrapped*
                            (``accelerator.unwrap_model(model, keep_torch_compile=False)``): no
                            DDP ``module.`` or ``torch.compile`` ``_orig_mod.`` prefix, so it loads
                            into the model however it is wrapped in the restoring run
``optimizers``              each prepared optimizer's ``state_dict()``
``schedulers``              each prepared LR scheduler's ``state_dict()``
``scaler``                  ``accelerator.scaler.state_dict()`` (fp16 mixed precision), or None
``dataloaders``             per prepared dataloader: its ``iteration`` (the pass count, which a
                            ``SeedableRandomSampler`` seeds its shuffle with), the states of its
                            generators (the loader's, its sampler's and the one accelerate
                            synchronizes across processes: a shuffle draws from them), a
                            ``SeedableRandomSampler``'s epoch and seed, and a
                            ``StatefulDataLoader``'s ``state_dict()``
``custom_objects``          each registered object's ``state_dict()``
``step``, ``iteration``     ``accelerator.step`` (the gradient-accumulation counter) and
                            ``accelerator.save_iteration``
``device_rng``              the RNG of a non-CUDA accelerator device (XPU, MPS, NPU, ...), if any
==========================  ======================================================================

next to ckptd's own ``rng`` (torch, numpy, Python ``random``, every CUDA device: this process's,
as ``save_state`` writes ``random_states_<process>.pkl``) and the caller's ``extra``. In
``ckptd_client.load(job)`` the accelerator's part is under ``"model"`` (the slot of the state
dict ``Client.snapshot`` fills with it): ``load(job)["model"]["models"][0]`` is the first model's
plain state dict. For the dataloaders this stores more than ``save_state``, which keeps neither
the generators nor ``iteration`` (a resume from it shuffles the next epochs differently). As with
``save_state``, a plain dataloader's position inside an epoch is not stored: snapshot at the end
of an epoch, or skip the batches already seen with ``accelerator.skip_first_batches`` (exact with
``use_seedable_sampler=True``).

The prepared objects are read from the accelerator's attributes ``_models``, ``_optimizers``,
``_schedulers``, ``_dataloaders`` and ``_custom_objects``: accelerate exposes them through no
public accessor (``save_state`` itself reads them). They are only read; no method of accelerate is
overridden or patched.

Restore checks, before anything is loaded, that the checkpoint was taken by :func:`snapshot`, that
the accelerator holds as many models, optimizers, schedulers, dataloaders and registered objects
as were saved (and a scaler exactly when one was saved), that every model has the saved keys,
shapes and dtypes and every optimizer the saved parameter groups: else
:class:`AcceleratorMismatchError` lists every difference and nothing was loaded (RNG included).

DeepSpeed, Megatron-LM, FSDP and XLA keep their state in their own engines, and are refused with
a :class:`~ckptd.errors.ConfigError` (for FSDP2, snapshot the model and optimizer with
``Client.snapshot`` or ``torch.distributed.checkpoint`` with :mod:`ckptd_client.dcp`).

Several processes (torchrun, ``accelerate launch``): call :func:`snapshot` on **every** process,
as ``save_state`` is: each process hands off its own part (its RNG states are its own), and the
step becomes visible once every process's part is durable (a :class:`~ckptd_client.Client` in a
process group is one rank of a multi-rank job). :func:`restore` on every process loads its own
part of the newest step all of them committed. ``restore(accelerator, job=..., from_rank=r)``
loads rank r's part at any process count (the models and optimizers of a DDP run are the same on
every rank): a job of multi-rank checkpoints takes no single-process client, so a run that goes
on in one process snapshots under a new job name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptd.errors import CkptdError, ConfigError, DaemonUnavailableError, RankLayoutError
from ckptd_client.api import load
from ckptd_client.api import restore as api_restore
from ckptd_client.client import Client
from ckptd_client.pending import PendingSnapshot
from ckptd_client.state import apply

try:
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.data_loader import SeedableRandomSampler  # type: ignore[import-untyped]
    from accelerate.utils import DistributedType  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ckptd_client.accelerate needs Hugging Face Accelerate (the `accelerate` package): "
        "pip install 'ckptd[accelerate]'"
    ) from exc

log = logging.getLogger("ckptd_client.accelerate")

FORMAT = "ckptd-accelerate/1"
"""The ``format`` entry of the accelerator's state; what :func:`restore` recognizes."""

_REFUSED = {
    DistributedType.DEEPSPEED: "DeepSpeed",
    DistributedType.MEGATRON_LM: "Megatron-LM",
    DistributedType.FSDP: "FSDP",
    DistributedType.XLA: "XLA",
}
_SHOWN = 8
"""How many keys or tensors of one kind a mismatch message names."""
_GENERATOR_ROLES = ("loader", "sampler", "synchronized")
"""A dataloader's generators, in the order stored: ``DataLoader.generator`` (worker seeds, and
the default sampler's), its sampler's and accelerate's ``synchronized_generator``; several roles
may be one generator, which is then restored to the same state more than once."""


class AcceleratorMismatchError(CkptdError, ValueError):
    """The checkpoint does not fit the accelerator it is restored into (other prepared or
    registered objects, other model shapes, or a checkpoint not taken by :func:`snapshot`).
    Raised before anything is loaded. A ``ValueError`` too, as ``ckptd_client.restore`` raises
    for a part that does not fit."""


def snapshot(
    accelerator: Accelerator,
    client: Client,
    *,
    step: int,
    extra: dict[str, Any] | None = None,
    metric: float | None = None,
    rng: bool = True,
    pin: bool = False,
) -> PendingSnapshot:
    """Hand the accelerator's whole training state to ckptd, as ``accelerator.save_state`` would
    write it (see the module docstring), and return at once.

    Returns ``client.snapshot``'s handle: the state has been copied into shared memory and
    accepted by the daemon, training may continue and modify every tensor at once; the handle's
    ``wait()`` says when the step is durable (or raises why not: with the default non-strict
    client a daemon that is down fails the handle with
    :class:`~ckptd.errors.DaemonUnavailableError`). ``extra`` (a pickle-free dict: epoch, batch
    index, ...) comes back from :func:`restore`; ``metric`` feeds retention's ``keep_best``;
    ``pin=True`` protects the step from retention. Call it where ``save_state`` would be called:
    after an optimizer step (``accelerator.sync_gradients``), since gradients accumulated so far
    are not stored (neither does ``save_state`` store them). In a multi-process run, on every
    process. Raises :class:`~ckptd.errors.ConfigError` for DeepSpeed, Megatron-LM, FSDP and XLA,
    and :class:`~ckptd.errors.UnsupportedStateError` naming the key of a value (in a registered
    object, say) that cannot be stored without pickle."""
    return client.snapshot(
        _AcceleratorState(accelerator, f"job {client.job!r} step {step}", step, rng=rng),
        step=step,
        extra=extra,
        metric=metric,
        rng=rng,
        pin=pin,
    )


def restore(
    accelerator: Accelerator,
    client: Client | None = None,
    *,
    job: str | None = None,
    root: str | Path | None = None,
    step: int | str = "latest",
    from_rank: int | None = None,
    rng: bool = True,
    fallback: bool = False,
    wait_s: float = 60.0,
) -> dict[str, Any]:
    """Load a :func:`snapshot` into the accelerator's prepared and registered objects, its
    ``step`` and ``save_iteration``, and (``rng=True``) this process's RNG states; return the
    snapshot's ``extra`` with the step under ``"__step__"`` (as ``Client.restore`` does).

    Prepare and register the same objects, in the same order, as the run that took the snapshot,
    then call this before the first training step. Everything is checked before anything is
    loaded (:class:`AcceleratorMismatchError`). ``step`` is a step number or ``"latest"``.

    From ``client``'s job and root: as ``Client.restore``, it first waits (up to ``wait_s``)
    until the daemon has committed what it accepted of this job (with no daemon answering it
    restores what is on disk). Or from the files of ``job`` (under ``root``, found as
    ``ckptd_client.load`` finds it), without a client or daemon: e.g. a run that goes on under a
    new job name.

    ``from_rank=None``: this process restores its own part of a checkpoint taken at the same
    process count (with a client, all processes pick the same step, see ``Client.restore``).
    ``from_rank=r`` loads rank ``r``'s part into this process whatever the process count now (0
    for a single-process checkpoint): a 2-process DDP checkpoint into one process, say. Its
    ``"latest"`` is read by each process for itself (pass ``step=`` to be sure they agree), and
    every process gets rank ``r``'s RNG states too (``rng=False`` keeps its own). A job holding
    multi-rank checkpoints takes no single-process client: restore such a job into one process
    with ``job=`` and ``from_rank=``, and snapshot the new run under another job name.

    Raises :class:`~ckptd.errors.NotFoundError` when there is no such checkpoint,
    :class:`~ckptd.errors.RankLayoutError` for a checkpoint of another process count without
    ``from_rank`` (or a rank it does not have)."""
    if (client is None) == (job is None):
        raise TypeError("pass either a Client or job= (with root= if needed), not both")
    if client is not None and root is not None:
        raise TypeError("root= goes with job=; a Client restores from its own root")
    if fallback and from_rank is not None:
        raise ValueError("fallback=True is not available with from_rank=; pass step= instead")
    name = client.job if client is not None else str(job)
    target = _AcceleratorState(accelerator, f"job {name!r}", None, rng=rng)
    if from_rank is None:
        try:
            if client is not None:
                return client.restore(target, step=step, rng=rng, fallback=fallback, wait_s=wait_s)
            return api_restore(target, job=name, root=root, step=step, rng=rng, fallback=fallback)
        except RankLayoutError as exc:
            raise RankLayoutError(
                f"{exc} (to load one rank's part of a checkpoint taken at another process count: "
                "ckptd_client.accelerate.restore(accelerator, job=..., from_rank=R))"
            ) from exc
    if client is not None:
        root = client.root
        try:
            client.wait_for_daemon(wait_s)
        except DaemonUnavailableError as exc:
            # A daemon that is gone holds nothing in flight: what is on disk is all there is.
            log.warning("ckptd: restoring without asking the daemon about pending commits: %s", exc)
    state = load(name, step, root=root, rank=from_rank)
    out = apply(state, target, rng=rng, where=f"job {name!r} step {step} (rank {from_rank})")
    out.setdefault("__step__", target.loaded_step)
    return out


# ---- the accelerator's state ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    models: list[Any]
    optimizers: list[Any]
    schedulers: list[Any]
    dataloaders: list[Any]
    custom_objects: list[Any]


def _prepared(accelerator: Accelerator) -> _Prepared:
    """The objects ``save_state`` saves, read from the accelerator's attributes (no public
    accessor exists); refuses the setups whose state lives in another engine."""
    kind = accelerator.distributed_type
    if kind in _REFUSED:
        raise ConfigError(
            f"ckptd_client.accelerate does not cover {_REFUSED[kind]} (distributed_type "
            f"{kind}): its engine holds the model and optimizer state. Snapshot the state dicts "
            "with Client.snapshot(state=...) yourself, or for FSDP2 use "
            "torch.distributed.checkpoint with ckptd_client.dcp.CkptdStorageWriter"
        )
    lists = {}
    for name in ("_models", "_optimizers", "_schedulers", "_dataloaders", "_custom_objects"):
        value = getattr(accelerator, name, None)
        if not isinstance(value, list):
            raise ConfigError(
                f"this accelerate version keeps no {name} list on its Accelerator, which "
                "ckptd_client.accelerate reads (as save_state does); install accelerate 1.x "
                "(constraints.txt pins the tested release)"
            )
        lists[name.lstrip("_")] = list(value)
    return _Prepared(**lists)


def _unwrapped(accelerator: Accelerator, model: Any) -> torch.nn.Module:
    module: torch.nn.Module = accelerator.unwrap_model(model, keep_torch_compile=False)
    return module


class _AcceleratorState:
    """The accelerator's part of a snapshot, as one ``state_dict`` / ``load_state_dict`` object:
    handed to ``Client.snapshot`` / ``Client.restore`` as their model, so that everything is
    checked in ``load_state_dict`` before any of it is loaded. ``where`` names the checkpoint in
    messages; ``step`` is the snapshot's step (None when restoring); ``rng`` whether the device
    RNG is stored / restored (ckptd's ``rng`` covers the others)."""

    def __init__(
        self, accelerator: Accelerator, where: str, step: int | None, *, rng: bool
    ) -> None:
        self.accelerator = accelerator
        self.where = where
        self.step = step
        self.rng = rng
        self.prepared = _prepared(accelerator)
        self.loaded_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        acc, p = self.accelerator, self.prepared
        scaler = acc.scaler
        return {
            "format": FORMAT,
            "snapshot_step": self.step,
            "models": [_unwrapped(acc, m).state_dict() for m in p.models],
            "optimizers": [o.state_dict() for o in p.optimizers],
            "schedulers": [s.state_dict() for s in p.schedulers],
            "scaler": None if scaler is None else scaler.state_dict(),
            "dataloaders": [_dataloader_state(d) for d in p.dataloaders],
            "custom_objects": [o.state_dict() for o in p.custom_objects],
            "step": int(acc.step),
            "iteration": int(acc.save_iteration),
            "device_rng": _device_rng_state() if self.rng else None,
        }

    def load_state_dict(self, saved: Any, /) -> None:
        self._check(saved)
        acc, p = self.accelerator, self.prepared
        for model, state in zip(p.models, saved["models"], strict=True):
            _unwrapped(acc, model).load_state_dict(state)
        for opt, state in zip(p.optimizers, saved["optimizers"], strict=True):
            opt.load_state_dict(state)
        for sched, state in zip(p.schedulers, saved["schedulers"], strict=True):
            sched.load_state_dict(state)
        if saved["scaler"] is not None:
            acc.scaler.load_state_dict(saved["scaler"])
        for loader, state in zip(p.dataloaders, saved["dataloaders"], strict=True):
            _load_dataloader_state(loader, state)
        for obj, state in zip(p.custom_objects, saved["custom_objects"], strict=True):
            obj.load_state_dict(state)
        acc.step = saved["step"]
        acc.project_configuration.iteration = saved["iteration"]
        if self.rng:
            _set_device_rng_state(saved["device_rng"])
        self.loaded_step = saved["snapshot_step"]

    def _check(self, saved: Any) -> None:
        """Raise :class:`AcceleratorMismatchError` listing every way ``saved`` does not fit."""
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise AcceleratorMismatchError(
                f"{self.where}: this checkpoint was not taken by ckptd_client.accelerate.snapshot "
                "(its model state has no 'format': 'ckptd-accelerate/1' entry); load it with "
                "ckptd_client.restore(model, optimizer, ...) or ckptd_client.load(). Nothing was "
                "loaded"
            )
        where = self.where
        if self.step is None and isinstance(saved.get("snapshot_step"), int):
            where = f"{where} step {saved['snapshot_step']}"
        acc, p = self.accelerator, self.prepared
        problems = [
            f"{len(saved[key])} {what} saved, {len(have)} {verb} now"
            for key, what, verb, have in (
                ("models", "model(s)", "prepared", p.models),
                ("optimizers", "optimizer(s)", "prepared", p.optimizers),
                ("schedulers", "scheduler(s)", "prepared", p.schedulers),
                ("dataloaders", "dataloader(s)", "prepared", p.dataloaders),
                ("custom_objects", "registered object(s)", "registered", p.custom_objects),
            )
            if len(saved[key]) != len(have)
        ]
        if (saved["scaler"] is None) != (acc.scaler is None):
            problems.append(
                "a gradient scaler saved, none now (mixed_precision differs)"
                if acc.scaler is None
                else "no gradient scaler saved, one now (mixed_precision differs)"
            )
        if not problems:
            for i, (model, state) in enumerate(zip(p.models, saved["models"], strict=True)):
                problems += _model_problems(i, _unwrapped(acc, model).state_dict(), state)
            for i, (opt, state) in enumerate(zip(p.optimizers, saved["optimizers"], strict=True)):
                problems += _optimizer_problems(i, opt, state)
        if problems:
            raise AcceleratorMismatchError(
                f"{where} does not fit this accelerator: {'; '.join(problems)}. Nothing was "
                "loaded. Prepare (accelerator.prepare) and register "
                "(accelerator.register_for_checkpointing) the same objects, in the same order, as "
                "the run that took the snapshot, then restore"
            )


def _model_problems(index: int, have: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """How a model's saved state dict differs from its own: keys, then tensor shapes and dtypes
    (at most ``_SHOWN`` of each kind named)."""
    missing = [k for k in have if k not in saved]
    unexpected = [k for k in saved if k not in have]
    out = []
    if missing:
        out.append(f"model {index}: keys not in the checkpoint: {_names(missing)}")
    if unexpected:
        out.append(f"model {index}: keys in the checkpoint, not in the model: {_names(unexpected)}")
    differ = [
        f"model {index}: {key} is {old.dtype} {list(old.shape)} in the checkpoint, "
        f"{value.dtype} {list(value.shape)} in the model"
        for key, value in have.items()
        if isinstance(value, torch.Tensor)
        and isinstance(old := saved.get(key), torch.Tensor)
        and (value.shape, value.dtype) != (old.shape, old.dtype)
    ]
    if len(differ) > _SHOWN:
        differ[_SHOWN:] = [f"model {index}: {len(differ) - _SHOWN} more tensors differ"]
    return out + differ


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _optimizer_problems(index: int, opt: Any, saved: dict[str, Any]) -> list[str]:
    def sizes(groups: Any) -> list[int]:
        return [len(g.get("params", ())) for g in groups if isinstance(g, dict)]

    have = sizes(getattr(opt, "param_groups", []))
    had = sizes(saved.get("param_groups", []))
    if have == had:
        return []
    return [f"optimizer {index}: parameters per group {had} in the checkpoint, {have} now"]


# ---- dataloaders ---------------------------------------------------------------------------------


def _generators(loader: Any) -> list[torch.Generator | None]:
    sampler = loader.get_sampler() if hasattr(loader, "get_sampler") else None
    found = [
        getattr(loader, "generator", None),
        getattr(sampler, "generator", None),
        getattr(loader, "synchronized_generator", None),
    ]
    return [g if isinstance(g, torch.Generator) else None for g in found]


def _dataloader_state(loader: Any) -> dict[str, Any]:
    sampler = loader.get_sampler() if hasattr(loader, "get_sampler") else None
    seedable = None
    if isinstance(sampler, SeedableRandomSampler):
        seedable = {"epoch": int(sampler.epoch), "initial_seed": int(sampler.initial_seed)}
    stateful = None
    if getattr(loader, "use_stateful_dataloader", False):
        stateful = loader.state_dict()
    return {
        "iteration": int(getattr(loader, "iteration", 0)),
        "generators": {
            role: None if g is None else g.get_state()
            for role, g in zip(_GENERATOR_ROLES, _generators(loader), strict=True)
        },
        "seedable_sampler": seedable,
        "stateful": stateful,
    }


def _load_dataloader_state(loader: Any, state: dict[str, Any]) -> None:
    if hasattr(loader, "iteration"):
        loader.iteration = state["iteration"]
    for role, g in zip(_GENERATOR_ROLES, _generators(loader), strict=True):
        saved = state["generators"].get(role)
        if g is not None and saved is not None:
            g.set_state(saved)
    sampler = loader.get_sampler() if hasattr(loader, "get_sampler") else None
    if state["seedable_sampler"] is not None and isinstance(sampler, SeedableRandomSampler):
        sampler.initial_seed = state["seedable_sampler"]["initial_seed"]
        sampler.set_epoch(state["seedable_sampler"]["epoch"])
    if state["stateful"] is not None and getattr(loader, "use_stateful_dataloader", False):
        loader.load_state_dict(state["stateful"])


# ---- the RNG of a non-CUDA accelerator device ----------------------------------------------------


def _device_type() -> str | None:
    """The accelerator device type other than CUDA (ckptd's own ``rng`` covers CUDA)."""
    backend = getattr(torch, "accelerator", None)
    if backend is None or not backend.is_available():
        return None
    device = backend.current_accelerator()
    if device is None or device.type == "cuda":
        return None
    return str(device.type)


def _device_rng_state() -> dict[str, Any] | None:
    kind = _device_type()
    if kind is None:
        return None
    return {"device": kind, "state": torch.get_device_module(kind).get_rng_state()}


def _set_device_rng_state(saved: dict[str, Any] | None) -> None:
    if saved is None:
        return
    kind = _device_type()
    if kind != saved["device"]:
        log.warning(
            "ckptd: the checkpoint holds the RNG state of a %s device and this process runs on "
            "%s: that RNG state is not restored",
            saved["device"],
            kind or "no accelerator device",
        )
        return
    torch.get_device_module(kind).set_rng_state(saved["state"])
