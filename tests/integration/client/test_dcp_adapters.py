"""``torch.distributed.checkpoint`` through ckptd, with real ranks (gloo on CPU, 127.0.0.1) and
two real daemons over one root standing for two nodes (issue 13, item 5).

One spawned group of three processes serves the whole module. Ranks 0 and 1 (their own process
group) train an FSDP2 model with uneven shards (7 rows split 4 + 3, one row split 1 + 0) and save
it four times, rank 0 through daemon A and rank 1 through daemon B:

1. ``Client.snapshot(model, opt)``;
2. ``dcp.save`` with :class:`CkptdStorageWriter`;
3. ``dcp.async_save`` on DCP's thread, with rank 1 held back until the test has seen rank 0's
   part durable and the step still invisible;
4. ``dcp.async_save`` in DCP's checkpoint process, which pickles the writer.

Then all three ranks load every step through :class:`CkptdStorageReader` into a model sharded
three ways (3 + 3 + 1 rows) and compare the global values with what the two ranks had; the tests
also load every step in this process, without a process group. Each rank writes what it saw to
a file; the tests check those.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import (
    AsyncCheckpointerType,
    AsyncSaveResponse,
    async_save,
    save,
)
from torch.multiprocessing.spawn import start_processes

from ckptd.errors import NotFoundError, UnsupportedStateError
from ckptd.format.parts import PartSet
from ckptd.format.store import Store
from ckptd.launch import DaemonProcess, start_args
from ckptd_client.dcp import CkptdStorageReader, CkptdStorageWriter
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import Daemon, DaemonFactory, daemon_factory, empty_config

ckptd_env = daemon_fixtures.ckptd_env
JOB = "fsdp"
SAVED_STEPS = (1, 2, 3, 4)
TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _NoDistWarning(warnings.catch_warnings):
    """DCP warns that it works in one process when no process group exists: expected here."""

    def __enter__(self) -> None:
        super().__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


# ---- the model -----------------------------------------------------------------------------------


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 1))


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)  # the same batch on every rank and in every process
    model(torch.randn(4, 5)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _sharded(seed: int, mesh: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An FSDP2 model on ``mesh`` whose optimizer state exists (DCP loads into it)."""
    from torch.distributed.fsdp import fully_shard

    model = _model(seed)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _train_step(model, opt, seed=1000 + seed)
    return model, opt


def _global_values(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the model and optimizer state as one global tensor (a collective)."""

    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    out = {f"model.{k}": whole(v).detach().clone() for k, v in model.state_dict().items()}
    for index, values in opt.state_dict()["state"].items():
        for name, value in values.items():
            out[f"optimizer.state.{index}.{name}"] = whole(value).detach().clone()
    return out


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "extra": {"epoch": 7, "tag": "dcp"},
    }


# ---- what each of the three ranks runs -----------------------------------------------------------


class _HeldPlanner(DefaultSavePlanner):
    """Resolves nothing until ``release`` exists: a rank that is slow to hand its part off."""

    def __init__(self, release: Path) -> None:
        super().__init__()
        self.release = release

    def resolve_data(self, write_item: WriteItem) -> Any:
        _wait_for(self.release)
        return super().resolve_data(write_item)


def _rank_main(rank: int, port: int, base_name: str) -> None:
    base = Path(base_name)
    os.environ["CKPTD_CONFIG"] = str(empty_config(base))
    for name in ("CKPTD_ROOT", "CKPTD_SOCKET", "CKPTD_ATTEMPT"):
        os.environ.pop(name, None)
    os.environ["MASTER_ADDR"] = "127.0.0.1"  # where DCP's checkpoint processes meet
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=3,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    try:
        from torch.distributed.device_mesh import DeviceMesh

        savers = dist.new_group([0, 1])  # collective: every rank makes both
        mesh = DeviceMesh("cpu", [0, 1])
        if rank < 2:
            _save_all(rank, base, savers, mesh)
        dist.barrier()
        _load_all(rank, base)
    finally:
        dist.destroy_process_group()


def _save_all(rank: int, base: Path, savers: Any, mesh: Any) -> None:
    from torch.distributed.checkpoint import _async_process_executor

    from ckptd_client import Client

    model, opt = _sharded(0, mesh)
    _train_step(model, opt, seed=1)
    expected = _global_values(model, opt)
    if rank == 0:
        torch.save(expected, base / "expected.pt")
    _wait_for(base / "run.json")  # the daemons are up
    run = json.loads((base / "run.json").read_text())
    sock, root = run["sockets"][rank], run["root"]

    def writer(step: int) -> CkptdStorageWriter:
        return CkptdStorageWriter(JOB, step, root=root, socket=sock)

    with Client(JOB, socket=sock, root=root, spawn=False, **run["ranks"][rank]) as client:
        client.snapshot(model, opt, step=1, extra={"epoch": 7, "tag": "dcp"}).wait(TIMEOUT_S)

    save(_state(model, opt), storage_writer=writer(2), process_group=savers)

    held = _HeldPlanner(base / "release-3") if rank == 1 else None
    upload = async_save(
        _state(model, opt), storage_writer=writer(3), planner=held, process_group=savers
    )
    assert not isinstance(upload, AsyncSaveResponse)
    upload.result(timeout=TIMEOUT_S)
    record = Store(Path(root)).read_manifest(JOB, 3)
    visible = {"world_size": record.world_size, "ranks": [p.rank for p in record.parts]}
    (base / f"after-3-{rank}.json").write_text(json.dumps(visible))

    upload = async_save(
        _state(model, opt),
        storage_writer=writer(4),
        process_group=savers,
        async_checkpointer_type=AsyncCheckpointerType.PROCESS,
    )
    assert not isinstance(upload, AsyncSaveResponse)
    upload.result(timeout=TIMEOUT_S)
    # DCP hands every replicated item to rank 0 here: rank 1's part is empty, and still needed.
    save(
        {"w": torch.arange(3.0), "extra": {"k": 1}},
        checkpoint_id="5",
        storage_writer=writer(0),
        planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True),
        process_group=savers,
    )

    # Stop DCP's checkpoint process now: its own TERMINATE waits 5 s for a process group
    # shutdown that needs the other rank's checkpoint process too, then kills it anyway.
    process = _async_process_executor._CHECKPOINT_PROCESS
    _async_process_executor._CHECKPOINT_PROCESS = None
    if process is not None:
        process._save_process.terminate()
        process._save_process.join(TIMEOUT_S)


def _load_all(rank: int, base: Path) -> None:
    """All three ranks load each step and compare the global values with the savers'."""
    from torch.distributed.device_mesh import init_device_mesh

    run = json.loads((base / "run.json").read_text())
    expected: dict[str, torch.Tensor] = torch.load(base / "expected.pt", weights_only=True)
    mesh = init_device_mesh("cpu", (3,))
    report: dict[str, Any] = {}
    for step in SAVED_STEPS:
        model, opt = _sharded(5, mesh)
        state = _state(model, opt)
        state["extra"] = {"epoch": 0, "tag": ""}
        load(state, storage_reader=CkptdStorageReader(JOB, step, root=run["root"]))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        got = _global_values(model, opt)
        report[str(step)] = {
            "differs": [k for k in expected if not torch.equal(got[k], expected[k])],
            "extra": state["extra"],
            "lr": opt.param_groups[0]["lr"],
            "rows": {k: v.to_local().shape[0] for k, v in model.state_dict().items()},
        }
    (base / f"loaded-{rank}.json").write_text(json.dumps(report))


# ---- the module's run ----------------------------------------------------------------------------


def _start_daemons(daemons: DaemonFactory, names: list[str]) -> list[Daemon]:
    """Start one daemon per name on the factory's root, all at once; wait until each answers."""
    started = []
    for name in names:
        sock, log = daemons.base / f"{name}.sock", daemons.base / f"daemon-{name}.log"
        args = start_args(sock, daemons.default_root)
        process = DaemonProcess(sock, args, log=log, env=daemons.env, cwd=daemons.base)
        daemon = Daemon(process, daemons.default_root, log)
        daemons.started.append(daemon)
        started.append(daemon)
    for daemon in started:
        daemon.process.wait_ready()
    return started


def _pending(store: Store) -> list[PartSet]:
    try:
        return store.pending_sets(JOB)
    except NotFoundError:
        return []


@pytest.fixture(scope="module")
def ranks() -> Iterator[DaemonFactory]:
    """The three ranks' run (see the module docstring), over two fresh daemons on one root."""
    with daemon_factory() as daemons:
        base = daemons.base
        context = start_processes(  # type: ignore[no-untyped-call]
            _rank_main, args=(_free_port(), str(base)), nprocs=3, join=False, start_method="spawn"
        )
        a, b = _start_daemons(daemons, ["a", "b"])  # while the ranks import and train
        attempt = f"snap-{uuid.uuid4().hex[:12]}"
        run = {
            "sockets": [str(a.socket), str(b.socket)],
            "root": str(daemons.default_root),
            "ranks": [{"rank": r, "world_size": 2, "attempt": attempt} for r in (0, 1)],
        }
        (base / "run.json.tmp").write_text(json.dumps(run))
        (base / "run.json.tmp").rename(base / "run.json")

        # Step 3: rank 1 is held; once rank 0's part is durable, look, then let rank 1 go.
        store = Store(daemons.default_root)
        seen: dict[str, Any] = {}
        deadline = time.monotonic() + TIMEOUT_S
        while not seen and time.monotonic() < deadline and not context.join(timeout=0.02):
            for pset in _pending(store):
                if pset.step == 3 and 0 in pset.parts:
                    seen = {
                        "parts": sorted(pset.parts),
                        "missing": pset.missing,
                        "visible": 3 in store.steps(JOB),
                    }
        (base / "seen-3.json").write_text(json.dumps(seen))
        (base / "release-3").touch()
        while not context.join(timeout=0.05):
            pass
        yield daemons


def _report(ranks: DaemonFactory, name: str) -> Any:
    return json.loads((ranks.base / f"{name}.json").read_text())


# ---- saving --------------------------------------------------------------------------------------


def test_every_save_is_one_step_of_both_ranks(ranks: DaemonFactory) -> None:
    store = Store(ranks.default_root)
    assert store.steps(JOB) == [*SAVED_STEPS, 5]
    for step in store.steps(JOB):
        record = store.read_manifest(JOB, step)
        assert (record.world_size, [p.rank for p in record.parts]) == (2, [0, 1]), step
    assert _pending(store) == []
    assert [len(store.read_part(JOB, 5, rank).tensors) for rank in (0, 1)] == [1, 0]


@pytest.mark.usefixtures("ckptd_env")
def test_a_step_with_an_empty_part_loads_by_checkpoint_id(ranks: DaemonFactory) -> None:
    state: dict[str, Any] = {"w": torch.zeros(3), "extra": {"k": 0}}
    with _NoDistWarning():
        load(
            state,
            checkpoint_id="5",
            storage_reader=CkptdStorageReader(JOB, root=ranks.default_root),
        )
    assert torch.equal(state["w"], torch.arange(3.0))
    assert state["extra"] == {"k": 1}


def test_async_save_commits_only_once_every_rank_part_is_durable(ranks: DaemonFactory) -> None:
    assert _report(ranks, "seen-3") == {"parts": [0], "missing": [1], "visible": False}
    for rank in (0, 1):  # visible when async_save's future resolves, on every rank
        assert _report(ranks, f"after-3-{rank}") == {"world_size": 2, "ranks": [0, 1]}, rank


class Opaque:
    """A value only pickle can store."""


@pytest.mark.usefixtures("ckptd_env")
def test_a_value_that_needs_pickle_is_refused_by_name(ranks: DaemonFactory) -> None:
    daemon_socket = ranks.base / "a.sock"
    for value, reason in ((Opaque(), "Unsupported global"), ({1, 2}, "set")):
        writer = CkptdStorageWriter("refused", 1, root=ranks.default_root, socket=daemon_socket)
        with _NoDistWarning(), pytest.raises(CheckpointException) as caught:
            save({"w": torch.ones(2), "extra": {"odd": value}}, storage_writer=writer)
        [(error, _trace)] = caught.value.failures.values()
        assert isinstance(error, UnsupportedStateError), error
        assert str(error).startswith("extra.odd"), error
        assert reason in str(error), error
    assert Store(ranks.default_root).steps("refused") == []


# ---- loading -------------------------------------------------------------------------------------


def test_three_ranks_load_what_two_ranks_saved(ranks: DaemonFactory) -> None:
    for rank in range(3):
        report = _report(ranks, f"loaded-{rank}")
        for step in SAVED_STEPS:
            got = report[str(step)]
            assert got["differs"] == [], (rank, step)
            assert (got["extra"], got["lr"]) == ({"epoch": 7, "tag": "dcp"}, 0.1), (rank, step)
    rows = [_report(ranks, f"loaded-{r}")["1"]["rows"] for r in range(3)]
    assert [r["0.weight"] for r in rows] == [3, 3, 1]  # saved as 4 + 3 rows
    assert [r["2.weight"] for r in rows] == [1, 0, 0]


@pytest.mark.usefixtures("ckptd_env")
@pytest.mark.parametrize("step", SAVED_STEPS)
def test_one_process_without_a_process_group_loads_the_global_values(
    ranks: DaemonFactory, step: int
) -> None:
    expected: dict[str, torch.Tensor] = torch.load(ranks.base / "expected.pt", weights_only=True)
    model = _model(9)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    _train_step(model, opt, seed=9)
    state = _state(model, opt)
    state["extra"] = {"epoch": 0, "tag": ""}
    with _NoDistWarning():
        load(state, storage_reader=CkptdStorageReader(JOB, step, root=ranks.default_root))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    got = _global_values(model, opt)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert state["extra"] == {"epoch": 7, "tag": "dcp"}
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.usefixtures("ckptd_env")
def test_an_unknown_job_or_step_is_named(ranks: DaemonFactory) -> None:
    root = ranks.default_root
    with pytest.raises(NotFoundError, match="job 'nope' has no checkpoints under"):
        CkptdStorageReader("nope", root=root).read_metadata()
    with pytest.raises(NotFoundError, match="step 9"):
        CkptdStorageReader(JOB, 9, root=root).read_metadata()
    # dcp.load reports a failed metadata read as an AssertionError of its own, quoting ours.
    with _NoDistWarning(), pytest.raises(CheckpointException) as caught:
        load({"x": torch.zeros(1)}, storage_reader=CkptdStorageReader(JOB, 9, root=root))
    [(error, _trace)] = caught.value.failures.values()
    assert isinstance(error, AssertionError), error
    assert str(error) == (
        "metadata is None; global metadata read failed: job 'fsdp' has no checkpoint at step 9; "
        "steps that exist: 1, 2, 3, 4, 5"
    )
