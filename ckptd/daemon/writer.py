"""The write queue and the single writer: accepted snapshots go to disk one at a time, in order.

A snapshot the admission accepted is :meth:`WriteQueue.enqueue`\\ d. One writer task takes the
requests in FIFO order, across all clients, and runs each on the writer thread, which runs
:func:`~ckptd.pipeline.write.write_checkpoint` over the slot in place, with the chunk pool
(hashing, zstd and file I/O release the GIL; memory in flight is the pipeline's bounded budget).
For each request the client hears, in this order:

* ``released``: the pipeline has read the slot (or never will): the client may reuse it;
* ``committed`` (the manifest is durable) or ``failed`` (with the error's type and message);

then the job's retention runs (on the writer thread; it never fails the commit). :meth:`drain`
answers once a job has nothing accepted and uncommitted.

Threads: the queue, the drain waiters and :attr:`WriteQueue.ratios` belong to the loop thread.
The writer thread (``commit_pool``, one thread) only runs :meth:`WriteQueue._write` and hands
results back with ``call_soon_threadsafe``; the chunk pool's threads run at a lower priority.

A request of a multi-rank job writes that rank's part; the write commits the step when the part
completes it, and otherwise the :class:`~ckptd.daemon.coordinator.Coordinator` watches the step
and commits it once the other ranks' parts are durable (:meth:`WriteQueue.recheck`, on the writer
thread, from the daemon's ticker). The client hears ``committed`` once its part is durable, with
``step_committed`` true when that write also committed the step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ckptd.daemon.coordinator import Coordinator
from ckptd.daemon.metrics import Metrics
from ckptd.daemon.requests import Submitter, WriteRequest
from ckptd.daemon.stats import Stats
from ckptd.daemon.uploads import Uploads
from ckptd.errors import CkptdError, DiskFullError
from ckptd.format.jobmeta import Upload
from ckptd.format.store import Store
from ckptd.pipeline.plan import PipelineConfig, TensorSource
from ckptd.pipeline.write import WriteResult, write_checkpoint
from ckptd.policy.diskguard import PolicyFor
from ckptd.policy.prune import prune

log = logging.getLogger("ckptd.daemon.writer")


@dataclass
class DrainWaiter:
    """A ``drain`` request waiting until its job has nothing accepted and uncommitted."""

    conn: Submitter
    rid: int | None
    root: Path
    job: str
    timer: asyncio.TimerHandle | None = None


class WriteQueue:
    """The FIFO of accepted snapshots and the task that writes them (see the module docstring).

    ``pipeline`` may be replaced on reload (it applies from the next write); ``policy_for`` is
    called on the writer thread after each commit; ``on_change`` is called on the loop whenever
    the queue changed (the daemon's status line). Call :meth:`run` once, on the loop; it returns
    after :meth:`close` once every accepted snapshot is written. Then :meth:`shutdown`."""

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
        self.pipeline = pipeline
        self.policy_for = policy_for
        self.stats = stats
        self.metrics = metrics
        self.on_change = on_change
        self.waiting: deque[WriteRequest] = deque()
        self.writing: WriteRequest | None = None
        self.closed = False
        self.ratios: dict[tuple[Path, str], float] = {}
        """(root, job) -> stored/raw bytes of the job's last commit (what the admission
        estimates the next one with)."""
        self.drain_waiters: list[DrainWaiter] = []
        self._wakeup = asyncio.Event()
        self.chunk_pool = ThreadPoolExecutor(
            max(1, pipeline.threads),
            thread_name_prefix="ckptd-chunk",
            initializer=lower_priority,
            initargs=(worker_nice,),
        )
        self.commit_pool = ThreadPoolExecutor(1, thread_name_prefix="ckptd-commit")
        self.coordinator = Coordinator(pipeline.pending_timeout_s)
        self._rechecking = False

    def pending(self) -> list[WriteRequest]:
        """Accepted and not yet committed or failed: the one being written, then the queue."""
        return [*([self.writing] if self.writing else []), *self.waiting]

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
        self.commit_pool.shutdown(wait=True)

    # ---- the writer task ---------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            if not self.waiting:
                if self.closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            request = self.waiting.popleft()
            self.writing = request
            self.metrics.queue_depth(len(self.waiting))
            try:
                result = await self.loop.run_in_executor(self.commit_pool, self._write, request)
            except CkptdError as exc:
                self._failed(request, exc)
            except Exception as exc:
                log.exception("%s step %d: unexpected error", request.job, request.step)
                self._failed(request, exc)
            else:
                self._committed(request, result)
            finally:
                self.writing = None
                if not request.done:  # pipeline never reached on_read_done (refused early)
                    self._release(request)
                self._check_drains()
                self.on_change()

    def _write(self, request: WriteRequest) -> WriteResult:
        """Writer thread: run the pipeline over the slot, in place."""
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
            result = write_checkpoint(
                request.store,
                request.job,
                request.step,
                request.layout.skeleton,
                sources,
                metric=request.metric,
                config=self.pipeline,
                executor=self.chunk_pool,
                on_read_done=on_read_done,
                rank=request.rank,
                world_size=request.world_size,
                attempt=request.attempt,
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
        if upload is not None and self.uploads is not None:
            self.uploads.add(request.store, request.job, upload)
        if request.attempt is not None:
            if result.record is None:
                self.coordinator.watch(request.store, request.job, request.step, request.attempt)
            self._collect(request.store, request.job)
        self._retain(request.store, request.job)
        return result

    def _collect(self, store: Store, job: str) -> None:
        """Writer thread: collect the job's part sets that can never commit (never fails)."""
        try:
            store.collect_parts(job, pending_timeout_s=self.pipeline.pending_timeout_s)
        except Exception as exc:
            log.warning("%s: uncommitted parts not collected: %s", job, exc)

    async def recheck(self) -> None:
        """Try the watched multi-rank steps again, on the writer thread (loop thread; the
        daemon's ticker calls this)."""
        if self._rechecking or not self.coordinator:
            return
        self._rechecking = True
        self.coordinator.pending_timeout_s = self.pipeline.pending_timeout_s
        try:
            records = await self.loop.run_in_executor(self.commit_pool, self.coordinator.recheck)
        except Exception:
            log.exception("checking uncommitted multi-rank steps failed")
            return
        finally:
            self._rechecking = False
        for record in records:
            log.debug("%s step %d is committed (seq %d)", record.job, record.step, record.seq)

    async def recover(self, store: Store) -> None:
        """Watch the uncommitted multi-rank steps under ``store`` (at startup)."""
        await self.loop.run_in_executor(self.commit_pool, self.coordinator.recover, store)
        await self.recheck()

    def _retain(self, store: Store, job: str) -> None:
        """Writer thread, after a commit: apply the job's retention (never fails the commit)."""
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
