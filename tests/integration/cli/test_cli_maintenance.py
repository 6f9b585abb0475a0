"""The operator CLI as a maintenance tool (issue 11): idempotent runs, quarantine, operator safety.

* ``gc`` / ``prune`` with nothing to do and ``list`` / ``verify`` of an empty store exit 0 with a
  plain message (a cron job must not alarm on every clean run); a root that is not a store exits
  20 and an explicit target that does not exist exits 5, so a mistyped ``--root`` or job name is
  still noticed.
* ``verify`` moves each damaged object to ``<job>/quarantine/`` (unless ``--no-quarantine``) and
  names every checkpoint that uses it, also ones it was not asked to verify.
* ``list`` / ``show`` carry each checkpoint's digest and mark the step committed last.
* ``rm`` asks on a terminal and refuses without one unless ``--yes``; a malformed STEP is a usage
  error for every command; messages name CLI flags, and a library warning is printed once.
* ``stop --wait`` returns once the daemon process is gone.

In-process runs (``ckptd.cli.main.main``) wherever a real process adds nothing; a pseudo-terminal
subprocess for the confirmation prompt (click's test runner has no terminal), a real daemon for
``stop --wait``.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd_client
from ckptd.format.store import Store
from ckptd.protocol import recv_message, send_message
from ckptd_client import Client
from tests.integration import daemon_fixtures
from tests.integration.cli.test_cli import (
    CKPTD,
    CLI,
    CORRUPT,
    NOT_FOUND,
    USAGE,
    _two_steps_latest_object_corrupt,
    cli,
    flip_byte,
    manifest,
    manifest_file,
    object_file,
    save_small,
    table_rows,
)
from tests.integration.daemon_fixtures import DaemonFactory, clean_env, make_state, pid_alive

__all__ = ["cli"]  # the fixture, shared with test_cli.py

daemons = daemon_fixtures.daemons

NO_STORE = 20  # NoStoreError: the root does not exist or is not a ckptd store
UNSUPPORTED = 9  # UnsupportedStateError

BIG = torch.arange(512 * 1024, dtype=torch.float32)
"""2 MiB, more than a pack (1 MiB): stored in an object of its own, shared by every step."""


def save_shared(root: Path, job: str, *steps: int) -> None:
    """Checkpoints whose ``model.big`` is one object shared by all of them (dedup)."""
    for step in steps:
        state = {"big": BIG, "w": torch.full((4,), float(step))}
        ckptd_client.save(job, state, step=step, rng=False, root=root)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (directories as empty entries)."""
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"")
        for p in sorted(path.rglob("*"))
    }


def empty_store(root: Path) -> None:
    """A store whose only job has no checkpoint left (all deleted)."""
    save_small(root, "net", 3)
    Store(root).delete_checkpoint("net", 3)


# ---- 1. nothing to do is not an error -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("gc",), "nothing to collect in {root}: every object is referenced", id="gc"),
        pytest.param(("gc", "net"), "nothing to collect in job 'net'", id="gc-job"),
        pytest.param(
            ("prune",),
            "nothing to prune in {root}: every checkpoint is kept by a retention rule",
            id="prune",
        ),
        pytest.param(("prune", "net"), "nothing to prune in job 'net'", id="prune-job"),
    ],
)
def test_clean_maintenance_exits_0_with_a_plain_message(
    root: Path, cli: CLI, args: tuple[str, ...], message: str
) -> None:
    save_small(root, "net", 1, 2)
    res = cli(*args, "--root", root)
    assert (res.code, res.err) == (0, ""), res
    assert res.out.startswith(message.format(root=root)), res.out
    assert Store(root).steps("net") == [1, 2]
    assert cli(*args, "--root", root) == res  # and again: idempotent


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(("list",), "no checkpoints under {root}\n", id="list"),
        pytest.param(("list", "--json"), "[]\n", id="list-json"),
        pytest.param(("list", "net", "--json"), "[]\n", id="list-job-json"),
        pytest.param(("list", "net"), "no checkpoints of job 'net' under {root}\n", id="list-job"),
        pytest.param(("verify",), "no checkpoints to verify under {root}\n", id="verify"),
        pytest.param(
            ("verify", "net"),
            "no checkpoints of job 'net' to verify under {root}\n",
            id="verify-job",
        ),
        pytest.param(
            ("gc",), "nothing to collect in {root}: every object is referenced\n", id="gc"
        ),
    ],
)
def test_an_empty_store_is_an_empty_result(
    root: Path, cli: CLI, args: tuple[str, ...], expected: str
) -> None:
    empty_store(root)
    Store(root).gc("net")
    res = cli(*args, "--root", root)
    assert (res.code, res.out, res.err) == (0, expected.format(root=root), ""), res


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("list",), "no checkpoints under {root}\n"),
        (("list", "--json"), "[]\n"),
        (("verify",), "no checkpoints to verify under {root}\n"),
        (("gc",), "nothing to collect in {root}: every object is referenced\n"),
        (("prune",), "nothing to prune in {root}: every checkpoint is kept by a retention rule\n"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, tuple) else "",
)
def test_a_new_store_is_an_empty_result(
    root: Path, cli: CLI, args: tuple[str, ...], expected: str
) -> None:
    """A store with no job yet (as a daemon makes its root) is a store, and empty."""
    Store(root).initialize()
    res = cli(*args, "--root", root)
    assert (res.code, res.out, res.err) == (0, expected.format(root=root), ""), res


@pytest.mark.parametrize(
    "args",
    [
        ("list",),
        ("list", "--json"),
        ("show", "net", "1"),
        ("verify",),
        ("restore", "net", "-o", "{tmp}/out.pt"),
        ("rm", "net", "1", "--yes"),
        ("gc",),
        ("prune",),
        ("pin", "net", "1"),
        ("unpin", "net", "1"),
    ],
    ids=lambda args: "-".join(a for a in args if not a.startswith("{")),
)
@pytest.mark.parametrize("kind", ["missing", "not-a-store"])
def test_a_root_that_is_not_a_store_exits_20(
    root: Path, cli: CLI, tmp_path: Path, args: tuple[str, ...], kind: str
) -> None:
    """A mistyped --root must not look like an empty store, and nothing may be created there."""
    if kind == "not-a-store":
        (root / "src").mkdir(parents=True)
        (root / "notes.txt").write_text("not checkpoints\n")
    before = tree(root) if root.exists() else None
    res = cli(*(a.format(tmp=tmp_path) for a in args), "--root", root)
    assert res.code == NO_STORE, res
    assert res.out == ""
    assert res.err.startswith("error: ") and str(root) in res.err, res.err
    assert (tree(root) if root.exists() else None) == before
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        pytest.param(("list", "ghost"), "no job 'ghost' under {root} (jobs: net)", id="list"),
        pytest.param(("list", "ghost", "--json"), "no job 'ghost'", id="list-json"),
        pytest.param(("verify", "ghost"), "no job 'ghost' under {root}", id="verify"),
        pytest.param(("gc", "ghost"), "no job 'ghost' under {root}", id="gc"),
        pytest.param(("prune", "ghost"), "no job 'ghost' under {root}", id="prune"),
        pytest.param(
            ("show", "net", "99"), "no checkpoint at step 99; steps that exist: 1, 2", id="show"
        ),
        pytest.param(("verify", "net", "99"), "steps that exist: 1, 2", id="verify-step"),
        pytest.param(
            ("unpin", "net", "99"),
            "job 'net' has neither a checkpoint nor a pin at step 99",
            id="unpin",
        ),
    ],
)
def test_an_explicit_target_that_does_not_exist_exits_5(
    root: Path, cli: CLI, args: tuple[str, ...], fragment: str
) -> None:
    save_small(root, "net", 1, 2)
    res = cli(*args, "--root", root)
    assert res.code == NOT_FOUND, res
    assert res.out == ""
    assert fragment.format(root=root) in res.err, res.err


def test_unpin_of_a_checkpoint_that_is_not_pinned_is_done(root: Path, cli: CLI) -> None:
    save_small(root, "net", 1)
    assert cli("pin", "net", "1", "--root", root).code == 0
    assert cli("unpin", "net", "1", "--root", root).out == "unpinned net step 1\n"
    res = cli("unpin", "net", "1", "--root", root)
    assert (res.code, res.out, res.err) == (
        0,
        "net step 1 was not pinned (pinned steps: none)\n",
        "",
    ), res


# ---- 2. verify quarantines damaged objects ------------------------------------------------------


def test_verify_quarantines_a_damaged_object_and_names_every_checkpoint_using_it(
    root: Path, cli: CLI
) -> None:
    save_shared(root, "net", 3, 5)
    save_shared(root, "other", 1)
    obj = object_file(root, "net", 5, "model.big")
    assert obj.name in manifest(root, "net", 3).objects  # precondition: shared by both steps
    other_before = tree(root / "other")
    flip_byte(obj)
    damaged = obj.read_bytes()

    # Asked about step 5 only: step 3 uses the same object, so it is named too.
    res = cli("verify", "net", "5", "--root", root)
    assert res.code == CORRUPT, res
    quarantine = root / "net" / "quarantine"
    lines = res.out.splitlines()
    assert lines[0].startswith(f"FAIL net step 5: object {obj} (holding tensor model.big)")
    assert f"net: moved 1 damaged object(s) to {quarantine}" in lines
    assert any(
        re.fullmatch(rf"\s+quarantined {obj.name} \(referenced by net steps 3, 5\)", line)
        for line in lines
    ), res.out
    assert (
        "  net step(s) 3, 5 no longer restore: delete them with `ckptd rm net STEP`; a new "
        "snapshot of the same content writes the object again"
    ) in lines
    assert "error: 1 of 1 checkpoint(s) failed verification" in res.err
    assert not obj.exists()
    moved = [p for p in quarantine.rglob("*") if p.is_file()]
    assert [p.read_bytes() for p in moved] == [damaged]
    assert obj.name in moved[0].name
    assert tree(root / "other") == other_before

    # Now step 3 misses the object; there is nothing left to move.
    res = cli("verify", "net", "--root", root)
    assert res.code == CORRUPT, res
    assert any(
        re.fullmatch(rf"\s+missing\s+{obj.name} \(referenced by net steps 3, 5\)", line)
        for line in res.out.splitlines()
    ), res.out
    assert "net: objects that fail verification (nothing to move)" in res.out
    assert "net: moved" not in res.out
    assert [p.read_bytes() for p in quarantine.rglob("*") if p.is_file()] == [damaged]

    # A new snapshot of the same content writes the object again: every checkpoint restores.
    save_shared(root, "net", 7)
    res = cli("verify", "--root", root)
    assert res.code == 0, res
    assert [line.split(" (")[0] for line in res.out.splitlines()] == [
        "ok   net step 3",
        "ok   net step 5",
        "ok   net step 7",
        "ok   other step 1",
    ]
    assert torch.equal(ckptd_client.load("net", 3, root=root)["model"]["big"], BIG)


def test_verify_names_a_checkpoint_committed_while_it_waited_for_the_lock(
    root: Path, cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that trusts the damaged object (checked before it rotted) commits a checkpoint
    naming it between verify's first look and the move: that checkpoint is broken too, and the
    report must say so."""
    save_shared(root, "net", 3)
    obj = object_file(root, "net", 3, "model.big")
    flip_byte(obj)
    real = Store.quarantine_object

    def commit_then_move(self: Store, job: str, digest: str, **kw: Any) -> Path | None:
        m = self.read_manifest(job, 3)
        self.commit_manifest(replace(m, step=9, seq=0))  # what such a writer commits
        monkeypatch.setattr(Store, "quarantine_object", real)
        return real(self, job, digest, **kw)

    monkeypatch.setattr(Store, "quarantine_object", commit_then_move)
    res = cli("verify", "net", "3", "--root", root)
    assert res.code == CORRUPT, res
    assert "  net step(s) 3, 9 no longer restore" in res.out, res.out


def test_verify_no_quarantine_only_reports(root: Path, cli: CLI) -> None:
    save_shared(root, "net", 3, 5)
    obj = object_file(root, "net", 5, "model.big")
    flip_byte(obj)
    before = tree(root)

    res = cli("verify", "--no-quarantine", "--root", root)
    assert res.code == CORRUPT, res
    lines = res.out.splitlines()
    assert "net: damaged objects, left in place (--no-quarantine)" in lines
    assert any(
        re.fullmatch(rf"\s+damaged\s+{obj.name} \(referenced by net steps 3, 5\)", line)
        for line in lines
    ), res.out
    assert "  net step(s) 3, 5 no longer restore: delete them with `ckptd rm net STEP`" in (res.out)
    assert "error: 2 of 2 checkpoint(s) failed verification" in res.err
    assert tree(root) == before  # read-only: not a byte changed, nothing created


def test_verify_messages_name_cli_flags(root: Path, cli: CLI) -> None:
    _two_steps_latest_object_corrupt(root)
    res = cli("verify", "--no-quarantine", "--root", root)
    assert res.code == CORRUPT, res
    assert "fallback=True" not in res.out + res.err
    assert "(or `ckptd restore JOB latest --fallback` for the newest one that verifies)" in res.out


# ---- 3. digest and commit order ------------------------------------------------------------------


def make_old(root: Path, job: str, step: int) -> None:
    """Rewrite a manifest as ckptd wrote it before checkpoints had a digest and a commit order."""
    m = manifest(root, job, step)
    assert m.digest is not None and m.seq > 0
    manifest_file(root, job, step).write_bytes(replace(m, seq=0, digest=None).to_json())


def test_list_and_show_carry_the_digest(root: Path, cli: CLI) -> None:
    save_small(root, "net", 3, 5, 6)
    m3, m5 = manifest(root, "net", 3), manifest(root, "net", 5)
    assert m3.digest and m5.digest and m3.digest != m5.digest
    make_old(root, "net", 6)
    assert manifest(root, "net", 6).digest is None

    res = cli("list", "--json", "--root", root)
    assert res.code == 0, res
    assert [(r["step"], r["digest"]) for r in json.loads(res.out)] == [
        (3, m3.digest),
        (5, m5.digest),
        (6, None),
    ]
    res = cli("list", "--root", root)
    assert res.code == 0, res
    rows = table_rows(res.out)
    # a manifest without a commit number counts as committed before every one with a number
    assert [row[:2] for row in rows] == [["net", "3"], ["net", "5 (latest)"], ["net", "6"]]
    assert [row[8] for row in rows] == [m3.digest[:12], m5.digest[:12], "-"]

    res = cli("show", "net", "3", "--json", "--root", root)
    assert json.loads(res.out)["digest"] == m3.digest
    res = cli("show", "net", "3", "--root", root)
    assert f"\ndigest {m3.digest}\n" in res.out
    res = cli("show", "net", "6", "--json", "--root", root)
    assert json.loads(res.out)["digest"] is None


def test_list_marks_the_step_committed_last(root: Path, cli: CLI) -> None:
    """A run resumed from step 3 commits step 4 after step 5: 'latest' is 4, not the highest."""
    save_small(root, "net", 3, 5, 4)
    save_small(root, "other", 1, 2)

    res = cli("list", "--root", root)
    assert res.code == 0, res
    assert [row[:2] for row in table_rows(res.out)] == [
        ["net", "3"],
        ["net", "4 (latest)"],
        ["net", "5"],
        ["other", "1"],
        ["other", "2"],  # latest and highest: not marked
    ]
    res = cli("list", "--json", "--root", root)
    assert [(r["job"], r["step"]) for r in json.loads(res.out) if r["latest"]] == [
        ("net", 4),
        ("other", 2),
    ]
    for step, expected in (("latest", 4), ("highest", 5)):
        res = cli("show", "net", step, "--json", "--root", root)
        assert (res.code, json.loads(res.out)["step"]) == (0, expected), res


# ---- 4. operator papercuts -----------------------------------------------------------------------


STEP_COMMANDS = [
    ("show", "net", "{step}"),
    ("verify", "net", "{step}"),
    ("restore", "net", "{step}", "-o", "{tmp}/out.pt"),
    ("rm", "net", "{step}", "--yes"),
    ("pin", "net", "{step}"),
    ("unpin", "net", "{step}"),
]


@pytest.mark.parametrize("step", ["abc", "-1", "1.5", "", "1000000000000", "３"])
@pytest.mark.parametrize("command", STEP_COMMANDS, ids=lambda c: c[0])
def test_a_malformed_step_is_a_usage_error(
    root: Path, cli: CLI, tmp_path: Path, command: tuple[str, ...], step: str
) -> None:
    save_small(root, "net", 1)
    before = tree(root)
    res = cli(*(a.format(step=step, tmp=tmp_path) for a in command), "--root", root)
    assert res.code == USAGE, res
    assert re.search(r"Invalid value for '\[?STEP\]?'", res.err), res.err  # [STEP]: optional
    assert f"{step!r} is not a step" in res.err
    assert "'latest'" in res.err and "'highest'" in res.err
    assert tree(root) == before


def test_rm_without_a_terminal_requires_yes(
    root: Path, cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script must neither hang on a question nor delete without saying so: it passes --yes."""
    save_small(root, "net", 1, 2)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # an answer, but not a terminal
    res = cli("rm", "net", "1", "--root", root)
    assert res.code == USAGE, res
    assert "not deleting net step 1" in res.err
    assert "stdin is not a terminal; pass --yes (-y)" in res.err
    assert Store(root).steps("net") == [1, 2]
    assert sys.stdin.read() == "y\n"  # nothing was read

    res = cli("rm", "net", "1", "--yes", "--root", root)
    assert (res.code, res.out) == (0, "removed net step 1\n"), res
    res = cli("rm", "-y", "net", "latest", "--root", root)
    assert (res.code, res.out) == (0, "removed net step 2\n"), res
    assert Store(root).steps("net") == []


def answer_in_terminal(args: list[str], env: dict[str, str], answer: bytes) -> tuple[int, str]:
    """Run the console script on a pseudo-terminal, answer its question (once asked) with
    ``answer``; return its exit code and everything it wrote there."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [str(CKPTD), *args], stdin=slave, stdout=slave, stderr=slave, env=env
        )
    finally:
        os.close(slave)
    seen = b""
    answered = False
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, f"no output for 120 s: {seen!r}"
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the process has exited and closed the terminal
                break
            if not data:
                break
            seen += data
            if not answered and b"[y/N]" in seen:
                os.write(master, answer)
                answered = True
    finally:
        os.close(master)
    code = proc.wait(timeout=120)
    return code, seen.decode().replace("\r\n", "\n")


@pytest.mark.parametrize(("answer", "deleted"), [(b"n\n", False), (b"y\n", True)])
def test_rm_asks_on_a_terminal(root: Path, tmp_path: Path, answer: bytes, deleted: bool) -> None:
    save_small(root, "net", 1, 2)
    env = clean_env(tmp_path, CKPTD_ROOT=str(root))
    code, text = answer_in_terminal(["rm", "net", "1"], env, answer)
    assert "Delete checkpoint net step 1? [y/N]" in text, text
    if deleted:
        assert code == 0, text
        assert "removed net step 1" in text
        assert Store(root).steps("net") == [2]
    else:
        assert code == 1, text
        assert "not deleted: net step 1" in text
        assert Store(root).steps("net") == [1, 2]


def test_restore_messages_name_flags_and_warn_once(root: Path, cli: CLI, tmp_path: Path) -> None:
    _two_steps_latest_object_corrupt(root)
    out = tmp_path / "out.pt"
    res = cli("restore", "net", "-o", out, "--root", root)
    assert res.code == CORRUPT, res
    assert "fallback=True" not in res.err
    assert "(or `ckptd restore JOB latest --fallback` for the newest one that verifies)" in res.err

    # Not wrapped in warnings.catch_warnings: pytest turns an escaping warning into an error.
    res = cli("restore", "net", "-o", out, "--fallback", "--root", root)
    assert res.code == 0, res
    assert res.out.rstrip().endswith("from net step 3")
    warned = [line for line in res.err.splitlines() if "skipping newer checkpoint(s)" in line]
    assert len(warned) == 1, res.err
    assert warned[0].startswith("warning: job 'net': restored step 3, skipping newer checkpoint")
    assert "FallbackWarning" not in res.err and "fallback=True" not in res.err


def test_restore_of_a_pickled_value_says_how_to_load_it(
    root: Path, cli: CLI, tmp_path: Path
) -> None:
    ckptd_client.save(
        "net", state={"when": {1, 2}}, step=1, rng=False, root=root, allow_pickle=True
    )
    res = cli("restore", "net", "-o", tmp_path / "out.pt", "--root", root)
    assert res.code == UNSUPPORTED, res
    assert "this value was stored pickled; `ckptd restore` never unpickles" in res.err
    assert "ckptd_client.load(..., allow_pickle=True)" in res.err


# ---- stop --wait ---------------------------------------------------------------------------------


def test_stop_wait_returns_once_the_daemon_has_exited(daemons: DaemonFactory, cli: CLI) -> None:
    daemon = daemons.start()
    with Client("drain", socket=daemon.socket, root=daemon.root, spawn=False) as client:
        pending = client.snapshot(state=make_state(7, 16), step=1)
        res = cli("stop", "--wait", "--socket", daemon.socket)
        gone = not pid_alive(daemon.pid)  # at once: --wait returned after the exit
        assert res.code == 0, res
        assert gone, res
        assert res.out.splitlines() == [
            f"ckptd (pid {daemon.pid}) is draining; waiting up to 120 s for it to exit",
            f"ckptd (pid {daemon.pid}) has exited",
        ]
        assert daemon.proc.wait(10) == 0
        assert pending.wait(timeout=10).step == 1  # drained before the exit
    assert Store(daemon.root).steps("drain") == [1]


@contextmanager
def never_exiting_daemon(path: Path) -> Iterator[None]:
    """A fake daemon on ``path`` that answers ``status`` and ``stop`` but never exits (it is
    this test process): ``stop --wait`` can only time out."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen()
    done = threading.Event()

    def serve() -> None:
        try:
            for op in ("status", "stopping"):  # stop --wait connects twice
                conn, _ = listener.accept()
                with conn:
                    msg, _fds = recv_message(conn)
                    assert msg is not None
                    send_message(conn, {"op": op, "id": msg["id"], "pid": os.getpid()})
        except OSError:
            if not done.is_set():  # not woken by the shutdown below
                raise

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting
        except OSError:
            pass
        thread.join(10)
        listener.close()


def test_stop_wait_times_out_with_a_clear_message(cli: CLI) -> None:
    sock = daemon_fixtures.short_tmp() / "d.sock"
    try:
        with never_exiting_daemon(sock):
            res = cli("stop", "--wait", "--timeout", "0.3", "--socket", sock)
        assert res.code == 1, res
        assert f"error: ckptd (pid {os.getpid()}) on {sock} is still running 0.3 s after it" in (
            res.err.replace("\n", " ")
        )
        assert "--timeout SECONDS" in res.err
    finally:
        sock.unlink(missing_ok=True)
        sock.parent.rmdir()


def test_stop_timeout_needs_wait(cli: CLI, tmp_path: Path) -> None:
    res = cli("stop", "--timeout", "5", "--socket", tmp_path / "d.sock")
    assert res.code == USAGE, res
    assert "--timeout applies only with --wait" in res.err
