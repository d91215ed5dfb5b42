"""Applying loss scaling: scale_loss, unscale_and_check (its fused and plain paths) and
default_loss_scale.

The states themselves: test_loss_scale.py. Bad input: test_audit.py.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import FLOAT_DTYPES, make_tree
from helpers import assert_unchanged, snapshot
from hypothesis import assume, given
from hypothesis import strategies as st

import polprec as pp
from polprec import _fused, _tree
from polprec.testing import assert_trees_all_close, assert_trees_all_equal_dtypes
from polprec.testing import strategies as pst

# --- default_loss_scale and scale_loss ------------------------------------------------


def test_default_loss_scale() -> None:
    for spec in ("16-mixed", "16-true", 16, "c=f16", "o=f16"):
        assert isinstance(pp.default_loss_scale(spec), pp.DynamicLossScale)
    for spec in ("bf16-mixed", "bf16-true", "32-true", 64):
        assert isinstance(pp.default_loss_scale(spec), pp.NoOpLossScale)


def test_scale_loss_float16_does_not_overflow() -> None:
    loss = torch.tensor(60000.0, dtype=torch.float16)
    scaled = pp.scale_loss(loss, pp.StaticLossScale(2.0**16))
    assert scaled.dtype == torch.float32
    assert math.isfinite(scaled.item())
    assert scaled.item() == 60000.0 * 2.0**16


@pytest.mark.parametrize(
    ("dtype", "out"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_scale_loss_dtypes(dtype: torch.dtype, out: torch.dtype) -> None:
    assert pp.scale_loss(torch.tensor(1.0, dtype=dtype), pp.DynamicLossScale()).dtype == out
    noop = torch.tensor(1.0, dtype=dtype)
    assert pp.scale_loss(noop, pp.NoOpLossScale()) is noop


def test_scale_is_differentiable() -> None:
    w = torch.ones(2, requires_grad=True)
    pp.scale_loss((w * 3).sum(), pp.StaticLossScale(8)).backward()
    assert w.grad is not None
    assert w.grad.tolist() == [24.0, 24.0]


# --- unscale_and_check ----------------------------------------------------------------


@given(pst.tensor_trees(pst.tensors(allow_nonfinite=True)), pst.loss_scales())
def test_unscale_and_check_is_pure_and_flags_exactly(tree: Any, state: Any) -> None:
    before = snapshot(tree)
    grads, finite = pp.unscale_and_check(tree, state)
    assert_unchanged(tree, before)
    expected = all(
        bool(torch.isfinite(x).all()) for x in _tree.tree_leaves(tree) if _tree.is_float_tensor(x)
    )
    assert bool(finite) == expected
    assert finite.dtype == torch.bool
    assert finite.dim() == 0
    assert _tree.tree_structure(grads) == _tree.tree_structure(tree)


def test_unscale_and_check_over_shapes(tree_shape: str, float_dtype: torch.dtype) -> None:
    tree = pp.cast_tree(make_tree(tree_shape), float_dtype)
    grads, finite = pp.unscale_and_check(tree, pp.StaticLossScale(4.0))
    assert bool(finite)
    assert _tree.tree_structure(grads) == _tree.tree_structure(tree)
    assert_trees_all_equal_dtypes(grads, float_dtype)  # float16 grads stay float16
    expected = _tree.tree_map(lambda x: x / 4 if _tree.is_float_tensor(x) else x, tree)
    assert_trees_all_close(grads, expected, rtol=0, atol=0)


def test_unscale_uses_the_float32_reciprocal_for_float16_grads() -> None:
    # 2**-25 is below float16's smallest subnormal: it must not be rounded to 0 first.
    grads = {"w": torch.tensor([1024.0], dtype=torch.float16)}
    out, _ = pp.unscale_and_check(grads, pp.StaticLossScale(2.0**25))
    assert out["w"].dtype == torch.float16
    assert out["w"].item() == 2.0**-15


def test_unscale_and_check_keeps_none_and_non_float_leaves() -> None:
    step = torch.tensor(3)
    grads, finite = pp.unscale_and_check(
        {"a": None, "s": step, "w": torch.ones(2) * 8}, pp.StaticLossScale(8)
    )
    assert grads["a"] is None
    assert grads["s"] is step
    assert grads["w"].tolist() == [1.0, 1.0]
    assert bool(finite)


def test_noop_returns_grads_and_still_checks() -> None:
    grads = {"w": torch.tensor([1.0, float("nan")])}
    out, finite = pp.unscale_and_check(grads, pp.NoOpLossScale())
    assert out is grads
    assert not bool(finite)


def test_unscale_and_check_mixed_devices_and_dtypes_grouping() -> None:
    grads = [
        torch.ones(3) * 2,
        torch.ones(2, dtype=torch.float64) * 2,
        torch.ones(1, dtype=torch.bfloat16) * 2,
    ]
    out, finite = pp.unscale_and_check(grads, pp.StaticLossScale(2))
    assert bool(finite)
    assert [g.dtype for g in out] == [torch.float32, torch.float64, torch.bfloat16]
    assert all(bool((g == 1).all()) for g in out)
    grads[1][0] = float("inf")
    assert not bool(pp.unscale_and_check(grads, pp.StaticLossScale(2))[1])


def test_unscale_and_check_under_grad_tracking() -> None:
    w = torch.ones(3, requires_grad=True)
    out, finite = pp.unscale_and_check({"w": w * 4}, pp.StaticLossScale(4))
    out["w"].sum().backward()
    assert w.grad is not None
    assert w.grad.tolist() == [1.0, 1.0, 1.0]
    assert bool(finite)


# --- the fused eager path and the plain-op path ---------------------------------------


@given(pst.tensor_trees(pst.tensors(allow_nonfinite=True), mixed=False), st.integers(0, 20))
def test_fused_and_transform_safe_paths_agree(tree: Any, exponent: int) -> None:
    assume(_tree.tree_leaves(tree))  # vmap needs a tensor to map over
    state = pp.StaticLossScale(2.0**exponent)
    fused, f_ok = pp.unscale_and_check(tree, state)  # eager: torch's fused AMP kernels
    batched = _tree.tree_map(lambda x: x[None], tree)
    plain, p_ok = torch.func.vmap(lambda t: pp.unscale_and_check(t, state))(batched)  # plain ops
    assert_trees_all_close(fused, _tree.tree_map(lambda x: x[0], plain), rtol=0, atol=0)
    assert bool(f_ok) == bool(p_ok[0]) == bool(pp.all_finite(tree))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_owned_path_matches_the_pure_path(dtype: torch.dtype) -> None:
    grads = [torch.randn(5, dtype=dtype) * 64, torch.randn(2, 3).to(dtype)]
    pure, ok1 = pp.unscale_and_check(grads, pp.StaticLossScale(64))
    owned = [g.clone() for g in grads]
    ok2 = _fused.unscale_(owned, torch.reciprocal(torch.tensor(64.0))) == 0
    assert_trees_all_close(pure, owned, rtol=0, atol=0)
    assert bool(ok1) == bool(ok2)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    kernel = torch._amp_foreach_non_finite_check_and_unscale_

    def spy(*args: Any) -> Any:
        calls.append(len(args[0]))
        return kernel(*args)

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", spy)
    return calls


def test_eager_unscale_runs_the_fused_kernel_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    grads = {
        "a": torch.full((3,), 8.0),
        "b": torch.full((2,), 4.0),
        "n": None,
        "i": torch.ones(2, dtype=torch.int64),
    }
    out, finite = pp.unscale_and_check(grads, pp.StaticLossScale(4.0))
    assert calls == [2]  # one fused call over the two floating leaves
    assert bool(finite) and out["a"].tolist() == [2.0] * 3 and out["i"] is grads["i"]
    params = torch.nn.Parameter(torch.full((2,), 4.0))
    with torch.no_grad():
        pp.unscale_and_check([params], pp.StaticLossScale(2.0))
    assert calls == [2, 1]  # Parameters too, where no graph is being built


def test_unscale_is_differentiable_and_avoids_the_fused_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _counting(monkeypatch)
    g = torch.full((3,), 8.0, requires_grad=True)
    (out,), finite = pp.unscale_and_check([g], pp.StaticLossScale(4.0))
    assert calls == [] and bool(finite)
    out.sum().backward()
    assert g.grad is not None and g.grad.tolist() == [0.25] * 3  # d(g / 4)/dg
    p = torch.nn.Parameter(torch.ones(2))
    (q,), _ = pp.unscale_and_check([p], pp.StaticLossScale(2.0))
    assert calls == [] and q.requires_grad  # a Parameter that requires grad: graph kept

    class Sub(torch.Tensor):
        pass

    sub = torch.ones(2).as_subclass(Sub)
    (s,), finite = pp.unscale_and_check([sub], pp.StaticLossScale(2.0))
    assert calls == [] and s.tolist() == [0.5, 0.5] and bool(finite)  # subclasses: plain ops
    vmapped = torch.func.vmap(lambda x: pp.unscale_and_check(x, pp.StaticLossScale(2.0))[0])
    assert vmapped(torch.ones(4, 2)).tolist() == [[0.5, 0.5]] * 4 and calls == []


def test_unscale_where_the_fused_kernel_lacks_the_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on CUDA, whose fused kernel has no bfloat16: those leaves take plain ops.
    monkeypatch.setitem(_fused.UNSCALE_DTYPES, "cpu", (torch.float32,))
    grads = {"b": torch.tensor([8.0, 4.0], dtype=torch.bfloat16), "f": torch.tensor([2.0])}
    versions = {k: v._version for k, v in grads.items()}
    out, finite = pp.unscale_and_check(grads, pp.StaticLossScale(4.0))
    assert bool(finite) and out["b"].dtype == torch.bfloat16
    assert out["b"].tolist() == [2.0, 1.0] and out["f"].tolist() == [0.5]
    assert {k: v._version for k, v in grads.items()} == versions  # inputs untouched
    grads["b"] = torch.tensor([8.0, float("nan")], dtype=torch.bfloat16)
    _, finite = pp.unscale_and_check(grads, pp.StaticLossScale(4.0))
    assert not bool(finite)
    step = pp.value_and_grad(lambda p, x: (p["w"].float() * x).sum())
    w = {"w": torch.ones(3, dtype=torch.bfloat16)}
    _, g, ok, state = step(w, torch.full((3,), 2.0), loss_scale=pp.DynamicLossScale(8.0))
    assert bool(ok) and g["w"].tolist() == [2.0] * 3 and float(state.loss_scale) == 8.0
    _, g, ok, state = step(w, torch.full((3,), math.inf), loss_scale=pp.DynamicLossScale(8.0))
    assert not bool(ok) and float(state.loss_scale) == 4.0


@pytest.mark.parametrize(
    "state", [pp.NoOpLossScale(), pp.StaticLossScale(4.0)], ids=["noop", "static"]
)
def test_value_and_grad_checks_its_gradients_in_one_fused_call(
    monkeypatch: pytest.MonkeyPatch, state: Any
) -> None:
    calls = _counting(monkeypatch)
    # (b.sum()'s gradient would be an expanded view: not a buffer of its own to check in place)
    step = pp.value_and_grad(lambda p, x: (p["w"] * x).sum() + (p["b"] * 2.0).sum())
    params = {"w": torch.ones(3), "b": torch.zeros(2)}
    _, grads, finite, _ = step(params, torch.arange(3.0), loss_scale=state)
    assert calls == [2] and bool(finite)  # every scale type: one launch over both leaves
    assert grads["w"].tolist() == [0.0, 1.0, 2.0] and grads["b"].tolist() == [2.0, 2.0]
    _, _, finite, _ = step(params, torch.tensor([1.0, math.nan, 2.0]), loss_scale=state)
    assert calls == [2, 2] and not bool(finite)


def _count_kernels(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts torch's multi-tensor launches: the fused unscale, out-of-place multiplies (fresh
    buffers) and in-place additions (sums kept in place)."""
    counts = {"unscale": 0, "mul": 0, "add_": 0}
    for name, attr in (
        ("unscale", "_amp_foreach_non_finite_check_and_unscale_"),
        ("mul", "_foreach_mul"),
        ("add_", "_foreach_add_"),
    ):
        kernel = getattr(torch, attr)

        def spy(*a: Any, _k: Any = kernel, _n: str = name, **kw: Any) -> Any:
            counts[_n] += 1
            return _k(*a, **kw)

        monkeypatch.setattr(torch, attr, spy)
    return counts


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "dtensor"])
def test_value_and_grad_unscales_its_fresh_gradients_in_place(
    k: int, sharded: bool, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """autograd's gradients are polprec's own: summed over micro-batches in place, then
    unscaled and checked in one fused launch, with no copy (DTensors: their local shards)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 2)
    params = {key: v.detach() for key, v in model.named_parameters()}
    x = torch.randn(6, 6)

    def loss_fn(p: Any, x: torch.Tensor) -> torch.Tensor:
        return pp.apply_with_policy(model, p, x, policy="32-true").square().mean()

    _, want, _, _ = pp.value_and_grad(loss_fn)(params, x, loss_scale=pp.NoOpLossScale())
    if sharded:
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = request.getfixturevalue("mesh")
        params = {key: distribute_tensor(v, mesh, [Shard(0)]) for key, v in params.items()}
    step = pp.value_and_grad(loss_fn, microbatches=k)
    counts = _count_kernels(monkeypatch)
    _, grads, finite, _ = step(params, x, loss_scale=pp.StaticLossScale(8.0))
    # (a DTensor sum is made by DTensor's own addition; its local shards are fresh all the same)
    assert counts == {"unscale": 1, "mul": 0, "add_": 0 if sharded else k - 1}
    assert bool(finite)
    for key, g in grads.items():
        torch.testing.assert_close(g.full_tensor() if sharded else g, want[key])


def test_unscale_and_check_runs_the_fused_kernel_on_dtensors_local_shards(
    mesh: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    grads = {"w": distribute_tensor(torch.full((4, 2), 8.0), mesh, [Shard(0)])}
    counts = _count_kernels(monkeypatch)
    out, finite = pp.unscale_and_check(grads, pp.StaticLossScale(4.0))
    assert counts == {"unscale": 1, "mul": 1, "add_": 0}  # fresh buffers, checked in place
    assert bool(finite) and torch.equal(out["w"].full_tensor(), torch.full((4, 2), 2.0))
