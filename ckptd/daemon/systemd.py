"""sd_notify without libsystemd: READY / STATUS / WATCHDOG / STOPPING.

Every call is a no-op when ``NOTIFY_SOCKET`` is unset (not run by systemd with Type=notify), so the
daemon calls these unconditionally. Errors sending a notification are logged, never raised: losing
a status line must not stop checkpoints.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("ckptd.daemon.systemd")


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) to systemd; False when not supervised."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd asked for (ping period), or None when not enabled."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        return None
