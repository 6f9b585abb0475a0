"""The ckptd daemon: startup -> serve -> drain/shutdown.

* **startup**: load config, sweep tmp files left by a crash in the root, remove a stale socket,
  bind, then ``READY=1``.
* **serve**: an asyncio loop accepts clients (:mod:`ckptd.daemon.server`), admits snapshots into
  one FIFO queue, and a single writer task feeds them, one at a time, to the write pipeline, which
  runs on a bounded thread pool (hashing, zstd and file I/O release the GIL). The writer reports
  ``released`` as soon as a slot has been read and ``committed`` / ``failed`` when the manifest is
  durable (or not). Memory in flight is the pipeline's bounded budget; the slots themselves are the
  clients'.
* **drain**: the first SIGTERM (or ``ckptd stop``) stops admitting, writes every accepted snapshot,
  says ``STOPPING=1`` and exits 0. A second SIGTERM or SIGINT aborts at once (exit 1); the next
  start sweeps what was left in tmp.

Threads: the loop thread owns every :class:`Connection`, the queue and the stats, and never
touches the filesystem while serving. The writer thread only runs :func:`write_checkpoint` and
hands results back with ``call_soon_threadsafe``; the control threads do the filesystem work of
attaching a client to a job and of the disk guard; admissions in progress count against the
space of each other.
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
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ckptd import __version__
from ckptd.config import Config, load_config
from ckptd.daemon.metrics import Metrics
from ckptd.daemon.server import (
    Connection,
    Peer,
    WriteRequest,
    allowed_gids,
    bind_socket,
    peer_allowed,
    peer_of,
)
from ckptd.daemon.systemd import notify, watchdog_interval_s
from ckptd.errors import (
    CkptdError,
    DaemonUnavailableError,
    DiskFullError,
    ProtocolError,
    SnapshotFailedError,
    StorePermissionError,
)
from ckptd.format.store import Store
from ckptd.pipeline.write import TensorSource, WriteResult, write_checkpoint
from ckptd.policy.diskguard import DiskGuard
from ckptd.policy.prune import prune
from ckptd.policy.retention import RetentionPolicy

log = logging.getLogger("ckptd.daemon.lifecycle")

MAX_STATUS_COMMITS = 50
"""``last_commit`` entries ``status`` returns (most recent first); the daemon remembers 4x that."""
MAX_STATUS_CLIENTS = 100
MAX_ACCEPT_BACKOFF_S = 5.0
CONTROL_THREADS = 4
"""Threads for the filesystem work of the control plane: one stuck filesystem (a hung NFS
mount) holds one of them, not every client's hello."""


@dataclass
class DrainWaiter:
    """A ``drain`` request waiting until its job has nothing accepted and uncommitted."""

    conn: Connection
    rid: int | None
    root: Path
    job: str
    timer: asyncio.TimerHandle | None = None


@dataclass
class Stats:
    """Counters and recent history for ``ckptd status`` (loop thread only)."""

    started: float = field(default_factory=time.time)
    commits: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    skipped: int = 0
    blocked: int = 0
    blocked_s: float = 0.0
    raw_bytes: int = 0
    written_bytes: int = 0
    persist_s: float = 0.0
    last_commit: dict[str, dict[str, Any]] = field(default_factory=dict)
    recent_errors: deque[str] = field(default_factory=lambda: deque(maxlen=20))

    def record_error(self, text: str) -> None:
        self.recent_errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}")


class Daemon:
    """One daemon process. ``run()`` drives the three phases; tests may call
    :meth:`request_stop` instead of sending signals."""

    def __init__(
        self,
        config: Config,
        *,
        root: Path,
        socket_path: Path,
        user: bool,
        idle_exit_s: float = 0.0,
        on_demand: bool = False,
    ) -> None:
        self.config = config
        self.root = root.absolute()
        self.socket_path = socket_path
        self.user = user
        self.on_demand = on_demand
        self.idle_exit_s = idle_exit_s or config.daemon.idle_exit_s
        self.version = __version__
        self.stats = Stats()
        self.metrics = Metrics(config.metrics.listen)
        self.stores: dict[Path, Store] = {}
        self.opened_jobs: set[tuple[Path, str]] = set()
        self.connections: set[Connection] = set()
        self.queue: deque[WriteRequest] = deque()
        self.writing: WriteRequest | None = None
        self.stopping = False
        self.exit_code = 0
        self._gids = allowed_gids(config.daemon.allowed_groups)
        self._wakeup = asyncio.Event()
        self._stopped = asyncio.Event()
        self._idle_since = time.monotonic()
        self._signals = 0
        self.chunk_pool = ThreadPoolExecutor(
            max(1, config.store.threads),
            thread_name_prefix="ckptd-chunk",
            initializer=lower_priority,
            initargs=(config.daemon.worker_nice,),
        )
        self.commit_pool = ThreadPoolExecutor(1, thread_name_prefix="ckptd-commit")
        self.control_pool = ThreadPoolExecutor(CONTROL_THREADS, thread_name_prefix="ckptd-control")
        self._job_locks: dict[tuple[Path, str], threading.Lock] = {}
        self._job_locks_lock = threading.Lock()
        self.drain_waiters: list[DrainWaiter] = []
        self._admitting_bytes: dict[Path, int] = {}
        self._accept_backoff_s = 0.0
        self.memory_bytes = psutil.virtual_memory().total
        self._space_check: asyncio.Future[bool] | None = None
        self.loop: asyncio.AbstractEventLoop  # set by run()
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._observer: Any = None
        self.config_loaded_at = time.time()
        self.guard = DiskGuard(config.disk, self)
        self.degraded: str | None = None
        self.ratios: dict[tuple[Path, str], float] = {}

    # ---- phases --------------------------------------------------------------------------

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        await self.startup()
        try:
            await self.serve()
        finally:
            await self.shutdown()
        return self.exit_code

    async def startup(self) -> None:
        store = self.store_for(str(self.root), None)
        # The root exists and is marked as a store from the start, so that `ckptd list` finds an
        # empty store there (not "no store") before the first snapshot; a root that cannot be
        # made stops the daemon here, with the reason, rather than failing every snapshot.
        store.initialize()
        swept = 0
        for job in store.jobs():
            swept += store.sweep_tmp(job)
            self.opened_jobs.add((store.root, job))
        if swept:
            log.info("swept %d tmp file(s) left by an earlier run under %s", swept, self.root)
        raise_fd_limit()
        self._listener, self._lock_fd = bind_socket(self.socket_path, user=self.user)
        self.loop.add_reader(self._listener.fileno(), self._accept)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        self._watch_config()
        log.info(
            "ckptd %s ready: socket %s, root %s, pid %d",
            self.version,
            self.socket_path,
            self.root,
            os.getpid(),
        )
        notify("READY=1", f"STATUS=serving {self.socket_path}", f"MAINPID={os.getpid()}")

    async def serve(self) -> None:
        writer = asyncio.create_task(self._writer())
        ticker = asyncio.create_task(self._ticker())
        try:
            await self._stopped.wait()
        finally:
            ticker.cancel()
            self._wakeup.set()
            await writer

    async def shutdown(self) -> None:
        notify("STOPPING=1", "STATUS=stopped")
        if self._observer is not None:
            self._observer.stop()
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            try:
                self.socket_path.unlink()
            except FileNotFoundError:
                pass
        for conn in list(self.connections):
            conn.close()
        self.chunk_pool.shutdown(wait=True)
        self.commit_pool.shutdown(wait=True)
        # A control thread stuck on a hung filesystem must not keep the daemon from exiting.
        self.control_pool.shutdown(wait=False, cancel_futures=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        log.info("ckptd stopped (%d commits)", self.stats.commits)

    def request_stop(self, reason: str) -> None:
        """Begin a graceful drain: refuse new snapshots, finish the accepted ones, then exit."""
        if self.stopping:
            return
        log.info("draining %d queued snapshot(s): %s", len(self.queue) + bool(self.writing), reason)
        notify("STOPPING=1", f"STATUS=draining {len(self.queue)} snapshot(s)")
        self.stopping = True
        self._wakeup.set()

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
        refusal = self._refuse_peer(peer)
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

    def _refuse_peer(self, peer: Peer) -> str | None:
        """Why ``peer`` may not use this daemon, or None."""
        if not peer_allowed(peer, self._gids):
            groups = ", ".join(self.config.daemon.allowed_groups) or "none configured"
            return (
                f"uid {peer.uid} may not use the ckptd daemon on {self.socket_path}: it admits "
                f"uid {os.getuid()}, root and members of daemon.allowed_groups ({groups})"
            )
        limit = self.config.daemon.max_clients_per_uid
        if sum(c.peer.uid == peer.uid for c in self.connections) >= limit:
            return (
                f"uid {peer.uid} already has {limit} connections to the ckptd daemon on "
                f"{self.socket_path} (daemon.max_clients_per_uid); close clients you no longer "
                "use"
            )
        return None

    def slot_limit(self, uid: int, size: int) -> CkptdError | None:
        """Why a slot of ``size`` bytes may not be registered for ``uid``, or None."""
        cfg = self.config.daemon
        cap = min(cfg.max_slot_bytes or self.memory_bytes, self.memory_bytes)
        if size > cap:
            return ProtocolError(
                f"register: a slot of {size} bytes is larger than this daemon accepts ({cap} "
                "bytes: daemon.max_slot_bytes, at most the machine's memory)"
            )
        mine = [s for c in self.connections if c.peer.uid == uid for s in c.slots.values()]
        if len(mine) >= cfg.max_slots_per_uid:
            return ProtocolError(
                f"register: uid {uid} already has {len(mine)} slots registered "
                "(daemon.max_slots_per_uid); close clients you no longer use"
            )
        total = sum(s.size for s in mine) + size
        if total > 2 * self.memory_bytes:
            return ProtocolError(
                f"register: uid {uid}'s slots would hold {total} bytes, over twice the "
                f"machine's memory ({self.memory_bytes} bytes); use fewer or smaller slots"
            )
        return None

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if conn.job is not None:
            log.info("%s: disconnected", conn.name)
        self._idle_since = time.monotonic()

    def client_root(self, root: object, default_root: object) -> str:
        """The root a ``hello`` asks for. A client that names none writes to this daemon's root,
        except on a daemon a client spawned on demand: that one has no root of its own to impose,
        so the client's default (its ``./checkpoints``) applies."""
        if root is None:
            root = default_root if self.on_demand and default_root is not None else str(self.root)
        if not isinstance(root, str):
            raise ProtocolError(f"hello.root: expected a path or null, got {root!r:.80}")
        return root

    def store_for(self, root: str, peer: Peer | None) -> Store:
        """The store for a client's root. A user daemon writes where its client asks (same uid);
        a system daemon only to its own root."""
        path = Path(root)
        if not path.is_absolute():
            raise StorePermissionError(f"root must be an absolute path, got {root!r}")
        if peer is not None and not self.user and path != self.root:
            raise StorePermissionError(
                f"this daemon writes checkpoints to {self.root}, not {path}; name no root (the "
                f"daemon's applies) or use root={str(self.root)!r}"
            )
        store = self.stores.get(path)
        if store is None:
            store = self.stores[path] = Store(path)
        return store

    def first_use(self, store: Store, job: str) -> bool:
        """True the first time a job is used in this daemon's life: the caller then creates its
        directories and sweeps tmp files of a crashed writer (on the control thread)."""
        key = (store.root, job)
        if key in self.opened_jobs:
            return False
        self.opened_jobs.add(key)
        return True

    def forget_use(self, store: Store, job: str) -> None:
        self.opened_jobs.discard((store.root, job))

    def job_mutex(self, store: Store, job: str) -> threading.Lock:
        """A lock per job that serializes its metadata work on the control threads (two
        clients attaching to a new job at once must not both claim it)."""
        with self._job_locks_lock:
            return self._job_locks.setdefault((store.root, job), threading.Lock())

    # ---- admission and writing -------------------------------------------------------------

    def policy_for(self, store: Store, job: str) -> RetentionPolicy:
        return self.config.policy_for(job, store.job_info(job).get("retention"))

    def estimate(self, store: Store, job: str, raw_bytes: int) -> int:
        """Bytes a snapshot will add on disk: raw size x the job's last stored/raw ratio
        (1.0 until it has one), plus object headers. Dedup is ignored: an over-estimate."""
        ratio = self.ratios.get((store.root, job), 1.0)
        return int(raw_bytes * ratio) + (raw_bytes >> 20) * 64 + 4096

    def admit(
        self,
        request: WriteRequest,
        rid: int | None,
        then: Callable[[CkptdError | None], None],
    ) -> None:
        """Decide whether to accept ``request``; ``then(None)`` accepts, ``then(error)`` refuses.

        Limits are checked here, on the loop; the disk guard (``statvfs``, and deleting what
        retention allows when space is short) runs on a control thread, with the estimates of
        every queued snapshot and every admission in progress counted against the space."""
        store, job = request.store, request.job
        if self.stopping:
            then(DaemonUnavailableError("ckptd is shutting down; the snapshot was not accepted"))
            return
        if len(self.queue) >= self.config.daemon.max_queue:
            then(
                DaemonUnavailableError(
                    f"ckptd's queue is full ({len(self.queue)} snapshots waiting); the disk is "
                    "slower than the snapshot rate: snapshot less often or raise daemon.max_queue"
                )
            )
            return
        request.estimate_bytes = estimate = self.estimate(store, job, request.raw_bytes)
        queued = [
            (r.store.root, r.estimate_bytes)
            for r in [*self.queue, *([self.writing] if self.writing else [])]
        ] + list(self._admitting_bytes.items())
        stores = list(self.stores.values())
        self._admitting_bytes[store.root] = self._admitting_bytes.get(store.root, 0) + estimate

        def guard() -> CkptdError | None:  # control thread; an error refuses the snapshot
            try:
                return self.guard.admit(store, estimate, queued, stores)
            except CkptdError as exc:
                return exc
            except Exception as exc:
                log.exception("%s: the disk guard failed", job)
                return SnapshotFailedError(f"the disk guard failed: {exc!r:.200}")

        def decided(error: CkptdError | None) -> None:
            self._admitting_bytes[store.root] -= estimate
            if error is not None:
                self.degraded = str(error)
                self.stats.refused += 1
                self.stats.record_error(f"{job}: refused: {error}")
                self.metrics.failed(job, type(error).__name__)
                log.warning("%s: snapshot refused: %s", job, error)
            elif self.stopping:
                error = DaemonUnavailableError(
                    "ckptd is shutting down; the snapshot was not accepted"
                )
            else:
                self.degraded = None
            then(error)

        request.conn.blocking(rid, guard, decided)

    def drain(
        self, conn: Connection, rid: int | None, store: Store, job: str, timeout_s: float
    ) -> None:
        """Answer ``drained`` once ``job`` has no accepted, uncommitted snapshot (or after
        ``timeout_s``, listing the steps still pending)."""
        waiter = DrainWaiter(conn, rid, store.root, job)
        if not self.pending_steps(waiter.root, job):
            conn.reply(rid, {"op": "drained", "pending": []})
            return
        waiter.timer = self.loop.call_later(timeout_s, self._drain_answer, waiter)
        self.drain_waiters.append(waiter)

    def pending_steps(self, root: Path, job: str) -> list[int]:
        work = [*([self.writing] if self.writing else []), *self.queue]
        return [r.step for r in work if r.job == job and r.store.root == root]

    def _drain_answer(self, waiter: DrainWaiter) -> None:
        if waiter in self.drain_waiters:
            self.drain_waiters.remove(waiter)
        if waiter.timer is not None:
            waiter.timer.cancel()
        pending = self.pending_steps(waiter.root, waiter.job)
        waiter.conn.reply(waiter.rid, {"op": "drained", "pending": pending})

    def _check_drains(self) -> None:
        for waiter in list(self.drain_waiters):
            if waiter.conn.closed or not self.pending_steps(waiter.root, waiter.job):
                self._drain_answer(waiter)

    def enqueue(self, request: WriteRequest) -> None:
        self.queue.append(request)
        self.metrics.queue_depth(len(self.queue))
        self._wakeup.set()
        self._status_line()

    async def _writer(self) -> None:
        while True:
            if not self.queue:
                if self.stopping:
                    self._stopped.set()
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            request = self.queue.popleft()
            self.writing = request
            self.metrics.queue_depth(len(self.queue))
            try:
                result = await self.loop.run_in_executor(self.commit_pool, self._write, request)
            except CkptdError as exc:
                self._failed(request, exc)
            except Exception as exc:
                log.exception("%s step %d: unexpected error", request.job, request.step)
                self._failed(request, exc)
            else:
                self._committed(request, result)
            finally:
                self.writing = None
                if not request.done:  # pipeline never reached on_read_done (refused early)
                    self._release(request)
                self._check_drains()
                self._status_line()

    def _write(self, request: WriteRequest) -> WriteResult:
        """Writer thread: run the pipeline over the slot, in place."""
        base = memoryview(request.slot.mm)
        views = [base[t.offset : t.offset + t.nbytes] for t in request.layout.tensors]
        sources = [
            TensorSource(t.path, t.dtype, t.shape, v)
            for t, v in zip(request.layout.tensors, views, strict=True)
        ]
        released = False

        def on_read_done() -> None:
            nonlocal released
            if released:
                return
            released = True
            for v in views:
                v.release()
            base.release()
            self.loop.call_soon_threadsafe(self._release, request)

        added_pin = False
        try:
            if request.pin and request.step not in request.store.pinned_steps(request.job):
                # Before the manifest: retention must never see it unpinned.
                request.store.pin(request.job, request.step)
                added_pin = True
            result = write_checkpoint(
                request.store,
                request.job,
                request.step,
                request.layout.skeleton,
                sources,
                metric=request.metric,
                config=self.config.pipeline(),
                executor=self.chunk_pool,
                on_read_done=on_read_done,
            )
        except BaseException as exc:
            # Tracebacks hold the pipeline's frames, whose locals view the slot: drop them so
            # the slot can be unmapped.
            _clear_frames(exc)
            if added_pin:
                request.store.unpin(request.job, request.step)
            if isinstance(exc, DiskFullError):
                # The write ran out of space: give back what its objects took.
                with request.store.job_lock(request.job, exclusive=True, blocking=False) as ok:
                    if ok:
                        request.store.gc_unlocked(request.job)
            raise
        finally:
            on_read_done()
        self._retain(request.store, request.job)
        return result

    def _retain(self, store: Store, job: str) -> None:
        """Writer thread, after a commit: apply the job's retention (never fails the commit)."""
        try:
            res = prune(store, job, self.policy_for(store, job), gc_blocking=False)
        except Exception as exc:  # the checkpoint is committed whatever happens here
            reason = str(exc) if isinstance(exc, CkptdError) else f"unexpected error {exc!r}"
            log.warning("%s: retention not applied: %s", job, reason)
            self.loop.call_soon_threadsafe(self.stats.record_error, f"{job}: retention: {reason}")
            return
        if res.deleted:
            freed = res.gc.bytes if res.gc else 0
            log.info("%s: retention deleted steps %s (%d bytes freed)", job, res.deleted, freed)

    def _release(self, request: WriteRequest) -> None:
        if request.done:
            return
        request.done = True
        request.conn.release(request)

    def _committed(self, request: WriteRequest, result: WriteResult) -> None:
        persist_s = self.loop.time() - request.accepted_at
        s = self.stats
        s.commits += 1
        s.raw_bytes += request.raw_bytes
        s.written_bytes += result.written_bytes
        s.persist_s += persist_s
        now = time.time()
        key = f"{request.store.root}:{request.job}"
        s.last_commit.pop(key, None)  # re-inserted last: the dict stays in commit order
        s.last_commit[key] = {
            "job": request.job,
            "step": request.step,
            "at": now,
            "root": str(request.store.root),
        }
        while len(s.last_commit) > 4 * MAX_STATUS_COMMITS:
            del s.last_commit[next(iter(s.last_commit))]
        self.metrics.committed(request.job, request.raw_bytes, result.written_bytes, persist_s, now)
        m = result.manifest
        if m.raw_bytes:
            self.ratios[(request.store.root, request.job)] = m.stored_bytes / m.raw_bytes
        log.info(
            "%s step %d committed: %d tensors, %.1f MB raw, %.1f MB new, %.2f s",
            request.job,
            request.step,
            len(m.tensors),
            m.raw_bytes / 1e6,
            result.written_bytes / 1e6,
            persist_s,
        )
        request.conn.send(
            {
                "op": "committed",
                "seq": request.seq,
                "step": request.step,
                "path": str(result.path),
                "raw_bytes": m.raw_bytes,
                "stored_bytes": m.stored_bytes,
                "written_bytes": result.written_bytes,
                "persist_s": persist_s,
            }
        )

    def _failed(self, request: WriteRequest, exc: BaseException) -> None:
        reason = type(exc).__name__ if isinstance(exc, CkptdError) else "SnapshotFailedError"
        message = str(exc) if isinstance(exc, CkptdError) else f"internal error: {exc!r}"
        self.stats.failures[reason] = self.stats.failures.get(reason, 0) + 1
        self.stats.record_error(f"{request.job} step {request.step}: {message}")
        self.metrics.failed(request.job, reason)
        log.error("%s step %d failed: %s", request.job, request.step, message)
        request.conn.send({"op": "failed", "seq": request.seq, "type": reason, "message": message})

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
        except CkptdError as exc:
            log.error("config change rejected, keeping the previous configuration: %s", exc)
            self.stats.record_error(f"config change rejected: {exc}")
            return False
        if new == self.config:
            return False
        self.config = new
        self.config_loaded_at = time.time()
        self._gids = allowed_gids(new.daemon.allowed_groups)
        self.guard.config = new.disk
        self.idle_exit_s = new.daemon.idle_exit_s or self.idle_exit_s
        logging.getLogger().setLevel(new.daemon.log_level.upper())
        log.info("configuration reloaded from %s", source)
        return True

    # ---- housekeeping ----------------------------------------------------------------------

    async def _ticker(self) -> None:
        """Watchdog pings from the loop that drives I/O, and the idle exit of spawned daemons."""
        interval = watchdog_interval_s()
        period = min(interval or 1.0, 1.0)
        while True:
            await asyncio.sleep(period)
            if interval is not None:
                notify("WATCHDOG=1")
            if self.degraded is not None and self._space_check is None:
                # Not awaited: a hung filesystem must not stop the watchdog pings.
                self._space_check = self.loop.run_in_executor(
                    self.control_pool, self.guard.recovered, list(self.stores.values())
                )
                self._space_check.add_done_callback(self._space_checked)
            busy = self.connections or self.queue or self.writing
            if busy:
                self._idle_since = time.monotonic()
            elif self.idle_exit_s and time.monotonic() - self._idle_since >= self.idle_exit_s:
                self.request_stop(f"idle for {self.idle_exit_s:.0f} s with no client")

    def _space_checked(self, fut: asyncio.Future[bool]) -> None:
        self._space_check = None
        if fut.cancelled():
            return
        if fut.exception() is not None:
            log.warning("disk guard: cannot check free space: %r", fut.exception())
        elif fut.result() and self.degraded is not None:
            log.info("disk space is back above the guard; accepting snapshots again")
            self.degraded = None

    def _status_line(self) -> None:
        last = next(reversed(self.stats.last_commit.values()), None)
        text = f"queue {len(self.queue)}, clients {len(self.connections)}"
        if last:
            text += f", last commit {last['job']}@{last['step']}"
        notify(f"STATUS={text}")

    def status(self, job: str | None = None) -> dict[str, Any]:
        """The daemon's state for ``ckptd status``; bounded in size whatever the number of jobs
        and clients (``job`` narrows the clients and last commits to one job)."""
        s = self.stats
        inflight = sum(r.raw_bytes for r in self.queue) + (
            self.writing.raw_bytes if self.writing else 0
        )
        clients = [c for c in self.connections if c.job is not None and job in (None, c.job)]
        commits = [c for c in reversed(s.last_commit.values()) if job in (None, c["job"])]
        return {
            "pid": os.getpid(),
            "version": self.version,
            "socket": str(self.socket_path),
            "root": str(self.root),
            "mode": "user" if self.user else "system",
            "on_demand": self.on_demand,
            "uptime_s": round(time.time() - s.started, 3),
            "stopping": self.stopping,
            "clients": [
                {"job": c.job, "pid": c.peer.pid, "uid": c.peer.uid, "slots": len(c.slots)}
                for c in clients[:MAX_STATUS_CLIENTS]
            ],
            "clients_total": len(clients),
            "queue": len(self.queue),
            "writing": None
            if self.writing is None
            else {"job": self.writing.job, "step": self.writing.step},
            "inflight_bytes": inflight,
            "commits": s.commits,
            "failures": dict(s.failures),
            "skipped": s.skipped,
            "blocked": s.blocked,
            "blocked_s": round(s.blocked_s, 6),
            "raw_bytes": s.raw_bytes,
            "written_bytes": s.written_bytes,
            "throughput_bytes_per_s": round(s.raw_bytes / s.persist_s) if s.persist_s else None,
            "last_commit": commits[:MAX_STATUS_COMMITS],
            "recent_errors": [e[:400] for e in s.recent_errors],
            "metrics_port": self.metrics.port or None,
            "degraded": None if self.degraded is None else self.degraded[:1000],
            "config": str(self.config.source) if self.config.source else None,
            "config_loaded_at": self.config_loaded_at,
        }


def raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard one: each client holds a socket and up to
    :data:`~ckptd.daemon.server.MAX_SLOTS_PER_CLIENT` slot descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)


def lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` steps (Linux keeps a nice value per
    thread). The write pipeline's threads run this first: on a machine whose cores also train,
    hashing and compressing a checkpoint take the CPU training leaves idle instead of slowing the
    training down, while the control plane keeps answering at the daemon's own priority."""
    if nice <= 0:
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except OSError as exc:  # e.g. a seccomp filter: run at normal priority
        log.warning("could not lower the priority of a write thread by %d: %s", nice, exc)


def _clear_frames(exc: BaseException | None) -> None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def run_daemon(
    config: Config,
    *,
    root: Path,
    socket_path: Path,
    user: bool,
    idle_exit_s: float = 0.0,
    on_demand: bool = False,
) -> int:
    """Run a daemon in this process until it stops; return its exit code."""
    logging.basicConfig(
        level=config.daemon.log_level.upper(),
        format="%(asctime)s ckptd[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    daemon = Daemon(
        config,
        root=root,
        socket_path=socket_path,
        user=user,
        idle_exit_s=idle_exit_s,
        on_demand=on_demand,
    )
    return asyncio.run(daemon.run())
