"""The plan of a step: what depends only on the trees' structure, worked out once.

Which leaves have gradients, their dtypes, devices, shapes (a DTensor's local ones) and
layouts, each leaf's optimizer, mode and path key, and the groups one kernel launch each
updates (one optimizer, device and work dtype): :func:`plan_for` makes a :class:`Plan` the
first time an optimizer meets trees of a structure and keeps it on the optimizer, keyed on
that structure (:func:`_signature`). Every error about the trees' structure is raised while
making it. :class:`Flat` lines the leaves of params and grads up, and of the state trees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from polprec import _dtensor, _fused, _tree
from polprec.optim._precision import Mode
from polprec.optim._rounding import path_key

__all__ = ["Flat", "Group", "Labels", "Plan", "active", "mismatch", "plan_for"]

#: Plans kept per optimizer; beyond this many structures the oldest are dropped.
_MAX_PLANS = 32


class Flat:
    """The leaves of ``params`` and ``grads``, lined up, and how to rebuild a tree of them.

    A dict of tensors, the usual params, is taken apart without a tree walk.
    """

    __slots__ = ("grads", "keys", "leaves", "params", "spec")

    def __init__(self, params: Any, grads: Any) -> None:
        self.params = params
        if (
            type(params) is dict
            and type(grads) is dict
            and len(grads) == len(params)
            and all(isinstance(v, torch.Tensor) for v in params.values())
        ):
            keys = tuple(params)
            try:
                self.grads: list[Any] = [grads[k] for k in keys]
            except KeyError:
                pass
            else:
                self.keys: tuple[Any, ...] | None = keys
                self.leaves: list[Any] = list(params.values())
                self.spec: Any = None
                return
        self.keys = None
        self.leaves, self.spec = _tree.tree_flatten(params)
        try:
            self.grads = _tree.flatten_up_to(self.spec, grads)
        except (ValueError, TypeError):
            raise mismatch(params, grads, "grads", "None where a leaf has no gradient") from None

    @classmethod
    def of(cls, params: Any) -> Flat:
        """The leaves of ``params`` alone (no gradients)."""
        if type(params) is dict and all(isinstance(v, torch.Tensor) for v in params.values()):
            return cls(params, dict.fromkeys(params))
        leaves, spec = _tree.tree_flatten(params)
        return cls(params, _tree.tree_unflatten(spec, [None] * len(leaves)))

    def token(self) -> Any:
        """The structure, as a hashable value: a dict's keys (a tuple, never equal to a
        TreeSpec) or the tree's spec."""
        return self.keys if self.keys is not None else self.spec

    def dotted(self) -> list[str]:
        """Each leaf's dotted key path (``"blocks.0.weight"``), for labels and path keys."""
        if self.keys is not None:
            return [str(k) for k in self.keys]
        raw, _, _ = _tree.tree_flatten_with_path(self.params)
        return [".".join(str(k) for k in p) for p in raw]

    def name(self, i: int) -> str:
        """The readable path of leaf ``i`` (``layer.w``, ``['0.weight']``), for errors only:
        worked out when one is raised, so that a traced step does not trace it."""
        if self.keys is not None:
            return _tree.path_str((self.keys[i],))
        raw, _, _ = _tree.tree_flatten_with_path(self.params)
        return _tree.path_str(raw[i])

    def align(self, tree: Any, name: str) -> list[Any]:
        """The leaves of a tree shaped like ``params`` (a state's), lined up with them."""
        if self.keys is not None and type(tree) is dict and len(tree) == len(self.keys):
            try:
                return [tree[k] for k in self.keys]
            except KeyError:
                pass
        spec = self.spec if self.spec is not None else _tree.tree_structure(self.params)
        try:
            return _tree.flatten_up_to(spec, tree)
        except (ValueError, TypeError):
            hint = "was the state made by init(params) for these params?"
            raise mismatch(self.params, tree, name, hint) from None

    def rebuild(self, leaves: Sequence[Any]) -> Any:
        """A tree of ``params``' structure (and key order) holding ``leaves``."""
        if self.keys is not None:
            return dict(zip(self.keys, leaves, strict=True))
        return _tree.tree_unflatten(self.spec, leaves)


def mismatch(params: Any, other: Any, what: str, hint: str) -> ValueError:
    """A ValueError naming the paths where ``other``'s structure departs from ``params``'."""
    p_paths = {_tree.path_str(p) for p in _tree.tree_flatten_with_path(params)[0]}
    o_paths = {_tree.path_str(p) for p in _tree.tree_flatten_with_path(other)[0]}
    missing, extra = sorted(p_paths - o_paths), sorted(o_paths - p_paths)
    return ValueError(
        f"{what} must have the structure of params ({hint}); missing in {what}: "
        f"{missing or 'none'}, not in params: {extra or 'none'}; params: "
        f"{_tree.tree_structure(params)}"
    )


class Group(NamedTuple):
    """Leaves one kernel launch updates: one optimizer, one device, one work dtype."""

    member: int  # which optimizer (0 for a single one; a label's position in a partition)
    device: torch.device
    work: torch.dtype
    idx: tuple[int, ...]  # leaf positions
    modes: tuple[Mode, ...]
    shapes: tuple[torch.Size, ...]
    keys: tuple[int, ...]  # path keys, for stochastic rounding (empty when no leaf rounds so)
    direct: bool  # every leaf updated on (copies of) itself, as torch.optim does
    sharded: bool  # some leaves are DTensors: updated on their local shards
    fused: bool  # the optimizer's fused kernel implements its settings on this device


class Plan(NamedTuple):
    """What a step on trees of one structure does, leaf by leaf, worked out once."""

    groups: tuple[Group, ...]
    active: tuple[int, ...]  # leaves with a gradient, in leaf order
    members: tuple[int, ...]  # which members have a group
    sharded: bool  # some updated leaves are DTensors


def _layout(x: Any) -> str:
    if _dtensor.is_dtensor(x):
        return f"a DTensor with placements {tuple(x.placements)} on {x.device_mesh}"
    return f"a {type(x).__name__}"


#: ``labels(flat, floats) -> member index per leaf`` (``None`` for the leaves no optimizer
#: updates); ``None``: every floating leaf is member 0's.
Labels = Callable[[Flat, list[str]], list[int | None]] | None


def _leaf_signature(x: Any) -> Any:
    """What a plan depends on of one leaf: kind, dtype, device, shape (and a DTensor's layout)."""
    if type(x) is torch.Tensor:
        return (x.dtype, x.device, x.shape)
    if isinstance(x, torch.Tensor):
        layout = (x.device_mesh, x.placements) if _dtensor.is_dtensor(x) else ()  # type: ignore[attr-defined]
        return (type(x), x.dtype, x.device, x.shape, *layout)
    return type(x)


def _signature(flat: Flat) -> tuple[Any, ...]:
    """What the plan depends on: the structure and every leaf's signature."""
    return (
        flat.token(),
        tuple(_leaf_signature(p) for p in flat.leaves),
        tuple(_leaf_signature(g) for g in flat.grads),
    )


def plan_for(plans: dict[Any, Plan], flat: Flat, members: Sequence[Any], labels: Labels) -> Plan:
    """The plan for these trees, from ``plans`` (kept by the optimizer) or made and kept there;
    made afresh while tracing (a cache is a side effect to a tracer)."""
    if torch.compiler.is_compiling():
        return _make_plan(flat, members, labels)
    key = _signature(flat)
    plan = plans.get(key)
    if plan is None:
        plan = _make_plan(flat, members, labels)
        if len(plans) >= _MAX_PLANS:
            plans.pop(next(iter(plans)))
        plans[key] = plan
    return plan


def _make_plan(flat: Flat, members: Sequence[Any], labels: Labels) -> Plan:
    updated = active(flat)
    dotted: list[str] | None = None  # worked out only where labels or path keys need it
    if labels is None:
        label_of: list[int | None] = [0] * len(flat.leaves)
    else:
        dotted = flat.dotted()
        label_of = labels(flat, dotted)
    grouped: dict[tuple[int, torch.device, torch.dtype], list[int]] = {}
    for i in updated:
        m = label_of[i]
        if m is None:
            continue
        p = flat.leaves[i]
        if not _dtensor.same_layout(p, flat.grads[i]):
            raise ValueError(
                f"the gradient of {flat.name(i)} is not laid out as its parameter: "
                f"{_layout(flat.grads[i])} against {_layout(p)}; a DTensor parameter needs a "
                "DTensor gradient on its mesh with its placements (as value_and_grad returns)"
            )
        mode = members[m].mode(p.dtype)
        grouped.setdefault((m, p.device, mode.work), []).append(i)
    groups = []
    for (m, device, work), idx in grouped.items():
        opt = members[m]
        modes = tuple(opt.mode(flat.leaves[i].dtype) for i in idx)
        if dotted is None and any(mode.stochastic for mode in modes):
            dotted = flat.dotted()
        # DTensors are updated on their local shards: plain tensors to torch's kernels
        sharded = any(_dtensor.is_dtensor(flat.leaves[i]) for i in idx)
        plain_tensors = all(
            type(x) is torch.Tensor or type(x) is torch.nn.Parameter or _dtensor.is_dtensor(x)
            for i in idx
            for x in (flat.leaves[i], flat.grads[i])
        )
        groups.append(
            Group(
                member=m,
                device=device,
                work=work,
                idx=tuple(idx),
                modes=modes,
                shapes=tuple(_dtensor.local_shard(flat.leaves[i]).shape for i in idx),
                keys=tuple(path_key(dotted[i]) for i in idx) if dotted is not None else (),
                direct=all(mode.direct for mode in modes),
                sharded=sharded,
                fused=opt.fusable() and device.type in _fused.OPTIM_DEVICES and plain_tensors,
            )
        )
    stepped = sorted(i for g in groups for i in g.idx)
    members_used = tuple(sorted({g.member for g in groups}))
    return Plan(tuple(groups), tuple(stepped), members_used, any(g.sharded for g in groups))


def active(flat: Flat) -> list[int]:
    """The leaves to update (floating, with a gradient), after checking every gradient."""
    found = []
    for i, (p, g) in enumerate(zip(flat.leaves, flat.grads, strict=True)):
        if g is None:
            continue
        if isinstance(p, torch.Tensor) and p.is_complex():
            raise TypeError(
                f"parameter {flat.name(i)} is complex ({p.dtype}); polprec.optim updates real "
                "floating-point parameters (pass torch.view_as_real(p))"
            )
        if not _tree.is_float_tensor(p):
            if isinstance(g, torch.Tensor):
                raise ValueError(
                    f"grads has a tensor at {flat.name(i)}, where params has a non-floating "
                    f"{type(p).__name__} leaf; its gradient must be None"
                )
            continue
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            got = f"dtype {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
            raise TypeError(
                f"the gradient of {flat.name(i)} must be a floating tensor or None, got {got}"
            )
        if g.shape != p.shape:
            raise ValueError(
                f"the gradient of {flat.name(i)} has shape {tuple(g.shape)}, its parameter "
                f"{tuple(p.shape)}"
            )
        found.append(i)
    return found
