"""The per-layout caches of the hand-off (issue 16, fixed cost): the client's
:class:`~ckptd_client.slots.LayoutCache` and the daemon's
:class:`~ckptd.protocol.LayoutParser` give exactly what laying out and parsing from scratch give,
and a layout that only looks like the remembered one is parsed in full."""

from __future__ import annotations

import json

import pytest
import torch

from ckptd.errors import ProtocolError
from ckptd.format.skeleton import dtype_from_name, flatten
from ckptd.protocol import LayoutParser, encode_layout, parse_layout
from ckptd_client.slots import LayoutCache, layout


def _itemsize(dtype: str) -> int:
    return dtype_from_name(dtype).itemsize


def _state(n: int = 3, lr: float = 0.1) -> dict[str, object]:
    return {
        "w": [torch.ones(n, 4) * i for i in range(3)],
        "b": torch.zeros(n, dtype=torch.bfloat16),
        "lr": lr,
        "rng": tuple(range(100, 725)),
    }


def test_layout_cache_matches_layout_and_notices_changes() -> None:
    cache = LayoutCache()
    for n, lr in ((3, 0.1), (3, 0.2), (5, 0.2), (3, 0.3)):
        flat = flatten(_state(n, lr))
        entries, end, encoded = cache.get(flat.paths, flat.tensors)
        assert (entries, end) == layout(flat.paths, flat.tensors)
        assert encode_layout(flat.skeleton, entries, encoded) == encode_layout(
            flat.skeleton, entries
        )
    flat = flatten({"w": torch.ones(3, 4, dtype=torch.float64)})  # same shape, new dtype
    entries, _end, _encoded = cache.get(flat.paths, flat.tensors)
    assert entries[0].dtype == "float64"


def test_int_sequences_encode_as_before() -> None:
    skeleton = flatten({"t": tuple(range(20)), "l": list(range(20)), "b": [True] * 20}).skeleton
    assert skeleton == {
        "t": {"$tuple": list(range(20))},
        "l": list(range(20)),
        "b": [True] * 20,
    }


def test_layout_parser_reuses_entries_only_for_the_same_tensors() -> None:
    parser = LayoutParser()
    flat = flatten(_state())
    entries, end = layout(flat.paths, flat.tensors)
    for lr in (0.1, 0.2, 0.3):
        meta = encode_layout(flatten(_state(lr=lr)).skeleton, entries)
        got = parser.parse(meta, end, _itemsize)
        assert got == parse_layout(meta, end, _itemsize)
        assert got.skeleton["lr"] == lr
    # The same tensors but a data area too small for them: parsed in full, and refused.
    meta = encode_layout(flat.skeleton, entries)
    with pytest.raises(ProtocolError, match="outside the slot"):
        parser.parse(meta, end - 64, _itemsize)
    # Another key after the skeleton: not the canonical layout; parsed in full.
    doc = json.loads(meta)
    odd = json.dumps({"skeleton": doc["skeleton"], "x": 1, "tensors": doc["tensors"]})
    assert parser.parse(odd.encode(), end, _itemsize).tensors == tuple(entries)
    # A skeleton that tries to end like the remembered tensors is still just a skeleton.
    tail = meta[meta.index(b',"tensors":') :]
    trick = b'{"skeleton":{"a":1' + tail + b"}"
    with pytest.raises(ProtocolError):
        parser.parse(trick, end, _itemsize)
    # Too deep a skeleton is refused on the quick path as well.
    deep: object = 1
    for _ in range(300):
        deep = [deep]
    with pytest.raises(ProtocolError, match="nested deeper"):
        parser.parse(encode_layout(deep, entries), end, _itemsize)
