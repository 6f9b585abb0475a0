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
import enum
import fcntl
import logging
import math
import mmap
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ckptd.config import DEFAULT_ROOT, SYSTEM_SOCKET, configured_root, load_config, locate_socket
from ckptd.errors import (
    CkptdError,
    DaemonNoAnswerError,
    DaemonUnavailableError,
    ProtocolError,
    SnapshotSkippedError,
    SnapshotUnconfirmedError,
    UntrustedDaemonError,
    error_from_reply,
)
from ckptd.format.restore import MapLocation
from ckptd.format.skeleton import dtype_name, flatten
from ckptd.protocol import (
    PROTOCOL_VERSION,
    LayoutEntry,
    Message,
    align,
    can_connect,
    check_daemon_peer,
    encode_layout,
    metric_to_wire,
    recv_message,
    send_message,
)
from ckptd_client.api import list_checkpoints, restore
from ckptd_client.state import Stateful, collect

log = logging.getLogger("ckptd_client")

_MADV_POPULATE_WRITE = 23
_MAX_VIEWS = 1 << 16  # cached slot views before the cache is dropped (a layout that keeps changing)
_PAGE = mmap.PAGESIZE
_SLOT_ROUND = 1 << 20
_spawned: list[subprocess.Popen[bytes]] = []
SPAWN_IDLE_EXIT_S = 60


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


@dataclass(frozen=True)
class CheckpointSummary:
    """A committed checkpoint as :meth:`Client.list` shows it: the manifest without its tensors
    and state. ``seq`` orders commits (0 for checkpoints written before ckptd recorded it);
    ``digest`` is the content hash of the tensors and state (None for those older ones)."""

    job: str
    step: int
    created: str
    seq: int
    digest: str | None
    raw_bytes: int
    stored_bytes: int
    metric: float | None
    latest: bool


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


class SlotState(enum.Enum):
    """Who owns a slot's bytes. Only the trainer thread moves a slot out of ``FREE`` and into
    ``SUBMITTED``; only the daemon's answers move it on from there (see :class:`_Ring`)."""

    FREE = "free"
    """In the ring; the next snapshot may fill it."""
    FILLING = "filling"
    """Taken by ``snapshot()`` / ``prepare()`` on the trainer thread; the daemon never reads it."""
    SUBMITTED = "submitted"
    """``submit`` was sent and not yet answered: the daemon may read it at any moment."""
    DAEMON = "daemon"
    """Accepted: the daemon reads it until it reports ``released``."""


class _Slot:
    """A sealed memfd mapped read-write here and read-only in the daemon."""

    def __init__(self, slot_id: int, size: int, job: str) -> None:
        self.id = slot_id
        self.size = size
        self.state = SlotState.FILLING
        self.seq: int | None = None  # the submit whose bytes the daemon reads (SUBMITTED, DAEMON)
        self.fd = os.memfd_create(f"ckptd-{job}-{slot_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
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
        """Unmap and close this side. The daemon's own mapping (if any) stays valid."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(  # type: ignore[no-untyped-call]
                self.bytes.data_ptr()
            )
            self.pinned = False
        self._views.clear()
        del self.bytes
        self.mm.close()
        os.close(self.fd)


class _Ring:
    """The client's slots and the one place their :class:`SlotState` changes.

    Thread safety: every method takes ``cond``'s lock. The trainer thread (under the client's call
    lock) takes, fills, submits and gives back slots; the link's reader thread applies the
    daemon's answers. When the connection is lost, :meth:`abandon` takes *every* slot out of the
    ring at once: a slot whose fate is unknown is never filled again. Abandoned slots are closed
    (unmapped on this side) later, on the trainer thread, which may still be copying into one.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.slots: list[_Slot] = []
        self.abandoned: list[_Slot] = []

    def _move(self, slot: _Slot, expect: SlotState, to: SlotState) -> None:
        if slot.state is not expect:
            raise AssertionError(f"slot {slot.id}: {slot.state.value} -> {to.value}")
        slot.state = to
        if to is SlotState.FREE:
            slot.seq = None
            self.cond.notify_all()

    def free(self) -> list[_Slot]:
        return [s for s in self.slots if s.state is SlotState.FREE]

    def take(self, slot: _Slot) -> None:
        """FREE -> FILLING (trainer)."""
        with self.cond:
            self._move(slot, SlotState.FREE, SlotState.FILLING)

    def add(self, slot: _Slot) -> None:
        """A new slot (born FILLING) joins the ring (trainer)."""
        with self.cond:
            self.slots.append(slot)

    def remove(self, slot: _Slot) -> None:
        with self.cond:
            self.slots.remove(slot)

    def give_back(self, slot: _Slot) -> None:
        """FILLING -> FREE (trainer): the daemon never saw this fill. A slot abandoned meanwhile
        stays abandoned."""
        with self.cond:
            if slot in self.slots:
                self._move(slot, SlotState.FILLING, SlotState.FREE)

    def submitting(self, slot: _Slot, seq: int) -> None:
        """FILLING -> SUBMITTED (trainer), just before ``submit`` is sent."""
        with self.cond:
            self._move(slot, SlotState.FILLING, SlotState.SUBMITTED)
            slot.seq = seq

    def answered(self, msg: Message) -> bool:
        """Apply the daemon's ``accepted`` / ``refused`` / ``released`` (reader thread). False
        when it names no slot in the state it implies: a protocol violation."""
        op = msg["op"]
        seq = msg.get("seq")
        with self.cond:
            for slot in self.slots:
                if slot.seq is None or slot.seq != seq:
                    continue
                if op == "accepted" and slot.state is SlotState.SUBMITTED:
                    self._move(slot, SlotState.SUBMITTED, SlotState.DAEMON)
                    return True
                if op == "refused" and slot.state is SlotState.SUBMITTED:
                    self._move(slot, SlotState.SUBMITTED, SlotState.FREE)
                    return True
                if (
                    op == "released"
                    and slot.state is SlotState.DAEMON
                    and slot.id == msg.get("slot")
                ):
                    self._move(slot, SlotState.DAEMON, SlotState.FREE)
                    return True
                return False
            return False

    def abandon(self) -> None:
        """The connection is gone: no slot of it may be filled again (reader or trainer)."""
        with self.cond:
            self.abandoned.extend(self.slots)
            self.slots = []
            self.cond.notify_all()

    def close_abandoned(self) -> None:
        """Unmap abandoned slots (trainer thread only, when no fill is in progress)."""
        with self.cond:
            slots, self.abandoned = self.abandoned, []
        for slot in slots:
            slot.close()


class _Waiter:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: Message | None = None


def check_private_dir(socket_path: Path) -> None:
    """Create the socket's directory (mode 0700) or check that it is a real directory (not a
    symlink) of this user that no one else may write: the client puts the spawned daemon's
    socket, lock and log there. Raises :class:`UntrustedDaemonError` for a directory of another
    user (or writable by others), :class:`DaemonUnavailableError` when it cannot be made."""
    directory = socket_path.parent
    try:
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DaemonUnavailableError(
            f"cannot start a ckptd daemon on {socket_path}: cannot create its directory "
            f"({exc.strerror}); pass socket= (or CKPTD_SOCKET) in a directory you can write"
        ) from exc
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        raise DaemonUnavailableError(
            f"cannot start a ckptd daemon on {socket_path}: {directory} is not a directory"
        )
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symlink"
    elif st.st_uid != os.getuid():
        problem = f"belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"
    elif stat.S_IMODE(st.st_mode) & 0o022:
        problem = f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem is not None:
        raise UntrustedDaemonError(
            f"will not start a ckptd daemon on {socket_path}: its directory {directory} "
            f"{problem}. Remove it, or set XDG_RUNTIME_DIR or socket= to a directory only you "
            "can write"
        )


class _Link:
    """One connection to the daemon: requests matched to replies by id, plus a reader thread.

    Every request gets a fresh ``id`` that the daemon echoes; the reader hands a reply only to the
    request with that id, and treats any other reply as a broken daemon. A request not answered
    within ``timeout_s`` *breaks* the link: the socket is shut down, every waiter is woken, and
    the owner must treat every slot registered on it as of unknown fate (the daemon may still act
    on what it received). ``on_answer(msg)`` runs on the reader thread for ``accepted`` /
    ``refused`` before the waiter wakes; ``on_event(link, msg)`` gets ``released``,
    ``committed``, ``failed`` and finally ``{"op": "__lost__"}``.
    """

    EVENTS = frozenset({"released", "committed", "failed"})

    def __init__(self, path: Path, timeout_s: float, on_event: Any, on_answer: Any) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(str(path))
            self.daemon_pid = check_daemon_peer(self.sock, path)
        except BaseException:
            self.sock.close()
            raise
        self.lost = False
        self.lost_reason = "the connection was closed"
        self._error: Message | None = None  # a connection-level error the daemon sent
        self._next_id = 0
        self._waiting: dict[int, _Waiter] = {}
        self._send_lock = threading.Lock()
        self._wait_lock = threading.Lock()
        self._on_event = on_event
        self._on_answer = on_answer
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
                rid = msg.get("id")
                if rid is not None:
                    with self._wait_lock:
                        waiter = self._waiting.pop(rid, None) if isinstance(rid, int) else None
                    if waiter is None:
                        self.lost_reason = f"the daemon sent a reply to no request ({msg['op']!r})"
                        break
                    if msg["op"] in ("accepted", "refused") and not self._on_answer(msg):
                        self.lost_reason = f"the daemon's {msg['op']!r} names no submitted slot"
                        waiter.event.set()  # reply None: unanswered
                        break
                    waiter.reply = msg
                    waiter.event.set()
                elif msg["op"] == "error":
                    self._error = msg  # about the connection; the daemon closes it next
                    self.lost_reason = f"the daemon closed it: {msg.get('message')}"
                    break
                elif msg["op"] in self.EVENTS:
                    self._on_event(self, msg)
                else:
                    self.lost_reason = f"the daemon sent an unexpected {msg['op']!r}"
                    break
        except (OSError, ProtocolError) as exc:
            self.lost_reason = f"the connection failed ({exc})"
        finally:
            self.lost = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            with self._wait_lock:
                waiting, self._waiting = list(self._waiting.values()), {}
            for waiter in waiting:
                waiter.reply = self._error
                waiter.event.set()
            self._on_event(self, {"op": "__lost__"})

    def request(self, msg: Message, fds: list[int] | None = None) -> Message:
        """Send ``msg`` and return its reply (an ``error`` reply raises its exception).

        Raises :class:`DaemonUnavailableError` when it could not be sent, and its subclass
        :class:`DaemonNoAnswerError` when it was sent but not answered (the link is broken then)."""
        waiter = _Waiter()
        with self._send_lock:
            if self.lost:
                raise DaemonUnavailableError(
                    f"the connection to ckptd at {self.path} was lost: {self.lost_reason}"
                )
            self._next_id += 1
            rid = self._next_id
            with self._wait_lock:
                self._waiting[rid] = waiter
            try:
                send_message(self.sock, {**msg, "id": rid}, fds)
            except OSError as exc:
                with self._wait_lock:
                    self._waiting.pop(rid, None)
                self._reader.join(timeout=1.0)  # the daemon may have said why it closed
                if self._error is not None:
                    raise error_from(self._error) from exc
                self.lost_reason = f"cannot send to it: {exc.strerror or exc}"
                self.break_link()
                raise DaemonUnavailableError(
                    f"cannot send {msg['op']!r} to ckptd at {self.path}: {exc.strerror or exc}"
                ) from exc
        if not waiter.event.wait(self.timeout_s):
            self.lost_reason = f"no answer to {msg['op']!r} within {self.timeout_s} s"
            self.break_link()
            # The reader reports the loss (every other handle of this link resolves) before
            # the caller hears of it.
            self._reader.join(timeout=5)
            raise DaemonNoAnswerError(
                f"ckptd at {self.path} did not answer {msg['op']!r} within {self.timeout_s} s; "
                "the connection was dropped and its slots abandoned (the next call reconnects)"
            )
        reply = waiter.reply
        if reply is None:
            self._reader.join(timeout=5)
            raise DaemonNoAnswerError(
                f"ckptd at {self.path} closed the connection during {msg['op']!r}: "
                f"{self.lost_reason}"
            )
        if reply["op"] == "error":
            raise error_from(reply)
        return reply

    def send(self, msg: Message) -> None:
        """A message that gets no reply (``skipped``); lost silently with the link."""
        with self._send_lock:
            try:
                send_message(self.sock, msg)
            except OSError:
                pass

    def break_link(self) -> None:
        """Give up on this connection: the reader sees EOF and reports it lost."""
        self.lost = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.break_link()
        self._reader.join(timeout=5)
        self.sock.close()


def spawn_daemon(socket_path: Path, root: Path, timeout_s: float = 60.0) -> None:
    """Start ``ckptd start --user`` detached (own session, idle exit) and wait until it answers.

    The socket's directory must be this user's own (see :func:`check_private_dir`); the log is
    opened there without following symlinks."""
    for proc in list(_spawned):  # reap daemons that exited
        if proc.poll() is not None:
            _spawned.remove(proc)
    check_private_dir(socket_path)
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
        str(SPAWN_IDLE_EXIT_S),
        "--on-demand",
    ]
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(log_path, flags, 0o600)
    except OSError as exc:
        raise UntrustedDaemonError(
            f"cannot open the daemon log {log_path} ({exc.strerror}); it must be a regular file "
            "of yours, not a symlink"
        ) from exc
    try:
        if os.fstat(fd).st_uid != os.getuid() or not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UntrustedDaemonError(
                f"the daemon log {log_path} is not a regular file of uid {os.getuid()}; remove it"
            )
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
    # One line a user sees by default: a background process now runs on their behalf.
    log.warning(
        "ckptd_client: no daemon answered on %s; started one (pid %d) writing checkpoints to %s "
        "(exits after %d s idle; log %s)",
        socket_path,
        proc.pid,
        root,
        SPAWN_IDLE_EXIT_S,
        log_path,
    )
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
    ``CKPTD_ROOT``, ``store.root``; with none of them, where the daemon writes, and
    ``./checkpoints`` with a daemon this client spawned; see :mod:`ckptd.locate`). After the
    connection, ``self.root`` is the root the daemon writes this job to. ``slots``:
    shared-memory buffers in the ring; with ``slots=2`` one snapshot can be written while the
    next is copied. ``on_full``: when every slot is still being read, ``"block"`` waits (the wait
    counts as stall) and ``"skip"`` drops the snapshot (the handle says so). ``spawn``: start a
    per-user daemon when none answers; the default is yes only for the per-user socket nobody
    named (a socket given as ``socket=``, ``CKPTD_SOCKET`` or ``daemon.socket`` means that
    daemon: it not answering is a :class:`DaemonUnavailableError`). ``strict``: raise daemon
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
        from ckptd.format.store import validate_job_name

        self.job = validate_job_name(job)
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        if on_full not in ("block", "skip"):
            raise ValueError(f"on_full must be 'block' or 'skip', got {on_full!r}")
        config = load_config()
        asked = configured_root(root, config)
        self._asked_root = None if asked is None else asked.absolute()
        # The embedded default, fixed now (a later chdir must not move it); until the daemon
        # answers, self.root is the root a daemon spawned by this client writes to.
        self._default_root = DEFAULT_ROOT.absolute()
        self.root = self._asked_root or self._default_root
        self.socket_path, self._socket_source = locate_socket(socket, config)
        if spawn is None:
            spawn = self._socket_source == "default" and self.socket_path != SYSTEM_SOCKET
        self.spawn = spawn
        self.n_slots = slots
        self.on_full = on_full
        self.strict = strict
        self.allow_pickle = allow_pickle
        self.retention = None
        if retention is not None:
            from ckptd.policy.retention import policy_from_dict, policy_to_dict

            self.retention = policy_to_dict(policy_from_dict(retention, "retention"))
        self.timeout_s = timeout_s
        self.stats = {"snapshots": 0, "skipped": 0, "blocked": 0, "blocked_s": 0.0, "failed": 0}
        self._ring = _Ring()
        self._call = threading.RLock()
        self._next_slot_id = 0
        self._pending: dict[int, tuple[_Link, PendingSnapshot]] = {}
        self._seq = 0
        self._submitting: int | None = None  # the submit waiting for accepted / refused
        self._link: _Link | None = None
        self._closed = False
        self._stream: Any = None
        self._prepare_thread: threading.Thread | None = None
        self._last_wait_s = 0.0
        self._connect()

    # ---- connection ----------------------------------------------------------------------

    def _connect(self) -> _Link:
        try:
            link = _Link(self.socket_path, self.timeout_s, self._on_event, self._ring.answered)
        except UntrustedDaemonError:
            raise
        except OSError as exc:
            if not self.spawn:
                named = {
                    "socket=": "the socket= argument",
                    "CKPTD_SOCKET": "CKPTD_SOCKET",
                    "daemon.socket": "daemon.socket in the config",
                    "system": "the system daemon's socket",
                }.get(self._socket_source, "default (the per-user socket)")
                raise DaemonUnavailableError(
                    f"no ckptd daemon answers on {self.socket_path} ({exc.strerror or exc}), "
                    f"named by {named}. Start that daemon (`ckptd start --socket "
                    f"{self.socket_path}`, or `systemctl start ckptd`), correct the path, or "
                    "let the client start a private one with Client(..., spawn=True)"
                ) from exc
            try:
                spawn_daemon(self.socket_path, self._asked_root or self._default_root)
                link = _Link(self.socket_path, self.timeout_s, self._on_event, self._ring.answered)
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
                    "root": None if self._asked_root is None else str(self._asked_root),
                    "default_root": str(self._default_root),
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
        # From now on this client's root is this one, also after a reconnect to another daemon
        # (a restarted service, or one spawned on demand meanwhile): a run's checkpoints stay in
        # one place, or the reconnect fails saying why.
        self._asked_root = self.root
        self._link = link
        return link

    def _ensure_link(self) -> _Link:
        """The live connection, reconnecting (with a fresh, empty ring) after a lost one.
        Trainer thread, under the call lock."""
        link = self._link
        if link is None or link.lost:
            if link is not None:
                link.close()
                self._link = None
            self._ring.abandon()
            self._ring.close_abandoned()
            link = self._connect()
        return link

    def _on_event(self, link: _Link, msg: Message) -> None:
        """Reader thread: ``released`` / ``committed`` / ``failed`` / ``__lost__`` of ``link``."""
        op = msg["op"]
        if op == "released":
            if not self._ring.answered(msg):
                log.warning("ckptd: the daemon released a slot it did not hold: %s", msg)
                link.lost_reason = "the daemon released a slot it did not hold"
                link.break_link()
            return
        if op in ("committed", "failed"):
            with self._ring.cond:
                entry = self._pending.pop(int(msg.get("seq", -1)), None)
            if entry is None or entry[0] is not link:
                return
            pending = entry[1]
            if op == "committed":
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
            else:
                self.stats["failed"] += 1
                error = error_from(msg)
                log.warning("ckptd: %s step %d failed: %s", self.job, pending.step, error)
                pending._reject(error)
            return
        if op == "__lost__":
            if link is self._link:
                self._ring.abandon()
            # The submit still waiting for its answer is failed by the snapshot() that sent it.
            unconfirmed = self._take_pending(link, keep=self._submitting)
            for pending in unconfirmed:
                pending._reject(
                    SnapshotUnconfirmedError(
                        f"the connection to ckptd at {self.socket_path} was lost "
                        f"({link.lost_reason}) after the daemon accepted {self.job} step "
                        f"{pending.step} and before it reported the commit; the daemon normally "
                        f"still commits it (check `ckptd list {self.job}`)"
                    )
                )
            if unconfirmed and not self._closed:
                log.warning(
                    "ckptd: connection lost with %d snapshot(s) unconfirmed: %s",
                    len(unconfirmed),
                    link.lost_reason,
                )

    def _take_pending(
        self, link: _Link | None = None, keep: int | None = None
    ) -> list[PendingSnapshot]:
        """Remove and return the handles still waiting for ``link`` (every link: None), except
        the one of submit ``keep``."""
        with self._ring.cond:
            gone = {
                seq
                for seq, (lk, _p) in self._pending.items()
                if (link is None or lk is link) and seq != keep
            }
            taken = [self._pending.pop(seq)[1] for seq in sorted(gone)]
        return taken

    # ---- slots ---------------------------------------------------------------------------

    def _new_slot(self, link: _Link, need: int, pin: bool) -> _Slot:
        """A new slot of at least ``need`` bytes, registered with the daemon, in FILLING."""
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
        self._ring.add(slot)
        return slot

    def _acquire(self, link: _Link, need: int, pin: bool, *, wait: bool) -> _Slot | None:
        """A slot of at least ``need`` bytes, now FILLING and owned by the caller; None when
        every slot is held by the daemon and ``wait`` is false. A free slot that is too small is
        replaced by a bigger one. Trainer thread, under the call lock.

        Waiting for the daemon to release a slot is unbounded while the daemon is alive (a large
        write may take long); every ``timeout_s`` of waiting the daemon is asked for its status,
        and one that does not answer breaks the link (:class:`DaemonUnavailableError`)."""
        waited = 0.0
        ring = self._ring
        victim: _Slot | None = None
        fit: _Slot | None = None
        while True:
            since_ping = 0.0
            with ring.cond:
                while since_ping < link.timeout_s:
                    if link.lost:
                        raise DaemonUnavailableError(
                            f"the connection to ckptd at {self.socket_path} was lost: "
                            f"{link.lost_reason}"
                        )
                    free = ring.free()
                    fit = next((s for s in free if s.size >= need), None)
                    if fit is not None:
                        ring.take(fit)
                        break
                    if free or len(ring.slots) < self.n_slots:
                        victim = free[0] if free else None
                        if victim is not None:
                            ring.take(victim)
                            ring.remove(victim)
                        break
                    if not wait:
                        return None
                    started = time.perf_counter()
                    ring.cond.wait(timeout=min(1.0, link.timeout_s))
                    elapsed = time.perf_counter() - started
                    waited += elapsed
                    since_ping += elapsed
                else:
                    fit = None
                    victim = None
                    since_ping = -1.0  # waited timeout_s: is the daemon still alive?
            if since_ping >= 0:
                break
            link.request({"op": "status", "job": self.job})  # raises when it does not answer
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
        return self._new_slot(link, need, pin)

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
        50% more) to size for state that will appear. Slots the daemon is still reading are left
        alone (never waited for). Returns the background thread (join it to wait), or None with
        ``background=False``.
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
                if self._closed:
                    return
                link = self._ensure_link()
                taken: list[_Slot] = []
                try:
                    for _ in range(self.n_slots):
                        slot = self._acquire(link, need, pin, wait=False)
                        if slot is None:
                            break
                        taken.append(slot)
                finally:
                    for slot in taken:
                        self._ring.give_back(slot)

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
        this process is killed. The tensors may be mutated as soon as this returns. When the
        daemon does not answer within ``timeout_s`` the connection is dropped with every slot on
        it (the daemon may still read them; they are never refilled), the handle fails with
        :class:`SnapshotUnconfirmedError`, and the next call reconnects with fresh slots.
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
        pending = PendingSnapshot(self.job, step)
        with self._call:
            self.stats["snapshots"] += 1
            try:
                self._hand_off(
                    pending, flat.tensors, entries, meta_offset, meta, metric, pin, started
                )
            except CkptdError as exc:
                self.stats["failed"] += 1
                pending._reject(exc)
                if self.strict:
                    raise
                log.warning("ckptd: snapshot of %s step %d failed: %s", self.job, step, exc)
        pending.stall_s = time.perf_counter() - started
        return pending

    def _hand_off(
        self,
        pending: PendingSnapshot,
        tensors: Sequence[torch.Tensor],
        entries: list[LayoutEntry],
        meta_offset: int,
        meta: bytes,
        metric: float | None,
        pin: bool,
        started: float,
    ) -> None:
        """Fill a slot and submit it (trainer thread, under the call lock). Raises the
        :class:`CkptdError` that failed the hand-off."""
        step = pending.step
        link = self._ensure_link()
        slot = self._acquire(
            link,
            meta_offset + len(meta),
            any(t.is_cuda for t in tensors),
            wait=self.on_full == "block",
        )
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
            return
        try:
            self._fill(slot, entries, tensors, meta_offset, meta)
        except BaseException:
            self._ring.give_back(slot)
            raise
        self._seq += 1
        seq = self._seq
        with self._ring.cond:
            self._pending[seq] = (link, pending)
        pending.stall_s = time.perf_counter() - started
        self._ring.submitting(slot, seq)
        self._submitting = seq
        try:
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
        except DaemonNoAnswerError as exc:
            # The daemon may have accepted it: the slot left the ring with the link.
            with self._ring.cond:
                self._pending.pop(seq, None)
            raise SnapshotUnconfirmedError(
                f"{self.job} step {step}: {exc}; the daemon may or may not commit it (check "
                f"`ckptd list {self.job}`)"
            ) from exc
        except BaseException:
            with self._ring.cond:
                self._pending.pop(seq, None)
            raise
        finally:
            self._submitting = None
        if reply["op"] == "refused":  # the ring already took the slot back
            with self._ring.cond:
                self._pending.pop(seq, None)
            raise error_from(reply)

    def flush(self, timeout: float | None = None) -> list[PendingSnapshot]:
        """Wait until every accepted snapshot is committed or failed; return those still pending
        when ``timeout`` runs out (empty when all are done). Failures stay on their handles."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ring.cond:
            waiting = [p for _link, p in self._pending.values()]
        for pending in waiting:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            pending._done.wait(left)
        return [p for p in waiting if not p.done()]

    def close(self, timeout: float | None = 60.0) -> None:
        """Wait (up to ``timeout``) for outstanding snapshots, then disconnect and free the slots.

        Snapshots still being written are committed by the daemon anyway. Every handle is
        resolved when this returns: a snapshot whose outcome the daemon had not reported by then
        fails with :class:`SnapshotUnconfirmedError` ("unknown").
        """
        if self._closed:
            return
        self.flush(timeout)
        with self._call:
            self._closed = True
            unanswered = self._take_pending()
            if self._link is not None:
                self._link.close()
                self._link = None
            self._ring.abandon()
            self._ring.close_abandoned()
        for pending in unanswered:
            pending._reject(
                SnapshotUnconfirmedError(
                    f"{self.job} step {pending.step}: outcome unknown: the client closed before "
                    f"the daemon answered; the daemon normally still commits it (check "
                    f"`ckptd list {self.job}`)"
                )
            )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_daemon(self, timeout_s: float = 60.0) -> None:
        """Wait until the daemon holds no accepted, uncommitted snapshot of this job, from this
        process or any other (e.g. one handed off by a trainer that was then killed).

        Raises :class:`TimeoutError` naming the steps still pending after ``timeout_s``, and
        :class:`DaemonUnavailableError` when no daemon answers."""
        with self._call:
            if self._closed:
                raise RuntimeError("wait_for_daemon() on a closed ckptd Client")
            link = self._ensure_link()
            saved = link.timeout_s
            link.timeout_s = timeout_s + max(saved, 5.0)
            try:
                reply = link.request({"op": "drain", "timeout_s": float(timeout_s)})
            finally:
                link.timeout_s = saved
        steps = reply.get("pending") or []
        if steps:
            raise TimeoutError(
                f"ckptd is still committing {self.job} step(s) {steps} after {timeout_s} s; "
                "restoring now would resume from an older checkpoint. Wait longer "
                "(restore(..., wait_s=...)) or see `ckptd status`"
            )

    def restore(
        self,
        model: Stateful | None,
        optimizer: Stateful | None = None,
        *,
        step: int | str = "latest",
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        map_location: MapLocation = None,
        fallback: bool = False,
        rng: bool = True,
        strict: bool = True,
        wait_s: float = 60.0,
    ) -> dict[str, Any]:
        """:func:`ckptd_client.restore` for this client's job and root.

        First waits (up to ``wait_s``, see :meth:`wait_for_daemon`) until the daemon has
        committed every snapshot of this job it accepted, so that ``"latest"`` is the newest
        hand-off, also after a trainer was killed and restarted."""
        try:
            if not self._closed:
                self.wait_for_daemon(wait_s)
        except DaemonUnavailableError as exc:
            # A daemon that is gone holds nothing in flight: what is on disk is all there is.
            log.warning("ckptd: restoring without asking the daemon about pending commits: %s", exc)
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
            strict=strict,
        )

    def list(self) -> list[CheckpointSummary]:
        """This job's checkpoints in commit order (the last one is ``latest``), as summaries;
        ``ckptd_client.list_checkpoints`` returns whole manifests."""
        manifests = sorted(
            list_checkpoints(self.job, root=self.root), key=lambda m: (m.seq, m.step)
        )
        return [
            CheckpointSummary(
                job=m.job,
                step=m.step,
                created=m.created,
                seq=m.seq,
                digest=m.digest,
                raw_bytes=m.raw_bytes,
                stored_bytes=m.stored_bytes,
                metric=m.metric,
                latest=i == len(manifests) - 1,
            )
            for i, m in enumerate(manifests)
        ]
