"""Running a module under :class:`~polprec.PolicyRules`: one policy per island.

:func:`apply_rules` is what :func:`polprec.apply_with_policy` does with rules. Resolving rules
against a module (:meth:`PolicyRules.resolve`) matches every rule against every submodule;
the result depends only on the rules and the module's structure, so it is kept per module
(weakly: a module that is dropped takes its plans with it) and rebuilt only when the
module's structure or the parameter names change.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from polprec import _buffers, _context, _dtensor, _reparam, _tree
from polprec._rule_keys import map_named, owner
from polprec.policy import Policy
from polprec.rules import PolicyRules


@dataclasses.dataclass
class _Plan:
    structure: tuple[tuple[str, type[nn.Module]], ...]
    policies: dict[str, Policy]
    # (path, policy, island) of every submodule that needs a wrapper
    wrapped: list[tuple[str, Policy, bool]]
    # parameter/buffer name -> the compute policy of the module that owns it
    owners: dict[str, Policy] = dataclasses.field(default_factory=dict)
    # whether any module runs under a mixed policy (then transforms need autocast's casts)
    any_mixed: bool = False


_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[PolicyRules, _Plan]] = weakref.WeakKeyDictionary()


def _make_plan(rules: PolicyRules, module: nn.Module, structure: Any) -> _Plan:
    policies = rules.resolve(module)
    root = policies[""]
    wrapped = []
    if any(policy != root for policy in policies.values()):  # without islands, no wrapping
        for path, policy in policies.items():
            if not path:
                continue
            if policy != policies[path.rpartition(".")[0]]:
                wrapped.append((path, policy, True))
            elif not policy.is_mixed:
                wrapped.append((path, policy, False))
    return _Plan(structure, policies, wrapped, any_mixed=any(p.is_mixed for p in policies.values()))


def _plan(rules: PolicyRules, named: list[tuple[str, nn.Module]], module: nn.Module) -> _Plan:
    structure = tuple((path, type(sub)) for path, sub in named)
    if torch.compiler.is_compiling():  # resolved once per compiled graph anyway
        return _make_plan(rules, module, structure)
    by_rules = _PLANS.setdefault(module, {})
    plan = by_rules.get(rules)
    if plan is None or plan.structure != structure:
        plan = by_rules[rules] = _make_plan(rules, module, structure)
    return plan


def apply_rules(
    rules: PolicyRules,
    module: nn.Module,
    params_and_buffers: dict[str, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    strict: bool,
    tie_weights: bool,
    keep: frozenset[str | int],
    reduce_dtype: torch.dtype | None = None,
) -> Any:
    """``functional_call`` of ``module`` with each island under its own policy.

    Each parameter and buffer is cast for the module that uses it under its name; a tied
    tensor (one tensor under several names) is cast once per compute dtype, for each name.
    A DTensor is gathered for each policy that uses it, a parameter in that compute dtype.
    """
    named = list(module.named_modules())
    plan = _plan(rules, named, module)
    root = plan.policies[""]
    args, kwargs = _context.cast_inputs(root, args, kwargs, keep)
    device_type = _context.device_type(params_and_buffers, args, kwargs)
    if tie_weights:
        params_and_buffers = dict(_reparam.untie(module, params_and_buffers))
    casts = _tree.TensorMemo()  # tensor -> {policy: its cast}: tied names share casts
    names = (  # parameters, told from buffers where DTensors are gathered
        _context.parameter_names(module, params_and_buffers)
        if _dtensor.any_dtensor(params_and_buffers)
        else frozenset()
    )

    def for_compute(name: str, x: Any) -> Any:
        policy = plan.owners.get(name)
        if policy is None:
            policy = plan.owners[name] = plan.policies.get(owner(name, plan.policies), root)
        if not isinstance(x, torch.Tensor):
            return x
        by_policy = casts.get(x)
        if by_policy is None:
            by_policy = casts.put(x, {})
        if policy not in by_policy:
            if type(x) is not torch.Tensor and _dtensor.is_dtensor(x):
                x = _dtensor.gather(
                    x, policy.compute_dtype if name in names else None, reduce_dtype
                )
            by_policy[policy] = _context.params_for_compute(policy, x)
        return by_policy[policy]

    params = map_named(params_and_buffers, for_compute)
    modules = dict(named)
    wrapped = [
        (modules[path], _module_call(modules[path], policy, device_type, island=island))
        for path, policy, island in plan.wrapped
    ]
    saved = [(sub, sub.__dict__.get("_call_impl")) for sub, _ in wrapped]
    try:
        for sub, call in wrapped:
            _context.set_call(sub, call)
        with (
            _context.policy_context(root, device_type),
            _context.transform_casts(device_type, plan.any_mixed),
        ):
            out = _buffers.call(
                module, params_and_buffers, params, args, kwargs, strict, False, root
            )
    finally:
        for sub, previous in saved:
            _context.set_call(sub, previous)
    return root.cast_to_output(out)


def _module_call(
    sub: nn.Module, policy: Policy, device_type: str, *, island: bool
) -> Callable[..., Any]:
    """``sub``'s call with its floating inputs cast to ``policy``'s compute dtype.

    (Under a mixed policy the inputs are left to autocast, which casts them per op.) An island (a module whose policy differs from its parent's) also gets autocast set for
    its policy and its floating outputs cast to its output dtype. Other modules under a
    policy without autocast only get the input cast, so that an island's output in another
    dtype meets the dtype its next consumer computes in. The wrapper replaces the instance's
    ``_call_impl``, so forward hooks see what the module computes on (the cast inputs, the
    output before the cast to the output dtype).
    """
    call: Callable[..., Any] = sub.__dict__.get("_call_impl") or _context.class_call(sub)

    def call_impl(*args: Any, **kwargs: Any) -> Any:
        if not policy.is_mixed:  # mixed policies leave inputs to autocast, as at the root
            args, kwargs = policy.cast_to_compute((args, kwargs))
        if not island:
            return call(*args, **kwargs)
        with _context.policy_context(policy, device_type):
            out = call(*args, **kwargs)
        return policy.cast_to_output(out)

    return call_impl
