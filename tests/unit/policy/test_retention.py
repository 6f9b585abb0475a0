"""Retention rules, table-driven: :func:`decide` for each rule and their combinations,
:func:`deletable`, the validation of retention tables (key paths in every message) and the
precedence of ``[retention]`` < the policy a client recorded < ``[jobs.NAME.retention]``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from ckptd.config import Config, config_from_dict, load_config
from ckptd.errors import ConfigError
from ckptd.policy.retention import (
    CheckpointFacts,
    RetentionPolicy,
    decide,
    deletable,
    policy_from_dict,
    policy_to_dict,
)
from ckptd_client import Client

NAN = math.nan
INF = math.inf

Row = tuple[int, float | None, bool, dict[str, int]]
"""(step, metric, pinned, {object hash: stored bytes})"""


def facts(rows: list[Row]) -> list[CheckpointFacts]:
    return [CheckpointFacts(step, metric, pinned, objs) for step, metric, pinned, objs in rows]


def plain(*steps: int) -> list[Row]:
    """Checkpoints with no metric, no pin and one object of their own each."""
    return [(s, None, False, {f"o{s}": 10}) for s in steps]


def metrics(values: dict[int, float | None]) -> list[Row]:
    return [(s, m, False, {f"o{s}": 10}) for s, m in values.items()]


DECIDE_CASES = [
    # ---- no policy -------------------------------------------------------------------------
    pytest.param(RetentionPolicy(), [], {}, id="no-checkpoints"),
    pytest.param(
        RetentionPolicy(),
        plain(1, 2, 3),
        {3: ["newest", "no policy"], 2: ["no policy"], 1: ["no policy"]},
        id="no-policy-keeps-all",
    ),
    pytest.param(
        RetentionPolicy(mode="max"),
        plain(1, 2),
        {2: ["newest", "no policy"], 1: ["no policy"]},
        id="mode-alone-is-no-policy",
    ),
    pytest.param(
        RetentionPolicy(),
        [(1, None, True, {"a": 1}), (2, None, False, {"b": 1})],
        {2: ["newest", "no policy"], 1: ["pinned", "no policy"]},
        id="no-policy-with-pin",
    ),
    # ---- keep_last -------------------------------------------------------------------------
    pytest.param(
        RetentionPolicy(keep_last=2),
        plain(1, 2, 3, 4),
        {4: ["newest", "last 2"], 3: ["last 2"], 2: [], 1: []},
        id="keep_last",
    ),
    pytest.param(
        RetentionPolicy(keep_last=2),
        plain(30, 10, 40, 20),
        {40: ["newest", "last 2"], 30: ["last 2"], 20: [], 10: []},
        id="keep_last-unsorted-input-orders-by-step",
    ),
    pytest.param(
        RetentionPolicy(keep_last=5),
        plain(1, 2),
        {2: ["newest", "last 5"], 1: ["last 5"]},
        id="keep_last-more-than-exist",
    ),
    pytest.param(
        RetentionPolicy(keep_last=3),
        plain(7),
        {7: ["newest", "last 3"]},
        id="keep_last-single-checkpoint",
    ),
    # ---- keep_every ------------------------------------------------------------------------
    pytest.param(
        RetentionPolicy(keep_every=3),
        plain(0, 2, 3, 5, 6, 7),
        {7: ["newest"], 6: ["every 3"], 5: [], 3: ["every 3"], 2: [], 0: ["every 3"]},
        id="keep_every-includes-step-0",
    ),
    pytest.param(
        RetentionPolicy(keep_every=10),
        plain(10, 15, 20),
        {20: ["newest", "every 10"], 15: [], 10: ["every 10"]},
        id="keep_every-newest-divisible",
    ),
    # ---- keep_best -------------------------------------------------------------------------
    pytest.param(
        RetentionPolicy(keep_best=2),
        metrics({1: None, 2: NAN, 3: 0.3, 4: -INF, 5: 0.1, 6: 0.2}),
        {
            6: ["newest", "best 2 (min metric)"],
            5: ["best 2 (min metric)"],
            4: [],
            3: [],
            2: [],
            1: [],
        },
        id="keep_best-min-none-nan-inf-never-best",
    ),
    pytest.param(
        RetentionPolicy(keep_best=1, mode="max"),
        metrics({1: 0.5, 2: INF, 3: 0.7, 4: None, 5: 0.6, 6: NAN}),
        {6: ["newest"], 5: [], 4: [], 3: ["best 1 (max metric)"], 2: [], 1: []},
        id="keep_best-max",
    ),
    pytest.param(
        RetentionPolicy(keep_best=2),
        metrics({1: 0.1, 2: 0.1, 3: 0.1, 4: 0.5}),
        {4: ["newest"], 3: ["best 2 (min metric)"], 2: ["best 2 (min metric)"], 1: []},
        id="keep_best-ties-newer-wins-min",
    ),
    pytest.param(
        RetentionPolicy(keep_best=1, mode="max"),
        metrics({1: 2.0, 2: 2.0, 3: 1.0}),
        {3: ["newest"], 2: ["best 1 (max metric)"], 1: []},
        id="keep_best-ties-newer-wins-max",
    ),
    pytest.param(
        RetentionPolicy(keep_best=1),
        metrics({1: 0.0, 2: -0.0, 3: 1.0}),
        {3: ["newest"], 2: ["best 1 (min metric)"], 1: []},
        id="keep_best-zero-and-negative-zero-tie",
    ),
    pytest.param(
        RetentionPolicy(keep_best=1, mode="max"),
        metrics({1: -5.0, 2: -3.0, 3: None}),
        {3: ["newest"], 2: ["best 1 (max metric)"], 1: []},
        id="keep_best-max-negative-metrics",
    ),
    pytest.param(
        RetentionPolicy(keep_best=5),
        metrics({1: 3.0, 2: None, 3: 1.0, 4: NAN}),
        {4: ["newest"], 3: ["best 5 (min metric)"], 2: [], 1: ["best 5 (min metric)"]},
        id="keep_best-more-than-scored",
    ),
    pytest.param(
        RetentionPolicy(keep_best=2),
        metrics({1: None, 2: NAN, 3: None}),
        {3: ["newest"], 2: [], 1: []},
        id="keep_best-nothing-scored",
    ),
    # ---- max_bytes -------------------------------------------------------------------------
    pytest.param(
        RetentionPolicy(max_bytes=300),
        [
            (1, None, False, {"a": 100, "b": 100}),
            (2, None, False, {"a": 100, "c": 100}),
            (3, None, False, {"a": 100, "d": 100}),
        ],
        {3: ["newest", "within max_bytes"], 2: ["within max_bytes"], 1: []},
        id="max_bytes-shared-objects-counted-once",
    ),
    pytest.param(
        RetentionPolicy(max_bytes=100),
        [(s, None, False, {"same": 100}) for s in (1, 2, 3)],
        {3: ["newest", "within max_bytes"], 2: ["within max_bytes"], 1: ["within max_bytes"]},
        id="max_bytes-identical-checkpoints-cost-once",
    ),
    pytest.param(
        RetentionPolicy(max_bytes=299),
        [
            (1, None, False, {"a": 100, "b": 100}),
            (2, None, False, {"a": 100, "c": 100}),
            (3, None, False, {"a": 100, "d": 100}),
        ],
        {3: ["newest", "within max_bytes"], 2: [], 1: []},
        id="max_bytes-one-byte-short",
    ),
    pytest.param(
        RetentionPolicy(max_bytes=500),
        [
            (1, None, False, {"small": 10}),
            (2, None, False, {"big": 1000}),
            (3, None, False, {"new": 100}),
        ],
        {3: ["newest", "within max_bytes"], 2: [], 1: []},
        id="max_bytes-stops-at-first-that-does-not-fit",
    ),
    pytest.param(
        RetentionPolicy(max_bytes=500),
        [(1, None, False, {"y": 10}), (2, None, False, {"x": 1000})],
        {2: ["newest"], 1: []},
        id="max_bytes-newest-over-budget-still-kept",
    ),
    # ---- pins --------------------------------------------------------------------------------
    pytest.param(
        RetentionPolicy(keep_last=1),
        [(1, None, True, {"a": 1}), (2, None, False, {"b": 1}), (3, None, True, {"c": 1})],
        {3: ["newest", "pinned", "last 1"], 2: [], 1: ["pinned"]},
        id="pins-with-keep_last",
    ),
    pytest.param(
        RetentionPolicy(max_bytes=1),
        [(1, 0.1, True, {"a": 100}), (2, None, False, {"b": 100})],
        {2: ["newest"], 1: ["pinned"]},
        id="pin-beats-max_bytes",
    ),
    # ---- combinations ----------------------------------------------------------------------
    pytest.param(
        RetentionPolicy(keep_last=1, keep_every=4, keep_best=1, mode="max", max_bytes=250),
        [
            (1, 0.9, True, {"a": 100}),
            (2, 0.5, False, {"a": 100, "b": 100}),
            (4, 0.95, False, {"c": 100}),
            (5, NAN, False, {"c": 100, "d": 100}),
            (6, None, False, {"c": 100, "e": 50}),
        ],
        {
            6: ["newest", "last 1", "within max_bytes"],
            5: ["within max_bytes"],
            4: ["every 4", "best 1 (max metric)", "within max_bytes"],
            2: [],
            1: ["pinned"],
        },
        id="all-rules",
    ),
    pytest.param(
        RetentionPolicy(keep_last=2, keep_every=2),
        plain(1, 2, 3, 4, 5, 6),
        {6: ["newest", "last 2", "every 2"], 5: ["last 2"], 4: ["every 2"], 3: [], 2: ["every 2"]}
        | {1: []},
        id="keep_last-and-keep_every",
    ),
    pytest.param(
        RetentionPolicy(keep_last=1, keep_best=1),
        metrics({1: 0.5, 2: 0.1, 3: 0.9}),
        {3: ["newest", "last 1"], 2: ["best 1 (min metric)"], 1: []},
        id="keep_last-and-keep_best",
    ),
    pytest.param(
        RetentionPolicy(keep_every=2, keep_best=1, mode="max"),
        [(2, 9.0, True, {"a": 1}), (3, 1.0, False, {"b": 1})],
        {3: ["newest"], 2: ["pinned", "every 2", "best 1 (max metric)"]},
        id="reasons-in-fixed-order",
    ),
]


@pytest.mark.parametrize(("policy", "rows", "expected"), DECIDE_CASES)
def test_decide(policy: RetentionPolicy, rows: list[Row], expected: dict[int, list[str]]) -> None:
    got = decide(policy, facts(rows))
    assert got == expected
    assert deletable(got) == sorted(s for s, why in expected.items() if not why)
    if rows:  # whatever the policy: the newest checkpoint is never deletable
        assert max(s for s, *_ in rows) not in deletable(got)


@pytest.mark.parametrize(
    ("reasons", "expected"),
    [
        pytest.param({}, [], id="empty"),
        pytest.param({9: [], 3: ["pinned"], 1: [], 5: []}, [1, 5, 9], id="oldest-first"),
        pytest.param({4: ["newest"], 2: ["last 2"]}, [], id="all-kept"),
    ],
)
def test_deletable(reasons: dict[int, list[str]], expected: list[int]) -> None:
    assert deletable(reasons) == expected


def test_decide_does_not_depend_on_input_order() -> None:
    rows: list[Row] = [
        (s, m, p, {f"o{s}": 10, "shared": 5})
        for s, m, p in [(5, 0.2, False), (1, 0.1, True), (9, None, False), (3, 0.3, False)]
    ]
    policy = RetentionPolicy(keep_last=1, keep_best=1, max_bytes=25)
    assert decide(policy, facts(rows)) == decide(policy, facts(list(reversed(rows))))


# ---- validation ----------------------------------------------------------------------------------

RETENTION_KEYS_TEXT = "retention keys are keep_last, keep_every, keep_best, mode, max_bytes"

INVALID_POLICIES = [
    pytest.param(
        {"keep_last": 0}, "retention", "retention.keep_last: expected an integer >= 1, got 0"
    ),
    pytest.param(
        {"keep_last": -2}, "retention", "retention.keep_last: expected an integer >= 1, got -2"
    ),
    pytest.param(
        {"keep_every": True},
        "retention",
        "retention.keep_every: expected an integer >= 1, got True",
    ),
    pytest.param(
        {"keep_best": 1.5}, "retention", "retention.keep_best: expected an integer >= 1, got 1.5"
    ),
    pytest.param(
        {"keep_last": "3"}, "retention", "retention.keep_last: expected an integer >= 1, got '3'"
    ),
    pytest.param(
        {"mode": "median"}, "retention", 'retention.mode: expected "min" or "max", got \'median\''
    ),
    pytest.param({"mode": None}, "retention", 'retention.mode: expected "min" or "max", got None'),
    pytest.param(
        {"max_bytes": "lots"},
        "retention",
        "retention.max_bytes: expected a size in bytes (an integer, or a string such as "
        "\"8MiB\"), got 'lots'",
    ),
    pytest.param(
        {"max_bytes": 1.5},
        "retention",
        "retention.max_bytes: expected a size in bytes (an integer, or a string such as "
        '"8MiB"), got 1.5',
    ),
    pytest.param(
        {"max_bytes": 0}, "retention", "retention.max_bytes: expected a size >= 1 byte, got 0"
    ),
    pytest.param(
        {"max_bytes": -1}, "retention", "retention.max_bytes: expected a size >= 1 byte, got -1"
    ),
    pytest.param(
        {"max_bytes": "0.4B"},
        "retention",
        "retention.max_bytes: expected a size >= 1 byte, got '0.4B'",
    ),
    pytest.param(
        {"keep_latest": 3},
        "retention",
        f"retention.keep_latest: unknown key; {RETENTION_KEYS_TEXT}",
    ),
    pytest.param(
        {"zzz": 1, "aaa": 2, "keep_last": 1},
        "retention",
        f"retention.aaa: unknown key; {RETENTION_KEYS_TEXT}",
    ),
    pytest.param(
        {"keep_best": 0},
        "jobs.train.retention",
        "jobs.train.retention.keep_best: expected an integer >= 1, got 0",
    ),
    pytest.param(
        {"mode": "MAX"},
        "Client(retention=...)",
        'Client(retention=...).mode: expected "min" or "max", got \'MAX\'',
    ),
]


@pytest.mark.parametrize(("doc", "where", "message"), INVALID_POLICIES)
def test_policy_from_dict_rejects(doc: dict[str, Any], where: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy_from_dict(doc, where)
    assert info.type is ConfigError
    assert str(info.value) == message


VALID_POLICIES = [
    pytest.param({}, RetentionPolicy(), set(), id="empty"),
    pytest.param({"keep_last": 3}, RetentionPolicy(keep_last=3), {"keep_last"}, id="keep_last"),
    pytest.param(
        {"keep_best": 2, "mode": "max"},
        RetentionPolicy(keep_best=2, mode="max"),
        {"keep_best", "mode"},
        id="keep_best-max",
    ),
    pytest.param(
        {"max_bytes": "1.5KiB", "keep_every": 100},
        RetentionPolicy(keep_every=100, max_bytes=1536),
        {"keep_every", "max_bytes"},
        id="size-string",
    ),
    pytest.param(
        {"max_bytes": "2MB"}, RetentionPolicy(max_bytes=2_000_000), {"max_bytes"}, id="SI-size"
    ),
    pytest.param({"max_bytes": 1}, RetentionPolicy(max_bytes=1), {"max_bytes"}, id="one-byte"),
]


@pytest.mark.parametrize(("doc", "expected", "explicit"), VALID_POLICIES)
def test_policy_from_dict_accepts(
    doc: dict[str, Any], expected: RetentionPolicy, explicit: set[str]
) -> None:
    policy = policy_from_dict(doc, "retention")
    assert policy == expected
    assert policy.explicit == explicit
    assert policy.configured == any(k != "mode" for k in explicit)
    assert policy_from_dict(policy_to_dict(policy), "again") == policy


INVALID_CONFIGS = [
    pytest.param(
        {"retention": {"keep_last": 0}},
        "retention.keep_last: expected an integer >= 1, got 0",
        id="retention",
    ),
    pytest.param(
        {"retention": {"keep": 1}},
        f"retention.keep: unknown key; {RETENTION_KEYS_TEXT}",
        id="retention-unknown",
    ),
    pytest.param(
        {"retention": 3}, "retention: expected a table [retention], got 3", id="retention-scalar"
    ),
    pytest.param(
        {"jobs": {"train": {"retention": {"mode": "best"}}}},
        'jobs.train.retention.mode: expected "min" or "max", got \'best\'',
        id="jobs-retention",
    ),
    pytest.param(
        {"jobs": {"train": {"retention": {"max_bytes": "1 lb"}}}},
        "jobs.train.retention.max_bytes: expected a size in bytes",
        id="jobs-retention-size",
    ),
    pytest.param(
        {"jobs": {"train": {"retain": {}}}},
        "jobs.train.retain: unknown key; known keys in [jobs.train]: retention",
        id="jobs-unknown-table",
    ),
    pytest.param(
        {"jobs": {"train": 3}},
        "jobs.train: expected a table [jobs.train.retention]",
        id="jobs-not-a-table",
    ),
    pytest.param(
        {"jobs": {"train": {"retention": 5}}},
        "jobs.train.retention: expected a table, got 5",
        id="jobs-retention-not-a-table",
    ),
    pytest.param(
        {"jobs": {"../evil": {"retention": {"keep_last": 1}}}},
        "jobs.../evil: invalid job name '../evil'",
        id="jobs-bad-name",
    ),
    pytest.param(
        {"disk": {"min_free_percent": 100}},
        "disk.min_free_percent: expected a number in [0, 100), got 100",
        id="disk-percent",
    ),
    pytest.param(
        {"disk": {"min_free_bytes": "plenty"}},
        "disk.min_free_bytes: expected a size in bytes",
        id="disk-bytes",
    ),
    pytest.param(
        {"disk": {"min_free": 1}},
        "disk.min_free: unknown key; known keys in [disk]: min_free_bytes, min_free_percent",
        id="disk-unknown",
    ),
]


@pytest.mark.parametrize(("doc", "message"), INVALID_CONFIGS)
def test_config_rejects_bad_retention_and_disk(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(doc)
    assert info.type is ConfigError
    assert str(info.value).startswith(message), str(info.value)


def test_config_file_error_names_file_and_key_path(tmp_path: Path) -> None:
    path = tmp_path / "ckptd.toml"
    path.write_text('[jobs.train.retention]\nkeep_last = 2\nmode = "largest"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f'config file {path}: jobs.train.retention.mode: expected "min" or "max", got \'largest\''
    )


def test_config_parses_disk_and_retention(tmp_path: Path) -> None:
    path = tmp_path / "ckptd.toml"
    path.write_text(
        '[disk]\nmin_free_bytes = "4MiB"\nmin_free_percent = 2.5\n'
        '[retention]\nkeep_last = 3\nmax_bytes = "1GiB"\n'
        '[jobs.train.retention]\nkeep_best = 2\nmode = "max"\n'
    )
    cfg = load_config(path)
    assert cfg.disk.min_free_bytes == 4 << 20
    assert cfg.disk.min_free_percent == 2.5
    assert cfg.retention == RetentionPolicy(keep_last=3, max_bytes=1 << 30)
    assert cfg.jobs == {"train": RetentionPolicy(keep_best=2, mode="max")}


def test_config_defaults_have_no_retention_and_a_1gib_guard() -> None:
    cfg = config_from_dict({})
    assert cfg.disk.min_free_bytes == 1 << 30
    assert cfg.disk.min_free_percent == 0.0
    assert not cfg.retention.configured
    assert cfg.policy_for("any") == RetentionPolicy()


def test_client_validates_retention_before_connecting(root: Path) -> None:
    """The key path names the Client argument; no daemon is contacted (none exists)."""
    with pytest.raises(ConfigError) as info:
        Client(
            "job",
            socket=root / "no-daemon.sock",
            root=root,
            spawn=False,
            retention={"keep_last": 2, "keep_best": -1},
        )
    assert info.type is ConfigError
    assert str(info.value) == "retention.keep_best: expected an integer >= 1, got -1"


# ---- precedence --------------------------------------------------------------------------------

PRECEDENCE = [
    pytest.param({}, {}, None, "train", RetentionPolicy(), id="nothing"),
    pytest.param({"keep_last": 5}, {}, None, "train", RetentionPolicy(keep_last=5), id="config"),
    pytest.param(
        {"keep_last": 5},
        {},
        {"keep_last": 3},
        "train",
        RetentionPolicy(keep_last=3),
        id="recorded-beats-config",
    ),
    pytest.param(
        {"keep_last": 5, "keep_every": 100},
        {"train": {"keep_last": 7}},
        {"keep_last": 3, "keep_best": 2},
        "train",
        RetentionPolicy(keep_last=7, keep_every=100, keep_best=2),
        id="job-table-beats-recorded-rule-by-rule",
    ),
    pytest.param(
        {"keep_last": 5, "keep_every": 100},
        {"train": {"keep_last": 7}},
        {"keep_last": 3, "keep_best": 2},
        "other",
        RetentionPolicy(keep_last=3, keep_every=100, keep_best=2),
        id="job-table-of-another-job-ignored",
    ),
    pytest.param(
        {"keep_best": 2, "mode": "max"},
        {},
        {"keep_best": 4},
        "train",
        RetentionPolicy(keep_best=4, mode="max"),
        id="unset-mode-does-not-reset",
    ),
    pytest.param(
        {"keep_best": 2, "mode": "max"},
        {},
        {"mode": "min"},
        "train",
        RetentionPolicy(keep_best=2, mode="min"),
        id="recorded-mode-overrides",
    ),
    pytest.param(
        {"keep_best": 2},
        {"train": {"mode": "max"}},
        {"mode": "min", "keep_best": 3},
        "train",
        RetentionPolicy(keep_best=3, mode="max"),
        id="job-mode-beats-recorded-mode",
    ),
    pytest.param(
        {"max_bytes": "10MiB"},
        {"train": {"max_bytes": "1MiB"}},
        {"max_bytes": 5},
        "train",
        RetentionPolicy(max_bytes=1 << 20),
        id="max_bytes",
    ),
    pytest.param(
        {"keep_last": 5},
        {},
        {"keep_last": 0},
        "train",
        RetentionPolicy(keep_last=5),
        id="damaged-record-falls-back",
    ),
    pytest.param(
        {"keep_last": 5},
        {},
        {"unknown_rule": 1},
        "train",
        RetentionPolicy(keep_last=5),
        id="record-with-unknown-key-falls-back",
    ),
    pytest.param(
        {},
        {"train": {"keep_every": 10}},
        None,
        "train",
        RetentionPolicy(keep_every=10),
        id="job-table-alone",
    ),
    pytest.param({}, {}, {}, "train", RetentionPolicy(), id="empty-record"),
]


@pytest.mark.parametrize(("retention", "jobs", "recorded", "job", "expected"), PRECEDENCE)
def test_policy_for_precedence(
    retention: dict[str, Any],
    jobs: dict[str, dict[str, Any]],
    recorded: dict[str, Any] | None,
    job: str,
    expected: RetentionPolicy,
) -> None:
    cfg = config_from_dict(
        {"retention": retention, "jobs": {name: {"retention": t} for name, t in jobs.items()}}
    )
    assert isinstance(cfg, Config)
    assert cfg.policy_for(job, recorded) == expected
