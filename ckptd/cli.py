"""``ckptd``: the operators' command line.

Tables for people (rich), ``--json`` for scripts, progress bars on a terminal for long verify and
restore runs. Each error type exits with its own code (see :data:`ckptd.errors.EXIT_CODES`); a
command that finds nothing to act on exits non-zero (6).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from ckptd.config import load_config, resolve_root
from ckptd.errors import (
    CkptdError,
    CorruptCheckpointError,
    DaemonUnavailableError,
    NotFoundError,
    NothingToDoError,
    error_from_reply,
)
from ckptd.manifest import Manifest
from ckptd.prune import job_facts, prune
from ckptd.restore import load_checkpoint, verify_manifest
from ckptd.retention import decide
from ckptd.skeleton import iter_keys
from ckptd.store import Store, validate_job_name

F = TypeVar("F", bound=Callable[..., Any])

# Not a terminal (a pipe, CI): wide enough that tables are not truncated.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def say(console: Console, label: str, style: str, message: str) -> None:
    """Print ``label`` styled and ``message`` verbatim (paths and shapes contain brackets)."""
    console.print(Text.assemble((label, style), " ", message))


def _store(root: str | None, config: str | None) -> Store:
    return Store(resolve_root(root, load_config(config) if root is None else None))


def store_options(func: F) -> F:
    func = click.option(
        "--config",
        "config",
        metavar="FILE",
        default=None,
        help="Config file (default: CKPTD_CONFIG, ~/.config/ckptd/ckptd.toml, "
        "/etc/ckptd/ckptd.toml).",
    )(func)
    return click.option(
        "--root",
        "root",
        metavar="DIR",
        default=None,
        help="Checkpoint root (default: CKPTD_ROOT, then store.root in the config, then "
        "./checkpoints).",
    )(func)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def summary(m: Manifest) -> dict[str, Any]:
    """The ``list --json`` record of a checkpoint."""
    metric = m.metric if m.metric is None or math.isfinite(m.metric) else str(m.metric)
    return {
        "job": m.job,
        "step": m.step,
        "created": m.created,
        "raw_bytes": m.raw_bytes,
        "stored_bytes": m.stored_bytes,
        "written_bytes": m.written_bytes,
        "ratio": round(m.stored_bytes / m.raw_bytes, 4) if m.raw_bytes else None,
        "tensors": len(m.tensors),
        "metric": metric,
    }


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A byte progress bar on a terminal (stderr); no output when not interactive."""
    if not err.is_terminal or total < (64 << 20):
        yield None
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptd")
def cli() -> None:
    """ckptd: asynchronous, crash-safe checkpoints for PyTorch training."""


@cli.command("list")
@click.argument("job", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array for scripts.")
@store_options
def list_cmd(job: str | None, as_json: bool, root: str | None, config: str | None) -> None:
    """List checkpoints (of JOB, or of every job)."""
    cfg = load_config(config)
    store = Store(resolve_root(root, cfg))
    if job is not None:
        validate_job_name(job)
        store.require_steps(job)
    jobs = [job] if job else store.jobs()
    manifests = []
    broken = []
    kept: dict[tuple[str, int], list[str]] = {}
    for j in jobs:
        for step in store.steps(j):
            try:
                manifests.append(store.read_manifest(j, step))
            except CorruptCheckpointError as exc:
                broken.append(str(exc))
        if not broken:
            policy = cfg.policy_for(j, store.job_info(j).get("retention"))
            for step, why in decide(policy, job_facts(store, j)).items():
                kept[(j, step)] = why
    if not manifests and not broken:
        raise NothingToDoError(f"no checkpoints under {store.root}")
    if as_json:
        docs = [summary(m) | {"kept_by": kept.get((m.job, m.step), [])} for m in manifests]
        out.print_json(json.dumps(docs))
    else:
        table = Table(title=f"checkpoints in {store.root}", box=box.HEAVY_HEAD, show_edge=False)
        for col in (
            "job",
            "step",
            "created",
            "raw",
            "stored",
            "ratio",
            "tensors",
            "metric",
            "kept by",
        ):
            table.add_column(
                col,
                justify="left" if col in ("job", "created", "kept by") else "right",
                no_wrap=True,
            )
        rows = []
        for m in manifests:
            s = summary(m)
            rows.append(
                [
                    m.job,
                    str(m.step),
                    m.created.replace("T", " ")[:16],
                    human_bytes(m.raw_bytes),
                    human_bytes(m.stored_bytes),
                    f"{s['ratio']:.3f}" if s["ratio"] is not None else "-",
                    str(len(m.tensors)),
                    "-" if m.metric is None else f"{m.metric:.6g}",
                    ", ".join(kept.get((m.job, m.step), [])) or "(prunable)",
                ]
            )
        # Values never shrink (rich would blank them); job names and "kept by" fold instead.
        for i, column in enumerate(table.columns):
            if i in (0, len(table.columns) - 1):
                column.overflow, column.no_wrap = "fold", False
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        out.print(table)
    for msg in broken:
        say(err, "unreadable manifest:", "red", msg)
    if broken:
        raise CorruptCheckpointError(f"{len(broken)} manifest(s) could not be read")


@cli.command("show")
@click.argument("job")
@click.argument("step")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@store_options
def show_cmd(job: str, step: str, as_json: bool, root: str | None, config: str | None) -> None:
    """Show the tensors and state keys of checkpoint JOB STEP (a number or 'latest')."""
    store = _store(root, config)
    m = store.read_manifest(job, store.resolve_step(job, step))
    keys = iter_keys(m.skeleton)
    if as_json:
        doc = summary(m) | {
            "tensors": [
                {"path": t.path, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
                for t in m.tensors
            ],
            "keys": keys,
        }
        out.print_json(json.dumps(doc))
        return
    s = summary(m)
    out.print(
        f"{m.job} step {m.step}  created {m.created}  {len(m.tensors)} tensors  "
        f"raw {human_bytes(m.raw_bytes)}  stored {human_bytes(m.stored_bytes)} "
        f"(ratio {s['ratio']})  metric {s['metric']}",
        markup=False,
    )
    table = Table()
    for col in ("path", "dtype", "shape", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for t in m.tensors:
        table.add_row(Text(t.path), t.dtype, Text(str(list(t.shape))), human_bytes(t.nbytes))
    out.print(table)
    out.print("[bold]state keys[/]")
    for k in keys:
        out.print(f"  {k}", markup=False)


@cli.command("verify")
@click.argument("job", required=False)
@click.argument("step", required=False)
@click.option("--threads", type=click.IntRange(1, 64), default=2, show_default=True)
@store_options
def verify_cmd(
    job: str | None, step: str | None, threads: int, root: str | None, config: str | None
) -> None:
    """Recompute every hash (of JOB STEP, JOB, or everything); non-zero on any failure."""
    store = _store(root, config)
    if job is None:
        targets = [(j, s) for j in store.jobs() for s in store.steps(j)]
    elif step is None:
        targets = [(job, s) for s in store.require_steps(job)]
    else:
        targets = [(job, store.resolve_step(job, step))]
    if not targets:
        raise NothingToDoError(f"no checkpoints to verify under {store.root}")
    failures = 0
    for j, s in targets:
        try:
            m = store.read_manifest(j, s)
        except CorruptCheckpointError as exc:
            failures += 1
            say(out, "FAIL", "red", f"{j} step {s}: {exc}")
            continue
        with progress_bar(m.raw_bytes, f"verify {j} {s}") as advance:
            problems = verify_manifest(store, m, threads=threads, progress=advance)
        if problems:
            failures += 1
            for p in problems:
                say(out, "FAIL", "red", f"{j} step {s}: {p}")
        else:
            detail = f"{len(m.objects)} objects, {human_bytes(m.raw_bytes)}"
            say(out, "ok  ", "green", f"{j} step {s} ({detail})")
    if failures:
        raise CorruptCheckpointError(
            f"{failures} of {len(targets)} checkpoint(s) failed verification"
        )


@cli.command("restore")
@click.argument("job")
@click.argument("step", default="latest")
@click.option("-o", "--output", "output", required=True, metavar="FILE", help="File to write.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["torch", "safetensors"]),
    default="torch",
    show_default=True,
)
@click.option(
    "--fallback", is_flag=True, help="With 'latest': use the newest checkpoint that verifies."
)
@store_options
def restore_cmd(
    job: str, step: str, output: str, fmt: str, fallback: bool, root: str | None, config: str | None
) -> None:
    """Export checkpoint JOB STEP (default latest) to a torch or safetensors file."""
    from ckptd.export import export_file

    store = _store(root, config)
    resolved: int | str = "latest" if step == "latest" else store.resolve_step(job, step)
    try:
        total = store.read_manifest(job, store.resolve_step(job, resolved)).raw_bytes
    except CorruptCheckpointError:
        if not fallback:
            raise
        total = 0  # --fallback skips the damaged latest manifest below
    with progress_bar(total, f"restore {job}") as advance:
        loaded = load_checkpoint(store, job, resolved, fallback=fallback, progress=advance)
    size = export_file(loaded, Path(output), fmt)
    out.print(
        f"wrote {output} ({fmt}, {human_bytes(size)}) from {job} step {loaded.step}", markup=False
    )


@cli.command("rm")
@click.argument("job")
@click.argument("step")
@store_options
def rm_cmd(job: str, step: str, root: str | None, config: str | None) -> None:
    """Delete checkpoint JOB STEP (its manifest; run `gc` to free unshared objects)."""
    store = _store(root, config)
    resolved = store.resolve_step(job, step)
    store.delete_checkpoint(job, resolved)
    out.print(f"removed {job} step {resolved}", markup=False)


@cli.command("gc")
@click.argument("job", required=False)
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@store_options
def gc_cmd(job: str | None, dry_run: bool, root: str | None, config: str | None) -> None:
    """Remove objects no manifest references (of JOB, or of every job)."""
    store = _store(root, config)
    if job is not None:
        validate_job_name(job)
        if not store.job_dir(job).is_dir():
            raise NotFoundError(
                f"no job {job!r} under {store.root} (jobs: {', '.join(store.jobs()) or 'none'})"
            )
    jobs = [job] if job else store.jobs()
    total_objects = total_bytes = total_tmp = 0
    for j in jobs:
        res = store.gc(j, dry_run=dry_run)
        total_objects += res.objects
        total_bytes += res.bytes
        total_tmp += res.tmp_files
        if res.objects or res.tmp_files:
            verb = "would remove" if dry_run else "removed"
            what = f"{res.objects} object(s), {human_bytes(res.bytes)}, {res.tmp_files} tmp file(s)"
            out.print(f"{j}: {verb} {what}", markup=False)
    if not total_objects and not total_tmp:
        raise NothingToDoError("nothing to collect: every object is referenced")


@cli.command("pin")
@click.argument("job")
@click.argument("step")
@store_options
def pin_cmd(job: str, step: str, root: str | None, config: str | None) -> None:
    """Protect checkpoint JOB STEP from retention and the disk guard."""
    store = _store(root, config)
    resolved = store.resolve_step(job, step)
    store.pin(job, resolved)
    out.print(f"pinned {job} step {resolved}", markup=False)


@cli.command("unpin")
@click.argument("job")
@click.argument("step")
@store_options
def unpin_cmd(job: str, step: str, root: str | None, config: str | None) -> None:
    """Release a pin; retention may delete the checkpoint again."""
    store = _store(root, config)
    if not step.isdigit():
        raise NotFoundError(f"step must be a number, got {step!r}")
    if not store.unpin(job, int(step)):
        pinned = ", ".join(map(str, sorted(store.pinned_steps(job)))) or "none"
        raise NothingToDoError(f"{job} step {step} is not pinned (pinned steps: {pinned})")
    out.print(f"unpinned {job} step {step}", markup=False)


@cli.command("prune")
@click.argument("job", required=False)
@click.option("--dry-run", is_flag=True, help="Show what retention would delete, delete nothing.")
@store_options
def prune_cmd(job: str | None, dry_run: bool, root: str | None, config: str | None) -> None:
    """Apply retention now (of JOB, or of every job): delete what no rule keeps, then GC."""
    cfg = load_config(config)
    store = Store(resolve_root(root, cfg))
    if job is not None:
        store.require_steps(job)
    jobs = [job] if job else store.jobs()
    total = 0
    for j in jobs:
        policy = cfg.policy_for(j, store.job_info(j).get("retention"))
        res = prune(store, j, policy, dry_run=dry_run)
        total += len(res.deleted)
        verb = "would delete" if dry_run else "deleted"
        if res.deleted:
            freed = f", freed {human_bytes(res.gc.bytes)}" if res.gc else ""
            out.print(
                f"{j}: {verb} steps {', '.join(map(str, res.deleted))}{freed} "
                f"(policy: {policy.describe()})",
                markup=False,
            )
    if not total:
        raise NothingToDoError("nothing to prune: every checkpoint is kept by a retention rule")


@cli.command("bench")
@click.option(
    "--size",
    default="1GiB",
    show_default=True,
    metavar="SIZE",
    help="Bytes to copy, compress (at most 256MiB), write and save, e.g. 256MiB.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object for scripts.")
@store_options
def bench_cmd(size: str, as_json: bool, root: str | None, config: str | None) -> None:
    """Measure this machine (memory copy, codec, disk, ckptd save) and suggest config values.

    Writes SIZE bytes under the checkpoint root (then deletes them) and needs about 3x SIZE of
    memory.
    """
    from ckptd.benchmark import render, run_bench
    from ckptd.config import parse_size

    size_bytes = parse_size(size, "--size")
    result = run_bench(size_bytes, resolve_root(root, load_config(config)))
    if as_json:
        out.print_json(json.dumps(result))
    else:
        for line in render(result):
            out.print(Text(line))


@cli.command("start")
@click.option("--config", "config", metavar="FILE", default=None, help="Config file.")
@click.option("--root", "root", metavar="DIR", default=None, help="Checkpoint root.")
@click.option("--socket", "socket_path", metavar="PATH", default=None, help="Socket to serve.")
@click.option("--user", is_flag=True, help="Per-user daemon: user socket, 0700/0600 modes.")
@click.option(
    "--idle-exit",
    "idle_exit_s",
    type=click.FloatRange(min=0),
    default=0.0,
    metavar="SECONDS",
    help="Exit after this long with no client and no work (0: never). Spawned daemons use it.",
)
def start_cmd(
    config: str | None, root: str | None, socket_path: str | None, user: bool, idle_exit_s: float
) -> None:
    """Run the daemon in the foreground (systemd runs exactly this)."""
    from ckptd.config import SYSTEM_SOCKET, user_socket
    from ckptd.daemon import run_daemon

    cfg = load_config(config)
    if socket_path is None:
        env = os.environ.get("CKPTD_SOCKET")
        default = user_socket() if user else SYSTEM_SOCKET
        socket_path = env or str(cfg.daemon.socket or default)
    code = run_daemon(
        cfg,
        root=resolve_root(root, cfg).absolute(),
        socket_path=Path(socket_path),
        user=user,
        idle_exit_s=idle_exit_s,
    )
    sys.exit(code)


def _ask(socket_path: str | None, op: str, **fields: Any) -> dict[str, Any]:
    from ckptd.config import resolve_socket
    from ckptd.protocol import recv_message, send_message

    path = resolve_socket(socket_path)
    import socket as _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    try:
        try:
            sock.connect(str(path))
            try:
                send_message(sock, {"op": op, "id": 1, **fields})
            except OSError:
                pass  # a refused peer finds the daemon's reason queued below
            reply, _fds = recv_message(sock)
        except OSError as exc:
            raise DaemonUnavailableError(
                f"no ckptd daemon answers on {path} ({exc.strerror or type(exc).__name__}); "
                "start one with `ckptd start` (or `systemctl start ckptd`), or name its --socket"
            ) from exc
    finally:
        sock.close()
    if reply is None:
        raise DaemonUnavailableError(
            f"the daemon on {path} closed the connection without answering"
        )
    if reply.get("op") == "error":
        raise error_from_reply(reply.get("type"), reply.get("message"))
    return reply


@cli.command("status")
@click.option("--socket", "socket_path", metavar="PATH", default=None, help="Daemon socket.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--job", default=None, help="Only this job's clients and last commits.")
def status_cmd(socket_path: str | None, as_json: bool, job: str | None) -> None:
    """Show the daemon's state: clients, queue, last commits, errors."""
    st = _ask(socket_path, "status", **({} if job is None else {"job": job}))
    st.pop("op", None)
    st.pop("id", None)
    if as_json:
        out.print_json(json.dumps(st))
        return
    rate = st.get("throughput_bytes_per_s")
    lines = [
        f"ckptd {st['version']} pid {st['pid']} ({st['mode']} mode), up {st['uptime_s']:.0f} s"
        + (" [draining]" if st["stopping"] else ""),
        f"socket {st['socket']}   root {st['root']}",
        f"clients {st.get('clients_total', len(st['clients']))}   queue {st['queue']}   in flight "
        f"{human_bytes(st['inflight_bytes'])}   writing "
        f"{st['writing']['job'] + '@' + str(st['writing']['step']) if st['writing'] else '-'}",
        f"commits {st['commits']}   failures {sum(st['failures'].values())} {st['failures'] or ''}"
        f"   skipped {st['skipped']}   throughput "
        f"{human_bytes(rate) + '/s' if rate else '-'}",
    ]
    for c in st["last_commit"][:10]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["at"]))
        lines.append(f"  last commit {c['job']} step {c['step']} at {when} ({c['root']})")
    for e in st["recent_errors"][-5:]:
        lines.append(f"  error: {e}")
    for line in lines:
        out.print(line, markup=False)


@cli.command("stop")
@click.option("--socket", "socket_path", metavar="PATH", default=None, help="Daemon socket.")
def stop_cmd(socket_path: str | None) -> None:
    """Ask the daemon to drain its queue and exit (like SIGTERM)."""
    _ask(socket_path, "stop")
    out.print("ckptd is draining and will exit when every accepted snapshot is committed")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI and map errors to exit codes."""
    try:
        cli.main(args=argv, prog_name="ckptd", standalone_mode=False)
    except CkptdError as exc:
        say(err, "error:", "red", str(exc))
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
