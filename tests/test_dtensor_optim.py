"""pp.optim on DTensor parameters, and the module routes of FSDP2 and DDP.

Functional: parameters, gradients and states laid out as DTensors on two gloo ranks are
updated on their local shards by torch's fused kernels; the result equals one process's,
bit for bit (the update is elementwise and its per-step numbers are global), stochastic
rounding included, and each rank holds only its shards of the moments and masters.

Module routes: a model wrapped by FSDP2's ``fully_shard`` or by DDP runs its own forward and
backward; polprec unscales, checks, clips and steps its ``.grad`` tensors with
``donate=True``, which lands in the wrapper's parameters, as torch.amp's GradScaler and a
fused torch optimizer do, with the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import OPTIM_CASES, optim_grads, optim_tree, spawn
from torch import nn

import polprec as pp

_STEPS = 3


# the two-rank runs take the one-process cases but the second Adam and SGD variants
_OPTIMIZERS = {
    k: OPTIM_CASES[k]
    for k in ("adamw", "sgd-nesterov", "master-bf16", "stochastic-bf16", "kahan-bf16", "partition")
}


def _run(opt: Any, params: Any, grads_of: Any, *, donate: bool, nan_at: int | None = None) -> Any:
    state = opt.init(params, seed=3)
    for t in range(_STEPS):
        grads = grads_of(t)
        params, state = opt.step(params, grads, state, donate=donate)
    return params, state


def _functional_worker(rank: int, _: Any) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    out: dict[str, Any] = {}
    for layout, placements in (
        ("shard0", [Shard(0)]),
        ("shard1", [Shard(1)]),
        ("rep", [Replicate()]),
    ):
        for name, (opt, dtype) in _OPTIMIZERS.items():
            for donate in (False, True):

                def place(x: torch.Tensor, placements: list[Any] = placements) -> Any:
                    pl = [Shard(0)] if x.dim() == 1 and placements == [Shard(1)] else placements
                    return distribute_tensor(x, mesh, pl)

                start = {k: place(v) for k, v in optim_tree(dtype).items()}
                locals_before = {k: v.to_local().data_ptr() for k, v in start.items()}

                def grads_of(t: int, dtype: torch.dtype = dtype) -> dict[str, Any]:
                    return {k: place(v) for k, v in optim_grads(optim_tree(dtype), t).items()}

                params, state = _run(opt, start, grads_of, donate=donate)
                key = f"{layout}/{name}/{'donated' if donate else 'pure'}"
                out[key] = {k: v.full_tensor() for k, v in params.items()}
                out[key + "/types"] = sorted({type(v).__name__ for v in params.values()})
                if donate and name in ("adamw", "sgd-nesterov"):  # direct: in the inputs' shards
                    out[key + "/in place"] = all(
                        params[k].to_local().data_ptr() == locals_before[k] for k in params
                    )
                inner = state.states["decay"] if name == "partition" else state
                moment = inner.exp_avg if hasattr(inner, "exp_avg") else inner.momentum_buffer
                if layout != "rep" and moment["w"] is not None:
                    out[key + "/moment numel"] = moment["w"].to_local().numel()

    # one rank's NaN, no flag given: the step checks, and both ranks skip
    params = {
        k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in optim_tree(torch.float32).items()
    }
    opt = pp.optim.adamw(1e-2)
    grads = {
        k: distribute_tensor(v, mesh, [Shard(0)])
        for k, v in optim_grads(optim_tree(torch.float32), 0).items()
    }
    if rank == 1:
        grads["b"].to_local()[0] = float("nan")  # in rank 1's shard only
    new, state = opt.step(params, grads, opt.init(params))
    out["nan/skipped"] = (int(state.skips), int(state.step))
    out["nan/unchanged"] = all(
        torch.equal(new[k].full_tensor(), params[k].full_tensor()) for k in params
    )
    return out


@pytest.mark.slow
def test_sharded_updates_equal_one_process_bit_for_bit(tmp_path: Path) -> None:
    results = spawn(_functional_worker, tmp_path, None)
    for name, (opt, dtype) in _OPTIMIZERS.items():
        ref, _ = _run(
            opt, optim_tree(dtype), lambda t, d=dtype: optim_grads(optim_tree(d), t), donate=False
        )
        for r in results:
            for layout in ("shard0", "shard1", "rep"):
                for how in ("pure", "donated"):
                    key = f"{layout}/{name}/{how}"
                    got = r[key]
                    for k in ref:
                        assert got[k].dtype == dtype and torch.equal(got[k], ref[k]), (key, k)
                    assert r[key + "/types"] == ["DTensor"]
                    if how == "donated" and name in ("adamw", "sgd-nesterov"):
                        assert r[key + "/in place"], key
                    if layout != "rep" and key + "/moment numel" in r:
                        assert r[key + "/moment numel"] < 15, key  # a shard of the 5 x 3 moment
            assert r["nan/skipped"] == (1, 0) and r["nan/unchanged"]


# --- the module routes: FSDP2 and DDP run forward and backward, polprec the rest ------------


def _mlp() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def _batch(rank: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * t + rank)
    return torch.randn(6, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)


def _torch_steps(model: nn.Module, rank: int, policy: pp.Policy) -> list[float]:
    """torch.amp's loop with a fused AdamW: GradScaler, unscale_, clip_grad_norm_, step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    losses = []
    for t in range(_STEPS):
        x, y = _batch(rank, t)
        with torch.autocast("cpu", dtype=policy.compute_dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def _polprec_steps(model: nn.Module, rank: int, policy: pp.Policy) -> tuple[list[float], Any]:
    """The same loop with polprec after backward(): unscale, agree, clip, a donated step."""
    params = dict(model.named_parameters())
    opt = pp.optim.adamw(1e-2)
    opt_state = opt.init(params)
    loss_scale = pp.DynamicLossScale(2.0**8)
    losses = []
    for t in range(_STEPS):
        x, y = _batch(rank, t)
        with pp.autocast(policy):
            loss = nn.functional.cross_entropy(model(x), y)
        pp.scale_loss(loss, loss_scale).backward()
        grads, finite = pp.unscale_and_check({k: p.grad for k, p in params.items()}, loss_scale)
        grads, _ = pp.clip_by_global_norm(grads, 1.0)
        params, opt_state = opt.step(params, grads, opt_state, grads_finite=finite, donate=True)
        assert all(params[k] is p for k, p in model.named_parameters())  # the module's own
        loss_scale = loss_scale.adjust(finite)
        model.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses, (int(opt_state.step), float(loss_scale.loss_scale))


def _module_worker(rank: int, _: Any) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    policy = pp.get_policy("16-mixed")
    out: dict[str, Any] = {}
    for route in ("fsdp2", "ddp"):
        results = {}
        for who in ("torch", "polprec"):
            model = _mlp()
            if route == "fsdp2":
                fully_shard(model[0])
                fully_shard(model)
            else:
                model = DistributedDataParallel(model)
            if who == "torch":
                losses = _torch_steps(model, rank, policy)
                extra = None
            else:
                losses, extra = _polprec_steps(model, rank, policy)
            full = {
                k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in model.named_parameters()
            }
            results[who] = (losses, full, extra)
        out[route] = results
    return out


@pytest.mark.slow
def test_fsdp2_and_ddp_module_routes_equal_torch_amp_with_a_fused_adamw(tmp_path: Path) -> None:
    results = spawn(_module_worker, tmp_path, None)
    for r in results:
        for route in ("fsdp2", "ddp"):
            torch_losses, torch_params, _ = r[route]["torch"]
            pp_losses, pp_params, (steps, scale) = r[route]["polprec"]
            assert steps == _STEPS and scale == 2.0**8
            assert pp_losses == torch_losses, route
            for k in torch_params:
                torch.testing.assert_close(pp_params[k], torch_params[k], rtol=1e-6, atol=1e-7)
                assert not torch.equal(pp_params[k], _mlp_state(k)), (route, k)  # it trained
    # the ranks agree: data parallelism keeps one model
    for route in ("fsdp2", "ddp"):
        a, b = (r[route]["polprec"][1] for r in results)
        assert all(torch.equal(a[k], b[k]) for k in a)


def _mlp_state(name: str) -> torch.Tensor:
    key = name.removeprefix("module.")
    return dict(_mlp().named_parameters())[key].detach()
