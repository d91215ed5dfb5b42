"""Tied weights: one tensor used by two modules (an embedding and the output head sharing it).

Each use computes in its own module's dtype, the gradient of both uses is summed into the one
parameter in its dtype, and a tensor named twice stays one tensor through every cast.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

import polprec as pp

BF16, F32 = torch.bfloat16, torch.float32
ISLANDS = ["head", "embed", nn.Embedding]  # a path on either side, and a class


class TiedLM(nn.Module):
    """A tiny language model whose output head is its input embedding (GPT-2's tie)."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.body = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.LayerNorm(d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)))


@pytest.fixture
def model() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM()


def _loss(model: nn.Module, policy: Any) -> Any:
    def loss(p: Any, ids: torch.Tensor) -> torch.Tensor:
        logits = pp.apply_with_policy(model, p, ids, policy=policy).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())

    return loss


def _named_twice(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every name of the module's parameters, a tied one's names sharing one detached tensor."""
    detached: dict[int, torch.Tensor] = {}
    return {
        k: detached.setdefault(id(v), v.detach())
        for k, v in model.named_parameters(remove_duplicate=False)
    }


def _weights_seen(model: TiedLM) -> dict[str, list[torch.dtype]]:
    seen: dict[str, list[torch.dtype]] = {"embed": [], "head": []}
    for name in seen:
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, i, name=name: seen[name].append(m.weight.dtype)
        )
    return seen


@pytest.mark.parametrize("island", ISLANDS, ids=str)
@pytest.mark.parametrize("root", ["bf16-true", "bf16-mixed"])
def test_an_island_on_either_side_of_the_tie(model: TiedLM, root: str, island: Any) -> None:
    rules = pp.PolicyRules(root, {island: "32-true"})
    params = pp.cast_params(
        {k: v.detach() for k, v in model.named_parameters()}, rules, module=model
    )
    assert list(params) == [
        "embed.weight",
        "body.0.weight",
        "body.0.bias",
        "body.2.weight",
        "body.2.bias",
    ]
    assert params["embed.weight"].dtype == F32  # the widest param dtype of its uses
    seen = _weights_seen(model)
    ids = torch.randint(0, 11, (4, 6))
    out = pp.apply_with_policy(model, params, ids, policy=rules)
    assert out.dtype == F32
    in_island, other = ("head", "embed") if island == "head" else ("embed", "head")
    assert seen[in_island] == [F32]  # the island computes with the float32 master
    assert seen[other] == [F32 if root == "bf16-mixed" else BF16]  # mixed: autocast casts per op

    _, grads, finite, _ = pp.value_and_grad(_loss(model, rules))(
        params, ids, loss_scale=pp.NoOpLossScale()
    )
    assert bool(finite) and grads["embed.weight"].dtype == F32
    per_sample = vmap(grad(_loss(model, rules)), in_dims=(None, 0))(params, ids[:, None])
    assert per_sample["embed.weight"].shape == (4, 11, 8)
    assert per_sample["embed.weight"].dtype == F32


def test_the_gradient_of_a_tied_weight_sums_both_uses(model: TiedLM) -> None:
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids = torch.randint(0, 11, (4, 6))
    _, ref, _, _ = pp.value_and_grad(_loss(model, "32-true"))(
        params, ids, loss_scale=pp.NoOpLossScale()
    )
    # the float32 reference is the sum of both uses: check it against an untied copy
    untied = TiedLM()
    untied.load_state_dict(model.state_dict())
    untied.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    two = {k: v.detach() for k, v in untied.named_parameters()}
    _, both, _, _ = pp.value_and_grad(_loss(untied, "32-true"))(
        two, ids, loss_scale=pp.NoOpLossScale()
    )
    torch.testing.assert_close(ref["embed.weight"], both["embed.weight"] + both["head.weight"])
    rules = pp.PolicyRules("bf16-true", {"head": "32-true"})
    low = pp.cast_params(params, rules, module=model)
    _, got, _, _ = pp.value_and_grad(_loss(model, rules))(low, ids, loss_scale=pp.NoOpLossScale())
    rel = (got["embed.weight"] - ref["embed.weight"]).norm() / ref["embed.weight"].norm()
    assert float(rel) < 0.05


@pytest.mark.parametrize("policy", ["bf16-true", "16-true", "64-true", "bf16-mixed"])
def test_cast_params_keeps_a_tensor_named_twice_one_tensor(model: TiedLM, policy: str) -> None:
    aliased = _named_twice(model)
    assert aliased["head.weight"] is aliased["embed.weight"]
    for cast in (
        pp.cast_params(aliased, policy),
        pp.get_policy(policy).cast_to_compute(aliased),
        pp.cast_tree(aliased, BF16),
        pp.cast_params(aliased, pp.PolicyRules(policy, {"head": "32-true"}), module=model),
        pp.cast_params(aliased, pp.PolicyRules(policy, {"head.weight": "64-true"})),
    ):
        assert cast["head.weight"] is cast["embed.weight"]
    ids = torch.randint(0, 11, (2, 5))
    low = pp.cast_params(aliased, policy)
    out = pp.apply_with_policy(model, low, ids, policy=policy)  # functional_call accepts it
    assert out.shape == (2, 5, 11)
    _, grads, _, _ = pp.value_and_grad(_loss(model, policy))(
        low, ids, loss_scale=pp.NoOpLossScale()
    )
    assert grads["head.weight"] is grads["embed.weight"]  # one tensor, one gradient
    assert grads["head.weight"].dtype == low["head.weight"].dtype
    deduplicated = {k: v for k, v in low.items() if k != "head.weight"}
    _, once, _, _ = pp.value_and_grad(_loss(model, policy))(
        deduplicated, ids, loss_scale=pp.NoOpLossScale()
    )
    torch.testing.assert_close(grads["embed.weight"], once["embed.weight"])


def test_two_different_values_for_tied_names_are_refused(model: TiedLM) -> None:
    params = _named_twice(model)
    params["head.weight"] = params["head.weight"].clone()
    ids = torch.randint(0, 11, (2, 5))
    rules = pp.PolicyRules("bf16-true", {"head": "32-true"})
    with pytest.raises(ValueError, match=r"\['embed.weight', 'head.weight'\], which are tied"):
        pp.apply_with_policy(model, params, ids, policy=rules)
    with pytest.raises(ValueError, match="tied"):  # functional_call's own check
        pp.apply_with_policy(model, params, ids, policy="bf16-true")
    # tie_weights=False: each name its own tensor, as functional_call does
    out = pp.apply_with_policy(model, params, ids, policy=rules, tie_weights=False)
    assert out.shape == (2, 5, 11)


def test_tie_weights_false_leaves_the_other_name_to_the_module(model: TiedLM) -> None:
    params = {"embed.weight": torch.zeros(11, 8)}  # the head keeps the module's own weight
    ids = torch.randint(0, 11, (2, 5))
    rules = pp.PolicyRules("32-true", {"head": "p=f32,c=f32,o=bf16"})
    untied = pp.apply_with_policy(model, params, ids, policy=rules, tie_weights=False)
    tied = pp.apply_with_policy(model, params, ids, policy=rules)
    assert bool((tied == 0).all())  # the zero embedding reaches the head too
    assert not bool((untied == 0).all())
