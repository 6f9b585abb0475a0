"""The write queue and its writers: accepted snapshots go to disk several jobs at once, each job's
in order.

A snapshot the admission accepted is :meth:`WriteQueue.enqueue`\\ d. The queue's task
(:meth:`WriteQueue.run`, on the loop) starts up to ``store.concurrent_jobs`` writes at once,
each on a commit thread of its own, which runs :func:`~ckptd.pipeline.write.write_checkpoint`
over the slot in place. Which request starts next:

* one write at a time per *lane*, ``(root, job, rank)``, in hand-off order: a job's snapshots
  commit in the order they were handed off, with increasing commit sequence numbers (the
  store's ``latest`` and retention rely on it), and a job's retention runs before its next
  write starts (the retentions of one job's ranks take turns);
* among the jobs with a request whose lane is free, the one served longest ago (round robin;
  ties in hand-off order): a job that hands off often cannot hold another back.

The writes share the chunk threads (hashing, zstd and file I/O release the GIL) through one
:class:`~ckptd.pipeline.write.InflightBudget`: at most ``store.max_inflight_bytes`` of chunks in
flight in all (each write at most ``1 / concurrent_jobs`` of it), each write on at most
``store.threads`` threads of its own. A 16 MiB write that arrives while a 1 GiB one uses all its
threads so starts at once, instead of queueing behind the big write's chunks. While writes run
side by side, the chunks of all but the smallest run on the bulk pool, a few nice steps lower
(:class:`ChunkExecutor`): the small write gets most of the CPU, the big one the rest.

For each request the client hears, in this order:

* ``released``: the pipeline has read the slot (or never will): the client may reuse it;
* ``committed`` (the manifest is durable, and the job's retention applied: it never fails the
  commit) or ``failed`` (with the error's type and message).

:meth:`drain` answers once a job has nothing accepted and uncommitted.

Threads: the queue, the drain waiters and :attr:`WriteQueue.ratios` belong to the loop thread.
A commit thread (``commit_pool``) runs :meth:`WriteQueue._write` for one request at a time and
hands results back through the loop; the chunk and bulk pools' threads run at a lower priority
(``daemon.worker_nice``, and :data:`BULK_NICE_STEPS` more). The
:class:`~ckptd.daemon.coordinator.Coordinator` belongs to the one coordinator thread
(``coordinate_pool``).

A request of a multi-rank job writes that rank's part; the write commits the step when the part
completes it, and otherwise hands the step to the coordinator, which watches it and commits it
once the other ranks' parts are durable (:meth:`WriteQueue.recheck`, from the daemon's ticker).
The client hears ``committed`` once its part is durable, with ``step_committed`` true when that
write also committed the step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from ckptd.daemon.coordinator import Coordinator
from ckptd.daemon.metrics import Metrics
from ckptd.daemon.requests import Submitter, WriteRequest
from ckptd.daemon.stats import Stats
from ckptd.daemon.uploads import Uploads
from ckptd.errors import CkptdError, DiskFullError
from ckptd.format.jobmeta import Upload
from ckptd.format.store import Store
from ckptd.pipeline.auto import AutoCodec
from ckptd.pipeline.plan import PipelineConfig, TensorSource
from ckptd.pipeline.write import InflightBudget, WriteResult, write_checkpoint
from ckptd.policy.diskguard import PolicyFor
from ckptd.policy.prune import prune

log = logging.getLogger("ckptd.daemon.writer")

P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class DrainWaiter:
    """A ``drain`` request waiting until its job has nothing accepted and uncommitted."""

    conn: Submitter
    rid: int | None
    root: Path
    job: str
    timer: asyncio.TimerHandle | None = None


BULK_NICE_STEPS = 5
"""How much lower (in nice steps, capped at 19) the chunks of a write run while a smaller write
runs beside it: CFS then gives the smaller write's threads about 3x the CPU share."""
MAX_CONCURRENT_JOBS = 64
"""The most writes a queue runs at once (``store.concurrent_jobs`` is at most this)."""

Lane = tuple[Path, str, int]
"""``(root, job, rank)``: requests of one lane are written one at a time, in hand-off order."""
JobKey = tuple[Path, str]
MAX_SERVED_JOBS = 4096
"""Jobs whose last turn the queue remembers (those served longer ago count as never served)."""


def pick_next(
    waiting: Sequence[Lane], busy: Collection[Lane], served: Mapping[JobKey, int]
) -> int | None:
    """Which of the ``waiting`` requests (their lanes, in hand-off order) starts next, given the
    lanes ``busy`` being written and the turn each job was last ``served`` at: of the jobs with a
    request whose lane is free, the one served longest ago (never served first; ties: the
    earlier hand-off), and that job's earliest such request. None: nothing may start."""
    first: dict[JobKey, int] = {}
    for index, lane in enumerate(waiting):
        job = lane[:2]
        if lane not in busy and job not in first:
            first[job] = index
    if not first:
        return None
    return min(first.values(), key=lambda i: served.get(waiting[i][:2], -1))


def lane_of(request: WriteRequest) -> Lane:
    return (request.store.root, request.job, request.rank)


def job_of(request: WriteRequest) -> JobKey:
    return (request.store.root, request.job)


class WriteQueue:
    """The accepted snapshots and the writes in progress (see the module docstring).

    ``pipeline`` may be replaced on reload (it applies from the next write, the concurrency and
    the memory budget included); ``policy_for`` is called on a commit thread after each commit;
    ``on_change`` is called on the loop whenever the queue changed (the daemon's status line).
    Call :meth:`run` once, on the loop; it returns after :meth:`close` once every accepted
    snapshot is written. Then :meth:`shutdown`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        pipeline: PipelineConfig,
        worker_nice: int,
        policy_for: PolicyFor,
        stats: Stats,
        metrics: Metrics,
        on_change: Callable[[], None],
        uploads: Uploads | None = None,
    ) -> None:
        self.loop = loop
        self.uploads = uploads
        self.threads = max(1, pipeline.threads)
        """Threads one write may use (``store.threads`` at startup: a change needs a restart)."""
        self.concurrent_at_start = max(1, pipeline.concurrent_jobs)
        """What the pools are sized for: a ``concurrent_jobs`` raised by a reload runs its
        writes on these threads too."""
        self.budget = InflightBudget(
            pipeline.max_inflight_bytes, self._shares(pipeline), self.threads
        )
        self._pipeline = pipeline
        self.policy_for = policy_for
        self.stats = stats
        self.metrics = metrics
        self.on_change = on_change
        self.waiting: deque[WriteRequest] = deque()
        """Accepted, not started; in hand-off order."""
        self.writes: list[WriteRequest] = []
        """Being written, in the order they started."""
        self.closed = False
        self.ratios: dict[tuple[Path, str], float] = {}
        """(root, job) -> stored/raw bytes of the job's last commit (what the admission
        estimates the next one with)."""
        self.drain_waiters: list[DrainWaiter] = []
        self._wakeup = asyncio.Event()
        self._turns = itertools.count()
        self._served: dict[JobKey, int] = {}
        """The turn each job last started a write at (round robin), in turn order."""
        self._housekeeping: dict[JobKey, tuple[threading.Lock, int]] = {}
        """Per job with writes in progress: the lock its retention and part collection take
        (ranks of one job write side by side), and how many writes use it."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.chunk_pool = ThreadPoolExecutor(
            self.threads * self.concurrent_at_start,
            thread_name_prefix="ckptd-chunk",
            initializer=lower_priority,
            initargs=(worker_nice,),
        )
        self.bulk_pool = ThreadPoolExecutor(
            self.threads * max(1, self.concurrent_at_start - 1),
            thread_name_prefix="ckptd-bulk",
            initializer=lower_priority,
            initargs=(worker_nice + BULK_NICE_STEPS,),
        )
        self.smallest_raw_bytes = 0
        """The smallest write in progress (raw bytes): set by the loop, read by commit
        threads (:class:`ChunkExecutor`)."""
        # Threads are made as writes need them: as many as writes ran at once.
        self.commit_pool = ThreadPoolExecutor(
            MAX_CONCURRENT_JOBS, thread_name_prefix="ckptd-commit"
        )
        self.coordinate_pool = ThreadPoolExecutor(1, thread_name_prefix="ckptd-coordinate")
        self.coordinator = Coordinator(pipeline.pending_timeout_s)
        self._rechecking = False
        self.auto = AutoCodec()
        """Chooses each write's codec when ``codec.codec = "auto"`` and measures every write
        (thread-safe: commit threads choose and observe, the loop reads its status)."""

    @property
    def pipeline(self) -> PipelineConfig:
        return self._pipeline

    @pipeline.setter
    def pipeline(self, pipeline: PipelineConfig) -> None:
        """Loop thread (a reload): from the next write on."""
        self._pipeline = pipeline
        self.budget.configure(pipeline.max_inflight_bytes, self._shares(pipeline), self.threads)
        self._wakeup.set()  # more writes may start now

    def _shares(self, pipeline: PipelineConfig) -> int:
        """Writes the budget is split between: ``concurrent_jobs``, but no more than the pools
        have threads for (a reload that raises it adds no thread)."""
        return max(1, min(pipeline.concurrent_jobs, self.concurrent_at_start))

    def pending(self) -> list[WriteRequest]:
        """Accepted and not yet committed or failed: those being written, then the queue."""
        return [*self.writes, *self.waiting]

    def writes_status(self) -> list[dict[str, Any]]:
        """The writes in progress for ``ckptd status``, oldest first."""
        now = self.loop.time()
        return [
            {
                "job": r.job,
                "step": r.step,
                "rank": r.rank,
                "raw_bytes": r.raw_bytes,
                "writing_s": round(now - (r.started_at or now), 3),
            }
            for r in self.writes
        ]

    def enqueue(self, request: WriteRequest) -> None:
        self.waiting.append(request)
        self.metrics.queue_depth(len(self.waiting))
        self._wakeup.set()
        self.on_change()

    def close(self) -> None:
        """Accept nothing more; :meth:`run` returns once the queue is written."""
        self.closed = True
        self._wakeup.set()

    def shutdown(self) -> None:
        """After :meth:`run` returned: wait for the pipeline's threads to finish."""
        self.chunk_pool.shutdown(wait=True)
        self.bulk_pool.shutdown(wait=True)
        self.commit_pool.shutdown(wait=True)
        self.coordinate_pool.shutdown(wait=True)

    # ---- scheduling (loop thread) ------------------------------------------------------------

    async def run(self) -> None:
        while True:
            self._start_writes()
            if self.closed and not self.waiting and not self.writes:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    def _start_writes(self) -> None:
        started = False
        while len(self.writes) < min(self._pipeline.concurrent_jobs, MAX_CONCURRENT_JOBS):
            request = self.next_request()
            if request is None:
                break
            self.waiting.remove(request)
            self._start(request)
            started = True
        if started:
            self.metrics.queue_depth(len(self.waiting))
            self.metrics.writes_in_progress(len(self.writes))
            self.on_change()

    def next_request(self) -> WriteRequest | None:
        """The request to start next (:func:`pick_next`)."""
        index = pick_next(
            [lane_of(r) for r in self.waiting], {lane_of(r) for r in self.writes}, self._served
        )
        return None if index is None else self.waiting[index]

    def _start(self, request: WriteRequest) -> None:
        key = job_of(request)
        self._served.pop(key, None)  # re-inserted last: the dict stays in turn order
        self._served[key] = next(self._turns)
        if len(self._served) > MAX_SERVED_JOBS:
            # The job served longest ago: as if never served, which keeps its place (first).
            del self._served[next(iter(self._served))]
        lock, users = self._housekeeping.get(key, (threading.Lock(), 0))
        self._housekeeping[key] = (lock, users + 1)
        request.started_at = self.loop.time()
        self.writes.append(request)
        self.smallest_raw_bytes = min(r.raw_bytes for r in self.writes)
        task = self.loop.create_task(self._write_one(request, self._pipeline, lock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_one(
        self, request: WriteRequest, pipeline: PipelineConfig, lock: threading.Lock
    ) -> None:
        try:
            result = await self.loop.run_in_executor(
                self.commit_pool, self._write, request, pipeline, lock
            )
        except CkptdError as exc:
            self._failed(request, exc)
        except Exception as exc:
            log.exception("%s step %d: unexpected error", request.job, request.step)
            self._failed(request, exc)
        else:
            self._committed(request, result)
        finally:
            self._finish(request)

    def _finish(self, request: WriteRequest) -> None:
        self.writes.remove(request)
        self.smallest_raw_bytes = min((r.raw_bytes for r in self.writes), default=0)
        key = job_of(request)
        lock, users = self._housekeeping[key]
        if users > 1:
            self._housekeeping[key] = (lock, users - 1)
        else:
            del self._housekeeping[key]
        if not request.done:  # pipeline never reached on_read_done (refused early)
            self._release(request)
        self.metrics.writes_in_progress(len(self.writes))
        self._check_drains()
        self.on_change()
        self._wakeup.set()

    # ---- one write (a commit thread) ---------------------------------------------------------

    def _write(
        self, request: WriteRequest, pipeline: PipelineConfig, housekeeping: threading.Lock
    ) -> WriteResult:
        """Commit thread: run the pipeline over the slot, in place; then the job's retention
        (and, for a rank part, the collection of part sets) under ``housekeeping``."""
        base = memoryview(request.slot.mm)
        views = [base[t.offset : t.offset + t.nbytes] for t in request.layout.tensors]
        sources = [
            TensorSource(t.path, t.dtype, t.shape, v)
            for t, v in zip(request.layout.tensors, views, strict=True)
        ]
        released = False

        def on_read_done() -> None:
            nonlocal released
            if released:
                return
            released = True
            for v in views:
                v.release()
            base.release()
            self.loop.call_soon_threadsafe(self._release, request)

        added_pin = False
        upload: Upload | None = None
        marked_before = begun = False
        try:
            if request.pin and request.step not in request.store.pinned_steps(request.job):
                # Before the manifest: retention must never see it unpinned.
                request.store.pin(request.job, request.step)
                added_pin = True
            if request.tier and self.uploads is not None:
                # Before the manifest too: the upload queue must survive a crash after it.
                upload = self.uploads.upload_for(
                    request.job,
                    request.step,
                    rank=request.rank,
                    world_size=request.world_size,
                    attempt=request.attempt,
                )
                if upload is not None:
                    # First: from here the upload thread leaves the mark as it is.
                    self.uploads.begin(request.store, request.job, upload)
                    begun = True
                    marked_before = upload in request.store.marked_uploads(request.job)
                    request.store.mark_upload(request.job, upload)
            choice = self.auto.choose(request.store.root, request.job, request.raw_bytes, pipeline)
            result = write_checkpoint(
                request.store,
                request.job,
                request.step,
                request.layout.skeleton,
                sources,
                metric=request.metric,
                config=replace(pipeline, codec=choice.codec),
                executor=ChunkExecutor(self, request.raw_bytes),
                on_read_done=on_read_done,
                rank=request.rank,
                world_size=request.world_size,
                attempt=request.attempt,
                budget=self.budget,
            )
        except BaseException as exc:
            # Tracebacks hold the pipeline's frames, whose locals view the slot: drop them so
            # the slot can be unmapped.
            _clear_frames(exc)
            if added_pin:
                request.store.unpin(request.job, request.step)
            if upload is not None and not marked_before:
                request.store.unmark_upload(request.job, upload)
            if begun and upload is not None and self.uploads is not None:
                self.uploads.abandon(request.store, request.job, upload)
            if isinstance(exc, DiskFullError):
                # The write ran out of space: give back what its objects took.
                with request.store.job_lock(request.job, exclusive=True, blocking=False) as ok:
                    if ok:
                        request.store.gc_unlocked(request.job)
            raise
        finally:
            on_read_done()
        self.auto.observe(choice, result)
        if upload is not None and self.uploads is not None:
            self.uploads.add(request.store, request.job, upload)
        with housekeeping:
            if request.attempt is not None:
                if result.record is None:
                    self.coordinate_pool.submit(
                        self.coordinator.watch,
                        request.store,
                        request.job,
                        request.step,
                        request.attempt,
                    )
                self._collect(request.store, request.job, pipeline)
            self._retain(request.store, request.job)
        return result

    def _collect(self, store: Store, job: str, pipeline: PipelineConfig) -> None:
        """Commit thread: collect the job's part sets that can never commit (never fails)."""
        try:
            store.collect_parts(job, pending_timeout_s=pipeline.pending_timeout_s)
        except Exception as exc:
            log.warning("%s: uncommitted parts not collected: %s", job, exc)

    async def recheck(self) -> None:
        """Try the watched multi-rank steps again, on the coordinator thread (loop thread; the
        daemon's ticker calls this)."""
        if self._rechecking or not self.coordinator:
            return
        self._rechecking = True
        self.coordinator.pending_timeout_s = self.pipeline.pending_timeout_s
        try:
            records = await self.loop.run_in_executor(
                self.coordinate_pool, self.coordinator.recheck
            )
        except Exception:
            log.exception("checking uncommitted multi-rank steps failed")
            return
        finally:
            self._rechecking = False
        for record in records:
            log.debug("%s step %d is committed (seq %d)", record.job, record.step, record.seq)

    async def recover(self, store: Store) -> None:
        """Watch the uncommitted multi-rank steps under ``store`` (at startup)."""
        await self.loop.run_in_executor(self.coordinate_pool, self.coordinator.recover, store)
        await self.recheck()

    def _retain(self, store: Store, job: str) -> None:
        """Commit thread, after a commit: apply the job's retention (never fails the commit)."""
        try:
            res = prune(store, job, self.policy_for(store, job), gc_blocking=False)
        except Exception as exc:  # the checkpoint is committed whatever happens here
            reason = str(exc) if isinstance(exc, CkptdError) else f"unexpected error {exc!r}"
            log.warning("%s: retention not applied: %s", job, reason)
            self.loop.call_soon_threadsafe(self.stats.record_error, f"{job}: retention: {reason}")
            return
        if res.deleted:
            freed = res.gc.bytes if res.gc else 0
            log.info("%s: retention deleted steps %s (%d bytes freed)", job, res.deleted, freed)

    # ---- outcomes (loop thread) --------------------------------------------------------------

    def _release(self, request: WriteRequest) -> None:
        if request.done:
            return
        request.done = True
        request.conn.release(request)

    def _committed(self, request: WriteRequest, result: WriteResult) -> None:
        """``request``'s checkpoint is durable: count it and tell its client ``committed``.

        The seam of issue 13: with one rank per job the durable write is the committed
        checkpoint. A multi-rank job's rank part would be handed from here to the coordinator,
        which reports the step committed once every rank's part is durable."""
        persist_s = self.loop.time() - request.accepted_at
        now = time.time()
        self.stats.record_commit(
            request.store.root,
            request.job,
            request.step,
            raw_bytes=request.raw_bytes,
            written_bytes=result.written_bytes,
            persist_s=persist_s,
            at=now,
        )
        self.metrics.committed(request.job, request.raw_bytes, result.written_bytes, persist_s, now)
        m = result.manifest
        if m.raw_bytes:
            self.ratios[(request.store.root, request.job)] = m.stored_bytes / m.raw_bytes
        what = "committed"
        if request.world_size > 1:
            what = f"rank {request.rank}/{request.world_size} part durable" + (
                " (step committed)" if result.record is not None else ""
            )
        log.info(
            "%s step %d %s: %d tensors, %.1f MB raw, %.1f MB new, %.2f s",
            request.job,
            request.step,
            what,
            len(m.tensors),
            m.raw_bytes / 1e6,
            result.written_bytes / 1e6,
            persist_s,
        )
        request.conn.send(
            {
                "op": "committed",
                "seq": request.seq,
                "step": request.step,
                "path": str(result.path),
                "raw_bytes": m.raw_bytes,
                "stored_bytes": m.stored_bytes,
                "written_bytes": result.written_bytes,
                "persist_s": persist_s,
                "rank": request.rank,
                "world_size": request.world_size,
                "step_committed": request.world_size == 1 or result.record is not None,
            }
        )

    def _failed(self, request: WriteRequest, exc: BaseException) -> None:
        reason = type(exc).__name__ if isinstance(exc, CkptdError) else "SnapshotFailedError"
        message = str(exc) if isinstance(exc, CkptdError) else f"internal error: {exc!r}"
        self.stats.failures[reason] = self.stats.failures.get(reason, 0) + 1
        self.stats.record_error(f"{request.job} step {request.step}: {message}")
        self.metrics.failed(request.job, reason)
        log.error("%s step %d failed: %s", request.job, request.step, message)
        request.conn.send({"op": "failed", "seq": request.seq, "type": reason, "message": message})

    # ---- drain -------------------------------------------------------------------------------

    def drain(
        self, conn: Submitter, rid: int | None, store: Store, job: str, timeout_s: float
    ) -> None:
        """Answer ``drained`` once ``job`` has no accepted, uncommitted snapshot (or after
        ``timeout_s``, listing the steps still pending)."""
        waiter = DrainWaiter(conn, rid, store.root, job)
        if not self.pending_steps(waiter.root, job):
            conn.reply(rid, {"op": "drained", "pending": []})
            return
        waiter.timer = self.loop.call_later(timeout_s, self._drain_answer, waiter)
        self.drain_waiters.append(waiter)

    def pending_steps(self, root: Path, job: str) -> list[int]:
        return [r.step for r in self.pending() if r.job == job and r.store.root == root]

    def _drain_answer(self, waiter: DrainWaiter) -> None:
        if waiter in self.drain_waiters:
            self.drain_waiters.remove(waiter)
        if waiter.timer is not None:
            waiter.timer.cancel()
        pending = self.pending_steps(waiter.root, waiter.job)
        waiter.conn.reply(waiter.rid, {"op": "drained", "pending": pending})

    def _check_drains(self) -> None:
        for waiter in list(self.drain_waiters):
            if waiter.conn.closed or not self.pending_steps(waiter.root, waiter.job):
                self._drain_answer(waiter)


class ChunkExecutor(Executor):
    """The chunk threads as one write sees them: its chunks run on the queue's chunk pool while
    it is the smallest write in progress (ties included), else on the bulk pool, whose threads
    run :data:`BULK_NICE_STEPS` nice steps lower. Beside a 1 GiB write, a 16 MiB one so gets most
    of the CPU and is durable soon; the big one gets the rest, and the chunk pool again once it
    writes alone. Which pool is decided per chunk, at submission (any thread may submit)."""

    def __init__(self, queue: WriteQueue, raw_bytes: int) -> None:
        self.queue = queue
        self.raw_bytes = raw_bytes

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        smallest = self.raw_bytes <= self.queue.smallest_raw_bytes
        pool = self.queue.chunk_pool if smallest else self.queue.bulk_pool
        return pool.submit(fn, *args, **kwargs)


def lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` steps (Linux keeps a nice value per
    thread). The write pipeline's threads run this first: on a machine whose cores also train,
    hashing and compressing a checkpoint take the CPU training leaves idle instead of slowing the
    training down, while the control plane keeps answering at the daemon's own priority."""
    if nice <= 0:
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except OSError as exc:  # e.g. a seccomp filter: run at normal priority
        log.warning("could not lower the priority of a write thread by %d: %s", nice, exc)


def _clear_frames(exc: BaseException | None) -> None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
