"""``ckptd_client.hf`` with a real ``transformers.Trainer`` and a real daemon (issue 14, item 2).

Two trainer processes (``hf_run.py``) serve the whole module, started together against one
daemon: ``train`` runs the 6-step save run, the best-model run, the refused ``save_strategy``
and the run against a socket nobody serves; ``resume`` runs the uninterrupted 8-step run, then
(once the 6-step run's checkpoints are committed) materializes step 6 and resumes from it in a
new process, then the failure paths of ``materialize``. The tests read what the runs recorded
and what the daemon stored. Only single-process training is covered here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ckptd_client
from tests.integration.daemon_fixtures import (
    REPO,
    Daemon,
    daemon_factory,
    pid_alive,
    query,
    wait_until,
)

TIMEOUT_S = 240.0
MAIN_JOB, BEST_JOB = "hf-main", "hf-best"


@dataclass
class Runs:
    daemon: Daemon
    out: Path
    results: dict[str, dict[str, Any]]

    def final(self, scenario: str) -> dict[str, torch.Tensor]:
        """The model weights a scenario's trainer ended with."""
        weights: dict[str, torch.Tensor] = torch.load(
            self.out / f"{scenario}-final.pt", weights_only=True
        )
        return weights

    def stored(self, job: str, step: int) -> dict[str, Any]:
        state: dict[str, Any] = ckptd_client.load(job, step, root=self.daemon.root)
        return state

    def steps(self, job: str) -> list[int]:
        return [m.step for m in ckptd_client.list_checkpoints(job, root=self.daemon.root)]


def _output(log: Path) -> str:
    return log.read_text(errors="replace")[-8000:]


@pytest.fixture(scope="module")
def runs() -> Iterator[Runs]:
    with daemon_factory() as factory:
        out = factory.base / "out"
        out.mkdir()
        env = dict(factory.env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        runner = [sys.executable, "-m", "tests.integration.adapters.hf_run"]
        # The daemons start while the trainers import transformers; the trainers wait for
        # OUT/daemons.ready. The second daemon is for the run that stops it midway.
        socket, root = factory.default_socket, factory.default_root
        other_socket, other_root = factory.base / "run2" / "d.sock", factory.base / "root2"
        where = [str(out), str(socket), str(root)]
        commands = {
            "train": [*runner, "train", *where, str(other_socket), str(other_root)],
            "resume": [*runner, "resume", *where],
        }
        procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        try:
            for what, argv in commands.items():
                log = out / f"{what}.log"
                with log.open("wb") as sink:
                    procs[what] = (
                        subprocess.Popen(
                            argv,
                            env=env,
                            cwd=REPO,
                            stdin=subprocess.DEVNULL,
                            stdout=sink,
                            stderr=subprocess.STDOUT,
                        ),
                        log,
                    )
            daemon = factory.start()
            factory.start(socket_path=other_socket, root=other_root)
            (out / "daemons.ready").touch()
            for what, (proc, log) in procs.items():
                if proc.wait(timeout=TIMEOUT_S) != 0:
                    pytest.fail(f"{what} exited with {proc.returncode}:\n{_output(log)}")
        finally:
            for proc, _log in procs.values():
                if proc.poll() is None:  # another one failed: resume may wait for it forever
                    proc.kill()
                    proc.wait()
            _stop_spawned(factory.base / "xdg" / "ckptd" / "ckptd.sock")  # by the example
        daemon.wait_idle()
        results = {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}
        yield Runs(daemon, out, results)


def _stop_spawned(sock: Path) -> None:
    """Stop the daemon the example's client spawned on ``sock`` (it exits only after a minute
    idle otherwise) and wait until it is gone."""
    try:
        pid = query(sock)["pid"]
        query(sock, "stop")
    except OSError:
        return  # never started, or gone already
    wait_until(lambda: not pid_alive(pid), 60, f"spawned daemon {pid} to exit")


def _unrelated(warnings: list[str]) -> list[str]:
    """transformers' warnings, less the one any GPT-2 built from a config logs at its first
    forward pass (once per process)."""
    return [w for w in warnings if "loss_type=None" not in w]


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, msg=_naming(key))


def _naming(key: str) -> Callable[[str], str]:
    return lambda message: f"{key}: {message}"


# ---- 1. saves go to ckptd, not to checkpoint folders ---------------------------------------------


def test_each_save_step_is_a_ckptd_step_and_no_checkpoint_folder_is_written(runs: Runs) -> None:
    """save_steps=2, max_steps=6: ckptd holds steps 2, 4 and 6 (listed by the run right after
    train() returned: on_train_end waited for the commits) and the output directory holds no
    ``checkpoint-*``. Step 6 holds the model the run ended with (tied weights still tied), its
    optimizer and scheduler state, the RNG states and the TrainerState as the Trainer would have
    written it, including the log entry of step 6 (logged after on_step_end)."""
    result = runs.results["save6"]
    assert result["steps"] == [2, 4, 6]
    assert result["folders"] == []
    assert result["client_closed"] is True
    assert _unrelated(result["warnings"]) == []

    stored = runs.stored(MAIN_JOB, 6)
    assert set(stored) == {"model", "optimizer", "scheduler", "rng", "extra"}
    _assert_same_weights(stored["model"], runs.final("save6"))
    model = stored["model"]
    assert model["lm_head.weight"].data_ptr() == model["transformer.wte.weight"].data_ptr()
    assert {"exp_avg", "exp_avg_sq"} <= set(stored["optimizer"]["state"][0])
    assert stored["scheduler"]["last_epoch"] == 6
    assert set(stored["rng"]) >= {"torch", "numpy", "python"}

    hf = stored["extra"]["hf"]
    trainer_state = hf["trainer_state"]
    assert trainer_state["global_step"] == 6
    # The final log_history adds the end-of-training summary to what the step-6 save saw.
    assert trainer_state["log_history"] == result["log_history"][:-1]
    assert trainer_state["log_history"][-1]["step"] == 6
    assert "loss" in trainer_state["log_history"][-1]
    assert json.loads(hf["model_config"])["n_embd"] == 32
    assert [
        runs.stored(MAIN_JOB, s)["extra"]["hf"]["trainer_state"]["global_step"] for s in (2, 4)
    ] == [2, 4]


# ---- 2. resume through materialize ---------------------------------------------------------------


def test_resuming_from_a_materialized_step_matches_an_uninterrupted_run(runs: Runs) -> None:
    """A new process writes step 6 out with ``materialize`` and resumes from it with
    ``trainer.train(resume_from_checkpoint=...)`` up to step 8: it ends with the weights and the
    global step of an uninterrupted 8-step run (dropout on: the RNG states came back too), and
    the Trainer warned about nothing (no missing tied key, no unknown file)."""
    result = runs.results["resume"]
    assert Path(result["path"]).name == "checkpoint-6"
    assert result["files"] == [
        "config.json",
        "model.safetensors",
        "optimizer.pt",
        "rng_state.pth",
        "scheduler.pt",
        "trainer_state.json",
    ]
    assert result["exported_global_step"] == 6
    assert result["global_step"] == runs.results["full8"]["global_step"] == 8
    resumed, uninterrupted = runs.final("resume"), runs.final("full8")
    _assert_same_weights(resumed, uninterrupted)
    at_step_6 = runs.final("save6")
    assert not torch.equal(resumed["transformer.wte.weight"], at_step_6["transformer.wte.weight"])
    assert _unrelated(result["warnings"]) == []
    assert result["folders"] == []  # the resumed run saved step 8 to ckptd only
    assert result["export_entries"] == ["checkpoint-6"]  # no temporary folder left
    assert runs.steps(MAIN_JOB) == [2, 4, 6, 8]


# ---- 3. the best model ---------------------------------------------------------------------------


def test_the_best_step_is_kept_and_loaded_into_the_model_at_the_end(runs: Runs) -> None:
    """Evaluation and a save every 2 steps, ``metric_for_best_model="eval_loss"``,
    ``save_total_limit=1``, ``load_best_model_at_end``: the evaluation loss is lowest at step 2.
    ckptd keeps step 2 (keep_best, by the metric each snapshot carries) beside the newest, step
    6, and the model ends with step 2's weights, though the Trainer found no best checkpoint
    folder of its own."""
    result = runs.results["best"]
    losses = {int(step): loss for step, loss in result["eval_loss"].items()}
    assert sorted(losses) == [2, 4, 6]
    assert min(losses, key=losses.__getitem__) == 2 < max(losses)  # the newest is not the best
    assert result["best_global_step"] == 2
    assert result["best_model_checkpoint"] is None
    assert result["folders"] == []
    assert _unrelated(result["warnings"]) == []

    assert runs.steps(BEST_JOB) == [2, 6]
    metrics = {
        m.step: m.metric for m in ckptd_client.list_checkpoints(BEST_JOB, root=runs.daemon.root)
    }
    assert metrics == {2: pytest.approx(losses[2]), 6: pytest.approx(losses[6])}
    best, last = runs.stored(BEST_JOB, 2), runs.stored(BEST_JOB, 6)
    final = runs.final("best")
    _assert_same_weights(final, best["model"])
    assert not torch.equal(final["transformer.wte.weight"], last["model"]["transformer.wte.weight"])
    # The stored TrainerState has the best metric as the Trainer updates it after on_evaluate.
    for stored in (best, last):
        trainer_state = stored["extra"]["hf"]["trainer_state"]
        assert trainer_state["best_global_step"] == 2
        assert trainer_state["best_metric"] == pytest.approx(losses[2])


# ---- 4. failure paths ----------------------------------------------------------------------------


def test_save_strategy_best_is_refused_before_anything_trains(runs: Runs) -> None:
    """Given to the Trainer, the callback refuses at ``Trainer(...)`` (on_init_end); added later,
    at ``train()`` (on_train_begin). The message says why and what to use instead."""
    result = runs.results["refuse"]
    for when in ("at_init", "at_train"):
        assert result[when]["type"] == "ConfigError", result[when]
        message = result[when]["message"]
        assert "save_strategy='best'" in message
        assert "save_strategy='steps'" in message and "save_total_limit" in message
    assert result["global_step"] == 0
    assert result["folders"] == []
    assert ckptd_client.list_checkpoints("hf-refused", root=runs.daemon.root) == []


def test_materialize_refuses_a_missing_job_or_step_and_an_existing_folder(runs: Runs) -> None:
    """A missing job or step is a ``NotFoundError`` naming it, and nothing is created; a
    ``checkpoint-6`` that exists is never replaced (``FileExistsError`` naming it): its files
    are untouched and no temporary folder is left beside it."""
    result = runs.results["materialize_errors"]
    assert result["missing_job"]["type"] == "NotFoundError"
    assert "'hf-nosuchjob' has no checkpoints" in result["missing_job"]["message"]
    assert result["missing_step"]["type"] == "NotFoundError"
    assert "'hf-main' has no checkpoint at step 5" in result["missing_step"]["message"]
    assert result["x_exists"] is False
    assert result["exists"]["type"] == "FileExistsError"
    assert "checkpoint-6 already exists" in result["exists"]["message"]
    assert result["unchanged"] is True
    assert result["export_entries"] == ["checkpoint-6"]


def test_snapshots_that_failed_during_training_raise_at_the_end_of_train(runs: Runs) -> None:
    """The daemon stops after step 2 committed: the hand-offs of steps 4 and 6 fail (logged by
    the client), training runs to its end, and then ``on_train_end`` raises the client's error
    out of ``trainer.train()``, naming the steps that were not committed."""
    result = runs.results["lost"]
    assert result["error"]["type"] == "DaemonUnavailableError", result["error"]
    message = result["error"]["message"]
    assert "2 snapshot(s) of job 'hf-lost' were not committed (step(s) 4, 6)" in message
    assert "no ckptd daemon answers on" in message
    assert result["global_step"] == 6
    assert result["steps"] == [2]
    assert result["folders"] == []


def test_a_daemon_that_does_not_answer_stops_train_with_the_clients_error(runs: Runs) -> None:
    """``socket=`` names a socket nobody serves: ``trainer.train()`` raises the Client's
    ``DaemonUnavailableError`` naming the socket, before the first step."""
    result = runs.results["down"]
    assert result["error"]["type"] == "DaemonUnavailableError"
    assert result["socket"] in result["error"]["message"]
    assert "named by the socket= argument" in result["error"]["message"]
    assert result["global_step"] == 0


# ---- the example ---------------------------------------------------------------------------------


def test_the_example_trains_then_resumes_through_materialize(runs: Runs) -> None:
    """``examples/hf_trainer.py`` run as a user runs it (in the resume process, to spare an
    import of transformers: its own working directory, no root, no socket, so it spawns the
    per-user daemon and checkpoints go to ``./checkpoints``): 6 steps with a snapshot every 2
    and no checkpoint folder, then a resume from the materialized step 6 to step 10;
    ``save_total_limit=3`` left the newest three steps."""
    result = runs.results["example"]
    assert "first run: ckptd steps [2, 4, 6], checkpoint folders []" in result["output"]
    assert "resumed from checkpoint-6 to step 10; ckptd steps [6, 8, 10]" in result["output"]
    assert result["steps"] == [6, 8, 10]


# ---- 5. the same files as the Trainer's own checkpoints ------------------------------------------


def _assert_same_tree(got: Any, want: Any, where: str) -> None:
    """Equal, tensors bit for bit (``torch.equal``), numpy arrays element for element."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for key, value in want.items():
            _assert_same_tree(got[key], value, f"{where}.{key}")
    elif isinstance(want, list | tuple):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _assert_same_tree(a, b, f"{where}[{i}]")
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and np.array_equal(got, want), where
    else:
        assert got == want, where


def _untimed(trainer_state: dict[str, Any]) -> dict[str, Any]:
    """``trainer_state`` less the wall-clock figures of its log entries (``*_runtime``,
    ``*_per_second``), which differ between any two runs."""
    timed = ("_runtime", "_per_second")
    history = [
        {k: v for k, v in entry.items() if not k.endswith(timed)}
        for entry in trainer_state["log_history"]
    ]
    return dict(trainer_state, log_history=history)


def test_materialized_steps_are_the_trainers_own_checkpoints(runs: Runs) -> None:
    """The same 9-step run by the plain Trainer and with the callback (a save every 2 steps and
    at the last, a log every 3, so step 2 and 8 are saved with no log entry; an evaluation every
    4 on a dict of two datasets; a ReduceLROnPlateau scheduler, which the Trainer steps after
    the evaluation hooks): every ``checkpoint-N`` the Trainer wrote and the one ``materialize``
    wrote from ckptd hold the same ``scheduler.pt``, ``optimizer.pt``, ``rng_state.pth`` and
    weights, bit for bit, and the same ``trainer_state.json`` but ``total_flos`` (the Trainer
    adds the FLOPs since the last log entry when it writes, which a callback cannot reach) and
    ``best_model_checkpoint`` (a folder of the Trainer's; None in ckptd)."""
    result = runs.results["differential"]
    assert result["hf_folders"] == [f"checkpoint-{n}" for n in (2, 4, 6, 8, 9)]
    assert result["steps"] == [2, 4, 6, 8, 9]
    assert result["folders"] == []
    hf_dir, ours_dir = runs.out / "diff-hf", runs.out / "diff-export"
    assert sorted(p.name for p in ours_dir.iterdir()) == result["hf_folders"]
    for name in result["hf_folders"]:
        want, got = hf_dir / name, ours_dir / name
        want_state = json.loads((want / "trainer_state.json").read_text())
        got_state = json.loads((got / "trainer_state.json").read_text())
        assert got_state.pop("best_model_checkpoint") is None
        best = want_state.pop("best_model_checkpoint")
        assert best is None or best.endswith(f"checkpoint-{want_state['best_global_step']}")
        assert got_state.pop("total_flos") <= want_state.pop("total_flos")
        assert _untimed(got_state) == _untimed(want_state), name
        for file in ("scheduler.pt", "optimizer.pt", "rng_state.pth"):
            _assert_same_tree(
                torch.load(got / file, weights_only=False),
                torch.load(want / file, weights_only=False),
                f"{name}/{file}",
            )
        ours, theirs = load_file(got / "model.safetensors"), load_file(want / "model.safetensors")
        assert set(theirs) <= set(ours)
        _assert_same_tree({k: ours[k] for k in theirs}, theirs, f"{name}/model.safetensors")
    # The plateau scheduler was stepped at steps 4 and 8 (after on_evaluate): the stored step 4
    # holds one step, step 8 two.
    schedulers = {n: runs.stored("hf-diff", n)["scheduler"] for n in (2, 4, 8)}
    assert [schedulers[n]["last_epoch"] for n in (2, 4, 8)] == [0, 1, 2]
    stored_lr = [g["lr"] for g in runs.stored("hf-diff", 9)["optimizer"]["param_groups"]]
    assert stored_lr == result["lr"]  # the LR the run ended with, as the plateau left it
    state_8 = runs.stored("hf-diff", 8)["extra"]["hf"]["trainer_state"]
    assert {"eval_a_loss", "eval_b_loss"} <= {k for e in state_8["log_history"] for k in e}


def test_a_train_that_raised_leaves_no_client_for_the_next_train(runs: Runs) -> None:
    """``train()`` raised at step 1 (``on_train_end`` never ran); ``train()`` again on the same
    Trainer, now with ``save_total_limit=2`` and ``save_only_model=True``: the leftover client
    was closed and a new one made from the current arguments (retention keeps 2 steps, not 1).
    ``materialize`` of a ``save_only_model`` step writes the model, its config and the
    ``trainer_state.json``, warns that it cannot be resumed from, and ``from_pretrained`` loads
    it with the run's final weights."""
    result = runs.results["rerun"]
    assert result["first"] == {"type": "RuntimeError", "message": "boom at step 1"}
    assert result["stale_open"] is False
    assert result["steps"] == [6, 8]
    assert result["files"] == ["config.json", "model.safetensors", "trainer_state.json"]
    assert len(result["materialize_warnings"]) == 1
    assert "save_only_model=True" in result["materialize_warnings"][0]
    assert "cannot resume" in result["materialize_warnings"][0]
    assert result["from_pretrained_equal"] is True
