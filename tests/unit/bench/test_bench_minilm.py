"""bench.minilm: the real MiniLM model and optimizer state the benchmarks save."""

from __future__ import annotations

import torch

from bench.minilm import MiniLM, fine_tuned, minilm_weights
from ckptd.format.skeleton import flatten


def test_fine_tuned_minilm_has_every_checkpoint_tensor_and_real_adam_state() -> None:
    weights = minilm_weights()
    model, opt = fine_tuned(steps=2, batch=2, seq=16, weights=weights)
    assert isinstance(model, MiniLM)
    state = model.state_dict()
    assert len(state) == len(weights)
    for name, t in weights.items():
        mine = state[name.replace(".", "__")]
        assert mine.dtype == t.dtype and mine.shape == t.shape
        if not t.is_floating_point():
            assert torch.equal(mine, t)  # buffers (position ids) are carried over untouched
    # Every float parameter was trained: it moved, and Adam holds both moments for it.
    assert len(model.params) == sum(t.is_floating_point() for t in weights.values())
    for name, p in model.params.items():
        assert not torch.equal(p.detach(), weights[name]), name
        moments = opt.state[p]
        assert int(moments["step"]) == 2
        assert moments["exp_avg_sq"].gt(0).any(), name
    # The state is what a trainer would snapshot: it flattens without pickle.
    flat = flatten({"model": state, "optimizer": opt.state_dict()})
    assert len(flat.tensors) == len(weights) + 3 * len(model.params)
