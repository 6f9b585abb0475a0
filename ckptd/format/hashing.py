"""Content hashes that name chunk objects.

An object's name is the BLAKE3 hash (256 bits, lowercase hex) of its *raw* bytes, before encoding,
so identical chunks dedup whatever codec wrote them and every read can be verified end to end.
blake3 releases the GIL on large inputs, so hashing runs in parallel on the pipeline's threads.
"""

from __future__ import annotations

import re

import blake3

from ckptd.errors import ManifestError

HASH_HEX_CHARS = 64
_HASH_RE = re.compile(r"[0-9a-f]{64}")


def content_hash(data: bytes | bytearray | memoryview) -> str:
    """Return the lowercase hex BLAKE3 hash of ``data``."""
    return blake3.blake3(data).hexdigest()


def check_hash_name(name: str) -> str:
    """Return ``name`` if it is a well-formed object hash, else raise :class:`ManifestError`.

    Object names come from manifests on disk; checking them keeps a damaged or hostile manifest
    from naming a path outside the object directory.
    """
    if not isinstance(name, str) or not _HASH_RE.fullmatch(name):
        raise ManifestError(f"invalid object hash {name!r}: expected {HASH_HEX_CHARS} hex digits")
    return name
