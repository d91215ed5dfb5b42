"""Pure, fused, precision-aware optimizers: torch.optim's SGD, Adam and AdamW as functions.

An optimizer is a frozen, hashable object of settings (torch.optim's names and defaults).
``init(params)`` makes its state, a pytree of tensors; ``step(params, grads, state)`` returns
new parameters and a new state without changing its inputs, skips a step whose gradients
are not finite (checked by the step itself, or ``grads_finite=`` from
:func:`polprec.value_and_grad`: parameters and moments unchanged, the skip counted) and takes
the learning rate, or a factor of it (``lr_scale=``), as a tensor for schedules under
``torch.compile``. In eager mode the update runs on torch's fused kernels with the skip folded
in; under ``vmap``, ``torch.func.grad`` and ``torch.compile`` it runs in plain tensor ops.

:func:`partition` gives each parameter group its own optimizer (AdamW that decays 2-D weights
only); :func:`warmup_cosine` and :func:`warmup_linear` are schedules of the step count.

The precision options ``master_weights``, ``state_dtype``, ``rounding="stochastic"`` and
``kahan`` keep 16-bit parameters training like float32 ones.

For a migration that keeps its ``torch.optim`` optimizer, :func:`step_torch` hands polprec's
gradients and finite flag to a fused one, which skips inside its kernel without a host sync.

Examples:
    >>> import torch
    >>> import polprec as pp
    >>> opt = pp.optim.adamw(1e-3)
    >>> params = {"w": torch.zeros(2)}
    >>> state = opt.init(params)
    >>> params, state = opt.step(params, {"w": torch.tensor([1.0, -1.0])}, state)
    >>> params["w"]
    tensor([-0.0010,  0.0010])
"""

from __future__ import annotations

from polprec.optim._adam import Adam, adam, adamw
from polprec.optim._base import Optimizer
from polprec.optim._partition import Partition, partition
from polprec.optim._schedules import WarmupCosine, WarmupLinear, warmup_cosine, warmup_linear
from polprec.optim._sgd import SGD, sgd
from polprec.optim._states import AdamState, OptState, PartitionState, SGDState
from polprec.optim._torch import step_torch

__all__ = [
    "SGD",
    "Adam",
    "AdamState",
    "OptState",
    "Optimizer",
    "Partition",
    "PartitionState",
    "SGDState",
    "WarmupCosine",
    "WarmupLinear",
    "adam",
    "adamw",
    "partition",
    "sgd",
    "step_torch",
    "warmup_cosine",
    "warmup_linear",
]
