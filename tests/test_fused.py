"""The fused-kernel module: each kernel wrapper against plain ops, and the ownership rules."""

from __future__ import annotations

import math

import pytest
import torch

from polprec import _fused


def test_owned_needs_distinct_plain_contiguous_buffers() -> None:
    a, b = torch.ones(3), torch.ones(2, 2)
    assert _fused.owned([a, b])
    assert _fused.owned([])
    assert not _fused.owned([a, a])  # one buffer handed out twice: unscaled twice
    assert not _fused.owned([a, b.t()])  # not contiguous
    assert not _fused.owned([torch.nn.Parameter(torch.ones(2)), b])  # not a plain tensor

    class Sub(torch.Tensor):
        pass

    assert not _fused.owned([torch.ones(2).as_subclass(Sub)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_mul_and_scaled_keep_each_dtype_including_0_dim(dtype: torch.dtype) -> None:
    factor = torch.tensor(2.0**-20)  # below float16's range: computed in float32, rounded once
    tensors = [torch.tensor(3.0, dtype=dtype), torch.full((4,), 2.0**10, dtype=dtype)]
    products = _fused.mul(tensors, factor)
    for x, y in zip(tensors, products, strict=True):
        assert y.dtype == dtype
        assert torch.equal(y, (x.double() * 2.0**-20).to(dtype))
        assert torch.equal(_fused.scaled(x, factor), y)
    assert tensors[1].tolist() == [2.0**10] * 4  # out of place


def test_unscale_multiplies_in_place_and_flags_in_float32() -> None:
    tensors = [
        torch.full((3,), 8.0),
        torch.full((2,), 8.0, dtype=torch.float64),
        torch.full((2,), 8.0, dtype=torch.bfloat16),
    ]
    found = _fused.unscale_(tensors, torch.tensor(0.25))
    assert found.dtype == torch.float32 and found.dim() == 0 and float(found) == 0.0
    assert [t.dtype for t in tensors] == [torch.float32, torch.float64, torch.bfloat16]
    assert all(t.tolist() == [2.0] * t.numel() for t in tensors)
    tensors[1][0] = math.inf
    assert float(_fused.unscale_(tensors, torch.tensor(1.0))) > 0  # any group's overflow counts
    one = [torch.tensor([1.0, math.nan])]
    found_one = _fused.unscale_(one, torch.tensor(1.0))
    assert found_one.dtype == torch.float32 and float(found_one) == 1.0


def test_unscale_where_the_kernel_lacks_the_dtype_flags_in_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(_fused.UNSCALE_DTYPES, "cpu", (torch.float32,))
    plain = [torch.tensor([4.0, math.inf], dtype=torch.bfloat16)]
    found = _fused.unscale_(plain, torch.tensor(0.5))
    assert found.dtype == torch.float32 and float(found) == 1.0
    assert plain[0].tolist() == [2.0, math.inf]
    mixed = [torch.tensor([4.0], dtype=torch.bfloat16), torch.tensor([math.nan])]
    assert float(_fused.unscale_(mixed, torch.tensor(0.5))) == 1.0  # the kernel's group
    assert mixed[0].tolist() == [2.0]


def test_accumulate_sums_in_float32_in_place_only_when_owned() -> None:
    f32, bf16 = torch.ones(3), torch.ones(2, dtype=torch.bfloat16)
    acc = _fused.accumulate([], [f32, bf16], owned=True)
    assert acc[0] is f32  # an owned float32 gradient starts the sum as it is
    assert acc[1] is not bf16 and acc[1].dtype == torch.float32
    same = _fused.accumulate(acc, [torch.ones(3), torch.ones(2, dtype=torch.bfloat16)], owned=True)
    assert same[0] is acc[0] and same[1] is acc[1]  # added in place
    assert same[0].tolist() == [2.0] * 3 and same[1].tolist() == [2.0] * 2
    f32.fill_(1.0)
    fresh = _fused.accumulate([], [f32, bf16], owned=False)
    assert fresh[0] is f32  # shared, never written: later sums are new tensors
    summed = _fused.accumulate(
        fresh, [torch.ones(3), torch.ones(2, dtype=torch.bfloat16)], owned=False
    )
    assert summed[0] is not fresh[0] and summed[1] is not fresh[1]  # new tensors, inputs kept
    assert summed[1].dtype == torch.float32 and summed[1].tolist() == [2.0, 2.0]
    assert fresh[1].tolist() == [1.0, 1.0] and f32.tolist() == [1.0] * 3
    with pytest.raises(ValueError, match="zip"):
        _fused.accumulate(fresh, [torch.ones(3)], owned=False)


@pytest.mark.parametrize("ord", [1.0, 2.0, math.inf])
def test_norms_in_at_least_float32_for_mixed_dtypes(ord: float) -> None:
    tensors = [
        torch.tensor([300.0, -400.0], dtype=torch.float16),
        torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64),
        torch.tensor([3.0, 4.0]),
    ]
    mixed = _fused.norms(tensors, ord)
    same = _fused.norms([t.float() for t in tensors], ord)
    assert [n.dtype for n in mixed] == [torch.float32, torch.float64, torch.float32]
    for t, a, b in zip(tensors, mixed, same, strict=True):
        expected = torch.linalg.vector_norm(t.double(), ord)
        assert math.isclose(float(a), float(expected), rel_tol=1e-6)
        assert math.isclose(float(b), float(expected), rel_tol=1e-6)
    assert _fused.norm_dtype(torch.float16) == torch.float32
    assert _fused.norm_dtype(torch.float64) == torch.float64


def test_may_fuse_only_in_plain_eager_mode() -> None:
    x, p = torch.ones(2), torch.nn.Parameter(torch.ones(2))
    assert _fused.may_fuse([x])
    assert not _fused.may_fuse([p])  # autograd is recording through it
    with torch.no_grad():
        assert _fused.may_fuse([p])
    seen: list[bool] = []
    torch.func.vmap(lambda t: seen.append(_fused.may_fuse([t])) or t)(torch.ones(2, 1))
    assert seen == [False]
    assert not _fused.transforms_active() and not _fused.tracing()


def test_one_is_a_float32_one_made_once_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "_ONES", {})
    one = _fused.one(torch.device("cpu"))
    assert one.dtype == torch.float32 and one.shape == () and one.device.type == "cpu"
    assert float(one) == 1.0 and _fused.one(torch.device("cpu")) is one


def test_copies_are_fresh_contiguous_equal_tensors() -> None:
    base = torch.arange(12.0).view(3, 4)
    for tensors in ([base, torch.ones(2)], [base.t(), torch.ones(2)]):  # contiguous or not
        out = _fused.copies(tensors)
        assert len(out) == len(tensors)
        for x, y in zip(tensors, out, strict=True):
            assert torch.equal(x, y) and y.is_contiguous() and y.data_ptr() != x.data_ptr()
