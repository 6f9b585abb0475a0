"""The manifest: one JSON file that *is* a checkpoint.

A checkpoint exists iff ``<root>/<job>/manifests/step-<12 digits>.json`` exists. The manifest lists
each tensor (key path, dtype, shape, byte length) as a sequence of pieces of content-addressed
objects, the objects it needs (raw and stored length, codec), the skeleton of the non-tensor state
(see :mod:`ckptd.format.skeleton`) and totals. It is written last, atomically, after every object
it names is durable. Field by field documentation: ``docs/format.md``.

Two keys order and identify checkpoints: ``seq``, the job's commit sequence number (what
``latest`` means: the checkpoint committed last, whatever its step), and ``digest``, one hash of
the tensors and the skeleton that does not depend on chunking or codec (:mod:`ckptd.format.digest`).
Manifests written before either existed parse with ``seq`` 0 and ``digest`` None.

A job run by several ranks writes one *part* per rank and step (an ordinary manifest of format
version 1 with its ``rank``, ``world_size`` and ``attempt``, under ``parts/``), and the step is
committed by a *global record* in ``manifests/``: a manifest of format version 2 that names every
part (:class:`PartRef`) and holds no tensors itself (:mod:`ckptd.format.parts`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ckptd.errors import FormatVersionError, ManifestError
from ckptd.format.hashing import check_hash_name, content_hash
from ckptd.format.skeleton import JSON, dtype_from_name

FORMAT = "ckptd.manifest"
FORMAT_VERSION = 2
"""The newest version this ckptd reads. It writes version 1 for every manifest and part, and
version 2 only for the global record of a multi-rank step (older readers refuse those)."""
MAX_STEP = 10**12 - 1
STEP_DIGITS = 12


def manifest_name(step: int) -> str:
    """File name of the manifest of ``step``: fixed width so names sort by step."""
    return f"step-{step:0{STEP_DIGITS}d}.json"


def step_from_name(name: str) -> int | None:
    """Inverse of :func:`manifest_name`; None for any other file name."""
    if not (name.startswith("step-") and name.endswith(".json")):
        return None
    digits = name[5:-5]
    if len(digits) != STEP_DIGITS or not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)


def check_step(step: object) -> int:
    """Return ``step`` if it is a valid step number (an int in 0..10**12-1)."""
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be an integer between 0 and {MAX_STEP}, got {step!r}")
    return step


_ATTEMPT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_attempt(attempt: object) -> str:
    """Return ``attempt`` if it is a valid attempt id: 1-128 characters from ``A-Z a-z 0-9 . _
    -``, starting with a letter or digit, without ``..`` (it names a directory)."""
    if not isinstance(attempt, str) or not _ATTEMPT.fullmatch(attempt) or ".." in attempt:
        raise ValueError(
            f"attempt must be 1-128 characters from A-Z a-z 0-9 . _ - starting with a letter or "
            f"digit, got {attempt!r}"
        )
    return attempt


@dataclass(frozen=True)
class PartRef:
    """One rank's part of a multi-rank step, as the step's global record names it: the part
    file (relative to the job directory) and the checksum and digest it had when committed."""

    rank: int
    record: str
    checksum: str
    digest: str | None


@dataclass(frozen=True)
class ObjectInfo:
    """One chunk object: ``raw_bytes`` before encoding, ``stored_bytes`` on disk (with header)."""

    raw_bytes: int
    stored_bytes: int
    codec: str


@dataclass(frozen=True)
class Piece:
    """Bytes ``[offset, offset + length)`` of object ``object`` (offsets in its raw bytes)."""

    object: str
    offset: int
    length: int


@dataclass(frozen=True)
class TensorEntry:
    """A tensor: its bytes are the concatenation of ``pieces`` (C order, little-endian)."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True, repr=False)
class Manifest:
    """An immutable checkpoint description. ``created`` is an ISO 8601 UTC timestamp.

    ``seq`` is the job's commit sequence number, assigned by the committer
    (:meth:`ckptd.format.store.Store.commit_lock`): 0 for a manifest not committed yet or written
    before seq existed. ``digest`` is the checkpoint digest
    (:func:`ckptd.format.digest.compute_digest`), None for manifests written before it existed.
    """

    job: str
    step: int
    created: str
    tensors: tuple[TensorEntry, ...]
    objects: dict[str, ObjectInfo]
    skeleton: JSON
    metric: float | None = None
    rank: int = 0
    world_size: int = 1
    written_bytes: int = 0
    seq: int = 0
    digest: str | None = None
    attempt: str | None = None
    """The restart attempt of a multi-rank job's part or global record (None: one process)."""
    parts: tuple[PartRef, ...] = ()
    """A global record's parts, by rank (empty for a single-process checkpoint or a part)."""
    part_totals: tuple[int, int, int, int] = (0, 0, 0, 0)
    """A global record's totals over its parts: tensors, raw, stored and written bytes."""

    @property
    def is_global(self) -> bool:
        """True for the global record of a multi-rank step (its tensors are in its parts)."""
        return bool(self.parts)

    def __repr__(self) -> str:
        # Short on purpose: the skeleton (RNG states as arrays) and the tensor list would make
        # print(client.list()) unreadable.
        digest = "None" if self.digest is None else repr(self.digest[:12] + "...")
        return (
            f"Manifest(job={self.job!r}, step={self.step}, seq={self.seq}, "
            f"created={self.created!r}, tensors={len(self.tensors)}, "
            f"raw_bytes={self.raw_bytes}, digest={digest})"
        )

    @property
    def raw_bytes(self) -> int:
        if self.parts:
            return self.part_totals[1]
        return sum(t.nbytes for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        """Bytes on disk of every object this checkpoint needs (shared objects counted once)."""
        if self.parts:
            return self.part_totals[2]
        return sum(o.stored_bytes for o in self.objects.values())

    @property
    def tensor_count(self) -> int:
        """Tensors in the checkpoint (of every rank, for a global record)."""
        return self.part_totals[0] if self.parts else len(self.tensors)

    @property
    def created_datetime(self) -> datetime:
        return datetime.fromisoformat(self.created)

    def to_json(self) -> bytes:
        """The exact bytes written to disk (deterministic for a given manifest)."""
        doc: dict[str, Any] = {
            "format": FORMAT,
            "version": 2 if self.parts else 1,
            "checksum": _PLACEHOLDER,
            "job": self.job,
            "step": self.step,
        }
        # seq and digest only when there is one: a manifest written before they existed
        # re-serializes to its own bytes (its checksum stays valid).
        if self.seq:
            doc["seq"] = self.seq
        doc |= {
            "created": self.created,
            "rank": self.rank,
            "world_size": self.world_size,
        }
        if self.parts:
            del doc["rank"]  # a global record is every rank's
        if self.attempt is not None:
            doc["attempt"] = self.attempt
        doc["metric"] = _metric_to_json(self.metric)
        if self.digest is not None:
            doc["digest"] = self.digest
        if self.parts:
            tensors, raw, stored, written = self.part_totals
            doc |= {
                "totals": {
                    "ranks": len(self.parts),
                    "tensors": tensors,
                    "raw_bytes": raw,
                    "stored_bytes": stored,
                    "written_bytes": written,
                },
                "parts": [
                    {"rank": p.rank, "record": p.record, "checksum": p.checksum, "digest": p.digest}
                    for p in self.parts
                ],
            }
            text = _dump(doc).encode()
            return text.replace(_field(_PLACEHOLDER), _field(content_hash(text)), 1)
        doc |= {
            "totals": {
                "tensors": len(self.tensors),
                "objects": len(self.objects),
                "raw_bytes": self.raw_bytes,
                "stored_bytes": self.stored_bytes,
                "written_bytes": self.written_bytes,
            },
            "tensors": [
                {
                    "path": t.path,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "nbytes": t.nbytes,
                    "pieces": [[p.object, p.offset, p.length] for p in t.pieces],
                }
                for t in self.tensors
            ],
            "objects": {
                h: {"raw_bytes": o.raw_bytes, "stored_bytes": o.stored_bytes, "codec": o.codec}
                for h, o in sorted(self.objects.items())
            },
            "skeleton": self.skeleton,
        }
        text = _dump(doc).encode()
        return text.replace(_field(_PLACEHOLDER), _field(content_hash(text)), 1)


def _compact(value: JSON) -> str:
    return json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(", ", ": "))


def _dump(doc: dict[str, Any]) -> str:
    """JSON with one line per top-level key, per tensor and per object: diffable, greppable."""
    lines = []
    for key, value in doc.items():
        if key in ("tensors", "parts") and value:
            body = ",\n".join(f"  {_compact(t)}" for t in value)
            text = f"[\n{body}\n ]"
        elif key == "objects" and value:
            body = ",\n".join(f"  {_compact(h)}: {_compact(o)}" for h, o in value.items())
            text = f"{{\n{body}\n }}"
        else:
            text = _compact(value)
        lines.append(f" {_compact(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


_PLACEHOLDER = "0" * 64


def _field(value: str) -> bytes:
    return f'"checksum": "{value}"'.encode()


def sign_manifest(data: bytes) -> bytes:
    """``data`` (manifest JSON with a ``"checksum": "<64 hex>"`` field, as :meth:`to_json`
    writes it) with its checksum recomputed: for tools and tests that edit manifests."""
    doc = json.loads(data)
    old = doc.get("checksum", _PLACEHOLDER) if isinstance(doc, dict) else _PLACEHOLDER
    blanked = data.replace(_field(str(old)), _field(_PLACEHOLDER), 1)
    return blanked.replace(_field(_PLACEHOLDER), _field(content_hash(blanked)), 1)


def _check_checksum(data: bytes, doc: dict[str, Any], where: str) -> None:
    """The manifest's ``checksum`` is the BLAKE3 of its bytes with the checksum itself zeroed:
    any damage to a manifest (a size, a metric, a value in the skeleton) is detected."""
    checksum = doc.get("checksum")
    if not isinstance(checksum, str) or len(checksum) != 64:
        raise ManifestError(f'{where}: no valid "checksum" field; the manifest is damaged')
    blanked = data.replace(_field(checksum), _field(_PLACEHOLDER), 1)
    if blanked == data or content_hash(blanked) != checksum:
        raise ManifestError(
            f"{where}: checksum mismatch: the manifest was modified or damaged after it was "
            "written; restore another step (or use fallback=True)"
        )


def now_iso() -> str:
    """The current time as the manifest's ``created`` string."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _metric_to_json(metric: float | None) -> JSON:
    if metric is None or math.isfinite(metric):
        return metric
    return str(metric)  # "nan", "inf", "-inf": keep the fact without breaking strict JSON


def _metric_from_json(value: JSON, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ManifestError(f"{where}: metric must be a number or null, got {value!r}")


def parse_manifest(data: bytes, *, where: str) -> Manifest:
    """Parse and validate manifest bytes read from ``where`` (a path, used in messages).

    Raises :class:`FormatVersionError` for a newer format and :class:`ManifestError` for anything
    malformed, naming the field.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{where}: not valid JSON ({exc}); the manifest is damaged") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f'{where}: not a ckptd manifest (no "format": "{FORMAT}")')
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{where}: bad format version {version!r}")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{where}: written in manifest format version {version}, this ckptd reads up to "
            f"{FORMAT_VERSION}; upgrade ckptd to a release that reads version {version}"
        )
    _check_checksum(data, doc, where)
    try:
        return _build(doc, where)
    except ManifestError as exc:
        if where in str(exc):
            raise
        raise ManifestError(f"{where}: {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from exc


def _int(value: object, name: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _build(doc: dict[str, Any], where: str) -> Manifest:
    if doc["version"] >= 2:
        return _build_global(doc)
    objects: dict[str, ObjectInfo] = {}
    for h, o in doc["objects"].items():
        check_hash_name(h)
        codec = o["codec"]
        if not isinstance(codec, str):
            raise ValueError(f"objects.{h}.codec must be a string")
        objects[h] = ObjectInfo(
            _int(o["raw_bytes"], f"objects.{h}.raw_bytes"),
            _int(o["stored_bytes"], f"objects.{h}.stored_bytes"),
            codec,
        )
    tensors = []
    for i, t in enumerate(doc["tensors"]):
        name = f"tensors[{i}]"
        path, dtype = t["path"], t["dtype"]
        if not isinstance(path, str) or not isinstance(dtype, str):
            raise ValueError(f"{name}: path and dtype must be strings")
        shape = tuple(_int(d, f"{name}.shape") for d in t["shape"])
        nbytes = _int(t["nbytes"], f"{name}.nbytes")
        try:
            itemsize = dtype_from_name(dtype).itemsize
        except ManifestError as exc:
            raise ManifestError(f"{where}: {name} ({path}): {exc}") from exc
        expected = math.prod(shape) * itemsize
        if nbytes != expected:
            raise ValueError(
                f"{name} ({path}): nbytes {nbytes} != {expected} for {dtype}{list(shape)}"
            )
        pieces = []
        for obj, off, length in t["pieces"]:
            info = objects.get(check_hash_name(obj))
            if info is None:
                raise ValueError(f"{name} ({path}): piece names object {obj} missing from objects")
            if _int(off, "offset") + _int(length, "length", 1) > info.raw_bytes:
                raise ValueError(f"{name} ({path}): piece [{off}, +{length}) beyond object {obj}")
            pieces.append(Piece(obj, off, length))
        if sum(p.length for p in pieces) != nbytes:
            raise ValueError(f"{name} ({path}): pieces hold {sum(p.length for p in pieces)} bytes")
        tensors.append(TensorEntry(path, dtype, shape, nbytes, tuple(pieces)))
    job, created = doc["job"], doc["created"]
    if not isinstance(job, str) or not isinstance(created, str):
        raise ValueError("job and created must be strings")
    datetime.fromisoformat(created)
    return Manifest(
        job=job,
        step=check_step(doc["step"]),
        created=created,
        tensors=tuple(tensors),
        objects=objects,
        skeleton=doc["skeleton"],
        metric=_metric_from_json(doc.get("metric"), where),
        rank=_int(doc.get("rank", 0), "rank"),
        world_size=_int(doc.get("world_size", 1), "world_size", 1),
        written_bytes=_int(doc.get("totals", {}).get("written_bytes", 0), "totals.written_bytes"),
        seq=_int(doc["seq"], "seq", 1) if "seq" in doc else 0,
        digest=_digest_field(doc["digest"]) if "digest" in doc else None,
        attempt=check_attempt(doc["attempt"]) if "attempt" in doc else None,
    )


def _build_global(doc: dict[str, Any]) -> Manifest:
    """A version 2 manifest: the global record of a multi-rank step."""
    job, created = doc["job"], doc["created"]
    if not isinstance(job, str) or not isinstance(created, str):
        raise ValueError("job and created must be strings")
    datetime.fromisoformat(created)
    world_size = _int(doc["world_size"], "world_size", 2)
    attempt = check_attempt(doc["attempt"])
    parts = []
    for i, p in enumerate(doc["parts"]):
        record, checksum = p["record"], p["checksum"]
        if not isinstance(record, str) or not isinstance(checksum, str):
            raise ValueError(f"parts[{i}]: record and checksum must be strings")
        expected = (
            f"parts/{manifest_name(check_step(doc['step']))[:-5]}/{attempt}/rank-{i:05d}.json"
        )
        if record != expected:
            raise ValueError(f"parts[{i}].record must be {expected!r}, got {record!r:.200}")
        digest = p.get("digest")
        parts.append(
            PartRef(
                _int(p["rank"], f"parts[{i}].rank"),
                record,
                _digest_field(checksum),
                None if digest is None else _digest_field(digest),
            )
        )
    if [p.rank for p in parts] != list(range(world_size)):
        raise ValueError(
            f"parts must list ranks 0..{world_size - 1} once each, in order; got "
            f"{[p.rank for p in parts]}"
        )
    totals = doc["totals"]
    return Manifest(
        job=job,
        step=check_step(doc["step"]),
        created=created,
        tensors=(),
        objects={},
        skeleton=None,
        metric=_metric_from_json(doc.get("metric"), "metric"),
        world_size=world_size,
        seq=_int(doc["seq"], "seq", 1) if "seq" in doc else 0,
        digest=_digest_field(doc["digest"]) if "digest" in doc else None,
        attempt=attempt,
        parts=tuple(parts),
        part_totals=(
            _int(totals["tensors"], "totals.tensors"),
            _int(totals["raw_bytes"], "totals.raw_bytes"),
            _int(totals["stored_bytes"], "totals.stored_bytes"),
            _int(totals.get("written_bytes", 0), "totals.written_bytes"),
        ),
    )


def _digest_field(value: object) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ValueError(f"digest must be 64 lowercase hex digits, got {value!r}")
    return value


# ---- commit order: the seq of a manifest, cheaply ------------------------------------------------

_HEAD = re.compile(
    rb'\{\n "format": "ckptd\.manifest",\n "version": [12],\n "checksum": "([0-9a-f]{64})",\n'
    rb' "job": "[^"\\\n]*",\n "step": (0|[1-9][0-9]*),\n'
    rb'(?: "seq": ([1-9][0-9]*),\n)? "created": "'
)
"""The first lines of a manifest as :meth:`Manifest.to_json` writes them."""
_SEQ_LINE = re.compile(rb'\n "seq": ([0-9]{1,18}),\n')
_HEX64 = re.compile(r"[0-9a-f]{64}")


def commit_seq(data: bytes, *, where: str) -> tuple[int, int]:
    """``(step, seq)`` of the manifest bytes ``data``, checksum verified; ``seq`` is 0 for a
    manifest written before seq existed.

    Ordering a job's checkpoints by commit reads every manifest, so this avoids parsing the JSON:
    when the manifest starts as :meth:`Manifest.to_json` writes it, the step and seq come from
    its first lines and only the checksum (a hash of the bytes) is checked; any other layout is
    parsed in full. Raises like :func:`parse_manifest` (:class:`ManifestError`,
    :class:`FormatVersionError`) for a damaged or newer manifest.
    """
    head = _HEAD.match(data)
    if head is None:
        manifest = parse_manifest(data, where=where)
        return manifest.step, manifest.seq
    checksum = head.group(1).decode()
    blanked = data.replace(_field(checksum), _field(_PLACEHOLDER), 1)
    if blanked == data or content_hash(blanked) != checksum:
        # The same verdict parse_manifest gives, with its message.
        _check_checksum(data, {"checksum": checksum}, where)
    seq = head.group(3)
    return int(head.group(2)), 0 if seq is None else int(seq)


def claimed_seq(data: bytes) -> int | None:
    """What the ``seq`` line of a (possibly damaged) manifest says, unverified; None when no
    such line is found near the start. Only for ordering a manifest whose checksum fails."""
    found = _SEQ_LINE.search(data, 0, 1024)
    return None if found is None else int(found.group(1))


_CHECKSUM_LINE = re.compile(rb'"checksum": "([0-9a-f]{64})"')


def manifest_checksum(data: bytes) -> str:
    """The ``checksum`` field of manifest bytes that :func:`parse_manifest` accepted."""
    found = _CHECKSUM_LINE.search(data)
    if found is None:
        raise ManifestError('no "checksum" field; the manifest is damaged')
    return found.group(1).decode()
