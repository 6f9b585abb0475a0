"""ckptd.daemon.writer.lower_priority: what the write threads run first (the kernel calls are
the seam; tests/integration/daemon/test_daemon.py checks the real threads of a real daemon)."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from ckptd.daemon.writer import lower_priority


def test_lowers_the_calling_thread_and_caps_at_19(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "getpriority", lambda which, who: 15)
    monkeypatch.setattr(os, "setpriority", lambda *args: calls.append(args))
    lower_priority(10)
    assert calls == [(os.PRIO_PROCESS, threading.get_native_id(), 19)]


def test_zero_leaves_the_priority_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("no priority call expected")

    monkeypatch.setattr(os, "getpriority", refuse)
    monkeypatch.setattr(os, "setpriority", refuse)
    lower_priority(0)


def test_a_refused_setpriority_is_a_warning_and_the_thread_runs_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    with caplog.at_level(logging.WARNING, logger="ckptd.daemon.writer"):
        lower_priority(10)
    assert [r.getMessage() for r in caplog.records] == [
        "could not lower the priority of a write thread by 10: [Errno 1] Operation not permitted"
    ]
