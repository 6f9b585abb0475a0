"""Restore options (issue 11): ``restore(..., strict=False)`` into a model whose layers changed,
and ``map_location`` in every form ``torch.load`` accepts.

Every stored tensor's location tag is ``"cpu"`` (ckptd copies tensors to CPU memory and does not
record their device), so the forms are checked for what they do to a CPU tensor. There is no GPU
here: the CUDA checks run with ``torch.cuda`` patched (not available; or available with one
device), and actually moving tensors to a GPU is not tested.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptd_client
from ckptd.errors import ConfigError
from ckptd_client.state import apply
from tests.conftest import TinyNet, trained

INCOMPATIBLE_KEYS = "__incompatible_keys__"
"""The key of restore()'s result carrying torch's (missing_keys, unexpected_keys), spelled out
here: it is public API (``ckptd_client.state.INCOMPATIBLE_KEYS``)."""


class Grown(TinyNet):
    """TinyNet with a layer added after the checkpoint was taken."""

    def __init__(self) -> None:
        super().__init__()
        self.adapter = torch.nn.Linear(5, 5)


class Shrunk(TinyNet):
    """TinyNet with its ``head`` removed after the checkpoint was taken."""

    def __init__(self) -> None:
        super().__init__()
        del self.head


def _saved(root: Path, job: str = "run", step: int = 7) -> tuple[TinyNet, dict[str, Any]]:
    model, opt, _ = trained(steps=2, seed=0)
    ckptd_client.save(job, model, opt, step=step, extra={"epoch": 1}, root=root)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- strict=False ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "missing", "unexpected"),
    [
        (Grown, ["adapter.weight", "adapter.bias"], []),
        (Shrunk, [], ["head.weight", "head.bias"]),
    ],
)
def test_strict_false_loads_a_changed_model_and_reports_keys_as_torch_does(
    root: Path,
    caplog: pytest.LogCaptureFixture,
    cls: type[TinyNet],
    missing: list[str],
    unexpected: list[str],
) -> None:
    _, saved = _saved(root)
    torch.manual_seed(1)
    changed = cls()
    before = _values(changed)
    with caplog.at_level(logging.WARNING, logger="ckptd_client"):
        extra = ckptd_client.restore(changed, job="run", root=root, strict=False)

    # What torch itself reports for the same load.
    torch.manual_seed(1)
    reference = cls().load_state_dict(saved, strict=False)
    keys = extra.pop(INCOMPATIBLE_KEYS)
    assert keys == reference
    assert (keys.missing_keys, keys.unexpected_keys) == (missing, unexpected)
    assert extra == {"epoch": 1, "__step__": 7}

    for name, value in changed.state_dict().items():
        expected = before[name] if name in missing else saved[name]
        assert torch.equal(value, expected), name
    [record] = [r for r in caplog.records if r.name.startswith("ckptd_client")]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "job 'run' step 7 loaded into the model with strict=False" in message
    for key in missing + unexpected:
        assert key in message


def test_strict_false_with_a_matching_model_reports_no_keys_and_logs_nothing(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _saved(root)
    fresh, _, _ = trained(steps=0, seed=3)
    with caplog.at_level(logging.WARNING, logger="ckptd_client"):
        extra = ckptd_client.restore(fresh, job="run", root=root, strict=False)
    keys = extra[INCOMPATIBLE_KEYS]
    assert (keys.missing_keys, keys.unexpected_keys) == ([], [])
    assert not caplog.records


def test_strict_default_keeps_the_contract(root: Path) -> None:
    """The default adds no key and still refuses a changed model the way torch does."""
    _saved(root)
    fresh, opt, _ = trained(steps=0, seed=3)
    assert ckptd_client.restore(fresh, opt, job="run", root=root) == {"epoch": 1, "__step__": 7}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "adapter\.weight"'):
        ckptd_client.restore(Grown(), job="run", root=root)


def test_a_user_key_of_the_same_name_wins(root: Path) -> None:
    model, _, _ = trained(steps=0)
    ckptd_client.save("own", model, step=1, extra={INCOMPATIBLE_KEYS: "mine"}, root=root)
    extra = ckptd_client.restore(Grown(), job="own", root=root, strict=False)
    assert extra == {INCOMPATIBLE_KEYS: "mine", "__step__": 1}


@pytest.mark.parametrize("cls", [Grown, Shrunk])
def test_an_optimizer_of_a_changed_model_is_refused_before_anything_loads(
    root: Path, cls: type[TinyNet]
) -> None:
    _saved(root)
    changed = cls()
    opt = torch.optim.AdamW(changed.parameters(), lr=1e-2)
    before = _values(changed)
    with pytest.raises(ValueError) as info:
        ckptd_client.restore(changed, opt, job="run", root=root, strict=False)
    assert type(info.value) is ValueError
    message = str(info.value)
    have = 12 if cls is Grown else 8
    assert message.startswith(
        "job 'run' step 7: its optimizer state does not fit this optimizer: parameters per group "
        f"[10] in the checkpoint, [{have}] in this optimizer (the model changed since the "
        "checkpoint). "
    )
    assert "Nothing was loaded. Pass optimizer=None to restore only the model" in message
    assert all(torch.equal(v, before[k]) for k, v in changed.state_dict().items())
    assert opt.state_dict()["state"] == {}
    # What the message says to do works.
    extra = ckptd_client.restore(changed, None, job="run", root=root, strict=False)
    assert extra["__step__"] == 7


def test_apply_passes_strict_only_when_false() -> None:
    """A model-like object whose load_state_dict takes no ``strict`` keeps working by default."""

    class Plain:
        def __init__(self) -> None:
            self.got: Any = None

        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state_dict: Any, /) -> None:
            self.got = state_dict

    plain = Plain()
    assert apply({"model": {"w": 1}}, plain, rng=False) == {}
    assert plain.got == {"w": 1}


# ---- map_location ------------------------------------------------------------------------------


@pytest.fixture
def saved_state(root: Path) -> dict[str, Any]:
    """A checkpoint of job "loc" (model, optimizer, RNG states with numpy arrays); its state."""
    model, opt, _ = trained(steps=1)
    ckptd_client.save("loc", model, opt, step=1, root=root)
    state: dict[str, Any] = ckptd_client.load("loc", root=root)
    return state


def _tensors(state: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    stack = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            found.append(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return found


def _assert_same(got: Any, expected: Any, device: str) -> None:
    assert isinstance(got, type(expected))
    if isinstance(expected, torch.Tensor):
        assert got.device.type == device
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if device != "meta":
            assert torch.equal(got, expected)
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(got, expected)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for k in expected:
            _assert_same(got[k], expected[k], device)
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            _assert_same(a, b, device)
    else:
        assert got == expected


@pytest.mark.parametrize(
    "map_location",
    [
        "cpu",
        torch.device("cpu"),
        {"cpu": "cpu"},
        {"cuda:0": "cpu"},
        {},
        {"cpu": torch.device("cpu")},
    ],
    ids=["str", "device", "dict", "dict-other-tag", "dict-empty", "dict-device-value"],
)
def test_map_location_to_cpu_in_every_form(
    root: Path, saved_state: dict[str, Any], map_location: Any
) -> None:
    got = ckptd_client.load("loc", root=root, map_location=map_location)
    _assert_same(got, saved_state, "cpu")


def test_map_location_callable_gets_each_storage_with_the_cpu_tag(
    root: Path, saved_state: dict[str, Any]
) -> None:
    calls: list[tuple[torch.device, int, str]] = []

    def unchanged(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        calls.append((storage.device, storage.nbytes(), location))
        return storage

    got = ckptd_client.load("loc", root=root, map_location=unchanged)
    _assert_same(got, saved_state, "cpu")
    tensors = _tensors(saved_state)
    assert sorted(n for _, n, _ in calls) == sorted(t.nbytes for t in tensors)
    assert {(d.type, loc) for d, _, loc in calls} == {("cpu", "cpu")}


def test_map_location_callable_result_is_used(root: Path, saved_state: dict[str, Any]) -> None:
    def to_meta(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        return torch.empty(storage.nbytes(), dtype=torch.uint8, device="meta").untyped_storage()

    _assert_same(ckptd_client.load("loc", root=root, map_location=to_meta), saved_state, "meta")
    # None means "the default": the CPU.
    got = ckptd_client.load("loc", root=root, map_location=lambda storage, location: None)
    _assert_same(got, saved_state, "cpu")


def test_map_location_callable_must_return_a_storage(root: Path, saved_state: Any) -> None:
    with pytest.raises(
        ConfigError,
        match=r"^the map_location callable returned a Tensor; it must return a storage",
    ):
        ckptd_client.load("loc", root=root, map_location=lambda s, loc: torch.zeros(1))  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize("map_location", ["meta", torch.device("meta"), {"cpu": "meta"}])
def test_map_location_meta_keeps_numpy_arrays(
    root: Path, saved_state: dict[str, Any], map_location: Any
) -> None:
    """Numpy arrays are not torch storages: the RNG state's arrays come back as arrays."""
    got = ckptd_client.load("loc", root=root, map_location=map_location)
    _assert_same(got, saved_state, "meta")
    assert isinstance(got["rng"]["numpy"][1], np.ndarray)


@pytest.mark.parametrize(
    ("map_location", "asked"),
    [
        ("cuda", "cuda"),
        ("cuda:0", "cuda:0"),
        (torch.device("cuda:0"), "cuda:0"),
        ({"cpu": "cuda:0"}, "cuda:0"),
    ],
)
def test_map_location_cuda_without_cuda_is_a_clear_error(
    root: Path, monkeypatch: pytest.MonkeyPatch, map_location: Any, asked: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Checked before anything is read: the job does not even exist.
    with pytest.raises(ConfigError) as info:
        ckptd_client.load("absent", root=root, map_location=map_location)
    assert str(info.value).endswith(
        f"asks for {asked} but torch.cuda.is_available() is False on this machine; pass "
        "map_location='cpu'"
    )


def test_map_location_cuda_restore_refuses_before_touching_the_model(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _saved(root)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fresh, _, _ = trained(steps=0, seed=3)
    before = _values(fresh)
    with pytest.raises(
        ConfigError,
        match=r"^map_location asks for cuda:0 but torch\.cuda\.is_available\(\) is False on this "
        r"machine; pass map_location='cpu'$",
    ):
        ckptd_client.restore(fresh, job="run", root=root, map_location="cuda:0")
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_map_location_missing_device_index(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        ConfigError,
        match=r"^map_location asks for cuda:3 but this machine has 1 cuda device\(s\) "
        r"\(torch\.cuda\.device_count\(\)\); pass map_location='cuda:0'",
    ):
        ckptd_client.load("absent", root=root, map_location="cuda:3")


@pytest.mark.parametrize(
    ("map_location", "message"),
    [
        ("gpu0", r"^map_location asks for 'gpu0', which is not a device torch knows"),
        ({"cpu": 3}, r"^map_location \{'cpu': 3\} maps 'cpu' to 3; a dict must map"),
        (3, r"^map_location must be what torch\.load accepts .* got a int: 3$"),
    ],
)
def test_map_location_invalid(root: Path, map_location: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ckptd_client.load("absent", root=root, map_location=map_location)


def test_restore_with_map_location_forms(root: Path) -> None:
    model, _ = _saved(root)
    for map_location in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda s, loc: s):
        fresh, _, _ = trained(steps=0, seed=3)
        ckptd_client.restore(fresh, job="run", root=root, map_location=map_location)
        for (name, a), b in zip(
            model.state_dict().items(), fresh.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), (map_location, name)
