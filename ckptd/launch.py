"""Start a ckptd daemon as a child process and wait until it answers; stop it.

The one way ckptd's own code starts a daemon: the client's on-demand spawn, ``ckptd bench``, the
benchmark scripts and the test suite's daemon factory all build a :class:`DaemonProcess`. It
runs ``python -m MODULE start ARGS`` (``MODULE`` is ``ckptd``, or a wrapper that installs a seam
and then runs ckptd's CLI) with its output appended to a log file, and :meth:`wait_ready` returns
once the socket accepts a connection: a socket file alone is not readiness.

Ownership: whoever constructs a :class:`DaemonProcess` stops it (:meth:`stop`), except a daemon
started for other processes to share, such as the client's on-demand daemon, which exits by itself
after ``--idle-exit`` seconds without a client.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import ckptd
from ckptd.errors import DaemonUnavailableError
from ckptd.protocol import can_connect

READY_TIMEOUT_S = 60.0
"""How long a new daemon may take to answer (it imports torch: seconds on a cold cache)."""
STOP_TIMEOUT_S = 30.0
"""How long a SIGTERMed daemon may take to drain and exit before it is SIGKILLed."""
LOG_TAIL_LINES = 5
ENV_DROPPED = ("CKPTD_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_")
"""What :func:`private_env` removes: what could redirect a daemon (``CKPTD_*``) or make it talk to
systemd as if it were the service (sd_notify, watchdog, socket activation)."""


def private_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this environment) for a daemon of the caller's own: without
    :data:`ENV_DROPPED`, and with the source tree this ``ckptd`` was imported from first on
    ``PYTHONPATH`` (when it is not an installed package), so the daemon runs the same code."""
    source_env = os.environ if base is None else base
    env = {k: v for k, v in source_env.items() if not k.startswith(ENV_DROPPED)}
    source = Path(ckptd.__file__).resolve().parent.parent
    if source.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    return env


def start_args(
    socket_path: Path,
    root: Path | None = None,
    config: Path | None = None,
    *extra: str,
    user: bool = True,
) -> list[str]:
    """The ``start`` arguments for a daemon on ``socket_path``: ``--user`` unless ``user`` is
    False, then ``--socket``, ``--root`` and ``--config`` when given, then ``extra``."""
    args = ["start", *(["--user"] if user else []), "--socket", str(socket_path)]
    if root is not None:
        args += ["--root", str(root)]
    if config is not None:
        args += ["--config", str(config)]
    return [*args, *extra]


class DaemonProcess:
    """A daemon this process started: ``python -m MODULE ARGS`` (``ARGS`` usually from
    :func:`start_args`), answering on ``socket_path``.

    Output (stdout and stderr) is appended to ``log``: a path, or a file descriptor the caller
    opened and keeps open while it uses this object (opened readable too, :meth:`log_tail` reads
    through it; ``log_path`` names it in messages). ``detached`` starts the daemon in a session
    of its own: a Ctrl-C at the terminal reaches only this process, whose cleanup then stops the
    daemon (drain and exit). The constructor returns once the process is started; call
    :meth:`wait_ready` before using it.
    """

    def __init__(
        self,
        socket_path: Path,
        args: Sequence[str],
        *,
        log: Path | int,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        module: str = "ckptd",
        detached: bool = False,
    ) -> None:
        self.socket = socket_path
        self.log = log
        self.log_path = log if isinstance(log, Path) else log_path
        self.args = [sys.executable, "-m", module, *args]
        fd = log if isinstance(log, int) else os.open(log, _LOG_FLAGS, 0o600)
        try:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                cwd=cwd,
                env=None if env is None else dict(env),
                start_new_session=detached,
            )
        finally:
            if not isinstance(log, int):
                os.close(fd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs; its exit code (negative: the signal) once it has exited."""
        return self.proc.poll()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last ``lines`` lines of the log (of its last 64 KiB; empty when it cannot be
        read, e.g. a descriptor opened write-only)."""
        try:
            if isinstance(self.log, int):
                end = os.fstat(self.log).st_size
                data = os.pread(self.log, _TAIL_BYTES, max(0, end - _TAIL_BYTES))
            else:
                with self.log.open("rb") as f:
                    f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
                    data = f.read()
        except OSError:
            return []
        return data.decode(errors="replace").splitlines()[-lines:]

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, *, what: str = "ckptd") -> None:
        """Return once ``socket_path`` accepts a connection.

        A daemon that exits because another one already serves the socket (a race between two
        starters) is not a failure: the other one answers. Raises :class:`DaemonUnavailableError`
        naming the exit code or the timeout and the end of the log; the process is left as it
        is (the owner still stops it)."""
        deadline = time.monotonic() + timeout_s
        while not can_connect(self.socket):
            code = self.proc.poll()
            timed_out = time.monotonic() > deadline
            if code is None and not timed_out:
                time.sleep(0.02)
                continue
            tail = self.log_tail()
            lost_race = code is not None and any("already serving" in t for t in tail)
            if (code is not None and not lost_race) or timed_out:
                problem = (
                    f"exited with code {code}"
                    if code is not None and not lost_race
                    else f"did not answer within {timeout_s:g} s"
                )
                where = f"its log ({self.log_path})" if self.log_path else "its log"
                raise DaemonUnavailableError(
                    f"the {what} daemon started on {self.socket} {problem}; {where} ends with: "
                    + (" | ".join(tail) or "(nothing)")
                )
            time.sleep(0.02)  # lost the race: the winner is still binding the socket

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (the daemon drains queued snapshots and exits), SIGKILL if it has not exited
        after ``timeout_s``; return its exit code. A KeyboardInterrupt while waiting kills it at
        once and is passed on."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
            self.proc.kill()
            self.proc.wait()
            if isinstance(exc, KeyboardInterrupt):
                raise
        return self.proc.returncode


_TAIL_BYTES = 1 << 16
_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
