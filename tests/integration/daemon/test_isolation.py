"""No test reads the machine's ``/etc/ckptd/ckptd.toml`` (or a real user's config).

The config lookup is ``--config``, ``CKPTD_CONFIG``, ``$XDG_CONFIG_HOME/ckptd/ckptd.toml``, then
the system file. Every environment the tests give a subprocess (``clean_env``: the daemon
factories, the reliability fixtures, the bench smoke runs, trainers, CLI runs) sets
``CKPTD_CONFIG`` to an empty file and an XDG config home whose user config is an empty file, so
the lookup stops before ``/etc`` even in a process that drops ``CKPTD_*`` (the bench scripts'
daemons do). In the pytest process itself, ``ckptd.config.SYSTEM_CONFIG`` points at a file that
does not exist (``tests/conftest.py``).

The proof does not write ``/etc``: a wrapper (:mod:`tests.integration.system_config_ckptd`) runs
ckptd with its system config path replaced by a poisoned file. A daemon with a factory's
environment starts and serves; the same daemon without those variables refuses to start,
naming the poisoned file, which shows the poison would have been seen.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ckptd.config
from ckptd.config import config_path
from tests.integration import daemon_fixtures
from tests.integration.daemon_fixtures import REPO, DaemonFactory, clean_env, short_tmp
from tests.integration.system_config_ckptd import SYSTEM_CONFIG_ENV
from tests.reliability.fixtures import Fiu

ckptd_env = daemon_fixtures.ckptd_env
daemons = daemon_fixtures.daemons

POISON = "[[[ a system config no test may read\n"
WRAPPER = "tests.integration.system_config_ckptd"
LOOKUP = """
import os
from ckptd.config import config_path
print(config_path())
for name in [k for k in os.environ if k.startswith("CKPTD_")]:
    del os.environ[name]
print(config_path())
"""


def lookups(env: dict[str, str]) -> list[str]:
    """Where ckptd's config lookup lands in a process with ``env``, then in the same process
    with every ``CKPTD_*`` variable dropped (one interpreter: each costs seconds of imports)."""
    proc = subprocess.run(
        [sys.executable, "-c", LOOKUP],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stdout.splitlines()


def assert_isolated(env: dict[str, str]) -> None:
    """``env`` names an empty config file and an XDG home whose user config is empty."""
    named = Path(env["CKPTD_CONFIG"])
    user = Path(env["XDG_CONFIG_HOME"]) / "ckptd" / "ckptd.toml"
    assert named.is_file() and named.stat().st_size == 0, named
    assert user.is_file() and user.stat().st_size == 0, user


def test_every_factory_environment_names_empty_config_files(daemons: DaemonFactory) -> None:
    assert_isolated(daemons.env)
    base = short_tmp()
    try:
        plain = clean_env(base, EXTRA="1")
        assert_isolated(plain)
        # libfiu's preload environment (the fault-injection factory) keeps them.
        assert_isolated(Fiu(Path("/nonexistent"), base / "fiu").env(plain))
        # A subprocess's lookup stops at CKPTD_CONFIG; without it (as the bench scripts' daemons
        # run), at the empty user config; never at /etc.
        user = str(Path(plain["XDG_CONFIG_HOME"]) / "ckptd" / "ckptd.toml")
        assert lookups(plain) == [plain["CKPTD_CONFIG"], user]
    finally:
        shutil.rmtree(base)


@pytest.mark.usefixtures("ckptd_env")
def test_in_process_lookups_never_reach_etc(no_system_config: Path) -> None:
    assert Path("/etc/ckptd/ckptd.toml") != ckptd.config.SYSTEM_CONFIG == no_system_config
    assert not no_system_config.exists()
    found = config_path()
    assert found is not None and found.stat().st_size == 0  # the ckptd_env's empty file


def test_a_poisoned_system_config_is_never_read_by_a_factory_daemon(
    daemons: DaemonFactory,
) -> None:
    poison = daemons.base / "etc" / "ckptd.toml"
    poison.parent.mkdir()
    poison.write_text(POISON)
    daemons.env[SYSTEM_CONFIG_ENV] = str(poison)

    daemon = daemons.start(module=WRAPPER)
    assert daemon.status()["config"] == daemons.env["CKPTD_CONFIG"]

    # Without CKPTD_CONFIG (a bench script's daemon): the empty user config stops the lookup.
    named = daemons.env.pop("CKPTD_CONFIG")
    try:
        second = daemons.start(module=WRAPPER, socket_path=daemons.base / "run" / "second.sock")
        user = Path(daemons.env["XDG_CONFIG_HOME"]) / "ckptd" / "ckptd.toml"
        assert second.status()["config"] == str(user)

        # The control: with neither, the same daemon reads the poison and refuses to start.
        bare = daemons.env | {"XDG_CONFIG_HOME": str(daemons.base / "no-xdg")}
        control = ["--socket", str(daemons.base / "ctl" / "s.sock"), "--root", str(daemons.base)]
        proc = subprocess.run(
            [sys.executable, "-m", WRAPPER, "start", "--user", *control],
            cwd=REPO,
            env=bare,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        daemons.env["CKPTD_CONFIG"] = named
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 3, (proc.stdout, err)  # ConfigError
    assert f"error: config file {poison}: invalid TOML" in err
    assert not (daemons.base / "ctl").exists()
