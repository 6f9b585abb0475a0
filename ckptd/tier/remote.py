"""The object store behind one small interface: :class:`Remote`, and :class:`S3Remote` on obstore.

Everything else in the tier speaks :class:`Remote` with keys relative to the tier's prefix
(``job/objects/ab/<hex>``, see :mod:`ckptd.tier.keys`), so the S3 client is named in this module
only. obstore (Rust, releases the GIL, no Python dependencies) does the HTTP; it supports the
conditional create (``If-None-Match: *``) the commit needs. It is the optional extra ``ckptd[s3]``:
importing this module without it raises :class:`~ckptd.errors.TierError` saying so.

Credentials: the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``), else the shared files
(``~/.aws/credentials`` and ``~/.aws/config``, or ``AWS_SHARED_CREDENTIALS_FILE`` /
``AWS_CONFIG_FILE``) for the profile ``AWS_PROFILE`` (``default``).

Every failure becomes a :class:`~ckptd.errors.TierError` (or :class:`~ckptd.errors.NotFoundError`
for a key that is not there) whose message names the URL and what to do. obstore's own retries
are kept short: the uploader retries with its own backoff and never blocks a local commit.
"""

from __future__ import annotations

import builtins
import configparser
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, cast

from ckptd.errors import NotFoundError, TierError

Data = bytes | bytearray | memoryview

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART_RE = re.compile(r"[A-Za-z0-9._=+-][A-Za-z0-9._=+@-]*")


@dataclass(frozen=True)
class TierUrl:
    """``s3://bucket/prefix``, parsed (``prefix`` has no leading or trailing ``/``)."""

    bucket: str
    prefix: str = ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def full_key(self, key: str) -> str:
        """The object's key in the bucket."""
        return f"{self.prefix}/{key}" if self.prefix else key


def is_tier_url(value: object) -> bool:
    """Whether ``value`` names an object store (``s3://...``) rather than a directory."""
    return isinstance(value, str) and value.startswith("s3://")


def parse_url(url: object) -> TierUrl:
    """Parse ``s3://bucket[/prefix]``; raise :class:`TierError` naming what is wrong."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise TierError(f"expected a URL like s3://bucket/prefix, got {url!r}")
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise TierError(
            f"{url!r}: {bucket!r} is not a valid bucket name (3-63 characters: lowercase "
            "letters, digits, '.' and '-', starting and ending with a letter or digit)"
        )
    prefix = prefix.strip("/")
    for part in prefix.split("/") if prefix else []:
        if not _PREFIX_PART_RE.fullmatch(part) or part in (".", ".."):
            raise TierError(
                f"{url!r}: prefix component {part!r} is not allowed (use letters, digits and "
                "._=+-@, no empty, '.' or '..' components)"
            )
    return TierUrl(bucket, prefix)


@dataclass(frozen=True)
class Listed:
    """One object found by :meth:`Remote.list`."""

    key: str
    size: int
    mtime: float
    """Last modified, seconds since the epoch."""


@dataclass(frozen=True)
class TierSettings:
    """Where the tier is and how the daemon talks to it (``[tier]``, see :mod:`ckptd.config`)."""

    url: TierUrl
    endpoint: str | None = None
    """``http(s)://host:port`` of an S3-compatible server; None: AWS (or ``AWS_ENDPOINT_URL``)."""
    region: str | None = None
    concurrency: int = 8
    """Requests in flight at once per checkpoint upload."""
    bandwidth: int | None = None
    """Bytes per second over all uploads of the daemon; None: no cap."""
    timeout_s: float = 60.0
    """One request's timeout."""

    def describe(self) -> str:
        return f"{self.url}" + (f" at {self.endpoint}" if self.endpoint else "")


class Remote(Protocol):
    """An object store seen through the tier's prefix: every ``key`` is relative to it."""

    url: TierUrl

    def get(self, key: str) -> bytes:
        """The object's bytes; :class:`NotFoundError` when it is not there."""
        ...

    def put(self, key: str, data: Data) -> None:
        """Write the object (replacing one that is there)."""
        ...

    def put_new(self, key: str, data: Data) -> bool:
        """Create the object only if no object has the key (``If-None-Match: *``); False when one
        had it (nothing changed)."""
        ...

    def size(self, key: str) -> int | None:
        """The object's size, None when it is not there."""
        ...

    def list(self, prefix: str) -> Iterator[Listed]:
        """Every object under the directory ``prefix`` (``"job/manifests"``: the keys
        ``job/manifests/...``; ``""``: the whole tier)."""
        ...

    def dirs(self, prefix: str) -> builtins.list[str]:
        """The directories right under ``prefix`` (``""``: the jobs' names, and others)."""
        ...

    def delete(self, keys: Sequence[str]) -> None:
        """Delete the objects (a key that is not there is fine)."""
        ...

    def check(self) -> None:
        """Raise :class:`TierError` unless the bucket exists and the credentials may list it."""
        ...


def _aws_files() -> dict[str, str]:
    """Credentials and region of ``AWS_PROFILE`` from the shared AWS files (empty if none)."""
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    home = Path.home()
    out: dict[str, str] = {}
    cred_path = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws/credentials")
    conf_path = Path(os.environ.get("AWS_CONFIG_FILE") or home / ".aws/config")
    for path, section, keys in (
        (conf_path, "default" if profile == "default" else f"profile {profile}", ("region",)),
        (
            cred_path,
            profile,
            ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"),
        ),
    ):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (OSError, configparser.Error) as exc:
            raise TierError(f"cannot read the AWS file {path}: {exc}") from exc
        if parser.has_section(section):
            out.update((k, parser.get(section, k)) for k in keys if parser.has_option(section, k))
    return out


def _credentials() -> dict[str, str]:
    """What obstore should be told explicitly: nothing when the environment has keys (obstore
    reads it), else the shared files' keys for the profile."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return {}
    files = _aws_files()
    out = {
        name: files[key]
        for key, name in (
            ("aws_access_key_id", "access_key_id"),
            ("aws_secret_access_key", "secret_access_key"),
            ("aws_session_token", "token"),
        )
        if key in files
    }
    if "region" in files and not (
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    ):
        out["region"] = files["region"]
    return out


class _Throttle:
    """A token bucket shared by every upload of one daemon: at most ``rate`` bytes per second,
    bursts up to one second's worth."""

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self._tokens = self.rate
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
            self._at = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class S3Remote:
    """:class:`Remote` on an S3-compatible server through obstore."""

    def __init__(self, settings: TierSettings) -> None:
        try:
            from obstore.store import S3Store
        except ImportError as exc:
            raise TierError("the object-store tier needs obstore: pip install 'ckptd[s3]'") from exc
        self.url = settings.url
        self.settings = settings
        options: dict[str, Any] = {"timeout": timedelta(seconds=settings.timeout_s)}
        options["connect_timeout"] = timedelta(seconds=min(10.0, settings.timeout_s))
        config: dict[str, Any] = _credentials()
        endpoint = settings.endpoint or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            config["endpoint"] = endpoint
            options["allow_http"] = endpoint.startswith("http://")
            config.setdefault("virtual_hosted_style_request", False)
        if settings.region:
            config["region"] = settings.region
        elif not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
            config.setdefault("region", "us-east-1")
        try:
            self._store = S3Store(
                settings.url.bucket,
                prefix=settings.url.prefix or None,
                client_options=cast(Any, options),
                retry_config={
                    "max_retries": 2,
                    "retry_timeout": timedelta(seconds=max(10.0, settings.timeout_s)),
                    "backoff": {
                        "init_backoff": timedelta(milliseconds=100),
                        "max_backoff": timedelta(seconds=2),
                        "base": 2,
                    },
                },
                **config,
            )
        except Exception as exc:
            raise TierError(f"tier {settings.describe()}: {_reason(exc)}") from exc
        self._throttle = _Throttle(settings.bandwidth) if settings.bandwidth else None

    def __repr__(self) -> str:
        return f"S3Remote({self.settings.describe()})"

    def _error(self, exc: BaseException, what: str, key: str | None) -> Exception:
        import obstore.exceptions as oe

        where = f"{self.url}/{key}" if key else str(self.url)
        text = str(exc)
        not_found = isinstance(exc, FileNotFoundError | oe.NotFoundError)
        # A write that finds nothing there means the bucket is missing (S3 says NoSuchBucket).
        if "NoSuchBucket" in text or (not_found and what in ("writing", "creating")):
            return TierError(
                f"tier {self.settings.describe()}: bucket {self.url.bucket!r} does not exist; "
                "create it or fix tier.url"
            )
        if not_found:
            return NotFoundError(f"{where} is not in the tier")
        refused = any(
            word in text
            for word in (
                "403 Forbidden",
                "SignatureDoesNotMatch",
                "InvalidAccessKeyId",
                "AccessDenied",
            )
        )
        if refused or isinstance(exc, oe.PermissionDeniedError | oe.UnauthenticatedError):
            return TierError(
                f"tier {self.settings.describe()}: {what} {where} was refused (403): the "
                "credentials are wrong or may not use this bucket; check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or the profile in ~/.aws/credentials"
            )
        if "InvalidBucketName" in text:
            return TierError(
                f"tier {self.settings.describe()}: bucket {self.url.bucket!r} does not exist; "
                "create it or fix tier.url"
            )
        if "error sending request" in text or "Connect" in text or "timed out" in text:
            return TierError(
                f"tier {self.settings.describe()}: cannot reach the endpoint ({what} {where}); "
                "is the server up and tier.endpoint right?"
            )
        return TierError(f"tier {self.settings.describe()}: {what} {where} failed: {_reason(exc)}")

    def get(self, key: str) -> bytes:
        import obstore

        try:
            return bytes(obstore.get(self._store, key).bytes())
        except Exception as exc:
            raise self._error(exc, "reading", key) from exc

    def put(self, key: str, data: Data) -> None:
        import obstore

        if self._throttle is not None:
            self._throttle.take(len(data))
        try:
            obstore.put(self._store, key, data, mode="overwrite")
        except Exception as exc:
            raise self._error(exc, "writing", key) from exc

    def put_new(self, key: str, data: Data) -> bool:
        import obstore
        import obstore.exceptions as oe

        if self._throttle is not None:
            self._throttle.take(len(data))
        try:
            obstore.put(self._store, key, data, mode="create")
        except (oe.AlreadyExistsError, oe.PreconditionError):
            return False
        except Exception as exc:
            raise self._error(exc, "creating", key) from exc
        return True

    def size(self, key: str) -> int | None:
        import obstore

        try:
            return int(obstore.head(self._store, key)["size"])
        except Exception as exc:
            err = self._error(exc, "looking up", key)
            if isinstance(err, NotFoundError):
                return None
            raise err from exc

    def list(self, prefix: str) -> Iterator[Listed]:
        import obstore

        try:
            for batch in obstore.list(self._store, prefix=prefix or None, chunk_size=1000):
                for meta in batch:
                    yield Listed(
                        str(meta["path"]), int(meta["size"]), meta["last_modified"].timestamp()
                    )
        except Exception as exc:
            err = self._error(exc, "listing", prefix)
            if isinstance(err, NotFoundError):  # a missing bucket lists as 404 on some servers
                raise TierError(
                    f"tier {self.settings.describe()}: bucket {self.url.bucket!r} does not "
                    "exist; create it or fix tier.url"
                ) from exc
            raise err from exc

    def dirs(self, prefix: str) -> builtins.list[str]:
        import obstore

        try:
            found = obstore.list_with_delimiter(self._store, prefix=prefix or None)
        except Exception as exc:
            raise self._error(exc, "listing", prefix) from exc
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found["common_prefixes"])

    def delete(self, keys: Sequence[str]) -> None:
        import obstore

        for start in range(0, len(keys), 1000):
            try:
                obstore.delete(self._store, list(keys[start : start + 1000]))
            except Exception as exc:
                err = self._error(exc, "deleting", keys[start])
                if not isinstance(err, NotFoundError):
                    raise err from exc

    def check(self) -> None:
        for _ in self.list(".ckptd-store"):
            break


def _reason(exc: BaseException) -> str:
    """The first line of an obstore error (its debug dump follows)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def open_remote(settings: TierSettings) -> Remote:
    """The :class:`Remote` for ``settings`` (nothing is contacted yet)."""
    return S3Remote(settings)
