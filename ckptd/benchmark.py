"""``ckptd bench``: measure this machine and suggest configuration values.

Four measurements, each a few seconds for the default 1 GiB:

* **memory copy**: ``copy_`` of ``size`` bytes into a reused, pre-touched buffer (the best case
  of a snapshot's copy into a shared-memory slot); the best of three passes;
* **codec**: :func:`ckptd.codec.encode` / :func:`~ckptd.codec.decode` of ``min(size, 256 MiB)``
  of random-normal float32 data (the default ``auto`` codec, level 1) in 8 MiB chunks on a
  2-thread pool; stored/raw is the compression ratio on *this* data (trained weights compress to
  about 0.83 in the project's codec benchmark; random normals are similar);
* **disk**: write ``size`` bytes in 8 MiB chunks to a file under ``root``, ``fsync`` it, delete it;
* **ckptd save**: :func:`ckptd_client.save` of a ``size`` state (float32 tensors of 8-32 MiB)
  into a temporary store under ``root`` (removed afterwards): the durable latency of an
  in-process save with the default configuration.

Then it suggests ``store.threads``, ``codec.codec``, ``codec.level`` and the client's ``slots``,
each with its reason. ``run_bench`` returns everything as a JSON-friendly dict; ``render`` turns it
into lines for people.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import torch

from ckptd.codec import CodecConfig, Encoded, decode, encode

MiB = 1 << 20
CHUNK = 8 * MiB
CODEC_MAX = 256 * MiB
CODEC_THREADS = 2


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


def measure_save(size: int, root: Path) -> dict[str, Any]:
    """``ckptd_client.save`` of a ``size`` state into a temporary store under ``root``."""
    from ckptd_client import save

    per = max(1, min(32 * MiB, size) // 4)
    state: dict[str, torch.Tensor] = {}
    left = max(size // 4, 1)
    gen = torch.Generator().manual_seed(1)
    while left > 0:
        n = min(per, left)
        state[f"t{len(state)}"] = torch.randn(n, generator=gen)
        left -= n
    raw = sum(t.nbytes for t in state.values())
    tmp = Path(tempfile.mkdtemp(prefix=".ckptd-bench-", dir=root))
    try:
        t0 = time.perf_counter()
        result = save("ckptd-bench", state=state, step=0, rng=False, root=tmp)
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


def run_bench(size_bytes: int, root: Path) -> dict[str, Any]:
    """Measure memory copy, codec, disk and ckptd save speed for ``size_bytes`` under ``root``;
    return the measurements and the suggested config values (with reasons)."""
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
    results["suggestions"] = suggest(results, size_bytes)
    return results


def render(results: dict[str, Any]) -> list[str]:
    """Human-readable lines for ``run_bench``'s results."""
    size = results["size_bytes"]
    copy, codec = results["memory_copy"], results["codec"]
    disk, save = results["disk"], results["ckptd_save"]
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
        "suggested configuration:",
    ]
    for key, s in results["suggestions"].items():
        value = f'"{s["value"]}"' if isinstance(s["value"], str) else str(s["value"])
        where = "Client(slots=...)" if key == "slots" else key
        lines.append(f"  {where} = {value}: {s['reason']}")
    return lines
