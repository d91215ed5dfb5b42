"""How a module runs under one :class:`~polprec.Policy`: autocast state and parameter casts.

Shared by :func:`polprec.apply_with_policy` (one policy) and :class:`polprec.PolicyRules`
(one policy per island).
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from polprec import _dtensor, _fused, _tree
from polprec._autocast_mode import AutocastMode
from polprec.policy import Policy


def device_type(*trees: Any) -> str:
    """The device type of the first tensor in ``trees`` (torch's default device if none)."""
    for tree in trees:
        if type(tree) is dict and tree:  # a params dict: look at its first value only
            first = next(iter(tree.values()))
            if isinstance(first, torch.Tensor):
                return first.device.type
        for leaf in _tree.tree_leaves(tree):
            if isinstance(leaf, torch.Tensor):
                return leaf.device.type
    return torch.get_default_device().type


def autocast_off(device: str) -> torch.autocast:
    """``torch.autocast`` switched off on ``device``."""
    return torch.autocast(device, enabled=False)


class NullContext:
    """A do-nothing context manager (traceable by torch.compile)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def policy_context(policy: Policy, device: str) -> torch.autocast | NullContext:
    """The autocast state a module runs in under ``policy``: on for mixed policies, else off."""
    if policy.is_mixed:
        return torch.autocast(device, dtype=policy.compute_dtype)
    if not torch.compiler.is_compiling() and not torch.is_autocast_enabled(device):
        return NullContext()  # off already: entering and leaving autocast costs a few us
    return autocast_off(device)


def transform_casts(device: str, mixed: bool) -> AutocastMode | NullContext:
    """What makes autocast's casts hold inside ``torch.func`` transforms.

    Inside ``vmap``, ``grad`` and the other transforms ``torch.autocast`` alone loses dtypes
    (see :mod:`polprec._autocast_mode`); there an :class:`AutocastMode` makes its casts at the
    torch-function level. Enter it inside the autocast region it serves. Elsewhere, and when no
    policy involved is mixed, nothing is needed.
    """
    if mixed and _fused.transforms_active():
        return AutocastMode(device)
    return NullContext()  # a fresh one: Dynamo enters only context managers made in the graph


def params_for_compute(
    policy: Policy,
    tree: Any,
    *,
    module: nn.Module | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> Any:
    """Params/buffers as the module should see them under ``policy``.

    Mixed policies pass them as they are and leave the casts to autocast (and, inside
    ``torch.func`` transforms, to :func:`transform_casts`), so that the float32 parameters
    reach every float32 op; every other policy casts explicitly.

    In a dict of tensors by name given with its ``module``, DTensor leaves are first gathered
    to full tensors (:func:`polprec._dtensor.gather_tree`): the module's parameters in the
    compute dtype under every policy (cast before the all-gather), buffers in their own
    dtype; ``reduce_dtype`` is the dtype their gradients are averaged over the ranks in.
    """
    if module is not None and _dtensor.any_dtensor(tree):
        names = parameter_names(module, tree)
        tree = _dtensor.gather_tree(tree, policy.compute_dtype, names, reduce_dtype)
    if policy.is_mixed:
        return tree
    return policy.cast_to_compute(tree)


def cast_inputs(
    policy: Policy, args: tuple[Any, ...], kwargs: dict[str, Any], keep: frozenset[str | int]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs as the module receives them under ``policy``.

    Mixed policies pass them as they are: autocast casts per op (torch.amp's rule), so a
    float32 target reaches a float32 loss as it is. Every other policy casts floating inputs
    to the compute dtype, except the keyword names and positional indices in ``keep``.
    """
    if policy.is_mixed:
        return args, kwargs
    if not keep:
        return policy.cast_to_compute(args), policy.cast_to_compute(kwargs)
    args = tuple(a if i in keep else policy.cast_to_compute(a) for i, a in enumerate(args))
    kwargs = {k: v if k in keep else policy.cast_to_compute(v) for k, v in kwargs.items()}
    return args, kwargs


def class_call(module: nn.Module) -> Callable[..., Any]:
    """What calling ``module`` runs when its instance has no ``_call_impl`` of its own."""
    unbound: Callable[..., Any] = type(module)._call_impl  # noqa: SLF001
    return lambda *args, **kwargs: unbound(module, *args, **kwargs)


def set_call(module: nn.Module, call: Callable[..., Any] | None) -> None:
    """Give ``module``'s instance its own ``_call_impl`` (``None`` removes it).

    ``nn.Module.__call__`` dispatches through ``_call_impl``, which runs the hooks around
    ``forward``; replacing it on the instance puts a wrapper outside the hooks, so that they
    see what the module computes on.
    """
    if call is None:
        module.__dict__.pop("_call_impl", None)
    else:
        object.__setattr__(module, "_call_impl", call)


# The parameter and buffer names of each module (tied names included), kept while the
# module lives; re-read when a name is missing, so a module that gained tensors is seen.
_NAMES: weakref.WeakKeyDictionary[nn.Module, tuple[frozenset[str], frozenset[str]]] = (
    weakref.WeakKeyDictionary()
)


def _names(module: nn.Module) -> tuple[frozenset[str], frozenset[str]]:
    params = frozenset(n for n, _ in module.named_parameters(remove_duplicate=False))
    names = params | frozenset(n for n, _ in module.named_buffers(remove_duplicate=False))
    _NAMES[module] = names, params
    return names, params


def parameter_names(module: nn.Module, keys: Any) -> frozenset[str]:
    """The parameter names (not buffers) of ``module``, known to include ``keys`` if they can."""
    cached = _NAMES.get(module)
    if cached is None or not cached[0].issuperset(keys):
        cached = _names(module)
    return cached[1]


def check_names(module: nn.Module, params_and_buffers: Any) -> None:
    """Refuse names that are no parameter or buffer of ``module``.

    ``functional_call`` ignores them and silently uses the module's own tensor instead (a
    typo such as ``"0.wieght"`` would train nothing).
    """
    if torch.compiler.is_compiling():
        return
    keys = list(params_and_buffers)
    cached = _NAMES.get(module)
    names = cached[0] if cached is not None and cached[0].issuperset(keys) else _names(module)[0]
    unknown = [k for k in keys if k not in names]
    if not unknown:
        return
    hints = []
    for key in unknown[:5]:
        close = difflib.get_close_matches(str(key), names)  # (the best first)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise ValueError(
        f"params_and_buffers has keys that name no parameter or buffer of "
        f"{type(module).__name__}: {', '.join(hints)}{more}; functional_call would ignore "
        "them and use the module's own tensors. Use the names of module.named_parameters() "
        "and module.named_buffers()"
    )
