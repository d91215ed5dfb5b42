"""Precision islands: a default policy plus per-module-class and per-path policies."""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from polprec import _tree
from polprec.policy import Policy, PolicySpec, get_policy

__all__ = ["PolicyRules"]

Key = type[nn.Module] | str
_UNMATCHED = ("error", "warn", "ignore")


def _check_pattern(pattern: str) -> None:
    if not pattern or pattern != pattern.strip() or " " in pattern:
        raise ValueError(
            f"bad path pattern {pattern!r}: use a non-empty glob over dotted module or "
            "parameter paths without spaces, e.g. 'head.*', '*.norm*', 'encoder.layers.0.*'"
        )
    if pattern.count("[") != pattern.count("]"):
        raise ValueError(f"bad path pattern {pattern!r}: unbalanced '[' ']' in the glob")


def _literal_chars(pattern: str) -> int:
    return sum(1 for c in pattern if c not in "*?[]")


def _key_name(key: Key) -> str:
    return key if isinstance(key, str) else f"{key.__module__}.{key.__qualname__}"


@dataclasses.dataclass(frozen=True, init=False)
class PolicyRules:
    """A default :class:`Policy` with exceptions per module class and per path (islands).

    Keys are ``nn.Module`` subclasses (``nn.BatchNorm2d``: every instance, subclasses
    included) or glob patterns over dotted paths (``"head.*"``, ``"*.norm*"``); a pattern that
    matches everything inside a module (``"head.*"``) matches that module too. A module's
    policy is the most specific rule that matches it, else its parent's (a rule covers the
    module's whole subtree), else the default:

    * a path pattern beats a class; among patterns, more literal characters win;
    * among classes, the closest in the module's MRO wins (``BatchNorm2d`` over ``Module``);
    * two different policies tied for most specific are a ``ValueError``.

    In :func:`~polprec.apply_with_policy` a module whose policy differs from its parent's
    runs as an island: its floating inputs are cast to its compute dtype, autocast is set for
    its policy (on for mixed policies, off otherwise), its parameters are cast to its compute
    dtype where autocast does not do it, and its floating outputs are cast to its output
    dtype. Modules under a policy without autocast ("true" policies) also get their floating
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
            if isinstance(key, str):
                _check_pattern(key)
            elif not (isinstance(key, type) and issubclass(key, nn.Module)):
                raise TypeError(
                    f"rule key {key!r} must be an nn.Module subclass (e.g. nn.LayerNorm) or a "
                    "glob pattern over module/parameter paths (e.g. 'head.*')"
                )
            if key in seen:
                raise ValueError(f"rule key {_key_name(key)!r} is given twice")
            seen.add(key)
            try:
                checked.append((key, get_policy(spec)))
            except (TypeError, ValueError) as err:
                raise type(err)(f"rule {_key_name(key)!r}: {err}") from None
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
        for key, policy in self.rules:
            if isinstance(key, str):
                # "head.*" names head's contents; as a module rule it covers head itself too.
                if fnmatch.fnmatchcase(path, key) or (
                    not param and path and fnmatch.fnmatchcase(path + ".", key)
                ):
                    ranked.append(((3 if param else 2, _literal_chars(key)), key, policy))
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
                    f"{path or '<root>'!r}: {_key_name(top[1])!r} -> {top[2]} and "
                    f"{_key_name(other[1])!r} -> {other[2]} are equally specific; make one "
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
        for name, _ in _named_tensors(module):
            self._best(name, None, param=True, used=used)
        self._report_unmatched(used, module)
        return plan

    def _report_unmatched(self, used: set[Key], module: nn.Module) -> None:
        unmatched = [k for k, _ in self.rules if k not in used]
        if not unmatched or self.on_unmatched == "ignore":
            return
        paths = [p for p, _ in module.named_modules() if p][:12]
        message = (
            f"rules {[_key_name(k) for k in unmatched]} match no module or parameter of "
            f"{type(module).__name__} (module paths include {paths}); fix the pattern or class, "
            "or pass on_unmatched='warn'/'ignore'"
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
        each parameter.
        """
        has_class_rules = any(not isinstance(k, str) for k, _ in self.rules)
        if module is None and has_class_rules:
            raise ValueError(
                "these rules have module-class keys: pass module=<the nn.Module> so that each "
                "parameter's owning module (and its class) is known"
            )
        plan = self.resolve(module) if module is not None else None

        def cast(name: str, x: Any) -> Any:
            best = self._best(name, None, param=True)
            if best is not None:
                policy = best[1]
            elif plan is not None:
                policy = plan.get(owner(name, plan), self.default)
            else:
                owner_rule = self._best(name.rpartition(".")[0], None, param=False)
                policy = owner_rule[1] if owner_rule else self.default
            return policy.cast_to_param(x)

        return map_named(params, cast)


def owner(name: str, plan: Mapping[str, Policy]) -> str:
    """The deepest module path in ``plan`` that owns the tensor called ``name``."""
    owner = name.rpartition(".")[0]
    while owner and owner not in plan:
        owner = owner.rpartition(".")[0]
    return owner


def _named_tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def map_named(tree: Any, fn: Callable[[str, Any], Any]) -> Any:
    """Map ``fn(dotted_path, leaf)`` over ``tree`` (or over a tuple of dicts)."""
    if isinstance(tree, tuple) and all(isinstance(t, Mapping) for t in tree):
        return tuple(map_named(t, fn) for t in tree)  # functional_call's tuple form
    paths, leaves, spec = _tree.tree_flatten_with_path(tree)
    out = [fn(".".join(str(k) for k in p), x) for p, x in zip(paths, leaves, strict=True)]
    return _tree.tree_unflatten(spec, out)
