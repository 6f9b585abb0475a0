"""systemd integration: the unit files verify, their exposure stays low, sd_notify is spoken.

Exposure thresholds (``systemd-analyze security --offline=true``, 0 = locked down, 10 = exposed):
the system unit must stay at or below 2.5; the user unit at or below 9.5, because a user manager
cannot apply most sandboxing options (they need privileges or user namespaces).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ckptd.launch import DaemonProcess, start_args
from tests._requirements import require
from tests.integration.daemon_fixtures import clean_env

REPO = Path(__file__).resolve().parents[3]
SYSTEM_UNIT = REPO / "systemd" / "ckptd.service"
USER_UNIT = REPO / "systemd" / "ckptd-user.service"
SYSTEM_THRESHOLD = 2.5
USER_THRESHOLD = 9.5


@pytest.fixture
def analyze() -> None:
    """systemd-analyze is installed (skip, or fail under ``CI=true``, when it is not)."""
    require(
        shutil.which("systemd-analyze") is not None,
        "systemd-analyze is missing (scripts/test installs Debian's systemd package)",
    )


def _render(unit: Path, dest_dir: Path) -> Path:
    """The unit with ExecStart pointing at this environment's ckptd (verify checks it exists)."""
    ckptd = Path(sys.executable).with_name("ckptd")
    text = unit.read_text().replace("/usr/local/bin/ckptd", str(ckptd))
    dest = dest_dir / ("ckptd.service" if unit == SYSTEM_UNIT else "ckptd-user.service")
    dest.write_text(text)
    return dest


def _env(tmp_path: Path) -> dict[str, str]:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "warning"}


@pytest.mark.usefixtures("analyze")
@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    rendered = _render(unit, tmp_path)
    cmd = ["systemd-analyze", *(["--user"] if unit == USER_UNIT else []), "verify", str(rendered)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), check=False)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.usefixtures("analyze")
@pytest.mark.parametrize(
    ("unit", "threshold"),
    [(SYSTEM_UNIT, SYSTEM_THRESHOLD), (USER_UNIT, USER_THRESHOLD)],
    ids=["system", "user"],
)
def test_unit_exposure_below_threshold(unit: Path, threshold: float, tmp_path: Path) -> None:
    rendered = _render(unit, tmp_path)
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            f"--threshold={threshold * 10:.0f}",
            str(rendered),
        ],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        check=False,
    )
    summary = [line for line in result.stdout.splitlines() if "Overall exposure" in line]
    assert summary, result.stdout + result.stderr
    level = float(summary[0].split("level for")[1].split(":")[1].split()[0])
    assert level <= threshold, summary[0]
    assert result.returncode == 0, summary[0]


def test_units_keep_what_the_daemon_needs() -> None:
    """Options that would break ckptd must never creep in (shared memory, peer uids)."""
    for unit in (SYSTEM_UNIT, USER_UNIT):
        text = unit.read_text()
        assert "Type=notify" in text and "NotifyAccess=main" in text and "WatchdogSec=" in text
        assert "DynamicUser=yes" not in text and "RemoveIPC=yes" not in text
        assert "PrivateUsers=yes" not in text  # would map client uids to nobody in SO_PEERCRED
        for key in ("Nice=", "CPUWeight=", "IOWeight="):
            assert key in text
    system = SYSTEM_UNIT.read_text()
    for key in (
        "StateDirectory=ckptd",
        "RuntimeDirectory=ckptd",
        "ConfigurationDirectory=ckptd",
        "ProtectSystem=strict",
    ):
        assert key in system


def test_daemon_speaks_sd_notify() -> None:
    """READY=1 only once the socket accepts, WATCHDOG=1 pings, STOPPING=1 on SIGTERM.

    Started through :class:`ckptd.launch.DaemonProcess` without its ``wait_ready``: READY=1 is
    the readiness under test, so nothing connects before it arrives."""
    base = Path(tempfile.mkdtemp(prefix="ck", dir="/tmp"))
    notify_path = base / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(30)
    sock = base / "d.sock"
    env = clean_env(base, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000")
    daemon = DaemonProcess(sock, start_args(sock, base / "root"), log=base / "d.log", env=env)
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("READY=1" in m for m in seen):
            seen.append(listener.recv(4096).decode())
        ready = next(m for m in seen if "READY=1" in m)
        assert f"MAINPID={daemon.pid}" in ready
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        probe.connect(str(sock))  # READY was sent after the socket was bound and listening
        probe.close()
        messages = [listener.recv(4096).decode() for _ in range(3)]
        assert any("WATCHDOG=1" in m for m in messages), messages
        assert daemon.stop() == 0, daemon.log_tail()  # SIGTERM: drain and exit
        tail: list[str] = []
        while not any("STOPPING=1" in m for m in tail):
            tail.append(listener.recv(4096).decode())  # queued before it exited
    finally:
        daemon.stop()
        listener.close()
        shutil.rmtree(base, ignore_errors=True)
