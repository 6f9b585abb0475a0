"""ckptd_client: the training-side library of ckptd.

Restore needs only the files under the checkpoint root: no daemon and no pickle.

>>> import ckptd_client
>>> ckptd_client.save("demo", model, opt, step=100)          # blocking, in-process
>>> extra = ckptd_client.restore(model, opt, job="demo")       # latest, verified
>>> state = ckptd_client.load("demo", step=100)                # the nested dict, as saved
"""

from __future__ import annotations

from ckptd.errors import (
    CkptdError,
    ConfigError,
    CorruptCheckpointError,
    DaemonUnavailableError,
    DiskFullError,
    FormatVersionError,
    InvalidNameError,
    ManifestError,
    NotFoundError,
    RankLayoutError,
    SnapshotFailedError,
    SnapshotSkippedError,
    UnsupportedStateError,
)
from ckptd.format.restore import FallbackWarning
from ckptd_client.api import list_checkpoints, load, restore, save
from ckptd_client.client import Client
from ckptd_client.pending import CheckpointInfo, CheckpointSummary, PendingSnapshot
from ckptd_client.state import collect, rng_state, set_rng_state

__all__ = [
    "CheckpointInfo",
    "CheckpointSummary",
    "CkptdError",
    "Client",
    "ConfigError",
    "CorruptCheckpointError",
    "DaemonUnavailableError",
    "DiskFullError",
    "FallbackWarning",
    "FormatVersionError",
    "InvalidNameError",
    "ManifestError",
    "NotFoundError",
    "PendingSnapshot",
    "RankLayoutError",
    "SnapshotFailedError",
    "SnapshotSkippedError",
    "UnsupportedStateError",
    "collect",
    "list_checkpoints",
    "load",
    "restore",
    "rng_state",
    "save",
    "set_rng_state",
]
