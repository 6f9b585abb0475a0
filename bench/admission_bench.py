"""Admission benchmark: how long the daemon stops answering while the disk guard admits snapshots.

When free space is short, admitting a snapshot makes the disk guard read every manifest of every
job on the filesystem (retention decides what may go). Before the integrity fix that ran on the
daemon's asyncio loop, so every client's requests waited for it; now it runs on a control thread
(``Daemon.admit``, ``Connection.blocking``). This script measures both in one run, interleaved:
the daemon of the working tree (``new``) and the daemon of a git ref (``old``, default
:data:`BASELINE`, the last commit before the fix), each from its own source tree.

Set-up (outside the timing): a root with ``--jobs`` jobs (default 50) of ``--checkpoints``
checkpoints each (default 100), tiny states. The first job is written with
``ckptd_client.save``; the others are copies of it whose manifests name their own job (re-signed
with :func:`ckptd.format.manifest.sign_manifest`), so every manifest is a valid, verifiable one.
Each daemon gets its own copy of the root. Two daemons per code (each a ``BenchDaemon`` started
from its code's source tree):

* ``guard``: ``[disk] min_free_bytes`` = the size of the root's filesystem, so free space minus
  any snapshot is always below it, and ``[retention] keep_last`` = ``--checkpoints``, so nothing
  is deletable: every admission scans every manifest, deletes nothing and is refused with
  ``DiskFullError``. That is the steady state of a full disk and repeats exactly; an admission
  that also deletes and collects garbage would hold the old loop longer (not measured here);
* ``common``: the default config (the guard only calls ``statvfs``): every snapshot is admitted
  and committed. This is the common path, where moving admission to a thread costs a thread hop.

A rep runs the four (code, mode) cells in an order that rotates each rep. In a cell, a client
process of the same source tree as the daemon (``Client(slots=1)``; the old daemon needs the old
protocol) connects, takes one untimed snapshot (it creates the shared-memory slot), then
``--snapshots`` snapshots of a 1 KiB state one after the other, waiting for each outcome (outside
the timing). ``admission`` = the wall time of ``snapshot()``, which returns once the daemon has
accepted or refused it. Meanwhile this process sends ``{"op": "status"}`` on its own connection
every ``--probe-ms`` (default 5 ms) and times each reply: ``status`` latency while the client
snapshots is how long the daemon's loop could not answer; ``idle`` is the same during the
``IDLE_S`` before the client process starts (the reference). Figures are median [min-max] over
the reps; ``old / new`` is computed per rep, then its median [min-max] is shown.

Run: ``.venv/bin/python -m bench.admission_bench [--jobs 50] [--checkpoints 100] [--snapshots 20]
[--reps 5] [--baseline REF|none] [--quick]``; results go to ``bench/results/admission_bench.jsonl``
(``admission_bench-quick.jsonl`` for ``--quick``: 3 jobs x 5 checkpoints, 5 snapshots, 2 reps).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `ckptd` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import ckptd_client
from bench._common import (
    REPO,
    BenchDaemon,
    Spread,
    add_quiet_args,
    add_run_args,
    bench_parser,
    default_out,
    drop_ckptd_env,
    log,
    markdown_table,
    quiet_of,
    repeat,
    reps_of,
    rotated,
    run_info,
    scratch,
    show_cpu,
    write_records,
)
from ckptd.format.manifest import sign_manifest
from ckptd.launch import private_env
from ckptd.protocol import close_fds, recv_message, send_message

BASELINE = "a5752be^"
"""The commit before the integrity fix (a5752be), which moved admission and ``hello`` off the
event loop."""

NEW, OLD = "new", "old"
GUARD, COMMON = "guard", "common"
FIRST_JOB = "j000"
STATE_FLOATS = 256
"""The snapshotted state: one float32 tensor of 1 KiB."""
IDLE_S = 0.5
"""Seconds of status probes before the client process starts: the idle reference."""

SNAPSHOTTER = textwrap.dedent(
    """
    import json, logging, sys, time
    import torch
    from ckptd_client.client import Client

    sock, root, job = sys.argv[1:4]
    n, first_step, floats = (int(a) for a in sys.argv[4:7])
    logging.disable(logging.WARNING)  # the old client logs every refusal
    state = {"w": torch.zeros(floats)}
    t_connect = time.monotonic()
    client = Client(job, socket=sock, root=root, spawn=False, slots=1, timeout_s=600)
    connect_s = time.monotonic() - t_connect

    def one(step):
        state["w"].fill_(float(step))
        t = time.perf_counter()
        handle = client.snapshot(state=state, step=step)
        took = time.perf_counter() - t
        try:
            handle.wait(600)
            return took, "committed"
        except Exception as exc:
            return took, type(exc).__name__

    one(first_step)  # untimed: creates and registers the slot
    start = time.monotonic()
    runs = [one(first_step + 1 + i) for i in range(n)]
    end = time.monotonic()
    client.close()
    print(json.dumps({
        "t_connect": t_connect, "connect_s": connect_s, "start": start, "end": end,
        "admission_s": [r[0] for r in runs], "outcomes": [r[1] for r in runs],
    }))
    """
)


# ---- source trees and daemons ------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """A source tree holding ``ckptd/`` and ``client/ckptd_client/``: the working tree (REPO) or
    an extracted git ref."""

    code: str
    path: Path
    ref: str

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` with this tree first on ``PYTHONPATH`` (``python -c`` also puts the working
        directory first: run it from ``path``)."""
        env = dict(base)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(self.path), str(self.path / "client"), base.get("PYTHONPATH")])
        )
        return env

    def start_daemon(self, label: str, sock: Path, root: Path, config: Path) -> BenchDaemon:
        """This tree's daemon, started from the tree with the tree first on ``PYTHONPATH``. Its
        ``status()`` would ask with the working tree's CLI, which may not speak an old daemon's
        protocol: send a raw ``{"op": "status"}`` instead (:class:`StatusProber`)."""
        env = self.env(private_env())
        return BenchDaemon(label, sock, root, config, env=env, cwd=self.path)


def extract_ref(ref: str, dest: Path) -> Tree:
    """``ckptd/`` and ``client/`` as of git ``ref``, extracted under ``dest`` (``git archive``:
    read-only on the repository, nothing to unregister afterwards)."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tar = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", sha, "ckptd", "client"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(dest, filter="data")
    return Tree(OLD, dest, f"{ref} ({sha[:12]})")


# ---- the root ----------------------------------------------------------------------------------


def build_root(root: Path, jobs: int, checkpoints: int) -> None:
    """``jobs`` jobs of ``checkpoints`` tiny checkpoints each under ``root`` (see the module
    docstring: one job saved, the others copies with their own job name, re-signed)."""
    for step in range(1, checkpoints + 1):
        state = {"w": torch.full((STATE_FLOATS,), float(step))}
        ckptd_client.save(FIRST_JOB, state=state, step=step, root=root, rng=False)
    source = root / FIRST_JOB
    for i in range(1, jobs):
        job = f"j{i:03d}"
        shutil.copytree(source, root / job, symlinks=True)
        for manifest in (root / job / "manifests").glob("*.json"):
            data = manifest.read_bytes()
            old_field, new_field = f'"job": "{FIRST_JOB}"'.encode(), f'"job": "{job}"'.encode()
            if data.count(old_field) != 1:
                raise RuntimeError(f"{manifest}: expected one {old_field!r}")
            manifest.write_bytes(sign_manifest(data.replace(old_field, new_field)))


def guard_config(root: Path, checkpoints: int) -> str:
    """A config whose disk guard triggers on every admission and whose retention keeps all."""
    st = os.statvfs(root)
    fs_bytes = st.f_blocks * st.f_frsize
    return f"[disk]\nmin_free_bytes = {fs_bytes}\n[retention]\nkeep_last = {checkpoints}\n"


# ---- measuring ---------------------------------------------------------------------------------


class StatusProber:
    """Sends ``{"op": "status"}`` on one connection of its own every ``period_s`` from a thread
    and records ``(monotonic send time, seconds until the reply)`` per request. A reply that is
    late delays the next request (one request in flight at a time)."""

    def __init__(self, sock_path: Path, period_s: float) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, float]] = []
        self.error: BaseException | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.settimeout(600)
        self._sock.connect(str(sock_path))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-prober", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                sent = time.monotonic()
                send_message(self._sock, {"op": "status"})
                reply, fds = recv_message(self._sock)
                took = time.monotonic() - sent
                close_fds(fds)
                if reply is None or reply.get("op") != "status":
                    raise RuntimeError(f"status probe: unexpected reply {reply!r:.300}")
                self.samples.append((sent, took))
                self._stop.wait(max(0.0, sent + self.period_s - time.monotonic()))
        except BaseException as exc:  # raised again by __exit__
            self.error = exc

    def __enter__(self) -> StatusProber:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(660)
        self._sock.close()
        if self.error is not None:
            raise RuntimeError(f"status probe failed: {self.error!r}") from self.error


def p99(values: Sequence[float]) -> float:
    """Nearest-rank 99th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass
class Cell:
    """One (code, mode) cell of one rep."""

    code: str
    mode: str
    admission_s: list[float]
    outcomes: list[str]
    connect_s: float
    status_s: list[float]
    """Latencies of the status requests sent while the client snapshotted."""
    idle_s: list[float]
    """Latencies of the status requests answered before the client process started."""

    def record(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "mode": self.mode,
            "admission_s": self.admission_s,
            "outcomes": self.outcomes,
            "connect_s": self.connect_s,
            "status_probes": len(self.status_s),
            "status_worst_s": max(self.status_s),
            "status_p99_s": p99(self.status_s),
            "status_median_s": statistics.median(self.status_s),
            "idle_probes": len(self.idle_s),
            "idle_p99_s": p99(self.idle_s) if self.idle_s else None,
        }


@dataclass
class Setup:
    trees: dict[str, Tree]
    daemons: dict[tuple[str, str], BenchDaemon]
    roots: dict[tuple[str, str], Path]
    snapshots: int
    probe_s: float
    client_env: dict[str, str]
    steps: dict[tuple[str, str], int] = field(default_factory=dict)

    def cell(self, code: str, mode: str) -> Cell:
        """Run one client against the ``(code, mode)`` daemon while probing its status."""
        key = (code, mode)
        tree, daemon = self.trees[code], self.daemons[key]
        first = self.steps.get(key, 1)
        self.steps[key] = first + self.snapshots + 1
        job = FIRST_JOB if mode == GUARD else "common"
        args = [str(daemon.socket), str(self.roots[key]), job]
        args += [str(self.snapshots), str(first), str(STATE_FLOATS)]
        with StatusProber(daemon.socket, self.probe_s) as prober:
            time.sleep(IDLE_S)
            launched = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-c", SNAPSHOTTER, *args],
                cwd=tree.path,
                env=tree.env(self.client_env),
                capture_output=True,
                text=True,
                timeout=3600,
                check=False,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"{code} {mode} client failed:\n{proc.stdout}\n{proc.stderr}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        during = [took for sent, took in prober.samples if run["start"] <= sent <= run["end"]]
        idle = [took for sent, took in prober.samples if sent + took < launched]
        if not during:
            raise RuntimeError(f"{code} {mode}: no status probe while the client snapshotted")
        want = "DiskFullError" if mode == GUARD else "committed"
        wrong = [o for o in run["outcomes"] if o != want]
        if wrong:
            raise RuntimeError(f"{code} {mode}: expected every snapshot {want}, got {wrong}")
        return Cell(code, mode, run["admission_s"], run["outcomes"], run["connect_s"], during, idle)


# ---- report ------------------------------------------------------------------------------------

FIGURES: list[tuple[str, str, str]] = [
    # (name, mode, what) ; what selects the per-cell value
    ("status latency during guarded admissions, worst", GUARD, "status_worst"),
    ("status latency during guarded admissions, p99", GUARD, "status_p99"),
    ("admission (refused after the guard's scan), worst", GUARD, "admission_worst"),
    ("admission (refused after the guard's scan), median", GUARD, "admission_median"),
    ("snapshot(), guard not triggered, median", COMMON, "admission_median"),
    ("status latency during normal snapshots, worst", COMMON, "status_worst"),
    ("status latency while idle, p99", GUARD, "idle_p99"),
]


def value(cell: Cell, what: str) -> float:
    if what == "status_worst":
        return max(cell.status_s)
    if what == "status_p99":
        return p99(cell.status_s)
    if what == "admission_worst":
        return max(cell.admission_s)
    if what == "admission_median":
        return statistics.median(cell.admission_s)
    if what == "idle_p99":
        return p99(cell.idle_s) if cell.idle_s else math.nan
    raise ValueError(what)


def report(reps: list[dict[tuple[str, str], Cell]], codes: Sequence[str]) -> tuple[str, list[Any]]:
    """The markdown table (ms) and the figure records."""
    headers = ["figure (ms)", *(f"{c}" for c in codes)]
    if OLD in codes:
        headers.append("old / new")
    rows, records = [], []
    for name, mode, what in FIGURES:
        per_code = {c: [value(rep[c, mode], what) for rep in reps] for c in codes}
        row = [name]
        rec: dict[str, Any] = {"kind": "figure", "name": name, "mode": mode, "unit": "s"}
        for c in codes:
            vals = [v for v in per_code[c] if not math.isnan(v)]
            spread = Spread.of(vals) if vals else None
            row.append(spread.text(2, 1e3) if spread else "?")
            rec[c] = spread.as_json() if spread else None
        if OLD in codes:
            ratios = [
                o / n
                for o, n in zip(per_code[OLD], per_code[NEW], strict=True)
                if n > 0 and not math.isnan(o + n)
            ]
            ratio = Spread.of(ratios) if ratios else None
            row.append(ratio.text(2) if ratio else "?")
            rec["ratio_old_over_new"] = ratio.as_json() if ratio else None
        rows.append(row)
        records.append(rec)
    return markdown_table(headers, rows), records


# ---- main --------------------------------------------------------------------------------------


def log_counts(daemon: BenchDaemon) -> dict[str, int]:
    text = daemon.log.read_text(errors="replace")
    return {
        "refused": text.count("snapshot refused"),
        "guard_skipped_job": text.count("disk guard: skipping job"),
        "tracebacks": text.count("Traceback"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--jobs", type=int, default=None, help="jobs in the root (default 50)")
    ap.add_argument("--checkpoints", type=int, default=None, help="per job (default 100)")
    ap.add_argument("--snapshots", type=int, default=None, help="timed per cell (default 20)")
    add_run_args(
        ap,
        quick="3 jobs x 5 checkpoints, 5 snapshots, 2 reps, no warm-up (smoke test)",
        reps="kept repetitions (default 5)",
    )
    ap.add_argument("--probe-ms", type=float, default=5.0, help="status request period")
    ap.add_argument(
        "--baseline",
        default=BASELINE,
        help=f"git ref of the old code (default {BASELINE}: before the integrity fix), or 'none' "
        "to measure the working tree only",
    )
    ap.add_argument("--dir", type=Path, default=Path("/tmp"), help="parent of the scratch dir")
    add_quiet_args(ap)
    args = ap.parse_args(argv)
    quick = args.quick
    jobs = args.jobs or (3 if quick else 50)
    checkpoints = args.checkpoints or (5 if quick else 100)
    snapshots = args.snapshots or (5 if quick else 20)
    reps = reps_of(args, 5, quick=2)
    out_path = args.out or default_out("admission_bench", quick)
    drop_ckptd_env()

    info = run_info("admission_bench", quick)
    info.update(jobs=jobs, checkpoints=checkpoints, snapshots=snapshots, reps=reps)
    info.update(probe_s=args.probe_ms / 1e3, state_bytes=STATE_FLOATS * 4)
    started: list[BenchDaemon] = []
    stopped = True
    # Sockets live in a short /tmp directory (sun_path is 108 bytes); everything else in --dir.
    with scratch(args.dir, "ckptd-admission-bench-") as work, scratch(Path("/tmp"), "cka-") as sd:
        trees = {NEW: Tree(NEW, REPO, "working tree")}
        if args.baseline != "none":
            trees[OLD] = extract_ref(args.baseline, work / "old-tree")
        codes = [c for c in (OLD, NEW) if c in trees]
        info.update(baseline={c: t.ref for c, t in trees.items()})
        empty = work / "empty.toml"
        empty.touch()
        (work / "xdg" / "ckptd").mkdir(parents=True)
        (work / "xdg" / "ckptd" / "ckptd.toml").touch()
        client_env = private_env() | {
            "CKPTD_CONFIG": str(empty),
            "XDG_CONFIG_HOME": str(work / "xdg"),
        }

        log(f"building {jobs} jobs x {checkpoints} checkpoints under {work}")
        t0 = time.perf_counter()
        build_root(work / "built", jobs, checkpoints)
        info["build_s"] = time.perf_counter() - t0
        guard_toml = work / "guard.toml"
        guard_toml.write_text(guard_config(work / "built", checkpoints))
        info["guard_config"] = guard_toml.read_text()
        roots: dict[tuple[str, str], Path] = {}
        daemons: dict[tuple[str, str], BenchDaemon] = {}
        result: Any = None
        try:
            for code in codes:
                for mode in (GUARD, COMMON):
                    root = work / f"root-{code}-{mode}"
                    if mode == GUARD:
                        shutil.copytree(work / "built", root, symlinks=True)
                    else:
                        root.mkdir()
                    roots[code, mode] = root
                    config = guard_toml if mode == GUARD else empty
                    sock, label = sd / f"{code}-{mode}.sock", f"{code}-{mode}"
                    daemon = trees[code].start_daemon(label, sock, root, config)
                    started.append(daemon)
                    daemons[code, mode] = daemon
            info["daemon_pids"] = {f"{c}-{m}": d.pid for (c, m), d in daemons.items()}
            setup = Setup(trees, daemons, roots, snapshots, args.probe_ms / 1e3, client_env)
            cells = [(c, m) for c in codes for m in (GUARD, COMMON)]

            def one_rep(rep: int) -> dict[tuple[str, str], Cell]:
                done = {}
                for code, mode in rotated(cells, max(rep, 0)):
                    done[code, mode] = setup.cell(code, mode)
                    log(f"  {f'rep {rep + 1}' if rep >= 0 else 'warm-up'}: {code} {mode} done")
                return done

            result = repeat(reps, not quick, quiet_of(args), one_rep)
        finally:
            final = {}
            for daemon in started:
                gone = daemon.stop()
                stopped &= gone
                final[daemon.label] = {"pid": daemon.pid, "stopped": gone, **log_counts(daemon)}
        info["daemons"] = final

    text, figures = report(result.reps, codes)
    info.update(loadavg_end=list(os.getloadavg()), foreign_cpu=result.foreign)
    info["redone_reps"] = result.redone
    cell_records = [
        {"kind": "cell", "rep": i, **cell.record()}
        for i, rep_cells in enumerate(result.reps)
        for cell in rep_cells.values()
    ]
    write_records(out_path, info, [*cell_records, *figures])
    skipped = sum(d["guard_skipped_job"] for d in final.values())
    print(
        f"\n### Admission benchmark: {jobs} jobs x {checkpoints} checkpoints, {snapshots} "
        f"snapshots of a {STATE_FLOATS * 4}-byte state per cell, status every {args.probe_ms:g} "
        f"ms; median [min-max] of {len(result.reps)} rep(s)\n\n"
        + "; ".join(f"{c}: {t.ref}" for c, t in trees.items())
        + "\n"
    )
    print(text)
    print(
        "\nold / new per rep: above 1 the old code is slower. Guarded: every snapshot refused "
        "with DiskFullError after the guard's scan of every manifest; normal: every snapshot "
        "committed. Other processes' CPU use per rep: "
        + ", ".join(show_cpu(f) for f in result.foreign)
        + f" ({result.redone} rep(s) redone)"
    )
    if skipped:
        print(f"\nWARNING: the disk guard skipped {skipped} job(s) it could not read (see logs)")
    print(f"\ndaemons stopped: {'yes' if stopped else 'NO'}; results: {out_path}")
    return 0 if stopped and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
