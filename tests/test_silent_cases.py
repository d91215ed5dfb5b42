"""Mistakes that used to train nothing, or lose state, without a word: each is now an error
that names the fix, or a correct result.

The errors' wording is checked in ``tests/test_audit.py``'s tables; here, that they are
raised in every mode (eager, inside ``torch.func`` transforms, under ``torch.compile``) and
that the legitimate neighbours of each mistake still work.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import polprec as pp
from polprec._grad_checks import UNREACHED

NOOP = pp.NoOpLossScale()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _detached(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


# --- a loss that no parameter reaches ------------------------------------------------------


def _calls_the_module(model: nn.Module) -> Any:
    def loss_fn(params: Any, x: torch.Tensor) -> torch.Tensor:
        return model(x).pow(2).mean()  # the module's own parameters, not `params`

    return loss_fn


def _from_the_batch_only(params: Any, x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean()


@pytest.mark.parametrize("loss_fn", ["module", "batch"])
@pytest.mark.parametrize("mode", ["eager", "microbatches", "vmap", "grad"])
def test_a_loss_no_parameter_reaches_is_refused_in_every_mode(loss_fn: str, mode: str) -> None:
    model = _mlp()
    fn = _calls_the_module(model) if loss_fn == "module" else _from_the_batch_only
    step = pp.value_and_grad(fn, microbatches=2 if mode == "microbatches" else 1)
    params, x = _detached(model), torch.randn(4, 4)
    calls = {
        "eager": lambda: step(params, x, loss_scale=NOOP),
        "microbatches": lambda: step(params, x, loss_scale=NOOP),
        # per-sample: value_and_grad inside vmap takes torch.func's path
        "vmap": lambda: torch.vmap(lambda xb: step(params, xb[None], loss_scale=NOOP)[0])(x),
        # an outer torch.func.grad (meta-learning) around the step
        "grad": lambda: torch.func.grad(lambda p: step(p, x, loss_scale=NOOP)[0])(params),
    }
    with pytest.raises(ValueError, match="pp.apply_with_policy") as info:
        calls[mode]()
    assert str(info.value).startswith(UNREACHED)


@pytest.mark.slow
@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_loss_no_parameter_reaches_is_refused_under_compile(fullgraph: bool) -> None:
    model = _mlp()
    step = pp.value_and_grad(_calls_the_module(model))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=fullgraph)
    # Without fullgraph Dynamo runs the frame eagerly, which raises polprec's ValueError;
    # with it, Dynamo reports the exception it met while tracing, message included.
    with pytest.raises(Exception, match="pp.apply_with_policy") as info:
        compiled(_detached(model), torch.randn(4, 4), loss_scale=NOOP)
    assert isinstance(info.value, ValueError) or fullgraph


def _head_unused(model: nn.Module) -> Any:
    def loss_fn(params: Any, x: torch.Tensor) -> torch.Tensor:
        body = {k: v for k, v in params.items() if k.startswith("0.")}
        return pp.apply_with_policy(
            model[0], {k[2:]: v for k, v in body.items()}, x, policy=32
        ).sum()

    return loss_fn


@pytest.mark.parametrize("mode", ["eager", "vmap", "compile"])
def test_unused_leaves_are_fine_while_one_leaf_reaches_the_loss(mode: str) -> None:
    model = _mlp()  # the loss uses layer 0 only: layer 2 is an unused head
    step = pp.value_and_grad(_head_unused(model))
    params, x = _detached(model), torch.randn(4, 4)
    if mode == "eager":
        _, grads, _, _ = step(params, x, loss_scale=NOOP)
    elif mode == "vmap":
        _, grads, _, _ = torch.vmap(lambda xb: step(params, xb, loss_scale=NOOP))(x[:, None])
        grads = {k: g.sum(0) for k, g in grads.items()}
    else:
        torch._dynamo.reset()
        _, grads, _, _ = torch.compile(step, fullgraph=True)(params, x, loss_scale=NOOP)
    assert not torch.equal(grads["0.weight"], torch.zeros_like(grads["0.weight"]))
    assert torch.equal(grads["2.weight"], torch.zeros_like(params["2.weight"]))
    assert torch.equal(grads["2.bias"], torch.zeros_like(params["2.bias"]))
