"""ckptd.format.skeleton: flatten/unflatten round trips (property-based), tied tensors, refusals."""

from __future__ import annotations

import math
import re
import warnings
from collections import OrderedDict, defaultdict, namedtuple
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ckptd.errors import ManifestError, UnsupportedStateError
from ckptd.format.manifest import Manifest, parse_manifest
from ckptd.format.skeleton import dtype_from_name, dtype_name, flatten, iter_keys, unflatten
from ckptd.pipeline.plan import tensor_source

_QUANTIZED = {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"}
ALL_DTYPES: list[torch.dtype] = sorted(
    {v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str
)
"""Every dtype this torch has, as values (``{"$dtype": ...}``)."""
TENSOR_DTYPES = [d for d in ALL_DTYPES if dtype_name(d) not in _QUANTIZED]
"""Every dtype a strided tensor can hold: bool, ints, uints (incl. sub-byte), floats, float8,
complex, bits*."""
NO_COPY_KERNEL = {f"{u}int{n}" for u in ("", "u") for n in range(1, 8)} | {"complex32"}
"""torch cannot copy these into contiguous memory (sub-byte ints have no copy kernel; complex32
warns that it is experimental), so only their contiguous tensors can be stored."""
FLOAT8 = [d for d in TENSOR_DTYPES if dtype_name(d).startswith("float8")]
NP_SCALARS: list[type[np.generic]] = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
]
NP_ARRAY_DTYPES = [np.dtype(t) for t in NP_SCALARS] + [
    np.dtype("complex64"),
    np.dtype("complex128"),
]


def _tensor_from_bytes(raw: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    flat = torch.tensor(list(raw), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's C-order bytes, so that NaNs (and every other value) compare bitwise."""
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def _storage_roundtrip(tensors: list[torch.Tensor], paths: list[str]) -> list[torch.Tensor]:
    """New tensors rebuilt from the bytes the pipeline would store (no shared memory)."""
    out = []
    for path, t in zip(paths, tensors, strict=True):
        src = tensor_source(path, t)
        out.append(_tensor_from_bytes(bytes(src.data), dtype_from_name(src.dtype), src.shape))
    return out


def _json_roundtrip(skeleton: Any) -> Any:
    """The skeleton as written to and read back from a real manifest file."""
    manifest = Manifest(
        job="p",
        step=0,
        created="2026-01-01T00:00:00.000000Z",
        tensors=(),
        objects={},
        skeleton=skeleton,
    )
    return parse_manifest(manifest.to_json(), where="m").skeleton


def assert_same(a: Any, b: Any, path: str = "<root>") -> None:
    """Deep equality that also checks types, key order, float signs and NaNs, tensor bytes."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(_as_bytes(a), _as_bytes(b)), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, np.generic):
        if np.isnan(a):
            assert np.isnan(b), path
        else:
            assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, float):
        if math.isnan(a):
            assert math.isnan(b), path
        else:
            assert a == b and math.copysign(1, a) == math.copysign(1, b), path
    elif isinstance(a, dict):
        assert len(a) == len(b), path
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            assert_same(ka, kb, f"{path}.<key {ka!r}>")
            assert_same(va, vb, f"{path}.{ka!r}")
        assert_same(getattr(a, "_metadata", None), getattr(b, "_metadata", None), path)
    elif isinstance(a, list | tuple):  # includes torch.Size
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    else:
        assert a == b, path


# ---- strategies --------------------------------------------------------------------------------


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(TENSOR_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    numel = math.prod(shape)
    raw = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    t = _tensor_from_bytes(raw, dtype, shape)
    if len(shape) >= 2 and dtype_name(dtype) not in NO_COPY_KERNEL and draw(st.booleans()):
        t = t.transpose(0, 1)  # non-contiguous
    return t


@st.composite
def ndarrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(NP_ARRAY_DTYPES))
    # 0-d arrays are left to test_zero_dim_ndarray_keeps_its_shape (they hit a known bug).
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))
    array: np.ndarray = draw(hnp.arrays(dtype, shape))
    return array


np_scalars = st.sampled_from(NP_SCALARS).flatmap(lambda t: hnp.from_dtype(np.dtype(t)).map(t))
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324]
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | floats
    | st.text(max_size=8)
    | st.sampled_from(["$tensor", "$dict", "ordered", "meta", ""])
    | st.binary(max_size=16)
    | st.sampled_from(ALL_DTYPES)
    | st.sampled_from(["cpu", "cuda", "cuda:1", "meta", "mps"]).map(torch.device)
    | st.lists(st.integers(0, 1000), max_size=4).map(torch.Size)
    | np_scalars
    | ndarrays()
    | tensors()
)
keys = (
    st.text(max_size=6)
    | st.sampled_from(["$tensor", "$tuple", "$x", "ordered", "meta"])
    | st.integers(-5, 50)
    | st.none()
    | st.tuples(st.integers(0, 3), st.text(max_size=3))
    | st.binary(max_size=3)
)


@st.composite
def ordered_dicts(draw: st.DrawFn, children: st.SearchStrategy[Any]) -> OrderedDict[Any, Any]:
    items = draw(st.lists(st.tuples(st.text(max_size=6) | keys, children), max_size=4))
    out: OrderedDict[Any, Any] = OrderedDict(items)
    if draw(st.booleans()):  # a module state dict carries its version table here
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            [("", {"version": 1}), ("layer", {"version": draw(st.integers(1, 3))})]
        )
    return out


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=6), children, max_size=4)
        | st.dictionaries(keys, children, max_size=4)
        | ordered_dicts(children)
    )


states = st.recursive(leaves, _containers, max_leaves=20)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(states)
def test_unflatten_inverts_flatten(state: Any) -> None:
    flat = flatten(state)
    assert len(flat.tensors) == len(flat.paths)
    skeleton = _json_roundtrip(flat.skeleton)
    restored_tensors = _storage_roundtrip(flat.tensors, flat.paths)
    result = unflatten(skeleton, restored_tensors)
    assert_same(state, result)


@pytest.mark.parametrize("dtype", TENSOR_DTYPES, ids=dtype_name)
def test_every_tensor_dtype_roundtrips_bitwise(dtype: torch.dtype) -> None:
    raw = bytes(range(7, 7 + 6 * dtype.itemsize))
    t = _tensor_from_bytes(raw, dtype, (2, 3))
    state = {"t": t, "dt": dtype, "zero_dim": _tensor_from_bytes(raw[: dtype.itemsize], dtype, ())}
    flat = flatten(state)
    result = unflatten(_json_roundtrip(flat.skeleton), _storage_roundtrip(flat.tensors, flat.paths))
    assert_same(state, result)
    assert result["dt"] is dtype


def test_float8_dtypes_are_covered() -> None:
    assert {"float8_e4m3fn", "float8_e5m2"} <= {dtype_name(d) for d in FLOAT8}
    assert torch.bool in TENSOR_DTYPES and torch.complex128 in TENSOR_DTYPES


def test_nan_payloads_survive_bitwise() -> None:
    bits = np.array([0x7FC00001, 0xFFC00000, 0x7F800001, 0x00000001], dtype=np.uint32)
    t = torch.from_numpy(bits.view(np.float32).copy())
    flat = flatten({"t": t})
    (back,) = _storage_roundtrip(flat.tensors, flat.paths)
    assert torch.equal(_as_bytes(back), _as_bytes(t))
    assert not torch.equal(back, t)  # NaN != NaN: only the byte comparison can tell


def test_skeleton_tags() -> None:
    t = torch.zeros(2)
    state = {
        "t": t,
        "nan": math.nan,
        "inf": -math.inf,
        "tuple": (1, "a"),
        "size": torch.Size([2, 3]),
        "bytes": b"\x00\xff",
        "dtype": torch.bfloat16,
        "device": torch.device("cuda", 1),
        "np": np.float32(1.5),
        "ints": {1: "x"},
    }
    assert flatten(state).skeleton == {
        "t": {"$tensor": 0},
        "nan": {"$float": "nan"},
        "inf": {"$float": "-inf"},
        "tuple": {"$tuple": [1, "a"]},
        "size": {"$size": [2, 3]},
        "bytes": {"$bytes": "AP8="},
        "dtype": {"$dtype": "bfloat16"},
        "device": {"$device": "cuda:1"},
        "np": {"$np": "<f4", "value": 1.5},
        "ints": {"$dict": [[1, "x"]], "ordered": False},
    }


def test_dollar_keys_cannot_be_confused_with_tags() -> None:
    state = {"$tensor": 0, "ordered": True}
    flat = flatten(state)
    assert flat.tensors == []
    assert_same(unflatten(_json_roundtrip(flat.skeleton), []), state)


# ---- tensor identity ---------------------------------------------------------------------------


def test_same_tensor_twice_is_stored_once_and_restored_tied() -> None:
    w = torch.randn(4, 3)
    state = {"encoder": {"embed": w}, "decoder": {"proj": w}, "other": torch.randn(4, 3)}
    flat = flatten(state)
    assert len(flat.tensors) == 2
    assert flat.paths == ["encoder.embed", "other"]
    assert flat.skeleton["decoder"]["proj"] == {"$tensor": 0}
    result = unflatten(flat.skeleton, _storage_roundtrip(flat.tensors, flat.paths))
    assert result["encoder"]["embed"] is result["decoder"]["proj"]
    assert result["other"] is not result["encoder"]["embed"]
    assert torch.equal(result["decoder"]["proj"], w)


def test_identical_view_is_tied_but_other_views_are_not() -> None:
    base = torch.arange(12.0)
    same = base.view(12)  # another tensor object: same storage, offset, shape, strides, dtype
    flat = flatten([base, same, base[2:], base.view(3, 4), base.view(torch.int32)])
    assert [n["$tensor"] for n in flat.skeleton] == [0, 0, 1, 2, 3]


def test_equal_but_distinct_tensors_are_not_tied() -> None:
    flat = flatten([torch.zeros(3), torch.zeros(3)])
    assert [n["$tensor"] for n in flat.skeleton] == [0, 1]


def test_distinct_empty_tensors_are_not_tied() -> None:
    a, b = torch.empty(0), torch.empty(0)
    flat = flatten([a, b, a])
    assert [n["$tensor"] for n in flat.skeleton] == [0, 1, 0]


def test_conjugate_view_is_not_tied_to_its_base() -> None:
    """BUG (format/skeleton.py flatten.add_tensor): the identity key ignores the conjugate
    (and negative) bit, so ``z.conj()`` is stored as ``z`` and silently restored with the wrong
    sign."""
    z = torch.tensor([1 + 2j, 3 - 4j])
    state = {"z": z, "zc": z.conj()}
    flat = flatten(state)
    result = unflatten(flat.skeleton, _storage_roundtrip(flat.tensors, flat.paths))
    assert torch.equal(result["zc"], torch.tensor([1 - 2j, 3 + 4j]))
    assert torch.equal(result["z"], z)


# ---- numpy -------------------------------------------------------------------------------------


def test_ndarrays_come_back_as_ndarrays() -> None:
    a = np.arange(6, dtype=np.uint16).reshape(2, 3).T
    flat = flatten({"a": a})
    assert flat.skeleton == {"a": {"$ndarray": 0}}
    result = unflatten(flat.skeleton, _storage_roundtrip(flat.tensors, flat.paths))
    assert_same(np.ascontiguousarray(a), result["a"])


def test_zero_dim_ndarray_keeps_its_shape() -> None:
    """BUG (format/skeleton.py _ndarray_to_tensor): np.ascontiguousarray turns a 0-d array into
    shape (1,), so ``np.array(3.5)`` is restored as ``array([3.5])``."""
    a = np.array(3.5)
    flat = flatten({"a": a})
    result = unflatten(flat.skeleton, _storage_roundtrip(flat.tensors, flat.paths))
    assert result["a"].shape == ()
    assert_same(a, result["a"])


def test_read_only_ndarray_is_stored_without_a_warning() -> None:
    """BUG (format/skeleton.py _ndarray_to_tensor): torch.from_numpy on a read-only array (e.g.
    np.frombuffer over bytes) emits a UserWarning, an error under ``-W error``."""
    a = np.frombuffer(b"\x00\x00\x80\x3f" * 3, dtype=np.float32)
    assert not a.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat = flatten({"a": a})
    result = unflatten(flat.skeleton, _storage_roundtrip(flat.tensors, flat.paths))
    assert_same(a.copy(), result["a"])


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.array([1, 2], dtype=">i4"), "dtype >i4 cannot be stored"),
        (np.array(["a"]), "dtype <U1 cannot be stored"),
        (np.array([object()]), "dtype object cannot be stored"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "dtype datetime64"),
    ],
    ids=["big-endian", "unicode", "object", "datetime"],
)
def test_unsupported_ndarrays(array: np.ndarray, fragment: str) -> None:
    with pytest.raises(UnsupportedStateError, match=rf"^extra\.arr: numpy arrays of {fragment}"):
        flatten({"extra": {"arr": array}})


def test_numpy_longdouble_scalar_is_stored_or_refused_by_name() -> None:
    """BUG (minor, ckptd/format/skeleton.py flatten.enc): np.longdouble(...).item() is a longdouble
    again, so flatten recurses 200 levels and reports "nested deeper than 200 levels" instead of
    naming the type."""
    value = np.longdouble(1.5)
    try:
        flat = flatten({"extra": {"x": value}})
    except UnsupportedStateError as exc:
        assert re.match(r"extra\.x: .*(longdouble|float128)", str(exc)), str(exc)
    else:
        assert_same({"extra": {"x": value}}, unflatten(_json_roundtrip(flat.skeleton), []))


# ---- refusals ----------------------------------------------------------------------------------


class Opaque:
    """An arbitrary user object."""


Point = namedtuple("Point", "x y")  # a collections.namedtuple on purpose


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (
            Opaque(),
            r"cannot store a value of type tests\.unit\.format\.test_skeleton\.Opaque "
            r"without pickle",
        ),
        ({1, 2}, r"cannot store a value of type builtins\.set without pickle"),
        (frozenset({1}), r"cannot store a value of type builtins\.frozenset"),
        (
            defaultdict(int, a=1),
            r"cannot store a defaultdict \(a subclass of dict\) without pickle",
        ),
        (Point(1, 2), r"cannot store a Point \(a subclass of tuple\) without pickle"),
        (1 + 2j, r"cannot store a value of type builtins\.complex"),
        (Fraction(1, 3), r"cannot store a value of type fractions\.Fraction"),
    ],
    ids=["object", "set", "frozenset", "defaultdict", "namedtuple", "complex", "fraction"],
)
def test_unsupported_values_name_path_and_type(value: object, fragment: str) -> None:
    state = {"optimizer": {"state": {0: {"momentum": [torch.zeros(1), value]}}}}
    with pytest.raises(
        UnsupportedStateError, match=rf"^optimizer\.state\.0\.momentum\.1: {fragment}"
    ):
        flatten(state)


def test_unsupported_value_at_the_root() -> None:
    with pytest.raises(
        UnsupportedStateError, match=r"^<root>: cannot store a value of type builtins\.set"
    ):
        flatten({1})


def test_unsupported_dict_key_names_the_key() -> None:
    with pytest.raises(
        UnsupportedStateError, match=r"^extra\.<key frozenset\(\{1\}\)>: .*frozenset"
    ):
        flatten({"extra": {frozenset({1}): "v"}})


def test_cycle_through_a_list() -> None:
    loop: list[Any] = [1]
    loop.append({"back": loop})
    with pytest.raises(UnsupportedStateError, match=r"^extra\.1\.back: the state contains a cycle"):
        flatten({"extra": loop})


def test_cycle_through_a_dict() -> None:
    d: dict[str, Any] = {}
    d["self"] = d
    with pytest.raises(UnsupportedStateError, match=r"^self: the state contains a cycle"):
        flatten(d)


def test_shared_subtree_is_not_a_cycle() -> None:
    shared = {"lr": 0.1}
    result = unflatten(flatten([shared, shared]).skeleton, [])
    assert result == [shared, shared]


def test_too_deep_nesting_is_refused() -> None:
    state: Any = 0
    for _ in range(300):
        state = [state]
    with pytest.raises(UnsupportedStateError, match="state nested deeper than 200 levels"):
        flatten(state)


def test_sparse_and_meta_tensors_are_refused() -> None:
    sparse = torch.zeros(3, 3).to_sparse()
    with pytest.raises(
        UnsupportedStateError, match=r"^m\.s: torch\.sparse_coo tensors are not supported; convert"
    ):
        flatten({"m": {"s": sparse}})
    with pytest.raises(UnsupportedStateError, match=r"^m\.x: meta-device tensors cannot be stored"):
        flatten({"m": {"x": torch.empty(2, device="meta")}})


def test_unpaired_surrogate_is_refused_or_stored() -> None:
    """BUG (format/skeleton.py flatten.enc / manifest.py _compact): a str with a lone surrogate
    (os.fsdecode of a non-UTF-8 file name gives one) passes flatten, and the manifest then fails
    to encode as UTF-8 with a bare UnicodeEncodeError, after every object was written. Either
    flatten refuses it (naming the key path) or the manifest must be able to hold it."""
    state = {"extra": {"file": "data-\udcff.bin"}}
    try:
        flat = flatten(state)
    except UnsupportedStateError as exc:
        assert str(exc).startswith("extra.file: "), str(exc)
    else:
        assert_same(state, unflatten(_json_roundtrip(flat.skeleton), []))


# ---- pickle opt-in -----------------------------------------------------------------------------


def test_allow_pickle_roundtrip_and_refusal_without_it() -> None:
    state = {
        "extra": {"seen": {1, 2, 3}, "counts": defaultdict(int, a=2), "p": Point(1, 2)},
        "t": torch.ones(2),
    }
    flat = flatten(state, allow_pickle=True)
    skeleton = _json_roundtrip(flat.skeleton)
    assert set(skeleton["extra"]["seen"]) == {"$pickle"}
    result = unflatten(skeleton, _storage_roundtrip(flat.tensors, flat.paths), allow_pickle=True)
    assert result["extra"]["seen"] == {1, 2, 3}
    assert type(result["extra"]["counts"]) is defaultdict
    assert result["extra"]["counts"]["missing"] == 0
    assert type(result["extra"]["p"]) is Point and result["extra"]["p"] == (1, 2)
    assert torch.equal(result["t"], torch.ones(2))
    with pytest.raises(
        UnsupportedStateError,
        match=r"^extra\.seen: this value was stored pickled; pass allow_pickle=True to load it",
    ):
        unflatten(skeleton, flat.tensors)


def test_allow_pickle_is_only_used_when_needed() -> None:
    flat = flatten({"a": [1, (2, 3)], "b": {4: None}}, allow_pickle=True)
    assert "$pickle" not in repr(flat.skeleton)
    assert unflatten(flat.skeleton, []) == {"a": [1, (2, 3)], "b": {4: None}}


# ---- malformed skeletons -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("skeleton", "fragment"),
    [
        ({"a": {"$tensor": 5}}, r"skeleton at a: malformed \$tensor \(tensor index 5 out of range"),
        ({"a": {"$tensor": True}}, r"skeleton at a: malformed \$tensor"),
        ({"a": {"$float": "big"}}, r"skeleton at a: malformed \$float"),
        ({"a": {"$bytes": "!!"}}, r"skeleton at a: malformed \$bytes"),
        (
            {"a": {"$dict": [[[1], 2]]}},
            r"skeleton at a: malformed \$dict \(a dict key decoded to a list\)",
        ),
        ({"a": {"$dtype": "nope"}}, r"unknown dtype 'nope'"),
        ({"a": {"$future": 1}}, r"skeleton at a: unknown tag '\$future'; a newer ckptd wrote it"),
    ],
)
def test_malformed_skeleton(skeleton: Any, fragment: str) -> None:
    with pytest.raises(ManifestError, match=fragment):
        unflatten(skeleton, [torch.zeros(1)])


def test_iter_keys_lists_leaves() -> None:
    flat = flatten(
        {"model": {"w": torch.zeros(1)}, "opt": {"state": {0: {"step": 3}}}, "t": (1, 2)}
    )
    assert iter_keys(flat.skeleton) == [
        "model.w = <tensor 0>",
        "opt.state.0.step = 3",
        "t.0 = 1",
        "t.1 = 2",
    ]
