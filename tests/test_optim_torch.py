"""The way in from torch.optim: a torch optimizer's state_dict() becomes a polprec state that
continues the same trajectory."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import polprec as pp


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


CASES = [
    (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), pp.optim.sgd(0.05, momentum=0.9)),
    (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.5),
        pp.optim.sgd(0.05, momentum=0.9, dampening=0.5),
    ),
    (lambda ps: torch.optim.AdamW(ps, lr=0.01), pp.optim.adamw(0.01)),
    (
        lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True, fused=True),
        pp.optim.adam(0.01, amsgrad=True),
    ),
]


@pytest.mark.parametrize(
    ("make_torch", "opt"), CASES, ids=["sgd", "sgd-dampening", "adamw", "adam-amsgrad"]
)
def test_a_torch_run_continues_in_polprec(make_torch: Any, opt: Any) -> None:
    model = _model()
    torch_opt = make_torch(model.parameters())
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        torch_opt.zero_grad()
        _loss(model(x)).backward()
        torch_opt.step()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = opt.from_torch_state_dict(torch_opt.state_dict(), params)
    if isinstance(opt, pp.optim.Adam):
        assert int(state.step) == 5
    step_grad = pp.value_and_grad(lambda p, x: _loss(torch.func.functional_call(model, p, (x,))))
    for _ in range(10):
        torch_opt.zero_grad()
        _loss(model(x)).backward()
        torch_opt.step()
        _, grads, finite, _ = step_grad(params, x, loss_scale=pp.NoOpLossScale())
        params, state = opt.step(params, grads, state, grads_finite=finite)
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), rtol=2e-5, atol=2e-6)


def test_masters_come_from_the_torch_parameters() -> None:
    model = _model().to(torch.bfloat16)
    torch_opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _loss(model(torch.randn(3, 4, dtype=torch.bfloat16))).backward()
    torch_opt.step()
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = pp.optim.adamw(0.01).from_torch_state_dict(torch_opt.state_dict(), params)
    assert state.master["0.weight"].dtype == torch.float32
    assert torch.equal(state.master["0.weight"], params["0.weight"].float())
    assert state.exp_avg["0.weight"].dtype == torch.float32  # the state_dtype, not torch's
    torch.testing.assert_close(
        state.exp_avg["0.weight"], torch_opt.state[model[0].weight]["exp_avg"].float()
    )


def test_a_fresh_torch_optimizer_gives_a_fresh_state() -> None:
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = pp.optim.sgd(0.1, momentum=0.9).from_torch_state_dict(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict(), params
    )
    assert int(state.step) == 0 and all(torch.all(b == 0) for b in state.momentum_buffer.values())


def _trained(make: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    model = _model()
    opt = make(model.parameters())
    _loss(model(torch.randn(3, 4))).backward()
    opt.step()
    return opt.state_dict(), {k: v.detach() for k, v in model.named_parameters()}


def test_settings_must_agree() -> None:
    state_dict, params = _trained(lambda ps: torch.optim.AdamW(ps, lr=0.01))
    with pytest.raises(
        ValueError,
        match=r"lr=0.01 but this optimizer has lr=0.001; make the polprec optimizer with lr=0.01",
    ):
        pp.optim.adamw().from_torch_state_dict(state_dict, params)
    with pytest.raises(ValueError, match="decoupled_weight_decay=True"):
        pp.optim.adam(0.01, weight_decay=1e-2).from_torch_state_dict(state_dict, params)


def test_parameters_must_line_up() -> None:
    state_dict, params = _trained(lambda ps: torch.optim.AdamW(ps, lr=0.01))
    opt = pp.optim.adamw(0.01)
    with pytest.raises(ValueError, match="4 parameters but params has 3 floating leaves"):
        opt.from_torch_state_dict(state_dict, dict(list(params.items())[:3]))
    swapped = dict(reversed(list(params.items())))
    with pytest.raises(
        ValueError, match=r"exp_avg of parameter 0 has shape \(8, 4\) but \['2.bias'\]"
    ):
        opt.from_torch_state_dict(state_dict, swapped)


def test_one_step_count() -> None:
    state_dict, params = _trained(lambda ps: torch.optim.AdamW(ps, lr=0.01))
    state_dict["state"][0]["step"] = torch.tensor(7.0)
    opt = pp.optim.adamw(0.01)
    with pytest.raises(ValueError, match=r"different numbers of steps \[1.0, 7.0\]"):
        opt.from_torch_state_dict(state_dict, params)
    assert int(opt.from_torch_state_dict(state_dict, params, step=7).step) == 7


def test_not_a_state_dict() -> None:
    with pytest.raises(TypeError, match="'state' and 'param_groups'"):
        pp.optim.sgd(0.1).from_torch_state_dict({"lr": 0.1}, {})
