"""Lightning through ckptd: ``Trainer(plugins=[CkptdCheckpointIO("run")])``.

:class:`CkptdCheckpointIO` is a ``CheckpointIO`` plugin. Lightning keeps deciding *when* to save
and *which* files exist (``ModelCheckpoint``'s top-k, ``save_last``, ``every_n_*``); the plugin
decides *how*: each save hands Lightning's checkpoint dict to the ckptd daemon (one copy into
shared memory, pickle-free) and returns, and the daemon makes it durable. Where Lightning asked
for a file, the plugin leaves a small JSON *pointer* naming the job, the root and the step, once
the step is committed, never before. Lightning finds checkpoints by looking at files
(``fit(ckpt_path="last")`` picks the newest ``last*.ckpt``), so this is what lets it resume.

Ownership, at every moment:

* a step this plugin handed off belongs to the daemon until its handle settles; the plugin never
  deletes a step it has not seen committed, nor one a live path still names;
* a path Lightning asked for maps to the step of its latest save (``self._paths``); its pointer
  file is written by the client thread that settles the step's handle, only while the path still
  maps to that step (a later save to the same path wins);
* a step no path names any more is *doomed*; it is deleted (with
  :func:`ckptd.policy.prune.delete_and_collect`, which never deletes the newest commit, the
  highest step or a pinned one) once committed and named by no path of this run and by no
  pointer in a directory the run's checkpoint callbacks use (their ``dirpath``, from the
  checkpoint dicts saved and loaded), at the next save, removal or teardown. So top-k and
  ``save_last`` can never leave the job without a committed checkpoint.

One step is one checkpoint: a save of the step just saved, whose dict has no key the previous
one lacked, is the same checkpoint at another path (Lightning saving a top-k file and
``last.ckpt``) and is stored once; any other save of a step is snapshotted and replaces the step
(a full save after a weights-only one), and every path of the step then points to it.

Lightning calls the plugin on global rank 0 only (rank gating stays Lightning's), so the plugin's
client is rank 0 of a one-process job; every rank can load, since loading reads the store.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckptd.errors import (
    CkptdError,
    ManifestError,
    NotFoundError,
    SnapshotSkippedError,
    UnsupportedStateError,
)
from ckptd.format.fsutil import durable_write
from ckptd.format.store import Store, validate_job_name
from ckptd.policy.prune import delete_and_collect
from ckptd_client.api import load
from ckptd_client.client import Client
from ckptd_client.pending import PendingSnapshot

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ckptd_client.lightning needs Lightning (the `lightning` package): "
        "pip install 'ckptd[lightning]'"
    ) from exc

log = logging.getLogger("ckptd_client.lightning")

POINTER_KIND = "ckptd-lightning-pointer"
"""The ``kind`` of a pointer file; a file without it is not ckptd's."""
_POINTER_MAX_BYTES = 64 * 1024


def read_pointer(path: str | Path) -> dict[str, Any] | None:
    """The pointer at ``path``, or None when the file is not a ckptd pointer (e.g. a
    ``torch.save`` checkpoint written before the switch). Raises FileNotFoundError, and
    ManifestError for a pointer whose job, step or root is missing or malformed."""
    with Path(path).open("rb") as f:
        head = f.read(_POINTER_MAX_BYTES + 1)
    if len(head) > _POINTER_MAX_BYTES or not head.startswith(b"{"):
        return None
    try:
        doc = json.loads(head)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("kind") != POINTER_KIND:
        return None
    step = doc.get("step")
    if not (
        isinstance(doc.get("job"), str)
        and isinstance(step, int)
        and not isinstance(step, bool)
        and isinstance(doc.get("root"), str)
    ):
        raise ManifestError(
            f"{path}: a damaged ckptd pointer (it needs a job, an integer step and a root); "
            "remove it, or load the checkpoint by step with ckptd_client.load"
        )
    return doc


class CkptdCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that checkpoints through the ckptd daemon.

    ``job``: the ckptd job the run's checkpoints go to. ``root`` / ``socket`` and any other
    keyword (``allow_pickle``, ``strict``, ``slots``, ``retention``, ...) go to
    :class:`~ckptd_client.Client`. Without a ``retention`` policy the checkpoints Lightning
    removes (top-k, ``save_last``) are deleted by the plugin; with one, the daemon's retention
    also deletes, and a pointer to a step it deleted raises NotFoundError when loaded.

    ``save_checkpoint`` stores the dict under its ``global_step`` (stored once when Lightning
    saves it to two paths), with the monitored ``current_score`` as the metric; a dict without
    a ``global_step`` (the spawn launchers' temporary state dict) is written by Lightning's own
    ``TorchCheckpointIO``. ``strict=True`` makes a failed commit raise from the next save (or
    from ``teardown``); otherwise it is logged. Skipped snapshots (``on_full="skip"``) are only
    logged.
    """

    def __init__(
        self,
        job: str,
        *,
        root: str | Path | None = None,
        socket: str | Path | None = None,
        **client_options: Any,
    ) -> None:
        super().__init__()
        self.job = validate_job_name(job)
        self._options: dict[str, Any] = {"rank": 0, "world_size": 1}
        self._options.update(client_options, root=root, socket=socket)
        self.allow_pickle = bool(client_options.get("allow_pickle", False))
        self.strict = bool(client_options.get("strict", False))
        self._client: Client | None = None
        self._root: Path | None = None  # the root this job's steps are in, once known
        self._lock = threading.Lock()
        self._paths: dict[str, int] = {}  # every path Lightning asked for -> its step
        self._handles: dict[int, PendingSnapshot] = {}  # steps handed off by this plugin
        self._committed: dict[int, dict[str, Any]] = {}  # step -> what its pointers say
        self._doomed: set[int] = set()  # steps a path stopped naming: deleted once none does
        self._dirs: set[Path] = set()  # the directories of the paths Lightning asked for
        self._failures: list[CkptdError] = []
        # The latest save: (step, the dict's top-level keys, its handle). A save of the same
        # step right after it, whose keys it covers, is the same checkpoint (a top-k file and
        # last.ckpt); anything else is snapshotted (a weights-only save then a full one).
        self._last_save: tuple[int, frozenset[str], PendingSnapshot] | None = None

    # ---- the client -----------------------------------------------------------------------

    @property
    def client(self) -> Client:
        """The connection to the daemon, made at the first save (on global rank 0 only)."""
        if self._client is None:
            self._client = Client(self.job, **self._options)
            atexit.register(self._at_exit)  # a save outside fit() has no teardown
        return self._client

    # ---- CheckpointIO ---------------------------------------------------------------------

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        step = checkpoint.get("global_step")
        if not isinstance(step, int) or isinstance(step, bool):
            # Not a training checkpoint: the spawn launchers pass the bare state dict through
            # a temporary file. Lightning's own IO writes it.
            TorchCheckpointIO().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                "CkptdCheckpointIO.save_checkpoint takes no storage_options (got "
                f"{storage_options!r}); retention and the like are ckptd client options"
            )
        where = _local_path(path)
        self._raise_failures()
        keys = frozenset(checkpoint)
        with self._lock:
            self._dirs.update(_checkpoint_dirs(checkpoint))
            last = self._last_save
            if last is not None and last[0] == step and keys <= last[1] and last[2].error is None:
                self._point(where, step)  # the same checkpoint at another path: stored once
                return
        try:
            handle = self.client.snapshot(
                state=checkpoint, step=step, metric=_monitored_score(checkpoint)
            )
        except UnsupportedStateError as exc:
            raise UnsupportedStateError(
                f"{exc}. Lightning's checkpoint holds it (hyperparameters that are objects?): "
                "exclude it with save_hyperparameters(ignore=[...]) or pass "
                "CkptdCheckpointIO(..., allow_pickle=True)"
            ) from exc
        with self._lock:
            self._root = Path(self.client.root).absolute()
            self._last_save = (step, keys, handle)
            self._handles[step] = handle
            self._committed.pop(step, None)  # a new commit of the step: its pointers wait
            self._point(where, step)
        handle.add_done_callback(self._settled)
        self._collect()

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint ``path`` stands for: the committed step its pointer names, verified.
        A file that is not a ckptd pointer (a ``torch.save`` checkpoint) is loaded as Lightning
        would. ``weights_only`` does not apply to ckptd's pickle-free checkpoints."""
        where = _local_path(path)
        with self._lock:
            step = self._paths.get(where)
            handle = self._handles.get(step) if step is not None else None
        if handle is not None:
            try:
                handle.wait()  # saved just now: its pointer is written once it commits
            except CkptdError:
                pass  # not committed: the path keeps what it had
        try:
            pointer = read_pointer(where)
        except FileNotFoundError:
            raise FileNotFoundError(f"Checkpoint file not found: {where}") from None
        if pointer is None:
            return TorchCheckpointIO().load_checkpoint(
                path, map_location=map_location, weights_only=weights_only
            )
        job, step, root = pointer["job"], pointer["step"], pointer["root"]
        store = Store(root)
        try:
            manifest = store.read_manifest(job, step)
        except NotFoundError as exc:
            raise NotFoundError(
                f"{where} points to {job} step {step} under {root}, which no longer exists "
                f"({exc}); see `ckptd list {job} --root {root}`"
            ) from exc
        if pointer.get("digest") is not None and manifest.digest != pointer["digest"]:
            raise NotFoundError(
                f"{where} points to {job} step {step} as committed with digest "
                f"{pointer['digest']}, but that step was committed again since (digest "
                f"{manifest.digest}); load it by step with ckptd_client.load({job!r}, {step})"
            )
        state = load(
            job,
            step,
            root=root,
            map_location=map_location,
            allow_pickle=self.allow_pickle,
            rank=0,
        )
        if not isinstance(state, dict):
            raise NotFoundError(
                f"{where} points to {job} step {step}, which is not a Lightning checkpoint "
                f"(a {type(state).__name__}, not a dict)"
            )
        if job == self.job:
            with self._lock:  # the run's other checkpoint directories, for removals
                self._dirs.update(_checkpoint_dirs(state))
        return state

    def remove_checkpoint(self, path: Any) -> None:
        """Lightning no longer wants ``path``: remove its pointer; its step goes once no path
        names it and it is safe to delete (see the module docstring)."""
        where = _local_path(path)
        with self._lock:
            step = self._paths.pop(where, None)
        try:
            pointer = read_pointer(where)
        except (FileNotFoundError, ManifestError):
            pointer = None
        if step is None and pointer is None and Path(where).exists():
            TorchCheckpointIO().remove_checkpoint(path)  # not ckptd's: Lightning's own file
            return
        Path(where).unlink(missing_ok=True)
        if step is None and pointer is not None and pointer["job"] == self.job:
            with self._lock:
                root = Path(pointer["root"])
                if self._root is None or self._root == root:
                    self._root = root
                    step = pointer["step"]  # a pointer an earlier run left: committed
                else:
                    log.warning(
                        "ckptd: %s named %s step %d under %s, not under this run's root %s; "
                        "that step is left in place",
                        where,
                        self.job,
                        pointer["step"],
                        root,
                        self._root,
                    )
        if step is not None:
            with self._lock:
                self._dirs.add(Path(where).parent)
                self._doomed.add(step)
        self._collect()

    def teardown(self) -> None:
        """End of ``fit``: wait for the handed-off steps to commit (their pointers are written
        then), delete what Lightning removed, disconnect. With ``strict=True`` a failed commit
        raises here, unless Lightning tears down because of another exception (then it is
        logged, and that exception goes on)."""
        if self._client is not None:
            self._client.close(timeout=None)  # settles every handle: the pointers are written
            self._client = None
        with self._lock:
            self._last_save = None
            self._handles = {s: h for s, h in self._handles.items() if not h.done()}
        self._collect()
        if sys.exc_info()[1] is None:
            self._raise_failures()

    def _at_exit(self) -> None:
        """At interpreter exit: give the commits of saves made outside ``fit()`` a minute, so
        their pointers are written; never raises."""
        client = self._client
        if client is not None:
            try:
                client.flush(60.0)
            except Exception as exc:
                log.warning("ckptd: at exit, waiting for %s's commits failed: %s", self.job, exc)

    # ---- internals ------------------------------------------------------------------------

    def _point(self, where: str, step: int) -> None:
        """``where`` now stands for ``step`` (lock held); its pointer is written at once when
        ``step`` is committed, else when it commits. The step it named before may be doomed."""
        before = self._paths.get(where)
        self._paths[where] = step
        self._dirs.add(Path(where).parent)
        self._doomed.discard(step)
        if before is not None and before != step:
            self._doomed.add(before)  # deleted once its pointer here names the new step
        if step in self._committed:
            self._write_pointer(where, self._committed[step])

    def _settled(self, handle: PendingSnapshot) -> None:
        """A client thread: ``handle`` settled. Write the pointers of its step's paths."""
        with self._lock:
            if self._handles.get(handle.step) is not handle:
                return  # the step was handed off again since
            if handle.error is not None:
                del self._handles[handle.step]
                self._doomed.discard(handle.step)
                if not isinstance(handle.error, SnapshotSkippedError):  # on_full="skip" chose
                    self._failures.append(handle.error)
                log.warning(
                    "ckptd: %s step %d was not committed (%s); Lightning's paths for it get no "
                    "pointer",
                    self.job,
                    handle.step,
                    handle.error,
                )
                return
            root = self._root
            assert root is not None  # set when the step was handed off
            try:
                digest = Store(root).read_manifest(self.job, handle.step).digest
            except CkptdError:
                digest = None  # deleted already (retention): the pointer says so when loaded
            self._committed[handle.step] = {
                "kind": POINTER_KIND,
                "version": 1,
                "job": self.job,
                "step": handle.step,
                "root": str(root),
                "digest": digest,
            }
            for where, step in self._paths.items():
                if step == handle.step:
                    self._write_pointer(where, self._committed[step])

    def _write_pointer(self, where: str, pointer: dict[str, Any]) -> None:
        path = Path(where)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            body = json.dumps(pointer, indent=1).encode() + b"\n"
            durable_write(path, [body], tmp_dir=path.parent)
        except (OSError, CkptdError) as exc:
            log.warning(
                "ckptd: could not write the pointer %s to %s step %d: %s",
                where,
                pointer["job"],
                pointer["step"],
                exc,
            )

    def _named_on_disk(self) -> set[int]:
        """The steps the pointers of this job in the directories Lightning uses name (lock
        held: no pointer is written meanwhile)."""
        named = set()
        for d in sorted(self._dirs):
            for entry in d.iterdir() if d.is_dir() else ():
                try:
                    pointer = read_pointer(entry) if entry.is_file() else None
                except (OSError, ManifestError):
                    continue
                if pointer and pointer.get("job") == self.job:
                    named.add(int(pointer["step"]))
        return named

    def _collect(self) -> None:
        """Delete the doomed steps that nothing names, in memory or on disk, once committed and
        unprotected (trainer thread: Lightning makes no other call meanwhile)."""
        with self._lock:
            if not self._doomed:
                return
            pending = {s for s, h in self._handles.items() if not h.done()}
            named = set(self._paths.values()) | self._named_on_disk()
            self._doomed -= set(self._paths.values())
            victims = sorted(self._doomed - pending - named)
            root = self._root
        if not victims or root is None:
            return
        store = Store(root)
        try:
            newest = store.resolve_step(self.job, "latest")
            delete_and_collect(
                store,
                self.job,
                victims,
                newest,
                why="Lightning removed its checkpoint files",
                gc_blocking=False,
            )
        except Exception as exc:  # a failed cleanup never stops training
            log.warning("ckptd: could not delete %s steps %s: %s", self.job, victims, exc)
        try:
            deleted = set(victims) - set(store.steps(self.job))
        except CkptdError:
            return
        with self._lock:
            for step in deleted:
                self._doomed.discard(step)
                self._handles.pop(step, None)
                self._committed.pop(step, None)

    def _raise_failures(self) -> None:
        with self._lock:
            failures, self._failures = self._failures, []
        if failures and self.strict:
            raise failures[0]


def _local_path(path: Any) -> str:
    text = str(os.fspath(path))
    if "://" in text and not text.startswith("file://"):
        raise ValueError(
            f"CkptdCheckpointIO keeps its pointer files on the local filesystem, not at {text}; "
            "give ModelCheckpoint a local dirpath (the checkpoints themselves go to ckptd's root)"
        )
    return os.path.normpath(Path(text.removeprefix("file://")).absolute())


def _checkpoint_dirs(checkpoint: dict[str, Any]) -> Iterator[Path]:
    """The local ``dirpath`` of every ``ModelCheckpoint`` in a Lightning checkpoint dict."""
    for state in (checkpoint.get("callbacks") or {}).values():
        dirpath = state.get("dirpath") if isinstance(state, dict) else None
        if isinstance(dirpath, str) and ("://" not in dirpath or dirpath.startswith("file://")):
            yield Path(_local_path(dirpath))


def _monitored_score(checkpoint: dict[str, Any]) -> float | None:
    """The ``current_score`` of the first ``ModelCheckpoint`` in the dict that monitors one."""
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") and "current_score" in state:
            score = state["current_score"]
            if score is not None:
                return float(score)
    return None
