"""Where a Client's rank, world size and attempt come from (without a process group; the
torchrun tests cover the process-group path)."""

from __future__ import annotations

import pytest

from ckptd.errors import RankLayoutError
from ckptd.units import parse_duration
from ckptd_client.ranks import Ranks, agree_on_step, current_rank, detect

ENV = ("RANK", "WORLD_SIZE", "CKPTD_ATTEMPT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def test_a_lone_process_is_rank_0_of_1() -> None:
    assert detect() == Ranks(0, 1, None)
    assert current_rank() is None
    assert not detect().multi


def test_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job/42:x")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert detect() == Ranks(3, 4, "job_42_x.r2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    assert detect().attempt == "job_42_x.r3"  # a restart is another attempt


def test_explicit_arguments_and_ckptd_attempt_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r")
    monkeypatch.setenv("CKPTD_ATTEMPT", "from-env")
    assert detect() == Ranks(3, 4, "from-env")
    assert detect(1, 2, "given") == Ranks(1, 2, "given")
    assert detect(0, 1) == Ranks(0, 1, None)  # rank 0 of 1: an ordinary single-process job


@pytest.mark.parametrize(
    ("rank", "world", "message"),
    [
        (2, 2, r"rank 2 is outside \[0, 2\)"),
        (-1, 2, r"rank -1 is outside \[0, 2\)"),
        (0, 0, r"world_size must be in \[1, 99999\], got 0"),
        (0, 100_000, r"world_size must be in \[1, 99999\]"),
        (1, None, "give both rank= and world_size= or neither"),
        ("1", 2, "rank must be an integer"),
    ],
)
def test_bad_ranks(rank: object, world: object, message: str) -> None:
    with pytest.raises(RankLayoutError, match=message):
        detect(rank, world, "a")  # type: ignore[arg-type]


def test_a_multi_rank_job_without_an_attempt_is_asked_for_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(RankLayoutError, match=r"pass attempt= .* or set CKPTD_ATTEMPT"):
        detect(0, 2)
    monkeypatch.setenv("CKPTD_ATTEMPT", "../etc")
    with pytest.raises(RankLayoutError, match="CKPTD_ATTEMPT: attempt must be"):
        detect(0, 2)
    monkeypatch.setenv("RANK", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RankLayoutError, match="RANK='x' in the environment is not an integer"):
        detect()


def test_without_a_process_group_each_rank_keeps_its_step() -> None:
    assert agree_on_step(12, 3, False, Ranks(1, 2, "a")) == (12, 3, False)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90.0), ("90s", 90.0), ("30m", 1800.0), ("1h", 3600.0), ("2d", 172800.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "k") == seconds


@pytest.mark.parametrize("bad", ["-1", -1, "1w", True, None, "h"])
def test_bad_durations(bad: object) -> None:
    from ckptd.errors import ConfigError

    with pytest.raises(ConfigError, match="k: expected a duration"):
        parse_duration(bad, "k")
