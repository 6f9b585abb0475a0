"""``python -m tests.integration.faulty_ckptd ARGS``: ``ckptd ARGS`` with a fault seam in the codec.

Encoding a chunk whose raw bytes start with :data:`FAULT_MARKER` raises :class:`RuntimeError`
(:data:`FAULT_MESSAGE`), an exception no ckptd code expects, in the middle of the daemon's write
pipeline; every other chunk is encoded as usual. Tests start a daemon this way
(``DaemonFactory.start(module="tests.integration.faulty_ckptd")``) and hand it a state whose only
tensor starts with the marker.

``ckptd.format.codec.encode`` is replaced before anything imports it by name (the pipeline does,
with ``from ckptd.format.codec import encode``), so the seam does not depend on the pipeline's
internals.
"""

from __future__ import annotations

from typing import Any

import ckptd.format.codec

FAULT_MARKER = b"ckptd-test: encoding this chunk fails"
FAULT_MESSAGE = "injected fault: the codec cannot encode this chunk"

_encode = ckptd.format.codec.encode


def faulty_encode(raw: Any, *args: Any, **kwargs: Any) -> Any:
    if bytes(memoryview(raw).cast("B")[: len(FAULT_MARKER)]) == FAULT_MARKER:
        raise RuntimeError(FAULT_MESSAGE)
    return _encode(raw, *args, **kwargs)


def main() -> None:
    """Install the seam, check the pipeline uses it, run ckptd's CLI. Only in a process of its
    own: importing this module (for the constants) changes nothing."""
    ckptd.format.codec.encode = faulty_encode
    from ckptd.pipeline import write  # after the patch: it imports encode by name

    if getattr(write, "encode", faulty_encode) is not faulty_encode:
        raise RuntimeError("tests.integration.faulty_ckptd: the pipeline did not pick up the seam")
    from ckptd.cli.main import main as ckptd_main

    ckptd_main()


if __name__ == "__main__":
    main()
