"""``ckptd status``'s codec line, from the ``codec`` object of the daemon's status."""

from __future__ import annotations

from typing import Any

import pytest

from ckptd.cli.service import codec_line

MEASURED: dict[str, Any] = {
    "disk_bytes_per_s": 1.2e9,
    "codec_bytes_per_s_per_core": 0.7e9,
    "free_cores": 0.25,
    "cpus": 8,
    "writes": {"compress": 1, "raw": 4},
}


@pytest.mark.parametrize(
    ("codec", "line"),
    [
        (None, "codec: no snapshot written yet"),
        ({"choice": None, "writes": {"compress": 0, "raw": 0}}, "codec: no snapshot written yet"),
        (
            {
                **MEASURED,
                "configured": "auto",
                "choice": "raw",
                "why": "disk-faster",
                "job": "train",
                "reason": "the disk outruns the codec: ...",
            },
            "codec auto: raw for train: the disk outruns the codec: ...   [disk 1.20 GB/s, "
            "codec per core 0.70 GB/s, free cores 0.2 of 8, writes 1 compressed, 4 raw]",
        ),
        (
            {
                **MEASURED,
                "configured": "zstd",
                "choice": "compress",
                "why": "configured",
                "job": "train",
                "reason": 'codec.codec = "zstd"',
                "codec_bytes_per_s_per_core": None,
                "free_cores": None,
            },
            "codec zstd (codec.codec)   [disk 1.20 GB/s, writes 1 compressed, 4 raw]",
        ),
    ],
)
def test_codec_line(codec: dict[str, Any] | None, line: str) -> None:
    assert codec_line(codec) == line
