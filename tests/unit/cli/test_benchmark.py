"""``ckptd.cli.bench.run_bench`` (the ``ckptd bench`` command's engine) on a tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptd.cli.bench import render, run_bench, run_probe
from ckptd.errors import DaemonUnavailableError

SIZE = 8 << 20


def test_run_bench_tiny(tmp_path: Path) -> None:
    root = tmp_path / "root"
    res = run_bench(SIZE, root)
    json.dumps(res)  # --json output must serialize

    assert res["size_bytes"] == SIZE
    for key in ("memory_copy", "codec", "disk", "ckptd_save"):
        assert res[key]["gb_per_s" if key != "codec" else "compress_gb_per_s"] > 0, key
    assert res["codec"]["decompress_gb_per_s"] > 0
    assert 0 < res["codec"]["stored_over_raw"] <= 1.01
    assert res["disk"]["bytes"] == SIZE
    assert res["ckptd_save"]["bytes"] == SIZE
    assert res["ckptd_save"]["seconds"] > 0

    sugg = res["suggestions"]
    assert set(sugg) == {"store.threads", "codec.codec", "codec.level", "slots"}
    for key, s in sugg.items():
        assert isinstance(s["reason"], str) and len(s["reason"]) > 10, key
    assert sugg["store.threads"]["value"] >= 1
    assert sugg["codec.codec"]["value"] in ("raw", "auto")
    assert sugg["codec.level"]["value"] == 1
    assert sugg["slots"]["value"] in (1, 2)

    # the temporary job / store and the disk test file are gone
    assert list(root.iterdir()) == []

    lines = render(res)
    assert any("suggested configuration" in ln for ln in lines)
    keys = ("store.threads", "codec.", "Client(slots")
    assert sum(ln.strip().startswith(keys) for ln in lines) == 4


def test_a_failing_trainer_process_raises_its_own_error_type(tmp_path: Path) -> None:
    """The probe (``python -m ckptd_client.probe``) finds no daemon on the socket: ``run_probe``
    raises the probe's DaemonUnavailableError (the CLI then exits with that error's code), not a
    bare CkptdError."""
    sock = tmp_path / "nobody.sock"
    with pytest.raises(DaemonUnavailableError, match=r"^ckptd bench: its trainer process failed"):
        run_probe(sock, tmp_path / "root", 1 << 20, 1, cwd=tmp_path)
