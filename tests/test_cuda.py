"""The same contracts on a CUDA device: autocast device type, fused kernels, no host sync.

Skipped without CUDA (CI has none); run them on a machine with a GPU with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import Block
from helpers import block_batch, mse_loss_fn
from torch import nn
from torch.func import grad, vmap

import polprec as pp
from polprec.testing import assert_trees_all_close, assert_trees_all_equal_dtypes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"


def _setup() -> tuple[Block, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Block(d=32).to(DEV)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = block_batch(device=DEV)
    return model, params, x, y


@contextmanager
def no_host_sync() -> Iterator[None]:
    """Any operation that synchronises with the host raises inside this block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_half_dtype_on_this_gpu() -> None:
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert pp.half_dtype(DEV) is expected
    assert pp.half_dtype(torch.device(DEV, 0)) is expected


@pytest.mark.parametrize("spec", ["bf16-mixed", "16-mixed", "bf16-true", "16-true", "32-true"])
def test_policies_on_cuda(spec: str) -> None:
    policy = pp.get_policy(spec)
    model, params, x, y = _setup()
    ref = pp.apply_with_policy(model, params, x, policy="32-true")
    model.seen.clear()
    low = pp.cast_params(params, policy)
    out = pp.apply_with_policy(model, low, x, policy=policy)
    assert model.seen == [policy.compute_dtype]  # autocast / casts on the cuda device type
    assert out.dtype == policy.output_dtype and out.device.type == DEV
    assert_trees_all_close(out.float(), ref, dtype=policy.compute_dtype)
    state = pp.default_loss_scale(policy).to(DEV)
    _, grads, finite, _ = pp.value_and_grad(mse_loss_fn(model, policy))(low, x, y, loss_scale=state)
    assert bool(finite)
    assert_trees_all_equal_dtypes(grads, policy.param_dtype)
    assert {g.device.type for g in grads.values()} == {DEV}


def test_training_step_never_syncs_with_the_host() -> None:
    model, params, x, y = _setup()
    policy = pp.get_policy("16-mixed")
    step_grad = pp.value_and_grad(mse_loss_fn(model, policy))
    state = pp.DynamicLossScale(2.0**10).to(DEV)
    static = pp.StaticLossScale(2.0).to(DEV)
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    for batch in (x, bad, x):
        with no_host_sync():
            _, grads, finite, state = step_grad(params, batch, y, loss_scale=state)
            new = {k: p - 0.01 * grads[k] for k, p in params.items()}
            kept = pp.select_tree(finite, new, params)
            _, ok = pp.unscale_and_check(grads, static)
        assert bool(ok) == bool(finite)
        params = kept
    assert float(state.loss_scale) == 2.0**9  # backed off once, for the NaN batch
    assert all(bool(torch.isfinite(p).all()) for p in params.values())


def test_fused_unscale_over_dtypes_matches_reference() -> None:
    grads = {
        "h": torch.full((1000,), 8.0, device=DEV, dtype=torch.float16),
        "f": torch.full((3, 7), 4.0, device=DEV),
        "b": torch.full((5,), 2.0, device=DEV, dtype=torch.bfloat16),
    }
    out, finite = pp.unscale_and_check(grads, pp.StaticLossScale(4.0).to(DEV))
    assert bool(finite) and finite.device.type == DEV
    assert_trees_all_equal_dtypes(out, grads)
    assert out["h"][0].item() == 2.0 and out["f"][0, 0].item() == 1.0
    grads["b"] = grads["b"].clone()
    grads["b"][3] = float("inf")
    _, finite = pp.unscale_and_check(grads, pp.StaticLossScale(4.0).to(DEV))
    assert not bool(finite)  # the flag combines every dtype group


def test_dynamic_loss_scale_follows_grad_scaler_on_cuda() -> None:
    rng = random.Random(0)
    w = torch.zeros(3, device=DEV, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.0)
    scaler = torch.amp.GradScaler(DEV, init_scale=2.0**8, growth_interval=3)
    state = pp.DynamicLossScale(2.0**8, period=3, factor=2, min_loss_scale=0).to(DEV)
    for _ in range(40):
        finite = rng.random() > 0.3
        opt.zero_grad()
        scaler.scale(torch.ones((), device=DEV))  # GradScaler starts its scale lazily here
        w.grad = torch.full((3,), 1.0 if finite else float("inf"), device=DEV)
        scaler.step(opt)
        scaler.update()
        _, ok = pp.unscale_and_check({"w": w.grad.detach()}, state)
        state = state.adjust(ok)
        assert float(state.loss_scale) == scaler.get_scale()


def test_per_sample_grads_under_vmap_on_cuda() -> None:
    model, params, x, y = _setup()
    policy = pp.get_policy("bf16-mixed")

    def loss(p: Any, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        model.seen.clear()
        return mse_loss_fn(model, policy)(p, xi[None], yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    assert model.seen == [torch.bfloat16]
    assert_trees_all_equal_dtypes(per_sample, torch.float32)
    full = vmap(
        grad(lambda p, xi, yi: mse_loss_fn(model, "32-true")(p, xi[None], yi[None])),
        in_dims=(None, 0, 0),
    )(params, x, y)
    for k in params:
        err = (per_sample[k] - full[k]).norm() / full[k].norm().clamp_min(1e-6)
        assert float(err) < 0.05, (k, float(err))


def test_compiled_step_on_cuda_equals_eager() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 1)).to(DEV)
    params = {k: v.detach() for k, v in model.named_parameters()}
    policy = pp.get_policy("bf16-mixed")
    step_grad = pp.value_and_grad(mse_loss_fn(model, policy))

    def step(p: Any, s: Any, xb: torch.Tensor, yb: torch.Tensor) -> Any:
        loss, grads, finite, s = step_grad(p, xb, yb, loss_scale=s)
        new = {k: w - 0.01 * grads[k] for k, w in p.items()}
        return loss, pp.select_tree(finite, new, p), s

    compiled = torch.compile(step, fullgraph=True)
    x, y = torch.randn(32, 16, device=DEV), torch.randn(32, device=DEV)
    state = pp.DynamicLossScale(2.0**10).to(DEV)
    loss_e, p_e, s_e = step(params, state, x, y)
    loss_c, p_c, s_c = compiled(params, state, x, y)
    assert abs(float(loss_c) - float(loss_e)) < 1e-2 * abs(float(loss_e)) + 1e-3
    assert_trees_all_close(p_c, p_e, rtol=1e-2, atol=1e-3)
    assert float(s_c.loss_scale) == float(s_e.loss_scale)
    bad = x.clone()
    bad[0, 0] = float("nan")
    _, p_nan, s_nan = compiled(params, state, bad, y)
    assert all(torch.equal(p_nan[k], params[k]) for k in params)
    assert float(s_nan.loss_scale) == 2.0**9


def test_batchnorm_island_on_cuda() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).to(DEV)
    seen: list[torch.dtype] = []
    model[1].register_forward_hook(lambda m, i, o: seen.extend([i[0].dtype, o.dtype]))
    rules = pp.PolicyRules("bf16-true", {nn.BatchNorm2d: "32-true"})
    params = pp.cast_params(dict(model.named_parameters()), rules, module=model)
    buffers = dict(model.named_buffers())
    out = pp.apply_with_policy(
        model, {**params, **buffers}, torch.randn(2, 1, 8, 8, device=DEV), policy=rules
    )
    assert seen == [torch.float32, torch.float32]
    assert params["1.weight"].dtype == torch.float32 and params["0.weight"].dtype == torch.bfloat16
    assert out.dtype == torch.float32 and buffers["1.running_mean"].dtype == torch.float32
