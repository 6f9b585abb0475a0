"""Jobs benchmark: how long a small job waits for durability while a big job is written beside it.

One daemon serves two jobs of two clients (in this process): ``big`` hands off ``--big`` bytes
(default 1 GiB) and ``small`` ``--small`` bytes (default 16 MiB), each one float32 tensor of
random values. Two daemons run side by side, each with its own root:

* ``concurrent``: ``[store] concurrent_jobs = 2`` (the default): the two jobs are written at once,
  sharing the chunk threads and the memory budget;
* ``serial``: ``concurrent_jobs = 1``: one snapshot at a time, first come first served (how the
  daemon wrote before it wrote several jobs at once), for contrast.

Each rep, for each daemon (in an order that rotates with the rep), in an order that also rotates:

* ``big alone``: the big job's snapshot with nothing else written;
* a pair, right one after the other (which first rotates too):

  * ``small alone``: :data:`SMALL_ALONE_SNAPSHOTS` snapshots of the small job, one after the
    other, with nothing else written (their median: the small job's latency is short, so the
    median of a few keeps one disturbed snapshot from setting the reference);
  * ``together``: the big job hands off its snapshot; once the daemon reports it being written,
    the small job hands off its own. Both are waited for.

A job's *durable latency* is from the ``snapshot()`` call (the hand-off) until ``wait()`` returns
(the daemon reported the checkpoint committed: its manifest is durable). Every snapshot first
changes every value of its tensor (so dedup never makes a write free) and every checkpoint is
deleted after its measurement; the filesystem is synced before each (:func:`settle`). The
figure: per rep and daemon, ``small together / small alone``, reported as median [min-max] over the
reps after an untimed warm-up rep; the target is <= 2x for ``concurrent``. The big job's latency
together over alone says what the small job costs it.

Run: ``.venv/bin/python -m bench.jobs_bench [--big 1GiB] [--small 16MiB] [--reps 5] [--quick]
[--root DIR] [--codec auto|zstd|raw]``; results go to ``bench/results/jobs_bench.jsonl``
(``jobs_bench-quick.jsonl`` for ``--quick``: 64 MiB and 4 MiB, 1 rep, no warm-up).
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `ckptd` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._common import (
    BenchDaemon,
    MiB,
    Spread,
    add_quiet_args,
    add_run_args,
    bench_parser,
    default_out,
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
    write_records,
)
from ckptd.format.store import Store
from ckptd.protocol import close_fds, recv_message, send_message
from ckptd.units import parse_size
from ckptd_client import Client, PendingSnapshot

CONCURRENT = "concurrent"
SERIAL = "serial"
DAEMONS = {CONCURRENT: 2, SERIAL: 1}
"""Daemon name -> ``store.concurrent_jobs``."""
BIG_ALONE = "big alone"
PAIR = "small alone + together"
SMALL_ALONE_SNAPSHOTS = 3
BIG, SMALL = "big", "small"
TARGET_RATIO = 2.0
WAIT_S = 3600.0
POLL_S = 0.002


def status(sock: Path) -> dict[str, Any]:
    """The daemon's ``status`` over its socket (no subprocess: this is polled)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.settimeout(30)
        s.connect(str(sock))
        send_message(s, {"op": "status"})
        reply, fds = recv_message(s)
        close_fds(fds)
    if reply is None:
        raise RuntimeError(f"the daemon on {sock} closed the connection on status")
    return reply


def being_written(sock: Path) -> list[str]:
    st = status(sock)
    writes = st.get("writes")
    if writes is None:  # a daemon that writes one job at a time
        writes = [st["writing"]] if st.get("writing") else []
    return [w["job"] for w in writes]


@dataclass
class Timed:
    """One job's snapshot: its durable latency and the daemon's accepted -> committed time."""

    durable_s: float
    persist_s: float


@dataclass
class Together:
    big: Timed
    small: Timed
    small_after_s: float
    """From the big job's ``snapshot()`` call to the small job's."""


@dataclass
class DaemonRep:
    """One daemon's three measurements in one rep."""

    small_alone: Timed | None = None
    big_alone: Timed | None = None
    together: Together | None = None


@dataclass
class Rep:
    cells: dict[str, DaemonRep] = field(default_factory=dict)


class Bench:
    """The two daemons, a big and a small client of each, and the two states."""

    def __init__(
        self, root: Path, sock_dir: Path, big_bytes: int, small_bytes: int, codec: str | None
    ) -> None:
        self.root = root
        self.sock_dir = sock_dir
        g = torch.Generator().manual_seed(0)
        self.states = {
            BIG: {"w": torch.randn(big_bytes // 4, generator=g)},
            SMALL: {"w": torch.randn(small_bytes // 4, generator=g)},
        }
        self.codec = codec
        self.daemons: dict[str, BenchDaemon] = {}
        self.clients: dict[tuple[str, str], Client] = {}
        self.step = 0

    def start(self) -> None:
        for name, concurrent in DAEMONS.items():
            config = self.sock_dir / f"{name}.toml"
            text = f"[store]\nconcurrent_jobs = {concurrent}\n"
            if self.codec:
                text += f'[codec]\ncodec = "{self.codec}"\n'
            config.write_text(text)
            daemon = BenchDaemon(name, self.sock_dir / f"{name}.sock", self.root / name, config)
            self.daemons[name] = daemon
            for job in (BIG, SMALL):
                self.clients[name, job] = Client(
                    job, socket=daemon.socket, root=daemon.root, slots=1, spawn=False, strict=True
                )

    def close(self) -> bool:
        for client in self.clients.values():
            client.close()
        return all([d.stop() for d in self.daemons.values()])

    def _hand_off(self, daemon: str, job: str) -> tuple[float, PendingSnapshot]:
        self.step += 1
        state = self.states[job]
        state["w"].add_(1.0)  # new bytes everywhere: dedup never makes a write free
        t0 = time.perf_counter()
        pending = self.clients[daemon, job].snapshot(state=state, step=self.step, rng=False)
        return t0, pending

    def _done(self, daemon: str, t0: float, pending: PendingSnapshot) -> Timed:
        info = pending.wait(WAIT_S)
        done = time.perf_counter() - t0
        store = Store(self.daemons[daemon].root)
        store.delete_checkpoint(info.job, info.step)
        store.gc(info.job)
        return Timed(done, info.persist_s)

    def alone(self, daemon: str, job: str) -> Timed:
        settle()
        t0, pending = self._hand_off(daemon, job)
        return self._done(daemon, t0, pending)

    def small_alone(self, daemon: str) -> Timed:
        runs = [self.alone(daemon, SMALL) for _ in range(SMALL_ALONE_SNAPSHOTS)]
        return Timed(
            statistics.median(t.durable_s for t in runs),
            statistics.median(t.persist_s for t in runs),
        )

    def together(self, daemon: str) -> Together:
        settle()
        sock = self.daemons[daemon].socket
        t_big, big = self._hand_off(daemon, BIG)
        while BIG not in being_written(sock):
            if big.done():
                raise RuntimeError(f"{daemon}: the big snapshot was done before it was seen")
            time.sleep(POLL_S)
        t_small, small = self._hand_off(daemon, SMALL)
        small_timed = self._done(daemon, t_small, small)
        big_timed = self._done(daemon, t_big, big)
        return Together(big_timed, small_timed, t_small - t_big)

    def rep(self, rep: int) -> Rep:
        out = Rep()
        for daemon in rotated(list(DAEMONS), rep):
            cell = out.cells[daemon] = DaemonRep()
            for mode in rotated([BIG_ALONE, PAIR], rep):
                if mode == BIG_ALONE:
                    cell.big_alone = self.alone(daemon, BIG)
                elif rep % 4 < 2:
                    cell.small_alone = self.small_alone(daemon)
                    cell.together = self.together(daemon)
                else:
                    cell.together = self.together(daemon)
                    cell.small_alone = self.small_alone(daemon)
        return out


# ---- report --------------------------------------------------------------------------------------


def report(
    reps: Sequence[Rep], foreign: Sequence[float | None]
) -> tuple[str, list[dict[str, Any]]]:
    rows = []
    records: list[dict[str, Any]] = []
    for i, rep in enumerate(reps):
        for daemon, cell in rep.cells.items():
            assert cell.small_alone and cell.big_alone and cell.together
            records.append(
                {
                    "kind": "rep",
                    "rep": i,
                    "daemon": daemon,
                    "concurrent_jobs": DAEMONS[daemon],
                    "small_alone_s": cell.small_alone.durable_s,
                    "small_together_s": cell.together.small.durable_s,
                    "big_alone_s": cell.big_alone.durable_s,
                    "big_together_s": cell.together.big.durable_s,
                    "small_persist_alone_s": cell.small_alone.persist_s,
                    "small_persist_together_s": cell.together.small.persist_s,
                    "small_handed_off_after_s": cell.together.small_after_s,
                    "foreign_cpu": foreign[i],
                }
            )
    for daemon, concurrent_jobs in DAEMONS.items():
        mine = [r for r in records if r["daemon"] == daemon]

        def spread(key: str, rows: list[dict[str, Any]] = mine) -> Spread:
            return Spread.of([r[key] for r in rows])

        small_ratio = Spread.of([r["small_together_s"] / r["small_alone_s"] for r in mine])
        big_ratio = Spread.of([r["big_together_s"] / r["big_alone_s"] for r in mine])
        summary = {
            "kind": "summary",
            "daemon": daemon,
            "concurrent_jobs": concurrent_jobs,
            "reps": len(mine),
            "small_alone_s": spread("small_alone_s").as_json(),
            "small_together_s": spread("small_together_s").as_json(),
            "small_ratio": small_ratio.as_json(),
            "big_alone_s": spread("big_alone_s").as_json(),
            "big_together_s": spread("big_together_s").as_json(),
            "big_ratio": big_ratio.as_json(),
            "small_handed_off_after_s": spread("small_handed_off_after_s").as_json(),
            "target_ratio": TARGET_RATIO,
            "target_met": small_ratio.median <= TARGET_RATIO,
        }
        records.append(summary)
        rows.append(
            [
                daemon,
                str(concurrent_jobs),
                spread("small_alone_s").text(0, 1e3),
                spread("small_together_s").text(0, 1e3),
                small_ratio.text(2) + "x",
                spread("big_alone_s").text(2),
                spread("big_together_s").text(2),
                big_ratio.text(2) + "x",
            ]
        )
    headers = [
        "daemon",
        "concurrent_jobs",
        f"small alone (ms, median of {SMALL_ALONE_SNAPSHOTS})",
        "small beside big (ms)",
        "small: beside / alone",
        "big alone (s)",
        "big beside small (s)",
        "big: beside / alone",
    ]
    return markdown_table(headers, rows), records


def default_parent() -> Path:
    """/tmp unless it is a RAM filesystem, else /work: checkpoints must go to the real disk."""
    for cand in (Path(tempfile.gettempdir()), Path("/work")):
        if cand.is_dir() and os.access(cand, os.W_OK) and "tmpfs" not in mount_of(cand):
            return cand
    return Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--big", default=None, help="the big job's state (default 1GiB; quick 64MiB)")
    ap.add_argument("--small", default=None, help="the small job's (default 16MiB; quick 4MiB)")
    ap.add_argument(
        "--codec",
        choices=["auto", "zstd", "raw"],
        default=None,
        help="[codec] codec of both daemons (default: the default config)",
    )
    ap.add_argument(
        "--root",
        type=Path,
        default=None,
        help="where checkpoints are written (a fresh subdirectory is made and removed); default "
        "$TMPDIR (/tmp) unless it is a RAM filesystem",
    )
    add_run_args(
        ap,
        quick="64 MiB beside 4 MiB, 1 rep, no warm-up (smoke)",
        reps="paired repetitions (default 5; quick 1)",
    )
    add_quiet_args(ap)
    args = ap.parse_args(argv)
    big_bytes = parse_size(args.big or ("64MiB" if args.quick else "1GiB"), "--big")
    small_bytes = parse_size(args.small or ("4MiB" if args.quick else "16MiB"), "--small")
    reps = reps_of(args, 5)
    if reps < 1 or small_bytes < 4 or big_bytes < small_bytes:
        ap.error("--reps must be >= 1 and --big at least --small")
    out_path = args.out or default_out("jobs_bench", args.quick)
    drop_ckptd_env()
    parent = (args.root or default_parent()).absolute()
    info = run_info("jobs_bench", args.quick)
    info.update(big_bytes=big_bytes, small_bytes=small_bytes, reps=reps, codec=args.codec)
    with scratch(parent, "ckptd-jobs-bench-") as root, scratch(Path("/tmp"), "ckj-") as sd:
        info.update(root=str(root), filesystem=mount_of(root))
        log(
            f"root {root} ({info['filesystem']}); big {big_bytes / MiB:.0f} MiB, small "
            f"{small_bytes / MiB:.0f} MiB"
        )
        bench = Bench(root, sd, big_bytes, small_bytes, args.codec)
        try:
            bench.start()
            done = repeat(reps, not args.quick, quiet_of(args), bench.rep)
        finally:
            stopped = bench.close()
    text, records = report(done.reps, done.foreign)
    info.update(loadavg_end=list(os.getloadavg()), daemon_stopped=stopped, redone=done.redone)
    write_records(out_path, info, records)
    summary = {r["daemon"]: r for r in records if r["kind"] == "summary"}
    concurrent = summary[CONCURRENT]["small_ratio"]
    print(
        f"\n### Several jobs: a {small_bytes / MiB:.0f} MiB job beside a "
        f"{big_bytes / MiB:.0f} MiB job in one daemon, median [min-max] of {len(done.reps)} "
        f"paired rep(s)\n\n"
        f"root: {info['root']} ({info['filesystem']}); codec: {args.codec or 'default config'}; "
        "durable latency = snapshot() call to wait() returning (manifest durable); beside = the "
        "small job hands off once the daemon reports the big one being written; ratios are per "
        f"rep; other processes' CPU per rep: {', '.join(show_cpu(f) for f in done.foreign)}\n"
    )
    print(text)
    met = "met" if concurrent["median"] <= TARGET_RATIO else "NOT met"
    print(
        f"\ntarget: the small job's durable latency beside the big job <= {TARGET_RATIO:.0f}x "
        f"alone with concurrent_jobs = 2: {met} (median {concurrent['median']:.2f}x)"
    )
    print(f"daemon stopped: {'yes' if stopped else 'NO'}")
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
