"""The exceptions ckptd raises, one type per failure mode.

Every error is a :class:`CkptdError`. Messages name what was wrong (the key, path or value) and
what to do about it. The CLI maps each type to its own exit code (``exit_code``), so scripts can
tell "nothing to act on" from "corrupt" from "disk full" without parsing text.
"""

from __future__ import annotations


class CkptdError(Exception):
    """Base class of every error ckptd raises on purpose."""

    exit_code = 1


class ConfigError(CkptdError):
    """The configuration file or a configuration value is invalid."""

    exit_code = 3


class InvalidNameError(CkptdError):
    """A job name is not allowed (path separators, ``..``, NUL, too long, ...)."""

    exit_code = 4


class NotFoundError(CkptdError):
    """A job or checkpoint that was asked for does not exist."""

    exit_code = 5


class NoStoreError(NotFoundError):
    """The checkpoint root does not exist, or is not a ckptd store (no ``.ckptd-store`` marker
    and no job directory): most often a mistyped ``--root``, which must not read as an empty
    store. A NotFoundError, so code that handles a missing checkpoint handles it too; its own exit
    code lets scripts tell "wrong root" from "no such checkpoint"."""

    exit_code = 20


class NothingToDoError(CkptdError):
    """A command found nothing to act on (no jobs, no checkpoints, no garbage)."""

    exit_code = 6


class CorruptCheckpointError(CkptdError):
    """Stored bytes do not match what the manifest promises.

    Raised for a hash mismatch, a truncated or missing object, or an object whose header is damaged.
    """

    exit_code = 7


class ManifestError(CorruptCheckpointError):
    """A manifest file cannot be parsed or fails validation."""


class FormatVersionError(CkptdError):
    """A manifest or object was written by a newer ckptd format than this one reads."""

    exit_code = 8


class UnsupportedStateError(CkptdError):
    """A value in the state handed to ``snapshot()`` cannot be stored without pickle."""

    exit_code = 9


class DiskFullError(CkptdError):
    """The store's filesystem has no room for the checkpoint (ENOSPC, EDQUOT or the disk guard)."""

    exit_code = 10


class StorePermissionError(CkptdError):
    """The store's root or a file in it cannot be read or written by this process."""

    exit_code = 11


class StoreIOError(CkptdError):
    """An I/O error other than a full disk or a permission problem (EIO on write or fsync, ...)."""

    exit_code = 12


class ProtocolError(CkptdError):
    """A message between client and daemon is malformed or of an unsupported version."""

    exit_code = 13


class DaemonUnavailableError(CkptdError):
    """No daemon answers on the socket, and none could be started."""

    exit_code = 14


class SnapshotFailedError(CkptdError):
    """The daemon failed to persist a snapshot; the message carries its reason."""

    exit_code = 15


class SnapshotSkippedError(CkptdError):
    """A snapshot was dropped because every shared-memory slot was busy (``on_full="skip"``)."""

    exit_code = 16


class UntrustedDaemonError(DaemonUnavailableError):
    """The process behind the socket, or the directory holding it, is not the user's own (or
    root's): the client refuses to hand it any state."""

    exit_code = 17


class DaemonNoAnswerError(DaemonUnavailableError):
    """A request was sent to the daemon but no answer came: none within the client's
    ``timeout_s`` (a hung or stopped daemon), or the connection closed first. The daemon may or
    may not have acted on it; the client dropped the connection and every slot on it."""

    exit_code = 19


class SnapshotUnconfirmedError(DaemonUnavailableError):
    """The client lost its connection to the daemon (or closed it) before the daemon reported a
    snapshot's outcome: it may or may not be committed. ``ckptd list JOB`` tells."""

    exit_code = 18


class RankLayoutError(CkptdError):
    """The ranks of a multi-rank job do not fit together: a rank outside ``[0, world_size)``,
    ranks of one step that disagree on the world size, a rank that hands a step off twice in one
    attempt (or two processes claiming one rank), a world size that differs from the
    checkpoint's, or a multi-rank job and a single-process client sharing one job name."""

    exit_code = 21


class TierError(CkptdError):
    """The object-store tier cannot be used: a malformed ``s3://`` URL, a missing bucket, an
    unreachable endpoint, credentials refused, or an object the tier does not hold."""

    exit_code = 22


def error_from_reply(type_name: object, message: object) -> CkptdError:
    """The exception a daemon reply (``error`` / ``failed`` / ``refused``) stands for."""
    cls = globals().get(str(type_name))
    if not (isinstance(cls, type) and issubclass(cls, CkptdError)):
        cls = SnapshotFailedError
    return cls(str(message) if message is not None else "the daemon gave no reason")


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        CkptdError,
        ConfigError,
        InvalidNameError,
        NotFoundError,
        NoStoreError,
        NothingToDoError,
        CorruptCheckpointError,
        FormatVersionError,
        UnsupportedStateError,
        DiskFullError,
        StorePermissionError,
        StoreIOError,
        ProtocolError,
        DaemonUnavailableError,
        SnapshotFailedError,
        SnapshotSkippedError,
        UntrustedDaemonError,
        SnapshotUnconfirmedError,
        DaemonNoAnswerError,
        RankLayoutError,
        TierError,
    )
}
"""Exit code of each error type, as the CLI uses them (documented in the README)."""
