"""``parse_url``: what a tier URL may be, and the message for each way it can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptd.errors import TierError
from ckptd.tier.remote import TierUrl, is_tier_url, parse_url

ACCEPTED = [
    ("s3://abc", TierUrl("abc", ""), "s3://abc"),
    ("s3://abc/", TierUrl("abc", ""), "s3://abc"),
    ("s3://my.bucket-1/ckpt", TierUrl("my.bucket-1", "ckpt"), "s3://my.bucket-1/ckpt"),
    ("s3://bucket/a/b/c/", TierUrl("bucket", "a/b/c"), "s3://bucket/a/b/c"),
    ("s3://bucket//lead", TierUrl("bucket", "lead"), "s3://bucket/lead"),
    ("s3://0-9/A=b+c@d/e.f_g-h", TierUrl("0-9", "A=b+c@d/e.f_g-h"), "s3://0-9/A=b+c@d/e.f_g-h"),
    ("s3://b-c/.hidden/..x/x..", TierUrl("b-c", ".hidden/..x/x.."), "s3://b-c/.hidden/..x/x.."),
    ("s3://" + "a" * 63 + "/p", TierUrl("a" * 63, "p"), "s3://" + "a" * 63 + "/p"),
]


@pytest.mark.parametrize(("url", "parsed", "canonical"), ACCEPTED)
def test_accepted(url: str, parsed: TierUrl, canonical: str) -> None:
    assert is_tier_url(url)
    assert parse_url(url) == parsed
    assert str(parsed) == canonical
    assert parse_url(canonical) == parsed


def test_full_key_joins_the_prefix() -> None:
    assert parse_url("s3://abc/x/y").full_key("job/objects/ab/cd") == "x/y/job/objects/ab/cd"
    assert parse_url("s3://abc").full_key("job/manifests/m") == "job/manifests/m"


NOT_A_URL = "expected a URL like s3://bucket/prefix"
BAD_BUCKET = "is not a valid bucket name (3-63 characters"

REFUSED: list[tuple[object, str]] = [
    (None, NOT_A_URL),
    (Path("s3://abc/p"), NOT_A_URL),
    ("", NOT_A_URL),
    ("abc/prefix", NOT_A_URL),
    ("/var/lib/ckptd", NOT_A_URL),
    ("S3://abc/p", NOT_A_URL),
    ("gs://abc/p", NOT_A_URL),
    ("s3:/abc/p", NOT_A_URL),
    ("s3://", "'' " + BAD_BUCKET),
    ("s3:///p", "'' " + BAD_BUCKET),
    ("s3://ab/p", "'ab' " + BAD_BUCKET),
    ("s3://" + "a" * 64 + "/p", BAD_BUCKET),
    ("s3://MyBucket/p", "'MyBucket' " + BAD_BUCKET),
    ("s3://under_score/p", BAD_BUCKET),
    ("s3://-abc/p", BAD_BUCKET),
    ("s3://abc-/p", BAD_BUCKET),
    ("s3://.abc/p", BAD_BUCKET),
    ("s3://a..b/p", "'a..b' " + BAD_BUCKET),
    ("s3://abc:9000/p", BAD_BUCKET),
    ("s3://user@abc/p", BAD_BUCKET),
    ("s3://abc\n/p", BAD_BUCKET),
    ("s3://abc/a//b", "prefix component '' is not allowed"),
    ("s3://abc/a/../b", "prefix component '..' is not allowed"),
    ("s3://abc/./b", "prefix component '.' is not allowed"),
    ("s3://abc/a b", "prefix component 'a b' is not allowed"),
    ("s3://abc/@home", "prefix component '@home' is not allowed"),
    ("s3://abc/p?versionId=1", "prefix component 'p?versionId=1' is not allowed"),
    ("s3://abc/p#frag", "prefix component 'p#frag' is not allowed"),
    ("s3://abc/naïve", "prefix component 'naïve' is not allowed"),
    ("s3://abc/p\n", "prefix component 'p\\n' is not allowed"),
    ("s3://abc/a\\b", "is not allowed"),
]


@pytest.mark.parametrize(("url", "message"), REFUSED)
def test_refused(url: object, message: str) -> None:
    with pytest.raises(TierError) as caught:
        parse_url(url)
    text = str(caught.value)
    assert message in text
    assert repr(url) in text  # the message names what was given


def test_is_tier_url_tells_urls_from_directories() -> None:
    assert is_tier_url("s3://anything")
    for value in ("/srv/ckpt", "relative/dir", "S3://abc", "", None, Path("s3://abc"), b"s3://x"):
        assert not is_tier_url(value)
