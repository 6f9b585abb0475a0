"""The write pipeline: one checkpoint from a flattened state to a committed manifest.

Call order: :func:`write_checkpoint` plans chunks (:func:`~ckptd.pipeline.plan.plan_chunks`: large
tensors split into ``chunk_bytes`` pieces, tensors of at most ``pack_bytes`` packed together by
dtype), then, on a bounded thread pool and with at most ``max_inflight_bytes`` of chunks being
worked on at once (an :class:`InflightBudget`, which the writes a daemon runs side by side
share), for each chunk: copy its bytes into the worker thread's private buffer, hash
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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
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
    encoded_bytes: int = 0
    """Raw bytes of the objects this write encoded and wrote (the new ones)."""
    encode_cpu_s: float = 0.0
    """CPU seconds the chunk threads spent encoding them (thread time: a per-core cost)."""
    disk_busy_s: float = 0.0
    """Wall seconds during which at least one of its object writes (write + fsync) ran: the
    union of their intervals, so ``written_bytes / disk_busy_s`` is what the disk took (while
    other writes ran beside it, a share of the disk)."""


INFLIGHT_FACTOR = 3
"""A chunk being worked on holds up to ~3x its size: its private copy, the byte-grouped planes
and the encoded output."""


class InflightBudget:
    """The chunks being worked on at once (their bytes and their number), shared by the writes
    that run side by side.

    A write takes a :class:`Share` (:meth:`share`) for its whole run; its submitting thread calls
    :meth:`Share.acquire` for each chunk before it hands the chunk to the pool, and the worker
    that wrote the chunk calls :meth:`Share.release`. Contract:

    * the bytes held by all shares never exceed ``capacity_bytes`` (a chunk counted larger than
      that is counted as ``capacity_bytes``, so it runs alone);
    * a share holds at most ``capacity_bytes // shares`` bytes (but always may hold one chunk)
      and ``chunks_per_share`` chunks (a write's threads), and all shares together at most
      ``shares * chunks_per_share`` chunks (the pools' threads): a granted chunk starts at once
      instead of queueing behind other writes' chunks, and a write that arrives while another
      uses all its threads starts at once on threads of its own;
    * of the waiting acquires whose share has room, the one of the share holding the fewest
      chunks is granted next (ties: the earliest): when the bytes run short, writes side by side
      take turns, none starved.

    Thread safety: every method may be called from any thread; :meth:`configure` applies to the
    next grant (what shares hold is not taken back).
    """

    def __init__(
        self, capacity_bytes: int, shares: int = 1, chunks_per_share: int | None = None
    ) -> None:
        self._cv = threading.Condition()
        self._capacity = self._per_share = 1
        self._chunks_per_share: int | None = None
        self._max_chunks: int | None = None
        self._in_use = self._chunks = 0
        self._waiting: list[tuple[Share, int]] = []
        self.configure(capacity_bytes, shares, chunks_per_share)

    def configure(
        self, capacity_bytes: int, shares: int, chunks_per_share: int | None = None
    ) -> None:
        """``chunks_per_share`` None: no bound on the number of chunks, only on their bytes."""
        shares = max(1, shares)
        with self._cv:
            self._capacity = max(1, capacity_bytes)
            self._per_share = max(1, self._capacity // shares)
            if chunks_per_share is None:
                self._chunks_per_share = self._max_chunks = None
            else:
                self._chunks_per_share = max(1, chunks_per_share)
                self._max_chunks = self._chunks_per_share * shares
            self._cv.notify_all()

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    @property
    def in_use_chunks(self) -> int:
        return self._chunks

    @contextmanager
    def share(self) -> Iterator[Share]:
        """One write's share; every chunk it acquired must be released before the block ends."""
        share = Share(self)
        try:
            yield share
        finally:
            if share.chunks:  # a chunk never ran (its pool was shut down): give it back
                with self._cv:
                    self._in_use -= share.held
                    self._chunks -= share.chunks
                    share.held = share.chunks = 0
                    self._cv.notify_all()

    def _grantable(self) -> tuple[Share, int] | None:
        """Under the lock: the waiter to grant now, if any (see the class docstring)."""
        if self._max_chunks is not None and self._chunks >= self._max_chunks:
            return None
        best: tuple[Share, int] | None = None
        for entry in self._waiting:  # in arrival order
            share, nbytes = entry
            if share.chunks and (
                share.held + nbytes > self._per_share
                or (self._chunks_per_share is not None and share.chunks >= self._chunks_per_share)
            ):
                continue
            if best is None or share.chunks < best[0].chunks:
                best = entry
        if best is None or self._in_use + best[1] > self._capacity:
            return None
        return best

    def _acquire(self, share: Share, nbytes: int) -> int:
        with self._cv:
            nbytes = min(nbytes, self._capacity)
            entry = (share, nbytes)
            self._waiting.append(entry)
            try:
                while self._grantable() is not entry:
                    self._cv.wait()
            finally:
                self._waiting.remove(entry)
                self._cv.notify_all()
            self._in_use += nbytes
            self._chunks += 1
            share.held += nbytes
            share.chunks += 1
            return nbytes

    def _release(self, share: Share, nbytes: int) -> None:
        with self._cv:
            self._in_use -= nbytes
            self._chunks -= 1
            share.held -= nbytes
            share.chunks -= 1
            self._cv.notify_all()


class Share:
    """One write's part of an :class:`InflightBudget` (see there)."""

    def __init__(self, budget: InflightBudget) -> None:
        self._budget = budget
        self.held = 0
        """Bytes this write's chunks hold now (guarded by the budget's lock)."""
        self.chunks = 0
        """This write's chunks being worked on now (guarded by the budget's lock)."""

    def acquire(self, nbytes: int) -> int:
        """Block until one more chunk of ``nbytes`` may be worked on; return the bytes counted
        (pass them to :meth:`release` once the chunk is done)."""
        return self._budget._acquire(self, nbytes)

    def release(self, nbytes: int) -> None:
        self._budget._release(self, nbytes)


@dataclass(frozen=True)
class _ChunkResult:
    digest: str
    info: ObjectInfo
    written_bytes: int
    leaves: tuple[LeafHash, ...] = ()
    encode_cpu_s: float = 0.0
    write_span: tuple[float, float] | None = None
    """``perf_counter()`` at the start and end of the object write (None: nothing written)."""


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
    budget: InflightBudget | None = None,
) -> WriteResult:
    """Write and commit one checkpoint; see the module docstring for the order and ownership.

    ``executor`` (default: a pool of ``config.threads`` made for this write) runs the chunks;
    ``budget`` (default: ``config.max_inflight_bytes`` and ``config.threads`` chunks for this
    write alone) bounds the chunks in flight, shared with the other writes given the same budget.

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
                results = _run_chunks(
                    store,
                    job,
                    tensors,
                    chunks,
                    config,
                    pool,
                    budget or InflightBudget(config.max_inflight_bytes, 1, config.threads),
                )
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
    made = [r for r in results if r.written_bytes]
    return WriteResult(
        manifest,
        path,
        time.perf_counter() - started,
        written,
        new_objects,
        len(manifest.objects) - new_objects,
        record,
        encoded_bytes=sum(r.info.raw_bytes for r in made),
        encode_cpu_s=sum(r.encode_cpu_s for r in made),
        disk_busy_s=busy_s([r.write_span for r in made if r.write_span is not None]),
    )


def busy_s(spans: Sequence[tuple[float, float]]) -> float:
    """The length of the union of the intervals ``spans``."""
    total = 0.0
    end = -math.inf
    for start, stop in sorted(spans):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


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
    budget: InflightBudget,
) -> list[_ChunkResult]:
    failed = threading.Event()
    futures: list[Future[_ChunkResult]] = []
    claims = _Claims()
    spanning = SpanningLeaves()
    sizes = [len(t.data) for t in tensors]

    with budget.share() as share:

        def work(chunk: Chunk, held: int) -> _ChunkResult:
            try:
                if failed.is_set():
                    raise _CancelledError
                return _write_chunk(
                    store, job, tensors, sizes, chunk, config.codec, claims, spanning
                )
            except BaseException:
                failed.set()
                raise
            finally:
                share.release(held)

        try:
            for chunk in chunks:
                held = share.acquire(INFLIGHT_FACTOR * chunk.nbytes)
                if failed.is_set():
                    share.release(held)
                    break
                try:
                    futures.append(pool.submit(work, chunk, held))
                except BaseException:
                    share.release(held)
                    raise
        except BaseException:
            failed.set()
            wait(futures)  # the chunks handed over still read the tensors and hold the share
            raise
        return _results(futures)


def _results(futures: Sequence[Future[_ChunkResult]]) -> list[_ChunkResult]:
    """Every chunk's result, in order; the first error once all have finished."""
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
    cpu = time.thread_time()
    encoded = encode(raw, elem_size=elem_size, is_float=component is not None, config=codec)
    encode_cpu_s = time.thread_time() - cpu
    began = time.perf_counter()
    stored, _new_shard = store.write_object(job, digest, encoded.parts)
    span = (began, time.perf_counter())
    info = ObjectInfo(len(raw), stored, encoded.codec_name)
    return _ChunkResult(digest, info, stored, encode_cpu_s=encode_cpu_s, write_span=span)
