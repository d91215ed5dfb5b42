"""pp.optim on DTensor parameters in one process: a one-rank group and mesh.

On one rank a DTensor's local shard is the whole tensor, so a step on DTensors must give
the plain tensors' numbers bit for bit, with every parameter and every piece of state
(moments, master copies, compensation) a DTensor laid out as its parameter. The two-rank
runs, where shards differ, are in test_dtensor_optim.py (slow).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import OPTIM_CASES, assert_unchanged, optim_grads, optim_tree, snapshot
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import polprec as pp

_STEPS = 3

_OPTIMIZERS = OPTIM_CASES


def _run(opt: Any, params: Any, grads_of: Any, *, donate: bool) -> tuple[Any, Any]:
    state = opt.init(params, seed=3)
    for t in range(_STEPS):
        params, state = opt.step(params, grads_of(t), state, donate=donate)
    return params, state


def _state_leaves(state: Any) -> dict[str, Any]:
    """Every tensor of the state's trees (moments, masters, compensation) by field and key."""
    inner = state.states if isinstance(state, pp.optim.PartitionState) else {"": state}
    out = {}
    for label, s in inner.items():
        for field in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            tree = getattr(s, field, None)
            for k, v in (tree or {}).items():
                if v is not None:
                    out[f"{label}/{field}/{k}"] = v
        for field in ("master", "compensation"):
            for k, v in (getattr(s, field) or {}).items():
                if v is not None:
                    out[f"{label}/{field}/{k}"] = v
    return out


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("placement", [Replicate(), Shard(0)], ids=["replicate", "shard0"])
@pytest.mark.parametrize("name", list(_OPTIMIZERS))
def test_one_rank_dtensor_steps_equal_plain_steps_bit_for_bit(
    mesh: Any, name: str, placement: Any, donate: bool
) -> None:
    opt, dtype = _OPTIMIZERS[name]

    def place(tree: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {k: distribute_tensor(v, mesh, [placement]) for k, v in tree.items()}

    ref, ref_state = _run(
        opt, optim_tree(dtype), lambda t: optim_grads(optim_tree(dtype), t), donate=False
    )
    start = place(optim_tree(dtype))
    before = snapshot(tuple(v.to_local() for v in start.values()))  # values, versions
    got, state = _run(opt, start, lambda t: place(optim_grads(optim_tree(dtype), t)), donate=donate)
    for k, v in got.items():
        assert type(v) is DTensor and v.placements == (placement,) and v.dtype == dtype, k
        assert torch.equal(v.full_tensor(), ref[k]), k
    ref_leaves, leaves = _state_leaves(ref_state), _state_leaves(state)
    assert sorted(leaves) == sorted(ref_leaves) and leaves
    for key, v in leaves.items():
        assert type(v) is DTensor and v.placements == (placement,), key
        assert v.dtype == ref_leaves[key].dtype, key
        assert torch.equal(v.full_tensor(), ref_leaves[key]), key
    assert type(state.step) is torch.Tensor and int(state.step) == _STEPS
    if not donate:
        assert_unchanged(tuple(v.to_local() for v in start.values()), before)


@pytest.mark.parametrize("placement", [Replicate(), Shard(0)], ids=["replicate", "shard0"])
def test_a_donated_step_gives_back_the_dtensors_it_updated_in_place(
    mesh: Any, placement: Any
) -> None:
    params = {
        k: distribute_tensor(v, mesh, [placement]) for k, v in optim_tree(torch.float32).items()
    }
    grads = {k: distribute_tensor(v, mesh, [placement]) for k, v in optim_grads(params, 0).items()}
    opt = pp.optim.adamw(1e-2)
    state = opt.init(params)
    moments = dict(state.exp_avg)
    new, new_state = opt.step(params, grads, state, donate=True)
    assert all(new[k] is params[k] for k in params)  # the module's own objects stay its own
    assert all(new_state.exp_avg[k] is moments[k] for k in params)
    fresh, _ = opt.step(params, grads, new_state)
    assert all(fresh[k] is not params[k] for k in params)  # a pure step: new DTensors
    # 16-bit parameters: their float32 master copies are updated in place too
    half = {
        k: distribute_tensor(v, mesh, [placement]) for k, v in optim_tree(torch.bfloat16).items()
    }
    opt = pp.optim.adamw(1e-2, master_weights=True)
    state = opt.init(half)
    masters = dict(state.master)
    _, new_state = opt.step(
        half, {k: v.to(torch.bfloat16) for k, v in grads.items()}, state, donate=True
    )
    assert all(new_state.master[k] is masters[k] for k in half)


@pytest.mark.parametrize(
    ("opt", "field"),
    [(pp.optim.adamw(1e-2), "exp_avg"), (pp.optim.sgd(0.1, kahan=True), "compensation")],
    ids=["moment", "compensation"],
)
def test_a_state_of_other_settings_is_refused_for_dtensors_too(
    mesh: Any, opt: Any, field: str
) -> None:
    params = {
        k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in optim_tree(torch.bfloat16).items()
    }
    grads = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in optim_grads(params, 0).items()}
    state = opt.init(params)
    bad = state.replace(**{field: {**getattr(state, field), "w": None}})
    with pytest.raises(ValueError, match=f"state.{field} has nothing for parameter w"):
        opt.step(params, grads, bad)


def test_a_non_finite_shard_skips_the_step(mesh: Any) -> None:
    params = {
        k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in optim_tree(torch.float32).items()
    }
    raw = optim_grads(optim_tree(torch.float32), 0)
    raw["b"][3] = float("nan")
    grads = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in raw.items()}
    opt = pp.optim.adamw(1e-2)
    new, state = opt.step(params, grads, opt.init(params))
    assert (int(state.step), int(state.skips)) == (0, 1)
    assert all(torch.equal(new[k].full_tensor(), params[k].full_tensor()) for k in params)


def test_a_plain_gradient_for_a_dtensor_parameter_is_refused(mesh: Any) -> None:
    params = {"w": distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])}
    opt = pp.optim.sgd(0.1)
    with pytest.raises(ValueError, match="not laid out as its parameter") as info:
        opt.step(params, {"w": torch.ones(4, 2)}, opt.init(params))
    message = str(info.value)
    assert "gradient of w" in message and ": a Tensor against a DTensor with placements" in message
    assert "(Shard(dim=0),) on DeviceMesh" in message
    assert message.endswith(
        "; a DTensor parameter needs a DTensor gradient on its mesh with its placements (as "
        "value_and_grad returns)"
    )
