"""Dtype-aware tree assertions (chex-style: failures name the leaf path and both dtypes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from polprec import _tree
from polprec._catalogue import DTYPE_NAMES
from polprec.policy import Policy, PolicySpec, get_policy, parse_dtype

__all__ = [
    "assert_matches_full_precision",
    "assert_trees_all_close",
    "assert_trees_all_equal_dtypes",
    "default_tolerance",
]

# (rtol, atol) for results *computed* in a dtype: a few roundings of accumulated error, not
# one. float16 has 11 significant bits, bfloat16 8, float32 24, float64 53.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-10, 1e-12),
}
_PRECISION_ORDER = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def default_tolerance(dtype: torch.dtype | str) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing a result computed in ``dtype`` with a reference.

    Examples:
        >>> default_tolerance("bf16")
        (0.05, 0.01)
    """
    return _TOLERANCES[parse_dtype(dtype)]


def _lowest(*dtypes: torch.dtype) -> torch.dtype:
    floats = [d for d in dtypes if d in _PRECISION_ORDER]
    if not floats:
        return torch.float64
    return min(floats, key=_PRECISION_ORDER.index)


def _resolve_dtype(dtype: torch.dtype | str | None, policy: Any) -> torch.dtype | None:
    if dtype is not None and policy is not None:
        raise ValueError("pass either dtype= or policy=, not both")
    if policy is not None:
        return get_policy(policy).compute_dtype
    if dtype is not None:
        return parse_dtype(dtype)
    return None


def _flatten_pair(actual: Any, expected: Any) -> list[tuple[str, Any, Any]]:
    paths, a_leaves, a_spec = _tree.tree_flatten_with_path(actual)
    b_leaves, b_spec = _tree.tree_flatten(expected)
    if a_spec != b_spec:
        raise AssertionError(
            f"trees differ in structure:\n  actual:   {a_spec}\n  expected: {b_spec}"
        )
    return [(_tree.path_str(p), a, b) for p, a, b in zip(paths, a_leaves, b_leaves, strict=True)]


def assert_trees_all_close(
    actual: Any,
    expected: Any,
    *,
    dtype: torch.dtype | str | None = None,
    policy: PolicySpec = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Assert that two trees have the same structure and leafwise close values.

    Tolerances default to :func:`default_tolerance` of ``dtype``, of the ``policy``'s compute
    dtype, or else of the lowest-precision dtype of each pair of leaves. Elements match when
    ``|actual - expected| <= atol + rtol * |expected|``; NaNs must sit in the same places,
    infinities must be equal. Non-tensor leaves must be equal.

    Raises:
        AssertionError: naming the leaf path, both dtypes, the worst element and the
            tolerance used.

    Examples:
        >>> import torch
        >>> assert_trees_all_close({"w": torch.tensor([1.0, 2.0])},
        ...                        {"w": torch.tensor([1.0, 2.01])}, dtype=torch.bfloat16)
        >>> assert_trees_all_close({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 2.5])})
        Traceback (most recent call last):
        ...
        AssertionError: leaf w (actual float32, expected float32, shape (2,)): 1 of 2 elements differ; worst at index (1,): actual 2.0 vs expected 2.5 ...
    """
    fixed = _resolve_dtype(dtype, policy)
    for path, a, b in _flatten_pair(actual, expected):
        a_t, b_t = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
        if not (a_t and b_t):
            if a_t or b_t:
                raise AssertionError(
                    f"leaf {path}: {type(a).__name__} vs {type(b).__name__} (one is a tensor)"
                )
            if a is not b and a != b:
                raise AssertionError(f"leaf {path}: {a!r} != {b!r}")
            continue
        if a.shape != b.shape:
            raise AssertionError(
                f"leaf {path}: shapes differ, actual {tuple(a.shape)} vs expected {tuple(b.shape)}"
            )
        d = fixed if fixed is not None else _lowest(a.dtype, b.dtype)
        d_rtol, d_atol = _TOLERANCES.get(d, (0.0, 0.0))
        r = d_rtol if rtol is None else rtol
        t = d_atol if atol is None else atol
        _compare(path, a, b, r, t)


def _compare(path: str, a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> None:
    if not (a.is_floating_point() or a.is_complex() or b.is_floating_point() or b.is_complex()):
        bad = a.cpu() != b.cpu()
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise AssertionError(
                f"leaf {path} ({a.dtype} vs {b.dtype}): {int(bad.sum())} of {a.numel()} "
                f"elements differ; first at index {idx}: {a[idx].item()!r} vs {b[idx].item()!r}"
            )
        return
    a64 = a.detach().cpu().to(torch.complex128 if a.is_complex() else torch.float64)
    b64 = b.detach().cpu().to(torch.complex128 if b.is_complex() else torch.float64)
    nan_a, nan_b = torch.isnan(a64), torch.isnan(b64)
    diff = (a64 - b64).abs()
    tol = atol + rtol * b64.abs()
    both_inf_equal = torch.isinf(a64) & (a64 == b64)
    close = (diff <= tol) | both_inf_equal | (nan_a & nan_b)
    if bool(close.all()):
        return
    bad = ~close
    score = torch.where(bad, torch.nan_to_num(diff - tol, nan=float("inf")), -1.0)
    flat = int(score.reshape(-1).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a64.shape))
    av, bv = a64.reshape(-1)[flat].item(), b64.reshape(-1)[flat].item()
    raise AssertionError(
        f"leaf {path} (actual {_tree_dtype(a)}, expected {_tree_dtype(b)}, shape "
        f"{tuple(a.shape)}): {int(bad.sum())} of {a.numel()} elements differ; worst at index "
        f"{idx}: actual {av!r} vs expected {bv!r} (|diff| {abs(av - bv)!r} > tolerance "
        f"{atol + rtol * abs(bv)!r} = atol {atol!r} + rtol {rtol!r} * |expected|)"
    )


def _tree_dtype(x: torch.Tensor) -> str:
    return _name(x.dtype)


def _name(d: torch.dtype | type) -> str:
    return str(d).removeprefix("torch.") if isinstance(d, torch.dtype) else d.__name__


def assert_trees_all_equal_dtypes(actual: Any, expected: Any) -> None:
    """Assert leafwise dtypes: ``expected`` is a tree of the same structure or one dtype.

    With a single dtype (or dtype name), every floating tensor leaf of ``actual`` must have
    it; non-floating leaves are not checked. Any other string is compared as a (one-leaf)
    tree.

    Examples:
        >>> import torch
        >>> assert_trees_all_equal_dtypes({"w": torch.ones(1), "n": torch.tensor(1)}, "float32")
        >>> assert_trees_all_equal_dtypes([torch.ones(1)], [torch.ones(1, dtype=torch.float16)])
        Traceback (most recent call last):
        ...
        AssertionError: leaf [0]: dtype float32, expected float16
    """
    if isinstance(expected, torch.dtype) or (
        isinstance(expected, str) and expected.strip().lower() in DTYPE_NAMES
    ):
        want = parse_dtype(expected)
        paths, leaves, _ = _tree.tree_flatten_with_path(actual)
        for p, x in zip(paths, leaves, strict=True):
            if _tree.is_float_tensor(x) and x.dtype != want:
                raise AssertionError(
                    f"leaf {_tree.path_str(p)}: dtype {_tree_dtype(x)}, expected {_name(want)}"
                )
        return
    for path, a, b in _flatten_pair(actual, expected):
        a_d = a.dtype if isinstance(a, torch.Tensor) else type(a)
        b_d = b.dtype if isinstance(b, torch.Tensor) else type(b)
        if a_d != b_d:
            raise AssertionError(f"leaf {path}: dtype {_name(a_d)}, expected {_name(b_d)}")


def assert_matches_full_precision(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    policy: Policy | int | str,
    rtol: float | None = None,
    atol: float | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Assert that ``fn`` under ``policy`` matches its float32 result.

    Calls ``fn(cast_params(params, policy), *args, policy=policy, **kwargs)`` and
    ``fn(cast_params(params, "32-true"), *args, policy="32-true", **kwargs)`` (float32
    parameters from the same values), then compares the two results with the tolerance of the
    policy's lowest-precision dtype (compute, param, or float32 for the reference),
    converting both to float32 first.

    Returns:
        ``(result_under_policy, result_in_float32)``.

    Examples:
        >>> import torch
        >>> import polprec as pp
        >>> model = torch.nn.Linear(4, 2)
        >>> params = dict(model.named_parameters())
        >>> def forward(params, x, *, policy):
        ...     return pp.apply_with_policy(model, params, x, policy=policy)
        >>> _ = assert_matches_full_precision(forward, params, torch.ones(3, 4), policy="bf16-mixed")
    """
    pol = get_policy(policy)
    full = get_policy("32-true")
    low = pol.cast_to_param(params)
    got = fn(low, *args, policy=pol, **kwargs)
    ref = fn(full.cast_to_param(params), *args, policy=full, **kwargs)
    d = _lowest(pol.compute_dtype, pol.param_dtype, torch.float32)  # the reference is float32
    d_rtol, d_atol = _TOLERANCES[d]
    assert_trees_all_close(
        _tree.cast_floating(got, torch.float32),
        _tree.cast_floating(ref, torch.float32),
        rtol=d_rtol if rtol is None else rtol,
        atol=d_atol if atol is None else atol,
    )
    return got, ref
