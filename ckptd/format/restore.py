"""Reading checkpoints back: verified tensors, the rebuilt state, and ``verify``.

Restore needs only the files: no daemon, no pickle (unless a value was explicitly stored pickled).
Every object is decoded and its BLAKE3 hash compared with its name before a tensor holding its
bytes is handed out; a mismatch raises :class:`CorruptCheckpointError` naming the object file and
the tensors it holds. Objects are read and decoded in parallel, one thread per CPU (file reads,
zstd, numpy and blake3 release the GIL), straight into the memory of the tensors that use them: a
chunk into its slice of a large tensor, a pack of small tensors into each of them, a raw object by
reading its file into that memory. Each tensor is one ``torch.empty`` allocation. While objects are
decoded, the kernel is asked to read the next ones' files (``posix_fadvise(WILLNEED)``), so a
restore from disk keeps the disk busy. With ``map_location`` naming a CUDA device, verified objects
go to the device from pinned staging buffers on a side stream while the next are read
(:class:`_CudaTarget`, written without a GPU to test it on).

``map_location`` takes every form :func:`torch.load` takes (a string, a :class:`torch.device`, a
dict remapping location tags, a callable ``(storage, location) -> storage | None``) with one
difference that follows from the format: every stored tensor's *location tag* is ``"cpu"``. The
client copies each tensor to CPU memory before it is written and the device it came from is not
recorded, so a dict key other than ``"cpu"`` (``{"cuda:1": "cuda:0"}``) never matches and a
callable always receives ``"cpu"``. Without ``map_location`` tensors come back on the CPU (where
``torch.load`` would put them back on the saving device).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import torch

from ckptd.errors import (
    CkptdError,
    ConfigError,
    CorruptCheckpointError,
    FormatVersionError,
    NotFoundError,
    RankLayoutError,
)
from ckptd.format.codec import copy_bytes, decode_into
from ckptd.format.manifest import Manifest, ObjectInfo
from ckptd.format.objects import advise_willneed, decode_object_file
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


# ---- reading objects ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Use:
    """Bytes ``[obj_offset, obj_offset + length)`` of an object, which go to bytes
    ``[dst_offset, dst_offset + length)`` of tensor ``tensor``."""

    tensor: int
    dst_offset: int
    obj_offset: int
    length: int


@dataclass(frozen=True)
class _ObjectTask:
    """One object to read, and where its bytes go.

    ``tiling``: when the uses cover the object's raw bytes exactly once (a chunk of one tensor,
    or a pack of whole tensors, as every writer makes them), those uses in object order: the
    object is decoded straight into them. Otherwise None: it is decoded into a scratch buffer
    and every use copied out. ``duplicates``: further uses of bytes a tiling use already holds
    (identical chunks deduped to one object), each with that tiling use, copied once verified.
    """

    digest: str
    info: ObjectInfo
    uses: tuple[_Use, ...]
    tiling: tuple[_Use, ...] | None
    duplicates: tuple[tuple[_Use, _Use], ...]


def _tasks(manifest: Manifest) -> list[_ObjectTask]:
    """The objects the tensors use, in the order of their first use (the order they were
    written in, which keeps reads sequential on disk)."""
    uses: dict[str, list[_Use]] = defaultdict(list)
    for i, t in enumerate(manifest.tensors):
        dst = 0
        for p in t.pieces:
            uses[p.object].append(_Use(i, dst, p.offset, p.length))
            dst += p.length
    tasks = []
    for digest, object_uses in uses.items():
        info = manifest.objects[digest]
        tiling, duplicates = _tiling(object_uses, info.raw_bytes)
        tasks.append(_ObjectTask(digest, info, tuple(object_uses), tiling, duplicates))
    return tasks


def _tiling(
    uses: list[_Use], raw_bytes: int
) -> tuple[tuple[_Use, ...] | None, tuple[tuple[_Use, _Use], ...]]:
    first: dict[tuple[int, int], _Use] = {}
    duplicates = []
    for u in uses:
        same = first.setdefault((u.obj_offset, u.length), u)
        if same is not u:
            duplicates.append((u, same))
    tiling = sorted(first.values(), key=lambda u: u.obj_offset)
    pos = 0
    for u in tiling:
        if u.obj_offset != pos:
            return None, ()
        pos += u.length
    if pos != raw_bytes:
        return None, ()
    return tuple(tiling), tuple(duplicates)


_local = threading.local()


_SCRATCH_STEP_BYTES = 1 << 20


def _scratch(name: str, size: int) -> bytearray:
    """A per-thread buffer of at least ``size`` bytes reused across objects, so reading a
    checkpoint does not pay first-touch page faults for every object. Grown by replacement (a
    view of the old buffer may still be alive), to whole MiB so objects of similar sizes do not
    grow it one after the other."""
    buf: bytearray | None = getattr(_local, name, None)
    if buf is None or len(buf) < size:
        buf = bytearray(-(-size // _SCRATCH_STEP_BYTES) * _SCRATCH_STEP_BYTES)
        setattr(_local, name, buf)
    return buf


def _file_scratch(size: int) -> bytearray:
    return _scratch("file", size)


READAHEAD_BYTES = 64 << 20
"""How far ahead of the objects being decoded the kernel is asked to read (stored bytes)."""


class _ReadAhead:
    """Keeps the disk busy while the workers decode: a worker starting object ``i`` asks the
    kernel (``posix_fadvise(WILLNEED)``: the reads are queued, not waited for) for the files of
    the objects that start within :data:`READAHEAD_BYTES` after it. Called from any worker."""

    def __init__(self, paths: list[Path], stored_bytes: list[int]) -> None:
        self._paths = paths
        self._starts = list(itertools.accumulate(stored_bytes, initial=0))[:-1]
        self._lock = threading.Lock()
        self._next = 0

    def reached(self, index: int) -> None:
        limit = self._starts[index] + READAHEAD_BYTES
        with self._lock:
            first = end = self._next
            while end < len(self._paths) and (end <= index + 1 or self._starts[end] < limit):
                end += 1
            self._next = end
        for i in range(first, end):
            advise_willneed(self._paths[i])


class _ObjectReader:
    """Reads, decodes and verifies the objects of one manifest; :meth:`read` may be called from
    many threads at once (file reads, zstd and blake3 release the GIL).

    Objects of a local store are read from their files directly (a raw object straight into its
    destination) with read-ahead; a store that overrides ``read_object`` (the tier's, which
    fetches the object first) is read through it.
    """

    def __init__(self, store: Store, manifest: Manifest, tasks: list[_ObjectTask]) -> None:
        self._store = store
        self._manifest = manifest
        self._direct = type(store).read_object is Store.read_object
        self._ahead = (
            _ReadAhead(
                [store.object_path(manifest.job, t.digest) for t in tasks],
                [t.info.stored_bytes for t in tasks],
            )
            if self._direct
            else None
        )

    def read(self, index: int, task: _ObjectTask, dests: Sequence[memoryview]) -> None:
        """Decode object ``task`` (the ``index``-th) into ``dests`` (its raw bytes in order) and
        verify its hash. Raises :class:`CorruptCheckpointError` naming the object file and the
        tensors it holds; ``dests`` then hold garbage."""
        if self._ahead is not None:
            self._ahead.reached(index)
        manifest, digest, info = self._manifest, task.digest, task.info
        path = self._store.object_path(manifest.job, digest)
        where = f"object {path} (holding {_names(manifest, task.uses)})"
        try:
            if self._direct:
                decode_object_file(
                    path,
                    dests,
                    stored_bytes=info.stored_bytes,
                    where=where,
                    scratch=_file_scratch,
                )
            else:
                data = self._store.read_object(
                    manifest.job, digest, into=_file_scratch(info.stored_bytes)
                )
                if len(data) != info.stored_bytes:
                    kind = (
                        "truncated object" if len(data) < info.stored_bytes else "object too long"
                    )
                    raise CorruptCheckpointError(
                        f"{where}: {kind} ({len(data)} bytes on disk, the manifest says "
                        f"{info.stored_bytes})"
                    )
                decode_into(data, dests, where=where)
        except CorruptCheckpointError as exc:
            if where in str(exc):
                raise
            raise CorruptCheckpointError(f"{where}: {exc}") from exc
        hasher = blake3.blake3()
        for d in dests:
            hasher.update(d)
        actual = hasher.hexdigest()
        if actual != digest:
            raise CorruptCheckpointError(
                f"{where} is corrupt: its content hashes to {actual[:16]}..., not its name; "
                f"job {manifest.job!r} step {manifest.step} cannot be restored bit-exactly. "
                "Restore another step (or pass fallback=True), and run `ckptd verify` on the job"
            )


def _names(manifest: Manifest, uses: Sequence[_Use]) -> str:
    paths = sorted({manifest.tensors[u.tensor].path for u in uses})
    shown = ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
    return f"tensor{'s' if len(paths) > 1 else ''} {shown}"


def default_threads() -> int:
    """Threads that read a checkpoint by default: the CPUs this process may run on, at most 8
    (reads, zstd and blake3 release the GIL; past 8 the disk or memory bandwidth is the limit)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


# ---- destination memory ------------------------------------------------------------------------


def _empty_bytes(nbytes: int) -> torch.Tensor:
    """Memory for one restored tensor's bytes (not zeroed: every byte is written and verified
    before the tensor is handed out)."""
    return torch.empty(nbytes, dtype=torch.uint8)


def _byte_view(buf: torch.Tensor) -> memoryview:
    return buf.numpy().data


def _as_stored(manifest: Manifest, buffers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [
        buf.view(dtype_from_name(t.dtype)).reshape(t.shape)
        for t, buf in zip(manifest.tensors, buffers, strict=True)
    ]


# ---- read_tensors ------------------------------------------------------------------------------


def read_tensors(
    store: Store,
    manifest: Manifest,
    *,
    threads: int | None = None,
    progress: Progress | None = None,
) -> list[torch.Tensor]:
    """Read, verify and return the checkpoint's tensors (CPU), in manifest order.

    Each tensor is one fresh allocation that objects are decoded straight into, in parallel on
    ``threads`` threads (default :func:`default_threads`); a tensor is returned only once every
    object it uses hashed to its name. ``progress`` gets each object's raw bytes as it is done.
    """
    buffers = [_empty_bytes(t.nbytes) for t in manifest.tensors]
    views = [_byte_view(b) for b in buffers]
    tasks = _tasks(manifest)
    reader = _ObjectReader(store, manifest, tasks)

    def dest(u: _Use) -> memoryview:
        return views[u.tensor][u.dst_offset : u.dst_offset + u.length]

    def work(index: int) -> None:
        task = tasks[index]
        if task.tiling is not None:
            reader.read(index, task, [dest(u) for u in task.tiling])
            for use, same in task.duplicates:
                copy_bytes(dest(use), dest(same))
        else:
            raw = memoryview(_scratch("raw", task.info.raw_bytes))[: task.info.raw_bytes]
            reader.read(index, task, [raw])
            for u in task.uses:
                copy_bytes(dest(u), raw[u.obj_offset : u.obj_offset + u.length])
        if progress is not None:
            progress(task.info.raw_bytes)

    _parallel(work, len(tasks), threads)
    return _as_stored(manifest, buffers)


def _parallel(work: Callable[[int], None], count: int, threads: int | None) -> None:
    """``work(i)`` for i in range(count) on ``threads`` threads; the error of the first item
    (in order) that failed is raised, once the items before it are done, and items not
    started by then are not started."""
    threads = default_threads() if threads is None else threads
    if threads <= 1 or count <= 1:
        for i in range(count):
            work(i)
        return
    with ThreadPoolExecutor(min(threads, count), thread_name_prefix="ckptd-read") as pool:
        futures = [pool.submit(work, i) for i in range(count)]
        try:
            for fut in futures:
                fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def verify_manifest(
    store: Store,
    manifest: Manifest,
    *,
    threads: int | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Recompute every object hash of a checkpoint; return one message per failure (empty: OK)."""
    failures: list[str] = []
    lock = threading.Lock()
    tasks = _tasks(manifest)
    reader = _ObjectReader(store, manifest, tasks)

    def work(index: int) -> None:
        task = tasks[index]
        try:
            raw = memoryview(_scratch("raw", task.info.raw_bytes))[: task.info.raw_bytes]
            reader.read(index, task, [raw])
        except CkptdError as exc:
            with lock:
                failures.append(str(exc))
        if progress is not None:
            progress(task.info.raw_bytes)

    _parallel(work, len(tasks), threads)
    return sorted(failures)


# ---- straight to a CUDA device -------------------------------------------------------------------


class _CudaTarget:
    """Restores tensors straight onto one CUDA device: each worker decodes an object into a
    pinned staging buffer, verifies it, and queues its copies to the device tensors on a side
    stream, so the transfers overlap the reading and decoding of the next objects; no CPU copy
    of the whole state is made. Tensors listed in ``on_cpu`` (numpy arrays) stay on the CPU.

    NOT TESTED ON A GPU: no CUDA device was available where this was written, so this path is
    written to be correct by construction and kept small. Ordering: the device tensors are
    allocated on the caller's current stream, and the side stream waits for that stream before
    its first copy (the caching allocator may hand out memory still in use there); a staging
    buffer is reused only once the event recorded after its copies has completed; and the side
    stream is synchronized before the tensors are returned (:meth:`wait`, also when reading
    failed), so every copy is complete then, as with ``torch.load``. Pinned buffers freed while
    a non-blocking copy from them is in flight stay reserved by torch's host allocator until it
    completes.

    Thread safety: :meth:`restore` is called from the reading threads, each holding one staging
    buffer at a time (``2 * threads`` of them circulate); the rest from the calling thread.
    """

    def __init__(
        self, device: torch.device, manifest: Manifest, on_cpu: set[int], threads: int
    ) -> None:
        with torch.cuda.device(device):  # "cuda" without an index: the current device
            self.device = device = torch.device("cuda", torch.cuda.current_device())
        self.manifest = manifest
        self.cpu = {i: _empty_bytes(manifest.tensors[i].nbytes) for i in on_cpu}
        self.cpu_views = {i: _byte_view(b) for i, b in self.cpu.items()}
        with torch.cuda.device(device):
            self.gpu = {
                i: torch.empty(t.nbytes, dtype=torch.uint8, device=device)
                for i, t in enumerate(manifest.tensors)
                if i not in on_cpu
            }
            self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            self.stream.wait_stream(torch.cuda.current_stream(device))
        self._staging: queue.SimpleQueue[tuple[torch.Tensor | None, torch.cuda.Event | None]]
        self._staging = queue.SimpleQueue()
        for _ in range(2 * threads):
            self._staging.put((None, None))

    def restore(self, reader: _ObjectReader, index: int, task: _ObjectTask) -> None:
        raw_bytes = task.info.raw_bytes
        stage, done = self._staging.get()
        try:
            if done is not None:
                done.synchronize()
            if stage is None or stage.numel() < raw_bytes:
                stage = torch.empty(max(raw_bytes, 1), dtype=torch.uint8, pin_memory=True)
            staged = _byte_view(stage)
            reader.read(index, task, [staged[:raw_bytes]])
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                try:
                    for u in task.uses:
                        if u.tensor in self.gpu:
                            dst = self.gpu[u.tensor][u.dst_offset : u.dst_offset + u.length]
                            src = stage[u.obj_offset : u.obj_offset + u.length]
                            dst.copy_(src, non_blocking=True)
                        else:
                            copy_bytes(
                                self.cpu_views[u.tensor][u.dst_offset : u.dst_offset + u.length],
                                staged[u.obj_offset : u.obj_offset + u.length],
                            )
                finally:
                    done = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    done.record(self.stream)
        finally:
            self._staging.put((stage, done))

    def tensors(self) -> list[torch.Tensor]:
        """The restored tensors, in manifest order; call once :meth:`wait` returned."""
        buffers = {**self.cpu, **self.gpu}
        return _as_stored(self.manifest, [buffers[i] for i in range(len(buffers))])

    def wait(self) -> None:
        """Wait for every copy queued (also after a failure: the device tensors are then freed,
        and the caching allocator must not hand their memory out while copies still write it)."""
        self.stream.synchronize()


def _read_to_cuda(
    store: Store,
    manifest: Manifest,
    device: torch.device,
    on_cpu: set[int],
    threads: int | None,
    progress: Progress | None,
) -> list[torch.Tensor]:
    threads = default_threads() if threads is None else threads
    target = _CudaTarget(device, manifest, on_cpu, threads)
    tasks = _tasks(manifest)
    reader = _ObjectReader(store, manifest, tasks)

    def work(index: int) -> None:
        target.restore(reader, index, tasks[index])
        if progress is not None:
            progress(tasks[index].info.raw_bytes)

    try:
        _parallel(work, len(tasks), threads)
    finally:
        target.wait()
    return target.tensors()


def load_checkpoint(
    store: Store,
    job: str,
    step: int | str = "latest",
    *,
    map_location: MapLocation = None,
    allow_pickle: bool = False,
    fallback: bool = False,
    threads: int | None = None,
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

    Objects are read on ``threads`` threads (default :func:`default_threads`). With
    ``map_location`` naming a CUDA device, verified objects are copied to it from pinned staging
    buffers while the next ones are read (:class:`_CudaTarget`; untested on a GPU).
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
    threads: int | None,
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
    # numpy arrays are stored as tensors but are not torch storages: torch.load leaves them
    # alone, and moving them would fail on "meta" (their bytes are needed) or copy them to a GPU
    # and back.
    arrays = ndarray_indices(manifest.skeleton) if relocate is not None else set()
    if isinstance(relocate, _MoveTo) and relocate.device.type == "cuda" and _cuda_available():
        tensors = _read_to_cuda(store, manifest, relocate.device, arrays, threads, progress)
    else:
        tensors = read_tensors(store, manifest, threads=threads, progress=progress)
        if relocate is not None:
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
    return _MoveTo(device)


@dataclass(frozen=True)
class _MoveTo:
    """Moves a tensor to ``device``; the restore reads straight onto a CUDA ``device``."""

    device: torch.device

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)


def _cuda_available() -> bool:
    return bool(torch.cuda.is_available())


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
    "default_threads",
    "load_checkpoint",
    "read_tensors",
    "relocator",
    "verify_manifest",
]
