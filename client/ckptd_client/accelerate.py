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
``classes``                 the class (module and qualified name) of each optimizer and scheduler
                            (the one the accelerator wraps) and of each registered object
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
as were saved (and a scaler exactly when one was saved), that every optimizer, scheduler and
registered object is of the saved class (a class defined in a script, module ``__main__``, is
matched by its name alone), that every model and every registered ``torch.nn.Module`` has the
saved keys, shapes and dtypes, every optimizer the saved parameter groups, every scheduler the
saved settings (its state dict's public keys) and every dataloader generator a state of the saved
size: else :class:`AcceleratorMismatchError` lists every difference and nothing was loaded (RNG
included). A checkpoint taken before the classes were stored has its classes unchecked.

The load itself is all or nothing: restore first copies the current state of every object it
loads into (model and optimizer tensors to the CPU: for that moment the process holds a second
copy of them), and if loading any of them raises (a registered object's own
``load_state_dict``, say, whose state the check cannot judge), puts every object already loaded
back as it was and raises :class:`AcceleratorMismatchError` with the original error as its
cause. ckptd's RNG states are set only after everything loaded.

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

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
    from accelerate.optimizer import AcceleratedOptimizer  # type: ignore[import-untyped]
    from accelerate.scheduler import AcceleratedScheduler  # type: ignore[import-untyped]
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
_CLASSED = (
    ("optimizers", "optimizer"),
    ("schedulers", "scheduler"),
    ("custom_objects", "registered object"),
)
"""The lists whose objects' classes a snapshot stores (under ``classes``), and their names in
messages."""
_ADVICE = (
    "Prepare (accelerator.prepare) and register (accelerator.register_for_checkpointing) the "
    "same objects, in the same order, as the run that took the snapshot, then restore"
)


class AcceleratorMismatchError(CkptdError, ValueError):
    """The checkpoint does not fit the accelerator it is restored into (other prepared or
    registered objects, other classes or shapes, or a checkpoint not taken by :func:`snapshot`),
    found before anything is loaded, or a load that raised, after which everything loaded before
    it was put back (the original error is the ``__cause__``). A ``ValueError`` too, as
    ``ckptd_client.restore`` raises for a part that does not fit."""


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
    loaded, and a load that raises is undone (:class:`AcceleratorMismatchError`, see the module
    docstring). ``step`` is a step number or ``"latest"``.

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
            "classes": {
                key: [list(_class_of(o)) for o in getattr(p, key)] for key, _what in _CLASSED
            },
        }

    def load_state_dict(self, saved: Any, /) -> None:
        self._check(saved)
        loads = self._loads(saved)  # the current state of each target is copied here
        done: list[_Load] = []
        try:
            for item in loads:
                done.append(item)
                item.load(item.saved)
        except BaseException as exc:
            failed = _roll_back(done)
            if not isinstance(exc, Exception):
                raise
            raise AcceleratorMismatchError(
                _load_failure(self._where(saved), done[-1].what, exc, failed)
            ) from exc
        self.loaded_step = saved["snapshot_step"]

    def _loads(self, saved: dict[str, Any]) -> list[_Load]:
        """Every load ``saved`` makes, in order, each with a copy of what its target holds now
        (taken before the first load, so that any failure to copy loads nothing)."""
        acc, p = self.accelerator, self.prepared
        out = []
        for i, (model, state) in enumerate(zip(p.models, saved["models"], strict=True)):
            module = _unwrapped(acc, model)
            out.append(
                _Load(
                    f"model {i}",
                    module.load_state_dict,
                    state,
                    _copied(module.state_dict(), to_cpu=True),
                )
            )
        for i, (opt, state) in enumerate(zip(p.optimizers, saved["optimizers"], strict=True)):
            out.append(
                _Load(
                    f"optimizer {i}",
                    opt.load_state_dict,
                    state,
                    _copied(opt.state_dict(), to_cpu=True),
                )
            )
        for i, (sched, state) in enumerate(zip(p.schedulers, saved["schedulers"], strict=True)):
            out.append(
                _Load(f"scheduler {i}", sched.load_state_dict, state, _copied(sched.state_dict()))
            )
        if saved["scaler"] is not None:
            scaler = acc.scaler
            out.append(
                _Load(
                    "the gradient scaler",
                    scaler.load_state_dict,
                    saved["scaler"],
                    _copied(scaler.state_dict()),
                )
            )
        for i, (loader, state) in enumerate(zip(p.dataloaders, saved["dataloaders"], strict=True)):
            out.append(
                _Load(
                    f"dataloader {i}",
                    partial(_load_dataloader_state, loader),
                    state,
                    _copied(_dataloader_state(loader)),
                )
            )
        for i, (obj, state) in enumerate(
            zip(p.custom_objects, saved["custom_objects"], strict=True)
        ):
            out.append(
                _Load(
                    f"registered object {i} ({_class_label(_class_of(obj))})",
                    obj.load_state_dict,
                    state,
                    _copied(obj.state_dict(), to_cpu=isinstance(obj, torch.nn.Module)),
                )
            )
        config = acc.project_configuration
        out += [
            _Load("accelerator.step", partial(setattr, acc, "step"), saved["step"], acc.step),
            _Load(
                "accelerator.save_iteration",
                partial(setattr, config, "iteration"),
                saved["iteration"],
                config.iteration,
            ),
        ]
        if self.rng:
            out.append(
                _Load(
                    "the device RNG",
                    _set_device_rng_state,
                    saved["device_rng"],
                    _device_rng_state(),
                )
            )
        return out

    def _where(self, saved: dict[str, Any]) -> str:
        if self.step is None and isinstance(saved.get("snapshot_step"), int):
            return f"{self.where} step {saved['snapshot_step']}"
        return self.where

    def _check(self, saved: Any) -> None:
        """Raise :class:`AcceleratorMismatchError` listing every way ``saved`` does not fit."""
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise AcceleratorMismatchError(
                f"{self.where}: this checkpoint was not taken by ckptd_client.accelerate.snapshot "
                "(its model state has no 'format': 'ckptd-accelerate/1' entry); load it with "
                "ckptd_client.restore(model, optimizer, ...) or ckptd_client.load(). Nothing was "
                "loaded"
            )
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
            problems += self._class_problems(saved)
            for i, (model, state) in enumerate(zip(p.models, saved["models"], strict=True)):
                problems += _module_problems(
                    f"model {i}", "the model", _unwrapped(acc, model).state_dict(), state
                )
            for i, (opt, state) in enumerate(zip(p.optimizers, saved["optimizers"], strict=True)):
                problems += _optimizer_problems(i, opt, state)
            for i, (loader, state) in enumerate(
                zip(p.dataloaders, saved["dataloaders"], strict=True)
            ):
                problems += _dataloader_problems(i, loader, state)
            for i, (obj, state) in enumerate(
                zip(p.custom_objects, saved["custom_objects"], strict=True)
            ):
                if isinstance(obj, torch.nn.Module) and isinstance(state, dict):
                    problems += _module_problems(
                        f"registered object {i}", "the object", obj.state_dict(), state
                    )
        if problems:
            raise AcceleratorMismatchError(
                f"{self._where(saved)} does not fit this accelerator: {'; '.join(problems)}. "
                f"Nothing was loaded. {_ADVICE}"
            )

    def _class_problems(self, saved: dict[str, Any]) -> list[str]:
        """Classes that differ from the saved ones (none known in a checkpoint taken before they
        were stored), then the public keys of each scheduler whose class is not known to differ
        (another scheduler class has other settings: ``load_state_dict`` would put them in its
        ``__dict__`` unchecked)."""
        classes = saved.get("classes")
        known = classes if isinstance(classes, dict) else {}
        out = []
        differ: set[tuple[str, int]] = set()
        for key, what in _CLASSED:
            names = known.get(key)
            if not isinstance(names, list):
                continue
            for i, (obj, name) in enumerate(zip(getattr(self.prepared, key), names, strict=False)):
                have = _class_of(obj)
                if not _same_class(have, name):
                    differ.add((key, i))
                    out.append(
                        f"{what} {i}: {_class_label(name)} in the checkpoint, "
                        f"{_class_label(have)} now"
                    )
        for i, (sched, state) in enumerate(
            zip(self.prepared.schedulers, saved["schedulers"], strict=True)
        ):
            if ("schedulers", i) not in differ:
                out += _scheduler_problems(i, sched, state)
        return out


@dataclass(frozen=True)
class _Load:
    """One object's part of a restore: ``load(saved)`` loads it, ``load(backup)`` undoes that."""

    what: str
    load: Callable[[Any], object]
    saved: Any
    backup: Any


def _roll_back(done: list[_Load]) -> list[str]:
    """Put back every object in ``done`` (the last one too: a load that raised may have loaded
    part of its state), newest first; return those that could not be, with why."""
    failed = []
    for item in reversed(done):
        try:
            item.load(item.backup)
        except Exception as exc:  # every other object is still put back
            failed.append(f"{item.what} ({type(exc).__name__}: {exc})")
    return failed


def _load_failure(where: str, what: str, exc: BaseException, failed: list[str]) -> str:
    head = (
        f"{where} does not fit this accelerator: loading {what} raised {type(exc).__name__}: {exc}"
    )
    if not failed:
        return (
            f"{head}; everything loaded before it was put back as it was. Nothing was loaded. "
            f"{_ADVICE}"
        )
    return (
        f"{head}; putting back what was loaded failed for {', '.join(failed)}: those objects may "
        "hold part of the checkpoint (everything else was put back). Build the accelerator and its "
        f"objects anew. {_ADVICE}"
    )


def _copied(state: Any, *, to_cpu: bool = False) -> Any:
    """A deep copy of a state dict that shares nothing with the object it came from: every tensor
    is detached and copied, to the CPU with ``to_cpu`` (for a module or a torch optimizer, whose
    ``load_state_dict`` copies values onto the parameters' devices: no second copy on the GPU);
    other objects' tensors stay on their devices, as their ``load_state_dict`` may keep what it
    is given."""
    memo: dict[int, Any] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            memo[id(value)] = (
                value.detach().to("cpu", copy=True) if to_cpu else value.detach().clone()
            )
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)

    visit(state)
    return copy.deepcopy(state, memo)


def _class_of(obj: Any) -> tuple[str, str]:
    """The class of ``obj``, or of the optimizer or scheduler accelerate wraps in it, as
    (module, qualified name)."""
    if isinstance(obj, AcceleratedOptimizer):
        obj = obj.optimizer
    elif isinstance(obj, AcceleratedScheduler):
        obj = obj.scheduler
    cls = type(obj)
    return cls.__module__, cls.__qualname__


def _same_class(have: tuple[str, str], saved: Any) -> bool:
    """``saved`` (a stored [module, qualified name]) names the class ``have``; a class of
    ``__main__`` (a script's) is matched by its qualified name, as the same script run another
    way (``python -m``, an entry point) defines it in another module."""
    if not (isinstance(saved, list | tuple) and len(saved) == 2):
        return True  # not a name this adapter stored: nothing to compare
    module, name = saved
    if have[1] != name:
        return False
    return have[0] == module or "__main__" in (have[0], module)


def _class_label(name: Any) -> str:
    return ".".join(str(part) for part in name)


def _module_problems(
    label: str, holder: str, have: dict[str, Any], saved: dict[str, Any]
) -> list[str]:
    """How a module's saved state dict differs from its own: keys, then tensor shapes and dtypes
    (at most ``_SHOWN`` of each kind named). ``holder`` names the module in messages."""
    missing = [k for k in have if k not in saved]
    unexpected = [k for k in saved if k not in have]
    out = []
    if missing:
        out.append(f"{label}: keys not in the checkpoint: {_names(missing)}")
    if unexpected:
        out.append(f"{label}: keys in the checkpoint, not in {holder}: {_names(unexpected)}")
    differ = [
        f"{label}: {key} is {old.dtype} {list(old.shape)} in the checkpoint, "
        f"{value.dtype} {list(value.shape)} in {holder}"
        for key, value in have.items()
        if isinstance(value, torch.Tensor)
        and isinstance(old := saved.get(key), torch.Tensor)
        and (value.shape, value.dtype) != (old.shape, old.dtype)
    ]
    if len(differ) > _SHOWN:
        differ[_SHOWN:] = [f"{label}: {len(differ) - _SHOWN} more tensors differ"]
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


_SCHEDULER_FLAGS = frozenset({"verbose"})
"""Public keys of a torch scheduler's state dict that torch releases add or drop (``verbose``,
deprecated in torch 2.2): not compared."""


def _scheduler_problems(index: int, sched: Any, saved: Any) -> list[str]:
    """The settings of another scheduler class: public keys (not ``_``-prefixed bookkeeping,
    which torch releases add and drop) that only one side has."""
    if not isinstance(saved, dict):
        return []

    def public(state: dict[str, Any]) -> set[str]:
        return {k for k in state if not k.startswith("_") and k not in _SCHEDULER_FLAGS}

    have, had = public(sched.state_dict()), public(saved)
    out = []
    if had - have:
        out.append(
            f"scheduler {index}: settings in the checkpoint, not in the scheduler: "
            f"{_names(sorted(had - have))}"
        )
    if have - had:
        out.append(
            f"scheduler {index}: settings not in the checkpoint: {_names(sorted(have - had))}"
        )
    return out


# ---- dataloaders ---------------------------------------------------------------------------------


def _generators(loader: Any) -> list[torch.Generator | None]:
    sampler = loader.get_sampler() if hasattr(loader, "get_sampler") else None
    found = [
        getattr(loader, "generator", None),
        getattr(sampler, "generator", None),
        getattr(loader, "synchronized_generator", None),
    ]
    return [g if isinstance(g, torch.Generator) else None for g in found]


def _dataloader_problems(index: int, loader: Any, saved: Any) -> list[str]:
    """Generators whose saved state is of another size (a generator of another device type):
    ``set_state`` would refuse it."""
    generators = saved.get("generators") if isinstance(saved, dict) else None
    if not isinstance(generators, dict):
        return []
    out = []
    for role, g in zip(_GENERATOR_ROLES, _generators(loader), strict=True):
        old = generators.get(role)
        if g is None or not isinstance(old, torch.Tensor):
            continue
        now = g.get_state()
        if (now.shape, now.dtype) != (old.shape, old.dtype):
            out.append(
                f"dataloader {index}: the {role} generator's state is {old.dtype} "
                f"{list(old.shape)} in the checkpoint, {now.dtype} {list(now.shape)} now (a "
                f"generator on {g.device} now)"
            )
    return out


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
