"""``pp.optim.step_torch``: polprec's gradients and finite flag handed to a fused torch.optim
optimizer, against ``scaler.step(optimizer)`` on the same loop, without a host sync."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from helpers import classification_batches, seeded_mlp
from torch import nn

import polprec as pp

STEPS = 10
SCALE = 2.0**10


def _model() -> nn.Module:
    return seeded_mlp(6, 16, 3)


def _batches(overflow_at: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return classification_batches(STEPS, 8, 6, 3, overflow_at, bad=(0, 0))


def _grad_scaler_run(
    make_opt: Callable[[Any], torch.optim.Optimizer], batches: Any, clip: float | None
) -> tuple[nn.Module, torch.optim.Optimizer, list[float]]:
    """The torch.amp loop: autocast, scale, backward, unscale_, clip, step, update."""
    model = _model()
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=3)
    scales = []
    for x, y in batches:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, opt, scales


def _step_torch_run(
    make_opt: Callable[[Any], torch.optim.Optimizer], batches: Any, clip: float | None
) -> tuple[nn.Module, torch.optim.Optimizer, list[float]]:
    """The same loop with polprec's gradients and the torch optimizer kept."""
    model = _model()
    opt = make_opt(model.parameters())
    params = dict(model.named_parameters())
    policy = pp.get_policy("16-mixed")

    def loss_fn(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(pp.apply_with_policy(model, p, x, policy=policy), y)

    step_grad = pp.value_and_grad(loss_fn)
    loss_scale = pp.DynamicLossScale(SCALE, period=3, min_loss_scale=0)
    scales = []
    for x, y in batches:
        detached = {k: p.detach() for k, p in params.items()}
        _, grads, finite, loss_scale = step_grad(detached, x, y, loss_scale=loss_scale)
        if clip is not None:
            grads, _ = pp.clip_by_global_norm(grads, clip)
        pp.optim.step_torch(opt, params, grads, grads_finite=finite)
        scales.append(float(loss_scale.loss_scale))
    return model, opt, scales


def _assert_same(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    model_a, opt_a, scales_a = a
    model_b, opt_b, scales_b = b
    assert scales_a == scales_b
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q), name
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys()
        for key, value in state_a[i].items():
            assert torch.equal(value, state_b[i][key]), (i, key)


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, weight_decay=1e-3, fused=True
    ),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True),
}


@pytest.mark.parametrize("clip", [None, 0.5], ids=["no-clip", "clip"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_trajectory_is_grad_scalers(name: str, clip: float | None) -> None:
    # Overflowing steps before and after growths; for SGD not the first step, which
    # GradScaler leaves uninitialised (see the test below).
    overflow_at = (4, 8) if name.startswith("sgd") else (0, 4, 8)
    batches = _batches(overflow_at)
    reference = _grad_scaler_run(OPTIMIZERS[name], batches, clip)
    ours = _step_torch_run(OPTIMIZERS[name], batches, clip)
    _assert_same(reference, ours)
    moves = [b / a for a, b in zip([SCALE, *reference[2]], reference[2], strict=False)]
    assert 2.0 in moves and 0.5 in moves  # the scale grew and backed off
    if name.startswith("adam"):
        steps = {float(s["step"]) for s in ours[1].state.values()}
        assert steps == {STEPS - len(overflow_at)}  # skipped steps are not counted


@contextlib.contextmanager
def _no_host_sync() -> Iterator[None]:
    """Every way a tensor's value reaches Python raises inside the block."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a host synchronisation")

    saved = {n: getattr(torch.Tensor, n) for n in ("item", "tolist", "__bool__", "__float__")}
    saved["__int__"] = torch.Tensor.__int__
    try:
        for n in saved:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_no_host_sync(name: str) -> None:
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    params = dict(model.named_parameters())
    grads = {k: torch.randn_like(p) for k, p in params.items()}
    with _no_host_sync():
        with pytest.raises(AssertionError, match="host synchronisation"):
            bool(torch.tensor(True))  # the patch is in force
        for finite in (False, True, False, True):  # a skipped first step, then both kinds
            pp.optim.step_torch(opt, params, grads, grads_finite=torch.tensor(finite))
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")


def test_a_skipped_first_sgd_step_keeps_zero_buffers() -> None:
    # GradScaler + fused SGD: torch decides on the host that the first step is the first,
    # makes the buffers with empty_like and skips the kernel that would set them, so they
    # hold whatever memory they got. step_torch makes zero buffers before that step, which
    # gives the same first step when it is taken and stays zero when it is skipped: the
    # trajectory is polprec's own SGD's.
    batches = _batches((0, 3))
    make = OPTIMIZERS["sgd-momentum"]
    model, opt, _ = _step_torch_run(make, batches, None)
    reference = _model()
    sgd = pp.optim.sgd(0.1, momentum=0.9, weight_decay=1e-3)
    params = {k: p.detach() for k, p in reference.named_parameters()}
    state = sgd.init(params)
    step_grad = pp.value_and_grad(
        lambda p, x, y: nn.functional.cross_entropy(
            pp.apply_with_policy(reference, p, x, policy="16-mixed"), y
        )
    )
    loss_scale = pp.DynamicLossScale(SCALE, period=3, min_loss_scale=0)
    for x, y in batches:
        _, grads, finite, loss_scale = step_grad(params, x, y, loss_scale=loss_scale)
        params, state = sgd.step(params, grads, state, grads_finite=finite)
    for (name, p), buf in zip(
        model.named_parameters(), state.momentum_buffer.values(), strict=True
    ):
        assert torch.equal(p, params[name]), name
        assert torch.equal(opt.state[p]["momentum_buffer"], buf), name


def test_a_first_sgd_step_with_dampening_is_refused_and_changes_nothing() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1, fused=True)
    params = dict(model.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    grads = {k: torch.ones_like(p) for k, p in params.items()}
    with pytest.raises(ValueError, match="cannot skip its first step without a host sync"):
        pp.optim.step_torch(opt, params, grads, grads_finite=torch.tensor(True))
    assert all(p.grad is None for p in params.values()) and not opt.state
    assert all(torch.equal(p, before[k]) for k, p in params.items())
    for p in params.values():  # once torch has buffers, the skip is sync-free again
        p.grad = torch.ones_like(p)
    opt.step()
    pp.optim.step_torch(opt, params, grads, grads_finite=torch.tensor(False))


def test_grads_are_left_alone_and_become_the_grad_attributes() -> None:
    model = _model()
    opt = OPTIMIZERS["adamw"](model.parameters())
    params = dict(model.named_parameters())
    grads = {k: torch.randn_like(p) for k, p in params.items()}
    grads["0.bias"] = None  # a parameter without a gradient is left out of the step
    versions = {k: g._version for k, g in grads.items() if g is not None}
    copies = {k: g.clone() for k, g in grads.items() if g is not None}
    bias = params["0.bias"].detach().clone()
    pp.optim.step_torch(opt, params, grads, grads_finite=True)
    for k, g in copies.items():
        assert params[k].grad is grads[k]
        assert grads[k]._version == versions[k] and torch.equal(grads[k], g)
    assert params["0.bias"].grad is None and torch.equal(params["0.bias"], bias)
    assert params["0.bias"] not in opt.state


def test_parameters_named_twice_are_stepped_once() -> None:
    model = _model()
    opt = OPTIMIZERS["adamw"](model.parameters())
    params = dict(model.named_parameters())
    twice = {**params, "alias": params["0.weight"]}
    grads = {k: torch.ones_like(p) for k, p in twice.items()}
    pp.optim.step_torch(opt, twice, grads, grads_finite=True)
    assert float(opt.state[params["0.weight"]]["step"]) == 1.0


def test_sgd_groups_without_momentum_get_no_buffers() -> None:
    model = _model()
    first, *rest = model.parameters()
    opt = torch.optim.SGD(
        [{"params": [first], "momentum": 0.0}, {"params": rest}], lr=0.1, momentum=0.9, fused=True
    )
    params = dict(model.named_parameters())
    grads = {k: torch.ones_like(p) for k, p in params.items()}
    pp.optim.step_torch(opt, params, grads, grads_finite=torch.tensor(False))  # a skipped first
    assert "momentum_buffer" not in opt.state.get(first, {})
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in rest)


def test_other_leaves_beside_the_parameters_pass() -> None:
    model = _model()
    opt = OPTIMIZERS["adamw"](model.parameters())
    params = {"epoch": 3, **dict(model.named_parameters())}
    grads = {"epoch": None, **{k: torch.ones_like(p) for k, p in model.named_parameters()}}
    pp.optim.step_torch(opt, params, grads, grads_finite=True)
    assert all(float(opt.state[p]["step"]) == 1.0 for p in model.parameters())


def test_an_optimizer_that_only_says_fused_is_refused() -> None:
    """A torch optimizer of one's own with ``fused=True`` in its groups does not read
    GradScaler's found_inf unless it says so (``_step_supports_amp_scaling``)."""

    class Custom(torch.optim.Optimizer):
        def __init__(self, params: Any) -> None:
            super().__init__(params, {"lr": 0.1, "fused": True})

        def step(self, closure: Any = None) -> None:
            return None

    model = _model()
    params = dict(model.named_parameters())
    grads = {k: torch.ones_like(p) for k, p in params.items()}
    with pytest.raises(ValueError, match=r"Custom\(fused=True\) cannot skip a step"):
        pp.optim.step_torch(Custom(model.parameters()), params, grads, grads_finite=True)
