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
from typing import TYPE_CHECKING

from ckptd.errors import (
    CkptdError,
    ConfigError,
    DaemonUnavailableError,
    InvalidNameError,
    ProtocolError,
    StorePermissionError,
)
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
    get_str,
    parse_layout,
    recv_packet,
)
from ckptd.protocol import decode_message as _decode
from ckptd.retention import policy_from_dict, policy_to_dict
from ckptd.skeleton import dtype_from_name
from ckptd.store import Store, validate_job_name

if TYPE_CHECKING:
    from ckptd.daemon import Daemon

log = logging.getLogger("ckptd.server")

MAX_SLOTS_PER_CLIENT = 64
MAX_SLOT_BYTES = 1 << 40
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
    """Create the runtime dir (0700 user / 0750 system), take the lock, remove a stale socket,
    bind and listen. Returns the listening socket and the lock fd (keep it open).

    Raises :class:`DaemonUnavailableError` when another daemon already serves ``path``.
    """
    directory = path.parent
    dir_mode, sock_mode = (0o700, 0o600) if user else (0o750, 0o660)
    if directory.is_symlink():
        raise ConfigError(f"socket directory {directory} is a symlink; refusing to use it")
    try:
        directory.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create socket directory {directory}: {exc.strerror}") from exc
    st = directory.stat()
    if st.st_uid != os.getuid():
        raise ConfigError(
            f"socket directory {directory} belongs to uid {st.st_uid}, not {os.getuid()}; "
            "choose another --socket"
        )
    if stat.S_IMODE(st.st_mode) & 0o7777 != dir_mode and directory != Path(
        os.environ.get("XDG_RUNTIME_DIR", "/nonexistent")
    ):
        os.chmod(directory, dir_mode)
    lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
    try:
        if path.exists() or path.is_symlink():
            path.unlink()  # stale: we hold the lock, so no live daemon owns it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o777 & ~sock_mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, sock_mode)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        os.close(lock_fd)
        raise
    return sock, lock_fd


class Connection:
    """One client connection, driven by the daemon's loop.

    States: new -> (hello) -> attached to a job -> closed. Replies are queued and flushed when
    the socket is writable, so a client that stops reading cannot stall the loop.
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
        try:
            try:
                msg = _decode(data)
                self.handle(msg, fds)
            finally:
                close_fds(fds)  # handlers dup what they keep
        except ProtocolError as exc:
            self.fail(exc)
        except CkptdError as exc:
            self.send({"op": "error", "type": type(exc).__name__, "message": str(exc)})
            log.warning("%s: %s", self.name, exc)
            self.close()
        except Exception as exc:  # a bug: keep serving everyone else
            log.exception("%s: unexpected error handling a message", self.name)
            self.fail(ProtocolError(f"the daemon could not handle this message ({exc!r:.200})"))

    def send(self, msg: Message) -> None:
        if self.closed:
            return
        self._out.append(encode_message(msg))
        self._flush()

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

    def fail(self, exc: Exception) -> None:
        log.warning("%s: closing connection: %s", self.name, exc)
        self.daemon.stats.record_error(f"{self.name}: {exc}")
        self.send({"op": "error", "type": type(exc).__name__, "message": str(exc)})
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

    def handle(self, msg: Message, fds: list[int]) -> None:
        if self.refused is not None:
            raise StorePermissionError(self.refused)
        op = msg["op"]
        if op != "register" and fds:
            raise ProtocolError(f"{op}: unexpected file descriptors")
        if op == "hello":
            self._hello(msg)
        elif op == "status":
            self.send({"op": "status", **self.daemon.status()})
        elif op == "stop":
            if self.peer.uid not in (0, os.getuid()):
                raise StorePermissionError(f"uid {self.peer.uid} may not stop this daemon")
            self.send({"op": "stopping"})
            self.daemon.request_stop("stop requested by client " + self.name)
        elif self.job is None:
            raise ProtocolError(f"{op}: send hello first")
        elif op == "register":
            self._register(msg, fds)
        elif op == "unregister":
            self._unregister(msg)
        elif op == "submit":
            self._submit(msg)
        elif op == "skipped":
            self.daemon.stats.skipped += 1
            self.daemon.metrics.skipped(self.job)
        else:
            raise ProtocolError(f"unknown op {op!r}")

    def _hello(self, msg: Message) -> None:
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
        root = self.daemon.store_for(get_str(msg, "root"), self.peer)
        owner = root.job_owner(job)
        if owner is None:
            root.claim_job(job, self.peer.uid)
        elif self.peer.uid not in (owner, 0):
            raise StorePermissionError(
                f"job {job!r} in {root.root} belongs to uid {owner}; uid {self.peer.uid} may not "
                "write it. Use another job name"
            )
        retention = msg.get("retention")
        if retention is not None:
            if not isinstance(retention, dict):
                raise ProtocolError("hello.retention: expected an object")
            policy = policy_from_dict(retention, "Client(retention=...)")
            if root.job_info(job).get("retention") != policy_to_dict(policy):
                root.update_job_info(job, retention=policy_to_dict(policy))
        self.daemon.open_job(root, job)
        self.job, self.store = job, root
        self.name = f"{job} (pid {self.peer.pid}, uid {self.peer.uid})"
        log.info("%s: connected", self.name)
        self.send(
            {
                "op": "welcome",
                "version": PROTOCOL_VERSION,
                "root": str(root.root),
                "pid": os.getpid(),
                "daemon": self.daemon.version,
            }
        )

    def _register(self, msg: Message, fds: list[int]) -> None:
        slot_id = get_int(msg, "slot", 0, 2**31)
        size = get_int(msg, "size", 1, MAX_SLOT_BYTES)
        if len(fds) != 1:
            raise ProtocolError(f"register: expected exactly 1 file descriptor, got {len(fds)}")
        if slot_id in self.slots:
            raise ProtocolError(f"register: slot {slot_id} is already registered")
        if len(self.slots) >= MAX_SLOTS_PER_CLIENT:
            raise ProtocolError(f"register: more than {MAX_SLOTS_PER_CLIENT} slots")
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
        self.send({"op": "registered", "slot": slot_id})

    def _unregister(self, msg: Message) -> None:
        slot_id = get_int(msg, "slot", 0, 2**31)
        slot = self.slots.pop(slot_id, None)
        if slot is None:
            raise ProtocolError(f"unregister: no slot {slot_id}")
        if slot.busy_seq is None:
            slot.close()
        else:
            slot.retired = True
        self.send({"op": "unregistered", "slot": slot_id})

    def _submit(self, msg: Message) -> None:
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
        estimate = self.daemon.estimate(self.store, self.job, raw)
        refusal = self.daemon.admission(self.store, self.job, raw, estimate)
        if refusal is not None:
            self.send(
                {
                    "op": "refused",
                    "seq": seq,
                    "type": type(refusal).__name__,
                    "message": str(refusal),
                }
            )
            return
        stall = get_seconds(msg, "stall_s")
        if stall is not None:
            self.daemon.metrics.stall(self.job, stall)
        blocked = get_seconds(msg, "blocked_s")
        if blocked:
            self.daemon.stats.blocked += 1
            self.daemon.stats.blocked_s += blocked
            self.daemon.metrics.blocked(self.job, blocked)
        slot.busy_seq = seq
        request = WriteRequest(
            conn=self,
            seq=seq,
            slot=slot,
            store=self.store,
            job=self.job,
            step=step,
            layout=layout,
            metric=metric,
            raw_bytes=raw,
            accepted_at=self.daemon.loop.time(),
            estimate_bytes=estimate,
            pin=pin,
        )
        self.daemon.enqueue(request)
        self.send({"op": "accepted", "seq": seq})

    def release(self, request: WriteRequest) -> None:
        """The pipeline has read ``request``'s slot: let the client reuse it."""
        slot = request.slot
        slot.busy_seq = None
        if slot.retired or self.closed:
            slot.close()
        else:
            self.send({"op": "released", "slot": slot.id, "seq": request.seq})


__all__ = ["Connection", "DaemonUnavailableError", "Peer", "Slot", "WriteRequest"]
