""":class:`~ckptd.tier.remote.S3Remote` against a real S3 server (``weed mini`` on loopback, one
for the module: :mod:`tests.tier_server`).

1. objects: put / get / size, ``put_new`` creates once (a second create returns False and leaves
   the first bytes), listing (nested keys, sizes, mtimes; a prefix is a directory, and a sibling
   prefix's objects stay out), ``dirs``, ``delete`` (a missing key is fine);
2. errors, each a :class:`TierError` saying what to fix: a missing bucket (named), an endpoint
   nobody listens on ("cannot reach"), a refused secret (credentials); a missing key is a
   :class:`NotFoundError` naming it;
3. credentials from a shared credentials file and a profile, with no keys in the environment;
   :meth:`WeedServer.remote` ignores (and keeps) the test process's own ``AWS_*``;
4. a bandwidth cap still uploads every byte;
5. the server stopped: a TierError; started again (same endpoint): the same remote works and the
   data is still there. Runs last, so a failure to restart cannot hide behind other tests.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ckptd.errors import NotFoundError, TierError
from ckptd.tier.remote import Remote, S3Remote, TierSettings, parse_url
from tests.tier_server import WeedServer, aws_environ, free_port_pairs


def prefix_of(tier_url: str) -> str:
    return parse_url(tier_url).prefix


def remote_at(url: str, endpoint: str, env: dict[str, str], timeout_s: float = 60.0) -> Remote:
    """An S3Remote built with exactly the ``AWS_*`` variables ``env``."""
    with aws_environ(env):
        return S3Remote(TierSettings(url=parse_url(url), endpoint=endpoint, timeout_s=timeout_s))


def test_put_get_size_and_create_only_once(s3: WeedServer, tier_url: str) -> None:
    remote = s3.remote(prefix_of(tier_url))
    remote.check()  # an empty prefix of an existing bucket is fine
    remote.put("job/objects/ab/one", b"first")
    assert remote.get("job/objects/ab/one") == b"first"
    remote.put("job/objects/ab/one", bytearray(b"replaced!"))
    assert remote.get("job/objects/ab/one") == b"replaced!"
    assert remote.size("job/objects/ab/one") == len(b"replaced!")
    assert remote.size("job/objects/ab/absent") is None

    assert remote.put_new("job/manifests/step-1", memoryview(b"the first commit")) is True
    assert remote.put_new("job/manifests/step-1", b"a second commit") is False
    assert remote.get("job/manifests/step-1") == b"the first commit"

    empty = remote.put_new("job/empty", b"")
    assert empty is True and remote.get("job/empty") == b"" and remote.size("job/empty") == 0

    with pytest.raises(NotFoundError, match=f"{tier_url}/job/objects/ab/absent is not in the tier"):
        remote.get("job/objects/ab/absent")


def test_list_dirs_and_delete(s3: WeedServer, tier_url: str) -> None:
    prefix = prefix_of(tier_url)
    remote = s3.remote(prefix)
    # A sibling prefix that starts with this one's name: never part of this tier.
    s3.remote(prefix + "-sibling").put("job/objects/ab/theirs", b"not ours")
    before = time.time()
    objects = {
        "job/objects/ab/abcd": b"1",
        "job/objects/cd/cdef": b"22",
        "job/manifests/step-000000000001.json": b"333",
        "jobber/manifests/step-000000000002.json": b"4444",
        "top-level-file": b"55555",
    }
    for key, data in objects.items():
        remote.put(key, data)
    after = time.time()

    listed = sorted(remote.list(""), key=lambda o: o.key)
    assert [(o.key, o.size) for o in listed] == sorted((k, len(v)) for k, v in objects.items())
    for o in listed:  # seconds since the epoch (S3 keeps whole seconds)
        assert int(before) - 1 <= o.mtime <= after + 1, (o, before, after)
    assert sorted(o.key for o in remote.list("job")) == sorted(
        k for k in objects if k.startswith("job/")
    )
    assert sorted(o.key for o in remote.list("job/objects")) == [
        "job/objects/ab/abcd",
        "job/objects/cd/cdef",
    ]
    assert list(remote.list("jo")) == []  # a prefix is a directory, not a string prefix
    assert list(remote.list("no/such/dir")) == []

    assert remote.dirs("") == ["job", "jobber"]  # files at that level are not directories
    assert remote.dirs("job") == ["manifests", "objects"]
    assert remote.dirs("job/objects") == ["ab", "cd"]
    assert remote.dirs("nothing-here") == []

    remote.delete(["job/objects/ab/abcd", "job/objects/ab/never-written", "top-level-file"])
    remote.delete([])
    assert sorted(o.key for o in remote.list("")) == [
        "job/manifests/step-000000000001.json",
        "job/objects/cd/cdef",
        "jobber/manifests/step-000000000002.json",
    ]
    assert remote.size("job/objects/ab/abcd") is None
    # dirs() after a delete is not checked: weed keeps emptied directories (S3 has none).


def test_keys_with_every_allowed_prefix_character_round_trip(s3: WeedServer, tier_url: str) -> None:
    prefix = prefix_of(tier_url) + "/we=ird+pre@fix/x.y_z-0"
    remote = s3.remote(prefix)
    remote.put("k=1+2@3/obj", b"data")
    assert remote.get("k=1+2@3/obj") == b"data"
    assert [(o.key, o.size) for o in remote.list("")] == [("k=1+2@3/obj", 4)]
    assert remote.dirs("") == ["k=1+2@3"]
    parent = s3.remote(prefix_of(tier_url))
    assert [o.key for o in parent.list("")] == ["we=ird+pre@fix/x.y_z-0/k=1+2@3/obj"]


def test_missing_bucket_is_a_tier_error_naming_it(s3: WeedServer) -> None:
    remote = remote_at("s3://ckptd-no-such-bucket/p", s3.endpoint, s3.env)
    named = "bucket 'ckptd-no-such-bucket' does not exist"
    with pytest.raises(TierError, match=named):
        remote.check()
    with pytest.raises(TierError, match=named):
        list(remote.list(""))
    with pytest.raises(TierError, match=named):
        remote.dirs("")
    # A write or read must not pass for a missing key: the bucket is what is missing.
    for operation in (
        lambda: remote.get("job/x"),
        lambda: remote.put("job/x", b"x"),
        lambda: remote.put_new("job/x", b"x"),
        lambda: remote.delete(["job/x"]),
    ):
        with pytest.raises(TierError, match=named) as caught:
            operation()
        assert not isinstance(caught.value, NotFoundError)


def test_unreachable_endpoint_is_a_tier_error(s3: WeedServer, tier_url: str) -> None:
    nobody = f"http://127.0.0.1:{free_port_pairs(1)[0]}"
    remote = remote_at(tier_url, nobody, s3.env, timeout_s=5.0)
    for operation in (remote.check, lambda: remote.get("k"), lambda: remote.put("k", b"x")):
        with pytest.raises(TierError, match=f"at {nobody}: cannot reach the endpoint"):
            operation()


def test_refused_credentials_are_a_tier_error(s3: WeedServer, tier_url: str) -> None:
    s3.remote(prefix_of(tier_url)).put("there", b"x")
    for wrong in ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, {"AWS_ACCESS_KEY_ID": "nobody"}):
        remote = remote_at(tier_url, s3.endpoint, {**s3.env, **wrong})
        for operation in (
            remote.check,
            lambda r=remote: r.get("there"),
            lambda r=remote: r.put_new("new", b"x"),
        ):
            with pytest.raises(TierError, match=r"refused \(403\): the credentials are wrong"):
                operation()
    assert s3.remote(prefix_of(tier_url)).size("new") is None


def test_credentials_from_a_shared_credentials_file_and_profile(
    s3: WeedServer, tier_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong\n\n"
        f"[ckptd-test]\naws_access_key_id = {s3.env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {s3.env['AWS_SECRET_ACCESS_KEY']}\n"
    )
    config = tmp_path / "config"
    config.write_text("[profile ckptd-test]\nregion = us-east-1\n")
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no real ~/.aws of the machine

    monkeypatch.setenv("AWS_PROFILE", "ckptd-test")
    remote = S3Remote(TierSettings(url=parse_url(tier_url), endpoint=s3.endpoint))
    remote.put("from-profile", b"profile")
    assert s3.remote(prefix_of(tier_url)).get("from-profile") == b"profile"

    monkeypatch.delenv("AWS_PROFILE")  # the default profile's key is refused
    default = S3Remote(TierSettings(url=parse_url(tier_url), endpoint=s3.endpoint))
    with pytest.raises(TierError, match="credentials"):
        default.get("from-profile")


def test_server_remote_ignores_the_callers_aws_variables(
    s3: WeedServer, tier_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "stale")
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    monkeypatch.delenv("AWS_REGION", raising=False)
    environ = dict(os.environ)
    remote = s3.remote(prefix_of(tier_url))
    assert dict(os.environ) == environ
    remote.put("k", b"v")  # the env read at construction, not per request
    assert remote.get("k") == b"v"


def test_bandwidth_cap_still_uploads_every_byte(s3: WeedServer, tier_url: str) -> None:
    rate = 256 * 1024
    capped = s3.remote(prefix_of(tier_url), bandwidth=rate)
    payloads = {f"obj-{i}": os.urandom(rate * 3 // 4) for i in range(3)}  # past the 1 s burst
    for i, (key, data) in enumerate(payloads.items()):
        if i % 2:
            assert capped.put_new(key, memoryview(data)) is True
        else:
            capped.put(key, data)
    plain = s3.remote(prefix_of(tier_url))
    assert {key: plain.get(key) for key in payloads} == payloads


def test_stopped_server_is_a_tier_error_and_data_survives_a_restart(
    s3: WeedServer, tier_url: str
) -> None:
    remote = s3.remote(prefix_of(tier_url))
    remote.put("kept/obj", b"survives")
    endpoint, pid = s3.endpoint, s3.pid
    assert pid is not None
    try:
        s3.stop()
        s3.stop()  # idempotent
        assert not s3.running
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # nothing of weed's process group is left
        assert not [p for p in Path("/tmp").glob("seaweedfs-*.sock") if mentions_port(p, s3)]
        for operation in (remote.check, lambda: remote.get("kept/obj")):
            with pytest.raises(TierError, match="cannot reach the endpoint"):
                operation()
    finally:
        s3.start()
    assert s3.endpoint == endpoint and s3.pid not in (None, pid)
    assert remote.get("kept/obj") == b"survives"
    remote.put("after/restart", b"new")
    assert sorted(o.key for o in remote.list("")) == ["after/restart", "kept/obj"]


def mentions_port(sock: Path, s3: WeedServer) -> bool:
    port = sock.stem.rsplit("-", 1)[-1]
    return any(port in (str(p), str(p + 10000)) for p in s3.ports.values())
