"""bench.summary prints the benchmark tables from bench/results/; the READMEs must show them as
printed, so that every figure in them comes from a committed result file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import summary

REPO = Path(__file__).resolve().parents[2]


def tables(text: str) -> list[str]:
    """The markdown tables in ``text`` (runs of lines starting with ``|``), spaces collapsed."""
    out: list[str] = []
    current: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(re.sub(r"\s+", " ", line.strip()))
        elif current:
            out.append("\n".join(current))
            current = []
    return out


def test_every_summary_table_is_in_the_bench_readme(capsys: pytest.CaptureFixture[str]) -> None:
    assert summary.main([]) == 0
    printed = tables(capsys.readouterr().out)
    assert len(printed) >= 6  # goodput, by size, 1 GiB, two store tables, codec, targets
    shown = set(tables((REPO / "bench" / "README.md").read_text(encoding="utf-8")))
    missing = [t.splitlines()[0] for t in printed if t not in shown]
    assert not missing, (
        "bench/README.md does not show these tables as `python -m bench.summary` prints them "
        f"from bench/results/ (paste its output): {missing}"
    )


def test_readme_headline_tables_match_the_results(capsys: pytest.CaptureFixture[str]) -> None:
    assert summary.main([]) == 0
    printed = tables(capsys.readouterr().out)
    readme = tables((REPO / "README.md").read_text(encoding="utf-8"))
    goodput = next(t for t in printed if "steps/s, % of no checkpoints" in t)
    by_size = next(t for t in printed if "ckptd stall s (x floor)" in t)
    assert goodput in readme and by_size in readme


def test_summary_without_results_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert summary.main(["--results", str(tmp_path)]) == 2
    assert "no results in" in capsys.readouterr().err
