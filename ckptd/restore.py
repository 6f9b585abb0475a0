"""Reading checkpoints back: verified tensors, the rebuilt state, and ``verify``.

Restore needs only the files: no daemon, no pickle (unless a value was explicitly stored pickled).
Every object is decoded and its BLAKE3 hash compared with its name before its bytes reach a tensor;
a mismatch raises :class:`CorruptCheckpointError` naming the object file and the tensors it holds.
Objects are read and decoded in parallel on a small thread pool (file reads, zstd and blake3 release
the GIL), straight into the destination tensor's memory when an object holds one tensor's bytes.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ckptd.codec import decode
from ckptd.errors import CkptdError, CorruptCheckpointError, FormatVersionError, NotFoundError
from ckptd.hashing import content_hash
from ckptd.manifest import Manifest, ObjectInfo
from ckptd.skeleton import dtype_from_name, unflatten
from ckptd.store import Store

log = logging.getLogger("ckptd.restore")

MapLocation = str | torch.device | None
Progress = Callable[[int], None]
"""Called with a number of raw bytes just processed (from worker threads)."""


class FallbackWarning(UserWarning):
    """``fallback=True`` skipped the newest checkpoint(s) because they did not verify."""


@dataclass(frozen=True)
class Loaded:
    """A restored checkpoint: the state as it was handed over, and its manifest."""

    state: Any
    manifest: Manifest

    @property
    def step(self) -> int:
        return self.manifest.step


@dataclass(frozen=True)
class _Use:
    tensor: int
    dst_offset: int
    obj_offset: int
    length: int


def _check_object(
    store: Store, manifest: Manifest, digest: str, info: ObjectInfo, out: memoryview, names: str
) -> None:
    """Read object ``digest``, decode it into ``out`` and verify its hash."""
    path = store.object_path(manifest.job, digest)
    where = f"object {path} (holding {names})"
    try:
        data = store.read_object(manifest.job, digest, into=_scratch("file", 0))
        if len(data) != info.stored_bytes:
            kind = "truncated object" if len(data) < info.stored_bytes else "object too long"
            raise CorruptCheckpointError(
                f"{where}: {kind} ({len(data)} bytes on disk, the manifest says "
                f"{info.stored_bytes})"
            )
        decode(data, out, where=where)
    except CorruptCheckpointError as exc:
        if where in str(exc):
            raise
        raise CorruptCheckpointError(f"{where}: {exc}") from exc
    actual = content_hash(out)
    if actual != digest:
        raise CorruptCheckpointError(
            f"{where} is corrupt: its content hashes to {actual[:16]}..., not its name; "
            f"job {manifest.job!r} step {manifest.step} cannot be restored bit-exactly. Restore "
            "another step (or pass fallback=True), and run `ckptd verify` on the job"
        )


_local = threading.local()


def _scratch(name: str, size: int) -> bytearray:
    """A per-thread buffer reused across objects (grown to ``size``), so reading a checkpoint
    does not pay first-touch page faults for every object."""
    buf: bytearray | None = getattr(_local, name, None)
    if buf is None:
        buf = bytearray()
        setattr(_local, name, buf)
    if len(buf) < size:
        buf.extend(bytes(size - len(buf)))
    return buf


def _uses(manifest: Manifest) -> dict[str, list[_Use]]:
    uses: dict[str, list[_Use]] = defaultdict(list)
    for i, t in enumerate(manifest.tensors):
        dst = 0
        for p in t.pieces:
            uses[p.object].append(_Use(i, dst, p.offset, p.length))
            dst += p.length
    return uses


def _names(manifest: Manifest, uses: list[_Use]) -> str:
    paths = sorted({manifest.tensors[u.tensor].path for u in uses})
    shown = ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
    return f"tensor{'s' if len(paths) > 1 else ''} {shown}"


def read_tensors(
    store: Store, manifest: Manifest, *, threads: int = 2, progress: Progress | None = None
) -> list[torch.Tensor]:
    """Read, verify and return the checkpoint's tensors (CPU), in manifest order."""
    buffers = [torch.empty(t.nbytes, dtype=torch.uint8) for t in manifest.tensors]
    views = [b.numpy().data for b in buffers]

    def work(item: tuple[str, list[_Use]]) -> None:
        digest, uses = item
        info = manifest.objects[digest]
        names = _names(manifest, uses)
        first = uses[0]
        if len(uses) == 1 and first.obj_offset == 0 and first.length == info.raw_bytes:
            dest = views[first.tensor][first.dst_offset : first.dst_offset + first.length]
            _check_object(store, manifest, digest, info, dest, names)
        else:
            raw = memoryview(_scratch("raw", info.raw_bytes))[: info.raw_bytes]
            _check_object(store, manifest, digest, info, raw, names)
            for u in uses:
                views[u.tensor][u.dst_offset : u.dst_offset + u.length] = raw[
                    u.obj_offset : u.obj_offset + u.length
                ]
        if progress is not None:
            progress(info.raw_bytes)

    _parallel(work, list(_uses(manifest).items()), threads)
    out = []
    for t, buf in zip(manifest.tensors, buffers, strict=True):
        out.append(buf.view(dtype_from_name(t.dtype)).reshape(t.shape))
    return out


def _parallel(work: Callable[[Any], None], items: list[Any], threads: int) -> None:
    if threads <= 1 or len(items) <= 1:
        for item in items:
            work(item)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="ckptd-read") as pool:
        for fut in [pool.submit(work, item) for item in items]:
            fut.result()


def verify_manifest(
    store: Store, manifest: Manifest, *, threads: int = 2, progress: Progress | None = None
) -> list[str]:
    """Recompute every object hash of a checkpoint; return one message per failure (empty: OK)."""
    failures: list[str] = []
    lock = threading.Lock()

    def work(item: tuple[str, list[_Use]]) -> None:
        digest, uses = item
        info = manifest.objects[digest]
        try:
            raw = memoryview(_scratch("raw", info.raw_bytes))[: info.raw_bytes]
            _check_object(store, manifest, digest, info, raw, _names(manifest, uses))
        except CkptdError as exc:
            with lock:
                failures.append(str(exc))
        if progress is not None:
            progress(info.raw_bytes)

    _parallel(work, list(_uses(manifest).items()), threads)
    return sorted(failures)


def load_checkpoint(
    store: Store,
    job: str,
    step: int | str = "latest",
    *,
    map_location: MapLocation = None,
    allow_pickle: bool = False,
    fallback: bool = False,
    threads: int = 2,
    progress: Progress | None = None,
) -> Loaded:
    """Load a checkpoint's state, verified.

    With ``fallback=True`` and ``step="latest"``, a checkpoint that fails verification (corrupt
    object, damaged manifest) is skipped for the next older one; a :class:`FallbackWarning` (and a
    log line) names the steps skipped and the one used. Raises :class:`NotFoundError` when the job
    or step does not exist, :class:`CorruptCheckpointError` when verification fails (and, with
    fallback, when no checkpoint verifies).
    """
    if fallback and step == "latest":
        steps = store.require_steps(job)
        skipped: list[str] = []
        for candidate in reversed(steps):
            try:
                loaded = _load_one(
                    store, job, candidate, map_location, allow_pickle, threads, progress
                )
            except (CorruptCheckpointError, FormatVersionError) as exc:
                skipped.append(f"step {candidate}: {exc}")
                continue
            if skipped:
                msg = (
                    f"job {job!r}: restored step {candidate}, skipping newer checkpoint(s) that "
                    "do not verify: " + "; ".join(skipped)
                )
                log.warning(msg)
                warnings.warn(msg, FallbackWarning, stacklevel=2)
            return loaded
        raise CorruptCheckpointError(
            f"job {job!r}: none of its {len(steps)} checkpoint(s) verifies: " + "; ".join(skipped)
        )
    resolved = store.resolve_step(job, step)
    return _load_one(store, job, resolved, map_location, allow_pickle, threads, progress)


def _load_one(
    store: Store,
    job: str,
    step: int,
    map_location: MapLocation,
    allow_pickle: bool,
    threads: int,
    progress: Progress | None,
) -> Loaded:
    manifest = store.read_manifest(job, step)
    tensors = read_tensors(store, manifest, threads=threads, progress=progress)
    if map_location is not None:
        device = torch.device(map_location)
        tensors = [t.to(device) for t in tensors]
    state = unflatten(manifest.skeleton, tensors, allow_pickle=allow_pickle)
    return Loaded(state, manifest)


__all__ = [
    "FallbackWarning",
    "Loaded",
    "NotFoundError",
    "load_checkpoint",
    "read_tensors",
    "verify_manifest",
]
