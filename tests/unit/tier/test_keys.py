"""The tier's keys are a local store's relative paths, and only ckptd's own shapes are recognized.

The first test saves real checkpoints (one single-rank, one two-rank step) into a local store and
checks every file it wrote against :mod:`ckptd.tier.keys`: a bucket must read like a store. The
tables then feed :func:`~ckptd.tier.keys.object_digest` and :func:`~ckptd.tier.keys.manifest_step`
keys that are not ckptd's (another job's, malformed names, other depths): each must give None,
since the tier deletes only what these recognize.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckptd_client
from ckptd.errors import InvalidNameError, ManifestError
from ckptd.format.parts import DECISION
from ckptd.tier import keys

DIGEST = "ab" + "0123456789abcdef" * 3 + "0123456789abcd"
assert len(DIGEST) == 64


def files_of(root: Path, job: str) -> dict[str, list[str]]:
    """The store's files of ``job`` by kind, as paths relative to the root (without a part set's
    local commit ``decision``, which the tier has no key for)."""
    found: dict[str, list[str]] = {"objects": [], "manifests": [], "parts": []}
    for path in sorted((root / job).rglob("*")):
        rel = path.relative_to(root).as_posix()
        kind = rel.split("/")[1]
        if path.is_file() and kind in found and path.name != DECISION:
            found[kind].append(rel)
    return found


def test_keys_are_the_local_stores_relative_paths(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ckptd_client.save("single", state={"w": torch.arange(8.0)}, step=1200, root=root)
    for rank in (0, 1):
        ckptd_client.save(
            "ranked",
            state={"w": torch.full((4,), float(rank))},
            step=7,
            root=root,
            rank=rank,
            world_size=2,
            attempt="try-1",
        )
    assert (root / keys.MARKER).is_file()

    single = files_of(root, "single")
    assert single["manifests"] == [keys.manifest_key("single", 1200)]
    assert keys.manifest_key("single", 1200) == "single/manifests/step-000000001200.json"
    assert keys.manifests_prefix("single") == "single/manifests"
    assert single["objects"], single
    for rel in single["objects"]:
        digest = rel.rsplit("/", 1)[1]
        assert keys.object_key("single", digest) == rel
        assert keys.object_digest("single", rel) == digest
        assert rel.startswith(keys.objects_prefix("single") + "/")
    assert keys.manifest_step("single", single["manifests"][0]) == 1200

    ranked = files_of(root, "ranked")
    assert ranked["parts"] == [keys.part_key("ranked", 7, "try-1", r) for r in (0, 1)]
    assert ranked["parts"][1] == "ranked/parts/step-000000000007/try-1/rank-00001.json"
    for rel in ranked["parts"]:
        assert rel.startswith(keys.part_set_prefix("ranked", 7, "try-1") + "/")
        assert rel.startswith(keys.parts_prefix("ranked") + "/")
        assert keys.record_key("ranked", rel.split("/", 1)[1]) == rel
    assert ranked["manifests"] == [keys.manifest_key("ranked", 7)]
    assert len(ranked["objects"]) == 2  # the ranks' different tensors
    assert all(keys.object_digest("ranked", rel) for rel in ranked["objects"])


def test_key_builders_refuse_what_no_store_could_hold() -> None:
    with pytest.raises(InvalidNameError, match="invalid job name"):
        keys.object_key("../up", DIGEST)
    with pytest.raises(InvalidNameError):
        keys.manifest_key("a/b", 1)
    with pytest.raises(ManifestError, match="invalid object hash"):
        keys.object_key("job", "../../etc")
    with pytest.raises(ValueError, match="step must be an integer"):
        keys.manifest_key("job", -1)
    with pytest.raises(ValueError, match="attempt must be"):
        keys.part_key("job", 1, "../x", 0)


@pytest.mark.parametrize(
    "record",
    [
        "parts/step-000000000007/try-1",
        "parts/step-000000000007/try-1/rank-1.json",
        "parts/step-000000000007/try-1/rank-00001.json/x",
        "manifests/step-000000000007/try-1/rank-00001.json",
    ],
)
def test_record_key_refuses_what_is_not_a_part_record(record: str) -> None:
    with pytest.raises(ValueError, match="not a part record path"):
        keys.record_key("job", record)


def test_object_digest_takes_ckptds_object_keys() -> None:
    assert keys.object_digest("job", f"job/objects/ab/{DIGEST}") == DIGEST
    assert keys.object_digest("j.o-b_1", f"j.o-b_1/objects/ab/{DIGEST}") == DIGEST


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(f"other/objects/ab/{DIGEST}", id="another-job"),
        pytest.param(f"jo/objects/ab/{DIGEST}", id="a-job-named-like-a-prefix"),
        pytest.param(f"jobs/objects/ab/{DIGEST}", id="a-job-this-job-is-a-prefix-of"),
        pytest.param(f"job/manifests/ab/{DIGEST}", id="not-the-objects-dir"),
        pytest.param(f"job/quarantine/{DIGEST}", id="quarantine"),
        pytest.param(f"job/objects/AB/{DIGEST.upper()}", id="upper-case-hex"),
        pytest.param(f"job/objects/ab/{DIGEST[:-1]}", id="63-hex-digits"),
        pytest.param(f"job/objects/ab/{DIGEST}0", id="65-hex-digits"),
        pytest.param(f"job/objects/ab/{DIGEST[:-1]}g", id="not-hex"),
        pytest.param(f"job/objects/ab/{DIGEST}.tmp", id="a-tmp-name"),
        pytest.param(f"job/objects/cd/{DIGEST}", id="wrong-fan-out-dir"),
        pytest.param(f"job/objects/a/{DIGEST}", id="short-fan-out-dir"),
        pytest.param(f"job/objects/{DIGEST}", id="no-fan-out-dir"),
        pytest.param(f"job/objects/ab/{DIGEST}/x", id="extra-depth-below"),
        pytest.param(f"x/job/objects/ab/{DIGEST}", id="extra-depth-above"),
        pytest.param(f"job/objects/ab/ab/{DIGEST}", id="fan-out-twice"),
        pytest.param(f"/job/objects/ab/{DIGEST}", id="absolute"),
        pytest.param("job/objects/ab", id="a-directory"),
        pytest.param("", id="empty"),
    ],
)
def test_object_digest_rejects_foreign_keys(key: str) -> None:
    assert keys.object_digest("job", key) is None


def test_manifest_step_takes_ckptds_manifest_keys() -> None:
    assert keys.manifest_step("job", "job/manifests/step-000000001200.json") == 1200
    assert keys.manifest_step("job", keys.manifest_key("job", 999_999_999_999)) == 999_999_999_999


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("other/manifests/step-000000001200.json", id="another-job"),
        pytest.param("jo/manifests/step-000000001200.json", id="a-job-named-like-a-prefix"),
        pytest.param("job/pins/step-000000001200.json", id="a-pin"),
        pytest.param("job/uploads/step-000000001200.json", id="an-upload-mark"),
        pytest.param("job/manifests/step-1200.json", id="not-fixed-width"),
        pytest.param("job/manifests/step-0000000012000.json", id="13-digits"),
        pytest.param("job/manifests/step-00000000120x.json", id="not-digits"),
        pytest.param("job/manifests/step-000000001200.json.tmp", id="a-tmp-name"),
        pytest.param("job/manifests/step-000000001200", id="no-suffix"),
        pytest.param("job/manifests/x/step-000000001200.json", id="extra-depth-below"),
        pytest.param("x/job/manifests/step-000000001200.json", id="extra-depth-above"),
        pytest.param("job/step-000000001200.json", id="too-shallow"),
        pytest.param("/job/manifests/step-000000001200.json", id="absolute"),
        pytest.param("job/parts/step-000000001200/try-1/rank-00000.json", id="a-part-record"),
    ],
)
def test_manifest_step_rejects_foreign_keys(key: str) -> None:
    assert keys.manifest_step("job", key) is None
