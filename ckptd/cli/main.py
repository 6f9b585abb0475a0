"""``ckptd``: the operators' command line.

Tables for people (rich), ``--json`` for scripts, progress bars on a terminal for long verify and
restore runs. Each error type exits with its own code (see :data:`ckptd.errors.EXIT_CODES`).

Maintenance is idempotent: ``gc`` / ``prune`` with nothing to do, and ``list`` / ``verify`` of an
empty store, exit 0 with a plain message, so a cron job alarms only on real problems. What must
stay loud is a root that is not a store (a mistyped ``--root`` would otherwise look like an empty
store: every store command calls :meth:`Store.check_store` first) and an explicit target that does
not exist (``ckptd show job 99``).

Library messages name Python arguments (``fallback=True``); the CLI prints them with its own flags
(:func:`cli_words`), and prints each library warning once (a message that is both logged and
raised as a Python warning would otherwise show twice).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import socket
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import click
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from ckptd.config import load_config, resolve_root
from ckptd.errors import (
    CkptdError,
    CorruptCheckpointError,
    DaemonUnavailableError,
    FormatVersionError,
    NotFoundError,
    error_from_reply,
)
from ckptd.format.manifest import MAX_STEP, Manifest
from ckptd.format.restore import FallbackWarning, load_checkpoint, verify_manifest
from ckptd.format.skeleton import iter_keys
from ckptd.format.store import Store, validate_job_name
from ckptd.locate import store_root
from ckptd.policy.prune import job_facts, prune
from ckptd.policy.retention import decide

F = TypeVar("F", bound=Callable[..., Any])

# Not a terminal (a pipe, CI): wide enough that tables are not truncated.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def say(console: Console, label: str, style: str, message: str) -> None:
    """Print ``label`` styled and ``message`` verbatim (paths and shapes contain brackets)."""
    console.print(Text.assemble((label, style), " ", message))


def _store(root: str | None, config: str | None) -> Store:
    """The store to act on: ``--root``, else as clients find it (``ckptd.locate``: CKPTD_ROOT,
    store.root, the running daemon's root, ./checkpoints)."""
    return Store(store_root(root, load_config(config) if root is None else None))


def store_options(func: F) -> F:
    func = click.option(
        "--config",
        "config",
        metavar="FILE",
        default=None,
        help="Config file (default: CKPTD_CONFIG, ~/.config/ckptd/ckptd.toml, "
        "/etc/ckptd/ckptd.toml).",
    )(func)
    return click.option(
        "--root",
        "root",
        metavar="DIR",
        default=None,
        help="Checkpoint root (default: CKPTD_ROOT, then store.root in the config, then the "
        "root of the daemon answering on the socket, then ./checkpoints).",
    )(func)


# ---- arguments ---------------------------------------------------------------------------------

STEP_WORDS = ("latest", "highest")
STEP_HELP = (
    f"a step number (0 to {MAX_STEP}), 'latest' (the most recently committed checkpoint) or "
    "'highest' (the highest step number)"
)
_STEP_RE = re.compile(r"[0-9]+")

if TYPE_CHECKING:
    _StepBase = click.ParamType[int | str]
else:  # click before 8.4 has no generic ParamType (pyproject allows click>=8.1)
    _StepBase = click.ParamType


class StepParam(_StepBase):
    """A STEP argument: a non-negative step number, ``latest`` or ``highest``.

    Checked while the command line is parsed, so ``abc``, ``1.5`` or ``-1`` is a usage error
    (exit 2) naming the argument, not a "not found" after the store was opened.
    """

    name = "step"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | str:
        text = str(value)
        if text in STEP_WORDS:
            return text
        if _STEP_RE.fullmatch(text) and int(text) <= MAX_STEP:
            return int(text)
        self.fail(f"{text!r} is not a step; give {STEP_HELP}", param, ctx)


STEP = StepParam()


class StepCommand(click.Command):
    """A command with a STEP argument: ``-1`` is a malformed step, not an unknown option.

    Click takes every word that starts with ``-`` for an option, so ``ckptd rm job -1`` would say
    "No such option: -1"; this reports it as the bad STEP it is.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            name = exc.option_name or ""
            step = next((p for p in self.params if p.name == "step"), None)
            if step is None or not re.fullmatch(r"-[0-9][0-9.eE+-]*", name):
                raise
            raise click.BadParameter(
                f"{name!r} is not a step; give {STEP_HELP}", ctx=ctx, param=step
            ) from None


def stdin_is_terminal() -> bool:
    """Whether someone could answer a question on stdin (closed or missing stdin: no)."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):
        return False


# ---- library messages in CLI words -------------------------------------------------------------

# Library messages advise Python callers; on the command line each names the flag instead.
_CLI_WORDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"\((?:or )?(?:pass|use) fallback=True\)"),
        "(or `ckptd restore JOB latest --fallback` for the newest one that verifies)",
    ),
    (
        re.compile(r"pass allow_pickle=True to\s+load it"),
        "`ckptd restore` never unpickles; load it in Python with "
        "ckptd_client.load(..., allow_pickle=True)",
    ),
    (re.compile(r"\bfallback=True\b"), "--fallback"),
)


def cli_words(message: str) -> str:
    """``message`` (from library code) with Python arguments replaced by the CLI's flags."""
    for pattern, words in _CLI_WORDS:
        message = pattern.sub(words, message)
    return message


class _Once(logging.Handler):
    """Prints ckptd's warning log records through ``show`` (which drops repeats)."""

    def __init__(self, show: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self._show = show

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._show(record.getMessage())
        except Exception:  # a logging handler must not raise into the code that logged
            self.handleError(record)


@contextmanager
def library_messages() -> Iterator[None]:
    """Print each warning of ckptd's library code once, as ``warning: ...`` on stderr.

    ``load_checkpoint(fallback=True)`` both logs its FallbackWarning and raises it as a Python
    warning: unhandled, a terminal shows it twice (Python's last-resort log handler, then the
    warning with a file name and a source line). Here both routes print through one function
    that drops repeats and says it in CLI words. The daemon (``ckptd start``) configures its own
    logging and does not run under this.
    """
    shown: set[str] = set()

    def show(message: str) -> None:
        text = cli_words(message)
        if text not in shown:
            shown.add(text)
            say(err, "warning:", "yellow", text)

    def showwarning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        show(str(message))

    logger = logging.getLogger("ckptd")
    handler = _Once(show)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("always", category=FallbackWarning)
            warnings.filterwarnings("always", module=r"ckptd(\..*)?$")
            warnings.showwarning = showwarning
            yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


# ---- the store ---------------------------------------------------------------------------------


def require_job(store: Store, job: str) -> None:
    """Raise NotFoundError unless ``job`` exists (a job whose checkpoints were all deleted still
    exists: listing it gives an empty result, collecting its garbage is useful)."""
    validate_job_name(job)
    if not (store.job_dir(job) / "manifests").is_dir():
        raise NotFoundError(
            f"no job {job!r} under {store.root} (jobs: {', '.join(store.jobs()) or 'none'})"
        )


FOLDED_MIN = 12
"""Columns that fold (job, kept by) need at least this much to stay readable."""


def table_fits(columns: list[str], rows: list[list[str]], width: int) -> bool:
    """Whether a ``list`` table of ``rows`` fits ``width`` columns without squeezing a column
    that does not fold (rich would cut it to "…" or drop the job column altogether)."""
    need = 0
    for i, col in enumerate(columns):
        natural = max([len(col), *(len(row[i]) for row in rows)])
        need += (min(natural, FOLDED_MIN) if col in ("job", "kept by") else natural) + 3
    return need - 1 <= width


def short_digest(digest: str | None) -> str:
    """The first 12 hex digits (like a short git hash), or "-" for a manifest without one."""
    return digest[:12] if digest else "-"


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def summary(m: Manifest) -> dict[str, Any]:
    """The ``list --json`` record of a checkpoint."""
    metric = m.metric if m.metric is None or math.isfinite(m.metric) else str(m.metric)
    return {
        "job": m.job,
        "step": m.step,
        "created": m.created,
        "raw_bytes": m.raw_bytes,
        "stored_bytes": m.stored_bytes,
        "written_bytes": m.written_bytes,
        "ratio": round(m.stored_bytes / m.raw_bytes, 4) if m.raw_bytes else None,
        "tensors": len(m.tensors),
        "metric": metric,
        "digest": m.digest,
    }


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A byte progress bar on a terminal (stderr); no output when not interactive."""
    if not err.is_terminal or total < (64 << 20):
        yield None
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 ok (also when there was nothing to do), 1 other error, 2 usage, "
    "5 no such job or checkpoint, 7 corrupt checkpoint (also a failed verify), "
    "20 the root is not a ckptd store; the README lists them all.",
)
@click.version_option(package_name="ckptd")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """ckptd: asynchronous, crash-safe checkpoints for PyTorch training."""
    if ctx.invoked_subcommand != "start":  # the daemon sets up its own logging
        ctx.with_resource(library_messages())


@cli.command("list")
@click.argument("job", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array for scripts.")
@store_options
def list_cmd(job: str | None, as_json: bool, root: str | None, config: str | None) -> None:
    """List checkpoints (of JOB, or of every job).

    The step committed last is marked "(latest)" when it is not the highest step (a run resumed
    from an earlier checkpoint); `--json` marks it with "latest": true in every case.
    """
    cfg = load_config(config)  # for the retention policies
    store = _store(root, config)
    store.check_store()
    if job is not None:
        require_job(store, job)
    jobs = [job] if job else store.jobs()
    manifests = []
    broken = []
    kept: dict[tuple[str, int], list[str]] = {}
    latest: dict[str, int] = {}
    for j in jobs:
        steps = store.steps(j)
        readable = True
        for step in steps:
            try:
                manifests.append(store.read_manifest(j, step))
            except CorruptCheckpointError as exc:
                broken.append(str(exc))
                readable = False
        if readable and steps:  # retention and commit order need every manifest of the job
            policy = cfg.policy_for(j, store.job_info(j).get("retention"))
            for step, why in decide(policy, job_facts(store, j)).items():
                kept[(j, step)] = why
            latest[j] = store.resolve_step(j, "latest")
    if as_json:
        docs = [
            summary(m)
            | {"latest": latest.get(m.job) == m.step, "kept_by": kept.get((m.job, m.step), [])}
            for m in manifests
        ]
        out.print_json(json.dumps(docs))
    elif not manifests and not broken:
        what = "checkpoints" if job is None else f"checkpoints of job {job!r}"
        out.print(f"no {what} under {store.root}", markup=False)
    else:
        highest = {m.job: m.step for m in manifests}  # manifests come in step order
        columns = [
            "job",
            "step",
            "created",
            "raw",
            "stored",
            "ratio",
            "tensors",
            "metric",
            "digest",
            "kept by",
        ]
        rows = []
        for m in manifests:
            s = summary(m)
            mark = " (latest)" if latest.get(m.job) == m.step != highest[m.job] else ""
            rows.append(
                [
                    m.job,
                    f"{m.step}{mark}",
                    m.created.replace("T", " ")[:16],
                    human_bytes(m.raw_bytes),
                    human_bytes(m.stored_bytes),
                    f"{s['ratio']:.3f}" if s["ratio"] is not None else "-",
                    str(len(m.tensors)),
                    "-" if m.metric is None else f"{m.metric:.6g}",
                    short_digest(m.digest),
                    ", ".join(kept.get((m.job, m.step), [])) or "(prunable)",
                ]
            )
        if not table_fits(columns, rows, out.width):
            # The digest goes first on a narrow terminal (`show` and --json carry it), so
            # that job and step stay readable.
            i = columns.index("digest")
            del columns[i]
            for row in rows:
                del row[i]
        table = Table(title=f"checkpoints in {store.root}", box=box.HEAVY_HEAD, show_edge=False)
        for col in columns:
            # Values never shrink (rich would blank them); job names and "kept by" fold instead.
            fold = col in ("job", "kept by")
            table.add_column(
                col,
                justify="left" if col in ("job", "created", "digest", "kept by") else "right",
                no_wrap=not fold,
                overflow="fold" if fold else "ellipsis",
            )
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        out.print(table)
    for msg in broken:
        say(err, "unreadable manifest:", "red", msg)
    if broken:
        raise CorruptCheckpointError(f"{len(broken)} manifest(s) could not be read")


@cli.command("show", cls=StepCommand)
@click.argument("job")
@click.argument("step", type=STEP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@store_options
def show_cmd(
    job: str, step: int | str, as_json: bool, root: str | None, config: str | None
) -> None:
    """Show the tensors and state keys of checkpoint JOB STEP.

    STEP is a step number, 'latest' (the most recently committed) or 'highest'.
    """
    store = _store(root, config)
    store.check_store()
    m = store.read_manifest(job, store.resolve_step(job, step))
    keys = iter_keys(m.skeleton)
    if as_json:
        doc = summary(m) | {
            "tensors": [
                {"path": t.path, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
                for t in m.tensors
            ],
            "keys": keys,
        }
        out.print_json(json.dumps(doc))
        return
    s = summary(m)
    out.print(
        f"{m.job} step {m.step}  created {m.created}  {len(m.tensors)} tensors  "
        f"raw {human_bytes(m.raw_bytes)}  stored {human_bytes(m.stored_bytes)} "
        f"(ratio {s['ratio']})  metric {s['metric']}",
        markup=False,
    )
    out.print(f"digest {m.digest or '- (written before checkpoints had one)'}", markup=False)
    table = Table()
    for col in ("path", "dtype", "shape", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for t in m.tensors:
        table.add_row(Text(t.path), t.dtype, Text(str(list(t.shape))), human_bytes(t.nbytes))
    out.print(table)
    out.print("[bold]state keys[/]")
    for k in keys:
        out.print(f"  {k}", markup=False)


def damaged_object(store: Store, m: Manifest, problem: str) -> str | None:
    """The digest of the object a :func:`verify_manifest` failure is about, if it is about one.

    verify_manifest reports a failing object as ``object <its path> (holding ...)...``; the path
    names the digest. Failures that name no object (an unreadable file: permission, I/O) give
    None: nothing is wrong with any object's content.
    """
    for digest in m.objects:
        if problem.startswith(f"object {store.object_path(m.job, digest)} ("):
            return digest
    return None


def still_damaged(store: Store, m: Manifest, digest: str) -> bool:
    """Whether object ``digest`` of ``m`` still fails verification, checked again right before
    it is moved: a verify run can take hours, and a writer that finds an object damaged writes it
    again, after which moving it would break the checkpoints that now rely on it."""
    tensors = tuple(
        replace(t, pieces=tuple(p for p in t.pieces if p.object == digest))
        for t in m.tensors
        if any(p.object == digest for p in t.pieces)
    )
    only = replace(m, tensors=tensors, objects={digest: m.objects[digest]})
    return bool(verify_manifest(store, only, threads=1))


@contextmanager
def muted(logger_name: str) -> Iterator[None]:
    """Silence a library logger's warnings while the CLI reports the same events itself."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class Damage:
    """What verify found wrong with one job's objects, and what became of them."""

    digests: dict[str, Manifest] = field(default_factory=dict)
    """Each damaged object, with a checkpoint that names it."""
    referrers: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    unreadable: list[int] = field(default_factory=list)
    """Steps whose manifest could not be read while looking for referrers."""


def find_referrers(store: Store, job: str, damage: Damage) -> None:
    """Record in ``damage`` which checkpoints of ``job`` name each damaged object."""
    damage.referrers.clear()
    damage.unreadable.clear()
    for step in store.steps(job):
        try:
            m = store.read_manifest(job, step)
        except CkptdError:
            damage.unreadable.append(step)
            continue
        for digest in damage.digests.keys() & m.objects.keys():
            damage.referrers[digest].append(step)


def report_damage(store: Store, job: str, damage: Damage, quarantine: bool) -> None:
    """Find every checkpoint of ``job`` that names a damaged object, move the damaged objects
    aside (unless ``quarantine`` is false) and say what that means for those checkpoints.

    Every manifest of the job is read, not only the ones verified: objects are shared between
    checkpoints, so ``verify JOB STEP`` finding one damaged also breaks older checkpoints. Moving
    a damaged object aside (``<job>/quarantine/``) makes the next snapshot of the same content
    write it again instead of trusting the damaged file, and keeps it for inspection. A missing
    object has nothing to move; an object of a newer format is not damaged and stays.
    """
    find_referrers(store, job, damage)
    moved: list[Path] = []
    lines: list[str] = []
    broken_steps: set[int] = set()
    for digest in sorted(damage.digests):
        steps = damage.referrers[digest]
        where = f"referenced by {job} step{'s' if len(steps) != 1 else ''} " + (
            ", ".join(map(str, steps)) or "none"
        )
        if not store.object_path(job, digest).exists():
            lines.append(f"  missing     {digest} ({where})")
            broken_steps.update(steps)
            continue
        try:
            store.object_header(job, digest)
        except FormatVersionError as exc:
            lines.append(f"  not moved   {digest}: {exc}")
            continue
        except CkptdError:
            pass  # a damaged header: as damaged as a damaged body
        m = damage.digests[digest]
        if not quarantine:
            if not still_damaged(store, m, digest):
                lines.append(f"  not moved   {digest}: it verifies now (written again meanwhile)")
                continue
            broken_steps.update(steps)
            lines.append(f"  damaged     {digest} ({where})")
            continue
        try:
            with muted("ckptd.format.store"):  # its "moved damaged object" warning: reported below
                # Checked again under the job lock, right before the move (see Store).
                dest = store.quarantine_object(
                    job, digest, still_damaged=functools.partial(still_damaged, store, m, digest)
                )
            if dest is None:
                lines.append(f"  not moved   {digest}: it verifies now (written again meanwhile)")
                continue
            broken_steps.update(steps)
            moved.append(dest)
        except NotFoundError:
            broken_steps.update(steps)  # another verify moved it first
            lines.append(f"  not moved   {digest}: already moved to quarantine (another verify?)")
            continue
        except CkptdError as exc:
            broken_steps.update(steps)
            lines.append(
                f"  not moved   {digest} ({where}): {cli_words(str(exc))}; run verify as the "
                "store's owner, or pass --no-quarantine"
            )
            continue
        lines.append(f"  quarantined {digest} ({where})")
    if moved:
        # A snapshot that deduped against a damaged object while verify waited for the job lock
        # committed before the move: it is broken too, so look again.
        find_referrers(store, job, damage)
        for dest in moved:
            broken_steps.update(damage.referrers.get(dest.name.split(".")[0], ()))
        head = f"{job}: moved {len(moved)} damaged object(s) to {moved[0].parent}"
    elif quarantine:
        head = f"{job}: objects that fail verification (nothing to move)"
    else:
        head = f"{job}: damaged objects, left in place (--no-quarantine)"
    out.print(head, markup=False)
    for line in lines:
        out.print(line, markup=False)
    if damage.unreadable:
        steps_text = ", ".join(map(str, damage.unreadable))
        out.print(
            f"  could not check steps {steps_text} (unreadable manifests) for references to them",
            markup=False,
        )
    if broken_steps:
        steps_text = ", ".join(map(str, sorted(broken_steps)))
        out.print(
            f"  {job} step(s) {steps_text} no longer restore: delete them with `ckptd rm {job} "
            "STEP`; a new snapshot of the same content writes the object again",
            markup=False,
        )


@cli.command("verify", cls=StepCommand)
@click.argument("job", required=False)
@click.argument("step", required=False, type=STEP)
@click.option("--threads", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option(
    "--no-quarantine",
    "no_quarantine",
    is_flag=True,
    help="Only report: leave damaged objects where they are (read-only verification).",
)
@store_options
def verify_cmd(
    job: str | None,
    step: int | str | None,
    threads: int,
    no_quarantine: bool,
    root: str | None,
    config: str | None,
) -> None:
    """Recompute every hash (of JOB STEP, JOB, or everything); non-zero on any failure.

    STEP is a step number, 'latest' (the checkpoint committed last) or 'highest'.

    Each damaged object is moved to JOB/quarantine/ (unless --no-quarantine), and every
    checkpoint that names it is reported: those no longer restore.
    """
    store = _store(root, config)
    store.check_store()
    if job is None:
        targets = [(j, s) for j in store.jobs() for s in store.steps(j)]
    elif step is None:
        require_job(store, job)
        targets = [(job, s) for s in store.steps(job)]
    else:
        targets = [(job, store.resolve_step(job, step))]
    if not targets:
        what = "checkpoints" if job is None else f"checkpoints of job {job!r}"
        out.print(f"no {what} to verify under {store.root}", markup=False)
        return
    failures = 0
    damage: dict[str, Damage] = {}
    for j, s in targets:
        try:
            m = store.read_manifest(j, s)
        except CorruptCheckpointError as exc:
            failures += 1
            say(out, "FAIL", "red", f"{j} step {s}: {cli_words(str(exc))}")
            continue
        with progress_bar(m.raw_bytes, f"verify {j} {s}") as advance:
            problems = verify_manifest(store, m, threads=threads, progress=advance)
        if problems:
            failures += 1
            for p in problems:
                say(out, "FAIL", "red", f"{j} step {s}: {cli_words(p)}")
                digest = damaged_object(store, m, p)
                if digest is not None:
                    damage.setdefault(j, Damage()).digests.setdefault(digest, m)
        else:
            detail = f"{len(m.objects)} objects, {human_bytes(m.raw_bytes)}"
            say(out, "ok  ", "green", f"{j} step {s} ({detail})")
    for j, found in damage.items():
        report_damage(store, j, found, quarantine=not no_quarantine)
    if failures:
        raise CorruptCheckpointError(
            f"{failures} of {len(targets)} checkpoint(s) failed verification"
        )


@cli.command("restore", cls=StepCommand)
@click.argument("job")
@click.argument("step", default="latest", type=STEP)
@click.option("-o", "--output", "output", required=True, metavar="FILE", help="File to write.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["torch", "safetensors"]),
    default="torch",
    show_default=True,
)
@click.option(
    "--fallback", is_flag=True, help="With 'latest': use the newest checkpoint that verifies."
)
@store_options
def restore_cmd(
    job: str,
    step: int | str,
    output: str,
    fmt: str,
    fallback: bool,
    root: str | None,
    config: str | None,
) -> None:
    """Export checkpoint JOB STEP (default latest) to a torch or safetensors file.

    STEP is a step number, 'latest' (the checkpoint committed last) or 'highest'.
    """
    from ckptd.format.export import export_file

    store = _store(root, config)
    store.check_store()
    resolved: int | str = "latest" if step == "latest" else store.resolve_step(job, step)
    try:
        total = store.read_manifest(job, store.resolve_step(job, resolved)).raw_bytes
    except CorruptCheckpointError:
        if not fallback:
            raise
        total = 0  # --fallback skips the damaged latest manifest below
    with progress_bar(total, f"restore {job}") as advance:
        loaded = load_checkpoint(store, job, resolved, fallback=fallback, progress=advance)
    size = export_file(loaded, Path(output), fmt)
    out.print(
        f"wrote {output} ({fmt}, {human_bytes(size)}) from {job} step {loaded.step}", markup=False
    )


@cli.command("rm", cls=StepCommand)
@click.argument("job")
@click.argument("step", type=STEP)
@click.option(
    "-y",
    "--yes",
    is_flag=True,
    help="Delete without asking (required when stdin is not a terminal).",
)
@store_options
def rm_cmd(job: str, step: int | str, yes: bool, root: str | None, config: str | None) -> None:
    """Delete checkpoint JOB STEP (its manifest; run `gc` to free unshared objects).

    STEP is a step number, 'latest' (the checkpoint committed last) or 'highest'. Asks for
    confirmation on a terminal. Without a terminal (a script, cron) it deletes only with
    --yes, and otherwise refuses (exit 2): a script must not hang on a question nobody sees, nor
    delete without having said so.
    """
    store = _store(root, config)
    store.check_store()
    resolved = store.resolve_step(job, step)
    if not yes:
        what = f"{job} step {resolved}" + (f" ({step})" if isinstance(step, str) else "")
        if not stdin_is_terminal():
            raise click.UsageError(
                f"not deleting {what}: ckptd rm asks before deleting, and stdin is not a "
                "terminal; pass --yes (-y) to delete without asking",
                ctx=click.get_current_context(),
            )
        if not click.confirm(f"Delete checkpoint {what}?", default=False, err=True):
            err.print(f"not deleted: {what}", markup=False)
            sys.exit(1)
    store.delete_checkpoint(job, resolved)
    out.print(f"removed {job} step {resolved}", markup=False)


@cli.command("gc")
@click.argument("job", required=False)
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@store_options
def gc_cmd(job: str | None, dry_run: bool, root: str | None, config: str | None) -> None:
    """Remove objects no manifest references (of JOB, or of every job).

    Nothing to collect is not an error (exit 0): run it from cron as often as you like.
    """
    store = _store(root, config)
    store.check_store()
    if job is not None:
        require_job(store, job)
    jobs = [job] if job else store.jobs()
    total_objects = total_bytes = total_tmp = 0
    for j in jobs:
        res = store.gc(j, dry_run=dry_run)
        total_objects += res.objects
        total_bytes += res.bytes
        total_tmp += res.tmp_files
        if res.objects or res.tmp_files:
            verb = "would remove" if dry_run else "removed"
            what = f"{res.objects} object(s), {human_bytes(res.bytes)}, {res.tmp_files} tmp file(s)"
            out.print(f"{j}: {verb} {what}", markup=False)
    if not total_objects and not total_tmp:
        where = store.root if job is None else f"job {job!r}"
        out.print(f"nothing to collect in {where}: every object is referenced", markup=False)


@cli.command("pin", cls=StepCommand)
@click.argument("job")
@click.argument("step", type=STEP)
@store_options
def pin_cmd(job: str, step: int | str, root: str | None, config: str | None) -> None:
    """Protect checkpoint JOB STEP from retention and the disk guard.

    STEP is a step number, 'latest' (the checkpoint committed last) or 'highest'.
    """
    store = _store(root, config)
    store.check_store()
    resolved = store.resolve_step(job, step)
    store.pin(job, resolved)
    out.print(f"pinned {job} step {resolved}", markup=False)


@cli.command("unpin", cls=StepCommand)
@click.argument("job")
@click.argument("step", type=STEP)
@store_options
def unpin_cmd(job: str, step: int | str, root: str | None, config: str | None) -> None:
    """Release a pin; retention may delete the checkpoint again.

    A checkpoint that is not pinned stays so (exit 0). A step that is neither pinned nor a
    checkpoint is a NotFoundError: most likely a typo.
    """
    store = _store(root, config)
    store.check_store()
    validate_job_name(job)
    resolved = store.resolve_step(job, step) if isinstance(step, str) else step
    if store.unpin(job, resolved):
        out.print(f"unpinned {job} step {resolved}", markup=False)
        return
    pinned = ", ".join(map(str, sorted(store.pinned_steps(job)))) or "none"
    if resolved in store.steps(job):
        out.print(f"{job} step {resolved} was not pinned (pinned steps: {pinned})", markup=False)
        return
    existing = ", ".join(map(str, store.steps(job))) or "none"
    raise NotFoundError(
        f"job {job!r} has neither a checkpoint nor a pin at step {resolved} under {store.root} "
        f"(steps: {existing}; pinned steps: {pinned})"
    )


@cli.command("prune")
@click.argument("job", required=False)
@click.option("--dry-run", is_flag=True, help="Show what retention would delete, delete nothing.")
@store_options
def prune_cmd(job: str | None, dry_run: bool, root: str | None, config: str | None) -> None:
    """Apply retention now (of JOB, or of every job): delete what no rule keeps, then GC.

    Nothing to prune is not an error (exit 0): run it from cron as often as you like.
    """
    cfg = load_config(config)  # for the retention policies
    store = _store(root, config)
    store.check_store()
    if job is not None:
        require_job(store, job)
    jobs = [job] if job else store.jobs()
    total = 0
    for j in jobs:
        policy = cfg.policy_for(j, store.job_info(j).get("retention"))
        res = prune(store, j, policy, dry_run=dry_run)
        total += len(res.deleted)
        verb = "would delete" if dry_run else "deleted"
        if res.deleted:
            freed = f", freed {human_bytes(res.gc.bytes)}" if res.gc else ""
            out.print(
                f"{j}: {verb} steps {', '.join(map(str, res.deleted))}{freed} "
                f"(policy: {policy.describe()})",
                markup=False,
            )
    if not total:
        where = store.root if job is None else f"job {job!r}"
        out.print(
            f"nothing to prune in {where}: every checkpoint is kept by a retention rule",
            markup=False,
        )


@cli.command("bench")
@click.option(
    "--size",
    default="1GiB",
    show_default=True,
    metavar="SIZE",
    help="Bytes to copy, compress (at most 256MiB), write and save, e.g. 256MiB.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object for scripts.")
@click.option(
    "--config", "config", metavar="FILE", default=None, help="Config file (for store.root)."
)
@click.option(
    "--root",
    "root",
    metavar="DIR",
    default=None,
    help="Where to write the benchmark's scratch files and its daemon's checkpoints (default: "
    "CKPTD_ROOT, then store.root, then ./checkpoints; never a running daemon's root).",
)
def bench_cmd(size: str, as_json: bool, root: str | None, config: str | None) -> None:
    """Measure this machine (memory copy, codec, disk, ckptd save) and suggest config values.

    Writes SIZE bytes under the checkpoint root (then deletes them) and needs about 3x SIZE of
    memory.
    """
    from ckptd.cli.bench import render, run_bench
    from ckptd.config import parse_size

    size_bytes = parse_size(size, "--size")
    result = run_bench(size_bytes, resolve_root(root, load_config(config)))
    if as_json:
        out.print_json(json.dumps(result))
    else:
        for line in render(result):
            out.print(Text(line))


@cli.command("start")
@click.option("--config", "config", metavar="FILE", default=None, help="Config file.")
@click.option("--root", "root", metavar="DIR", default=None, help="Checkpoint root.")
@click.option("--socket", "socket_path", metavar="PATH", default=None, help="Socket to serve.")
@click.option("--user", is_flag=True, help="Per-user daemon: user socket, 0700/0600 modes.")
@click.option(
    "--idle-exit",
    "idle_exit_s",
    type=click.FloatRange(min=0),
    default=0.0,
    metavar="SECONDS",
    help="Exit after this long with no client and no work (0: never). Spawned daemons use it.",
)
@click.option(
    "--on-demand",
    "on_demand",
    is_flag=True,
    help="Started by a client (as clients do when no daemon answers): clients that name no root "
    "write to their own default, ./checkpoints, instead of --root.",
)
def start_cmd(
    config: str | None,
    root: str | None,
    socket_path: str | None,
    user: bool,
    idle_exit_s: float,
    on_demand: bool,
) -> None:
    """Run the daemon in the foreground (systemd runs exactly this)."""
    from ckptd.config import SYSTEM_SOCKET, user_socket
    from ckptd.daemon.lifecycle import run_daemon

    if on_demand and not user:
        raise click.UsageError(
            "--on-demand needs --user: a system daemon writes only to its own root, so it cannot "
            "serve clients' default roots"
        )
    cfg = load_config(config)
    if socket_path is None:
        env = os.environ.get("CKPTD_SOCKET")
        default = user_socket() if user else SYSTEM_SOCKET
        socket_path = env or str(cfg.daemon.socket or default)
    code = run_daemon(
        cfg,
        root=resolve_root(root, cfg).absolute(),
        socket_path=Path(socket_path),
        user=user,
        idle_exit_s=idle_exit_s,
        on_demand=on_demand,
    )
    sys.exit(code)


def _exchange(socket_path: str | None, op: str, **fields: Any) -> tuple[dict[str, Any], int, Path]:
    """Send one request to the daemon; return its reply, the daemon's pid as the kernel reports
    it for the connection (``SO_PEERCRED``) and the socket path. Like a client, it trusts only
    a daemon of this user or root (:class:`~ckptd.errors.UntrustedDaemonError` otherwise)."""
    from ckptd.config import resolve_socket
    from ckptd.protocol import check_daemon_peer, recv_message, send_message

    path = resolve_socket(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(10)
    try:
        try:
            sock.connect(str(path))
            peer_pid = check_daemon_peer(sock, path)
            try:
                send_message(sock, {"op": op, "id": 1, **fields})
            except OSError:
                pass  # a refused peer finds the daemon's reason queued below
            reply, _fds = recv_message(sock)
        except OSError as exc:
            raise DaemonUnavailableError(
                f"no ckptd daemon answers on {path} ({exc.strerror or type(exc).__name__}); "
                "start one with `ckptd start` (or `systemctl start ckptd`), or name its --socket"
            ) from exc
    finally:
        sock.close()
    if reply is None:
        raise DaemonUnavailableError(
            f"the daemon on {path} closed the connection without answering"
        )
    if reply.get("op") == "error":
        raise error_from_reply(reply.get("type"), reply.get("message"))
    return reply, peer_pid, path


def _ask(socket_path: str | None, op: str, **fields: Any) -> dict[str, Any]:
    return _exchange(socket_path, op, **fields)[0]


@cli.command("status")
@click.option("--socket", "socket_path", metavar="PATH", default=None, help="Daemon socket.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--job", default=None, help="Only this job's clients and last commits.")
def status_cmd(socket_path: str | None, as_json: bool, job: str | None) -> None:
    """Show the daemon's state: clients, queue, last commits, errors."""
    st = _ask(socket_path, "status", **({} if job is None else {"job": job}))
    st.pop("op", None)
    st.pop("id", None)
    if as_json:
        out.print_json(json.dumps(st))
        return
    rate = st.get("throughput_bytes_per_s")
    lines = [
        f"ckptd {st['version']} pid {st['pid']} ({st['mode']} mode), up {st['uptime_s']:.0f} s"
        + (" [draining]" if st["stopping"] else ""),
        f"socket {st['socket']}   root {st['root']}",
        f"clients {st.get('clients_total', len(st['clients']))}   queue {st['queue']}   in flight "
        f"{human_bytes(st['inflight_bytes'])}   writing "
        f"{st['writing']['job'] + '@' + str(st['writing']['step']) if st['writing'] else '-'}",
        f"commits {st['commits']}   failures {sum(st['failures'].values())} {st['failures'] or ''}"
        f"   skipped {st['skipped']}   throughput "
        f"{human_bytes(rate) + '/s' if rate else '-'}",
    ]
    for c in st["last_commit"][:10]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["at"]))
        lines.append(f"  last commit {c['job']} step {c['step']} at {when} ({c['root']})")
    for e in st["recent_errors"][-5:]:
        lines.append(f"  error: {e}")
    for line in lines:
        out.print(line, markup=False)


STOP_WAIT_S = 120.0
"""How long ``ckptd stop --wait`` waits for the daemon to exit unless told (--timeout)."""


def _running(proc: Any) -> bool:
    """Whether the psutil Process ``proc`` still runs: not exited, not a zombie (an exited
    child its parent has not reaped yet), and not a new process that reuses its pid."""
    import psutil

    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@cli.command("stop")
@click.option("--socket", "socket_path", metavar="PATH", default=None, help="Daemon socket.")
@click.option(
    "--wait",
    is_flag=True,
    help="Return only once the daemon has exited (every accepted snapshot committed).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help=f"With --wait: give up after this long (default {STOP_WAIT_S:g}), exit 1; the daemon "
    "goes on draining.",
)
def stop_cmd(socket_path: str | None, wait: bool, timeout_s: float | None) -> None:
    """Ask the daemon to drain its queue and exit (like SIGTERM).

    Without --wait this returns as soon as the daemon has begun draining. With --wait it returns
    once the daemon process is gone, so a script (a deploy, a reboot hook) can go on knowing that
    every accepted snapshot is on disk and the socket is free.
    """
    if timeout_s is not None and not wait:
        raise click.UsageError(
            "--timeout applies only with --wait", ctx=click.get_current_context()
        )
    if not wait:
        _ask(socket_path, "stop")
        out.print("ckptd is draining and will exit when every accepted snapshot is committed")
        return
    import psutil

    from ckptd.protocol import can_connect

    timeout = STOP_WAIT_S if timeout_s is None else timeout_s
    status, peer_pid, path = _exchange(socket_path, "status")
    pid = status.get("pid")
    if not isinstance(pid, int) or pid != peer_pid:
        pid = peer_pid  # another pid namespace (or no pid said): the kernel's pid is ours
    proc: psutil.Process | None = None
    if pid > 0:
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            pass
    # proc None: the process cannot be watched from here; the socket can.

    def gone() -> bool:
        return not _running(proc) if proc is not None else not can_connect(path)

    _ask(socket_path, "stop")
    out.print(
        f"ckptd (pid {pid}) is draining; waiting up to {timeout:g} s for it to exit", markup=False
    )
    deadline = time.monotonic() + timeout
    while not gone():
        if time.monotonic() >= deadline:
            raise CkptdError(
                f"ckptd (pid {pid}) on {path} is still running {timeout:g} s after it was asked "
                "to stop; it goes on draining its accepted snapshots. Wait longer (--timeout "
                f"SECONDS), watch it with `ckptd status --socket {path}`, or abort the drain "
                f"with `kill -INT {pid}` (the snapshots not yet written are lost; tmp files are "
                "swept at the next start)"
            )
        time.sleep(0.05)
    out.print(f"ckptd (pid {pid}) has exited", markup=False)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI and map errors to exit codes."""
    try:
        cli.main(args=argv, prog_name="ckptd", standalone_mode=False)
    except CkptdError as exc:
        say(err, "error:", "red", cli_words(str(exc)))
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
