"""The upload queue: committed checkpoints go to the object-store tier in the background.

The queue is durable: it is the store's upload marks (:class:`~ckptd.format.jobmeta.Upload`).
The writer marks a checkpoint (or a rank's part) before its local commit when the job has a tier
and the client did not opt out (:meth:`Uploads.upload_for`), and hands it here after the commit
(:meth:`Uploads.add`); a daemon that starts re-queues every mark it finds
(:meth:`Uploads.recover`). A mark goes once the tier holds the checkpoint (for a part: once the
step is committed in the bucket), so local retention, which keeps marked steps, never deletes
what the tier lacks.

One thread (``ckptd-tier``) uploads, one checkpoint at a time, oldest first, each checkpoint's
objects on the tier's own pool (``concurrency``). Nothing on a snapshot's path waits for it. A
tier that fails (unreachable, refused, missing bucket) is retried with exponential backoff up to
``retry_max``, while local commits go on; the backlog and the last error are in ``ckptd status``
and the metrics. An error no retry can fix (a conflict in the bucket, a damaged local object) is
logged and the mark dropped. After each upload the tier's own retention runs
(:func:`~ckptd.tier.prune.prune_tier`).

Threads: :meth:`upload_for` runs on the writer thread; :meth:`add`, :meth:`recover`,
:meth:`reconfigure` and :meth:`status` from any thread; everything else on the upload thread.
Shared state is guarded by one condition variable.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ckptd.config import Config, TierConfig
from ckptd.daemon.metrics import Metrics
from ckptd.errors import (
    CkptdError,
    ConfigError,
    CorruptCheckpointError,
    FormatVersionError,
    TierError,
)
from ckptd.format.jobmeta import Upload
from ckptd.format.store import Store
from ckptd.tier.prune import prune_tier
from ckptd.tier.remote import open_remote
from ckptd.tier.upload import TierConflictError, Uploader

log = logging.getLogger("ckptd.daemon.uploads")

FIRST_RETRY_S = 1.0
RECHECK_S = (1.0, 30.0)
"""How often a part whose step waits for other ranks in the bucket is looked at again (first,
at most)."""
STOP_WAIT_S = 5.0


@dataclass
class _Entry:
    store: Store
    job: str
    upload: Upload
    added: float
    due: float = 0.0
    tries: int = 0
    waiting: list[int] | None = None
    """Ranks the step still waits for in the bucket (a part uploaded, the step not committed)."""
    commits: int = 0
    """Commits of the checkpoint handed over since the entry was made (:meth:`Uploads.add`):
    an upload that began before the last of them leaves the mark."""


@dataclass
class _TierState:
    config: TierConfig
    uploader: Uploader | None
    """None while the tier's client cannot be made (e.g. a damaged ~/.aws/credentials)."""
    due: float = 0.0
    failures: int = 0
    error: str | None = None
    stale: bool = False
    """Make the client again before the next attempt: after a failure, so that credentials
    fixed in the environment's files are read again."""


class Uploads:
    """The daemon's upload queue and thread (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics,
        on_error: Callable[[str], object],
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._on_error = on_error
        self._cv = threading.Condition()
        self._entries: dict[tuple[str, str, Upload], _Entry] = {}
        self._writing: dict[tuple[str, str, Upload], int] = {}
        """Commits the writer announced (:meth:`begin`) and has not handed over yet: their
        marks are not the upload thread's to remove."""
        self._tiers: dict[str, _TierState] = {}
        self._stopped = False
        self._uploaded = 0
        self._uploaded_bytes = 0
        self._dropped = 0
        self._thread: threading.Thread | None = None

    def check_config(self, config: Config | None = None) -> None:
        """Raise :class:`ConfigError` for a tier of ``config`` (default: the current one) that
        cannot be used at all (obstore missing, credentials files unreadable)."""
        for tier in (config or self._config).tiers():
            try:
                open_remote(tier.settings)
            except TierError as exc:
                raise ConfigError(f"tier {tier.url}: {exc}") from exc

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ckptd-tier", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread (an upload in flight is left; its mark re-queues it at the next
        start)."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)
        for state in self._tiers.values():
            if state.uploader is not None:
                state.uploader.pool.shutdown(wait=False, cancel_futures=True)

    def reconfigure(self, config: Config) -> None:
        with self._cv:
            self._config = config
            self._cv.notify_all()

    def tier_for(self, job: str) -> TierConfig | None:
        return self._config.tier_for(job)

    # ---- the queue ---------------------------------------------------------------------------

    def upload_for(
        self, job: str, step: int, *, rank: int, world_size: int, attempt: str | None
    ) -> Upload | None:
        """What the writer marks before the local commit (:meth:`Store.mark_upload`) when the job
        has a tier; None: it has none."""
        if self.tier_for(job) is None:
            return None
        return Upload(step) if world_size == 1 else Upload(step, rank, attempt)

    def begin(self, store: Store, job: str, upload: Upload) -> None:
        """Writer thread, before it marks ``upload`` for a commit: until that commit is handed
        over (:meth:`add`) or given up (:meth:`abandon`), the upload thread leaves the mark
        alone, whatever it uploads meanwhile."""
        key = (str(store.root), job, upload)
        with self._cv:
            self._writing[key] = self._writing.get(key, 0) + 1

    def abandon(self, store: Store, job: str, upload: Upload) -> None:
        """Writer thread: the commit announced by :meth:`begin` failed."""
        with self._cv:
            self._end_write((str(store.root), job, upload))

    def _end_write(self, key: tuple[str, str, Upload]) -> None:
        left = self._writing.pop(key, 0) - 1
        if left > 0:
            self._writing[key] = left

    def add(self, store: Store, job: str, upload: Upload) -> None:
        """Writer thread: queue a marked checkpoint after its local commit."""
        key = (str(store.root), job, upload)
        with self._cv:
            self._end_write(key)
            self._queue(key, store, job, upload, committed=True)

    def _queue(
        self,
        key: tuple[str, str, Upload],
        store: Store,
        job: str,
        upload: Upload,
        *,
        committed: bool,
    ) -> None:
        """Called under the lock."""
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Entry(store, job, upload, added=time.time())
        else:  # committed again while queued: upload what is there now, soon
            entry.due = 0.0
            entry.commits += committed
        self._metrics.tier_backlog(len(self._entries))
        self._cv.notify_all()

    def recover(self, stores: Iterable[Store]) -> int:
        """Queue every mark found under ``stores`` (at startup). Returns how many were queued."""
        queued = 0
        for store in stores:
            try:
                jobs = store.jobs()
            except CkptdError as exc:
                log.warning("%s: pending uploads not recovered: %s", store.root, exc)
                continue
            for job in jobs:
                queued += self.recover_job(store, job)
        if queued:
            log.info("resuming %d pending upload(s) to the tier", queued)
        return queued

    def recover_job(self, store: Store, job: str) -> int:
        """Queue the job's marks (a job's first use, or startup); drop them when the job has no
        tier any more. Returns how many were queued."""
        try:
            marks = store.marked_uploads(job)
        except CkptdError as exc:
            log.warning("%s: pending uploads not recovered: %s", job, exc)
            return 0
        if not marks:
            return 0
        if self.tier_for(job) is None:
            for upload in marks:
                store.unmark_upload(job, upload)
            log.warning(
                "%s: %d pending upload(s) dropped: the job has no tier any more", job, len(marks)
            )
            return 0
        with self._cv:
            for upload in marks:
                self._queue((str(store.root), job, upload), store, job, upload, committed=False)
        return len(marks)

    def status(self, job: str | None = None) -> dict[str, Any] | None:
        """The tier's part of ``ckptd status`` (None: no tier configured)."""
        with self._cv:
            tiers = self._config.tiers()
            if not tiers and not self._entries:
                return None
            entries = [e for e in self._entries.values() if job in (None, e.job)]
            now = time.time()
            states = []
            for tier in tiers:
                state = self._tiers.get(str(tier.url))
                states.append(
                    {
                        "url": str(tier.url),
                        "endpoint": tier.settings.endpoint,
                        "state": "ok"
                        if state is None or state.error is None
                        else ("retrying" if state.failures else "error"),
                        "error": None if state is None else state.error,
                        "retry_in_s": None
                        if state is None or state.error is None
                        else round(max(0.0, state.due - time.monotonic()), 1),
                    }
                )
            return {
                "tiers": states,
                "backlog": len(entries),
                "oldest_s": round(now - min(e.added for e in entries), 1) if entries else None,
                "waiting_for_ranks": [
                    {"job": e.job, "step": e.upload.step, "ranks": e.waiting}
                    for e in entries
                    if e.waiting
                ][:20],
                "uploaded": self._uploaded,
                "uploaded_bytes": self._uploaded_bytes,
                "dropped": self._dropped,
            }

    # ---- the upload thread ---------------------------------------------------------------------

    def _next(self) -> tuple[tuple[str, str, Upload], _Entry, _TierState | None] | None:
        """Upload thread: the entry to work on now (waits until one is due); None: stop."""
        with self._cv:
            while not self._stopped:
                now = time.monotonic()
                wake = now + 60.0
                for key, entry in sorted(
                    self._entries.items(), key=lambda kv: (kv[1].due, kv[1].added)
                ):
                    tier = self._config.tier_for(entry.job)
                    state = None if tier is None else self._state(tier)
                    due = max(entry.due, state.due if state is not None else 0.0)
                    if due <= now:
                        return key, entry, state
                    wake = min(wake, due)
                self._cv.wait(max(0.01, wake - now))
            return None

    def _state(self, tier: TierConfig) -> _TierState:
        """The tier's state and uploader, the uploader made again when the settings changed or
        after a failure (its backoff carried over); called under the lock. Never raises: a
        client that cannot be made is the tier's error, retried with backoff."""
        url = str(tier.url)
        state = self._tiers.get(url)
        if state is None or state.stale or state.config.settings != tier.settings:
            fresh = _TierState(tier, None)
            if state is not None:
                if state.uploader is not None:
                    state.uploader.pool.shutdown(wait=False)
                fresh.due, fresh.failures, fresh.error = state.due, state.failures, state.error
            try:
                remote = open_remote(tier.settings)
            except TierError as exc:
                fresh.error, fresh.stale = str(exc), True
            else:
                fresh.uploader = Uploader(remote, concurrency=tier.settings.concurrency)
            state = self._tiers[url] = fresh
        state.config = tier
        return state

    def _check_tiers(self) -> None:
        """Upload thread, first: is each tier usable? (Errors go to status and the log; local
        checkpointing is not affected.)"""
        with self._cv:
            states = [self._state(t) for t in self._config.tiers()]
        for state in states:
            try:
                if state.uploader is None:
                    raise TierError(state.error or f"tier {state.config.url}: no client")
                state.uploader.remote.check()
            except TierError as exc:
                with self._cv:
                    state.error = str(exc)
                    state.failures = 1
                    state.due = time.monotonic() + FIRST_RETRY_S * 2
                self._metrics.tier_error("", "TierError")
                message = f"{exc}; local checkpoints go on"
                log.error("%s", message)
                self._on_error(message)
            else:
                log.info("tier %s is reachable", state.config.settings.describe())

    def _run(self) -> None:
        """The upload thread: it never ends before :meth:`close` (an unexpected error is
        reported in status and the log, and retried)."""
        try:
            self._check_tiers()
        except Exception as exc:
            self._unexpected(f"checking the tiers failed: {exc!r}")
        while True:
            try:
                found = self._next()
            except Exception as exc:
                self._unexpected(f"the upload queue failed: {exc!r}; trying again in 10 s")
                with self._cv:
                    self._cv.wait(10.0)
                continue
            if found is None:
                return
            key, entry, state = found
            try:
                self._one(key, entry, state)
            except Exception as exc:  # a bug, or an error of the local store: keep the mark
                self._unexpected(
                    f"{entry.job}: uploading {entry.upload} failed: {exc!r}; trying again in 60 s"
                )
                with self._cv:
                    entry.tries += 1
                    entry.due = time.monotonic() + 60.0

    def _unexpected(self, message: str) -> None:
        log.exception("%s", message)
        self._on_error(message)

    def _drop(self, key: tuple[str, str, Upload], entry: _Entry, why: str | None) -> None:
        try:
            entry.store.unmark_upload(entry.job, entry.upload)
        except CkptdError as exc:
            log.warning("%s: the mark of %s not removed: %s", entry.job, entry.upload, exc)
        with self._cv:
            if self._entries.get(key) is entry:
                del self._entries[key]
            if why is not None:
                self._dropped += 1
            self._metrics.tier_backlog(len(self._entries))

    def _settle(
        self, key: tuple[str, str, Upload], entry: _Entry, commits: int, why: str | None
    ) -> bool:
        """The upload that began when ``entry`` had seen ``commits`` commits is over: remove the
        mark, unless the writer committed the checkpoint again since (or is committing it): then
        upload it again, soon. True when the mark went.

        The mark is removed under the lock, so a writer's :meth:`begin` comes either before the
        check (the mark stays) or after the removal (its own mark is made afterwards)."""
        with self._cv:
            if entry.commits != commits or self._writing.get(key):
                entry.due = 0.0
                return False
            try:
                entry.store.unmark_upload(entry.job, entry.upload)
            except CkptdError as exc:
                log.warning("%s: the mark of %s not removed: %s", entry.job, entry.upload, exc)
            if self._entries.get(key) is entry:
                del self._entries[key]
            if why is not None:
                self._dropped += 1
            self._metrics.tier_backlog(len(self._entries))
        return True

    def _one(self, key: tuple[str, str, Upload], entry: _Entry, state: _TierState | None) -> None:
        job, upload = entry.job, entry.upload
        if state is not None and state.uploader is None:
            self._failed(entry, state, TierError(state.error or f"tier {state.config.url}"))
            return
        if state is None:
            log.warning("%s: the job has no tier any more: %s will not be uploaded", job, upload)
            self._drop(key, entry, "no tier")
            return
        tier = state.config
        assert state.uploader is not None
        sent = 0

        def count(n: int) -> None:
            nonlocal sent
            sent += n

        with self._cv:
            commits = entry.commits
        try:
            outcome = state.uploader.upload(entry.store, job, upload, on_bytes=count)
        except (TierConflictError, CorruptCheckpointError, FormatVersionError) as exc:
            if not self._settle(key, entry, commits, str(exc)):
                return  # committed again meanwhile (its old objects may be gone): upload that
            message = f"{job}: {upload} not uploaded to {tier.url}: {exc}"
            log.error("%s", message)
            self._on_error(message)
            self._metrics.tier_error(job, type(exc).__name__)
            return
        except TierError as exc:
            self._failed(entry, state, exc)
            return
        with self._cv:
            if state.error is not None:
                log.info("tier %s reachable again", tier.url)
            state.error, state.failures, state.due = None, 0, 0.0
            self._uploaded_bytes += sent
        if outcome.gone:
            log.debug("%s: %s is gone from local disk; nothing to upload", job, upload)
            self._settle(key, entry, commits, None)
            return
        if outcome.changed:
            with self._cv:
                entry.due = 0.0
            return
        if upload.rank is not None and outcome.record is None:
            self._wait_for_ranks(key, entry, outcome.waiting_for)
            return
        self._metrics.tier_uploaded(job, sent)
        log.info(
            "%s: %s uploaded to %s (%d new objects, %.1f MB; %d already there)",
            job,
            upload,
            tier.url,
            outcome.objects_put,
            outcome.bytes_put / 1e6,
            outcome.objects_present,
        )
        # The tier's retention first: an empty backlog in status means it has run.
        self._retain(state, job, entry.store)
        with self._cv:
            self._uploaded += 1
        self._settle(key, entry, commits, None)

    def _wait_for_ranks(
        self, key: tuple[str, str, Upload], entry: _Entry, missing: list[int]
    ) -> None:
        """A part is in the bucket, its step is not complete there: look again later, until the
        step's parts would be collected locally (``ranks.pending_timeout``)."""
        timeout = self._config.ranks.pending_timeout_s
        if time.time() - entry.added > timeout:
            log.warning(
                "%s: step %d is not complete in the tier after %.0f s (ranks %s missing); "
                "this node stops waiting for it",
                entry.job,
                entry.upload.step,
                timeout,
                missing,
            )
            self._drop(key, entry, "ranks missing")
            return
        with self._cv:
            first, most = RECHECK_S
            entry.waiting = missing
            entry.tries += 1
            entry.due = time.monotonic() + min(most, first * 1.5 ** min(entry.tries, 20))

    def _failed(self, entry: _Entry, state: _TierState, exc: TierError) -> None:
        """The tier failed: back off (the whole tier: one unreachable store is not hammered
        once per checkpoint)."""
        with self._cv:
            state.failures += 1
            delay = min(state.config.retry_max_s, FIRST_RETRY_S * 2 ** min(state.failures, 30))
            state.due = time.monotonic() + delay * random.uniform(0.8, 1.0)
            first = state.error != str(exc)
            state.error = str(exc)
            state.stale = True  # the next attempt reads the credentials again
            entry.tries += 1
        self._metrics.tier_error(entry.job, "TierError")
        if first:
            message = f"{exc}; local checkpoints go on, uploads retry"
            log.error("%s", message)
            self._on_error(message)
        else:
            log.debug("tier %s still failing: %s", state.config.url, exc)

    def _retain(self, state: _TierState, job: str, store: Store) -> None:
        """The tier's own retention, after an upload (never fails the upload)."""
        policy = state.config.retention
        if not policy.configured or state.uploader is None:
            return
        try:
            protect = {u.step for u in store.marked_uploads(job)} | store.pinned_steps(job)
            result = prune_tier(state.uploader.remote, job, policy, protect=protect)
        except CkptdError as exc:
            log.warning("%s: the tier's retention not applied: %s", job, exc)
            self._on_error(f"{job}: tier retention: {exc}")
            return
        if result.deleted:
            log.info(
                "%s: the tier's retention deleted steps %s (%d objects, %.1f MB)",
                job,
                result.deleted,
                result.objects_deleted,
                result.bytes_deleted / 1e6,
            )
