"""Immutable states that are pytrees: tensor children and static settings, declared once.

A state class is a frozen dataclass deriving from :class:`State`. Each field is a pytree
child (a tensor that changes from step to step) unless it is declared with
:func:`static_field` (a setting that never changes). ``vmap``, ``torch.func.grad``,
``torch.compile`` and :func:`polprec.stack_trees` see the children as leaves and carry the
settings through every flatten/unflatten, unlike jmp's states. The same declaration drives
``to(device)`` and the state-dict round trip, which is also how a state goes through
``torch.distributed.checkpoint``: a dict of ``state_dict()``s saves and loads (the loaded dict
rebuilt with ``load_state_dict``); a state handed to ``dcp.load`` itself is refused.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Collection, Mapping
from types import FrameType
from typing import Any, TypeVar

import torch

from polprec import _tree

_S = TypeVar("_S", bound="State")


# static_field and _declare run when a state class is defined (at import), before a mutation
# test can switch them; tests/test_state.py checks the layouts they record.
# pragma: no mutate start
def static_field(**kwargs: Any) -> Any:
    """A dataclass field that is static metadata of the pytree, not a child."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


# (children, static) field names of every state class, filled in when the class is created:
# a plain dict lookup, which torch.compile traces without a graph break.
_LAYOUTS: dict[type[Any], tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _declare(cls: type[State]) -> None:
    """Record ``cls``'s layout: its bases' fields, then its own annotated ones in order.

    This runs in ``__init_subclass__``, before ``@dataclass`` has processed the class: the
    class body still holds the :func:`static_field` markers.
    """
    base = next(b for b in cls.__mro__[1:] if b in _LAYOUTS or b is State)
    children, static = _LAYOUTS.get(base, ((), ()))
    for name, annotation in inspect.get_annotations(cls).items():
        if name in children or name in static or str(annotation).startswith("ClassVar"):
            continue
        marker = cls.__dict__.get(name)
        if isinstance(marker, dataclasses.Field) and marker.metadata.get("static"):
            static = (*static, name)
        else:
            children = (*children, name)
    _LAYOUTS[cls] = (children, static)


# pragma: no mutate end
def _layout(cls: type[State]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return _LAYOUTS[cls]


def _flatten(obj: State) -> tuple[list[Any], tuple[Any, ...]]:
    children, static = _layout(type(obj))
    return [getattr(obj, n) for n in children], tuple(getattr(obj, n) for n in static)


def rebuild(cls: type[_S], children: Any, static: Any) -> _S:
    """A state from its children and settings, unvalidated.

    vmap and stacking rebuild states from batched or stacked tensors, which the
    constructor's checks would reject or would need a host synchronisation to check.
    """
    names, static_names = _layout(cls)
    obj = object.__new__(cls)
    for name, value in zip(names, children, strict=True):
        object.__setattr__(obj, name, value)
    for name, value in zip(static_names, static, strict=True):
        object.__setattr__(obj, name, value)
    return obj


def _flatten_present(obj: State) -> tuple[list[Any], tuple[Any, ...]]:
    """The pytree view of a state: its children without the ``None`` ones.

    A ``None`` child (an option a state does not use) is static, not a leaf: ``torch.func``
    and ``torch.compile`` walk trees with ``None`` as a leaf, and ``vmap(in_dims=0)`` rejects
    such a leaf.
    """
    children, static = _flatten(obj)
    present = tuple(c is not None for c in children)
    return [c for c in children if c is not None], (static, present)


def _unflatten_present(cls: type[_S], leaves: list[Any], context: tuple[Any, ...]) -> _S:
    static, present = context
    children: list[Any] = []
    k = 0
    for here in present:
        children.append(leaves[k] if here else None)
        k += here
    return rebuild(cls, children, static)


class State:
    """Base of polprec's pytree states (pytree registration, ``to``, state dicts)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _declare(cls)
        _tree.register_node(
            cls, _flatten_present, lambda leaves, context: _unflatten_present(cls, leaves, context)
        )

    def _replace(self: _S, **children: Any) -> _S:
        """A copy with some children replaced (unvalidated, like a pytree rebuild)."""
        if not torch.compiler.is_compiling():  # in short: the attributes, copied
            new = object.__new__(type(self))
            new.__dict__.update(self.__dict__)
            new.__dict__.update(children)
            return new
        leaves, static = _flatten(self)
        names = _layout(type(self))[0]
        values = dict(zip(names, leaves, strict=True))
        values.update(children)
        return rebuild(type(self), [values[n] for n in names], static)

    def to(self: _S, device: torch.device | str) -> _S:
        """A copy of this state with its tensors on ``device``."""
        leaves, static = _flatten(self)
        return rebuild(
            type(self), [_tree.tree_map(lambda t: t.to(device), x) for x in leaves], static
        )

    def state_dict(self) -> dict[str, Any]:
        """Tensors and settings as a dict that survives ``torch.load(weights_only=True)``."""
        children, static = _layout(type(self))
        out: dict[str, Any] = {"type": type(self).__name__}
        for name in children:
            out[name] = _tree.tree_map(lambda t: t.detach().clone(), getattr(self, name))
        out.update((name, getattr(self, name)) for name in static)
        return out

    @classmethod
    def from_state_dict(cls: type[_S], state_dict: Mapping[str, Any]) -> _S:
        """Rebuild a state from :meth:`state_dict`'s output (validated)."""
        children, static = _layout(cls)
        fields = set(children) | set(static)
        check_state_dict(cls, state_dict, fields)
        return cls(**{k: state_dict[k] for k in fields})

    # Not mutated: the check below reads this method's caller's frame, and a mutation
    # harness's dispatch wrapper would stand in that frame's place.
    def load_state_dict(self: _S, state_dict: Mapping[str, Any]) -> _S:  # pragma: no mutate block
        """A new state built from ``state_dict`` (this one is unchanged).

        ``torch.distributed.checkpoint`` loads into ``state.state_dict()`` (a dict of
        ``state_dict()``s is what it saves and loads); this rebuilds the state from the loaded
        dict.

        Raises:
            TypeError: ``state_dict`` is not a mapping; or ``torch.distributed.checkpoint.load``
                was handed this state itself and calls this, which would drop the new state.
            ValueError: ``state_dict`` is of another state class, or has missing or unknown
                keys.
        """
        _refuse_dcp_load(self, inspect.currentframe())
        return type(self).from_state_dict(state_dict)


def _refuse_dcp_load(state: State, frame: FrameType | None) -> None:
    """Raise a ``TypeError`` when ``frame``'s caller is ``torch.distributed.checkpoint``.

    DCP takes any object with ``state_dict`` and ``load_state_dict`` for its ``Stateful``
    protocol: ``dcp.save`` saves ``state_dict()`` (which works: the checkpoint is the one the
    dict pattern writes), and ``dcp.load`` loads into a fresh ``state_dict()`` and hands the
    result to ``load_state_dict``, whose return value it drops, expecting the object to have
    changed itself. A polprec state is immutable, so the object would keep its fresh values
    in silence. Making it change instead would need ``state_dict()`` to hand out the state's
    own tensors for DCP to overwrite, which writes into every state sharing them (a state
    and the one ``step`` or ``adjust`` returned share the tensors a step leaves as they
    are), and still misses what DCP replaces rather than overwrites (settings, tuples in
    the tree). The state-dict pattern costs one line and works with any number of ranks.
    """
    caller = frame.f_back if frame is not None else None
    module = str(caller.f_globals.get("__name__", "")) if caller is not None else ""
    if not module.startswith("torch.distributed.checkpoint"):
        return
    kind = type(state).__name__
    raise TypeError(
        f"torch.distributed.checkpoint.load was given a polprec {kind} itself: it calls "
        f"{kind}.load_state_dict and drops the new state it returns (polprec states are "
        "immutable), so the object would keep its fresh values. Load into its state_dict() "
        "and rebuild the state from that: sd = {'opt_state': opt_state.state_dict()}; "
        "dcp.load(sd, checkpoint_id=path); opt_state = opt_state.load_state_dict("
        "sd['opt_state']). (Saving the state object itself works: dcp.save stores its "
        "state_dict(), which that pattern loads.)"
    )


def check_state_dict(cls: type, state_dict: Any, fields: Collection[str]) -> None:
    """Refuse what ``cls.state_dict()`` did not make: no mapping, another ``"type"``, or
    keys other than ``fields`` (``"type"`` may be left out)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping, got {type(state_dict).__name__}; pass the "
            "output of state_dict()"
        )
    kind = state_dict.get("type", cls.__name__)
    if kind != cls.__name__:
        raise ValueError(f"state_dict is of a {kind}, not a {cls.__name__}")
    missing = sorted(set(fields) - set(state_dict))
    unknown = sorted(set(state_dict) - set(fields) - {"type"})
    if missing or unknown:
        raise ValueError(
            f"state_dict for {cls.__name__} has missing keys {missing} and unknown keys "
            f"{unknown}; expected keys {sorted({*fields, 'type'})}"
        )
