"""One client's session: a :class:`Connection` speaking the protocol on the daemon's loop.

A connection reads one message at a time and answers every request with a reply that echoes its
``id`` (:func:`request_id`); events (``released``, ``committed``, ``failed``) carry none:

* ``hello``: attach to a job in a store (:class:`~ckptd.daemon.stores.Stores`), on a control
  thread; ``status`` and ``stop`` ask the daemon;
* ``register`` / ``unregister``: map / unmap a slot (a sealed memfd) read-only, within the
  admission's limits; the connection owns its slots (see :mod:`ckptd.daemon.requests`);
* ``submit``: check the layout fits the slot, ask the admission, and on ``accepted`` hand the
  request to the write queue; ``drain`` waits on the write queue; ``skipped`` is counted.

Replies are queued and flushed when the socket is writable, so a client that stops reading cannot
stall the loop; one that lets more than :data:`MAX_QUEUED_REPLIES` pile up is disconnected. A
malformed message closes *that* connection (``error`` reply, log line); the others carry on.

Threads: everything here runs on the loop thread and never blocks; filesystem work goes to the
control pool (:meth:`Connection.blocking`). What a session uses of the daemon: :class:`SessionHost`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

from ckptd import __version__
from ckptd.daemon.admission import Admission
from ckptd.daemon.listen import Peer
from ckptd.daemon.metrics import Metrics
from ckptd.daemon.requests import Slot, WriteRequest
from ckptd.daemon.stats import Stats
from ckptd.daemon.stores import Stores
from ckptd.daemon.writer import WriteQueue
from ckptd.errors import CkptdError, InvalidNameError, ProtocolError, StorePermissionError
from ckptd.format.manifest import check_attempt
from ckptd.format.skeleton import dtype_from_name
from ckptd.format.store import Store, validate_job_name
from ckptd.policy.retention import policy_from_dict, policy_to_dict
from ckptd.protocol import (
    MAX_META_BYTES,
    PROTOCOL_VERSION,
    LayoutParser,
    Message,
    close_fds,
    encode_message,
    get_int,
    get_metric,
    get_ranks,
    get_seconds,
    recv_packet,
)
from ckptd.protocol import decode_message as _decode

log = logging.getLogger("ckptd.daemon.session")

T = TypeVar("T")

MAX_SLOTS_PER_CLIENT = 64
MAX_SLOT_BYTES = 1 << 40
MAX_QUEUED_REPLIES = 1024
"""Replies and events queued for a client that does not read them; one more disconnects it."""


class SessionHost(Protocol):
    """What a session uses of the daemon that accepted it; loop thread only.

    Implemented by :class:`ckptd.daemon.lifecycle.Daemon`."""

    loop: asyncio.AbstractEventLoop
    control_pool: Executor
    """Runs a session's filesystem work (attaching to a job, the disk guard) off the loop."""
    stores: Stores
    admission: Admission
    queue: WriteQueue
    stats: Stats
    metrics: Metrics

    def status(self, job: str | None = None) -> dict[str, Any]:
        """The daemon's ``status`` reply (``job`` narrows it to one job)."""

    def request_stop(self, reason: str) -> None:
        """Drain and exit, as on the first SIGTERM."""

    def connection_closed(self, conn: Connection) -> None:
        """``conn`` has closed: forget it."""


def _error_fields(exc: BaseException) -> Message:
    return {"type": type(exc).__name__, "message": str(exc)}


def _itemsize(dtype: str) -> int:
    return dtype_from_name(dtype).itemsize


def request_id(msg: Message) -> int | None:
    """The ``id`` a reply to ``msg`` must echo (None when the request carries none)."""
    rid = msg.get("id")
    if rid is None:
        return None
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 2**63:
        raise ProtocolError(f"{msg.get('op')}.id: expected an integer >= 0, got {rid!r:.40}")
    return rid


class Connection:
    """One client connection, driven by the daemon's loop (see the module docstring).

    States: new -> (hello) -> attached to a job (``job``, ``store``) -> closed. Work that touches
    the filesystem runs on a control thread (:meth:`blocking`); reading from the connection pauses
    meanwhile, so its messages are still handled one at a time, in order. ``refused``: the
    admission's reason, given in answer to the first message.
    """

    def __init__(self, host: SessionHost, sock: socket.socket, peer: Peer) -> None:
        self.host = host
        self.sock = sock
        self.peer = peer
        self.job: str | None = None
        self.store: Store | None = None
        self.rank, self.world_size = 0, 1
        self.attempt: str | None = None
        self.slots: dict[int, Slot] = {}
        self.closed = False
        self.refused: str | None = None
        self._out: deque[bytes] = deque()
        self._writing = False
        self._paused = False
        self.layouts = LayoutParser()
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
            self.reply(rid, {"op": "error", **_error_fields(exc)})
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
            self.host.stats.record_error(f"{self.name}: disconnected, not reading replies")
            self._out.clear()
            self.close()
            return
        self._out.append(encode_message(msg))
        self._flush()

    def blocking(self, rid: int | None, work: Callable[[], T], then: Callable[[T], None]) -> None:
        """Run ``work()`` on the daemon's control thread, then ``then(result)`` on the loop.
        Reading from this connection pauses until then; an exception answers ``rid``."""
        self._pause(True)

        def finish(fut: asyncio.Future[T]) -> None:
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

        self.host.loop.run_in_executor(self.host.control_pool, work).add_done_callback(finish)

    def _pause(self, paused: bool) -> None:
        if self.closed or paused == self._paused:
            return
        self._paused = paused
        if paused:
            self.host.loop.remove_reader(self.sock.fileno())
        else:
            self.host.loop.add_reader(self.sock.fileno(), self.on_readable)

    def _flush(self) -> None:
        while self._out and not self.closed:
            try:
                self.sock.send(self._out[0])
            except BlockingIOError:
                if not self._writing:
                    self._writing = True
                    self.host.loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError:
                self.close()
                return
            self._out.popleft()
        if self._writing and not self.closed:
            self._writing = False
            self.host.loop.remove_writer(self.sock.fileno())

    def fail(self, exc: Exception, rid: int | None = None) -> None:
        log.warning("%s: closing connection: %s", self.name, exc)
        self.host.stats.record_error(f"{self.name}: {exc}")
        self.reply(rid, {"op": "error", **_error_fields(exc)})
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
        loop = self.host.loop
        if not self._paused:
            loop.remove_reader(self.sock.fileno())
        if self._writing:
            loop.remove_writer(self.sock.fileno())
        self.sock.close()
        try:
            for slot in list(self.slots.values()):
                slot.retire()
        finally:
            self.slots.clear()
            self.host.connection_closed(self)

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
            self.reply(rid, {"op": "status", **self.host.status(job)})
        elif op == "stop":
            if self.peer.uid not in (0, os.getuid()):
                raise StorePermissionError(f"uid {self.peer.uid} may not stop this daemon")
            self.reply(rid, {"op": "stopping"})
            self.host.request_stop("stop requested by client " + self.name)
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
            self.host.queue.drain(self, rid, self.store, self.job, timeout_s or 0.0)
        elif op == "skipped":
            self.host.stats.skipped += 1
            self.host.metrics.skipped(self.job)
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
        rank, world_size, attempt = get_ranks(msg)
        if attempt is not None:
            try:
                check_attempt(attempt)
            except ValueError as exc:
                raise ProtocolError(f"hello.attempt: {exc}") from exc
        stores = self.host.stores
        store = stores.store_for(
            stores.client_root(msg.get("root"), msg.get("default_root")), self.peer
        )
        retention = msg.get("retention")
        policy = None
        if retention is not None:
            if not isinstance(retention, dict):
                raise ProtocolError("hello.retention: expected an object")
            policy = policy_to_dict(policy_from_dict(retention, "Client(retention=...)"))
        uid = self.peer.uid
        first_use = stores.first_use(store, job)

        def attach() -> None:  # control thread: reads and fsyncs job.json, creates directories
            try:
                stores.attach(store, job, uid, policy, first_use)
                store.check_job_kind(job, world_size)
            except BaseException:
                if first_use:  # the next client of the job opens it again
                    self.host.loop.call_soon_threadsafe(stores.forget_use, store, job)
                raise

        def attached(_: None) -> None:
            if self.closed:
                return
            self.job, self.store = job, store
            self.rank, self.world_size, self.attempt = rank, world_size, attempt
            self.name = f"{job} (pid {self.peer.pid}, uid {self.peer.uid})"
            log.info("%s: connected", self.name)
            uploads = self.host.queue.uploads
            tier = None if uploads is None else uploads.tier_for(job)
            self.reply(
                rid,
                {
                    "op": "welcome",
                    "version": PROTOCOL_VERSION,
                    "root": str(store.root),
                    "pid": os.getpid(),
                    "daemon": __version__,
                    # Where restore() looks when the newest checkpoint is not on local disk.
                    "tier": None
                    if tier is None
                    else {
                        "url": str(tier.url),
                        "endpoint": tier.settings.endpoint,
                        "region": tier.settings.region,
                    },
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
        refusal = self.host.admission.slot_limit(self.peer.uid, size)
        if refusal is not None:
            raise refusal
        self.slots[slot_id] = Slot.map(slot_id, fds[0], size)
        self.reply(rid, {"op": "registered", "slot": slot_id})

    def _unregister(self, msg: Message, rid: int | None) -> None:
        slot_id = get_int(msg, "slot", 0, 2**31)
        slot = self.slots.pop(slot_id, None)
        if slot is None:
            raise ProtocolError(f"unregister: no slot {slot_id}")
        slot.retire()
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
        layout = self.layouts.parse(meta, meta_offset, _itemsize)
        raw = sum(t.nbytes for t in layout.tensors)
        pin = msg.get("pin", False)
        if not isinstance(pin, bool):
            raise ProtocolError(f"submit.pin: expected true or false, got {pin!r:.40}")
        tier = msg.get("tier", True)
        if not isinstance(tier, bool):
            raise ProtocolError(f"submit.tier: expected true or false, got {tier!r:.40}")
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
            accepted_at=self.host.loop.time(),
            pin=pin,
            tier=tier,
            rank=self.rank,
            world_size=self.world_size,
            attempt=self.attempt,
        )
        slot.busy_seq = seq  # from now on the daemon may read it; close() retires it

        def admitted(refusal: CkptdError | None) -> None:
            if refusal is not None or self.closed:
                self._unbusy(slot)
                if refusal is not None:
                    self.reply(rid, {"op": "refused", "seq": seq, **_error_fields(refusal)})
                return
            stall = get_seconds(msg, "stall_s")
            if stall is not None:
                self.host.metrics.stall(job, stall)
            blocked = get_seconds(msg, "blocked_s")
            if blocked:
                self.host.stats.blocked += 1
                self.host.stats.blocked_s += blocked
                self.host.metrics.blocked(job, blocked)
            request.accepted_at = self.host.loop.time()
            self.reply(rid, {"op": "accepted", "seq": seq})
            self.host.queue.enqueue(request)

        try:
            self.host.admission.admit(request, rid, admitted)
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
