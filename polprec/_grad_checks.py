"""What :func:`polprec.value_and_grad` checks: its arguments and what the loss function returns."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from polprec import _fused, _tree
from polprec.loss_scale import (
    DynamicLossScale,
    LossScale,
    NoOpLossScale,
    StaticLossScale,
    check_loss_scale,
)

__all__ = [
    "check_loss_scale_arg",
    "check_params",
    "check_reached",
    "check_reaches",
    "check_traced_aux",
    "split_loss",
]

UNREACHED = (
    "the loss does not depend on any floating-point leaf of params, so every gradient would "
    "be zero and training would not move. The loss function probably calls the module "
    "itself (model(x)), which computes with the module's own parameters: compute the output "
    "from the params the loss function is given, pp.apply_with_policy(model, params, x, "
    "policy=policy). (Leaves that do not reach the loss, such as frozen layers or an unused "
    "head, are fine as long as one does.)"
)


def split_loss(out: Any, has_aux: bool) -> tuple[torch.Tensor, Any]:
    if has_aux:
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(
                "with has_aux=True the loss function must return a (loss, aux) tuple, got "
                f"{type(out).__name__}"
            )
        loss, aux = out
    else:
        loss, aux = out, None
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point() or loss.dim() != 0:
        hint = " (did you mean has_aux=True?)" if isinstance(out, tuple) and not has_aux else ""
        raise TypeError(
            "the loss function must return a floating-point scalar tensor"
            f"{' as the first element' if has_aux else ''}, got "
            f"{type(loss).__name__}"
            f"{'' if not isinstance(loss, torch.Tensor) else f' of dtype {loss.dtype} and shape {tuple(loss.shape)}'}"
            f"{hint}"
        )
    return loss, aux


def check_reaches(loss: torch.Tensor) -> None:
    """Refuse a loss that no floating leaf of params reaches (see :data:`UNREACHED`).

    ``loss.requires_grad`` is known without a host sync. Inside ``torch.func.grad`` it says
    whether the loss depends on the inputs being differentiated at that transform's level: a
    loss computed only from other tensors (the module's own parameters, the batch) does not
    require grad there, even where those tensors require grad in plain autograd.
    """
    if not loss.requires_grad:
        raise ValueError(UNREACHED)


def check_reached(grads: Sequence[torch.Tensor | None]) -> None:
    """Refuse eager gradients that are all ``None``: the loss required grad through other tensors."""
    if all(g is None for g in grads):
        raise ValueError(
            UNREACHED + " It was computed from other tensors that require grad, such as the "
            "module's own nn.Parameters."
        )


def check_loss_scale_arg(loss_scale: Any, args: tuple[Any, ...]) -> LossScale:
    """The ``loss_scale=`` keyword, or an error that says how to pass it."""
    if loss_scale is None:
        if args and isinstance(args[-1], NoOpLossScale | StaticLossScale | DynamicLossScale):
            raise TypeError(
                f"loss_scale was given as positional argument {len(args)} after params; pass "
                "it by keyword: grad_fn(params, *batch, loss_scale=state)"
            )
        raise TypeError(
            "the function value_and_grad returns needs loss_scale=<state>, got loss_scale=None: "
            "start from loss_scale=pp.default_loss_scale(policy) (pp.NoOpLossScale() for no "
            "scaling) and pass on the state each call returns"
        )
    return check_loss_scale(loss_scale)


def history_grows(x: torch.Tensor) -> bool:
    """Whether ``x`` was computed from a tensor that was itself computed (two graph levels).

    A parameter cast once (``cast_params`` of ``nn.Parameter``s) has one level; an update of
    it (``p - lr * g``) has two, and every further step adds one.
    """
    fn = x.grad_fn
    return fn is not None and any(n is not None and n.next_functions for n, _ in fn.next_functions)


def check_params(params: Any, leaves: list[Any], diff: list[torch.Tensor]) -> None:
    _tree.check_tree(params, "params")
    if not diff:
        kinds = sorted(
            {type(x).__name__ if not isinstance(x, torch.Tensor) else str(x.dtype) for x in leaves}
        )
        raise ValueError(
            "params has no floating-point tensor to differentiate"
            + (f" (its leaves are {', '.join(kinds)})" if kinds else " (it is empty)")
            + "; pass the parameters, e.g. {k: v.detach() for k, v in model.named_parameters()}"
        )
    if not _fused.tracing() and any(history_grows(x) for x in diff):
        warnings.warn(
            "params carry a growing autograd history: every update built from them extends "
            "the graph, so memory and time grow with each step. Detach them once, e.g. "
            "params = {k: v.detach() for k, v in model.named_parameters()}, or update them "
            "under torch.no_grad()",
            UserWarning,
            stacklevel=3,
        )


def check_traced_aux(aux: Any) -> None:
    """Refuse, clearly, what ``torch.func.grad`` cannot return as aux: anything but tensors."""
    paths, leaves, _ = _tree.tree_flatten_with_path(aux)
    for path, leaf in zip(paths, leaves, strict=True):
        if isinstance(leaf, torch.Tensor):
            continue
        kind = type(leaf).__name__
        hint = (
            " It is a transformers cache, returned while use_cache is on (by default in eval "
            "mode): call the model with use_cache=False, or leave the cache out of aux."
            if kind.endswith("Cache")
            else ""
        )
        where = _tree.path_str(path) if path else ""
        sep = "" if not where or where.startswith("[") else "."
        raise TypeError(
            f"aux holds a {kind} at aux{sep}{where}: inside vmap or grad and under "
            "torch.compile value_and_grad differentiates with torch.func.grad, whose aux can "
            "hold only tensors (in pytrees)." + hint
        )
