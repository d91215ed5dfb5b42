"""polprec: functional, JAX-style mixed precision for PyTorch.

Immutable :class:`Policy` objects, pure functions over parameter pytrees and stateless
loss-scale states that compose with ``torch.func`` (``functional_call``, ``grad``, ``vmap``)
and ``torch.compile``.
"""

from __future__ import annotations

from polprec import optim
from polprec.apply import apply_with_policy, autocast, full_precision
from polprec.clip import clip_by_global_norm
from polprec.devices import half_dtype
from polprec.distributed import all_finite_across, to_fsdp_mixed_precision
from polprec.grad import value_and_grad
from polprec.loss_scale import (
    DynamicLossScale,
    LossScale,
    NoOpLossScale,
    StaticLossScale,
)
from polprec.policy import Policy, get_policy, parse_dtype, parse_spec
from polprec.rules import PolicyRules
from polprec.scaling import default_loss_scale, scale_loss, unscale_and_check
from polprec.tree import all_finite, cast_params, cast_tree, select_tree, stack_trees

__version__ = "0.1.0"

__all__ = [
    "DynamicLossScale",
    "LossScale",
    "NoOpLossScale",
    "Policy",
    "PolicyRules",
    "StaticLossScale",
    "__version__",
    "all_finite",
    "all_finite_across",
    "apply_with_policy",
    "autocast",
    "cast_params",
    "cast_tree",
    "clip_by_global_norm",
    "default_loss_scale",
    "full_precision",
    "get_policy",
    "half_dtype",
    "optim",
    "parse_dtype",
    "parse_spec",
    "scale_loss",
    "select_tree",
    "stack_trees",
    "to_fsdp_mixed_precision",
    "unscale_and_check",
    "value_and_grad",
]
