"""``ckptd start``, ``status`` and ``stop``: run the daemon, and talk to a running one.

``start`` runs the daemon in the foreground (:func:`ckptd.daemon.lifecycle.run_daemon`; systemd
runs exactly this) and exits with its code. ``status`` and ``stop`` send one request each
(:func:`ask`, over :func:`ckptd.locate.ask_daemon`) to a daemon of this user or root; no daemon
answering is :class:`~ckptd.errors.DaemonUnavailableError`. ``stop --wait`` then watches the
daemon's process (by the pid the kernel reports for the connection) until it has exited.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import psutil

from ckptd.cli.common import human_bytes, out
from ckptd.config import SYSTEM_SOCKET, load_config, resolve_root, resolve_socket, user_socket
from ckptd.daemon.lifecycle import DaemonOptions, run_daemon
from ckptd.errors import CkptdError, DaemonUnavailableError
from ckptd.locate import DaemonReply, ask_daemon
from ckptd.protocol import can_connect


def _writes(st: dict[str, Any]) -> str:
    """The writes in progress as ``job@step`` (``-`` for none): every one of ``writes``, or the
    one of ``writing`` from a daemon that reports a single write."""
    writes = st.get("writes")
    if writes is None:
        writes = [st["writing"]] if st.get("writing") else []
    return ", ".join(f"{w['job']}@{w['step']}" for w in writes) or "-"


@click.command("start")
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
@click.option(
    "--on-demand",
    "on_demand",
    is_flag=True,
    help="Started by a client (as clients do when no daemon answers): clients that name no root "
    "write to their own default, ./checkpoints, instead of --root.",
)
def start_cmd(
    config: str | None,
    root: str | None,
    socket_path: str | None,
    user: bool,
    idle_exit_s: float,
    on_demand: bool,
) -> None:
    """Run the daemon in the foreground (systemd runs exactly this)."""
    if on_demand and not user:
        raise click.UsageError(
            "--on-demand needs --user: a system daemon writes only to its own root, so it cannot "
            "serve clients' default roots"
        )
    cfg = load_config(config)
    if socket_path is None:
        env = os.environ.get("CKPTD_SOCKET")
        default = user_socket() if user else SYSTEM_SOCKET
        socket_path = env or str(cfg.daemon.socket or default)
    options = DaemonOptions(
        root=resolve_root(root, cfg).absolute(),
        socket_path=Path(socket_path),
        user=user,
        idle_exit_s=idle_exit_s,
        on_demand=on_demand,
    )
    code = run_daemon(cfg, options)
    sys.exit(code)


def ask(socket_path: str | Path | None, op: str, **fields: Any) -> DaemonReply:
    """Send one ``op`` request to the daemon on ``--socket`` (or where clients look for it) and
    return its reply, with the daemon's pid as the kernel reports it. Like a client, it trusts
    only a daemon of this user or root (:func:`ckptd.locate.ask_daemon`)."""
    path = resolve_socket(socket_path)
    try:
        return ask_daemon(path, {"op": op, "id": 1, **fields})
    except OSError as exc:
        raise DaemonUnavailableError(
            f"no ckptd daemon answers on {path} ({exc.strerror or type(exc).__name__}); "
            "start one with `ckptd start` (or `systemctl start ckptd`), or name its --socket"
        ) from exc


@click.command("status")
@click.option("--socket", "socket_path", metavar="PATH", default=None, help="Daemon socket.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--job", default=None, help="Only this job's clients and last commits.")
def status_cmd(socket_path: str | None, as_json: bool, job: str | None) -> None:
    """Show the daemon's state: clients, queue, last commits, errors."""
    st = ask(socket_path, "status", **({} if job is None else {"job": job})).message
    st.pop("op", None)
    st.pop("id", None)
    now = time.time()
    waiting = st.get("waiting_for_ranks") or []
    for w in waiting:
        w["waiting_since"] = iso_time(now - float(w.get("waiting_s") or 0.0))
    if as_json:
        out.print_json(json.dumps(st))
        return
    rate = st.get("throughput_bytes_per_s")
    lines = [
        f"ckptd {st['version']} pid {st['pid']} ({st['mode']} mode), up {st['uptime_s']:.0f} s"
        + (" [draining]" if st["stopping"] else ""),
        f"socket {st['socket']}   root {st['root']}",
        f"clients {st.get('clients_total', len(st['clients']))}   queue {st['queue']}   in flight "
        f"{human_bytes(st['inflight_bytes'])}   writing {_writes(st)}",
        f"commits {st['commits']}   failures {sum(st['failures'].values())} {st['failures'] or ''}"
        f"   skipped {st['skipped']}   throughput "
        f"{human_bytes(rate) + '/s' if rate else '-'}",
        codec_line(st.get("codec")),
    ]
    for c in st["last_commit"][:10]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["at"]))
        lines.append(f"  last commit {c['job']} step {c['step']} at {when} ({c['root']})")
    if waiting:
        lines.append(f"waiting for ranks {len(waiting)}")
    for w in waiting:
        lines.append("  " + waiting_line(w, st["root"]))
    lines += tier_lines(st.get("tier"))
    for e in st["recent_errors"][-5:]:
        lines.append(f"  error: {e}")
    for line in lines:
        out.print(line, markup=False)


def codec_line(codec: dict[str, Any] | None) -> str:
    """The codec's line of ``ckptd status``: the last write's codec and why, and what was
    measured (``codec = "auto"`` decides from it, see :mod:`ckptd.pipeline.auto`)."""
    if not codec or codec.get("choice") is None:
        return "codec: no snapshot written yet"
    if codec["why"] == "configured":
        head = f"codec {codec['configured']} (codec.codec)"
    else:
        choice = "compress" if codec["choice"] == "compress" else "raw"
        head = f"codec auto: {choice} for {codec['job']}: {codec['reason']}"
    measured = [
        f"{name} {value / 1e9:.2f} GB/s"
        for name, value in (
            ("disk", codec.get("disk_bytes_per_s")),
            ("codec per core", codec.get("codec_bytes_per_s_per_core")),
        )
        if value
    ]
    if codec.get("free_cores") is not None:
        measured.append(f"free cores {codec['free_cores']:.1f} of {codec['cpus']}")
    writes = codec.get("writes") or {}
    measured.append(f"writes {writes.get('compress', 0)} compressed, {writes.get('raw', 0)} raw")
    return f"{head}   [{', '.join(measured)}]"


def tier_lines(tier: dict[str, Any] | None) -> list[str]:
    """The object-store tier's part of ``ckptd status`` (nothing when no tier is configured)."""
    if not tier:
        return []
    oldest = tier.get("oldest_s")
    lines = [
        f"tier backlog {tier['backlog']}"
        + (f" (oldest {oldest:.0f} s)" if oldest is not None else "")
        + f"   uploaded {tier['uploaded']} ({human_bytes(tier['uploaded_bytes'])})"
        + (f"   dropped {tier['dropped']}" if tier.get("dropped") else "")
    ]
    for t in tier.get("tiers", []):
        where = t["url"] + (f" at {t['endpoint']}" if t.get("endpoint") else "")
        if t["state"] == "ok":
            lines.append(f"  {where}: ok")
        else:
            retry = t.get("retry_in_s")
            lines.append(
                f"  {where}: {t['state']}"
                + (f", next try in {retry:.0f} s" if retry is not None else "")
                + f": {t['error']}"
            )
    for w in tier.get("waiting_for_ranks", []):
        lines.append(f"  {w['job']} step {w['step']}: waiting for ranks {w['ranks']} in the tier")
    return lines


def iso_time(t: float) -> str:
    """``t`` (seconds since the epoch) as an ISO 8601 UTC time to the second."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def waiting_line(w: dict[str, Any], daemon_root: str) -> str:
    """One ``status`` line of a multi-rank step that waits for ranks."""
    where = "" if w.get("root") in (None, daemon_root) else f" ({w['root']})"
    since = time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(time.time() - float(w.get("waiting_s") or 0.0))
    )
    ranks = ",".join(map(str, w.get("ranks", []))) or "none"
    missing = ",".join(map(str, w.get("missing", []))) or "none"
    line = (
        f"{w['job']} step {w['step']} (attempt {w['attempt']}){where}: ranks {ranks} of "
        f"{w.get('world_size', '?')} handed off, missing {missing}, waiting since {since} "
        f"({w.get('waiting_s', 0):.0f} s)"
    )
    problems = w.get("problems") or []
    return line + "".join(f"; {p}" for p in problems)


STOP_WAIT_S = 120.0
"""How long ``ckptd stop --wait`` waits for the daemon to exit unless told (--timeout)."""


def _running(proc: psutil.Process) -> bool:
    """Whether the psutil Process ``proc`` still runs: not exited, not a zombie (an exited
    child its parent has not reaped yet), and not a new process that reuses its pid."""
    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@click.command("stop")
@click.option("--socket", "socket_path", metavar="PATH", default=None, help="Daemon socket.")
@click.option(
    "--wait",
    is_flag=True,
    help="Return only once the daemon has exited (every accepted snapshot committed).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help=f"With --wait: give up after this long (default {STOP_WAIT_S:g}), exit 1; the daemon "
    "goes on draining.",
)
def stop_cmd(socket_path: str | None, wait: bool, timeout_s: float | None) -> None:
    """Ask the daemon to drain its queue and exit (like SIGTERM).

    Without --wait this returns as soon as the daemon has begun draining. With --wait it returns
    once the daemon process is gone, so a script (a deploy, a reboot hook) can go on knowing that
    every accepted snapshot is on disk and the socket is free.
    """
    if timeout_s is not None and not wait:
        raise click.UsageError(
            "--timeout applies only with --wait", ctx=click.get_current_context()
        )
    if not wait:
        ask(socket_path, "stop")
        out.print("ckptd is draining and will exit when every accepted snapshot is committed")
        return
    timeout = STOP_WAIT_S if timeout_s is None else timeout_s
    path = resolve_socket(socket_path)
    status = ask(path, "status")
    pid = status.message.get("pid")
    if not isinstance(pid, int) or pid != status.pid:
        pid = status.pid  # another pid namespace (or no pid said): the kernel's pid is ours
    proc: psutil.Process | None = None
    if pid > 0:
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            pass
    # proc None: the process cannot be watched from here; the socket can.

    def gone() -> bool:
        return not _running(proc) if proc is not None else not can_connect(path)

    ask(path, "stop")
    out.print(
        f"ckptd (pid {pid}) is draining; waiting up to {timeout:g} s for it to exit", markup=False
    )
    deadline = time.monotonic() + timeout
    while not gone():
        if time.monotonic() >= deadline:
            raise CkptdError(
                f"ckptd (pid {pid}) on {path} is still running {timeout:g} s after it was asked "
                "to stop; it goes on draining its accepted snapshots. Wait longer (--timeout "
                f"SECONDS), watch it with `ckptd status --socket {path}`, or abort the drain "
                f"with `kill -INT {pid}` (the snapshots not yet written are lost; tmp files are "
                "swept at the next start)"
            )
        time.sleep(0.05)
    out.print(f"ckptd (pid {pid}) has exited", markup=False)
