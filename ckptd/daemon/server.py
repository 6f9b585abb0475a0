"""The daemon's socket side: binding, peer checks, and one :class:`Connection` per client.

Everything here runs on the daemon's asyncio loop thread (readers registered with
``loop.add_reader``); nothing blocks. A connection owns the shared-memory slots its client
registered: each is an fd (a sealed memfd) mapped read-only. A slot that a queued snapshot still
reads stays mapped after its client disconnects or dies, until the pipeline has read it; that is
how a snapshot survives its trainer.

A malformed message closes *that* connection (with an ``error`` reply and a log line); the daemon
and its other clients carry on.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import grp
import logging
import mmap
import os
import pwd
import socket
import stat
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd.errors import (
    CkptdError,
    ConfigError,
    DaemonUnavailableError,
    InvalidNameError,
    ProtocolError,
    StorePermissionError,
)
from ckptd.format.skeleton import dtype_from_name
from ckptd.format.store import Store, validate_job_name
from ckptd.policy.retention import policy_from_dict, policy_to_dict
from ckptd.protocol import (
    MAX_META_BYTES,
    PROTOCOL_VERSION,
    Layout,
    Message,
    close_fds,
    encode_message,
    get_int,
    get_metric,
    get_seconds,
    parse_layout,
    recv_packet,
)
from ckptd.protocol import decode_message as _decode

if TYPE_CHECKING:
    from ckptd.daemon.lifecycle import Daemon

log = logging.getLogger("ckptd.daemon.server")

MAX_SLOTS_PER_CLIENT = 64
MAX_SLOT_BYTES = 1 << 40
MAX_QUEUED_REPLIES = 1024
"""Replies and events queued for a client that does not read them; one more disconnects it."""
_REQUIRED_SEALS = fcntl.F_SEAL_SHRINK


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


@dataclass
class Slot:
    """A client's shared-memory segment, mapped read-only in the daemon."""

    id: int
    fd: int
    size: int
    mm: mmap.mmap
    busy_seq: int | None = None
    retired: bool = False

    def close(self) -> None:
        try:
            try:
                self.mm.close()
            except BufferError:
                # A view of the mapping is still referenced (e.g. by a traceback cycle):
                # collect cycles and retry; if it is still pinned, let the mmap die with it.
                gc.collect()
                try:
                    self.mm.close()
                except BufferError:
                    log.warning("slot %d: mapping still referenced; it is freed later", self.id)
        finally:
            os.close(self.fd)


@dataclass
class WriteRequest:
    """A snapshot accepted from a client, waiting for (or going through) the pipeline."""

    conn: Connection
    seq: int
    slot: Slot
    store: Store
    job: str
    step: int
    layout: Layout
    metric: float | None
    raw_bytes: int
    accepted_at: float
    estimate_bytes: int = 0
    pin: bool = False
    done: bool = False


def request_id(msg: Message) -> int | None:
    """The ``id`` a reply to ``msg`` must echo (None when the request carries none)."""
    rid = msg.get("id")
    if rid is None:
        return None
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 2**63:
        raise ProtocolError(f"{msg.get('op')}.id: expected an integer >= 0, got {rid!r:.40}")
    return rid


def peer_of(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid, uid, gid)


def allowed_gids(names: tuple[str, ...]) -> set[int]:
    gids = set()
    for name in names:
        try:
            gids.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            log.warning("daemon.allowed_groups: no group named %r", name)
    return gids


def peer_allowed(peer: Peer, gids: set[int]) -> bool:
    """Daemon's own uid, root, or a member of an allowed group may connect."""
    if peer.uid in (0, os.getuid()):
        return True
    if not gids:
        return False
    if peer.gid in gids:
        return True
    try:
        name = pwd.getpwuid(peer.uid).pw_name
        return bool(gids & set(os.getgrouplist(name, peer.gid)))
    except KeyError:
        return False


def bind_socket(path: Path, *, user: bool) -> tuple[socket.socket, int]:
    """Create the socket's directory when it is missing (0700 user / 0750 system), take the
    lock, remove a stale socket, bind and listen. Returns the listening socket and the lock fd
    (keep it open).

    A directory that exists is never changed: it may be shared (``/tmp``) or managed by someone
    else (systemd's ``RuntimeDirectory``). The socket's own mode (0600 user / 0660 system, set
    atomically by the umask at ``bind``) is what keeps other users out, and clients check the
    daemon's uid (``SO_PEERCRED``) whatever the directory. A directory anyone may write without
    the sticky bit is refused: anyone could replace the socket in it.

    Raises :class:`DaemonUnavailableError` when another daemon already serves ``path``,
    :class:`ConfigError` when the directory cannot be used.
    """
    directory = path.parent
    dir_mode, sock_mode = (0o700, 0o600) if user else (0o750, 0o660)
    if directory.is_symlink():
        raise ConfigError(f"socket directory {directory} is a symlink; refusing to use it")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=dir_mode)
        # Ours, just created: set the documented mode whatever the umask narrowed (not through
        # a symlink that replaced it meanwhile).
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(dir_fd, dir_mode)
        finally:
            os.close(dir_fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(
            f"cannot create socket directory {directory}: {exc.strerror}; create it, or choose "
            "another --socket"
        ) from exc
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(
            f"socket directory {directory} is not a directory; choose another --socket"
        )
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"socket directory {directory} is writable by everyone without the sticky bit "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): anyone could replace the socket. Choose a "
            "--socket in a directory of your own (ckptd creates a missing one with mode "
            f"{dir_mode:04o})"
        )
    try:
        lock_fd = os.open(
            f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot open the lock file {path}.lock ({exc.strerror}); it must be a regular file "
            "of the daemon's user, not a symlink"
        ) from exc
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DaemonUnavailableError(
                f"another ckptd is already serving {path}; stop it first (ckptd stop --socket "
                f"{path}) or choose another --socket"
            ) from exc
        raise
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        try:
            if path.exists() or path.is_symlink():
                path.unlink()  # stale: we hold the lock, so no live daemon owns it
            old_umask = os.umask(0o777 & ~sock_mode)
            try:
                sock.bind(str(path))  # created with sock_mode exactly; no chmod (follows links)
            finally:
                os.umask(old_umask)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the socket {path} ({exc.strerror}); remove what is there if it "
                "is yours, or choose another --socket"
            ) from exc
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        os.close(lock_fd)
        raise
    return sock, lock_fd


class Connection:
    """One client connection, driven by the daemon's loop.

    States: new -> (hello) -> attached to a job -> closed. Replies are queued and flushed when
    the socket is writable, so a client that stops reading cannot stall the loop; one that lets
    more than :data:`MAX_QUEUED_REPLIES` pile up is disconnected.

    Every reply echoes the request's ``id``. Work that touches the filesystem (``hello``, the disk
    guard's admission of a ``submit``) runs on the daemon's control thread; reading from the
    connection pauses meanwhile, so its messages are still handled one at a time, in order.
    """

    def __init__(self, daemon: Daemon, sock: socket.socket, peer: Peer) -> None:
        self.daemon = daemon
        self.sock = sock
        self.peer = peer
        self.job: str | None = None
        self.store: Store | None = None
        self.slots: dict[int, Slot] = {}
        self.closed = False
        self.refused: str | None = None
        self._out: deque[bytes] = deque()
        self._writing = False
        self._paused = False
        self.name = f"pid {peer.pid} uid {peer.uid}"

    # ---- I/O -------------------------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            data, fds = recv_packet(self.sock)
        except BlockingIOError:
            return
        except ProtocolError as exc:
            self.fail(exc)
            return
        except OSError as exc:
            log.info("%s: connection error: %s", self.name, exc)
            self.close()
            return
        if data is None:
            self.close()
            return
        rid: int | None = None
        try:
            try:
                msg = _decode(data)
                rid = request_id(msg)
                self.handle(msg, fds, rid)
            finally:
                close_fds(fds)  # handlers dup what they keep
        except Exception as exc:
            self.on_error(exc, rid)

    def on_error(self, exc: BaseException, rid: int | None) -> None:
        """Answer a request that failed with ``error`` and close the connection."""
        if isinstance(exc, ProtocolError):
            self.fail(exc, rid)
        elif isinstance(exc, CkptdError):
            self.reply(rid, {"op": "error", "type": type(exc).__name__, "message": str(exc)})
            log.warning("%s: %s", self.name, exc)
            self.close()
        else:  # a bug: keep serving everyone else
            log.error("%s: unexpected error handling a message", self.name, exc_info=exc)
            self.fail(
                ProtocolError(f"the daemon could not handle this message ({exc!r:.200})"), rid
            )

    def reply(self, rid: int | None, msg: Message) -> None:
        """Send the reply to request ``rid`` (None: the request carried no id)."""
        self.send(msg if rid is None else {**msg, "id": rid})

    def send(self, msg: Message) -> None:
        if self.closed:
            return
        if len(self._out) >= MAX_QUEUED_REPLIES:
            log.warning("%s: disconnecting: it left %d messages unread", self.name, len(self._out))
            self.daemon.stats.record_error(f"{self.name}: disconnected, not reading replies")
            self._out.clear()
            self.close()
            return
        self._out.append(encode_message(msg))
        self._flush()

    def blocking(self, rid: int | None, work: Any, then: Any) -> None:
        """Run ``work()`` on the daemon's control thread, then ``then(result)`` on the loop.
        Reading from this connection pauses until then; an exception answers ``rid``."""
        self._pause(True)

        def finish(fut: Any) -> None:
            try:
                if fut.cancelled():
                    self.close()
                    return
                exc = fut.exception()
                if exc is not None:
                    self.on_error(exc, rid)
                    return
                try:
                    then(fut.result())
                except Exception as then_exc:
                    self.on_error(then_exc, rid)
            finally:
                self._pause(False)

        self.daemon.loop.run_in_executor(self.daemon.control_pool, work).add_done_callback(finish)

    def _pause(self, paused: bool) -> None:
        if self.closed or paused == self._paused:
            return
        self._paused = paused
        if paused:
            self.daemon.loop.remove_reader(self.sock.fileno())
        else:
            self.daemon.loop.add_reader(self.sock.fileno(), self.on_readable)

    def _flush(self) -> None:
        while self._out and not self.closed:
            try:
                self.sock.send(self._out[0])
            except BlockingIOError:
                if not self._writing:
                    self._writing = True
                    self.daemon.loop.add_writer(self.sock.fileno(), self._on_writable)
                return
            except OSError:
                self.close()
                return
            self._out.popleft()
        if self._writing and not self.closed:
            self._writing = False
            self.daemon.loop.remove_writer(self.sock.fileno())

    def _on_writable(self) -> None:
        self._flush()

    def fail(self, exc: Exception, rid: int | None = None) -> None:
        log.warning("%s: closing connection: %s", self.name, exc)
        self.daemon.stats.record_error(f"{self.name}: {exc}")
        self.reply(rid, {"op": "error", "type": type(exc).__name__, "message": str(exc)})
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        # Best effort: push out queued replies (an error) before closing.
        while self._out:
            try:
                self.sock.send(self._out.popleft())
            except OSError:
                break
        self.closed = True
        loop = self.daemon.loop
        if not self._paused:
            loop.remove_reader(self.sock.fileno())
        if self._writing:
            loop.remove_writer(self.sock.fileno())
        self.sock.close()
        try:
            for slot in list(self.slots.values()):
                if slot.busy_seq is None:
                    slot.close()
                else:
                    slot.retired = True  # closed by the writer once read
        finally:
            self.slots.clear()
            self.daemon.connection_closed(self)

    # ---- messages --------------------------------------------------------------------------

    def handle(self, msg: Message, fds: list[int], rid: int | None = None) -> None:
        if self.refused is not None:
            raise StorePermissionError(self.refused)
        op = msg["op"]
        if op != "register" and fds:
            raise ProtocolError(f"{op}: unexpected file descriptors")
        if op == "hello":
            self._hello(msg, rid)
        elif op == "status":
            job = msg.get("job")
            if job is not None and not isinstance(job, str):
                raise ProtocolError(f"status.job: expected a job name, got {job!r:.80}")
            self.reply(rid, {"op": "status", **self.daemon.status(job)})
        elif op == "stop":
            if self.peer.uid not in (0, os.getuid()):
                raise StorePermissionError(f"uid {self.peer.uid} may not stop this daemon")
            self.reply(rid, {"op": "stopping"})
            self.daemon.request_stop("stop requested by client " + self.name)
        elif self.job is None:
            raise ProtocolError(f"{op}: send hello first")
        elif op == "register":
            self._register(msg, fds, rid)
        elif op == "unregister":
            self._unregister(msg, rid)
        elif op == "submit":
            self._submit(msg, rid)
        elif op == "drain":
            assert self.store is not None
            timeout_s = get_seconds(msg, "timeout_s", 86400.0)
            self.daemon.drain(self, rid, self.store, self.job, timeout_s or 0.0)
        elif op == "skipped":
            self.daemon.stats.skipped += 1
            self.daemon.metrics.skipped(self.job)
        else:
            raise ProtocolError(f"unknown op {op!r}")

    def _hello(self, msg: Message, rid: int | None) -> None:
        if self.job is not None:
            raise ProtocolError("hello: already attached to a job")
        version = msg.get("version")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"client speaks ckptd protocol {version!r}, this daemon speaks "
                f"{PROTOCOL_VERSION}; install matching ckptd versions on both sides"
            )
        try:
            job = validate_job_name(msg.get("job"))
        except InvalidNameError as exc:
            raise ProtocolError(f"hello.job: {exc}") from exc
        root = self.daemon.store_for(
            self.daemon.client_root(msg.get("root"), msg.get("default_root")), self.peer
        )
        retention = msg.get("retention")
        policy = None
        if retention is not None:
            if not isinstance(retention, dict):
                raise ProtocolError("hello.retention: expected an object")
            policy = policy_to_dict(policy_from_dict(retention, "Client(retention=...)"))
        uid = self.peer.uid
        first_use = self.daemon.first_use(root, job)

        def attach() -> None:  # control thread: reads and fsyncs job.json, creates directories
            try:
                with self.daemon.job_mutex(root, job):
                    owner = root.job_owner(job)
                    if owner is None:
                        root.claim_job(job, uid)
                    elif uid not in (owner, 0):
                        raise StorePermissionError(
                            f"job {job!r} in {root.root} belongs to uid {owner}; uid {uid} may "
                            "not write it. Use another job name"
                        )
                    if policy is not None and root.job_info(job).get("retention") != policy:
                        root.update_job_info(job, retention=policy)
                    if first_use:
                        root.open_job(job)
                        swept = root.sweep_tmp(job)
                        if swept:
                            log.info("%s: swept %d stale tmp file(s)", job, swept)
            except BaseException:
                if first_use:  # the next client of the job opens it again
                    self.daemon.loop.call_soon_threadsafe(self.daemon.forget_use, root, job)
                raise

        def attached(_: None) -> None:
            if self.closed:
                return
            self.job, self.store = job, root
            self.name = f"{job} (pid {self.peer.pid}, uid {self.peer.uid})"
            log.info("%s: connected", self.name)
            self.reply(
                rid,
                {
                    "op": "welcome",
                    "version": PROTOCOL_VERSION,
                    "root": str(root.root),
                    "pid": os.getpid(),
                    "daemon": self.daemon.version,
                },
            )

        self.blocking(rid, attach, attached)

    def _register(self, msg: Message, fds: list[int], rid: int | None) -> None:
        slot_id = get_int(msg, "slot", 0, 2**31)
        size = get_int(msg, "size", 1, MAX_SLOT_BYTES)
        if len(fds) != 1:
            raise ProtocolError(f"register: expected exactly 1 file descriptor, got {len(fds)}")
        if slot_id in self.slots:
            raise ProtocolError(f"register: slot {slot_id} is already registered")
        if len(self.slots) >= MAX_SLOTS_PER_CLIENT:
            raise ProtocolError(f"register: more than {MAX_SLOTS_PER_CLIENT} slots")
        refusal = self.daemon.slot_limit(self.peer.uid, size)
        if refusal is not None:
            raise refusal
        fd = os.dup(fds[0])
        try:
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError as exc:
                raise ProtocolError("register: the fd is not a sealable memfd") from exc
            if seals & _REQUIRED_SEALS != _REQUIRED_SEALS:
                raise ProtocolError("register: the memfd must be sealed against shrinking")
            actual = os.fstat(fd).st_size
            if actual < size:
                raise ProtocolError(f"register: memfd holds {actual} bytes, fewer than {size}")
            try:
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            except (OSError, ValueError) as exc:
                raise ProtocolError(f"register: cannot map the memfd read-only ({exc})") from exc
        except BaseException:
            os.close(fd)
            raise
        self.slots[slot_id] = Slot(slot_id, fd, size, mm)
        self.reply(rid, {"op": "registered", "slot": slot_id})

    def _unregister(self, msg: Message, rid: int | None) -> None:
        slot_id = get_int(msg, "slot", 0, 2**31)
        slot = self.slots.pop(slot_id, None)
        if slot is None:
            raise ProtocolError(f"unregister: no slot {slot_id}")
        if slot.busy_seq is None:
            slot.close()
        else:
            slot.retired = True
        self.reply(rid, {"op": "unregistered", "slot": slot_id})

    def _submit(self, msg: Message, rid: int | None) -> None:
        assert self.job is not None and self.store is not None
        seq = get_int(msg, "seq")
        slot = self.slots.get(get_int(msg, "slot", 0, 2**31))
        if slot is None:
            raise ProtocolError(f"submit: unknown slot {msg.get('slot')!r}")
        if slot.busy_seq is not None:
            raise ProtocolError(f"submit: slot {slot.id} is still being read (seq {slot.busy_seq})")
        step = get_int(msg, "step", 0, 10**12 - 1)
        meta_offset = get_int(msg, "meta_offset", 0, slot.size)
        meta_length = get_int(msg, "meta_length", 2, MAX_META_BYTES)
        if meta_offset + meta_length > slot.size:
            raise ProtocolError(
                f"submit: layout [{meta_offset}, {meta_offset + meta_length}) is outside the "
                f"{slot.size}-byte slot"
            )
        metric = get_metric(msg)
        meta = slot.mm[meta_offset : meta_offset + meta_length]  # a private copy
        layout = parse_layout(meta, meta_offset, lambda d: dtype_from_name(d).itemsize)
        raw = sum(t.nbytes for t in layout.tensors)
        pin = msg.get("pin", False)
        if not isinstance(pin, bool):
            raise ProtocolError(f"submit.pin: expected true or false, got {pin!r:.40}")
        store, job = self.store, self.job
        request = WriteRequest(
            conn=self,
            seq=seq,
            slot=slot,
            store=store,
            job=job,
            step=step,
            layout=layout,
            metric=metric,
            raw_bytes=raw,
            accepted_at=self.daemon.loop.time(),
            pin=pin,
        )
        slot.busy_seq = seq  # from now on the daemon may read it; close() retires it

        def admitted(refusal: CkptdError | None) -> None:
            if refusal is not None or self.closed:
                self._unbusy(slot)
                if refusal is not None:
                    self.reply(
                        rid,
                        {
                            "op": "refused",
                            "seq": seq,
                            "type": type(refusal).__name__,
                            "message": str(refusal),
                        },
                    )
                return
            stall = get_seconds(msg, "stall_s")
            if stall is not None:
                self.daemon.metrics.stall(job, stall)
            blocked = get_seconds(msg, "blocked_s")
            if blocked:
                self.daemon.stats.blocked += 1
                self.daemon.stats.blocked_s += blocked
                self.daemon.metrics.blocked(job, blocked)
            request.accepted_at = self.daemon.loop.time()
            self.reply(rid, {"op": "accepted", "seq": seq})
            self.daemon.enqueue(request)

        try:
            self.daemon.admit(request, rid, admitted)
        except BaseException:
            self._unbusy(slot)
            raise

    def _unbusy(self, slot: Slot) -> None:
        slot.busy_seq = None
        if slot.retired or self.closed:
            slot.close()

    def release(self, request: WriteRequest) -> None:
        """The pipeline has read ``request``'s slot: let the client reuse it."""
        slot = request.slot
        self._unbusy(slot)
        if not (slot.retired or self.closed):
            self.send({"op": "released", "slot": slot.id, "seq": request.seq})


__all__ = ["Connection", "DaemonUnavailableError", "Peer", "Slot", "WriteRequest"]
