"""ckptd.format.codec: lossless round trips, the exact object layout, and damaged objects
refused."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import pytest
import torch

from ckptd.errors import CorruptCheckpointError, FormatVersionError
from ckptd.format.codec import (
    BYTEGROUP,
    HEADER,
    MAGIC,
    PLANE,
    RAW,
    ZSTD,
    CodecChoice,
    CodecConfig,
    Encoded,
    decode,
    encode,
    read_header,
)

WHERE = "object objects/ab/abcd (holding tensor model.w)"


E = TypeVar("E", bound=BaseException)


@contextmanager
def raises_exactly(cls: type[E], match: str | None = None) -> Iterator[pytest.ExceptionInfo[E]]:
    """pytest.raises that also refuses subclasses (ManifestError is a CorruptCheckpointError)."""
    with pytest.raises(cls, match=match) as info:
        yield info
    assert info.type is cls, f"expected exactly {cls.__name__}, got {info.type.__name__}"


# (dtype, element size the pipeline hands the codec, is_float): floats are described by their
# component size (complex64 -> two float32 components), as ckptd.pipeline.write does.
DTYPES: list[tuple[torch.dtype, int, bool]] = [
    (torch.bool, 1, False),
    (torch.uint8, 1, False),
    (torch.int8, 1, False),
    (torch.int16, 2, False),
    (torch.uint16, 2, False),
    (torch.int32, 4, False),
    (torch.uint32, 4, False),
    (torch.int64, 8, False),
    (torch.uint64, 8, False),
    (torch.float16, 2, True),
    (torch.bfloat16, 2, True),
    (torch.float32, 4, True),
    (torch.float64, 8, True),
    (torch.complex32, 2, True),
    (torch.complex64, 4, True),
    (torch.complex128, 8, True),
    (torch.float8_e4m3fn, 1, False),
    (torch.float8_e5m2, 1, False),
]
LENGTHS = [1, 3, 7, 1001, 4099]
CODECS: list[CodecChoice] = ["auto", "zstd", "raw"]


def _typical(dtype: torch.dtype, n: int, seed: int = 0) -> bytes:
    """``n`` elements of ``dtype`` that look like training state (so compression can win)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        t = torch.rand(n, generator=gen) > 0.5
    elif dtype.is_complex:
        half = {torch.complex32: torch.float16, torch.complex64: torch.float32}
        comp = half.get(dtype, torch.float64)
        t = (torch.randn(2 * n, generator=gen) * 0.02).to(comp).view(dtype)
    elif dtype.is_floating_point:
        t = (torch.randn(n, generator=gen) * 0.02).to(dtype)
    else:
        t = torch.randint(0, 100, (n,), generator=gen).to(dtype)
    return t.view(torch.uint8).numpy().tobytes()


def _joined(encoded: Encoded) -> bytes:
    return b"".join(bytes(p) for p in encoded.parts)


def _roundtrip(raw: bytes, *, elem_size: int, is_float: bool, config: CodecConfig) -> Encoded:
    encoded = encode(memoryview(raw), elem_size=elem_size, is_float=is_float, config=config)
    data = _joined(encoded)
    assert len(data) == encoded.stored_bytes
    out = bytearray(len(raw))
    decode(data, memoryview(out), where=WHERE)
    assert bytes(out) == raw
    return encoded


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(("dtype", "elem_size", "is_float"), DTYPES, ids=str)
def test_roundtrip_every_dtype(
    dtype: torch.dtype, elem_size: int, is_float: bool, codec: CodecChoice, n: int
) -> None:
    raw = _typical(dtype, n)
    encoded = _roundtrip(raw, elem_size=elem_size, is_float=is_float, config=CodecConfig(codec))
    if codec == "raw":
        assert encoded.codec == RAW
    elif codec == "zstd" or not is_float:
        assert encoded.codec in (ZSTD, RAW)
    else:
        assert encoded.codec in (BYTEGROUP, RAW)
    assert encoded.stored_bytes <= HEADER.size + len(raw) + PLANE.size * elem_size


@pytest.mark.parametrize(
    ("elem_size", "np_dtype"), [(2, np.float16), (4, np.float32), (8, np.float64)]
)
def test_float_weights_use_byte_grouping_and_beat_plain_zstd(
    elem_size: int, np_dtype: type[np.floating]
) -> None:
    values = np.random.default_rng(1).standard_normal(20_000).astype(np_dtype) * np_dtype(0.02)
    raw = values.tobytes()
    grouped = _roundtrip(raw, elem_size=elem_size, is_float=True, config=CodecConfig("auto"))
    plain = _roundtrip(raw, elem_size=elem_size, is_float=True, config=CodecConfig("zstd"))
    assert grouped.codec == BYTEGROUP
    assert grouped.codec_name == "bytegroup+zstd"
    assert grouped.stored_bytes < len(raw)
    assert grouped.stored_bytes < plain.stored_bytes


@pytest.mark.parametrize(
    ("elem_size", "extra"), [(e, x) for e in (2, 4, 8) for x in range(1, 2 * e) if x % e]
)
def test_float_bytes_not_a_whole_number_of_elements(elem_size: int, extra: int) -> None:
    """Byte grouping needs whole elements; any other length still round-trips (plain zstd)."""
    raw = _typical(torch.float64, 600) + bytes(range(extra))
    encoded = _roundtrip(raw, elem_size=elem_size, is_float=True, config=CodecConfig("auto"))
    assert encoded.codec in (ZSTD, RAW)


@pytest.mark.parametrize("n", [1, 100, 4099, 300 << 10])
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(("elem_size", "is_float"), [(1, False), (4, False), (4, True), (8, True)])
def test_incompressible_data_is_stored_raw(
    n: int, codec: CodecChoice, elem_size: int, is_float: bool
) -> None:
    raw = np.random.default_rng(n).bytes(n - n % elem_size)
    encoded = _roundtrip(raw, elem_size=elem_size, is_float=is_float, config=CodecConfig(codec))
    assert encoded.codec == RAW
    assert encoded.codec_name == "raw"
    assert encoded.stored_bytes == HEADER.size + len(raw)


def test_compressible_bytes_use_zstd() -> None:
    raw = bytes(range(256)) * 64
    encoded = _roundtrip(raw, elem_size=1, is_float=False, config=CodecConfig("auto"))
    assert encoded.codec == ZSTD
    assert encoded.codec_name == "zstd"
    assert encoded.stored_bytes < len(raw) // 10


def test_empty_input_roundtrips_as_raw() -> None:
    encoded = _roundtrip(b"", elem_size=4, is_float=True, config=CodecConfig("auto"))
    assert encoded.codec == RAW
    assert encoded.stored_bytes == HEADER.size


def test_non_byte_memoryview_input() -> None:
    values = np.arange(1000, dtype=np.int32)
    view = values.data  # format "i", not "B"
    encoded = encode(view, elem_size=4, is_float=False, config=CodecConfig())
    out = bytearray(values.nbytes)
    decode(_joined(encoded), memoryview(out), where=WHERE)
    assert bytes(out) == values.tobytes()


# ---- exact layout ------------------------------------------------------------------------------


def test_header_constants() -> None:
    assert MAGIC == b"CKO1"
    assert HEADER.size == 16
    assert PLANE.size == 9
    assert (RAW, ZSTD, BYTEGROUP) == (0, 1, 2)


def test_raw_object_layout_byte_for_byte() -> None:
    raw = np.random.default_rng(7).bytes(300)
    encoded = encode(memoryview(raw), elem_size=4, is_float=False, config=CodecConfig("raw"))
    expected_header = b"CKO1" + bytes([0, 4]) + b"\x00\x00" + (300).to_bytes(8, "little")
    assert _joined(encoded) == expected_header + raw
    assert read_header(expected_header, where=WHERE) == (RAW, 4, 300)


def test_zstd_object_layout() -> None:
    raw = b"\x00" * 5000
    encoded = encode(memoryview(raw), elem_size=2, is_float=False, config=CodecConfig("zstd"))
    data = _joined(encoded)
    assert data[:16] == b"CKO1" + bytes([1, 2]) + b"\x00\x00" + (5000).to_bytes(8, "little")
    assert data[16:20] == b"\x28\xb5\x2f\xfd"  # one zstd frame follows the header
    assert encoded.stored_bytes == len(data) < 100


def test_bytegroup_object_layout() -> None:
    values = (np.random.default_rng(3).standard_normal(4096) * 0.02).astype(np.float32)
    raw = values.tobytes()
    encoded = encode(memoryview(raw), elem_size=4, is_float=True, config=CodecConfig("auto"))
    assert encoded.codec == BYTEGROUP
    data = _joined(encoded)
    assert data[:16] == b"CKO1" + bytes([2, 4]) + b"\x00\x00" + len(raw).to_bytes(8, "little")
    table = [struct.unpack_from("<BQ", data, 16 + 9 * i) for i in range(4)]
    bodies = data[16 + 9 * 4 :]
    assert sum(length for _, length in table) == len(bodies)
    # Plane i holds byte i of every element, raw (mode 0) or as one zstd frame (mode 1).
    pos = 0
    for i, (mode, length) in enumerate(table):
        body = bodies[pos : pos + length]
        plane = values.view(np.uint8).reshape(-1, 4)[:, i].tobytes()
        if mode == 0:
            assert body == plane
        else:
            assert mode == 1
            assert body[:4] == b"\x28\xb5\x2f\xfd"
        pos += length
    # The sign/exponent plane (the most significant byte) is the one that compresses.
    assert table[3][0] == 1
    assert table[3][1] < len(values) // 2


# ---- damaged objects ---------------------------------------------------------------------------


def _object(kind: str) -> tuple[bytes, bytes]:
    """(raw bytes, encoded object) of the given codec."""
    if kind == "raw":
        raw = np.random.default_rng(11).bytes(1000)
        enc = encode(memoryview(raw), elem_size=1, is_float=False, config=CodecConfig("raw"))
    elif kind == "zstd":
        raw = bytes(range(250)) * 4
        enc = encode(memoryview(raw), elem_size=1, is_float=False, config=CodecConfig("zstd"))
    else:
        raw = (np.random.default_rng(12).standard_normal(250) * 0.02).astype(np.float32).tobytes()
        enc = encode(memoryview(raw), elem_size=4, is_float=True, config=CodecConfig("auto"))
    assert enc.codec == {"raw": RAW, "zstd": ZSTD, "bytegroup": BYTEGROUP}[kind]
    return raw, _joined(enc)


def _decode(data: bytes, n: int) -> bytes:
    out = bytearray(n)
    decode(data, memoryview(out), where=WHERE)
    return bytes(out)


@pytest.mark.parametrize("kind", ["raw", "zstd", "bytegroup"])
@pytest.mark.parametrize("keep", [0, 1, 15])
def test_truncated_inside_header(kind: str, keep: int) -> None:
    raw, data = _object(kind)
    with raises_exactly(
        CorruptCheckpointError,
        match=rf"^object objects/ab/abcd \(holding tensor model\.w\): truncated object "
        rf"\({keep} bytes, shorter than its 16-byte header\)",
    ):
        _decode(data[:keep], len(raw))


def test_truncated_raw_payload() -> None:
    raw, data = _object("raw")
    with raises_exactly(CorruptCheckpointError, match=r"truncated object \(999 of 1000 payload"):
        _decode(data[:-1], len(raw))


@pytest.mark.parametrize("cut", [1, 5])
def test_truncated_zstd_frame(cut: int) -> None:
    raw, data = _object("zstd")
    with raises_exactly(CorruptCheckpointError, match=r"holding tensor model\.w\): damaged zstd"):
        _decode(data[:-cut], len(raw))


def test_truncated_bytegroup_plane_table() -> None:
    raw, data = _object("bytegroup")
    with raises_exactly(CorruptCheckpointError, match=r"truncated object \(plane table cut short"):
        _decode(data[: 16 + 9 * 4 - 1], len(raw))


def test_truncated_bytegroup_last_plane() -> None:
    raw, data = _object("bytegroup")
    with raises_exactly(CorruptCheckpointError, match=r"truncated object \(plane 3 cut short\)"):
        _decode(data[:-1], len(raw))


def test_bytegroup_trailing_bytes() -> None:
    raw, data = _object("bytegroup")
    with raises_exactly(CorruptCheckpointError, match="2 unexpected trailing bytes"):
        _decode(data + b"\x00\x00", len(raw))


@pytest.mark.parametrize("kind", ["raw", "zstd", "bytegroup"])
def test_flipped_magic_bit(kind: str) -> None:
    raw, data = _object(kind)
    damaged = bytes([data[0] ^ 0x01]) + data[1:]
    with raises_exactly(CorruptCheckpointError, match=r"not a ckptd object \(bad magic b'BKO1'\)"):
        _decode(damaged, len(raw))


@pytest.mark.parametrize("codec_id", [3, 7, 255])
def test_unknown_codec_id(codec_id: int) -> None:
    raw, data = _object("zstd")
    damaged = data[:4] + bytes([codec_id]) + data[5:]
    with raises_exactly(
        CorruptCheckpointError, match=rf"holding tensor model\.w\): unknown codec id {codec_id}$"
    ):
        _decode(damaged, len(raw))


def test_flipped_raw_length_field() -> None:
    raw, data = _object("zstd")
    damaged = data[:8] + bytes([data[8] ^ 0x04]) + data[9:]  # 1000 -> 1004
    with raises_exactly(
        CorruptCheckpointError, match="object holds 1004 raw bytes but the manifest expects 1000"
    ):
        _decode(damaged, len(raw))


@pytest.mark.parametrize("kind", ["raw", "zstd", "bytegroup"])
def test_wrong_length_output(kind: str) -> None:
    raw, data = _object(kind)
    with raises_exactly(
        CorruptCheckpointError,
        match=rf"object holds {len(raw)} raw bytes but the manifest expects {len(raw) + 4}",
    ):
        _decode(data, len(raw) + 4)


def test_bytegroup_bad_element_size() -> None:
    raw, data = _object("bytegroup")
    damaged = data[:5] + bytes([3]) + data[6:]
    with raises_exactly(CorruptCheckpointError, match="bad element size 3 for byte grouping"):
        _decode(damaged, len(raw))


def test_bytegroup_unknown_plane_mode() -> None:
    raw, data = _object("bytegroup")
    damaged = data[:16] + bytes([9]) + data[17:]
    with raises_exactly(CorruptCheckpointError, match="unknown plane mode 9"):
        _decode(damaged, len(raw))


def test_zstd_frame_magic_flipped() -> None:
    raw, data = _object("zstd")
    damaged = data[:16] + bytes([data[16] ^ 0xFF]) + data[17:]
    with raises_exactly(CorruptCheckpointError, match="damaged zstd data"):
        _decode(damaged, len(raw))


def test_zstd_frame_of_the_wrong_size() -> None:
    """A well-formed frame that holds fewer bytes than the header promises."""
    short = encode(memoryview(b"\x00" * 600), elem_size=1, is_float=False, config=CodecConfig())
    frame = _joined(short)[16:]
    data = HEADER.pack(MAGIC, ZSTD, 1, 0, 1000) + frame
    with raises_exactly(
        CorruptCheckpointError, match="zstd data decodes to 600 bytes, expected 1000"
    ):
        _decode(data, 1000)


@pytest.mark.parametrize("kind", ["raw", "zstd", "bytegroup"])
def test_newer_object_format_magic(kind: str) -> None:
    raw, data = _object(kind)
    newer = b"CKO2" + data[4:]
    with raises_exactly(
        FormatVersionError,
        match=r"holding tensor model\.w\): object format b'2' is newer than this ckptd reads "
        r"\(1\); upgrade ckptd",
    ):
        _decode(newer, len(raw))


def test_read_header_reports_fields() -> None:
    raw, data = _object("bytegroup")
    assert read_header(data, where=WHERE) == (BYTEGROUP, 4, len(raw))
    with raises_exactly(FormatVersionError, match="newer than this ckptd reads"):
        read_header(b"CKO9" + data[4:16], where=WHERE)
