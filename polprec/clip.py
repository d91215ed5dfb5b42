"""Clipping gradients by their global norm: the pure ``clip_grad_norm_``."""

from __future__ import annotations

import math
from typing import Any

import torch

from polprec import _dtensor, _fused, _tree

__all__ = ["clip_by_global_norm"]


def _check_max_norm(max_norm: Any) -> float | torch.Tensor:
    if isinstance(max_norm, torch.Tensor):
        if max_norm.dim() != 0 or not max_norm.is_floating_point():
            raise ValueError(
                "max_norm must be a number >= 0 or a 0-dim floating tensor, got a tensor of "
                f"dtype {max_norm.dtype} and shape {tuple(max_norm.shape)}"
            )
        return max_norm
    if isinstance(max_norm, bool) or not isinstance(max_norm, int | float):
        raise TypeError(
            f"max_norm must be a number >= 0 or a 0-dim floating tensor, got {max_norm!r} of "
            f"type {type(max_norm).__name__}"
        )
    if not math.isfinite(max_norm) or max_norm < 0:
        raise ValueError(f"max_norm must be a finite number >= 0, got {max_norm!r}")
    return float(max_norm)


def _check_norm_type(norm_type: Any) -> float:
    if isinstance(norm_type, bool) or not isinstance(norm_type, int | float):
        raise TypeError(
            f"norm_type must be a number >= 1 or math.inf, got {norm_type!r} of type "
            f"{type(norm_type).__name__}"
        )
    if math.isnan(norm_type) or norm_type < 1:
        raise ValueError(f"norm_type must be a number >= 1 or math.inf, got {norm_type!r}")
    return float(norm_type)


def clip_by_global_norm(
    grads: Any, max_norm: float | torch.Tensor, *, norm_type: float = 2.0
) -> tuple[Any, torch.Tensor]:
    """Scale ``grads`` down so that their global norm is at most ``max_norm``.

    The pure counterpart of ``torch.nn.utils.clip_grad_norm_``, with its arithmetic: the
    global norm is the ``norm_type``-norm of the per-leaf norms, and every floating leaf is
    multiplied by ``min(1, max_norm / (total_norm + 1e-6))``. Unlike torch's, the norm is
    computed in float32 (float64 for float64 gradients) whatever the gradients' dtype, so
    float16 gradients whose squared sum overflows float16 still get a finite norm. ``None`` leaves stay ``None``,
    non-floating leaves pass through, the input is never modified and nothing is read back
    to the host (a non-finite norm gives non-finite gradients, which the finite flag of the
    same step already marks for skipping). Apply it to unscaled gradients, as GradScaler
    users do after ``scaler.unscale_(optimizer)``. In eager mode it runs torch's
    multi-tensor kernels; under ``vmap``, ``grad`` and ``torch.compile``, plain ops.

    DTensor gradients (sharded or replicated) count with their full tensors, as in
    ``clip_grad_norm_``: ``total_norm`` is the global norm, a plain tensor equal on every rank
    (one all-reduce per mesh and placement pattern), and the clipped gradients are DTensors
    laid out as the inputs.

    Args:
        grads: a pytree of gradients.
        max_norm: the largest allowed global norm (a number >= 0 or a 0-dim tensor).
        norm_type: the p of the p-norm (>= 1), or ``math.inf`` for the largest magnitude.

    Returns:
        ``(clipped_grads, total_norm)``, ``total_norm`` a 0-dim float32 tensor (float64 if
        any gradient is float64): the norm before clipping, as ``clip_grad_norm_`` returns it.

    Examples:
        >>> import torch
        >>> grads, norm = clip_by_global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1.0)
        >>> norm, grads["a"], grads["b"]
        (tensor(5.), tensor([0.6000]), tensor([0.8000]))
    """
    limit = _check_max_norm(max_norm)
    p = _check_norm_type(norm_type)
    leaves, spec = _tree.tree_flatten(grads)
    idx = [i for i, x in enumerate(leaves) if _tree.is_float_tensor(x)]
    floats = [leaves[i] for i in idx]
    if not floats:
        return grads, torch.zeros((), dtype=torch.float32)
    # DTensor gradients: norms and products on the local shards, the norm over the meshes
    shards = _dtensor.Shards(floats) if _dtensor.any_dtensor(floats) else None
    if shards is not None:
        floats = shards.local
    fused = _fused.may_fuse(floats)
    if fused:
        per_leaf = _fused.norms(floats, p)
    else:
        per_leaf = [
            torch.linalg.vector_norm(x, p, dtype=_fused.norm_dtype(x.dtype)) for x in floats
        ]
    if shards is not None:
        per_leaf = shards.global_norms(per_leaf, p)
    device = floats[0].device
    # float32 norms, or float64 ones for float64 leaves: stacked, a mix promotes to float64
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in per_leaf]), p)
    coef = torch.clamp(limit / (total + 1e-6), max=1.0)
    if fused and all(x.device == device for x in floats):
        clipped = _fused.mul(floats, coef)
    else:
        clipped = [_fused.scaled(x, coef.to(x.device)) for x in floats]
    if shards is not None:
        clipped = shards.rebuild(clipped)
    out = list(leaves)
    for i, x in zip(idx, clipped, strict=True):
        out[i] = x
    return _tree.tree_unflatten(spec, out), total
