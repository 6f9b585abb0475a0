"""Accelerate through ckptd (issue 14, item 3): ``ckptd_client.accelerate.snapshot(accelerator,
client, step=...)`` and ``restore(accelerator, client)`` in place of ``save_state`` /
``load_state``.

Real accelerate in processes of their own (:mod:`tests.integration.adapters.acc_train`,
:mod:`~tests.integration.adapters.acc_ddp`), one real daemon, all run once for the module:

* ``first``: 4 epochs uninterrupted (the reference), then on a fresh accelerator the same first
  2 epochs, a snapshot, and every parameter changed right after the hand-off; ``resume``, a new
  process: restores and trains epochs 3-4. The restored state equals what ``first`` held at the
  snapshot and the continuation equals the reference bit for bit: parameters, AdamW, the LR
  schedule, the gradient scaler, the dataloader's shuffle generator and pass count, the
  registered object, ``accelerator.step`` / ``save_iteration`` and the torch, numpy and Python
  RNGs (each one of them drawn from).
* ``resume`` also meets accelerators that do not fit (a model of another width, a registered
  object missing, a checkpoint not taken by the adapter; a registered module of another shape,
  another optimizer or scheduler class, and a registered object whose load fails after
  everything before it was loaded): refused with the message, nothing loaded or everything put
  back; and, last, the daemon stopped under its client: the snapshot's handle fails with
  ``DaemonUnavailableError`` naming the socket, and restore reads the files.
* ``torchrun --nproc-per-node 2``: accelerate wraps the model in DDP; each process snapshots its
  own part, the step commits with both, the stored model has no ``module.`` prefix, and
  ``from_rank=r`` loads rank r's part (its own RNG states and registered object) into one process.
* A model wrapped by ``torch.compile`` is stored without its ``_orig_mod.`` prefix and loads
  into the same model uncompiled.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd_client
from ckptd.format.store import Store
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import assert_same, daemon_factory

pytestmark = pytest.mark.usefixtures("ckptd_env")
ckptd_env = daemon_fixtures.ckptd_env

JOB, DDP_JOB = "acc", "acc-ddp"
SNAPSHOT_STEP = 10  # 2 epochs of 5 batches
TIMEOUT_S = 240


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], what: str) -> None:
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{output[-6000:]}"


def _load(path: Path) -> dict[str, Any]:
    doc = torch.load(path, weights_only=True)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, Any]]:
    """Every process of the module, run once: what each wrote, the store, and how the daemon
    that ``resume`` stopped exited."""
    with daemon_factory() as factory:
        daemon = factory.start()
        out = factory.base / "out"
        out.mkdir()
        env = {**factory.env, "OMP_NUM_THREADS": "1"}
        sock, root = str(daemon.socket), str(daemon.root)
        train = ["-m", "tests.integration.adapters.acc_train"]
        first = [
            (_start([*train, "first", sock, root, str(out)], env), "first"),
            (
                _start(
                    [
                        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "tests.integration.adapters.acc_ddp", sock, root, str(out),
                    ],
                    env,
                ),
                "torchrun acc_ddp",
            ),
        ]  # fmt: skip
        for proc, what in first:
            _finish(proc, what)
        _finish(_start([*train, "resume", sock, root, str(out)], env), "resume")
        yield {
            "ref": _load(out / "ref.pt"),
            "first": _load(out / "first.pt"),
            "resume": _load(out / "resume.pt"),
            "compiled": _load(out / "compiled.pt"),
            "ddp": [_load(out / f"ddp-rank{r}.pt") for r in (0, 1)],
            "root": daemon.root,
            "socket": daemon.socket,
            "stopped_exit": factory.stop(daemon),
        }


# ---- one process, snapshot and restore in a new one ----------------------------------------------


def test_a_new_process_restores_everything_and_continues_bit_for_bit(runs: dict[str, Any]) -> None:
    ref, first, resume = runs["ref"], runs["first"], runs["resume"]
    # Restored in a new process: exactly what the first process held at the snapshot (its
    # parameters were changed right after the hand-off: the checkpoint kept the old ones).
    assert_same(resume["restored"], first["at_snapshot"], "restored")
    assert resume["extra"] == {"epoch": 2, "__step__": SNAPSHOT_STEP}
    # The pieces that make the continuation exact were really in play.
    at = first["at_snapshot"]
    assert at["accelerator_step"] == SNAPSHOT_STEP and at["loader_iteration"] == 2
    assert at["scaler"]["scale"] == 2.0**11 and at["scaler"]["_growth_tracker"] == 2
    assert at["running"]["seen"] == 60
    # Epochs 3-4 after the restore are the uninterrupted run's, loss by loss and bit for bit.
    assert first["losses"] == ref["losses"][:SNAPSHOT_STEP]
    assert resume["losses"] == ref["losses"][SNAPSHOT_STEP:]
    assert_same(resume["final"], ref["final"], "final")


def test_the_checkpoint_holds_what_save_state_saves_pickle_free(runs: dict[str, Any]) -> None:
    state = ckptd_client.load(JOB, SNAPSHOT_STEP, root=runs["root"])
    assert sorted(state) == ["extra", "model", "rng"]
    acc = state["model"]
    assert acc["format"] == "ckptd-accelerate/1" and acc["snapshot_step"] == SNAPSHOT_STEP
    at = runs["first"]["at_snapshot"]
    assert_same(dict(acc["models"][0]), at["params"], "models[0]")
    assert_same(acc["optimizers"], [at["optimizer"]], "optimizers")
    assert_same(acc["schedulers"], [at["scheduler"]], "schedulers")
    assert_same(acc["scaler"], at["scaler"], "scaler")
    assert_same(acc["custom_objects"], [at["running"]], "custom_objects")
    assert (acc["step"], acc["iteration"], acc["device_rng"]) == (SNAPSHOT_STEP, 0, None)
    assert acc["classes"] == {
        "optimizers": [["torch.optim.adamw", "AdamW"]],
        "schedulers": [["torch.optim.lr_scheduler", "StepLR"]],
        "custom_objects": [["tests.integration.adapters.acc_common", "RunningLoss"]],
    }
    (loader,) = acc["dataloaders"]
    assert loader["iteration"] == 2 and loader["seedable_sampler"] is None
    generators = loader["generators"]
    assert_same(generators["loader"], at["shuffle_generator"], "loader generator")
    assert_same(generators["sampler"], at["shuffle_generator"], "sampler generator")
    assert generators["synchronized"] is None  # one process: accelerate synchronizes none
    assert_same(state["rng"]["torch"], at["rng"]["torch"], "torch rng")
    assert state["extra"] == {"epoch": 2}
    (manifest,) = ckptd_client.list_checkpoints(JOB, root=runs["root"])
    assert manifest.metric == float.fromhex(runs["first"]["losses"][-1])


def test_the_adapter_imports_only_when_asked_and_says_what_to_install(
    runs: dict[str, Any],
) -> None:
    guard = runs["resume"]["guard"]
    assert guard["framework_imported"] is False  # import ckptd_client imports no accelerate
    assert guard["import_error"] == (
        "ckptd_client.accelerate needs Hugging Face Accelerate (the `accelerate` package): "
        "pip install 'ckptd[accelerate]'"
    )


def test_a_compiled_model_is_stored_unwrapped_and_loads_into_a_plain_one(
    runs: dict[str, Any],
) -> None:
    got = runs["compiled"]
    assert got["wrapper"] == "OptimizedModule"
    assert got["keys"] == ["_orig_mod.weight", "_orig_mod.bias"]  # what the wrapper shows
    stored = ckptd_client.load("acc-compiled", 1, root=runs["root"])["model"]["models"][0]
    assert list(stored) == ["weight", "bias"]
    want = {k.removeprefix("_orig_mod."): v for k, v in got["compiled"].items()}
    assert not torch.equal(got["before"]["weight"], want["weight"])
    assert_same(got["restored"], want)


# ---- refusals ------------------------------------------------------------------------------------

ADVICE = (
    "Nothing was loaded. Prepare (accelerator.prepare) and register "
    "(accelerator.register_for_checkpointing) the same objects, in the same order, as the run "
    "that took the snapshot, then restore"
)


def test_an_accelerator_that_does_not_fit_is_refused_before_anything_is_loaded(
    runs: dict[str, Any],
) -> None:
    resume = runs["resume"]
    assert resume["count_error"] == (
        f"job 'acc' step {SNAPSHOT_STEP} does not fit this accelerator: 1 registered object(s) "
        f"saved, 0 registered now. {ADVICE}"
    )
    assert resume["shape_error"] == (
        f"job 'acc' step {SNAPSHOT_STEP} does not fit this accelerator: "
        "model 0: 0.weight is torch.float32 [16, 4] in the checkpoint, torch.float32 [12, 4] in "
        "the model; model 0: 0.bias is torch.float32 [16] in the checkpoint, torch.float32 [12] "
        "in the model; model 0: 3.weight is torch.float32 [1, 16] in the checkpoint, "
        f"torch.float32 [1, 12] in the model. {ADVICE}"
    )
    assert resume["foreign_error"] == (
        "job 'plain': this checkpoint was not taken by ckptd_client.accelerate.snapshot (its "
        "model state has no 'format': 'ckptd-accelerate/1' entry); load it with "
        "ckptd_client.restore(model, optimizer, ...) or ckptd_client.load(). Nothing was loaded"
    )
    # Nothing loaded: parameters, optimizer, scheduler, generator, counters and RNGs as before.
    for key in ("count_unchanged", "shape_unchanged"):
        before, after = resume[key]
        assert_same(after, before, key)
        with pytest.raises(AssertionError):
            assert_same(after["params"], runs["first"]["at_snapshot"]["params"])


def test_other_classes_and_registered_shapes_are_refused_before_anything_is_loaded(
    runs: dict[str, Any],
) -> None:
    guards = runs["resume"]["guards"]
    fits = "job 'acc-guard' step 5 does not fit this accelerator: "
    # The review's case: an EMA Linear(4, 4) registered, restored where it is a Linear(4, 8).
    assert guards["ema_width"]["error"] == [
        "AcceleratorMismatchError",
        f"{fits}registered object 1: weight is torch.float32 [4, 4] in the checkpoint, "
        "torch.float32 [8, 4] in the object; registered object 1: bias is torch.float32 [4] in "
        f"the checkpoint, torch.float32 [8] in the object. {ADVICE}",
    ]
    assert guards["sgd"]["error"] == [
        "AcceleratorMismatchError",
        f"{fits}optimizer 0: torch.optim.adamw.AdamW in the checkpoint, torch.optim.sgd.SGD now. "
        f"{ADVICE}",
    ]
    assert guards["cosine"]["error"] == [
        "AcceleratorMismatchError",
        f"{fits}scheduler 0: torch.optim.lr_scheduler.StepLR in the checkpoint, "
        f"torch.optim.lr_scheduler.CosineAnnealingLR now. {ADVICE}",
    ]
    # A checkpoint without the classes (taken before they were stored): the scheduler's
    # settings still tell; one that fits loads.
    assert guards["legacy_cosine"]["error"] == [
        "AcceleratorMismatchError",
        "job 'acc-guard-legacy' step 5 does not fit this accelerator: scheduler 0: settings in "
        "the checkpoint, not in the scheduler: gamma, step_size; scheduler 0: settings not in the "
        f"checkpoint: T_max, eta_min. {ADVICE}",
    ]
    at = guards["at_snapshot"]
    legacy = {k: v for k, v in guards["legacy_restored"].items() if k != "rng"}
    assert_same(legacy, {k: v for k, v in at.items() if k != "rng"}, "legacy restored")
    # Nothing loaded: every part of the target, RNGs included, bit for bit as before, and
    # different from the checkpoint's.
    for case in ("ema_width", "sgd", "cosine", "legacy_cosine"):
        assert guards[case]["cause"] is None
        before, after = guards[case]["unchanged"]
        assert_same(after, before, case)
        for key in ("params", "optimizer", "scheduler", "running", "rng"):
            with pytest.raises(AssertionError):
                assert_same(after[key], at[key])


def test_a_load_that_fails_puts_back_everything_loaded_before_it(runs: dict[str, Any]) -> None:
    guards = runs["resume"]["guards"]
    flaky, at = guards["flaky"], guards["at_snapshot"]
    assert flaky["error"] == [
        "AcceleratorMismatchError",
        "job 'acc-guard' step 5 does not fit this accelerator: loading registered object 2 "
        "(tests.integration.adapters.acc_common.Flaky) raised RuntimeError: injected load "
        f"failure; everything loaded before it was put back as it was. {ADVICE}",
    ]
    assert flaky["cause"] == ["RuntimeError", "injected load failure"]
    # When it failed, everything before it had been loaded ...
    seen = flaky["seen_at_failure"]
    loaded_first = ("params", "optimizer", "scheduler", "scaler", "shuffle_generator", "running")
    for key in (*loaded_first, "loader_iteration", "ema"):
        assert_same(seen[key], at[key], key)
    # ... and all of it was put back, bit for bit, RNGs included.
    before, after = flaky["unchanged"]
    assert_same(after, before, "after the failed restore")
    for key in (*loaded_first, "ema", "flaky", "rng"):
        with pytest.raises(AssertionError):
            assert_same(after[key], at[key])
    assert after["accelerator_step"] == 0 and after["loader_iteration"] == 0
    # The same accelerator restores once the load works: everything comes from the checkpoint.
    assert_same(guards["flaky_restored"], at, "restored")


def test_a_daemon_stopped_under_the_client_fails_the_snapshot_and_restore_reads_the_files(
    runs: dict[str, Any],
) -> None:
    resume = runs["resume"]
    kind, message = resume["down_error"]
    assert kind == "DaemonUnavailableError"
    assert message.startswith(f"no ckptd daemon answers on {runs['socket']} ")
    assert "named by the socket= argument" in message
    assert runs["stopped_exit"] == 0  # it was stopped (drained), not killed
    assert resume["down_restore_step"] == SNAPSHOT_STEP
    assert_same(resume["down_restored"], runs["first"]["at_snapshot"], "restored from disk")
    assert [m.step for m in ckptd_client.list_checkpoints(JOB, root=runs["root"])] == [10]


# ---- two processes (DDP) -------------------------------------------------------------------------


def test_each_process_snapshots_its_part_and_any_part_loads_into_one_process(
    runs: dict[str, Any],
) -> None:
    ranks = runs["ddp"]
    for doc in ranks:
        assert doc["wrapper"] == "DistributedDataParallel"
        assert doc["distributed_type"] == "MULTI_CPU" and doc["world_size"] == 2
    store = Store(runs["root"])
    assert store.steps(DDP_JOB) == [2]
    assert store.read_manifest(DDP_JOB, 2).world_size == 2
    for rank in (0, 1):
        stored = ckptd_client.load(DDP_JOB, 2, root=runs["root"], rank=rank)["model"]
        assert list(stored["models"][0]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # DDP replicas agree; each process's RNG states and registered object are its own.
    a, b = (doc["state"] for doc in ranks)
    assert_same(a["params"], b["params"])
    assert not torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["running"]["seen"] != b["running"]["seen"]
    got = runs["resume"]["ddp"]
    for rank in (0, 1):
        assert got[f"rank{rank}"]["extra"] == {"rank": rank, "__step__": 2}
        assert_same(got[f"rank{rank}"]["state"], ranks[rank]["state"], f"rank {rank}")
    assert got["without_from_rank"] == (
        "job 'acc-ddp' step 2 was written by 2 rank(s), and this job runs 1: restore it at world "
        "size 2 (or pass rank= to read one rank's part), or reshard it with "
        "torch.distributed.checkpoint.load(..., storage_reader="
        "ckptd_client.dcp.CkptdStorageReader('acc-ddp', 2)) (to load one rank's part of a "
        "checkpoint taken at another process count: ckptd_client.accelerate.restore(accelerator, "
        "job=..., from_rank=R))"
    )
