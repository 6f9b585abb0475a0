"""Reading checkpoints straight from the object-store tier, against a real S3 server.

Real checkpoints are committed by a real daemon (a single-process job of two steps, and a step of
two ranks), copied to the bucket byte for byte as the uploader lays them out (objects first,
manifests last), and the local root is deleted: every read below has no local copy.

- ``ckptd list / show / verify / restore --root s3://...`` (the endpoint from the config's
  ``[tier]``) and ``ckptd_client.load / restore(root="s3://...")`` (the endpoint from
  ``AWS_ENDPOINT_URL``) give back what was saved, bit for bit; a multi-rank step per rank;
- an object corrupted in the bucket: ``verify`` names its key and fails (exit 7), ``load``
  refuses it, and it never enters the cache;
- a manifest deleted from the bucket leaves ``list``;
- a malformed URL, a missing bucket, an unreachable endpoint, and the commands that write: a
  clear TierError (exit 22).
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd.config
import ckptd_client
from ckptd.cli.main import main
from ckptd.errors import EXIT_CODES, CorruptCheckpointError, TierError
from ckptd.format.store import Store
from ckptd.tier import keys
from ckptd.tier.mirror import cache_root
from ckptd.tier.remote import parse_url
from ckptd_client import Client
from tests.integration.daemon_fixtures import (
    bits,
    daemon_factory,
    empty_config,
    empty_config_home,
)
from tests.tier_server import WeedServer

JOB = "single"
RANKS = "ranks"
TIER_ERROR = EXIT_CODES["TierError"]
CORRUPT = EXIT_CODES["CorruptCheckpointError"]


def model_of(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def part_state(rank: int) -> dict[str, Any]:
    return {"shared": torch.arange(4096.0), "own": torch.full((300,), float(rank)), "rank": rank}


@dataclass(frozen=True)
class Saved:
    """What the module committed: the store's files by bucket key, and the states handed off."""

    files: dict[str, bytes]
    models: dict[int, dict[str, torch.Tensor]]
    """Step -> the model's state_dict handed off at that step (job ``single``)."""
    only_in_step_2: str
    """The digest of an object step 2 names and step 1 does not."""

    def upload(self, s3: WeedServer, prefix: str) -> None:
        remote = s3.remote(prefix)
        for key in sorted(self.files, key=lambda k: "/manifests/" in k):  # manifests last
            remote.put(key, self.files[key])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Saved]:
    """Commit the checkpoints with a real daemon and take its store's files (the root is then
    deleted with the daemon's directory)."""
    base = tmp_path_factory.mktemp("read-config")
    with pytest.MonkeyPatch.context() as mp, daemon_factory() as factory:
        for var in ("CKPTD_ROOT", "CKPTD_SOCKET"):
            mp.delenv(var, raising=False)
        mp.setenv("CKPTD_CONFIG", str(empty_config(base)))
        mp.setenv("XDG_CONFIG_HOME", str(empty_config_home(base)))
        mp.setattr(ckptd.config, "SYSTEM_CONFIG", base / "absent.toml")
        daemon = factory.start()
        models: dict[int, dict[str, torch.Tensor]] = {}
        with Client(JOB, socket=daemon.socket, root=daemon.root, spawn=False) as client:
            model = model_of(0)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for step in (1, 2):
                if step == 2:
                    last = model[2]
                    assert isinstance(last, torch.nn.Linear)
                    with torch.no_grad():
                        last.weight.add_(1.0)  # step 2 changes one tensor only
                models[step] = {k: v.clone() for k, v in model.state_dict().items()}
                client.snapshot(model, opt, step=step, extra={"step": step}).wait(60)
        clients = [
            Client(
                RANKS,
                socket=daemon.socket,
                root=daemon.root,
                spawn=False,
                rank=r,
                world_size=2,
                attempt="a1",
            )
            for r in (0, 1)
        ]
        try:
            for r, c in enumerate(clients):
                c.snapshot(state=part_state(r), step=3, rng=False).wait(60)
        finally:
            for c in clients:
                c.close()
        daemon.wait_idle()
        store = Store(daemon.root)
        assert store.steps(JOB) == [1, 2] and store.steps(RANKS) == [3]
        step1, step2 = (store.read_manifest(JOB, s).objects for s in (1, 2))
        only_in_2 = sorted(step2.keys() - step1.keys())
        assert only_in_2, "step 2 should have one new object"
        files = {
            p.relative_to(daemon.root).as_posix(): p.read_bytes()
            for p in sorted(daemon.root.rglob("*"))
            if p.is_file()
            and (
                p.name == keys.MARKER
                or {"objects", "manifests"} & set(p.relative_to(daemon.root).parts)
                or p.name.startswith("rank-")
            )
        }
        factory.stop(daemon)
        shutil.rmtree(daemon.root)  # no local copy from here on
        yield Saved(files, models, only_in_2[0])


@pytest.fixture
def env(s3: WeedServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Credentials for the server, no endpoint (a test names it), a cache of the test's own;
    returns the cache directory."""
    for var in ("CKPTD_ROOT", "CKPTD_SOCKET", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CKPTD_CONFIG", str(empty_config(tmp_path)))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(empty_config_home(tmp_path)))
    monkeypatch.setenv("CKPTD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "160")
    return tmp_path / "cache"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


CLI = Callable[..., Result]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], env: Path) -> CLI:
    """Run ``ckptd ARGS`` in this process; return its exit code, stdout and stderr."""

    def run(*args: str | Path) -> Result:
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        assert isinstance(info.value.code, int)
        return Result(info.value.code, captured.out, captured.err)

    return run


def tier_config(tmp_path: Path, url: str, endpoint: str) -> Path:
    path = tmp_path / "tier.toml"
    path.write_text(f'[tier]\nurl = "{url}"\nendpoint = "{endpoint}"\n')
    return path


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, x in a.items():
        assert x.dtype == b[k].dtype and x.shape == b[k].shape, k
        assert torch.equal(bits(x), bits(b[k])), k


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_lists_shows_verifies_and_restores_from_the_bucket(
    saved: Saved, s3: WeedServer, tier_url: str, cli: CLI, tmp_path: Path
) -> None:
    saved.upload(s3, parse_url(tier_url).prefix)
    # The endpoint comes from the config's [tier], which names this bucket.
    conf = tier_config(tmp_path, s3.url("elsewhere"), s3.endpoint)
    at = ("--root", tier_url, "--config", conf)

    listed = cli("list", "--json", *at)
    assert listed.code == 0, listed
    rows = json.loads(listed.out)
    assert [(r["job"], r["step"], r["world_size"]) for r in rows] == [
        (RANKS, 3, 2),
        (JOB, 1, 1),
        (JOB, 2, 1),
    ]
    table = cli("list", *at)
    assert table.code == 0 and f"checkpoints in {tier_url}" in table.out, table

    shown = cli("show", JOB, "2", "--json", *at)
    assert shown.code == 0, shown
    paths = {t["path"] for t in json.loads(shown.out)["tensors"]}
    assert {f"model.{k}" for k in saved.models[2]} <= paths
    parts = cli("show", RANKS, "3", "--json", *at)
    assert parts.code == 0 and [p["rank"] for p in json.loads(parts.out)["parts"]] == [0, 1]

    verified = cli("verify", *at)
    assert verified.code == 0, verified
    assert verified.out.count("ok") == 3 and f"{RANKS} step 3 (2 ranks" in verified.out

    out = tmp_path / "step2.pt"
    restored = cli("restore", JOB, "2", "-o", out, *at)
    assert restored.code == 0, restored
    same_tensors(torch.load(out, weights_only=True)["model"], saved.models[2])
    rank_file = tmp_path / "rank1.pt"
    assert cli("restore", RANKS, "3", "--rank", "1", "-o", rank_file, *at).code == 0
    same_tensors(
        {k: v for k, v in torch.load(rank_file, weights_only=True).items() if k != "rank"},
        {k: v for k, v in part_state(1).items() if isinstance(v, torch.Tensor)},
    )


def test_client_loads_and_restores_from_the_bucket_bit_identical(
    saved: Saved, s3: WeedServer, tier_url: str, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved.upload(s3, parse_url(tier_url).prefix)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # no config names the tier here
    for step in (1, 2):
        state = ckptd_client.load(JOB, step, root=tier_url)
        same_tensors(state["model"], saved.models[step])
        assert state["extra"] == {"step": step}
    model = model_of(7)
    extra = ckptd_client.restore(model, job=JOB, root=tier_url)
    assert extra["__step__"] == 2
    same_tensors(model.state_dict(), saved.models[2])
    for rank in (0, 1):
        part = ckptd_client.load(RANKS, 3, root=tier_url, rank=rank)
        assert part["rank"] == rank
        for k in ("shared", "own"):
            assert torch.equal(bits(part[k]), bits(part_state(rank)[k]))
    listed = ckptd_client.list_checkpoints(root=tier_url)
    assert [(m.job, m.step) for m in listed] == [(RANKS, 3), (JOB, 1), (JOB, 2)]
    # What was read is in the cache, byte for byte what the bucket holds.
    cached = cache_root(parse_url(tier_url)) / keys.object_key(JOB, saved.only_in_step_2)
    assert cached.read_bytes() == saved.files[keys.object_key(JOB, saved.only_in_step_2)]
    with pytest.raises(TierError, match="read-only"):
        ckptd_client.save(JOB, state={"x": torch.zeros(3)}, step=9, root=tier_url)


def test_an_object_corrupted_in_the_bucket_fails_verify_and_load_and_is_not_cached(
    saved: Saved, s3: WeedServer, tier_url: str, cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = parse_url(tier_url).prefix
    saved.upload(s3, prefix)
    key = keys.object_key(JOB, saved.only_in_step_2)
    data = bytearray(saved.files[key])
    data[-5] ^= 0x01
    s3.remote(prefix).put(key, bytes(data))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    where = f"{tier_url}/{key}"

    verified = cli("verify", JOB, "--root", tier_url)
    assert verified.code == CORRUPT, verified
    assert f"FAIL {JOB} step 2" in verified.out and f"ok   {JOB} step 1" in verified.out
    assert f"damaged     {where} (referenced by {JOB} step 2)" in verified.out
    assert "1 of 2 checkpoint(s) failed verification" in verified.err

    with pytest.raises(CorruptCheckpointError, match=r"\(in the tier; not cached\)") as info:
        ckptd_client.load(JOB, 2, root=tier_url)
    assert f"object {where}: damaged zstd data" in str(info.value)
    cached = cache_root(parse_url(tier_url)) / key
    assert not cached.exists()
    same_tensors(ckptd_client.load(JOB, 1, root=tier_url)["model"], saved.models[1])


def test_a_manifest_deleted_from_the_bucket_leaves_list(
    saved: Saved, s3: WeedServer, tier_url: str, cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = parse_url(tier_url).prefix
    saved.upload(s3, prefix)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)

    def steps() -> list[tuple[str, int]]:
        listed = cli("list", JOB, "--json", "--root", tier_url)
        assert listed.code == 0, listed
        return [(r["job"], r["step"]) for r in json.loads(listed.out)]

    assert steps() == [(JOB, 1), (JOB, 2)]
    s3.remote(prefix).delete([keys.manifest_key(JOB, 1)])
    assert steps() == [(JOB, 2)]
    assert [m.step for m in ckptd_client.list_checkpoints(JOB, root=tier_url)] == [2]
    missing = cli("show", JOB, "1", "--root", tier_url)
    assert missing.code == EXIT_CODES["NotFoundError"] and "steps that exist: 2" in missing.err


def test_bad_url_missing_bucket_unreachable_endpoint_and_writes_exit_22(
    s3: WeedServer, tier_url: str, cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    cases = [
        ("s3://Bad_Bucket/x", "is not a valid bucket name"),
        ("s3://ckptd-no-such-bucket/x", "bucket 'ckptd-no-such-bucket' does not exist"),
    ]
    for url, why in cases:
        res = cli("list", "--root", url)
        assert res.code == TIER_ERROR and why in res.err, res
        with pytest.raises(TierError, match=why):
            ckptd_client.load(JOB, root=url)
    for args in (("rm", JOB, "1", "--yes"), ("gc",), ("pin", JOB, "1"), ("prune",)):
        res = cli(*args, "--root", tier_url)
        assert res.code == TIER_ERROR, res
        assert f"ckptd {args[0]} changes a store, and {tier_url}" in res.err
        assert "read-only here: the daemon writes it" in res.err
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    res = cli("verify", "--root", tier_url)
    assert res.code == TIER_ERROR and "cannot reach the endpoint" in res.err, res
    with pytest.raises(TierError, match="cannot reach the endpoint"):
        ckptd_client.load(JOB, root=tier_url)
