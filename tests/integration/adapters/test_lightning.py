"""Lightning through ckptd (issue 14, item 1): ``Trainer(plugins=[CkptdCheckpointIO(job)])``.

Real Lightning in processes of their own (:mod:`tests.integration.adapters.lightning_run`), one
real daemon for the module:

* ``fit(max_steps=6)`` with ``ModelCheckpoint(every_n_train_steps=2, save_last=True)`` commits
  each step the plugin was asked to save, once (Lightning saves each step to two paths), and
  ``ModelCheckpoint``'s top-1 removals delete the older steps;
* ``fit(ckpt_path="last", max_steps=8)`` in a new process ends bit-identical to an
  uninterrupted 8-step run;
* a trainer SIGKILLed right after the save of step 4 returned still gets step 4 committed, and
  every pointer left (``last.ckpt`` included) names a committed step.

The call sequences ``ModelCheckpoint`` makes are also driven directly, in this process (a
hypothesis state machine over saves, removals and commits): a pointer exists only for a
committed step, a removed step goes only once nothing names it and never leaves the job
without a committed checkpoint.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ckptd.errors import (
    DaemonUnavailableError,
    InvalidNameError,
    ManifestError,
    NotFoundError,
    UnsupportedStateError,
)
from ckptd.format.store import Store
from ckptd_client.lightning import POINTER_KIND, CkptdCheckpointIO, read_pointer
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import Daemon, assert_same, clean_env, daemon_factory

pytestmark = pytest.mark.usefixtures("ckptd_env")
ckptd_env = daemon_fixtures.ckptd_env


@pytest.fixture(scope="module")
def lt_daemon() -> Iterator[Daemon]:
    with daemon_factory() as factory:
        yield factory.start()


# ---- real Lightning, in processes of its own ------------------------------------------------


def _run(daemon: Daemon, out: Path, *args: str) -> subprocess.Popen[str]:
    env = clean_env(daemon.root.parent, CKPTD_SOCKET=str(daemon.socket))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.adapters.lightning_run", str(out), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], expect: int = 0) -> str:
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == expect, f"trainer exited {proc.returncode}:\n{output[-4000:]}"
    return output


def _committed(daemon: Daemon, job: str) -> list[int]:
    """The steps of ``job`` the daemon logged as committed, in order."""
    return [
        int(m.group(1)) for m in re.finditer(rf" {job} step (\d+) committed", daemon.log_text())
    ]


def _pointers(directory: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(directory.iterdir()):
        pointer = read_pointer(path)
        assert pointer is not None, f"{path} is not a ckptd pointer"
        found[path.name] = pointer
    return found


@pytest.fixture(scope="module")
def runs(lt_daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Round 1: the 6-step run with the plugin beside an uninterrupted 8-step run without it.
    Round 2: the resume to 8 steps beside a run SIGKILLed after its save of step 4."""
    base = tmp_path_factory.mktemp("lightning")
    dirs = {name: base / name for name in ("six", "reference", "resumed", "killed")}
    first = _run(lt_daemon, dirs["six"], "6", "--plugin", "lt-main")
    reference = _run(lt_daemon, dirs["reference"], "8")
    _finish(first)
    _finish(reference)
    # The resumed run continues in the same directory (its `last.ckpt`), in a new process.
    dirs["resumed"] = dirs["six"]
    for name in ("final", "saves"):  # the resumed run writes its own
        suffix = ".pt" if name == "final" else ".json"
        (dirs["six"] / f"{name}-6{suffix}").write_bytes(
            (dirs["six"] / f"{name}{suffix}").read_bytes()
        )
    resumed = _run(lt_daemon, dirs["six"], "8", "--plugin", "lt-main", "--resume")
    killed = _run(lt_daemon, dirs["killed"], "6", "--plugin", "lt-kill", "--kill-after", "4")
    output = _finish(resumed)
    assert "Restored all states from the checkpoint" in output and "last.ckpt" in output
    _finish(killed, expect=-9)
    lt_daemon.wait_idle()
    return dirs


def test_fit_commits_each_saved_step_once(runs: dict[str, Path], lt_daemon: Daemon) -> None:
    first = json.loads((runs["six"] / "saves-6.json").read_text())
    resumed = json.loads((runs["six"] / "saves.json").read_text())
    assert [(step, Path(p).name) for step, p in first] == [
        (2, "epoch=0-step=2.ckpt"),
        (2, "last.ckpt"),
        (4, "epoch=0-step=4.ckpt"),
        (4, "last.ckpt"),
        (6, "epoch=0-step=6.ckpt"),
        (6, "last.ckpt"),
    ]
    assert [step for step, _path in resumed] == [8, 8]
    assert _committed(lt_daemon, "lt-main") == [2, 4, 6, 8], "each step committed once"
    # ModelCheckpoint keeps the top 1 (no monitor: the newest) and last.ckpt: older steps go.
    assert Store(lt_daemon.root).steps("lt-main") == [8]
    pointers = _pointers(runs["six"] / "ckpt")
    assert sorted(pointers) == ["epoch=1-step=8.ckpt", "last.ckpt"]
    for pointer in pointers.values():
        assert pointer["kind"] == POINTER_KIND and pointer["job"] == "lt-main"
        assert pointer["step"] == 8 and pointer["root"] == str(lt_daemon.root)


def test_resume_from_last_is_bit_identical(runs: dict[str, Path]) -> None:
    got = torch.load(runs["resumed"] / "final.pt", weights_only=True)
    want = torch.load(runs["reference"] / "final.pt", weights_only=True)
    assert got["global_step"] == want["global_step"] == 8
    assert_same(got["model"], want["model"], "model")
    assert_same(got["optimizer"], want["optimizer"], "optimizer")
    assert_same(got["scheduler"], want["scheduler"], "scheduler")
    six = torch.load(runs["six"] / "final-6.pt", weights_only=True)
    assert not torch.equal(six["model"]["net.0.weight"], got["model"]["net.0.weight"])


def test_killed_after_save_still_commits_and_last_is_committed(
    runs: dict[str, Path], lt_daemon: Daemon
) -> None:
    saves = json.loads((runs["killed"] / "saves.json").read_text())
    assert saves[-1][0] == 4 and saves[-1][1].endswith("last.ckpt")
    store = Store(lt_daemon.root)
    committed = store.steps("lt-kill")
    assert 4 in committed, "the step handed off before the kill was committed"
    pointers = _pointers(runs["killed"] / "ckpt")
    assert pointers["last.ckpt"]["step"] in (2, 4)
    for name, pointer in pointers.items():
        assert pointer["step"] in committed, f"{name} names uncommitted step {pointer['step']}"
        assert store.read_manifest("lt-kill", pointer["step"]).digest == pointer["digest"]


# ---- the plugin's calls, driven directly ----------------------------------------------------


def _lightning_dict(
    step: int, score: float | None = None, dirpath: Path | None = None, **extra: Any
) -> dict[str, Any]:
    """A checkpoint dict shaped like Lightning's (the parts the plugin looks at)."""
    g = torch.Generator().manual_seed(step)
    return {
        "epoch": 0,
        "global_step": step,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {"net.weight": torch.randn(4, 4, generator=g)},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss'}": {
                "monitor": "val_loss" if score is not None else None,
                "dirpath": None if dirpath is None else str(dirpath),
                "current_score": None if score is None else torch.tensor(score),
                "best_k_models": {},
            }
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "lr_schedulers": [],
        "hyper_parameters": {"width": 4, **extra},
    }


@pytest.fixture
def io(lt_daemon: Daemon, request: pytest.FixtureRequest) -> Iterator[CkptdCheckpointIO]:
    job = "io-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    plugin = CkptdCheckpointIO(job, socket=lt_daemon.socket, root=lt_daemon.root, strict=True)
    yield plugin
    plugin.teardown()


def test_same_step_twice_is_stored_once_and_pointers_follow_the_commit(
    io: CkptdCheckpointIO, lt_daemon: Daemon, tmp_path: Path
) -> None:
    state = _lightning_dict(2, score=0.25)
    io.save_checkpoint(state, tmp_path / "epoch=0-step=2.ckpt")
    io.save_checkpoint(_lightning_dict(2, score=0.5), tmp_path / "last.ckpt")
    io.teardown()
    assert _committed(lt_daemon, io.job) == [2]
    manifest = Store(lt_daemon.root).read_manifest(io.job, 2)
    assert manifest.metric == 0.25, "the monitored current_score is the metric"
    for name in ("epoch=0-step=2.ckpt", "last.ckpt"):
        pointer = read_pointer(tmp_path / name)
        assert pointer is not None and pointer["step"] == 2
        assert pointer["digest"] == manifest.digest
        loaded = io.load_checkpoint(tmp_path / name)
        assert_same(loaded["state_dict"], state["state_dict"])
        assert loaded["loops"] == state["loops"]


def test_removal_never_leaves_zero_and_spares_a_step_still_named(
    io: CkptdCheckpointIO, lt_daemon: Daemon, tmp_path: Path
) -> None:
    store = Store(lt_daemon.root)
    a, b, last = tmp_path / "a.ckpt", tmp_path / "b.ckpt", tmp_path / "last.ckpt"
    io.save_checkpoint(_lightning_dict(2), a)
    io.save_checkpoint(_lightning_dict(2), last)
    io.client.flush()
    io.remove_checkpoint(a)  # last.ckpt still names step 2
    assert not a.exists() and store.steps(io.job) == [2]
    io.remove_checkpoint(last)  # nothing names step 2, but it is the only commit: kept
    assert store.steps(io.job) == [2]
    io.save_checkpoint(_lightning_dict(4), b)
    io.client.flush()
    io.save_checkpoint(_lightning_dict(6), last)  # the next save collects step 2
    io.client.flush()
    assert store.steps(io.job) == [4, 6]
    io.remove_checkpoint(b)
    assert store.steps(io.job) == [6]
    assert read_pointer(last) is not None and read_pointer(last)["step"] == 6  # type: ignore[index]


def test_pointer_from_an_earlier_run_is_removed_with_its_step(
    lt_daemon: Daemon, tmp_path: Path
) -> None:
    first = CkptdCheckpointIO("io-earlier", socket=lt_daemon.socket, strict=True)
    first.save_checkpoint(_lightning_dict(2), tmp_path / "epoch=0-step=2.ckpt")
    first.save_checkpoint(_lightning_dict(4), tmp_path / "epoch=0-step=4.ckpt")
    first.teardown()
    second = CkptdCheckpointIO("io-earlier", socket=lt_daemon.socket, strict=True)
    second.remove_checkpoint(tmp_path / "epoch=0-step=2.ckpt")  # restored top-k state does so
    assert Store(lt_daemon.root).steps("io-earlier") == [4]
    second.teardown()


def test_a_run_spares_steps_named_in_its_other_checkpoint_directories(
    lt_daemon: Daemon, tmp_path: Path
) -> None:
    """Two ModelCheckpoints (top-1 in ``a/``, best in ``b/``) name step 4; the resumed run's
    top-k removes ``a/``'s steps only, and ``b/best.ckpt`` must keep loading."""
    a, b = tmp_path / "a", tmp_path / "b"
    first = CkptdCheckpointIO("io-dirs", socket=lt_daemon.socket, strict=True)
    first.save_checkpoint(_lightning_dict(4, dirpath=b), a / "x.ckpt")
    first.save_checkpoint(_lightning_dict(4, dirpath=b), b / "best.ckpt")
    first.teardown()
    second = CkptdCheckpointIO("io-dirs", socket=lt_daemon.socket, strict=True)
    second.load_checkpoint(a / "x.ckpt")  # fit(ckpt_path=...): learns b/ from the dict
    second.save_checkpoint(_lightning_dict(6), a / "y.ckpt")
    second.remove_checkpoint(a / "x.ckpt")
    second.client.flush()
    second.save_checkpoint(_lightning_dict(8), a / "z.ckpt")
    second.remove_checkpoint(a / "y.ckpt")
    second.teardown()
    assert Store(lt_daemon.root).steps("io-dirs") == [4, 8]
    assert second.load_checkpoint(b / "best.ckpt")["global_step"] == 4


def test_weights_only_and_full_saves_of_one_step(
    io: CkptdCheckpointIO, lt_daemon: Daemon, tmp_path: Path
) -> None:
    """A full save after a weights-only one of the same step replaces it (every path of the
    step then loads the full one); a weights-only save after a full one is the full one."""
    full = _lightning_dict(4)
    weights = {k: v for k, v in full.items() if k not in ("optimizer_states", "lr_schedulers")}
    io.save_checkpoint(weights, tmp_path / "w.ckpt")
    io.save_checkpoint(full, tmp_path / "last.ckpt")
    io.save_checkpoint(_lightning_dict(6), tmp_path / "last.ckpt")
    io.save_checkpoint(
        {k: v for k, v in _lightning_dict(6).items() if k != "optimizer_states"},
        tmp_path / "w6.ckpt",
    )
    io.teardown()
    assert _committed(lt_daemon, io.job) == [4, 4, 6]
    for name in ("w.ckpt", "w6.ckpt", "last.ckpt"):
        assert "optimizer_states" in io.load_checkpoint(tmp_path / name), name


def test_load_right_after_save_and_a_second_fit(io: CkptdCheckpointIO, tmp_path: Path) -> None:
    io.save_checkpoint(_lightning_dict(2), tmp_path / "a.ckpt")
    assert io.load_checkpoint(tmp_path / "a.ckpt")["global_step"] == 2  # waits for the commit
    io.teardown()
    # A second fit() with the same plugin: step 2 again, with other weights, is stored anew.
    again = _lightning_dict(2)
    again["state_dict"]["net.weight"] += 1
    io.save_checkpoint(again, tmp_path / "b.ckpt")
    loaded = io.load_checkpoint(tmp_path / "b.ckpt")
    assert_same(loaded["state_dict"], again["state_dict"])


def test_hyperparameter_objects_need_allow_pickle(lt_daemon: Daemon, tmp_path: Path) -> None:
    state = _lightning_dict(2, loss_fn=torch.nn.MSELoss())
    plain = CkptdCheckpointIO("io-pickle", socket=lt_daemon.socket, strict=True)
    with pytest.raises(UnsupportedStateError, match=r"hyper_parameters.*loss_fn") as info:
        plain.save_checkpoint(state, tmp_path / "a.ckpt")
    assert "allow_pickle=True" in str(info.value) and "ignore=" in str(info.value)
    plain.teardown()
    assert not (tmp_path / "a.ckpt").exists()
    pickling = CkptdCheckpointIO(
        "io-pickle", socket=lt_daemon.socket, strict=True, allow_pickle=True
    )
    pickling.save_checkpoint(state, tmp_path / "a.ckpt")
    pickling.teardown()
    loaded = pickling.load_checkpoint(tmp_path / "a.ckpt")
    assert isinstance(loaded["hyper_parameters"]["loss_fn"], torch.nn.MSELoss)


def test_load_errors_and_foreign_files(io: CkptdCheckpointIO, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Checkpoint file not found"):
        io.load_checkpoint(tmp_path / "missing.ckpt")
    # A torch.save checkpoint from before the switch loads as Lightning would load it.
    plain = tmp_path / "old.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, plain)
    assert io.load_checkpoint(plain)["global_step"] == 3
    io.remove_checkpoint(plain)
    assert not plain.exists()
    # A pointer to a step that is gone, or that was committed again since.
    io.save_checkpoint(_lightning_dict(2), tmp_path / "a.ckpt")
    io.teardown()
    pointer = tmp_path / "a.ckpt"
    doc = json.loads(pointer.read_text())
    pointer.write_text(json.dumps({**doc, "digest": "0" * 64}))
    with pytest.raises(NotFoundError, match="committed again since"):
        io.load_checkpoint(pointer)
    pointer.write_text(json.dumps({**doc, "step": 999}))
    with pytest.raises(NotFoundError, match=r"step 999 .* no longer exists"):
        io.load_checkpoint(pointer)


def test_bad_calls_are_refused(lt_daemon: Daemon, tmp_path: Path) -> None:
    io = CkptdCheckpointIO("io-bad", socket=lt_daemon.socket)
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(_lightning_dict(2), tmp_path / "a.ckpt", {"x": 1})
    # Not a training checkpoint (the spawn launchers' temporary state dict): torch.save.
    io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "spawn.ckpt")
    assert read_pointer(tmp_path / "spawn.ckpt") is None
    assert torch.equal(io.load_checkpoint(tmp_path / "spawn.ckpt")["w"], torch.ones(3))
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_text(json.dumps({"kind": POINTER_KIND, "job": "io-bad", "step": "two"}))
    with pytest.raises(ManifestError, match="damaged ckptd pointer"):
        io.load_checkpoint(damaged)
    io.remove_checkpoint(damaged)
    assert not damaged.exists()
    with pytest.raises(ValueError, match="local dirpath"):
        io.save_checkpoint(_lightning_dict(2), "s3://bucket/a.ckpt")
    with pytest.raises(InvalidNameError, match="invalid job name"):
        CkptdCheckpointIO("../escape")
    down = CkptdCheckpointIO("io-down", socket=tmp_path / "nobody.sock")
    with pytest.raises(DaemonUnavailableError, match=r"nobody\.sock"):
        down.save_checkpoint(_lightning_dict(2), tmp_path / "b.ckpt")
    assert not (tmp_path / "b.ckpt").exists()
    io.teardown()


class PluginMachine(RuleBasedStateMachine):
    """ModelCheckpoint's call sequences: saves of a rising global step to a few paths (the same
    step to several), removals, commits. Invariants: every pointer on disk names a committed step
    with its digest; once a step was committed the job always has one; a step a live path names
    is never deleted once committed."""

    daemon: Daemon
    base: Path

    def __init__(self) -> None:
        super().__init__()
        self.n = getattr(PluginMachine, "n", 0) + 1
        PluginMachine.n = self.n
        self.job = f"machine-{self.n}"
        self.dir = self.base / self.job
        self.dir.mkdir()
        self.io = CkptdCheckpointIO(self.job, socket=self.daemon.socket, strict=True)
        self.store = Store(self.daemon.root)
        self.step = 0
        self.live: dict[str, int] = {}  # what Lightning believes: path -> step
        self.ever_committed = False

    @rule()
    def advance(self) -> None:
        self.step += 1

    @rule(name=st.sampled_from(["a.ckpt", "b.ckpt", "last.ckpt"]), weights_only=st.booleans())
    def save(self, name: str, weights_only: bool) -> None:
        if self.step == 0:
            self.step = 1
        state = _lightning_dict(self.step)
        if weights_only:
            del state["optimizer_states"]
        self.io.save_checkpoint(state, self.dir / name)
        self.live[name] = self.step

    @rule()
    def restart(self) -> None:
        """The trainer process ends (teardown) and a new one takes over the directory (saving a
        step the earlier one saved would replace it: its pointers then say so when loaded)."""
        self.io.teardown()
        self.io = CkptdCheckpointIO(self.job, socket=self.daemon.socket, strict=True)
        self.step += 1  # the new process resumes and trains on

    @rule(name=st.sampled_from(["a.ckpt", "b.ckpt", "last.ckpt"]))
    def remove(self, name: str) -> None:
        self.io.remove_checkpoint(self.dir / name)
        self.live.pop(name, None)
        assert not (self.dir / name).exists()

    @rule()
    def commit(self) -> None:
        if self.io._client is not None:
            assert self.io.client.flush(60) == []
        for name, step in self.live.items():
            assert step in self.store.steps(self.job), f"{name}'s step {step} was deleted"
            pointer = read_pointer(self.dir / name)
            assert pointer is not None and pointer["step"] == step, f"{name}: {pointer}"
            assert self.store.read_manifest(self.job, step).digest == pointer["digest"]

    @invariant()
    def pointers_name_committed_steps(self) -> None:
        committed = self.store.steps(self.job)
        self.ever_committed = self.ever_committed or bool(committed)
        if self.ever_committed:
            assert committed, "the job was left without a committed checkpoint"
        for path in self.dir.iterdir():
            if path.name.endswith(".tmp"):
                continue
            pointer = read_pointer(path)
            assert pointer is not None
            assert pointer["step"] in committed, f"{path.name} names uncommitted {pointer}"

    def teardown(self) -> None:
        self.io.teardown()


def test_plugin_call_sequences(lt_daemon: Daemon, tmp_path: Path) -> None:
    PluginMachine.daemon = lt_daemon
    PluginMachine.base = tmp_path
    machine = PluginMachine.TestCase
    machine.settings = settings(max_examples=8, stateful_step_count=14, deadline=None)
    machine().runTest()
