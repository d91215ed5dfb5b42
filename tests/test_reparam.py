"""The cheaper functional_call: the same results as torch's, and a layout that notices changes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from polprec import _reparam


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens)))


def _both(module: nn.Module, params: dict[str, Any], *args: Any, **kw: Any) -> tuple[Any, Any]:
    ours = _reparam.call(module, params, args, {}, strict=False, **kw)
    theirs = torch.func.functional_call(module, params, args, strict=False, **kw)
    return ours, theirs


@pytest.mark.parametrize("tie_weights", [True, False])
def test_same_results_as_functional_call_with_ties_and_buffers(tie_weights: bool) -> None:
    torch.manual_seed(0)
    model = Tied().eval()
    tokens = torch.tensor([0, 3, 4, 1])
    shared = torch.randn(5, 4)
    for params in (
        {"embed.weight": shared},  # one tied name: the other follows when tying
        {"embed.weight": shared, "head.weight": shared},
        {"norm.running_mean": torch.ones(4), "norm.weight": torch.full((4,), 2.0)},
        {},
    ):
        ours, theirs = _both(model, params, tokens, tie_weights=tie_weights)
        assert torch.equal(ours, theirs)
    assert model.head.weight is model.embed.weight  # restored
    assert not torch.equal(model.embed.weight, shared)


def test_different_tensors_under_tied_names_are_refused() -> None:
    model = Tied().eval()
    with pytest.raises(ValueError, match="different values for keys"):
        _reparam.call(
            model,
            {"embed.weight": torch.zeros(5, 4), "head.weight": torch.ones(5, 4)},
            (torch.tensor([0]),),
            {},
            strict=False,
            tie_weights=True,
        )
    out = _reparam.call(  # without tying, each name gets its own tensor
        model,
        {"embed.weight": torch.zeros(5, 4), "head.weight": torch.ones(5, 4)},
        (torch.tensor([0]),),
        {},
        strict=False,
        tie_weights=False,
    )
    assert torch.equal(out, torch.zeros(1, 5))  # zero embeddings after the (eval-less) norm


def test_gradients_flow_to_the_passed_tensors_and_the_module_is_restored_on_errors() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    own = {k: v for k, v in model.named_parameters()}
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    x = torch.randn(4, 3)
    out = _reparam.call(model, params, (x,), {}, strict=False, tie_weights=True)
    grads = torch.autograd.grad(out.sum(), list(params.values()))
    ref = torch.func.functional_call(model, params, (x,))
    ref_grads = torch.autograd.grad(ref.sum(), list(params.values()))
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    with pytest.raises(RuntimeError):
        _reparam.call(model, params, (torch.randn(4, 7),), {}, strict=False, tie_weights=True)
    assert all(getattr_path(model, k) is v for k, v in own.items())


def getattr_path(module: nn.Module, name: str) -> Any:
    *path, last = name.split(".")
    for part in path:
        module = getattr(module, part)
    return getattr(module, last)


def test_the_layout_follows_reassigned_tensors_and_submodules() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    x = torch.ones(1, 2)
    w = torch.eye(2)
    first = _reparam.call(model, {"0.weight": w}, (x,), {}, strict=False, tie_weights=True)
    assert torch.equal(first, torch.func.functional_call(model, {"0.weight": w}, (x,)))
    model[0] = nn.Linear(2, 2)  # a new submodule: the old layout would write into the old one
    again = _reparam.call(model, {"0.weight": w}, (x,), {}, strict=False, tie_weights=True)
    assert torch.equal(again, torch.func.functional_call(model, {"0.weight": w}, (x,)))
    model[1].weight = model[0].weight  # tied after the first call
    tied = _reparam.call(model, {"0.weight": w}, (x,), {}, strict=False, tie_weights=True)
    assert torch.equal(tied, torch.func.functional_call(model, {"0.weight": w}, (x,)))
    assert "1.weight" in _reparam.own_tensors(model)


def test_layouts_it_does_not_handle_go_to_functional_call() -> None:
    inner = nn.Linear(2, 2)
    shared = nn.Sequential(inner, inner)  # one submodule under two paths
    x = torch.ones(1, 2)
    w = torch.eye(2)
    ours, theirs = _both(shared, {"0.weight": w}, x, tie_weights=True)
    assert torch.equal(ours, theirs)
    with pytest.raises(RuntimeError, match="Missing key"):  # strict: torch's own check
        _reparam.call(inner, {"weight": w}, (x,), {}, strict=True, tie_weights=True)
    with pytest.raises(TypeError, match="is not an instance of torch.Tensor"):
        _reparam.call(inner, {"weight": 1.0}, (x,), {}, strict=False, tie_weights=True)
    # a name the module does not have: as torch does (apply_with_policy refuses it earlier)
    ours, theirs = _both(inner, {"wieght": w}, x, tie_weights=True)
    assert torch.equal(ours, theirs) and torch.equal(ours, inner(x))


def test_own_tensors_name_a_shared_submodule_under_every_path() -> None:
    inner = nn.Linear(2, 2)
    model = nn.Sequential(inner, inner)
    expected = dict(model.named_parameters(remove_duplicate=False))
    assert _reparam.own_tensors(model) == expected  # as named_parameters(remove_duplicate=False)
    tied = _reparam.untie(model, {"0.weight": torch.eye(2)})
    assert set(tied) == {"0.weight", "1.weight"} and tied["1.weight"] is tied["0.weight"]


def test_own_tensors_name_a_buffer_under_every_name_and_ties_list_only_shared_ones() -> None:
    model = nn.BatchNorm1d(3)
    model.register_buffer("alias", model.running_mean)  # one buffer, two names
    own = _reparam.own_tensors(model)
    assert own["alias"] is own["running_mean"] and "weight" in own
    t, u = torch.ones(1), torch.ones(1)
    assert _reparam._ties({"a": t, "b": u, "c": t}) == {"a": ("a", "c"), "c": ("a", "c")}


def test_the_layout_is_made_once_while_the_module_keeps_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[int] = []
    lay_out = _reparam._lay_out
    monkeypatch.setattr(_reparam, "_lay_out", lambda m: (made.append(1), lay_out(m))[1])
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    x = torch.ones(3, 2)
    for _ in range(3):
        _reparam.call(model, {"0.weight": torch.eye(2)}, (x,), {}, strict=False, tie_weights=True)
    assert len(made) == 1
    model[0].bias = nn.Parameter(torch.zeros(2))  # a tensor replaced: laid out again
    _reparam.call(model, {"0.weight": torch.eye(2)}, (x,), {}, strict=False, tie_weights=True)
    model[1] = nn.BatchNorm1d(2)  # a submodule replaced: again
    _reparam.call(model, {"0.weight": torch.eye(2)}, (x,), {}, strict=False, tie_weights=True)
    del model[0].bias  # a tensor removed: again
    model[0].bias = None
    _reparam.call(model, {"0.weight": torch.eye(2)}, (x,), {}, strict=False, tie_weights=True)
    assert len(made) == 4


def test_shared_submodules_and_strict_calls_are_torchs_functional_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict[str, Any]] = []
    functional_call = torch.func.functional_call

    def spy(module: nn.Module, params: Any, args: Any, kwargs: Any = None, **kw: Any) -> Any:
        calls.append({"kwargs": kwargs, **kw})
        return functional_call(module, params, args, kwargs, **kw)

    monkeypatch.setattr(torch.func, "functional_call", spy)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(2, 2)
            self.again = self.inner  # the same submodule under a second path

        def forward(self, x: torch.Tensor, *, scale: float) -> torch.Tensor:
            return self.again(self.inner(x)) * scale

    model, x, w = Scaled(), torch.ones(1, 2), torch.eye(2)
    out = _reparam.call(
        model, {"inner.weight": w}, (x,), {"scale": 2.0}, strict=False, tie_weights=True
    )
    assert calls == [{"kwargs": {"scale": 2.0}, "strict": False, "tie_weights": True}]
    b = model.inner.bias.detach()
    assert torch.allclose(out, ((x + b) + b) * 2.0)
    tied = Tied()
    tokens = torch.tensor([0, 3])
    _reparam.call(
        tied,
        {k: v.detach() for k, v in tied.named_parameters()} | dict(tied.named_buffers()),
        (tokens,),
        {},
        strict=True,
        tie_weights=True,
    )  # strict, with the tied head.weight left to the tie
    assert calls[-1] == {"kwargs": {}, "strict": True, "tie_weights": True}


def test_tied_names_with_different_values_are_refused_with_a_way_out() -> None:
    model = Tied()
    params = {"embed.weight": torch.zeros(5, 4), "head.weight": torch.ones(5, 4)}
    with pytest.raises(
        ValueError,
        match=r"keys \['embed.weight', 'head.weight'\], which are tied \(one tensor of the "
        r"module\); pass one of them, the same tensor under each name, or tie_weights=False$",
    ):
        _reparam.untie(model, params)
