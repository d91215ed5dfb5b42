"""Gradient checkpointing (torch.utils.checkpoint) inside apply_with_policy: refused, never wrong.

The recomputation during the backward pass would run on the module's own parameters, not on
the params passed in. polprec raises instead, naming checkpointing; where the params *are* the
module's own, and where the checkpoint is around apply_with_policy, the gradients are right
and nothing is raised.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import polprec as pp

POLICIES = ["bf16-mixed", "32-true", "bf16-true", "16-mixed"]


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
        self.out = nn.Linear(4, 1)
        self.reentrant = reentrant  # None: no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            h = self.inner(x)
        else:
            h = checkpoint(self.inner, x, use_reentrant=self.reentrant)
        return self.out(h).float().sum()


def _shifted(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that differ from the module's own (as after any functional update)."""
    return {k: (v + 0.5).detach().requires_grad_() for k, v in model.named_parameters()}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointing_with_substituted_params_is_refused(policy: str, reentrant: bool) -> None:
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    params = _shifted(model)
    x = torch.randn(3, 4, requires_grad=True)  # the reentrant checkpoint needs an input that does
    with pytest.raises(RuntimeError, match="gradient checkpointing") as info:
        pp.apply_with_policy(model, pp.cast_params(params, policy), x, policy=policy).backward()
    assert "gradient_checkpointing_disable()" in str(info.value)
    # value_and_grad's eager path meets the same refusal (torch.autograd.grad runs the
    # reentrant checkpoint's recomputation too: without the refusal, zero gradients)
    step = pp.value_and_grad(lambda p, x: pp.apply_with_policy(model, p, x, policy=policy))
    with pytest.raises(RuntimeError, match="torch.utils.checkpoint"):
        step(params, x, loss_scale=pp.NoOpLossScale())
    assert model.inner[0].weight.grad is None  # the module's own parameters were not touched


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_the_modules_own_params_under_a_mixed_policy_are_right(reentrant: bool) -> None:
    # The recomputation reads the module's own tensors; when those are what was passed, the
    # gradients are right, so nothing is refused.
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    x = torch.randn(3, 4, requires_grad=True)
    pp.apply_with_policy(model, dict(model.named_parameters()), x, policy="bf16-mixed").backward()
    got = {k: v.grad.clone() for k, v in model.named_parameters()}  # type: ignore[union-attr]
    model.zero_grad()
    model.reentrant = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).backward()
    for k, v in model.named_parameters():
        torch.testing.assert_close(got[k], v.grad)


def test_checkpoint_around_apply_with_policy_gives_the_right_gradients() -> None:
    # The supported way: the params are inputs of the checkpointed function, so the
    # recomputation calls apply_with_policy again with the same params.
    torch.manual_seed(0)
    model = Checkpointed(None)
    params = _shifted(model)
    x = torch.randn(3, 4)

    def run(p: Any, x: torch.Tensor) -> torch.Tensor:
        return pp.apply_with_policy(model, p, x, policy="bf16-true")

    checkpointed = torch.autograd.grad(
        checkpoint(run, params, x, use_reentrant=False), list(params.values())
    )
    plain = torch.autograd.grad(run(params, x), list(params.values()))
    for a, b in zip(checkpointed, plain, strict=True):
        torch.testing.assert_close(a, b)


def test_no_backward_no_refusal() -> None:
    torch.manual_seed(0)
    model = Checkpointed(False)
    params = _shifted(model)
    x = torch.randn(3, 4)
    with torch.no_grad():  # inference: nothing is recomputed
        out = pp.apply_with_policy(model, params, x, policy="bf16-true")
        model.reentrant = None
        assert torch.equal(out, pp.apply_with_policy(model, params, x, policy="bf16-true"))


def test_saved_tensor_hooks_around_the_call_still_work() -> None:
    # Offloading saved activations around the step (save_on_cpu) is not checkpointing inside
    # the forward: it runs, with the right gradients.
    torch.manual_seed(0)
    model = Checkpointed(None)
    params = _shifted(model)
    x = torch.randn(3, 4)
    with torch.autograd.graph.save_on_cpu():
        loss = pp.apply_with_policy(model, params, x, policy="32-true")
    got = torch.autograd.grad(loss, list(params.values()))
    want = torch.autograd.grad(
        pp.apply_with_policy(model, params, x, policy="32-true"), list(params.values())
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


class _Upstream(nn.Module):
    """A parameter before the reentrant checkpoint, so its input requires grad only through it."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.rest = Checkpointed(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.first(x))


def test_value_and_grad_names_a_reentrant_checkpoint_torch_meets_on_the_way() -> None:
    # torch.autograd.grad raises its own error at the checkpoint; polprec's names the cause.
    torch.manual_seed(0)
    model = _Upstream()
    step = pp.value_and_grad(lambda p, x: pp.apply_with_policy(model, p, x, policy="32-true"))
    with pytest.raises(RuntimeError, match="gradient_checkpointing_disable"):
        step(_shifted(model), torch.randn(3, 4), loss_scale=pp.NoOpLossScale())


def test_value_and_grad_walks_the_graph_only_where_a_checkpoint_could_hide(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from polprec import _checkpointing

    walks: list[int] = []
    walk = _checkpointing._has_reentrant_checkpoint
    monkeypatch.setattr(
        _checkpointing, "_has_reentrant_checkpoint", lambda *a: walks.append(1) or walk(*a)
    )
    torch.manual_seed(0)
    model = Checkpointed(None)
    step = pp.value_and_grad(lambda p, x: pp.apply_with_policy(model, p, x, policy="32-true"))
    # every parameter gets a gradient and no input requires grad: no walk
    _, grads, *_ = step(_shifted(model), torch.randn(3, 4), loss_scale=pp.NoOpLossScale())
    assert walks == [] and all(torch.count_nonzero(g) for g in grads.values())
    # an input that requires grad could feed a checkpoint torch's backward never meets: a walk
    step(_shifted(model), torch.randn(3, 4, requires_grad=True), loss_scale=pp.NoOpLossScale())
    assert walks == [1]
    step(_shifted(model), x=torch.randn(3, 4, requires_grad=True), loss_scale=pp.NoOpLossScale())
    assert walks == [1, 1]  # as a keyword too
    nested = pp.value_and_grad(
        lambda p, xs: pp.apply_with_policy(model, p, xs[0], policy="32-true")
    )
    nested(_shifted(model), (torch.randn(3, 4, requires_grad=True),), loss_scale=pp.NoOpLossScale())
    assert walks == [1, 1, 1]  # found inside a nested argument
    # outside value_and_grad, apply_with_policy walks every time
    pp.apply_with_policy(model, _shifted(model), torch.randn(3, 4), policy="32-true")
    assert walks == [1, 1, 1, 1]
