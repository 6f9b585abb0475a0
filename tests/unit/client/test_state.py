"""ckptd_client.state: collecting a training state and applying it back, RNG streams included."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptd_client
from ckptd import config as config_module
from ckptd.format.restore import load_checkpoint
from ckptd.format.skeleton import flatten
from ckptd.format.store import Store
from ckptd.pipeline.plan import PipelineConfig, tensor_source
from ckptd.pipeline.write import write_checkpoint
from ckptd_client.state import STATE_KEYS, apply, collect, rng_state, set_rng_state
from tests.conftest import trained


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ckptd_client.save reads the configuration: keep /etc out of it."""
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", tmp_path / "no-system-config.toml")


def _through_store(store: Store, state: Any, step: int = 1) -> Any:
    """Write ``state`` as a checkpoint and read it back from the files."""
    flat = flatten(state)
    sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
    write_checkpoint(store, "s", step, flat.skeleton, sources, config=PipelineConfig(threads=1))
    return load_checkpoint(store, "s", step).state


def _draws() -> tuple[Any, ...]:
    return (
        random.random(),
        random.getrandbits(64),
        np.random.standard_normal(3).tolist(),  # uses the cached second Gaussian first
        np.random.randint(0, 1 << 30, 4).tolist(),
        torch.rand(4).tolist(),
        torch.randint(0, 1 << 30, (4,)).tolist(),
        torch.randn(2).tolist(),
    )


def _reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- collect -----------------------------------------------------------------------------------


def test_collect_gathers_given_objects_in_order() -> None:
    model, opt, sched = trained(steps=1)
    scaler_state = {"scale": 1024.0, "growth_tracker": 0}
    state = collect(model, opt, scheduler=sched, scaler=scaler_state, extra={"epoch": 1})
    assert list(state) == list(STATE_KEYS)
    assert list(state["model"]) == list(model.state_dict())
    assert state["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    assert state["scheduler"] == sched.state_dict()
    assert state["scaler"] is scaler_state  # plain dicts are taken as state dicts
    assert state["extra"] == {"epoch": 1}
    assert set(state["rng"]) == {"torch", "numpy", "python"}


def test_collect_only_what_was_given() -> None:
    model, _, _ = trained(steps=0)
    assert list(collect(model)) == ["model", "rng"]
    assert list(collect(model, rng=False)) == ["model"]
    assert list(collect(extra={"a": 1}, rng=False)) == ["extra"]


def test_collect_state_is_returned_as_is() -> None:
    state = {"anything": [1, 2], "w": torch.ones(2)}
    assert collect(state=state) is state


def test_collect_refuses_state_and_objects_together() -> None:
    model, opt, _ = trained(steps=0)
    with pytest.raises(
        TypeError, match=r"pass either state= or objects, not both \(also got model, optimizer\)"
    ):
        collect(model, opt, state={"x": 1})


def test_collect_refuses_nothing() -> None:
    with pytest.raises(TypeError, match="nothing to snapshot: pass a model"):
        collect(rng=False)


def test_collect_refuses_non_dict_extra() -> None:
    with pytest.raises(TypeError, match="extra must be a dict, got list"):
        collect(extra=[1, 2])  # type: ignore[arg-type]


# ---- RNG states --------------------------------------------------------------------------------


def test_rng_states_restored_from_disk_continue_the_same_streams(store: Store) -> None:
    _reseed(1234)
    np.random.standard_normal(1)  # leave a cached Gaussian in numpy's legacy state
    random.random()
    state = collect(extra={"k": 1})
    expected = _draws()

    _reseed(99)
    scrambled = _draws()
    assert scrambled != expected  # otherwise the test below could not fail

    restored = _through_store(store, state)
    assert set(restored["rng"]) == {"torch", "numpy", "python"}
    extra = apply(restored)
    assert extra == {"k": 1}
    assert _draws() == expected


def test_rng_state_roundtrip_values(store: Store) -> None:
    _reseed(7)
    np.random.standard_normal(1)
    before = rng_state()
    restored = _through_store(store, {"rng": before})["rng"]
    assert torch.equal(restored["torch"], before["torch"])
    assert restored["torch"].dtype == torch.uint8
    name, keys, pos, has_gauss, cached = restored["numpy"]
    assert (name, pos, has_gauss, cached) == before["numpy"][:1] + before["numpy"][2:]
    assert has_gauss == 1
    assert np.array_equal(keys, before["numpy"][1]) and keys.dtype == before["numpy"][1].dtype
    assert restored["python"] == before["python"]
    assert type(restored["python"]) is tuple and type(restored["python"][1]) is tuple


def test_apply_without_rng_leaves_generators_alone(store: Store) -> None:
    _reseed(5)
    restored = _through_store(store, collect(extra={}))
    _reseed(6)
    expected = _draws()
    _reseed(6)
    apply(restored, rng=False)
    assert _draws() == expected


def test_set_rng_state_with_missing_entries() -> None:
    _reseed(3)
    saved = rng_state()
    py_expected = random.random()
    _reseed(4)
    np_expected = np.random.random()
    _reseed(4)
    set_rng_state({"python": saved["python"]})
    assert random.random() == py_expected
    assert np.random.random() == np_expected  # numpy untouched


# ---- apply -------------------------------------------------------------------------------------


def test_apply_loads_every_object(store: Store) -> None:
    model, opt, sched = trained(steps=3, seed=0)
    restored = _through_store(store, collect(model, opt, scheduler=sched, extra={"epoch": 2}))
    fresh, fresh_opt, fresh_sched = trained(steps=0, seed=1)
    assert not torch.equal(fresh.head.weight, model.head.weight)
    extra = apply(restored, fresh, fresh_opt, scheduler=fresh_sched)
    assert extra == {"epoch": 2}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert fresh_sched.state_dict() == sched.state_dict()
    assert fresh_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for pid, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(fresh_opt.state_dict()["state"][pid][key], value), (pid, key)


def test_apply_returns_a_copy_of_extra() -> None:
    state = {"extra": {"a": 1}}
    extra = apply(state, rng=False)
    extra["b"] = 2
    assert state["extra"] == {"a": 1}
    assert apply({"model": {}}, rng=False) == {}


def test_apply_names_missing_parts() -> None:
    _, opt, _ = trained(steps=0)
    with pytest.raises(
        ValueError, match=r"^job 'x' step 3 holds no optimizer state \(it has: model, rng\)$"
    ):
        apply({"model": {}, "rng": {}}, None, opt, where="job 'x' step 3")


def test_apply_checks_every_part_before_loading_any(store: Store) -> None:
    """A checkpoint without the optimizer state asked for leaves the model as it was."""
    model, _, _ = trained(steps=2, seed=0)
    restored = _through_store(store, collect(model, rng=False))
    fresh, fresh_opt, _ = trained(steps=0, seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"holds no optimizer state \(it has: model\)$"):
        apply(restored, fresh, fresh_opt)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("state", [{"weights": 1}, [1, 2], torch.zeros(1), None])
def test_apply_refuses_a_state_snapshot(state: Any) -> None:
    with pytest.raises(
        ValueError,
        match=r"^checkpoint was taken with state=\.\.\.; load it with ckptd_client\.load\(\) and "
        r"apply it yourself$",
    ):
        apply(state)


# ---- through the public API --------------------------------------------------------------------


def test_restore_of_a_state_snapshot_says_to_use_load(root: Path) -> None:
    snapshot: dict[str, Any] = {"weights": torch.arange(4.0), "step": 5}
    ckptd_client.save("raw", state=snapshot, step=5, root=root)
    model, _, _ = trained(steps=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"^job 'raw' step 5 was taken with state=\.\.\.; load it with ckptd_client\.load\(\)",
    ):
        ckptd_client.restore(model, job="raw", root=root)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    loaded = ckptd_client.load("raw", root=root)
    assert list(loaded) == ["weights", "step"]
    assert torch.equal(loaded["weights"], snapshot["weights"])
    assert loaded["step"] == 5


def test_restore_returns_extra_and_step(root: Path) -> None:
    model, opt, _ = trained(steps=1)
    ckptd_client.save("api", model, opt, step=10, extra={"epoch": 3}, root=root)
    ckptd_client.save("api", model, opt, step=20, extra={"__step__": "mine"}, root=root)
    fresh, fresh_opt, _ = trained(steps=0, seed=5)
    assert ckptd_client.restore(fresh, fresh_opt, job="api", step=10, root=root) == {
        "epoch": 3,
        "__step__": 10,
    }
    assert ckptd_client.restore(fresh, job="api", root=root) == {"__step__": "mine"}
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert [m.step for m in ckptd_client.list_checkpoints("api", root=root)] == [10, 20]


def test_save_refuses_unsupported_state_before_writing(root: Path) -> None:
    with pytest.raises(
        ckptd_client.UnsupportedStateError,
        match=r"^extra\.seen: cannot store a value of type builtins\.set",
    ):
        ckptd_client.save("bad", extra={"seen": {1}}, step=1, root=root, rng=False)
    assert not root.exists()
