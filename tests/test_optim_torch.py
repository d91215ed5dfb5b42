"""The way in from torch.optim: a torch optimizer's state_dict() becomes a polprec state that
continues the same trajectory."""

from __future__ import annotations

import re
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


def test_a_state_dict_with_str_keys_and_missing_entries_continues() -> None:
    """A state dict that went through JSON has str parameter ids; a parameter without a
    gradient has no entry, a moment torch lacks starts from zero."""
    model = _model()
    model[0].weight.requires_grad_(False)  # the first parameter: no state in torch
    torch_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _loss(model(torch.randn(3, 4))).backward()
    torch_opt.step()
    model[0].weight.requires_grad_(True)
    state_dict = torch_opt.state_dict()
    state_dict["state"] = {str(k): v for k, v in state_dict["state"].items()}
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = pp.optim.sgd(0.05, momentum=0.9).from_torch_state_dict(state_dict, params)
    assert int(state.step) == 1 and state.step.dtype == torch.int32  # buffers: a step was taken
    assert torch.equal(state.momentum_buffer["0.weight"], torch.zeros(8, 4))
    assert torch.equal(
        state.momentum_buffer["2.bias"], torch_opt.state[model[2].bias]["momentum_buffer"]
    )
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    _loss(model(torch.randn(3, 4))).backward()
    adam.step()
    adam_dict = adam.state_dict()
    for entry in adam_dict["state"].values():
        del entry["exp_avg"]
    state = pp.optim.adam(0.01).from_torch_state_dict(adam_dict, params)
    assert torch.equal(state.exp_avg["2.bias"], torch.zeros(2))
    assert torch.equal(state.exp_avg_sq["2.bias"], adam.state[model[2].bias]["exp_avg_sq"])


def test_an_older_state_dict_without_decoupled_weight_decay_is_adams() -> None:
    state_dict, params = _trained(lambda ps: torch.optim.Adam(ps, lr=0.01))
    for group in state_dict["param_groups"]:
        del group["decoupled_weight_decay"]
    assert int(pp.optim.adam(0.01).from_torch_state_dict(state_dict, params).step) == 1
    with pytest.raises(ValueError, match="has decoupled_weight_decay=False but this optimizer"):
        pp.optim.adamw(0.01, weight_decay=0).from_torch_state_dict(state_dict, params)
    for group in state_dict["param_groups"]:  # other settings are not assumed
        del group["maximize"]
    with pytest.raises(ValueError, match="has maximize=None but this optimizer has maximize=False"):
        pp.optim.adam(0.01).from_torch_state_dict(state_dict, params)


def test_bad_torch_state_dicts_are_refused_clearly() -> None:
    state_dict, params = _trained(lambda ps: torch.optim.AdamW(ps, lr=0.01))
    opt = pp.optim.adamw(0.01)
    for groups in ([], "groups"):
        with pytest.raises(
            ValueError,
            match="^"
            + re.escape("state_dict['param_groups'] must be a non-empty list of groups")
            + "$",
        ):
            opt.from_torch_state_dict({**state_dict, "param_groups": groups}, params)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "param group 0 of the torch optimizer must be a dict with a 'params' list, got "
            "{'lr': 0.01}"
        ),
    ):
        opt.from_torch_state_dict({**state_dict, "param_groups": [{"lr": 0.01}]}, params)
    two = {**state_dict["param_groups"][0], "params": []}
    with pytest.raises(
        ValueError,
        match=re.escape(
            "param group 1 of the torch optimizer has lr=0.1 but this optimizer has lr=0.01; "
            "make the polprec optimizer with lr=0.1 (a polprec optimizer has one group of "
            "settings; a schedule passes lr_scale= to step, and pp.optim.partition gives each "
            "torch param group its own optimizer)"
        ),
    ):
        opt.from_torch_state_dict(
            {**state_dict, "param_groups": [state_dict["param_groups"][0], {**two, "lr": 0.1}]},
            params,
        )
    with pytest.raises(
        TypeError,
        match=re.escape(
            "state_dict must be a torch.optim optimizer's state_dict(): a mapping with keys "
            "'state' and 'param_groups', got list"
        ),
    ):
        opt.from_torch_state_dict([], params)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "floating leaves; build both from the same model (torch numbers parameters in the "
            "order model.parameters() gives them)"
        ),
    ):
        opt.from_torch_state_dict(state_dict, {"w": torch.ones(1)})
    swapped = dict(reversed(list(params.items())))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "has shape (2,): are params in the order the torch optimizer was given them?"
        ),
    ):
        opt.from_torch_state_dict(state_dict, swapped)
