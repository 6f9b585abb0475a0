"""The daemon fills the object-store tier in the background, against a real S3 server.

Real daemons (``ckptd start`` with a ``[tier]`` config) and a real ``weed mini`` on loopback
(:mod:`tests.tier_server`). After every fault the bucket is scanned (:func:`scan_bucket`): a
manifest visible in the bucket names only objects (and part records) that are there, whole.

1. round trip: snapshots go up (the second one only with its new objects); with the local root
   deleted, ``ckptd list --root s3://`` shows them and ``ckptd_client.load`` is bit-identical;
2. the server down: snapshots commit locally, status shows the backlog and the error, local
   retention keeps what is not uploaded; the server up: the backlog drains; the daemon SIGKILLed
   mid-upload (a bandwidth cap keeps it uploading) and restarted: the upload completes;
3. wrong credentials and a missing bucket: an error in status and the log, never a crash;
   a malformed URL: the daemon does not start, saying why;
4. ``Client(tier=False)`` keeps a job's snapshots local; ``[tier.retention]`` prunes the bucket;
5. multi-node: two daemons with their own roots and one bucket, 4 ranks (2 per daemon): the step
   appears in the bucket only once all 4 parts are there, and a rank restores on the other node.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd_client
from ckptd.errors import DaemonUnavailableError, ManifestError, NotFoundError
from ckptd.format.manifest import manifest_checksum, parse_manifest
from ckptd.format.store import Store
from ckptd.tier import keys
from ckptd.tier.remote import Remote
from ckptd_client import Client
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import (
    Daemon,
    DaemonFactory,
    assert_same,
    run_ckptd,
    wait_until,
)
from tests.tier_server import WeedServer

daemons = daemon_fixtures.daemons
ckptd_env = daemon_fixtures.ckptd_env
pytestmark = pytest.mark.usefixtures("ckptd_env")

JOB = "tiered"


@pytest.fixture(autouse=True)
def tier_env(s3: WeedServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In-process readers reach the server like the daemons: its credentials and endpoint, and a
    cache of their own."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("CKPTD_CACHE", str(tmp_path / "cache"))


def config(s3: WeedServer, url: str, extra: str = "", **tier: str) -> str:
    lines = [f'url = "{url}"', f'endpoint = "{s3.endpoint}"', 'retry_max = "2s"', "timeout = 5"]
    lines += [f"{k} = {v}" for k, v in tier.items()]
    # pack_bytes = 0: each tensor an object of its own, so a changed tensor is one new object.
    return "[store]\npack_bytes = 0\n[tier]\n" + "\n".join(lines) + "\n" + extra


def start(
    daemons: DaemonFactory, s3: WeedServer, text: str, *, root: Path | None = None, **kw: Any
) -> Daemon:
    daemons.env.update(s3.env)
    return daemons.start(root=root, config=text, **kw)


def tier_status(daemon: Daemon) -> dict[str, Any]:
    tier = daemon.status()["tier"]
    assert isinstance(tier, dict), daemon.status()
    return tier


def wait_drained(daemon: Daemon, uploaded: int, timeout_s: float = 60.0) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def done() -> bool:
        nonlocal last
        last = tier_status(daemon)
        return bool(last["backlog"] == 0 and last["uploaded"] >= uploaded)

    wait_until(done, timeout_s, f"the upload backlog to drain (last: {last})")
    return last


def state(seed: int, changed: int = 0) -> dict[str, Any]:
    """Four 64 KiB tensors (four objects); ``changed`` of them depend on ``seed``."""
    g = torch.Generator().manual_seed(1234)
    base = [torch.randn(16384, generator=g) for _ in range(4)]
    for i in range(changed):
        base[i] = base[i] + seed
    return {"w": base, "step_seed": seed}


def steps_in(remote: Remote, job: str = JOB) -> list[int]:
    found = (keys.manifest_step(job, x.key) for x in remote.list(keys.manifests_prefix(job)))
    return sorted(s for s in found if s is not None)


def scan_bucket(remote: Remote, job: str = JOB) -> list[str]:
    """Problems with what the bucket shows: every visible manifest must be whole (its objects,
    or its parts and theirs, there with the stored size)."""
    sizes = {x.key: x.size for x in remote.list(job)}
    problems = []

    def objects_of(manifest: Any, where: str) -> None:
        for digest, info in manifest.objects.items():
            key = keys.object_key(job, digest)
            if sizes.get(key) != info.stored_bytes:
                problems.append(f"{where}: object {digest} is {sizes.get(key)}, not whole")

    for step in steps_in(remote, job):
        key = keys.manifest_key(job, step)
        try:
            record = parse_manifest(remote.get(key), where=key)
        except ManifestError as exc:
            problems.append(f"{key}: {exc}")
            continue
        if not record.is_global:
            objects_of(record, key)
            continue
        for ref in record.parts:
            pkey = keys.record_key(job, ref.record)
            data = remote.get(pkey)
            if manifest_checksum(data) != ref.checksum:
                problems.append(f"{key}: part {pkey} is not the one committed")
            objects_of(parse_manifest(data, where=pkey), pkey)
    return problems


def test_round_trip_uploads_new_objects_only_and_reads_back_without_the_local_root(
    daemons: DaemonFactory, s3: WeedServer, tier_url: str
) -> None:
    d = start(daemons, s3, config(s3, tier_url))
    remote = s3.remote(tier_url.split("/", 3)[3])
    saved = {}
    with Client(JOB, socket=d.socket, root=d.root, spawn=False, strict=True) as c:
        saved[1] = state(1, changed=1)
        c.snapshot(state=saved[1], step=1).wait(60)
        first = wait_drained(d, 1)["uploaded_bytes"]
        for step in (2, 3):
            saved[step] = state(step, changed=1)
            c.snapshot(state=saved[step], step=step).wait(60)
    after = wait_drained(d, 3)
    assert steps_in(remote) == [1, 2, 3]
    assert scan_bucket(remote) == []
    # Steps 2 and 3 changed one tensor of four: only that object went up again.
    assert 0 < after["uploaded_bytes"] - first < first, (first, after)
    daemons.stop(d)
    shutil.rmtree(d.root)

    env = {**daemons.env, "AWS_ENDPOINT_URL": s3.endpoint, "CKPTD_CACHE": os.environ["CKPTD_CACHE"]}
    listed = run_ckptd("list", JOB, "--root", tier_url, env=env)
    assert listed.returncode == 0, listed.stderr
    for step in (1, 2, 3):
        assert str(step) in listed.stdout
        assert_same(ckptd_client.load(JOB, step, root=tier_url), saved[step], f"step {step}")


def test_a_fresh_node_restores_the_newest_checkpoint_from_the_tier_and_says_so(
    daemons: DaemonFactory, s3: WeedServer, tier_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d = start(daemons, s3, config(s3, tier_url))
    with Client(JOB, socket=d.socket, root=d.root, spawn=False, strict=True) as c:
        for step in (1, 2):
            with torch.no_grad():
                model.weight += step
            c.snapshot(model, opt, step=step).wait(60)
    wait_drained(d, 2)
    daemons.stop(d)
    # The node is gone: a new one, same tier, an empty local root.
    fresh = start(daemons, s3, config(s3, tier_url), root=daemons.base / "node-2")
    again = torch.nn.Linear(32, 32)
    with Client(JOB, socket=fresh.socket, root=fresh.root, spawn=False) as c:
        with caplog.at_level("WARNING", logger="ckptd_client.client"):
            extra = c.restore(again, torch.optim.SGD(again.parameters(), lr=0.1))
        assert extra["__step__"] == 2
        assert "restoring it from the tier" in caplog.text
        # A checkpoint on local disk that is at least as new wins: no tier read.
        c.snapshot(again, step=3).wait(60)
        caplog.clear()
        with caplog.at_level("WARNING", logger="ckptd_client.client"):
            assert c.restore(again)["__step__"] == 3
        assert "from the tier" not in caplog.text
    assert_same(again.state_dict(), model.state_dict())
    # Opted out (a root of its own on the same daemon): never reads the tier.
    empty = daemons.base / "node-3"
    opted_out = Client(JOB, socket=fresh.socket, root=empty, spawn=False, tier=False)
    with opted_out as c, pytest.raises(NotFoundError):
        c.restore(torch.nn.Linear(32, 32))


def test_store_down_backlog_then_drain_and_daemon_killed_mid_upload(
    daemons: DaemonFactory, s3: WeedServer, tier_url: str
) -> None:
    remote = s3.remote(tier_url.split("/", 3)[3])
    retention = '[retention]\nkeep_last = 1\n[metrics]\nlisten = "127.0.0.1:0"\n'
    s3.stop()
    try:
        d = start(daemons, s3, config(s3, tier_url, retention))
        with Client(JOB, socket=d.socket, root=d.root, spawn=False, strict=True) as c:
            for step in (1, 2, 3):
                c.snapshot(state=state(step, changed=1), step=step).wait(60)

            def backlog() -> bool:
                t = tier_status(d)
                return bool(t["backlog"] == 3 and t["tiers"][0]["state"] != "ok")

            wait_until(backlog, 30, "the backlog and the error in status")
            tier = tier_status(d)["tiers"][0]
            assert "cannot reach" in tier["error"], tier
            url = f"http://127.0.0.1:{d.status()['metrics_port']}/metrics"

            def metrics() -> str:
                with urllib.request.urlopen(url, timeout=10) as page:
                    return str(page.read().decode())

            wanted = ('ckptd_tier_errors_total{job="tiered",reason="TierError"}', "backlog 3.0")
            wait_until(lambda: all(w in metrics() for w in wanted), 30, "the tier's metrics")
            # Local retention keeps every step the tier lacks.
            assert Store(d.root).steps(JOB) == [1, 2, 3]
    finally:
        s3.start()
    wait_drained(d, 3)
    assert steps_in(remote) == [1, 2, 3] and scan_bucket(remote) == []
    assert "cannot reach" in d.log_text()
    with Client(JOB, socket=d.socket, root=d.root, spawn=False, strict=True) as c:
        c.snapshot(state=state(4, changed=1), step=4).wait(60)
    wait_drained(d, 4)
    assert Store(d.root).steps(JOB) == [4]  # retention applies again once uploaded
    daemons.stop(d)

    # Killed mid-upload: a bandwidth cap keeps step 5's new objects going up for seconds.
    big = {"w": [torch.randn(65536) for _ in range(6)]}  # 6 objects of 256 KiB
    slow = config(s3, tier_url, bandwidth='"64KiB"', concurrency="1")
    for kill in range(2):
        d = start(daemons, s3, slow, root=d.root)
        if kill == 0:
            with Client(JOB, socket=d.socket, root=d.root, spawn=False, strict=True) as c:
                c.snapshot(state=big, step=5).wait(60)
        before = {x.key for x in remote.list(keys.objects_prefix(JOB))}

        def one_more(before: set[str] = before) -> bool:
            return bool({x.key for x in remote.list(keys.objects_prefix(JOB))} - before)

        wait_until(one_more, 60, "one more object of step 5 in the bucket")
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
        assert 5 not in steps_in(remote), "step 5 visible before all its objects"
        assert scan_bucket(remote) == []
    d = start(daemons, s3, config(s3, tier_url), root=d.root)
    wait_drained(d, 1)
    assert 5 in steps_in(remote) and scan_bucket(remote) == []
    assert_same(ckptd_client.load(JOB, 5, root=tier_url), big)


def failing(daemon: Daemon) -> bool:
    return bool(tier_status(daemon)["tiers"][0]["state"] != "ok")


def test_refused_credentials_and_missing_bucket_are_errors_in_status_not_crashes(
    daemons: DaemonFactory, s3: WeedServer, tier_url: str
) -> None:
    daemons.env.update(s3.env)
    missing = daemons.start(
        socket_path=daemons.base / "m.sock",
        root=daemons.base / "m-root",
        config=config(s3, "s3://no-such-bucket/x"),
    )
    daemons.env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    d = daemons.start(config=config(s3, tier_url))
    for daemon, words in ((d, "credentials"), (missing, "does not exist")):
        with Client(JOB, socket=daemon.socket, root=daemon.root, spawn=False, strict=True) as c:
            c.snapshot(state=state(1), step=1).wait(60)
            c.snapshot(state=state(2), step=2).wait(60)  # still serving
        wait_until(lambda: failing(daemon), 30, "the tier error in status")  # noqa: B023
        assert words in tier_status(daemon)["tiers"][0]["error"]
        assert words in daemon.log_text()
        assert Store(daemon.root).steps(JOB) == [1, 2]
        assert tier_status(daemon)["backlog"] == 2

    bad = '[tier]\nurl = "s3://Not_A_Bucket/x"\n'
    with pytest.raises(DaemonUnavailableError, match=r"tier\.url"):
        daemons.start(socket_path=daemons.base / "b.sock", config=bad)


def test_a_tier_that_cannot_be_read_on_restore_is_a_warning_and_local_disk_is_used(
    daemons: DaemonFactory, s3: WeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens there
    text = config(s3, "s3://gone-bucket/x").replace(s3.endpoint, f"http://127.0.0.1:{port}")
    d = start(daemons, s3, text)
    model = torch.nn.Linear(8, 8)
    with Client(JOB, socket=d.socket, root=d.root, spawn=False, strict=True) as c:
        c.snapshot(model, step=4).wait(60)
        with caplog.at_level("WARNING", logger="ckptd_client.client"):
            assert c.restore(torch.nn.Linear(8, 8))["__step__"] == 4
            with pytest.raises(NotFoundError, match="step 9"):
                c.restore(torch.nn.Linear(8, 8), step=9)
    assert caplog.text.count("cannot be read") == 2, caplog.text
    assert "cannot reach the endpoint" in caplog.text
    assert "restoring from local disk" in caplog.text


def test_credentials_fixed_in_the_shared_file_are_read_again_and_a_bad_reload_is_rejected(
    daemons: DaemonFactory, s3: WeedServer, tier_url: str
) -> None:
    """Keys from ~/.aws/credentials (no AWS_* keys in the environment): a wrong secret is an
    error in status; fixing the file, as the error says, is enough (no restart). A config reload
    whose tier client cannot be made (the file damaged meanwhile) is rejected, and uploads go on
    with the client in use."""
    creds = daemons.base / "aws" / "credentials"
    creds.parent.mkdir()

    def write_creds(secret: str) -> None:
        key = s3.env["AWS_ACCESS_KEY_ID"]
        creds.write_text(f"[ckptd]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")

    write_creds("not-the-secret")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        daemons.env.pop(name, None)
    daemons.env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(creds), AWS_PROFILE="ckptd", AWS_REGION="us-east-1"
    )
    conf = daemons.base / "conf" / "ckptd.toml"
    conf.parent.mkdir()
    conf.write_text(config(s3, tier_url))
    d = daemons.start(config=conf)
    with Client(JOB, socket=d.socket, root=d.root, spawn=False, strict=True) as c:
        c.snapshot(state=state(1), step=1).wait(60)
        wait_until(lambda: failing(d), 30, "the refused credentials in status")
        assert "credentials" in tier_status(d)["tiers"][0]["error"]
        write_creds(s3.env["AWS_SECRET_ACCESS_KEY"])
        wait_drained(d, 1)
        assert tier_status(d)["tiers"][0]["state"] == "ok"

        creds.write_text("[ckptd\nthis is not an ini file\n")
        loaded = d.status()["config_loaded_at"]
        conf.write_text(config(s3, tier_url, concurrency="4"))
        wait_until(
            lambda: any("config change rejected" in e for e in d.status()["recent_errors"]),
            30,
            "the reload to be rejected",
        )
        assert any("AWS file" in e for e in d.status()["recent_errors"])
        assert d.status()["config_loaded_at"] == loaded
        c.snapshot(state=state(2, changed=1), step=2).wait(60)
    wait_drained(d, 2)  # the upload thread is alive, with the client it had
    remote = s3.remote(tier_url.split("/", 3)[3])
    assert steps_in(remote) == [1, 2] and scan_bucket(remote) == []


def test_opted_out_client_stays_local_and_tier_retention_prunes_the_bucket(
    daemons: DaemonFactory, s3: WeedServer, tier_url: str
) -> None:
    remote = s3.remote(tier_url.split("/", 3)[3])
    d = start(daemons, s3, config(s3, tier_url, "[tier.retention]\nkeep_last = 2\n"))
    with Client("local-only", socket=d.socket, root=d.root, spawn=False, tier=False) as c:
        c.snapshot(state=state(1), step=1).wait(60)
    with Client(JOB, socket=d.socket, root=d.root, spawn=False, strict=True) as c:
        for step in (1, 2, 3, 4):
            c.snapshot(state=state(step, changed=1), step=step).wait(60)
    wait_drained(d, 4)
    assert steps_in(remote) == [3, 4]
    assert scan_bucket(remote) == []
    assert steps_in(remote, "local-only") == []
    assert Store(d.root).marked_uploads("local-only") == []
    assert Store(d.root).steps(JOB) == [1, 2, 3, 4]  # local retention is its own


def test_two_nodes_commit_a_four_rank_step_in_the_bucket_only_when_every_part_is_there(
    daemons: DaemonFactory, s3: WeedServer, tier_url: str
) -> None:
    remote = s3.remote(tier_url.split("/", 3)[3])
    text = config(s3, tier_url)
    a = start(daemons, s3, text, root=daemons.base / "node-a")
    b = start(daemons, s3, text, root=daemons.base / "node-b", socket_path=daemons.base / "b.sock")
    node = {0: a, 1: a, 2: b, 3: b}

    def model(rank: int) -> torch.nn.Linear:
        torch.manual_seed(rank)
        return torch.nn.Linear(64, 64)

    def parts_in_bucket() -> int:
        return sum(1 for _ in remote.list(keys.part_set_prefix(JOB, 7, "a1")))

    with ExitStack() as stack:
        clients = {
            r: stack.enter_context(
                Client(
                    JOB,
                    socket=node[r].socket,
                    root=node[r].root,
                    spawn=False,
                    strict=True,
                    rank=r,
                    world_size=4,
                    attempt="a1",
                )
            )
            for r in range(4)
        }
        for r in (0, 1, 2):
            clients[r].snapshot(model(r), step=7).wait(60)
        wait_until(lambda: parts_in_bucket() == 3, 60, "3 parts in the bucket")
        time.sleep(0.5)  # the daemons look again; nothing may commit with a rank missing
        assert steps_in(remote) == []
        waiting = tier_status(b)["waiting_for_ranks"] + tier_status(a)["waiting_for_ranks"]
        assert any(w["ranks"] == [3] for w in waiting), waiting
        clients[3].snapshot(model(3), step=7).wait(60)
        wait_until(lambda: steps_in(remote) == [7], 60, "step 7 committed in the bucket")
    assert scan_bucket(remote) == []
    record = parse_manifest(remote.get(keys.manifest_key(JOB, 7)), where="record")
    assert record.world_size == 4 and record.attempt == "a1"
    # Neither node has all parts: no local commit anywhere.
    assert Store(a.root).steps(JOB) == [] and Store(b.root).steps(JOB) == []
    # Rank 0 (node A's) restores on node B, from the bucket.
    fresh = model(99)
    with Client(
        JOB, socket=b.socket, root=b.root, spawn=False, rank=0, world_size=4, attempt="a2"
    ) as c:
        assert c.restore(fresh, step="latest")["__step__"] == 7
    assert_same(fresh.state_dict(), model(0).state_dict())
    for d in (a, b):
        wait_until(lambda: not tier_status(d)["backlog"], 60, "both nodes' marks gone")  # noqa: B023
