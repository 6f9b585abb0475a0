"""``ckptd.cli.bench``: a trainer process that fails raises its own error type.

The whole measurement (``run_bench``: copy, codec, disk, save, a snapshot through a daemon, the
suggestions and their rendering) runs once, through the command, in
``tests/integration/cli/test_bench_daemon.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptd.cli.bench import run_probe
from ckptd.errors import DaemonUnavailableError


def test_a_failing_trainer_process_raises_its_own_error_type(tmp_path: Path) -> None:
    """The probe (``python -m ckptd_client.probe``) finds no daemon on the socket: ``run_probe``
    raises the probe's DaemonUnavailableError (the CLI then exits with that error's code), not a
    bare CkptdError."""
    sock = tmp_path / "nobody.sock"
    with pytest.raises(DaemonUnavailableError, match=r"^ckptd bench: its trainer process failed"):
        run_probe(sock, tmp_path / "root", 1 << 20, 1, cwd=tmp_path)
