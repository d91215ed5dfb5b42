"""The common eager step in short: a dict of plain tensors in one dtype, on one device.

That is what ``dict(model.named_parameters())`` gives a float32 or "true" 16-bit model, and
every optimizer setting that needs no master copy, compensation or stochastic rounding. The
step is the general one (:meth:`polprec.optim.Optimizer.step`) with its generality skipped:
no tree walks, no grouping, no per-leaf modes; one torch fused kernel on copies (or, donated,
the inputs' own buffers). Whatever does not fit returns ``None`` and takes the general path,
which gives the same bits (tests/test_optim_fast.py compares them).
"""

from __future__ import annotations

from typing import Any

import torch

from polprec import _fused
from polprec.optim._update import Buffers, counters, work_buffers

__all__ = ["step"]


def _lined_up(
    opt: Any, params: dict[Any, Any], grads: dict[Any, Any], trees: list[Any]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]] | None:
    """Parameters, gradients and moments in the order of ``params``, if all fit the short way.

    Checked list by list rather than leaf by leaf: for a model with many small tensors the
    checks would otherwise cost more than the update.
    """
    ps = list(params.values())
    try:
        gs = [grads[k] for k in params]
        slots = [[tree[k] for k in params] for tree in trees]
    except KeyError:
        return None
    every = ps + gs + [s for column in slots for s in column]
    if not all(isinstance(t, torch.Tensor) for t in every):
        return None  # a None gradient, a leaf that is no tensor
    first = ps[0]
    dtype, device = first.dtype, first.device
    if (
        not dtype.is_floating_point
        or device.type not in _fused.OPTIM_DEVICES
        or not opt._mode(dtype).direct  # noqa: SLF001
        or any(t.dtype is not dtype for t in every)
        or any(t.device != device for t in every)
        or not all(g.is_contiguous() for g in gs)
    ):
        return None
    shapes = [p.shape for p in ps]
    if any([t.shape for t in column] != shapes for column in (gs, *slots)):
        return None
    return ps, gs, slots


def step(
    opt: Any,
    params: Any,
    grads: Any,
    state: Any,
    finite: torch.Tensor | None,
    lr: float | torch.Tensor,
    donate: bool,
) -> tuple[dict[Any, Any], Any] | None:
    """``opt.step(...)``'s result the short way, or ``None`` where it does not apply."""
    if type(params) is not dict or type(grads) is not dict or len(grads) != len(params):
        return None
    if _fused.tracing():  # the plain path; its checks need not be traced twice
        return None
    if not params or state.master is not None or state.compensation is not None:
        return None
    if not opt._fusable():  # noqa: SLF001
        return None
    names = opt._slots()  # noqa: SLF001
    trees = [getattr(state, name) for name in names]
    if any(type(t) is not dict or len(t) != len(params) for t in trees):
        return None
    lined = _lined_up(opt, params, grads, trees)
    if lined is None:
        return None
    ps, gs, slots = lined
    extras = [x for x in (lr, finite) if isinstance(x, torch.Tensor)]
    if not _fused.may_fuse(ps + gs + extras):  # the one decision, as on the general path
        return None
    device = ps[0].device
    if isinstance(lr, torch.Tensor) and (lr.device != device or lr.dtype != torch.float32):
        lr = lr.to(device, torch.float32)
    count, skips, consecutive, skipped = counters(state, finite)
    found_inf = None if skipped is None else skipped.to(torch.float32)
    work = work_buffers(ps, donate)
    work_slots = [work_buffers(c, donate) for c in slots]
    opt._kernel(Buffers(work, gs, work_slots, count, lr, found_inf))  # noqa: SLF001
    keys = list(params)
    new_params = dict(zip(keys, work, strict=True))
    children = {n: dict(zip(keys, c, strict=True)) for n, c in zip(names, work_slots, strict=True)}
    new_state = state.replace(step=count, skips=skips, consecutive_skips=consecutive, **children)
    return new_params, new_state
