"""``Client``: hand snapshots to the ckptd daemon through shared memory.

``snapshot()`` copies the state once into a *slot* (a sealed memfd shared with the daemon), sends a
small ``submit`` message and returns as soon as the daemon has accepted it. From then on the
daemon owns the copy: it hashes, compresses and commits it even if this process dies a moment
later. The returned :class:`PendingSnapshot` reports when the checkpoint is durable.

Thread safety: one trainer thread calls ``snapshot`` / ``prepare`` / ``flush`` / ``close`` (calls
are serialized by a lock if several threads do). A background thread reads the daemon's replies;
it only updates slot states and resolves :class:`PendingSnapshot` handles.

Daemon failures never raise out of ``snapshot()`` unless ``strict=True``: they are logged as
warnings and carried by the returned handle (``wait()`` raises them). Errors in the state itself
(:class:`UnsupportedStateError`, bad arguments) always raise: they are bugs to fix, not outages.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, Literal

import torch

from ckptd.config import SYSTEM_SOCKET, load_config, resolve_root, resolve_socket
from ckptd.errors import (
    CkptdError,
    DaemonUnavailableError,
    ProtocolError,
    SnapshotSkippedError,
    error_from_reply,
)
from ckptd.manifest import Manifest
from ckptd.protocol import (
    PROTOCOL_VERSION,
    LayoutEntry,
    Message,
    align,
    can_connect,
    encode_layout,
    metric_to_wire,
    recv_message,
    send_message,
)
from ckptd.skeleton import dtype_name, flatten
from ckptd_client.api import list_checkpoints, restore
from ckptd_client.state import Stateful, collect

log = logging.getLogger("ckptd_client")

_MADV_POPULATE_WRITE = 23
_MAX_VIEWS = 1 << 16  # cached slot views before the cache is dropped (a layout that keeps changing)
_PAGE = mmap.PAGESIZE
_SLOT_ROUND = 1 << 20
_spawned: list[subprocess.Popen[bytes]] = []


def error_from(msg: Message) -> CkptdError:
    """The exception a daemon ``error`` / ``failed`` / ``refused`` message stands for."""
    return error_from_reply(msg.get("type"), msg.get("message"))


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as reported by the daemon (bytes and seconds)."""

    job: str
    step: int
    path: str
    raw_bytes: int
    stored_bytes: int
    written_bytes: int
    stall_s: float
    persist_s: float


class PendingSnapshot:
    """A snapshot handed to the daemon. ``wait()`` returns its :class:`CheckpointInfo` once it is
    durable, or raises the daemon's error (or :class:`SnapshotSkippedError` when it was skipped)."""

    def __init__(self, job: str, step: int) -> None:
        self.job = job
        self.step = step
        self.stall_s = 0.0
        self.skipped = False
        self._done = threading.Event()
        self._info: CheckpointInfo | None = None
        self._error: CkptdError | None = None

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def error(self) -> CkptdError | None:
        """The failure, once done (None while pending or when committed)."""
        return self._error

    def wait(self, timeout: float | None = None) -> CheckpointInfo:
        if not self._done.wait(timeout):
            raise TimeoutError(
                f"{self.job} step {self.step} not committed within {timeout} s; it is still "
                "queued or being written (see `ckptd status`)"
            )
        if self._error is not None:
            raise self._error
        assert self._info is not None
        return dataclasses.replace(self._info, stall_s=self.stall_s)

    def _resolve(self, info: CheckpointInfo) -> None:
        self._info = info
        self._done.set()

    def _reject(self, error: CkptdError) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else ("done" if self.done() else "pending")
        if self._error is not None:
            state = f"failed: {type(self._error).__name__}"
        return f"<PendingSnapshot {self.job} step {self.step} {state}>"


class _Slot:
    """A sealed memfd mapped read-write here and read-only in the daemon."""

    def __init__(self, slot_id: int, size: int, job: str) -> None:
        self.id = slot_id
        self.size = size
        self.fd = os.memfd_create(f"ckptd-{job}-{slot_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            import fcntl

            fcntl.fcntl(
                self.fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
            )
            self.mm = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.bytes = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.busy = False
        self.pinned = False
        # Typed views into the slot by (offset, dtype, shape): a training loop snapshots the same
        # layout every time, so after the first snapshot no view is made again.
        self._views: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The slot's bytes at ``offset`` as a ``dtype`` tensor of ``shape``."""
        key = (offset, dtype, shape)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            nbytes = math.prod(shape) * dtype.itemsize
            view = self.bytes[offset : offset + nbytes].view(dtype).view(shape)
            self._views[key] = view
        return view

    def prefault(self) -> None:
        """Touch every page now so snapshots copy at memory speed, not page-fault speed."""
        try:
            self.mm.madvise(_MADV_POPULATE_WRITE)
        except (OSError, ValueError):
            self.bytes[::_PAGE].zero_()

    def pin(self) -> None:
        """Register the slot as pinned memory so CUDA copies into it run asynchronously."""
        if not self.pinned and torch.cuda.is_available():
            cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            rc = cudart.cudaHostRegister(self.bytes.data_ptr(), self.size, 0)
            self.pinned = int(rc) == 0

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(  # type: ignore[no-untyped-call]
                self.bytes.data_ptr()
            )
            self.pinned = False
        self._views.clear()
        del self.bytes
        self.mm.close()
        os.close(self.fd)


class _Link:
    """One connection to the daemon: synchronous requests, plus a reader thread for events."""

    REPLIES = frozenset({"welcome", "registered", "unregistered", "accepted", "refused", "error"})

    def __init__(self, path: Path, timeout_s: float, on_event: Any) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.lost = False
        self._replies: SimpleQueue[Message | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._on_event = on_event
        self._reader = threading.Thread(target=self._read, name="ckptd-client-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                msg, fds = recv_message(self.sock)
                for fd in fds:
                    os.close(fd)
                if msg is None:
                    break
                if msg["op"] in self.REPLIES:
                    self._replies.put(msg)
                else:
                    self._on_event(self, msg)
        except (OSError, ProtocolError) as exc:
            log.debug("ckptd connection reader stopped: %s", exc)
        finally:
            self.lost = True
            self._replies.put(None)
            self._on_event(self, {"op": "__lost__"})

    def request(self, msg: Message, fds: list[int] | None = None) -> Message:
        with self._lock:
            if self.lost:
                raise DaemonUnavailableError(f"the connection to ckptd at {self.path} was lost")
            try:
                send_message(self.sock, msg, fds)
            except OSError as exc:
                try:  # the daemon may have said why before it closed the connection
                    said = self._replies.get(timeout=1.0)
                except Empty:
                    said = None
                if said is not None and said["op"] == "error":
                    raise error_from(said) from exc
                raise DaemonUnavailableError(
                    f"cannot send to ckptd at {self.path}: {exc.strerror or exc}"
                ) from exc
            try:
                reply = self._replies.get(timeout=self.timeout_s)
            except Empty:
                raise DaemonUnavailableError(
                    f"ckptd at {self.path} did not answer {msg['op']!r} within {self.timeout_s} s"
                ) from None
        if reply is None:
            raise DaemonUnavailableError(
                f"ckptd at {self.path} closed the connection during {msg['op']!r}"
            )
        if reply["op"] == "error":
            raise error_from(reply)
        return reply

    def send(self, msg: Message) -> None:
        with self._lock:
            try:
                send_message(self.sock, msg)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(timeout=5)


def spawn_daemon(socket_path: Path, root: Path, timeout_s: float = 60.0) -> None:
    """Start ``ckptd start --user`` detached (own session, idle exit) and wait until it answers."""
    for proc in list(_spawned):  # reap daemons that exited
        if proc.poll() is not None:
            _spawned.remove(proc)
    socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = socket_path.parent / "ckptd.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))}
    cmd = [
        sys.executable,
        "-m",
        "ckptd",
        "start",
        "--user",
        "--socket",
        str(socket_path),
        "--root",
        str(root),
        "--idle-exit",
        "60",
    ]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            cwd="/",
            env=env,
            start_new_session=True,
        )
    finally:
        os.close(fd)
    _spawned.append(proc)
    log.info("started ckptd (pid %d) on %s, log %s", proc.pid, socket_path, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if can_connect(socket_path):
            return
        if proc.poll() is not None and proc.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            if any("already serving" in line for line in tail):
                continue  # another process spawned it first; keep trying to connect
            raise DaemonUnavailableError(
                f"the ckptd daemon started on {socket_path} exited with code {proc.returncode}; "
                f"its log ({log_path}) ends with: " + " | ".join(tail)
            )
        time.sleep(0.05)
    raise DaemonUnavailableError(
        f"the ckptd daemon started on {socket_path} did not answer within {timeout_s} s; "
        f"see {log_path}"
    )


OnFull = Literal["block", "skip"]


class Client:
    """A training process's handle on the ckptd daemon, for one job.

    ``socket``: the daemon socket (default: ``CKPTD_SOCKET``, ``daemon.socket`` in the config, the
    system socket if present, else the per-user socket). ``root``: where checkpoints go (default:
    ``CKPTD_ROOT``, ``store.root``, ``./checkpoints``). ``slots``: shared-memory buffers in the
    ring; with ``slots=2`` one snapshot can be written while the next is copied. ``on_full``:
    when every slot is still being read, ``"block"`` waits (the wait counts as stall) and
    ``"skip"`` drops the snapshot (the handle says so). ``spawn``: start a per-user daemon when
    none answers (default: yes, unless the socket is the system one). ``strict``: raise daemon
    failures from ``snapshot()`` instead of logging them.
    """

    def __init__(
        self,
        job: str,
        *,
        socket: str | Path | None = None,
        root: str | Path | None = None,
        slots: int = 2,
        on_full: OnFull = "block",
        spawn: bool | None = None,
        strict: bool = False,
        allow_pickle: bool = False,
        retention: dict[str, Any] | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        from ckptd.store import validate_job_name

        self.job = validate_job_name(job)
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        if on_full not in ("block", "skip"):
            raise ValueError(f"on_full must be 'block' or 'skip', got {on_full!r}")
        config = load_config()
        self.root = resolve_root(root, config).absolute()
        self.socket_path = resolve_socket(socket, config)
        self.spawn = (self.socket_path != SYSTEM_SOCKET) if spawn is None else spawn
        self.n_slots = slots
        self.on_full = on_full
        self.strict = strict
        self.allow_pickle = allow_pickle
        self.retention = None
        if retention is not None:
            from ckptd.retention import policy_from_dict, policy_to_dict

            self.retention = policy_to_dict(policy_from_dict(retention, "retention"))
        self.timeout_s = timeout_s
        self.stats = {"snapshots": 0, "skipped": 0, "blocked": 0, "blocked_s": 0.0, "failed": 0}
        self._cond = threading.Condition()
        self._call = threading.RLock()
        self._slots: list[_Slot] = []
        self._next_slot_id = 0
        self._pending: dict[int, PendingSnapshot] = {}
        self._seq = 0
        self._link: _Link | None = None
        self._closed = False
        self._stream: Any = None
        self._prepare_thread: threading.Thread | None = None
        self._last_wait_s = 0.0
        self._connect()

    # ---- connection ----------------------------------------------------------------------

    def _connect(self) -> _Link:
        try:
            link = _Link(self.socket_path, self.timeout_s, self._on_event)
        except OSError as exc:
            if not self.spawn:
                raise DaemonUnavailableError(
                    f"no ckptd daemon answers on {self.socket_path} ({exc.strerror or exc}); "
                    "start one (`ckptd start --user`, or `systemctl start ckptd`), or let the "
                    "client start one with Client(..., spawn=True)"
                ) from exc
            try:
                spawn_daemon(self.socket_path, self.root)
                link = _Link(self.socket_path, self.timeout_s, self._on_event)
            except OSError as spawn_exc:
                raise DaemonUnavailableError(
                    f"no ckptd daemon answers on {self.socket_path} and none could be started "
                    f"there: {spawn_exc.strerror or spawn_exc} ({spawn_exc.filename or ''}); "
                    "start one yourself (`ckptd start --user --socket ...`) or pass another "
                    "socket="
                ) from spawn_exc
        try:
            welcome = link.request(
                {
                    "op": "hello",
                    "version": PROTOCOL_VERSION,
                    "job": self.job,
                    "root": str(self.root),
                    "pid": os.getpid(),
                    "retention": self.retention,
                }
            )
        except BaseException:
            link.close()
            raise
        if welcome.get("version") != PROTOCOL_VERSION:
            link.close()
            raise ProtocolError(
                f"daemon speaks protocol {welcome.get('version')!r}, this client "
                f"{PROTOCOL_VERSION}; install matching ckptd versions"
            )
        self.root = Path(str(welcome.get("root", self.root)))
        self._link = link
        return link

    def _ensure_link(self) -> _Link:
        link = self._link
        if link is not None and not link.lost:
            return link
        if link is not None:
            link.close()
            self._link = None
            self._drop_slots()
        return self._connect()

    def _on_event(self, link: _Link, msg: Message) -> None:
        op = msg["op"]
        with self._cond:
            if op == "released":
                for slot in self._slots:
                    if slot.id == msg.get("slot"):
                        slot.busy = False
            elif op in ("committed", "failed"):
                pending = self._pending.pop(int(msg.get("seq", -1)), None)
                if pending is not None and op == "committed":
                    pending._resolve(
                        CheckpointInfo(
                            self.job,
                            int(msg["step"]),
                            str(msg["path"]),
                            int(msg["raw_bytes"]),
                            int(msg["stored_bytes"]),
                            int(msg["written_bytes"]),
                            pending.stall_s,
                            float(msg["persist_s"]),
                        )
                    )
                elif pending is not None:
                    self.stats["failed"] += 1
                    error = error_from(msg)
                    log.warning("ckptd: %s step %d failed: %s", self.job, pending.step, error)
                    pending._reject(error)
            elif op == "__lost__" and link is self._link and not self._closed:
                for pending in self._pending.values():
                    pending._reject(
                        DaemonUnavailableError(
                            f"the connection to ckptd at {self.socket_path} was lost before "
                            f"step {pending.step} was reported committed; it may or may not be "
                            f"on disk (check `ckptd list {self.job}`)"
                        )
                    )
                if self._pending:
                    log.warning(
                        "ckptd: connection lost with %d snapshot(s) unconfirmed", len(self._pending)
                    )
                self._pending.clear()
            self._cond.notify_all()

    def _drop_slots(self) -> None:
        """Forget every slot (after a lost connection the daemon may still read old ones)."""
        with self._cond:
            slots, self._slots = self._slots, []
        for slot in slots:
            slot.close()

    # ---- slots ---------------------------------------------------------------------------

    def _new_slot(self, link: _Link, need: int, pin: bool) -> _Slot:
        size = max(_SLOT_ROUND, (need + _SLOT_ROUND - 1) // _SLOT_ROUND * _SLOT_ROUND)
        slot = _Slot(self._next_slot_id, size, self.job)
        self._next_slot_id += 1
        try:
            slot.prefault()
            if pin:
                slot.pin()
            link.request({"op": "register", "slot": slot.id, "size": size}, [slot.fd])
        except BaseException:
            slot.close()
            raise
        return slot

    def _acquire(self, link: _Link, need: int, pin: bool) -> _Slot | None:
        """A free slot of at least ``need`` bytes, marked busy; None when skipped (on_full)."""
        waited = 0.0
        victim: _Slot | None = None
        with self._cond:
            while True:
                if link.lost:
                    raise DaemonUnavailableError(
                        f"the connection to ckptd at {self.socket_path} was lost"
                    )
                free = [s for s in self._slots if not s.busy]
                fit = next((s for s in free if s.size >= need), None)
                if fit is not None:
                    fit.busy = True
                    break
                if free or len(self._slots) < self.n_slots:
                    victim = free[0] if free else None
                    if victim is not None:
                        self._slots.remove(victim)
                    fit = None
                    break
                if self.on_full == "skip":
                    return None
                started = time.perf_counter()
                self._cond.wait(timeout=1.0)
                waited += time.perf_counter() - started
        self._last_wait_s = waited
        if waited:
            self.stats["blocked"] += 1
            self.stats["blocked_s"] += waited
            log.info("ckptd: snapshot waited %.3f s for a free slot", waited)
        if fit is not None:
            return fit
        if victim is not None:  # too small: replace it with a bigger one
            try:
                link.request({"op": "unregister", "slot": victim.id})
            finally:
                victim.close()
        slot = self._new_slot(link, need, pin)
        slot.busy = True
        with self._cond:
            self._slots.append(slot)
        return slot

    @staticmethod
    def _layout(
        paths: Sequence[str], tensors: Sequence[torch.Tensor]
    ) -> tuple[list[LayoutEntry], int]:
        entries = []
        cursor = 0
        for path, t in zip(paths, tensors, strict=True):
            nbytes = t.numel() * t.element_size()
            entries.append(LayoutEntry(path, dtype_name(t.dtype), tuple(t.shape), cursor, nbytes))
            cursor = align(cursor + nbytes)
        return entries, cursor

    def _fill(
        self,
        slot: _Slot,
        entries: list[LayoutEntry],
        tensors: Sequence[torch.Tensor],
        meta_offset: int,
        meta: bytes,
    ) -> None:
        cuda = [t for t in tensors if t.is_cuda]
        if cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            self._stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad():
            for e, t in zip(entries, tensors, strict=True):
                if e.nbytes == 0:
                    continue
                dst = slot.view(e.offset, t.dtype, e.shape)
                if t.is_cuda:
                    with torch.cuda.stream(self._stream):
                        dst.copy_(t, non_blocking=True)
                else:
                    dst.copy_(t)
        if cuda:
            self._stream.synchronize()
        slot.mm[meta_offset : meta_offset + len(meta)] = meta

    # ---- public API ----------------------------------------------------------------------

    def prepare(
        self,
        model: Stateful | dict[str, Any] | None = None,
        optimizer: Stateful | dict[str, Any] | None = None,
        *,
        scheduler: Stateful | dict[str, Any] | None = None,
        scaler: Stateful | dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        rng: bool = True,
        state: Any = None,
        headroom: float = 0.0,
        background: bool = True,
    ) -> threading.Thread | None:
        """Size and pre-fault every slot for this state, off the training loop.

        The first snapshot otherwise pays the page faults of fresh shared memory (about ten times
        the cost of the copy itself). Call it once the state has its final shape, e.g. after the
        first optimizer step (Adam's moments do not exist before), or pass ``headroom`` (0.5 =
        50% more) to size for state that will appear. Returns the background thread (join it to
        wait), or None with ``background=False``.
        """
        flat = flatten(
            collect(
                model,
                optimizer,
                scheduler=scheduler,
                scaler=scaler,
                rng=rng,
                extra=extra,
                state=state,
            ),
            allow_pickle=self.allow_pickle,
        )
        entries, data_end = self._layout(flat.paths, flat.tensors)
        meta = encode_layout(flat.skeleton, entries)
        need = int((data_end + len(meta)) * (1 + headroom)) + 2 * _PAGE
        pin = any(t.is_cuda for t in flat.tensors)

        def work() -> None:
            with self._call:
                link = self._ensure_link()
                for _ in range(self.n_slots):
                    slot = self._acquire(link, need, pin)
                    if slot is None:
                        break
                with self._cond:
                    for slot in self._slots:
                        slot.busy = False
                    self._cond.notify_all()

        if not background:
            work()
            return None
        thread = threading.Thread(target=self._guarded(work), name="ckptd-prepare", daemon=True)
        self._prepare_thread = thread
        thread.start()
        return thread

    def _guarded(self, fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except CkptdError as exc:
                log.warning("ckptd: prepare failed: %s", exc)

        return run

    def snapshot(
        self,
        model: Stateful | dict[str, Any] | None = None,
        optimizer: Stateful | dict[str, Any] | None = None,
        *,
        step: int,
        scheduler: Stateful | dict[str, Any] | None = None,
        scaler: Stateful | dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        metric: float | None = None,
        rng: bool = True,
        state: Any = None,
        pin: bool = False,
    ) -> PendingSnapshot:
        """Copy the state into shared memory, hand it to the daemon and return.

        ``pin=True`` protects the checkpoint from retention (``ckptd unpin`` releases it).

        Returns once the daemon has *accepted* the snapshot: from then on it is committed even if
        this process is killed. The tensors may be mutated as soon as this returns.
        """
        started = time.perf_counter()
        if self._closed:
            raise RuntimeError("snapshot() on a closed ckptd Client")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10**12:
            raise ValueError(f"step must be an integer in [0, 10**12), got {step!r}")
        flat = flatten(
            collect(
                model,
                optimizer,
                scheduler=scheduler,
                scaler=scaler,
                rng=rng,
                extra=extra,
                state=state,
            ),
            allow_pickle=self.allow_pickle,
        )
        entries, data_end = self._layout(flat.paths, flat.tensors)
        meta = encode_layout(flat.skeleton, entries)
        meta_offset = data_end
        need = meta_offset + len(meta)
        pending = PendingSnapshot(self.job, step)
        with self._call:
            self.stats["snapshots"] += 1
            try:
                link = self._ensure_link()
                slot = self._acquire(link, need, any(t.is_cuda for t in flat.tensors))
                if slot is None:
                    pending.skipped = True
                    self.stats["skipped"] += 1
                    link.send({"op": "skipped", "step": step})
                    log.warning("ckptd: every slot busy, snapshot of step %d skipped", step)
                    pending._reject(
                        SnapshotSkippedError(
                            f"{self.job} step {step} was skipped: all {self.n_slots} slot(s) were "
                            "still being written (on_full='skip'); snapshot less often or add slots"
                        )
                    )
                    pending.stall_s = time.perf_counter() - started
                    return pending
                try:
                    self._fill(slot, entries, flat.tensors, meta_offset, meta)
                    with self._cond:
                        self._seq += 1
                        seq = self._seq
                        self._pending[seq] = pending
                    pending.stall_s = time.perf_counter() - started
                    reply = link.request(
                        {
                            "op": "submit",
                            "seq": seq,
                            "slot": slot.id,
                            "step": step,
                            "meta_offset": meta_offset,
                            "meta_length": len(meta),
                            "metric": metric_to_wire(None if metric is None else float(metric)),
                            "stall_s": pending.stall_s,
                            "pin": bool(pin),
                            "blocked_s": self._last_wait_s,
                        }
                    )
                except BaseException:
                    with self._cond:
                        slot.busy = False
                        self._cond.notify_all()
                    raise
                if reply["op"] == "refused":
                    with self._cond:
                        slot.busy = False
                        self._pending.pop(seq, None)
                    raise error_from(reply)
            except CkptdError as exc:
                with self._cond:
                    self._pending = {k: v for k, v in self._pending.items() if v is not pending}
                self.stats["failed"] += 1
                pending._reject(exc)
                if self.strict:
                    raise
                log.warning("ckptd: snapshot of %s step %d failed: %s", self.job, step, exc)
        pending.stall_s = time.perf_counter() - started
        return pending

    def flush(self, timeout: float | None = None) -> list[PendingSnapshot]:
        """Wait until every accepted snapshot is committed or failed; return those still pending
        when ``timeout`` runs out (empty when all are done). Failures stay on their handles."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            waiting = list(self._pending.values())
        for pending in waiting:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            pending._done.wait(left)
        return [p for p in waiting if not p.done()]

    def close(self, timeout: float | None = 60.0) -> None:
        """Wait (up to ``timeout``) for outstanding snapshots, then disconnect and free the slots.

        Snapshots still being written are committed by the daemon anyway.
        """
        if self._closed:
            return
        self.flush(timeout)
        with self._call:
            self._closed = True
            if self._link is not None:
                self._link.close()
                self._link = None
            self._drop_slots()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def restore(
        self,
        model: Stateful | None,
        optimizer: Stateful | None = None,
        *,
        step: int | str = "latest",
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        map_location: str | torch.device | None = None,
        fallback: bool = False,
        rng: bool = True,
    ) -> dict[str, Any]:
        """:func:`ckptd_client.restore` for this client's job and root."""
        return restore(
            model,
            optimizer,
            job=self.job,
            step=step,
            scheduler=scheduler,
            scaler=scaler,
            root=self.root,
            map_location=map_location,
            fallback=fallback,
            rng=rng,
        )

    def list(self) -> list[Manifest]:
        """Manifests of this job's checkpoints, oldest first."""
        return list_checkpoints(self.job, root=self.root)
