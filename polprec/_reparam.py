"""Calling a module with other tensors in place of its parameters and buffers.

This is ``torch.func.functional_call``'s job, done with less work per call in eager mode.
torch's version walks the whole module twice on every call to find tied tensors, then finds
each submodule by its dotted name; for a small model that costs more than the forward. Here
the module's layout (which ``_parameters`` / ``_buffers`` dict holds each name, which names
share a tensor) is kept between calls and checked cheaply before each one: every recorded
parent still holds its child and every recorded slot still holds its tensor, so a module whose
tensors or submodules were reassigned (``model.lm_head.weight = model.wte.weight``) is laid
out again. The swap itself writes into those dicts, as torch's does, and restores them after
the call, also when it raises.

While ``torch.compile`` traces or inside ``torch.func`` transforms, and for the rare layouts
this does not handle (a submodule reachable by two paths, ``strict=True``), it is
``torch.func.functional_call`` itself.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from polprec import _fused

__all__ = ["call", "own_tensors", "untie"]

_MISSING = object()


@dataclasses.dataclass
class _Layout:
    # (parent's _modules dict, key, child) for every submodule: the tree as it was laid out
    edges: list[tuple[dict[str, Any], str, nn.Module]]
    # name -> (the _parameters or _buffers dict that holds it, key in it)
    slots: dict[str, tuple[dict[str, Any], str]]
    # name -> the tensor in that slot when laid out
    tensors: dict[str, Any]
    # name -> every name of the same tensor, for tensors under several names
    tied: dict[str, tuple[str, ...]]
    # a submodule under two paths: left to torch.func.functional_call
    shared: bool

    def current(self) -> bool:
        """Whether the module still has this layout."""
        return all(d.get(k) is child for d, k, child in self.edges) and all(
            d.get(k, _MISSING) is self.tensors[name] for name, (d, k) in self.slots.items()
        )


def _lay_out(module: nn.Module) -> _Layout:
    edges: list[tuple[dict[str, Any], str, nn.Module]] = []
    slots: dict[str, tuple[dict[str, Any], str]] = {}
    tensors: dict[str, Any] = {}
    seen: set[int] = set()
    shared = False
    stack: list[tuple[str, nn.Module]] = [("", module)]
    while stack:
        prefix, mod = stack.pop()
        if id(mod) in seen:  # recorded under this path too, as remove_duplicate=False does
            shared = True
        seen.add(id(mod))
        for table in (mod._parameters, mod._buffers):  # noqa: SLF001
            for key, tensor in table.items():
                if tensor is not None:
                    slots[prefix + key] = (table, key)
                    tensors[prefix + key] = tensor
        children = mod._modules  # noqa: SLF001
        for key, child in children.items():
            if child is not None:
                edges.append((children, key, child))
                stack.append((f"{prefix}{key}.", child))
    return _Layout(edges, slots, tensors, _ties(tensors), shared)


def _ties(tensors: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """name -> every name of the same tensor, for the tensors under several names."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        by_tensor.setdefault(id(tensor), []).append(name)
    return {n: tuple(names) for names in by_tensor.values() if len(names) > 1 for n in names}


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, _Layout] = weakref.WeakKeyDictionary()


def _layout(module: nn.Module) -> _Layout:
    layout = _LAYOUTS.get(module)
    if layout is None or not layout.current():
        layout = _LAYOUTS[module] = _lay_out(module)
    return layout


def own_tensors(module: nn.Module) -> dict[str, Any]:
    """``module``'s own parameters and buffers by name, every name of a tied tensor included."""
    if _fused.tracing():
        own: dict[str, Any] = dict(module.named_parameters(remove_duplicate=False))
        own.update(module.named_buffers(remove_duplicate=False))
        return own
    return _layout(module).tensors


def _tied(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """name -> every name of the same tensor, for ``module``'s tensors under several names."""
    if not _fused.tracing():
        return _layout(module).tied
    return _ties(own_tensors(module))


def untie(module: nn.Module, params: Mapping[str, Any]) -> Mapping[str, Any]:
    """``params`` with a value for every name tied to a given one: ``functional_call``'s ties.

    ``functional_call(..., tie_weights=True)`` gives all names of a tied tensor (an embedding
    and the output layer that shares it) the value passed for one of them; doing it before the
    call lets each name get its own cast (each island computes in its own dtype). Different
    values for one tied tensor are refused, as ``functional_call`` refuses them.
    """
    tied = _tied(module)
    if not any(name in tied for name in params):
        return params
    out = dict(params)
    for name, value in params.items():
        for other in tied.get(name, ()):
            if other in params and params[other] is not value:
                raise ValueError(
                    f"params_and_buffers has different values for keys {sorted({name, other})}, "
                    "which are tied (one tensor of the module); pass one of them, the same "
                    "tensor under each name, or tie_weights=False"
                )
            out[other] = value
    return out


def call(
    module: nn.Module,
    params: Mapping[str, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    strict: bool,
    tie_weights: bool,
) -> Any:
    """``torch.func.functional_call(module, params, args, kwargs, ...)``, eagerly cheaper."""
    if _fused.tracing() or strict:
        return torch.func.functional_call(
            module, dict(params), args, kwargs, strict=strict, tie_weights=tie_weights
        )
    layout = _layout(module)
    if layout.shared or any(
        name not in layout.slots or not isinstance(value, torch.Tensor)
        for name, value in params.items()
    ):
        return torch.func.functional_call(
            module, dict(params), args, kwargs, strict=strict, tie_weights=tie_weights
        )
    if tie_weights and layout.tied:
        params = untie(module, params)
    saved: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for name, value in params.items():
            table, key = layout.slots[name]
            saved.append((table, key, table[key]))
            table[key] = value
        return module(*args, **kwargs)
    finally:
        for table, key, old in reversed(saved):
            table[key] = old
