"""``ckptd.launch``: a :class:`DaemonProcess` is ready once its socket answers, says why when it is
not, and stops; :func:`private_env` keeps the caller's variables that cannot redirect a daemon.

Real processes, each stopped in a ``finally``, under the ``daemons`` factory's short tmp dir (its
cleanup fails the test if any of them is left running). The factory itself is not used to start
them: this is the layer below it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import ckptd
from ckptd.errors import ConfigError, DaemonUnavailableError
from ckptd.launch import DaemonProcess, private_env, start_args
from ckptd.protocol import can_connect
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import DaemonFactory, query

daemons = daemon_fixtures.daemons


def launch(daemons: DaemonFactory, name: str, config: Path | None = None) -> DaemonProcess:
    """A daemon on ``<base>/<name>.sock`` and root ``<base>/<name>-root``, its log
    ``<base>/<name>.log``, in the factory's clean environment."""
    sock = daemons.base / f"{name}.sock"
    args = start_args(sock, daemons.base / f"{name}-root", config)
    return DaemonProcess(sock, args, log=daemons.base / f"{name}.log", env=daemons.env)


def test_a_daemon_that_exits_names_its_exit_code_and_last_log_line(
    daemons: DaemonFactory,
) -> None:
    bad = daemons.base / "bad" / "ckptd.toml"
    bad.parent.mkdir()
    bad.write_text("[bogus]\nkey = 1\n")
    daemon = launch(daemons, "bad", config=bad)
    try:
        with pytest.raises(DaemonUnavailableError) as info:
            daemon.wait_ready()
    finally:
        daemon.stop()
    message = str(info.value)
    last_line = daemon.log_tail(1)[0]
    assert "bogus" in last_line and "unknown key" in last_line
    assert f"exited with code {ConfigError.exit_code}" in message
    assert last_line in message
    assert str(daemon.socket) in message and str(daemon.log) in message


def test_a_daemon_answers_once_ready_a_second_one_on_its_socket_exits_and_stop_ends_it(
    daemons: DaemonFactory,
) -> None:
    """The first daemon answers once ``wait_ready`` returns; a second one started on its socket
    exits, and the second's ``wait_ready`` returns all the same (the first one answers); ``stop``
    ends the first, and nothing answers on the socket any more."""
    first = launch(daemons, "d")
    try:
        first.wait_ready()
        assert query(first.socket)["pid"] == first.pid
        assert first.returncode is None
        second = DaemonProcess(
            first.socket,
            start_args(first.socket, daemons.base / "other-root"),
            log=daemons.base / "second.log",
            env=daemons.env,
        )
        try:
            assert second.proc.wait(60) == DaemonUnavailableError.exit_code
            assert any("already serving" in line for line in second.log_tail())
            second.wait_ready(timeout_s=5)  # the first one answers
        finally:
            second.stop()
        assert query(first.socket)["pid"] == first.pid
    finally:
        code = first.stop()
    assert code == 0, first.log_tail()
    assert not can_connect(first.socket)


def test_a_process_that_never_answers_times_out_and_stop_ends_it(daemons: DaemonFactory) -> None:
    sock = daemons.base / "never.sock"
    sleeper = ["-n", "1", "-r", "1", "-s", "import time", "time.sleep(30)"]
    process = DaemonProcess(
        sock, sleeper, log=daemons.base / "never.log", env=daemons.env, module="timeit"
    )
    try:
        with pytest.raises(DaemonUnavailableError, match=r"did not answer within 0\.5 s"):
            process.wait_ready(timeout_s=0.5)
        assert process.returncode is None  # left as it is: the owner stops it
    finally:
        code = process.stop()
    assert code == -signal.SIGTERM


def test_private_env_drops_what_could_redirect_a_daemon_and_keeps_the_rest() -> None:
    kept = {"HOME": "/home/someone", "PATH": "/usr/bin:/bin", "MY_CKPTD_NOTE": "a suffix only"}
    dropped = {
        "CKPTD_ROOT": "/elsewhere",
        "CKPTD_SOCKET": "/elsewhere/s.sock",
        "CKPTD_CONFIG": "/elsewhere/ckptd.toml",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "1000000",
        "WATCHDOG_PID": "1",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "1",
        "LISTEN_FDNAMES": "ckptd.socket",
    }
    env = private_env({**kept, **dropped, "PYTHONPATH": "/opt/extra"})
    source = str(Path(ckptd.__file__).resolve().parent.parent)
    assert env == {**kept, "PYTHONPATH": os.pathsep.join([source, "/opt/extra"])}


def test_private_env_defaults_to_this_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTD_ROOT", "/elsewhere")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("LAUNCH_TEST_KEPT", "yes")
    env = private_env()
    assert "CKPTD_ROOT" not in env and "NOTIFY_SOCKET" not in env
    assert env["LAUNCH_TEST_KEPT"] == "yes"


def test_a_log_given_as_a_descriptor_is_read_through_it_and_named_by_its_path(
    daemons: DaemonFactory,
) -> None:
    bad = daemons.base / "fd" / "ckptd.toml"
    bad.parent.mkdir()
    bad.write_text("[bogus]\nkey = 1\n")
    log_path = daemons.base / "fd.log"
    fd = os.open(log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        sock = daemons.base / "fd.sock"
        daemon = DaemonProcess(
            sock,
            start_args(sock, daemons.base / "fd-root", bad),
            log=fd,
            log_path=log_path,
            env=daemons.env,
        )
        try:
            with pytest.raises(DaemonUnavailableError) as info:
                daemon.wait_ready()
        finally:
            daemon.stop()
        tail = daemon.log_tail()
    finally:
        os.close(fd)
    assert tail and "unknown key" in tail[-1]
    assert tail[-1] in str(info.value) and f"its log ({log_path})" in str(info.value)
