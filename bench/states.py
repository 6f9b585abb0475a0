"""The synthetic training states the benchmarks save, and the walk over a state's tensors.

:class:`TransformerLM` is the model whose ``state_dict()`` (and its AdamW's) the store and snapshot
benchmarks save, sized by the caller; the real MiniLM is in :mod:`bench.minilm`."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def tensors_of(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor in a nested state (dicts, lists, tuples), depth first."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_of(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from tensors_of(v)


class TransformerLM(torch.nn.Module):
    """Embedding, ``layers`` pre-norm encoder layers, final norm, output through the embedding."""

    def __init__(self, vocab: int, dim: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(
                dim, max(1, dim // 64), 4 * dim, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        # Output projection through the embedding matrix, without sharing a parameter (that
        # safetensors' save_file would refuse).
        out: torch.Tensor = self.norm(h) @ self.embed.weight.T
        return out
