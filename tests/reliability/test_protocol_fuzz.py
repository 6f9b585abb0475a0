"""Protocol fuzzing with hypothesis against one long-running daemon (module scope).

Each example opens a connection, optionally says a valid ``hello`` and registers a valid sealed
slot, then sends one to four packets: messages of the known ops with random field values
(negative and huge integers, wrong types, missing and extra fields, IEEE specials), random ops,
random bytes, oversized packets, deeply nested JSON, with 0, 1 or 2 file descriptors attached (a
sealed memfd, an unsealed one, one that cannot be sealed, a write-only reopening of a sealed one,
a regular file, a pipe, a socket); and ``submit`` messages over slot layouts that are out of
range, overlapping, with negative shapes, unknown dtypes, wrong sizes, NaN skeletons or no JSON
at all. ``stop`` is never sent.

After every packet the fuzzer sends a ``status`` request as a ping: the daemon handles a
connection's packets in order, so the first reply must answer the packet (``skipped`` alone has
no reply), as an ``error`` (then the daemon hangs up) or a normal reply. A packet answered by
nothing, a connection closed without an ``error``, a snapshot the daemon accepted and then
failed with an internal error, or a dead daemon is a violation. An unsealed memfd must be refused
at ``register`` (the client could truncate it under the daemon's mapping); a sealed one cannot be
truncated. Every ten examples a well-formed :class:`Client` on the same daemon still commits a
snapshot; at the end the daemon's fd count and RssAnon are back near where they started and its
log holds no traceback.
"""

from __future__ import annotations

import array
import fcntl
import json
import math
import mmap
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from ckptd.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, close_fds, recv_message
from ckptd_client import Client
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import Daemon, DaemonFactory, fd_count, query, wait_until
from tests.reliability import fixtures
from tests.reliability.fixtures import (
    LoopSummary,
    loop_seconds,
    loop_timeout,
    proc_status_kb,
    restart,
)

daemons = daemon_fixtures.daemons
ckptd_env = daemon_fixtures.ckptd_env
pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("ckptd_env")]

CI_SECONDS = 12.0
pytestmark.append(loop_timeout(CI_SECONDS))
EXAMPLES_PER_ROUND = 60
CONTROL_EVERY = 10
SLOT = 1 << 16
META_OFFSET = 1 << 15
REPLY_TIMEOUT_S = 5.0
REPLIES = {"welcome", "registered", "unregistered", "accepted", "refused", "error", "status"}
EVENTS = {"released", "committed", "failed"}
RSS_MARGIN_KB = 64 << 10
FD_MARGIN = 4
MAX_RESTARTS = 2  # a daemon found wedged is restarted this often, then the fuzzing stops

# ---- strategies ------------------------------------------------------------------------------

INTS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from(
        [0, 1, -1, 7, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63), 10**12 - 1, 10**12, 1 << 40]
    ),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, -0.0, math.inf, -math.inf, math.nan]),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    FLOATS,
    st.text(max_size=24),
    st.sampled_from(["nan", "inf", "-inf", "", "1"]),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
NOT_STRINGS = JSON_VALUES.filter(lambda v: not isinstance(v, str))
BAD_JOBS = st.sampled_from(["../x", "a/b", "..", "a\x00b", "", ".hidden", "x" * 129, "-x", "/x"])
DTYPES = st.one_of(
    st.sampled_from(["float32", "float16", "bfloat16", "float64", "int64", "int8", "uint8"]),
    st.sampled_from(["bool", "complex64", "qint8", "bits8", "float8_e5m2", "uint16"]),
    st.sampled_from(["float99", "", "object", "torch.float32", "Tensor", "__class__"]),
    st.text(max_size=10),
)
FD_KINDS = ("sealed", "unsealed", "unsealable", "write-only", "regular", "pipe", "socket")
OPS = ("hello", "register", "unregister", "submit", "status", "skipped")


def deep(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + "1" + closer * depth


DEEP = st.integers(1_100, 20_000).flatmap(
    lambda d: st.sampled_from([deep(d), deep(d, '{"a":', "}")])
)


@dataclass
class Ctx:
    """What a scenario knows about its daemon (filled in per example)."""

    root: str
    base: Path


@dataclass(frozen=True)
class Packet:
    """One packet: a message (dict, JSON-encoded, NaN/Infinity allowed) or raw bytes, the fds
    to attach, and whether to try to truncate the memfds afterwards."""

    body: dict[str, Any] | bytes
    fds: tuple[str, ...] = ()
    truncate: bool = False


@dataclass(frozen=True)
class Scenario:
    hello: bool
    slot: bool
    layout: bytes
    packets: tuple[Packet, ...]


def root_values(ctx: Ctx) -> st.SearchStrategy[Any]:
    """Roots under the test's own directory only: a user daemon creates the root it is given."""
    base = ctx.base
    return st.one_of(
        st.sampled_from(
            [
                ctx.root,
                ctx.root,
                str(base / "fuzz-root-2"),
                str(base / "regular-file"),
                str(base / ("a" * 300)),
                f"{ctx.root}\x00x",
                "relative/root",
                "",
                str(base / ("x" * 5000)),
            ]
        ),
        NOT_STRINGS,
    )


def field_values(name: str, ctx: Ctx) -> st.SearchStrategy[Any]:
    good: dict[str, st.SearchStrategy[Any]] = {
        "version": st.just(PROTOCOL_VERSION),
        "job": st.sampled_from(["fuzz", "fuzz-b"]) | BAD_JOBS,
        "root": root_values(ctx),
        "pid": st.just(os.getpid()),
        "retention": st.none()
        | st.dictionaries(
            st.sampled_from(["keep_last", "keep_every", "keep_best", "mode", "max_bytes", "x"]),
            SCALARS,
            max_size=3,
        ),
        "slot": st.integers(0, 3),
        "size": st.sampled_from([SLOT, 1, 0, SLOT + 1, 1 << 40, (1 << 40) + 1, -1]),
        "seq": st.integers(0, 1000),
        "step": st.integers(0, 100),
        "meta_offset": st.sampled_from([META_OFFSET, 0, SLOT, SLOT - 1, -1]),
        "meta_length": st.sampled_from([2, 100, SLOT, 64 << 20, (64 << 20) + 1, 1]),
        "metric": st.none() | FLOATS | st.sampled_from(["nan", "inf", "-inf", "x"]),
        "stall_s": FLOATS,
        "blocked_s": FLOATS,
        "pin": st.booleans(),
    }
    if name == "root":
        return good["root"]  # never a random path: the daemon would create it
    return st.one_of(good.get(name, st.nothing()), JSON_VALUES, INTS)


FIELDS = {
    "hello": ("version", "job", "root", "pid", "retention"),
    "register": ("slot", "size"),
    "unregister": ("slot",),
    "submit": (
        "seq",
        "slot",
        "step",
        "meta_offset",
        "meta_length",
        "metric",
        "stall_s",
        "blocked_s",
        "pin",
    ),
    "status": (),
    "skipped": ("step",),
}


@st.composite
def messages(draw: st.DrawFn, ctx: Ctx, layout_length: int) -> dict[str, Any]:
    op = draw(
        st.one_of(
            st.sampled_from(OPS),
            st.sampled_from(OPS),
            st.text(max_size=12),
            NOT_STRINGS,
        ).filter(lambda o: o != "stop")
    )
    msg: dict[str, Any] = {"op": op}
    for name in FIELDS.get(op, ()) if isinstance(op, str) else ():
        if draw(st.floats(0, 1)) < 0.85:
            msg[name] = draw(field_values(name, ctx))
    if op == "submit" and draw(st.booleans()):
        msg |= {"slot": 0, "meta_offset": META_OFFSET, "meta_length": layout_length}
    if draw(st.floats(0, 1)) < 0.2:
        extra = draw(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=2))
        msg |= {k: v for k, v in extra.items() if k not in msg}
    if draw(st.floats(0, 1)) < 0.1:
        msg.pop(draw(st.sampled_from(sorted(msg))), None)
    return msg


@st.composite
def packets(draw: st.DrawFn, ctx: Ctx, layout_length: int) -> Packet:
    kind = draw(
        st.sampled_from(["message"] * 5 + ["submit"] * 3 + ["raw", "oversized", "deep", "register"])
    )
    fds: tuple[str, ...] = ()
    if draw(st.floats(0, 1)) < 0.25:
        fds = tuple(draw(st.lists(st.sampled_from(FD_KINDS), min_size=1, max_size=2)))
    body: dict[str, Any] | bytes
    if kind == "message":
        body = draw(messages(ctx, layout_length))
    elif kind == "raw":
        body = draw(st.binary(min_size=1, max_size=256))
    elif kind == "oversized":
        size = draw(st.integers(MAX_MESSAGE_BYTES - 16, MAX_MESSAGE_BYTES + 4096))
        body = b'{"op":"status","pad":"' + b"x" * size + b'"}'
    elif kind == "deep":
        body = draw(DEEP).encode()
    elif kind == "submit":
        body = {
            "op": "submit",
            "seq": draw(st.integers(0, 2**40)),
            "slot": 0,
            "step": draw(st.integers(0, 10**12 - 1)),
            "meta_offset": META_OFFSET,
            "meta_length": layout_length,
            "metric": draw(st.none() | st.floats(-1e6, 1e6) | st.sampled_from(["nan", "inf"])),
            "pin": draw(st.booleans()),
        }
        if draw(st.floats(0, 1)) < 0.3:
            body[draw(st.sampled_from(["stall_s", "blocked_s"]))] = draw(FLOATS)
        if draw(st.floats(0, 1)) < 0.3:
            name = draw(st.sampled_from(sorted(body)))
            body[name] = draw(field_values(name, ctx))
    else:
        body = {"op": "register", "slot": draw(st.integers(1, 70)), "size": SLOT}
        fds = (draw(st.sampled_from(FD_KINDS)),)
    return Packet(body, fds, truncate=bool(fds) and draw(st.booleans()))


@st.composite
def layouts(draw: st.DrawFn) -> bytes:
    """A slot layout: mostly well-formed JSON with bad fields, sometimes no JSON at all."""
    kind = draw(st.sampled_from(["entries"] * 6 + ["json", "raw", "deep", "nan"]))
    if kind == "raw":
        return draw(st.binary(min_size=0, max_size=200))
    if kind == "deep":
        return draw(DEEP).encode()
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    valid = kind == "nan" or draw(st.booleans())
    entries = []
    cursor = 0
    for i in range(draw(st.integers(0, 4))):
        if valid:
            dtype = draw(st.sampled_from(["float32", "bfloat16", "int64", "uint8", "bool"]))
            n = draw(st.integers(0, 512))
            shape: Any = draw(st.sampled_from([[n], [1, n], [n, 1], [n, 1, 1]]))
        else:
            dtype = draw(DTYPES)
            shape = draw(
                st.lists(st.integers(0, 16), max_size=3)
                | st.lists(st.integers(-(2**40), 2**40), max_size=3)
                | JSON_VALUES
            )
        known = getattr(torch, dtype, None) if dtype else None
        itemsize = known.itemsize if isinstance(known, torch.dtype) else 4
        dims = shape if isinstance(shape, list) and all(isinstance(d, int) for d in shape) else []
        nbytes = abs(math.prod(dims)) * itemsize
        offset: Any = cursor
        cursor += (nbytes + 63) // 64 * 64
        if not valid and draw(st.floats(0, 1)) < 0.4:
            offset = draw(st.sampled_from([0, -64, META_OFFSET - 8, META_OFFSET, SLOT]) | INTS)
        if not valid and draw(st.floats(0, 1)) < 0.3:
            nbytes = draw(st.sampled_from([nbytes + 1, nbytes - 1, 0]) | INTS)
        entry: dict[str, Any] = {
            "path": draw(st.sampled_from([f"t{i}", "w"]) | st.text(max_size=8)),
            "dtype": dtype,
            "shape": shape,
            "offset": offset,
            "nbytes": nbytes,
        }
        if not valid and draw(st.floats(0, 1)) < 0.1:
            entry.pop(draw(st.sampled_from(sorted(entry))))
        entries.append(entry)
    skeletons = st.just({"w": {"$tensor": 0}}) | JSON_VALUES | st.none()
    skeleton = draw(skeletons if valid else skeletons | st.just(float("nan")))
    doc: dict[str, Any] = {"skeleton": skeleton, "tensors": entries}
    if kind == "nan":
        doc["skeleton"] = {"x": float("nan"), "y": float("inf")}
    return json.dumps(doc, allow_nan=True).encode()


@st.composite
def scenarios(draw: st.DrawFn, ctx: Ctx) -> Scenario:
    hello = draw(st.floats(0, 1)) < 0.85
    slot = hello and draw(st.floats(0, 1)) < 0.6
    layout = draw(layouts()) if slot else b""
    n = draw(st.integers(1, 4))
    items = tuple(draw(packets(ctx, len(layout))) for _ in range(n))
    return Scenario(hello, slot, layout, items)


# ---- a raw client ----------------------------------------------------------------------------


def make_fd(kind: str, base: Path) -> int:
    """A new fd of ``kind`` (the caller closes it)."""
    if kind in ("sealed", "unsealed", "write-only"):
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, SLOT)
        if kind == "unsealed":
            return fd
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        if kind == "sealed":
            return fd
        wronly = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
        os.close(fd)
        return wronly
    if kind == "unsealable":
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, SLOT)
        return fd
    if kind == "regular":
        fd = os.open(base / "regular-file", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, SLOT)
        return fd
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    a, b = socket.socketpair()
    b.close()
    return a.detach()


class Conn:
    """A raw SEQPACKET connection that sets asynchronous events aside from direct replies."""

    def __init__(self, daemon: Daemon) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(REPLY_TIMEOUT_S)
        self.sock.connect(str(daemon.socket))
        self.events: list[dict[str, Any]] = []
        self.accepted = 0
        self.eof = False

    def send(self, data: bytes, fds: list[int]) -> bool:
        """False when the daemon has hung up."""
        try:
            if fds:
                rights = array.array("i", fds)
                self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            else:
                self.sock.send(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def _next(self) -> dict[str, Any] | None:
        try:
            msg, fds = recv_message(self.sock)
        except ConnectionResetError:
            # The daemon closed with our ping unread: Linux reports ECONNRESET once, before the
            # packets still queued for us (its error reply); read on.
            try:
                msg, fds = recv_message(self.sock)
            except ConnectionResetError:
                msg, fds = None, []
        close_fds(fds)
        if msg is None:
            self.eof = True
        return msg

    def reply(self) -> dict[str, Any] | None:
        """The next direct reply (events are set aside); None on EOF. Raises TimeoutError."""
        while (msg := self._next()) is not None:
            if msg.get("op") not in EVENTS:
                return msg
            self.events.append(msg)
        return None

    def settled(self) -> int:
        return sum(1 for e in self.events if e.get("op") in ("committed", "failed"))

    def wait_settled(self, timeout_s: float) -> list[dict[str, Any]]:
        """Read until every accepted snapshot is committed or failed; return direct replies
        that arrived meanwhile (there should be none)."""
        stray = []
        deadline = time.monotonic() + timeout_s
        while self.settled() < self.accepted and not self.eof:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            msg = self._next()
            if msg is None:
                break
            if msg.get("op") in EVENTS:
                self.events.append(msg)
            else:
                stray.append(msg)
        return stray

    def close(self) -> None:
        self.sock.close()


def encode(body: dict[str, Any] | bytes) -> bytes:
    if isinstance(body, bytes):
        return body
    return json.dumps(body, allow_nan=True).encode()


def describe_packet(packet: Packet) -> str:
    body = packet.body
    text = repr(body)[:200] if isinstance(body, dict) else f"bytes {bytes(body[:60])!r}"
    return f"{text} fds={list(packet.fds)}" + (" truncated" if packet.truncate else "")


def describe(scenario: Scenario) -> str:
    head = ("hello, " if scenario.hello else "") + ("slot, " if scenario.slot else "")
    if scenario.slot:
        head += f"layout {scenario.layout[:120]!r}, "
    return head + "; ".join(describe_packet(p) for p in scenario.packets)


def tracebacks(log: str) -> dict[str, str]:
    """Distinct tracebacks of a log: ``"ExcType in func (file:line)"`` -> an excerpt."""
    found: dict[str, str] = {}
    for block in log.split("Traceback (most recent call last):\n")[1:]:
        lines = block.splitlines()
        frames = [ln for ln in lines if ln.startswith('  File "')]
        error = next((ln for ln in lines if not ln.startswith(" ")), "?")
        where = frames[-1].strip() if frames else "?"
        key = f"{error.split(':')[0]} at {where}"
        found.setdefault(key, "\n".join(lines[:40]))
    return found


@dataclass
class Fuzzer:
    """Runs scenarios against one daemon and collects what went wrong, by kind."""

    daemons: DaemonFactory
    daemon: Daemon
    ctx: Ctx
    control: Client
    examples: int = 0
    controls: int = 0
    accepted: int = 0
    restarts: int = 0
    baseline: tuple[int, int] = (0, 0)
    replies: dict[str, int] = field(default_factory=dict)
    found: dict[str, tuple[int, str]] = field(default_factory=dict)

    def violate(self, kind: str, detail: str) -> None:
        count, first = self.found.get(kind, (0, detail))
        self.found[kind] = (count + 1, first)

    def run(self, scenario: Scenario) -> None:
        if self.restarts >= MAX_RESTARTS:
            return
        self.examples += 1
        try:
            self.exchange(scenario)
        except TimeoutError:
            self.violate("the daemon stopped answering", describe(scenario))
            self.recover()
            return
        if self.daemon.proc.poll() is not None:
            self.violate(f"the daemon died ({self.daemon.proc.returncode})", describe(scenario))
            self.recover()
            return
        if self.examples % CONTROL_EVERY == 0:
            self.check_control()

    def recover(self) -> None:
        """A wedged or dead daemon is a finding; restart it so the fuzzing can go on."""
        self.restarts += 1
        self.daemon.proc.kill()
        self.daemon.proc.wait(30)
        self.daemon = restart(self.daemons, self.daemon)
        self.settle_footprint()

    def settle_footprint(self) -> None:
        """Take the fd / RssAnon baseline of a warmed-up, idle daemon."""
        self.check_control()
        self.daemon.wait_idle()
        self.baseline = footprint(self.daemon.pid)

    def check_control(self) -> None:
        self.controls += 1
        state = {"w": torch.full((1024,), float(self.controls))}
        try:
            info = self.control.snapshot(state=state, step=self.controls).wait(60)
        except Exception as exc:
            self.violate("a well-formed client could not commit", repr(exc))
            return
        assert info.step == self.controls

    def exchange(self, scenario: Scenario) -> None:
        conn = Conn(self.daemon)
        keep: list[int] = []
        try:
            if scenario.hello:
                hello = {"op": "hello", "version": PROTOCOL_VERSION, "job": "fuzz"}
                conn.send(encode(hello | {"root": self.ctx.root, "pid": os.getpid()}), [])
                welcome = conn.reply()
                assert welcome is not None and welcome["op"] == "welcome", welcome
            if scenario.slot:
                fd = make_fd("sealed", self.ctx.base)
                keep.append(fd)
                layout = scenario.layout[: SLOT - META_OFFSET]
                with mmap.mmap(fd, SLOT) as mm:
                    mm[META_OFFSET : META_OFFSET + len(layout)] = layout
                conn.send(encode({"op": "register", "slot": 0, "size": SLOT}), [fd])
                registered = conn.reply()
                assert registered == {"op": "registered", "slot": 0}, registered
            attached = scenario.hello
            for packet in scenario.packets:
                if not self.one(conn, scenario, packet, attached):
                    break
                if isinstance(packet.body, dict) and packet.body.get("op") == "hello":
                    attached = True  # a refused hello closed the connection
            stray = conn.wait_settled(60)
            if stray:
                self.violate("unexpected replies", f"{stray} in {describe(scenario)}")
            for event in conn.events:
                if event.get("op") == "failed":
                    self.violate(
                        f"an accepted snapshot failed ({event.get('type')})",
                        f"{event.get('message')!r} after {describe(scenario)}",
                    )
            self.accepted += conn.accepted
        finally:
            conn.close()
            close_fds(keep)

    def one(self, conn: Conn, scenario: Scenario, packet: Packet, attached: bool) -> bool:
        """Send one packet and a status ping; False once the connection is over."""
        fds = [make_fd(kind, self.ctx.base) for kind in packet.fds]
        try:
            sent = conn.send(encode(packet.body), fds)
            if packet.truncate:
                self.truncate(scenario, packet, fds)
        finally:
            close_fds(fds)
        if not sent:
            self.violate("the daemon hung up without an error reply", describe(scenario))
            return False
        ping_sent = conn.send(encode({"op": "status"}), [])
        op = packet.body.get("op") if isinstance(packet.body, dict) else None
        no_reply = attached and op == "skipped" and not packet.fds
        first = conn.reply()
        if first is None:
            self.violate("the connection was closed without an error reply", describe(scenario))
            return False
        kind = str(first.get("op"))
        self.replies[kind] = self.replies.get(kind, 0) + 1
        if kind == "error":
            if conn.reply() is not None:
                self.violate("the connection stayed open after an error", describe(scenario))
            return False
        if kind not in REPLIES:
            self.violate(f"unknown reply op {kind!r}", describe(scenario))
            return False
        if no_reply:
            if kind != "status":
                self.violate("a reply to 'skipped'", f"{first} to {describe(scenario)}")
            return True
        if kind == "status" and op != "status":
            label = f"op {op!r}" if isinstance(packet.body, dict) else "raw bytes"
            self.violate(f"a packet got no reply ({label})", describe(scenario))
            return True  # the ping answered: the connection is still usable
        if kind == "accepted":
            conn.accepted += 1
        if kind == "registered" and packet.fds != ("sealed",):
            self.violate("a slot that is not a sealed memfd was registered", describe(scenario))
        if ping_sent:
            second = conn.reply()
            if second is None or second.get("op") != "status":
                self.violate("the status ping was not answered", f"{second}: {describe(scenario)}")
                return False
        return True

    def truncate(self, scenario: Scenario, packet: Packet, fds: list[int]) -> None:
        """Shrink the memfds just sent: a sealed one must not shrink (that is what makes it safe
        to map), an unsealed one can (so the daemon must refuse it at register)."""
        for kind, fd in zip(packet.fds, fds, strict=True):
            if kind not in ("sealed", "unsealed"):
                continue
            try:
                os.ftruncate(fd, 0)
            except PermissionError:
                if kind == "unsealed":
                    self.violate("an unsealed memfd could not shrink", describe(scenario))
            else:
                if kind == "sealed":
                    self.violate("a memfd sealed against shrinking shrank", describe(scenario))

    def report(self, summary: LoopSummary) -> None:
        for kind, (count, first) in sorted(self.found.items()):
            summary.violate(f"{kind} (x{count}); first: {first[:700]}")


def footprint(pid: int) -> tuple[int, int]:
    return fd_count(pid), proc_status_kb(pid, "RssAnon")


module_daemons = fixtures.module_daemons


@pytest.fixture(scope="module")
def fuzz_daemon(module_daemons: DaemonFactory) -> Daemon:
    return module_daemons.start()


@pytest.fixture
def fuzzer(module_daemons: DaemonFactory, fuzz_daemon: Daemon) -> Iterator[Fuzzer]:
    ctx = Ctx(str(fuzz_daemon.root), module_daemons.base)
    control = Client("fuzz-control", socket=fuzz_daemon.socket, root=fuzz_daemon.root, spawn=False)
    try:
        yield Fuzzer(module_daemons, fuzz_daemon, ctx, control)
    finally:
        control.close()


def test_random_messages_never_crash_or_silence_the_daemon(fuzzer: Fuzzer) -> None:
    summary = LoopSummary("protocol-fuzz")
    log_start = len(fuzzer.daemon.log_text())
    fuzzer.settle_footprint()

    deadline = time.monotonic() + loop_seconds(CI_SECONDS)
    rounds = 0
    while time.monotonic() < deadline and fuzzer.restarts < MAX_RESTARTS:
        rounds += 1

        @seed(rounds)
        @settings(
            max_examples=EXAMPLES_PER_ROUND,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(data=st.data())
        def round_of_examples(data: st.DataObject) -> None:
            fuzzer.run(data.draw(scenarios(fuzzer.ctx), label="scenario"))

        round_of_examples()

    fuzzer.check_control()
    daemon = fuzzer.daemon
    daemon.wait_idle()
    wait_until(lambda: len(daemon.status()["clients"]) <= 1, 30, "fuzz clients to go away")
    time.sleep(0.3)
    fds_before, rss_before = fuzzer.baseline
    fds_after, rss_after = footprint(daemon.pid)
    summary.iterations = fuzzer.examples
    summary.kills = fuzzer.restarts
    summary.verified = fuzzer.controls
    summary.extra |= {
        "rounds": rounds,
        "accepted": fuzzer.accepted,
        "replies": ",".join(f"{k}:{v}" for k, v in sorted(fuzzer.replies.items())),
        "fds": f"{fds_before}->{fds_after}",
        "rss_anon_mib": f"{rss_before >> 10}->{rss_after >> 10}",
    }
    fuzzer.report(summary)
    if fds_after > fds_before + FD_MARGIN:
        summary.violate(f"the daemon's fds grew from {fds_before} to {fds_after}")
    if rss_after > rss_before + RSS_MARGIN_KB:
        summary.violate(f"the daemon's RssAnon grew from {rss_before} to {rss_after} kB")
    logs = "".join(d.log_text() for d in fuzzer.daemons.started)[log_start:]
    for key, excerpt in tracebacks(logs).items():
        summary.violate(f"the daemon logged a traceback: {key}\n{excerpt[-900:]}")
    summary.report()
    assert fuzzer.examples >= EXAMPLES_PER_ROUND and fuzzer.controls >= 2


# ---- what the fuzzer found, one at a time ----------------------------------------------------


def submit(layout: bytes, **fields: Any) -> Packet:
    msg = {"op": "submit", "seq": 1, "slot": 0, "step": 1, "meta_offset": META_OFFSET}
    return Packet(msg | {"meta_length": len(layout)} | fields)


def regressions(ctx: Ctx) -> dict[str, Scenario]:
    nan_skeleton = b'{"skeleton": NaN, "tensors": []}'
    return {
        "nested JSON message": Scenario(False, False, b"", (Packet(deep(5000).encode()),)),
        "write-only memfd": Scenario(
            True,
            False,
            b"",
            (Packet({"op": "register", "slot": 1, "size": SLOT}, ("write-only",)),),
        ),
        "nested slot layout": Scenario(
            True, True, deep(5000).encode(), (submit(deep(5000).encode()),)
        ),
        "NaN skeleton": Scenario(True, True, nan_skeleton, (submit(nan_skeleton, step=2),)),
    }


REGRESSIONS = ["nested JSON message", "write-only memfd", "nested slot layout", "NaN skeleton"]


@pytest.mark.parametrize("case", REGRESSIONS)
def test_inputs_the_fuzzer_found_get_an_error_reply(fuzzer: Fuzzer, case: str) -> None:
    """Each is answered with an ``error`` (or, for the NaN skeleton, refused at submit), and
    leaves no traceback in the daemon's log."""
    cases = regressions(fuzzer.ctx)
    assert sorted(cases) == sorted(REGRESSIONS)
    scenario = cases[case]
    log_start = len(fuzzer.daemon.log_text())
    fuzzer.run(scenario)
    new_log = fuzzer.daemon.log_text()[log_start:]
    assert fuzzer.found == {}, fuzzer.found
    assert "Traceback" not in new_log, new_log[new_log.index("Traceback") :][:2000]


def test_an_infinite_blocked_time_does_not_break_status(
    daemons: DaemonFactory,
) -> None:
    """``submit.blocked_s`` is added to the daemon's counters before the message is validated;
    JSON carries no infinity, but Python's parser takes ``Infinity`` (and 1e308 twice overflows).
    ``status`` must keep answering."""
    daemon = daemons.start()
    ctx = Ctx(str(daemon.root), daemons.base)
    with Client("blocked", socket=daemon.socket, root=daemon.root, spawn=False) as control:
        fuzzer = Fuzzer(daemons, daemon, ctx, control)
        fuzzer.exchange(Scenario(True, True, b"{}", (submit(b"{}", blocked_s=float("inf")),)))
        fuzzer.exchange(Scenario(True, True, b"{}", (submit(b"{}", blocked_s=1e308),)))
        fuzzer.exchange(Scenario(True, True, b"{}", (submit(b"{}", blocked_s=1e308),)))
    assert fuzzer.found == {}, fuzzer.found
    try:
        status = query(daemon.socket, "status", timeout_s=3)
    except TimeoutError:
        pytest.fail("`status` no longer answers after a submit with blocked_s=Infinity / 1e308")
    assert status["op"] == "status" and status["blocked"] >= 0
