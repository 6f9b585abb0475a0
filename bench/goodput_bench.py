"""Goodput benchmark: how much training throughput each checkpointing method costs.

A small causal transformer LM (token embedding, learned positions, pre-norm
``nn.TransformerEncoderLayer``s with a causal mask, final LayerNorm, untied output head) trains
with AdamW on synthetic uniform-random tokens on the CPU. Default size: vocab 24576, width 256,
4 layers, batch 2 x 48: 15.8M parameters, 189 MB of model + AdamW state, roughly 0.1-0.4 s per
step on the 2-core machine. The loop runs ``--steps`` steps (default 60) once without checkpoints
and once with each method, checkpointing every ``--every`` steps (default 10; the last checkpoint
is taken at the last step):

* ``none``: no checkpoints (the reference);
* ``ckptd``: ``Client.snapshot(model, opt, step=...)`` to a daemon this script starts
  (``python -m ckptd start --user --socket S --root R``, default config, socket in a short /tmp
  directory); ``prepare()`` runs once before the first run; 2 slots, ``on_full="block"``;
* ``ckptd-overlap``: the same daemon through a second client, ``Client(..., overlap=True)``: each
  snapshot copies parameters and AdamW state on the client's background thread while the next
  steps' forward and backward run, and the next ``optimizer.step()`` waits for that copy (its
  step pre-hook); that wait counts as stall;
* ``ckptd-nice0``: the same through a second daemon whose write threads are not niced
  (``[daemon] worker_nice = 0``): what the default ``worker_nice = 10`` buys;
* ``torch.save+fsync``: ``torch.save({"model": ..., "optimizer": ...}, file)`` then ``fsync``
  (blocking);
* ``dcp.async_save``: ``torch.distributed.checkpoint.async_save`` with the thread executor and a
  ``DefaultStager`` reused for the whole run (no pinned / shared memory); before each save the
  previous save's future is waited for (that wait counts as stall);
* ``dcp.save``: ``torch.distributed.checkpoint.save`` (blocking; fsyncs its files).

The dcp methods run in a one-member gloo process group. Each method saves once, untimed, before
its first run (dcp's first call sets up its planner and the stager's buffers, like ckptd's
``prepare()``). Every run continues training the same model, so each checkpoint holds new data.

Measured per run: the loop's wall time (first step to the return of the last step's checkpoint
call), the total seconds spent inside checkpoint calls (``stall``), and ``tail``: from the loop's
end until the last checkpoint is durable (0 for the blocking methods). The machine's speed drifts
by tens of percent within minutes, so every method's run is paired with a ``none`` run right
before it: ``% of none`` is the run's steps/s over its paired ``none`` run's steps/s. The methods
run in an order that rotates each rep (``--reps``, default 3); the table shows median [min-max]
over the reps (the ``none`` row: over all its runs). ``slowdown beyond stall`` = loop s - stall s -
loop s of the paired ``none``: the time the loop lost to background work competing for the CPUs.
Each ckptd method is also compared with ``dcp.async_save`` rep by rep: its ``% of none`` over
dcp's in the same rep. With ``--quiet-wait S`` each pair first waits up to S seconds for other
processes to use <10% of the CPUs; with ``--max-foreign F`` a pair during which they used more
than F (in either run) is done again (at most 5 times per bench).

Run: ``.venv/bin/python -m bench.goodput_bench [--steps 60] [--every 10] [--reps 3] [--quick]
[--methods ckptd,ckptd-overlap,dcp.async] [--quiet-wait S] [--max-foreign F]``;
results go to ``bench/results/goodput_bench.jsonl`` (``goodput_bench-quick.jsonl`` for --quick).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `ckptd` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import (
    AsyncCheckpointerType,
    AsyncSaveResponse,
    async_save,
    save,
)

from bench._common import (
    MB,
    BenchDaemon,
    CpuWatch,
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
from bench.states import tensors_of
from ckptd_client import Client, PendingSnapshot

NONE = "none"
CKPTD = "ckptd"
CKPTD_OVERLAP = "ckptd-overlap"
CKPTD_NICE0 = "ckptd-nice0"
TORCH = "torch.save"
DCP_ASYNC = "dcp.async"
DCP_SAVE = "dcp.save"
LABELS = {
    NONE: "no checkpoints",
    CKPTD: "ckptd Client.snapshot",
    CKPTD_OVERLAP: "ckptd Client(overlap=True).snapshot",
    CKPTD_NICE0: "ckptd, write threads not niced (worker_nice = 0)",
    TORCH: "torch.save+fsync",
    DCP_ASYNC: "dcp.async_save (thread, reused stager)",
    DCP_SAVE: "dcp.save",
}
METHODS = list(LABELS)
CKPTD_METHODS = (CKPTD, CKPTD_OVERLAP, CKPTD_NICE0)
MAX_PAIR_REDOS = 5


@dataclass(frozen=True)
class ModelSize:
    vocab: int
    dim: int
    layers: int
    batch: int
    seq: int


DEFAULT_SIZE = ModelSize(vocab=24576, dim=256, layers=4, batch=2, seq=48)
QUICK_SIZE = ModelSize(vocab=512, dim=64, layers=2, batch=2, seq=16)


# ---- the training loop ----------------------------------------------------------------------


class TinyLM(torch.nn.Module):
    """A causal transformer LM: embedding + positions, pre-norm encoder layers, untied head."""

    mask: torch.Tensor

    def __init__(self, size: ModelSize) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(size.vocab, size.dim)
        self.pos = torch.nn.Parameter(torch.randn(size.seq, size.dim) * 0.02)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(
                size.dim,
                max(1, size.dim // 64),
                4 * size.dim,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(size.layers)
        )
        self.norm = torch.nn.LayerNorm(size.dim)
        self.head = torch.nn.Linear(size.dim, size.vocab, bias=False)
        self.register_buffer(
            "mask", torch.nn.Transformer.generate_square_subsequent_mask(size.seq), persistent=False
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:n]
        mask = self.mask[:n, :n]
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        out: torch.Tensor = self.head(self.norm(h))
        return out


class Trainer:
    """The model, its AdamW, and a generator of synthetic token batches."""

    def __init__(self, size: ModelSize) -> None:
        torch.manual_seed(0)
        self.size = size
        self.model = TinyLM(size)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        self.gen = torch.Generator().manual_seed(1)
        self.steps_done = 0
        self.loss = float("nan")
        self.step()  # AdamW's moments exist from here on: the state has its final shape
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.state_bytes = sum(t.nbytes for t in tensors_of(self.state()))

    def step(self) -> None:
        s = self.size
        tokens = torch.randint(0, s.vocab, (s.batch, s.seq + 1), generator=self.gen)
        logits = self.model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, s.vocab), tokens[:, 1:].reshape(-1)
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.opt.step()
        self.steps_done += 1
        self.loss = float(loss.detach())

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}


# ---- the checkpointing methods ------------------------------------------------------------------


class Saver:
    """One checkpointing method: ``save(step)`` is what the loop calls (its wall time is the
    stall); ``finish()`` waits until every checkpoint is durable and returns that moment
    (``time.perf_counter()``); ``cleanup()`` deletes what the run wrote."""

    def save(self, step: int) -> None:
        raise NotImplementedError

    def finish(self) -> float:
        return time.perf_counter()

    def cleanup(self) -> None:
        pass

    def extra(self) -> dict[str, float]:
        return {}

    def hook_wait_s(self) -> float:
        """Seconds the loop waited for checkpoints outside ``save()`` (an optimizer step
        waiting for an overlapped copy)."""
        return 0.0


class CkptdSaver(Saver):
    def __init__(self, trainer: Trainer, client: Client) -> None:
        self.trainer = trainer
        self.client = client
        self.pending: list[PendingSnapshot] = []
        self.stall_at_return: list[float] = []

    def save(self, step: int) -> None:
        p = self.client.snapshot(self.trainer.model, self.trainer.opt, step=step)
        self.pending.append(p)
        self.stall_at_return.append(p.stall_s)

    def hook_wait_s(self) -> float:
        """``PendingSnapshot.stall_s`` grows by each step pre-hook's wait for the copy."""
        return sum(p.stall_s for p in self.pending) - sum(self.stall_at_return)

    def finish(self) -> float:
        for p in self.pending:
            p.wait(timeout=600)
        return time.perf_counter()

    def extra(self) -> dict[str, float]:
        infos = [p.wait(timeout=600) for p in self.pending]
        return {
            "skipped": float(sum(p.skipped for p in self.pending)),
            "client_stall_s": sum(i.stall_s for i in infos),
            "persist_s_median": statistics.median(i.persist_s for i in infos) if infos else 0.0,
            "stored_bytes_median": statistics.median(i.stored_bytes for i in infos)
            if infos
            else 0.0,
        }


class TorchSaver(Saver):
    def __init__(self, trainer: Trainer, files: Path) -> None:
        self.trainer = trainer
        self.files = files

    def save(self, step: int) -> None:
        path = self.files / f"torch-{step}.pt"
        with path.open("wb") as f:
            torch.save(self.trainer.state(), f)
            f.flush()
            os.fsync(f.fileno())

    def cleanup(self) -> None:
        for p in self.files.glob("torch-*.pt"):
            p.unlink()


class DcpSaver(Saver):
    """``dcp.save`` (blocking) or ``dcp.async_save`` (thread executor, reused stager)."""

    def __init__(self, trainer: Trainer, files: Path, stager: DefaultStager | None) -> None:
        self.trainer = trainer
        self.files = files
        self.stager = stager
        self.previous: Future[Any] | None = None

    def save(self, step: int) -> None:
        where = self.files / f"dcp-{step}"
        if self.stager is None:
            save(self.trainer.state(), checkpoint_id=where)
            return
        if self.previous is not None:
            self.previous.result(timeout=600)
        res = async_save(
            self.trainer.state(),
            checkpoint_id=where,
            async_checkpointer_type=AsyncCheckpointerType.THREAD,
            async_stager=self.stager,
        )
        self.previous = res.upload_completion if isinstance(res, AsyncSaveResponse) else res

    def finish(self) -> float:
        if self.previous is not None:
            self.previous.result(timeout=600)
            self.previous = None
        return time.perf_counter()

    def cleanup(self) -> None:
        for p in self.files.glob("dcp-*"):
            shutil.rmtree(p, ignore_errors=True)


# ---- one run ------------------------------------------------------------------------------------


@dataclass
class Run:
    method: str
    rep: int
    steps: int
    loop_s: float
    stall_s: float
    checkpoints: int
    tail_s: float
    foreign: float | None
    extra: dict[str, float] = field(default_factory=dict)
    ref: Run | None = None  # the no-checkpoint run right before this one

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.loop_s


class Bench:
    def __init__(self, size: ModelSize, root: Path, sock_dir: Path) -> None:
        self.root = root
        self.sock_dir = sock_dir
        started = time.perf_counter()
        self.trainer = Trainer(size)
        log(
            f"model: {self.trainer.n_params / 1e6:.1f}M params, state "
            f"{self.trainer.state_bytes / MB:.0f} MB, built in {time.perf_counter() - started:.1f}s"
        )
        self.files = root / "files"
        self.files.mkdir()
        self.daemons: dict[str, BenchDaemon] = {}
        self.clients: dict[str, Client] = {}
        self.stager: DefaultStager | None = None
        self.ckpt_step = 0  # unique step numbers for every checkpoint of the whole bench

    def start(self) -> None:
        nice0 = self.sock_dir / "nice0.toml"
        nice0.write_text("[daemon]\nworker_nice = 0\n")
        for name, config in ((CKPTD, None), (CKPTD_NICE0, nice0)):
            sock = self.sock_dir / f"{len(self.daemons)}.sock"
            daemon = BenchDaemon(name, sock, self.root / name, config)
            log(f"daemon {name} pid {daemon.pid}")
            self.daemons[name] = daemon
        # ckptd-overlap: a second job on the default daemon, through a client that overlaps.
        for name, job, on, overlap in (
            (CKPTD, "goodput", CKPTD, False),
            (CKPTD_OVERLAP, "goodput-overlap", CKPTD, True),
            (CKPTD_NICE0, "goodput", CKPTD_NICE0, False),
        ):
            daemon = self.daemons[on]
            client = Client(
                job,
                socket=daemon.socket,
                root=daemon.root,
                slots=2,
                spawn=False,
                strict=True,
                overlap=overlap,
            )
            client.prepare(self.trainer.model, self.trainer.opt, background=False)
            self.clients[name] = client
        pg = f"file://{self.sock_dir / 'pg'}"
        dist.init_process_group("gloo", init_method=pg, rank=0, world_size=1)
        self.stager = DefaultStager(StagingOptions(False, False, False, False))
        for name in METHODS[1:]:  # one untimed save each (set-up costs, first-call imports)
            saver = self.saver(name)
            assert saver is not None
            saver.save(self.next_step())
            saver.finish()
            saver.cleanup()
        settle()

    def close(self) -> bool:
        stopped = True
        for client in self.clients.values():
            client.close(timeout=600)
        self.clients.clear()
        if self.stager is not None:
            self.stager.close()
            self.stager = None
        if dist.is_initialized():
            dist.destroy_process_group()
        for daemon in self.daemons.values():
            stopped = daemon.stop() and stopped
        self.daemons.clear()
        return stopped

    def next_step(self) -> int:
        self.ckpt_step += 1
        return self.ckpt_step

    def saver(self, name: str) -> Saver | None:
        if name == NONE:
            return None
        if name in self.clients:
            return CkptdSaver(self.trainer, self.clients[name])
        if name == TORCH:
            return TorchSaver(self.trainer, self.files)
        return DcpSaver(self.trainer, self.files, self.stager if name == DCP_ASYNC else None)

    def run(self, name: str, rep: int, steps: int, every: int) -> Run:
        saver = self.saver(name)
        for _ in range(2):  # untimed: settle the caches after the previous method
            self.trainer.step()
        watch = CpuWatch()  # the daemons are this process's children: not "other"
        stall = 0.0
        checkpoints = 0
        t0 = time.perf_counter()
        for i in range(1, steps + 1):
            self.trainer.step()
            if saver is not None and i % every == 0:
                s0 = time.perf_counter()
                saver.save(self.next_step())
                stall += time.perf_counter() - s0
                checkpoints += 1
        t_end = time.perf_counter()
        if saver is not None:
            stall += saver.hook_wait_s()
        done = saver.finish() if saver is not None else t_end
        foreign = watch.foreign()
        extra = saver.extra() if saver is not None else {}
        if saver is not None:
            saver.cleanup()
        settle()
        run = Run(name, rep, steps, t_end - t0, stall, checkpoints, done - t_end, foreign, extra)
        log(
            f"  rep {rep + 1} {name:10s} loop {run.loop_s:6.2f}s ({run.steps_per_s:5.2f} steps/s)"
            f" stall {stall:6.2f}s tail {run.tail_s:5.2f}s others' CPU {show_cpu(foreign)}"
        )
        return run


# ---- report -------------------------------------------------------------------------------------


def report(runs: list[Run], reps: int) -> tuple[str, list[dict[str, Any]]]:
    rows: list[list[str]] = []
    records: list[dict[str, Any]] = []
    for name in METHODS:
        got = [r for r in runs if r.method == name]
        if not got:
            continue
        refs = [r if r.ref is None else r.ref for r in got]
        pct = Spread.of(
            [100 * r.steps_per_s / ref.steps_per_s for r, ref in zip(got, refs, strict=True)]
        )
        sps = Spread.of([r.steps_per_s for r in got])
        stall = Spread.of([r.stall_s for r in got])
        tail = Spread.of([r.tail_s for r in got])
        loop = Spread.of([r.loop_s for r in got])
        beyond = Spread.of(
            [r.loop_s - r.stall_s - ref.loop_s for r, ref in zip(got, refs, strict=True)]
        )
        per_ckpt = Spread.of([r.stall_s / r.checkpoints for r in got if r.checkpoints] or [0.0])
        is_ref = name == NONE
        rows.append(
            [
                LABELS[name],
                sps.text(2),
                "100 (ref)" if is_ref else pct.text(1),
                "—" if is_ref else stall.text(2),
                "—" if is_ref else per_ckpt.text(3),
                "—" if is_ref else beyond.text(2),
                "—" if is_ref else tail.text(2),
            ]
        )
        extra_keys = sorted({k for r in got for k in r.extra})
        records.append(
            {
                "kind": "goodput",
                "method": name,
                "label": LABELS[name],
                "steps": got[0].steps,
                "checkpoints": got[0].checkpoints,
                "steps_per_s": sps.as_json(),
                "pct_of_none": pct.as_json(),
                "loop_s": loop.as_json(),
                "stall_s": stall.as_json(),
                "stall_per_checkpoint_s": per_ckpt.as_json(),
                "slowdown_beyond_stall_s": beyond.as_json(),
                "tail_s": tail.as_json(),
                "foreign_cpu": [r.foreign for r in got],
                "extra": {
                    k: Spread.of([r.extra[k] for r in got if k in r.extra]).as_json()
                    for k in extra_keys
                },
            }
        )
    table = markdown_table(
        [
            "method",
            "steps/s",
            "% of none",
            "stall s (total)",
            "stall s / ckpt",
            "slowdown beyond stall s",
            "end → last durable s",
        ],
        rows,
    )
    notes = []
    for rec in records:
        ex = rec["extra"]
        if rec["method"] in CKPTD_METHODS and ex:
            notes.append(
                f"- {rec['method']}: persist_s (daemon, per checkpoint) median "
                f"{ex['persist_s_median']['median']:.2f} s; stored "
                f"{ex['stored_bytes_median']['median'] / MB:.0f} MB per checkpoint; "
                f"snapshots skipped: {ex['skipped']['max']:.0f}"
            )
    for name in CKPTD_METHODS:
        ratio = versus(runs, name, DCP_ASYNC)
        if ratio is None:
            continue
        ahead = sum(v > 1 for v in ratio.values)
        notes.append(
            f"- {name} / {DCP_ASYNC} (% of none, per rep): {ratio.text(3)}; ahead in {ahead} of "
            f"{len(ratio.values)} reps"
        )
        records.append(
            {
                "kind": "versus",
                "method": name,
                "reference": DCP_ASYNC,
                "pct_of_none_ratio": ratio.as_json(),
                "ahead_reps": ahead,
                "reps": len(ratio.values),
            }
        )
    return "\n".join([table, *notes]), records


def versus(runs: list[Run], name: str, other: str) -> Spread | None:
    """Per rep with both methods: ``name``'s % of none over ``other``'s (each to its own paired
    no-checkpoint run); None when no rep ran both."""

    def pct(r: Run) -> float:
        ref = r if r.ref is None else r.ref
        return r.steps_per_s / ref.steps_per_s

    by_rep: dict[int, dict[str, Run]] = {}
    for r in runs:
        if r.method in (name, other):
            by_rep.setdefault(r.rep, {})[r.method] = r
    vals = [pct(m[name]) / pct(m[other]) for m in by_rep.values() if len(m) == 2]
    return Spread.of(vals) if vals else None


# ---- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 60)")
    ap.add_argument("--every", type=int, default=None, help="checkpoint interval (default 10)")
    add_run_args(
        ap,
        quick="a tiny model, 6 steps, 1 rep (smoke)",
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
        "--methods",
        default="",
        help=f"comma-separated methods to measure (default all: {', '.join(METHODS[1:])}); "
        "each is paired with a no-checkpoint run",
    )
    add_quiet_args(ap)
    args = ap.parse_args(argv)
    steps = args.steps if args.steps is not None else (6 if args.quick else 60)
    every = args.every if args.every is not None else (2 if args.quick else 10)
    reps = reps_of(args, 3)
    if steps < 1 or every < 1 or reps < 1:
        ap.error("--steps, --every and --reps must be >= 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or METHODS[1:]
    unknown = set(methods) - set(METHODS[1:])
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; known: {', '.join(METHODS[1:])}")
    size = QUICK_SIZE if args.quick else DEFAULT_SIZE
    out_path = args.out or default_out("goodput_bench", args.quick)
    drop_ckptd_env()
    parent = (args.root or Path(tempfile.gettempdir())).absolute()
    info = run_info("goodput_bench", args.quick)
    info.update(steps=steps, every=every, reps=reps, model=size.__dict__)

    runs: list[Run] = []
    with scratch(parent, "ckptd-goodput-") as root, scratch(Path("/tmp"), "ckg-") as sd:
        bench = Bench(size, root, sd)
        info.update(
            root=str(root),
            params=bench.trainer.n_params,
            state_bytes=bench.trainer.state_bytes,
        )
        quiet = quiet_of(args)
        redone = 0
        try:
            bench.start()
            for rep in range(reps):
                for name in rotated(methods, rep):
                    while True:
                        wait_for_quiet(quiet.wait_s)
                        ref = bench.run(NONE, rep, steps, every)
                        run = bench.run(name, rep, steps, every)
                        busy = max((r.foreign or 0.0) for r in (ref, run))
                        if busy <= quiet.max_foreign or redone >= MAX_PAIR_REDOS:
                            break
                        redone += 1
                        log(f"  other processes used {busy:.0%} of the CPUs; pair done again")
                    run.ref = ref
                    runs += [ref, run]
        finally:
            stopped = bench.close()
    text, records = report(runs, reps)
    info.update(loadavg_end=list(os.getloadavg()), daemon_stopped=stopped, redone_pairs=redone)
    write_records(out_path, info, records)
    foreign = [r.foreign for r in runs]
    print(
        f"\n### Goodput: {bench.trainer.n_params / 1e6:.1f}M-param LM, "
        f"{bench.trainer.state_bytes / MB:.0f} MB state (model + AdamW), {steps} steps, "
        f"a checkpoint every {every} steps, median [min-max] of {reps} rep(s)\n\n"
        f"root: {info['root']}; % of none = steps/s over the no-checkpoint run of the same rep; "
        "end → last durable = from the last step's return to the last checkpoint being durable; "
        f"other processes' CPU use per run: {', '.join(show_cpu(f) for f in foreign)}"
        f" ({redone} pair(s) redone because of them)\n"
    )
    print(text)
    print(f"\ndaemon stopped: {'yes' if stopped else 'NO'}; results: {out_path}")
    return 0 if stopped else 1


if __name__ == "__main__":
    sys.exit(main())
