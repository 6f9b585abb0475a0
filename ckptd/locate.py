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
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ckptd.config import DEFAULT_ROOT, Config, configured_root, load_config, locate_socket
from ckptd.errors import DaemonNoAnswerError, DaemonUnavailableError, error_from_reply
from ckptd.protocol import check_daemon_peer, recv_message, send_message

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
class DaemonRoot:
    """What a daemon said about itself: its root, and whether a client spawned it on demand."""

    root: Path
    on_demand: bool
    pid: int


def ask_daemon_root(socket_path: Path, timeout_s: float = ASK_TIMEOUT_S) -> DaemonRoot | None:
    """The root of the daemon on ``socket_path``; None when nothing listens there. Raises
    :class:`~ckptd.errors.UntrustedDaemonError` for a listener of another user (its answer could
    point anywhere), :class:`~ckptd.errors.DaemonNoAnswerError` when a daemon accepts but does
    not answer, and the daemon's own error when it refuses this user."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout_s)
        try:
            sock.connect(os.fspath(socket_path))
        except OSError:
            return None
        pid = check_daemon_peer(sock, socket_path)
        try:
            send_message(sock, {"op": "status", "id": 1, "job": "-"})
            reply, _fds = recv_message(sock)
        except TimeoutError as exc:
            raise DaemonNoAnswerError(
                f"the ckptd daemon on {socket_path} (pid {pid}) did not say where it writes "
                f"checkpoints within {timeout_s:.0f} s; pass root= / --root, or set CKPTD_ROOT"
            ) from exc
        except OSError:
            reply = None  # the daemon closed on us (it refuses this user): its reason is lost
    finally:
        sock.close()
    if reply is not None and reply.get("op") == "error":
        raise error_from_reply(reply.get("type"), reply.get("message"))
    if reply is None or reply.get("op") != "status" or not isinstance(reply.get("root"), str):
        raise DaemonUnavailableError(
            f"the ckptd daemon on {socket_path} (pid {pid}) did not say where it writes "
            "checkpoints; pass root= / --root, or set CKPTD_ROOT"
        )
    return DaemonRoot(Path(reply["root"]), bool(reply.get("on_demand", False)), pid)


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
