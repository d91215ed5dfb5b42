"""polprec.optim on a CUDA device: torch's fused kernels, the skip without a host sync.

Skipped without CUDA; run them on a machine with a GPU with
``python -m pytest tests/test_optim_cuda.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from test_cuda import no_host_sync  # the same sync-debug guard as the other CUDA tests

import polprec as pp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"


def _problem(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator(device=DEV).manual_seed(0)
    params = {
        n: torch.randn(s, device=DEV, generator=gen).to(dtype)
        for n, s in [("w", (64, 32)), ("b", (32,))]
    }
    grads = {
        n: torch.randn(p.shape, device=DEV, generator=gen).to(dtype) for n, p in params.items()
    }
    return params, grads


OPTIMIZERS = {
    "sgd": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
        pp.optim.sgd(0.05, momentum=0.9),
    ),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True), pp.optim.adamw(0.01)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_cuda_step_is_torchs_fused_step(name: str) -> None:
    make_torch, opt = OPTIMIZERS[name]
    params, grads = _problem(torch.float32)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params.values()]
    torch_opt = make_torch(torch_params)
    state = opt.init(params)
    for _ in range(10):
        for p, g in zip(torch_params, grads.values(), strict=True):
            p.grad = g.clone()
        torch_opt.step()
        params, state = opt.step(params, grads, state, grads_finite=torch.tensor(True, device=DEV))
    for p, q in zip(params.values(), torch_params, strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "precision", [{}, {"rounding": "stochastic"}, {"kahan": True}, {"master_weights": False}]
)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_step_and_skip_without_host_sync(name: str, precision: dict[str, Any]) -> None:
    opt = OPTIMIZERS[name][1]
    opt = dataclasses.replace(opt, **precision)
    params, grads = _problem(torch.bfloat16)
    state = opt.init(params)
    lr = torch.tensor(0.01, device=DEV)
    with no_host_sync():
        good, good_state = opt.step(
            params, grads, state, grads_finite=torch.ones((), dtype=torch.bool, device=DEV), lr=lr
        )
        skipped, skipped_state = opt.step(
            params, grads, state, grads_finite=torch.zeros((), dtype=torch.bool, device=DEV), lr=lr
        )
    assert all(torch.equal(skipped[k], params[k]) for k in params)
    assert not torch.equal(good["w"], params["w"])
    assert (int(good_state.step), int(skipped_state.skips)) == (1, 1)
    assert good_state.step.device.type == "cuda"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_torch_skips_on_the_device(name: str) -> None:
    # pp.optim.step_torch hands polprec's gradients and flag to a fused torch optimizer: no
    # host sync, and the trajectory of the host-synced `if finite: optimizer.step()`.
    make_torch = OPTIMIZERS[name][0]
    params, grads = _problem(torch.float32)
    ours = {k: torch.nn.Parameter(p.clone()) for k, p in params.items()}
    theirs = {k: torch.nn.Parameter(p.clone()) for k, p in params.items()}
    ours_opt, theirs_opt = make_torch(ours.values()), make_torch(theirs.values())
    flags = [False, True, True, False, True]  # a skipped first step, then both kinds
    with no_host_sync():
        for finite in flags:
            flag = torch.tensor(finite, device=DEV)
            pp.optim.step_torch(ours_opt, ours, grads, grads_finite=flag)
    for finite in flags:
        for k, p in theirs.items():
            p.grad = grads[k].clone()
        if finite:  # the host-synced reference (a zero first buffer, as step_torch makes)
            theirs_opt.step()
    for k in params:
        assert torch.equal(ours[k], theirs[k]), k
        for key, value in theirs_opt.state[theirs[k]].items():
            assert torch.equal(ours_opt.state[ours[k]][key], value), (k, key)
