"""Framework goodput benchmark: training throughput of the Hugging Face ``Trainer`` and Lightning
with their own checkpoints and with ckptd's adapters, as % of the same framework without
checkpoints.

The model is the goodput bench's LM (:class:`bench.goodput_bench.TinyLM`, default size: vocab
24576, width 256, 4 layers, batch 2 x 48; 15.8M parameters, 189 MB of model + AdamW state), with
AdamW (lr 1e-4, weight decay 0.01, constant LR, no gradient clipping) on synthetic uniform-random
tokens on the CPU. Each run builds a fresh model and a fresh framework trainer and trains
``2 * --every`` untimed steps (two checkpoints: every file, buffer and shared-memory slot has
been touched once) and then ``--steps`` timed steps (default 60) with a checkpoint every
``--every`` steps (default 10; the last one at the last step). Per framework, three methods:

* Hugging Face ``transformers.Trainer`` (the LM wrapped in a module whose forward returns
  ``{"loss": ...}``; ``use_cpu=True``, ``report_to=[]``, no logging, ``optim="adamw_torch"``):
  ``none``: ``save_strategy="no"``; ``own``: ``save_strategy="steps", save_steps=every`` (the
  Trainer's blocking write of ``checkpoint-N``: ``model.safetensors``, ``optimizer.pt``,
  ``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``, ...); ``ckptd``: the same
  arguments plus ``callbacks=[ckptd_client.hf.CkptdCallback(job, socket=..., root=...)]``, which
  takes the save over (the Trainer writes no folder).
* Lightning ``Trainer`` (a ``LightningModule`` around the same LM): ``none``:
  ``enable_checkpointing=False``; ``own``: ``ModelCheckpoint(every_n_train_steps=every,
  save_top_k=-1)`` with the default ``TorchCheckpointIO`` (``torch.save`` of Lightning's
  checkpoint dict); ``ckptd``: the same ``ModelCheckpoint`` with
  ``plugins=[ckptd_client.lightning.CkptdCheckpointIO(job, socket=..., root=...)]``.

ckptd's runs go to one daemon the script starts (``python -m ckptd start --user --socket S
--root R``, default config, socket in a short /tmp directory), each run to a job of its own and
with a seed of its own (so no checkpoint repeats another's bytes); neither adapter calls
``prepare()``: the two untimed checkpoints fault the client's two slots in. The frameworks'
files go to a directory per run, deleted after it.

Timing comes from the frameworks' own hooks, fed by a timing callback (HF: listed before
ckptd's callback; Lightning runs ``ModelCheckpoint`` after every other callback): the loop runs
from the begin hook of the first timed step to the end of the epoch (the last step's checkpoint
call returned). The gap between a step's end hook and the next step's begin hook holds the
checkpoint call on a checkpoint step; a checkpoint's ``stall`` = its step's gap minus the median
gap of the run's other timed steps. ``end → durable``: at the loop's end the run waits until
every checkpoint it wrote is durable: ckptd's ``Client.flush()`` (the adapters' public
``client``), for the frameworks' own writes an ``fsync`` of every file the run wrote (neither
framework calls fsync). Before the first timed step the run waits for its untimed checkpoints
the same way and ``sync``s. ``MB / checkpoint``: the bytes of the run's last checkpoint (the
frameworks' own: its files on disk; ckptd: the state's raw bytes in its manifest); each run
checks it wrote exactly the checkpoints it should (folders, files, pointers, ckptd steps).

All runs happen in this one process (like the goodput bench; the frameworks are imported once,
and each run has its own model, trainer, client and directories; a run's framework warnings are
collected and printed once at the end). The machine's speed drifts by tens of percent within
minutes, so each checkpointing run is paired with a ``none`` run of the same framework right
before it; ``% of none`` is the run's steps/s over its pair's. The four pairs (2 frameworks x 2
methods) run in an order that rotates each rep (``--reps``, default 3); the table shows median
[min-max] over the reps. Each run records the share of the CPUs other processes used (the
daemon belongs to the run); ``--max-foreign F`` redoes a pair in which other processes used more
than F of the CPUs (at most 5 times in all), ``--quiet-wait S`` waits up to S seconds for a quiet
machine before each pair.

Run: ``.venv/bin/python -m bench.frameworks_bench [--steps 60] [--every 10] [--reps 3] [--quick]
[--frameworks hf,lightning] [--root DIR] [--quiet-wait S] [--max-foreign F]``; results go to
``bench/results/frameworks_bench.jsonl`` (``frameworks_bench-quick.jsonl`` for --quick).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `ckptd` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the model is built here
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning
import torch
import transformers
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from transformers import (
    PrinterCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from bench._common import (
    MB,
    BenchDaemon,
    CpuWatch,
    Quiet,
    Spread,
    add_quiet_args,
    add_run_args,
    bench_parser,
    default_out,
    drop_ckptd_env,
    log,
    markdown_table,
    quiet_of,
    reps_of,
    rotated,
    run_info,
    scratch,
    settle,
    show_cpu,
    wait_for_quiet,
    write_records,
)
from bench.goodput_bench import DEFAULT_SIZE, QUICK_SIZE, ModelSize, TinyLM
from ckptd_client import Client, list_checkpoints
from ckptd_client.hf import CkptdCallback
from ckptd_client.lightning import CkptdCheckpointIO, read_pointer

HF = "hf"
LIGHTNING = "lightning"
FRAMEWORKS = (HF, LIGHTNING)
NONE = "none"
OWN = "own"
CKPTD = "ckptd"
METHODS = (OWN, CKPTD)
LABELS = {
    (HF, NONE): "HF Trainer, no checkpoints",
    (HF, OWN): "HF Trainer, its own checkpoints (save_steps)",
    (HF, CKPTD): "HF Trainer + ckptd CkptdCallback",
    (LIGHTNING, NONE): "Lightning, no checkpoints",
    (LIGHTNING, OWN): "Lightning ModelCheckpoint, TorchCheckpointIO",
    (LIGHTNING, CKPTD): "Lightning ModelCheckpoint + ckptd CkptdCheckpointIO",
}
LR = 1e-4
WEIGHT_DECAY = 0.01


# ---- the model and the data, as each framework wants them -------------------------------------


class LMWithLoss(torch.nn.Module):
    """The goodput bench's :class:`TinyLM` with its next-token loss: ``forward(input_ids,
    labels)`` returns ``{"loss": ...}`` (what the HF Trainer reads)."""

    def __init__(self, size: ModelSize) -> None:
        super().__init__()
        self.lm = TinyLM(size)
        self.vocab = size.vocab

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.lm(input_ids)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), labels.reshape(-1))
        return {"loss": loss}


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``n`` sequences of ``seq + 1`` uniform-random tokens (seeded): inputs and shifted labels,
    as the goodput bench's loop draws them."""

    def __init__(self, size: ModelSize, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, size.vocab, (n, size.seq + 1), generator=gen)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.tokens[i]
        return {"input_ids": row[:-1], "labels": row[1:]}


class LitLM(lightning.LightningModule):
    """The same model and AdamW for Lightning."""

    def __init__(self, size: ModelSize) -> None:
        super().__init__()
        self.net = LMWithLoss(size)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.net(**batch)["loss"]
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


# ---- timing from the frameworks' hooks --------------------------------------------------------


class Clock:
    """The step boundaries of one run, fed by a framework's hooks on the training thread.

    ``step_begin(done)`` / ``step_end(done)`` take the number of optimizer steps done (before /
    after the step); ``loop_end()`` comes once, after the last step's checkpoint call returned.
    At the begin of step ``warm + 1`` it calls ``at_start`` (wait for the untimed checkpoints to
    be durable), then :func:`settle`, and starts the timed loop; at ``loop_end`` it calls
    ``at_end`` (wait until every checkpoint is durable) and stops."""

    def __init__(self, warm: int, at_start: Callable[[], None], at_end: Callable[[], None]) -> None:
        self.warm = warm
        self.at_start = at_start
        self.at_end = at_end
        self.gaps: dict[int, float] = {}  # step -> from its end hook to the next begin hook
        self.last_end: float | None = None
        self.done = 0
        self.t0: float | None = None
        self.t_end: float | None = None
        self.t_durable: float | None = None
        self.watch: CpuWatch | None = None
        self.foreign: float | None = None

    def step_begin(self, done: int) -> None:
        now = time.perf_counter()
        if self.last_end is not None:
            self.gaps[done] = now - self.last_end
        if done == self.warm and self.t0 is None:
            self.at_start()
            settle()
            self.watch = CpuWatch()
            self.t0 = time.perf_counter()

    def step_end(self, done: int) -> None:
        self.last_end = time.perf_counter()
        self.done = done

    def loop_end(self) -> None:
        if self.t_end is not None:
            return
        now = time.perf_counter()
        if self.last_end is not None:
            self.gaps[self.done] = now - self.last_end
        self.t_end = now
        self.at_end()
        self.t_durable = time.perf_counter()
        self.foreign = self.watch.foreign() if self.watch is not None else None


class HfClock(TrainerCallback):
    """Feeds a :class:`Clock` from the HF Trainer (listed before the ckptd callback, so a step's
    gap holds the snapshot taken in ``on_step_end`` as well as the Trainer's own save)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.clock.step_begin(state.global_step)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.clock.step_end(state.global_step)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.clock.loop_end()


class LightningClock(Callback):
    """Feeds a :class:`Clock` from Lightning (``ModelCheckpoint`` always runs after the other
    callbacks, so a step's gap holds its save)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_start(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.clock.step_begin(trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.clock.step_end(trainer.global_step)

    def on_train_epoch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        self.clock.loop_end()


def fsync_tree(top: Path) -> None:
    """fsync every file under ``top``, then every directory (deepest first)."""
    dirs: list[Path] = []
    for here, _subdirs, files in os.walk(top):
        dirs.append(Path(here))
        for name in files:
            fd = os.open(Path(here) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def flush(client: Client | None) -> None:
    """Wait until every snapshot ``client`` handed off is committed; raise the first failure."""
    if client is None:
        raise RuntimeError("the ckptd adapter made no client: it never saved")
    pending = client.flush(timeout=600)
    if pending:
        raise RuntimeError(f"ckptd: {len(pending)} snapshot(s) still pending after 600 s")


# ---- one run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What one run does: ``framework``, ``method`` (none / own / ckptd), the seed of its model
    and data, ``warm`` untimed and ``steps`` timed steps, a checkpoint every ``every``."""

    framework: str
    method: str
    rep: int
    seed: int
    size: ModelSize
    warm: int
    steps: int
    every: int

    @property
    def total_steps(self) -> int:
        return self.warm + self.steps

    @property
    def total_checkpoints(self) -> int:
        return 0 if self.method == NONE else self.total_steps // self.every

    @property
    def job(self) -> str:
        return f"{self.framework}-r{self.rep}-s{self.seed}"


@dataclass
class Run:
    framework: str
    method: str
    rep: int
    steps: int
    loop_s: float
    stall_s: float
    stall_per_checkpoint_s: list[float]
    checkpoints: int
    tail_s: float
    foreign: float | None
    checkpoint_bytes: int
    ref: Run | None = None  # the no-checkpoint run of the same framework right before this one
    warnings: list[str] = field(default_factory=list)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.loop_s


class Runner:
    """Runs :class:`Spec` s in this process against one ckptd daemon; every run's files go to a
    fresh directory under ``work``, removed after the run."""

    def __init__(self, daemon: BenchDaemon, work: Path) -> None:
        self.daemon = daemon
        self.work = work
        self.runs = 0

    def run(self, spec: Spec) -> Run:
        self.runs += 1
        where = self.work / f"run{self.runs}"
        where.mkdir()
        threads = torch.get_num_threads()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                if spec.framework == HF:
                    clock, nbytes = self._hf(spec, where)
                else:
                    clock, nbytes = self._lightning(spec, where)
        finally:
            shutil.rmtree(where, ignore_errors=True)
            if torch.get_num_threads() != threads:
                log(f"  {spec.framework} changed torch's threads to {torch.get_num_threads()}")
                torch.set_num_threads(threads)
        settle()
        run = self._measure(spec, clock, nbytes)
        run.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
        log(
            f"  rep {spec.rep + 1} {spec.framework:9s} {spec.method:5s} loop {run.loop_s:6.2f}s "
            f"({run.steps_per_s:5.2f} steps/s) stall {run.stall_s:5.2f}s tail {run.tail_s:5.2f}s "
            f"others' CPU {show_cpu(run.foreign)}"
        )
        return run

    def _measure(self, spec: Spec, clock: Clock, nbytes: int) -> Run:
        if clock.t0 is None or clock.t_end is None or clock.t_durable is None:
            raise RuntimeError(f"{spec}: the timing hooks did not run (t0 {clock.t0})")
        if clock.done != spec.total_steps:
            raise RuntimeError(f"{spec}: trained {clock.done} steps, not {spec.total_steps}")
        timed = range(spec.warm + 1, spec.total_steps + 1)
        saves = [k for k in timed if spec.method != NONE and k % spec.every == 0]
        others = [clock.gaps[k] for k in timed if k not in saves and k in clock.gaps]
        baseline = statistics.median(others) if others else 0.0
        per = [clock.gaps[k] - baseline for k in saves]
        return Run(
            spec.framework,
            spec.method,
            spec.rep,
            spec.steps,
            clock.t_end - clock.t0,
            sum(per),
            per,
            len(saves),
            clock.t_durable - clock.t_end,
            clock.foreign,
            nbytes,
        )

    # ---- Hugging Face -----------------------------------------------------------------------

    def _hf(self, spec: Spec, where: Path) -> tuple[Clock, int]:
        out = where / "hf"
        torch.manual_seed(spec.seed)
        model = LMWithLoss(spec.size)
        data = Tokens(spec.size, spec.size.batch * spec.total_steps, spec.seed)
        args = TrainingArguments(
            output_dir=str(out),
            max_steps=spec.total_steps,
            per_device_train_batch_size=spec.size.batch,
            learning_rate=LR,
            weight_decay=WEIGHT_DECAY,
            optim="adamw_torch",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            use_cpu=True,
            report_to=[],
            logging_strategy="no",
            save_strategy="no" if spec.method == NONE else "steps",
            save_steps=spec.every,
            disable_tqdm=True,
            dataloader_pin_memory=False,
            seed=spec.seed,
        )
        ckptd = (
            CkptdCallback(
                spec.job,
                socket=self.daemon.socket,
                root=self.daemon.root,
                spawn=False,
                strict=True,
            )
            if spec.method == CKPTD
            else None
        )

        def at_start() -> None:
            if ckptd is not None:
                flush(ckptd.client)

        def at_end() -> None:
            if ckptd is not None:
                flush(ckptd.client)
            elif spec.method == OWN:
                fsync_tree(out)

        clock = Clock(spec.warm, at_start, at_end)
        callbacks: list[TrainerCallback] = [HfClock(clock)]
        if ckptd is not None:
            callbacks.append(ckptd)
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=data, callbacks=callbacks
        )
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics to stdout
        trainer.train()
        folders = sorted(out.glob("checkpoint-*")) if out.is_dir() else []
        want = spec.total_checkpoints if spec.method == OWN else 0
        if len(folders) != want:
            raise RuntimeError(f"{spec}: {len(folders)} checkpoint folders, expected {want}")
        if spec.method == OWN:
            return clock, sum(f.stat().st_size for f in folders[-1].iterdir())
        return clock, self._ckptd_bytes(spec)

    # ---- Lightning --------------------------------------------------------------------------

    def _lightning(self, spec: Spec, where: Path) -> tuple[Clock, int]:
        ckpt_dir = where / "ckpt"
        torch.manual_seed(spec.seed)
        module = LitLM(spec.size)
        data = Tokens(spec.size, spec.size.batch * spec.total_steps, spec.seed)
        gen = torch.Generator().manual_seed(spec.seed)
        loader = torch.utils.data.DataLoader(
            data, batch_size=spec.size.batch, shuffle=True, generator=gen
        )
        io = (
            CkptdCheckpointIO(
                spec.job,
                socket=self.daemon.socket,
                root=self.daemon.root,
                spawn=False,
                strict=True,
            )
            if spec.method == CKPTD
            else None
        )

        def at_start() -> None:
            if io is not None:
                flush(io.client)

        def at_end() -> None:
            if io is not None:
                flush(io.client)
            elif spec.method == OWN:
                fsync_tree(ckpt_dir)

        clock = Clock(spec.warm, at_start, at_end)
        callbacks: list[Callback] = [LightningClock(clock)]
        if spec.method != NONE:
            callbacks.append(
                ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=spec.every, save_top_k=-1)
            )
        trainer = lightning.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=spec.total_steps,
            callbacks=callbacks,
            plugins=[io] if io is not None else None,
            enable_checkpointing=spec.method != NONE,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=where,
        )
        trainer.fit(module, loader)
        files = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
        if len(files) != spec.total_checkpoints:
            raise RuntimeError(
                f"{spec}: {len(files)} .ckpt files, expected {spec.total_checkpoints}"
            )
        if spec.method == CKPTD:
            if any(read_pointer(f) is None for f in files):
                raise RuntimeError(f"{spec}: a .ckpt file is not a ckptd pointer")
            return clock, self._ckptd_bytes(spec)
        return clock, files[-1].stat().st_size if files else 0

    def _ckptd_bytes(self, spec: Spec) -> int:
        """The raw bytes of the run's last ckptd checkpoint, after checking it has them all (0
        for a run without ckptd)."""
        if spec.method != CKPTD:
            return 0
        steps = [m.step for m in list_checkpoints(spec.job, root=self.daemon.root)]
        want = [spec.every * (i + 1) for i in range(spec.total_checkpoints)]
        if steps != want:
            raise RuntimeError(f"{spec}: ckptd holds steps {steps}, expected {want}")
        return list_checkpoints(spec.job, root=self.daemon.root)[-1].raw_bytes


# ---- the bench ----------------------------------------------------------------------------------


def measure(
    runner: Runner,
    pairs: Sequence[tuple[str, str]],
    reps: int,
    make: Callable[[str, str, int, int], Spec],
    quiet: Quiet,
) -> tuple[list[Run], int]:
    """Each rep: every (framework, method) pair in an order that rotates each rep, as a ``none``
    run of the framework followed by the method's run. A pair during which other processes used
    more than ``quiet.max_foreign`` of the CPUs is done again (at most ``quiet.max_redos`` times
    in all). Returns the runs and how many pairs were redone."""
    runs: list[Run] = []
    redone = 0
    seed = 0
    for rep in range(reps):
        for framework, method in rotated(pairs, rep):
            while True:
                waited = wait_for_quiet(quiet.wait_s)
                if waited > 3:
                    log(f"waited {waited:.0f}s for other processes to quieten down")
                ref = runner.run(make(framework, NONE, rep, seed + 1))
                run = runner.run(make(framework, method, rep, seed + 2))
                seed += 2
                busy = max((r.foreign or 0.0) for r in (ref, run))
                if busy > quiet.max_foreign and redone < quiet.max_redos:
                    redone += 1
                    log(f"  other processes used {busy:.0%} of the CPUs: pair done again")
                    continue
                run.ref = ref
                runs += [ref, run]
                break
    return runs, redone


# ---- report -------------------------------------------------------------------------------------


def report(runs: list[Run]) -> tuple[str, list[dict[str, Any]]]:
    rows: list[list[str]] = []
    records: list[dict[str, Any]] = []
    for (framework, method), label in LABELS.items():
        got = [r for r in runs if r.framework == framework and r.method == method]
        if not got:
            continue
        refs = [r if r.ref is None else r.ref for r in got]
        pct = Spread.of(
            [100 * r.steps_per_s / ref.steps_per_s for r, ref in zip(got, refs, strict=True)]
        )
        sps = Spread.of([r.steps_per_s for r in got])
        loop = Spread.of([r.loop_s for r in got])
        stall = Spread.of([r.stall_s for r in got])
        per_ckpt = Spread.of([statistics.median(r.stall_per_checkpoint_s or [0.0]) for r in got])
        beyond = Spread.of(
            [r.loop_s - r.stall_s - ref.loop_s for r, ref in zip(got, refs, strict=True)]
        )
        tail = Spread.of([r.tail_s for r in got])
        nbytes = statistics.median(r.checkpoint_bytes for r in got)
        is_ref = method == NONE
        rows.append(
            [
                label,
                sps.text(2),
                "100 (ref)" if is_ref else pct.text(1),
                "—" if is_ref else per_ckpt.text(3),
                "—" if is_ref else beyond.text(2),
                "—" if is_ref else tail.text(2),
                "—" if is_ref else f"{nbytes / MB:.0f}",
            ]
        )
        records.append(
            {
                "kind": "framework_goodput",
                "framework": framework,
                "method": method,
                "label": label,
                "steps": got[0].steps,
                "checkpoints": got[0].checkpoints,
                "checkpoint_bytes": nbytes,
                "steps_per_s": sps.as_json(),
                "pct_of_none": pct.as_json(),
                "loop_s": loop.as_json(),
                "stall_s": stall.as_json(),
                "stall_per_checkpoint_s": per_ckpt.as_json(),
                "stall_each_checkpoint_s": [r.stall_per_checkpoint_s for r in got],
                "slowdown_beyond_stall_s": beyond.as_json(),
                "tail_s": tail.as_json(),
                "foreign_cpu": [r.foreign for r in got],
            }
        )
    table = markdown_table(
        [
            "framework, method",
            "steps/s",
            "% of no checkpoints",
            "stall s / checkpoint",
            "slowdown beyond stall s",
            "end → durable s",
            "MB / checkpoint",
        ],
        rows,
    )
    return table, records


def quiet_frameworks() -> None:
    """Keep the frameworks' chatter (device banners, tips, info logs) off the output."""
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 60)")
    ap.add_argument("--every", type=int, default=None, help="checkpoint interval (default 10)")
    add_run_args(
        ap,
        quick="a tiny model, 4 timed steps (a checkpoint every 2), 1 rep (smoke)",
        reps="repetitions (default 3; quick 1)",
    )
    ap.add_argument(
        "--root",
        type=Path,
        default=None,
        help="where checkpoints are written (a fresh subdirectory is made and removed); "
        "default $TMPDIR (/tmp)",
    )
    ap.add_argument(
        "--frameworks",
        default=",".join(FRAMEWORKS),
        help=f"comma-separated frameworks to measure (default {','.join(FRAMEWORKS)})",
    )
    add_quiet_args(ap)
    args = ap.parse_args(argv)
    steps = args.steps if args.steps is not None else (4 if args.quick else 60)
    every = args.every if args.every is not None else (2 if args.quick else 10)
    reps = reps_of(args, 3)
    if steps < 1 or every < 1 or reps < 1:
        ap.error("--steps, --every and --reps must be >= 1")
    if steps % every:
        ap.error(f"--steps ({steps}) must be a multiple of --every ({every})")
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown or not frameworks:
        ap.error(f"--frameworks: unknown {sorted(unknown)}; known: {', '.join(FRAMEWORKS)}")
    size = QUICK_SIZE if args.quick else DEFAULT_SIZE
    out_path = args.out or default_out("frameworks_bench", args.quick)
    drop_ckptd_env()
    quiet_frameworks()
    # The frameworks' modules are millions of objects: a full collection (settle() makes two per
    # run) would take ~0.4 s each. They live as long as the process, so keep them out of it.
    gc.collect()
    gc.freeze()
    parent = (args.root or Path(tempfile.gettempdir())).absolute()
    warm = 2 * every
    info = run_info("frameworks_bench", args.quick)
    torch.manual_seed(0)
    params = sum(p.numel() for p in TinyLM(size).parameters())
    info.update(
        steps=steps,
        every=every,
        warm_steps=warm,
        reps=reps,
        model=size.__dict__,
        params=params,
        frameworks=frameworks,
        transformers=transformers.__version__,
        lightning=lightning.__version__,
        quiet_wait_s=args.quiet_wait,
        max_foreign=args.max_foreign,
    )
    log(f"model: {params / 1e6:.1f}M params; {warm} untimed + {steps} timed steps per run")

    def make(framework: str, method: str, rep: int, seed: int) -> Spec:
        return Spec(framework, method, rep, seed, size, warm, steps, every)

    pairs = [(f, m) for f in frameworks for m in METHODS]
    with scratch(parent, "ckptd-frameworks-") as root, scratch(Path("/tmp"), "ckf-") as sd:
        info["root"] = str(root)
        work = root / "runs"
        work.mkdir()
        daemon = BenchDaemon("ckptd", sd / "d.sock", root / "ckptd")
        log(f"daemon pid {daemon.pid}")
        try:
            runs, redone = measure(Runner(daemon, work), pairs, reps, make, quiet_of(args))
        finally:
            stopped = daemon.stop()
    text, records = report(runs)
    info.update(loadavg_end=list(os.getloadavg()), daemon_stopped=stopped, redone_pairs=redone)
    write_records(out_path, info, records)
    seen = Counter(w for r in runs for w in r.warnings)
    if seen:
        log("framework warnings (count, message):")
        for message, count in seen.most_common():
            log(f"  {count:3d} x {message[:300]}")
    foreign = [r.foreign for r in runs]
    print(
        f"\n### Framework goodput: {params / 1e6:.1f}M-param LM, {steps} timed steps, a "
        f"checkpoint every {every} steps, median [min-max] of {reps} rep(s)\n\n"
        f"% of no checkpoints = steps/s over the same framework's no-checkpoint run right "
        "before; end → durable = from the loop's end until every checkpoint of the run is "
        "durable (ckptd: Client.flush(); the frameworks' own writes: fsync of their files); "
        f"pairs redone: {redone}; other processes' CPU use per run: "
        f"{', '.join(show_cpu(f) for f in foreign)}\n"
    )
    print(text)
    print(f"\ndaemon stopped: {'yes' if stopped else 'NO'}; results: {out_path}")
    return 0 if stopped else 1


if __name__ == "__main__":
    sys.exit(main())
