"""The one place that decides how polprec walks pytrees.

polprec walks trees with optree in the ``"torch"`` namespace, the registry that
``torch.utils._pytree.register_pytree_node`` feeds once ``torch.utils._cxx_pytree`` has been
imported (we import it here). The same trees therefore flatten identically for polprec,
``torch.func`` and ``torch.compile``. ``None`` is an empty node, as in ``torch.func``: it is
kept in the structure and never handed to a leaf function. Dict insertion order is kept.

While ``torch.compile`` traces, the same functions walk trees with ``torch.utils._pytree``
(the same registry), which every torch version's compiler traces natively; the specs they
return are then torch ``TreeSpec`` objects, which ``tree_unflatten`` accepts too. torch's
walk hands ``None`` to leaf functions as a leaf, so every leaf function here checks types.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import optree
import torch
import torch.utils._cxx_pytree  # mirrors torch's pytree registry into optree
import torch.utils._pytree as _torch_pytree

_NAMESPACE = "torch"
# How every optree walk here sees a tree: None an empty node, torch's registry.
_WALK: dict[str, Any] = {"none_is_leaf": False, "namespace": _NAMESPACE}

TreeSpec = optree.PyTreeSpec


def tree_flatten(tree: Any) -> tuple[list[Any], TreeSpec]:
    """Leaves (in a fixed order) and the structure of ``tree``."""
    if torch.compiler.is_compiling():
        return _torch_pytree.tree_flatten(tree)  # type: ignore[return-value]
    return optree.tree_flatten(tree, **_WALK)


def tree_unflatten(spec: TreeSpec, leaves: Sequence[Any]) -> Any:
    """Rebuild a tree of ``spec``'s structure from ``leaves``."""
    if isinstance(spec, _torch_pytree.TreeSpec):
        return _torch_pytree.tree_unflatten(list(leaves), spec)
    return optree.tree_unflatten(spec, leaves)


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree``."""
    if torch.compiler.is_compiling():
        return _torch_pytree.tree_leaves(tree)
    return optree.tree_leaves(tree, **_WALK)


def tree_structure(tree: Any) -> TreeSpec:
    """The structure of ``tree``."""
    if torch.compiler.is_compiling():
        return _torch_pytree.tree_structure(tree)  # type: ignore[return-value]
    return optree.tree_structure(tree, **_WALK)


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``fn`` leafwise over ``tree`` and trees of the same structure."""
    if torch.compiler.is_compiling():
        return _torch_pytree.tree_map(fn, tree, *rest)
    return optree.tree_map(fn, tree, *rest, **_WALK)


def tree_flatten_with_path(tree: Any) -> tuple[list[tuple[Any, ...]], list[Any], TreeSpec]:
    """Paths (tuples of keys), leaves and structure of ``tree``.

    While ``torch.compile`` traces, a tree holding a node registered without keys (torch's
    ``flatten_with_keys_fn``) is named by leaf positions ``(i,)`` instead.
    """
    if torch.compiler.is_compiling():
        try:
            pairs, spec = _torch_pytree.tree_flatten_with_path(tree)
        except ValueError:  # a registered node that gives no keys
            leaves, spec = _torch_pytree.tree_flatten(tree)
            return [(i,) for i in range(len(leaves))], leaves, spec  # type: ignore[return-value]
        paths = [tuple(_raw_key(k) for k in path) for path, _ in pairs]
        return paths, [x for _, x in pairs], spec  # type: ignore[return-value]
    return optree.tree_flatten_with_path(tree, **_WALK)


def _raw_key(entry: Any) -> Any:
    """The dict key, index or attribute name inside one of torch's key-path entries."""
    if isinstance(entry, _torch_pytree.MappingKey):
        return entry.key
    if isinstance(entry, _torch_pytree.SequenceKey):
        return entry.idx
    if isinstance(entry, _torch_pytree.GetAttrKey):
        return entry.name
    return entry


def path_str(path: Sequence[Any]) -> str:
    """A readable name for a leaf path, e.g. ``('layer', 0, 'weight')`` -> ``layer[0].weight``."""
    if not path:
        return "<root>"
    out = ""
    for key in path:
        if isinstance(key, int):
            out += f"[{key}]"
        elif isinstance(key, str) and key.isidentifier():
            out += f".{key}" if out else key
        else:
            out += f"[{key!r}]"
    return out


def is_float_tensor(x: Any) -> bool:
    """True for tensors with a floating-point dtype (the only leaves polprec casts)."""
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def register_node(
    cls: type[Any],
    flatten: Callable[[Any], tuple[list[Any], Any]],
    unflatten: Callable[[Any, Any], Any],
) -> None:
    """Register ``cls`` with torch's pytree registry (seen by torch.func, torch.compile, optree)."""

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], Any]:
        children, context = flatten(obj)
        return [(_torch_pytree.SequenceKey(i), c) for i, c in enumerate(children)], context

    _torch_pytree.register_pytree_node(
        cls,
        flatten,
        lambda children, context: unflatten(list(children), context),
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )


def map_floating(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to the floating tensor leaves of ``tree``; other leaves are kept as is."""
    if isinstance(tree, torch.Tensor):  # the common single-tensor case, without a tree walk
        return fn(tree) if tree.is_floating_point() else tree
    # Fast paths for the shapes every call sees (a params dict, an args tuple); same result
    # as the walk below: a new container of the same type with the same order.
    if type(tree) is dict and all(type(v) is torch.Tensor for v in tree.values()):
        return {k: fn(v) if v.is_floating_point() else v for k, v in tree.items()}
    if type(tree) is tuple and all(type(v) is torch.Tensor for v in tree):
        return tuple(fn(v) if v.is_floating_point() else v for v in tree)
    return tree_map(lambda x: fn(x) if is_float_tensor(x) else x, tree)


def cast_floating(tree: Any, dtype: torch.dtype) -> Any:
    """Cast floating tensor leaves to ``dtype``; every other leaf is returned as is.

    A tensor that appears more than once (tied weights named twice) is cast once and the cast
    is shared, so the result keeps the aliasing of the input.
    """
    if isinstance(tree, torch.Tensor):
        return tree if not tree.is_floating_point() or tree.dtype == dtype else tree.to(dtype)
    if type(tree) in (dict, tuple) and not torch.compiler.is_compiling():
        # The shapes every call sees (a params dict, an args tuple), without a tree walk.
        values = tree.values() if type(tree) is dict else tree
        if all(type(v) is torch.Tensor for v in values):
            if all(v.dtype is dtype or not v.is_floating_point() for v in values):
                return dict(tree) if type(tree) is dict else tree  # nothing to cast
            casts: dict[int, torch.Tensor] = {}

            def cast(x: torch.Tensor) -> torch.Tensor:
                if not x.is_floating_point() or x.dtype == dtype:
                    return x
                out = casts.get(id(x))
                if out is None:
                    out = casts[id(x)] = x.to(dtype)
                return out

            if type(tree) is dict:
                return {k: cast(v) for k, v in tree.items()}
            return tuple(cast(v) for v in tree)
    return cast_floating_by(tree, lambda x: dtype)


def cast_floating_by(tree: Any, dtype_of: Callable[[torch.Tensor], torch.dtype]) -> Any:
    """Cast each floating tensor leaf ``x`` to ``dtype_of(x)``, once per tensor (aliases kept)."""
    casts = TensorMemo()

    def cast(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = casts.get(x)
        if out is None:
            dtype = dtype_of(x)
            out = casts.put(x, x if x.dtype == dtype else x.to(dtype))
        return out

    return map_floating(tree, cast)


class TensorMemo:
    """Values kept per tensor *object*, to treat a tensor that appears twice (tied) once.

    In eager mode the tensors are found by ``id``; while ``torch.compile`` traces, by ``is``
    against each one kept, because Dynamo guards every ``id`` taken of an input tensor on that
    object, which would recompile the step for every new batch of parameters.
    """

    def __init__(self) -> None:
        self._compiling = torch.compiler.is_compiling()
        self._by_id: dict[int, tuple[torch.Tensor, Any]] = {}
        self._pairs: list[tuple[torch.Tensor, Any]] = []

    def get(self, x: torch.Tensor) -> Any:
        """The value kept for ``x``, or ``None``."""
        if self._compiling:
            for kept, value in self._pairs:
                if kept is x:
                    return value
            return None
        pair = self._by_id.get(id(x))
        return None if pair is None else pair[1]

    def put(self, x: torch.Tensor, value: Any) -> Any:
        """Keep ``value`` for ``x`` (and ``x`` alive); returns ``value``."""
        if self._compiling:
            self._pairs.append((x, value))
        else:
            self._by_id[id(x)] = (x, value)
        return value

    def values(self) -> list[Any]:
        """The values kept, in the order they were put."""
        return [v for _, v in (self._pairs or self._by_id.values())]


def check_tree(tree: Any, name: str) -> None:
    """Refuse the roots that would pass through a tree function untouched by mistake.

    A module or an iterator (``model.parameters()``) is a single opaque leaf to a tree walk:
    every function would return it unchanged, silently.
    """
    if isinstance(tree, torch.nn.Module):
        raise TypeError(
            f"{name} must be a tree of tensors, got the module {type(tree).__name__} itself; "
            "pass its tensors by name: {k: v.detach() for k, v in model.named_parameters()}"
        )
    if isinstance(tree, Iterator):
        raise TypeError(
            f"{name} must be a tree of tensors, got a {type(tree).__name__} (an iterator, such "
            "as model.parameters(), is used up once and has no names); pass "
            "{k: v.detach() for k, v in model.named_parameters()}"
        )


def flatten_up_to(spec: TreeSpec, tree: Any) -> list[Any]:
    """The subtrees of ``tree`` at the leaves of ``spec``, in leaf order.

    ``tree`` must have ``spec``'s structure as a prefix: where ``spec`` has a leaf, ``tree``
    may hold anything, ``None`` included (a ``None`` gradient or an absent optimizer moment).
    Raises ``ValueError`` when the structures differ above the leaves.
    """
    return list(spec.flatten_up_to(tree))
