"""The write pipeline: one checkpoint from a flattened state to a committed manifest.

Call order: :func:`write_checkpoint` plans chunks (:func:`~ckptd.pipeline.plan.plan_chunks`: large
tensors split into ``chunk_bytes`` pieces, tensors of at most ``pack_bytes`` packed together by
dtype), then, on a bounded thread pool and with at most ``max_inflight_bytes`` of chunks being
worked on at once, for each chunk: copy its bytes into the worker thread's private buffer, hash
that copy (blake3) and the checkpoint digest's leaves in it (:mod:`ckptd.pipeline.digest`), reuse
the job's object of that name if its content verifies (dedup, :meth:`Store.reusable_object`), else
encode the same copy and write it durably. Chunks of one write with the same content are produced
once (:class:`_Claims`). When every chunk has been read it calls ``on_read_done`` (the daemon
releases the shared-memory slot there), fsyncs the directories of every object the manifest names
that the store does not know durable (:meth:`Store.make_durable`) and commits the manifest,
numbered with the job's next commit sequence number (:meth:`Store.commit_lock`).

Ownership: the caller owns the tensor buffers and must not mutate them until ``on_read_done`` has
been called (or the function has returned or raised); a mutation that happens anyway (another
process writing shared memory) can tear a checkpoint across chunks, but every object still holds
exactly the bytes its name was hashed from, because a chunk's hash, leaf hashes, encoding and
write all read one private copy. Each worker thread owns its copy buffer (grown as needed, reused
chunk after chunk because fresh memory costs page faults) and overwrites it with its next chunk,
so a chunk is encoded and written before its thread takes the next one. If this function raises,
no manifest was written; objects already written stay as unreferenced garbage for
:meth:`Store.gc`, and tmp files are removed.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from ckptd.format.codec import CodecConfig, encode
from ckptd.format.hashing import content_hash
from ckptd.format.manifest import Manifest, ObjectInfo, Piece, TensorEntry, check_step, now_iso
from ckptd.format.parts import check_part
from ckptd.format.skeleton import JSON, dtype_from_name
from ckptd.format.store import Store, validate_job_name
from ckptd.pipeline.digest import LeafHash, SpanningLeaves, digest_of_leaves, leaf_hashes
from ckptd.pipeline.plan import Chunk, PipelineConfig, TensorSource, copy_bytes, plan_chunks

_FLOAT_COMPONENT_BYTES = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 2,
    "complex64": 4,
    "complex128": 8,
}


@dataclass(frozen=True)
class WriteResult:
    """A committed checkpoint, or a durable rank part. ``written_bytes`` counts only objects
    this write created. For a rank part, ``path`` is the part's file and ``record`` the step's
    global record when this write completed the step (or found it committed), else None."""

    manifest: Manifest
    path: Path
    seconds: float
    written_bytes: int
    new_objects: int
    reused_objects: int
    record: Manifest | None = None


@dataclass(frozen=True)
class _ChunkResult:
    digest: str
    info: ObjectInfo
    written_bytes: int
    leaves: tuple[LeafHash, ...] = ()


def write_checkpoint(
    store: Store,
    job: str,
    step: int,
    skeleton: JSON,
    tensors: Sequence[TensorSource],
    *,
    metric: float | None = None,
    config: PipelineConfig | None = None,
    executor: Executor | None = None,
    on_read_done: Callable[[], None] | None = None,
    created: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    attempt: str | None = None,
) -> WriteResult:
    """Write and commit one checkpoint; see the module docstring for the order and ownership.

    With ``world_size`` > 1 this writes rank ``rank``'s part of the step for restart attempt
    ``attempt`` instead of a manifest, and commits the step when that completes it
    (:mod:`ckptd.format.parts`); a part that does not fit the job (a rank out of range, another
    world size, a rank handing the step off twice) raises :class:`RankLayoutError`.

    Raises :class:`~ckptd.errors.DiskFullError`, :class:`~ckptd.errors.StorePermissionError` or
    :class:`~ckptd.errors.StoreIOError` when the store cannot be written; nothing is committed then.
    """
    config = config or PipelineConfig()
    started = time.perf_counter()
    with ExitStack() as stack:
        try:
            validate_job_name(job)
            check_step(step)
            sizes = [len(t.data) for t in tensors]  # now: on_read_done may release the views
            for t, size in zip(tensors, sizes, strict=True):
                expected = dtype_from_name(t.dtype).itemsize * math.prod(t.shape)
                if size != expected:
                    raise ValueError(f"{t.path}: {size} bytes given for {t.dtype}{list(t.shape)}")
            store.open_job(job)
            if world_size > 1:
                check_part(
                    Manifest(
                        job,
                        step,
                        "",
                        (),
                        {},
                        None,
                        rank=rank,
                        world_size=world_size,
                        attempt=attempt,
                    )
                )
            store.check_job_kind(job, world_size)
            # Shared with other writers, exclusive with GC: objects we dedup against stay put
            # until our manifest names them.
            stack.enter_context(store.job_lock(job, exclusive=False))
            chunks = plan_chunks(tensors, config)
            own_pool = executor is None
            pool = executor or ThreadPoolExecutor(
                max(1, config.threads), thread_name_prefix="ckptd-write"
            )
            try:
                results = _run_chunks(store, job, tensors, chunks, config, pool)
            finally:
                if own_pool:
                    pool.shutdown(wait=True, cancel_futures=True)
        finally:
            if on_read_done is not None:
                on_read_done()
        manifest, written, new_objects = _commit(
            store,
            job,
            step,
            skeleton,
            tensors,
            sizes,
            chunks,
            results,
            metric=metric,
            created=created,
            rank=rank,
            world_size=world_size,
            attempt=attempt,
        )
        if world_size > 1:
            # Still under the shared job lock: until the part names them, GC must not take
            # the objects this write made or reused.
            path = store.write_part(manifest)
    record = None
    if world_size > 1:
        assert attempt is not None
        record = store.commit_step(job, step, attempt, pending_timeout_s=config.pending_timeout_s)
    else:
        path = store.manifest_path(job, step)
    return WriteResult(
        manifest,
        path,
        time.perf_counter() - started,
        written,
        new_objects,
        len(manifest.objects) - new_objects,
        record,
    )


def _commit(
    store: Store,
    job: str,
    step: int,
    skeleton: JSON,
    tensors: Sequence[TensorSource],
    sizes: Sequence[int],
    chunks: Sequence[Chunk],
    results: Sequence[_ChunkResult],
    *,
    metric: float | None,
    created: str | None,
    rank: int,
    world_size: int,
    attempt: str | None,
) -> tuple[Manifest, int, int]:
    """Make every object it names durable, then write the manifest: the checkpoint is visible.
    A rank part (``world_size`` > 1) is returned unwritten: the caller writes it."""
    by_tensor: dict[int, list[Piece]] = defaultdict(list)
    objects: dict[str, ObjectInfo] = {}
    written = new_objects = 0
    for chunk, res in zip(chunks, results, strict=True):
        objects[res.digest] = res.info
        offset = 0
        for index, _src, length in chunk.pieces:
            by_tensor[index].append(Piece(res.digest, offset, length))
            offset += length
        if res.written_bytes:
            written += res.written_bytes
            new_objects += 1
    store.make_durable(job, objects)
    entries = tuple(
        TensorEntry(t.path, t.dtype, t.shape, sizes[i], tuple(by_tensor.get(i, ())))
        for i, t in enumerate(tensors)
    )
    leaves = (leaf for res in results for leaf in res.leaves)
    digest = digest_of_leaves(entries, leaves, skeleton)
    manifest = Manifest(
        job=job,
        step=step,
        created=created or now_iso(),
        tensors=entries,
        objects=objects,
        skeleton=skeleton,
        metric=None if metric is None else float(metric),
        rank=rank,
        world_size=world_size,
        written_bytes=written,
        digest=digest,
        attempt=attempt,
    )
    if world_size > 1:
        return manifest, written, new_objects
    with store.commit_lock(job) as seq:
        manifest = replace(manifest, seq=seq)
        store.commit_manifest(manifest)
    return manifest, written, new_objects


def _run_chunks(
    store: Store,
    job: str,
    tensors: Sequence[TensorSource],
    chunks: Sequence[Chunk],
    config: PipelineConfig,
    pool: Executor,
) -> list[_ChunkResult]:
    # Each chunk in flight holds up to ~3x its size (private copy, planes, encoded output).
    budget = threading.BoundedSemaphore(
        max(1, config.max_inflight_bytes // (3 * config.chunk_bytes))
    )
    failed = threading.Event()
    futures: list[Future[_ChunkResult]] = []
    claims = _Claims()
    spanning = SpanningLeaves()
    sizes = [len(t.data) for t in tensors]

    def work(chunk: Chunk) -> _ChunkResult:
        try:
            if failed.is_set():
                raise _CancelledError
            return _write_chunk(store, job, tensors, sizes, chunk, config.codec, claims, spanning)
        except BaseException:
            failed.set()
            raise
        finally:
            budget.release()

    for chunk in chunks:
        budget.acquire()
        if failed.is_set():
            budget.release()
            break
        futures.append(pool.submit(work, chunk))
    results: list[_ChunkResult] = []
    first_error: BaseException | None = None
    for fut in futures:
        try:
            results.append(fut.result())
        except _CancelledError:
            continue
        except BaseException as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return results


class _CancelledError(Exception):
    """A chunk skipped because another chunk of the same checkpoint failed first."""


class _Claims:
    """Chunks of one write with the same content: the first to hash one writes it, the others
    wait for it and reuse its object (counted once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[str, threading.Event] = {}
        self._infos: dict[str, ObjectInfo] = {}

    def claim(self, digest: str) -> ObjectInfo | None:
        """None when the caller must produce ``digest``; else the object another chunk made."""
        with self._lock:
            done = self._owners.get(digest)
            if done is None:
                self._owners[digest] = threading.Event()
                return None
        done.wait()
        info = self._infos.get(digest)
        if info is None:
            raise _CancelledError  # its producer failed; the whole write fails with its error
        return info

    def settle(self, digest: str, info: ObjectInfo | None) -> None:
        with self._lock:
            if info is not None:
                self._infos[digest] = info
            self._owners[digest].set()


_local = threading.local()


def _private_copy(tensors: Sequence[TensorSource], chunk: Chunk) -> memoryview:
    """The chunk's bytes, copied into the calling thread's buffer.

    The buffer belongs to the calling thread and is overwritten by its next call: whatever reads
    the returned view (hash, encode, write) must be done before then.
    """
    buf: bytearray | None = getattr(_local, "copy", None)
    if buf is None or len(buf) < chunk.nbytes:
        # Replaced, not extended: a view of the old buffer kept alive (a traceback) would make
        # resizing it fail.
        buf = _local.copy = bytearray(chunk.nbytes)
    view = memoryview(buf)
    pos = 0
    for index, off, length in chunk.pieces:
        copy_bytes(view, pos, tensors[index].data[off : off + length])
        pos += length
    return view[: chunk.nbytes]


def _write_chunk(
    store: Store,
    job: str,
    tensors: Sequence[TensorSource],
    sizes: Sequence[int],
    chunk: Chunk,
    codec: CodecConfig,
    claims: _Claims,
    spanning: SpanningLeaves,
) -> _ChunkResult:
    raw = _private_copy(tensors, chunk)
    digest = content_hash(raw)
    leaves = leaf_hashes(sizes, chunk, raw, digest, spanning)
    known = claims.claim(digest)
    if known is not None:
        return _ChunkResult(digest, known, 0, leaves)
    try:
        result = _produce(store, job, raw, digest, chunk.dtype, codec)
    except BaseException:
        claims.settle(digest, None)
        raise
    claims.settle(digest, result.info)
    return replace(result, leaves=leaves)


def _produce(
    store: Store, job: str, raw: memoryview, digest: str, dtype: str, codec: CodecConfig
) -> _ChunkResult:
    """Reuse the job's object ``digest`` if its content verifies, else encode ``raw`` and write it
    (replacing a damaged file of that name). ``raw`` is the thread's private copy, hashed to
    ``digest``; the encoded parts may be views of it and are written before this returns."""
    info = store.reusable_object(job, digest, len(raw))
    if info is not None:
        return _ChunkResult(digest, info, 0)
    component = _FLOAT_COMPONENT_BYTES.get(dtype)
    elem_size = component or dtype_from_name(dtype).itemsize
    encoded = encode(raw, elem_size=elem_size, is_float=component is not None, config=codec)
    stored, _new_shard = store.write_object(job, digest, encoded.parts)
    return _ChunkResult(digest, ObjectInfo(len(raw), stored, encoded.codec_name), stored)
