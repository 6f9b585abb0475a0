"""An in-memory :class:`~ckptd.tier.remote.Remote` for unit tests of the tier, with fault injection.

It keeps the contract of :class:`~ckptd.tier.remote.Remote` as the S3 implementation does:
``put_new`` creates only when the key is absent (``If-None-Match: *``), ``get`` of a missing key
raises :class:`~ckptd.errors.NotFoundError`, ``list`` / ``dirs`` work on directory prefixes
(``"job/manifests"`` holds ``job/manifests/...``, never ``job/manifests-old/...``).

Thread safety: every method may be called from any thread (the uploader puts objects from a
pool); one lock guards the objects, the call log and the armed faults.

Each call is logged in :attr:`MemoryRemote.calls` as ``(op, key)`` in the order it was made
(a failed one too); :meth:`MemoryRemote.written` gives the keys that were actually written, in
order. :meth:`MemoryRemote.fail` arms a fault: the Nth next call of an op raises
:class:`~ckptd.errors.TierError` (or the given exception) and changes nothing.
"""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ckptd.errors import NotFoundError, TierError
from ckptd.tier.remote import Data, Listed, TierUrl, parse_url

OPS = ("get", "put", "put_new", "size", "list", "dirs", "delete", "check")
WRITES = ("put", "put_new")


@dataclass
class _Fault:
    op: str
    countdown: int
    """Calls of ``op`` still to let through before the one that fails."""
    times: int
    """How many calls in a row fail once the countdown is over."""
    error: Callable[[str, str], BaseException]


class MemoryRemote:
    """A bucket in a dict: ``key -> (bytes, mtime)``, mtime in seconds since the epoch.

    ``clock`` gives the mtime of each write (default :func:`time.time`)."""

    def __init__(
        self, url: str = "s3://bucket/prefix", *, clock: Callable[[], float] = time.time
    ) -> None:
        self.url: TierUrl = parse_url(url)
        self.blobs: dict[str, tuple[bytes, float]] = {}
        self.calls: builtins.list[tuple[str, str]] = []
        self._written: builtins.list[str] = []
        self._faults: builtins.list[_Fault] = []
        self._clock = clock
        self._lock = threading.Lock()

    # ---- test helpers ---------------------------------------------------------------------------

    def fail(
        self,
        op: str,
        nth: int = 1,
        *,
        times: int = 1,
        error: Callable[[str, str], BaseException] | None = None,
    ) -> None:
        """Make the ``nth`` next call of ``op`` (counted from now) and the ``times - 1`` after it
        raise ``error(op, key)`` (default: a :class:`TierError` naming the op and key)."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; one of {OPS}")
        if nth < 1 or times < 1:
            raise ValueError(f"nth and times must be >= 1, got {nth}, {times}")
        with self._lock:
            self._faults.append(_Fault(op, nth - 1, times, error or _tier_error))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def ops(self, op: str) -> builtins.list[str]:
        """The keys of every call of ``op`` so far, in order."""
        with self._lock:
            return [k for o, k in self.calls if o == op]

    def written(self) -> builtins.list[str]:
        """The keys written (``put``, or a ``put_new`` that created), in order."""
        with self._lock:
            return list(self._written)

    def snapshot(self) -> dict[str, bytes]:
        """A copy of the bucket's contents (mtimes left out)."""
        with self._lock:
            return {k: v[0] for k, v in self.blobs.items()}

    def set_mtime(self, key: str, mtime: float) -> None:
        with self._lock:
            data, _ = self.blobs[key]
            self.blobs[key] = (data, mtime)

    def _enter(self, op: str, key: str) -> None:
        """Log the call and raise the armed fault it hits, if any (caller holds the lock)."""
        self.calls.append((op, key))
        for fault in self._faults:
            if fault.op != op:
                continue
            if fault.countdown > 0:
                fault.countdown -= 1
                continue
            fault.times -= 1
            if fault.times == 0:
                self._faults.remove(fault)
            raise fault.error(op, key)

    def _store(self, key: str, data: Data) -> None:
        self.blobs[key] = (bytes(data), self._clock())
        self._written.append(key)

    # ---- Remote ---------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        with self._lock:
            self._enter("get", key)
            if key not in self.blobs:
                raise NotFoundError(f"{self.url}/{key} is not in the tier")
            return self.blobs[key][0]

    def put(self, key: str, data: Data) -> None:
        with self._lock:
            self._enter("put", key)
            self._store(key, data)

    def put_new(self, key: str, data: Data) -> bool:
        with self._lock:
            self._enter("put_new", key)
            if key in self.blobs:
                return False
            self._store(key, data)
            return True

    def size(self, key: str) -> int | None:
        with self._lock:
            self._enter("size", key)
            found = self.blobs.get(key)
            return None if found is None else len(found[0])

    def list(self, prefix: str) -> Iterator[Listed]:
        with self._lock:
            self._enter("list", prefix)
            head = prefix.strip("/") + "/" if prefix.strip("/") else ""
            found = [
                Listed(key, len(data), mtime)
                for key, (data, mtime) in sorted(self.blobs.items())
                if key.startswith(head)
            ]
        return iter(found)

    def dirs(self, prefix: str) -> builtins.list[str]:
        with self._lock:
            self._enter("dirs", prefix)
            head = prefix.strip("/") + "/" if prefix.strip("/") else ""
            return sorted(
                {
                    key[len(head) :].split("/", 1)[0]
                    for key in self.blobs
                    if key.startswith(head) and "/" in key[len(head) :]
                }
            )

    def delete(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._enter("delete", key)
                self.blobs.pop(key, None)

    def check(self) -> None:
        with self._lock:
            self._enter("check", "")


def _tier_error(op: str, key: str) -> TierError:
    return TierError(f"injected fault: {op} {key!r} failed")
