"""The tier's own retention against a real S3 server (``weed mini``, :mod:`tests.tier_server`).

Real checkpoints (``ckptd_client.save`` to a local store: a single-process job of four steps and
a two-rank job of two steps) are copied to the bucket byte for byte as the uploader lays them out
(objects, part records, manifests last), next to keys ckptd did not write. Then:

- with the default grace period, retention deletes the manifests (and a deleted multi-rank
  step's part records) and keeps every object, all just written; with no grace left it collects
  exactly the objects no remaining checkpoint uses, judged by the server's own mtimes, and every
  remaining checkpoint is whole; foreign keys survive;
- a damaged manifest in the bucket stops the job with a TierError naming its ``s3://`` key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd_client
from ckptd.errors import TierError
from ckptd.format.store import Store
from ckptd.policy.retention import RetentionPolicy
from ckptd.tier import keys
from ckptd.tier.prune import prune_tier
from ckptd.tier.remote import Remote
from tests.tier_server import WeedServer

JOB = "single"
RANKS = "ranks"


def state_of(seed: int) -> dict[str, Any]:
    """A tensor every checkpoint shares and one of its own: an object each."""
    return {"shared": torch.arange(1024.0), "own": torch.full((256,), float(seed))}


def upload(root: Path, remote: Remote, job: str) -> None:
    """Put ``job``'s tree of the local store in the bucket as the uploader does: objects, part
    records, manifests last."""
    files = [p for p in (root / job).rglob("*") if p.is_file()]
    shipped = [
        p
        for p in files
        if p.parent.parent.name == "objects"
        or p.parent.name == "manifests"
        or (p.name.startswith("rank-") and "parts" in p.relative_to(root).parts)
    ]
    for path in sorted(shipped, key=lambda p: p.parent.name == "manifests"):
        remote.put(path.relative_to(root).as_posix(), path.read_bytes())


def used_objects(store: Store, job: str, steps: list[int]) -> set[str]:
    """The object keys the steps use (a multi-rank step's: its parts')."""
    return {
        keys.object_key(job, digest)
        for step in steps
        for part in store.step_parts(job, step)
        for digest in part.objects
    }


def part_records(store: Store, job: str, step: int) -> set[str]:
    return {keys.record_key(job, ref.record) for ref in store.read_manifest(job, step).parts}


def bucket_keys(remote: Remote) -> set[str]:
    return {item.key for item in remote.list("")}


@pytest.fixture
def local(root: Path) -> Store:
    for step in (1, 2, 3, 4):
        ckptd_client.save(JOB, state=state_of(step), step=step, root=root, rng=False)
    for step in (1, 2):
        for rank in (0, 1):
            ckptd_client.save(
                RANKS,
                state=state_of(10 * step + rank),
                step=step,
                root=root,
                rng=False,
                rank=rank,
                world_size=2,
                attempt="a1",
            )
    return Store(root)


def test_retention_deletes_manifests_then_parts_then_old_unreferenced_objects(
    s3: WeedServer, tier_url: str, local: Store
) -> None:
    remote = s3.remote(tier_url.split("/", 3)[3])
    upload(local.root, remote, JOB)
    upload(local.root, remote, RANKS)
    some = next(iter(local.read_manifest(JOB, 1).objects))
    foreign = {
        f"{JOB}/objects/notes.txt",
        f"{JOB}/objects/ab/{('00' if some[:2] != '00' else '01') + some[2:]}",
        f"{JOB}/README",
        f"{RANKS}/parts/step-000000000001/a1/notes.txt",
        "other.txt",
    }
    for key in foreign:
        remote.put(key, b"not written by ckptd")
    everything = bucket_keys(remote)

    # Just uploaded: the manifests no rule keeps go (and step 1's parts), every object stays.
    single = prune_tier(remote, JOB, RetentionPolicy(keep_last=2))
    ranks = prune_tier(remote, RANKS, RetentionPolicy(keep_last=1))
    assert single.reasons == {4: ["newest", "last 2"], 3: ["last 2"], 2: [], 1: []}
    assert (single.deleted, single.objects_deleted) == ([1, 2], 0)
    assert (ranks.deleted, ranks.objects_deleted) == ([1], 0)
    gone = {keys.manifest_key(JOB, 1), keys.manifest_key(JOB, 2), keys.manifest_key(RANKS, 1)}
    gone |= part_records(local, RANKS, 1)
    assert len(gone) == 5 and everything - bucket_keys(remote) == gone

    # No grace left: exactly the objects no remaining checkpoint uses go, by the server's mtimes.
    single = prune_tier(remote, JOB, RetentionPolicy(keep_last=2), grace_s=0.0)
    ranks = prune_tier(remote, RANKS, RetentionPolicy(keep_last=1), grace_s=0.0)
    freed = used_objects(local, JOB, [1, 2]) - used_objects(local, JOB, [3, 4])
    freed |= used_objects(local, RANKS, [1]) - used_objects(local, RANKS, [2])
    assert len(freed) == 4  # steps 1 and 2's own tensor; step 1's two ranks'
    assert (single.deleted, single.objects_deleted) == ([], 2)
    assert (ranks.deleted, ranks.objects_deleted) == ([], 2)
    assert single.bytes_deleted + ranks.bytes_deleted == sum(
        (local.root / key).stat().st_size for key in freed
    )
    left = bucket_keys(remote)
    assert everything - left == gone | freed and foreign <= left
    # What remains is whole: every part and object of the remaining steps, byte for byte.
    for job, steps in ((JOB, [3, 4]), (RANKS, [2])):
        for key in used_objects(local, job, steps) | {
            k for s in steps for k in part_records(local, job, s)
        }:
            assert remote.get(key) == (local.root / key).read_bytes(), key


def test_a_damaged_manifest_in_the_bucket_stops_the_job(
    s3: WeedServer, tier_url: str, local: Store
) -> None:
    remote = s3.remote(tier_url.split("/", 3)[3])
    upload(local.root, remote, JOB)
    key = keys.manifest_key(JOB, 2)
    remote.put(key, remote.get(key)[:-40])
    before = bucket_keys(remote)
    with pytest.raises(TierError, match=f"{tier_url}/{key}: not valid JSON") as info:
        prune_tier(remote, JOB, RetentionPolicy(keep_last=1), grace_s=0.0)
    assert f"replace or delete {tier_url}/{key}" in str(info.value)
    assert bucket_keys(remote) == before
