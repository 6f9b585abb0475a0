"""Retention: which checkpoints to keep, and why. Pure functions; deletion happens elsewhere.

A checkpoint is kept if *any* rule keeps it:

=================  =================================================================
rule               keeps
=================  =================================================================
``newest``         the most recently committed checkpoint, always, whatever the policy says
``highest step``   the highest step (what ``step="highest"`` restores), always
``pinned``         checkpoints pinned with ``ckptd pin`` or ``snapshot(pin=True)``
``keep_last``      the N most recently committed
``keep_every``     steps divisible by K, forever
``keep_best``      the N best by the snapshot's ``metric`` (``mode`` "min" or "max"); checkpoints
                   without a finite metric never count as best
``max_bytes``      the newest checkpoints whose objects, shared ones counted once, fit in the budget
``no policy``      everything, when no rule is configured (the disk guard then refuses new
                   snapshots instead of deleting)
=================  =================================================================

:func:`decide` returns, for every step, the list of reasons keeping it (empty: may be deleted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ckptd.errors import ConfigError
from ckptd.units import parse_size

Mode = Literal["min", "max"]


@dataclass(frozen=True)
class RetentionPolicy:
    """Retention rules of one job; ``None`` turns a rule off."""

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    mode: Mode = "min"
    max_bytes: int | None = None

    @property
    def configured(self) -> bool:
        return any(
            v is not None for v in (self.keep_last, self.keep_every, self.keep_best, self.max_bytes)
        )

    def describe(self) -> str:
        parts = [
            f"keep_last={self.keep_last}" if self.keep_last is not None else "",
            f"keep_every={self.keep_every}" if self.keep_every is not None else "",
            f"keep_best={self.keep_best} ({self.mode})" if self.keep_best is not None else "",
            f"max_bytes={self.max_bytes}" if self.max_bytes is not None else "",
        ]
        return ", ".join(p for p in parts if p) or "none (keep everything)"

    def merged(self, override: RetentionPolicy) -> RetentionPolicy:
        """This policy with every rule ``override`` sets taking precedence."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        explicit = override.explicit
        for f in fields(override):
            if f.name in explicit:
                values[f.name] = getattr(override, f.name)
        return RetentionPolicy(**values)

    explicit: frozenset[str] = field(default=frozenset(), compare=False, repr=False)


RETENTION_KEYS = ("keep_last", "keep_every", "keep_best", "mode", "max_bytes")


def policy_from_dict(doc: Mapping[str, Any], where: str) -> RetentionPolicy:
    """Validate a ``[retention]`` table or ``Client(retention=...)``; ``where`` prefixes errors."""
    unknown = sorted(set(doc) - set(RETENTION_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown key; retention keys are {', '.join(RETENTION_KEYS)}"
        )
    values: dict[str, Any] = {}
    for key in ("keep_last", "keep_every", "keep_best"):
        if key in doc:
            v = doc[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {v!r}")
            values[key] = v
    if "mode" in doc:
        if doc["mode"] not in ("min", "max"):
            raise ConfigError(f'{where}.mode: expected "min" or "max", got {doc["mode"]!r}')
        values["mode"] = doc["mode"]
    if "max_bytes" in doc:
        size = parse_size(doc["max_bytes"], f"{where}.max_bytes")
        if size < 1:
            raise ConfigError(
                f"{where}.max_bytes: expected a size >= 1 byte, got {doc['max_bytes']!r}"
            )
        values["max_bytes"] = size
    return RetentionPolicy(**values, explicit=frozenset(values))


def policy_to_dict(policy: RetentionPolicy) -> dict[str, Any]:
    """The explicitly set rules, as a dict :func:`policy_from_dict` accepts."""
    return {k: getattr(policy, k) for k in RETENTION_KEYS if k in policy.explicit}


@dataclass(frozen=True)
class CheckpointFacts:
    """What retention needs to know about one checkpoint."""

    step: int
    metric: float | None = None
    pinned: bool = False
    objects: Mapping[str, int] = field(default_factory=dict)
    """object hash -> stored bytes"""
    created: str = ""
    """commit time (ISO 8601 UTC, sorts as text); "" when unknown (then steps order)"""
    seq: int = 0
    """the job's commit sequence number (what ``latest`` follows); 0 for old manifests"""


def commit_order(c: CheckpointFacts) -> tuple[int, str, int]:
    """Sort key, oldest commit first: the commit sequence number, which is what ``latest``
    means (a wall clock that steps back, or two writers racing for the commit lock, cannot
    reorder it), then the commit time and the step for checkpoints written before it existed."""
    return (c.seq, c.created, c.step)


def decide(policy: RetentionPolicy, checkpoints: Sequence[CheckpointFacts]) -> dict[int, list[str]]:
    """For each step, the rules that keep it (in a fixed order); an empty list may be deleted."""
    # Newest commit first: a run resumed from an older step commits steps below the
    # highest one, and those are its newest checkpoints.
    ordered = sorted(checkpoints, key=commit_order, reverse=True)
    reasons: dict[int, list[str]] = {c.step: [] for c in ordered}
    if not ordered:
        return reasons
    reasons[ordered[0].step].append("newest")
    latest = max(c.step for c in ordered)
    if latest != ordered[0].step:
        reasons[latest].append("highest step")
    for c in ordered:
        if c.pinned:
            reasons[c.step].append("pinned")
    if not policy.configured:
        for c in ordered:
            reasons[c.step].append("no policy")
        return reasons
    if policy.keep_last is not None:
        for c in ordered[: policy.keep_last]:
            reasons[c.step].append(f"last {policy.keep_last}")
    if policy.keep_every is not None:
        for c in ordered:
            if c.step % policy.keep_every == 0:
                reasons[c.step].append(f"every {policy.keep_every}")
    if policy.keep_best is not None:
        scored = [c for c in ordered if c.metric is not None and math.isfinite(c.metric)]
        sign = 1.0 if policy.mode == "min" else -1.0
        # Ties: the newer checkpoint wins (ordered is newest first and sorted() is stable).
        best = sorted(scored, key=lambda c: sign * (c.metric or 0.0))[: policy.keep_best]
        for c in best:
            reasons[c.step].append(f"best {policy.keep_best} ({policy.mode} metric)")
    if policy.max_bytes is not None:
        used: set[str] = set()
        total = 0
        for c in ordered:
            extra = sum(size for h, size in c.objects.items() if h not in used)
            if total + extra > policy.max_bytes:
                break
            total += extra
            used.update(c.objects)
            reasons[c.step].append("within max_bytes")
    return reasons


def deletable(reasons: Mapping[int, list[str]]) -> list[int]:
    """Steps no rule keeps, oldest first (the order deletion should take)."""
    return sorted(step for step, why in reasons.items() if not why)
