"""What every ``ckptd`` command shares: the consoles, the store options, the STEP argument, and
how numbers and library messages are printed.

Output contract: results go to :data:`out` (stdout), errors, warnings and progress to :data:`err`
(stderr); both print user data (paths, job names, shapes) verbatim, never as rich markup. A
command that acts on a store calls :func:`open_store` and then :meth:`Store.check_store`, so a
mistyped ``--root`` is an error instead of an empty store. ``--root s3://bucket/prefix`` reads the
object-store tier (:class:`~ckptd.tier.mirror.TierStore`): the commands that only read work on it
unchanged, the ones that change a store (:data:`WRITING_COMMANDS`) refuse it.

Library messages name Python arguments (``fallback=True``); the CLI prints them with its own flags
(:func:`cli_words`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from ckptd.config import load_config, tier_settings_for
from ckptd.errors import CorruptCheckpointError, FormatVersionError, NotFoundError, TierError
from ckptd.format.manifest import MAX_STEP, Manifest
from ckptd.format.store import Store, validate_job_name
from ckptd.locate import store_root
from ckptd.tier.mirror import TierStore, tier_store
from ckptd.tier.remote import is_tier_url

F = TypeVar("F", bound=Callable[..., Any])

# Not a terminal (a pipe, CI): wide enough that tables are not truncated.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def say(console: Console, label: str, style: str, message: str) -> None:
    """Print ``label`` styled and ``message`` verbatim (paths and shapes contain brackets)."""
    console.print(Text.assemble((label, style), " ", message))


# ---- the store ---------------------------------------------------------------------------------


WRITING_COMMANDS = frozenset({"rm", "gc", "pin", "unpin", "prune"})
"""The commands that change a store: they refuse an ``s3://`` root (the daemon writes the tier
and applies its retention)."""


def open_store(root: str | None, config: str | None) -> Store:
    """The store to act on: ``--root``, else as clients find it (``ckptd.locate``: CKPTD_ROOT,
    store.root, the running daemon's root, ./checkpoints).

    An ``s3://bucket/prefix`` root is the tier's :class:`TierStore`, reached through the config's
    ``[tier]`` endpoint when it names that bucket (:func:`ckptd.config.tier_settings_for`), else
    through the AWS environment; a command of :data:`WRITING_COMMANDS` refuses it with a
    :class:`TierError` before it touches anything.
    """
    if root is not None and is_tier_url(root):
        ctx = click.get_current_context(silent=True)
        command = ctx.info_name if ctx is not None else None
        if command in WRITING_COMMANDS:
            raise TierError(
                f"ckptd {command} changes a store, and {root} is the object-store tier, which "
                "is read-only here: the daemon writes it and applies its retention "
                "([tier.retention]). Run it on a local store (--root DIR)"
            )
        return tier_store(root, tier_settings_for(root, load_config(config)))
    return Store(store_root(root, load_config(config) if root is None else None))


def store_name(store: Store) -> str:
    """The store as its user named it: the tier's URL, or the root directory."""
    return str(store.url) if isinstance(store, TierStore) else str(store.root)


def store_options(func: F) -> F:
    """The ``--root`` and ``--config`` options of every command that acts on a store."""
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
        "root of the daemon answering on the socket, then ./checkpoints); s3://bucket/prefix "
        "reads the object-store tier (read-only).",
    )(func)


def require_job(store: Store, job: str) -> None:
    """Raise NotFoundError unless ``job`` exists (a job whose checkpoints were all deleted still
    exists: listing it gives an empty result, collecting its garbage is useful)."""
    validate_job_name(job)
    if not (store.job_dir(job) / "manifests").is_dir():
        raise NotFoundError(
            f"no job {job!r} under {store_name(store)} (jobs: {', '.join(store.jobs()) or 'none'})"
        )


@dataclass(frozen=True)
class PartRead:
    """One rank's part of a multi-rank step, as :func:`read_parts` found it: the part, or why it
    cannot be read (missing, damaged, not the part the step committed)."""

    rank: int
    record: str
    """The part file, relative to the job directory."""
    part: Manifest | None
    problem: str | None


def read_parts(store: Store, record: Manifest) -> list[PartRead]:
    """Every rank's part of the committed step ``record``, each checked against the record
    (:meth:`Store.read_part`); a part that fails is returned with its problem, not raised, so a
    command can report every rank. A single-process checkpoint is its own (only) part."""
    if not record.is_global:
        return [PartRead(0, store.manifest_path(record.job, record.step).name, record, None)]
    out = []
    for ref in record.parts:
        try:
            part = store.read_part(record.job, record.step, ref.rank, record)
        except (CorruptCheckpointError, FormatVersionError) as exc:
            out.append(PartRead(ref.rank, ref.record, None, str(exc)))
            continue
        out.append(PartRead(ref.rank, ref.record, part, None))
    return out


def step_objects(store: Store, record: Manifest) -> tuple[set[str], list[int]]:
    """The objects the committed step ``record`` needs (of every rank's part), and the ranks
    whose part could not be read (their objects are not included)."""
    objects: set[str] = set()
    unreadable = []
    for found in read_parts(store, record):
        if found.part is None:
            unreadable.append(found.rank)
        else:
            objects.update(found.part.objects)
    return objects, unreadable


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


def rank_option(what: str) -> Callable[[F], F]:
    """The ``--rank R`` option of a command that reads one rank's part of a multi-rank step."""
    return click.option(
        "--rank",
        "rank",
        type=click.IntRange(min=0),
        default=None,
        metavar="R",
        help=f"Of a step written by several ranks: {what} rank R's part (0 to world size - 1).",
    )


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


# ---- output ------------------------------------------------------------------------------------

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
    (re.compile(r"\bpass rank= \("), "pass --rank R ("),
    (re.compile(r"\bload it with rank=0 or without rank=\)"), "pass --rank 0 or no --rank)"),
)


def cli_words(message: str) -> str:
    """``message`` (from library code) with Python arguments replaced by the CLI's flags."""
    for pattern, words in _CLI_WORDS:
        message = pattern.sub(words, message)
    return message


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


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
