"""Applying loss scaling: which state a policy needs, ``scale_loss``, ``unscale_and_check``."""

from __future__ import annotations

from typing import Any

import torch

from polprec import _dtensor, _fused, _tree
from polprec._catalogue import HALF_DTYPES
from polprec.distributed import all_finite_across, check_process_group
from polprec.loss_scale import DynamicLossScale, LossScale, NoOpLossScale, check_loss_scale
from polprec.policy import PolicySpec, get_policy
from polprec.tree import all_finite

__all__ = ["default_loss_scale", "scale_loss", "unscale_and_check"]


def default_loss_scale(policy: PolicySpec = None) -> LossScale:
    """``DynamicLossScale()`` when the policy involves float16, else ``NoOpLossScale()``.

    Examples:
        >>> type(default_loss_scale("16-mixed")).__name__
        'DynamicLossScale'
        >>> type(default_loss_scale("bf16-mixed")).__name__
        'NoOpLossScale'
    """
    if get_policy(policy).uses_float16:
        return DynamicLossScale()
    return NoOpLossScale()


def scale_loss(loss: torch.Tensor, loss_scale: LossScale) -> torch.Tensor:
    """``loss * loss_scale``, computed in at least float32 (a float16 loss cannot overflow).

    Examples:
        >>> import torch
        >>> from polprec import StaticLossScale
        >>> scale_loss(torch.tensor(3.0, dtype=torch.float16), StaticLossScale(2.0**16))
        tensor(196608.)
    """
    check_loss_scale(loss_scale)
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
        raise TypeError(
            f"loss must be a floating-point tensor, got {loss!r} of type {type(loss).__name__}"
        )
    if isinstance(loss_scale, NoOpLossScale):
        return loss
    if loss.dtype in HALF_DTYPES:
        loss = loss.float()
    return loss * loss_scale.loss_scale


def unscale_and_check(
    grads: Any, loss_scale: LossScale, *, process_group: Any = None
) -> tuple[Any, torch.Tensor]:
    """Unscale gradients and check that they are finite.

    Every floating leaf is multiplied by the float32 reciprocal of the scale and returned in
    its own dtype (float16 gradients are fine). ``grads_finite`` is a 0-dim bool tensor,
    True when every element of the scaled input was finite. ``None`` leaves stay ``None``,
    non-floating leaves pass through. Pure: the input is never modified; no host
    synchronisation. In eager mode it runs torch's fused AMP kernel on fresh buffers; under
    ``vmap``/``grad``/``torch.compile`` it uses plain tensor ops. DTensor gradients are
    unscaled on their local shards and come back as DTensors laid out as they were;
    ``grads_finite`` is then a plain flag agreed over their meshes (the same on every rank).

    Args:
        grads: a pytree of (scaled) gradients.
        loss_scale: the loss-scale state the loss was scaled with.
        process_group: a ``torch.distributed.ProcessGroup`` (e.g.
            ``torch.distributed.group.WORLD``): ``grads_finite`` is then agreed across its
            ranks (:func:`polprec.all_finite_across`), so all ranks skip together. ``None``:
            this rank's verdict only.

    Returns:
        ``(grads, grads_finite)``.

    Examples:
        >>> import torch
        >>> from polprec import StaticLossScale
        >>> grads, finite = unscale_and_check({"w": torch.tensor([8.0, 4.0])}, StaticLossScale(4))
        >>> grads, finite
        ({'w': tensor([2., 1.])}, tensor(True))
    """
    if process_group is not None:  # distributed: validate before any work
        check_process_group(process_group, "process_group")
    check_loss_scale(loss_scale)
    leaves, spec = _tree.tree_flatten(grads)
    idx = [i for i, x in enumerate(leaves) if _tree.is_float_tensor(x)]
    floats = [leaves[i] for i in idx]
    # DTensor gradients: computed on their local shards, the verdict agreed over the meshes
    shards = _dtensor.Shards(floats) if _dtensor.any_dtensor(floats) else None
    if shards is not None:
        floats = shards.local
    if isinstance(loss_scale, NoOpLossScale):
        finite = all_finite(floats)
    elif not floats:
        finite = torch.tensor(True)
    else:
        inv = torch.reciprocal(loss_scale.loss_scale)
        if _fused.may_fuse(floats):
            floats = _fused.mul(floats, inv)  # fresh buffers, then checked in place
            one = _fused.one(floats[0].device)
            finite = _fused.unscale_(floats, one) == 0
        else:
            finite = all_finite(floats)
            floats = [_fused.scaled(x, inv) for x in floats]
        if shards is not None:
            floats = shards.rebuild(floats)
        out = list(leaves)
        for i, x in zip(idx, floats, strict=True):
            out[i] = x
        grads = _tree.tree_unflatten(spec, out)
    if shards is not None:
        finite = shards.agree(finite)
    if process_group is not None:
        finite = all_finite_across(finite, group=process_group)
    return grads, finite
