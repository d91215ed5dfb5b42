"""Precision islands: PolicyRules by module class and by path, in cast_params and apply.

Bad rules and their misuse: test_audit.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from helpers import load_digits
from torch import nn
from torch.func import grad, vmap

import polprec as pp
from polprec.testing import assert_trees_all_equal_dtypes

BF16, F32 = torch.bfloat16, torch.float32
KEEP_F32_IN_BF16 = "p=f32,c=f32,o=bf16"  # a float32 island that hands bfloat16 back


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(h))), 2)
        return self.head(h.flatten(1))


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


def _hook_dtypes(model: nn.Module, names: list[str]) -> dict[str, list[torch.dtype]]:
    seen: dict[str, list[torch.dtype]] = {n: [] for n in names}
    for n in names:
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: seen[n].extend([i[0].dtype, _first(o).dtype])
        )
    return seen


def test_resolution_order_and_nesting() -> None:
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    model.add_module("head", nn.Linear(2, 2))
    rules = pp.PolicyRules(
        "bf16-mixed",
        {
            "encoder": "bf16-true",  # covers the subtree
            nn.LayerNorm: "32-true",  # a class
            "encoder.1": "64-true",  # a path beats a class
            nn.Linear: "16-mixed",
            nn.Module: "32-true",  # the farthest class in the MRO loses
        },
    )
    plan = rules.resolve(model)
    assert plan[""] == pp.get_policy("32-true")  # nn.Module matches the root Sequential
    assert plan["encoder"] == pp.get_policy("bf16-true")
    assert plan["encoder.0"] == pp.get_policy("16-mixed")
    assert plan["encoder.1"] == pp.get_policy("64-true")
    assert plan["head"] == pp.get_policy("16-mixed")


def test_subtree_inherits_parent_rule() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 2))
    plan = pp.PolicyRules("bf16-true", {"0": "32-true"}).resolve(model)
    assert plan["0.0"] == plan["0.1"] == pp.get_policy("32-true")
    assert plan["1"] == pp.get_policy("bf16-true")


def test_glob_paths_in_cast_params() -> None:
    model = nn.Sequential()
    model.add_module("block", nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))
    model.add_module("head", nn.Linear(3, 2))
    rules = pp.PolicyRules("bf16-true", {"head*": "32-true", "*.bias": "64-true"})
    params = rules.cast_params(dict(model.named_parameters()))
    assert params["block.0.weight"].dtype == BF16
    assert params["block.1.weight"].dtype == BF16
    assert params["head.weight"].dtype == F32
    assert params["head.bias"].dtype == torch.float64  # parameter pattern beats module pattern
    assert params["block.0.bias"].dtype == torch.float64
    same = pp.cast_params(dict(model.named_parameters()), rules, module=model)
    assert_trees_all_equal_dtypes(same, params)


def test_contents_pattern_covers_the_module_itself() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(3, 3))
    model.add_module("head", nn.Linear(3, 2))
    model.add_module("header", nn.Linear(2, 2))
    rules = pp.PolicyRules(
        "bf16-true", {"head.*": "32-true", "*.norm*": "64-true"}, on_unmatched="ignore"
    )
    plan = rules.resolve(model)
    assert plan["head"] == pp.get_policy("32-true")  # "head.*" makes head itself an island
    assert plan["body"] == plan["header"] == plan[""] == pp.get_policy("bf16-true")
    seen = _hook_dtypes(model, ["body", "head", "header"])
    params = pp.cast_params(dict(model.named_parameters()), rules, module=model)
    assert params["head.weight"].dtype == F32 and params["body.weight"].dtype == BF16
    out = pp.apply_with_policy(model, params, torch.randn(4, 3), policy=rules)
    assert seen["head"] == [F32, F32]  # the head computes in float32
    assert seen["body"] == [BF16, BF16] and seen["header"] == [BF16, BF16]
    assert out.dtype == F32  # bf16-true hands float32 out


def test_rules_name_parameters_the_same_while_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential()
    model.add_module("block", nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))
    model.add_module("head", nn.Linear(3, 2))
    rules = pp.PolicyRules("bf16-true", {"head.*": "32-true", nn.LayerNorm: "64-true"})
    params = dict(model.named_parameters())
    eager = pp.cast_params(params, rules, module=model)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # what compile traces
    traced = pp.cast_params(params, rules, module=model)
    assert {k: v.dtype for k, v in traced.items()} == {k: v.dtype for k, v in eager.items()}
    assert traced["head.weight"].dtype == F32 and traced["block.1.weight"].dtype == torch.float64


def test_class_rules_cast_params_given_the_module() -> None:
    # Without module= they cannot know which class owns a parameter (test_audit.py).
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    rules = pp.PolicyRules("bf16-true", {nn.LayerNorm: "32-true"})
    params = pp.cast_params(dict(model.named_parameters()), rules, module=model)
    assert (params["0.weight"].dtype, params["1.weight"].dtype) == (BF16, F32)


def _transformer_block() -> tuple[nn.Module, dict[str, list[torch.dtype]]]:
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return block, _hook_dtypes(block, ["linear1", "norm1", "self_attn"])


@pytest.mark.parametrize("root", ["bf16-mixed", "bf16-true"])
def test_layernorm_island_in_a_transformer_block(root: str) -> None:
    block, seen = _transformer_block()
    rules = pp.PolicyRules(root, {nn.LayerNorm: KEEP_F32_IN_BF16})
    params = pp.cast_params(dict(block.named_parameters()), rules, module=block)
    assert params["norm1.weight"].dtype == F32
    assert params["linear1.weight"].dtype == (BF16 if root == "bf16-true" else F32)
    x = torch.randn(2, 5, 16)
    out = pp.apply_with_policy(block, params, x, policy=rules)
    assert out.dtype == F32  # the root policy's output dtype
    assert seen["norm1"] == [F32, F32]  # hooks see the island compute in float32...
    assert seen["linear1"][0] == BF16  # ...and it hands bfloat16 on (its output dtype)
    assert seen["linear1"][1] == BF16
    # The island's parameters stay float32 and its gradients come back float32.
    grads = grad(lambda p: pp.apply_with_policy(block, p, x, policy=rules).sum())(params)
    assert grads["norm1.weight"].dtype == F32
    assert grads["linear1.weight"].dtype == params["linear1.weight"].dtype


def test_island_computes_in_its_dtype() -> None:
    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[torch.dtype] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(x.dtype)
            y = x @ x.transpose(-1, -2)  # autocast would make this bfloat16
            self.seen.append(y.dtype)
            return y

    model = nn.Sequential(nn.Linear(4, 4), Probe())
    rules = pp.PolicyRules("bf16-mixed", {Probe: "32-true"})
    params = pp.cast_params(dict(model.named_parameters()), rules, module=model)
    out = pp.apply_with_policy(model, params, torch.randn(3, 4), policy=rules)
    assert model[1].seen == [F32, F32]
    assert out.dtype == F32
    model[1].seen.clear()
    vmap(lambda x: pp.apply_with_policy(model, params, x, policy=rules))(torch.randn(2, 3, 4))
    assert model[1].seen == [F32, F32]


@pytest.mark.slow
def test_islands_under_grad_vmap_and_compile() -> None:
    block, seen = _transformer_block()
    rules = pp.PolicyRules("bf16-mixed", {nn.LayerNorm: "32-true"})
    params = {
        k: v.detach()
        for k, v in pp.cast_params(dict(block.named_parameters()), rules, module=block).items()
    }
    x, y = torch.randn(4, 5, 16), torch.randn(4, 5, 16)

    def loss_fn(p: Any, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return ((pp.apply_with_policy(block, p, xb, policy=rules) - yb) ** 2).mean()

    per_sample = vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, x, y)
    assert_trees_all_equal_dtypes(per_sample, F32)
    assert seen["norm1"][-1] == F32
    assert seen["linear1"][-1] == BF16

    step = pp.value_and_grad(loss_fn)
    compiled = torch.compile(
        lambda p, a, b: step(p, a, b, loss_scale=pp.NoOpLossScale()), fullgraph=True
    )
    seen["norm1"].clear()
    loss_c, grads_c, finite, _ = compiled(params, x, y)
    loss_e, grads_e, _, _ = step(params, x, y, loss_scale=pp.NoOpLossScale())
    assert bool(finite)
    assert seen["norm1"][-1] == F32
    assert abs(float(loss_c) - float(loss_e)) < 0.05 * abs(float(loss_e))
    assert_trees_all_equal_dtypes(grads_c, grads_e)
    assert "_call_impl" not in block.norm1.__dict__  # the module is left as it was


def test_module_is_restored_after_an_exception() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    rules = pp.PolicyRules("bf16-true", {nn.LayerNorm: "32-true"})
    with pytest.raises(RuntimeError):
        pp.apply_with_policy(model, dict(model.named_parameters()), torch.randn(3, 5), policy=rules)
    assert "forward" not in model[1].__dict__
    custom = lambda x: x  # noqa: E731  (an instance-level forward the user set)
    model[1].forward = custom
    pp.apply_with_policy(model, dict(model.named_parameters()), torch.randn(3, 2), policy=rules)
    assert model[1].forward is custom


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shuffled 8x8 digit images (N, 1, 8, 8): 1400 to train on, the rest to test."""
    x, y = load_digits()
    x = x.view(-1, 1, 8, 8)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _train(
    rules: pp.PolicyRules | str, steps: int = 160
) -> tuple[float, Net, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Net()
    params = {
        k: v.detach()
        for k, v in pp.cast_params(dict(model.named_parameters()), rules, module=model).items()
    }
    buffers = pp.cast_params({k: v.detach() for k, v in model.named_buffers()}, rules, module=model)
    xtr, ytr, xte, yte = _digits()

    def loss_fn(p: Any, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        logits = pp.apply_with_policy(model, {**p, **buffers}, xb, policy=rules)
        return nn.functional.cross_entropy(logits.float(), yb)

    step = pp.value_and_grad(loss_fn)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(ytr), (64,), generator=gen)
        _, grads, finite, _ = step(params, xtr[idx], ytr[idx], loss_scale=pp.NoOpLossScale())
        new = {k: (w.float() - 0.1 * grads[k].float()).to(w.dtype) for k, w in params.items()}
        params = pp.select_tree(finite, new, params)
    model.eval()
    logits = pp.apply_with_policy(model, {**params, **buffers}, xte, policy=rules)
    accuracy = float((logits.argmax(-1) == yte).float().mean()) * 100
    return accuracy, model, buffers


@pytest.mark.slow
def test_batchnorm_island_matches_float32_on_digits() -> None:
    rules = pp.PolicyRules("bf16-true", {nn.BatchNorm2d: KEEP_F32_IN_BF16})
    acc_f32, _, _ = _train(pp.PolicyRules("32-true"))
    acc_mixed, model, buffers = _train(rules)
    assert acc_f32 > 90
    assert abs(acc_mixed - acc_f32) <= 1.0, (acc_mixed, acc_f32)
    assert buffers["bn1.running_mean"].dtype == F32  # running stats stay float32...
    assert float(buffers["bn1.running_var"].float().std()) > 0  # ...and were updated in place
    seen = _hook_dtypes(model, ["conv1", "bn1", "conv2", "head"])
    params = pp.cast_params(dict(model.named_parameters()), rules, module=model)
    pp.apply_with_policy(model, {**params, **buffers}, torch.randn(2, 1, 8, 8), policy=rules)
    assert seen["conv1"] == [BF16, BF16]
    assert seen["bn1"] == [F32, F32]  # the island computes in float32 (hooks see inside)
    assert seen["conv2"][0] == BF16  # and hands bfloat16 on
    assert seen["head"] == [BF16, BF16]


def test_rules_are_immutable_and_hashable() -> None:
    a = pp.PolicyRules("bf16-true", {nn.LayerNorm: "32-true", "head.*": 32})
    b = pp.PolicyRules(pp.get_policy("bf16-true"), [(nn.LayerNorm, "32"), ("head.*", "32-true")])
    assert a == b
    assert hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.default = pp.get_policy(32)  # type: ignore[misc]


def test_unmatched_rules_can_warn_or_be_ignored() -> None:
    # By default a rule that matches no module is an error (test_audit.py).
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.warns(UserWarning, match="match no module"):
        pp.PolicyRules(32, {nn.LayerNorm: 16}, on_unmatched="warn").resolve(model)
    pp.PolicyRules(32, {nn.LayerNorm: 16}, on_unmatched="ignore").resolve(model)


def test_rules_tied_on_one_policy_do_not_conflict() -> None:
    # Tied rules with different policies are an error (test_audit.py).
    model = nn.Sequential(nn.Linear(2, 2))
    agreeing = pp.PolicyRules(32, {"0*": "bf16-true", "*0": "bf16-true"})
    assert agreeing.resolve(model)["0"] == pp.get_policy("bf16-true")
