"""Hypothesis strategies for mixed-precision tests (needs ``hypothesis``).

Examples:
    >>> from hypothesis import given
    >>> from polprec.testing import strategies as pst
    >>> @given(pst.policies())
    ... def test_round_trip(policy):
    ...     import polprec
    ...     assert polprec.get_policy(str(policy)) == policy
    >>> test_round_trip()
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from hypothesis import strategies as st

from polprec._catalogue import DTYPE_NAMES, FLOAT_DTYPES, GRAMMAR_KEYS, INT_SPECS, SPEC_NAMES
from polprec.loss_scale import DynamicLossScale, NoOpLossScale, StaticLossScale
from polprec.policy import Policy, parse_spec

__all__ = [
    "Point",
    "dtype_names",
    "finite_values",
    "floating_dtypes",
    "loss_scales",
    "policies",
    "policy_specs",
    "tensor_trees",
    "tensors",
]

FLOATING_DTYPES = FLOAT_DTYPES

#: A namedtuple used as a tree node by :func:`tensor_trees`.
Point = collections.namedtuple("Point", ["x", "y"])

_MAX_FINITE = {d: float(torch.finfo(d).max) for d in FLOATING_DTYPES}


def floating_dtypes() -> st.SearchStrategy[torch.dtype]:
    """float16, bfloat16, float32 and float64."""
    return st.sampled_from(FLOATING_DTYPES)


def dtype_names() -> st.SearchStrategy[str]:
    """Every dtype name :func:`polprec.parse_dtype` accepts, in random case and padding."""
    return st.tuples(st.sampled_from(sorted(DTYPE_NAMES)), st.booleans(), st.booleans()).map(
        lambda t: (t[0].upper() if t[1] else t[0]) + (" " if t[2] else "")
    )


def policy_specs() -> st.SearchStrategy[Any]:
    """Every accepted spec form: Fabric/Keras values, ints, bare dtype names, jmp grammar."""
    grammar = st.lists(
        st.tuples(
            st.sampled_from(sorted(GRAMMAR_KEYS)),
            dtype_names(),
        ),
        min_size=1,
        max_size=3,
        unique_by=lambda kv: GRAMMAR_KEYS[kv[0]],
    ).map(lambda kvs: ",".join(f"{k}={v.strip()}" for k, v in kvs))
    return st.one_of(
        st.sampled_from(sorted(SPEC_NAMES)),
        st.sampled_from(sorted(INT_SPECS)),
        dtype_names(),
        grammar,
    )


def policies() -> st.SearchStrategy[Policy]:
    """Policies from any three floating dtypes or from any accepted spec."""
    return st.one_of(
        st.builds(Policy, floating_dtypes(), floating_dtypes(), floating_dtypes()),
        policy_specs().map(parse_spec),
    )


def finite_values(
    dtype: torch.dtype, *, max_magnitude: float | None = None
) -> st.SearchStrategy[float]:
    """Python floats representable (finite) in ``dtype``."""
    limit = _MAX_FINITE[dtype] if max_magnitude is None else max_magnitude
    return (
        st.floats(
            -limit,
            limit,
            allow_nan=False,
            allow_infinity=False,
            width=32 if dtype != torch.float64 else 64,
        )
        .map(lambda v: float(torch.tensor(v, dtype=torch.float64).to(dtype)))
        .filter(lambda v: abs(v) <= _MAX_FINITE[dtype])
    )


def tensors(
    dtype: torch.dtype | st.SearchStrategy[torch.dtype] | None = None,
    *,
    max_size: int = 6,
    allow_nonfinite: bool = False,
    max_magnitude: float | None = 1e4,
) -> st.SearchStrategy[torch.Tensor]:
    """Small 0- to 2-dim floating tensors; ``allow_nonfinite`` mixes in nan and ±inf."""
    dtypes = floating_dtypes() if dtype is None else dtype
    if isinstance(dtypes, torch.dtype):
        dtypes = st.just(dtypes)

    @st.composite
    def build(draw: st.DrawFn) -> torch.Tensor:
        d = draw(dtypes)
        shape = draw(st.sampled_from([(), (1,), (max_size,), (2, max_size // 2 or 1)]))
        n = 1
        for s in shape:
            n *= s
        element = finite_values(d, max_magnitude=max_magnitude)
        if allow_nonfinite:
            element = st.one_of(
                element, st.sampled_from([float("nan"), float("inf"), -float("inf")])
            )
        values = draw(st.lists(element, min_size=n, max_size=n))
        return torch.tensor(values, dtype=torch.float64).to(d).reshape(shape)

    return build()


def _other_leaves() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.integers(-5, 5).map(lambda i: torch.tensor([i, i + 1])),
        st.booleans().map(lambda b: torch.tensor([b, not b])),
        st.integers(-3, 3),
        st.floats(-2, 2, allow_nan=False),
        st.sampled_from(["relu", "step"]),
        st.just(torch.tensor([1 + 2j], dtype=torch.complex64)),
    )


def tensor_trees(
    leaves: st.SearchStrategy[Any] | None = None,
    *,
    mixed: bool = True,
    max_leaves: int = 8,
) -> st.SearchStrategy[Any]:
    """Nested dict/list/tuple/namedtuple trees of floating tensors.

    With ``mixed=True`` the trees also hold integer, bool and complex tensors, Python
    scalars, strings and ``None``, which casting must pass through unchanged.
    """
    base = tensors() if leaves is None else leaves
    if mixed:
        base = st.one_of(base, _other_leaves())
    keys = st.sampled_from(["w", "b", "layer", "norm", "head", "step"])
    return st.recursive(
        base,
        lambda children: st.one_of(
            st.dictionaries(keys, children, max_size=3),
            st.lists(children, max_size=3),
            st.lists(children, max_size=3).map(tuple),
            st.builds(Point, children, children),
        ),
        max_leaves=max_leaves,
    )


def loss_scales() -> st.SearchStrategy[Any]:
    """NoOp, static (powers of two) and dynamic loss-scale states with random settings."""
    pow2 = st.integers(0, 24).map(lambda e: 2.0**e)

    @st.composite
    def dynamic(draw: st.DrawFn) -> DynamicLossScale:
        min_scale = draw(st.sampled_from([0.0, 1.0, 4.0]))
        max_scale = draw(st.sampled_from([None, 2.0**20, 2.0**24]))
        scale = draw(
            pow2.filter(lambda s: s >= min_scale and (max_scale is None or s <= max_scale))
        )
        period = draw(st.integers(1, 5))
        return DynamicLossScale(
            scale,
            draw(st.integers(0, period - 1)),
            period=period,
            factor=draw(st.sampled_from([2.0, 3.0, 4.0])),
            min_loss_scale=min_scale,
            max_loss_scale=max_scale,
            hysteresis=draw(st.integers(1, 3)),
        )

    return st.one_of(st.just(NoOpLossScale()), pow2.map(StaticLossScale), dynamic())
