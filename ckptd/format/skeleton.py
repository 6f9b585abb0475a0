"""Pickle-free encoding of a nested training state: tensors out, everything else into JSON.

:func:`flatten` walks a state (``model.state_dict()``, ``optimizer.state_dict()``, schedulers,
``GradScaler``, RNG states, a user's ``extra`` dict, ...) and returns a *skeleton*, a JSON value in
which each tensor is replaced by ``{"$tensor": i}``, plus the list of distinct tensors. Values JSON
cannot hold exactly are tagged:

==================  ==============================================================
``{"$tensor": i}``  tensor *i*; the same tensor object (or a view of the same storage with the
                    same offset, shape, strides and dtype) appearing twice gets the same *i*, so
                    tied weights stay tied on restore
``{"$ndarray": i}`` a numpy array stored as tensor *i*
``{"$tuple": [..]}``, ``{"$size": [..]}``  tuple, ``torch.Size``
``{"$dict": [[k, v], ..], "ordered": bool, "meta": ..}``  a dict whose keys are not all plain
                    strings (optimizer state is keyed by int), or an ``OrderedDict`` (``meta``
                    holds a module state dict's ``_metadata``)
``{"$float": "nan" | "inf" | "-inf"}``  non-finite floats
``{"$bytes": base64}``, ``{"$dtype": name}``, ``{"$device": name}``
``{"$np": dtype, "value": v}``  a numpy scalar
``{"$pickle": base64}``  any other value, only when the caller opted in with ``allow_pickle``
==================  ==============================================================

Plain dicts with string keys, lists, str, int, float, bool and None are stored as themselves.
Anything else is refused with :class:`UnsupportedStateError` naming its key path and type.
"""

from __future__ import annotations

import base64
import math
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckptd.errors import ManifestError, UnsupportedStateError

JSON = Any
"""A value made of dict[str, JSON], list[JSON], str, int, float, bool and None."""

_MAX_DEPTH = 200


@dataclass(frozen=True)
class Flattened:
    """The result of :func:`flatten`: ``tensors[i]`` is what ``{"$tensor": i}`` refers to and
    ``paths[i]`` the dotted key path where it first appeared (``optimizer.state.0.exp_avg``)."""

    skeleton: JSON
    tensors: list[torch.Tensor]
    paths: list[str]


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def flatten(state: object, *, allow_pickle: bool = False) -> Flattened:
    """Split ``state`` into a JSON skeleton and its distinct tensors (see the module docstring).

    Raises :class:`UnsupportedStateError` naming the key path of the first value that cannot be
    stored without pickle (unless ``allow_pickle``), of a tensor that cannot be stored (sparse,
    quantized, meta), or of a reference cycle.
    """
    tensors: list[torch.Tensor] = []
    paths: list[str] = []
    seen: dict[tuple[object, ...], int] = {}
    active: set[int] = set()

    def add_tensor(t: torch.Tensor, path: str) -> int:
        if t.layout != torch.strided:
            raise UnsupportedStateError(
                f"{path or '<root>'}: {t.layout} tensors are not supported; "
                "convert it with .to_dense() before the snapshot"
            )
        if t.is_quantized or t.device.type == "meta":
            kind = "quantized" if t.is_quantized else "meta-device"
            raise UnsupportedStateError(f"{path or '<root>'}: {kind} tensors cannot be stored")
        key = (
            t.device,
            t.dtype,
            t.untyped_storage().data_ptr() if t.numel() else id(t),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.is_conj(),
            t.is_neg(),
        )
        index = seen.get(key)
        if index is None:
            index = seen[key] = len(tensors)
            tensors.append(t)
            paths.append(path or "<root>")
        return index

    def enc(value: object, path: str, depth: int) -> JSON:
        if depth > _MAX_DEPTH:
            raise UnsupportedStateError(f"{path}: state nested deeper than {_MAX_DEPTH} levels")
        cls = type(value)  # exact types first: what state dicts are made of, without subclasses
        if cls is str:
            _check_utf8(value, path)  # type: ignore[arg-type]
            return value
        if cls is torch.Tensor or cls is torch.nn.Parameter:
            return {"$tensor": add_tensor(value, path)}  # type: ignore[arg-type]
        if cls is int or cls is bool or value is None:
            return value
        if isinstance(value, np.generic):  # before int/float: np.float64 subclasses float
            item = value.item()
            if isinstance(item, np.generic | bytes) or value.dtype.kind in "OSUVMm":
                raise UnsupportedStateError(
                    f"{path or '<root>'}: numpy scalars of dtype {value.dtype} cannot be stored "
                    "without pickle; convert it to a Python number"
                )
            return {"$np": value.dtype.str, "value": enc(item, path, depth + 1)}
        if isinstance(value, str):
            _check_utf8(value, path)
            return value
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return _enc_float(float(value))
        if isinstance(value, torch.Tensor):
            return {"$tensor": add_tensor(value, path)}
        if isinstance(value, np.ndarray):
            return {"$ndarray": add_tensor(_ndarray_to_tensor(value, path), path)}
        if isinstance(value, torch.dtype):
            return {"$dtype": dtype_name(value)}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if isinstance(value, bytes):
            return {"$bytes": base64.b64encode(value).decode("ascii")}
        if isinstance(value, list | tuple | dict):
            if id(value) in active:
                raise UnsupportedStateError(f"{path or '<root>'}: the state contains a cycle")
            active.add(id(value))
            try:
                return enc_container(value, path, depth)
            finally:
                active.discard(id(value))
        if allow_pickle:
            return {"$pickle": base64.b64encode(pickle.dumps(value)).decode("ascii")}
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise UnsupportedStateError(
            f"{path or '<root>'}: cannot store a value of type {kind} without pickle; convert it "
            "to tensors or plain values (dict, list, tuple, str, int, float, bool, None), or pass "
            "allow_pickle=True (restore then needs allow_pickle=True as well)"
        )

    def enc_container(
        value: list[Any] | tuple[Any, ...] | dict[Any, Any], path: str, depth: int
    ) -> JSON:
        if type(value) is list:
            return [enc(v, _join(path, i), depth + 1) for i, v in enumerate(value)]
        if type(value) is torch.Size:
            return {"$size": [int(v) for v in value]}
        if type(value) is tuple:
            return {"$tuple": [enc(v, _join(path, i), depth + 1) for i, v in enumerate(value)]}
        if type(value) is dict and all(isinstance(k, str) and not k.startswith("$") for k in value):
            for k in value:
                _check_utf8(k, _join(path, k))
            return {k: enc(v, _join(path, k), depth + 1) for k, v in value.items()}
        if type(value) in (dict, OrderedDict):
            assert isinstance(value, dict)
            out: dict[str, JSON] = {
                "$dict": [
                    [
                        enc(k, _join(path, f"<key {k!r}>"), depth + 1),
                        enc(v, _join(path, k), depth + 1),
                    ]
                    for k, v in value.items()
                ],
                "ordered": type(value) is OrderedDict,
            }
            meta = getattr(value, "_metadata", None)
            if meta is not None:
                out["meta"] = enc(meta, _join(path, "_metadata"), depth + 1)
            return out
        if allow_pickle:
            return {"$pickle": base64.b64encode(pickle.dumps(value)).decode("ascii")}
        raise UnsupportedStateError(
            f"{path or '<root>'}: cannot store a {type(value).__qualname__} (a subclass of "
            f"{type(value).__mro__[1].__qualname__}) without pickle; convert it to a plain "
            "dict/list/tuple, or pass allow_pickle=True"
        )

    skeleton = enc(state, "", 0)
    return Flattened(skeleton, tensors, paths)


def unflatten(
    skeleton: JSON, tensors: Sequence[torch.Tensor], *, allow_pickle: bool = False
) -> Any:
    """Rebuild the state :func:`flatten` took apart. ``tensors[i]`` replaces ``{"$tensor": i}``.

    Raises :class:`ManifestError` for a malformed skeleton and :class:`UnsupportedStateError` for a
    pickled value when ``allow_pickle`` is False.
    """

    def dec(node: JSON, path: str) -> Any:
        if node is None or isinstance(node, str | bool | int | float):
            return node
        if isinstance(node, list):
            return [dec(v, _join(path, i)) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise ManifestError(f"skeleton at {path or '<root>'}: unexpected {type(node).__name__}")
        tag = next((k for k in node if k.startswith("$")), None)
        if tag is None:
            return {k: dec(v, _join(path, k)) for k, v in node.items()}
        arg = node[tag]
        try:
            return _decode_tag(tag, arg, node, path, dec, tensors, allow_pickle)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ManifestError(f"skeleton at {path or '<root>'}: malformed {tag} ({exc})") from exc

    return dec(skeleton, "")


def _decode_tag(
    tag: str,
    arg: JSON,
    node: dict[str, JSON],
    path: str,
    dec: Any,
    tensors: Sequence[torch.Tensor],
    allow_pickle: bool,
) -> Any:
    if tag == "$tensor":
        return tensors[_index(arg, len(tensors))]
    if tag == "$ndarray":
        return tensors[_index(arg, len(tensors))].cpu().numpy()
    if tag == "$tuple":
        return tuple(dec(v, _join(path, i)) for i, v in enumerate(arg))
    if tag == "$size":
        return torch.Size(int(v) for v in arg)
    if tag == "$dict":
        pairs = [(_hashable(dec(k, path)), dec(v, _join(path, k))) for k, v in arg]
        out: dict[Any, Any] = OrderedDict(pairs) if node.get("ordered") else dict(pairs)
        if "meta" in node:
            out._metadata = dec(node["meta"], _join(path, "_metadata"))  # type: ignore[attr-defined]
        return out
    if tag == "$float":
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[arg]
    if tag == "$bytes":
        return base64.b64decode(arg, validate=True)
    if tag == "$dtype":
        return dtype_from_name(arg)
    if tag == "$device":
        return torch.device(arg)
    if tag == "$np":
        return np.dtype(arg).type(dec(node["value"], path))
    if tag == "$pickle":
        if not allow_pickle:
            raise UnsupportedStateError(
                f"{path or '<root>'}: this value was stored pickled; pass allow_pickle=True to "
                "load it (only for checkpoints you trust)"
            )
        return pickle.loads(base64.b64decode(arg, validate=True))
    raise ManifestError(
        f"skeleton at {path or '<root>'}: unknown tag {tag!r}; a newer ckptd wrote it"
    )


def _index(arg: JSON, n: int) -> int:
    if not isinstance(arg, int) or isinstance(arg, bool) or not 0 <= arg < n:
        raise IndexError(f"tensor index {arg!r} out of range 0..{n - 1}")
    return arg


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        raise TypeError("a dict key decoded to a list")
    return key


def _check_utf8(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsupportedStateError(
            f"{path or '<root>'}: the string {value!r:.60} is not valid Unicode ({exc.reason}); "
            "store it as bytes"
        ) from exc


def _enc_float(value: float) -> JSON:
    if math.isfinite(value):
        return value
    return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


def _ndarray_to_tensor(array: np.ndarray, path: str) -> torch.Tensor:
    if array.dtype.hasobject or array.dtype.byteorder == ">" or array.dtype.kind in "USVMm":
        raise UnsupportedStateError(
            f"{path or '<root>'}: numpy arrays of dtype {array.dtype} cannot be stored; "
            "use a numeric dtype in native byte order"
        )
    contiguous = np.ascontiguousarray(array).reshape(array.shape)  # keeps 0-d arrays 0-d
    if not contiguous.flags.writeable:
        contiguous = contiguous.copy()  # torch warns on read-only arrays
    try:
        return torch.from_numpy(contiguous)
    except TypeError as exc:
        raise UnsupportedStateError(
            f"{path or '<root>'}: numpy dtype {array.dtype}: {exc}"
        ) from exc


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest name of a torch dtype: ``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; :class:`ManifestError` when this torch lacks the dtype."""
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise ManifestError(
            f"unknown dtype {name!r}: written by a torch with a dtype this one "
            f"({torch.__version__}) "
            "lacks; restore with a newer torch"
        )
    return value


def iter_keys(skeleton: JSON, prefix: str = "") -> list[str]:
    """Dotted key paths of the skeleton's leaves (tensors shown as ``<tensor i>``), for display."""
    out: list[str] = []

    def scalars(items: list[JSON]) -> bool:
        return len(items) > 8 and all(not isinstance(v, list | dict) for v in items)

    def walk(node: JSON, path: str) -> None:
        if isinstance(node, list):
            if scalars(node):
                out.append(f"{path or '<root>'} = list of {len(node)} values")
                return
            for i, v in enumerate(node):
                walk(v, _join(path, i))
        elif isinstance(node, dict):
            tag = next((k for k in node if k.startswith("$")), None)
            if tag is None:
                for k, v in node.items():
                    walk(v, _join(path, k))
            elif tag == "$dict":
                for k, v in node["$dict"]:
                    walk(v, _join(path, k if not isinstance(k, dict) else "<key>"))
            elif tag == "$tuple":
                if scalars(node["$tuple"]):
                    out.append(f"{path or '<root>'} = tuple of {len(node['$tuple'])} values")
                    return
                for i, v in enumerate(node["$tuple"]):
                    walk(v, _join(path, i))
            elif tag in ("$tensor", "$ndarray"):
                out.append(f"{path or '<root>'} = <tensor {node[tag]}>")
            else:
                out.append(f"{path or '<root>'} = {tag[1:]}")
        else:
            out.append(f"{path or '<root>'} = {node!r}")

    walk(skeleton, prefix)
    return out


def ndarray_indices(skeleton: JSON) -> set[int]:
    """Indices of the tensors that hold numpy arrays (``{"$ndarray": i}`` in the skeleton): a
    reader that moves tensors (``map_location``) leaves those alone, as ``torch.load`` does."""
    found: set[int] = set()
    stack: list[JSON] = [skeleton]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            index = node.get("$ndarray")
            if isinstance(index, int):
                found.add(index)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found
