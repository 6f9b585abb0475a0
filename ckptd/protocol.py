"""The client <-> daemon protocol: framing, message validation, fd passing, slot layouts.

Transport: a Unix ``SOCK_SEQPACKET`` socket. One message is one packet: UTF-8 JSON, an object with
an ``"op"`` field, at most :data:`MAX_MESSAGE_BYTES`. File descriptors travel as SCM_RIGHTS
ancillary data on the one message that needs them (``register``). Large data never goes through
the socket: tensor bytes *and* the snapshot's layout and skeleton live in the shared-memory slot,
and ``submit`` only says where.

Conversation (client -> daemon, daemon -> client). Every request may carry an integer ``id``;
its reply (``welcome``, ``registered``, ``unregistered``, ``accepted``, ``refused``, ``drained``,
``status``, ``stopping``, ``error``) echoes it, so a client matches each reply to its request and
never takes a late reply for the answer to a later request. Events carry no ``id``::

    hello {id, version, job, root, pid,       -> welcome {id, version, root, pid, daemon, tier}
           default_root, rank, world_size,       (root null: the daemon's root; on a daemon
           attempt}                              spawned on demand, the client's default_root;
                                                 world_size > 1: this connection hands off rank
                                                 ``rank``'s parts of attempt ``attempt``; tier:
                                                 null, or {url, endpoint, region} of the job's
                                                 object-store tier)
    register {id, slot, size} + memfd         -> registered {id, slot}
    submit {id, seq, slot, step, meta_offset, -> accepted {id, seq}
            meta_length, metric, pin, tier}      | refused {id, seq, type, message}
                                                 (tier false: never upload this one)
                                                 ... later, asynchronously (events):
                                                 released {slot, seq}   (slot may be reused)
                                                 committed {seq, step, path, ...,
                                                   step_committed}  (a rank part: durable; true
                                                   when this part completed the step)
                                                 | failed {seq, type, message}
    unregister {id, slot}                     -> unregistered {id, slot}
    drain {id, timeout_s}                     -> drained {id, pending: [steps]} once the job has no
                                                 accepted, uncommitted snapshot (or at the timeout)
    status {id, job?}                         -> status {id, root, on_demand, ...}
    stop {id}                                 -> stopping {id}

A client that gives up waiting for a reply must drop the connection and every slot it registered
on it: the daemon may still act on the request, and only a closed connection makes its slots the
daemon's alone.

Any malformed message gets ``error {type, message}`` and the connection is closed; the daemon
keeps serving everyone else. Version mismatch is answered the same way, naming both versions.

The *slot layout* (written by the client at ``meta_offset`` in the slot, JSON)::

    {"skeleton": <JSON skeleton>, "tensors": [{"path", "dtype", "shape", "offset", "nbytes"}, ...]}

Each tensor's C-order bytes are at ``[offset, offset + nbytes)`` of the slot; ranges do not overlap
and lie below ``meta_offset``.
"""

from __future__ import annotations

import array
import itertools
import json
import math
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from ckptd.errors import ProtocolError, UntrustedDaemonError

PROTOCOL_VERSION = 4
MAX_MESSAGE_BYTES = 64 << 10
MAX_FDS = 1
MAX_META_BYTES = 64 << 20
MAX_WORLD_SIZE = 99_999  # rank part files are named with 5 digits
MAX_TENSORS = 1_000_000
ALIGN = 64

Message = dict[str, Any]


def encode_message(msg: Message) -> bytes:
    data = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message {msg.get('op')!r} is {len(data)} bytes, over the limit")
    return data


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def strict_json(data: bytes, what: str) -> Any:
    """Parse strict JSON (no NaN / Infinity, bounded nesting); :class:`ProtocolError` if not."""
    try:
        return json.loads(data, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"{what} is not JSON ({exc})") from exc
    except RecursionError as exc:
        raise ProtocolError(f"{what} is nested too deeply") from exc


def decode_message(data: bytes) -> Message:
    """Parse one packet; :class:`ProtocolError` if it is not a JSON object with a string op."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    msg = strict_json(data, "message")
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("message is not a JSON object with a string 'op'")
    return msg


def send_message(sock: socket.socket, msg: Message, fds: list[int] | None = None) -> None:
    """Send one message (blocking socket), with ``fds`` attached when given."""
    data = encode_message(msg)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def recv_message(sock: socket.socket) -> tuple[Message | None, list[int]]:
    """Receive one message and its fds; ``(None, [])`` on EOF. The caller owns returned fds."""
    data, fds = recv_packet(sock)
    if data is None:
        return None, fds
    try:
        return decode_message(data), fds
    except ProtocolError:
        close_fds(fds)
        raise


def recv_packet(sock: socket.socket) -> tuple[bytes | None, list[int]]:
    """One raw packet and the fds that came with it; None on EOF. Truncation is an error."""
    fd_size = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    data, ancdata, flags, _addr = sock.recvmsg(MAX_MESSAGE_BYTES + 1, fd_size)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
            fds.extend(arr)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_fds(fds)
        raise ProtocolError("message or its file descriptors were truncated (too large)")
    if not data and not fds:
        return None, []
    return data, fds


def can_connect(path: str | os.PathLike[str]) -> bool:
    """Whether something accepts SEQPACKET connections on the Unix socket ``path`` right now."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def close_fds(fds: list[int]) -> None:
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---- field validation -----------------------------------------------------------------------


def get_int(msg: Message, key: str, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise ProtocolError(
            f"{msg.get('op')}.{key}: expected an integer in [{minimum}, {maximum}], got {value!r}"
        )
    return value


def get_str(msg: Message, key: str, max_len: int = 4096) -> str:
    value = msg.get(key)
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"{msg.get('op')}.{key}: expected a string, got {value!r:.80}")
    return value


def get_seconds(msg: Message, key: str, maximum: float = 1e7) -> float | None:
    """An optional, finite, non-negative duration field (None when absent or out of range)."""
    value = msg.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return float(value) if math.isfinite(value) and 0 <= value <= maximum else None


def get_ranks(msg: Message) -> tuple[int, int, str | None]:
    """``(rank, world_size, attempt)`` of a ``hello``: 0, 1, None when absent (one process).
    The attempt is a string of at most 128 characters; the session checks it is a valid id."""
    world_size = get_int(msg, "world_size", 1, MAX_WORLD_SIZE) if "world_size" in msg else 1
    if world_size == 1:
        return 0, 1, None
    rank = get_int(msg, "rank", 0, 2**31)
    if rank >= world_size:
        raise ProtocolError(
            f"hello.rank: rank {rank} is outside [0, {world_size}); give each of the job's "
            "processes its own rank in that range"
        )
    return rank, world_size, get_str(msg, "attempt", 128)


def get_metric(msg: Message) -> float | None:
    value = msg.get("metric")
    if value is None:
        return None
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ProtocolError(f"submit.metric: expected a number or null, got {value!r:.80}")


def metric_to_wire(metric: float | None) -> float | str | None:
    if metric is None or math.isfinite(metric):
        return metric
    return str(metric)


# ---- slot layout ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutEntry:
    path: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Layout:
    skeleton: Any
    tensors: tuple[LayoutEntry, ...]


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def encode_entries(tensors: list[LayoutEntry]) -> bytes:
    """The ``tensors`` part of an encoded slot layout (see :func:`encode_layout`)."""
    return json.dumps(
        [
            {
                "path": t.path,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "offset": t.offset,
                "nbytes": t.nbytes,
            }
            for t in tensors
        ],
        separators=(",", ":"),
        allow_nan=False,
    ).encode()


def encode_layout(
    skeleton: Any, tensors: list[LayoutEntry], encoded_tensors: bytes | None = None
) -> bytes:
    """The slot layout the daemon parses (:func:`parse_layout`). ``encoded_tensors``, when
    given, is :func:`encode_entries` of ``tensors``, kept from an earlier snapshot of the same
    layout."""
    if encoded_tensors is None:
        encoded_tensors = encode_entries(tensors)
    sk = json.dumps({"skeleton": skeleton}, separators=(",", ":"), allow_nan=False).encode()
    return sk[:-1] + b',"tensors":' + encoded_tensors + b"}"


def parse_layout(data: bytes, data_limit: int, itemsize: Any) -> Layout:
    """Parse and validate a slot layout. ``data_limit`` bounds tensor ranges (the meta offset);
    ``itemsize(dtype_name)`` returns the element size or raises for an unknown dtype.

    Raises :class:`ProtocolError` naming the first bad field: unknown dtype, negative or
    inconsistent shape, a range outside the slot, or two ranges that overlap.
    """
    doc = strict_json(data, "slot layout")
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), list):
        raise ProtocolError("slot layout must be an object with a 'tensors' list")
    raw = doc["tensors"]
    if len(raw) > MAX_TENSORS:
        raise ProtocolError(f"slot layout lists {len(raw)} tensors, over {MAX_TENSORS}")
    entries = []
    for i, t in enumerate(raw):
        where = f"layout.tensors[{i}]"
        if not isinstance(t, dict):
            raise ProtocolError(f"{where}: expected an object")
        path, dtype, shape = t.get("path"), t.get("dtype"), t.get("shape")
        if not isinstance(path, str) or not isinstance(dtype, str) or not isinstance(shape, list):
            raise ProtocolError(f"{where}: path, dtype (strings) and shape (list) are required")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ProtocolError(f"{where} ({path}): shape must be non-negative integers: {shape}")
        try:
            size = itemsize(dtype)
        except Exception as exc:
            raise ProtocolError(f"{where} ({path}): unknown dtype {dtype!r}") from exc
        offset, nbytes = t.get("offset"), t.get("nbytes")
        if not isinstance(offset, int) or not isinstance(nbytes, int) or offset < 0 or nbytes < 0:
            raise ProtocolError(f"{where} ({path}): offset and nbytes must be integers >= 0")
        if nbytes != math.prod(shape) * size:
            raise ProtocolError(f"{where} ({path}): nbytes {nbytes} does not match {dtype}{shape}")
        if offset + nbytes > data_limit:
            raise ProtocolError(
                f"{where} ({path}): bytes [{offset}, {offset + nbytes}) lie outside the slot's "
                f"data area [0, {data_limit})"
            )
        entries.append(LayoutEntry(path, dtype, tuple(shape), offset, nbytes))
    spans = sorted((e.offset, e.offset + e.nbytes, e.path) for e in entries if e.nbytes)
    for (_s1, e1, p1), (s2, _e2, p2) in itertools.pairwise(spans):
        if s2 < e1:
            raise ProtocolError(f"slot layout: tensors {p1!r} and {p2!r} overlap")
    skeleton = doc.get("skeleton")
    if _depth(skeleton) > MAX_SKELETON_DEPTH:
        raise ProtocolError(f"slot layout: skeleton nested deeper than {MAX_SKELETON_DEPTH}")
    return Layout(skeleton, tuple(entries))


class LayoutParser:
    """:func:`parse_layout` that remembers the last layout's tensors: a training loop submits
    the same tensors every time and only the skeleton changes. When a layout ends with the
    canonical encoding of the remembered entries (:func:`encode_layout` writes the tensors last),
    only its skeleton is parsed; anything else is parsed in full. One per connection."""

    _MARK = b',"tensors":'

    def __init__(self) -> None:
        self._tail = b""
        self._entries: tuple[LayoutEntry, ...] = ()
        self._data_end = 0

    def parse(self, data: bytes, data_limit: int, itemsize: Any) -> Layout:
        tail = self._tail
        if tail and len(data) > len(tail) and data.endswith(tail) and self._data_end <= data_limit:
            doc = strict_json(data[: -len(tail)] + b"}", "slot layout")
            if isinstance(doc, dict) and list(doc) == ["skeleton"]:
                skeleton = doc["skeleton"]
                if _depth(skeleton) > MAX_SKELETON_DEPTH:
                    raise ProtocolError(
                        f"slot layout: skeleton nested deeper than {MAX_SKELETON_DEPTH}"
                    )
                return Layout(skeleton, self._entries)
        layout = parse_layout(data, data_limit, itemsize)
        tail = self._MARK + encode_entries(list(layout.tensors)) + b"}"
        if data.endswith(tail):
            self._tail, self._entries = tail, layout.tensors
            self._data_end = max((e.offset + e.nbytes for e in layout.tensors), default=0)
        else:
            self._tail = b""
        return layout


MAX_SKELETON_DEPTH = 256


def _depth(node: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 1), level by level, without recursion."""
    depth = 0
    level = [node]
    while level:
        depth += 1
        below: list[Any] = []
        for value in level:
            if isinstance(value, dict):
                below.extend(value.values())
            elif isinstance(value, list):
                below.extend(value)
        level = below
    return depth


def check_daemon_peer(sock: socket.socket, path: str | os.PathLike[str]) -> int:
    """The pid of the daemon behind ``sock`` if it runs as this user or as root (which can read
    this process's memory anyway); :class:`UntrustedDaemonError` otherwise."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = (int(v) for v in struct.unpack("3i", creds))
    if uid not in (os.getuid(), 0):
        raise UntrustedDaemonError(
            f"the process listening on {path} (pid {pid}) runs as uid {uid}, not as this user "
            f"(uid {os.getuid()}) or root; refusing to hand it any state. Another user may have "
            f"created the directory of {path}: remove it, or set XDG_RUNTIME_DIR or socket= to a "
            "directory only you can write"
        )
    return pid
