"""The Accelerate adapter's single-process trainer (run by test_accelerate.py, one scenario per
process). ``first SOCKET ROOT OUT`` trains 4 epochs uninterrupted (the reference), then, on a
fresh accelerator seeded alike, 2 epochs, and snapshots; then snapshots a compiled model and
loads it into an uncompiled one. ``resume SOCKET ROOT OUT`` refuses accelerators that do not
fit, restores in a new process and trains the last 2 epochs, loads each part of the 2-process
DDP checkpoint into one process (``from_rank``), refuses accelerators of other classes and shapes
and undoes a load that fails (``guards``), and last stops the daemon under a client. Each
writes what it saw to ``OUT/<name>.pt`` (tensors) for the test to compare.
"""

from __future__ import annotations

import copy
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

import ckptd_client

JOB = "acc"
DDP_JOB = "acc-ddp"
COMPILED_JOB = "acc-compiled"
GUARD_JOB, LEGACY_JOB = "acc-guard", "acc-guard-legacy"
GUARD_STEP = 5


def check_import_guard() -> dict[str, Any]:
    """``import ckptd_client`` imports no framework; without accelerate the adapter says what to
    install."""
    out: dict[str, Any] = {"framework_imported": "accelerate" in sys.modules}
    sys.modules["accelerate"] = None  # type: ignore[assignment]  # what an absent package does
    try:
        import ckptd_client.accelerate  # noqa: F401
    except ImportError as exc:
        out["import_error"] = str(exc)
    finally:
        del sys.modules["accelerate"]
    return out


def first(socket: str, root: str, out: Path) -> None:
    from ckptd_client import accelerate as ckacc
    from tests.integration.adapters import acc_common as c

    # The reference: 4 epochs uninterrupted, on an accelerator of its own (build() seeds).
    ref = c.build()
    c.save({"losses": c.train(ref, range(c.EPOCHS)), "final": c.capture(ref)}, out / "ref.pt")

    run = c.build()
    losses = c.train(run, range(c.SNAPSHOT_AFTER_EPOCHS))
    at_snapshot = c.capture(run)
    with ckptd_client.Client(JOB, socket=socket, root=root, spawn=False) as client:
        handle = ckacc.snapshot(
            run.accelerator,
            client,
            step=c.SNAPSHOT_AFTER_EPOCHS * c.BATCHES_PER_EPOCH,
            extra={"epoch": c.SNAPSHOT_AFTER_EPOCHS},
            metric=float.fromhex(losses[-1]),
        )
        # The hand-off is done: the state may change at once, the checkpoint keeps the old one.
        with torch.no_grad():
            for p in run.model.parameters():
                p.add_(1000.0)
        handle.wait(timeout=60)
    c.save({"losses": losses, "at_snapshot": at_snapshot}, out / "first.pt")
    c.save(compiled_into_plain(socket, root), out / "compiled.pt")


def resume(socket: str, root: str, out: Path) -> None:
    guard = check_import_guard()
    from ckptd.protocol import can_connect
    from ckptd_client import accelerate as ckacc
    from tests.integration.adapters import acc_common as c
    from tests.integration.daemon_fixtures import query, wait_until

    result: dict[str, Any] = {"guard": guard}
    client = ckptd_client.Client(JOB, socket=socket, root=root, spawn=False)

    # A model of another width: refused before anything is loaded.
    wide = c.build(width=12)
    before = c.capture(wide)
    try:
        ckacc.restore(wide.accelerator, client)
    except ckacc.AcceleratorMismatchError as exc:
        result["shape_error"] = str(exc)
    result["shape_unchanged"] = [before, c.capture(wide)]

    # The running loss not registered yet: refused, nothing loaded (RNG included).
    run = c.build(register=False)
    before = c.capture(run)
    try:
        ckacc.restore(run.accelerator, client)
    except ckacc.AcceleratorMismatchError as exc:
        result["count_error"] = str(exc)
    result["count_unchanged"] = [before, c.capture(run)]

    run.accelerator.register_for_checkpointing(run.running)
    extra = ckacc.restore(run.accelerator, client)
    result["extra"] = extra
    result["restored"] = c.capture(run)
    result["losses"] = c.train(run, range(extra["epoch"], c.EPOCHS))
    result["final"] = c.capture(run)

    # A checkpoint that Client.snapshot took of a plain model: not the adapter's.
    with ckptd_client.Client("plain", socket=socket, root=root, spawn=False) as plain:
        plain.snapshot(run.model, run.optimizer, step=1).wait(timeout=60)
        try:
            ckacc.restore(run.accelerator, plain)
        except ckacc.AcceleratorMismatchError as exc:
            result["foreign_error"] = str(exc)
    client.close()

    result["ddp"] = ddp_into_one_process(root)
    result["guards"] = guards(socket, root)

    # Last, the daemon stopped under a client (as `ckptd stop` does): the snapshot's handle says
    # so, and restore reads the files.
    down = ckptd_client.Client(JOB, socket=socket, root=root, spawn=False)
    query(Path(socket), "stop")
    wait_until(lambda: not can_connect(socket), 60, "the stopped daemon to go")
    handle = ckacc.snapshot(run.accelerator, down, step=999)
    try:
        handle.wait(timeout=60)
    except ckptd_client.CkptdError as exc:
        result["down_error"] = [type(exc).__name__, str(exc)]
    result["down_restore_step"] = ckacc.restore(run.accelerator, down)["__step__"]
    result["down_restored"] = c.capture(run)
    down.close()
    c.save(result, out / "resume.pt")


def guards(socket: str, root: str) -> dict[str, Any]:
    """Accelerators that pass the counts but not the classes or shapes, and a load that fails
    half-way (what each restore raised, if anything, is recorded). The snapshot (``acc-guard``
    step 5) is of a run trained an epoch with 3 registered objects: the running loss, an EMA
    ``Linear(4, 4)`` and a :class:`~acc_common.Flaky`; every target is a fresh one (its state
    differs from the snapshot's in every part). For each refusal: its message and the target's
    whole state before and after (RNGs included)."""
    from ckptd_client import accelerate as ckacc
    from tests.integration.adapters import acc_common as c

    def target(ema_width: int = 4, **kwargs: Any) -> tuple[c.Run, torch.nn.Linear, c.Flaky]:
        run = c.build(**kwargs)
        ema, flaky = torch.nn.Linear(4, ema_width), c.Flaky()
        run.accelerator.register_for_checkpointing(ema, flaky)
        return run, ema, flaky

    def state(run: c.Run, ema: torch.nn.Module, flaky: c.Flaky) -> dict[str, Any]:
        return {
            **c.capture(run),
            "ema": copy.deepcopy(dict(ema.state_dict())),
            "flaky": flaky.state_dict(),
        }

    def refused(job: str, parts: tuple[c.Run, torch.nn.Module, c.Flaky]) -> dict[str, Any]:
        before = state(*parts)
        error: Exception | None = None
        try:
            ckacc.restore(parts[0].accelerator, job=job, root=root)
        except Exception as exc:  # the test checks that it is AcceleratorMismatchError
            error = exc
        cause = None if error is None else error.__cause__
        return {
            "error": None if error is None else [type(error).__name__, str(error)],
            "cause": None if cause is None else [type(cause).__name__, str(cause)],
            "unchanged": [before, state(*parts)],
        }

    source = target()
    with torch.no_grad():
        source[1].weight.mul_(3.0)  # the EMA differs from a fresh one's
    source[2].value = torch.arange(3.0)
    c.train(source[0], range(1))
    out: dict[str, Any] = {"at_snapshot": state(*source)}
    with ckptd_client.Client(GUARD_JOB, socket=socket, root=root, spawn=False) as client:
        ckacc.snapshot(source[0].accelerator, client, step=GUARD_STEP).wait(timeout=60)
    # A snapshot as the adapter took it before it stored classes.
    legacy = ckptd_client.load(GUARD_JOB, GUARD_STEP, root=root)
    legacy["model"].pop("classes", None)
    with ckptd_client.Client(LEGACY_JOB, socket=socket, root=root, spawn=False) as client:
        client.snapshot(legacy["model"], step=GUARD_STEP, rng=False).wait(timeout=60)

    out["ema_width"] = refused(GUARD_JOB, target(ema_width=8))
    sgd = partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    out["sgd"] = refused(GUARD_JOB, target(optimizer=sgd))
    cosine = partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=4)
    out["cosine"] = refused(GUARD_JOB, target(scheduler=cosine))
    out["legacy_cosine"] = refused(LEGACY_JOB, target(scheduler=cosine))
    legacy_fit = target()
    ckacc.restore(legacy_fit[0].accelerator, job=LEGACY_JOB, root=root, rng=False)
    out["legacy_restored"] = state(*legacy_fit)

    # The last registered object fails to load: everything loaded before it is put back.
    flaky = target()
    flaky[2].fail_with = lambda: state(*flaky)
    out["flaky"] = refused(GUARD_JOB, flaky)
    out["flaky"]["seen_at_failure"] = flaky[2].seen_at_failure
    ckacc.restore(flaky[0].accelerator, job=GUARD_JOB, root=root)  # it loads now
    out["flaky_restored"] = state(*flaky)
    return out


def ddp_into_one_process(root: str) -> dict[str, Any]:
    """Each rank's part of the 2-process DDP checkpoint, loaded into one process from the job's
    files (a job of multi-rank checkpoints takes no single-process Client)."""
    from ckptd_client import accelerate as ckacc
    from tests.integration.adapters import acc_ddp

    got: dict[str, Any] = {}
    for rank in (0, 1):
        run = acc_ddp.build()
        if rank == 0:
            try:
                ckacc.restore(run.accelerator, job=DDP_JOB, root=root)
            except ckptd_client.RankLayoutError as exc:
                got["without_from_rank"] = str(exc)
        extra = ckacc.restore(run.accelerator, job=DDP_JOB, root=root, from_rank=rank)
        got[f"rank{rank}"] = {"extra": extra, "state": acc_ddp.capture(run)}
    return got


def compiled_into_plain(socket: str, root: str) -> dict[str, Any]:
    """A ``torch.compile``d model's snapshot (never run: compiling needs no forward here) loaded
    into the same model uncompiled."""
    from ckptd_client import accelerate as ckacc
    from tests.integration.adapters import acc_common as c

    def prepared(compiled: bool) -> tuple[Any, torch.nn.Module]:
        acc = c.new_accelerator()
        model = torch.nn.Linear(4, 3)
        return acc, acc.prepare(torch.compile(model) if compiled else model)

    acc, model = prepared(compiled=True)
    with ckptd_client.Client(COMPILED_JOB, socket=socket, root=root, spawn=False) as client:
        ckacc.snapshot(acc, client, step=1).wait(timeout=60)
    other, plain = prepared(compiled=False)
    before = copy.deepcopy(dict(plain.state_dict()))
    ckacc.restore(other, job=COMPILED_JOB, root=root)
    return {
        "wrapper": type(model).__name__,
        "keys": list(model.state_dict()),
        "compiled": dict(model.state_dict()),
        "before": before,
        "restored": dict(plain.state_dict()),
    }


def main() -> None:
    scenario, *args = sys.argv[1:]
    if scenario == "first":
        first(args[0], args[1], Path(args[2]))
    elif scenario == "resume":
        resume(args[0], args[1], Path(args[2]))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main()
