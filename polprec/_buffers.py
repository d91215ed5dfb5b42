"""The buffers a module runs with: refused where differentiated, kept where cast, named where missing.

:func:`polprec.apply_with_policy` hands parameters and buffers to ``functional_call``, whose
contract is that in-place updates of buffers (BatchNorm's running statistics in training mode)
land in the tensors passed. :func:`call` keeps that contract under every policy and turns the
ways it broke into errors that say what to do:

* A buffer that requires grad is being differentiated: it sits in the tree
  :func:`polprec.value_and_grad` differentiates (``{**params, **buffers}`` as its first
  argument). torch refuses that for BatchNorm ("not differentiable with respect to
  'running_mean'"), and for any other buffer it would hand the optimizer a gradient for a
  tensor nobody trains. Refused, naming the tuple form ``(params, buffers)``.
* Under a policy that casts (the "true" ones), a floating buffer in another dtype than the
  compute dtype reaches the module as a cast copy, and the module's update landed in the copy
  and was lost. In training mode the elements the module changed are written back into the
  buffer passed (rounded as the module computed them; unchanged elements keep their bits),
  with plain ops: no host sync, and the same under ``torch.func`` transforms and
  ``torch.compile``. (The version counter cannot tell: BatchNorm's CPU kernel updates its
  statistics without bumping it.)
* A floating buffer not passed is the module's own, in its own dtype; where that clashes with
  the compute dtype torch fails with a dtype error ("expected scalar type BFloat16 but found
  Float"), which is re-raised as a ``ValueError`` naming the buffers and the fix. (While
  ``torch.compile`` traces, torch's error stands.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from polprec import _checkpointing, _context, _dtensor
from polprec.policy import Policy

__all__ = ["call"]

_DTYPE_ERROR = re.compile(r"scalar type|dtype|datatype", re.IGNORECASE)


def _buffer_keys(module: nn.Module, given: Mapping[str, Any]) -> list[str]:
    """The names in ``given`` that are buffers of ``module`` (none in the usual params dict)."""
    if torch.compiler.is_compiling():
        names = {n for n, _ in module.named_buffers(remove_duplicate=False)}
        return [k for k in given if k in names]
    params = _context.parameter_names(module, given)
    if params.issuperset(given):
        return []
    return [k for k in given if k not in params]


def _requires_grad(x: Any) -> bool:
    if not isinstance(x, torch.Tensor):
        return False
    # While Dynamo traces torch.func.grad, the inputs being differentiated read
    # requires_grad=False; a view of them reads it right.
    return bool((x.view_as(x) if torch.compiler.is_compiling() else x).requires_grad)


def _refuse_differentiated(module: nn.Module, given: Mapping[str, Any], keys: list[str]) -> None:
    grad = [k for k in keys if _requires_grad(given[k])]
    if not grad:
        return
    more = f" and {len(grad) - 5} more" if len(grad) > 5 else ""
    raise ValueError(
        f"params_and_buffers holds buffers of {type(module).__name__} that require grad: "
        f"{', '.join(map(repr, grad[:5]))}{more}. They are being differentiated like parameters "
        "(pp.value_and_grad differentiates every floating leaf of its first argument), but "
        "buffers such as BatchNorm's running statistics are updated by the forward pass, not "
        "trained. Pass them beside the parameters: a loss function loss_fn(params, buffers, x) "
        "that calls pp.apply_with_policy(model, (params, buffers), x, policy=policy), called as "
        "step(params, buffers, x, loss_scale=...), which differentiates params only"
    )


def _write_back(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write what the module changed in each cast copy into the buffer it was cast from."""
    with torch.no_grad():
        for given, copy in copies:
            changed = copy != given.to(copy.dtype)
            given.copy_(torch.where(changed, copy.to(given.dtype), given))


def _missing_buffers(
    err: RuntimeError, module: nn.Module, given: Mapping[str, Any], policy: Policy
) -> ValueError | None:
    """A clearer error for a dtype clash with buffers of ``module`` that ``given`` lacks."""
    if policy.is_mixed or not _DTYPE_ERROR.search(str(err)):
        return None
    clash = {
        name: buffer.dtype
        for name, buffer in module.named_buffers(remove_duplicate=False)
        if name not in given and buffer.is_floating_point() and buffer.dtype != policy.compute_dtype
    }
    if not clash:
        return None
    names = list(clash)
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    dtypes = ", ".join(sorted({str(d) for d in clash.values()}))
    owners = sorted({type(module.get_submodule(n.rpartition(".")[0])).__name__ for n in names})
    islands = ", ".join(f"{name!r}: '32-true'" for name in owners)
    return ValueError(
        f"{type(module).__name__} failed with a dtype error ({err}) while computing in "
        f"{policy.compute_dtype}. Likely cause: buffers the call does not pass reach the "
        f"module as they are, its own: {', '.join(map(repr, names[:5]))}{more}, in {dtypes}. "
        "Pass the buffers with the parameters, e.g. pp.apply_with_policy(model, (params, "
        "buffers), x, policy=policy) with buffers = {k: v.detach() for k, v in "
        "model.named_buffers()} (each is cast for the call, and in training mode what the "
        "module updates in the cast copy is written back), or keep the layers that own them "
        f"in float32 with pp.PolicyRules(policy, {{{islands}}})"
    )


def call(
    module: nn.Module,
    given: Mapping[str, Any],
    params: dict[str, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    strict: bool,
    tie_weights: bool,
    policy: Policy,
) -> Any:
    """Run ``module`` with ``params`` (``given`` as cast for ``policy``), keeping its buffers.

    See the module docstring: differentiated buffers are refused, updates of cast copies are
    written back into ``given``'s buffers, and a dtype error caused by buffers ``given`` lacks
    names them.
    """
    keys = _buffer_keys(module, given)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    if keys:
        _refuse_differentiated(module, given, keys)
        if module.training:
            copies = [
                (given[k], params[k])
                for k in keys
                if params[k] is not given[k]
                and isinstance(given[k], torch.Tensor)
                and given[k].is_floating_point()
                and not _dtensor.is_dtensor(given[k])  # gathered, not cast: see _dtensor
            ]
    try:
        out = _checkpointing.call(module, params, args, kwargs, strict, tie_weights)
    except RuntimeError as err:
        clearer = (
            None if torch.compiler.is_compiling() else _missing_buffers(err, module, given, policy)
        )
        if clearer is not None:
            raise clearer from err
        raise
    if copies:
        _write_back(copies)
    return out
