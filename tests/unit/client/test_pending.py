"""PendingSnapshot's done-callbacks: run once, before ``done()`` and ``wait()`` see the outcome,
right away when added late, on whichever thread settles the handle; a failing one is logged."""

from __future__ import annotations

import logging
import threading

import pytest

from ckptd.errors import SnapshotFailedError
from ckptd_client.pending import CheckpointInfo, PendingSnapshot

INFO = CheckpointInfo("job", 3, "/r/job/manifests/step-3.json", 10, 8, 8, 0.0, 0.1)


def test_callbacks_run_before_done_and_once() -> None:
    handle = PendingSnapshot("job", 3)
    seen: list[tuple[bool, int | None]] = []

    def first(h: PendingSnapshot) -> None:
        seen.append((h.done(), h.error is None and h.step))

    handle.add_done_callback(first)
    waiter_saw: list[list[tuple[bool, int | None]]] = []

    def wait() -> None:
        handle.wait(10)
        waiter_saw.append(list(seen))

    waiter = threading.Thread(target=wait)
    waiter.start()
    handle._resolve(INFO)
    waiter.join(10)
    assert seen == [(False, 3)], "the callback ran once, before done()"
    assert waiter_saw == [[(False, 3)]], "wait() returned after the callback"
    handle._reject(SnapshotFailedError("late"))  # settled already: nothing changes
    assert seen == [(False, 3)] and handle.error is None
    late: list[bool] = []
    handle.add_done_callback(lambda h: late.append(h.done()))
    assert late == [True], "a callback added after settling runs at once"


def test_rejection_reaches_callbacks_and_failures_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handle = PendingSnapshot("job", 4)
    errors: list[object] = []

    def boom(_h: PendingSnapshot) -> None:
        raise RuntimeError("callback bug")

    handle.add_done_callback(boom)
    handle.add_done_callback(lambda h: errors.append(h.error))
    with caplog.at_level(logging.ERROR, logger="ckptd_client.pending"):
        handle._reject(SnapshotFailedError("disk full"))
    assert [str(e) for e in errors] == ["disk full"], "the next callback still ran"
    assert "done-callback" in caplog.text and "callback bug" in caplog.text
    with pytest.raises(SnapshotFailedError, match="disk full"):
        handle.wait(0)


def test_a_callback_raising_base_exception_still_settles_the_handle() -> None:
    handle = PendingSnapshot("job", 5)

    def stop(_h: PendingSnapshot) -> None:
        raise SystemExit(3)

    handle.add_done_callback(stop)
    with pytest.raises(SystemExit):
        handle._resolve(INFO)
    assert handle.done() and handle.wait(0).step == 3  # waiters are not left hanging
