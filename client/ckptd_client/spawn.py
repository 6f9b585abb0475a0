"""Starting a per-user daemon on demand, when a client finds none on its socket.

:func:`spawn_daemon` starts ``ckptd start --user --idle-exit ... --on-demand`` through
:class:`ckptd.launch.DaemonProcess`, detached (its own session, working directory ``/``), with its
output appended to ``ckptd.log`` beside the socket, and returns once it answers. The socket's
directory must be this user's own (:func:`check_private_dir`), and the log is opened there without
following symlinks: nobody else can plant the socket or redirect the log.

Ownership: a spawned daemon is shared by every client of that socket and exits by itself after
:data:`SPAWN_IDLE_EXIT_S` seconds without one; nothing here stops it. :data:`spawned` keeps the
ones this process started (and not yet seen exit) so that they are reaped, not left as zombies.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from ckptd.errors import DaemonUnavailableError, UntrustedDaemonError
from ckptd.launch import READY_TIMEOUT_S, DaemonProcess, start_args

log = logging.getLogger("ckptd_client.spawn")

SPAWN_IDLE_EXIT_S = 60
ENV_DROPPED = ("NOTIFY_SOCKET", "WATCHDOG_")
"""Removed from the spawned daemon's environment: it must not talk to systemd as if it were the
service. The user's ``CKPTD_*`` stay (the spawned daemon reads the same config as the client)."""
_LOG_FLAGS = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW

spawned: list[DaemonProcess] = []
"""The daemons this process spawned that had not exited when it last looked (each spawn reaps
those that have)."""


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


def open_log(log_path: Path) -> int:
    """The daemon log, opened for appending (and reading its end) without following a symlink,
    and checked to be a regular file of this user. The caller closes the descriptor."""
    try:
        fd = os.open(log_path, _LOG_FLAGS, 0o600)
    except OSError as exc:
        raise UntrustedDaemonError(
            f"cannot open the daemon log {log_path} ({exc.strerror}); it must be a regular file "
            "of yours, not a symlink"
        ) from exc
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UntrustedDaemonError(
            f"the daemon log {log_path} is not a regular file of uid {os.getuid()}; remove it"
        )
    return fd


def spawn_daemon(socket_path: Path, root: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Start a per-user daemon on ``socket_path`` writing to ``root``, and wait (up to
    ``timeout_s`` seconds) until it answers; logs one warning saying so.

    Another process may spawn one on the same socket at the same moment: the one that loses
    exits, and this returns once the winner answers. Raises :class:`UntrustedDaemonError` for
    a socket directory or log that is not this user's own, and :class:`DaemonUnavailableError`
    naming the exit code or the timeout and the end of the log when it does not answer."""
    for started in list(spawned):
        if started.returncode is not None:
            spawned.remove(started)
    check_private_dir(socket_path)
    log_path = socket_path.parent / "ckptd.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_DROPPED)}
    args = start_args(socket_path, root, None, "--idle-exit", str(SPAWN_IDLE_EXIT_S), "--on-demand")
    fd = open_log(log_path)
    daemon: DaemonProcess | None = None
    try:
        daemon = DaemonProcess(
            socket_path, args, log=fd, log_path=log_path, env=env, cwd="/", detached=True
        )
        spawned.append(daemon)
        # One line a user sees by default: a background process now runs on their behalf.
        log.warning(
            "ckptd_client: no daemon answered on %s; started one (pid %d) writing checkpoints "
            "to %s (exits after %d s idle; log %s)",
            socket_path,
            daemon.pid,
            root,
            SPAWN_IDLE_EXIT_S,
            log_path,
        )
        daemon.wait_ready(timeout_s)
    finally:
        os.close(fd)
        if daemon is not None:
            daemon.log = log_path  # the descriptor is closed: read the log by its path from now
