"""Export a restored checkpoint to standard files: ``torch.save`` or safetensors.

``torch``: the nested state exactly as :func:`ckptd_client.load` returns it, readable with
``torch.load(FILE, weights_only=True)``; numpy arrays (numpy's RNG state) become tensors, since
``weights_only`` refuses numpy objects. ``safetensors``: every tensor under its dotted key path
(``model.fc.weight``, ``optimizer.state.0.exp_avg``); the non-tensor skeleton, job and step go in
the file's metadata (``ckptd.format.skeleton``, ``ckptd.job``, ``ckptd.step``).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptd.errors import CkptdError
from ckptd.format.fsutil import os_error
from ckptd.format.restore import Loaded


def _weights_only_safe(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        out = type(value)((k, _weights_only_safe(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(value, list):
        return [_weights_only_safe(v) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_weights_only_safe(v) for v in value)
    return value


def export_file(loaded: Loaded, dest: Path, fmt: str) -> int:
    """Write ``loaded`` to ``dest`` in ``fmt`` (atomically: tmp file, then rename); return size."""
    if fmt not in ("torch", "safetensors"):
        raise ValueError(f"unknown export format {fmt!r}")
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.ckptd-tmp")
    try:
        # Open the file ourselves: torch and safetensors report a bad path with their own
        # exception types, an OSError here names the path and maps to an exit code.
        with tmp.open("xb") as f:
            if fmt == "torch":
                torch.save(_weights_only_safe(loaded.state), f)
            else:
                f.write(_safetensors_bytes(loaded))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        return dest.stat().st_size
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error(exc, "write", dest) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _safetensors_bytes(loaded: Loaded) -> bytes:
    try:
        from safetensors.torch import save
    except ImportError as exc:
        raise CkptdError(
            "--format safetensors needs the safetensors package: pip install 'ckptd[safetensors]'"
        ) from exc
    m = loaded.manifest
    tensors = read_tensors_cached(loaded)
    named: dict[str, torch.Tensor] = {}
    for entry, tensor in zip(m.tensors, tensors, strict=True):
        if entry.path in named:
            raise CkptdError(
                f"two tensors share the key path {entry.path!r}; export with --format torch"
            )
        named[entry.path] = tensor.contiguous().clone() if tensor.numel() else tensor
    metadata = {
        "ckptd.job": m.job,
        "ckptd.step": str(m.step),
        "ckptd.skeleton": json.dumps(m.skeleton, separators=(",", ":")),
    }
    data: bytes = save(named, metadata=metadata)
    return data


def read_tensors_cached(loaded: Loaded) -> list[torch.Tensor]:
    """The tensors of ``loaded`` in manifest order, taken from its state (no second read)."""
    found: dict[int, torch.Tensor] = {}

    def walk(node: Any, skel: Any) -> None:
        if isinstance(skel, dict):
            tag = next((k for k in skel if k.startswith("$")), None)
            if tag in ("$tensor", "$ndarray", "$dtensor"):
                found[skel[tag]] = (
                    node if isinstance(node, torch.Tensor) else torch.from_numpy(node)
                )
            elif tag is None:
                for k, v in skel.items():
                    walk(node[k], v)
            elif tag == "$dict":
                for (_k, v), value in zip(skel["$dict"], node.values(), strict=True):
                    walk(value, v)
            elif tag == "$tuple":
                for value, v in zip(node, skel["$tuple"], strict=True):
                    walk(value, v)
        elif isinstance(skel, list):
            for value, v in zip(node, skel, strict=True):
                walk(value, v)

    walk(loaded.state, loaded.manifest.skeleton)
    return [found[i] for i in range(len(loaded.manifest.tensors))]
