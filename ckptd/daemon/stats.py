"""The daemon's counters and recent history, for ``ckptd status``.

Loop thread only: the sessions, the admission and the writer update one :class:`Stats`; the
daemon's ``status`` reads it. (Prometheus metrics are :mod:`ckptd.daemon.metrics`.)
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_STATUS_COMMITS = 50
"""``last_commit`` entries ``status`` returns (most recent first); the daemon remembers 4x that."""


@dataclass
class Stats:
    """Counters and recent history for ``ckptd status`` (loop thread only)."""

    started: float = field(default_factory=time.time)
    commits: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    skipped: int = 0
    blocked: int = 0
    blocked_s: float = 0.0
    raw_bytes: int = 0
    written_bytes: int = 0
    persist_s: float = 0.0
    last_commit: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``"<root>:<job>"`` -> the job's last commit, in commit order (oldest first)."""
    recent_errors: deque[str] = field(default_factory=lambda: deque(maxlen=20))

    def record_error(self, text: str) -> None:
        self.recent_errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}")

    def record_commit(
        self,
        root: Path,
        job: str,
        step: int,
        *,
        raw_bytes: int,
        written_bytes: int,
        persist_s: float,
        at: float,
    ) -> None:
        self.commits += 1
        self.raw_bytes += raw_bytes
        self.written_bytes += written_bytes
        self.persist_s += persist_s
        key = f"{root}:{job}"
        self.last_commit.pop(key, None)  # re-inserted last: the dict stays in commit order
        self.last_commit[key] = {"job": job, "step": step, "at": at, "root": str(root)}
        while len(self.last_commit) > 4 * MAX_STATUS_COMMITS:
            del self.last_commit[next(iter(self.last_commit))]
