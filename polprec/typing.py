"""Type aliases used in polprec's signatures."""

from __future__ import annotations

from typing import Any, TypeAlias

from polprec.policy import PolicySpec

__all__ = ["Params", "PolicySpec", "TensorTree"]

#: A pytree whose leaves are tensors (and possibly ``None``, scalars or other objects).
TensorTree: TypeAlias = Any
#: A pytree of parameters, e.g. ``dict(model.named_parameters())``.
Params: TypeAlias = Any
