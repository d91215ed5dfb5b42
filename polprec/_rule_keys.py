"""The keys of :class:`~polprec.PolicyRules`: validating them, matching them, naming them.

A key is an ``nn.Module`` subclass or a string. A string is a glob over dotted module and
parameter paths; one made only of identifier characters (``"LayerNorm"``) also names every
class of that ``__name__`` in a module's MRO, so that a class can be given by name (the class
of a model you did not write, such as a transformers model's ``LlamaRMSNorm``). Where such a
string also matches a path, the path wins, as paths beat classes. Also here: the hints for a
key that matches nothing, and the walk over a tree's dotted paths.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from polprec import _reparam, _tree
from polprec.policy import Policy

__all__ = [
    "Key",
    "check_class_names",
    "check_key",
    "class_names",
    "keep_in_fp32_patterns",
    "key_name",
    "literal_chars",
    "map_named",
    "named_leaves",
    "owner",
    "tensor_uses",
    "unmatched_hint",
]

# Hugging Face transformers' declarations of modules that must stay float32, and the dtypes
# each applies to: float16 only for the first (a precaution against float16 overflow), any
# 16-bit type for the strict one.
_KEEP_IN_FP32 = (
    ("_keep_in_fp32_modules", (torch.float16,)),
    ("_keep_in_fp32_modules_strict", (torch.float16, torch.bfloat16)),
)

Key = type[nn.Module] | str


def check_key(key: Any) -> None:
    """Refuse a key that is neither a module class nor a well-formed path glob."""
    if isinstance(key, str):
        if not key or key != key.strip() or " " in key:
            raise ValueError(
                f"bad path pattern {key!r}: use a non-empty glob over dotted module or parameter "
                "paths without spaces, e.g. 'head.*', '*.norm*', 'encoder.layers.0.*', or a "
                "class name such as 'LayerNorm'"
            )
        if key.count("[") != key.count("]"):
            raise ValueError(f"bad path pattern {key!r}: unbalanced '[' ']' in the glob")
    elif not (isinstance(key, type) and issubclass(key, nn.Module)):
        raise TypeError(
            f"rule key {key!r} must be an nn.Module subclass (e.g. nn.LayerNorm), a glob pattern "
            "over module/parameter paths (e.g. 'head.*') or a class name (e.g. 'LayerNorm')"
        )


def literal_chars(pattern: str) -> int:
    """How specific a glob is: its characters that are no wildcard."""
    return sum(1 for c in pattern if c not in "*?[]")


def key_name(key: Key) -> str:
    """A key as error messages show it."""
    return key if isinstance(key, str) else f"{key.__module__}.{key.__qualname__}"


def names_a_class(key: str) -> bool:
    """Whether a string key may name a class (identifier characters only)."""
    return key.isidentifier()


def class_names(module: nn.Module) -> dict[str, type]:
    """Every class in the MRO of ``module``'s submodules, by ``__name__`` (``object`` excluded)."""
    names: dict[str, type] = {}
    for sub in module.modules():
        for cls in type(sub).__mro__[:-1]:
            names.setdefault(cls.__name__, cls)
    return names


def unmatched_hint(key: Key, module: nn.Module, paths: list[str]) -> str:
    """``"the class 'X'"`` or ``"the path 'x'"`` for a string key close to one, else ``""``."""
    if not isinstance(key, str):
        return ""
    classes = class_names(module)
    close = difflib.get_close_matches(key, list(classes), n=1, cutoff=0.6)
    if close:
        return f"the class {close[0]!r}"
    close = difflib.get_close_matches(key, paths, n=1, cutoff=0.6)
    return f"the path {close[0]!r}" if close else ""


def map_named(tree: Any, fn: Callable[[str, Any], Any]) -> Any:
    """Map ``fn(dotted_path, leaf)`` over ``tree`` (or over a tuple of dicts)."""
    if isinstance(tree, tuple) and all(isinstance(t, Mapping) for t in tree):
        return tuple(map_named(t, fn) for t in tree)  # functional_call's tuple form
    paths, leaves, spec = _tree.tree_flatten_with_path(tree)
    out = [fn(".".join(str(k) for k in p), x) for p, x in zip(paths, leaves, strict=True)]
    return _tree.tree_unflatten(spec, out)


def named_leaves(tree: Any) -> Iterable[tuple[str, Any]]:
    """``(dotted_path, leaf)`` of every leaf of ``tree`` (or of a tuple of dicts)."""
    found: list[tuple[str, Any]] = []
    map_named(tree, lambda name, x: found.append((name, x)))
    return found


def owner(name: str, plan: Mapping[str, Any]) -> str:
    """The deepest module path in ``plan`` that owns the tensor called ``name``."""
    owner = name.rpartition(".")[0]
    while owner and owner not in plan:
        owner = owner.rpartition(".")[0]
    return owner


def tensor_uses(params: Any, module: nn.Module | None) -> _tree.TensorMemo:
    """Every floating tensor of ``params`` and the set of all names it is used under.

    Those are its names in ``params`` and, given ``module``, every name of the module's
    tensor that one of them is tied to (an embedding and the output layer sharing it).
    """
    uses = _tree.TensorMemo()
    for name, x in named_leaves(params):
        if _tree.is_float_tensor(x):
            names = uses.get(x)
            (uses.put(x, set()) if names is None else names).add(name)
    if module is not None:
        tied: dict[int, set[str]] = {}
        for name, tensor in _reparam.own_tensors(module).items():
            tied.setdefault(id(tensor), set()).add(name)
        by_name = {n: names for names in tied.values() if len(names) > 1 for n in names}
        for names in uses.values():
            names.update(*(by_name.get(n, ()) for n in list(names)))
    return uses


def check_class_names(rules: Iterable[tuple[Key, Any]], params: Any) -> None:
    """Without a module, a string key can only be a path: refuse one that matches none."""
    names = [name for name, _ in named_leaves(params)]
    candidates = [*names, *{name.rpartition(".")[0] for name in names}]
    for key, _ in rules:
        if (
            isinstance(key, str)
            and names_a_class(key)
            and not any(fnmatch.fnmatchcase(n, key) for n in candidates)
        ):
            raise ValueError(
                f"rule {key!r} matches no parameter path; if it names a class, pass "
                "module=<the nn.Module> so that the classes are known"
            )


def keep_in_fp32_patterns(module: nn.Module, default: Policy) -> list[str]:
    """``"*entry*"`` for each float32 declaration of ``module`` that applies to ``default``.

    A declaration applies when ``default`` stores or computes in one of its dtypes; an entry
    is kept when its pattern matches a module or tensor path of ``module``.
    """
    dtypes = (default.param_dtype, default.compute_dtype)
    paths = [p for p, _ in module.named_modules() if p] + list(_reparam.own_tensors(module))
    patterns: list[str] = []
    for attribute, applies_to in _KEEP_IN_FP32:
        entries = getattr(module, attribute, None)
        if not isinstance(entries, list | tuple | set | frozenset):
            continue
        if not any(d in applies_to for d in dtypes):
            continue
        for entry in sorted(e for e in entries if isinstance(e, str) and e):
            pattern = f"*{entry}*"
            if pattern not in patterns and any(fnmatch.fnmatchcase(p, pattern) for p in paths):
                patterns.append(pattern)
    return patterns
