"""Refusing gradient checkpointing that would recompute from the module's own tensors.

``torch.utils.checkpoint`` (what ``gradient_checkpointing_enable()`` turns on in a transformers
model) recomputes the checkpointed part of the forward during the backward pass. By then
``functional_call`` has put the module's own parameters back, so the recomputation reads those
instead of the tensors that were passed in, and the gradients are wrong (or, where the dtypes
differ, the recomputation fails its own consistency check). Neither can be repaired from
outside: nothing of the call is left when the backward pass runs. So polprec refuses it, in
eager mode whenever the tensors passed differ from the module's own:

* the non-reentrant checkpoint (``use_reentrant=False``, the default of recent transformers)
  installs saved-tensors hooks; ``torch.autograd.graph.disable_saved_tensors_hooks`` makes that
  raise :data:`MESSAGE` at once. (Where hooks are already active around the call, an outer
  ``checkpoint`` or ``save_on_cpu``, they cannot be disabled, and the check is skipped.)
* the reentrant checkpoint leaves a ``CheckpointFunctionBackward`` node in the graph of the
  outputs, which :meth:`Guard.check` looks for.

The walk costs about as much per graph node as an op's dispatch, so under
:func:`polprec.value_and_grad`'s eager path it is deferred (:class:`Deferred`) to after the
backward pass, and made only where the checkpoint could have gone unnoticed. There
``torch.autograd.grad`` raises by itself when it meets a reentrant checkpoint on the way to a
parameter; one it does not meet leaves the parameters inside it without a gradient. So the walk
runs when a gradient came back ``None``, when an input of the loss function requires grad, or
when the backward pass raised.

Under ``torch.func`` transforms torch refuses checkpointing itself, and under ``torch.compile``
the parameters are inputs of the traced graph, so neither is checked here.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from polprec import _context, _fused, _reparam, _tree

__all__ = ["MESSAGE", "Deferred", "Guard", "call"]

MESSAGE = (
    "apply_with_policy cannot run a module that uses gradient checkpointing "
    "(torch.utils.checkpoint, e.g. a transformers model after gradient_checkpointing_enable()): "
    "the backward pass recomputes the checkpointed layers after apply_with_policy has put the "
    "module's own parameters back, so their gradients would be computed from those and not "
    "from the params you passed. Turn checkpointing off (model.gradient_checkpointing_disable()), "
    "or checkpoint around apply_with_policy with the params as inputs, e.g. "
    "torch.utils.checkpoint.checkpoint(lambda p, x: pp.apply_with_policy(layer, p, x, "
    "policy=policy), layer_params, x, use_reentrant=False)"
)


def _substitutes(module: nn.Module, params: Mapping[str, Any]) -> bool:
    """Whether some tensor in ``params`` is not the module's own tensor of that name."""
    param_names = _context.parameter_names(module, params)
    if any(
        isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)
        for k, v in params.items()
        if k in param_names
    ):
        return True  # a plain tensor where the module holds a Parameter: no walk needed
    own = _reparam.own_tensors(module)
    return any(own.get(k) is not v for k, v in params.items())


def _has_reentrant_checkpoint(outputs: list[torch.Tensor], stop: set[Any]) -> bool:
    """Whether the graph of ``outputs`` (down to ``stop``) holds a reentrant checkpoint."""
    seen = set(stop)
    stack = []
    for x in outputs:
        if x.grad_fn is not None and x.grad_fn not in seen:
            seen.add(x.grad_fn)
            stack.append(x.grad_fn)
    while stack:
        node = stack.pop()
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return False


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if type(tree) is tuple and len(tree) == 2 and type(tree[1]) is dict:  # (args, kwargs)
        args, kwargs = tree
        flat = [*args, *kwargs.values()] if type(args) is tuple else None
        if flat is not None and all(type(x) is torch.Tensor for x in flat):
            return flat  # plain tensors, as a step passes them: no tree walk
    return [x for x in _tree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


class Guard:
    """Around ``functional_call``: refuses checkpointing of substituted tensors (see above)."""

    def __init__(self, module: nn.Module, params: Mapping[str, Any], inputs: Any) -> None:
        self.active = (
            torch.is_grad_enabled() and not _fused.tracing() and _substitutes(module, params)
        )
        self._inputs = inputs
        self._hooks: Any = None

    def __enter__(self) -> Guard:
        if self.active:
            hooks = torch.autograd.graph.disable_saved_tensors_hooks(MESSAGE)
            with contextlib.suppress(RuntimeError):  # hooks already active around the call
                hooks.__enter__()
                self._hooks = hooks
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)

    def check(self, out: Any) -> None:
        """Raise :data:`MESSAGE` if ``out`` was computed through a reentrant checkpoint."""
        if not self.active:
            return
        if _DEFERRALS.stack:  # value_and_grad walks the whole graph after its backward pass
            _DEFERRALS.stack[-1].substituted = True
            return
        outputs = [x for x in _tensors(out) if x.requires_grad]
        if not outputs:
            return
        stop = {x.grad_fn for x in _tensors(self._inputs) if x.grad_fn is not None}
        if _has_reentrant_checkpoint(outputs, stop):
            raise RuntimeError(MESSAGE)


class _Deferrals(threading.local):
    def __init__(self) -> None:
        self.stack: list[Deferred] = []


_DEFERRALS = _Deferrals()


class Deferred:
    """Around a loss function and its backward pass: :meth:`Guard.check` is left to :meth:`settle`.

    ``substituted`` records whether a guarded call with substituted tensors ran inside.
    """

    def __init__(self) -> None:
        self.substituted = False

    def __enter__(self) -> Deferred:
        _DEFERRALS.stack.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _DEFERRALS.stack.pop()

    def settle(
        self,
        loss: torch.Tensor,
        grads: Sequence[torch.Tensor | None] | None,
        inputs: Any,
    ) -> None:
        """Raise :data:`MESSAGE` if the graph of ``loss`` holds a reentrant checkpoint that
        could have given wrong gradients (``grads=None``: the backward pass raised)."""
        if not self.substituted:
            return
        if (
            grads is not None
            and all(g is not None for g in grads)
            and not any(x.requires_grad for x in _tensors(inputs))
        ):
            return  # any reentrant checkpoint was on the way to a parameter: torch refused it
        if loss.grad_fn is not None and _has_reentrant_checkpoint([loss], set()):
            raise RuntimeError(MESSAGE)


def call(
    module: nn.Module,
    params: dict[str, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    strict: bool,
    tie_weights: bool,
) -> Any:
    """``functional_call`` with the :class:`Guard` around it."""
    with Guard(module, params, (args, kwargs)) as guard:
        out = _reparam.call(module, params, args, kwargs, strict=strict, tie_weights=tie_weights)
    guard.check(out)
    return out
