"""Running this checkout's Python and ``ckptd`` as another uid (65534, with ``setpriv``).

A process of uid 65534 must read this checkout's ``ckptd`` / ``ckptd_client`` sources and its
venv's site-packages (torch...). CI clones the repository inside a ``mktemp -d`` directory (mode
0700, owned by root, not ours to chmod), so nothing under the checkout is reachable by other
users. Then the :func:`other_uid` fixture builds a *mirror* under a fresh directory of its own in
``/tmp`` (mode 0755), once per session:

* ``src/ckptd`` and ``src/ckptd_client``: copies of the sources (small), first on ``PYTHONPATH``,
  so the editable install's finder (which points into the checkout) is never needed;
* ``venv/``: the venv, every file hard-linked (reading through a link needs no traversal of the
  checkout, and the inode keeps its own mode: nothing becomes readable that was not) or, where the
  kernel refuses a link (the mirror on another filesystem: EXDEV), copied. Its ``bin/python``
  is the venv's symlink to the base interpreter and its ``pyvenv.cfg`` the venv's own, so
  ``<mirror>/venv/bin/python`` starts with ``sys.prefix`` = the mirror's venv and imports from
  the mirror's site-packages.

Only how the other uid's programs are found changes: uid 65534 runs as before, with no
capabilities and no groups, so what it may not read or write (sockets, stores, config files)
stays out of its reach. (Keeping ``CAP_DAC_READ_SEARCH`` ambient instead would have needed no
mirror, but would let it read and traverse everything: the tests that check it cannot would
prove nothing.)

:attr:`OtherUid.prefix` is the ``setpriv`` command line to put before a command. With a mirror it
is a small ``sh`` shim, run as root, that puts the mirror's counterpart in place of this
process's interpreter (``sys.executable``) or of the venv's ``ckptd`` console script (run by the
mirror's interpreter: the script's ``#!`` line names the checkout's), leaves any other command as
it is, and execs ``setpriv``: setpriv starts the program, as without a mirror. When the checkout
is traversable there is no mirror and the prefix is ``setpriv`` alone. Either way the other uid's
environment (:meth:`OtherUid.env`) names an empty config file in ``CKPTD_CONFIG``. The mirror is
removed at the end of the session.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests._requirements import first_blocked

NOBODY = 65534
SETPRIV = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
# The venv's console script that the tests run (as ``Path(sys.executable).parent / "ckptd"``).
CKPTD = Path(sys.executable).parent / "ckptd"


@dataclass(frozen=True)
class OtherUid:
    """How uid :data:`NOBODY` runs this checkout's programs (see the module docstring)."""

    base: Path  # ours: mode 0755 under /tmp; the empty config, and the mirror when there is one
    prefix: tuple[str, ...]  # setpriv ..., or the sh shim that ends in it: put before a command
    pythonpath: list[str]  # first on the other uid's PYTHONPATH
    config: Path  # an empty config file every uid can read (CKPTD_CONFIG)
    how: str  # a sentence: where the other uid's python and ckptd come from (for messages)
    build_s: float = field(default=0.0)  # seconds spent building the mirror (0 without one)

    def env(self, **values: str) -> dict[str, str]:
        """A minimal environment for a process of the other uid: ``PATH``, ``LANG``,
        ``CKPTD_CONFIG`` (the empty :attr:`config`, so no config from the machine, e.g.
        ``/etc/ckptd/ckptd.toml``, leaks in) and ``PYTHONPATH`` (the mirror's sources, then this
        process's ``PYTHONPATH``); then ``values``."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "CKPTD_CONFIG": str(self.config),
        }
        path = [*self.pythonpath, *filter(None, [os.environ.get("PYTHONPATH")])]
        if path:
            env["PYTHONPATH"] = os.pathsep.join(path)
        return env | values

    def cannot_import(self, modules: str) -> str:
        """Why the other uid cannot run ``sys.executable`` (through :attr:`prefix`) and import
        ``modules`` (comma-separated), as a sentence for a requirement; "" when it can."""
        proc = subprocess.run(
            [*self.prefix, sys.executable, "-c", f"import os, {modules}; print(os.getuid())"],
            env=self.env(HOME=str(self.base)),
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode == 0 and proc.stdout.strip() == str(NOBODY):
            return ""
        return (
            f"uid {NOBODY} cannot run {sys.executable} importing {modules} (exit "
            f"{proc.returncode}; {self.how}): {proc.stderr.strip()[-300:]}"
        )


def checkout_blocked() -> Path | None:
    """The first directory other users cannot enter on the way to this venv or to the ckptd /
    ckptd_client sources it imports; None when they can reach all three."""
    import ckptd
    import ckptd_client

    for path in (
        Path(sys.prefix),
        Path(ckptd.__file__).parent,
        Path(ckptd_client.__file__).parent,
    ):
        if (blocked := first_blocked(path)) is not None:
            return blocked
    return None


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` at ``dst``; copy it where the kernel will not link (another filesystem,
    or a link refused by protected_hardlinks)."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, dst)


def mirror_tree(src: Path, dst: Path) -> None:
    """``dst``: a tree like ``src`` (symlinks as symlinks, modes kept) whose files are hard
    links to ``src``'s, or copies where a link is refused."""
    shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)


def _shim(python: Path, ckptd: Path) -> tuple[str, ...]:
    """A prefix that swaps ``sys.executable`` for the mirror's interpreter, and the venv's ckptd
    script for the mirror's (run by that interpreter), then runs the command through
    :data:`SETPRIV`. The swap happens before setpriv (as root), so setpriv itself starts the
    program, as it does without a mirror."""
    py, mpy, script, mscript = (shlex.quote(str(p)) for p in (sys.executable, python, CKPTD, ckptd))
    code = (
        f'case "$1" in\n'
        f'  {py}) shift; set -- {mpy} "$@" ;;\n'
        f'  {script}) shift; set -- {mpy} {mscript} "$@" ;;\n'
        f"esac\n"
        f'exec {shlex.join(SETPRIV)} "$@"\n'
    )
    return ("/bin/sh", "-c", code, "ckptd-other-uid")


def build(parent: str = "/tmp") -> OtherUid:
    """A fresh directory under ``parent`` (mode 0755) with an empty config file and, when
    :func:`checkout_blocked`, the mirror. Remove it with :func:`remove`."""
    base = Path(tempfile.mkdtemp(prefix="ckptd-other-uid-", dir=parent))
    try:
        base.chmod(0o755)
        config = base / "empty.toml"
        config.touch()
        config.chmod(0o644)
        blocked = checkout_blocked()
        if blocked is None:
            how = f"{sys.executable} and the sources it imports are reachable by every user"
            return OtherUid(base, SETPRIV, [], config, how)
        import ckptd
        import ckptd_client

        started = time.monotonic()
        src = base / "src"
        src.mkdir(mode=0o755)
        src.chmod(0o755)
        for package in (ckptd, ckptd_client):
            pkg = Path(package.__file__ or "").parent
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(pkg, src / pkg.name, ignore=ignore)
        if sys.prefix == sys.base_prefix:  # not a venv: only the sources need mirroring
            python, ckptd_script = Path(sys.executable), CKPTD
        else:
            venv = Path(sys.prefix)
            mirror_tree(venv, base / "venv")
            python = base / "venv" / "bin" / Path(sys.executable).name
            ckptd_script = base / "venv" / "bin" / CKPTD.name
        build_s = time.monotonic() - started
        how = (
            f"run as {python} from a mirror built in {build_s:.1f} s, since other users cannot "
            f"enter {blocked} (mode {blocked.stat().st_mode & 0o7777:04o})"
        )
        prefix = _shim(python, ckptd_script)
        return OtherUid(base, prefix, [str(src)], config, how, build_s)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise


def remove(other: OtherUid) -> None:
    """Remove what :func:`build` made (the mirror's hard links go, the checkout's files stay)."""
    shutil.rmtree(other.base)


class _Shared:
    """One :class:`OtherUid` per session, however many test modules register the fixture (each
    registration is a fixture of its own to pytest): built by the first, removed by the last."""

    def __init__(self) -> None:
        self.current: OtherUid | None = None
        self.users = 0


_SHARED = _Shared()


@pytest.fixture(scope="session")
def other_uid() -> Iterator[OtherUid]:
    """The session's :class:`OtherUid` (register it in a test module as ``other_uid =
    _other_uid.other_uid``; request it only once root and setpriv are known to be there)."""
    if _SHARED.current is None:
        _SHARED.current = build()
    current = _SHARED.current
    _SHARED.users += 1
    try:
        yield current
    finally:
        _SHARED.users -= 1
        if _SHARED.users == 0:
            _SHARED.current = None
            remove(current)


def active() -> OtherUid:
    """The :class:`OtherUid` of the running session (for helpers called from a test body that
    requested :func:`other_uid` through a fixture)."""
    if _SHARED.current is None:
        raise RuntimeError("the other_uid fixture is not set up; request it first")
    return _SHARED.current
