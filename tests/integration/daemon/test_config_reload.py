"""The daemon reloads its config file live; an invalid edit is rejected and the old one stays."""

from __future__ import annotations

import os

import pytest
import torch

import ckptd_client
from ckptd.format.store import Store
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import DaemonFactory, wait_until

ckptd_env = daemon_fixtures.ckptd_env
daemons = daemon_fixtures.daemons
pytestmark = pytest.mark.usefixtures("ckptd_env")


def test_reload_applies_codec_and_rejects_bad_edit(daemons: DaemonFactory) -> None:
    # The config in a directory of its own: the daemon watches the file's directory.
    config = daemons.base / "reload" / "ckptd.toml"
    config.parent.mkdir()
    config.write_text('[codec]\ncodec = "auto"\n')
    daemon = daemons.start(config=config)
    loaded_at = daemon.status()["config_loaded_at"]
    assert isinstance(loaded_at, float)

    config.write_text('[codec]\ncodec = "bogus"\n')  # invalid: must be rejected
    wait_until(
        lambda: any("config change rejected" in e for e in daemon.status()["recent_errors"]),
        30,
        "the bad edit to be rejected",
    )
    errors = daemon.status()["recent_errors"]
    assert isinstance(errors, list)
    assert any("codec.codec" in e and "bogus" in e for e in errors)
    assert daemon.status()["config_loaded_at"] == loaded_at

    tmp = config.with_suffix(".new")  # save by rename, as editors do
    tmp.write_text('[codec]\ncodec = "raw"\n')
    os.replace(tmp, config)
    wait_until(lambda: daemon.status()["config_loaded_at"] != loaded_at, 30, "the reload")

    weights = {"w": torch.randn(64, 64)}
    root = daemon.root
    with ckptd_client.Client("reload", socket=daemon.socket, root=root, spawn=False) as client:
        client.snapshot(state=weights, step=1).wait(30)
    manifest = Store(root).read_manifest("reload", 1)
    assert {o.codec for o in manifest.objects.values()} == {"raw"}
    assert daemons.stop(daemon) == 0
    log = daemon.log_text()
    assert "config change rejected, keeping the previous configuration" in log
    assert "configuration reloaded" in log
