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


# --- buffers: BatchNorm's running statistics -----------------------------------------------


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_buffers()}


def _bn_step(net: nn.Module, policy: Any, *, compiled: bool = False) -> Any:
    def loss_fn(p: Any, b: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = pp.apply_with_policy(net, (p, b), x, policy=policy)
        return nn.functional.mse_loss(out.float(), y)

    step = pp.value_and_grad(loss_fn)
    if compiled:
        torch._dynamo.reset()
        return torch.compile(step, fullgraph=True)
    return step


STATS = ("1.running_mean", "1.running_var")


@pytest.mark.parametrize(
    "policy",
    ["bf16-true", "16-true", pp.PolicyRules("bf16-true")],
    ids=["bf16-true", "16-true", "rules"],
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_statistics_updated_in_cast_copies_reach_the_buffers_passed(
    policy: Any, compiled: bool
) -> None:
    net = _bn_net()
    dtype = pp.get_policy("16-true" if policy == "16-true" else "bf16-true").compute_dtype
    params = pp.cast_params(_detached(net), "16-true" if policy == "16-true" else "bf16-true")
    buffers = _buffers(net)  # float32, under a 16-bit policy: the module gets cast copies
    step = _bn_step(net, policy, compiled=compiled)
    reference = _bn_net().to(dtype)  # the module itself in the compute dtype, trained as torch does
    y = torch.randn(16, 2)
    for i in range(3):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(i))
        step(params, buffers, x, y, loss_scale=NOOP)
        reference(x.to(dtype))
    assert int(buffers["1.num_batches_tracked"]) == 3
    for name in STATS:
        got, want = buffers[name], reference.get_buffer(name).float()
        assert got.dtype == torch.float32
        if compiled:  # inductor reduces in float32 before rounding: a 16-bit ulp apart at most
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
        else:
            assert torch.equal(got, want)


def test_buffers_that_keep_their_values_keep_their_bits_and_eval_writes_nothing() -> None:
    net = _bn_net()
    params = pp.cast_params(_detached(net), "bf16-true")
    buffers = _buffers(net)
    buffers["1.running_mean"] = torch.full((8,), 0.1)  # not representable in bfloat16
    net.eval()  # no update: nothing to write back, the buffers are not touched
    versions = {k: v._version for k, v in buffers.items()}
    pp.apply_with_policy(net, (params, buffers), torch.randn(16, 4), policy="bf16-true")
    assert {k: v._version for k, v in buffers.items()} == versions
    assert torch.equal(buffers["1.running_mean"], torch.full((8,), 0.1))
    net.train()
    net[1].momentum = 0.0  # an update that leaves the values as they are
    pp.apply_with_policy(net, (params, buffers), torch.randn(16, 4), policy="bf16-true")
    assert torch.equal(buffers["1.running_mean"], torch.full((8,), 0.1))  # not rounded


@pytest.mark.parametrize("policy", ["bf16-mixed", "32-true"])
def test_a_compiled_step_updates_buffers_passed_beside_the_params(policy: str) -> None:
    # value_and_grad hands every argument to torch.func.grad, so BatchNorm may update the
    # buffers in place inside it (a buffer captured from outside could not be).
    net = _bn_net()
    params = _detached(net)
    eager, compiled = _buffers(net), _buffers(net)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    loss_e, grads_e, _, _ = _bn_step(net, policy)(params, eager, x, y, loss_scale=NOOP)
    step = _bn_step(net, policy, compiled=True)
    loss_c, grads_c, _, _ = step(params, compiled, x, y, loss_scale=NOOP)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(grads_c, grads_e, rtol=2e-2, atol=1e-3)
    for name in STATS:
        assert not torch.equal(compiled[name], _buffers(_bn_net())[name])
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("mode", ["eager", "grad", "compile", "fullgraph"])
def test_buffers_in_the_differentiated_tree_are_refused(mode: str) -> None:
    net = _bn_net()
    tensors = {**_detached(net), **_buffers(net)}  # {**params, **buffers}: one tree

    def loss_fn(t: Any, x: torch.Tensor) -> torch.Tensor:
        return pp.apply_with_policy(net, t, x, policy="bf16-mixed").float().square().mean()

    x = torch.randn(16, 4)
    floating = {k: v for k, v in tensors.items() if v.is_floating_point()}
    step = pp.value_and_grad(loss_fn)
    calls = {
        "eager": lambda: step(tensors, x, loss_scale=NOOP),
        "grad": lambda: torch.func.grad(loss_fn)(floating, x),
        "compile": lambda: torch.compile(step)(tensors, x, loss_scale=NOOP),
        # Dynamo reports the exception it met while tracing, message included
        "fullgraph": lambda: torch.compile(step, fullgraph=True)(tensors, x, loss_scale=NOOP),
    }
    torch._dynamo.reset()
    exc = Exception if mode == "fullgraph" else ValueError
    with pytest.raises(exc, match=r"apply_with_policy\(model, \(params, buffers\), x"):
        calls[mode]()


@pytest.mark.parametrize("mode", ["eager", "grad"])
def test_buffers_left_out_in_another_dtype_are_named(mode: str) -> None:
    net = _bn_net()
    if mode == "grad":  # in training mode torch.func refuses the update of a captured buffer
        net.eval()
    params = pp.cast_params(_detached(net), "bf16-true")  # the module's buffers stay float32

    def loss_fn(p: Any, x: torch.Tensor) -> torch.Tensor:
        return pp.apply_with_policy(net, p, x, policy="bf16-true").float().square().mean()

    x = torch.randn(16, 4)
    calls = {
        "eager": lambda: pp.value_and_grad(loss_fn)(params, x, loss_scale=NOOP),
        "grad": lambda: torch.func.grad(loss_fn)(params, x),
    }
    with pytest.raises(
        ValueError, match="its own: '1.running_mean', '1.running_var', in torch.float32"
    ) as info:
        calls[mode]()
    assert "expected scalar type" in str(info.value.__cause__)  # torch's error, kept as cause
