"""The short eager step (polprec/optim/_fast.py) against the general one: the same bits.

The short way is taken for a dict of plain tensors in one dtype with settings that need no
master copy, compensation or stochastic rounding; everything else goes the general way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optree
import pytest
import torch

import polprec as pp
from polprec.optim import _base, _fast

OPTIMIZERS = {
    "sgd": pp.optim.sgd(0.05),
    "sgd-momentum": pp.optim.sgd(0.05, momentum=0.9, weight_decay=0.01),
    "sgd-nesterov-maximize": pp.optim.sgd(0.05, momentum=0.9, nesterov=True, maximize=True),
    "adam-amsgrad": pp.optim.adam(0.01, amsgrad=True, weight_decay=0.1),
    "adamw": pp.optim.adamw(0.01),
}


def _params(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen).to(dtype) for k, s in [("w", (7, 5)), ("b", (5,))]}


def _grads(params: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + t)
    return {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in params.items()}


def _trajectory(opt: Any, *, general: bool, donate: bool, dtype: torch.dtype) -> list[Any]:
    """Params and counters after each of 8 steps (steps 2 and 5 skipped, a tensor lr)."""
    params = _params(dtype)
    state = opt.init(params)
    out = []
    for t in range(8):
        finite = torch.tensor(t not in (2, 5))
        lr = torch.tensor(0.02 * (t + 1)) if t % 2 else None
        if general:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(_fast, "step", lambda *a: None)
                params, state = opt.step(
                    params, _grads(params, t), state, grads_finite=finite, lr=lr, donate=donate
                )
        else:
            params, state = opt.step(
                params, _grads(params, t), state, grads_finite=finite, lr=lr, donate=donate
            )
        out.append(({k: v.clone() for k, v in params.items()}, state.step, state.skips))
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_the_short_step_gives_the_general_steps_bits(
    name: str, donate: bool, dtype: torch.dtype
) -> None:
    opt = OPTIMIZERS[name]
    if dtype == torch.bfloat16:  # bf16-true without master copies: the short way too
        opt = dataclasses.replace(opt, master_weights=False)
    short = _trajectory(opt, general=False, donate=donate, dtype=dtype)
    general = _trajectory(opt, general=True, donate=donate, dtype=dtype)
    for (p1, s1, k1), (p2, s2, k2) in zip(short, general, strict=True):
        assert torch.equal(s1, s2) and torch.equal(k1, k2)
        for key in p1:
            assert p1[key].dtype == dtype and torch.equal(p1[key], p2[key]), key
    assert int(short[-1][1]) == 6 and int(short[-1][2]) == 2
    for t in (2, 5):  # the skipped steps left the parameters as they were, bit for bit
        assert all(torch.equal(short[t][0][k], short[t - 1][0][k]) for k in short[t][0])


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            pp.optim.sgd(0.05, momentum=0.9),
            lambda ps: torch.optim.SGD(ps, 0.05, momentum=0.9, fused=True),
        ),
        (  # with weight decay, where Adam and AdamW differ
            pp.optim.adam(0.01, weight_decay=0.1),
            lambda ps: torch.optim.Adam(ps, 0.01, weight_decay=0.1, fused=True),
        ),
        (pp.optim.adamw(0.01), lambda ps: torch.optim.AdamW(ps, 0.01, fused=True)),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_the_short_step_is_torchs_fused_step(ours: Any, theirs: Any) -> None:
    params = _params()
    torch_params = [torch.nn.Parameter(v.clone()) for v in params.values()]
    torch_opt = theirs(torch_params)
    state = ours.init(params)
    for t in range(5):
        grads = _grads(params, t)
        for p, g in zip(torch_params, grads.values(), strict=True):
            p.grad = g.clone()
        torch_opt.step()
        params, state = ours.step(params, grads, state)
    for a, b in zip(params.values(), torch_params, strict=True):
        assert torch.equal(a, b.detach())


def test_the_short_step_is_taken_and_stays_pure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_base, "leaves", lambda *a: pytest.fail("took the general path"))
    opt = pp.optim.adamw(0.01)
    params = _params()
    state = opt.init(params)
    grads = _grads(params, 0)
    watched = [*params.values(), *grads.values(), *state.exp_avg.values(), state.step]
    versions = [t._version for t in watched]
    new, new_state = opt.step(params, grads, state, grads_finite=torch.tensor(True))
    assert [t._version for t in watched] == versions
    assert all(not torch.equal(new[k], params[k]) for k in params)
    assert int(new_state.step) == 1 and int(state.step) == 0


@pytest.mark.parametrize(
    "case",
    ["none-grad", "two-dtypes", "master-weights", "nested", "recording", "other-keys"],
)
def test_what_does_not_fit_goes_the_general_way(case: str) -> None:
    opt = pp.optim.sgd(0.1, momentum=0.9)
    params: Any = _params()
    grads: Any = _grads(params, 0)
    if case == "none-grad":
        grads["b"] = None
    elif case == "two-dtypes":
        params["b"] = params["b"].double()
        grads["b"] = grads["b"].double()
    elif case == "master-weights":
        params = {k: v.bfloat16() for k, v in params.items()}
        grads = {k: v.bfloat16() for k, v in grads.items()}
    elif case == "nested":
        params, grads = {"layer": params}, {"layer": grads}
    elif case == "recording":
        params = {k: v.requires_grad_() for k, v in params.items()}
    state = opt.init(params)
    if case == "other-keys":
        grads = {"w": grads["w"], "c": grads["b"]}
    assert _fast.step(opt, params, grads, state, None, 0.1, False) is None
    if case == "other-keys":
        with pytest.raises(ValueError, match="structure of params"):
            opt.step(params, grads, state)
        return
    new, new_state = opt.step(params, grads, state)  # the general path takes it
    flat_new, flat_old = (optree.tree_leaves(t, namespace="torch") for t in (new, params))
    assert not torch.equal(flat_new[0], flat_old[0])
    assert int(new_state.step) == 1
