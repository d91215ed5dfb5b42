"""PolicyRules keys given as class names, and the float32 modules a model declares itself."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

import polprec as pp

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


class MyNorm(nn.LayerNorm):
    """A LayerNorm subclass, as models define them (LlamaRMSNorm-style names)."""


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), MyNorm(4)))
    model.add_module("head", nn.Linear(4, 2))
    return model


def test_a_class_name_matches_the_class_and_its_subclasses() -> None:
    plan = pp.PolicyRules("bf16-true", {"LayerNorm": "32-true"}).resolve(_model())
    assert plan["encoder.1"] == plan["encoder.2"] == pp.get_policy("32-true")  # MyNorm too
    assert plan["encoder.0"] == plan["head"] == pp.get_policy("bf16-true")
    by_class = pp.PolicyRules("bf16-true", {nn.LayerNorm: "32-true"}).resolve(_model())
    assert by_class == plan


def test_class_names_rank_as_classes() -> None:
    model = _model()
    rules = pp.PolicyRules(
        "bf16-true", {"MyNorm": "64-true", "LayerNorm": "32-true", "encoder.1": "16-true"}
    )
    plan = rules.resolve(model)
    assert plan["encoder.2"] == pp.get_policy("64-true")  # the closer class in the MRO
    assert plan["encoder.1"] == pp.get_policy("16-true")  # a path beats a class
    same_class = pp.PolicyRules("bf16-true", {nn.LayerNorm: "32-true", "LayerNorm": "64-true"})
    with pytest.raises(ValueError, match="conflicting rules for module 'encoder.1'"):
        same_class.resolve(model)


def test_a_class_name_in_cast_params_and_apply() -> None:
    model = _model()
    rules = pp.PolicyRules("bf16-true", {"LayerNorm": "32-true"})
    params = pp.cast_params(dict(model.named_parameters()), rules, module=model)
    assert params["encoder.1.weight"].dtype == params["encoder.2.bias"].dtype == F32
    assert params["encoder.0.weight"].dtype == BF16
    out = pp.apply_with_policy(model, params, torch.randn(3, 4), policy=rules)
    assert out.dtype == F32
    with pytest.raises(ValueError, match="rule 'LayerNorm' matches no parameter path.*module="):
        rules.cast_params(dict(model.named_parameters()))  # which classes? module= says
    by_path = pp.PolicyRules("bf16-true", {"head": "32-true"})  # a plain path needs no module
    assert by_path.cast_params(dict(model.named_parameters()))["head.weight"].dtype == F32


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("Layernorm", "'Layernorm': did you mean the class 'LayerNorm'?"),
        ("MyNrom", "did you mean the class 'MyNorm'?"),
        ("haed", "'haed': did you mean the path 'head'?"),
    ],
)
def test_a_key_that_matches_nothing_says_what_it_may_have_meant(key: str, hint: str) -> None:
    with pytest.raises(ValueError, match="match no module or parameter") as info:
        pp.PolicyRules("bf16-true", {key: "32-true"}).resolve(_model())
    assert hint in str(info.value)


class T5Like(nn.Module):
    """A model that declares float32 modules as transformers models do (T5: ``wo``)."""

    _keep_in_fp32_modules: ClassVar[list[str]] = ["wo", "missing"]
    _keep_in_fp32_modules_strict: ClassVar[set[str]] = {"gate"}

    def __init__(self) -> None:
        super().__init__()
        self.wi = nn.Linear(4, 8)
        self.wo = nn.Linear(8, 4)
        self.gate = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = (self.wi(x).dtype, self.wo.weight.dtype, self.gate.weight.dtype)
        return self.gate(x) + self.wo(torch.relu(self.wi(x)))


def test_keep_in_fp32_follows_the_declarations() -> None:
    model = T5Like()
    half = pp.PolicyRules("16-true").keep_in_fp32(model)
    keep = pp.Policy(F32, F32, F16)  # float32 inside, handing float16 back
    assert half.rules == (("*wo*", keep), ("*gate*", keep))  # "missing" matches nothing
    # the non-strict list is transformers' float16 precaution; the strict one binds bfloat16
    assert pp.PolicyRules("bf16-true").keep_in_fp32(model).rules == (
        ("*gate*", pp.Policy(F32, F32, BF16)),
    )
    assert pp.PolicyRules("32-true").keep_in_fp32(model).rules == ()
    assert pp.PolicyRules("16-mixed").keep_in_fp32(model).rules[0][0] == "*wo*"
    assert pp.PolicyRules("16-true").keep_in_fp32(nn.Linear(2, 2)).rules == ()  # none declared


def test_keep_in_fp32_end_to_end() -> None:
    model = T5Like()
    rules = pp.PolicyRules("16-true", {"*wo*": "64-true"}, on_unmatched="warn").keep_in_fp32(
        model, policy="32-true"
    )
    assert dict(rules.rules) == {"*wo*": pp.get_policy("64-true"), "*gate*": pp.get_policy(32)}
    assert rules.on_unmatched == "warn"  # the settings carry over
    params = pp.cast_params(dict(model.named_parameters()), rules, module=model)
    assert params["wi.weight"].dtype == F16 and params["gate.weight"].dtype == F32
    out = pp.apply_with_policy(model, params, torch.randn(2, 4), policy=rules)
    assert model.seen == (F16, torch.float64, F32)
    assert out.dtype == F32
