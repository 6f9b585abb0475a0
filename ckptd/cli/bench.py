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
* **ckptd save**: :func:`ckptd_client.save` of a ``size`` state (float32 tensors of 8-32 MiB)
  into a temporary store under ``root`` (removed afterwards): the durable latency of an
  in-process save with the default configuration;
* **snapshot through a daemon**: what a training loop sees. A private daemon is started (``python
  -m ckptd start --user`` with an empty config, its socket and log in a new 0700 directory, its
  checkpoints in a temporary store under ``root``) and stopped afterwards (SIGTERM, then SIGKILL),
  also when the bench is interrupted. A ``ckptd_client.Client`` snapshots the same kind of state
  ``reps`` times: the **stall** is how long ``snapshot()`` takes to return (the loop is blocked),
  the **durable** latency runs from that call until ``wait()`` returns (the checkpoint is
  committed). Each rep also times one ``copy_`` of the state into reused, pre-touched buffers (the
  floor of any snapshot's copy) and ``torch.save`` + ``fsync`` of it (what a blocking checkpoint
  costs), in an order that rotates with the rep; medians are reported with the ratios
  ``stall_vs_copy`` and ``durable_vs_torch_save``.

This is the one place in the ``ckptd`` package that imports :mod:`ckptd_client` (lazily, inside
the two functions that measure the client's paths, so the daemon and the other commands never
load it): measuring what a trainer sees needs the trainer's library.

Then it suggests ``store.threads``, ``codec.codec``, ``codec.level`` and the client's ``slots``,
each with its reason. ``run_bench`` returns everything as a JSON-friendly dict; ``render`` turns it
into lines for people.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import torch

import ckptd
from ckptd.errors import DaemonUnavailableError
from ckptd.format.codec import CodecConfig, Encoded, decode, encode
from ckptd.protocol import can_connect

MiB = 1 << 20
CHUNK = 8 * MiB
CODEC_MAX = 256 * MiB
CODEC_THREADS = 2
SNAPSHOT_REPS = 3
BENCH_JOB = "ckptd-bench"
DAEMON_READY_S = 60.0
"""How long the bench's daemon may take to answer (it imports torch: seconds on a cold cache)."""
DAEMON_STOP_S = 30.0
"""How long a SIGTERMed daemon may take to drain and exit before it is SIGKILLed."""
DAEMON_IDLE_EXIT_S = 60.0
"""The daemon exits by itself after this long without a client: a bench that is SIGKILLed
(its ``finally`` never runs) leaves no daemon behind for longer."""
_ENV_DROPPED = ("CKPTD_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_")


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


def bench_state(size: int) -> dict[str, torch.Tensor]:
    """About ``size`` bytes of random-normal float32 tensors of at most 32 MiB each (a model's
    parameters and optimizer moments are tensors of that order)."""
    per = max(1, min(32 * MiB, size) // 4)
    state: dict[str, torch.Tensor] = {}
    left = max(size // 4, 1)
    gen = torch.Generator().manual_seed(1)
    while left > 0:
        n = min(per, left)
        state[f"t{len(state)}"] = torch.randn(n, generator=gen)
        left -= n
    return state


def measure_save(size: int, root: Path) -> dict[str, Any]:
    """``ckptd_client.save`` of a ``size`` state into a temporary store under ``root``."""
    from ckptd_client import save

    state = bench_state(size)
    raw = sum(t.nbytes for t in state.values())
    tmp = Path(tempfile.mkdtemp(prefix=".ckptd-bench-", dir=root))
    try:
        t0 = time.perf_counter()
        result = save(BENCH_JOB, state=state, step=0, rng=False, root=tmp)
        seconds = time.perf_counter() - t0
        stored = result.manifest.stored_bytes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "bytes": raw,
        "tensors": len(state),
        "seconds": seconds,
        "gb_per_s": _gbps(raw, seconds),
        "stored_bytes": stored,
    }


# ---- a snapshot through a real daemon ----------------------------------------------------------


def _private_dir() -> Path:
    """A new 0700 directory for the daemon's socket, log and empty config. In the temporary
    directory unless the socket path would not fit ``sun_path`` (108 bytes), then in /tmp."""
    parent = Path(tempfile.gettempdir())
    if len(os.fsencode(parent / "ckptd-bench-XXXXXXXX" / "d.sock")) > 100:
        parent = Path("/tmp")
    return Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=parent))


def _daemon_env() -> dict[str, str]:
    """This environment without what could redirect the daemon or make it talk to systemd
    (``CKPTD_*``, ``NOTIFY_SOCKET``, ``WATCHDOG_*``, ``LISTEN_*``); with the directory this
    ``ckptd`` was imported from first on ``PYTHONPATH`` when it is a source tree, so the daemon
    runs the same code as the bench."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DROPPED)}
    source = Path(ckptd.__file__).resolve().parent.parent
    if source.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    return env


class BenchDaemon:
    """A ``ckptd start --user`` of the bench's own, in ``work`` (a private directory: socket
    ``d.sock``, log ``daemon.log``, and ``config/empty.toml`` passed as ``--config`` so that no
    user or system config applies), writing to ``root``.

    It runs in a session of its own, so a Ctrl-C at the terminal reaches only the bench, whose
    ``finally`` then stops it with SIGTERM (drain and exit), SIGKILL if it lingers. The
    constructor returns once the socket accepts connections, or raises
    :class:`DaemonUnavailableError` with the end of the daemon's log (after stopping it)."""

    def __init__(self, work: Path, root: Path) -> None:
        self.socket = work / "d.sock"
        self.log = work / "daemon.log"
        config = work / "config" / "empty.toml"  # its own directory: the daemon watches it
        config.parent.mkdir(mode=0o700)
        config.touch()
        cmd = [sys.executable, "-m", "ckptd", "start", "--user", "--socket", str(self.socket)]
        cmd += ["--root", str(root), "--config", str(config)]
        cmd += ["--idle-exit", str(DAEMON_IDLE_EXIT_S)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=work,  # not wherever the bench runs: a ./ckptd there must not be imported
                env=_daemon_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + DAEMON_READY_S
        while not can_connect(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                what = (
                    f"exited with code {self.proc.returncode}"
                    if self.proc.poll() is not None
                    else f"did not answer within {DAEMON_READY_S:.0f} s"
                )
                tail = " | ".join(self.log.read_text(errors="replace").splitlines()[-5:])
                raise DaemonUnavailableError(
                    f"ckptd bench: the daemon it started on {self.socket} {what}; the end of "
                    f"its log: {tail or '(empty)'}. Run `ckptd start --user --socket "
                    f"{self.socket}` to see why it cannot start"
                )
            time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM (the daemon drains and exits), SIGKILL after ``DAEMON_STOP_S``; return its
        exit code. A second Ctrl-C while waiting kills it at once and is passed on."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(DAEMON_STOP_S)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
            self.proc.kill()
            self.proc.wait()
            if isinstance(exc, KeyboardInterrupt):
                raise
        return self.proc.returncode


def _perturb(state: dict[str, torch.Tensor], rep: int) -> None:
    """Change one value in every 4 KiB of the state, so that every object of the next checkpoint
    is new: ckptd's dedup must not make later reps free (a training step changes every weight)."""
    with torch.no_grad():
        for t in state.values():
            t.view(-1)[::1024].add_(1.0 + rep)


def measure_snapshot(size: int, root: Path, reps: int = SNAPSHOT_REPS) -> dict[str, Any]:
    """Stall and durable latency of ``Client.snapshot`` through a daemon started for it, beside
    one ``copy_`` and ``torch.save`` + ``fsync`` of the same state in the same reps."""
    from ckptd.format.store import Store
    from ckptd_client import Client

    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    state = bench_state(size)
    raw = sum(t.nbytes for t in state.values())
    copies = {k: torch.empty_like(t) for k, t in state.items()}
    for k, t in state.items():
        copies[k].copy_(t)  # first touch, untimed
    work = _private_dir()
    store_dir = Path(tempfile.mkdtemp(prefix=".ckptd-bench-", dir=root))
    stall: list[float] = []
    durable: list[float] = []
    copy_s: list[float] = []
    torch_save_s: list[float] = []
    daemon: BenchDaemon | None = None
    exit_code: int | None = None
    try:
        daemon = BenchDaemon(work, store_dir)
        with Client(
            BENCH_JOB, socket=daemon.socket, root=store_dir, spawn=False, slots=1
        ) as client:
            # Sizes and page-faults the slot, as a training loop does once after its first step.
            client.prepare(state=state, background=False)
            store = Store(store_dir)

            def snapshot(step: int) -> None:
                t0 = time.perf_counter()
                pending = client.snapshot(state=state, step=step)
                t1 = time.perf_counter()
                pending.wait()
                t2 = time.perf_counter()
                stall.append(t1 - t0)
                durable.append(t2 - t0)
                store.delete_checkpoint(BENCH_JOB, step)  # untimed: keep one rep on disk
                store.gc(BENCH_JOB)

            def copy() -> None:
                t0 = time.perf_counter()
                for k, t in state.items():
                    copies[k].copy_(t)
                copy_s.append(time.perf_counter() - t0)

            def torch_save() -> None:
                path = store_dir / "torch-save.pt"
                t0 = time.perf_counter()
                with path.open("wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
                torch_save_s.append(time.perf_counter() - t0)
                path.unlink()

            for rep in range(reps):
                _perturb(state, rep)
                methods: list[Callable[[], None]] = [copy, partial(snapshot, rep + 1), torch_save]
                for method in methods[rep % 3 :] + methods[: rep % 3]:
                    method()
    finally:
        try:
            if daemon is not None:
                exit_code = daemon.stop()
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(store_dir, ignore_errors=True)
    med = {
        name: statistics.median(v)
        for name, v in (
            ("stall", stall),
            ("durable", durable),
            ("copy", copy_s),
            ("torch_save", torch_save_s),
        )
    }
    return {
        "bytes": raw,
        "tensors": len(state),
        "reps": reps,
        "stall_s": med["stall"],
        "durable_s": med["durable"],
        "copy_s": med["copy"],
        "torch_save_s": med["torch_save"],
        "stall_vs_copy": med["stall"] / max(med["copy"], 1e-9),
        "durable_vs_torch_save": med["durable"] / max(med["torch_save"], 1e-9),
        "samples": {
            "stall_s": stall,
            "durable_s": durable,
            "copy_s": copy_s,
            "torch_save_s": torch_save_s,
        },
        "daemon": {
            "pid": daemon.pid if daemon is not None else None,
            "socket": str(work / "d.sock"),
            "exit_code": exit_code,
        },
    }


def suggest(results: dict[str, Any], size: int) -> dict[str, dict[str, Any]]:
    """Config values with their reasons, from the measurements in ``results``."""
    cores = os.cpu_count() or 1
    disk = results["disk"]["gb_per_s"]
    comp = results["codec"]["compress_gb_per_s"] / results["codec"]["threads"] * min(cores, 8)
    ratio = results["codec"]["stored_over_raw"]
    out: dict[str, dict[str, Any]] = {
        "store.threads": {
            "value": min(2 * cores, 16),
            "reason": f"{cores} CPU core(s): two pipeline threads per core, so that one "
            "hashes and compresses (they release the GIL) while the other waits for its write "
            "and fsync",
        }
    }
    if disk > 2 * comp:
        out["codec.codec"] = {
            "value": "raw",
            "reason": f"disk write+fsync ({disk:.2f} GB/s) is more than twice the compression "
            f"speed with {min(cores, 8)} thread(s) ({comp:.2f} GB/s): compressing would make "
            f"checkpoints durable later; it would save {1 - ratio:.0%} of the disk space",
        }
    else:
        out["codec.codec"] = {
            "value": "auto",
            "reason": f"disk write+fsync ({disk:.2f} GB/s) is at most twice the compression "
            f"speed with {min(cores, 8)} thread(s) ({comp:.2f} GB/s): compression (stored/raw "
            f"{ratio:.2f} on this data) costs little or no durability time and saves space",
        }
    out["codec.level"] = {
        "value": 1,
        "reason": "zstd level 1: higher levels are 1.5-2x slower and, after byte grouping, "
        "no smaller",
    }
    available = int(psutil.virtual_memory().available)
    if available >= 3 * size:
        out["slots"] = {
            "value": 2,
            "reason": f"{available / 2**30:.1f} GiB available >= 3x the state "
            f"({3 * size / 2**30:.1f} GiB): one snapshot can be written while the next is copied",
        }
    else:
        out["slots"] = {
            "value": 1,
            "reason": f"only {available / 2**30:.1f} GiB available, less than 3x the state "
            f"({3 * size / 2**30:.1f} GiB): one slot of shared memory per client",
        }
    return out


def run_bench(size_bytes: int, root: Path, *, reps: int = SNAPSHOT_REPS) -> dict[str, Any]:
    """Measure memory copy, codec, disk, ckptd save speed and a snapshot through a daemon
    (``reps`` times) for ``size_bytes`` under ``root``; return the measurements and the suggested
    config values (with reasons)."""
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
    results["ckptd_save"] = measure_save(size_bytes, root)
    results["snapshot"] = measure_snapshot(size_bytes, root, reps)
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
