"""ckptd.format.manifest: the on-disk format pinned by a golden file, validation, and step names.

The golden file ``golden/manifest_v1.json`` is the manifest ckptd writes for ``_golden_state()``.
A change to it is a change of the on-disk format: it must be deliberate (and may need a format
version bump). To regenerate it after such a change, run
``CKPTD_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/format/test_manifest.py`` and review the diff.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch

from ckptd.errors import FormatVersionError, ManifestError
from ckptd.format.codec import CodecConfig
from ckptd.format.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MAX_STEP,
    Manifest,
    check_step,
    manifest_name,
    parse_manifest,
    sign_manifest,
    step_from_name,
)
from ckptd.format.restore import load_checkpoint
from ckptd.format.skeleton import flatten
from ckptd.format.store import Store
from ckptd.pipeline.plan import PipelineConfig, tensor_source
from ckptd.pipeline.write import write_checkpoint

GOLDEN = Path(__file__).parent / "golden" / "manifest_v1.json"
CREATED = "2026-01-01T00:00:00.000000Z"
# Raw objects: the golden bytes then depend only on ckptd, not on the zstd library's output.
GOLDEN_CONFIG = PipelineConfig(codec=CodecConfig(codec="raw"), threads=1)


def _golden_state() -> dict[str, Any]:
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4
    return {
        "model": OrderedDict(
            [
                ("w", weight),
                ("b", torch.tensor([0.5, -1.0], dtype=torch.bfloat16)),
                ("mask", torch.tensor([True, False, True])),
                ("idx", torch.tensor([3, 1, 2], dtype=torch.int64)),
                ("tied", weight),
            ]
        ),
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2, 3)}},
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0]}],
        },
        "extra": {"epoch": 2, "loss": math.nan, "name": "tiny", "shape": (2, 3)},
    }


def _write_golden(root: Path) -> bytes:
    store = Store(root)
    flat = flatten(_golden_state())
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    result = write_checkpoint(
        store,
        "golden",
        1200,
        flat.skeleton,
        sources,
        metric=0.25,
        config=GOLDEN_CONFIG,
        created=CREATED,
    )
    assert result.path == root / "golden" / "manifests" / "step-000000001200.json"
    return result.path.read_bytes()


def test_manifest_bytes_match_golden(tmp_path: Path) -> None:
    written = _write_golden(tmp_path / "root")
    if os.environ.get("CKPTD_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(written)
    assert written == GOLDEN.read_bytes(), (
        "the manifest format changed; if on purpose, regenerate with CKPTD_UPDATE_GOLDEN=1 "
        "and review the diff"
    )


def test_golden_manifest_parses_and_reserializes_identically() -> None:
    data = GOLDEN.read_bytes()
    manifest = parse_manifest(data, where=str(GOLDEN))
    assert manifest.to_json() == data
    assert manifest.job == "golden"
    assert manifest.step == 1200
    assert manifest.created == CREATED
    assert manifest.metric == 0.25
    assert (manifest.rank, manifest.world_size) == (0, 1)
    assert [t.path for t in manifest.tensors] == [
        "model.w",
        "model.b",
        "model.mask",
        "model.idx",
        "optimizer.state.0.step",
        "optimizer.state.0.exp_avg",
    ]
    assert manifest.raw_bytes == 24 + 4 + 3 + 24 + 4 + 24
    # Small tensors are packed by dtype: one object each for float32, bfloat16, bool, int64.
    assert len(manifest.objects) == 4
    assert manifest.stored_bytes == manifest.raw_bytes + 4 * 16
    assert manifest.written_bytes == manifest.stored_bytes
    # Objects are named by the BLAKE3 hash of their raw bytes.
    (mask_piece,) = manifest.tensors[2].pieces
    assert mask_piece.object == blake3.blake3(b"\x01\x00\x01").hexdigest()
    float_pack = manifest.tensors[0].pieces[0].object
    assert [t.pieces[0].object for t in manifest.tensors[4:]] == [float_pack, float_pack]
    assert [(p.offset, p.length) for t in manifest.tensors[4:] for p in t.pieces] == [
        (24, 4),
        (28, 24),
    ]


def test_golden_manifest_is_strict_json_with_one_line_per_entry() -> None:
    text = GOLDEN.read_text("utf-8")
    doc = json.loads(text)  # strict JSON: no NaN literals
    assert "NaN" not in text
    assert doc["format"] == FORMAT == "ckptd.manifest"
    assert doc["version"] == 1  # single-process manifests stay version 1
    assert FORMAT_VERSION == 2  # what this ckptd reads (2: global records of multi-rank steps)
    assert doc["totals"] == {
        "tensors": 6,
        "objects": 4,
        "raw_bytes": 83,
        "stored_bytes": 147,
        "written_bytes": 147,
    }
    lines = text.splitlines()
    assert sum(line.startswith('  {"path": ') for line in lines) == 6
    assert list(doc["objects"]) == sorted(doc["objects"])


def test_golden_checkpoint_restores_the_state(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _write_golden(root)
    state = load_checkpoint(Store(root), "golden").state
    expected = _golden_state()
    assert list(state["model"]) == ["w", "b", "mask", "idx", "tied"]
    assert isinstance(state["model"], OrderedDict)
    for key, tensor in expected["model"].items():
        assert state["model"][key].dtype == tensor.dtype
        assert torch.equal(state["model"][key], tensor)
    assert state["model"]["tied"] is state["model"]["w"]
    assert list(state["optimizer"]["state"]) == [0]
    assert state["optimizer"]["param_groups"] == [
        {"lr": 0.01, "betas": (0.9, 0.999), "params": [0]}
    ]
    assert math.isnan(state["extra"]["loss"])
    assert state["extra"]["shape"] == (2, 3)


# ---- validation --------------------------------------------------------------------------------


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(GOLDEN.read_bytes())
    return doc


def _parse(doc: dict[str, Any]) -> Manifest:
    data = sign_manifest(json.dumps(doc).encode())  # edited on purpose: re-sign it
    return parse_manifest(data, where="/r/job/manifests/step-1.json")


def test_not_json() -> None:
    with pytest.raises(ManifestError, match=r"^/r/m\.json: not valid JSON \(.*\); the manifest is"):
        parse_manifest(b'{"format": "ckptd.manifest", ', where="/r/m.json")


def test_not_utf8() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"\xff\xfe{}", where="/r/m.json")


@pytest.mark.parametrize("value", ["ckptd.other", None, 1])
def test_wrong_format_field(value: object) -> None:
    doc = _doc()
    doc["format"] = value
    with pytest.raises(ManifestError, match=r'step-1\.json: not a ckptd manifest \(no "format"'):
        _parse(doc)


def test_not_an_object() -> None:
    with pytest.raises(ManifestError, match="not a ckptd manifest"):
        parse_manifest(b"[1, 2]", where="m")


@pytest.mark.parametrize("version", [3, 17])
def test_newer_version_names_it(version: int) -> None:
    doc = _doc()
    doc["version"] = version
    with pytest.raises(
        FormatVersionError,
        match=rf"written in manifest format version {version}, this ckptd reads up to 2; "
        rf"upgrade ckptd to a release that reads version {version}",
    ):
        _parse(doc)


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, None])
def test_bad_version(version: object) -> None:
    doc = _doc()
    doc["version"] = version
    with pytest.raises(ManifestError, match=r"bad format version"):
        _parse(doc)


@pytest.mark.parametrize(
    "name", ["A" * 64, "a" * 63, "a" * 65, "../" + "a" * 61, "g" * 64, "a" * 63 + "\n"]
)
def test_bad_object_hash_name(name: str) -> None:
    doc = _doc()
    first = next(iter(doc["objects"]))
    doc["objects"][name] = doc["objects"].pop(first)
    with pytest.raises(ManifestError, match=r"invalid object hash .*: expected 64 hex digits"):
        _parse(doc)


def test_bad_hash_in_piece() -> None:
    doc = _doc()
    doc["tensors"][0]["pieces"][0][0] = "../../etc/passwd"
    with pytest.raises(ManifestError, match=r"invalid object hash '\.\./\.\./etc/passwd'"):
        _parse(doc)


def test_piece_names_object_missing_from_objects() -> None:
    doc = _doc()
    doc["tensors"][0]["pieces"][0][0] = "0" * 64
    with pytest.raises(
        ManifestError,
        match=r"tensors\[0\] \(model\.w\): piece names object 0{64} missing from objects",
    ):
        _parse(doc)


def test_piece_beyond_object() -> None:
    doc = _doc()
    piece = doc["tensors"][1]["pieces"][0]  # model.b: the only piece of its object
    piece[1] += 2
    with pytest.raises(
        ManifestError,
        match=rf"^/r/job/manifests/step-1\.json: malformed manifest \(ValueError: tensors\[1\] "
        rf"\(model\.b\): piece \[2, \+4\) beyond object {piece[0]}\)$",
    ):
        _parse(doc)


def test_nbytes_mismatch() -> None:
    doc = _doc()
    doc["tensors"][0]["nbytes"] = 20
    with pytest.raises(
        ManifestError, match=r"tensors\[0\] \(model\.w\): nbytes 20 != 24 for float32\[2, 3\]"
    ):
        _parse(doc)


def test_pieces_do_not_add_up_to_nbytes() -> None:
    doc = _doc()
    doc["tensors"][0]["pieces"][0][2] = 20
    with pytest.raises(ManifestError, match=r"tensors\[0\] \(model\.w\): pieces hold 20 bytes"):
        _parse(doc)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("nbytes", -24, r"tensors\[0\]\.nbytes must be an integer >= 0, got -24"),
        ("shape", [2, -3], r"tensors\[0\]\.shape must be an integer >= 0, got -3"),
        ("shape", 6, "TypeError"),
        ("path", 5, r"tensors\[0\]: path and dtype must be strings"),
        ("pieces", [["a" * 64, 0]], "not enough values to unpack"),
    ],
)
def test_malformed_tensor_fields(field: str, value: object, fragment: str) -> None:
    doc = _doc()
    doc["tensors"][0][field] = value
    with pytest.raises(ManifestError, match=rf"malformed manifest \(.*{fragment}"):
        _parse(doc)


@pytest.mark.parametrize("key", ["job", "step", "created", "objects", "tensors", "skeleton"])
def test_missing_required_key(key: str) -> None:
    doc = _doc()
    del doc[key]
    with pytest.raises(ManifestError, match=rf"malformed manifest \(KeyError: '{key}'\)"):
        _parse(doc)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("step", -1, "step must be an integer between 0 and 999999999999, got -1"),
        ("step", 10**12, "step must be an integer between"),
        ("created", "yesterday", "Invalid isoformat string"),
        ("world_size", 0, "world_size must be an integer >= 1, got 0"),
        ("rank", -1, "rank must be an integer >= 0, got -1"),
        ("metric", "high", "metric must be a number or null, got 'high'"),
        ("metric", True, "metric must be a number or null, got True"),
    ],
)
def test_bad_scalar_fields(key: str, value: object, fragment: str) -> None:
    doc = _doc()
    doc[key] = value
    with pytest.raises(ManifestError, match=fragment):
        _parse(doc)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_metric_roundtrips_as_string(value: str) -> None:
    doc = _doc()
    doc["metric"] = value
    manifest = _parse(doc)
    assert str(manifest.metric) == value
    assert f'"metric": "{value}"' in manifest.to_json().decode()


@pytest.mark.parametrize("key", ["objects", "tensors", "totals"])
def test_containers_of_the_wrong_type(key: str) -> None:
    """A manifest whose tables have the wrong JSON type is malformed, like any other damage.

    BUG (ckptd/format/manifest.py parse_manifest): ``"objects": []`` or ``"totals": []`` escape as
    a bare AttributeError instead of ManifestError, so fallback/verify do not treat them as
    corruption.
    """
    doc = _doc()
    doc[key] = [] if key != "tensors" else {"a": 1}
    with pytest.raises(ManifestError, match=r"step-1\.json: malformed manifest"):
        _parse(doc)


def test_unknown_dtype_names_the_manifest_and_the_tensor() -> None:
    """BUG (minor): the unknown-dtype error omits which manifest and tensor it is about."""
    doc = _doc()
    doc["tensors"][0]["dtype"] = "float128"
    with pytest.raises(ManifestError, match=r"unknown dtype 'float128'") as info:
        _parse(doc)
    assert "step-1.json" in str(info.value)
    assert "model.w" in str(info.value)


# ---- step names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "name"),
    [
        (0, "step-000000000000.json"),
        (1200, "step-000000001200.json"),
        (MAX_STEP, "step-" + "9" * 12 + ".json"),
    ],
)
def test_manifest_name_and_inverse(step: int, name: str) -> None:
    assert manifest_name(step) == name
    assert step_from_name(name) == step


def test_manifest_names_sort_by_step() -> None:
    steps = [5, 100, 7, 10**11, 0, 99]
    assert sorted(map(manifest_name, steps)) == [manifest_name(s) for s in sorted(steps)]


@pytest.mark.parametrize(
    "name",
    [
        "step-5.json",
        "step-0000000000005.json",
        "step-00000000000a.json",
        "step-+00000000005.json",
        "step-000000000005.json.tmp",
        "step-000000000005.JSON",
        "Step-000000000005.json",
        "000000000005.json",
        "step-000000000005.json.a1b2c3.tmp",
        "",
    ],
)
def test_step_from_name_rejects_other_files(name: str) -> None:
    assert step_from_name(name) is None


def test_step_from_name_rejects_non_ascii_digits() -> None:
    """BUG (minor, ckptd/format/manifest.py step_from_name): str.isdigit() accepts Unicode digits,
    so ``step-١١١١١١١١١١١١.json`` (Arabic-Indic digits) is listed as step 111111111111, a checkpoint
    whose real file name does not exist; ``latest`` then resolves to it and fails."""
    assert step_from_name("step-" + "\u0661" * 12 + ".json") is None


@pytest.mark.parametrize("step", [0, 1, MAX_STEP])
def test_check_step_accepts(step: int) -> None:
    assert check_step(step) == step


@pytest.mark.parametrize("step", [-1, MAX_STEP + 1, True, 1.0, "5", None])
def test_check_step_rejects(step: object) -> None:
    with pytest.raises(ValueError, match=r"step must be an integer between 0 and 999999999999"):
        check_step(step)
