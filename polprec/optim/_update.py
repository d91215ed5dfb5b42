"""The two ways a step runs: torch's fused kernels on owned buffers, or plain tensor ops.

Both compute every update in the leaf's work dtype (:class:`~polprec.optim._modes.Mode`)
and write it back the same way (:func:`finish`), so they differ only by the order of float
operations inside torch's kernels.

* :func:`fused` (eager, plain tensors): the parameters and moments are copied (or, donated,
  reused) into work buffers that one fused kernel per device and dtype updates in place.
  ``found_inf`` makes the kernel leave them as they were: a skip costs no extra pass.
* :func:`plain` (under ``vmap``, ``grad``, ``torch.compile``, or without a fused kernel):
  a functional update rule per leaf, and ``torch.where`` on the finite flag, which inductor
  fuses into the same loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from polprec import _fused
from polprec.optim._modes import Mode
from polprec.optim._rounding import kahan_split, leaf_key, random_bits, round_to

__all__ = [
    "Buffers",
    "Inputs",
    "Outputs",
    "counters",
    "finish",
    "fused",
    "merge",
    "plain",
    "replace",
    "work_buffers",
]


class Buffers(NamedTuple):
    """What a fused kernel updates in place (one device and dtype) and reads."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    slots: list[list[torch.Tensor]]  # one list per moment
    step: torch.Tensor  # the step count after this step
    lr: float | torch.Tensor
    found_inf: torch.Tensor | None


Kernel = Callable[[Buffers], None]
# rule(param, grad, slots, scalars) -> (param, slots): functional, one leaf.
Rule = Callable[
    [torch.Tensor, torch.Tensor, list[torch.Tensor], Any], tuple[torch.Tensor, list[torch.Tensor]]
]


class Inputs(NamedTuple):
    """The leaves of one step, lined up with the parameters' leaves."""

    params: list[Any]
    active: list[int]  # the leaves that have a gradient
    grads: list[torch.Tensor]  # aligned with ``active``
    modes: list[Mode]  # aligned with ``active``
    slots: list[list[Any]]  # one leaf list per moment
    master: list[Any] | None
    compensation: list[Any] | None
    seed: torch.Tensor | None
    step: torch.Tensor  # the step count after this step (unchanged if it is skipped)


class Outputs(NamedTuple):
    """New leaves, at the positions of :attr:`Inputs.active`."""

    params: list[torch.Tensor]
    slots: list[list[torch.Tensor]]
    master: list[torch.Tensor | None]
    compensation: list[torch.Tensor | None]


def _bits(inp: Inputs, k: int, like: torch.Tensor) -> torch.Tensor | None:
    if not inp.modes[k].stochastic or inp.seed is None:
        return None
    return random_bits(like, leaf_key(inp.seed, inp.step, inp.active[k]))


def _work_param(inp: Inputs, k: int, *, copy: bool) -> torch.Tensor:
    """The value the update starts from, in the work dtype (a fresh buffer with ``copy``)."""
    i, mode = inp.active[k], inp.modes[k]
    p: torch.Tensor = inp.params[i]
    if mode.master:
        w: torch.Tensor = inp.master[i]  # type: ignore[index]
        return w.clone(memory_format=torch.contiguous_format) if copy else w
    if mode.kahan:
        comp: torch.Tensor = inp.compensation[i]  # type: ignore[index]
        return p.to(mode.work).add_(comp) if copy else p.to(mode.work) + comp
    if p.dtype != mode.work:
        return p.to(mode.work, memory_format=torch.contiguous_format)
    return p.clone(memory_format=torch.contiguous_format) if copy else p


def _work_slot(s: torch.Tensor, mode: Mode, *, copy: bool) -> torch.Tensor:
    if s.dtype != mode.work:
        return s.to(mode.work, memory_format=torch.contiguous_format)
    return s.clone(memory_format=torch.contiguous_format) if copy else s


def finish(
    inp: Inputs, k: int, work: torch.Tensor, finite: torch.Tensor | None, *, exact_skip: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(param, master, compensation)`` of leaf ``k`` from its updated work value.

    With ``finite`` given, a skipped step returns the old tensors' values bitwise. A
    ``work`` value left as it was (``exact_skip``: the fused kernels) rounds back exactly
    except from a master copy or with a compensation, which are therefore selected.
    """
    i, mode = inp.active[k], inp.modes[k]
    p = inp.params[i]
    master = comp = None
    if mode.kahan:
        new, comp = kahan_split(work, p.dtype, _bits(inp, k, work))
        if finite is not None:
            comp = torch.where(finite, comp, inp.compensation[i])  # type: ignore[index]
    else:
        new = round_to(work, p.dtype, _bits(inp, k, work))
        if mode.master:
            master = work
            if finite is not None and not exact_skip:
                master = torch.where(finite, work, inp.master[i])  # type: ignore[index]
    select = finite is not None and (not exact_skip or mode.master or mode.kahan)
    if select:
        new = torch.where(finite, new, p)  # type: ignore[arg-type]
    return new, master, comp


def _group(inp: Inputs) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Positions in ``active``, grouped by device and work dtype (one kernel launch each)."""
    first = inp.params[inp.active[0]]
    work = inp.modes[0].work
    if all(m.work == work for m in inp.modes) and all(
        inp.params[i].device == first.device for i in inp.active
    ):
        return {(first.device, work): list(range(len(inp.active)))}
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for k, i in enumerate(inp.active):
        groups.setdefault((inp.params[i].device, inp.modes[k].work), []).append(k)
    return groups


def _lr_on(lr: float | torch.Tensor, device: torch.device) -> float | torch.Tensor:
    """A tensor learning rate as the fused kernels take it: float32, on the parameters' device."""
    if isinstance(lr, torch.Tensor) and (lr.device != device or lr.dtype != torch.float32):
        return lr.to(device, torch.float32)
    return lr


def _on(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) and x.device != device else x


def _contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` itself when it is contiguous and of ``dtype``, else a converted copy."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return t.to(dtype, memory_format=torch.contiguous_format)


def work_buffers(tensors: list[torch.Tensor], donate: bool) -> list[torch.Tensor]:
    """Buffers for a kernel to update in place: copies, or (donated) the tensors themselves."""
    if donate:
        return [t if t.is_contiguous() else t.contiguous() for t in tensors]
    return _fused.copies(tensors)


def fused(
    inp: Inputs,
    kernel: Kernel,
    *,
    lr: float | torch.Tensor,
    found_inf: torch.Tensor | None,
    finite: torch.Tensor | None,
    donate: bool,
) -> Outputs:
    """One step on torch's fused kernels, on work buffers the caller does not hold."""
    n = len(inp.active)
    groups = _group(inp)
    if len(groups) == 1 and all(m.direct for m in inp.modes):  # the common case, in short
        ((device, dtype),) = groups
        params = work_buffers([inp.params[i] for i in inp.active], donate)
        slots = [work_buffers([s[i] for i in inp.active], donate) for s in inp.slots]
        grads = [_contiguous(g, dtype) for g in inp.grads]
        kernel(Buffers(params, grads, slots, inp.step, _lr_on(lr, device), found_inf))
        return Outputs(params, slots, [None] * n, [None] * n)
    out = Outputs([None] * n, [[None] * n for _ in inp.slots], [None] * n, [None] * n)  # type: ignore[list-item]
    for (device, dtype), ks in groups.items():
        idx = [inp.active[k] for k in ks]
        direct = all(inp.modes[k].direct for k in ks)
        if direct:  # the update runs on (copies of) the parameters and moments themselves
            params = work_buffers([inp.params[i] for i in idx], donate)
            slots = [work_buffers([s[i] for i in idx], donate) for s in inp.slots]
        else:
            params = [_work_param(inp, k, copy=not donate) for k in ks]
            slots = [
                [_work_slot(s[inp.active[k]], inp.modes[k], copy=not donate) for k in ks]
                for s in inp.slots
            ]
        grads = [_contiguous(inp.grads[k], dtype) for k in ks]
        on = _on(inp.step, device), _lr_on(lr, device), _on(found_inf, device)
        kernel(Buffers(params, grads, slots, *on))
        for slot, new in zip(out.slots, slots, strict=True):
            for j, k in enumerate(ks):
                slot[k] = new[j]
        if direct:
            for j, k in enumerate(ks):
                out.params[k] = params[j]
            continue
        flag = _on(finite, device)
        for j, k in enumerate(ks):
            out.params[k], out.master[k], out.compensation[k] = finish(
                inp, k, params[j], flag, exact_skip=True
            )
    _restore_slot_dtypes(inp, out)
    return out


def plain(inp: Inputs, rule: Rule, scalars: Any, *, finite: torch.Tensor | None) -> Outputs:
    """One step in plain tensor ops, leaf by leaf (vmappable, differentiable, compilable)."""
    n = len(inp.active)
    out = Outputs([None] * n, [[None] * n for _ in inp.slots], [None] * n, [None] * n)  # type: ignore[list-item]
    for k, i in enumerate(inp.active):
        mode = inp.modes[k]
        work = _work_param(inp, k, copy=False)
        slots = [_work_slot(s[i], mode, copy=False) for s in inp.slots]
        grad = inp.grads[k]
        grad = grad if grad.dtype == mode.work else grad.to(mode.work)
        work, slots = rule(work, grad, slots, scalars)
        out.params[k], out.master[k], out.compensation[k] = finish(
            inp, k, work, finite, exact_skip=False
        )
        for slot, new in zip(out.slots, slots, strict=True):
            slot[k] = new
    _restore_slot_dtypes(inp, out)
    if finite is not None:
        for slot, old in zip(out.slots, inp.slots, strict=True):
            for k, i in enumerate(inp.active):
                slot[k] = torch.where(finite, slot[k], old[i])
    return out


def _restore_slot_dtypes(inp: Inputs, out: Outputs) -> None:
    """Moments back in the state dtype, where the update ran in a wider one."""
    if all(m.state == m.work for m in inp.modes):
        return
    for slot in out.slots:
        for k, mode in enumerate(inp.modes):
            if mode.state != mode.work:
                slot[k] = slot[k].to(mode.state)


def replace(leaves: Sequence[Any], active: list[int], new: Sequence[Any]) -> list[Any]:
    """``leaves`` with the ``active`` positions replaced by ``new``."""
    out = list(leaves)
    for i, x in zip(active, new, strict=True):
        out[i] = x
    return out


def merge(old: list[Any], active: list[int], new: list[Any]) -> list[Any]:
    """``old`` with the ``active`` positions replaced where ``new`` has a tensor."""
    out = list(old)
    for i, x in zip(active, new, strict=True):
        if x is not None:
            out[i] = x
    return out


def counters(
    state: Any, finite: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(step, skips, consecutive_skips, not_finite)`` after this step."""
    if finite is None:
        return state.step + 1, state.skips, torch.zeros_like(state.consecutive_skips), None
    if finite.device != state.step.device:
        finite = finite.to(state.step.device)
    skipped = torch.logical_not(finite)
    return (
        state.step + finite,
        state.skips + skipped,
        (state.consecutive_skips + 1) * skipped,
        skipped,
    )
