"""Lossless encoding of chunk objects: float byte grouping + zstd, plain zstd, or raw.

Trained float weights compress poorly as a byte stream (zstd-1 keeps ~92% of fp32 weights) because
the high-entropy mantissa bytes are interleaved with the low-entropy sign/exponent byte. Grouping
byte *i* of every element into plane *i* (the idea of ZipNN's byte grouping) separates them: the
exponent plane compresses to about a third, the mantissa planes are stored nearly raw. Each plane is
its own zstd frame, or raw when zstd would not make it smaller.

Object file layout (all integers little-endian)::

    header  16 bytes  struct "<4sBBHQ": magic b"CKO1", codec id, element size,
                      reserved (0), raw length in bytes
    payload           codec RAW (0):       the raw bytes
                      codec ZSTD (1):      one zstd frame
                      codec BYTEGROUP (2): element-size plane records "<BQ" (mode 0 raw / 1 zstd,
                                           stored length), then the planes' bytes in order;
                                           plane i holds byte i of every element

Thread safety: :func:`encode`, :func:`decode` and :func:`decode_into` may be called from many
threads at once; each thread keeps its own zstd contexts. They release the GIL for the heavy work
(numpy copies, zstd).
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zstandard

from ckptd.errors import CorruptCheckpointError, FormatVersionError

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("ckptd's on-disk format assumes a little-endian host")

MAGIC = b"CKO1"
HEADER = struct.Struct("<4sBBHQ")
PLANE = struct.Struct("<BQ")

RAW, ZSTD, BYTEGROUP = 0, 1, 2
CODEC_NAMES = {RAW: "raw", ZSTD: "zstd", BYTEGROUP: "bytegroup+zstd"}

CodecChoice = Literal["auto", "bytegroup", "zstd", "raw"]

# Planes smaller than this are compressed whole; larger ones are first probed with a sample so
# that incompressible mantissa planes cost a 64 KiB trial instead of a full zstd pass.
_PROBE_MIN_BYTES = 256 << 10
_PROBE_BYTES = 64 << 10
# Keep zstd output only when it saves at least this fraction.
_MIN_SAVING = 0.01


@dataclass(frozen=True)
class CodecConfig:
    """How chunks are encoded.

    ``codec``: ``"bytegroup"`` groups float bytes before zstd and uses plain zstd for other dtypes;
    ``"zstd"`` always uses plain zstd; ``"raw"`` stores bytes as they are (fastest persist, largest
    files). ``"auto"`` encodes as ``"bytegroup"``: the daemon never hands it to the encoder,
    :class:`ckptd.pipeline.auto.AutoCodec` replaces it per write by ``"bytegroup"`` or ``"raw"``.
    ``level``: zstd level; 1 is the measured sweet spot (higher levels are slower and, after byte
    grouping, no smaller).
    """

    codec: CodecChoice = "auto"
    level: int = 1


@dataclass(frozen=True)
class Encoded:
    """An encoded object: ``parts`` are written in order; ``stored_bytes`` is their total length."""

    codec: int
    parts: tuple[bytes | memoryview, ...]
    stored_bytes: int

    @property
    def codec_name(self) -> str:
        return CODEC_NAMES[self.codec]


_local = threading.local()


# The most significant byte plane of trained floats (sign + exponent) has a small alphabet and few
# useful repeats: zstd tuned to emit mostly Huffman-coded literals gets it to its byte entropy
# (~0.34 on MiniLM) 3x faster than level 1, which wastes time and bits on short matches (0.37).
_LITERAL_PARAMS = {"window_log": 17, "hash_log": 6, "search_log": 1, "min_match": 7}
_LITERALS = -1000  # cache key of the literal-leaning compressor


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("c", {})
    comp = cache.get(level)
    if comp is None:
        if level == _LITERALS:
            params = zstandard.ZstdCompressionParameters(
                strategy=zstandard.STRATEGY_FAST, write_checksum=False, **_LITERAL_PARAMS
            )
            comp = zstandard.ZstdCompressor(compression_params=params)
        else:
            comp = zstandard.ZstdCompressor(level=level, write_checksum=False)
        cache[level] = comp
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = _local.__dict__.get("d")
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def _maybe_compress(data: memoryview, level: int) -> bytes | None:
    """zstd-compress ``data``; None when that would not save at least ``_MIN_SAVING``."""
    comp = _compressor(level)
    if len(data) >= _PROBE_MIN_BYTES:
        probe = comp.compress(data[:_PROBE_BYTES])
        if len(probe) >= _PROBE_BYTES * (1 - _MIN_SAVING):
            return None
    out = comp.compress(data)
    if len(out) >= len(data) * (1 - _MIN_SAVING):
        return None
    return out


def encode(raw: memoryview, *, elem_size: int, is_float: bool, config: CodecConfig) -> Encoded:
    """Encode ``raw`` (the chunk's bytes) into an object.

    ``elem_size`` and ``is_float`` describe the elements of the chunk (all of one dtype); byte
    grouping is used for floats of 2, 4 or 8 bytes whose length is a whole number of elements.
    """
    raw = raw.cast("B") if raw.format != "B" or raw.ndim != 1 else raw
    n = len(raw)
    if config.codec != "raw" and n > 0:
        if (
            config.codec in ("auto", "bytegroup")
            and is_float
            and elem_size in (2, 4, 8)
            and n % elem_size == 0
        ):
            return _encode_bytegroup(raw, elem_size, config.level)
        packed = _maybe_compress(raw, config.level)
        if packed is not None:
            header = HEADER.pack(MAGIC, ZSTD, elem_size, 0, n)
            return Encoded(ZSTD, (header, packed), len(header) + len(packed))
    header = HEADER.pack(MAGIC, RAW, elem_size, 0, n)
    return Encoded(RAW, (header, raw), len(header) + n)


def _encode_bytegroup(raw: memoryview, elem_size: int, level: int) -> Encoded:
    elements = np.frombuffer(raw, dtype=np.uint8).reshape(-1, elem_size)
    n = len(elements)
    # All planes in one allocation of the chunk's size: the allocator hands the same block back
    # chunk after chunk, where a fresh array per plane cost page faults (~3k per 256 MB persisted).
    planes = np.empty(len(raw), dtype=np.uint8)
    table: list[bytes] = []
    bodies: list[bytes | memoryview] = []
    stored = 0
    for i in range(elem_size):
        dst = planes[i * n : (i + 1) * n]
        np.copyto(dst, elements[:, i])
        plane = dst.data
        packed = _maybe_compress(plane, _LITERALS if i == elem_size - 1 else level)
        body: bytes | memoryview = plane if packed is None else packed
        table.append(PLANE.pack(RAW if packed is None else ZSTD, len(body)))
        bodies.append(body)
        stored += len(body)
    if stored >= len(raw) * (1 - _MIN_SAVING):
        header = HEADER.pack(MAGIC, RAW, elem_size, 0, len(raw))
        return Encoded(RAW, (header, raw), len(header) + len(raw))
    head = HEADER.pack(MAGIC, BYTEGROUP, elem_size, 0, len(raw)) + b"".join(table)
    return Encoded(BYTEGROUP, (head, *bodies), len(head) + stored)


def read_header(data: bytes | memoryview, *, where: str) -> tuple[int, int, int]:
    """Parse an object header; return ``(codec, elem_size, raw_len)``."""
    if len(data) < HEADER.size:
        raise CorruptCheckpointError(
            f"{where}: truncated object ({len(data)} bytes, shorter than its {HEADER.size}-byte "
            "header); run `ckptd verify` and restore from another checkpoint"
        )
    magic, codec, elem_size, _reserved, raw_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        if magic[:3] == MAGIC[:3] and magic[3:].isdigit() and magic[3:] > MAGIC[3:]:
            raise FormatVersionError(
                f"{where}: object format {magic[3:]!r} is newer than this ckptd reads (1); "
                "upgrade ckptd to read it"
            )
        raise CorruptCheckpointError(f"{where}: not a ckptd object (bad magic {magic!r})")
    if codec not in CODEC_NAMES:
        raise CorruptCheckpointError(f"{where}: unknown codec id {codec}")
    return codec, elem_size, raw_len


def decode(data: bytes | memoryview, out: memoryview, *, where: str) -> None:
    """Decode the object file contents ``data`` into ``out`` (exactly its raw length).

    Raises :class:`CorruptCheckpointError` (naming ``where``) when the object is truncated,
    damaged, or does not decode to ``len(out)`` bytes. The caller still verifies the hash.
    """
    decode_into(data, [out], where=where)


def decode_into(data: bytes | memoryview, pieces: Sequence[memoryview], *, where: str) -> None:
    """Decode the object file contents ``data`` into ``pieces``: writable byte buffers that
    receive the object's raw bytes in order, split at their lengths (which add up to its raw
    length). They are typically the tensors a packed object holds, or the slice of one tensor a
    chunk fills, so the bytes land where they are used with no copy in between: byte-grouped
    planes are scattered straight into them.

    Raises :class:`CorruptCheckpointError` (naming ``where``) when the object is truncated,
    damaged, or does not decode to the pieces' total length; the pieces then hold partial
    garbage. The caller still verifies the hash.
    """
    view = memoryview(data)
    codec, elem_size, raw_len = read_header(view, where=where)
    total = sum(len(p) for p in pieces)
    if raw_len != total:
        raise CorruptCheckpointError(
            f"{where}: object holds {raw_len} raw bytes but the manifest expects {total}"
        )
    body = view[HEADER.size :]
    try:
        if codec == RAW:
            if len(body) != raw_len:
                raise CorruptCheckpointError(
                    f"{where}: truncated object ({len(body)} of {raw_len} payload bytes)"
                )
            _spread(body, pieces)
        elif codec == ZSTD:
            _spread(_unzstd(body, raw_len, where), pieces)
        else:
            _decode_bytegroup(body, pieces, raw_len, elem_size, where)
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(f"{where}: damaged zstd data ({exc})") from exc


# Below this many bytes numpy's per-call overhead (~1-2 us) costs more than the copy, and
# memoryview assignment holds the GIL for too short a time to matter.
_NUMPY_COPY_MIN_BYTES = 64 << 10


def copy_bytes(dst: memoryview, src: bytes | memoryview) -> None:
    """``dst[:] = src`` for byte buffers of one length; large copies release the GIL."""
    if len(dst) >= _NUMPY_COPY_MIN_BYTES:
        np.copyto(np.frombuffer(dst, dtype=np.uint8), np.frombuffer(src, dtype=np.uint8))
    else:
        dst[:] = src


def _spread(src: bytes | memoryview, pieces: Sequence[memoryview]) -> None:
    view = memoryview(src)
    pos = 0
    for piece in pieces:
        copy_bytes(piece, view[pos : pos + len(piece)])
        pos += len(piece)


def _unzstd(frame: memoryview, raw_len: int, where: str) -> bytes:
    plain = _decompressor().decompress(frame, max_output_size=raw_len)
    if len(plain) != raw_len:
        raise CorruptCheckpointError(
            f"{where}: zstd data decodes to {len(plain)} bytes, expected {raw_len}"
        )
    return plain


# Consecutive pieces smaller than this are decoded together into one temporary buffer and
# copied out: scattering a plane costs a numpy call per piece (~1.5 us), a copy is cheaper.
_SCATTER_MIN_BYTES = 16 << 10


def _plane_targets(
    pieces: Sequence[memoryview], elem_size: int
) -> tuple[list[tuple[np.ndarray, int, int]], list[tuple[memoryview, memoryview]]]:
    """Where byte-grouped planes go: ``(elements (n, elem_size), first, end)`` per target, each
    receiving elements ``[first, end)`` of the object, and the copies that move runs of small
    pieces out of the temporary buffer they were decoded into, afterwards."""
    targets: list[tuple[np.ndarray, int, int]] = []
    copies: list[tuple[memoryview, memoryview]] = []
    run: list[memoryview] = []
    pos = run_start = 0

    def flush() -> None:
        if len(run) == 1:
            targets.append(
                (np.frombuffer(run[0], dtype=np.uint8).reshape(-1, elem_size), run_start, pos)
            )
        elif run:
            temp = memoryview(bytearray(sum(len(p) for p in run)))
            targets.append(
                (np.frombuffer(temp, dtype=np.uint8).reshape(-1, elem_size), run_start, pos)
            )
            offset = 0
            for p in run:
                copies.append((p, temp[offset : offset + len(p)]))
                offset += len(p)
        run.clear()

    for piece in pieces:
        n = len(piece) // elem_size
        if len(piece) >= _SCATTER_MIN_BYTES:
            flush()
            targets.append(
                (np.frombuffer(piece, dtype=np.uint8).reshape(n, elem_size), pos, pos + n)
            )
        else:
            if not run:
                run_start = pos
            run.append(piece)
        pos += n
    flush()
    return targets, copies


def _decode_bytegroup(
    body: memoryview, pieces: Sequence[memoryview], raw_len: int, elem_size: int, where: str
) -> None:
    if elem_size not in (2, 4, 8) or raw_len % elem_size:
        raise CorruptCheckpointError(f"{where}: bad element size {elem_size} for byte grouping")
    table_len = PLANE.size * elem_size
    if len(body) < table_len:
        raise CorruptCheckpointError(f"{where}: truncated object (plane table cut short)")
    if any(len(p) % elem_size for p in pieces):
        # Pieces that split elements (no writer makes them): decode whole, then copy.
        whole = memoryview(bytearray(raw_len))
        _decode_bytegroup(body, [whole], raw_len, elem_size, where)
        _spread(whole, pieces)
        return
    n = raw_len // elem_size
    targets, copies = _plane_targets(pieces, elem_size)
    pos = table_len
    for i in range(elem_size):
        mode, length = PLANE.unpack_from(body, i * PLANE.size)
        chunk = body[pos : pos + length]
        if len(chunk) != length:
            raise CorruptCheckpointError(f"{where}: truncated object (plane {i} cut short)")
        if mode == RAW:
            plane: bytes | memoryview = chunk
        elif mode == ZSTD:
            plane = _decompressor().decompress(chunk, max_output_size=n)
        else:
            raise CorruptCheckpointError(f"{where}: unknown plane mode {mode}")
        if len(plane) != n:
            raise CorruptCheckpointError(f"{where}: plane {i} has {len(plane)} bytes, not {n}")
        # Column by column: numpy scatters one plane at ~3.5 GB/s, while assigning the whole
        # transposed (planes, n) array at once runs at ~0.7 GB/s.
        values = np.frombuffer(plane, dtype=np.uint8)
        for elements, first, end in targets:
            elements[:, i] = values[first:end]
        pos += length
    if pos != len(body):
        raise CorruptCheckpointError(f"{where}: {len(body) - pos} unexpected trailing bytes")
    for dst, src in copies:
        copy_bytes(dst, src)
