"""Pure functions over parameter pytrees: casting, finiteness, and selecting between trees."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from polprec import _dtensor, _tree
from polprec.policy import PolicySpec, get_policy, parse_dtype
from polprec.rules import PolicyRules

__all__ = ["all_finite", "cast_params", "cast_tree", "select_tree", "stack_trees"]


def cast_tree(tree: Any, dtype: torch.dtype | str) -> Any:
    """Cast every floating-point tensor leaf of ``tree`` to ``dtype``.

    Integer, bool and complex tensors, Python scalars, ``None`` and other objects are
    returned unchanged (the same objects), as are leaves already in ``dtype``. The cast is
    differentiable: gradients flow back in each leaf's original dtype.

    Examples:
        >>> import torch
        >>> tree = {"w": torch.ones(2), "step": torch.tensor(3), "name": "mlp", "b": None}
        >>> out = cast_tree(tree, torch.bfloat16)
        >>> out["w"].dtype, out["step"] is tree["step"], out["b"]
        (torch.bfloat16, True, None)
    """
    _tree.check_tree(tree, "tree")
    return _tree.cast_floating(tree, parse_dtype(dtype))


def cast_params(
    params: Any, policy: PolicySpec | PolicyRules, *, module: nn.Module | None = None
) -> Any:
    """Cast ``params`` to the policy's parameter dtype (``policy.cast_to_param(params)``).

    Args:
        params: a pytree of tensors, e.g. ``dict(model.named_parameters())``.
        policy: a :class:`Policy`, any spec :func:`get_policy` accepts, or
            :class:`~polprec.PolicyRules` (per-class and per-path param dtypes; names are the
            tree's dotted key paths).
        module: with :class:`~polprec.PolicyRules`, the module the names belong to (needed
            for module-class rules).

    Examples:
        >>> import torch
        >>> params = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
        >>> cast_params(params, "bf16-true")["weight"].dtype
        torch.bfloat16
    """
    _tree.check_tree(params, "params")
    if isinstance(policy, PolicyRules):
        return policy.cast_params(params, module=module)
    if module is not None and not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module or None, got {type(module).__name__}")
    return get_policy(policy).cast_to_param(params)


def all_finite(tree: Any) -> torch.Tensor:
    """A 0-dim bool tensor: True when every floating (or complex) element of ``tree`` is finite.

    Non-floating leaves are ignored; an empty tree gives ``tensor(True)``. No host
    synchronisation; works under ``vmap`` (one flag per batch member) and ``torch.compile``.
    With DTensor leaves the flag is plain and agreed over their meshes (the same on every
    rank: one all-reduce per mesh dimension).

    Examples:
        >>> import torch
        >>> all_finite({"a": torch.ones(3), "b": [torch.tensor([1.0, float("inf")])]})
        tensor(False)
        >>> all_finite({})
        tensor(True)
    """
    leaves = [
        x
        for x in _tree.tree_leaves(tree)
        if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())
    ]
    if not leaves:
        return torch.tensor(True)
    if _dtensor.any_dtensor(leaves):  # checked on the local shards, agreed over the meshes
        shards = _dtensor.Shards(leaves)
        return shards.agree(all_finite(shards.local))
    flags = [torch.isfinite(x).all() for x in leaves]
    if len(flags) == 1:
        return flags[0]
    return torch.stack(flags).all()


def _check_pred(pred: Any) -> None:
    if isinstance(pred, bool):
        return
    if not isinstance(pred, torch.Tensor):
        raise TypeError(
            f"pred must be a 0-dim torch.bool tensor (e.g. from all_finite or "
            f"unscale_and_check) or a Python bool, got {pred!r} of type {type(pred).__name__}"
        )
    if pred.dtype != torch.bool or pred.dim() != 0:
        raise ValueError(
            f"pred must be a 0-dim torch.bool tensor, got dtype {pred.dtype} with shape "
            f"{tuple(pred.shape)}; reduce it first, e.g. pred.all()"
        )


def select_tree(pred: torch.Tensor | bool, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``torch.where(pred, on_true, on_false)`` for a 0-dim bool tensor ``pred``.

    The canonical use skips an update whose gradients were not finite, without a host
    synchronisation::

        params, opt_state = select_tree(finite, (new_params, new_opt), (params, opt_state))

    Non-tensor leaves must be equal in both trees (they cannot depend on ``pred``). A Python
    bool ``pred`` is a choice known in advance: the same checks, then ``on_true`` or
    ``on_false`` itself is returned (as ``adjust`` accepts a Python bool for a known
    verdict).

    Raises:
        TypeError: ``pred`` is neither a tensor nor a bool.
        ValueError: ``pred`` is not a 0-dim bool tensor, the structures differ, or two
            paired leaves differ in dtype or (for non-tensors) value.

    Examples:
        >>> import torch
        >>> select_tree(torch.tensor(False), {"w": torch.ones(2)}, {"w": torch.zeros(2)})
        {'w': tensor([0., 0.])}
    """
    _check_pred(pred)
    paths, true_leaves, spec = _tree.tree_flatten_with_path(on_true)
    false_leaves, false_spec = _tree.tree_flatten(on_false)
    if spec != false_spec:
        raise ValueError(
            "select_tree needs on_true and on_false of the same structure, got\n"
            f"  on_true:  {spec}\n  on_false: {false_spec}"
        )
    out = []
    for path, a, b in zip(paths, true_leaves, false_leaves, strict=True):
        a_t, b_t = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
        if a_t and b_t:
            if a.dtype != b.dtype:
                raise ValueError(
                    f"select_tree: leaf {_tree.path_str(path)} has dtype {a.dtype} in on_true "
                    f"but {b.dtype} in on_false; paired leaves must share a dtype"
                )
            out.append(a if a is b or isinstance(pred, bool) else torch.where(pred, a, b))
        elif a_t or b_t:
            raise ValueError(
                f"select_tree: leaf {_tree.path_str(path)} is a tensor on one side only "
                f"({type(a).__name__} vs {type(b).__name__})"
            )
        else:
            if a is not b and a != b:
                raise ValueError(
                    f"select_tree: non-tensor leaf {_tree.path_str(path)} differs ({a!r} vs "
                    f"{b!r}); only tensors can be selected without a host synchronisation"
                )
            out.append(a)
    if isinstance(pred, bool):
        return on_true if pred else on_false
    return _tree.tree_unflatten(spec, out)


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stack trees of one structure leafwise along a new leading dimension.

    The pytree counterpart of ``torch.func.stack_module_state``: stack loss-scale states,
    optimizer states or batches so that ``vmap`` gives each ensemble member its own slice.
    Tensor leaves are stacked with ``torch.stack``; other leaves must be equal in every tree
    and are kept. Loss-scale settings (static metadata) must match too.

    Raises:
        TypeError: ``trees`` is not a non-empty list or tuple.
        ValueError: the trees differ in structure (or settings) or in a non-tensor leaf.

    Examples:
        >>> import polprec as pp
        >>> states = stack_trees([pp.DynamicLossScale(2.0**k, period=10) for k in (4, 8)])
        >>> states.loss_scale, states.period
        (tensor([ 16., 256.]), 10)
    """
    if not isinstance(trees, list | tuple) or not trees:
        raise TypeError(
            f"stack_trees takes a non-empty list or tuple of trees, got {trees!r} of type "
            f"{type(trees).__name__}"
        )
    flat = [_tree.tree_flatten_with_path(t) for t in trees]
    paths, first_leaves, spec = flat[0]
    for k, (_, _, other) in enumerate(flat[1:], start=1):
        if other != spec:
            raise ValueError(
                f"stack_trees: tree {k} differs in structure from tree 0:\n  tree 0: {spec}\n"
                f"  tree {k}: {other}"
            )
    out = []
    for i, path in enumerate(paths):
        column = [leaves[i] for _, leaves, _ in flat]
        if all(isinstance(x, torch.Tensor) for x in column):
            out.append(torch.stack(column))
        elif any(isinstance(x, torch.Tensor) for x in column) or any(
            x is not column[0] and x != column[0] for x in column
        ):
            raise ValueError(
                f"stack_trees: leaf {_tree.path_str(path)} is not a tensor in every tree and "
                f"differs between them ({[type(x).__name__ for x in column]})"
            )
        else:
            out.append(first_leaves[i])
    return _tree.tree_unflatten(spec, out)
