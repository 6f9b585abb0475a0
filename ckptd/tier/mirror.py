"""Reading checkpoints from the tier: :class:`TierStore`, a read-only :class:`Store` over a local
cache of the bucket, so every reader of a store (``ckptd list / show / verify / restore``,
``ckptd_client.load / restore``, the DCP reader) reads the tier unchanged.

The cache is a directory laid out as a store (:func:`cache_root`): ``$CKPTD_CACHE``, else
``$XDG_CACHE_HOME/ckptd``, else ``~/.cache/ckptd``, then ``tier/<bucket>/<prefix>/_store``
(created private, 0700; the last component is no job name and no prefix component, so the caches
of two prefixes never overlap). What comes in:

- metadata, once per job and :class:`TierStore` (:meth:`TierStore.refresh` asks again): the job's
  manifests, mirrored exactly (a manifest gone from the bucket leaves the cache, a changed one is
  replaced; an unchanged one, same size and modification time, is not fetched again). Part sets
  of steps the bucket no longer holds leave the cache too. Jobs are listed from the bucket.
- a multi-rank step's part, when a reader asks for it (:meth:`TierStore.read_part`), checked
  against the checksum its global record names before it goes into the cache.
- an object, when a reader asks for it (:meth:`TierStore.read_object`), decoded and checked
  against its BLAKE3 name before it goes into the cache (the store's own atomic write: tmp file,
  rename). A damaged object is never cached: :class:`CorruptCheckpointError` names its key in the
  bucket and what is wrong with it, as does an object the tier lacks. An object in the cache is
  trusted as a local store trusts its files: every read verifies it against its name anyway.

Read-only: every method of :class:`Store` that writes, deletes, pins or locks raises
:class:`TierError`: the daemon writes the tier, and applies its retention.

Thread safety: as :class:`Store`. The metadata sync of a job runs under one lock per
TierStore; object and part fetches may race (same name, same bytes, atomic rename). Processes
sharing a cache may race the same way.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from ckptd.errors import (
    CorruptCheckpointError,
    InvalidNameError,
    ManifestError,
    NoStoreError,
    NotFoundError,
    TierError,
)
from ckptd.format.codec import decode, read_header
from ckptd.format.fsutil import durable_write, ensure_dir, os_error
from ckptd.format.hashing import content_hash
from ckptd.format.layout import JobDir
from ckptd.format.manifest import Manifest, PartRef, manifest_checksum, step_from_name
from ckptd.format.store import Store, validate_job_name
from ckptd.tier import keys
from ckptd.tier.remote import Listed, Remote, TierSettings, TierUrl, open_remote, parse_url

CACHE_STORE_DIR = "_store"
"""The cache's store directory under ``tier/<bucket>/<prefix>``: neither a job name nor a prefix
component can be ``_store``, so a prefix nested in another never lands in its cache."""


def cache_base() -> Path:
    """Where ckptd caches: ``$CKPTD_CACHE``, else ``$XDG_CACHE_HOME/ckptd``, else
    ``~/.cache/ckptd``."""
    explicit = os.environ.get("CKPTD_CACHE")
    if explicit:
        return Path(explicit).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return (base / "ckptd").absolute()


def cache_root(url: TierUrl) -> Path:
    """The cache directory (a store) of the tier ``url``."""
    path = cache_base() / "tier" / url.bucket
    for part in url.prefix.split("/") if url.prefix else []:
        path /= part
    return path / CACHE_STORE_DIR


def _private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each private to this user (0700)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            pass  # another process made it
        except OSError as exc:
            raise os_error(exc, "create directory", p) from exc


def _refuse(what: str) -> Callable[..., NoReturn]:
    """A :class:`Store` method that writes, as a :class:`TierStore` has it: refused."""

    def refuse(self: TierStore, *args: object, **kwargs: object) -> NoReturn:
        raise TierError(
            f"cannot {what} in {self.url}: the tier is read-only here; the daemon writes it (and "
            "applies its retention, [tier.retention]). Write to a local store's root instead"
        )

    return refuse


_local = threading.local()


def _scratch(size: int) -> memoryview:
    """A per-thread buffer of ``size`` bytes, reused by the thread's next fetch."""
    buf: bytearray | None = getattr(_local, "raw", None)
    if buf is None or len(buf) < size:
        buf = _local.raw = bytearray(size)
    return memoryview(buf)[:size]


def check_object_bytes(data: bytes, digest: str, where: str) -> None:
    """Raise :class:`CorruptCheckpointError` (naming ``where``) unless ``data`` is an object file
    that decodes to bytes hashing to ``digest``; :class:`~ckptd.errors.FormatVersionError` for an
    object of a newer format."""
    _codec, _elem, raw_len = read_header(data, where=where)
    raw = _scratch(raw_len)
    decode(data, raw, where=where)
    actual = content_hash(raw)
    if actual != digest:
        raise CorruptCheckpointError(
            f"{where} is corrupt: its content hashes to {actual[:16]}..., not its name"
        )


class TierStore(Store):
    """The checkpoints in the tier ``remote``, read through a local cache at ``root`` (default
    :func:`cache_root`). Creating one contacts nothing and creates only the cache directory."""

    def __init__(self, remote: Remote, root: Path | str | None = None) -> None:
        self.remote = remote
        self.url = remote.url
        cache = Path(root) if root is not None else cache_root(remote.url)
        _private_dirs(cache)
        super().__init__(cache)
        self._sync_lock = threading.Lock()
        self._synced: set[str] = set()

    def __repr__(self) -> str:
        return f"TierStore({self.url}, cache {self.root})"

    def where(self, key: str) -> str:
        """The bucket key ``key`` (relative to the tier's prefix) as a URL, for messages."""
        return f"s3://{self.url.bucket}/{self.url.full_key(key)}"

    def refresh(self) -> None:
        """Sync each job's metadata from the bucket again when it is next asked for."""
        with self._sync_lock:
            self._synced.clear()

    # ---- metadata ------------------------------------------------------------------------------

    def _job(self, job: str) -> JobDir:
        jd = super()._job(job)
        if jd.name not in self._synced:
            with self._sync_lock:
                if jd.name not in self._synced:
                    self._sync(jd)
                    self._synced.add(jd.name)
        return jd

    def _sync(self, jd: JobDir) -> None:
        """Make the cache's manifests of ``jd`` those of the bucket (see the module docstring)."""
        listed: dict[int, Listed] = {}
        for item in self.remote.list(keys.manifests_prefix(jd.name)):
            step = keys.manifest_step(jd.name, item.key)
            if step is not None:
                listed[step] = item
        if not listed:  # no such job in the bucket (any more)
            for sub in (jd.manifests, jd.parts):
                shutil.rmtree(sub, ignore_errors=True)
            return
        for sub in (jd.manifests, jd.objects, jd.tmp):
            ensure_dir(sub)
        for name in os.listdir(jd.manifests):
            step = step_from_name(name)
            if step is not None and step not in listed:
                (jd.manifests / name).unlink(missing_ok=True)
        for step, item in sorted(listed.items()):
            path = jd.manifest(step)
            mtime_ns = round(item.mtime * 1e9)
            try:
                st = path.stat()
                if st.st_size == item.size and st.st_mtime_ns == mtime_ns:
                    continue
            except FileNotFoundError:
                pass
            try:
                data = self.remote.get(item.key)
            except NotFoundError:  # deleted since the listing
                path.unlink(missing_ok=True)
                continue
            durable_write(path, [data], tmp_dir=jd.tmp, sync_dir=False, mode=0o600)
            os.utime(path, ns=(mtime_ns, mtime_ns))
        if jd.parts.is_dir():
            for entry in os.listdir(jd.parts):
                step = step_from_name(f"{entry}.json")
                if step is None or step not in listed:
                    shutil.rmtree(jd.parts / entry, ignore_errors=True)

    def jobs(self) -> list[str]:
        """The jobs in the bucket (directories with a valid job name holding manifests)."""
        out = []
        for name in self.remote.dirs(""):
            try:
                validate_job_name(name)
            except InvalidNameError:
                continue
            if "manifests" in self.remote.dirs(name):
                out.append(name)
        return out

    def check_store(self) -> None:
        """Raise :class:`NoStoreError` unless the bucket holds a tier (its marker or a job);
        :class:`TierError` when it cannot be reached."""
        if self.remote.size(keys.MARKER) is not None or self.jobs():
            return
        raise NoStoreError(
            f"{self.url} holds no ckptd checkpoints (no {keys.MARKER} marker, no job with "
            "manifests); check the bucket and prefix of the URL, or whether the daemon has "
            "uploaded anything yet (ckptd status)"
        )

    def _no_checkpoints(self, job: str) -> NoReturn:
        self.check_store()
        known = ", ".join(self.jobs()) or "none"
        raise NotFoundError(f"job {job!r} has no checkpoints in {self.url} (jobs there: {known})")

    def steps_by_commit(self, job: str) -> list[int]:
        """The tier's steps in commit order by creation time (:func:`keys.tier_order`): commits
        of several daemons meet in a bucket, and their ``seq`` come from separate counters. A
        damaged manifest counts as the newest, so that ``latest`` reports it when read."""
        steps = super().steps_by_commit(job)

        def order(step: int) -> tuple[str, int, int]:
            try:
                return keys.tier_order(self.read_manifest(job, step))
            except ManifestError:
                return ("\uffff", 0, step)

        return sorted(steps, key=order)

    # ---- parts and objects, fetched when read --------------------------------------------------

    def read_part(self, job: str, step: int, rank: int, record: Manifest | None = None) -> Manifest:
        record = record or self.read_manifest(job, step)
        if record.is_global and 0 <= rank < record.world_size:
            self._fetch_part(self._job(job), step, record.parts[rank])
        return super().read_part(job, step, rank, record)

    def _fetch_part(self, jd: JobDir, step: int, ref: PartRef) -> None:
        """Put rank ``ref.rank``'s part into the cache unless the right one is there."""
        path = jd.path / ref.record
        try:
            if manifest_checksum(path.read_bytes()) == ref.checksum:
                return
        except (FileNotFoundError, ManifestError):
            pass
        except OSError as exc:
            raise os_error(exc, "read", path) from exc
        try:
            key = keys.record_key(jd.name, ref.record)
        except ValueError as exc:
            raise ManifestError(f"job {jd.name!r} step {step}: {exc}") from None
        where = f"job {jd.name!r} step {step}: rank {ref.rank}'s part {self.where(key)}"
        try:
            data = self.remote.get(key)
        except NotFoundError:
            raise ManifestError(
                f"{where} is missing from the tier; the step is damaged there: restore another step"
            ) from None
        try:
            checksum = manifest_checksum(data)
        except ManifestError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        if checksum != ref.checksum:
            raise ManifestError(
                f"{where} is not the part the step committed (checksum differs); the step is "
                "damaged there: restore another step"
            )
        _private_dirs(path.parent)
        durable_write(path, [data], tmp_dir=jd.tmp, sync_dir=False, mode=0o600)

    def _fetch_object(self, job: str, digest: str) -> None:
        """Put object ``digest`` into the cache, verified, unless a file holds its name."""
        path = self.object_path(job, digest)
        if path.is_file():
            return
        key = keys.object_key(job, digest)
        where = f"object {self.where(key)}"
        try:
            data = self.remote.get(key)
        except NotFoundError:
            raise CorruptCheckpointError(
                f"{where} is missing: the tier lacks it, so the checkpoints that name it do not "
                "restore from the tier"
            ) from None
        try:
            check_object_bytes(data, digest, where)
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"{exc} (in the tier; not cached)") from None
        jd = self._job(job)
        ensure_dir(jd.tmp)
        self._objects.write(jd, digest, [data])

    def has_object(self, job: str, digest: str) -> bool:
        """Whether the cache or the tier holds object ``digest`` (its content is not checked)."""
        return super().has_object(job, digest) or (
            self.remote.size(keys.object_key(job, digest)) is not None
        )

    def object_header(self, job: str, digest: str) -> tuple[int, int, int, int]:
        self._fetch_object(job, digest)
        return super().object_header(job, digest)

    def read_object(self, job: str, digest: str, into: bytearray | None = None) -> memoryview:
        self._fetch_object(job, digest)
        return super().read_object(job, digest, into)

    # ---- read-only -----------------------------------------------------------------------------

    initialize = _refuse("initialize a store")
    open_job = _refuse("open a job for writing")
    job_lock = _refuse("lock a job")
    commit_lock = _refuse("commit")
    commit_manifest = _refuse("commit")
    commit_step = _refuse("commit")
    write_part = _refuse("write a part")
    write_object = _refuse("write an object")
    reusable_object = _refuse("reuse an object")
    make_durable = _refuse("write objects")
    pin = _refuse("pin a checkpoint")
    unpin = _refuse("unpin a checkpoint")
    mark_upload = _refuse("queue an upload")
    unmark_upload = _refuse("unqueue an upload")
    update_job_info = _refuse("record job settings")
    claim_job = _refuse("claim a job")
    delete_checkpoint = _refuse("delete a checkpoint")
    quarantine_object = _refuse("quarantine an object")
    collect_parts = _refuse("collect parts")
    gc = _refuse("collect garbage")
    gc_unlocked = _refuse("collect garbage")
    sweep_tmp = _refuse("sweep tmp files")


_tier_stores: dict[tuple[TierSettings, Path, tuple[tuple[str, str], ...]], TierStore] = {}
_tier_stores_lock = threading.Lock()


def tier_store(url: str, settings: TierSettings | None = None) -> TierStore:
    """The :class:`TierStore` of ``url`` reached with ``settings`` (default: the AWS environment,
    ``AWS_ENDPOINT_URL`` ...; the config's endpoint comes from
    :func:`ckptd.config.tier_settings_for`): one per URL, settings, cache directory and AWS
    environment in this process. Each call syncs the bucket's metadata again when a job is next
    read (:meth:`TierStore.refresh`). Raises :class:`TierError` for a malformed URL; contacts
    nothing yet."""
    parsed = parse_url(url)
    wanted = TierSettings(parsed) if settings is None else settings
    if wanted.url != parsed:
        raise ValueError(f"settings for {wanted.url} given for {parsed}")
    aws = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (wanted, cache_root(parsed), aws)
    with _tier_stores_lock:
        store = _tier_stores.get(key)
        if store is None:
            store = _tier_stores[key] = TierStore(open_remote(wanted))
    store.refresh()
    return store
