"""Trainer processes of the reliability suite: ``python -m tests.reliability.trainers MODE ...``.

Each snapshots a :class:`~tests.reliability.fixtures.SteppedState` (bytes a pure function of the
step) through a real :class:`~ckptd_client.Client`, and writes what it learned line by line with
a flush, so a test can read it even after SIGKILLing the process:

``committed``  snapshots until a stop file appears, with ``strict=False`` (daemon trouble stays on
               the handles, the client reconnects by itself) and at most two snapshots in flight;
               appends every step ``PendingSnapshot.wait()`` reported committed to a file.
``returned``   snapshots forever with ``strict=True`` and prints ``RETURNED <step>`` right after
               each ``snapshot()`` returns (the daemon has accepted it); the test SIGKILLs it.
``load``       waits for a go file, then snapshots as fast as the ring allows for a number of
               seconds, appending committed steps to a file; prints ``DONE`` with its counts.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import deque
from pathlib import Path

from ckptd.errors import CkptdError
from ckptd_client import Client, PendingSnapshot
from tests.reliability.fixtures import SteppedState


class Recorder:
    """Settles handles oldest first and appends committed steps to a file (flushed per line)."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", buffering=1)
        self.committed = 0
        self.failed = 0
        self.stuck = 0

    def settle(self, handle: PendingSnapshot, timeout_s: float = 120.0) -> None:
        try:
            info = handle.wait(timeout_s)
        except TimeoutError:
            self.stuck += 1
            print(f"STUCK {handle.step}", flush=True)
            return
        except CkptdError:
            self.failed += 1
            return
        self.file.write(f"{info.step}\n")
        self.file.flush()
        self.committed += 1


def committed_loop(a: argparse.Namespace) -> None:
    state = SteppedState(a.seed, a.mbytes, a.regions)
    client = Client(
        a.job,
        socket=a.socket,
        root=a.root,
        spawn=False,
        strict=False,
        slots=2,
        retention={"keep_last": a.keep_last},
        timeout_s=30,
    )
    recorder = Recorder(Path(a.committed))
    stop = Path(a.stop)
    pending: deque[PendingSnapshot] = deque()
    step = a.first_step
    print("READY", flush=True)
    while not stop.exists():
        handle = client.snapshot(state=state.at(step), step=step, metric=float(step))
        pending.append(handle)
        step += 1
        if handle.done() and handle.error is not None:
            time.sleep(0.05)  # the daemon is down: retry (reconnect) a little later
        while pending and (pending[0].done() or len(pending) > 2):
            recorder.settle(pending.popleft())
    while pending:
        recorder.settle(pending.popleft())
    client.close()
    print(
        f"DONE snapshots={step - a.first_step} committed={recorder.committed} "
        f"failed={recorder.failed} stuck={recorder.stuck}",
        flush=True,
    )


def returned_loop(a: argparse.Namespace) -> None:
    state = SteppedState(a.seed, a.mbytes, a.regions)
    rng = random.Random(a.first_step)
    client = Client(a.job, socket=a.socket, root=a.root, spawn=False, strict=True, slots=2)
    print("READY", flush=True)
    step = a.first_step
    while True:
        try:
            client.snapshot(state=state.at(step), step=step)
        except CkptdError as exc:
            print(f"REFUSED {step} {type(exc).__name__}: {exc}", flush=True)
        else:
            print(f"RETURNED {step}", flush=True)
        step += 1
        time.sleep(rng.uniform(0, a.max_sleep_ms / 1000))


def load_loop(a: argparse.Namespace) -> None:
    state = SteppedState(a.seed, a.mbytes, a.regions)
    client = Client(
        a.job,
        socket=a.socket,
        root=a.root,
        spawn=False,
        strict=False,
        slots=2,
        retention={"keep_last": a.keep_last},
        timeout_s=120,
    )
    recorder = Recorder(Path(a.committed))
    go = Path(a.go)
    print("READY", flush=True)
    while not go.exists():
        time.sleep(0.02)
    pending: deque[PendingSnapshot] = deque()
    step = 1
    deadline = time.monotonic() + a.seconds
    while time.monotonic() < deadline:
        pending.append(client.snapshot(state=state.at(step), step=step))
        step += 1
        while pending and (pending[0].done() or len(pending) > 2):
            recorder.settle(pending.popleft())
    while pending:
        recorder.settle(pending.popleft(), timeout_s=600)
    client.close()
    print(
        f"DONE snapshots={step - 1} committed={recorder.committed} failed={recorder.failed} "
        f"stuck={recorder.stuck} blocked={client.stats['blocked']} "
        f"blocked_s={client.stats['blocked_s']:.3f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tests.reliability.trainers")
    modes = parser.add_subparsers(dest="mode", required=True)
    for name in ("committed", "returned", "load"):
        p = modes.add_parser(name)
        p.add_argument("socket")
        p.add_argument("root")
        p.add_argument("job")
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--mbytes", type=float, required=True)
        p.add_argument("--regions", type=int, required=True)
        p.add_argument("--first-step", type=int, default=1)
        if name in ("committed", "load"):
            p.add_argument("--keep-last", type=int, required=True)
            p.add_argument("--committed", required=True)
        if name == "committed":
            p.add_argument("--stop", required=True)
        if name == "returned":
            p.add_argument("--max-sleep-ms", type=float, default=20.0)
        if name == "load":
            p.add_argument("--go", required=True)
            p.add_argument("--seconds", type=float, required=True)
    a = parser.parse_args(argv)
    {"committed": committed_loop, "returned": returned_loop, "load": load_loop}[a.mode](a)


if __name__ == "__main__":
    main()
