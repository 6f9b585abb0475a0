"""The budget the writes side by side share (:class:`ckptd.pipeline.write.InflightBudget`): never
more bytes or chunks in flight than it allows, each write at most its share (bytes and threads),
when bytes run short the write running the fewest chunks first (ties: arrival order), and two
writes through one small budget both commit intact."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptd.format.restore import load_checkpoint
from ckptd.format.skeleton import flatten
from ckptd.format.store import Store
from ckptd.pipeline.plan import PipelineConfig, tensor_source
from ckptd.pipeline.write import INFLIGHT_FACTOR, InflightBudget, Share, write_checkpoint

HANG_S = 30.0
"""Only stops a hang: nothing here is timed."""


def acquire_in_thread(share: Share, nbytes: int) -> tuple[threading.Thread, threading.Event]:
    got = threading.Event()

    def run() -> None:
        share.acquire(nbytes)
        got.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


def wait_waiting(budget: InflightBudget, n: int) -> None:
    """Until ``n`` acquires wait in ``budget`` (its queue, read under its lock)."""
    with budget._cv:
        assert budget._cv.wait_for(lambda: len(budget._waiting) == n, HANG_S)


def test_a_share_is_capped_while_the_budget_has_room_for_another_write() -> None:
    budget = InflightBudget(100, shares=2)
    with budget.share() as big, budget.share() as small:
        assert big.acquire(30) == 30
        assert big.acquire(20) == 20  # 50: its share is full
        thread, got = acquire_in_thread(big, 10)
        wait_waiting(budget, 1)
        assert not got.is_set()
        assert small.acquire(30) == 30  # the other write does not wait behind it
        assert budget.in_use_bytes == 80
        big.release(30)
        thread.join(HANG_S)
        assert got.is_set() and budget.in_use_bytes == 60
        big.release(30)
        small.release(30)
    assert budget.in_use_bytes == 0


def test_one_chunk_is_always_allowed_and_one_larger_than_the_budget_runs_alone() -> None:
    budget = InflightBudget(100, shares=4)  # a share is 25 bytes
    with budget.share() as a, budget.share() as b:
        assert a.acquire(60) == 60  # over its share, but it holds nothing yet
        thread, got = acquire_in_thread(b, 500)
        wait_waiting(budget, 1)
        a.release(60)
        thread.join(HANG_S)
        assert got.is_set() and budget.in_use_bytes == 100  # counted as the whole budget
        b.release(100)


def test_waiting_writes_take_turns_in_arrival_order() -> None:
    budget = InflightBudget(10, shares=1)
    grants: list[str] = []
    lock = threading.Lock()
    with budget.share() as holder, budget.share() as a, budget.share() as b:
        holder.acquire(10)

        def take(name: str, share: Share, times: int) -> None:
            for _ in range(times):
                share.acquire(10)
                with lock:
                    grants.append(name)
                share.release(10)

        ta = threading.Thread(target=take, args=("a", a, 3), daemon=True)
        ta.start()
        wait_waiting(budget, 1)
        tb = threading.Thread(target=take, args=("b", b, 3), daemon=True)
        tb.start()
        wait_waiting(budget, 2)
        holder.release(10)
        ta.join(HANG_S)
        tb.join(HANG_S)
    assert grants[:2] == ["a", "b"]
    assert sorted(grants) == ["a"] * 3 + ["b"] * 3


def test_a_write_that_arrives_runs_on_threads_of_its_own() -> None:
    budget = InflightBudget(1000, shares=2, chunks_per_share=3)  # 3 threads a write
    with budget.share() as big, budget.share() as small:
        for _ in range(3):
            big.acquire(10)
        thread, got = acquire_in_thread(big, 10)
        wait_waiting(budget, 1)
        assert not got.is_set()  # its 4th chunk waits for one of its own
        assert [small.acquire(10) for _ in range(3)] == [10, 10, 10]  # granted at once
        assert (big.chunks, small.chunks, budget.in_use_chunks) == (3, 3, 6)
        big.release(10)
        thread.join(HANG_S)
        assert got.is_set() and big.chunks == 3
        for share in (big, small):
            for _ in range(3):
                share.release(10)
    assert (budget.in_use_bytes, budget.in_use_chunks) == (0, 0)


def test_when_bytes_run_short_the_write_running_the_fewest_chunks_goes_first() -> None:
    budget = InflightBudget(40, shares=2)  # 20 bytes a write; a third write beside them
    with budget.share() as a, budget.share() as b, budget.share() as c:
        for share, n in ((a, 3), (b, 4), (c, 1)):
            for _ in range(n):
                share.acquire(5)
        assert budget.in_use_bytes == 40
        a_thread, a_got = acquire_in_thread(a, 5)  # a asks first (3 chunks)
        wait_waiting(budget, 1)
        c_thread, c_got = acquire_in_thread(c, 5)  # c runs 1 chunk
        wait_waiting(budget, 2)
        b.release(5)
        c_thread.join(HANG_S)
        assert c_got.is_set() and not a_got.is_set()
        b.release(5)
        a_thread.join(HANG_S)
        assert a_got.is_set() and (a.chunks, b.chunks, c.chunks) == (4, 2, 2)
        for share, n in ((a, 4), (b, 2), (c, 2)):
            for _ in range(n):
                share.release(5)
    assert (budget.in_use_bytes, budget.in_use_chunks) == (0, 0)


def test_many_writers_never_exceed_the_capacity() -> None:
    capacity = 64
    budget = InflightBudget(capacity, shares=3, chunks_per_share=2)
    peak = [0, 0]
    guard = threading.Lock()

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with budget.share() as share:
            for _ in range(200):
                n = share.acquire(int(rng.integers(1, 40)))
                with guard:
                    peak[0] = max(peak[0], budget.in_use_bytes)
                    peak[1] = max(peak[1], budget.in_use_chunks)
                    assert share.held <= max(n, capacity // 3) and share.chunks <= 2
                share.release(n)

    with ThreadPoolExecutor(6) as pool:
        for fut in [pool.submit(writer, seed) for seed in range(6)]:
            fut.result(HANG_S)
    assert 0 < peak[0] <= capacity and 0 < peak[1] <= 6
    assert (budget.in_use_bytes, budget.in_use_chunks) == (0, 0)


def test_configure_applies_to_the_next_grant() -> None:
    budget = InflightBudget(10, shares=1)
    with budget.share() as a, budget.share() as b:
        a.acquire(10)
        thread, got = acquire_in_thread(b, 10)
        wait_waiting(budget, 1)
        budget.configure(20, shares=1)
        thread.join(HANG_S)
        assert got.is_set() and budget.in_use_bytes == 20
        a.release(10)
        b.release(10)


@pytest.mark.parametrize("threads", [1, 3])
def test_two_writes_through_one_small_budget_both_commit(tmp_path: Path, threads: int) -> None:
    config = PipelineConfig(chunk_bytes=64 << 10, pack_bytes=4 << 10, threads=threads)
    budget = InflightBudget(INFLIGHT_FACTOR * (64 << 10) * 2, shares=2, chunks_per_share=threads)
    store = Store(tmp_path)
    g = torch.Generator().manual_seed(0)
    states = {job: {"w": torch.randn(300_000, generator=g)} for job in ("one", "two")}

    def write(job: str) -> None:
        flat = flatten(states[job])
        sources = [tensor_source(p, t) for p, t in zip(flat.paths, flat.tensors, strict=True)]
        write_checkpoint(
            store, job, 1, flat.skeleton, sources, config=config, executor=chunk_pool, budget=budget
        )

    with ThreadPoolExecutor(threads) as chunk_pool, ThreadPoolExecutor(2) as writers:
        for fut in [writers.submit(write, job) for job in states]:
            fut.result(HANG_S)
    assert budget.in_use_bytes == 0
    for job, state in states.items():
        assert torch.equal(load_checkpoint(store, job, 1).state["w"], state["w"])
