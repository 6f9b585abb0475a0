"""Hugging Face Trainer runs for ``test_hf.py``, in processes of their own.

``python -m tests.integration.adapters.hf_run {train|resume} OUT SOCKET ROOT [SOCKET2 ROOT2]``.
Every run trains a tiny GPT-2 (``GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64,
n_positions=32)``, dropout on) on synthetic tokens on the CPU, one thread, fixed seeds, Adam at a
constant LR (so a 6-step run and an 8-step run take the same first 6 steps). Each scenario writes
``OUT/<scenario>.json`` (and weights as ``OUT/<scenario>-final.pt``); the test compares them.
Both wait for ``OUT/daemons.ready`` before the first run (the daemons start meanwhile).

``train`` runs, in order:

* ``save6``: ``CkptdCallback("hf-main")``, ``save_steps=2``, ``logging_steps=2``, 6 steps; then
  writes ``OUT/save6.done``;
* ``best``: ``CkptdCallback("hf-best")`` with evaluation every 2 steps, ``load_best_model_at_end``,
  ``metric_for_best_model="eval_loss"``, ``save_total_limit=1``, 6 steps on a stream whose first
  2 steps are like the evaluation set and the rest unlike it (the best evaluation is step 2);
* ``refuse``: ``save_strategy="best"``, with the callback given to the Trainer and added later;
* ``down``: the callback pointed at a socket no daemon serves;
* ``lost``: saves through the second daemon (``SOCKET2``, ``ROOT2``), which is stopped after
  step 2 committed.

``resume`` runs ``full8`` (8 steps, no callback, no checkpoints), waits for ``OUT/save6.done``,
then ``resume`` (``materialize("hf-main")``, then 8 steps with ``resume_from_checkpoint`` and the
callback), then ``materialize_errors``, then ``example`` (``examples/hf_trainer.py``). The test
runs both with ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1``: nothing is downloaded (the
model is built from its config).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import runpy
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)

from ckptd_client import list_checkpoints
from ckptd_client.hf import CkptdCallback, materialize
from tests.integration.daemon_fixtures import query, wait_until

REPO = Path(__file__).resolve().parents[3]
MAIN_JOB, BEST_JOB, LOST_JOB = "hf-main", "hf-best", "hf-lost"
DIFF_JOB, RERUN_JOB = "hf-diff", "hf-rerun"
SEQ, BATCH, VOCAB = 16, 4, 64


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``n`` random sequences (seeded), each its own label."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def constant(token: int) -> dict[str, torch.Tensor]:
    ids = torch.full((SEQ,), token)
    return {"input_ids": ids, "labels": ids}


class Phases(torch.utils.data.IterableDataset[dict[str, torch.Tensor]]):
    """Two steps' worth of sequences of token 5 (what the evaluation set holds), then counting
    sequences (each token the previous one + 1), which teach the opposite of repeating a token:
    the evaluation loss falls at step 2 and rises after it."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(100 * BATCH):
            if i < 2 * BATCH:
                yield constant(5)
            else:
                ids = (torch.arange(SEQ) + 7 * i) % VOCAB
                yield {"input_ids": ids, "labels": ids}


def model() -> GPT2LMHeadModel:
    set_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def arguments(out: Path, **kwargs: Any) -> TrainingArguments:
    base: dict[str, Any] = {
        "per_device_train_batch_size": BATCH,
        "per_device_eval_batch_size": BATCH,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "logging_steps": 2,
        "save_steps": 2,
        "use_cpu": True,
        "report_to": [],
        "seed": 0,
        "disable_tqdm": True,
    }
    base.update(kwargs)
    return TrainingArguments(output_dir=str(out), **base)


class Warnings(logging.Handler):
    """The warnings transformers logs while a run is on."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def train(trainer: Trainer, **kwargs: Any) -> list[str]:
    """``trainer.train(**kwargs)``; return what transformers warned about meanwhile."""
    handler = Warnings()
    logging.getLogger("transformers").addHandler(handler)
    try:
        trainer.train(**kwargs)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    return handler.messages


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    model = trainer.model
    assert model is not None
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint_folders(path: Path) -> list[str]:
    return (
        sorted(p.name for p in path.iterdir() if p.name.startswith("checkpoint"))
        if path.is_dir()
        else []
    )


def steps(job: str, root: str | Path) -> list[int]:
    return [m.step for m in list_checkpoints(job, root=root)]


def failure(call: Callable[[], object]) -> dict[str, Any]:
    """The exception ``call`` raised, as type name and message (None when it raised nothing)."""
    try:
        call()
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None, "message": None}


# ---- process A ---------------------------------------------------------------------------------


def save6(out: Path, socket: str, root: str) -> dict[str, Any]:
    run = out / "save6"
    callback = CkptdCallback(MAIN_JOB, socket=socket, root=root)
    trainer = Trainer(
        model(), arguments(run, max_steps=6), train_dataset=Tokens(64, 1), callbacks=[callback]
    )
    warned = train(trainer)
    torch.save(weights(trainer), out / "save6-final.pt")
    return {
        "folders": checkpoint_folders(run),
        "steps": [m.step for m in list_checkpoints(MAIN_JOB, root=root)],
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "client_closed": callback.client is None,
        "warnings": warned,
    }


def best(out: Path, socket: str, root: str) -> dict[str, Any]:
    run = out / "best"
    args = arguments(
        run,
        max_steps=6,
        learning_rate=3e-2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        save_total_limit=1,
    )
    callback = CkptdCallback(BEST_JOB, socket=socket, root=root)
    evaluation = [constant(5) for _ in range(2 * BATCH)]
    trainer = Trainer(
        model(), args, train_dataset=Phases(), eval_dataset=evaluation, callbacks=[callback]
    )
    warned = train(trainer)
    torch.save(weights(trainer), out / "best-final.pt")
    evals = {int(e["step"]): e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    return {
        "folders": checkpoint_folders(run),
        "best_global_step": trainer.state.best_global_step,
        "best_metric": trainer.state.best_metric,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "eval_loss": evals,
        "warnings": warned,
    }


def refuse(out: Path, socket: str, root: str) -> dict[str, Any]:
    run = out / "refuse"
    args = arguments(
        run,
        max_steps=4,
        save_strategy="best",
        eval_strategy="steps",
        eval_steps=2,
        metric_for_best_model="eval_loss",
    )
    evaluation = [constant(5) for _ in range(BATCH)]
    at_init = failure(
        lambda: Trainer(
            model(),
            args,
            train_dataset=Tokens(16, 1),
            eval_dataset=evaluation,
            callbacks=[CkptdCallback("hf-refused", socket=socket, root=root)],
        )
    )
    trainer = Trainer(model(), args, train_dataset=Tokens(16, 1), eval_dataset=evaluation)
    trainer.add_callback(CkptdCallback("hf-refused", socket=socket, root=root))
    at_train = failure(trainer.train)
    return {
        "at_init": at_init,
        "at_train": at_train,
        "global_step": trainer.state.global_step,
        "folders": checkpoint_folders(run),
    }


class StopDaemon(TrainerCallback):
    """Stops the daemon on ``socket`` at the end of step 3, once step 2 is committed there."""

    def __init__(self, socket: Path, root: Path) -> None:
        self.socket, self.root = socket, root

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step != 3:
            return
        wait_until(lambda: steps(LOST_JOB, self.root) == [2], 60, "step 2 to commit")
        query(self.socket, "stop")
        wait_until(lambda: not self.socket.exists(), 60, "the daemon to stop")


def lost(out: Path, socket: str, root: str) -> dict[str, Any]:
    """Saves every 2 steps through a daemon that stops after step 2 committed (the second daemon
    the test started): the snapshots of steps 4 and 6 fail, training goes on, and train() ends
    by raising their error."""
    other_socket, other_root = Path(sys.argv[5]), Path(sys.argv[6])
    trainer = Trainer(
        model(),
        arguments(out / "lost", max_steps=6),
        train_dataset=Tokens(64, 1),
        callbacks=[
            CkptdCallback(LOST_JOB, socket=other_socket, root=other_root),
            StopDaemon(other_socket, other_root),
        ],
    )
    return {
        "error": failure(trainer.train),
        "global_step": trainer.state.global_step,
        "steps": steps(LOST_JOB, other_root),
        "folders": checkpoint_folders(out / "lost"),
    }


def down(out: Path, socket: str, root: str) -> dict[str, Any]:
    nowhere = out / "nowhere" / "d.sock"
    trainer = Trainer(
        model(),
        arguments(out / "down", max_steps=2),
        train_dataset=Tokens(16, 1),
        callbacks=[CkptdCallback("hf-down", socket=nowhere)],
    )
    return {
        "error": failure(trainer.train),
        "global_step": trainer.state.global_step,
        "socket": str(nowhere),
    }


class Boom(TrainerCallback):
    """Raises at the end of step 1, before the first save: ``train()`` raises."""

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step == 1:
            raise RuntimeError("boom at step 1")


def rerun(out: Path, socket: str, root: str) -> dict[str, Any]:
    """A ``train()`` that raises (so ``on_train_end`` never runs), then ``train()`` again on the
    same Trainer with ``save_total_limit=2`` (was 1) and ``save_only_model=True``; then
    ``materialize`` of its last step and ``from_pretrained`` of that folder."""
    callback = CkptdCallback(RERUN_JOB, socket=socket, root=root)
    trainer = Trainer(
        model(),
        arguments(out / "rerun", max_steps=8, save_total_limit=1),
        train_dataset=Tokens(64, 1),
        callbacks=[callback, Boom()],
    )
    first = failure(trainer.train)
    stale = callback.client
    trainer.remove_callback(Boom)
    trainer.args.save_total_limit = 2
    trainer.args.save_only_model = True
    train(trainer)
    final = weights(trainer)
    warned = Warnings()
    logging.getLogger("ckptd_client.hf").addHandler(warned)
    try:
        path = materialize(RERUN_JOB, out / "rerun-export", root=root)
    finally:
        logging.getLogger("ckptd_client.hf").removeHandler(warned)
    loaded = GPT2LMHeadModel.from_pretrained(str(path)).state_dict()
    return {
        "first": first,
        "stale_open": stale is not None and not stale._closed,
        "replaced": stale is not None and callback.client is None,
        "steps": steps(RERUN_JOB, root),
        "files": sorted(p.name for p in path.iterdir()),
        "materialize_warnings": warned.messages,
        "from_pretrained_equal": all(torch.equal(loaded[k], v) for k, v in final.items()),
    }


# ---- process B ---------------------------------------------------------------------------------


def full8(out: Path, socket: str, root: str) -> dict[str, Any]:
    trainer = Trainer(
        model(),
        arguments(out / "full8", max_steps=8, save_strategy="no"),
        train_dataset=Tokens(64, 1),
    )
    train(trainer)
    torch.save(weights(trainer), out / "full8-final.pt")
    return {"global_step": trainer.state.global_step}


def differential(out: Path, socket: str, root: str) -> dict[str, Any]:
    """The same run by the plain Trainer (writing ``checkpoint-N`` folders) and with the
    callback, then every step the Trainer wrote materialized from ckptd, for the test to compare
    file by file. 9 steps, a save every 2 (and at the last step), a log every 3, an evaluation
    every 4 on a dict of two datasets, a ReduceLROnPlateau scheduler stepped on the second
    dataset's loss (``mode="max"``, ``patience=0``: the LR halves whenever the loss falls)."""
    evaluation = {
        "a": [constant(9) for _ in range(BATCH)],
        "b": [constant(5) for _ in range(BATCH)],
    }
    options: dict[str, Any] = {
        "max_steps": 9,
        "save_steps": 2,
        "logging_steps": 3,
        "eval_strategy": "steps",
        "eval_steps": 4,
        "metric_for_best_model": "eval_b_loss",
        "lr_scheduler_type": "reduce_lr_on_plateau",
        "lr_scheduler_kwargs": {"mode": "max", "patience": 0, "factor": 0.5},
    }
    plain = Trainer(
        model(),
        arguments(out / "diff-hf", **options),
        train_dataset=Tokens(64, 1),
        eval_dataset=evaluation,
    )
    train(plain)
    ours = Trainer(
        model(),
        arguments(out / "diff-ckptd", **options),
        train_dataset=Tokens(64, 1),
        eval_dataset=evaluation,
        callbacks=[CkptdCallback(DIFF_JOB, socket=socket, root=root)],
    )
    train(ours)
    written = checkpoint_folders(out / "diff-hf")
    for name in written:
        materialize(DIFF_JOB, out / "diff-export", step=int(name.split("-")[1]), root=root)
    return {
        "hf_folders": written,
        "steps": steps(DIFF_JOB, root),
        "folders": checkpoint_folders(out / "diff-ckptd"),
        "lr": [g["lr"] for g in ours.optimizer.param_groups] if ours.optimizer else None,
    }


def resume(out: Path, socket: str, root: str) -> dict[str, Any]:
    export = out / "export"
    path = materialize(MAIN_JOB, export, root=root)
    files = sorted(p.name for p in path.iterdir())
    exported_state = json.loads((path / "trainer_state.json").read_text())
    trainer = Trainer(
        model(),
        arguments(out / "resumed", max_steps=8),
        train_dataset=Tokens(64, 1),
        callbacks=[CkptdCallback(MAIN_JOB, socket=socket, root=root)],
    )
    warned = train(trainer, resume_from_checkpoint=str(path))
    torch.save(weights(trainer), out / "resume-final.pt")
    return {
        "path": str(path),
        "files": files,
        "exported_global_step": exported_state["global_step"],
        "global_step": trainer.state.global_step,
        "folders": checkpoint_folders(out / "resumed"),
        "export_entries": sorted(p.name for p in export.iterdir()),
        "warnings": warned,
    }


def materialize_errors(out: Path, socket: str, root: str) -> dict[str, Any]:
    export = out / "export"
    before = {p.name: p.stat().st_mtime_ns for p in (export / "checkpoint-6").iterdir()}
    exists = failure(lambda: materialize(MAIN_JOB, export, step=6, root=root))
    after = {p.name: p.stat().st_mtime_ns for p in (export / "checkpoint-6").iterdir()}
    return {
        "missing_job": failure(lambda: materialize("hf-nosuchjob", out / "x", root=root)),
        "missing_step": failure(lambda: materialize(MAIN_JOB, out / "x", step=5, root=root)),
        "exists": exists,
        "unchanged": before == after,
        "export_entries": sorted(p.name for p in export.iterdir()),
        "x_exists": (out / "x").exists() and any((out / "x").iterdir()),
    }


def example(out: Path, socket: str, root: str) -> dict[str, Any]:
    """``examples/hf_trainer.py`` as a user runs it: in a directory of its own, with no root and
    no socket (``CKPTD_*`` are unset here), so its client spawns the per-user daemon, on
    ``XDG_RUNTIME_DIR`` (a fresh one: the test stops that daemon) and writes ``./checkpoints``."""
    here = out.parent / "example"
    here.mkdir()
    runtime = out.parent / "xdg"
    runtime.mkdir(mode=0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    os.chdir(here)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        runpy.run_path(str(REPO / "examples" / "hf_trainer.py"), run_name="__main__")
    return {
        "output": printed.getvalue(),
        "steps": [m.step for m in list_checkpoints("hf-example", root=here / "checkpoints")],
    }


def wait_for(path: Path, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def main() -> None:
    what, out_name, socket, root = sys.argv[1:5]
    out = Path(out_name)
    torch.set_num_threads(1)
    scenarios = {
        "train": [save6, best, refuse, down, lost, rerun],
        "resume": [full8, differential, resume, materialize_errors, example],
    }[what]
    wait_for(out / "daemons.ready")
    for scenario in scenarios:
        if scenario is resume:
            wait_for(out / "save6.done")
        started = time.monotonic()
        try:
            result = scenario(out, socket, root)
            result["seconds"] = round(time.monotonic() - started, 2)
        except BaseException:
            (out / f"{scenario.__name__}.error").write_text(traceback.format_exc())
            raise
        (out / f"{scenario.__name__}.json").write_text(json.dumps(result, indent=1))
        if scenario is save6:
            (out / "save6.done").touch()


if __name__ == "__main__":
    main()
