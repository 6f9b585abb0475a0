"""The optional Prometheus endpoint of a real daemon."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

import ckptd_client


def test_metrics_endpoint_counts_commits_bytes_and_stalls() -> None:
    base = Path(tempfile.mkdtemp(prefix="ck", dir="/tmp"))
    sock, root, config = base / "d.sock", base / "root", base / "ckptd.toml"
    config.write_text('[metrics]\nlisten = "127.0.0.1:0"\n')
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
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        status = json.loads(
            subprocess.run(
                [sys.executable, "-m", "ckptd", "status", "--json", "--socket", str(sock)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        port = status["metrics_port"]
        assert isinstance(port, int) and port > 0
        with ckptd_client.Client("met", socket=sock, root=root, spawn=False) as client:
            for step in (1, 2):
                client.snapshot(state={"w": torch.randn(128, 128)}, step=step).wait(30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert 'ckptd_commits_total{job="met"} 2.0' in text
        assert 'ckptd_persist_seconds_count{job="met"} 2.0' in text
        assert 'ckptd_raw_bytes_total{job="met"} 131072.0' in text
        assert "ckptd_queue_depth 0.0" in text
        assert 'ckptd_last_commit_timestamp_seconds{job="met"}' in text
        assert 'ckptd_snapshot_stall_seconds_count{job="met"} 2.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
