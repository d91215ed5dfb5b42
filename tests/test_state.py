"""Pytree states declared once: children, static settings, inheritance, to(), state dicts."""

from __future__ import annotations

import dataclasses
import io
from typing import Any, ClassVar

import pytest
import torch

import polprec as pp
from polprec import _state, _tree


def _classes() -> tuple[type[Any], type[Any], type[Any]]:
    """Fresh state classes (a class registers itself once, when it is defined)."""

    @dataclasses.dataclass(frozen=True, eq=False)
    class Base(_state.State):
        weight: Any
        note: ClassVar[str] = "class attribute, not a field"
        period: int = _state.static_field(default=3)
        moments: Any = None

    @dataclasses.dataclass(frozen=True, eq=False)
    class Child(Base):
        extra: Any = None
        name: str = _state.static_field(default="child")

    class Plain(Child):  # a subclass that declares nothing new
        pass

    return Base, Child, Plain


def test_fields_are_children_unless_declared_static() -> None:
    Base, Child, Plain = _classes()
    assert _state._LAYOUTS[Base] == (("weight", "moments"), ("period",))
    assert _state._LAYOUTS[Child] == (("weight", "moments", "extra"), ("period", "name"))
    assert _state._LAYOUTS[Plain] == _state._LAYOUTS[Child]
    field = _state.static_field(default=1)
    assert field.metadata["static"] is True and field.default == 1
    assert dict(pp.DynamicLossScale().state_dict()).keys() >= {"period", "loss_scale"}


def test_flatten_keeps_settings_and_tree_children_round_trip() -> None:
    _, Child, Plain = _classes()
    state = Plain(torch.ones(2), 5, {"m": torch.zeros(3), "skip": None}, torch.tensor(1), "p")
    leaves, spec = _tree.tree_flatten(state)
    assert [tuple(x.shape) for x in leaves] == [(2,), (3,), ()]
    back = _tree.tree_unflatten(spec, [x + 1 for x in leaves])
    assert type(back) is Plain and (back.period, back.name) == (5, "p")
    assert back.moments["skip"] is None and back.moments["m"].tolist() == [1.0] * 3
    plain = Plain(torch.ones(2), 5, {"m": torch.zeros(3)}, torch.tensor(1), "p")
    doubled = torch.func.vmap(lambda s: s._replace(weight=s.weight * 2))(
        pp.stack_trees([plain, plain])
    )
    assert doubled.weight.tolist() == [[2.0, 2.0]] * 2 and doubled.period == 5
    with pytest.raises(ValueError, match="zip"):
        _state.rebuild(Child, [torch.ones(1)], (1, "x"))  # too few children


def test_to_and_state_dict_walk_tree_children() -> None:
    _, Child, _ = _classes()
    state = Child(torch.ones(2), 4, {"m": torch.zeros(2)}, None, "c")
    moved = state.to("meta")
    assert moved.weight.device.type == "meta" and moved.moments["m"].device.type == "meta"
    assert (moved.period, moved.name, moved.extra) == (4, "c", None)
    sd = state.state_dict()
    assert sd["type"] == "Child" and sd["period"] == 4 and sd["name"] == "c"
    assert sd["moments"]["m"] is not state.moments["m"]  # copies, detached
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = Child.from_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.moments["m"].tolist() == [0.0, 0.0] and loaded.name == "c"
    replaced = state._replace(extra=torch.tensor(7))
    assert int(replaced.extra) == 7 and state.extra is None and replaced.period == 4


@pytest.mark.parametrize("tracing", [False, True], ids=["eager", "as-traced"])
def test_replace_gives_the_same_state_eagerly_and_as_traced(
    tracing: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Eagerly _replace copies the attributes; while torch.compile traces it rebuilds from the
    # layout (what Dynamo follows). Both must give the same state, the input unchanged.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: tracing)
    _, Child, _ = _classes()
    state = Child(torch.ones(2), 4, {"m": torch.zeros(2)}, torch.tensor(1), "c")
    new = state._replace(extra=torch.tensor(7), weight=torch.full((2,), 3.0))
    assert type(new) is Child and new is not state
    assert new.weight.tolist() == [3.0, 3.0] and int(new.extra) == 7
    assert new.moments is state.moments and (new.period, new.name) == (4, "c")
    assert state.weight.tolist() == [1.0, 1.0] and int(state.extra) == 1


def test_absent_children_stay_absent_through_a_tree_round_trip() -> None:
    # None children are not leaves: the leaves after one line up with the right fields.
    _, Child, _ = _classes()
    state = Child(torch.ones(2), 4, None, torch.tensor(7), "c")
    leaves, spec = _tree.tree_flatten(state)
    assert [x.tolist() for x in leaves] == [[1.0, 1.0], 7]
    back = _tree.tree_unflatten(spec, [x * 2 for x in leaves])
    assert back.moments is None and int(back.extra) == 14 and back.weight.tolist() == [2.0, 2.0]
