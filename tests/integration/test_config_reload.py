"""The daemon reloads its config file live; an invalid edit is rejected and the old one stays."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptd_client
from ckptd.store import Store


def _wait_for(predicate: object, timeout_s: float = 30.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _status(sock: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "ckptd", "status", "--json", "--socket", str(sock)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    doc = json.loads(out)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture
def daemon_with_config() -> Iterator[tuple[Path, Path, Path, subprocess.Popen[bytes]]]:
    base = Path(tempfile.mkdtemp(prefix="ck", dir="/tmp"))
    sock, root, config = base / "d.sock", base / "root", base / "ckptd.toml"
    config.write_text('[codec]\ncodec = "auto"\n')
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ckptd",
            "start",
            "--user",
            "--socket",
            str(sock),
            "--root",
            str(root),
            "--config",
            str(config),
        ],
        stderr=subprocess.PIPE,
    )
    _wait_for(sock.exists)
    yield sock, root, config, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    if proc.stderr is not None:
        proc.stderr.close()


def test_reload_applies_codec_and_rejects_bad_edit(
    daemon_with_config: tuple[Path, Path, Path, subprocess.Popen[bytes]],
) -> None:
    sock, root, config, proc = daemon_with_config
    loaded_at = _status(sock)["config_loaded_at"]
    assert isinstance(loaded_at, float)

    config.write_text('[codec]\ncodec = "bogus"\n')  # invalid: must be rejected
    _wait_for(lambda: any("config change rejected" in e for e in _status(sock)["recent_errors"]))  # type: ignore[attr-defined]
    errors = _status(sock)["recent_errors"]
    assert isinstance(errors, list)
    assert any("codec.codec" in e and "bogus" in e for e in errors)
    assert _status(sock)["config_loaded_at"] == loaded_at

    tmp = config.with_suffix(".new")  # save by rename, as editors do
    tmp.write_text('[codec]\ncodec = "raw"\n')
    os.replace(tmp, config)
    _wait_for(lambda: _status(sock)["config_loaded_at"] != loaded_at)

    weights = {"w": torch.randn(64, 64)}
    with ckptd_client.Client("reload", socket=sock, root=root, spawn=False) as client:
        client.snapshot(state=weights, step=1).wait(30)
    manifest = Store(root).read_manifest("reload", 1)
    assert {o.codec for o in manifest.objects.values()} == {"raw"}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    assert "config change rejected, keeping the previous configuration" in log
    assert "configuration reloaded" in log
