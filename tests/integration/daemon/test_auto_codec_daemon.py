"""``codec = "auto"`` in a real daemon: the first write compresses and measures, the next ones
are decided from what it measured, and ``ckptd status`` (JSON and human) reports the choice, why
and the rates; an explicit codec stays fixed.

Which mode the second write takes depends on this machine's disk and free cores, so the test
asserts that it was decided from measurements and that the objects on disk match it, not which
one it is (:mod:`tests.unit.pipeline.test_auto_codec` pins the rule itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ckptd.format.store import Store
from ckptd_client import Client
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import Daemon, DaemonFactory, make_state

ckptd_env = daemon_fixtures.ckptd_env
daemons = daemon_fixtures.daemons

pytestmark = pytest.mark.usefixtures("ckptd_env")

MEASURED_WHY = {"faster", "disk-faster", "hold", "probe", "space"}


def snapshot(daemon: Daemon, job: str, seed: int, step: int) -> None:
    with Client(job, socket=daemon.socket, root=daemon.root, spawn=False) as client:
        client.snapshot(state=make_state(seed, 8), step=step, rng=False).wait(timeout=60)


def object_codecs(root: Path, job: str, step: int) -> set[str]:
    manifest = Store(root).read_manifest(job, step)
    return {info.codec for info in manifest.objects.values()}


def status_text(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> str:
    """``ckptd status --socket S``, the human output, run by the CLI's ``main`` in-process."""
    from ckptd.cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["status", "--socket", str(daemon.socket)])
    captured = capsys.readouterr()
    assert exited.value.code == 0, (captured.out, captured.err)
    return captured.out


def test_auto_compresses_first_then_decides_from_measurements(
    daemons: DaemonFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = daemons.start()
    snapshot(daemon, "auto", seed=1, step=1)
    codec: dict[str, Any] = daemon.status()["codec"]
    assert codec["configured"] == "auto"
    assert (codec["choice"], codec["why"], codec["job"]) == ("compress", "bootstrap", "auto")
    assert codec["codec"] == "bytegroup"
    assert codec["writes"] == {"compress": 1, "raw": 0}
    # 8 MiB of random normals: the write was large enough to measure every rate.
    assert codec["disk_bytes_per_s"] > 0
    assert codec["codec_bytes_per_s_per_core"] > 0
    assert 0 < codec["ratio"] < 1  # the exponent plane of float32 noise compresses
    assert codec["cpus"] >= 1
    assert "bytegroup+zstd" in object_codecs(daemon.root, "auto", 1)
    text = status_text(daemon, capsys)
    assert "codec auto: compress for auto: no measurement yet" in text, text

    snapshot(daemon, "auto", seed=2, step=2)
    codec = daemon.status()["codec"]
    assert codec["why"] in MEASURED_WHY, codec
    assert codec["free_cores"] is not None
    assert sum(codec["writes"].values()) == 2
    codecs = object_codecs(daemon.root, "auto", 2)
    if codec["choice"] == "raw":
        assert codecs == {"raw"}, codec
    else:
        assert "bytegroup+zstd" in codecs, codec
    line = next(x for x in status_text(daemon, capsys).splitlines() if x.startswith("codec"))
    assert line.startswith(f"codec auto: {codec['choice']} for auto: {codec['reason']}"), line
    assert "disk " in line and "codec per core " in line and "free cores " in line, line
    print(line)  # what this machine chose (-s shows it)


def test_an_explicit_codec_stays_fixed(
    daemons: DaemonFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = daemons.start(config='[codec]\ncodec = "raw"\n')
    for step in (1, 2):
        snapshot(daemon, "fixed", seed=step, step=step)
        assert object_codecs(daemon.root, "fixed", step) == {"raw"}
    codec = daemon.status()["codec"]
    assert (codec["configured"], codec["choice"], codec["why"]) == ("raw", "raw", "configured")
    assert codec["writes"] == {"compress": 0, "raw": 2}
    assert codec["disk_bytes_per_s"] > 0 and codec["codec_bytes_per_s_per_core"] is None
    assert "codec raw (codec.codec)" in status_text(daemon, capsys)


def test_status_before_any_write(
    daemons: DaemonFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = daemons.start()
    assert daemon.status()["codec"]["choice"] is None
    assert "codec: no snapshot written yet" in status_text(daemon, capsys)
