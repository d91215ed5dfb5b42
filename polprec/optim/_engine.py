"""How a step runs on a tree, for every optimizer and for :func:`~polprec.optim.partition`.

A step lines the leaves up (:class:`~polprec.optim._plan.Flat`), takes the plan for their
structure (:func:`~polprec.optim._plan.plan_for`: the groups, worked out once), checks the
state against it, agrees on the skip once, and runs each group the fused or the plain way
(:mod:`polprec.optim._update`), chosen by :func:`polprec._fused.may_fuse`, the one decision.
Groups of DTensors run on their local shards and are wrapped back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from polprec import _dtensor, _fused, _tree
from polprec._checks import check_grads_finite, check_nonnegative
from polprec.optim._plan import Flat, Group, Labels, Plan, plan_for
from polprec.optim._precision import Mode
from polprec.optim._update import Column, Result, fused, plain

__all__ = ["check_lr", "init_state", "learning_rate", "step", "zero_count"]


# --- the state a step reads ----------------------------------------------------------------


class Held(NamedTuple):
    """One optimizer's state, lined up with the params' leaves."""

    slots: list[list[Any]]  # one list per moment the settings use
    master: list[Any] | None
    compensation: list[Any] | None


def _held(opt: Any, state: Any, flat: Flat) -> Held:
    slots = []
    for name in opt.slots():
        tree = getattr(state, name)
        if tree is None:
            raise ValueError(
                f"state.{name} is None: the state was made by an optimizer with other settings "
                f"than {opt!r}; make one with this optimizer's init(params)"
            )
        slots.append(flat.align(tree, f"state.{name}"))
    master, comp = (
        None if tree is None else flat.align(tree, f"state.{name}")
        for name, tree in (("master", state.master), ("compensation", state.compensation))
    )
    return Held(slots, master, comp)


def _column(
    group: Group, flat: Flat, held: Held, state: Any, step: torch.Tensor, opt: Any
) -> Column:
    """The group's leaves this step, after checking that the state has what they need."""
    idx = group.idx
    slots = [[s[i] for i in idx] for s in held.slots]
    master = None if held.master is None else [held.master[i] for i in idx]
    comp = None if held.compensation is None else [held.compensation[i] for i in idx]
    whole = [flat.leaves[i] for i in idx]
    grads = [flat.grads[i] for i in idx]
    params = whole
    if group.sharded:  # the update is elementwise: each rank updates its own shards
        local = _dtensor.local_shard
        params, grads = [local(x) for x in whole], [local(x) for x in grads]
        slots = [[local(x) if isinstance(x, torch.Tensor) else x for x in s] for s in slots]
        master, comp = (
            None if kept is None else [local(x) if isinstance(x, torch.Tensor) else x for x in kept]
            for kept in (master, comp)
        )
    shapes = list(group.shapes)
    fine = all(
        all(isinstance(x, torch.Tensor) for x in s) and [x.shape for x in s] == shapes
        for s in slots
    )
    if not fine or not group.direct:
        _check_state(group, flat, opt, slots, master, comp)
    seed = state.seed
    if seed is None and any(m.stochastic for m in group.modes):
        raise ValueError(
            "state.seed is None but rounding='stochastic' needs it: make the state with "
            "this optimizer's init(params)"
        )
    return Column(
        params=params,
        grads=grads,
        whole=whole,
        modes=group.modes,
        slots=slots,
        master=master,
        compensation=comp,
        keys=group.keys,
        seed=seed,
        step=step,
    )


def _check_state(
    group: Group, flat: Flat, opt: Any, slots: list[list[Any]], master: Any, comp: Any
) -> None:
    """Every updated leaf has the state its mode needs, in its shape."""
    names = opt.slots()
    for j, (mode, shape) in enumerate(zip(group.modes, group.shapes, strict=True)):
        need = [(n, s[j]) for n, s in zip(names, slots, strict=True)]
        if mode.master:
            need.append(("master", None if master is None else master[j]))
        if mode.kahan:
            need.append(("compensation", None if comp is None else comp[j]))
        for name, x in need:
            if not isinstance(x, torch.Tensor) or x.shape != shape:
                got = "nothing" if x is None else f"shape {tuple(getattr(x, 'shape', ()))}"
                raise ValueError(
                    f"state.{name} has {got} for parameter {flat.name(group.idx[j])} ({mode.param}, "
                    f"shape {tuple(shape)}): the state was made for other parameters or "
                    f"settings; make one with {type(opt).__name__}.init(params)"
                )


# --- the step ------------------------------------------------------------------------------


def check_lr(name: str, lr: Any) -> float | torch.Tensor:
    """A learning rate (or factor) given to ``step``: a number >= 0 or a 0-dim floating tensor.

    While ``torch.compile`` traces, a Python number is taken as it is: one that changes
    between calls is symbolic, its value unknown (eager mode checks it).
    """
    if isinstance(lr, torch.Tensor):
        if lr.dim() != 0 or not lr.is_floating_point():
            raise TypeError(
                f"{name} must be a number or a 0-dim floating tensor, got a tensor of dtype "
                f"{lr.dtype} and shape {tuple(lr.shape)}"
            )
        return lr
    if torch.compiler.is_compiling() and isinstance(lr, int | float) and not isinstance(lr, bool):
        return lr  # its value may be symbolic, unknown while tracing: checked in eager mode
    return check_nonnegative(name, lr)


def learning_rate(lr: float | torch.Tensor, lr_scale: Any) -> float | torch.Tensor:
    """``lr`` times ``lr_scale`` (``None``: 1)."""
    if lr_scale is None:
        return lr
    return lr * check_lr("lr_scale", lr_scale)


def zero_count(floats: Sequence[Any]) -> torch.Tensor:
    """A 0-dim int32 zero on the first parameter's device (CPU if there is none)."""
    first = next((p for p in floats if p is not None), None)
    device = torch.device("cpu") if first is None else first.device
    return torch.zeros((), dtype=torch.int32, device=device)


def init_state(
    opt: Any, spec: Any, floats: list[torch.Tensor | None], count: torch.Tensor, seed: int
) -> Any:
    """``opt``'s fresh state for the leaves ``floats`` (``None``: no state for that leaf)."""
    modes = [None if p is None else opt.mode(p.dtype) for p in floats]

    def tree(make: Any, wanted: Any = None) -> Any:
        built = [
            None if p is None or m is None or (wanted and not wanted(m)) else make(p, m)
            for p, m in zip(floats, modes, strict=True)
        ]
        if wanted is not None and all(x is None for x in built):
            return None
        return _tree.tree_unflatten(spec, built)

    def zeros(p: torch.Tensor, m: Mode) -> torch.Tensor:
        return torch.zeros_like(p, dtype=m.state, memory_format=torch.contiguous_format)

    used = opt.slots()
    children: dict[str, Any] = {
        name: tree(zeros) if name in used else None for name in opt.slot_fields
    }
    stochastic = any(m is not None and m.stochastic for m in modes)
    return opt.state_type(
        step=count,
        skips=count.clone(),
        consecutive_skips=count.clone(),
        master=tree(
            lambda p, m: p.detach().to(torch.float32, memory_format=torch.contiguous_format),
            lambda m: m.master,
        ),
        compensation=tree(
            lambda p, m: torch.zeros_like(p, memory_format=torch.contiguous_format),
            lambda m: m.kahan,
        ),
        seed=torch.tensor(seed, device=count.device) if stochastic else None,  # int64
        **children,
    )


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


def _finite(grads_finite: Any, flat: Flat, plan: Plan) -> torch.Tensor | None:
    """The step's verdict: the flag given, ``None`` for ``True`` (no check), or the gradients'
    own (``None`` given): one multi-tensor max-norm pass in eager mode, plain ops elsewhere."""
    if grads_finite is True:
        return None
    if grads_finite is not None:
        return check_grads_finite(grads_finite)
    grads = [flat.grads[i] for i in plan.active]
    if not grads:
        return None
    if plan.sharded:  # each rank checks its shards, then every rank takes the same verdict
        shards = _dtensor.Shards(grads)
        return shards.agree(_fused.all_finite(shards.local))
    return _fused.all_finite(grads)


def step(
    plans: dict[Any, Plan],
    members: Sequence[Any],
    labels: Labels,
    params: Any,
    grads: Any,
    states: Sequence[Any],
    counted: Any,
    grads_finite: Any,
    rates: Sequence[float | torch.Tensor],
    donate: bool,
) -> tuple[Any, list[Any], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One step of ``members`` (optimizers) over ``params``.

    Args:
        plans: the plans kept by the optimizer (or the partition) stepping.
        members: the optimizers; ``states[m]`` is ``members[m]``'s state.
        labels: which member updates each leaf (see :data:`Labels`).
        counted: the state whose counters count this step.
        rates: each member's learning rate for this step.

    Returns:
        ``(new_params, new_states, (step, skips, consecutive_skips))``.
    """
    if donate and torch.is_grad_enabled() and not _fused.tracing():
        # a donated step updates its inputs in place: nothing can differentiate through it, so
        # parameters that require grad (a module's own, as torch.optim steps them) are
        # updated under no_grad, as torch.optim does, instead of copied by autograd
        with torch.no_grad():
            return step(
                plans, members, labels, params, grads, states, counted, grads_finite, rates, True
            )
    _tree.check_tree(params, "params")
    _tree.check_tree(grads, "grads")
    flat = Flat(params, grads)
    plan = plan_for(plans, flat, members, labels)
    finite = _finite(grads_finite, flat, plan)
    count, skips, consecutive, skipped = counters(counted, finite)
    found_inf = None if skipped is None else skipped.to(torch.float32)
    extras = [x for x in (*rates, finite) if isinstance(x, torch.Tensor)]
    held = {m: _held(members[m], states[m], flat) for m in plan.members}
    scalars: dict[int, Any] = {}
    new_leaves = list(flat.leaves)
    results: dict[int, list[tuple[Group, Result]]] = {m: [] for m in plan.members}
    for group in plan.groups:
        m, opt = group.member, members[group.member]
        col = _column(group, flat, held[m], states[m], count, opt)
        if group.fused and _fused.may_fuse([*col.params, *col.grads, *extras]):
            res = fused(
                col,
                opt.kernel,
                direct=group.direct,
                device=group.device,
                work=group.work,
                lr=rates[m],
                found_inf=None if found_inf is None else found_inf.to(group.device),
                finite=finite,
                donate=donate,
            )
        else:
            if m not in scalars:
                # the count this step would reach (> 0 even where it is skipped: no 1/0 in a
                # branch torch.where discards, which would poison a gradient through the step)
                after = count if finite is None else counted.step + 1
                scalars[m] = opt.scalars(after, rates[m])
            res = plain(col, opt.rule, scalars[m], finite=finite)
        if group.sharded:
            res = _rewrap(res, col, held[m], group)
        for i, new in zip(group.idx, res.params, strict=True):
            new_leaves[i] = new
        results[m].append((group, res))
    counts = {"step": count, "skips": skips, "consecutive_skips": consecutive}
    new_states = [
        _new_state(members[m], s, flat, held[m], results[m], counts)
        if m in results
        else s.replace(**counts)
        for m, s in enumerate(states)
    ]
    return flat.rebuild(new_leaves), new_states, (count, skips, consecutive)


def _rewrap(res: Result, col: Column, held: Held, group: Group) -> Result:
    """A sharded group's new local shards as DTensors laid out as the tensors they replace.

    A shard updated in place (donated) gives back the tensor it came from, so that a module's
    own parameters (FSDP2's) stay the objects the module holds.
    """
    idx = group.idx

    def wrap(new: torch.Tensor | None, local: Any, whole: Any) -> Any:
        if new is None or new is local:  # nothing new, or a shard updated in place
            return whole
        return _dtensor.wrap_like(new, whole)

    def column(new: list[Any], local: list[Any] | None, kept: list[Any] | None) -> list[Any]:
        if kept is None:  # (and so is the group's ``local``)
            return new
        return [wrap(t, lo, kept[i]) for t, lo, i in zip(new, local or (), idx, strict=True)]

    return Result(
        params=[wrap(t, lo, x) for t, lo, x in zip(res.params, col.params, col.whole, strict=True)],
        slots=[
            column(new, local, s)
            for new, local, s in zip(res.slots, col.slots, held.slots, strict=True)
        ],
        master=column(res.master, col.master, held.master),
        compensation=column(res.compensation, col.compensation, held.compensation),
    )


def _new_state(
    opt: Any,
    state: Any,
    flat: Flat,
    held: Held,
    done: list[tuple[Group, Result]],
    counts: dict[str, torch.Tensor],
) -> Any:
    slots = [list(s) for s in held.slots]
    master = None if held.master is None else list(held.master)
    comp = None if held.compensation is None else list(held.compensation)
    for group, res in done:
        for column, new in zip(slots, res.slots, strict=True):
            for i, x in zip(group.idx, new, strict=True):
                column[i] = x
        for kept, fresh in ((master, res.master), (comp, res.compensation)):
            if kept is not None:
                for i, y in zip(group.idx, fresh, strict=True):
                    if y is not None:
                        kept[i] = y
    children: dict[str, Any] = {
        name: flat.rebuild(s) for name, s in zip(opt.slots(), slots, strict=True)
    }
    children.update(counts)
    if master is not None:
        children["master"] = flat.rebuild(master)
    if comp is not None:
        children["compensation"] = flat.rebuild(comp)
    return state.replace(**children)
