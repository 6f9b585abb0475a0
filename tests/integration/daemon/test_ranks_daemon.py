"""Multi-rank hand-offs through real daemons: bad layouts refused with clear errors and nothing
committed wrongly; a daemon that restarts commits the steps a crash left complete; garbage rank
fields on the socket. Two daemons over one root stand for two nodes: one pair serves the module
(each test with jobs of its own), and the restart test starts its own daemon on a root it
prepared."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from ckptd.errors import RankLayoutError
from ckptd.format.skeleton import flatten
from ckptd.format.store import Store
from ckptd.pipeline.plan import tensor_source
from ckptd.pipeline.write import write_checkpoint
from ckptd.protocol import PROTOCOL_VERSION, close_fds, recv_message, send_message
from ckptd_client import Client
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import Daemon, DaemonFactory, daemon_factory, wait_until

ckptd_env = daemon_fixtures.ckptd_env
daemons = daemon_fixtures.daemons

pytestmark = pytest.mark.usefixtures("ckptd_env")

JOB = "ranks"
WAIT_S = 60.0


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Daemon, Daemon]]:
    """Two daemons over one root, for the module."""
    with daemon_factory() as factory:
        a = factory.start()
        yield a, factory.start(socket_path=factory.base / "run" / "b.sock")


def rank_client(
    daemon: Daemon, rank: int, world: int, attempt: str = "t1", job: str = JOB, **kw: Any
) -> Client:
    return Client(
        job,
        socket=daemon.socket,
        root=daemon.root,
        spawn=False,
        rank=rank,
        world_size=world,
        attempt=attempt,
        **kw,
    )


def part_state(step: int, rank: int) -> dict[str, torch.Tensor]:
    return {"replica": torch.arange(50_000.0) + step, "own": torch.full((100,), float(rank))}


def waiting_for_ranks(daemon: Daemon, job: str) -> list[dict[str, Any]]:
    return [w for w in daemon.status()["waiting_for_ranks"] if w["job"] == job]


def test_two_daemons_commit_a_step_once_every_rank_is_durable(
    pair: tuple[Daemon, Daemon],
) -> None:
    a, b = pair
    clients = [rank_client(a, 0, 3), rank_client(b, 1, 3), rank_client(b, 2, 3)]
    try:
        infos = [
            c.snapshot(state=part_state(7, r), step=7, rng=False).wait(WAIT_S)
            for r, c in enumerate(clients[:2])
        ]
        assert all(i.rank == r and i.world_size == 3 for r, i in enumerate(infos))
        assert not any(i.step_committed for i in infos)
        store = Store(a.root)
        assert store.steps(JOB) == []
        # Waiting for rank 2, since when: what `ckptd status` shows.
        wait_until(lambda: bool(waiting_for_ranks(a, JOB)), 30, "a to report step 7")
        [waiting] = waiting_for_ranks(a, JOB)
        assert (waiting["step"], waiting["ranks"], waiting["missing"]) == (7, [0, 1], [2])
        last = clients[2].snapshot(state=part_state(7, 2), step=7, rng=False).wait(WAIT_S)
        assert last.step_committed  # daemon b wrote the last part and committed
        assert store.steps(JOB) == [7]
        record = store.read_manifest(JOB, 7)
        assert record.world_size == 3 and record.attempt == "t1"
        wait_until(lambda: not waiting_for_ranks(a, JOB), 30, "a to see step 7 commit")
        for r in range(3):
            loaded = store.step_parts(JOB, 7)[r]
            assert loaded.rank == r
    finally:
        for c in clients:
            c.close()


def test_bad_rank_layouts_fail_and_commit_nothing(pair: tuple[Daemon, Daemon]) -> None:
    """Ranks that disagree on the world size; two processes claiming one rank; a rank handing a
    step off twice (one daemon, one job each)."""
    d, _ = pair
    with rank_client(d, 0, 2, job="worlds") as first, rank_client(d, 1, 3, job="worlds") as second:
        first.snapshot(state=part_state(1, 0), step=1, rng=False).wait(WAIT_S)
        handle = second.snapshot(state=part_state(1, 1), step=1, rng=False)
        with pytest.raises(RankLayoutError, match=r"says world size 3.*said \[2\]"):
            handle.wait(WAIT_S)
    assert Store(d.root).steps("worlds") == []
    with rank_client(d, 0, 2, job="claim") as one, rank_client(d, 0, 2, job="claim") as other:
        one.snapshot(state=part_state(1, 0), step=1, rng=False).wait(WAIT_S)
        with pytest.raises(RankLayoutError, match="rank 0 already handed this step off"):
            other.snapshot(state=part_state(1, 0), step=1, rng=False).wait(WAIT_S)
        # The client itself refuses a second hand-off of a step by its rank, before copying.
        with pytest.raises(RankLayoutError, match="already handed this step off in attempt t1"):
            one.snapshot(state=part_state(1, 0), step=1, rng=False)
        with pytest.raises(ValueError, match="fallback=True is for single-process jobs"):
            one.restore(None, fallback=True)
    assert Store(d.root).steps("claim") == []
    assert [sorted(p.parts) for p in Store(d.root).part_sets("claim")] == [[0]]


GARBAGE: list[tuple[dict[str, Any], str]] = [
    ({"rank": 0, "world_size": 2, "attempt": "../x"}, "hello.attempt: attempt must be"),
    ({"rank": 0, "world_size": 2}, "hello.attempt: expected a string"),
    ({"rank": -1, "world_size": 2, "attempt": "a"}, "hello.rank: expected an integer"),
    ({"rank": 0, "world_size": 0, "attempt": "a"}, "hello.world_size: expected an integer"),
    ({"rank": "0", "world_size": 2, "attempt": "a"}, "hello.rank: expected an integer"),
]


def test_a_rank_outside_the_world_and_garbage_rank_fields_get_an_error(
    pair: tuple[Daemon, Daemon],
) -> None:
    d, _ = pair
    job = "outside"
    with pytest.raises(RankLayoutError, match=r"rank 2 is outside \[0, 2\)"):
        rank_client(d, 2, 2, job=job)
    with Raw(d) as sock:
        reply = hello(sock, d, job=job, rank=2, world_size=2, attempt="t1")
    assert reply["op"] == "error" and reply["type"] == "ProtocolError"
    assert "rank 2 is outside [0, 2)" in reply["message"]
    for fields, message in GARBAGE:
        with Raw(d) as sock:
            reply = hello(sock, d, job=job, **fields)
        assert reply["op"] == "error" and message in reply["message"], (fields, reply)
    assert d.status()["pid"] == d.pid  # still serving
    assert Store(d.root).part_sets(job) == []


def test_single_process_and_multi_rank_clients_do_not_share_a_job(
    pair: tuple[Daemon, Daemon],
) -> None:
    d, _ = pair
    with rank_client(d, 0, 2, job="multi") as c:
        c.snapshot(state=part_state(1, 0), step=1, rng=False).wait(WAIT_S)
    with pytest.raises(RankLayoutError, match="holds multi-rank checkpoints"):
        Client("multi", socket=d.socket, root=d.root, spawn=False)
    with Client("solo", socket=d.socket, root=d.root, spawn=False) as solo:
        solo.snapshot(state=part_state(1, 0), step=1, rng=False).wait(WAIT_S)
    with pytest.raises(RankLayoutError, match="holds single-process checkpoints"):
        Client(
            "solo", socket=d.socket, root=d.root, spawn=False, rank=0, world_size=2, attempt="t1"
        )


def test_a_restarted_daemon_commits_a_step_whose_parts_a_crash_left_complete(
    daemons: DaemonFactory,
) -> None:
    root = daemons.default_root
    store = Store(root)
    # Every part durable, no record: what a committer killed between the two leaves.
    for rank in range(2):
        flat = flatten(part_state(3, rank))
        sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
        write_checkpoint(
            store, JOB, 3, flat.skeleton, sources, rank=rank, world_size=2, attempt="t1"
        )
    record = root / JOB / "manifests" / "step-000000000003.json"
    record.unlink()
    assert store.steps(JOB) == []
    d = daemons.start()
    wait_until(lambda: Store(root).steps(JOB) == [3], 30, "the daemon to commit step 3")
    assert "watching 1 uncommitted multi-rank step" in d.log_text()


# ---- raw protocol ------------------------------------------------------------------------------


class Raw:
    """A bare connection to a daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(10)
        self.sock.connect(str(daemon.socket))

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def hello(sock: socket.socket, daemon: Daemon, **fields: Any) -> dict[str, Any]:
    msg = {
        "op": "hello",
        "id": 1,
        "version": PROTOCOL_VERSION,
        "job": JOB,
        "root": str(daemon.root),
        "pid": os.getpid(),
    }
    send_message(sock, msg | fields)
    reply, fds = recv_message(sock)
    close_fds(fds)
    assert reply is not None
    return reply
