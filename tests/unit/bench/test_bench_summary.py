"""bench.summary (and bench.scaling) print the benchmark tables, and the figures the README states
in prose, from bench/results/; the READMEs must show them as printed, so that every benchmark
figure in them comes from a committed result file.

Checked: every table of the README's headline and benchmark sections, every table of
bench/README.md's results section (bench.summary's and bench.scaling's), bench.scaling's fitted
lines, the committed ``scaling.jsonl``, and the README prose paragraphs ``bench.summary.prose``
prints (the scaling paragraph, the stall ratios, what ckptd adds to the copy).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from bench import scaling, summary

REPO = Path(__file__).resolve().parents[3]
RESULTS = REPO / "bench" / "results"
README = (REPO / "README.md").read_text(encoding="utf-8")
BENCH_README = (REPO / "bench" / "README.md").read_text(encoding="utf-8")


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


def section(text: str, heading: str) -> str:
    """The text under the ``## `` heading that starts with ``heading``, up to the next one."""
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def collapse(text: str) -> str:
    return " ".join(text.split())


def output_of(main: object, *args: str) -> str:
    assert callable(main)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def printed() -> str:
    """What ``python -m bench.summary`` prints from the committed results."""
    return output_of(summary.main)


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """What ``python -m bench.scaling`` prints, and the JSON lines it writes (to a tmp file)."""
    out = tmp_path_factory.mktemp("scaling") / "scaling.jsonl"
    return output_of(scaling.main, "--out", str(out)), out


def test_every_summary_table_is_in_the_bench_readme(printed: str) -> None:
    shown = set(tables(section(BENCH_README, "Results on this machine")))
    ours = tables(printed)
    assert len(ours) >= 7  # goodput, by size, 1 GiB, two store tables, codec, targets
    missing = [t.splitlines()[0] for t in ours if t not in shown]
    assert not missing, (
        "bench/README.md does not show these tables as `python -m bench.summary` prints them "
        f"from bench/results/ (paste its output): {missing}"
    )


def test_every_result_table_in_the_bench_readme_is_printed(
    printed: str, scaling_run: tuple[str, Path]
) -> None:
    printable = set(tables(printed)) | set(tables(scaling_run[0]))
    shown = tables(section(BENCH_README, "Results on this machine"))
    assert len(shown) >= 8  # the summary's seven and the scaling table
    stale = [t.splitlines()[0] for t in shown if t not in printable]
    assert not stale, (
        "bench/README.md shows tables that neither `python -m bench.summary` nor "
        f"`python -m bench.scaling` prints from bench/results/: {stale}"
    )


def test_every_benchmark_table_in_the_readme_is_printed(printed: str) -> None:
    printable = set(tables(printed))
    shown = tables(section(README, "Headline")) + tables(section(README, "Benchmarks"))
    assert len(shown) >= 7  # goodput, by size, 1 GiB, two store tables, codec, targets
    stale = [t.splitlines()[0] for t in shown if t not in printable]
    assert not stale, (
        "README.md shows benchmark tables that `python -m bench.summary` does not print from "
        f"bench/results/ (paste its output): {stale}"
    )


def test_the_scaling_fits_in_the_bench_readme_are_printed(scaling_run: tuple[str, Path]) -> None:
    stdout, written = scaling_run
    results = collapse(section(BENCH_README, "Results on this machine"))
    fits = [ln for ln in stdout.splitlines() if ln.startswith(("- ", "Up to "))]
    assert len(fits) >= 8  # floor, warm, stall, ratio, memory; twice, and the "Up to" line
    stale = [ln for ln in fits if collapse(ln) not in results]
    assert not stale, f"bench/README.md does not show these lines of bench.scaling: {stale}"
    # The committed scaling.jsonl (which bench.plots draws) is what the results give.
    committed = (RESULTS / "scaling.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(ln) for ln in written.read_text().splitlines()] == [
        json.loads(ln) for ln in committed
    ]


def test_the_readme_prose_figures_match_the_results() -> None:
    text = summary.prose(RESULTS)
    assert text is not None, "bench.summary.prose found no results"
    paragraphs = text.split("\n\n")
    assert len(paragraphs) == 4
    readme = collapse(README)
    stale = [p for p in paragraphs if collapse(p) not in readme]
    assert not stale, (
        "README.md does not state these figures as `python -m bench.summary` prints them "
        f"(section 'Figures in the README's prose'): {stale}"
    )


def test_the_prose_figures_come_from_the_result_files(tmp_path: Path) -> None:
    """Change one measurement and the printed prose follows it."""
    for src in RESULTS.glob("snapshot_bench-*.jsonl"):
        shutil.copy(src, tmp_path / src.name)
    path = tmp_path / "snapshot_bench-4GiB.jsonl"
    records = [json.loads(ln) for ln in path.read_text().splitlines()]
    for r in records:
        if r.get("kind") == "method" and r["method"] == "ckptd":
            r["blocked_s"]["median"] = 9.99
        if r.get("kind") == "daemon_memory" and r.get("daemon") == "default":
            r["peak_rss_anon"] = 900 << 20
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = summary.prose(tmp_path)
    assert text is not None
    assert "and ckptd's copy into its slot 9.99 s." in text
    assert "stays **at 212-900 MiB** from 64 MiB to 4 GiB" in text  # no longer flat
    assert text != summary.prose(RESULTS)


def test_summary_without_results_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert summary.main(["--results", str(tmp_path)]) == 2
    assert "no results in" in capsys.readouterr().err
    assert summary.prose(tmp_path) is None
