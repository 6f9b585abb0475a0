"""``ckptd bench``: measure this machine and suggest configuration values.

Five measurements, a few seconds each for the default 1 GiB (the last one's reps, a few times
that):

* **memory copy**: ``copy_`` of ``size`` bytes into a reused, pre-touched buffer (the best case
  of a snapshot's copy into a shared-memory slot); the best of three passes;
* **codec**: :func:`ckptd.format.codec.encode` / :func:`~ckptd.format.codec.decode` of ``min(size,
  256 MiB)`` of random-normal float32 data (the default ``auto`` codec, level 1) in 8 MiB chunks on
  a 2-thread pool; stored/raw is the compression ratio on *this* data (trained weights compress to
  about 0.83 in the project's codec benchmark; random normals are similar);
* **disk**: write ``size`` bytes in 8 MiB chunks to a file under ``root``, ``fsync`` it, delete it;
* **ckptd save** and **snapshot through a daemon**: what a training loop sees. A private daemon
  is started (:class:`ckptd.launch.DaemonProcess`: ``ckptd start --user`` with an empty config,
  its socket and log in a new 0700 directory, its checkpoints in a temporary store under
  ``root``, in a session of its own) and stopped afterwards (SIGTERM, then SIGKILL), also when
  the bench is interrupted.

  The client runs as a separate trainer process, ``python -m ckptd_client.probe`` (see that module
  for what it times), whose JSON this reads. Two reasons: ``ckptd`` never imports the client
  library, in any form (the daemon and the operators' CLI must not depend on the trainer side),
  and a snapshot costs a trainer what it costs in a process of its own (its address space, page
  faults and threads), not in one that also holds the bench's buffers. The probe first saves its
  state (float32 tensors of 8-32 MiB) with ``ckptd_client.save`` into a temporary store under
  ``root`` (the durable latency of a blocking in-process save, with the configuration the bench
  was given), then snapshots it ``reps`` times: the **stall** is how long ``snapshot()`` takes to
  return, the **durable** latency runs from that call until ``wait()`` returns. It also times, in
  the same reps and the same process, one ``copy_`` of the state into reused buffers (the floor
  of any snapshot's copy) and ``torch.save`` + ``fsync`` of it (what a blocking checkpoint
  costs); medians are reported with the ratios ``stall_vs_copy`` and ``durable_vs_torch_save``.

Then it suggests ``store.threads``, ``codec.codec``, ``codec.level`` and the client's ``slots``,
each with its reason. :func:`run_bench` returns everything as a JSON-friendly dict; :func:`render`
turns it into lines for people. Everything runs on the calling thread.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import psutil
import torch
from rich.text import Text

from ckptd.cli.common import out
from ckptd.config import load_config, resolve_root
from ckptd.errors import CkptdError, error_from_reply
from ckptd.format.codec import CodecConfig, Encoded, decode, encode
from ckptd.launch import DaemonProcess, private_env, start_args
from ckptd.units import parse_size

MiB = 1 << 20
CHUNK = 8 * MiB
CODEC_MAX = 256 * MiB
CODEC_THREADS = 2
TENSOR_BYTES = 32 * MiB
"""The largest tensor of the bench's state (the probe is told, so both build the same state)."""
SNAPSHOT_REPS = 3
BENCH_JOB = "ckptd-bench"
PROBE_MODULE = "ckptd_client.probe"
DAEMON_IDLE_EXIT_S = 60.0
"""The daemon exits by itself after this long without a client: a bench that is SIGKILLed
(its ``finally`` never runs) leaves no daemon behind for longer."""
TAIL_LINES = 5


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / max(seconds, 1e-9) / 1e9


def measure_copy(size: int) -> dict[str, Any]:
    """``copy_`` into a reused, pre-touched buffer: best of three passes."""
    n = max(1, size // 4)
    src = torch.randn(n)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch, untimed
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"bytes": src.nbytes, "seconds": best, "gb_per_s": _gbps(src.nbytes, best)}


def measure_codec(size: int, threads: int = CODEC_THREADS) -> dict[str, Any]:
    """Encode / decode random-normal float32 data in 8 MiB chunks on ``threads`` threads."""
    nbytes = max(4, min(size, CODEC_MAX) // 4 * 4)
    data = torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(0))
    raw = data.numpy().data.cast("B")
    chunks = [raw[i : i + CHUNK] for i in range(0, nbytes, CHUNK)]
    config = CodecConfig()
    outs = [bytearray(len(c)) for c in chunks]
    for o in outs:  # pre-touch the decode buffers
        o[::4096] = bytes(len(o[::4096]))

    def enc(c: memoryview) -> Encoded:
        return encode(c, elem_size=4, is_float=True, config=config)

    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        objects = list(pool.map(enc, chunks))
        t1 = time.perf_counter()
        encoded = [b"".join(o.parts) for o in objects]  # what a reader gets back from the file
        t1b = time.perf_counter()
        list(
            pool.map(
                lambda a: decode(a[0], memoryview(a[1]), where="bench"),
                zip(encoded, outs, strict=True),
            )
        )
        t2 = time.perf_counter()
    if any(memoryview(o) != c for o, c in zip(outs, chunks, strict=True)):
        raise AssertionError("ckptd bench: codec round trip was not exact")
    stored = sum(len(e) for e in encoded)
    return {
        "bytes": nbytes,
        "threads": threads,
        "codec": config.codec,
        "level": config.level,
        "stored_bytes": stored,
        "stored_over_raw": stored / nbytes,
        "compress_s": t1 - t0,
        "decompress_s": t2 - t1b,
        "compress_gb_per_s": _gbps(nbytes, t1 - t0),
        "decompress_gb_per_s": _gbps(nbytes, t2 - t1b),
    }


def measure_disk(size: int, root: Path) -> dict[str, Any]:
    """Write ``size`` bytes in 8 MiB chunks to a new file under ``root``, fsync, delete."""
    block = os.urandom(min(CHUNK, max(size, 1)))
    fd, name = tempfile.mkstemp(prefix=".ckptd-bench-", dir=root)
    path = Path(name)
    try:
        written = 0
        t0 = time.perf_counter()
        while written < size:
            n = min(len(block), size - written)
            view = memoryview(block)[:n]
            while view:
                view = view[os.write(fd, view) :]
            written += n
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return {
        "bytes": written,
        "write_s": t1 - t0,
        "fsync_s": t2 - t1,
        "seconds": t2 - t0,
        "gb_per_s": _gbps(written, t2 - t0),
    }


# ---- a snapshot through a real daemon, from a trainer process ----------------------------------


def _private_dir() -> Path:
    """A new 0700 directory for the daemon's socket, log and empty config. In the temporary
    directory unless the socket path would not fit ``sun_path`` (108 bytes), then in /tmp."""
    parent = Path(tempfile.gettempdir())
    if len(os.fsencode(parent / "ckptd-bench-XXXXXXXX" / "d.sock")) > 100:
        parent = Path("/tmp")
    return Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=parent))


def _tail(text: str) -> str:
    return " | ".join(text.splitlines()[-TAIL_LINES:]) or "(nothing)"


def run_probe(
    socket: Path,
    root: Path,
    size: int,
    reps: int,
    *,
    cwd: Path,
    save_root: Path | None = None,
    config: Path | None = None,
) -> dict[str, Any]:
    """Run ``python -m ckptd_client.probe`` against the daemon on ``socket`` (checkpoints under
    ``root``; with ``save_root``, a blocking save there first, configured by the file ``config``
    or the defaults) and return the JSON object it prints. A probe that fails, or prints
    something else, raises :class:`~ckptd.errors.CkptdError` naming the command and the end of
    its stderr; a ckptd error the probe reports is raised as its own type."""
    cmd = [sys.executable, "-m", PROBE_MODULE, "--socket", str(socket), "--root", str(root)]
    cmd += ["--size", str(size), "--tensor-bytes", str(TENSOR_BYTES), "--reps", str(reps)]
    cmd += ["--job", BENCH_JOB]
    if save_root is not None:
        cmd += ["--save-root", str(save_root)]
    if config is not None:
        cmd += ["--config", str(config)]
    proc = subprocess.run(
        cmd,
        cwd=cwd,  # not wherever the bench runs: a ./ckptd there must not be imported
        env=private_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    problem = f"exited with code {proc.returncode}" if proc.returncode else ""
    result: Any = None
    if not problem:
        try:
            result = json.loads(proc.stdout)
        except json.JSONDecodeError:
            problem = f"printed no JSON object (stdout: {_tail(proc.stdout)})"
        else:
            if not isinstance(result, dict) or not (
                isinstance(result.get("samples"), dict) or isinstance(result.get("error"), str)
            ):
                problem = f"printed no result object (stdout: {_tail(proc.stdout)})"
    if problem:
        raise CkptdError(
            f"ckptd bench: its trainer process `{shlex.join(cmd)}` {problem}; its stderr ends "
            f"with: {_tail(proc.stderr)}"
        )
    if "error" in result:  # the probe's CkptdError, by type: the CLI exits with its code
        raise error_from_reply(
            result["error"], f"ckptd bench: its trainer process failed: {result.get('message')}"
        )
    return dict(result)


def measure_trainer(
    size: int, root: Path, reps: int = SNAPSHOT_REPS, config: Path | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """In a trainer process (the probe), through a daemon started for it: a blocking
    ``ckptd_client.save`` of a ``size`` state (configured by the file ``config``, or the
    defaults), then the stall and durable latency of ``Client.snapshot`` beside one ``copy_``
    and ``torch.save`` + ``fsync`` of the same state in the same reps. Returns the save's and the
    snapshots' results."""
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    work = _private_dir()
    store_dir = Path(tempfile.mkdtemp(prefix=".ckptd-bench-", dir=root))
    save_dir = Path(tempfile.mkdtemp(prefix=".ckptd-bench-", dir=root))
    socket = work / "d.sock"
    daemon: DaemonProcess | None = None
    exit_code: int | None = None
    try:
        config = work / "config" / "empty.toml"  # its own directory: the daemon watches it
        config.parent.mkdir(mode=0o700)
        config.touch()
        args = start_args(socket, store_dir, config, "--idle-exit", f"{DAEMON_IDLE_EXIT_S:g}")
        daemon = DaemonProcess(
            socket,
            args,
            log=work / "daemon.log",
            env=private_env(),
            cwd=work,  # not wherever the bench runs: a ./ckptd there must not be imported
            detached=True,  # a Ctrl-C reaches only the bench, whose finally stops the daemon
        )
        daemon.wait_ready(what="ckptd bench")
        probe = run_probe(
            socket, store_dir, size, reps, cwd=work, save_root=save_dir, config=config
        )
    finally:
        try:
            if daemon is not None:
                exit_code = daemon.stop()
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(store_dir, ignore_errors=True)
            shutil.rmtree(save_dir, ignore_errors=True)
    saved = probe["save"]
    save = {
        "bytes": probe["bytes"],
        "tensors": probe["tensors"],
        "seconds": saved["seconds"],
        "gb_per_s": _gbps(probe["bytes"], saved["seconds"]),
        "stored_bytes": saved["stored_bytes"],
    }
    samples: dict[str, list[float]] = probe["samples"]
    med = {name: statistics.median(samples[name]) for name in samples}
    return save, {
        "bytes": probe["bytes"],
        "tensors": probe["tensors"],
        "reps": reps,
        "stall_s": med["stall_s"],
        "durable_s": med["durable_s"],
        "copy_s": med["copy_s"],
        "torch_save_s": med["torch_save_s"],
        "stall_vs_copy": med["stall_s"] / max(med["copy_s"], 1e-9),
        "durable_vs_torch_save": med["durable_s"] / max(med["torch_save_s"], 1e-9),
        "samples": {
            name: samples[name] for name in ("stall_s", "durable_s", "copy_s", "torch_save_s")
        },
        "daemon": {
            "pid": daemon.pid if daemon is not None else None,
            "socket": str(socket),
            "exit_code": exit_code,
        },
    }


def suggest(results: dict[str, Any], size: int) -> dict[str, dict[str, Any]]:
    """Config values with their reasons, from the measurements in ``results``."""
    cores = os.cpu_count() or 1
    disk = results["disk"]["gb_per_s"]
    comp = results["codec"]["compress_gb_per_s"] / results["codec"]["threads"] * min(cores, 8)
    ratio = results["codec"]["stored_over_raw"]
    suggested: dict[str, dict[str, Any]] = {
        "store.threads": {
            "value": min(2 * cores, 16),
            "reason": f"{cores} CPU core(s): two pipeline threads per core, so that one "
            "hashes and compresses (they release the GIL) while the other waits for its write "
            "and fsync",
        }
    }
    if disk > 2 * comp:
        suggested["codec.codec"] = {
            "value": "raw",
            "reason": f"disk write+fsync ({disk:.2f} GB/s) is more than twice the compression "
            f"speed with {min(cores, 8)} thread(s) ({comp:.2f} GB/s): compressing would make "
            f"checkpoints durable later; it would save {1 - ratio:.0%} of the disk space",
        }
    else:
        suggested["codec.codec"] = {
            "value": "auto",
            "reason": f"disk write+fsync ({disk:.2f} GB/s) is at most twice the compression "
            f"speed with {min(cores, 8)} thread(s) ({comp:.2f} GB/s): compression (stored/raw "
            f"{ratio:.2f} on this data) can make checkpoints durable sooner and saves space; "
            "auto compresses when it does, on the cores training leaves free, and writes raw "
            "when it does not (`ckptd status` shows its choice)",
        }
    suggested["codec.level"] = {
        "value": 1,
        "reason": "zstd level 1: higher levels are 1.5-2x slower and, after byte grouping, "
        "no smaller",
    }
    available = int(psutil.virtual_memory().available)
    if available >= 3 * size:
        suggested["slots"] = {
            "value": 2,
            "reason": f"{available / 2**30:.1f} GiB available >= 3x the state "
            f"({3 * size / 2**30:.1f} GiB): one snapshot can be written while the next is copied",
        }
    else:
        suggested["slots"] = {
            "value": 1,
            "reason": f"only {available / 2**30:.1f} GiB available, less than 3x the state "
            f"({3 * size / 2**30:.1f} GiB): one slot of shared memory per client",
        }
    return suggested


def run_bench(
    size_bytes: int,
    root: Path,
    *,
    reps: int = SNAPSHOT_REPS,
    config: Path | None = None,
) -> dict[str, Any]:
    """Measure memory copy, codec, disk, ckptd save speed and a snapshot through a daemon
    (``reps`` times) for ``size_bytes`` under ``root``; return the measurements and the suggested
    config values (with reasons). The save uses the configuration file ``config`` (None: the
    defaults)."""
    if size_bytes <= 0:
        raise ValueError(f"size must be positive, got {size_bytes}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "size_bytes": size_bytes,
        "root": str(root.absolute()),
        "cpus": os.cpu_count(),
        "memory_available_bytes": int(psutil.virtual_memory().available),
        "torch_threads": torch.get_num_threads(),
    }
    results["memory_copy"] = measure_copy(size_bytes)
    results["codec"] = measure_codec(size_bytes)
    results["disk"] = measure_disk(size_bytes, root)
    results["ckptd_save"], results["snapshot"] = measure_trainer(size_bytes, root, reps, config)
    results["suggestions"] = suggest(results, size_bytes)
    return results


def render(results: dict[str, Any]) -> list[str]:
    """Human-readable lines for ``run_bench``'s results."""
    size = results["size_bytes"]
    copy, codec = results["memory_copy"], results["codec"]
    disk, save, snap = results["disk"], results["ckptd_save"], results["snapshot"]
    lines = [
        f"ckptd bench: {size / MiB:.0f} MiB, root {results['root']}, {results['cpus']} CPU(s), "
        f"{results['memory_available_bytes'] / 2**30:.1f} GiB memory available",
        f"  memory copy (reused buffer)   {copy['gb_per_s']:7.2f} GB/s",
        f"  codec compress ({codec['threads']} threads)   {codec['compress_gb_per_s']:7.2f} GB/s"
        f"  (stored/raw {codec['stored_over_raw']:.3f}, {codec['bytes'] / MiB:.0f} MiB of "
        "random-normal float32)",
        f"  codec decompress              {codec['decompress_gb_per_s']:7.2f} GB/s",
        f"  disk write + fsync            {disk['gb_per_s']:7.2f} GB/s"
        f"  ({disk['write_s']:.2f} s write, {disk['fsync_s']:.2f} s fsync)",
        f"  ckptd save (durable)          {save['gb_per_s']:7.2f} GB/s"
        f"  ({save['seconds']:.2f} s for {save['bytes'] / MiB:.0f} MiB)",
        f"  snapshot stall (daemon)       {snap['stall_s']:7.3f} s"
        f"     {snap['stall_vs_copy']:.2f}x one copy_ of the state ({snap['copy_s']:.3f} s)",
        f"  snapshot durable (daemon)     {snap['durable_s']:7.3f} s"
        f"     {snap['durable_vs_torch_save']:.2f}x torch.save+fsync ({snap['torch_save_s']:.3f} s)"
        f"; medians of {snap['reps']} reps",
        "suggested configuration:",
    ]
    for key, s in results["suggestions"].items():
        value = f'"{s["value"]}"' if isinstance(s["value"], str) else str(s["value"])
        where = "Client(slots=...)" if key == "slots" else key
        lines.append(f"  {where} = {value}: {s['reason']}")
    return lines


@click.command("bench")
@click.option(
    "--size",
    default="1GiB",
    show_default=True,
    metavar="SIZE",
    help="Bytes to copy, compress (at most 256MiB), write and save, e.g. 256MiB.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object for scripts.")
@click.option(
    "--config", "config", metavar="FILE", default=None, help="Config file (for store.root)."
)
@click.option(
    "--root",
    "root",
    metavar="DIR",
    default=None,
    help="Where to write the benchmark's scratch files and its daemon's checkpoints (default: "
    "CKPTD_ROOT, then store.root, then ./checkpoints; never a running daemon's root).",
)
def bench_cmd(size: str, as_json: bool, root: str | None, config: str | None) -> None:
    """Measure this machine (memory copy, codec, disk, ckptd save) and suggest config values.

    Writes SIZE bytes under the checkpoint root (then deletes them) and needs about 3x SIZE of
    memory.
    """
    size_bytes = parse_size(size, "--size")
    cfg = load_config(config)
    result = run_bench(size_bytes, resolve_root(root, cfg), config=cfg.source)
    if as_json:
        out.print_json(json.dumps(result))
    else:
        for line in render(result):
            out.print(Text(line))
