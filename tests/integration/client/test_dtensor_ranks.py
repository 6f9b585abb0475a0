"""Two real ranks (gloo on CPU) with an FSDP2 model: each saves its own shards, the shards tile the
global tensors, and each rank's checkpoint loads back into a fresh sharded model and optimizer bit
for bit; layouts that do not fit are refused by name.

The two ranks run once per module (``torch.multiprocessing`` spawn, a free port on 127.0.0.1) and
write what they saw under the module's temporary directory; each test checks one part of it. No
daemon and no store: a rank's "checkpoint" is what a manifest holds of it, its skeleton as JSON
and its tensors' bytes, read back with ``unflatten`` and loaded with ``ckptd_client.state.apply``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import start_processes

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---- what each rank runs -----------------------------------------------------------------------


def _model(seed: int) -> torch.nn.Module:
    """Uneven on two ranks: 3 rows split 2 + 1, and 1 row split 1 + 0 (rank 1's shard empty)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))


def _sharded(seed: int, mesh: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    model = _model(seed)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)  # the same batch on every rank and for every model
    model(torch.randn(4, 5)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _locals(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """A copy of every local shard (and plain tensor) of the model and optimizer state, by key
    path (a copy: training updates the live ones in place)."""
    out = {f"model.{k}": v.to_local().clone() for k, v in model.state_dict().items()}
    for index, values in opt.state_dict()["state"].items():
        for name, value in values.items():
            local = value.to_local() if hasattr(value, "to_local") else value
            out[f"optimizer.state.{index}.{name}"] = local.clone()
    return out


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ in dtype, shape or any byte (empty when all are identical)."""
    return [
        k
        for k in a
        if a[k].dtype != b[k].dtype
        or a[k].shape != b[k].shape
        or not torch.equal(_raw(a[k]), _raw(b[k]))
    ]


def _refusal(action: Callable[[], object]) -> str:
    from ckptd.errors import RankLayoutError

    try:
        action()
    except RankLayoutError as exc:
        return str(exc)
    return "<not refused>"


def _rank_main(rank: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        _rank_work(rank, Path(out))
    finally:
        dist.destroy_process_group()


def _checkpoint(out: Path, rank: int) -> Any:
    """Rank ``rank``'s state as a restore gives it: the skeleton through JSON, the tensors
    through their bytes."""
    from ckptd.format.skeleton import unflatten

    skeleton = json.loads((out / f"skeleton-{rank}.json").read_text())
    tensors = torch.load(out / f"flat-{rank}.pt", weights_only=True)["tensors"]
    return unflatten(skeleton, tensors)


def _restored(state: Any) -> Any:
    """``state`` through what a checkpoint keeps of it: skeleton as JSON, tensors as bytes."""
    from ckptd.format.skeleton import flatten, unflatten

    flat = flatten(state)
    tensors = [_raw(t).clone().view(t.dtype).reshape(t.shape) for t in flat.tensors]
    return unflatten(json.loads(json.dumps(flat.skeleton)), tensors)


def _unsharded_checkpoint(mesh: Any, replicated: torch.nn.Module) -> dict[str, Any]:
    """A checkpoint of an unsharded run: a sharded model refuses it (each rank holds a part of
    each tensor); a replicated one, whose every rank holds whole tensors, takes it."""
    from ckptd_client.state import apply, collect

    unsharded = _model(0)
    unsharded_opt = torch.optim.Adam(unsharded.parameters(), lr=0.1)
    _train_step(unsharded, unsharded_opt, seed=300)
    ckpt = _restored(collect(unsharded, unsharded_opt, rng=False))
    report: dict[str, Any] = {
        "full_into_sharded": _refusal(lambda: apply(ckpt, *_sharded(7, mesh))),
        "full_into_sharded_optimizer": _refusal(lambda: apply(ckpt, None, _sharded(7, mesh)[1])),
    }
    replicated_opt = torch.optim.Adam(replicated.parameters(), lr=0.1)
    apply(ckpt, replicated, replicated_opt)
    expected = {f"model.{k}": v for k, v in unsharded.state_dict().items()}
    got = {f"model.{k}": v.to_local() for k, v in replicated.state_dict().items()}
    params = list(unsharded.parameters())
    placements = set()
    for index, values in replicated_opt.state_dict()["state"].items():
        for name, value in values.items():
            expected[f"optimizer.state.{index}.{name}"] = unsharded_opt.state[params[index]][name]
            if name == "step":  # a plain scalar, as torch optimizers keep it
                got[f"optimizer.state.{index}.{name}"] = value
            else:
                got[f"optimizer.state.{index}.{name}"] = value.to_local()
                placements.add(f"{type(value).__name__} {value.placements}")
    report["full_into_replicated_differs"] = _bitwise_equal(expected, got)
    report["full_into_replicated_placements"] = sorted(placements)
    return report


def _rank_work(rank: int, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_module

    from ckptd.format.skeleton import flatten
    from ckptd_client.state import apply, collect

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    model, opt = _sharded(0, mesh)
    for step in range(2):
        _train_step(model, opt, seed=100 + step)

    flat = flatten(collect(model, opt, rng=False))
    full = {f"model.{k}": v.full_tensor() for k, v in model.state_dict().items()}  # collective
    for index, values in opt.state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            full[f"optimizer.state.{index}.{name}"] = values[name].full_tensor()
    (out / f"skeleton-{rank}.json").write_text(json.dumps(flat.skeleton))
    torch.save(
        {"paths": flat.paths, "tensors": [t.clone() for t in flat.tensors], "full": full},
        out / f"flat-{rank}.pt",
    )
    saved_locals = _locals(model, opt)

    # A fresh model and optimizer (other initial values, no optimizer state yet) take the state.
    fresh, fresh_opt = _sharded(7, mesh)
    apply(_checkpoint(out, rank), fresh, fresh_opt)
    report: dict[str, Any] = {
        "restored_differs": _bitwise_equal(saved_locals, _locals(fresh, fresh_opt)),
        "placements": {
            k: [str(p) for p in v.placements]
            for k, v in fresh_opt.state_dict()["state"][0].items()
            if hasattr(v, "placements")
        },
    }
    _train_step(model, opt, seed=200)
    _train_step(fresh, fresh_opt, seed=200)
    report["next_step_differs"] = _bitwise_equal(_locals(model, opt), _locals(fresh, fresh_opt))
    # Back into the trained objects, one step on: the optimizer's own DTensor state is the target.
    apply(_checkpoint(out, rank), model, opt)
    report["in_place_differs"] = _bitwise_equal(saved_locals, _locals(model, opt))

    dist.barrier()  # the other rank's checkpoint is written
    other = _checkpoint(out, 1 - rank)
    wrong_rank, wrong_rank_opt = _sharded(7, mesh)
    report["wrong_rank"] = _refusal(lambda: apply(other, wrong_rank, wrong_rank_opt))
    report["wrong_rank_untouched"] = not _bitwise_equal(
        _locals(wrong_rank, wrong_rank_opt), _locals(*_sharded(7, mesh))
    )
    own = _checkpoint(out, rank)
    replicated = distribute_module(_model(7), mesh)  # every parameter Replicate()
    plain = _model(7)
    report["replicated"] = _refusal(lambda: apply(own, replicated))
    report["plain_model"] = _refusal(lambda: apply(own, plain))
    report["plain_optimizer"] = _refusal(
        lambda: apply(own, None, torch.optim.Adam(plain.parameters()))
    )

    report.update(_unsharded_checkpoint(mesh, replicated))
    (out / f"report-{rank}.json").write_text(json.dumps(report))


# ---- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run both ranks once; the directory holding what they wrote."""
    out = tmp_path_factory.mktemp("dtensor-ranks")
    start_processes(  # type: ignore[no-untyped-call]
        _rank_main, args=(_free_port(), str(out)), nprocs=WORLD_SIZE, start_method="spawn"
    )
    return out


def _report(ranks: Path, rank: int) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((ranks / f"report-{rank}.json").read_text())
    return report


def test_shards_tile_every_global_tensor_exactly(ranks: Path) -> None:
    from ckptd.format.skeleton import dtensor_entries

    full: dict[str, torch.Tensor] = torch.load(ranks / "flat-0.pt", weights_only=True)["full"]
    assembled = {k: torch.full_like(v, float("nan")) for k, v in full.items()}
    hits = {k: torch.zeros(v.shape, dtype=torch.int64) for k, v in full.items()}
    empty_shards = []
    for rank in range(WORLD_SIZE):
        flat = torch.load(ranks / f"flat-{rank}.pt", weights_only=True)
        entries = dtensor_entries(json.loads((ranks / f"skeleton-{rank}.json").read_text()))
        assert {flat["paths"][i] for i in entries} == set(full), "every DTensor has a $dtensor"
        for index, info in entries.items():
            path, local = flat["paths"][index], flat["tensors"][index]
            assert info.shape == tuple(full[path].shape), path
            assert info.placements == ("S(0)",) and info.mesh.ranks == (0, 1), path
            block = tuple(slice(o, o + n) for o, n in zip(info.offsets, local.shape, strict=True))
            hits[path][block] += 1
            assembled[path][block] = local
            if local.numel() == 0:
                empty_shards.append((rank, path, info.offsets))
    for path, tensor in full.items():
        assert bool((hits[path] == 1).all()), f"{path}: not covered exactly once"
        assert torch.equal(assembled[path], tensor), path
    # Uneven sharding: rank 1 holds no row of the 1-row layer; torch places its empty block at
    # the end of the sharded dimension.
    assert (1, "model.2.weight", (1, 0)) in empty_shards


def test_each_rank_restores_its_shards_bit_identically(ranks: Path) -> None:
    for rank in range(WORLD_SIZE):
        report = _report(ranks, rank)
        assert report["restored_differs"] == [], rank
        assert report["placements"] == {"exp_avg": ["S(0)"], "exp_avg_sq": ["S(0)"]}
        assert report["next_step_differs"] == [], rank
        assert report["in_place_differs"] == [], rank


def test_another_ranks_checkpoint_is_refused_before_anything_is_loaded(ranks: Path) -> None:
    for rank in range(WORLD_SIZE):
        report = _report(ranks, rank)
        message = report["wrong_rank"]
        assert message.startswith("checkpoint: model.0.weight: the checkpoint holds a DTensor "), (
            message
        )
        assert "Check that each rank restores its own checkpoint" in message
        assert "ckptd_client.dcp.CkptdStorageReader" in message
        assert report["wrong_rank_untouched"], rank


def test_other_placements_are_refused_naming_both_layouts(ranks: Path) -> None:
    message = _report(ranks, 0)["replicated"]
    assert message.startswith(
        "checkpoint: model.0.weight: the checkpoint holds a DTensor shard with global shape "
        "[3, 5], placements (S(0)) on mesh [2], local shard [2, 5] at offsets [0, 0]; on this "
        "rank it is loaded into a DTensor with global shape [3, 5], placements (R) on mesh [2], "
        "local shard [3, 5] at offsets [0, 0]. Nothing was loaded."
    ), message


def test_shards_are_refused_by_an_unsharded_model_and_optimizer(ranks: Path) -> None:
    report = _report(ranks, 0)
    assert report["plain_model"].startswith(
        "checkpoint: model.0.weight holds this rank's shard of a DTensor (global shape [3, 5], "
        "placements (S(0)) on mesh [2], local shard [2, 5] at offsets [0, 0]), but the object it "
        "is loaded into holds a plain tensor of shape [3, 5] there."
    ), report["plain_model"]
    assert report["plain_optimizer"].startswith(
        "checkpoint: optimizer.state.0.exp_avg holds this rank's shard of a DTensor"
    ), report["plain_optimizer"]
    assert "ckptd_client.dcp.CkptdStorageReader" in report["plain_optimizer"]


def test_unsharded_checkpoint_fits_replicated_model_only(ranks: Path) -> None:
    report = _report(ranks, 0)
    assert report["full_into_sharded"].startswith(
        "checkpoint: model.0.weight: the checkpoint holds a plain tensor of shape [3, 5]; on this "
        "rank it is loaded into a DTensor with global shape [3, 5], placements (S(0)) on mesh "
        "[2], local shard [2, 5] at offsets [0, 0]."
    ), report["full_into_sharded"]
    assert report["full_into_sharded_optimizer"].startswith(
        "checkpoint: optimizer.state.0.exp_avg: the checkpoint holds a plain tensor of shape [3, 5]"
    ), report["full_into_sharded_optimizer"]
    for rank in range(WORLD_SIZE):
        report = _report(ranks, rank)
        assert report["full_into_replicated_differs"] == [], rank
        assert report["full_into_replicated_placements"] == ["DTensor (Replicate(),)"], rank
