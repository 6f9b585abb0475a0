"""The optional Prometheus endpoint of a real daemon."""

from __future__ import annotations

import urllib.request

import pytest
import torch

import ckptd_client
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import DaemonFactory

ckptd_env = daemon_fixtures.ckptd_env
daemons = daemon_fixtures.daemons
pytestmark = pytest.mark.usefixtures("ckptd_env")


def test_metrics_endpoint_counts_commits_bytes_and_stalls(daemons: DaemonFactory) -> None:
    daemon = daemons.start(config='[metrics]\nlisten = "127.0.0.1:0"\n')
    port = daemon.status()["metrics_port"]
    assert isinstance(port, int) and port > 0
    with ckptd_client.Client("met", socket=daemon.socket, root=daemon.root, spawn=False) as client:
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
    assert daemons.stop(daemon) == 0
