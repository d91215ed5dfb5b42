"""Lining up params, grads and state trees leaf by leaf, with errors that name the paths."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from polprec import _tree
from polprec._checks import check_number

__all__ = ["Leaves", "align", "check_lr", "check_state", "leaves", "path_of", "state_leaves"]


class Leaves(NamedTuple):
    """The leaves of one step: which ones are updated, and their gradients."""

    spec: _tree.TreeSpec
    params: list[Any]  # every leaf of params
    active: list[int]  # positions of the floating leaves that have a gradient
    grads: list[torch.Tensor]  # their gradients, aligned with ``active``


def path_of(tree: Any, index: int) -> str:
    """The readable path of the ``index``-th leaf of ``tree`` (for error messages only)."""
    paths, _, _ = _tree.tree_flatten_with_path(tree)
    return _tree.path_str(paths[index]) if index < len(paths) else f"leaf {index}"


def _mismatch(params: Any, other: Any, what: str, hint: str) -> ValueError:
    """A ValueError naming the paths where ``other``'s structure departs from ``params``'."""
    p_paths = {_tree.path_str(p) for p in _tree.tree_flatten_with_path(params)[0]}
    o_paths = {_tree.path_str(p) for p in _tree.tree_flatten_with_path(other)[0]}
    missing, extra = sorted(p_paths - o_paths), sorted(o_paths - p_paths)
    return ValueError(
        f"{what} must have the structure of params ({hint}); missing in {what}: "
        f"{missing or 'none'}, not in params: {extra or 'none'}; params: "
        f"{_tree.tree_structure(params)}"
    )


def leaves(params: Any, grads: Any) -> Leaves:
    """Flatten ``params`` and line ``grads`` up with it; check each gradient."""
    p_leaves, spec = _tree.tree_flatten(params)
    try:
        g_leaves = _tree.flatten_up_to(spec, grads)
    except (ValueError, TypeError):
        raise _mismatch(params, grads, "grads", "None where a leaf has no gradient") from None
    active: list[int] = []
    active_grads: list[torch.Tensor] = []
    for i, (p, g) in enumerate(zip(p_leaves, g_leaves, strict=True)):
        if g is None:
            continue
        if (  # the common case, checked cheaply
            type(g) is torch.Tensor
            and isinstance(p, torch.Tensor)
            and p.is_floating_point()
            and g.is_floating_point()
            and g.shape == p.shape
        ):
            active.append(i)
            active_grads.append(g)
            continue
        if isinstance(p, torch.Tensor) and p.is_complex():
            raise TypeError(
                f"parameter {path_of(params, i)} is complex ({p.dtype}); polprec.optim "
                "updates real floating-point parameters (pass torch.view_as_real(p))"
            )
        if not _tree.is_float_tensor(p):
            if isinstance(g, torch.Tensor):
                raise ValueError(
                    f"grads has a tensor at {path_of(params, i)}, where params has a "
                    f"non-floating {type(p).__name__} leaf; its gradient must be None"
                )
            continue
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            got = f"dtype {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
            raise _grad_error(params, i, f"must be a floating tensor or None, got {got}")
        if g.shape != p.shape:
            raise _grad_error(
                params, i, f"has shape {tuple(g.shape)}, its parameter {tuple(p.shape)}"
            )
        active.append(i)
        active_grads.append(g)
    return Leaves(spec, p_leaves, active, active_grads)


def _grad_error(params: Any, i: int, what: str) -> ValueError | TypeError:
    message = f"the gradient of {path_of(params, i)} {what}"
    return TypeError(message) if "must be" in what else ValueError(message)


def align(spec: _tree.TreeSpec, tree: Any, params: Any, name: str) -> list[Any]:
    """The leaves of a state tree ``name`` lined up with the params' leaves."""
    try:
        return _tree.flatten_up_to(spec, tree)
    except (ValueError, TypeError):
        hint = "was the state made by init(params) for these params?"
        raise _mismatch(params, tree, f"state.{name}", hint) from None


def check_lr(lr: Any) -> float | torch.Tensor:
    """A learning rate given to ``step``: a number >= 0 or a 0-dim floating tensor."""
    if isinstance(lr, torch.Tensor):
        if lr.dim() != 0 or not lr.is_floating_point():
            raise TypeError(
                f"lr must be a number or a 0-dim floating tensor, got a tensor of dtype "
                f"{lr.dtype} and shape {tuple(lr.shape)}"
            )
        return lr
    return check_number("lr", lr, positive=False)


def state_leaves(
    opt: Any, state: Any, names: tuple[str, ...], lv: Leaves, params: Any
) -> tuple[list[list[Any]], list[Any] | None, list[Any] | None]:
    """The moments, master copies and compensation of ``state``, lined up with the params."""
    slots = []
    for name in names:
        tree = getattr(state, name)
        if tree is None and lv.params:  # (a tree without leaves is None for params=None)
            raise ValueError(
                f"state.{name} is None: the state was made by an optimizer with other settings "
                f"than {opt!r}; make one with this optimizer's init(params)"
            )
        slots.append(align(lv.spec, tree, params, name))
    master, comp = (
        None if tree is None else align(lv.spec, tree, params, name)
        for name, tree in (("master", state.master), ("compensation", state.compensation))
    )
    return slots, master, comp


def check_state(
    opt: Any,
    state: Any,
    params: Any,
    lv: Leaves,
    modes: list[Any],
    names: tuple[str, ...],
    kept: tuple[list[list[Any]], list[Any] | None, list[Any] | None],
) -> None:
    """Every updated leaf has the state its mode needs, in its shape."""
    slots, master, comp = kept
    for k, i in enumerate(lv.active):
        p, mode = lv.params[i], modes[k]
        if mode.direct and all(type(s[i]) is torch.Tensor and s[i].shape == p.shape for s in slots):
            continue
        need = [(n, s[i]) for n, s in zip(names, slots, strict=True)]
        if mode.master:
            need.append(("master", None if master is None else master[i]))
        if mode.kahan:
            need.append(("compensation", None if comp is None else comp[i]))
        for name, x in need:
            if not isinstance(x, torch.Tensor) or x.shape != p.shape:
                got = "nothing" if x is None else f"shape {tuple(getattr(x, 'shape', ()))}"
                raise ValueError(
                    f"state.{name} has {got} for parameter {path_of(params, i)} ({p.dtype}, "
                    f"shape {tuple(p.shape)}): the state was made for other parameters or "
                    f"settings; make one with {type(opt).__name__}.init(params)"
                )
        if mode.stochastic and state.seed is None:
            raise ValueError(
                "state.seed is None but rounding='stochastic' needs it: make the state with "
                "this optimizer's init(params)"
            )
