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
from polprec.optim._update import Buffers

__all__ = ["step"]


def _lined_up(
    opt: Any, params: dict[Any, Any], grads: dict[Any, Any], trees: list[Any]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]] | None:
    """Parameters, gradients and moments in the order of ``params``, if all fit the short way."""
    ps: list[torch.Tensor] = []
    gs: list[torch.Tensor] = []
    slots: list[list[torch.Tensor]] = [[] for _ in trees]
    dtype = device = None
    for key, p in params.items():
        g = grads.get(key)
        if not isinstance(p, torch.Tensor) or not isinstance(g, torch.Tensor):
            return None  # a None gradient, a leaf that is no tensor
        if dtype is None:
            dtype, device = p.dtype, p.device
            if (
                not dtype.is_floating_point
                or device.type not in _fused.OPTIM_DEVICES
                or not opt._mode(dtype).direct  # noqa: SLF001
            ):
                return None
        if (
            p.dtype != dtype
            or p.device != device
            or g.dtype != dtype
            or g.shape != p.shape
            or not g.is_contiguous()
        ):
            return None
        for column, tree in zip(slots, trees, strict=True):
            s = tree.get(key)
            if type(s) is not torch.Tensor or s.dtype != dtype or s.shape != p.shape:
                return None
            column.append(s)
        ps.append(p)
        gs.append(g)
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
    if finite is None:
        count, skips = state.step + 1, state.skips
        consecutive, found_inf = torch.zeros_like(state.consecutive_skips), None
    else:
        if finite.device != state.step.device:
            finite = finite.to(state.step.device)
        skipped = torch.logical_not(finite)
        count, skips = state.step + finite, state.skips + skipped
        consecutive = (state.consecutive_skips + 1) * skipped
        found_inf = skipped.to(torch.float32)
    if donate:
        work = [p if p.is_contiguous() else p.contiguous() for p in ps]
        work_slots = [[s if s.is_contiguous() else s.contiguous() for s in c] for c in slots]
    else:
        work = [p.clone(memory_format=torch.contiguous_format) for p in ps]
        work_slots = [[s.clone(memory_format=torch.contiguous_format) for s in c] for c in slots]
    opt._kernel(Buffers(work, gs, work_slots, count, lr, found_inf))  # noqa: SLF001
    keys = list(params)
    new_params = dict(zip(keys, work, strict=True))
    children = {n: dict(zip(keys, c, strict=True)) for n, c in zip(names, work_slots, strict=True)}
    new_state = state.replace(step=count, skips=skips, consecutive_skips=consecutive, **children)
    return new_params, new_state
