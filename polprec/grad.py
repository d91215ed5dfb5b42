"""``value_and_grad``: one call that scales, differentiates, unscales, checks and adjusts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from polprec import _fused, _tree
from polprec.distributed import all_finite_across, check_process_group
from polprec.loss_scale import LossScale, NoOpLossScale, check_loss_scale
from polprec.scaling import scale_loss, unscale_and_check

__all__ = ["value_and_grad"]


def _split_loss(out: Any, has_aux: bool) -> tuple[torch.Tensor, Any]:
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


def value_and_grad(
    loss_fn: Callable[..., Any], *, has_aux: bool = False, process_group: Any = None
) -> Callable[..., tuple[Any, Any, torch.Tensor, LossScale]]:
    """Turn ``loss_fn(params, *args, **kwargs)`` into a mixed-precision gradient function.

    The returned function has the signature
    ``(params, *args, loss_scale, **kwargs) -> (loss, grads, grads_finite, new_loss_scale)``:
    it scales the loss by ``loss_scale``, differentiates it with respect to the floating
    leaves of ``params``, unscales the gradients, checks that they are finite and adjusts the
    loss scale. ``loss`` is the unscaled loss (``(loss, aux)`` with ``has_aux=True``);
    ``grads`` has the structure of ``params`` with each gradient in its parameter's dtype
    (non-floating leaves get ``None``). No host synchronisation.

    Under ``torch.compile`` and inside other ``torch.func`` transforms it differentiates with
    ``torch.func.grad``; in plain eager mode it uses ``torch.autograd.grad`` on detached copies
    of the parameters (the same gradients, without the functorch wrapper overhead) and
    unscales the fresh gradients with torch's fused AMP kernel.

    With ``process_group=`` a ``torch.distributed.ProcessGroup`` (e.g.
    ``torch.distributed.group.WORLD``), ``grads_finite`` is agreed across the group's ranks
    (:func:`polprec.all_finite_across`) before the loss scale is adjusted: every rank then
    gets the same flag and the same new loss scale. The gradients themselves are this
    rank's; averaging them across ranks is the caller's step. (``group.WORLD`` is ``None``
    until ``init_process_group`` has run: build the step after it.)

    Examples:
        >>> import torch
        >>> from polprec import DynamicLossScale
        >>> def loss_fn(params, x):
        ...     return (params["w"] * x).sum()
        >>> step = value_and_grad(loss_fn)
        >>> params = {"w": torch.ones(3)}
        >>> loss, grads, finite, scale = step(params, torch.arange(3.0), loss_scale=DynamicLossScale())
        >>> loss, grads["w"], finite
        (tensor(3.), tensor([0., 1., 2.]), tensor(True))
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be a bool, got {has_aux!r}")
    if process_group is not None:
        check_process_group(process_group, "process_group")

    def grad_fn(
        params: Any, *args: Any, loss_scale: LossScale, **kwargs: Any
    ) -> tuple[Any, Any, torch.Tensor, LossScale]:
        check_loss_scale(loss_scale)
        leaves, spec = _tree.tree_flatten(params)
        idx = [i for i, x in enumerate(leaves) if _tree.is_float_tensor(x)]
        diff = [leaves[i] for i in idx]

        def rebuild(new: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Any:
            full = list(leaves)
            for i, x in zip(idx, new, strict=True):
                full[i] = x
            return _tree.tree_unflatten(spec, full)

        eager = not _fused.tracing()
        if eager:
            inputs = [x.detach().requires_grad_() for x in diff]
            with torch.enable_grad():
                loss, aux = _split_loss(loss_fn(rebuild(inputs), *args, **kwargs), has_aux)
                scaled = scale_loss(loss, loss_scale)
                got = torch.autograd.grad(scaled, inputs, allow_unused=True)
            dgrads = [
                torch.zeros_like(x) if g is None else g for x, g in zip(inputs, got, strict=True)
            ]
            loss = loss.detach()
            aux = _tree.tree_map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, aux)
            owned = _fused.owned(dgrads)
        else:

            def scaled_loss(d: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
                loss, aux = _split_loss(loss_fn(rebuild(d), *args, **kwargs), has_aux)
                # torch.func's aux may hold only tensors: pass `aux` on only when there is one.
                return scale_loss(loss, loss_scale), ((loss, aux) if has_aux else (loss,))

            dgrads, out = torch.func.grad(scaled_loss, has_aux=True)(diff)
            loss, aux = out if has_aux else (out[0], None)
            owned = False
        if owned and dgrads and not isinstance(loss_scale, NoOpLossScale):
            # fresh eager gradients nobody else holds: unscaled in place, one fused pass
            inv = torch.reciprocal(loss_scale.loss_scale)
            finite = _fused.unscale_(dgrads, inv) == 0
        else:
            dgrads, finite = unscale_and_check(dgrads, loss_scale)
        if process_group is not None:
            finite = all_finite_across(finite, group=process_group)
        grads_full: list[Any] = [None] * len(leaves)
        for i, g in zip(idx, dgrads, strict=True):
            grads_full[i] = g
        grads = _tree.tree_unflatten(spec, grads_full)
        new_scale = loss_scale.adjust(finite)
        return ((loss, aux) if has_aux else loss), grads, finite, new_scale

    return grad_fn
