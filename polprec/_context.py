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

from polprec import _fused, _tree
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


def policy_context(policy: Policy, device: str) -> torch.autocast:
    """The autocast state a module runs in under ``policy``: on for mixed policies, else off."""
    if policy.is_mixed:
        return torch.autocast(device, dtype=policy.compute_dtype)
    return autocast_off(device)


def params_for_compute(policy: Policy, tree: Any) -> Any:
    """Params/buffers as the module should see them under ``policy``.

    Mixed policies leave the casts to autocast, except under torch.func transforms where
    autocast alone loses the dtype; every other policy casts explicitly.
    """
    if policy.is_mixed and not _fused.transforms_active():
        return tree
    return policy.cast_to_compute(tree)


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
_NAMES: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()


def _names(module: nn.Module) -> frozenset[str]:
    names = frozenset(
        [n for n, _ in module.named_parameters(remove_duplicate=False)]
        + [n for n, _ in module.named_buffers(remove_duplicate=False)]
    )
    _NAMES[module] = names
    return names


def check_names(module: nn.Module, params_and_buffers: Any) -> None:
    """Refuse names that are no parameter or buffer of ``module``.

    ``functional_call`` ignores them and silently uses the module's own tensor instead (a
    typo such as ``"0.wieght"`` would train nothing).
    """
    if torch.compiler.is_compiling():
        return
    dicts = params_and_buffers if isinstance(params_and_buffers, tuple) else (params_and_buffers,)
    keys = [k for d in dicts for k in d]
    names = _NAMES.get(module)
    if names is None or not names.issuperset(keys):
        names = _names(module)
    unknown = [k for k in keys if k not in names]
    if not unknown:
        return
    hints = []
    for key in unknown[:5]:
        close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise ValueError(
        f"params_and_buffers has keys that name no parameter or buffer of "
        f"{type(module).__name__}: {', '.join(hints)}{more}; functional_call would ignore "
        "them and use the module's own tensors. Use the names of module.named_parameters() "
        "and module.named_buffers()"
    )
