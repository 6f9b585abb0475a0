"""``ckptd``: the operators' command line.

Tables for people (rich), ``--json`` for scripts, progress bars on a terminal for long verify and
restore runs. This module is the entry point (the console script is ``ckptd.cli.main:main``): it
builds the ``ckptd`` group from the command modules beside it, and :func:`main` maps each error
type to its own exit code (see :data:`ckptd.errors.EXIT_CODES`). The parts:

* :mod:`~ckptd.cli.common`: consoles, the store options, the STEP argument, output helpers;
* :mod:`~ckptd.cli.listing` (``list``, ``show``), :mod:`~ckptd.cli.verify` (``verify``),
  :mod:`~ckptd.cli.restore` (``restore``), :mod:`~ckptd.cli.maintain` (``rm``, ``gc``, ``pin``,
  ``unpin``, ``prune``): the store;
* :mod:`~ckptd.cli.service` (``start``, ``status``, ``stop``): the daemon;
* :mod:`~ckptd.cli.bench` (``bench``): this machine.

Maintenance is idempotent: ``gc`` / ``prune`` with nothing to do, and ``list`` / ``verify`` of an
empty store, exit 0 with a plain message, so a cron job alarms only on real problems. What must
stay loud is a root that is not a store (a mistyped ``--root`` would otherwise look like an empty
store: every store command calls :meth:`Store.check_store` first) and an explicit target that does
not exist (``ckptd show job 99``).

Library messages name Python arguments (``fallback=True``); the CLI prints them with its own flags
(:func:`~ckptd.cli.common.cli_words`), and prints each library warning once (a message that is
both logged and raised as a Python warning would otherwise show twice).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

import click

from ckptd.cli.bench import bench_cmd
from ckptd.cli.common import cli_words, err, say
from ckptd.cli.listing import list_cmd, show_cmd
from ckptd.cli.maintain import gc_cmd, pin_cmd, prune_cmd, rm_cmd, unpin_cmd
from ckptd.cli.restore import restore_cmd
from ckptd.cli.service import start_cmd, status_cmd, stop_cmd
from ckptd.cli.verify import verify_cmd
from ckptd.errors import CkptdError
from ckptd.format.restore import FallbackWarning


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


for command in (
    list_cmd,
    show_cmd,
    verify_cmd,
    restore_cmd,
    rm_cmd,
    gc_cmd,
    pin_cmd,
    unpin_cmd,
    prune_cmd,
    bench_cmd,
    start_cmd,
    status_cmd,
    stop_cmd,
):
    cli.add_command(command)


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
