"""polprec: functional, JAX-style mixed precision for PyTorch.

Immutable :class:`Policy` objects, pure functions over parameter pytrees and stateless
loss-scale states that compose with ``torch.func`` (``functional_call``, ``grad``, ``vmap``)
and ``torch.compile``.
"""

from __future__ import annotations

from polprec.policy import Policy, get_policy, half_dtype, parse_dtype
from polprec.tree import all_finite, cast_params, cast_tree, select_tree

__version__ = "0.1.0"

__all__ = [
    "Policy",
    "__version__",
    "all_finite",
    "cast_params",
    "cast_tree",
    "get_policy",
    "half_dtype",
    "parse_dtype",
    "select_tree",
]
