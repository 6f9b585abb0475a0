"""Where the checkpoints are when nobody said: the root of the daemon that writes them.

One rule for every reader and writer (``Client``, ``ckptd_client.load / restore / save /
list_checkpoints``, the ``ckptd`` CLI):

1. a root someone asked for: ``root=`` / ``--root``, ``CKPTD_ROOT``, ``store.root`` of the config;
2. else the root of the daemon answering on the socket (``socket=`` / ``--socket``,
   ``CKPTD_SOCKET``, ``daemon.socket``, the system socket, the per-user socket), asked with a
   ``status`` request. A daemon a client spawned on demand does not count: it writes wherever its
   clients ask, so it has no root of its own to impose. A socket someone named (or the system
   socket, when it exists) that does not answer is an error, not a reason to look elsewhere;
3. else ``./checkpoints`` under the working directory (the embedded default).

So a trainer's ``Client("run")`` writes where an operator's ``ckptd start --root DIR`` (or the
shipped unit's ``/var/lib/ckptd``) writes, and ``ckptd list`` finds those checkpoints from any
working directory while that daemon runs.

Asking is :func:`ask_daemon`: one request and its reply on a connection of their own, to a daemon
of this user or root only. It is also how ``ckptd status`` and ``ckptd stop`` talk to the daemon;
a trainer's long-lived connection is the client's own (``ckptd_client.client``). Blocking, for any
thread; nothing is shared between calls.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ckptd.config import DEFAULT_ROOT, Config, configured_root, load_config, locate_socket
from ckptd.errors import DaemonNoAnswerError, DaemonUnavailableError, error_from_reply
from ckptd.protocol import Message, check_daemon_peer, close_fds, recv_message, send_message

ASK_TIMEOUT_S = 10.0
SOURCES = {
    "socket=": "named by --socket / socket=",
    "CKPTD_SOCKET": "named by CKPTD_SOCKET",
    "daemon.socket": "named by daemon.socket in the config",
    "system": "the system daemon's socket, which exists",
    "default": "the per-user default socket",
}
"""How :func:`ckptd.config.locate_socket` found a socket, in words for error messages."""


@dataclass(frozen=True)
class DaemonReply:
    """A daemon's answer to one request."""

    message: Message
    pid: int
    """The daemon's pid as the kernel reports it for the connection (``SO_PEERCRED``)."""


def ask_daemon(
    socket_path: Path, request: Message, timeout_s: float = ASK_TIMEOUT_S
) -> DaemonReply:
    """Send ``request`` to the daemon on ``socket_path`` on a new connection; return its reply.

    Raises the :class:`OSError` of ``connect`` when nothing accepts a connection there: whether
    no daemon is an error, and what to do about it, is the caller's to say. Once connected:
    :class:`~ckptd.errors.UntrustedDaemonError` for a listener of another user (it is sent
    nothing), the daemon's own error for an ``error`` reply (e.g. it refuses this user), and
    :class:`~ckptd.errors.DaemonNoAnswerError` when no reply comes within ``timeout_s`` seconds
    or the daemon closes the connection first.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout_s)
        sock.connect(os.fspath(socket_path))
        pid = check_daemon_peer(sock, socket_path)
        try:
            send_message(sock, request)
        except OSError:
            pass  # a daemon that refuses this user has queued its reason: read it below
        try:
            reply, fds = recv_message(sock)
        except OSError as exc:
            problem = (
                f"gave no answer within {timeout_s:g} s"
                if isinstance(exc, TimeoutError)
                else f"dropped the connection ({exc.strerror or type(exc).__name__})"
            )
            raise DaemonNoAnswerError(
                f"the ckptd daemon on {socket_path} (pid {pid}) {problem} to a "
                f"{request.get('op')!r} request"
            ) from exc
        close_fds(fds)
    finally:
        sock.close()
    if reply is None:
        raise DaemonNoAnswerError(
            f"the ckptd daemon on {socket_path} (pid {pid}) closed the connection without "
            f"answering a {request.get('op')!r} request"
        )
    if reply.get("op") == "error":
        raise error_from_reply(reply.get("type"), reply.get("message"))
    return DaemonReply(reply, pid)


@dataclass(frozen=True)
class DaemonRoot:
    """What a daemon said about itself: its root, and whether a client spawned it on demand."""

    root: Path
    on_demand: bool
    pid: int


def ask_daemon_root(socket_path: Path, timeout_s: float = ASK_TIMEOUT_S) -> DaemonRoot | None:
    """The root of the daemon on ``socket_path``; None when nothing listens there. Raises what
    :func:`ask_daemon` raises once connected (a listener of another user could point anywhere)."""
    advice = "pass root= / --root, or set CKPTD_ROOT"
    try:
        answer = ask_daemon(socket_path, {"op": "status", "id": 1, "job": "-"}, timeout_s)
    except OSError:
        return None
    except DaemonNoAnswerError as exc:
        raise DaemonNoAnswerError(
            f"{exc}, so where it writes checkpoints is unknown; {advice}"
        ) from exc
    reply = answer.message
    if reply.get("op") != "status" or not isinstance(reply.get("root"), str):
        raise DaemonUnavailableError(
            f"the ckptd daemon on {socket_path} (pid {answer.pid}) did not say where it writes "
            f"checkpoints; {advice}"
        )
    return DaemonRoot(Path(reply["root"]), bool(reply.get("on_demand", False)), answer.pid)


def store_root(
    explicit: Path | str | None,
    config: Config | None = None,
    *,
    socket: Path | str | None = None,
) -> Path:
    """The root to read and write (absolute), by the rule in the module docstring."""
    cfg = config if config is not None else load_config()
    root = configured_root(explicit, cfg)
    if root is None:
        socket_path, source = locate_socket(socket, cfg)
        daemon = ask_daemon_root(socket_path)
        if daemon is None and source != "default":
            # A socket someone named (or the installed system daemon's) means that daemon's
            # checkpoints; reading ./checkpoints instead would act on the wrong store silently.
            raise DaemonUnavailableError(
                f"no ckptd daemon answers on {socket_path} ({SOURCES[source]}), so where its "
                "checkpoints are is unknown: start it, or name the root (--root DIR / root=, "
                "or CKPTD_ROOT)"
            )
        if daemon is not None and not daemon.on_demand:
            root = daemon.root
    return (root if root is not None else DEFAULT_ROOT).absolute()
