"""Reading checkpoints back: verified tensors, the rebuilt state, and ``verify``.

Restore needs only the files: no daemon, no pickle (unless a value was explicitly stored pickled).
Every object is decoded and its BLAKE3 hash compared with its name before its bytes reach a tensor;
a mismatch raises :class:`CorruptCheckpointError` naming the object file and the tensors it holds.
Objects are read and decoded in parallel on a small thread pool (file reads, zstd and blake3 release
the GIL), straight into the destination tensor's memory when an object holds one tensor's bytes.

``map_location`` takes every form :func:`torch.load` takes (a string, a :class:`torch.device`, a
dict remapping location tags, a callable ``(storage, location) -> storage | None``) with one
difference that follows from the format: every stored tensor's *location tag* is ``"cpu"``. The
client copies each tensor to CPU memory before it is written and the device it came from is not
recorded, so a dict key other than ``"cpu"`` (``{"cuda:1": "cuda:0"}``) never matches and a
callable always receives ``"cpu"``. Without ``map_location`` tensors come back on the CPU (where
``torch.load`` would put them back on the saving device).
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

from ckptd.errors import (
    CkptdError,
    ConfigError,
    CorruptCheckpointError,
    FormatVersionError,
    NotFoundError,
    RankLayoutError,
)
from ckptd.format.codec import decode
from ckptd.format.hashing import content_hash
from ckptd.format.manifest import Manifest, ObjectInfo
from ckptd.format.skeleton import dtype_from_name, ndarray_indices, unflatten
from ckptd.format.store import Store

log = logging.getLogger("ckptd.format.restore")

MapLocation = (
    str
    | torch.device
    | dict[str, str]
    | Callable[[torch.UntypedStorage, str], torch.UntypedStorage | None]
    | None
)
"""What :func:`torch.load` accepts as ``map_location`` (see the module docstring)."""
STORED_LOCATION = "cpu"
"""The location tag of every stored tensor: the device a tensor was snapshotted from is not
recorded (its bytes are always copied to CPU memory first)."""
Relocate = Callable[[torch.Tensor], torch.Tensor]
"""Moves one restored (CPU) tensor where ``map_location`` says."""
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
    rank: int | None = None,
) -> Loaded:
    """Load a checkpoint's state, verified; of a multi-rank step, rank ``rank``'s part.

    A multi-rank step with ``rank=None`` raises :class:`RankLayoutError` asking for ``rank=``.

    ``map_location`` is checked before anything is read: a device this machine does not have
    raises :class:`ConfigError` at once rather than after reading gigabytes.

    With ``fallback=True`` and ``step="latest"``, a checkpoint that fails verification (corrupt
    object, damaged manifest) is skipped for the next older one; a :class:`FallbackWarning` (and a
    log line) names the steps skipped and the one used. Raises :class:`NotFoundError` when the job
    or step does not exist, :class:`CorruptCheckpointError` when verification fails (and, with
    fallback, when no checkpoint verifies).
    """
    relocate = relocator(map_location)
    if fallback and step == "latest":
        steps = store.require_steps(job)
        skipped: list[str] = []
        for candidate in reversed(store.steps_by_commit(job)):  # newest commit first
            try:
                loaded = _load_one(
                    store, job, candidate, relocate, allow_pickle, threads, progress, rank
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
    return _load_one(store, job, resolved, relocate, allow_pickle, threads, progress, rank)


def _load_one(
    store: Store,
    job: str,
    step: int,
    relocate: Relocate | None,
    allow_pickle: bool,
    threads: int,
    progress: Progress | None,
    rank: int | None,
) -> Loaded:
    manifest = store.read_manifest(job, step)
    if manifest.is_global:
        if rank is None:
            raise RankLayoutError(
                f"job {job!r} step {step} was written by {manifest.world_size} ranks and no rank "
                f"was given: pass rank= (0..{manifest.world_size - 1}) to load one rank's part, "
                "or load it at any world size with ckptd_client.dcp.CkptdStorageReader"
            )
        manifest = store.read_part(job, step, rank, manifest)
    elif rank not in (None, 0):
        raise RankLayoutError(
            f"job {job!r} step {step} was written by one process; there is no rank {rank} "
            "(load it with rank=0 or without rank=)"
        )
    tensors = read_tensors(store, manifest, threads=threads, progress=progress)
    if relocate is not None:
        # numpy arrays are stored as tensors but are not torch storages: torch.load leaves them
        # alone, and moving them would fail on "meta" (their bytes are needed) or copy them to a
        # GPU and back.
        arrays = ndarray_indices(manifest.skeleton)
        tensors = [t if i in arrays else relocate(t) for i, t in enumerate(tensors)]
    state = unflatten(manifest.skeleton, tensors, allow_pickle=allow_pickle)
    return Loaded(state, manifest)


# ---- map_location ------------------------------------------------------------------------------


def relocator(map_location: MapLocation) -> Relocate | None:
    """How each restored tensor is moved for ``map_location``, decided (and the device checked)
    before anything is read; None means the tensors stay where they are read, on the CPU.

    Follows ``torch.load``: a string or device names the target of every tensor; a dict maps a
    tensor's location tag (always ``"cpu"`` here) to a target, tags it lacks stay where they are;
    a callable gets ``(storage, "cpu")`` per tensor and returns a storage, or None for the default.
    """
    if map_location is None:
        return None
    if isinstance(map_location, dict):
        return _to_device(map_location.get(STORED_LOCATION, STORED_LOCATION), map_location)
    if isinstance(map_location, str | torch.device):
        return _to_device(map_location, map_location)
    if callable(map_location):
        return _through_callable(map_location)
    raise ConfigError(
        f"map_location must be what torch.load accepts (a device string such as 'cpu', a "
        f"torch.device, a dict such as {{'cpu': 'cuda:0'}}, or a callable (storage, location) -> "
        f"storage), got a {type(map_location).__qualname__}: {map_location!r}"
    )


def check_device(location: str, asked: object) -> torch.device:
    """The device ``location`` names, if this machine has it; else :class:`ConfigError` saying
    which device is missing and what to pass instead (torch itself would fail later, with an
    ``AssertionError`` from a CPU-only build or a ``RuntimeError`` from a missing device index)."""
    shown = "" if asked == location else f" ({asked!r})"
    try:
        device = torch.device(location)
    except RuntimeError as exc:
        raise ConfigError(
            f"map_location{shown} asks for {location!r}, which is not a device torch knows "
            f"({exc}); pass map_location='cpu' or a device such as 'cuda:0'"
        ) from exc
    if device.type in ("cpu", "meta"):
        return device
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available):
        raise ConfigError(
            f"map_location{shown} asks for {location} but this torch ({torch.__version__}) has "
            f"no torch.{device.type} backend to check it with; pass map_location='cpu' and move "
            "the tensors yourself"
        )
    if not is_available():
        raise ConfigError(
            f"map_location{shown} asks for {location} but torch.{device.type}.is_available() is "
            "False on this machine; pass map_location='cpu'"
        )
    device_count = getattr(backend, "device_count", None)
    if device.index is not None and callable(device_count):
        count = int(device_count())
        if device.index >= count:
            raise ConfigError(
                f"map_location{shown} asks for {location} but this machine has {count} "
                f"{device.type} device(s) (torch.{device.type}.device_count()); pass "
                f"map_location='{device.type}:0', a dict such as {{'cpu': '{device.type}:0'}}, "
                "or 'cpu'"
            )
    return device


def _to_device(target: object, asked: object) -> Relocate | None:
    if isinstance(target, torch.device):
        target = str(target)
    if not isinstance(target, str):
        raise ConfigError(
            f"map_location {asked!r} maps {STORED_LOCATION!r} to {target!r}; a dict must map "
            "location strings to location strings such as 'cpu' or 'cuda:0'"
        )
    device = check_device(target, asked)
    if device.type == "cpu":
        return None  # read_tensors already made CPU tensors: no copy

    def relocate(t: torch.Tensor) -> torch.Tensor:
        return t.to(device)

    return relocate


def _through_callable(
    fn: Callable[[torch.UntypedStorage, str], torch.UntypedStorage | None],
) -> Relocate:
    def relocate(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        result: object = fn(storage, STORED_LOCATION)
        if result is None or result is storage:
            return t  # torch.load: None means "the default", which is the CPU here
        if isinstance(result, torch.TypedStorage):
            result = result._untyped_storage
        if not isinstance(result, torch.UntypedStorage):
            raise ConfigError(
                f"the map_location callable returned a {type(result).__qualname__}; it must "
                "return a storage (e.g. storage.cuda(0)) or None to keep the tensor on the CPU"
            )
        if result.nbytes() != storage.nbytes():
            raise ConfigError(
                f"the map_location callable returned a storage of {result.nbytes()} bytes for "
                f"one of {storage.nbytes()}; it must return the storage it was given, moved"
            )
        out = torch.empty(0, dtype=t.dtype, device=result.device)
        return out.set_(result, 0, t.shape, t.stride())

    return relocate


__all__ = [
    "STORED_LOCATION",
    "FallbackWarning",
    "Loaded",
    "MapLocation",
    "NotFoundError",
    "check_device",
    "load_checkpoint",
    "read_tensors",
    "relocator",
    "verify_manifest",
]
