"""Multi-rank benchmark: how long each rank of a ``torchrun`` job is blocked by a checkpoint, and
how soon the step is committed for the whole job, with ckptd and ``torch.distributed.checkpoint``.

Every world size (``--ranks``, default 2 and 4) is one ``torchrun`` launch (``python -m
torch.distributed.run``, gloo on the CPU, a free port on 127.0.0.1) in which every rank holds the
same DDP-like state: a transformer-like model and its AdamW after one step, ``--size`` bytes of
fp32 tensors per rank (default 64 MiB and 256 MiB, :func:`bench.snapshot_bench.build`). Every rep
first perturbs every tensor in place, the same way on every rank (the replicas stay identical, as
DDP keeps them), so each rep saves new data. Then, in an order that rotates each rep, every rank
(starting together after a barrier; nothing overlaps):

* ``ckptd``: ``client.snapshot(model, opt, step=...)`` on a ``Client(rank=r, world_size=N)``
  whose ``prepare()`` ran at set-up; ranks ``[0, N/2)`` use daemon A, the others daemon B (two
  daemons with their own sockets over one root stand for two nodes). *stall* = the call;
  *commit* = from the first rank's call until the step's global record exists on disk (each rank
  polls for it every 2 ms once ``wait()`` said its own part is durable; the first rank to
  see it counts);
* ``dcp.async_save``: ``async_save(state, storage_writer=FileSystemWriter(dir), ...)`` with the
  thread executor and one ``DefaultStager(StagingOptions(False, False, False, False))`` per state,
  reused (synchronous staging into reused CPU buffers: the best CPU set-up of the snapshot
  bench; pinned memory is ignored without CUDA, non-blocking copies need an accelerator, and
  shared memory only serves the process executor), and ``DefaultSavePlanner(
  enable_plan_caching=True)``. *stall* = until ``async_save`` returns; *commit* = from the first
  rank's call until the first rank's future is done (DCP's coordinator has written ``.metadata``;
  every rank's future resolves after that collective). The reference of every ratio;
* ``dcp.async_save, async staging``: the same with ``use_async_staging=True``: ``async_save``
  returns before the copy is made, so *stall* = until its ``staging_completion`` resolves (the
  state may not be changed before; the call alone is in the JSON as ``call_s``);
* ``dcp.save``: the blocking save with the same writer and planner (*stall* = *commit*).

The dcp methods use their own gloo group, so the bench's barriers never interleave with a save's
collectives. Each method's files are deleted after it (ckptd: ``delete_checkpoint`` and ``gc``).
Ratios are per rep, to ``dcp.async_save`` of the same rep (stall: the median rank of each; commit:
the two commit times), reported as their median over the reps; stall per rank is the median
[min-max] over every rank of every rep, commit the median [min-max] over the reps, after an untimed
warm-up rep. Other processes' CPU use is measured per rep over the bench's whole process tree (the
ranks, the torchrun agent, the daemons), as in :mod:`bench._common`.

Run: ``.venv/bin/python -m bench.ranks_bench [--ranks 2,4] [--size 64MiB,256MiB] [--reps N]
[--quick] [--json]``; results go to ``bench/results/ranks_bench.jsonl``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (torchrun runs it so): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import (
    AsyncCheckpointerType,
    AsyncSaveResponse,
    async_save,
    save,
)

from bench._common import (
    MB,
    REPO,
    RESULTS_DIR,
    BenchDaemon,
    CpuWatch,
    MiB,
    Spread,
    add_quiet_args,
    add_run_args,
    bench_parser,
    drop_ckptd_env,
    log,
    markdown_table,
    mount_of,
    reps_of,
    rotated,
    run_info,
    scratch,
    show_cpu,
    write_records,
)
from bench.snapshot_bench import SIZES as SHAPES
from bench.snapshot_bench import Perturber, build, state_of
from bench.states import tensors_of
from ckptd.errors import CkptdError
from ckptd.format.store import Store
from ckptd.launch import private_env
from ckptd.locate import ask_daemon
from ckptd_client import Client

CKPTD = "ckptd"
DCP_ASYNC = "dcp.async"
DCP_STAGED = "dcp.async-staging"
DCP_SAVE = "dcp.save"
LABELS = {
    CKPTD: "ckptd snapshot",
    DCP_ASYNC: "dcp.async_save",
    DCP_STAGED: "dcp.async_save, async staging",
    DCP_SAVE: "dcp.save",
}
ORDER = list(LABELS)
REFERENCE = DCP_ASYNC
SIZES = ("64MiB", "256MiB", "1GiB")
QUICK_SIZE = "quick"
POLL_S = 0.002
"""How often a rank looks for the global record once its own part is durable (each look costs
~20 us of CPU: with 4 ranks polling, ~4% of one core)."""
SAVE_TIMEOUT_S = 600.0
PG_TIMEOUT_S = 900.0
"""How long a rank waits in a collective, beyond ``--quiet-wait`` (a hang, never a speed
limit)."""
LAUNCH_TIMEOUT_S = 3600.0
MAX_REDOS = 5

Record = dict[str, Any]
RankSample = dict[str, Any]
"""One rank's timings of one method in one rep (``time.monotonic()`` seconds: CLOCK_MONOTONIC,
one clock for every process of the machine)."""


# ---- the worker: one rank under torchrun ------------------------------------------------------


class TreeWatch(CpuWatch):
    """:class:`CpuWatch` for the whole bench: ``own`` is the CPU time of the process ``root_pid``
    (the bench's main process) and every process under it, ranks and daemons included."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        super().__init__()

    def _own(self) -> float:  # type: ignore[override]  # the base: a staticmethod, this process
        try:
            top = psutil.Process(self.root_pid)
            t = top.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            procs = top.children(recursive=True)
        except psutil.Error:
            return 0.0
        for proc in procs:
            try:
                c = proc.cpu_times()
            except psutil.Error:
                continue
            total += c.user + c.system
        return float(total)


class Rank:
    """This rank's side of the bench: its state, its ckptd client, the dcp stagers; every method
    is called on every rank at once (the methods' barriers and collectives pair them up)."""

    def __init__(self, plan: Record) -> None:
        self.plan = plan
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.dcp_pg = dist.new_group(backend="gloo")
        self.root = Path(plan["root"])
        self.files = Path(plan["files"])
        self.socket = plan["sockets"][self.rank * len(plan["sockets"]) // self.world]
        self.step = 0

    def log(self, msg: str) -> None:
        if self.rank == 0:
            elapsed = time.monotonic() - self.plan["started"]
            log(f"[{elapsed:5.0f}s, {self.world} ranks] {msg}")

    def barrier(self) -> None:
        dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def settle(self) -> None:
        """Between methods: every rank collects garbage, rank 0 flushes the filesystem (not with
        ``--quick``: a sync also waits for every other process's writes)."""
        gc.collect()
        if self.rank == 0 and self.plan["sync"]:
            os.sync()
        self.barrier()

    def wait_for_quiet(self) -> None:
        """Rank 0 waits (at most ``quiet_wait`` s) for a 2 s window in which processes outside the
        bench used < 10% of the CPUs; the others wait at the barrier."""
        if self.rank == 0 and self.plan["quiet_wait"] > 0:
            start = time.monotonic()
            while time.monotonic() - start < self.plan["quiet_wait"]:
                watch = TreeWatch(self.plan["main_pid"])
                time.sleep(2.0)
                busy = watch.foreign()
                if busy is None or busy < 0.10:
                    break
            if time.monotonic() - start > 3:
                self.log(f"waited {time.monotonic() - start:.0f}s for others to quieten down")
        self.barrier()

    # ---- one state size

    def run_size(self, size: str) -> Record:
        shape = (4 * MiB, 64, 2) if size == QUICK_SIZE else SHAPES[size]
        started = time.monotonic()
        model, opt = build(*shape)  # seeded: the same replica on every rank
        state = state_of(model, opt)
        tensors = list(tensors_of(state))
        state_bytes = sum(t.nbytes for t in tensors)
        params = sum(p.numel() for p in model.parameters())
        self.log(
            f"{size}: {params / 1e6:.1f}M params, {len(tensors)} tensors, "
            f"{state_bytes / MB:.0f} MB per rank, built in {time.monotonic() - started:.1f}s"
        )
        perturb = Perturber(tensors)
        job = f"ranks-w{self.world}-{size}"
        methods = list(self.plan["methods"])
        client = None
        stagers: dict[str, DefaultStager] = {}
        try:
            if CKPTD in methods:
                client = Client(
                    job,
                    socket=self.socket,
                    root=self.root,
                    slots=2,
                    spawn=False,
                    strict=True,
                    rank=self.rank,
                    world_size=self.world,
                    attempt=self.plan["attempt"],
                )
                client.prepare(model, opt, background=False)
            if DCP_ASYNC in methods:
                stagers[DCP_ASYNC] = DefaultStager(StagingOptions(False, False, False, False))
            if DCP_STAGED in methods:
                stagers[DCP_STAGED] = DefaultStager(StagingOptions(False, False, True, False))

            def run(name: str) -> RankSample:
                if name == CKPTD:
                    assert client is not None
                    return self.ckptd(client, job, model, opt)
                return self.dcp(name, job, state, stagers.get(name))

            reps, redone, foreign = self.repeat(methods, run, perturb.__call__)
        finally:
            if client is not None:
                client.close(timeout=SAVE_TIMEOUT_S)
            for stager in stagers.values():
                stager.close()
        return {
            "size": size,
            "job": job,
            "params": params,
            "tensors": len(tensors),
            "state_bytes": state_bytes,
            "reps": reps,
            "redone": redone,
            "foreign_cpu": foreign,
        }

    def repeat(
        self, methods: list[str], run: Callable[[str], RankSample], perturb: Callable[[], None]
    ) -> tuple[list[dict[str, list[RankSample]]], int, list[float | None]]:
        """The reps (after an untimed warm-up unless ``--quick``); on rank 0 each kept rep is
        ``{method: [sample of rank 0, ..., rank N-1]}``. A rep that other processes disturbed
        by more than ``max_foreign`` is done again (at most :data:`MAX_REDOS` times)."""
        kept: list[dict[str, list[RankSample]]] = []
        foreign: list[float | None] = []
        redone = 0
        rep = -1 if self.plan["warmup"] else 0
        while rep < self.plan["reps"]:
            self.wait_for_quiet()
            perturb()
            self.settle()
            watch = TreeWatch(self.plan["main_pid"]) if self.rank == 0 else None
            got: dict[str, list[RankSample]] = {}
            for name in rotated(methods, max(rep, 0)):
                got[name] = self.gather(run(name))
                self.settle()
            busy = watch.foreign() if watch is not None else None
            redo = bool(
                self.rank == 0
                and rep >= 0
                and busy is not None
                and busy > self.plan["max_foreign"]
                and redone < MAX_REDOS
            )
            redo = bool(self.broadcast(redo))
            summary = ", ".join(f"{n} {brief(s)}" for n, s in got.items())
            if rep < 0:
                self.log(f"warm-up rep: {summary} (other processes' CPU {show_cpu(busy)})")
            elif redo:
                redone += 1
                self.log(f"rep {rep + 1}: other processes used {show_cpu(busy)}; doing it again")
                continue
            else:
                kept.append(got)
                foreign.append(busy)
                self.log(f"rep {rep + 1}/{self.plan['reps']}: {summary} ({show_cpu(busy)})")
            rep += 1
        return kept, redone, foreign

    # ---- the methods

    def ckptd(
        self, client: Client, job: str, model: torch.nn.Module, opt: torch.optim.Optimizer
    ) -> RankSample:
        self.step += 1
        step = self.step
        record = Store(self.root).manifest_path(job, step)
        self.barrier()
        t0 = time.monotonic()
        pending = client.snapshot(model, opt, step=step)
        t1 = time.monotonic()
        info = pending.wait(timeout=SAVE_TIMEOUT_S)
        t2 = time.monotonic()
        deadline = t2 + SAVE_TIMEOUT_S
        while not record.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{job} step {step}: no global record after {SAVE_TIMEOUT_S}s")
            time.sleep(POLL_S)
        t3 = time.monotonic()
        self.barrier()
        if self.rank == 0:
            store = Store(self.root)
            store.delete_checkpoint(job, step)
            store.gc(job)
        return {
            "start": t0,
            "stall": t1 - t0,
            "stall_client_s": pending.stall_s,
            "part_durable": t2,
            "seen": t3,
            "step_committed": info.step_committed,
            "persist_s": info.persist_s,
            "written_bytes": info.written_bytes,
            "stored_bytes": info.stored_bytes,
        }

    def dcp(self, name: str, job: str, state: Record, stager: DefaultStager | None) -> RankSample:
        self.step += 1
        where = self.files / f"{job}-{name}-{self.step}"
        writer = FileSystemWriter(where)
        planner = DefaultSavePlanner(enable_plan_caching=True)
        self.barrier()
        t0 = time.monotonic()
        if name == DCP_SAVE:
            save(state, storage_writer=writer, planner=planner, process_group=self.dcp_pg)
            t1 = time.monotonic()
            out = {"start": t0, "stall": t1 - t0, "done": t1}
        else:
            res = async_save(
                state,
                storage_writer=writer,
                planner=planner,
                process_group=self.dcp_pg,
                async_checkpointer_type=AsyncCheckpointerType.THREAD,
                async_stager=stager,
            )
            t1 = time.monotonic()
            safe = t1
            upload: Future[Any]
            if isinstance(res, AsyncSaveResponse):
                res.staging_completion.result(timeout=SAVE_TIMEOUT_S)
                safe = time.monotonic()
                upload = res.upload_completion
            else:
                upload = res
            upload.result(timeout=SAVE_TIMEOUT_S)
            t2 = time.monotonic()
            out = {"start": t0, "stall": safe - t0, "call_s": t1 - t0, "done": t2}
        self.barrier()
        if self.rank == 0:
            shutil.rmtree(where, ignore_errors=True)
        return out


def brief(samples: list[RankSample]) -> str:
    """``stall median/commit`` of one method in one rep, for the progress lines."""
    stall = statistics.median(s["stall"] for s in samples)
    return f"{stall:.3f}/{commit_of(samples):.2f}"


def commit_of(samples: list[RankSample]) -> float:
    """Seconds from the first rank's call until the first rank knew the step was committed."""
    start = min(s["start"] for s in samples)
    end = min(s["seen"] if "seen" in s else s["done"] for s in samples)
    return float(end - start)


def worker(plan_path: Path) -> int:
    """One rank: run every size of the plan; rank 0 writes the samples to ``plan["result"]``."""
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    # Rank 0 may wait up to quiet_wait s for a quiet machine while the others wait in a barrier.
    timeout_s = PG_TIMEOUT_S + plan["quiet_wait"]
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    try:
        me = Rank(plan)
        runs = []
        for size in plan["sizes"]:
            runs.append(me.run_size(size))
            gc.collect()  # the state of this size goes before the next is built
        if me.rank == 0:
            Path(plan["result"]).write_text(json.dumps({"runs": runs}), encoding="utf-8")
        me.barrier()
        me.log("done")
    finally:
        dist.destroy_process_group()
    return 0


# ---- the main process: daemons, torchrun, report ----------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_daemons(sock_dir: Path, root: Path, config: Path | None) -> list[BenchDaemon]:
    """Daemons A and B over one ``root`` (two nodes sharing a filesystem), started side by side;
    if one fails to start, the other is stopped before the error is raised."""
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(BenchDaemon, label, sock_dir / f"{label}.sock", root, config)
            for label in ("A", "B")
        ]
    started: list[BenchDaemon] = []
    failed: BaseException | None = None
    for future in futures:
        try:
            started.append(future.result())
        except Exception as exc:
            failed = exc
    if failed is not None:
        for d in started:
            d.stop()
        raise failed
    for d in started:
        log(f"daemon {d.label} pid {d.pid}")
    return started


def stop_daemon(d: BenchDaemon) -> Record:
    """``d``'s last status (pid, commits, failures; asked in-process, as ``ckptd status`` asks),
    then stop it: ``stopped`` says whether it drained and exited by itself."""
    try:
        st = ask_daemon(d.socket, {"op": "status", "id": 1}).message
        out: Record = {k: st.get(k) for k in ("pid", "commits", "failures")}
    except (OSError, CkptdError) as exc:
        out = {"pid": d.pid, "status_error": str(exc)}
    out["stopped"] = d.stop()
    log(f"daemon {d.label} {'stopped' if out['stopped'] else 'did NOT stop cleanly'}")
    return out


def stop_daemons(daemons: Sequence[BenchDaemon]) -> dict[str, Record]:
    """:func:`stop_daemon` for every daemon, side by side."""
    with ThreadPoolExecutor(max(1, len(daemons))) as pool:
        results = list(pool.map(stop_daemon, daemons))
    return {d.label: r for d, r in zip(daemons, results, strict=True)}


def launch(world: int, plan: Record, sock_dir: Path, env: dict[str, str]) -> Record:
    """One ``torchrun --nproc-per-node world`` of the worker; its samples."""
    plan_path = sock_dir / f"plan-{world}.json"
    result = sock_dir / f"result-{world}.json"
    plan = {**plan, "result": str(result)}
    plan_path.write_text(json.dumps(plan), encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(world),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        str(plan_path),
    ]
    log(f"launching {world} ranks: {' '.join(cmd[1:])}")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True
    )
    started = time.monotonic()
    try:
        code = proc.wait(timeout=LAUNCH_TIMEOUT_S)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks (the session it leads)
        proc.wait()
        raise
    if code != 0:
        raise RuntimeError(f"torchrun with {world} ranks exited with {code} (its output above)")
    log(f"torchrun with {world} ranks exited after {time.monotonic() - started:.0f}s")
    out: Record = json.loads(result.read_text(encoding="utf-8"))
    return out


def ratio_spread(
    reps: list[dict[str, list[RankSample]]], name: str, what: Callable[[list[RankSample]], float]
) -> Spread | None:
    vals = [what(r[name]) / what(r[REFERENCE]) for r in reps if name in r and REFERENCE in r]
    return Spread.of(vals) if vals else None


def median_stall(samples: list[RankSample]) -> float:
    return float(statistics.median(s["stall"] for s in samples))


def summarize(world: int, run: Record, methods: list[str]) -> list[Record]:
    """The JSON records of one world size and state size."""
    reps: list[dict[str, list[RankSample]]] = run["reps"]
    out: list[Record] = []
    for name in methods:
        got = [r[name] for r in reps if name in r]
        if not got:
            continue
        stall = Spread.of([s["stall"] for samples in got for s in samples])
        slowest = Spread.of([max(s["stall"] for s in samples) for samples in got])
        commit = Spread.of([commit_of(samples) for samples in got])
        stall_ratio = ratio_spread(reps, name, median_stall)
        commit_ratio = ratio_spread(reps, name, commit_of)
        rec: Record = {
            "kind": "method",
            "world_size": world,
            "size": run["size"],
            "state_bytes": run["state_bytes"],
            "method": name,
            "label": LABELS[name],
            "stall_s": stall.as_json(),
            "slowest_rank_stall_s": slowest.as_json(),
            "commit_s": commit.as_json(),
            "stall_vs_ref": stall_ratio.as_json() if stall_ratio else None,
            "commit_vs_ref": commit_ratio.as_json() if commit_ratio else None,
            "per_rank_stall_s": [
                Spread.of([samples[r]["stall"] for samples in got]).as_json() for r in range(world)
            ],
        }
        if name == CKPTD:
            last = [max(s["part_durable"] for s in g) - min(s["start"] for s in g) for g in got]
            rec["last_part_durable_s"] = Spread.of(last).as_json()
            rec["commit_after_last_part_s"] = Spread.of(
                [commit_of(g) - lp for g, lp in zip(got, last, strict=True)]
            ).as_json()
            rec["written_bytes_per_step"] = Spread.of(
                [float(sum(s["written_bytes"] for s in g)) for g in got]
            ).as_json()
            rec["committed_by_a_part"] = sum(any(s["step_committed"] for s in g) for g in got)
            rec["persist_s"] = Spread.of([s["persist_s"] for g in got for s in g]).as_json()
        if any("call_s" in s for g in got for s in g):
            rec["call_s"] = Spread.of([s["call_s"] for g in got for s in g]).as_json()
        out.append(rec)
    out.append(
        {
            "kind": "run",
            "world_size": world,
            "size": run["size"],
            "state_bytes": run["state_bytes"],
            "params": run["params"],
            "reps": len(reps),
            "redone_reps": run["redone"],
            "foreign_cpu": run["foreign_cpu"],
        }
    )
    return out


def spread_text(s: Record | None, digits: int) -> str:
    if not s:
        return "—"
    if len(s["reps"]) == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def ratio_text(s: Record | None) -> str:
    return "—" if not s else f"{s['median']:.2f}"


def table(records: Sequence[Record]) -> str:
    """The results table, from the ``method`` records (also what the README shows)."""
    rows = []
    for rec in records:
        if rec.get("kind") != "method":
            continue
        rows.append(
            [
                str(rec["world_size"]),
                f"{rec['size']} ({rec['state_bytes'] / MB:.0f} MB)",
                rec["label"],
                spread_text(rec["stall_s"], 3),
                ratio_text(rec["stall_vs_ref"]),
                spread_text(rec["commit_s"], 2),
                ratio_text(rec["commit_vs_ref"]),
            ]
        )
    return markdown_table(
        [
            "ranks",
            "state per rank",
            "method",
            "stall per rank s",
            "stall x dcp.async_save",
            "to global commit s",
            "commit x dcp.async_save",
        ],
        rows,
    )


def notes(records: Sequence[Record]) -> list[str]:
    lines = []
    for rec in records:
        where = f"{rec.get('world_size')} ranks, {rec.get('size')}"
        if rec.get("kind") == "method" and rec["method"] == CKPTD:
            lines.append(
                f"- ckptd, {where}: the last rank's wait() returned (its part durable) at "
                f"{spread_text(rec['last_part_durable_s'], 2)} s, the global record existed at "
                f"{spread_text(rec['commit_s'], 2)} s; "
                f"{rec['committed_by_a_part']}/{len(rec['commit_s']['reps'])} steps committed "
                f"by the daemon that wrote their last part (the others by a recheck); daemons' "
                f"persist_s per part {spread_text(rec['persist_s'], 2)}; bytes written per "
                f"step {rec['written_bytes_per_step']['median'] / MB:.0f} MB for "
                f"{rec['world_size']} replicas of {rec['state_bytes'] / MB:.0f} MB; slowest "
                f"rank's stall {spread_text(rec['slowest_rank_stall_s'], 3)} s"
            )
        elif rec.get("kind") == "method" and "call_s" in rec:
            lines.append(
                f"- {rec['label']}, {where}: async_save returned after "
                f"{spread_text(rec['call_s'], 3)} s; slowest rank's stall "
                f"{spread_text(rec['slowest_rank_stall_s'], 3)} s"
            )
        elif rec.get("kind") == "run":
            lines.append(
                f"- {where}: other processes' CPU use per rep "
                f"{', '.join(map(show_cpu, rec['foreign_cpu']))} ({rec['redone_reps']} redone)"
            )
    return lines


def default_parent() -> Path:
    """/tmp unless it is a RAM filesystem, else /work: checkpoints must go to the real disk."""
    for cand in (Path(tempfile.gettempdir()), Path("/work"), REPO):
        if cand.is_dir() and os.access(cand, os.W_OK) and "tmpfs" not in mount_of(cand):
            return cand
    return REPO


def parse_list(text: str, what: str, allowed: Sequence[str] | None = None) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{what}: empty list")
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{what}: unknown {bad}; known: {list(allowed)}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument(
        "--ranks", default="2,4", help="world sizes, one torchrun launch each (default 2,4)"
    )
    ap.add_argument(
        "--size",
        default="64MiB,256MiB",
        help=f"state per rank, comma-separated ({', '.join(SIZES)}; default 64MiB,256MiB)",
    )
    add_run_args(
        ap,
        quick="a 4 MiB state per rank, 1 rep, no warm-up (smoke test)",
        reps="kept repetitions (default 5; quick 1)",
    )
    ap.add_argument(
        "--root",
        type=Path,
        default=None,
        help="directory for the checkpoints (a fresh subdirectory is made and removed); default: "
        "$TMPDIR (/tmp) if it is on a disk, else /work",
    )
    ap.add_argument(
        "--skip", default="", help=f"comma-separated methods to leave out ({', '.join(ORDER[1:])})"
    )
    ap.add_argument(
        "--daemon-config",
        type=Path,
        default=None,
        metavar="TOML",
        help="config file of both daemons (default: none, the built-in defaults)",
    )
    ap.add_argument("--json", action="store_true", help="print the records as JSON, no table")
    add_quiet_args(ap)
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    try:
        worlds = [int(w) for w in parse_list(args.ranks, "--ranks")]
        sizes = [QUICK_SIZE] if args.quick else parse_list(args.size, "--size", SIZES)
        skip = set(parse_list(args.skip, "--skip", ORDER[1:])) if args.skip.strip() else set()
    except (argparse.ArgumentTypeError, ValueError) as exc:
        ap.error(str(exc))
    if any(w < 2 for w in worlds):
        ap.error("--ranks: every world size must be >= 2")
    methods = [m for m in ORDER if m not in skip]
    reps = reps_of(args, 5)
    out_path = args.out or RESULTS_DIR / f"ranks_bench{'-quick' if args.quick else ''}.jsonl"
    drop_ckptd_env()
    env = private_env()
    parent = (args.root or default_parent()).absolute()
    info = run_info("ranks_bench", args.quick)
    info.update(world_sizes=worlds, sizes=sizes, reps=reps, methods=methods)
    if args.daemon_config is not None:
        args.daemon_config = args.daemon_config.absolute()
        info["daemon_config"] = args.daemon_config.read_text(encoding="utf-8")
    records: list[Record] = []
    final: dict[str, Any] = {}
    with scratch(parent, "ckptd-ranks-bench-") as root, scratch(Path("/tmp"), "ckr-") as sd:
        info.update(root=str(root), filesystem=mount_of(root))
        log(f"root {root} ({mount_of(root)})")
        (root / "files").mkdir()
        daemons: list[BenchDaemon] = []
        try:
            daemons = start_daemons(sd, root / "store", args.daemon_config)
            info["daemon_pids"] = {d.label: d.pid for d in daemons}
            plan = {
                "sizes": sizes,
                "reps": reps,
                "warmup": not args.quick,
                "sync": not args.quick,
                "methods": methods,
                "sockets": [str(d.socket) for d in daemons],
                "root": str(root / "store"),
                "files": str(root / "files"),
                "quiet_wait": args.quiet_wait,
                "max_foreign": args.max_foreign,
                "main_pid": os.getpid(),
                "started": time.monotonic(),
            }
            for world in worlds:
                plan["attempt"] = f"bench-{uuid.uuid4().hex[:12]}"
                got = launch(world, plan, sd, env)
                for run in got["runs"]:
                    records.extend(summarize(world, run, methods))
        finally:
            final = stop_daemons(daemons)
    info.update(loadavg_end=list(os.getloadavg()))
    records.append({"kind": "daemons", "daemons": final})
    write_records(out_path, info, records)
    stopped = all(d.get("stopped") for d in final.values())
    if args.json:
        print(json.dumps({"info": info, "records": records}, indent=1, sort_keys=True))
        return 0 if stopped else 1
    print(
        f"\n### Multi-rank benchmark: {', '.join(map(str, worlds))} ranks under torchrun (gloo, "
        f"CPU), 2 daemons over one root; median [min-max] of {reps} rep(s)\n\n"
        f"root: {info['root']} ({info['filesystem']}); stall per rank = the call (async staging: "
        "until staged); commit = first rank's call until the first rank knew the step was "
        "committed (ckptd: its global record exists; dcp: a future resolved); ratios per rep "
        "to dcp.async_save of the same rep\n"
    )
    print(table(records))
    print("\n" + "\n".join(notes(records)))
    print(f"\ndaemons stopped: {'yes' if stopped else 'NO'}; results: {out_path}")
    return 0 if stopped else 1


if __name__ == "__main__":
    sys.exit(main())
