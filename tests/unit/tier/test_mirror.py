"""TierStore over an in-memory Remote: the cache mirrors the bucket's manifests, fetches parts and
objects when read and verifies them on the way in, never caches a damaged one, and refuses every
write. Checkpoints are real ones (``ckptd_client.save`` to a local store), copied to the bucket
byte for byte as the daemon's uploader does (objects first, manifests last)."""

from __future__ import annotations

import builtins
import itertools
import json
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.cli.main import main
from ckptd.errors import (
    EXIT_CODES,
    CorruptCheckpointError,
    ManifestError,
    NoStoreError,
    NotFoundError,
    TierError,
)
from ckptd.format.restore import load_checkpoint, verify_manifest
from ckptd.format.store import Store
from ckptd.tier import keys, mirror
from ckptd.tier.mirror import TierStore, cache_root, tier_store
from ckptd.tier.remote import Data, Listed, TierSettings, TierUrl, parse_url
from ckptd_client import api

JOB = "run"
RANKS = "ranks"
URL = "s3://bucket/team/ckpt"


class MemoryRemote:
    """A :class:`~ckptd.tier.remote.Remote` in memory, counting the GETs of each key."""

    def __init__(self, url: str = URL) -> None:
        self.url: TierUrl = parse_url(url)
        self.blobs: dict[str, tuple[bytes, float]] = {}
        self.gets: list[str] = []
        self._clock = itertools.count(1_700_000_000)

    def get(self, key: str) -> bytes:
        self.gets.append(key)
        if key not in self.blobs:
            raise NotFoundError(f"{self.url}/{key} is not in the tier")
        return self.blobs[key][0]

    def put(self, key: str, data: Data) -> None:
        self.blobs[key] = (bytes(data), float(next(self._clock)))

    def put_new(self, key: str, data: Data) -> bool:
        if key in self.blobs:
            return False
        self.put(key, data)
        return True

    def size(self, key: str) -> int | None:
        return len(self.blobs[key][0]) if key in self.blobs else None

    def list(self, prefix: str) -> Iterator[Listed]:
        for key in sorted(self.blobs):
            if not prefix or key.startswith(prefix.rstrip("/") + "/"):
                data, mtime = self.blobs[key]
                yield Listed(key, len(data), mtime)

    def dirs(self, prefix: str) -> builtins.list[str]:
        head = prefix.rstrip("/") + "/" if prefix else ""
        return sorted(
            {
                k[len(head) :].split("/")[0]
                for k in self.blobs
                if k.startswith(head) and "/" in k[len(head) :]
            }
        )

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.blobs.pop(key, None)

    def check(self) -> None:
        pass

    def object_gets(self) -> builtins.list[str]:
        return [k for k in self.gets if "/objects/" in k]


def upload(root: Path, remote: MemoryRemote) -> None:
    """Copy a local store's tree to the bucket as the uploader does: objects, parts, marker,
    manifests last."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    wanted = [
        p
        for p in files
        if p.name == keys.MARKER
        or "objects" in p.parts
        or "manifests" in p.parts
        or ("parts" in p.parts and p.name.startswith("rank-"))
    ]
    for path in sorted(wanted, key=lambda p: "manifests" in p.parts):
        remote.put(path.relative_to(root).as_posix(), path.read_bytes())


def state_of(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 16, generator=g),
        "b": torch.randn(16, generator=g).to(torch.bfloat16),
        "n": torch.arange(seed, seed + 100),
        "meta": {"seed": seed},
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("CKPTD_CACHE", str(path))
    return path


@pytest.fixture
def local(root: Path) -> Path:
    """A local store: job ``run`` steps 1 and 2 (one process), job ``ranks`` step 5 (2 ranks)."""
    for step in (1, 2):
        api.save(JOB, state=state_of(step), step=step, root=root, rng=False)
    for rank in (0, 1):
        api.save(
            RANKS,
            state=state_of(10 + rank),
            step=5,
            root=root,
            rng=False,
            rank=rank,
            world_size=2,
            attempt="a1",
        )
    return root


@pytest.fixture
def remote(local: Path) -> MemoryRemote:
    r = MemoryRemote()
    upload(local, r)
    return r


@pytest.fixture
def tier(remote: MemoryRemote, cache: Path) -> TierStore:
    return TierStore(remote)


def object_key_of(store: Store, job: str, step: int, tensor: str) -> tuple[str, str]:
    m = store.read_manifest(job, step)
    digest = next(t.pieces[0].object for t in m.tensors if t.path == tensor)
    return digest, keys.object_key(job, digest)


# ---- the cache directory -----------------------------------------------------------------------


def test_cache_root_follows_ckptd_cache_then_xdg_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = parse_url("s3://bkt/a/b")
    monkeypatch.setenv("CKPTD_CACHE", str(tmp_path / "c"))
    assert cache_root(url) == tmp_path / "c" / "tier" / "bkt" / "a" / "b" / "_store"
    monkeypatch.delenv("CKPTD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root(url) == tmp_path / "x" / "ckptd" / "tier" / "bkt" / "a" / "b" / "_store"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_root(parse_url("s3://bkt")) == tmp_path / "h/.cache/ckptd/tier/bkt/_store"
    # A nested prefix's cache never lands in a job directory of its parent's.
    parent, nested = cache_root(parse_url("s3://bkt/a")), cache_root(parse_url("s3://bkt/a/run"))
    assert not nested.is_relative_to(parent / "run")


def test_cache_is_created_private(remote: MemoryRemote, cache: Path) -> None:
    store = TierStore(remote)
    made = [store.root, *(p for p in store.root.parents if p.is_relative_to(cache))]
    assert cache in made and len(made) == 6  # cache/tier/bucket/team/ckpt/_store
    for d in made:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


# ---- reading ------------------------------------------------------------------------------------


def test_reads_like_the_local_store_fetching_objects_only_when_read(
    tier: TierStore, local: Path, remote: MemoryRemote
) -> None:
    src = Store(local)
    tier.check_store()
    assert tier.jobs() == [RANKS, JOB]
    assert tier.steps(JOB) == [1, 2] and tier.steps_by_commit(JOB) == [1, 2]
    assert tier.resolve_step(JOB, "latest") == 2
    assert tier.read_manifest(JOB, 2) == src.read_manifest(JOB, 2)
    assert remote.object_gets() == []  # metadata only so far
    loaded = load_checkpoint(tier, JOB, 1)
    assert same(loaded.state, state_of(1))
    wanted = {keys.object_key(JOB, d) for d in src.read_manifest(JOB, 1).objects}
    assert set(remote.object_gets()) == wanted
    # Cached: read again without fetching, and the cache holds the bucket's bytes.
    remote.gets.clear()
    assert same(load_checkpoint(tier, JOB, 1).state, state_of(1))
    assert remote.object_gets() == []
    for key in wanted:
        assert (tier.root / key).read_bytes() == remote.blobs[key][0]


def test_multi_rank_step_reads_each_rank_from_the_bucket(tier: TierStore) -> None:
    record = tier.read_manifest(RANKS, 5)
    assert record.is_global and record.world_size == 2
    for rank in (0, 1):
        loaded = load_checkpoint(tier, RANKS, 5, rank=rank)
        assert loaded.manifest.rank == rank
        assert same(loaded.state, state_of(10 + rank))


def test_a_part_missing_or_not_the_committed_one_is_refused_naming_its_key(
    tier: TierStore, remote: MemoryRemote
) -> None:
    record = tier.read_manifest(RANKS, 5)
    key0 = keys.record_key(RANKS, record.parts[0].record)
    key1 = keys.record_key(RANKS, record.parts[1].record)
    remote.blobs[key0] = remote.blobs[key1]  # rank 1's part under rank 0's name
    with pytest.raises(ManifestError, match=f"s3://bucket/team/ckpt/{key0} is not the part"):
        tier.read_part(RANKS, 5, 0)
    assert not (tier.root / key0).exists()
    del remote.blobs[key1]
    with pytest.raises(ManifestError, match=f"{key1} is missing from the tier"):
        tier.read_part(RANKS, 5, 1)


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_damaged_object_is_refused_naming_its_key_and_never_cached(
    tier: TierStore, remote: MemoryRemote, local: Path, damage: str
) -> None:
    digest, key = object_key_of(Store(local), JOB, 2, "w")
    data = remote.blobs[key][0]
    if damage == "flip":
        remote.put(key, data[:-10] + bytes([data[-10] ^ 0x40]) + data[-9:])
        why = "is corrupt: its content hashes to"
    elif damage == "truncate":
        remote.put(key, data[: len(data) // 2])
        why = "truncated"
    else:
        del remote.blobs[key]
        why = "is missing: the tier lacks it"
    with pytest.raises(CorruptCheckpointError, match=why) as info:
        load_checkpoint(tier, JOB, 2)
    assert f"s3://bucket/team/ckpt/{key}" in str(info.value)
    assert not tier.object_path(JOB, digest).exists()
    problems = verify_manifest(tier, tier.read_manifest(JOB, 2))
    assert len(problems) == 1 and key in problems[0] and why.split(":")[0] in problems[0]
    assert not tier.object_path(JOB, digest).exists()
    # The other step does not use it and still loads; fallback skips the damaged latest.
    with pytest.warns(UserWarning, match="skipping newer checkpoint"):
        assert load_checkpoint(tier, JOB, "latest", fallback=True).step == 1


def test_the_cache_mirrors_the_bucket_manifests(
    tier: TierStore, remote: MemoryRemote, local: Path
) -> None:
    assert tier.steps(JOB) == [1, 2]
    cached = tier.manifest_path(JOB, 1)
    assert cached.exists()
    # Gone from the bucket: gone from the cache at the next sync.
    del remote.blobs[keys.manifest_key(JOB, 1)]
    assert tier.steps(JOB) == [1, 2]  # synced once per job until refreshed
    tier.refresh()
    assert tier.steps(JOB) == [2] and not cached.exists()
    # Replaced in the bucket (the step committed again): replaced in the cache.
    Store(local).delete_checkpoint(JOB, 1)
    api.save(JOB, state=state_of(99), step=2, root=local, rng=False)
    upload(local, remote)
    tier.refresh()
    assert tier.read_manifest(JOB, 2) == Store(local).read_manifest(JOB, 2)
    assert same(load_checkpoint(tier, JOB, 2).state, state_of(99))
    # Unchanged manifests are not fetched again.
    remote.gets.clear()
    tier.refresh()
    assert tier.steps(JOB) == [2] and remote.gets == []
    # A job gone from the bucket has no checkpoints left in the cache; its parts go too.
    assert len(tier.step_parts(RANKS, 5)) == 2 and (tier.root / RANKS / "parts").is_dir()
    remote.delete([k for k in remote.blobs if k.startswith(f"{RANKS}/manifests/")])
    tier.refresh()
    assert tier.steps(RANKS) == [] and RANKS not in tier.jobs()
    assert not (tier.root / RANKS / "parts").exists()
    with pytest.raises(NotFoundError, match=f"no checkpoints in {URL}"):
        tier.resolve_step(RANKS, "latest")


def test_jobs_are_the_bucket_directories_with_valid_names_and_manifests(
    tier: TierStore, remote: MemoryRemote
) -> None:
    remote.put("notes/readme.txt", b"x")
    remote.put("_private/manifests/step-000000000001.json", b"x")
    remote.put("half/objects/ab/cd", b"x")
    assert tier.jobs() == [RANKS, JOB]


def test_check_store_names_the_url(cache: Path) -> None:
    empty = MemoryRemote("s3://bucket/nothing-here")
    with pytest.raises(NoStoreError, match="s3://bucket/nothing-here holds no ckptd checkpoints"):
        TierStore(empty).check_store()
    empty.put(keys.MARKER, b"{}")
    TierStore(empty).check_store()  # a marked tier with no checkpoints yet is a store


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("initialize", ()),
        ("open_job", (JOB,)),
        ("pin", (JOB, 1)),
        ("unpin", (JOB, 1)),
        ("delete_checkpoint", (JOB, 1)),
        ("write_object", (JOB, "0" * 64, [b""])),
        ("commit_manifest", (None,)),
        ("quarantine_object", (JOB, "0" * 64)),
        ("gc", (JOB,)),
        ("collect_parts", (JOB,)),
        ("job_lock", (JOB,)),
        ("update_job_info", (JOB,)),
    ],
)
def test_every_write_is_refused(cache: Path, method: str, args: tuple[Any, ...]) -> None:
    remote = MemoryRemote()
    remote.put(keys.MARKER, b"{}")
    tier = TierStore(remote)
    with pytest.raises(TierError, match=f"in {URL}: the tier is read-only here; the daemon"):
        getattr(tier, method)(*args)
    assert list(remote.blobs) == [keys.MARKER]
    assert not any(tier.root.iterdir())


def test_save_to_the_tier_is_refused(
    remote: MemoryRemote, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror, "open_remote", lambda settings: remote)
    with pytest.raises(TierError, match="read-only"):
        api.save(JOB, state=state_of(3), step=3, root=URL, rng=False)
    assert keys.manifest_key(JOB, 3) not in remote.blobs


def test_tier_store_is_one_per_url_and_settings(
    remote: MemoryRemote, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror, "_tier_stores", {})
    monkeypatch.setattr(mirror, "open_remote", lambda settings: remote)
    a = tier_store(URL)
    assert tier_store(URL + "/") is a
    other = tier_store(URL, TierSettings(parse_url(URL), endpoint="http://127.0.0.1:1"))
    assert other is not a and other.root == a.root
    # ckptd_client reads through it (load / list_checkpoints with root="s3://...").
    assert same(api.load(JOB, 1, root=URL), state_of(1))
    assert [m.step for m in api.list_checkpoints(JOB, root=URL)] == [1, 2]
    with pytest.raises(TierError, match="not a valid bucket name"):
        tier_store("s3://B/x")


# ---- the CLI on a tier ---------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    assert isinstance(info.value.code, int)
    return info.value.code, captured.out, captured.err


def test_cli_lists_with_the_tier_retention_and_names_a_damaged_cached_copy(
    remote: MemoryRemote,
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(mirror, "_tier_stores", {})
    monkeypatch.setattr(mirror, "open_remote", lambda settings: remote)
    monkeypatch.setenv("COLUMNS", "160")
    conf = tmp_path / "tier.toml"
    conf.write_text(f'[tier]\nurl = "{URL}"\n[tier.retention]\nkeep_last = 1\n[retention]\n')
    code, out, _ = run_cli(capsys, "list", JOB, "--json", "--root", URL, "--config", conf)
    assert code == 0
    assert [(r["step"], r["kept_by"]) for r in json.loads(out)] == [
        (1, []),
        (2, ["newest", "last 1"]),
    ]
    # A cached copy damaged after it verified on the way in: named as the cache's, not the tier's.
    tier = tier_store(URL)
    digest, _key = object_key_of(tier, JOB, 2, "w")
    load_checkpoint(tier, JOB, 2)
    cached = tier.object_path(JOB, digest)
    data = bytearray(cached.read_bytes())
    data[-3] ^= 0x10
    cached.write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "verify", JOB, "2", "--root", URL, "--config", conf)
    assert code == EXIT_CODES["CorruptCheckpointError"], (out, err)
    assert f"damaged     {cached}, the cached copy (referenced by {JOB} step 2)" in out
    assert "do not restore from the tier" not in out
    assert cached.read_bytes() == bytes(data)  # nothing moved
    # The commands that change a store refuse the tier before anything else.
    code, _, err = run_cli(capsys, "rm", JOB, "1", "--yes", "--root", URL)
    assert code == EXIT_CODES["TierError"] and "ckptd rm changes a store" in err
    assert keys.manifest_key(JOB, 1) in remote.blobs
