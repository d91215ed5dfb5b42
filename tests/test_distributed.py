"""Distributed: cross-rank finite agreement and FSDP2 policies, on real gloo processes.

The multi-process tests spawn two ranks on 127.0.0.1 with the gloo backend; data-parallel
training uses ``Replicate()`` DTensor parameters (test_dtensor.py covers the layouts). Workers live at
module level (spawn pickles them by name), write their results with ``torch.save`` and are
killed if they outlive ``helpers.DIST_TIMEOUT_S``. Bad input to the distributed functions, and calls
without a process group: test_audit.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import load_digits, spawn
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_tensor

import polprec as pp
import polprec.distributed as ppd
from polprec.testing import assert_trees_all_close

_WORLD = 2
_BATCH = 64  # per step, split evenly over the ranks


# --- shared model and data (real data: sklearn's bundled digits) ---------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs scaled to [0, 1] and labels; loaded here once and handed to the workers."""
    return load_digits()


def _batch(x: torch.Tensor, y: torch.Tensor, step: int, rank: int | None = None) -> Any:
    """Step ``step``'s batch, or rank ``rank``'s contiguous shard of it."""
    start = (step * _BATCH) % (len(x) - _BATCH)
    lo, hi = start, start + _BATCH
    if rank is not None:
        per = _BATCH // _WORLD
        lo, hi = start + rank * per, start + (rank + 1) * per
    return x[lo:hi], y[lo:hi]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def _loss_fn(model: nn.Module, policy: str) -> Callable[..., torch.Tensor]:
    def loss_fn(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = pp.apply_with_policy(model, params, x, policy=policy)
        return nn.functional.cross_entropy(logits, y)

    return loss_fn


def _sgd_update(params: Any, grads: Any, finite: torch.Tensor) -> Any:
    new = {k: p - 0.5 * grads[k] for k, p in params.items()}
    return pp.select_tree(finite, new, params)


def _sgd_train_step(step_grad: Callable[..., Any]) -> Callable[..., Any]:
    def train_step(params: Any, x: torch.Tensor, y: torch.Tensor, ls: Any) -> Any:
        loss, grads, finite, ls = step_grad(params, x, y, loss_scale=ls)
        return loss, _sgd_update(params, grads, finite), finite, ls

    return train_step


def _agreed_update(params: Any, scaled_grads: Any, ls: pp.DynamicLossScale) -> Any:
    """The update half of a step: unscale, agree across ranks, update, adjust."""
    grads, finite = pp.unscale_and_check(scaled_grads, ls, process_group=dist.group.WORLD)
    return _sgd_update(params, grads, finite), finite, ls.adjust(finite)


def _scale_state(ls: pp.DynamicLossScale) -> dict[str, float]:
    return {"scale": float(ls.loss_scale), "counter": float(ls.counter)}


# --- workers (module level: spawn pickles them by name) -----------------------------------


def _nan_on_rank1_worker(rank: int, digits: Any) -> dict[str, Any]:
    x_all, y_all = digits
    model = _mlp()
    params0 = {k: v.detach() for k, v in model.named_parameters()}
    x, y = _batch(x_all, y_all, 0, rank)
    x = x.clone()
    if rank == 1:
        x[3, 5] = float("nan")
    loss_fn = _loss_fn(model, "16-mixed")
    world = dist.group.WORLD
    agreed = _sgd_train_step(pp.value_and_grad(loss_fn, process_group=world))
    local = _sgd_train_step(pp.value_and_grad(loss_fn))
    ls = pp.DynamicLossScale(2.0**10)
    out: dict[str, Any] = {"params0": params0}
    for name, fn in [("agreed", agreed), ("local", local)]:
        _, params, finite, new_ls = fn(params0, x, y, ls)
        out[name] = {"params": params, "finite": bool(finite), **_scale_state(new_ls)}
    # Compiled with fullgraph=True, the agreement runs as torch's functional all-reduce.
    compiled = torch.compile(_agreed_update, fullgraph=True, backend="aot_eager")
    plain_grad = pp.value_and_grad(loss_fn)
    clean = _batch(x_all, y_all, 1, rank)
    for name, (xb, yb) in [("compiled", (x, y)), ("compiled_clean", clean)]:
        _, grads, _, _ = plain_grad(params0, xb, yb, loss_scale=pp.NoOpLossScale())
        params, finite, new_ls = compiled(params0, ls.scale(grads), ls)
        out[name] = {"params": params, "finite": bool(finite), **_scale_state(new_ls)}
        out[name + "_eager"] = _agreed_update(params0, ls.scale(grads), ls)[0]
    grads = {"w": torch.tensor([1.0, float("nan") if rank == 1 else 2.0])}
    out["unscale_and_check"] = bool(pp.unscale_and_check(grads, ls, process_group=world)[1])
    out["across_mixed"] = bool(pp.all_finite_across(torch.tensor(rank == 0)))
    out["across_clean"] = bool(pp.all_finite_across(torch.tensor(True), group=world))
    return out


def _data_parallel_worker(rank: int, digits: Any) -> dict[str, Any]:
    """Functional DDP: Replicate() DTensor parameters; value_and_grad averages and agrees."""
    x_all, y_all = digits
    model = _mlp()
    mesh = init_device_mesh("cpu", (_WORLD,))
    params = {
        k: distribute_tensor(v.detach(), mesh, [Replicate()]) for k, v in model.named_parameters()
    }
    train_step = _sgd_train_step(pp.value_and_grad(_loss_fn(model, "32-true")))
    ls = pp.DynamicLossScale(2.0**8, period=10)
    for step in range(50):
        _, params, _, ls = train_step(params, *_batch(x_all, y_all, step, rank), ls)
    return {"params": {k: v.to_local() for k, v in params.items()}, **_scale_state(ls)}


def _fsdp_worker(rank: int, digits: Any) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    reduced: list[torch.dtype] = []
    # The collective FSDP2 reduce-scatters gradients with: reduce_scatter_single on newer
    # torch, reduce_scatter_tensor (output, input, ...) on older ones.
    name = (
        "reduce_scatter_single"
        if hasattr(dist, "reduce_scatter_single")
        else "reduce_scatter_tensor"
    )
    reduce_scatter = getattr(dist, name)

    def recording_reduce_scatter(*args: Any, **kwargs: Any) -> Any:
        reduced.append((kwargs["input"] if "input" in kwargs else args[1]).dtype)
        return reduce_scatter(*args, **kwargs)

    setattr(dist, name, recording_reduce_scatter)
    x = digits[0][:16]  # the same batch on both ranks: averaged gradients equal local ones
    out: dict[str, Any] = {}
    for spec in ["bf16-mixed", "16-mixed", "bf16-true"]:
        policy = pp.get_policy(spec)
        model = _mlp().to(policy.param_dtype)
        reference = _mlp()  # an unsharded float32 copy
        seen: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []
        for m in model:
            if isinstance(m, nn.Linear):
                m.register_forward_hook(
                    lambda mod, inp, o, seen=seen: seen.append(
                        (inp[0].dtype, mod.weight.dtype, o.dtype)
                    )
                )
                fully_shard(m, mp_policy=pp.to_fsdp_mixed_precision(policy, root=False))
        fully_shard(model, mp_policy=pp.to_fsdp_mixed_precision(policy))
        reduced.clear()
        output = model(x)
        output.float().square().mean().backward()
        reference(x).square().mean().backward()
        out[spec] = {
            "seen": [tuple(str(d) for d in s) for s in seen],
            "output": output.detach().float(),
            "output_dtype": str(output.dtype),
            "reference_output": reference(x).detach(),
            "sharded": {n: str(p.dtype) for n, p in model.named_parameters()},
            "grads": {n: p.grad.full_tensor().float() for n, p in model.named_parameters()},
            "grad_dtypes": {n: str(p.grad.dtype) for n, p in model.named_parameters()},
            "reference_grads": {n: p.grad for n, p in reference.named_parameters()},
            "reduced": [str(d) for d in reduced],
        }
    return out


# --- multi-process tests -------------------------------------------------------------------


@pytest.mark.slow
def test_nan_on_one_rank_makes_every_rank_skip_and_back_off(tmp_path: Path, digits: Any) -> None:
    results = spawn(_nan_on_rank1_worker, tmp_path, digits)
    for rank, r in enumerate(results):
        for name in ["agreed", "compiled"]:  # eager and torch.compile(fullgraph=True)
            got = r[name]
            assert got["finite"] is False, (rank, name)
            assert got["scale"] == 2.0**9, (rank, name)
            for k, p in got["params"].items():
                assert torch.equal(p, r["params0"][k]), (rank, name, k)
                assert torch.equal(p, results[0][name]["params"][k]), (rank, name, k)
        assert r["unscale_and_check"] is False
        assert r["across_mixed"] is False
        assert r["across_clean"] is True
        clean = r["compiled_clean"]
        assert clean["finite"] is True
        assert_trees_all_close(clean["params"], r["compiled_clean_eager"], rtol=1e-6, atol=0)
        for k, p in clean["params"].items():
            assert not torch.equal(p, r["params0"][k]), (rank, k)
    # Without the agreement rank 0 believes its step is fine, keeps its scale and updates
    # its parameters while rank 1 skips: the ranks drift apart, the failure the option prevents.
    local0, local1 = results[0]["local"], results[1]["local"]
    assert (local0["finite"], local1["finite"]) == (True, False)
    assert (local0["scale"], local1["scale"]) == (2.0**10, 2.0**9)
    assert not torch.equal(local0["params"]["0.weight"], local1["params"]["0.weight"])
    assert torch.equal(local1["params"]["0.weight"], results[1]["params0"]["0.weight"])


@pytest.mark.slow
def test_data_parallel_training_equals_single_process_on_the_full_batch(
    tmp_path: Path, digits: Any
) -> None:
    results = spawn(_data_parallel_worker, tmp_path, digits)
    x_all, y_all = digits
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    train_step = _sgd_train_step(pp.value_and_grad(_loss_fn(model, "32-true")))
    ls = pp.DynamicLossScale(2.0**8, period=10)
    losses = []
    for step in range(50):
        loss, params, _, ls = train_step(params, *_batch(x_all, y_all, step), ls)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]  # it trains
    for r in results:
        assert_trees_all_close(r["params"], params, rtol=1e-4, atol=1e-5)
        assert _scale_state(ls) == {"scale": r["scale"], "counter": r["counter"]}
        assert r["scale"] == 2.0**13  # grew once per 10 clean steps
    for k, p in results[1]["params"].items():
        assert torch.equal(p, results[0]["params"][k]), k


@pytest.mark.slow
def test_fully_shard_with_converted_policy_runs_in_the_policys_dtypes(
    tmp_path: Path, digits: Any
) -> None:
    results = spawn(_fsdp_worker, tmp_path, digits)
    for r in results:
        for spec, got in r.items():
            policy = pp.get_policy(spec)
            c, p, o = (
                str(d) for d in (policy.compute_dtype, policy.param_dtype, policy.output_dtype)
            )
            assert got["seen"] == [(c, c, c), (c, c, c)], spec  # inside each Linear
            assert got["output_dtype"] == o, spec
            assert set(got["sharded"].values()) == {p}, spec
            assert set(got["grad_dtypes"].values()) == {p}, spec
            assert got["reduced"] and set(got["reduced"]) == {"torch.float32"}, spec
            assert_trees_all_close(
                got["output"], got["reference_output"], dtype=policy.compute_dtype
            )
            assert_trees_all_close(
                got["grads"],
                got["reference_grads"],
                rtol=0.05,
                atol=0.05 * max(float(g.abs().max()) for g in got["reference_grads"].values()),
            )


# --- single-process tests ------------------------------------------------------------------


@pytest.fixture
def single_rank_group(tmp_path: Path) -> Any:
    """A one-rank gloo default group in this process, torn down afterwards."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("value", [True, False])
def test_all_finite_across_one_rank_is_the_identity(single_rank_group: Any, value: bool) -> None:
    flag = torch.tensor(value)
    got = pp.all_finite_across(flag, group=single_rank_group)
    assert got.dtype == torch.bool and got.shape == () and bool(got) is value
    assert got is not flag and flag.dtype == torch.bool and bool(flag) is value
    assert bool(pp.all_finite_across(value)) is value  # a Python bool is accepted


def test_value_and_grad_with_a_group_matches_without(single_rank_group: Any) -> None:
    def loss_fn(p: Any, x: torch.Tensor) -> torch.Tensor:
        return (p["w"] * x).sum()

    params, ls = {"w": torch.ones(3)}, pp.DynamicLossScale(2.0**4)
    for x in [torch.arange(3.0), torch.tensor([1.0, float("inf"), 0.0])]:
        with_group = pp.value_and_grad(loss_fn, process_group=single_rank_group)(
            params, x, loss_scale=ls
        )
        without = pp.value_and_grad(loss_fn)(params, x, loss_scale=ls)
        assert_trees_all_close(with_group[:3], without[:3], rtol=0, atol=0)
        assert float(with_group[3].loss_scale) == float(without[3].loss_scale)
        agreed = pp.unscale_and_check({"w": x}, ls, process_group=single_rank_group)
        assert_trees_all_close(agreed, pp.unscale_and_check({"w": x}, ls), rtol=0, atol=0)
        assert bool(agreed[1]) is bool(without[2])


def test_all_finite_across_refuses_to_run_inside_vmap(single_rank_group: Any) -> None:
    with pytest.raises(RuntimeError, match="once per rank, not once per batch member"):
        torch.func.vmap(pp.all_finite_across)(torch.tensor([True, False]))


@pytest.mark.parametrize(
    ("spec", "param", "reduce", "output"),
    [
        ("16-mixed", torch.float16, torch.float32, torch.float32),
        ("bf16-mixed", torch.bfloat16, torch.float32, torch.float32),
        ("bf16-true", torch.bfloat16, torch.float32, torch.float32),  # 16-bit params too
        ("16-true", torch.float16, torch.float32, torch.float32),
        ("32-true", torch.float32, torch.float32, torch.float32),
        ("64-true", torch.float64, torch.float64, torch.float32),
        ("p=f64,c=f32,o=f32", torch.float32, torch.float64, torch.float32),
        ("p=f32,c=bf16,o=bf16", torch.bfloat16, torch.float32, torch.bfloat16),
    ],
)
def test_to_fsdp_mixed_precision_maps_compute_param_output(
    spec: str, param: torch.dtype, reduce: torch.dtype, output: torch.dtype
) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    for given in [spec, pp.get_policy(spec)]:
        mp_policy = pp.to_fsdp_mixed_precision(given)
        assert mp_policy == MixedPrecisionPolicy(param, reduce, output, cast_forward_inputs=True)
        inner = pp.to_fsdp_mixed_precision(given, root=False)  # a layer inside the root
        assert inner == MixedPrecisionPolicy(param, reduce, None, cast_forward_inputs=True)
    assert not pp.to_fsdp_mixed_precision(spec, cast_forward_inputs=False).cast_forward_inputs
    for asked in [torch.bfloat16, "bf16", "bfloat16", torch.float64]:
        got = pp.to_fsdp_mixed_precision(spec, reduce_dtype=asked).reduce_dtype
        assert got == pp.parse_dtype(asked)


def test_to_fsdp_mixed_precision_without_fsdp2_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fsdp(name: str) -> Any:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(ppd.importlib, "import_module", no_fsdp)
    with pytest.raises(RuntimeError, match="needs FSDP2"):
        pp.to_fsdp_mixed_precision("bf16-mixed")
