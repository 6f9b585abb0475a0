"""``[tier]`` and ``[jobs.NAME.tier]``: every key validated with its key path in the error, a job's
table merged over ``[tier]``, ``enabled = false``, ``tier_settings_for`` for readers, and
``parse_url``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ckptd.config import Config, TierConfig, config_from_dict, load_config, tier_settings_for
from ckptd.errors import ConfigError, TierError
from ckptd.policy.retention import RetentionPolicy
from ckptd.tier.remote import TierSettings, TierUrl, parse_url

URL = "s3://bucket/team/ckpt"


def tier(**keys: Any) -> dict[str, Any]:
    return {"url": URL, **keys}


def test_url_alone_means_the_defaults() -> None:
    cfg = config_from_dict({"tier": {"url": URL}})
    expected = TierConfig(settings=TierSettings(url=TierUrl("bucket", "team/ckpt")))
    assert cfg.tier == expected
    assert expected.settings == TierSettings(
        url=TierUrl("bucket", "team/ckpt"),
        endpoint=None,
        region=None,
        concurrency=8,
        bandwidth=None,
        timeout_s=60.0,
    )
    assert expected.retention == RetentionPolicy() and expected.retry_max_s == 300.0
    assert cfg.tier_for("any-job") == expected and cfg.tiers() == [expected]
    assert cfg.tier is not None and cfg.tier.url == TierUrl("bucket", "team/ckpt")


def test_no_tier_table_means_no_tier() -> None:
    docs: list[dict[str, Any]] = [{}, {"tier": {}}, {"tier": {"enabled": False, "url": URL}}]
    for doc in docs:
        cfg = config_from_dict(doc)
        assert cfg.tier is None and cfg.tier_for("run") is None and cfg.tiers() == []


def test_every_key_set() -> None:
    cfg = config_from_dict(
        {
            "tier": {
                "url": "s3://my.bucket-1/a/b/",
                "endpoint": "http://127.0.0.1:8333/",
                "region": "eu-west-1",
                "concurrency": 4,
                "bandwidth": "10MiB",
                "timeout": "30s",
                "retry_max": "2m",
                "enabled": True,
                "retention": {"keep_last": 3, "keep_every": 1000},
            }
        }
    )
    assert cfg.tier == TierConfig(
        settings=TierSettings(
            url=TierUrl("my.bucket-1", "a/b"),
            endpoint="http://127.0.0.1:8333",
            region="eu-west-1",
            concurrency=4,
            bandwidth=10 << 20,
            timeout_s=30.0,
        ),
        retention=RetentionPolicy(
            keep_last=3, keep_every=1000, explicit=frozenset({"keep_last", "keep_every"})
        ),
        retry_max_s=120.0,
    )


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"url": None, "concurrency": 2}, "url: missing; set it to the bucket and prefix"),
        ({"url": "bucket/ckpt"}, "url: expected a URL like s3://bucket/prefix, got 'bucket/ckpt'"),
        ({"url": "https://bucket/ckpt"}, "url: expected a URL like s3://bucket/prefix"),
        ({"url": 5}, "url: expected a URL like s3://bucket/prefix, got 5"),
        ({"url": "s3://Bucket/x"}, "url: 's3://Bucket/x': 'Bucket' is not a valid bucket name"),
        ({"url": "s3://bucket/a/../b"}, "url: .*prefix component '..' is not allowed"),
        ({"endpoint": "localhost:9000"}, 'endpoint: expected "http\\(s\\)://host\\[:port\\]"'),
        ({"endpoint": "ftp://host:21"}, "endpoint: .*got 'ftp://host:21'"),
        ({"endpoint": "http://host:9000/path"}, "endpoint: .*got 'http://host:9000/path'"),
        ({"endpoint": 9000}, "endpoint: .*got 9000"),
        ({"region": ""}, "region: expected a region name, got ''"),
        ({"region": 1}, "region: expected a region name, got 1"),
        ({"concurrency": 0}, "concurrency: expected an integer >= 1 and <= 256, got 0"),
        ({"concurrency": 257}, "concurrency: expected an integer >= 1 and <= 256, got 257"),
        ({"concurrency": "8"}, "concurrency: expected an integer >= 1 and <= 256, got '8'"),
        ({"concurrency": True}, "concurrency: expected an integer >= 1 and <= 256, got True"),
        ({"bandwidth": "1KiB"}, "bandwidth: expected bytes per second >= 64KiB, or 0 for no cap"),
        ({"bandwidth": "fast"}, "bandwidth: expected a size in bytes"),
        ({"bandwidth": -1}, "bandwidth: expected bytes per second >= 64KiB, or 0 for no cap"),
        ({"timeout": 0.5}, "timeout: expected at least 1 s, got 0.5"),
        ({"timeout": "soon"}, "timeout: expected a duration"),
        ({"timeout": -5}, "timeout: expected a duration"),
        ({"retry_max": 0}, "retry_max: expected at least 1 s, got 0"),
        ({"retry_max": "forever"}, "retry_max: expected a duration"),
        ({"retention": "keep"}, "retention: expected a table, got 'keep'"),
        ({"retention": {"keep_last": 0}}, "retention.keep_last: expected an integer >= 1, got 0"),
        ({"retention": {"keep": 1}}, "retention.keep: unknown key; retention keys are"),
        ({"enabled": "no"}, "enabled: expected true or false, got 'no'"),
        ({"buckit": "x"}, r"buckit: unknown key; known keys in \[.*tier\]: bandwidth, "),
    ],
)
@pytest.mark.parametrize("where", ["tier", "jobs.run.tier"])
def test_a_bad_key_is_named_with_its_path(keys: dict[str, Any], message: str, where: str) -> None:
    table = {k: v for k, v in tier(**keys).items() if v is not None}
    doc: dict[str, Any] = {"tier": table} if where == "tier" else {"jobs": {"run": {"tier": table}}}
    with pytest.raises(ConfigError, match=f"^{where}\\.{message}"):
        config_from_dict(doc)


def test_tier_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match=r"^tier\b"):
        config_from_dict({"tier": URL})
    with pytest.raises(ConfigError, match=rf"^jobs\.run\.tier: expected a table, got '{URL}'"):
        config_from_dict({"jobs": {"run": {"tier": URL}}})


# ---- per job ------------------------------------------------------------------------------------


def test_a_job_opts_out_with_enabled_false() -> None:
    cfg = config_from_dict(
        {"tier": tier(), "jobs": {"scratch": {"tier": {"enabled": False}}, "other": {}}}
    )
    assert cfg.tier is not None
    assert cfg.tier_for("scratch") is None
    assert cfg.tier_for("other") == cfg.tier == cfg.tier_for("unlisted")
    assert cfg.tiers() == [cfg.tier]


def test_a_job_table_is_merged_over_tier_key_by_key() -> None:
    cfg = config_from_dict(
        {
            "tier": tier(
                endpoint="http://127.0.0.1:9000",
                concurrency=4,
                retry_max="10m",
                retention={"keep_last": 5, "keep_every": 100},
            ),
            "jobs": {
                "big": {
                    "tier": {"url": "s3://other-bucket/big", "retention": {"keep_last": 2}},
                    "retention": {"keep_last": 9},  # local retention: not the tier's
                },
                "same": {"tier": {"bandwidth": "1MiB"}},
            },
        }
    )
    base, big, same = cfg.tier, cfg.tier_for("big"), cfg.tier_for("same")
    assert base is not None and big is not None and same is not None
    assert big.url == TierUrl("other-bucket", "big")
    assert (big.settings.endpoint, big.settings.concurrency, big.retry_max_s) == (
        "http://127.0.0.1:9000",
        4,
        600.0,
    )
    assert (big.retention.keep_last, big.retention.keep_every) == (2, 100)
    assert (base.retention.keep_last, base.retention.keep_every) == (5, 100)
    assert cfg.policy_for("big").keep_last == 9
    assert same.url == base.url and same.settings.bandwidth == 1 << 20
    assert base.settings.bandwidth is None
    # Every tier once, by URL: [tier] and "same" share one.
    assert [str(t.url) for t in cfg.tiers()] == [URL, "s3://other-bucket/big"]


def test_a_job_table_alone_needs_its_own_url() -> None:
    cfg = config_from_dict({"jobs": {"run": {"tier": {"url": "s3://only-run/x"}}}})
    assert cfg.tier is None and cfg.tier_for("other") is None
    run = cfg.tier_for("run")
    assert run is not None and run.url == TierUrl("only-run", "x")
    with pytest.raises(ConfigError, match=r"^jobs\.run\.tier\.url: missing"):
        config_from_dict({"jobs": {"run": {"tier": {"concurrency": 2}}}})


def test_a_job_tier_table_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "ckptd.toml"
    path.write_text(
        f"""
[tier]
url = "{URL}"

[tier.retention]
keep_last = 4

[jobs.run.tier]
concurrency = 2

[jobs.run.tier.retention]
keep_every = 10
""",
        "utf-8",
    )
    run = load_config(path).tier_for("run")
    assert run is not None and run.settings.concurrency == 2
    assert (run.retention.keep_last, run.retention.keep_every) == (4, 10)


# ---- readers: tier_settings_for -----------------------------------------------------------------


def test_tier_settings_for_uses_the_configured_endpoint_for_that_bucket() -> None:
    cfg = config_from_dict(
        {
            "tier": tier(endpoint="http://127.0.0.1:9000", region="r1", bandwidth="1MiB"),
            "jobs": {"x": {"tier": {"url": "s3://bucket2/x", "endpoint": "http://127.0.0.1:9"}}},
        }
    )
    # Another prefix of the same bucket: the configured server, no upload bandwidth cap.
    assert tier_settings_for("s3://bucket/elsewhere", cfg) == TierSettings(
        url=TierUrl("bucket", "elsewhere"), endpoint="http://127.0.0.1:9000", region="r1"
    )
    got = tier_settings_for("s3://bucket2", cfg)
    assert (got.url, got.endpoint) == (TierUrl("bucket2"), "http://127.0.0.1:9")
    # A bucket no tier names: the AWS environment's (no endpoint of ours).
    assert tier_settings_for("s3://bucket-other/team/ckpt", cfg) == TierSettings(
        url=TierUrl("bucket-other", "team/ckpt")
    )
    assert tier_settings_for(URL, Config()) == TierSettings(url=parse_url(URL))
    with pytest.raises(TierError, match="not a valid bucket name"):
        tier_settings_for("s3://B", cfg)


def test_tier_settings_for_reads_the_config_file_in_use(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckptd.toml"
    path.write_text(f'[tier]\nurl = "{URL}"\nendpoint = "http://127.0.0.1:8333"\n', "utf-8")
    monkeypatch.setenv("CKPTD_CONFIG", str(path))
    assert tier_settings_for("s3://bucket/x").endpoint == "http://127.0.0.1:8333"


# ---- parse_url ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
        ("s3://abc/x", "abc", "x"),
        ("s3://my.bucket-1/a/b/", "my.bucket-1", "a/b"),
        ("s3://b12/team=ml/run+1/v1.0_x@y", "b12", "team=ml/run+1/v1.0_x@y"),
        (f"s3://{'a' * 63}/p", "a" * 63, "p"),
    ],
)
def test_parse_url(url: str, bucket: str, prefix: str) -> None:
    parsed = parse_url(url)
    assert parsed == TierUrl(bucket, prefix)
    assert parse_url(str(parsed)) == parsed
    assert parsed.full_key("run/x") == (f"{prefix}/run/x" if prefix else "run/x")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://bucket/x", "expected a URL like s3://bucket/prefix"),
        ("S3://bucket", "expected a URL like s3://bucket/prefix"),
        (None, "expected a URL like s3://bucket/prefix, got None"),
        (b"s3://bucket", "expected a URL like s3://bucket/prefix"),
        ("s3://", "'' is not a valid bucket name"),
        ("s3://ab", "'ab' is not a valid bucket name"),
        (f"s3://{'a' * 64}", "is not a valid bucket name"),
        ("s3://Bucket", "'Bucket' is not a valid bucket name"),
        ("s3://-bucket", "'-bucket' is not a valid bucket name"),
        ("s3://bucket-", "'bucket-' is not a valid bucket name"),
        ("s3://bu..cket", "'bu..cket' is not a valid bucket name"),
        ("s3://bu_cket", "'bu_cket' is not a valid bucket name"),
        ("s3://bucket/a//b", "prefix component '' is not allowed"),
        ("s3://bucket/a/./b", r"prefix component '\.' is not allowed"),
        ("s3://bucket/../b", r"prefix component '\.\.' is not allowed"),
        ("s3://bucket/a b", "prefix component 'a b' is not allowed"),
        ("s3://bucket/@x", "prefix component '@x' is not allowed"),
    ],
)
def test_parse_url_refuses(url: object, message: str) -> None:
    with pytest.raises(TierError, match=message):
        parse_url(url)
