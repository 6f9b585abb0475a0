"""Save, load, restore and list checkpoints in-process (no daemon involved).

``save`` is the blocking path: it writes and commits the checkpoint before returning. The
asynchronous path through the ckptd daemon (``Client.snapshot``) writes the same format.

``root="s3://bucket/prefix"`` reads the object-store tier with no local copy (``load``,
``restore``, ``list_checkpoints``; :func:`tier_store`): every object is verified as it comes in.
The tier is read-only here (``save`` to it raises :class:`~ckptd.errors.TierError`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ckptd.config import Config, load_config, tier_settings_for
from ckptd.errors import RankLayoutError
from ckptd.format.manifest import Manifest
from ckptd.format.restore import MapLocation, load_checkpoint
from ckptd.format.skeleton import flatten
from ckptd.format.store import Store, validate_job_name
from ckptd.locate import store_root
from ckptd.pipeline.plan import tensor_source
from ckptd.pipeline.write import WriteResult, write_checkpoint
from ckptd.tier import mirror
from ckptd.tier.remote import is_tier_url
from ckptd_client.ranks import current_rank, detect
from ckptd_client.state import Stateful, apply, collect

_stores: dict[Path, Store] = {}
_stores_lock = threading.Lock()


def tier_store(url: str, config: Config | None = None) -> Store:
    """The checkpoints in the object-store tier ``url`` (``s3://bucket/prefix``) as a read-only
    :class:`Store` (:class:`ckptd.tier.mirror.TierStore`), one per URL in this process, reached
    through ``config``'s ``[tier]`` endpoint when it names that bucket (default: the config file
    in use), else through the AWS environment. Each call syncs what the bucket holds again when
    a job is next read. Contacts nothing itself; :class:`~ckptd.errors.TierError` for a malformed
    URL."""
    return mirror.tier_store(url, tier_settings_for(url, config))


Root = Path | str | Store | None
"""Where to read or write: a directory, ``"s3://bucket/prefix"`` (the tier, read-only), a
:class:`Store` already open, or None (the daemon's root, see :mod:`ckptd.locate`)."""


def _store(root: Root, config: Config | None = None) -> Store:
    """The store at ``root`` or, when none was asked for, the daemon's (see :mod:`ckptd.locate`).
    One Store per root for this process: a Store remembers which objects it has verified and
    made durable, so repeated in-process saves do not re-read the objects they reuse. An
    ``s3://`` root is the tier's (:func:`tier_store`); a Store is used as it is."""
    if isinstance(root, Store):
        return root
    if isinstance(root, str) and is_tier_url(root):
        return tier_store(root, config)
    path = Store(store_root(root, config)).root
    with _stores_lock:
        store = _stores.get(path)
        if store is None:
            store = _stores[path] = Store(path)
        return store


def save(
    job: str,
    model: Stateful | dict[str, Any] | None = None,
    optimizer: Stateful | dict[str, Any] | None = None,
    *,
    step: int,
    scheduler: Stateful | dict[str, Any] | None = None,
    scaler: Stateful | dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    metric: float | None = None,
    rng: bool = True,
    state: Any = None,
    root: Root = None,
    allow_pickle: bool = False,
    config: Config | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    attempt: str | None = None,
) -> WriteResult:
    """Write a checkpoint of the given objects (or ``state``) and commit it before returning.

    In a multi-rank job (``rank`` / ``world_size`` / ``attempt`` as for
    :class:`~ckptd_client.Client`) this writes the rank's part in this process and commits the
    step when it is the last part (``WriteResult.record``).

    Unsupported values are refused before anything is written
    (:class:`~ckptd.errors.UnsupportedStateError`, naming the key path and type).
    """
    validate_job_name(job)
    ranks = detect(rank, world_size, attempt)
    cfg = config if config is not None else load_config()
    flat = flatten(
        collect(
            model, optimizer, scheduler=scheduler, scaler=scaler, rng=rng, extra=extra, state=state
        ),
        allow_pickle=allow_pickle,
    )
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    return write_checkpoint(
        _store(root, cfg),
        job,
        step,
        flat.skeleton,
        sources,
        metric=metric,
        config=cfg.pipeline(),
        rank=ranks.rank,
        world_size=ranks.world_size,
        attempt=ranks.attempt,
    )


def load(
    job: str,
    step: int | str = "latest",
    *,
    root: Root = None,
    map_location: MapLocation = None,
    fallback: bool = False,
    allow_pickle: bool = False,
    rank: int | None = None,
) -> Any:
    """Return the state exactly as it was handed over, every byte verified.

    ``root`` is as for :data:`Root`: a directory, ``"s3://bucket/prefix"`` to read the object-store
    tier with no local copy (each object verified as it comes in), or an open Store.

    Of a multi-rank step, rank ``rank``'s state; ``rank`` defaults to this process's rank
    (``torch.distributed``, else ``RANK`` with ``WORLD_SIZE``), and where none can be found a
    multi-rank step raises :class:`~ckptd.errors.RankLayoutError` asking for ``rank=``.

    That is the ``state=`` value itself when the snapshot was taken with ``state=``, otherwise a
    dict with the keys ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``extra`` for
    what was given. ``step`` is a step number or ``"latest"``; ``fallback=True`` falls back from
    a ``latest`` that does not verify to the newest one that does (with a FallbackWarning).

    ``map_location`` takes what ``torch.load`` takes: a device string, a ``torch.device``, a dict
    remapping location tags, or a callable ``(storage, location) -> storage``. Every stored
    tensor's location tag is ``"cpu"`` (the device it was snapshotted from is not recorded), so
    tensors come back on the CPU by default, a dict acts through its ``"cpu"`` key only and a
    callable receives ``"cpu"``. Numpy arrays in the state stay numpy arrays. A device this
    machine lacks (``"cuda"`` without CUDA) raises :class:`~ckptd.errors.ConfigError` before
    anything is read.
    """
    own = current_rank() if rank is None else None
    if own is not None and own[1] > 1:
        rank = own[0]
    loaded = load_checkpoint(
        _store(root),
        job,
        step,
        map_location=map_location,
        fallback=fallback,
        allow_pickle=allow_pickle,
        rank=rank,
    )
    if own is not None and own[1] > 1 and loaded.manifest.world_size != own[1]:
        raise _world_mismatch(job, loaded.step, loaded.manifest.world_size, own[1])
    return loaded.state


def _world_mismatch(job: str, step: int, saved: int, running: int) -> RankLayoutError:
    return RankLayoutError(
        f"job {job!r} step {step} was written by {saved} rank(s), and this job runs {running}: "
        f"restore it at world size {saved} (or pass rank= to read one rank's part), or reshard "
        "it with torch.distributed.checkpoint.load(..., storage_reader="
        f"ckptd_client.dcp.CkptdStorageReader({job!r}, {step}))"
    )


def restore(
    model: Stateful | None,
    optimizer: Stateful | None = None,
    *,
    job: str,
    step: int | str = "latest",
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    root: Root = None,
    map_location: MapLocation = None,
    fallback: bool = False,
    rng: bool = True,
    strict: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into the objects (and the RNG states, when saved); return its ``extra``.

    In a multi-rank job this loads rank ``rank``'s part (``rank`` / ``world_size`` default as for
    :class:`~ckptd_client.Client`); a checkpoint written at another world size raises
    :class:`~ckptd.errors.RankLayoutError` naming both (``ckptd_client.dcp.CkptdStorageReader``
    reshards).

    ``extra`` also carries ``"step"`` (under the key ``"__step__"`` only if the user did not use
    that key), so a loop can resume with ``start = restore(...)["__step__"] + 1``.

    ``strict=False`` loads into a model whose layers changed (passed to the model's
    ``load_state_dict``): the checkpoint's keys the model lacks are ignored, the model's keys the
    checkpoint lacks keep their values, a WARNING names both, and the returned dict also carries
    ``"__incompatible_keys__"``: torch's ``(missing_keys, unexpected_keys)`` named tuple. The
    optimizer state of a changed model does not fit its optimizer (a ``CkptdError`` says so
    before anything is loaded): pass ``optimizer=None`` to restore only the model.
    ``map_location`` is as for :func:`load`.
    """
    if rank is None and world_size is None:
        found = current_rank()
        rank, world_size = found if found is not None else (0, 1)
    elif rank is None or world_size is None:
        raise RankLayoutError("give both rank= and world_size= or neither")
    store = _store(root)
    if not fallback:  # the world size first, before reading a part
        resolved = store.resolve_step(job, step)
        saved = store.read_manifest(job, resolved).world_size
        if saved != world_size:
            raise _world_mismatch(job, resolved, saved, world_size)
        step = resolved
    loaded = load_checkpoint(
        store,
        job,
        step,
        map_location=map_location,
        fallback=fallback,
        rank=rank if world_size > 1 else None,
    )
    if loaded.manifest.world_size != world_size:
        raise _world_mismatch(job, loaded.step, loaded.manifest.world_size, world_size)
    extra = apply(
        loaded.state,
        model,
        optimizer,
        scheduler=scheduler,
        scaler=scaler,
        rng=rng,
        strict=strict,
        where=f"job {job!r} step {loaded.step}",
    )
    extra.setdefault("__step__", loaded.step)
    return extra


def list_checkpoints(job: str | None = None, *, root: Root = None) -> list[Manifest]:
    """Manifests of every checkpoint (of ``job``, or of all jobs), oldest step first per job."""
    store = _store(root)
    store.check_store()  # a mistyped root raises NoStoreError instead of looking empty
    jobs = [validate_job_name(job)] if job is not None else store.jobs()
    return [store.read_manifest(j, s) for j in jobs for s in store.steps(j)]
