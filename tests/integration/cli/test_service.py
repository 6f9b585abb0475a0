"""``ckptd status`` / ``stop`` and the root lookup against a listener that accepts a connection
and then never answers: each says so with DaemonNoAnswerError (exit 19), naming the socket, the
pid and the request, as the README's exit-code table defines it.

The listener is this test's own (same uid, so the peer check passes), on a short socket path
under a directory the test creates and deletes. The commands run in this process (the CLI's
``main``, whose exit code is the process's); the installed console script itself is run by
``tests/integration/cli/test_cli.py`` and ``tests/integration/daemon/test_daemon.py``.
"""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ckptd.cli.main import main
from ckptd.errors import DaemonNoAnswerError
from ckptd.locate import ask_daemon, ask_daemon_root
from tests.integration import daemon_fixtures

ckptd_env = daemon_fixtures.ckptd_env


@contextmanager
def mute_listener(*, close: bool) -> Iterator[Path]:
    """A SEQPACKET listener that accepts every connection and then closes it at once
    (``close``) or holds it open without a word until the block ends."""
    base = Path(tempfile.mkdtemp(prefix="ck", dir="/tmp"))
    path = base / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(str(path))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if close:
                conn.close()
            else:
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(10)
        for conn in held:
            conn.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.usefixtures("ckptd_env")
@pytest.mark.parametrize("command", ["status", "stop"])
def test_status_and_stop_exit_19_when_the_daemon_closes_without_answering(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # one line per message, as the console script's env
    with mute_listener(close=True) as path, pytest.raises(SystemExit) as exited:
        main([command, "--socket", str(path)])
    stderr = " ".join(capsys.readouterr().err.split())
    assert exited.value.code == DaemonNoAnswerError.exit_code == 19, stderr
    assert f"the ckptd daemon on {path} (pid " in stderr
    # Closed before the request arrived, or with it unread (the kernel then resets): both are
    # "no answer".
    assert re.search(
        rf"(closed the connection without answering|dropped the connection \(Connection reset "
        rf"by peer\) to) a '{command}' request",
        stderr,
    ), stderr


def test_a_daemon_that_never_answers_times_out_naming_the_request() -> None:
    with (
        mute_listener(close=False) as path,
        pytest.raises(
            DaemonNoAnswerError, match=r"gave no answer within 0\.5 s to a 'status' request$"
        ),
    ):
        ask_daemon(path, {"op": "status", "id": 1}, timeout_s=0.5)


def test_the_root_lookup_says_where_checkpoints_go_is_unknown() -> None:
    with (
        mute_listener(close=True) as path,
        pytest.raises(
            DaemonNoAnswerError,
            match=r"(closed the connection without answering|dropped the connection \(Connection "
            r"reset by peer\) to) a 'status' request, so where it writes checkpoints is unknown; "
            r"pass root= / --root, or set CKPTD_ROOT$",
        ),
    ):
        ask_daemon_root(path)
