"""``ckptd bench`` measures this machine and a snapshot through a daemon of its own, suggests
config values, and leaves nothing running.

The command runs as a subprocess at 8 MiB (``--json``), the one run of the whole measurement
(``ckptd.cli.bench.run_bench``) in the suite: every measurement is positive and sized as asked,
the suggestions each carry a reason, the human-readable rendering names them; its ``snapshot``
entry must carry the stall, the durable latency, the references measured in the same reps and
their ratios, and the daemon it started must be gone afterwards (process, socket directory,
temporary store, the disk test file). A second
test interrupts the measurement (a KeyboardInterrupt where its trainer process would run) in
this process and checks that the daemon is stopped anyway, and that it ran without the caller's
``CKPTD_*`` and systemd variables. How fast anything is, is not judged here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckptd.cli import bench as benchmark
from ckptd.launch import DaemonProcess
from tests.integration.daemon_fixtures import clean_env, pid_alive, processes_mentioning

pytestmark = pytest.mark.timeout(300)  # a hang, never a speed limit

SIZE = "8MiB"


def _assert_gone(daemon: dict[str, Any]) -> None:
    socket_dir = Path(daemon["socket"]).parent
    assert not pid_alive(daemon["pid"]), f"the bench's daemon {daemon['pid']} is still running"
    assert processes_mentioning(str(socket_dir)) == []
    assert not socket_dir.exists(), f"{socket_dir} was left behind"


def test_ckptd_bench_reports_stall_and_durable_through_a_daemon(tmp_path: Path) -> None:
    root = tmp_path / "root"
    # CKPTD_SOCKET / CKPTD_ROOT point elsewhere: neither may redirect the bench's daemon.
    env = clean_env(
        tmp_path / "env",
        CKPTD_SOCKET=str(tmp_path / "elsewhere.sock"),
        CKPTD_ROOT=str(tmp_path / "elsewhere"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ckptd", "bench", "--size", SIZE, "--root", str(root), "--json"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"ckptd bench failed:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(proc.stdout)
    assert result["size_bytes"] == 8 << 20
    for key in ("memory_copy", "codec", "disk", "ckptd_save"):
        assert result[key]["gb_per_s" if key != "codec" else "compress_gb_per_s"] > 0, key
    assert result["codec"]["decompress_gb_per_s"] > 0
    assert 0 < result["codec"]["stored_over_raw"] <= 1.01
    assert result["disk"]["bytes"] == 8 << 20
    assert result["ckptd_save"]["bytes"] == 8 << 20
    assert result["ckptd_save"]["seconds"] > 0
    suggestions = result["suggestions"]
    assert set(suggestions) == {"store.threads", "codec.codec", "codec.level", "slots"}
    for key, s in suggestions.items():
        assert isinstance(s["reason"], str) and len(s["reason"]) > 10, key
    assert suggestions["store.threads"]["value"] >= 1
    assert suggestions["codec.codec"]["value"] in ("raw", "auto")
    assert suggestions["codec.level"]["value"] == 1
    assert suggestions["slots"]["value"] in (1, 2)

    snap = result["snapshot"]
    assert snap["bytes"] == 8 << 20
    assert snap["reps"] == benchmark.SNAPSHOT_REPS
    for key in ("stall_s", "durable_s", "copy_s", "torch_save_s"):
        assert snap[key] > 0, key
        assert len(snap["samples"][key]) == snap["reps"], key
    assert snap["durable_s"] >= snap["stall_s"]
    assert snap["stall_vs_copy"] == pytest.approx(snap["stall_s"] / snap["copy_s"])
    assert snap["durable_vs_torch_save"] == pytest.approx(snap["durable_s"] / snap["torch_save_s"])
    assert snap["daemon"]["exit_code"] == 0  # SIGTERM: drained and exited
    _assert_gone(snap["daemon"])
    assert list(root.iterdir()) == []  # the temporary store and the disk test file are gone too
    assert not (tmp_path / "elsewhere").exists()

    lines = benchmark.render(result)
    assert any("suggested configuration" in ln for ln in lines)
    keys = ("store.threads", "codec.", "Client(slots")
    assert sum(ln.strip().startswith(keys) for ln in lines) == 4
    stall = next(ln for ln in lines if ln.strip().startswith("snapshot stall (daemon)"))
    durable = next(ln for ln in lines if ln.strip().startswith("snapshot durable (daemon)"))
    assert f"{snap['stall_vs_copy']:.2f}x one copy_ of the state" in stall
    assert f"{snap['durable_vs_torch_save']:.2f}x torch.save+fsync" in durable
    assert f"medians of {snap['reps']} reps" in durable


def test_an_interrupted_bench_stops_its_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("CKPTD_ROOT", "CKPTD_SOCKET"):
        monkeypatch.setenv(var, str(tmp_path / "elsewhere"))
    monkeypatch.setenv("CKPTD_CONFIG", str(clean_env(tmp_path / "env")["CKPTD_CONFIG"]))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    started: list[DaemonProcess] = []
    seen: dict[str, Any] = {}
    real_init = DaemonProcess.__init__

    def record(self: DaemonProcess, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        started.append(self)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        daemon = started[0]
        environ = Path(f"/proc/{daemon.pid}/environ").read_bytes().split(b"\0")
        seen["env"] = {e.split(b"=", 1)[0].decode() for e in environ if e}
        seen["socket"] = str(daemon.socket)
        raise KeyboardInterrupt

    monkeypatch.setattr(DaemonProcess, "__init__", record)
    monkeypatch.setattr(benchmark, "run_probe", interrupted)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(KeyboardInterrupt):
        benchmark.measure_trainer(8 << 20, root, reps=1)

    [daemon] = started
    assert daemon.proc.returncode == 0
    _assert_gone({"pid": daemon.pid, "socket": seen["socket"]})
    assert list(root.iterdir()) == []
    assert not any(k.startswith(("CKPTD_", "NOTIFY_SOCKET")) for k in seen["env"]), seen["env"]
