"""The ckptd daemon: startup -> serve -> drain/shutdown, and the parts it is built from.

* **startup**: open the root (sweeping tmp files a crash left), remove a stale socket, bind
  (:mod:`~ckptd.daemon.listen`), watch the config file, then ``READY=1``.
* **serve**: the loop accepts clients; each is a :class:`~ckptd.daemon.session.Connection`. The
  :class:`~ckptd.daemon.admission.Admission` decides what is accepted; the
  :class:`~ckptd.daemon.writer.WriteQueue` writes accepted snapshots through the pipeline, up to
  ``store.concurrent_jobs`` jobs at once and each job's in order, and reports ``released`` /
  ``committed`` / ``failed``. A ticker pings the systemd watchdog, looks whether disk space is
  back, samples the CPU for the codec choice, and stops a spawned daemon that sits idle.
* **drain**: the first SIGTERM (or ``ckptd stop``) stops admitting, writes every accepted snapshot,
  says ``STOPPING=1`` and exits 0. A second SIGTERM or SIGINT aborts at once (exit 1); the next
  start sweeps what was left in tmp.

Threads: the loop thread owns every :class:`Connection`, the queue and the stats, and never
touches the filesystem while serving. The commit threads, the coordinator thread and the chunk
pools belong to the write queue; the control threads (:data:`CONTROL_THREADS`) do the filesystem
work of attaching a client to a job and of the disk guard.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ckptd import __version__
from ckptd.config import Config, load_config
from ckptd.daemon.admission import Admission
from ckptd.daemon.listen import bind_socket, peer_of
from ckptd.daemon.metrics import Metrics
from ckptd.daemon.session import Connection
from ckptd.daemon.stats import MAX_STATUS_COMMITS, Stats
from ckptd.daemon.stores import Stores
from ckptd.daemon.systemd import notify, watchdog_interval_s
from ckptd.daemon.uploads import Uploads
from ckptd.daemon.writer import WriteQueue
from ckptd.errors import CkptdError
from ckptd.format.store import Store
from ckptd.policy.retention import RetentionPolicy

log = logging.getLogger("ckptd.daemon.lifecycle")

MAX_STATUS_CLIENTS = 100
MAX_ACCEPT_BACKOFF_S = 5.0
CONTROL_THREADS = 4
"""Threads for the filesystem work of the control plane: one stuck filesystem (a hung NFS
mount) holds one of them, not every client's hello."""


@dataclass(frozen=True)
class DaemonOptions:
    """How this daemon process serves: ``ckptd start``'s options (not config keys).

    ``root``: where checkpoints go unless a client names its own (absolute); ``socket_path``: the
    socket to serve; ``user``: a per-user daemon (0700/0600 modes, clients may name any root);
    ``idle_exit_s``: exit after this long with no client and no work (0: ``daemon.idle_exit_s``,
    whose 0 is never); ``on_demand``: spawned by a client, whose clients that name no root write
    to their own default root."""

    root: Path
    socket_path: Path
    user: bool
    idle_exit_s: float = 0.0
    on_demand: bool = False


class Daemon:
    """One daemon process. Build it on the event loop that runs it (:func:`run_daemon` does);
    ``run()`` drives the three phases; tests may call :meth:`request_stop` instead of sending
    signals."""

    def __init__(self, config: Config, options: DaemonOptions) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.options = options
        self.root = options.root.absolute()
        self.idle_exit_s = options.idle_exit_s or config.daemon.idle_exit_s
        self.config_loaded_at = time.time()
        self.exit_code = 0
        self.stats = Stats()
        self.metrics = Metrics(config.metrics.listen)
        self.connections: set[Connection] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self.stores = Stores(self.root, user=options.user, on_demand=options.on_demand)
        self.control_pool: Executor = ThreadPoolExecutor(
            CONTROL_THREADS, thread_name_prefix="ckptd-control"
        )
        self.uploads = Uploads(
            config,
            metrics=self.metrics,
            on_error=lambda text: self.loop.call_soon_threadsafe(self.stats.record_error, text),
        )
        self.uploads.check_config()
        self.stores.on_first_use = self.uploads.recover_job
        self.queue = WriteQueue(
            self.loop,
            pipeline=config.pipeline(),
            worker_nice=config.daemon.worker_nice,
            policy_for=self.policy_for,
            stats=self.stats,
            metrics=self.metrics,
            on_change=self._status_line,
            uploads=self.uploads,
        )
        self.admission = Admission(
            self.loop,
            limits=config.daemon,
            disk=config.disk,
            policy_for=self.policy_for,
            socket_path=options.socket_path,
            memory_bytes=psutil.virtual_memory().total,
            connections=self.connections,
            queue=self.queue,
            stores=self.stores,
            stats=self.stats,
            metrics=self.metrics,
            control_pool=self.control_pool,
        )
        # Space is short when the disk guard's filesystem is nearly full: auto then compresses.
        self.queue.auto.space = self.admission.guard.space
        self._idle_since = time.monotonic()
        self._signals = 0
        self._accept_backoff_s = 0.0
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._observer: Any = None

    @property
    def stopping(self) -> bool:
        """Draining: no snapshot is accepted any more; the daemon exits once the queue is
        written."""
        return self.queue.closed

    def policy_for(self, store: Store, job: str) -> RetentionPolicy:
        """``job``'s retention as configured now (reads the job's metadata: not on the loop)."""
        return self.config.policy_for(job, store.job_info(job).get("retention"))

    # ---- phases --------------------------------------------------------------------------

    async def run(self) -> int:
        await self.startup()
        try:
            await self.serve()
        finally:
            await self.shutdown()
        return self.exit_code

    async def startup(self) -> None:
        swept = self.stores.open_root()
        if swept:
            log.info("swept %d tmp file(s) left by an earlier run under %s", swept, self.root)
        raise_fd_limit()
        socket_path = self.options.socket_path
        self._listener, self._lock_fd = bind_socket(socket_path, user=self.options.user)
        self.loop.add_reader(self._listener.fileno(), self._accept)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        self._watch_config()
        log.info(
            "ckptd %s ready: socket %s, root %s, pid %d",
            __version__,
            socket_path,
            self.root,
            os.getpid(),
        )
        notify("READY=1", f"STATUS=serving {socket_path}", f"MAINPID={os.getpid()}")
        # Multi-rank steps a crash left uncommitted: commit those whose parts are all durable.
        self._background(self.queue.recover(self.stores.store_for(str(self.root), None)))
        # Uploads a stop or a crash left pending resume (the marks of the jobs under the root).
        self.uploads.start()
        self._background(self._recover_uploads())

    async def _recover_uploads(self) -> None:
        await self.loop.run_in_executor(self.control_pool, self.uploads.recover, self.stores.all())

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve(self) -> None:
        """Serve until the write queue is closed (:meth:`request_stop`) and written."""
        ticker = asyncio.create_task(self._ticker())
        try:
            await self.queue.run()
        finally:
            ticker.cancel()

    async def shutdown(self) -> None:
        notify("STOPPING=1", "STATUS=stopped")
        if self._observer is not None:
            self._observer.stop()
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            try:
                self.options.socket_path.unlink()
            except FileNotFoundError:
                pass
        for conn in list(self.connections):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        self.queue.shutdown()
        self.uploads.close()
        # A control thread stuck on a hung filesystem must not keep the daemon from exiting.
        self.control_pool.shutdown(wait=False, cancel_futures=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        log.info("ckptd stopped (%d commits)", self.stats.commits)

    def request_stop(self, reason: str) -> None:
        """Begin a graceful drain: refuse new snapshots, finish the accepted ones, then exit."""
        if self.stopping:
            return
        pending = len(self.queue.pending())
        log.info("draining %d queued snapshot(s): %s", pending, reason)
        notify("STOPPING=1", f"STATUS=draining {pending} snapshot(s)")
        self.queue.close()

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1 and sig == signal.SIGTERM:
            self.request_stop(f"received {signal.Signals(sig).name}")
            return
        log.warning(
            "received %s while %s: aborting; tmp files are swept at the next start",
            signal.Signals(sig).name,
            "draining" if self.stopping else "serving",
        )
        logging.shutdown()
        os._exit(1)

    # ---- connections ---------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            # Out of descriptors: stop accepting for a while instead of spinning on the error.
            self._accept_backoff_s = min(MAX_ACCEPT_BACKOFF_S, max(0.1, self._accept_backoff_s * 2))
            log.warning(
                "cannot accept connections (%s); pausing %.1f s (%d connections open)",
                exc.strerror,
                self._accept_backoff_s,
                len(self.connections),
            )
            self.stats.record_error(f"accept: {exc.strerror}")
            self.loop.remove_reader(self._listener.fileno())
            self.loop.call_later(self._accept_backoff_s, self._resume_accept)
            return
        self._accept_backoff_s = 0.0
        sock.setblocking(False)
        peer = peer_of(sock)
        conn = Connection(self, sock, peer)
        refusal = self.admission.refuse_peer(peer)
        if refusal is not None:
            log.warning("refused connection from uid %d (pid %d): %s", peer.uid, peer.pid, refusal)
            self.stats.record_error(f"refused uid {peer.uid}")
            # Answer its first message with the reason (closing before reading it would reset
            # the connection and lose the reply), or drop it after a few seconds of silence.
            conn.refused = refusal
            self.loop.call_later(5.0, conn.close)
        self.connections.add(conn)
        self.loop.add_reader(sock.fileno(), conn.on_readable)

    def _resume_accept(self) -> None:
        if self._listener is not None and not self.stopping:
            self.loop.add_reader(self._listener.fileno(), self._accept)

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if conn.job is not None:
            log.info("%s: disconnected", conn.name)
        self._idle_since = time.monotonic()

    # ---- live configuration ------------------------------------------------------------------

    def _watch_config(self) -> None:
        """Reload the config file when it changes (watchdog watches its directory, so editors
        that save by rename are seen too)."""
        source = self.config.source
        if source is None:
            return
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        target = str(source.absolute())
        daemon = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                paths = {str(event.src_path), str(getattr(event, "dest_path", "") or "")}
                if target in paths and event.event_type in ("modified", "created", "moved"):
                    daemon.loop.call_soon_threadsafe(daemon.reload_config)

        observer = Observer()
        observer.schedule(Handler(), str(source.absolute().parent), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def reload_config(self) -> bool:
        """Re-read the config file; on error keep the old config. True when something changed.

        Store, codec, queue, group and idle settings apply from the next snapshot on; the socket,
        root, metrics endpoint, ``store.threads`` and ``daemon.worker_nice`` need a restart.
        """
        source = self.config.source
        if source is None:
            return False
        try:
            new = load_config(source)
            self.uploads.check_config(new)
        except CkptdError as exc:
            log.error("config change rejected, keeping the previous configuration: %s", exc)
            self.stats.record_error(f"config change rejected: {exc}")
            return False
        if new == self.config:
            return False
        self.config = new
        self.config_loaded_at = time.time()
        self.admission.reconfigure(new.daemon, new.disk)
        self.queue.pipeline = new.pipeline()
        self.uploads.reconfigure(new)
        self.idle_exit_s = new.daemon.idle_exit_s or self.idle_exit_s
        logging.getLogger().setLevel(new.daemon.log_level.upper())
        log.info("configuration reloaded from %s", source)
        return True

    # ---- housekeeping ----------------------------------------------------------------------

    async def _ticker(self) -> None:
        """Watchdog pings from the loop that drives I/O, the disk guard's recovery check, and the
        idle exit of spawned daemons."""
        interval = watchdog_interval_s()
        period = min(interval or 1.0, 1.0)
        while True:
            await asyncio.sleep(period)
            if interval is not None:
                notify("WATCHDOG=1")
            self.admission.check_space()
            self.queue.auto.sample_cpu()
            if self.queue.coordinator:
                self._background(self.queue.recheck())
            if self.connections or self.queue.pending():
                self._idle_since = time.monotonic()
            elif self.idle_exit_s and time.monotonic() - self._idle_since >= self.idle_exit_s:
                self.request_stop(f"idle for {self.idle_exit_s:.0f} s with no client")

    def _status_line(self) -> None:
        last = next(reversed(self.stats.last_commit.values()), None)
        text = (
            f"queue {len(self.queue.waiting)}, writing {len(self.queue.writes)}, "
            f"clients {len(self.connections)}"
        )
        if last:
            text += f", last commit {last['job']}@{last['step']}"
        notify(f"STATUS={text}")

    def status(self, job: str | None = None) -> dict[str, Any]:
        """The daemon's state for ``ckptd status``; bounded in size whatever the number of jobs
        and clients (``job`` narrows the clients and last commits to one job)."""
        s = self.stats
        writes = self.queue.writes_status()
        clients = [c for c in self.connections if c.job is not None and job in (None, c.job)]
        commits = [c for c in reversed(s.last_commit.values()) if job in (None, c["job"])]
        return {
            "pid": os.getpid(),
            "version": __version__,
            "socket": str(self.options.socket_path),
            "root": str(self.root),
            "mode": "user" if self.options.user else "system",
            "on_demand": self.options.on_demand,
            "uptime_s": round(time.time() - s.started, 3),
            "stopping": self.stopping,
            "clients": [
                {"job": c.job, "pid": c.peer.pid, "uid": c.peer.uid, "slots": len(c.slots)}
                for c in clients[:MAX_STATUS_CLIENTS]
            ],
            "clients_total": len(clients),
            "queue": len(self.queue.waiting),
            # The oldest write in progress, as before several were written at once; "writes"
            # lists them all.
            "writing": {"job": writes[0]["job"], "step": writes[0]["step"]} if writes else None,
            "writes": writes,
            "concurrent_jobs": self.queue.pipeline.concurrent_jobs,
            "inflight_bytes": sum(r.raw_bytes for r in self.queue.pending()),
            "commits": s.commits,
            "failures": dict(s.failures),
            "skipped": s.skipped,
            "blocked": s.blocked,
            "blocked_s": round(s.blocked_s, 6),
            "raw_bytes": s.raw_bytes,
            "written_bytes": s.written_bytes,
            "throughput_bytes_per_s": round(s.raw_bytes / s.persist_s) if s.persist_s else None,
            "codec": self.queue.auto.status(),
            "last_commit": commits[:MAX_STATUS_COMMITS],
            "waiting_for_ranks": [
                w for w in self.queue.coordinator.waiting if job in (None, w["job"])
            ],
            "recent_errors": [e[:400] for e in s.recent_errors],
            "metrics_port": self.metrics.port or None,
            "degraded": None if self.admission.degraded is None else self.admission.degraded[:1000],
            "tier": self.uploads.status(job),
            "config": str(self.config.source) if self.config.source else None,
            "config_loaded_at": self.config_loaded_at,
        }


def raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard one: each client holds a socket and up to
    :data:`~ckptd.daemon.session.MAX_SLOTS_PER_CLIENT` slot descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)


def run_daemon(config: Config, options: DaemonOptions) -> int:
    """Run a daemon in this process until it stops; return its exit code."""
    logging.basicConfig(
        level=config.daemon.log_level.upper(),
        format="%(asctime)s ckptd[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(_serve(config, options))


async def _serve(config: Config, options: DaemonOptions) -> int:
    return await Daemon(config, options).run()
