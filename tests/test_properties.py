"""Property suite over the public API (run with HYPOTHESIS_PROFILE=thorough for 1000+ examples).

Together with the ``@given`` tests in the other files this covers every public function.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from helpers import float_leaves
from hypothesis import assume, example, given
from hypothesis import strategies as st
from torch import nn

import polprec as pp
from polprec import _tree, testing
from polprec.testing import assert_trees_all_close, assert_trees_all_equal_dtypes
from polprec.testing import strategies as pst

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- policies -----------------------------------------------------------------------------


@given(pst.policies())
def test_get_policy_returns_policies_unchanged(policy: pp.Policy) -> None:
    assert pp.get_policy(policy) is policy


@given(pst.policies())
def test_policy_is_hashable_and_equal_by_value(policy: pp.Policy) -> None:
    twin = pp.Policy(policy.param_dtype, policy.compute_dtype, policy.output_dtype)
    assert twin == policy
    assert hash(twin) == hash(policy)


@given(pst.dtype_names())
def test_parse_dtype_ignores_case_and_padding(name: str) -> None:
    assert pp.parse_dtype(name) == pp.parse_dtype(name.strip().lower())
    assert pp.parse_dtype(name) in FLOATS


@given(pst.policies(), pst.tensor_trees())
def test_policy_casts_set_each_dtype(policy: pp.Policy, tree: Any) -> None:
    assert_trees_all_equal_dtypes(policy.cast_to_param(tree), policy.param_dtype)
    assert_trees_all_equal_dtypes(policy.cast_to_compute(tree), policy.compute_dtype)
    assert_trees_all_equal_dtypes(policy.cast_to_output(tree), policy.output_dtype)


@given(pst.policies(), pst.tensor_trees())
def test_cast_params_is_cast_to_param(policy: pp.Policy, tree: Any) -> None:
    a, b = pp.cast_params(tree, policy), policy.cast_to_param(tree)
    assert_trees_all_close(a, b, rtol=0, atol=0)
    assert_trees_all_close(pp.cast_params(tree, str(policy)), b, rtol=0, atol=0)


@given(pst.policies())
def test_default_loss_scale_follows_float16(policy: pp.Policy) -> None:
    state = pp.default_loss_scale(policy)
    assert isinstance(state, pp.DynamicLossScale) == policy.uses_float16
    assert isinstance(state, pp.NoOpLossScale) != policy.uses_float16


@given(pst.policies())
def test_autocast_context_matches_the_compute_dtype(policy: pp.Policy) -> None:
    a = torch.ones(2, 2)
    with pp.autocast(policy, "cpu"):
        out = a @ a
    half = policy.compute_dtype in (torch.float16, torch.bfloat16)
    assert out.dtype == (policy.compute_dtype if half else torch.float32)


@given(pst.policies())
def test_is_mixed_means_autocast_can_serve(policy: pp.Policy) -> None:
    half = policy.compute_dtype in (torch.float16, torch.bfloat16)
    assert policy.is_mixed == (half and policy.param_dtype == torch.float32)


# --- trees --------------------------------------------------------------------------------


@given(pst.tensor_trees(), pst.floating_dtypes())
def test_cast_preserves_values_up_to_rounding(tree: Any, dtype: torch.dtype) -> None:
    out = pp.cast_tree(tree, dtype)
    for a, b in zip(float_leaves(tree), float_leaves(out), strict=True):
        assert torch.equal(a.to(dtype), b)


@given(pst.tensor_trees(pst.tensors(allow_nonfinite=True)), pst.floating_dtypes())
def test_widening_keeps_finiteness(tree: Any, dtype: torch.dtype) -> None:
    wide = pp.cast_tree(tree, torch.float64)
    assert bool(pp.all_finite(wide)) == bool(pp.all_finite(tree))
    del dtype


@given(pst.tensor_trees(pst.tensors(allow_nonfinite=True)))
def test_all_finite_is_a_0dim_bool(tree: Any) -> None:
    flag = pp.all_finite(tree)
    assert flag.dtype == torch.bool
    assert flag.dim() == 0


@given(pst.tensor_trees(pst.tensors(allow_nonfinite=True), mixed=False), st.booleans())
def test_select_tree_of_a_tree_with_itself_is_itself(tree: Any, pick: bool) -> None:
    out = pp.select_tree(torch.tensor(pick), tree, tree)
    for a, b in zip(_tree.tree_leaves(tree), _tree.tree_leaves(out), strict=True):
        assert a is b


@given(pst.tensor_trees(mixed=False))
def test_select_tree_preserves_structure_and_dtypes(tree: Any) -> None:
    other = _tree.tree_map(torch.zeros_like, tree)
    out = pp.select_tree(torch.tensor(False), tree, other)
    assert _tree.tree_structure(out) == _tree.tree_structure(tree)
    assert_trees_all_equal_dtypes(out, tree)


# --- loss scaling -------------------------------------------------------------------------


@given(pst.loss_scales(), st.lists(st.booleans(), max_size=30))
def test_adjust_never_changes_the_old_state(state: Any, flags: list[bool]) -> None:
    leaves = [x.clone() for x in _tree.tree_leaves(state)]
    versions = [x._version for x in _tree.tree_leaves(state)]
    for flag in flags:
        state.adjust(torch.tensor(flag))
    assert all(torch.equal(a, b) for a, b in zip(leaves, _tree.tree_leaves(state), strict=True))
    assert versions == [x._version for x in _tree.tree_leaves(state)]


@given(pst.loss_scales(), st.lists(st.booleans(), max_size=30))
def test_adjust_keeps_dtypes_and_settings(state: Any, flags: list[bool]) -> None:
    first = state
    for flag in flags:
        state = state.adjust(flag)
    assert type(state) is type(first)
    assert state.loss_scale.dtype == torch.float32
    if isinstance(state, pp.DynamicLossScale):
        assert state.counter.dtype == torch.int32
        assert 0 <= int(state.hysteresis_tracker) <= state.hysteresis
        assert (state.period, state.factor, state.hysteresis) == (
            first.period,
            first.factor,
            first.hysteresis,
        )


@given(pst.loss_scales(), st.lists(st.booleans(), min_size=1, max_size=20))
def test_growth_only_after_a_full_finite_period(state: Any, flags: list[bool]) -> None:
    assume(isinstance(state, pp.DynamicLossScale))
    for flag in flags:
        new = state.adjust(flag)
        grew = float(new.loss_scale) > float(state.loss_scale)
        if grew:
            assert flag
            assert int(state.counter) == state.period - 1
        if not flag:
            assert float(new.loss_scale) <= float(state.loss_scale)
            assert int(new.counter) == 0
        state = new


@given(pst.loss_scales())
def test_state_dict_round_trip(state: Any) -> None:
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    restored = state.load_state_dict(torch.load(buffer, weights_only=True))
    assert type(restored) is type(state)
    for a, b in zip(_tree.tree_leaves(state), _tree.tree_leaves(restored), strict=True):
        assert torch.equal(a, b)
    assert _tree.tree_structure(restored) == _tree.tree_structure(state)


@given(pst.loss_scales())
def test_pytree_round_trip_keeps_settings(state: Any) -> None:
    leaves, spec = _tree.tree_flatten(state)
    again = _tree.tree_unflatten(spec, [x.clone() for x in leaves])
    assert _tree.tree_structure(again) == spec
    assert again.state_dict().keys() == state.state_dict().keys()


@given(
    st.floats(-1e3, 1e3, allow_nan=False),
    pst.floating_dtypes(),
    st.integers(0, 20),
)
def test_scale_loss_is_the_product_in_float32_or_wider(
    value: float, dtype: torch.dtype, e: int
) -> None:
    loss = torch.tensor(value, dtype=dtype)
    scaled = pp.scale_loss(loss, pp.StaticLossScale(2.0**e))
    assert scaled.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert float(scaled) == float(loss) * 2.0**e
    assert math.isfinite(float(scaled))


@given(pst.tensor_trees(pst.tensors(max_magnitude=1e3), mixed=False), st.integers(0, 10))
def test_unscale_and_check_divides_by_the_scale(tree: Any, e: int) -> None:
    grads, finite = pp.unscale_and_check(tree, pp.DynamicLossScale(2.0**e))
    assert bool(finite)
    expected = _tree.tree_map(lambda x: (x.double() / 2.0**e).to(x.dtype), tree)
    assert_trees_all_close(grads, expected, rtol=0, atol=0)


# --- applying a policy --------------------------------------------------------------------


@given(pst.policies(), st.integers(1, 4))
def test_apply_with_policy_output_and_grad_dtypes(policy: pp.Policy, batch: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = pp.cast_params({k: v.detach() for k, v in model.named_parameters()}, policy)
    x = torch.randn(batch, 3)
    out = pp.apply_with_policy(model, params, x, policy=policy)
    assert out.dtype == policy.output_dtype
    assert out.shape == (batch, 2)
    grads = torch.func.grad(
        lambda p: pp.apply_with_policy(model, p, x, policy=policy).float().sum()
    )(params)
    assert_trees_all_equal_dtypes(grads, policy.param_dtype)


@given(st.integers(0, 16), st.sampled_from(["32-true", "64-true"]))
def test_value_and_grad_matches_plain_autograd(e: int, spec: str) -> None:
    torch.manual_seed(e)
    policy = pp.get_policy(spec)
    w = {"w": torch.randn(5).to(policy.param_dtype)}
    x = torch.randn(5).to(policy.param_dtype)

    def loss_fn(p: Any, x: torch.Tensor) -> torch.Tensor:
        return (torch.sin(p["w"] * x) ** 2).sum()

    loss, grads, finite, _ = pp.value_and_grad(loss_fn)(w, x, loss_scale=pp.StaticLossScale(2.0**e))
    expected = torch.func.grad(loss_fn)(w, x)
    assert bool(finite)
    assert torch.equal(loss, loss_fn(w, x))
    assert_trees_all_close(grads, expected, dtype=policy.param_dtype)


@given(st.lists(st.booleans(), min_size=1, max_size=8))
def test_value_and_grad_flag_follows_the_data(poison: list[bool]) -> None:
    x = torch.ones(len(poison))
    x[torch.tensor(poison)] = float("inf")
    _, grads, finite, state = pp.value_and_grad(lambda p, x: (p["w"] * x).sum())(
        {"w": torch.ones(len(poison))}, x, loss_scale=pp.DynamicLossScale(8.0, period=1)
    )
    assert bool(finite) == (not any(poison))
    assert float(state.loss_scale) == (16.0 if not any(poison) else 4.0)
    del grads


@given(pst.policies())
def test_rules_without_rules_act_like_the_default(policy: pp.Policy) -> None:
    model = nn.Linear(3, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    rules = pp.PolicyRules(policy)
    assert_trees_all_close(
        rules.cast_params(params), pp.cast_params(params, policy), rtol=0, atol=0
    )
    x = torch.randn(2, 3)
    assert_trees_all_close(
        pp.apply_with_policy(model, pp.cast_params(params, policy), x, policy=rules),
        pp.apply_with_policy(model, pp.cast_params(params, policy), x, policy=policy),
        rtol=0,
        atol=0,
    )
    assert set(rules.resolve(model).values()) == {policy}


# --- polprec.testing ----------------------------------------------------------------------


@example("step")  # a string leaf that is not a dtype name is a tree, not a dtype
@given(pst.tensor_trees(pst.tensors(allow_nonfinite=True)))
def test_assert_trees_all_close_is_reflexive(tree: Any) -> None:
    assert_trees_all_close(tree, tree, rtol=0, atol=0)
    assert_trees_all_equal_dtypes(tree, tree)


@given(pst.tensors(dtype=pst.floating_dtypes()), st.floats(0.5, 10))
def test_assert_trees_all_close_catches_a_perturbation(x: torch.Tensor, bump: float) -> None:
    rtol, atol = testing.default_tolerance(x.dtype)
    y = (x.double() + (atol + rtol * x.double().abs()) * 4 * bump).to(x.dtype)
    assume(not torch.equal(x, y))
    with pytest.raises(AssertionError, match="leaf x"):
        assert_trees_all_close({"x": y}, {"x": x})


@given(pst.tensor_trees(mixed=False), st.integers(1, 3))
def test_stack_trees_then_indexing_gives_each_tree_back(tree: Any, n: int) -> None:
    trees = [
        _tree.tree_map(lambda x, k=k: x + k if x.is_floating_point() else x, tree) for k in range(n)
    ]
    stacked = pp.stack_trees(trees)
    for k, original in enumerate(trees):
        assert_trees_all_close(
            _tree.tree_map(lambda x, k=k: x[k], stacked), original, rtol=0, atol=0
        )


@given(pst.tensor_trees(mixed=False), pst.policies())
def test_full_precision_decorator_sees_float32(tree: Any, policy: pp.Policy) -> None:
    seen: list[torch.dtype] = []

    @pp.full_precision()
    def inner(t: Any) -> Any:
        seen.extend(x.dtype for x in _tree.tree_leaves(t))
        return t

    with pp.autocast(policy, "cpu"):
        out = inner(policy.cast_to_compute(tree))
    assert set(seen) <= {torch.float32}
    assert_trees_all_equal_dtypes(out, torch.float32)


@given(st.sampled_from(["cpu", "meta", torch.device("cpu"), None]))
def test_half_dtype_is_a_16_bit_float(device: Any) -> None:
    assert pp.half_dtype(device) in (torch.float16, torch.bfloat16)
