"""Precision islands: a default policy plus per-module-class and per-path policies."""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from polprec import _reparam, _tree
from polprec._rule_keys import (
    Key,
    check_class_names,
    check_key,
    keep_in_fp32_patterns,
    key_name,
    literal_chars,
    owner,
    tensor_uses,
    unmatched_hint,
)
from polprec.policy import Policy, PolicySpec, get_policy

__all__ = ["PolicyRules"]

_UNMATCHED = ("error", "warn", "ignore")


@dataclasses.dataclass(frozen=True, init=False)
class PolicyRules:
    """A default :class:`Policy` with exceptions per module class and per path (islands).

    Keys are ``nn.Module`` subclasses (``nn.BatchNorm2d``: every instance, subclasses
    included) or glob patterns over dotted paths (``"head.*"``, ``"*.norm*"``); a pattern that
    matches everything inside a module (``"head.*"``) matches that module too, and one made of
    identifier characters (``"LayerNorm"``) also names the classes of that name in a module's
    MRO, ranked as those classes (a class you need not import). A module's
    policy is the most specific rule that matches it, else its parent's (a rule covers the
    module's whole subtree), else the default:

    * a path pattern beats a class; among patterns, more literal characters win;
    * among classes, the closest in the module's MRO wins (``BatchNorm2d`` over ``Module``);
    * two different policies tied for most specific are a ``ValueError``.

    In :func:`~polprec.apply_with_policy` a module whose policy differs from its parent's
    runs as an island: autocast is set for its policy (on for mixed policies, off otherwise),
    its floating inputs are cast to its compute dtype unless the policy is mixed (autocast
    casts per op), its parameters are cast to its compute dtype where autocast does not do it
    (a tied tensor for each module that uses it), and its floating outputs are cast to its
    output dtype. Modules under a policy without autocast ("true" policies) also get their floating
    inputs cast to their compute dtype, so an island's float32 output meets a bfloat16
    ``nn.Linear`` after it in bfloat16; code between modules (a residual ``x + h``) follows
    torch's type promotion.

    In :func:`~polprec.cast_params` a parameter takes the param dtype of a pattern that
    matches its own path (``"*.bias"``), else of its module's policy; patterns decide where
    parameters are stored, modules decide how they compute.

    Args:
        default: the policy of everything no rule covers (any spec :func:`get_policy` takes).
        rules: a mapping (or sequence of pairs) from module classes or glob patterns to
            policies (any spec).
        on_unmatched: what a rule that matches nothing does when the rules are resolved
            against a module: ``"error"`` (default; a ``ValueError`` that lists the paths),
            ``"warn"`` (a ``UserWarning``) or ``"ignore"``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> rules = PolicyRules("bf16-true", {nn.BatchNorm1d: "p=f32,c=f32,o=bf16"})
        >>> params = rules.cast_params(dict(model.named_parameters()), module=model)
        >>> params["0.weight"].dtype, params["1.weight"].dtype
        (torch.bfloat16, torch.float32)
        >>> rules.policy_for(model, "1") == get_policy("p=f32,c=f32,o=bf16")
        True
    """

    default: Policy
    rules: tuple[tuple[Key, Policy], ...]
    on_unmatched: Literal["error", "warn", "ignore"]

    def __init__(
        self,
        default: PolicySpec,
        rules: Mapping[Key, Any] | Iterable[tuple[Key, Any]] | None = None,
        *,
        on_unmatched: Literal["error", "warn", "ignore"] = "error",
    ) -> None:
        if on_unmatched not in _UNMATCHED:
            raise ValueError(f"on_unmatched must be one of {_UNMATCHED}, got {on_unmatched!r}")
        pairs = (
            list((rules or {}).items()) if isinstance(rules, Mapping | type(None)) else list(rules)
        )
        checked: list[tuple[Key, Policy]] = []
        seen: set[Key] = set()
        for item in pairs:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"rules must be (key, policy) pairs, got {item!r}")
            key, spec = item
            check_key(key)
            if key in seen:
                raise ValueError(f"rule key {key_name(key)!r} is given twice")
            seen.add(key)
            try:
                checked.append((key, get_policy(spec)))
            except (TypeError, ValueError) as err:
                raise type(err)(f"rule {key_name(key)!r}: {err}") from None
        object.__setattr__(self, "default", get_policy(default))
        object.__setattr__(self, "rules", tuple(checked))
        object.__setattr__(self, "on_unmatched", on_unmatched)

    # --- resolution ------------------------------------------------------------------------

    def _matches(
        self, path: str, module: nn.Module | None, *, param: bool
    ) -> list[tuple[tuple[int, int], Key, Policy]]:
        """Every rule matching ``path`` (and ``module``'s class), most specific first."""
        ranked: list[tuple[tuple[int, int], Key, Policy]] = []
        mro = type(module).__mro__ if module is not None else ()
        names = [cls.__name__ for cls in mro]
        for key, policy in self.rules:
            if isinstance(key, str):
                # "head.*" names head's contents; as a module rule it covers head itself too.
                if fnmatch.fnmatchcase(path, key) or (
                    not param and path and fnmatch.fnmatchcase(path + ".", key)
                ):
                    ranked.append(((3 if param else 2, literal_chars(key)), key, policy))
                elif key in names:  # a class given by name: ranked as the class
                    ranked.append(((1, -names.index(key)), key, policy))
            elif key in mro:
                ranked.append(((1, -mro.index(key)), key, policy))
        ranked.sort(key=lambda r: r[0], reverse=True)
        return ranked

    def _best(
        self, path: str, module: nn.Module | None, *, param: bool, used: set[Key] | None = None
    ) -> tuple[Key, Policy] | None:
        """The most specific rule matching ``path``, or None; records matches in ``used``."""
        ranked = self._matches(path, module, param=param)
        if used is not None:
            used.update(key for _, key, _ in ranked)
        if not ranked:
            return None
        top = ranked[0]
        for other in ranked[1:]:
            if other[0] != top[0]:
                break
            if other[2] != top[2]:
                raise ValueError(
                    f"conflicting rules for {'parameter' if param else 'module'} "
                    f"{path or '<root>'!r}: {key_name(top[1])!r} -> {top[2]} and "
                    f"{key_name(other[1])!r} -> {other[2]} are equally specific; make one "
                    "more specific or merge them"
                )
        return top[1], top[2]

    def resolve(self, module: nn.Module) -> dict[str, Policy]:
        """The effective policy of every submodule of ``module``, by dotted path.

        Raises:
            TypeError: ``module`` is not an ``nn.Module``.
            ValueError: conflicting rules, or (with ``on_unmatched="error"``) a rule that
                matches nothing.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        plan: dict[str, Policy] = {}
        used: set[Key] = set()
        for path, sub in module.named_modules():
            best = self._best(path, sub, param=False, used=used)
            if best is not None:
                plan[path] = best[1]
            else:
                plan[path] = plan[path.rpartition(".")[0]] if path else self.default
        for name in _reparam.own_tensors(module):
            self._best(name, None, param=True, used=used)
        self._report_unmatched(used, module)
        return plan

    def _report_unmatched(self, used: set[Key], module: nn.Module) -> None:
        unmatched = [k for k, _ in self.rules if k not in used]
        if not unmatched or self.on_unmatched == "ignore":
            return
        paths = [p for p, _ in module.named_modules() if p]
        hints = "".join(
            f"; {key_name(k)!r}: did you mean {hint}?"
            for k in unmatched
            if (hint := unmatched_hint(k, module, paths))
        )
        message = (
            f"rules {[key_name(k) for k in unmatched]} match no module or parameter of "
            f"{type(module).__name__} (module paths include {paths[:12]}){hints}; fix the "
            "pattern or class, or pass on_unmatched='warn'/'ignore'"
        )
        if self.on_unmatched == "error":
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=3)

    def policy_for(self, module: nn.Module, path: str) -> Policy:
        """The effective policy of the submodule at ``path`` (``""`` for ``module`` itself)."""
        plan = self.resolve(module)
        if path not in plan:
            raise ValueError(f"{type(module).__name__} has no submodule {path!r}")
        return plan[path]

    # --- casting and applying ------------------------------------------------------------

    def cast_params(self, params: Any, *, module: nn.Module | None = None) -> Any:
        """Cast each parameter to the param dtype its rules give it.

        Names are the dotted key paths of ``params`` (``dict(model.named_parameters())``
        gives the module's own names). Class rules need ``module`` to know which class owns
        each parameter. A tensor used under several names (weights tied in ``module``, or one
        tensor given under two names) is cast once, to the widest param dtype of its names,
        and shared by all of them.
        """
        has_class_rules = any(not isinstance(k, str) for k, _ in self.rules)
        if module is None and has_class_rules:
            raise ValueError(
                "these rules have module-class keys: pass module=<the nn.Module> so that each "
                "parameter's owning module (and its class) is known"
            )
        plan = self.resolve(module) if module is not None else None
        if plan is None:
            check_class_names(self.rules, params)

        def param_dtype(name: str) -> torch.dtype:
            best = self._best(name, None, param=True)
            if best is not None:
                return best[1].param_dtype
            if plan is not None:
                return plan.get(owner(name, plan), self.default).param_dtype
            owner_rule = self._best(name.rpartition(".")[0], None, param=False)
            return (owner_rule[1] if owner_rule else self.default).param_dtype

        uses = tensor_uses(params, module)  # tensor -> every name it is used under

        def widest(x: torch.Tensor) -> torch.dtype:
            names = sorted(uses.get(x))
            dtype = param_dtype(names[0])
            for name in names[1:]:
                dtype = torch.promote_types(dtype, param_dtype(name))
            return dtype

        return _tree.cast_floating_by(params, widest)

    def keep_in_fp32(self, module: nn.Module, policy: PolicySpec = None) -> PolicyRules:
        """These rules plus the modules ``module`` declares must stay float32 (transformers).

        Hugging Face transformers models list such modules in ``_keep_in_fp32_modules``
        (honoured when loading in float16, as a guard against float16 overflow: T5's ``wo``)
        and ``_keep_in_fp32_modules_strict`` (honoured for float16 and bfloat16). Each entry
        that applies to this rules' default (its param or compute dtype) and matches a path of
        ``module`` becomes the pattern ``"*entry*"`` (transformers matches entries anywhere in
        a parameter's name) with ``policy``: by default float32 params and compute, outputs
        in the default's compute dtype. Patterns already among the rules are kept as they are.

        Examples:
            >>> from torch import nn
            >>> class T5Like(nn.Sequential):
            ...     _keep_in_fp32_modules = ["wo"]
            >>> model = T5Like()
            >>> model.add_module("wi", nn.Linear(4, 8))
            >>> model.add_module("wo", nn.Linear(8, 4))
            >>> rules = PolicyRules("16-true").keep_in_fp32(model)
            >>> rules.rules[-1][0], str(rules.rules[-1][1])
            ('*wo*', 'params=float32,compute=float32,output=float16')
            >>> PolicyRules("bf16-true").keep_in_fp32(model).rules  # not strict: float16 only
            ()
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if policy is None:
            keep = Policy(torch.float32, torch.float32, self.default.compute_dtype)
        else:
            keep = get_policy(policy)
        rules = list(self.rules)
        for pattern in keep_in_fp32_patterns(module, self.default):
            if pattern not in dict(rules):
                rules.append((pattern, keep))
        return PolicyRules(self.default, rules, on_unmatched=self.on_unmatched)
