"""The operator CLI on real checkpoint files: every command's output and exit code.

Most tests run ``ckptd.cli.main.main`` in-process and catch its ``SystemExit``; a few run the
installed ``ckptd`` console script as real subprocesses: on pipes, on an 80-column pseudo-terminal,
and (as root) as user nobody through ``setpriv``. In-process tables are 160 columns wide (the width
the CLI uses when stdout is not a terminal; ``COLUMNS=160`` keeps it so under ``pytest -s`` as
well).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckptd_client
from ckptd.cli.common import human_bytes
from ckptd.cli.main import main
from ckptd.errors import EXIT_CODES
from ckptd.format.manifest import Manifest
from ckptd.format.restore import read_tensors
from ckptd.format.store import Store
from tests import _other_uid
from tests.conftest import TinyNet, trained
from tests.integration.daemon_fixtures import empty_config

CKPTD = Path(sys.executable).parent / "ckptd"
NOBODY = 65534

CONFIG = EXIT_CODES["ConfigError"]
INVALID_NAME = EXIT_CODES["InvalidNameError"]
NOT_FOUND = EXIT_CODES["NotFoundError"]
CORRUPT = EXIT_CODES["CorruptCheckpointError"]
PERMISSION = EXIT_CODES["StorePermissionError"]
IO_ERROR = EXIT_CODES["StoreIOError"]
NO_DAEMON = EXIT_CODES["DaemonUnavailableError"]
USAGE = 2  # click's exit code for a bad command line


# ---- helpers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


CLI = Callable[..., Result]


@pytest.fixture
def cli(root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CLI:
    """Run ``ckptd ARGS`` in-process; return its exit code, stdout and stderr."""
    monkeypatch.setenv("COLUMNS", "160")

    def run(*args: str | Path) -> Result:
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        code = info.value.code
        assert isinstance(code, int), f"exit code {code!r}"
        return Result(code, captured.out, captured.err)

    return run


@dataclass(frozen=True)
class Saved:
    model: TinyNet
    optimizer: torch.optim.Optimizer
    embedding: torch.Tensor


def save_net(
    root: Path, job: str = "net", step: int = 3, *, seed: int = 0, metric: float | None = None
) -> Saved:
    """Checkpoint a trained TinyNet, its AdamW and StepLR, and a 1.3 MB ``extra.embedding``.

    The embedding is larger than a pack, so it is stored in an object of its own: damage to that
    object is reported under exactly one tensor name.
    """
    model, opt, sched = trained(seed=seed)
    embedding = torch.randn(512, 640, generator=torch.Generator().manual_seed(seed))
    ckptd_client.save(
        job,
        model,
        opt,
        step=step,
        scheduler=sched,
        extra={"epoch": step, "embedding": embedding},
        metric=metric,
        root=root,
    )
    return Saved(model, opt, embedding)


def save_small(root: Path, job: str = "net", *steps: int) -> None:
    """Tiny checkpoints (one tensor each), for tests that only need steps to exist."""
    for step in steps or (3,):
        ckptd_client.save(job, {"w": torch.full((4,), step)}, step=step, rng=False, root=root)


def manifest(root: Path, job: str, step: int) -> Manifest:
    return Store(root).read_manifest(job, step)


def object_file(root: Path, job: str, step: int, tensor: str) -> Path:
    """The object file holding all of ``tensor`` (which must live in a single object)."""
    m = manifest(root, job, step)
    (piece,) = next(t for t in m.tensors if t.path == tensor).pieces
    return Store(root).object_path(job, piece.object)


def objects_on_disk(root: Path, job: str) -> set[str]:
    return {p.name for p in (root / job / "objects").glob("??/*")}


def manifest_file(root: Path, job: str, step: int) -> Path:
    return Store(root).manifest_path(job, step)


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the rich tables in ``text``, as lists of stripped cells."""
    rows = []
    for line in text.splitlines():
        if "│" not in line:
            continue
        cells = line.split("│")
        rows.append([cell.strip() for cell in (cells[1:-1] if line.startswith("│") else cells)])
    return rows


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.equal(bits(a), bits(b)), f"{where}: values differ"


def assert_same_state(exported: Any, loaded: Any, where: str = "<root>") -> None:
    """``exported`` (from the torch export) equals ``loaded`` (from ckptd_client.load): same
    container types, keys (in order) and values, tensors bit-identical; numpy arrays may have
    become tensors (documented in ckptd.format.export)."""
    if isinstance(loaded, np.ndarray):
        assert isinstance(exported, torch.Tensor), f"{where}: {type(exported)} is not a tensor"
        assert_bit_equal(exported, torch.from_numpy(loaded), where)
    elif isinstance(loaded, torch.Tensor):
        assert type(exported) is type(loaded), f"{where}: {type(exported)} != {type(loaded)}"
        assert_bit_equal(exported, loaded, where)
    elif isinstance(loaded, dict):
        assert type(exported) is type(loaded), f"{where}: {type(exported)} != {type(loaded)}"
        assert list(exported) == list(loaded), f"{where}: keys differ"
        meta = getattr(loaded, "_metadata", None)
        assert getattr(exported, "_metadata", None) == meta, f"{where}: _metadata differs"
        for key, value in loaded.items():
            assert_same_state(exported[key], value, f"{where}.{key}")
    elif isinstance(loaded, list | tuple):
        assert type(exported) is type(loaded), f"{where}: {type(exported)} != {type(loaded)}"
        assert len(exported) == len(loaded), f"{where}: lengths differ"
        for i, (a, b) in enumerate(zip(exported, loaded, strict=True)):
            assert_same_state(a, b, f"{where}.{i}")
    else:
        assert type(exported) is type(loaded), f"{where}: {type(exported)} != {type(loaded)}"
        assert exported == loaded, f"{where}: {exported!r} != {loaded!r}"


def run_ckptd(
    *args: str | Path, env: dict[str, str], prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (optionally behind ``prefix``, e.g. setpriv)."""
    return subprocess.run(
        [*prefix, str(CKPTD), *map(str, args)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ---- list --------------------------------------------------------------------------------------


def test_list_prints_a_row_per_checkpoint(root: Path, cli: CLI) -> None:
    save_net(root, "net", 3)
    save_net(root, "net", 5, seed=1)
    save_net(root, "other", 1)

    res = cli("list", "--root", root)
    assert res.code == 0, res.err
    rows = table_rows(res.out)
    assert [row[:2] for row in rows] == [["net", "3"], ["net", "5"], ["other", "1"]]
    assert f"checkpoints in {root}" in res.out.replace("\n", "")

    res = cli("list", "net", "--root", root)
    assert res.code == 0, res.err
    assert [row[:2] for row in table_rows(res.out)] == [["net", "3"], ["net", "5"]]


def test_list_json_is_a_list_of_records(root: Path, cli: CLI) -> None:
    save_net(root, "net", 3, metric=0.25)
    save_net(root, "net", 5, seed=1, metric=float("nan"))
    save_net(root, "other", 1)

    res = cli("list", "--json", "--root", root)
    assert res.code == 0, res.err
    records = json.loads(res.out)
    assert isinstance(records, list)
    assert [(r["job"], r["step"]) for r in records] == [("net", 3), ("net", 5), ("other", 1)]
    for r in records:
        assert {"job", "step", "created", "raw_bytes", "stored_bytes", "metric"} <= set(r)
        m = manifest(root, r["job"], r["step"])
        assert r["created"] == m.created
        assert r["raw_bytes"] == m.raw_bytes > 1_300_000  # the embedding alone is 1.3 MB
        assert r["stored_bytes"] == m.stored_bytes > 0
    assert [r["metric"] for r in records] == [0.25, "nan", None]

    res = cli("list", "other", "--json", "--root", root)
    assert res.code == 0, res.err
    assert [(r["job"], r["step"]) for r in json.loads(res.out)] == [("other", 1)]


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        pytest.param(
            ("ghost",),
            NOT_FOUND,
            ["no job 'ghost' under {root}", "(jobs: net)"],
            id="unknown-job",
        ),
        pytest.param(("../x",), INVALID_NAME, ["invalid job name '../x'"], id="bad-job-name"),
    ],
)
def test_list_errors(
    root: Path,
    cli: CLI,
    args: tuple[str, ...],
    code: int,
    fragments: list[str],
) -> None:
    """An empty store is not an error (test_cli_maintenance.py); a job that is not there is."""
    save_small(root)
    res = cli("list", *args, "--root", root)
    assert res.code == code, (res.out, res.err)
    assert res.out == ""
    assert res.err.startswith("error: ")
    for fragment in fragments:
        assert fragment.format(root=root) in res.err


LONG_JOB = "resnet50-imagenet-baseline-lr0.1-wd5e-4-seed1"


def test_list_table_keeps_the_step_of_a_long_job_name(root: Path, cli: CLI) -> None:
    ckptd_client.save(LONG_JOB, {"w": torch.ones(3)}, step=7, rng=False, root=root)
    res = cli("list", "--root", root)
    assert res.code == 0, res.err
    assert [row[:2] for row in table_rows(res.out)] == [[LONG_JOB, "7"]], res.out


def run_in_terminal(args: list[str], env: dict[str, str], columns: int) -> tuple[int, str]:
    """Run the console script with stdin/stdout/stderr on a pseudo-terminal ``columns`` wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    try:
        proc = subprocess.Popen(
            [str(CKPTD), *args], stdin=slave, stdout=slave, stderr=slave, env=env
        )
    finally:
        os.close(slave)
    chunks = []
    try:
        while data := os.read(master, 1 << 16):
            chunks.append(data)
    except OSError:  # EIO: every writer of the terminal has exited
        pass
    finally:
        os.close(master)
    code = proc.wait(timeout=120)
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_list_in_an_80_column_terminal_shows_job_and_step(root: Path) -> None:
    """80 columns is the classic terminal size; no column may be squeezed to nothing."""
    ckptd_client.save(LONG_JOB, {"w": torch.ones(3)}, step=7, rng=False, root=root)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env |= {"CKPTD_ROOT": str(root), "TERM": "xterm-256color", "NO_COLOR": "1"}
    env["CKPTD_CONFIG"] = str(empty_config(root.parent))  # never /etc/ckptd/ckptd.toml
    code, text = run_in_terminal(["list"], env, columns=80)
    assert code == 0, text
    rows = table_rows(text)
    assert rows, text
    assert rows[0][1] == "7", text  # the step
    job = "".join(row[0] for row in rows)  # the job name may fold over lines or be elided
    assert len(job) >= 12, text
    assert LONG_JOB.startswith(job.rstrip("…")), text


def test_list_reports_an_unreadable_manifest_and_exits_7(root: Path, cli: CLI) -> None:
    save_net(root, "net", 3)
    save_net(root, "net", 5, seed=1)
    bad = manifest_file(root, "net", 5)
    bad.write_bytes(bad.read_bytes()[:100])

    res = cli("list", "--root", root)
    assert res.code == CORRUPT, res.err
    assert [row[:2] for row in table_rows(res.out)] == [["net", "3"]]
    assert f"unreadable manifest: {bad}: not valid JSON" in res.err
    assert "error: 1 manifest(s) could not be read" in res.err


# ---- show --------------------------------------------------------------------------------------


def expected_tensor_paths(saved: Saved) -> set[str]:
    paths = {f"model.{k}" for k in saved.model.state_dict()}
    for index, state in saved.optimizer.state_dict()["state"].items():
        paths |= {f"optimizer.state.{index}.{k}" for k in state}
    return paths | {"rng.torch", "rng.numpy.1", "extra.embedding"}


def test_show_json_lists_tensors_and_state_keys(root: Path, cli: CLI) -> None:
    saved = save_net(root, "net", 3, metric=0.5)
    save_net(root, "net", 5, seed=1)

    res = cli("show", "net", "3", "--json", "--root", root)
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert (doc["job"], doc["step"], doc["metric"]) == ("net", 3, 0.5)
    tensors = {t["path"]: t for t in doc["tensors"]}
    assert set(tensors) == expected_tensor_paths(saved)
    for t in doc["tensors"]:
        assert set(t) == {"path", "dtype", "shape", "nbytes"}
    assert tensors["model.head.weight"] == {
        "path": "model.head.weight",
        "dtype": "float32",
        "shape": [5, 8],
        "nbytes": 160,
    }
    assert tensors["model.norm.num_batches_tracked"]["dtype"] == "int64"
    assert tensors["model.norm.num_batches_tracked"]["shape"] == []
    assert tensors["extra.embedding"]["nbytes"] == 512 * 640 * 4
    keys = doc["keys"]
    for key in (
        "model.head.weight = <tensor ",
        "extra.epoch = 3",
        "scheduler.step_size = 2",
        "optimizer.param_groups.0.lr = ",
        "rng.numpy.0 = 'MT19937'",
    ):
        assert any(k.startswith(key) for k in keys), key

    res = cli("show", "net", "latest", "--json", "--root", root)
    assert res.code == 0, res.err
    latest = json.loads(res.out)
    assert (latest["step"], latest["metric"]) == (5, None)
    assert any(k == "extra.epoch = 5" for k in latest["keys"])


def test_show_table_lists_tensors_and_state_keys(root: Path, cli: CLI) -> None:
    save_net(root, "net", 3)
    res = cli("show", "net", "3", "--root", root)
    assert res.code == 0, res.err
    assert res.out.startswith("net step 3  created ")
    rows = {row[0]: row for row in table_rows(res.out)}
    assert rows["model.conv.weight"] == ["model.conv.weight", "float32", "[8, 4, 3]", "384 B"]
    assert rows["optimizer.state.0.exp_avg"][1:3] == ["float32", "[8, 4, 3]"]
    assert rows["extra.embedding"][1:] == ["float32", "[512, 640]", "1.2 MiB"]
    keys = res.out.split("state keys\n", 1)[1].splitlines()
    assert "  extra.epoch = 3" in keys
    assert "  scheduler.gamma = 0.5" in keys


@pytest.mark.parametrize("key", ["scale[b]", "note[/]"])
def test_show_table_prints_tensor_paths_verbatim(root: Path, cli: CLI, key: str) -> None:
    """Key paths are user data: brackets in them are not rich markup."""
    ckptd_client.save("net", {key: torch.ones(2)}, step=1, rng=False, root=root)
    res = cli("show", "net", "1", "--root", root)
    assert res.code == 0, res.err
    assert [row[0] for row in table_rows(res.out)] == [f"model.{key}"]


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        pytest.param(
            ("net", "4"),
            NOT_FOUND,
            "job 'net' has no checkpoint at step 4; steps that exist: 3, 5",
            id="missing-step",
        ),
        pytest.param(
            ("net", "four"),
            USAGE,
            "Invalid value for 'STEP': 'four' is not a step",
            id="bad-step",
        ),
        pytest.param(
            ("ghost", "latest"), NOT_FOUND, "job 'ghost' has no checkpoints", id="unknown-job"
        ),
        pytest.param(("../x", "3"), INVALID_NAME, "invalid job name '../x'", id="bad-job-name"),
    ],
)
def test_show_errors(root: Path, cli: CLI, args: tuple[str, ...], code: int, fragment: str) -> None:
    save_small(root, "net", 3, 5)
    res = cli("show", *args, "--root", root)
    assert res.code == code, (res.out, res.err)
    assert res.out == ""
    assert fragment in res.err


# ---- verify ------------------------------------------------------------------------------------


def test_verify_passes_on_intact_checkpoints(root: Path, cli: CLI) -> None:
    save_net(root, "net", 3)
    save_net(root, "net", 5, seed=1)
    save_net(root, "other", 1)

    res = cli("verify", "--root", root)
    assert res.code == 0, (res.out, res.err)
    lines = res.out.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "ok   net step 3",
        "ok   net step 5",
        "ok   other step 1",
    ]
    assert res.err == ""

    for args, steps in [(("net",), [3, 5]), (("net", "3"), [3]), (("net", "latest"), [5])]:
        res = cli("verify", *args, "--root", root)
        assert res.code == 0, (args, res.out, res.err)
        assert [line.split(" (")[0] for line in res.out.splitlines()] == [
            f"ok   net step {s}" for s in steps
        ]


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        pytest.param(("ghost",), NOT_FOUND, "no job 'ghost' under", id="no-job"),
        pytest.param(("net", "7"), NOT_FOUND, "steps that exist: 3", id="no-step"),
        pytest.param(("../x",), INVALID_NAME, "invalid job name '../x'", id="bad-name"),
    ],
)
def test_verify_errors(
    root: Path, cli: CLI, args: tuple[str, ...], code: int, fragment: str
) -> None:
    save_small(root)
    res = cli("verify", *args, "--root", root)
    assert res.code == code, (res.out, res.err)
    assert fragment in res.err


def _flip(path: Path) -> str:
    flip_byte(path)
    return "is corrupt: its content hashes to"


def _truncate(path: Path) -> str:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "truncated object"


def _delete(path: Path) -> str:
    path.unlink()
    return f"missing object {path}"


@pytest.mark.parametrize("damage", [_flip, _truncate, _delete], ids=["flip", "truncate", "delete"])
def test_verify_names_the_damaged_object_and_tensor(
    root: Path, cli: CLI, damage: Callable[[Path], str]
) -> None:
    save_net(root, "net", 3)
    save_net(root, "other", 1)
    obj = object_file(root, "net", 3, "extra.embedding")
    assert obj.parent.parent == root / "net" / "objects"
    symptom = damage(obj)

    res = cli("verify", "--root", root)
    assert res.code == CORRUPT, (res.out, res.err)
    fail, ok, *report = res.out.splitlines()
    assert fail.startswith(f"FAIL net step 3: object {obj} (holding tensor extra.embedding)")
    assert symptom in fail
    assert ok.startswith("ok   other step 1 (")
    # the damaged object is moved aside (test_cli_maintenance.py); a missing one cannot be
    verb = "missing" if damage is _delete else "quarantined"
    assert any(
        line.split() == [verb, obj.name, "(referenced", "by", "net", "step", "3)"]
        for line in report
    ), report
    assert "error: 1 of 2 checkpoint(s) failed verification" in res.err

    res = cli("verify", "net", "3", "--root", root)
    assert res.code == CORRUPT, (res.out, res.err)
    assert f"object {obj} (holding tensor extra.embedding): missing object {obj}" in res.out
    assert "error: 1 of 1 checkpoint(s) failed verification" in res.err


def test_verify_reports_a_malformed_manifest(root: Path, cli: CLI) -> None:
    save_net(root, "net", 3)
    save_net(root, "net", 5, seed=1)
    bad = manifest_file(root, "net", 5)
    bad.write_bytes(bad.read_bytes()[:-40])

    res = cli("verify", "net", "--root", root)
    assert res.code == CORRUPT, (res.out, res.err)
    ok, fail = res.out.splitlines()
    assert ok.startswith("ok   net step 3 (")
    assert fail.startswith(f"FAIL net step 5: {bad}: not valid JSON")
    assert fail.endswith("the manifest is damaged")
    assert "error: 1 of 2 checkpoint(s) failed verification" in res.err


# ---- restore -----------------------------------------------------------------------------------


def test_restore_torch_file_equals_client_load(root: Path, cli: CLI, tmp_path: Path) -> None:
    saved = save_net(root, "net", 3)
    save_net(root, "net", 5, seed=1)
    out = tmp_path / "net-3.pt"

    res = cli("restore", "net", "3", "-o", out, "--root", root)
    assert res.code == 0, res.err
    assert res.out.startswith(f"wrote {out} (torch, ")
    assert res.out.rstrip().endswith("from net step 3")

    exported = torch.load(out, weights_only=True)
    loaded = ckptd_client.load("net", 3, root=root)
    assert isinstance(loaded["rng"]["numpy"][1], np.ndarray)  # the documented conversion
    assert_same_state(exported, loaded)
    # and against the live objects, not only against ckptd's own reader
    for name, value in saved.model.state_dict().items():
        assert_bit_equal(exported["model"][name], value, f"model.{name}")
    assert_bit_equal(
        exported["optimizer"]["state"][0]["exp_avg"],
        saved.optimizer.state_dict()["state"][0]["exp_avg"],
        "optimizer.state.0.exp_avg",
    )
    assert_bit_equal(exported["extra"]["embedding"], saved.embedding, "extra.embedding")
    assert exported["extra"]["epoch"] == 3

    latest = tmp_path / "latest.pt"
    res = cli("restore", "net", "-o", latest, "--root", root)
    assert res.code == 0, res.err
    assert res.out.rstrip().endswith("from net step 5")
    assert torch.load(latest, weights_only=True)["extra"]["epoch"] == 5
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt") == [
        "latest.pt",
        "net-3.pt",
    ]


def test_restore_safetensors_uses_dotted_paths_and_metadata(
    root: Path, cli: CLI, tmp_path: Path
) -> None:
    saved = save_net(root, "net", 3)
    out = tmp_path / "net.safetensors"

    res = cli("restore", "net", "latest", "-o", out, "--format", "safetensors", "--root", root)
    assert res.code == 0, res.err
    assert res.out.startswith(f"wrote {out} (safetensors, ")

    tensors = load_file(str(out))
    m = manifest(root, "net", 3)
    assert set(tensors) == {t.path for t in m.tensors} == expected_tensor_paths(saved)
    for entry, expected in zip(m.tensors, read_tensors(Store(root), m), strict=True):
        assert_bit_equal(tensors[entry.path], expected, entry.path)
    assert_bit_equal(
        tensors["model.head.weight"], saved.model.state_dict()["head.weight"], "head.weight"
    )
    assert_bit_equal(
        tensors["optimizer.state.0.exp_avg"],
        saved.optimizer.state_dict()["state"][0]["exp_avg"],
        "exp_avg",
    )
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ckptd.job"] == "net"
    assert metadata["ckptd.step"] == "3"
    assert json.loads(metadata["ckptd.skeleton"]) == m.skeleton


def _two_steps_latest_object_corrupt(root: Path) -> tuple[Saved, Path]:
    """Steps 3 and 5 of job net; an object only step 5 uses is damaged."""
    saved = save_net(root, "net", 3)
    save_net(root, "net", 5, seed=1)
    obj = object_file(root, "net", 5, "extra.embedding")
    assert obj.name not in manifest(root, "net", 3).objects
    flip_byte(obj)
    return saved, obj


def test_restore_corrupt_latest_fails_without_fallback(
    root: Path, cli: CLI, tmp_path: Path
) -> None:
    _, obj = _two_steps_latest_object_corrupt(root)
    dest = tmp_path / "exports"
    dest.mkdir()
    for fmt in ("torch", "safetensors"):
        res = cli("restore", "net", "-o", dest / "out", "--format", fmt, "--root", root)
        assert res.code == CORRUPT, (res.out, res.err)
        assert f"object {obj} (holding tensor extra.embedding) is corrupt" in res.err
        assert "job 'net' step 5 cannot be restored bit-exactly" in res.err
        assert res.out == ""
        assert list(dest.iterdir()) == []  # no output file, no tmp file


def test_restore_fallback_restores_the_previous_step(root: Path, cli: CLI, tmp_path: Path) -> None:
    saved, obj = _two_steps_latest_object_corrupt(root)
    out = tmp_path / "out.pt"
    res = cli("restore", "net", "latest", "-o", out, "--fallback", "--root", root)
    assert res.code == 0, res.err
    assert res.out.rstrip().endswith("from net step 3")
    (warning,) = [line for line in res.err.splitlines() if line.startswith("warning: ")]
    assert "restored step 3, skipping newer checkpoint(s)" in warning
    assert str(obj) in warning
    state = torch.load(out, weights_only=True)
    assert state["extra"]["epoch"] == 3
    for name, value in saved.model.state_dict().items():
        assert_bit_equal(state["model"][name], value, f"model.{name}")


def test_restore_fallback_skips_a_malformed_latest_manifest(
    root: Path, cli: CLI, tmp_path: Path
) -> None:
    """A damaged manifest is one of the things --fallback is documented to skip."""
    save_net(root, "net", 3)
    save_net(root, "net", 5, seed=1)
    bad = manifest_file(root, "net", 5)
    bad.write_bytes(bad.read_bytes()[:-40])
    out = tmp_path / "out.pt"
    res = cli("restore", "net", "-o", out, "--fallback", "--root", root)
    assert res.code == 0, res.err
    assert res.out.rstrip().endswith("from net step 3")
    assert "warning: job 'net': restored step 3, skipping newer" in res.err
    assert torch.load(out, weights_only=True)["extra"]["epoch"] == 3


def test_restore_fallback_with_nothing_intact_fails(root: Path, cli: CLI, tmp_path: Path) -> None:
    save_net(root, "net", 3)
    flip_byte(object_file(root, "net", 3, "extra.embedding"))
    out = tmp_path / "out.pt"
    res = cli("restore", "net", "-o", out, "--fallback", "--root", root)
    assert res.code == CORRUPT, (res.out, res.err)
    assert "job 'net': none of its 1 checkpoint(s) verifies" in res.err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        pytest.param(
            ("net", "4"), NOT_FOUND, "has no checkpoint at step 4; steps that exist: 3", id="step"
        ),
        pytest.param(("ghost",), NOT_FOUND, "job 'ghost' has no checkpoints", id="job"),
        pytest.param(("../x",), INVALID_NAME, "invalid job name '../x'", id="bad-name"),
        pytest.param(
            ("net", "--format", "zip"), USAGE, "Invalid value for '--format'", id="format"
        ),
    ],
)
def test_restore_errors_create_no_file(
    root: Path, cli: CLI, tmp_path: Path, args: tuple[str, ...], code: int, fragment: str
) -> None:
    save_small(root)
    dest = tmp_path / "exports"
    dest.mkdir()
    res = cli("restore", *args, "-o", dest / "out.pt", "--root", root)
    assert res.code == code, (res.out, res.err)
    assert fragment in res.err
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_restore_into_a_missing_directory_is_a_clean_error(
    root: Path, cli: CLI, tmp_path: Path, fmt: str
) -> None:
    """An OSError while writing the export maps to a ckptd error (exit 12), not a traceback."""
    save_small(root)
    out = tmp_path / "no-such-dir" / "out"
    res = cli("restore", "net", "-o", out, "--format", fmt, "--root", root)
    assert res.code == IO_ERROR, (res.out, res.err)
    assert f"cannot write {out}" in res.err
    assert not out.parent.exists()


# ---- rm and gc ---------------------------------------------------------------------------------


def test_rm_then_gc_removes_exactly_the_unreferenced_objects(root: Path, cli: CLI) -> None:
    save_net(root, "net", 3)
    save_net(root, "net", 5, seed=1)
    save_net(root, "other", 1)
    m3, m5 = manifest(root, "net", 3), manifest(root, "net", 5)
    shared = set(m3.objects) & set(m5.objects)
    assert shared, "precondition: steps 3 and 5 share an object"
    before = objects_on_disk(root, "net")
    other_before = objects_on_disk(root, "other")
    assert before == set(m3.objects) | set(m5.objects)
    leftover = root / "net" / "tmp" / "dead-writer.tmp"
    leftover.write_bytes(b"x" * 10)
    day_ago = time.time() - 86400
    os.utime(leftover, (day_ago, day_ago))
    in_flight = root / "net" / "tmp" / "live-writer.tmp"  # fresh: a writer may still own it
    in_flight.write_bytes(b"y")

    res = cli("rm", "net", "3", "--yes", "--root", root)
    assert res.code == 0, res.err
    assert res.out == "removed net step 3\n"
    assert Store(root).steps("net") == [5]
    assert objects_on_disk(root, "net") == before  # rm leaves the objects to gc

    garbage = before - set(m5.objects)
    size = human_bytes(sum(Store(root).object_path("net", d).stat().st_size for d in garbage))
    res = cli("gc", "--dry-run", "--root", root)
    assert res.code == 0, res.err
    assert res.out == f"net: would remove {len(garbage)} object(s), {size}, 1 tmp file(s)\n"
    assert objects_on_disk(root, "net") == before
    assert leftover.exists()
    assert in_flight.exists()

    res = cli("gc", "net", "--root", root)
    assert res.code == 0, res.err
    assert res.out == f"net: removed {len(garbage)} object(s), {size}, 1 tmp file(s)\n"
    assert objects_on_disk(root, "net") == set(m5.objects)
    assert shared <= objects_on_disk(root, "net")
    assert objects_on_disk(root, "other") == other_before
    assert not leftover.exists()
    assert in_flight.exists()
    assert cli("verify", "--root", root).code == 0

    res = cli("gc", "--root", root)
    assert (res.code, res.err) == (0, ""), res
    assert res.out == f"nothing to collect in {root}: every object is referenced\n"

    res = cli("rm", "net", "3", "--yes", "--root", root)
    assert res.code == NOT_FOUND, (res.out, res.err)
    assert "job 'net' has no checkpoint at step 3; steps that exist: 5" in res.err


@pytest.mark.parametrize(
    ("cmd", "code", "fragment"),
    [
        pytest.param(("rm", "ghost", "1"), NOT_FOUND, "job 'ghost' has no checkpoints", id="rm"),
        pytest.param(("rm", "../x", "1"), INVALID_NAME, "invalid job name", id="rm-name"),
        pytest.param(("gc", "ghost"), NOT_FOUND, "no job 'ghost' under", id="gc"),
        pytest.param(("gc", "../x"), INVALID_NAME, "invalid job name", id="gc-name"),
    ],
)
def test_rm_and_gc_errors(
    root: Path, cli: CLI, cmd: tuple[str, ...], code: int, fragment: str
) -> None:
    save_small(root)
    res = cli(*cmd, "--root", root)
    assert res.code == code, (res.out, res.err)
    assert fragment in res.err


def test_pin_unpin_and_prune(root: Path, cli: CLI, tmp_path: Path) -> None:
    save_small(root, "net", 1, 2, 3)
    keep_last_1 = tmp_path / "retention.toml"
    keep_last_1.write_text("[retention]\nkeep_last = 1\n")

    res = cli("prune", "--root", root)  # the default policy keeps everything
    assert (res.code, res.err) == (0, ""), res
    assert res.out.startswith(f"nothing to prune in {root}")

    res = cli("pin", "net", "1", "--root", root)
    assert (res.code, res.out) == (0, "pinned net step 1\n"), res.err
    res = cli("pin", "net", "4", "--root", root)
    assert res.code == NOT_FOUND, (res.out, res.err)
    assert "steps that exist: 1, 2, 3" in res.err

    res = cli("list", "--json", "--root", root, "--config", keep_last_1)
    assert res.code == 0, res.err
    assert [(r["step"], "pinned" in r["kept_by"]) for r in json.loads(res.out)] == [
        (1, True),
        (2, False),
        (3, False),
    ]

    res = cli("prune", "--dry-run", "--root", root, "--config", keep_last_1)
    assert res.code == 0, res.err
    assert res.out == "net: would delete steps 2 (policy: keep_last=1)\n"
    assert Store(root).steps("net") == [1, 2, 3]
    res = cli("prune", "--root", root, "--config", keep_last_1)
    assert res.code == 0, res.err
    assert res.out.startswith("net: deleted steps 2, freed ")
    assert Store(root).steps("net") == [1, 3]
    assert objects_on_disk(root, "net") == set(manifest(root, "net", 1).objects) | set(
        manifest(root, "net", 3).objects
    )

    res = cli("unpin", "net", "1", "--root", root)
    assert (res.code, res.out) == (0, "unpinned net step 1\n"), res.err
    res = cli("unpin", "net", "1", "--root", root)
    assert (res.code, res.out) == (0, "net step 1 was not pinned (pinned steps: none)\n"), res


def test_gc_deletes_nothing_while_a_manifest_is_unreadable(root: Path, cli: CLI) -> None:
    save_net(root, "net", 3)
    save_net(root, "net", 5, seed=1)
    assert cli("rm", "net", "3", "--yes", "--root", root).code == 0
    bad = manifest_file(root, "net", 5)
    bad.write_bytes(b"{")
    before = objects_on_disk(root, "net")

    res = cli("gc", "--root", root)
    assert res.code == CORRUPT, (res.out, res.err)
    assert f"{bad}: not valid JSON" in res.err
    assert objects_on_disk(root, "net") == before


# ---- choosing the root and the config ------------------------------------------------------------


def _jobs(res: Result) -> list[str]:
    assert res.code == 0, res.err
    return [r["job"] for r in json.loads(res.out)]


def test_root_from_option_env_config_and_default(
    root: Path, cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = {name: tmp_path / f"root-{name}" for name in ("opt", "env", "cfg", "default")}
    for name, path in roots.items():
        ckptd_client.save(name, {"w": torch.ones(1)}, step=1, rng=False, root=path)
    config = tmp_path / "ckptd.toml"
    config.write_text(f'[store]\nroot = "{roots["cfg"]}"\n')

    assert _jobs(cli("list", "--json", "--root", roots["opt"])) == ["opt"]
    assert _jobs(cli("list", "--json", "--config", config)) == ["cfg"]
    monkeypatch.setenv("CKPTD_CONFIG", str(config))
    assert _jobs(cli("list", "--json")) == ["cfg"]
    monkeypatch.delenv("CKPTD_CONFIG")
    # the user's config file ($XDG_CONFIG_HOME/ckptd/ckptd.toml)
    user_config = Path(os.environ["XDG_CONFIG_HOME"]) / "ckptd" / "ckptd.toml"
    user_config.parent.mkdir(parents=True)
    shutil.copy(config, user_config)
    assert _jobs(cli("list", "--json")) == ["cfg"]
    user_config.unlink()

    monkeypatch.setenv("CKPTD_ROOT", str(roots["env"]))
    assert _jobs(cli("list", "--json")) == ["env"]
    assert _jobs(cli("list", "--json", "--root", roots["opt"])) == ["opt"]  # --root wins
    assert _jobs(cli("list", "--json", "--config", config)) == ["env"]  # then CKPTD_ROOT
    monkeypatch.delenv("CKPTD_ROOT")

    monkeypatch.chdir(tmp_path)
    shutil.move(roots["default"], tmp_path / "checkpoints")
    assert _jobs(cli("list", "--json")) == ["default"]  # ./checkpoints


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("[store]\nroot = 5\n", "store.root: expected a directory path", id="type"),
        pytest.param('[store]\nrooot = "/x"\n', "store.rooot: unknown key", id="unknown-key"),
        pytest.param('[stor]\nroot = "/x"\n', "<top level>.stor: unknown key", id="section"),
        pytest.param("[store\n", "invalid TOML", id="syntax"),
        pytest.param(None, "does not exist", id="missing"),
    ],
)
def test_bad_config_exits_3_naming_the_problem(
    root: Path, cli: CLI, tmp_path: Path, text: str | None, fragment: str
) -> None:
    config = tmp_path / "bad.toml"
    if text is not None:
        config.write_text(text)
    res = cli("list", "--config", config)
    assert res.code == CONFIG, (res.out, res.err)
    assert f"config file {config}" in res.err
    assert fragment in res.err
    assert res.out == ""


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        pytest.param(("show", "net"), "Missing argument 'STEP'", id="show-missing-step"),
        pytest.param(("restore", "net"), "Missing option '-o'", id="restore-missing-output"),
        pytest.param(("verify", "--threads", "0"), "Invalid value for '--threads'", id="threads"),
        pytest.param(("frobnicate",), "No such command 'frobnicate'", id="unknown-command"),
    ],
)
def test_usage_errors_exit_2(cli: CLI, args: tuple[str, ...], fragment: str) -> None:
    res = cli(*args)
    assert res.code == USAGE, (res.out, res.err)
    assert fragment in res.err


@pytest.mark.parametrize("command", ["status", "stop"])
def test_daemon_commands_without_a_daemon_exit_14(cli: CLI, tmp_path: Path, command: str) -> None:
    sock = tmp_path / "no-daemon.sock"
    res = cli(command, "--socket", sock)
    assert res.code == NO_DAEMON, (res.out, res.err)
    assert f"error: no ckptd daemon answers on {sock}" in res.err
    assert res.out == ""


def test_version(cli: CLI) -> None:
    res = cli("--version")
    assert res.code == 0
    assert res.out == "ckptd, version 0.1.0\n"


# ---- the installed console script --------------------------------------------------------------


def test_console_script_lists_and_verifies(root: Path) -> None:
    save_net(root, "net", 3)
    save_net(root, "net", 5, seed=1)
    env = {**os.environ, "CKPTD_ROOT": str(root), "CKPTD_CONFIG": str(empty_config(root.parent))}

    proc = run_ckptd("list", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert [(r["job"], r["step"]) for r in json.loads(proc.stdout)] == [("net", 3), ("net", 5)]

    obj = object_file(root, "net", 5, "extra.embedding")
    flip_byte(obj)
    proc = run_ckptd("verify", env=env)
    assert proc.returncode == CORRUPT, (proc.stdout, proc.stderr)
    assert f"FAIL net step 5: object {obj} (holding tensor extra.embedding)" in proc.stdout
    assert "ok   net step 3 (" in proc.stdout
    assert f"net: moved 1 damaged object(s) to {root / 'net' / 'quarantine'}" in proc.stdout
    assert "error: 1 of 2 checkpoint(s) failed verification" in proc.stderr


def test_console_script_restores_with_fallback(root: Path, tmp_path: Path) -> None:
    saved, _obj = _two_steps_latest_object_corrupt(root)
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "CKPTD_CONFIG": str(empty_config(tmp_path))}
    proc = run_ckptd(
        "restore",
        "net",
        "-o",
        out,
        "--format",
        "safetensors",
        "--fallback",
        "--root",
        root,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out} (safetensors, ")
    assert proc.stdout.rstrip().endswith("from net step 3")
    # Logged and raised as a Python warning by the library; the CLI prints it once, its way.
    assert proc.stderr.count("skipping newer checkpoint(s) that do not verify: step 5") == 1, (
        proc.stderr
    )
    assert proc.stderr.startswith("warning: job 'net': restored step 3"), proc.stderr
    assert "FallbackWarning" not in proc.stderr and "fallback=True" not in proc.stderr
    assert_bit_equal(
        load_file(str(out))["model.head.weight"],
        saved.model.state_dict()["head.weight"],
        "model.head.weight",
    )


# ---- permissions: as user nobody ---------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    """A scratch directory user nobody can reach (pytest's own tmp dirs are private to root).
    Skips without root or setpriv (fails under CI=true)."""
    from tests._requirements import missing, require

    require(
        hasattr(os, "geteuid") and os.geteuid() == 0,
        "permission tests need root (to switch to user nobody with setpriv)",
    )
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    path = Path(tempfile.mkdtemp(prefix="ckptd-cli-perm-"))
    try:
        path.chmod(0o755)
        for parent in path.parents:
            if not parent.stat().st_mode & 0o001:
                missing(f"{parent} is not traversable by other users; cannot test as nobody")
        yield path
    finally:
        shutil.rmtree(path)


# The session's way to run this checkout's programs as another uid (a mirror of the checkout
# when other users cannot reach it: see tests._other_uid).
other_uid = _other_uid.other_uid


@pytest.fixture(scope="module")
def as_nobody(world: Path, request: pytest.FixtureRequest) -> tuple[str, ...]:
    """The setpriv prefix that runs a command as nobody (``sys.executable`` and ``CKPTD`` from the
    session's mirror when there is one); skips unless nobody can run ckptd's interpreter and read
    its packages (a cheap probe: ckptd.errors does not import torch)."""
    from tests._requirements import require

    other: _other_uid.OtherUid = request.getfixturevalue("other_uid")
    why = other.cannot_import("ckptd.errors")
    require(not why, why)
    return other.prefix


def nobody_env(world: Path, **extra: str) -> dict[str, str]:
    """No config from outside (CKPTD_CONFIG names an empty file), this checkout importable."""
    values = {"HOME": str(world), "XDG_CONFIG_HOME": str(world / "xdg")} | extra
    return _other_uid.active().env(**values)


SAVE_AS_NOBODY = """
import sys
import torch
import ckptd_client
from ckptd.errors import CkptdError
try:
    ckptd_client.save("net", {"w": torch.ones(4)}, step=1, rng=False, root=sys.argv[1])
except CkptdError as e:
    print(e)
    sys.exit(e.exit_code)
print("saved")
"""


@pytest.mark.parametrize("exists", [True, False], ids=["root-exists", "root-missing"])
def test_save_as_nobody_into_a_root_owned_store_is_a_permission_error(
    world: Path, as_nobody: tuple[str, ...], exists: bool
) -> None:
    parent = Path(tempfile.mkdtemp(dir=world))
    parent.chmod(0o755)
    store = parent / "store"
    if exists:
        store.mkdir(mode=0o755)
    proc = subprocess.run(
        [*as_nobody, sys.executable, "-c", SAVE_AS_NOBODY, str(store)],
        env=nobody_env(world),
        cwd=world,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == PERMISSION == 11, (proc.stdout, proc.stderr)
    message = proc.stdout
    assert str(store) in message
    assert "permission denied" in message.lower()
    assert f"uid {NOBODY}" in message
    assert "--root / CKPTD_ROOT" in message
    assert list(parent.iterdir()) == ([store] if exists else [])
    if exists:
        assert list(store.iterdir()) == []


@pytest.mark.usefixtures("root")  # for its clean CKPTD_* / XDG_CONFIG_HOME environment
def test_cli_rm_as_nobody_is_a_permission_error(world: Path, as_nobody: tuple[str, ...]) -> None:
    store = Path(tempfile.mkdtemp(dir=world)) / "store"
    store.parent.chmod(0o755)
    ckptd_client.save("net", {"w": torch.ones(4)}, step=1, rng=False, root=store)
    target = manifest_file(store, "net", 1)

    proc = run_ckptd(
        "rm", "net", "1", "--yes", "--root", store, env=nobody_env(world), prefix=as_nobody
    )
    assert proc.returncode == PERMISSION, (proc.stdout, proc.stderr)
    assert f"error: cannot delete {target}: Permission denied (running as uid {NOBODY})" in (
        proc.stderr
    )
    assert target.exists()


@pytest.mark.usefixtures("root")
def test_unreadable_home_config_is_a_config_error(world: Path, as_nobody: tuple[str, ...]) -> None:
    """nobody with a HOME it cannot enter (e.g. HOME=/root kept by sudo or setpriv): the user
    config path cannot even be checked; that is a ConfigError naming it (as for a config file
    that cannot be read), not a PermissionError traceback."""
    private = Path(tempfile.mkdtemp(dir=world))  # mode 0700, owned by root
    store = world / "store-for-config-test"
    ckptd_client.save("net", {"w": torch.ones(4)}, step=1, rng=False, root=store)
    env = nobody_env(world, HOME=str(private), CKPTD_ROOT=str(store))
    del env["CKPTD_CONFIG"], env["XDG_CONFIG_HOME"]  # so the lookup reaches the user config

    proc = run_ckptd("list", env=env, prefix=as_nobody)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == CONFIG, (proc.stdout, proc.stderr)
    assert str(private / ".config" / "ckptd" / "ckptd.toml") in proc.stderr
    assert "Permission denied" in proc.stderr
