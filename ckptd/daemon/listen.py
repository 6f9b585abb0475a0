"""The daemon's listening socket, and who is on the other end of a connection.

:func:`bind_socket` makes the socket a daemon serves: its directory, the lock that keeps a second
daemon off it, and the modes that keep other users out. :func:`peer_of` reads a connection's
kernel credentials (``SO_PEERCRED``); :func:`peer_allowed` is the rule of who may connect (the
admission applies it, with its per-uid limits). Called on the loop thread, at startup and on
each accept; nothing here waits for a client.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import logging
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ckptd.errors import ConfigError, DaemonUnavailableError

log = logging.getLogger("ckptd.daemon.listen")


@dataclass(frozen=True)
class Peer:
    """A connected process, as the kernel reports it (not as it claims to be)."""

    pid: int
    uid: int
    gid: int


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
