"""Hugging Face ``transformers.Trainer`` through ckptd: ``callbacks=[CkptdCallback("run")]``.

:class:`CkptdCallback` takes over the Trainer's checkpoints. ``TrainingArguments`` keep deciding
*when* to save (``save_strategy``, ``save_steps``, the save at the last step); at each such step
the callback hands the model, optimizer, LR scheduler, ``GradScaler``, RNG states and the
``TrainerState`` to the ckptd daemon (one copy into shared memory) and clears
``control.should_save``, so the Trainer's own blocking write (``checkpoint-N`` folders) never
happens. :func:`materialize` writes a committed step back out as a ``checkpoint-N`` folder that
``trainer.train(resume_from_checkpoint=...)`` (or ``from_pretrained``) reads.

Where the snapshot is taken (transformers 5.x; ``Trainer._inner_training_loop`` and
``_maybe_log_save_evaluate``). After each optimizer step the Trainer calls ``on_step_end`` (the
``DefaultFlowCallback``, which comes before every user callback, sets ``should_log``,
``should_evaluate`` and ``should_save`` there), then logs (``on_log``), evaluates
(``on_log`` with the metrics, then ``on_evaluate``; the best metric is updated right after
``on_evaluate`` returns), and finally writes its checkpoint if ``should_save`` is still set. At the
end of an epoch the same runs after ``on_epoch_end``. So the callback, in ``on_step_end`` /
``on_epoch_end``, *claims* a save the Trainer decided on (clears ``should_save``) and takes the
snapshot at the last hook before the Trainer would have written, when the state is what the
Trainer would have written:

==========================  ===========================================================
the step also ...           snapshot taken in
==========================  ===========================================================
evaluates                   the next hook (``on_step_begin``, ``on_epoch_begin``,
                            ``on_epoch_end``, ``on_train_end``): the TrainerState, RNG and
                            metrics are captured at the (last dataset's) ``on_evaluate``,
                            model/optimizer/scheduler after the Trainer stepped a plateau
                            scheduler; ``metric_for_best_model`` becomes the ckptd ``metric``
logs (no evaluation)        ``on_log``: the step's log entry is in ``log_history``
neither                     ``on_step_end`` / ``on_epoch_end`` itself
==========================  ===========================================================

A claimed save whose hook never came (a log the Trainer skipped) is taken at the next hook
(``on_step_begin``, ``on_epoch_end``, ``on_train_end``), before anything trains further.

What a snapshot holds: ``model`` (the model's ``state_dict()``; tied weights stay tied),
``optimizer``, ``scheduler``, ``scaler`` (the ``GradScaler`` accelerate attached to the optimizer,
if any), ``rng`` (torch, numpy, Python, CUDA) and ``extra["hf"]``: ``trainer_state`` (the
``TrainerState`` as the dict ``trainer_state.json`` holds), ``model_config`` (``config.json``'s
text, when the model has a config), ``transformers`` (the version) and, with CUDA, ``cuda_rng``
as the Trainer saves it. ``save_only_model=True`` leaves out the optimizer, scheduler, scaler and
RNG, as the Trainer does.

Retention, unless ``retention=`` is given: ``save_total_limit=N`` becomes ``keep_last=N``; when the
Trainer tracks a best model (``metric_for_best_model`` set, which ``load_best_model_at_end``
implies) it becomes ``keep_last=N`` and ``keep_best=1`` with ``mode`` from ``greater_is_better``:
the Trainer keeps N folders, the newest and the best among them; ckptd keeps the same, plus one
more (N + 1) when the best is older than the N newest. ckptd
always keeps the newest commit and the highest step, so no limit ever leaves zero checkpoints.
Without ``save_total_limit`` the daemon's own policy applies (none configured: keep everything,
like the Trainer).

At ``on_train_end`` the callback waits until every snapshot it handed off is committed or
failed, and closes its client. A snapshot that failed (a full disk, a daemon that died) raises
there, out of ``trainer.train()``, as the error type the daemon reported, naming the steps
(skipped snapshots, ``on_full="skip"``, are only logged, by the client). With
``load_best_model_at_end`` the Trainer itself finds no best checkpoint folder and loads nothing
(``state.best_model_checkpoint`` stays None); the callback then loads the model weights of
``state.best_global_step`` from ckptd into the Trainer's model.

Processes: the Trainer calls callbacks on every process. Each process makes its own client
(rank and world size from ``torch.distributed``) and snapshots its own state, and ckptd commits a
step once every rank's part is durable (DDP). DeepSpeed and FSDP keep state the callback cannot
take (an engine's, flattened shards) and are refused. ``save_strategy="best"`` is refused too: the
Trainer decides to save only after the last callback hook ran, so its write cannot be stopped.

Known differences: ``total_flos`` in the stored ``TrainerState`` lacks the FLOPs since the last
log entry (the Trainer adds them when it writes; a callback cannot reach ``current_flos``). The
best model is loaded in this callback's ``on_train_end``, after the ``on_train_end`` of
``report_to`` integrations that came before it (they export the last weights). A callback placed
after this one that sets ``control.should_save`` brings back the Trainer's own write. When
``on_train_end`` raises (failed snapshots), later callbacks' ``on_train_end`` does not run. A
``train()`` that raised leaves its client open; the next ``on_train_begin`` closes it (logging its
uncommitted steps) and makes a new one from the current arguments.

Thread safety: the Trainer's thread calls every hook; a callback serves one ``train()`` at a
time (its client is made at ``on_train_begin`` and closed at ``on_train_end``).
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Literal

import torch

from ckptd.errors import ConfigError, NotFoundError
from ckptd.format.fsutil import fsync_dir, os_error
from ckptd.format.skeleton import shard_info
from ckptd.format.store import Store, validate_job_name
from ckptd.locate import store_root
from ckptd_client.api import load
from ckptd_client.client import Client
from ckptd_client.pending import PendingSnapshot
from ckptd_client.state import apply, collect, rng_state

try:
    import transformers
    from safetensors.torch import save as safetensors_bytes
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer import (
        OPTIMIZER_NAME,
        SCALER_NAME,
        SCHEDULER_NAME,
        TRAINER_STATE_NAME,
    )
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy
    from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ckptd_client.hf needs transformers (>= 4.50) and safetensors: pip install 'ckptd[hf]' "
        f"(importing them failed: {exc})"
    ) from exc

log = logging.getLogger("ckptd_client.hf")

_Waiting = Literal["log", "evaluate", "evaluated"]
_TRACKS_BEST = (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
"""The save strategies under which the Trainer records ``best_global_step``."""


def retention_for(args: TrainingArguments) -> dict[str, Any] | None:
    """The ckptd retention policy that stands for ``args.save_total_limit`` (None: no limit, the
    daemon's own policy applies). See the module docstring."""
    limit = args.save_total_limit
    if limit is None or limit <= 0:
        return None
    if args.metric_for_best_model is None:
        return {"keep_last": limit}
    return {
        "keep_last": limit,
        "keep_best": 1,
        "mode": "max" if args.greater_is_better else "min",
    }


class CkptdCallback(TrainerCallback):
    """Checkpoint a ``transformers.Trainer`` through the ckptd daemon (see the module docstring).

    ``job``: the ckptd job the run's checkpoints go to; the checkpoint of global step N is ckptd
    step N. ``root`` / ``socket`` and every other keyword (``retention``, ``strict``, ``slots``,
    ``on_full``, ``allow_pickle``, ``timeout_s``, ...) go to :class:`~ckptd_client.Client`, which
    is made at ``on_train_begin`` (``retention`` defaults to :func:`retention_for` the
    arguments). With ``strict=True`` a failed hand-off raises out of ``trainer.train()`` at once;
    by default it is logged and raised at ``on_train_end``.
    """

    def __init__(
        self,
        job: str,
        *,
        root: str | Path | None = None,
        socket: str | Path | None = None,
        **client_options: Any,
    ) -> None:
        self.job = validate_job_name(job)
        self.root = root
        self.socket = socket
        # A misspelled option fails here, where it was written, not at the start of training.
        inspect.signature(Client).bind(job, root=root, socket=socket, **client_options)
        self.client_options = client_options
        self.client: Client | None = None
        self._due: tuple[int, _Waiting] | None = None  # a claimed save, not yet snapshotted
        self._captured: _Captured | None = None  # what the due save's last hook saw
        self._handles: list[PendingSnapshot] = []  # pending, or failed: reported at train end

    # ---- hooks -----------------------------------------------------------------------------

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _check_args(args)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _check_args(args)
        if args.save_strategy == SaveStrategy.NO:
            log.warning(
                "ckptd: save_strategy='no': CkptdCallback(%r) will snapshot nothing", self.job
            )
        self._due = None
        self._captured = None
        self._close_leftover()
        options = dict(self.client_options)
        options.setdefault("retention", retention_for(args))
        self.client = Client(self.job, root=self.root, socket=self.socket, **options)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._take_due(args, state, control, kwargs)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._take_due(args, state, control, kwargs)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._claim(args, state, control, kwargs)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._take_due(args, state, control, kwargs)
        self._claim(args, state, control, kwargs)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # While an evaluation is due, this is the training loss or the evaluation's own log
        # entry: on_evaluate comes next.
        if self._due is not None and self._due[1] == "log" and not control.should_evaluate:
            self._snapshot(args, state, control, kwargs, metrics=None)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # Not the snapshot yet: the Trainer steps a plateau scheduler (ReduceLROnPlateau,
        # GreedyLR) after this hook returns, and a dict of evaluation datasets calls it once per
        # dataset. What only this hook sees (the TrainerState with the best metric update the
        # Trainer applies next, the control, the RNG) is captured here, for the last dataset;
        # model, optimizer and scheduler are taken at the next hook, before anything trains.
        if self._due is None or self._due[1] == "log":
            return
        merged = dict(self._captured.metrics) if self._captured is not None else {}
        merged.update(metrics or {})
        metric = _metric(args, merged)
        self._captured = _Captured(
            metrics=merged,
            metric=metric,
            trainer_state=_trainer_state(args, state, control, metric),
            rng=_rng_now(args),
        )
        self._due = (state.global_step, "evaluated")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._take_due(args, state, control, kwargs)
        client, self.client = self.client, None
        handles, self._handles = self._handles, []
        if client is None:
            return
        client.close(timeout=None)  # every handle is settled when this returns
        failed = [h for h in handles if h.error is not None and not h.skipped]
        if failed:
            first = failed[0].error
            assert first is not None
            steps = ", ".join(str(h.step) for h in failed)
            raise type(first)(
                f"ckptd: {len(failed)} snapshot(s) of job {self.job!r} were not committed "
                f"(step(s) {steps}); the first error: {first}. Training itself finished: the "
                "model in memory is the final one (trainer.save_model(DIR) writes it out)"
            ) from first
        best = state.best_global_step
        if args.load_best_model_at_end and best:
            self._load_best(kwargs.get("model"), best, state.best_metric, client.root)

    # ---- internals -------------------------------------------------------------------------

    def _close_leftover(self) -> None:
        """Close the client a ``train()`` that raised left open (its ``on_train_end`` never
        ran), logging the snapshots of that run that were not committed."""
        client, self.client = self.client, None
        handles, self._handles = self._handles, []
        if client is None:
            return
        try:
            client.close(timeout=None)
        except Exception as exc:  # the old run's client: its failure must not stop this run
            log.warning("ckptd: closing the client of an earlier train() failed: %s", exc)
        for handle in handles:
            if handle.error is not None and not handle.skipped:
                log.warning(
                    "ckptd: job %r step %d of an earlier train() that raised was not committed: %s",
                    self.job,
                    handle.step,
                    handle.error,
                )

    def _claim(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        kwargs: dict[str, Any],
    ) -> None:
        """Take over the save the Trainer decided on for this step, if any."""
        if not control.should_save:
            return
        control.should_save = False
        self._captured = None
        if control.should_evaluate:
            self._due = (state.global_step, "evaluate")
        elif control.should_log:
            self._due = (state.global_step, "log")
        else:
            self._snapshot(args, state, control, kwargs, metrics=None)

    def _take_due(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        kwargs: dict[str, Any],
    ) -> None:
        if self._due is not None:
            if self._due[1] != "evaluated":
                log.debug("ckptd: step %d: the awaited %s did not come", *self._due)
            self._snapshot(args, state, control, kwargs, metrics=None)

    def _snapshot(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        kwargs: dict[str, Any],
        metrics: dict[str, float] | None,
    ) -> None:
        self._due = None
        captured, self._captured = self._captured, None
        client = self.client
        if client is None:
            raise RuntimeError(
                f"CkptdCallback({self.job!r}) was asked to save before on_train_begin; add it to "
                "the Trainer before train() (callbacks=[...] or trainer.add_callback)"
            )
        model = kwargs.get("model")
        if model is None:
            raise RuntimeError("the Trainer passed no model to CkptdCallback")
        if captured is not None:
            metric, trainer_state, rng = captured.metric, captured.trainer_state, captured.rng
        else:
            metric = _metric(args, metrics)
            trainer_state = _trainer_state(args, state, control, metric)
            rng = _rng_now(args)
        hf: dict[str, Any] = {
            "trainer_state": trainer_state,
            "model_config": _config_json(model),
            "transformers": transformers.__version__,
        }
        optimizer = scheduler = scaler = None
        if rng is not None:
            optimizer = kwargs.get("optimizer")
            scheduler = kwargs.get("lr_scheduler")
            scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer
            if rng[1] is not None:
                hf["cuda_rng"] = rng[1]
        taken = collect(model, optimizer, scheduler=scheduler, scaler=scaler, rng=False)
        if rng is not None:
            taken["rng"] = rng[0]
        taken["extra"] = {"hf": hf}
        handle = client.snapshot(step=state.global_step, state=taken, metric=metric, rng=False)
        self._handles = [h for h in self._handles if not h.done() or h.error is not None]
        self._handles.append(handle)

    def _load_best(self, model: Any, step: int, metric: float | None, root: Path) -> None:
        if model is None:
            raise RuntimeError("the Trainer passed no model to CkptdCallback")
        try:
            saved = load(self.job, step, root=root)
        except NotFoundError as exc:
            log.warning(
                "ckptd: load_best_model_at_end: the best step %d (metric %s) is not in ckptd "
                "(%s); the model keeps the weights of the last step. Save at every evaluation "
                "step (save_steps = eval_steps) and let retention keep the best "
                "(save_total_limit, or retention={'keep_best': 1, ...})",
                step,
                metric,
                exc,
            )
            return
        apply(saved, model, rng=False, where=f"job {self.job!r} step {step}")
        log.info("ckptd: loaded the best model: %s step %d (metric %s)", self.job, step, metric)


_Rng = tuple[dict[str, Any], Any]
"""The RNG states (``ckptd_client.state.rng_state``) and the CUDA state as the Trainer saves it."""


@dataclasses.dataclass
class _Captured:
    """What a save step's evaluation hooks saw, for the snapshot taken at the next hook."""

    metrics: dict[str, float]  # every evaluation dataset's so far, merged as the Trainer does
    metric: float | None
    trainer_state: dict[str, Any]
    rng: _Rng | None  # None: save_only_model


def _rng_now(args: TrainingArguments) -> _Rng | None:
    """The RNG states a full checkpoint holds now (None with ``save_only_model``)."""
    if args.save_only_model:
        return None
    cuda = None
    if torch.cuda.is_available():
        multi = args.world_size > 1
        cuda = torch.cuda.random.get_rng_state_all() if multi else torch.cuda.get_rng_state()
    return rng_state(), cuda


def _check_args(args: TrainingArguments) -> None:
    """Refuse what the callback cannot take over (see the module docstring)."""
    if args.save_strategy == SaveStrategy.BEST:
        raise ConfigError(
            "TrainingArguments(save_strategy='best') cannot be used with "
            "ckptd_client.hf.CkptdCallback: the Trainer decides to save only after an "
            "evaluation found a new best metric, after the last callback hook, so its own "
            "blocking checkpoint write cannot be replaced. Use save_strategy='steps' with "
            "save_steps = eval_steps, metric_for_best_model and save_total_limit (ckptd keeps "
            "the best step, and with load_best_model_at_end=True the callback loads it at the end)"
        )
    if args.deepspeed:
        raise ConfigError(
            "ckptd_client.hf.CkptdCallback does not cover DeepSpeed (the engine holds the "
            "optimizer and model state); keep the Trainer's own checkpoints for DeepSpeed runs"
        )
    if args.fsdp:
        raise ConfigError(
            "ckptd_client.hf.CkptdCallback does not cover the Trainer's FSDP (fsdp=...): its "
            "checkpoints are written by accelerate's FSDP helpers; keep the Trainer's own "
            "checkpoints, or use ckptd_client.dcp with your own loop"
        )


def _metric(args: TrainingArguments, metrics: dict[str, float] | None) -> float | None:
    """The evaluation metric the Trainer judges the best model by (``metric_for_best_model``,
    default ``loss``), as the Trainer names it (``eval_`` prefix), when it is a number."""
    if not metrics:
        return None
    name = args.metric_for_best_model or "loss"
    value = metrics.get(name if name.startswith("eval_") else f"eval_{name}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _trainer_state(
    args: TrainingArguments, state: TrainerState, control: TrainerControl, metric: float | None
) -> dict[str, Any]:
    """The ``TrainerState`` as ``Trainer._save_checkpoint`` would write it now: the dict of
    ``trainer_state.json``, with the control's state as of the save and the best metric and step
    updated by this evaluation, as ``Trainer._determine_best_metric`` does right after
    ``on_evaluate``. Other exportable callbacks' states are as of the start of training (the
    Trainer does not hand its callbacks to a callback)."""
    doc: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(state)))
    callbacks = doc.get("stateful_callbacks")
    if isinstance(callbacks, dict) and isinstance(callbacks.get("TrainerControl"), dict):
        saved = control.state()
        saved["args"]["should_save"] = True  # what the Trainer's own save records
        callbacks["TrainerControl"] = saved
    if metric is not None and args.metric_for_best_model is not None:
        greater = bool(args.greater_is_better)
        best = doc.get("best_metric")
        if best is None:
            best = doc["best_metric"] = -math.inf if greater else math.inf
        if (metric > best) if greater else (metric < best):
            doc["best_metric"] = metric
            if args.save_strategy in _TRACKS_BEST:
                doc["best_global_step"] = state.global_step
    return doc


def _config_json(model: Any) -> str | None:
    config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    return str(to_json()) if callable(to_json) else None


# ---- materialize -------------------------------------------------------------------------------


def materialize(
    job: str,
    output_dir: str | Path,
    *,
    step: int | str = "latest",
    root: str | Path | None = None,
) -> Path:
    """Write committed ``step`` of ``job`` out as ``output_dir/checkpoint-<step>`` in the layout
    ``Trainer.train(resume_from_checkpoint=...)`` reads; return that directory.

    Files: ``model.safetensors`` (every key of the model's state dict; tied weights are written
    as copies, since safetensors refuses shared tensors and the Trainer's loader then finds no
    key missing), ``config.json`` (when the snapshot recorded the model's config: the folder then
    also loads with ``from_pretrained``), ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` (when
    the run had a ``GradScaler``), ``rng_state.pth`` (``rng_state_<rank>.pth`` for each rank of
    a multi-rank step) and ``trainer_state.json``. Tokenizer files and ``training_args.bin`` are
    not written (resuming does not read them).

    Reads only the store (:func:`ckptd_client.load`, no daemon needed; ``root`` as there). The
    folder appears whole or not at all: the files are written and fsynced in a hidden temporary
    folder beside it, which is then renamed. A ``checkpoint-<step>`` that already exists is never
    replaced: :class:`FileExistsError`. A job or step that does not exist raises
    :class:`~ckptd.errors.NotFoundError`; a step not written by :class:`CkptdCallback` (no
    ``TrainerState``) or holding sharded tensors (FSDP, tensor parallel) raises
    :class:`ValueError`.
    """
    validate_job_name(job)
    store = Store(store_root(root))
    resolved = store.resolve_step(job, step)
    world_size = store.read_manifest(job, resolved).world_size
    out = Path(output_dir)
    dest = out / f"{PREFIX_CHECKPOINT_DIR}-{resolved}"
    _refuse_existing(dest)
    where = f"job {job!r} step {resolved}"
    state = load(job, resolved, root=store.root, rank=0)
    files = _checkpoint_files(state, where)
    if not isinstance(state, dict) or "rng" not in state:
        log.warning(
            "ckptd: %s was saved with save_only_model=True: %s holds the model and "
            "trainer_state.json but no optimizer, scheduler or RNG state; from_pretrained loads "
            "it, trainer.train(resume_from_checkpoint=...) cannot resume from it",
            where,
            dest,
        )
    elif world_size == 1:
        files["rng_state.pth"] = _torch_file(_hf_rng(state, where))
    else:
        for rank in range(world_size):
            part = state if rank == 0 else load(job, resolved, root=store.root, rank=rank)
            files[f"rng_state_{rank}.pth"] = _torch_file(_hf_rng(part, where))
    _write_folder(out, dest, files)
    return dest


_Writer = Callable[[IO[bytes]], None]


def _checkpoint_files(state: Any, where: str) -> dict[str, _Writer]:
    """The files of a ``checkpoint-N`` folder for ``state`` (rank 0's), but the RNG files."""
    hf = state.get("extra", {}).get("hf") if isinstance(state, dict) else None
    if not isinstance(hf, dict) or not isinstance(hf.get("trainer_state"), dict):
        raise ValueError(
            f"{where} was not written by ckptd_client.hf.CkptdCallback (it holds no "
            "extra['hf']['trainer_state']); read it with ckptd_client.load() instead"
        )
    files: dict[str, _Writer] = {SAFE_WEIGHTS_NAME: _weights_file(state["model"], where)}
    config = hf.get("model_config")
    if isinstance(config, str):
        files[CONFIG_NAME] = _text_file(config)
    for key, name in (
        ("optimizer", OPTIMIZER_NAME),
        ("scheduler", SCHEDULER_NAME),
        ("scaler", SCALER_NAME),
    ):
        if key in state:
            files[name] = _torch_file(state[key])
    text = json.dumps(hf["trainer_state"], indent=2, sort_keys=True) + "\n"  # as the Trainer
    files[TRAINER_STATE_NAME] = _text_file(text)
    return files


def _weights_file(model_state: Any, where: str) -> _Writer:
    """``model.safetensors`` of a model state dict: shared tensors (tied weights) copied."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in model_state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{where}: model.{key} is a {type(value).__name__}, not a tensor; safetensors "
                "holds tensors only"
            )
        info = shard_info(value)
        if info is not None and tuple(value.shape) != info.shape:
            raise ValueError(
                f"{where}: model.{key} is one rank's shard of a sharded tensor; a checkpoint "
                "folder needs whole tensors: load it with torch.distributed.checkpoint.load and "
                "ckptd_client.dcp.CkptdStorageReader"
            )
        pointer = value.untyped_storage().data_ptr()
        shared = pointer in storages and value.numel() > 0
        storages.add(pointer)
        tensors[str(key)] = value.clone() if shared else value.contiguous()
    data = safetensors_bytes(tensors, metadata={"format": "pt"})

    def write(f: IO[bytes]) -> None:
        f.write(data)

    return write


def _hf_rng(state: Any, where: str) -> dict[str, Any]:
    """The RNG states in the Trainer's ``rng_state.pth`` layout (``python``, ``numpy``, ``cpu``,
    ``cuda``)."""
    rng = state.get("rng") if isinstance(state, dict) else None
    if not isinstance(rng, dict) or "torch" not in rng:
        raise ValueError(
            f"{where} holds no RNG state (saved with save_only_model=True?); the Trainer cannot "
            "resume from it"
        )
    out: dict[str, Any] = {"python": rng["python"], "numpy": rng["numpy"], "cpu": rng["torch"]}
    cuda = state.get("extra", {}).get("hf", {}).get("cuda_rng")
    if cuda is not None:
        out["cuda"] = cuda
    return out


def _torch_file(value: Any) -> _Writer:
    def write(f: IO[bytes]) -> None:
        torch.save(value, f)

    return write


def _text_file(text: str) -> _Writer:
    def write(f: IO[bytes]) -> None:
        f.write(text.encode())

    return write


def _exists(dest: Path) -> FileExistsError:
    return FileExistsError(
        errno.EEXIST,
        f"{dest} already exists; materialize never replaces a checkpoint folder: remove it or "
        "choose another output_dir",
        str(dest),
    )


def _refuse_existing(dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        raise _exists(dest)


def _write_folder(out: Path, dest: Path, files: dict[str, _Writer]) -> None:
    """Write ``files`` into a hidden folder in ``out``, fsync them, then rename it to ``dest``
    (which must not exist) and fsync ``out``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, "create directory", out) from exc
    tmp = out / f".{dest.name}.{uuid.uuid4().hex[:12]}.ckptd-tmp"
    action, path = "create directory", tmp
    try:
        tmp.mkdir()
        for name, write in files.items():
            action, path = "write", tmp / name
            with path.open("xb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        action, path = "rename into place", dest
        _refuse_existing(dest)
        tmp.rename(dest)  # fails on a folder that appeared meanwhile (non-empty)
        fsync_dir(out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, FileExistsError):
            raise
        if isinstance(exc, OSError) and exc.errno == errno.ENOTEMPTY:
            raise _exists(dest) from exc
        if isinstance(exc, OSError):
            raise os_error(exc, action, path) from exc
        raise


__all__ = ["CkptdCallback", "materialize", "retention_for"]
