"""The two ways one group of leaves is updated: torch's fused kernel, or plain tensor ops.

A group is the leaves of one optimizer on one device with one work dtype
(:class:`~polprec.optim._engine.Group`). Both ways compute every update in the leaf's work
dtype (:class:`~polprec.optim._precision.Mode`) and write it back the same way
(:func:`finish`), so they differ only by the order of float operations inside torch's
kernels.

* :func:`fused` (eager, plain tensors): the parameters and moments are copied (or, donated,
  reused) into work buffers that the fused kernel updates in place. ``found_inf`` makes the
  kernel leave them as they were: a skip costs no extra pass.
* :func:`plain` (under ``vmap``, ``grad``, ``torch.compile``, or without a fused kernel):
  the functional update rule per leaf, and ``torch.where`` on the finite flag, which
  inductor fuses into the same loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from polprec import _fused
from polprec._dtensor import global_indices
from polprec.optim._precision import Mode
from polprec.optim._rounding import kahan_split, leaf_key, random_bits, round_to

__all__ = ["Buffers", "Column", "Result", "fused", "plain"]


class Buffers(NamedTuple):
    """What a fused kernel updates in place (one device and dtype) and reads."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    slots: list[list[torch.Tensor]]  # one list per moment
    step: torch.Tensor  # the step count after this step
    lr: float | torch.Tensor
    found_inf: torch.Tensor | None


class Column(NamedTuple):
    """One group's leaves this step, position by position."""

    params: list[torch.Tensor]  # (a DTensor's local shard)
    grads: list[torch.Tensor]
    whole: list[torch.Tensor]  # the parameters as given (DTensors whole), for element indices
    modes: tuple[Mode, ...]
    slots: list[list[torch.Tensor]]  # one list per moment
    master: list[Any] | None  # float32 master copies (``None`` where the mode has none)
    compensation: list[Any] | None
    keys: tuple[int, ...]  # each leaf's path key, for stochastic rounding
    seed: torch.Tensor | None
    step: torch.Tensor  # the step count after this step (unchanged if it is skipped)


class Result(NamedTuple):
    """A group's new leaves, position by position."""

    params: list[torch.Tensor]
    slots: list[list[torch.Tensor]]
    master: list[torch.Tensor | None]
    compensation: list[torch.Tensor | None]


def _bits(col: Column, j: int) -> torch.Tensor | None:
    if not col.modes[j].stochastic or col.seed is None:
        return None
    return random_bits(global_indices(col.whole[j]), leaf_key(col.seed, col.step, col.keys[j]))


def _work_param(col: Column, j: int, *, copy: bool) -> torch.Tensor:
    """The value the update starts from, in the work dtype and contiguous (a fresh buffer with
    ``copy``, else the tensor itself where it is both already)."""
    mode, p = col.modes[j], col.params[j]
    if mode.master:
        w: torch.Tensor = col.master[j]  # type: ignore[index]
        return _buffer(w, mode.work, copy=copy)
    if mode.kahan:
        comp: torch.Tensor = col.compensation[j]  # type: ignore[index]
        w = _buffer(p, mode.work, copy=False)  # a fresh buffer: p is 16-bit, the work wider
        return w.add_(comp) if copy else w + comp
    return _buffer(p, mode.work, copy=copy)


def _buffer(t: torch.Tensor, dtype: torch.dtype, *, copy: bool) -> torch.Tensor:
    """``t`` in ``dtype``, contiguous: torch's fused kernels pair the elements of their
    tensors by their place in memory. A fresh copy with ``copy``; otherwise ``t`` itself where
    it is already both (``Tensor.to`` keeps a tensor of that dtype as it is, strides too)."""
    if t.dtype != dtype:
        return t.to(dtype, memory_format=torch.contiguous_format)
    return t.clone(memory_format=torch.contiguous_format) if copy else t.contiguous()


def finish(
    col: Column, j: int, work: torch.Tensor, finite: torch.Tensor | None, *, exact_skip: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(param, master, compensation)`` of leaf ``j`` from its updated work value.

    With ``finite`` given, a skipped step returns the old tensors' values bitwise. A
    ``work`` value left as it was (``exact_skip``: the fused kernels) rounds back exactly
    except from a master copy or with a compensation, which are therefore selected.
    """
    mode, p = col.modes[j], col.params[j]
    master = comp = None
    if mode.kahan:
        new, comp = kahan_split(work, p.dtype, _bits(col, j))
        if finite is not None:
            comp = torch.where(finite, comp, col.compensation[j])  # type: ignore[index]
    else:
        new = round_to(work, p.dtype, _bits(col, j))
        if mode.master:
            master = work
            if finite is not None and not exact_skip:
                master = torch.where(finite, work, col.master[j])  # type: ignore[index]
    if finite is not None and (not exact_skip or mode.master or mode.kahan):
        new = torch.where(finite, new, p)
    return new, master, comp


def _lr_on(lr: float | torch.Tensor, device: torch.device) -> float | torch.Tensor:
    """A tensor learning rate as the fused kernels take it: float32, on the parameters' device."""
    if isinstance(lr, torch.Tensor) and (lr.device != device or lr.dtype != torch.float32):
        return lr.to(device, torch.float32)
    return lr


def _on(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) and x.device != device else x


def _work_buffers(tensors: list[torch.Tensor], donate: bool) -> list[torch.Tensor]:
    """Buffers for a kernel to update in place: copies, or (donated) the tensors themselves."""
    if donate:
        return [t.contiguous() for t in tensors]  # (itself where it is contiguous)
    return _fused.copies(tensors)


def fused(
    col: Column,
    kernel: Callable[[Buffers], None],
    *,
    direct: bool,
    device: torch.device,
    work: torch.dtype,
    lr: float | torch.Tensor,
    found_inf: torch.Tensor | None,
    finite: torch.Tensor | None,
    donate: bool,
) -> Result:
    """One group's step on torch's fused kernel, on work buffers the caller does not hold."""
    n = len(col.params)
    if direct:  # the update runs on (copies of) the parameters and moments themselves
        params = _work_buffers(col.params, donate)
        slots = [_work_buffers(s, donate) for s in col.slots]
    else:
        params = [_work_param(col, j, copy=not donate) for j in range(n)]
        slots = [
            [_buffer(s[j], col.modes[j].work, copy=not donate) for j in range(n)] for s in col.slots
        ]
    grads = [_buffer(g, work, copy=False) for g in col.grads]
    kernel(Buffers(params, grads, slots, _on(col.step, device), _lr_on(lr, device), found_inf))
    if direct:
        return Result(params, slots, [None] * n, [None] * n)
    out = Result([], _state_dtypes(col, slots), [], [])
    flag = _on(finite, device)
    for j in range(n):
        p, m, c = finish(col, j, params[j], flag, exact_skip=True)
        out.params.append(p)
        out.master.append(m)
        out.compensation.append(c)
    if donate:  # what came out in another dtype goes into the buffer it replaces
        out = Result(
            _into(out.params, col.params),
            [_into(new, old) for new, old in zip(out.slots, col.slots, strict=True)],
            out.master,
            out.compensation
            if col.compensation is None
            else _into(out.compensation, col.compensation),
        )
    return out


def _into(new: list[Any], old: list[Any]) -> list[Any]:
    """``new`` written into ``old``'s buffers where it is a fresh tensor (a donated step on
    16-bit parameters: the update ran in float32 and was rounded into a new tensor)."""
    out = []
    for x, y in zip(new, old, strict=True):
        if x is not None and y is not None and x is not y:
            y.copy_(x)
            x = y
        out.append(x)
    return out


def plain(
    col: Column,
    rule: Callable[..., tuple[torch.Tensor, list[torch.Tensor]]],
    scalars: Any,
    *,
    finite: torch.Tensor | None,
) -> Result:
    """One group's step in plain tensor ops, leaf by leaf (vmappable, differentiable,
    compilable)."""
    out = Result([], [[] for _ in col.slots], [], [])
    for j, mode in enumerate(col.modes):
        w = _work_param(col, j, copy=False)
        slots = [_buffer(s[j], mode.work, copy=False) for s in col.slots]
        w, slots = rule(w, col.grads[j].to(mode.work), slots, scalars)  # (itself if it is)
        p, m, c = finish(col, j, w, finite, exact_skip=False)
        out.params.append(p)
        out.master.append(m)
        out.compensation.append(c)
        for column, new in zip(out.slots, slots, strict=True):
            column.append(new)
    new_slots = _state_dtypes(col, out.slots)
    if finite is not None:
        new_slots = [
            [torch.where(finite, new, old) for new, old in zip(s, olds, strict=True)]
            for s, olds in zip(new_slots, col.slots, strict=True)
        ]
    return out._replace(slots=new_slots)


def _state_dtypes(col: Column, slots: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Moments back in the state dtype, where the update ran in a wider one (``Tensor.to``
    keeps the others as they are)."""
    return [[x.to(m.state) for x, m in zip(s, col.modes, strict=True)] for s in slots]
