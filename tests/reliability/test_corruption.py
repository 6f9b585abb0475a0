"""Random bit flips and truncations in a store with several checkpoints (seeded).

Two jobs of five checkpoints each, written in-process; their objects are shared between steps
(dedup), so one damaged object damages every checkpoint that names it. Every iteration copies the
pristine store, damages one to three random files (objects or manifests: 1-3 flipped bits, or a
truncation to a random shorter length) and checks:

* ``ckptd verify`` (in-process, ``ckptd.cli.main.main``) prints ``FAIL`` for every damaged
  checkpoint and ``ok`` for every other one, and exits 7 (0 when nothing was damaged);
* ``ckptd_client.load`` of a damaged step raises :class:`CorruptCheckpointError` (or its subclass
  :class:`ManifestError`) naming a file of that job;
* ``load(..., "latest", fallback=True)`` restores the newest undamaged step, bit for bit, with a
  :class:`FallbackWarning` when it had to skip the latest one, and raises when none is intact.

What "damaged" means is decided without ckptd: a manifest is damaged when its bytes no longer
parse (``json.loads``) to the same document; a checkpoint naming a damaged object is damaged
unless it still restores bit-identical to what was saved (a flip in a header byte the format
ignores changes nothing). A load that returns other bytes than were saved is silent corruption.
"""

from __future__ import annotations

import functools
import json
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ckptd_client
from ckptd.cli.main import main
from ckptd.config import load_config
from ckptd.errors import EXIT_CODES, CorruptCheckpointError, FormatVersionError
from ckptd.format.restore import FallbackWarning
from tests.integration import daemon_fixtures
from tests.reliability.fixtures import (
    LoopSummary,
    SteppedState,
    budget_is_overridden,
    difference,
    loop_seconds,
)

ckptd_env = daemon_fixtures.ckptd_env
pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("ckptd_env")]

JOBS = {"alpha": 51, "beta": 52}  # job -> seed
STEPS = [10, 20, 30, 40, 50]
CONFIG = '[store]\nchunk_bytes = "256KiB"\npack_bytes = "64KiB"\n'
CI_ITERATIONS = 40
CORRUPT = EXIT_CODES["CorruptCheckpointError"]
# A flipped bit in an object's format version byte reads as an object of a newer format: the
# reader refuses it (FormatVersionError names the version) rather than guess it is damage.
DAMAGE_ERRORS = (CorruptCheckpointError, FormatVersionError)


@dataclass(frozen=True)
class Pristine:
    root: Path
    states: dict[str, SteppedState]
    files: list[Path]
    """every object and manifest file, relative to the root"""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    base = tmp_path_factory.mktemp("pristine")
    cfg_path = base / "ckptd.toml"
    cfg_path.write_text(CONFIG)
    config = load_config(cfg_path)
    root = base / "root"
    states = {job: SteppedState(seed, 1.0, 4) for job, seed in JOBS.items()}
    for job, state in states.items():
        for step in STEPS:
            ckptd_client.save(job, state=state.at(step), step=step, root=root, config=config)
    files = sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and p.parent.name != "tmp" and p.name not in ("lock", "job.json")
    )
    assert sum(1 for f in files if f.parent.name == "manifests") == len(JOBS) * len(STEPS)
    return Pristine(root, states, files)


def damage(path: Path, rng: random.Random) -> str:
    """Flip 1-3 bits of ``path`` or truncate it; return what was done."""
    data = bytearray(path.read_bytes())
    if rng.random() < 0.3 or not data:
        size = rng.randrange(0, max(1, len(data)))
        path.write_bytes(bytes(data[:size]))
        return f"truncated {path.name} from {len(data)} to {size} bytes"
    flips = []
    for _ in range(rng.randint(1, 3)):
        offset, bit = rng.randrange(len(data)), rng.randrange(8)
        data[offset] ^= 1 << bit
        flips.append(f"{offset}.{bit}")
    path.write_bytes(bytes(data))
    return f"flipped bits {', '.join(flips)} of {path.name}"


def same_document(new: bytes, old: bytes) -> bool:
    try:
        return bool(json.loads(new) == json.loads(old))
    except ValueError:
        return False


def run_verify(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(["verify", "--root", str(root)])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:
        code = 0
    captured = capsys.readouterr()
    return code, captured.out + captured.err


VERDICT = re.compile(r"^(FAIL|ok)\s+(\S+) step (\d+)\b", re.MULTILINE)


def load_quietly(fn: Callable[[], Any]) -> tuple[Any, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn()
    return value, caught


def test_random_bit_flips_and_truncations_are_always_reported(
    pristine: Pristine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(77)
    summary = LoopSummary("corruption")
    seconds = loop_seconds(0.0) if budget_is_overridden() else 0.0
    deadline = time.monotonic() + seconds
    counts = {"damaged_checkpoints": 0, "benign_damage": 0, "fallbacks": 0, "none_intact": 0}
    iteration = 0
    while iteration < CI_ITERATIONS if not seconds else time.monotonic() < deadline:
        iteration += 1
        summary.iterations += 1
        work = tmp_path / f"it{iteration}"
        shutil.copytree(pristine.root, work)
        hit: dict[Path, str] = {}
        for _ in range(rng.randint(1, 3)):
            rel = rng.choice(pristine.files)
            hit[rel] = damage(work / rel, rng)
        what = f"iteration {iteration} ({'; '.join(hit.values())})"

        damaged: set[tuple[str, int]] = set()
        for job, state in pristine.states.items():
            bad_objects = {
                rel.name for rel in hit if rel.parts[0] == job and rel.parts[1] == "objects"
            }
            for step in STEPS:
                manifest_rel = Path(job, "manifests", f"step-{step:012d}.json")
                original = (pristine.root / manifest_rel).read_bytes()
                if manifest_rel in hit and not same_document(
                    (work / manifest_rel).read_bytes(), original
                ):
                    damaged.add((job, step))
                    continue
                names = set(json.loads(original)["objects"])
                if not names & bad_objects:
                    continue
                try:
                    got = ckptd_client.load(job, step, root=work)
                except DAMAGE_ERRORS:
                    damaged.add((job, step))
                    continue
                except Exception as exc:
                    summary.violate(f"{what}: load {job}@{step} raised {exc!r}")
                    continue
                diff = difference(got, state.at(step), f"{job}@{step}")
                if diff is not None:
                    summary.violate(f"{what}: silent corruption: load {job}@{step}: {diff}")
                else:
                    counts["benign_damage"] += 1
        counts["damaged_checkpoints"] += len(damaged)

        code, out = run_verify(work, capsys)
        verdicts = {(j, int(s)): v for v, j, s in VERDICT.findall(out)}
        want_code = CORRUPT if damaged else 0
        if code != want_code:
            summary.violate(f"{what}: ckptd verify exited {code}, not {want_code}: {out[-600:]}")
        for job in pristine.states:
            for step in STEPS:
                want = "FAIL" if (job, step) in damaged else "ok"
                got_verdict = verdicts.get((job, step), "missing")
                if got_verdict != want:
                    summary.violate(
                        f"{what}: ckptd verify says {got_verdict} for {job} step {step}, not {want}"
                    )

        for job, step in sorted(damaged):
            try:
                ckptd_client.load(job, step, root=work)
            except DAMAGE_ERRORS as exc:
                if f"{work / job}/" not in str(exc):
                    summary.violate(f"{what}: load {job}@{step}: {exc} names no file of {job}")
            except Exception as exc:
                summary.violate(f"{what}: load {job}@{step} raised {type(exc).__name__}: {exc}")
            else:
                summary.violate(f"{what}: load {job}@{step} returned a damaged checkpoint")
            summary.verified += 1

        for job, state in pristine.states.items():
            intact = [s for s in STEPS if (job, s) not in damaged]
            summary.verified += len(intact)
            try:
                got, caught = load_quietly(
                    functools.partial(ckptd_client.load, job, "latest", root=work, fallback=True)
                )
            except CorruptCheckpointError as exc:
                if intact:
                    summary.violate(f"{what}: fallback on {job} raised although {intact} verify")
                elif f"none of its {len(STEPS)} checkpoint(s) verifies" not in str(exc):
                    summary.violate(f"{what}: fallback on {job}: {exc}")
                else:
                    counts["none_intact"] += 1
                continue
            if not intact:
                summary.violate(f"{what}: fallback on {job} restored a damaged checkpoint")
                continue
            newest = intact[-1]
            diff = difference(got, state.at(newest), f"{job} fallback (step {newest})")
            if diff is not None:
                summary.violate(f"{what}: {diff}")
            fallbacks = [w for w in caught if issubclass(w.category, FallbackWarning)]
            if newest != STEPS[-1]:
                counts["fallbacks"] += 1
                expected = f"job {job!r}: restored step {newest}, skipping newer checkpoint(s)"
                if len(fallbacks) != 1 or expected not in str(fallbacks[0].message):
                    summary.violate(
                        f"{what}: fallback on {job} warned {[str(w.message) for w in caught]}"
                    )
            elif caught:
                summary.violate(f"{what}: {job}'s latest is intact, yet it warned: {caught}")
        shutil.rmtree(work)
    summary.extra |= counts
    summary.report()
    assert counts["damaged_checkpoints"] > 0 and counts["fallbacks"] > 0
