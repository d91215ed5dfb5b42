"""Fault injection: NaN/Inf batches in a long float16 run never reach params or optimizer state."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from helpers import load_digits
from torch import nn

import polprec as pp
from polprec import _tree

STEPS = 1000


def _run(inject: set[int], steps: int = STEPS) -> dict[str, Any]:
    torch.manual_seed(0)
    x, y = load_digits()
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    policy = pp.get_policy("16-mixed")
    params = pp.cast_params({k: v.detach() for k, v in model.named_parameters()}, policy)
    momentum = _tree.tree_map(torch.zeros_like, params)
    state = pp.default_loss_scale(policy)
    assert isinstance(state, pp.DynamicLossScale)

    def loss_fn(p: Any, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(pp.apply_with_policy(model, p, xb, policy=policy), yb)

    step = pp.value_and_grad(loss_fn)
    gen = torch.Generator().manual_seed(1)
    skipped, losses = 0, []
    for i in range(steps):
        idx = torch.randint(0, len(y), (16,), generator=gen)
        xb = x[idx].clone()
        if i in inject:
            xb[i % 16, i % 64] = float("nan") if i % 2 else float("inf")
        loss, grads, finite, state = step(params, xb, y[idx], loss_scale=state)
        new_m = _tree.tree_map(lambda m, g: 0.9 * m + g, momentum, grads)
        new_p = _tree.tree_map(lambda p, m: p - 0.05 * m, params, new_m)
        params, momentum = pp.select_tree(finite, (new_p, new_m), (params, momentum))
        skipped += int(not bool(finite))
        assert bool(pp.all_finite((params, momentum))), f"non-finite state after step {i}"
        if i not in inject:
            losses.append(float(loss))
    return {"skipped": skipped, "loss": sum(losses[-100:]) / 100, "scale": float(state.loss_scale)}


@pytest.mark.slow
def test_injected_nan_and_inf_never_reach_the_state() -> None:
    rng = random.Random(0)
    inject = {i for i in range(STEPS) if rng.random() < 0.05}
    assert len(inject) >= 0.04 * STEPS
    clean = _run(set())
    faulty = _run(inject)
    assert faulty["skipped"] >= len(inject)
    assert abs(faulty["loss"] - clean["loss"]) <= 0.1 * clean["loss"], (faulty, clean)
    assert faulty["scale"] >= 1.0
