"""Restoring a multi-rank step in-process: the world size must match, else the error names both
sizes and the resharding reader; a process that knows its rank loads its own part."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckptd_client
from ckptd.errors import RankLayoutError

JOB = "ranked"
ENV = ("RANK", "WORLD_SIZE", "CKPTD_ATTEMPT", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    for rank in range(2):
        model = torch.nn.Linear(4, 2)
        torch.nn.init.constant_(model.weight, float(rank))
        ckptd_client.save(
            JOB, model, step=5, root=tmp_path, rank=rank, world_size=2, attempt="a1", rng=False
        )
    return tmp_path


def test_each_rank_restores_its_own_part(root: Path) -> None:
    for rank in range(2):
        model = torch.nn.Linear(4, 2)
        extra = ckptd_client.restore(model, job=JOB, root=root, rank=rank, world_size=2, rng=False)
        assert extra["__step__"] == 5
        assert torch.equal(model.weight, torch.full((2, 4), float(rank)))


def test_another_world_size_is_refused_before_anything_is_loaded(root: Path) -> None:
    model = torch.nn.Linear(4, 2)
    before = model.weight.detach().clone()
    with pytest.raises(
        RankLayoutError,
        match=r"job 'ranked' step 5 was written by 2 rank\(s\), and this job runs 3: restore it "
        r"at world size 2 .*CkptdStorageReader\('ranked', 5\)",
    ):
        ckptd_client.restore(model, job=JOB, root=root, rank=0, world_size=3, rng=False)
    assert torch.equal(model.weight, before)
    with pytest.raises(RankLayoutError, match=r"written by 2 rank\(s\), and this job runs 1"):
        ckptd_client.restore(model, job=JOB, root=root, rank=0, world_size=1, rng=False)


def test_load_takes_the_process_rank_and_checks_its_world(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RankLayoutError, match=r"written by 2 ranks and no rank was given"):
        ckptd_client.load(JOB, root=root)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    state = ckptd_client.load(JOB, root=root)
    assert torch.equal(state["model"]["weight"], torch.full((2, 4), 1.0))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RankLayoutError, match=r"written by 2 rank\(s\), and this job runs 4"):
        ckptd_client.load(JOB, root=root)
