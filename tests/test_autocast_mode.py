"""Mixed policies under torch.func transforms compute as torch.autocast does in eager mode.

Inside ``vmap``/``grad`` polprec keeps the parameters float32 and makes autocast's per-op casts
at the torch-function level (polprec/_autocast_mode.py), so the numerics are autocast's:
lower-precision ops in the compute dtype, autocast's float32 ops (and norms) in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import Block
from helpers import block_batch, mse_loss_fn
from torch import nn
from torch.func import functional_call, grad, vmap

import polprec as pp
from polprec import _autocast_mode
from polprec._autocast_mode import AutocastMode

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
W, B, G = torch.randn(8, 8), torch.randn(8), torch.randn(8)

# op -> (its call on one (4, 8) example, the dtype eager CPU autocast gives it)
OPS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype]] = {
    "linear with bias": (lambda x: F.linear(x, W, B), BF16),  # float32 under vmap: issue 192617
    "addmm": (lambda x: torch.addmm(B, x, W), BF16),
    "baddbmm": (lambda x: torch.baddbmm(x[None], x[None], W[None]), BF16),
    "matmul operator": (lambda x: x @ W, BF16),
    "attention": (lambda x: F.scaled_dot_product_attention(x[None], x[None], x[None]), BF16),
    "layer_norm": (lambda x: F.layer_norm(x, (8,), G, B), F32),
    "softmax of float32": (lambda x: F.softmax(x, -1), F32),  # not on CPU's list: input dtype
    "softmax of bfloat16": (lambda x: F.softmax(x @ W, -1), BF16),
    "mse_loss": (lambda x: F.mse_loss(x @ W, x), F32),
    "cross_entropy": (lambda x: F.cross_entropy(x @ W, torch.zeros(4, dtype=torch.long)), F32),
    "cat promotes": (lambda x: torch.cat([x @ W, x]), F32),
    "exp": (lambda x: torch.exp(x @ W), BF16),
}


@pytest.mark.parametrize("name", list(OPS))
def test_each_op_gets_eager_autocasts_dtype_under_vmap(name: str) -> None:
    op, expected = OPS[name]
    x = torch.randn(3, 4, 8)
    with torch.autocast("cpu", dtype=BF16):
        assert op(x[0]).dtype == expected  # eager autocast itself
        with AutocastMode("cpu"):
            assert op(x[0]).dtype == expected
            assert vmap(op)(x).dtype == expected
            per_sample = vmap(grad(lambda xi: op(xi).float().sum()))(x)
    assert per_sample.dtype == F32


def test_plain_autocast_still_loses_the_dtype_under_vmap() -> None:
    # Why the mode exists; if torch fixes pytorch issue 192617 this fails.
    x = torch.randn(3, 4, 8)
    with torch.autocast("cpu", dtype=BF16):
        assert vmap(lambda xi: F.linear(xi, W, B))(x).dtype == F32


def test_lists_mirror_torch_per_device_type() -> None:
    cpu, cuda = _autocast_mode.rules_for("cpu"), _autocast_mode.rules_for("cuda")
    assert cpu["linear"] == cpu["scaled_dot_product_attention"] == _autocast_mode.LOWER
    assert cpu["mse_loss"] == cpu["cross_entropy"] == _autocast_mode.FP32
    assert "softmax" not in cpu and "exp" not in cpu  # CPU autocast leaves them alone
    assert cpu["cat"] == _autocast_mode.PROMOTE
    assert cuda["softmax"] == cuda["sum"] == _autocast_mode.FP32_UNLESS_DTYPE
    assert cuda["exp"] == cuda["pow"] == cuda["__pow__"] == _autocast_mode.FP32
    assert cuda["einsum"] == _autocast_mode.LOWER and "einsum" not in cpu
    for table in (cpu, cuda):  # polprec's addition: norms take float32 inputs everywhere
        assert table["layer_norm"] == table["rms_norm"] == _autocast_mode.FP32
    assert _autocast_mode.rules_for("xpu") is cuda


def test_regions_without_autocast_are_left_alone() -> None:
    x = torch.randn(3, 4, 8)

    def op(xi: torch.Tensor) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
        inner = (xi @ W).dtype
        with torch.autocast("cpu", enabled=False):
            off = (xi @ W).dtype
        with pp.full_precision():
            full = (xi @ W).dtype
        return inner, off, full

    seen = []
    with torch.autocast("cpu", dtype=BF16), AutocastMode("cpu"):
        vmap(lambda xi: seen.append(op(xi)) or xi)(x)
    assert seen == [(BF16, F32, F32)]


def test_nested_autocast_dtype_is_followed() -> None:
    seen = []

    def op(xi: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=F16):
            seen.append((xi @ W).dtype)
        return xi

    with torch.autocast("cpu", dtype=BF16), AutocastMode("cpu"):
        vmap(op)(torch.randn(2, 4, 8))
    assert seen == [F16]


def test_float64_is_not_cast() -> None:
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=BF16), AutocastMode("cpu"):
        assert vmap(lambda xi: xi @ W.double())(x).dtype == torch.float64  # as autocast does


def test_parameters_stay_float32_inside_transforms() -> None:
    torch.manual_seed(0)
    block = Block()
    weights: list[torch.dtype] = []
    hook = block.norm.register_forward_pre_hook(lambda m, i: weights.append(m.weight.dtype))
    x, y = block_batch()
    params = dict(block.named_parameters())
    try:
        grads = vmap(grad(mse_loss_fn(block, "bf16-mixed")), in_dims=(None, 0, 0))(
            params, x[:, None], y[:, None]
        )
    finally:
        hook.remove()
    assert weights == [F32]  # the LayerNorm computes with its float32 weight, as under autocast
    assert block.seen[-1] == BF16  # and the Linear in bfloat16
    assert all(g.dtype == F32 for g in grads.values())


def _loop(model: nn.Module, params: Any, x: torch.Tensor, y: torch.Tensor, on: bool) -> Any:
    """torch.amp's per-sample gradients: an eager loop, each example under torch.autocast."""
    out = []
    for i in range(len(x)):
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.autocast("cpu", dtype=BF16, enabled=on):
            loss = ((functional_call(model, p, (x[i : i + 1],)).float() - y[i]) ** 2).mean()
        out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(p.values()))]))
    return torch.stack(out)


def _pre_norm_model() -> nn.Module:
    # Norms here see float32 inputs, as in pre-norm transformers: there polprec and eager
    # autocast make the same casts in the same places. (A norm fed a bfloat16 activation
    # returns float32 under polprec, where CPU autocast rounds its result to bfloat16.)
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))


def test_gradients_under_grad_equal_eager_autocast() -> None:
    model = _pre_norm_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(1, 5, 8), torch.randn(1)
    eager = _loop(model, params, x, y, on=True)[0]
    got = grad(mse_loss_fn(model, "bf16-mixed"))(params, x, y[0])
    torch.testing.assert_close(torch.cat([g.flatten() for g in got.values()]), eager)


def test_per_sample_gradients_are_as_close_to_float32_as_the_autocast_loop() -> None:
    # Under vmap the batched kernels round differently, so the numbers differ by bfloat16
    # noise; the distance to float32 is the same (it was 1.1-1.4x larger with the explicit
    # casts polprec made before: benchmarks/per_sample_error.py).
    model = _pre_norm_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(16, 5, 8), torch.randn(16)
    fn = mse_loss_fn(model, "bf16-mixed")
    got = vmap(grad(lambda p, xi, yi: fn(p, xi[None], yi)), in_dims=(None, 0, 0))(params, x, y)
    per_sample = torch.cat([g.flatten(1) for g in got.values()], 1)
    full, loop = _loop(model, params, x, y, on=False), _loop(model, params, x, y, on=True)
    ratio = float((per_sample - full).norm() / (loop - full).norm())
    assert 0.75 < ratio < 1.33, ratio


def test_vmap_grad_through_layernorm_fed_bfloat16() -> None:
    # A LayerNorm right after a Linear gets a bfloat16 activation: under plain autocast,
    # vmap(grad(...)) fails there (pytorch issue 184890); polprec runs the norm in float32.
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    params = dict(model.named_parameters())
    fn = mse_loss_fn(model, "bf16-mixed")
    x, y = torch.randn(4, 3, 8), torch.randn(4)
    grads = vmap(grad(lambda p, xi, yi: fn(p, xi[None], yi)), in_dims=(None, 0, 0))(params, x, y)
    assert grads["1.weight"].shape == (4, 8) and bool(torch.isfinite(grads["1.weight"]).all())


def test_pp_autocast_inside_vmap() -> None:
    x = torch.randn(3, 4, 8)

    def loss(xi: torch.Tensor) -> torch.Tensor:
        with pp.autocast("bf16-mixed", "cpu"):
            return F.linear(xi, W, B)

    assert vmap(loss)(x).dtype == BF16
    with pp.autocast("bf16-mixed", "cpu"):  # outside transforms: torch.autocast itself
        assert F.linear(x, W, B).dtype == BF16


@pytest.mark.slow
def test_compiled_per_sample_step_is_one_graph_without_recompiles() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    step = pp.value_and_grad(mse_loss_fn(model, "16-mixed"))

    def train_step(p: Any, x: torch.Tensor, y: torch.Tensor, ls: pp.DynamicLossScale) -> Any:
        loss, grads, finite, ls = step(p, x, y, loss_scale=ls)
        new = {k: w - 0.05 * grads[k] for k, w in p.items()}
        return loss, pp.select_tree(finite, new, p), ls

    counts: dict[str, int] = {"frames": 0}

    def backend(gm: Any, example_inputs: Any) -> Any:
        counts["frames"] += 1
        return gm.forward

    compiled = torch.compile(train_step, fullgraph=True, backend=backend)
    x, y = torch.randn(6, 5, 8), torch.randn(6)
    state = pp.DynamicLossScale(2.0**12)
    eager = train_step(params, x, y, state)
    out = compiled(params, x, y, state)
    torch.testing.assert_close(out[1], eager[1], rtol=1e-3, atol=1e-4)
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    _, skipped, state_n = compiled(out[1], bad, y, out[2])
    torch.testing.assert_close(skipped, out[1], rtol=0, atol=0)
    assert float(state_n.loss_scale) == 2.0**11
    compiled(skipped, x, y, state_n)
    assert counts["frames"] == 1  # one graph, compiled once, over finite and NaN steps


class _Attention(nn.Module):
    """Causal self-attention through ``F.scaled_dot_product_attention`` with dropout."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 8).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=True)


def test_plain_autocast_still_fails_attention_dropout_under_grad() -> None:
    # Why AutocastMode runs SDPA with autocast off: with dropout on CPU, SDPA's math path
    # computes in float32 and autocast recasts its inner bmm below torch.func.grad. If torch
    # fixes that, this fails and the special case can go.
    x = torch.randn(2, 2, 8, 8)

    def loss(q: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=BF16):
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.1).float().sum()

    with pytest.raises(RuntimeError, match="expected scalar type"):
        grad(loss)(x)
    q = x.clone().requires_grad_()
    loss(q).backward()  # plain autograd is fine
    assert q.grad is not None


class _TorchAttention(nn.Module):
    """``nn.MultiheadAttention`` with dropout, whose forward calls SDPA inside."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("make", [_Attention, _TorchAttention], ids=["sdpa", "mha"])
@pytest.mark.parametrize("spec", ["bf16-mixed", "16-mixed"])
def test_attention_dropout_under_grad_equals_eager_autocast(
    spec: str, make: Callable[[], nn.Module]
) -> None:
    torch.manual_seed(0)
    model = make()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(2, 8, 16)

    def loss_fn(p: Any, x: torch.Tensor) -> torch.Tensor:
        return pp.apply_with_policy(model, p, x, policy=spec).float().square().mean()

    torch.manual_seed(1)  # the same dropout mask on both paths
    _, eager, _, _ = pp.value_and_grad(loss_fn)(params, x, loss_scale=pp.NoOpLossScale())
    torch.manual_seed(1)
    under_grad = grad(loss_fn)(params, x)
    assert all(torch.equal(under_grad[k], eager[k]) for k in params)
    per_sample = vmap(grad(lambda p, xi: loss_fn(p, xi[None])), (None, 0), randomness="different")
    got = per_sample(params, x)
    assert all(got[k].shape == (2, *v.shape) for k, v in params.items())
    assert all(bool(torch.isfinite(g).all()) for g in got.values())


@pytest.mark.slow
def test_compiled_step_with_attention_dropout() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Attention()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p: Any, x: torch.Tensor) -> torch.Tensor:
        return pp.apply_with_policy(model, p, x, policy="16-mixed").float().square().mean()

    step = torch.compile(pp.value_and_grad(loss_fn), fullgraph=True)
    loss, grads, finite, _ = step(params, torch.randn(2, 8, 16), loss_scale=pp.DynamicLossScale())
    assert bool(finite) and bool(torch.isfinite(loss))
    assert grads["qkv.weight"].dtype == F32 and float(grads["qkv.weight"].abs().sum()) > 0
