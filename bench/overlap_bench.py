"""Loop benchmark: what one snapshot adds to an iteration of a real training loop, with the copy
overlapped with the next forward and backward (``snapshot(..., overlap=True)``) and without.

The model is the snapshot bench's transformer with AdamW (:func:`bench.snapshot_bench.build`,
``--size 1GiB``: 89.5M parameters, 1.07 GB of model + AdamW state), and here it trains: each
iteration is forward, cross-entropy loss, ``zero_grad(set_to_none=False)``, backward and
``optimizer.step()`` on ``--batch`` x ``--seq`` synthetic tokens (default 1 x 32: forward +
backward take several times the copy floor, the regime overlap is for). The state checkpointed
is that same model and optimizer, so every snapshot holds new data. (A script of its own, not a
mode of :mod:`bench.snapshot_bench`: that one times calls on a still, perturbed state, one call
per method and rep; this one times iterations of a loop, in pairs.)

A snapshot is taken where a loop takes it: after ``optimizer.step()``, before the next iteration.
Per method, a *pair* is one iteration alone (``plain``) and one snapshot followed by one iteration
(``with``: from the snapshot call until that iteration's ``optimizer.step()`` returns). The
loop's **added time** = ``with`` - ``plain`` of the same pair. Within a pair the order alternates
(plain first, then snapshot first), and before each timed iteration the previous snapshot is
durable, its files are deleted, garbage is collected and the disk flushed (untimed): ``with``
holds the snapshot's stall and what its background work costs the iteration right after it (the
rest of the background write is the goodput bench's business). Methods:

* ``copy floor``: ``copy_`` of every state tensor into reused, pre-touched buffers (synchronous):
  the reference every ratio is taken to (its call time, median over its pairs in the same rep);
* ``overlapped floor``: the same copy on one background thread (a ``numpy`` memcpy per tensor,
  as the client's copy thread does), joined by a step pre-hook on the optimizer: what overlapping
  costs the loop with nothing behind the copy (no slot, no hand-off, no daemon writing);
* ``ckptd``: ``client.snapshot(model, opt, step=..., overlap=False)``, today's path (the call
  copies everything into the shared-memory slot and hands it off);
* ``ckptd overlap``: ``client.snapshot(..., overlap=True)``: the call copies buffers, RNG and
  the rest; parameters and AdamW state are copied on the client's background thread while the
  next forward and backward run, and the optimizer's step pre-hook waits for that copy (the
  *hook wait*, part of ``PendingSnapshot.stall_s``);
* ``dcp.async_save``: thread executor, one reused ``DefaultStager`` (no pinned / shared memory:
  the best CPU configuration, as in the snapshot bench), in a one-member gloo process group.

Both ckptd methods go through one ``Client(slots=2)`` whose ``prepare()`` ran at set-up, to a
daemon this script starts (default configuration) and stops. Threads: forward, backward and the
optimizer run on torch's intra-op threads (``--threads``, default torch's own: all cores); the
overlapped copy runs on the client's one background thread, beside them.

Reps (``--reps``, after an untimed warm-up rep of one pair per method) run every method's
``--pairs`` pairs, in an order that rotates each rep. Per rep and method: the median over its
pairs of the call time, the hook wait and the added time, and their ratios to the same rep's copy
floor; the report gives median [min-max] over the reps. With ``--quiet-wait S`` each pair first
waits up to S seconds for other processes to use <10% of the CPUs, and with ``--max-foreign F`` a
pair during which they used more than F is done again (at most 5 times per method and rep).

Run: ``.venv/bin/python -m bench.overlap_bench [--size 1GiB] [--reps 3] [--pairs 4] [--quick]``;
results go to ``bench/results/overlap_bench-<size>.jsonl``.
"""

from __future__ import annotations

import inspect
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `ckptd` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, async_save

from bench._common import (
    MB,
    RESULTS_DIR,
    BenchDaemon,
    CpuWatch,
    Quiet,
    Spread,
    add_quiet_args,
    add_run_args,
    bench_parser,
    drop_ckptd_env,
    log,
    markdown_table,
    mount_of,
    quiet_of,
    repeat,
    reps_of,
    rotated,
    run_info,
    scratch,
    settle,
    show_cpu,
    wait_for_quiet,
    write_records,
)
from bench.snapshot_bench import QUICK, SIZES, build, default_parent, state_of, upload_future
from bench.states import tensors_of
from ckptd.format.store import Store
from ckptd_client import Client, PendingSnapshot

FLOOR = "floor"
FLOOR_OVERLAP = "floor-overlap"
CKPTD = "ckptd"
CKPTD_OVERLAP = "ckptd-overlap"
DCP = "dcp.async-reused"
LABELS = {
    FLOOR: "copy_ into reused buffers (floor)",
    FLOOR_OVERLAP: "the same copy on a thread, step waits (overlapped floor)",
    CKPTD: "ckptd snapshot, overlap=False (today's path)",
    CKPTD_OVERLAP: "ckptd snapshot, overlap=True",
    DCP: "dcp.async_save, thread, reused DefaultStager",
}
METHODS = list(LABELS)
JOB = "loop"
MAX_PAIR_REDOS = 5

CALL_TARGET = 0.1
"""``snapshot(overlap=True)`` returns within this fraction of the copy floor."""
ADDED_TARGET = 0.5
"""With overlap, a snapshot adds at most this fraction of the copy floor to the loop, when
forward + backward take longer than the copy."""


def overlap_supported() -> bool:
    """Whether this ckptd client has ``snapshot(..., overlap=...)``."""
    return "overlap" in inspect.signature(Client.snapshot).parameters


# ---- the training loop --------------------------------------------------------------------------


@dataclass(frozen=True)
class Iteration:
    """One training iteration's seconds: forward + backward, and ``optimizer.step()`` (with an
    overlapped snapshot: including the step pre-hook's wait for the copy)."""

    fwd_bwd_s: float
    step_s: float


class Loop:
    """The model and AdamW the snapshots save, trained on fixed synthetic token batches."""

    def __init__(self, size: tuple[int, int, int], batch: int, seq: int) -> None:
        self.model, self.opt = build(*size)
        self.vocab = self.model.embed.num_embeddings
        g = torch.Generator().manual_seed(2)
        self.batches = [
            torch.randint(0, self.vocab, (batch, seq + 1), generator=g) for _ in range(8)
        ]
        self.done = 0
        self.tensors = list(tensors_of(state_of(self.model, self.opt)))
        self.state_bytes = sum(t.nbytes for t in self.tensors)
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def iteration(self) -> Iteration:
        ids = self.batches[self.done % len(self.batches)]
        self.done += 1
        t0 = time.perf_counter()
        logits = self.model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, self.vocab), ids[:, 1:].reshape(-1)
        )
        self.opt.zero_grad(set_to_none=False)
        loss.backward()  # type: ignore[no-untyped-call]
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        return Iteration(t1 - t0, t2 - t1)


# ---- one snapshot of each method ----------------------------------------------------------------


class BackgroundCopy:
    """The overlapped floor: the copy of every state tensor into the reused buffers, on one
    background thread (a ``numpy`` memcpy per tensor, as the client's copy thread does), joined by
    a step pre-hook on the optimizer before it changes anything. What ``overlap=True`` would cost
    the loop with nothing behind the copy: no slot, no hand-off, no daemon writing.

    Thread safety: :meth:`start` and the hook run on the trainer thread; the copy thread only
    reads the sources and writes the buffers."""

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        sources: Sequence[torch.Tensor],
        buffers: list[torch.Tensor],
    ) -> None:
        self.arrays = [
            (
                b.detach().reshape(-1).view(torch.uint8).numpy(),
                t.detach().reshape(-1).view(torch.uint8).numpy(),
            )
            for b, t in zip(buffers, sources, strict=True)
        ]
        self.thread: threading.Thread | None = None
        self.waited_s = 0.0
        self.handle = opt.register_step_pre_hook(self._before_step)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._copy, name="floor-copy", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        for dst, src in self.arrays:
            np.copyto(dst, src)

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _before_step(self, *_: Any) -> None:
        if self.thread is None:
            return
        t0 = time.perf_counter()
        self.join()
        self.waited_s += time.perf_counter() - t0


@dataclass
class Taken:
    """A snapshot just taken: its call's seconds and what to wait for until it is durable."""

    call_s: float
    pending: PendingSnapshot | None = None
    stall_at_return_s: float = 0.0  # pending.stall_s (or the copier's waits) at the return
    future: Future[Any] | None = None
    where: Path | None = None
    copier: BackgroundCopy | None = None

    def hook_s(self) -> float:
        """Seconds the optimizer's step pre-hook waited for this snapshot's copy (so far)."""
        if self.copier is not None:
            return self.copier.waited_s - self.stall_at_return_s
        return 0.0 if self.pending is None else self.pending.stall_s - self.stall_at_return_s


@dataclass(frozen=True)
class Pair:
    """One method's paired iterations: ``plain_s`` alone, ``with_s`` from the snapshot call to
    the end of the next ``optimizer.step()``."""

    method: str
    snapshot_first: bool
    plain_s: float
    with_s: float
    call_s: float
    hook_s: float
    plain_fwd_bwd_s: float
    plain_step_s: float
    with_fwd_bwd_s: float
    with_step_s: float
    foreign: float | None

    @property
    def added_s(self) -> float:
        return self.with_s - self.plain_s

    @property
    def fwd_bwd_added_s(self) -> float:
        """How much longer forward + backward took after the snapshot call: the background
        copy and the background write competing with them."""
        return self.with_fwd_bwd_s - self.plain_fwd_bwd_s

    @property
    def step_added_s(self) -> float:
        """How much longer ``optimizer.step()`` took after the snapshot, beyond the hook wait."""
        return self.with_step_s - self.hook_s - self.plain_step_s


class Bench:
    """The loop, the copy buffers, the daemon, the client and the dcp stager."""

    def __init__(
        self, loop: Loop, root: Path, sock_dir: Path, methods: list[str], pairs: int, quiet: Quiet
    ) -> None:
        self.loop = loop
        self.root = root
        self.sock_dir = sock_dir
        self.methods = methods
        self.pairs = pairs
        self.quiet = quiet
        self.buffers = [torch.empty_like(t) for t in loop.tensors]
        with torch.no_grad():
            for b, t in zip(self.buffers, loop.tensors, strict=True):
                b.copy_(t)  # pre-touch
        self.files = root / "files"
        self.files.mkdir()
        self.daemon: BenchDaemon | None = None
        self.client: Client | None = None
        self.stager: DefaultStager | None = None
        self.copier = BackgroundCopy(loop.opt, loop.tensors, self.buffers)
        self.step = 0
        self.redone = 0

    def start(self) -> None:
        if {CKPTD, CKPTD_OVERLAP} & set(self.methods):
            self.daemon = BenchDaemon("default", self.sock_dir / "d.sock", self.root / "d")
            log(f"daemon (default config) pid {self.daemon.pid}")
            self.client = Client(
                JOB,
                socket=self.daemon.socket,
                root=self.daemon.root,
                slots=2,
                spawn=False,
                strict=True,
            )
            self.client.prepare(self.loop.model, self.loop.opt, background=False)
        if DCP in self.methods:
            pg = f"file://{self.sock_dir / 'pg'}"
            dist.init_process_group("gloo", init_method=pg, rank=0, world_size=1)
            self.stager = DefaultStager(StagingOptions(False, False, False, False))

    def close(self) -> bool:
        """Stop what :meth:`start` started; True when the daemon (if any) drained and exited 0."""
        if self.client is not None:
            self.client.close(timeout=600)
            self.client = None
        if self.stager is not None:
            self.stager.close()
            self.stager = None
        if dist.is_initialized():
            dist.destroy_process_group()
        self.copier.handle.remove()
        stopped = True
        if self.daemon is not None:
            stopped = self.daemon.stop()
            self.daemon = None
        return stopped

    def take(self, name: str) -> Taken:
        """One snapshot by method ``name``; returns when the method's call returns."""
        self.step += 1
        model, opt = self.loop.model, self.loop.opt
        t0 = time.perf_counter()
        if name == FLOOR:
            with torch.no_grad():
                for b, t in zip(self.buffers, self.loop.tensors, strict=True):
                    b.copy_(t)
            return Taken(time.perf_counter() - t0)
        if name == FLOOR_OVERLAP:
            self.copier.start()
            return Taken(time.perf_counter() - t0, None, self.copier.waited_s, copier=self.copier)
        if name in (CKPTD, CKPTD_OVERLAP):
            assert self.client is not None
            if name == CKPTD_OVERLAP:
                pending = self.client.snapshot(model, opt, step=self.step, overlap=True)
            else:
                pending = self.client.snapshot(model, opt, step=self.step)
            return Taken(time.perf_counter() - t0, pending, pending.stall_s)
        where = self.files / f"dcp-{self.step}"
        res = async_save(
            state_of(model, opt),
            checkpoint_id=where,
            async_checkpointer_type=AsyncCheckpointerType.THREAD,
            async_stager=self.stager,
        )
        return Taken(time.perf_counter() - t0, future=upload_future(res), where=where)

    def finish(self, taken: Taken) -> None:
        """Until ``taken`` is durable; then delete it (untimed)."""
        if taken.copier is not None:
            taken.copier.join()
        if taken.pending is not None:
            assert self.daemon is not None
            taken.pending.wait(timeout=3600)
            store = Store(self.daemon.root)
            store.delete_checkpoint(JOB, taken.pending.step)
            store.gc(JOB)
        if taken.future is not None:
            taken.future.result(timeout=3600)
        if taken.where is not None:
            shutil.rmtree(taken.where, ignore_errors=True)

    def plain(self) -> tuple[float, Iteration]:
        settle()
        t0 = time.perf_counter()
        it = self.loop.iteration()
        return time.perf_counter() - t0, it

    def with_snapshot(self, name: str) -> tuple[float, Iteration, Taken, float]:
        settle()
        t0 = time.perf_counter()
        taken = self.take(name)
        it = self.loop.iteration()
        with_s = time.perf_counter() - t0
        hook_s = taken.hook_s()
        self.finish(taken)
        return with_s, it, taken, hook_s

    def pair(self, name: str, snapshot_first: bool) -> Pair:
        wait_for_quiet(self.quiet.wait_s)
        watch = CpuWatch()
        if snapshot_first:
            with_s, w_it, taken, hook_s = self.with_snapshot(name)
            plain_s, p_it = self.plain()
        else:
            plain_s, p_it = self.plain()
            with_s, w_it, taken, hook_s = self.with_snapshot(name)
        return Pair(
            name,
            snapshot_first,
            plain_s,
            with_s,
            taken.call_s,
            hook_s,
            p_it.fwd_bwd_s,
            p_it.step_s,
            w_it.fwd_bwd_s,
            w_it.step_s,
            watch.foreign(),
        )

    def one_rep(self, rep: int) -> dict[str, list[Pair]]:
        out: dict[str, list[Pair]] = {}
        for name in rotated(self.methods, max(rep, 0)):
            pairs: list[Pair] = []
            redone = 0
            while len(pairs) < (self.pairs if rep >= 0 else 1):  # the warm-up: one pair
                p = self.pair(name, snapshot_first=(len(pairs) + max(rep, 0)) % 2 == 1)
                busy = p.foreign
                if busy is not None and busy > self.quiet.max_foreign and redone < MAX_PAIR_REDOS:
                    redone += 1
                    log(f"  {name}: other processes used {busy:.0%} of the CPUs; pair done again")
                    continue
                pairs.append(p)
            if rep >= 0:
                self.redone += redone
            out[name] = pairs
            log(
                f"rep {rep}: {name:16s} call "
                + " ".join(f"{p.call_s:.3f}" for p in pairs)
                + " hook "
                + " ".join(f"{p.hook_s:.3f}" for p in pairs)
                + " added "
                + " ".join(f"{p.added_s:+.3f}" for p in pairs)
            )
        return out


# ---- report -------------------------------------------------------------------------------------


def per_rep(reps: list[dict[str, list[Pair]]], name: str, attr: str) -> list[float]:
    """For each rep with method ``name``: the median over its pairs of ``attr``."""
    return [statistics.median(getattr(p, attr) for p in r[name]) for r in reps if r.get(name)]


def vs_floor(reps: list[dict[str, list[Pair]]], name: str, attr: str) -> list[float]:
    """Per rep: the median of ``attr`` over ``name``'s pairs / the median floor copy."""
    out = []
    for r in reps:
        if r.get(name) and r.get(FLOOR):
            floor = statistics.median(p.call_s for p in r[FLOOR])
            out.append(statistics.median(getattr(p, attr) for p in r[name]) / floor)
    return out


def report(
    methods: list[str], skipped: dict[str, str], reps: list[dict[str, list[Pair]]]
) -> tuple[str, list[dict[str, Any]]]:
    lines: list[str] = []
    records: list[dict[str, Any]] = []
    rows: list[list[str]] = []
    parts: list[str] = []
    for name in methods:
        if not any(r.get(name) for r in reps):
            continue
        call, hook, added = (
            Spread.of(per_rep(reps, name, a)) for a in ("call_s", "hook_s", "added_s")
        )
        stall = Spread.of(
            [statistics.median(p.call_s + p.hook_s for p in r[name]) for r in reps if r.get(name)]
        )
        call_x, added_x = (vs_floor(reps, name, a) for a in ("call_s", "added_s"))
        fwd_bwd_added, step_added = (
            Spread.of(per_rep(reps, name, a)) for a in ("fwd_bwd_added_s", "step_added_s")
        )
        parts.append(
            f"- {LABELS[name]}: call {call.median:.3f} s, hook wait {hook.median:.3f} s, "
            f"forward + backward {fwd_bwd_added.median:+.3f} s, optimizer.step() beyond the "
            f"hook wait {step_added.median:+.3f} s"
        )
        rows.append(
            [
                LABELS[name],
                call.text(3),
                Spread.of(call_x).text(2) if call_x else "—",
                hook.text(3),
                added.text(3),
                Spread.of(added_x).text(2) if added_x else "—",
            ]
        )
        records.append(
            {
                "kind": "method",
                "method": name,
                "label": LABELS[name],
                "call_s": call.as_json(),
                "hook_wait_s": hook.as_json(),
                "stall_s": stall.as_json(),
                "added_s": added.as_json(),
                "call_vs_floor": Spread.of(call_x).as_json() if call_x else None,
                "added_vs_floor": Spread.of(added_x).as_json() if added_x else None,
                "fwd_bwd_added_s": fwd_bwd_added.as_json(),
                "step_added_s": step_added.as_json(),
                "pair_samples": [[asdict(p) for p in r[name]] for r in reps if r.get(name)],
            }
        )
    lines.append(
        markdown_table(
            [
                "method",
                "snapshot() call s",
                "call / copy floor",
                "hook wait s",
                "loop added s",
                "added / copy floor",
            ],
            rows,
        )
    )
    lines.append(
        "\nWhere the added time went (medians over the reps; a positive forward + backward is the "
        "background copy and write competing with training):"
    )
    lines += parts
    for name, why in skipped.items():
        lines.append(f"- skipped {LABELS[name]}: {why}")
        records.append({"kind": "skipped", "method": name, "reason": why})

    every = [p for r in reps for ps in r.values() for p in ps]
    fwd_bwd = Spread.of([p.plain_fwd_bwd_s for p in every])
    opt_step = Spread.of([p.plain_step_s for p in every])
    plain = Spread.of([p.plain_s for p in every])
    floors = per_rep(reps, FLOOR, "call_s")
    floor = Spread.of(floors) if floors else None
    over = [
        statistics.median(p.plain_fwd_bwd_s for p in r[FLOOR])
        / statistics.median(p.call_s for p in r[FLOOR])
        for r in reps
        if r.get(FLOOR)
    ]
    compute_longer = bool(over) and statistics.median(over) > 1
    lines.append(
        f"- iteration without a snapshot: {plain.text(3)} s (forward + backward "
        f"{fwd_bwd.text(3)} s, optimizer.step() {opt_step.text(3)} s) on "
        f"{torch.get_num_threads()} torch thread(s); copy floor "
        + (
            f"{floor.text(3)} s; forward + backward / copy floor {Spread.of(over).text(1)}"
            if floor
            else "not measured"
        )
    )
    records.append(
        {
            "kind": "loop",
            "iteration_s": plain.as_json(),
            "fwd_bwd_s": fwd_bwd.as_json(),
            "optimizer_step_s": opt_step.as_json(),
            "copy_floor_s": floor.as_json() if floor else None,
            "fwd_bwd_vs_floor": Spread.of(over).as_json() if over else None,
            "compute_threads": torch.get_num_threads(),
            "copy_threads": "ckptd overlap: the client's one background thread",
        }
    )

    lines.append("\nTargets (ckptd overlap=True):")
    call_x = vs_floor(reps, CKPTD_OVERLAP, "call_s")
    added_x = vs_floor(reps, CKPTD_OVERLAP, "added_s")
    for what, vals, limit, applies in (
        ("snapshot() call / copy floor", call_x, CALL_TARGET, True),
        ("loop added time / copy floor", added_x, ADDED_TARGET, compute_longer),
    ):
        if not vals:
            lines.append(f"- {what}: not measured")
            continue
        value = statistics.median(vals)
        met = value <= limit
        note = "" if applies else " (forward + backward did not take longer than the copy)"
        lines.append(
            f"- {what}: {value:.2f}x (target <= {limit:g}x): {'met' if met else 'MISSED'}{note}"
        )
        records.append(
            {
                "kind": "target",
                "name": f"overlap {what}",
                "value": value,
                "limit": limit,
                "met": met,
                "applies": applies,
            }
        )
    return "\n".join(lines), records


# ---- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--size", default="1GiB", choices=list(SIZES), help="state size")
    add_run_args(
        ap,
        quick="a 4 MiB state, 1 rep of 1 pair per method (smoke test)",
        reps="kept repetitions (default 3; quick 1)",
    )
    ap.add_argument("--pairs", type=int, default=None, help="pairs per method and rep (default 4)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per iteration")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 32)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)"
    )
    ap.add_argument(
        "--root",
        type=Path,
        default=None,
        help="directory for the checkpoints (a fresh subdirectory is made and removed); default: "
        "$TMPDIR (/tmp) if it is on a disk, else /work",
    )
    ap.add_argument(
        "--methods",
        default="",
        help=f"comma-separated methods (default all: {', '.join(METHODS)}); the floor always runs",
    )
    add_quiet_args(ap)
    args = ap.parse_args(argv)
    tag = "quick" if args.quick else args.size
    reps = reps_of(args, 3)
    pairs = args.pairs if args.pairs is not None else (1 if args.quick else 4)
    seq = args.seq if args.seq is not None else (8 if args.quick else 32)
    if reps < 1 or pairs < 1 or seq < 1 or args.batch < 1:
        ap.error("--reps, --pairs, --batch and --seq must be >= 1")
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()] or METHODS
    unknown = set(wanted) - set(METHODS)
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; known: {', '.join(METHODS)}")
    methods = [m for m in METHODS if m in wanted or m == FLOOR]
    skipped: dict[str, str] = {}
    if CKPTD_OVERLAP in methods and not overlap_supported():
        methods.remove(CKPTD_OVERLAP)
        skipped[CKPTD_OVERLAP] = "this ckptd client has no snapshot(..., overlap=)"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out_path = args.out or RESULTS_DIR / f"overlap_bench-{tag}.jsonl"
    drop_ckptd_env()
    quiet = quiet_of(args)

    parent = (args.root or default_parent()).absolute()
    info = run_info("overlap_bench", args.quick)
    info.update(size=tag, reps=reps, pairs=pairs, batch=args.batch, seq=seq)
    started = time.perf_counter()
    loop = Loop(QUICK if args.quick else SIZES[args.size], args.batch, seq)
    log(
        f"state: {loop.n_params / 1e6:.1f}M params, {len(loop.tensors)} tensors, "
        f"{loop.state_bytes / MB:.0f} MB, built in {time.perf_counter() - started:.1f}s; "
        f"{torch.get_num_threads()} torch thread(s)"
    )
    info.update(params=loop.n_params, tensors=len(loop.tensors), state_bytes=loop.state_bytes)
    with scratch(parent, "ckptd-overlap-bench-") as root, scratch(Path("/tmp"), "cko-") as sd:
        info.update(root=str(root), filesystem=mount_of(root))
        bench = Bench(loop, root, sd, methods, pairs, quiet)
        try:
            bench.start()
            # Quiet is applied per pair (Bench.pair); the reps themselves are never redone.
            done = repeat(reps, True, Quiet(), bench.one_rep)
        finally:
            stopped = bench.close()
    text, records = report(methods, skipped, done.reps)
    info.update(
        loadavg_end=list(os.getloadavg()),
        foreign_cpu=done.foreign,
        redone_pairs=bench.redone,
        daemon_stopped=stopped,
    )
    write_records(out_path, info, records)
    print(
        f"\n### Loop benchmark: {loop.state_bytes / MB:.0f} MB state "
        f"({loop.n_params / 1e6:.1f}M params + AdamW, {len(loop.tensors)} tensors) trained at "
        f"batch {args.batch} x {seq} tokens, median [min-max] of {len(done.reps)} rep(s) of "
        f"{pairs} pair(s) per method\n\n"
        f"root: {info['root']} ({info['filesystem']}); per rep: medians over the pairs, ratios "
        "to the same rep's copy floor; loop added = (snapshot call + next iteration) - an "
        "iteration alone; hook wait = the optimizer step pre-hook's wait for the overlapped copy\n"
    )
    print(text)
    print(
        f"\nother processes' CPU use per rep: {', '.join(map(show_cpu, done.foreign))} "
        f"({bench.redone} pair(s) redone because of them)"
    )
    print(f"\ndaemon stopped: {'yes' if stopped else 'NO'}; results: {out_path}")
    return 0 if stopped else 1


if __name__ == "__main__":
    sys.exit(main())
