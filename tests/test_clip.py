"""``clip_by_global_norm`` against ``torch.nn.utils.clip_grad_norm_``."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import make_tree
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.func import grad, vmap

import polprec as pp
from polprec import _tree
from polprec.testing import assert_trees_all_close


def _torch_clip(
    grads: dict[str, torch.Tensor], max_norm: float, norm_type: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    params = {k: torch.nn.Parameter(torch.zeros_like(g)) for k, g in grads.items()}
    for k, p in params.items():
        p.grad = grads[k].clone()
    norm = torch.nn.utils.clip_grad_norm_(params.values(), max_norm, norm_type=norm_type)
    return {k: p.grad for k, p in params.items()}, norm  # type: ignore[misc]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.0, 0.1, 1.0, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_clip_grad_norm_exactly(
    norm_type: float, max_norm: float, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(
        int(max_norm * 10) + (9 if math.isinf(norm_type) else int(norm_type))
    )
    grads = {
        "a": torch.randn(5, 3, generator=g, dtype=dtype),
        "b": torch.randn(7, generator=g, dtype=dtype) * 3,
        "c": torch.randn(2, 2, 2, generator=g, dtype=dtype),
    }
    expected, expected_norm = _torch_clip(grads, max_norm, norm_type)
    clipped, norm = pp.clip_by_global_norm(grads, max_norm, norm_type=norm_type)
    assert norm.dtype == dtype  # float32 at least: float64 gradients get a float64 norm
    # The same kernels in the same dtype, so the same bits.
    assert_trees_all_close(norm, expected_norm, rtol=0, atol=0)
    assert_trees_all_close(clipped, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_gradients_keep_their_dtype(dtype: torch.dtype) -> None:
    grads = {"a": torch.randn(64).to(dtype), "b": torch.randn(8, 8).to(dtype)}
    expected, expected_norm = _torch_clip(grads, 1.0, 2.0)
    clipped, norm = pp.clip_by_global_norm(grads, 1.0)
    assert {g.dtype for g in clipped.values()} == {dtype}
    assert_trees_all_close(norm, expected_norm.float(), dtype=dtype)
    assert_trees_all_close(clipped, expected, dtype=dtype)


def test_float16_gradients_whose_squared_sum_overflows_get_a_finite_norm() -> None:
    grads = {"w": torch.full((1000,), 3000.0, dtype=torch.float16)}  # norm ~94868 > 65504
    _, torch_norm = _torch_clip(grads, 1.0, 2.0)
    assert math.isinf(float(torch_norm))  # torch's own norm overflows float16
    clipped, norm = pp.clip_by_global_norm(grads, 1.0)
    assert math.isclose(float(norm), 3000.0 * math.sqrt(1000), rel_tol=1e-6)
    assert bool(torch.isfinite(clipped["w"]).all())
    total = torch.linalg.vector_norm(clipped["w"].float())
    assert math.isclose(float(total), 1.0, rel_tol=2e-3)


def test_shapes_none_and_non_floating_leaves(tree_shape: str) -> None:
    tree = make_tree(tree_shape)
    clipped, norm = pp.clip_by_global_norm(tree, 0.5)
    assert _tree.tree_structure(clipped) == _tree.tree_structure(tree)
    floats = [x for x in _tree.tree_leaves(tree) if _tree.is_float_tensor(x)]
    if not floats:
        assert float(norm) == 0.0
    else:
        expected = torch.linalg.vector_norm(torch.cat([x.reshape(-1) for x in floats]))
        assert math.isclose(float(norm), float(expected), rel_tol=1e-5)
    for a, b in zip(_tree.tree_leaves(clipped), _tree.tree_leaves(tree), strict=True):
        if not _tree.is_float_tensor(b):
            assert a is b


def test_is_pure_and_leaves_small_gradients_alone() -> None:
    grads = {"w": torch.tensor([0.25, 0.5]), "n": None, "step": torch.tensor(3)}
    versions = grads["w"]._version
    clipped, norm = pp.clip_by_global_norm(grads, 1.0)
    assert grads["w"]._version == versions and grads["w"].tolist() == [0.25, 0.5]
    assert clipped["w"] is not grads["w"]
    assert clipped["n"] is None and clipped["step"] is grads["step"]
    assert torch.equal(clipped["w"], grads["w"])  # a norm under max_norm: the coefficient is 1
    assert math.isclose(float(norm), math.sqrt(0.3125), rel_tol=1e-6)


def test_a_tensor_max_norm_and_non_finite_gradients() -> None:
    clipped, _ = pp.clip_by_global_norm({"w": torch.tensor([3.0, 4.0])}, torch.tensor(2.5))
    assert torch.allclose(clipped["w"], torch.tensor([1.5, 2.0]))
    bad, norm = pp.clip_by_global_norm({"w": torch.tensor([1.0, float("inf")])}, 1.0)
    assert math.isinf(float(norm))
    assert not bool(pp.all_finite(bad))  # the step's finite flag skips it anyway


def test_per_sample_clipping_under_vmap_and_differentiation() -> None:
    # DP-SGD clips each example's gradient: vmap over the batch of per-sample gradients.
    per_sample = {"w": torch.randn(6, 4, 3), "b": torch.randn(6, 3)}
    clipped, norms = vmap(lambda g: pp.clip_by_global_norm(g, 1.0))(per_sample)
    for i in range(6):
        one, n = pp.clip_by_global_norm({k: v[i] for k, v in per_sample.items()}, 1.0)
        assert_trees_all_close({k: v[i] for k, v in clipped.items()}, one, rtol=1e-6, atol=1e-7)
        assert math.isclose(float(norms[i]), float(n), rel_tol=1e-6)
    g = grad(lambda w: pp.clip_by_global_norm({"w": w}, 1.0)[0]["w"].sum())(
        torch.tensor([3.0, 4.0])
    )
    # d/dw of w / |w| summed: (|w|^2 - w * sum(w)) / |w|^3
    expected = (25.0 - torch.tensor([3.0, 4.0]) * 7.0) / 125.0
    assert torch.allclose(g, expected, rtol=1e-4, atol=1e-6)


def test_the_fused_kernels_run_in_eager_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    kernel = torch._foreach_norm

    def spy(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(tensors))
        return kernel(tensors, *args, **kwargs)

    products: list[int] = []
    multiply = torch._foreach_mul

    def spy_mul(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        products.append(len(tensors))
        return multiply(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", spy)
    monkeypatch.setattr(torch, "_foreach_mul", spy_mul)
    pp.clip_by_global_norm({"a": torch.ones(3), "b": torch.ones(2), "n": None}, 1.0)
    assert calls == [2] and products == [2]
    vmap(lambda g: pp.clip_by_global_norm(g, 1.0))({"a": torch.ones(2, 3)})
    assert calls == [2] and products == [2]  # plain ops under vmap


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_the_plain_path_has_the_fused_paths_numbers(norm_type: float) -> None:
    """Under vmap (plain ops) as in eager mode (multi-tensor kernels): the norm type, and the
    norm in float32 for float16 gradients whose squared sum overflows float16."""
    grads = {
        "w": torch.full((2, 1000), 3000.0, dtype=torch.float16),
        "b": torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float16),
    }
    clipped, norms = vmap(lambda g: pp.clip_by_global_norm(g, 1.0, norm_type=norm_type))(grads)
    for i in range(2):
        one, n = pp.clip_by_global_norm(
            {k: v[i] for k, v in grads.items()}, 1.0, norm_type=norm_type
        )
        assert n.dtype == norms.dtype == torch.float32 and math.isfinite(float(n))
        assert_trees_all_close(norms[i], n, rtol=1e-6, atol=0)
        assert_trees_all_close({k: v[i] for k, v in clipped.items()}, one, dtype=torch.float16)


def test_the_norm_of_nothing_is_a_float32_zero_whatever_the_default_dtype() -> None:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        tree = {"step": torch.tensor(3), "n": None}
        clipped, norm = pp.clip_by_global_norm(tree, 1.0)
    finally:
        torch.set_default_dtype(default)
    assert clipped is tree and norm.dtype == torch.float32 and float(norm) == 0.0


def test_mixed_dtypes_give_a_float64_norm() -> None:
    grads = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0], dtype=torch.float64)}
    clipped, norm = pp.clip_by_global_norm(grads, 1.0)
    assert norm.dtype == torch.float64 and float(norm) == 5.0
    assert clipped["a"].dtype == torch.float32 and clipped["b"].dtype == torch.float64
    assert torch.allclose(clipped["a"], torch.tensor([0.6])) and float(
        clipped["b"]
    ) == pytest.approx(0.8)


@pytest.mark.parametrize("placement", ["replicate", "shard0"])
def test_one_rank_dtensor_gradients_clip_as_plain_ones(mesh: Any, placement: str) -> None:
    where = [Replicate()] if placement == "replicate" else [Shard(0)]
    g = torch.Generator().manual_seed(0)
    plain = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g), "n": None}
    grads = {k: v if v is None else distribute_tensor(v, mesh, where) for k, v in plain.items()}
    for norm_type in (2.0, 1.0, math.inf):
        ref, ref_norm = pp.clip_by_global_norm(plain, 0.5, norm_type=norm_type)
        clipped, norm = pp.clip_by_global_norm(grads, 0.5, norm_type=norm_type)
        assert type(norm) is torch.Tensor and torch.equal(norm, ref_norm)
        assert clipped["n"] is None
        for k in ("w", "b"):
            assert type(clipped[k]) is DTensor and clipped[k].placements == tuple(where)
            assert torch.equal(clipped[k].full_tensor(), ref[k])


@pytest.mark.parametrize("max_norm", [torch.ones(2), torch.tensor(1)], ids=["not 0-dim", "integer"])
def test_a_bad_tensor_max_norm_is_named_with_its_dtype_and_shape(max_norm: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="^max_norm must be") as err:
        pp.clip_by_global_norm({"w": torch.ones(3)}, max_norm)
    assert str(err.value) == (
        "max_norm must be a number >= 0 or a 0-dim floating tensor, got a tensor of dtype "
        f"{max_norm.dtype} and shape {tuple(max_norm.shape)}"
    )
